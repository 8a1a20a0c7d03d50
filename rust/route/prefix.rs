//! Approximate KV-prefix index: which backend was last sent each prompt prefix. Invariant: the
//! memory it allocates (`bytes_reserved`, counted conservatively, see [`reserved_bytes`]) never
//! exceeds `max_bytes`; it is allocated once, at construction, and never grows.
//!
//! Pure Rust, no Python: the PyO3 glue lives in `mod.rs`.
//!
//! Layout and why (measurements in docs/adr/006-prefix-index.md):
//! - A prompt is cut into blocks of `block_bytes` UTF-8 bytes; block i is named by the chained
//!   hash `h_i = xxh3_64(block_i, seed = h_{i-1})`, `h_{-1}` a random per-index seed (llm-d's
//!   scheme). A block hash therefore names the whole prefix up to its end: two prompts share
//!   block i only if they share every byte before it. A trailing partial block is not indexed.
//! - One open-addressing table (linear probing, backward-shift deletion, load <= 3/4) maps a
//!   block hash to a short chain of entries, one per backend holding that block. The hashes are
//!   already uniform and keyed by a secret seed, so the table uses their low bits directly and a
//!   client cannot aim prompts at one probe run.
//! - Every (block, backend) entry sits in a slab and on one intrusive LRU list. An insert
//!   touches its blocks from the last to the first, so a prefix is always more recent than its
//!   extensions and eviction (from the LRU tail) removes the deepest blocks first: what remains
//!   of a backend's prompt is still a prefix of it. The budget is global, not per backend, so
//!   a busy backend takes room from idle ones instead of the sum growing with the fleet.
//! - `match_prefix` walks blocks from the first, keeping the backends that hold every block so
//!   far, and stops at the first block nobody (left) holds: O(prompt length) hashing plus
//!   O(blocks x backends per block) probing.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::mem::size_of;

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// "No entry" in the slab links.
const NIL: u32 = u32::MAX;

/// Backend id reserved to mark free slab entries; Python ids must be below it.
pub const MAX_BACKEND: u32 = u32::MAX - 1;

/// One (block, backend) entry: 24 bytes.
#[derive(Clone, Copy, Debug)]
struct Entry {
    /// Chained hash of the block (to find its table slot when the entry is evicted).
    hash: u64,
    /// Backend id, or `NIL` while the entry is on the free list.
    backend: u32,
    /// LRU neighbours: `prev` is more recent, `next` older. `next` links the free list.
    prev: u32,
    next: u32,
    /// Next entry of the same block (another backend), or `NIL`.
    chain: u32,
}

/// Table slot `[hash, head + 1]`; all zeros is empty, which lets the table come from a zeroed
/// allocation whose pages the kernel only backs once touched.
type Slot = [u64; 2];

/// Bytes of one slab entry.
pub const ENTRY_BYTES: u64 = size_of::<Entry>() as u64;
/// Bytes of one table slot.
pub const SLOT_BYTES: u64 = size_of::<Slot>() as u64;
/// Fixed cost charged once: the index struct, its lock and counters, the two heap blocks'
/// allocator headers (checked by `fixed_bytes_cover_the_struct`).
pub const FIXED_BYTES: u64 = 512;
/// The smallest table; below this the index is useless.
const MIN_SLOTS: usize = 16;
/// Largest block size accepted (a block larger than a prompt never matches anything).
pub const MAX_BLOCK_BYTES: usize = 1 << 20;

/// Memory actually reserved for a layout of `entries` slab entries and `slots` table slots.
/// This is the whole formula the budget is checked against:
/// `FIXED_BYTES + entries * ENTRY_BYTES + slots * SLOT_BYTES`.
pub fn reserved_bytes(entries: usize, slots: usize) -> u64 {
    FIXED_BYTES
        .saturating_add((entries as u64).saturating_mul(ENTRY_BYTES))
        .saturating_add((slots as u64).saturating_mul(SLOT_BYTES))
}

/// The largest layout that fits in `max_bytes`: the largest power-of-two table able to hold
/// one block per entry at load 3/4, then as many entries as the rest of the budget pays for
/// (more entries than table room helps when several backends hold the same blocks).
fn layout(max_bytes: u64) -> Option<(usize, usize)> {
    let room = max_bytes.checked_sub(FIXED_BYTES)?;
    // A slot plus the 3/4 entry it may carry.
    let per_slot = SLOT_BYTES + ENTRY_BYTES * 3 / 4;
    let mut slots = MIN_SLOTS as u64;
    if slots * per_slot > room {
        return None;
    }
    while slots * 2 * per_slot <= room && slots * 2 <= (1u64 << 31) {
        slots *= 2;
    }
    let entries = ((room - slots * SLOT_BYTES) / ENTRY_BYTES).min(u64::from(NIL - 1));
    Some((usize::try_from(entries).ok()?, usize::try_from(slots).ok()?))
}

/// Invalid construction or call arguments.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PrefixError {
    #[error("max_bytes must be at least {min} for a useful prefix index, got {got}")]
    BudgetTooSmall { min: u64, got: u64 },
    #[error("block_chars must be between 1 and {MAX_BLOCK_BYTES}, got {0}")]
    BlockSize(usize),
    #[error("backend id must be between 0 and {MAX_BACKEND}, got {0}")]
    Backend(i128),
    #[error("could not reserve {0} bytes for the prefix index")]
    OutOfMemory(u64),
}

/// Smallest `max_bytes` accepted.
pub fn min_budget() -> u64 {
    reserved_bytes(MIN_SLOTS * 3 / 4, MIN_SLOTS)
}

/// Counters and sizes reported by [`PrefixIndex::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// (block, backend) entries held.
    pub entries: u64,
    /// Distinct blocks held (by one backend or more).
    pub blocks: u64,
    /// Reserved bytes holding live data: `FIXED_BYTES + entries * ENTRY_BYTES + blocks * SLOT_BYTES`.
    pub bytes_used: u64,
    /// Bytes reserved at construction (`reserved_bytes(capacity, slots)`), <= `max_bytes`.
    pub bytes_reserved: u64,
    pub max_bytes: u64,
    /// Entries the budget holds.
    pub capacity: u64,
    pub block_chars: u64,
    pub lookups: u64,
    /// Lookups that found at least one backend.
    pub matched_lookups: u64,
    /// Sum over lookups of the longest match, in characters.
    pub matched_chars: u64,
    pub inserts: u64,
    pub evictions: u64,
    /// Entries dropped by `weaken`.
    pub weakened: u64,
    /// Entries dropped by `remove_backend`.
    pub removed: u64,
}

/// Chained block hashes of a prompt's full blocks.
pub struct BlockHashes(Vec<u64>);

/// The index's seed and block size: all that hashing needs, so it runs outside the lock.
#[derive(Debug, Clone, Copy)]
pub struct BlockHasher {
    seed: u64,
    block_bytes: usize,
}

impl BlockHasher {
    /// `h_i = xxh3_64(block_i, seed = h_{i-1})` over the full blocks of `text`.
    pub fn hash(&self, text: &str) -> BlockHashes {
        let text = text.as_bytes();
        let mut out = Vec::with_capacity(text.len() / self.block_bytes);
        let mut h = self.seed;
        for block in text.chunks_exact(self.block_bytes) {
            h = xxh3_64_with_seed(block, h);
            out.push(h);
        }
        BlockHashes(out)
    }
}

impl BlockHashes {
    pub fn len(&self) -> usize {
        self.0.len()
    }
}

/// Mutable part of the index; callers hold it behind one lock.
pub struct PrefixIndex {
    hasher: BlockHasher,
    block_bytes: usize,
    max_bytes: u64,
    /// Allocated once with capacity `capacity`; `entries.len()` only grows up to it.
    slab: Vec<Entry>,
    capacity: usize,
    table: Vec<Slot>,
    mask: usize,
    /// Most and least recently used entries.
    head: u32,
    tail: u32,
    free: u32,
    live: usize,
    blocks: usize,
    max_blocks: usize,
    lookups: u64,
    matched_lookups: u64,
    matched_chars: u64,
    inserts: u64,
    evictions: u64,
    weakened: u64,
    removed: u64,
}

fn random_seed() -> u64 {
    RandomState::new().build_hasher().finish()
}

/// Characters (Unicode scalar values, Python's `len`) among the first `bytes` bytes of `text`:
/// every byte that does not continue a UTF-8 sequence starts one.
fn chars_in(text: &[u8]) -> usize {
    text.iter().filter(|&&b| (b as i8) >= -0x40).count()
}

/// Byte offset of character `chars` of `text` (its length if shorter).
fn byte_offset(text: &str, chars: usize) -> usize {
    if text.is_ascii() {
        return chars.min(text.len());
    }
    text.char_indices()
        .nth(chars)
        .map_or(text.len(), |(offset, _)| offset)
}

impl PrefixIndex {
    pub fn new(max_bytes: u64, block_bytes: usize) -> Result<Self, PrefixError> {
        Self::with_seed(max_bytes, block_bytes, random_seed())
    }

    pub fn with_seed(max_bytes: u64, block_bytes: usize, seed: u64) -> Result<Self, PrefixError> {
        if block_bytes == 0 || block_bytes > MAX_BLOCK_BYTES {
            return Err(PrefixError::BlockSize(block_bytes));
        }
        let (capacity, slots) = layout(max_bytes).ok_or(PrefixError::BudgetTooSmall {
            min: min_budget(),
            got: max_bytes,
        })?;
        let mut slab = Vec::new();
        slab.try_reserve_exact(capacity)
            .map_err(|_| PrefixError::OutOfMemory(reserved_bytes(capacity, 0)))?;
        // The slab's pages are touched only as entries arrive; the table is zeroed memory
        // (calloc), also backed lazily.
        let table = vec![[0u64; 2]; slots];
        Ok(Self {
            hasher: BlockHasher { seed, block_bytes },
            block_bytes,
            max_bytes,
            capacity: slab.capacity().min(capacity),
            slab,
            mask: slots - 1,
            max_blocks: slots / 4 * 3,
            table,
            head: NIL,
            tail: NIL,
            free: NIL,
            live: 0,
            blocks: 0,
            lookups: 0,
            matched_lookups: 0,
            matched_chars: 0,
            inserts: 0,
            evictions: 0,
            weakened: 0,
            removed: 0,
        })
    }

    pub fn hasher(&self) -> BlockHasher {
        self.hasher
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Hashes of `text`'s full blocks (callers holding the index behind a lock use
    /// [`Self::hasher`] instead, before taking it).
    pub fn hashes(&self, text: &str) -> BlockHashes {
        self.hasher.hash(text)
    }

    /// For each backend holding a prefix of `text`: characters of `text` it holds (at block
    /// granularity). Read-only except for the counters.
    pub fn match_prefix(&mut self, text: &str, hashes: &BlockHashes) -> Vec<(u32, usize)> {
        let depths = self.match_blocks(&hashes.0);
        self.lookups += 1;
        let out = self.to_chars(text, depths);
        if let Some(best) = out.iter().map(|&(_, c)| c).max() {
            self.matched_lookups += 1;
            self.matched_chars += best as u64;
        }
        out
    }

    /// `(backend, blocks)` for each backend holding a run of leading blocks.
    fn match_blocks(&self, hashes: &[u64]) -> Vec<(u32, usize)> {
        let mut alive: Vec<(u32, usize)> = Vec::new();
        let mut done: Vec<(u32, usize)> = Vec::new();
        for (depth, &hash) in hashes.iter().enumerate() {
            let Some(slot) = self.find(hash) else { break };
            let head = self.head_of(slot);
            if depth == 0 {
                let mut e = head;
                while e != NIL {
                    alive.push((self.slab[e as usize].backend, 1));
                    e = self.slab[e as usize].chain;
                }
                continue;
            }
            let mut i = 0;
            while i < alive.len() {
                if self.chain_find(head, alive[i].0).is_some() {
                    alive[i].1 = depth + 1;
                    i += 1;
                } else {
                    done.push(alive.swap_remove(i));
                }
            }
            if alive.is_empty() {
                break;
            }
        }
        done.extend(alive);
        done
    }

    fn to_chars(&self, text: &str, mut depths: Vec<(u32, usize)>) -> Vec<(u32, usize)> {
        let bytes = text.as_bytes();
        if bytes.is_ascii() {
            for d in &mut depths {
                d.1 *= self.block_bytes;
            }
            return depths;
        }
        // Count characters once over the longest match, stopping at each shorter one.
        depths.sort_unstable_by_key(|&(_, blocks)| blocks);
        let (mut at, mut chars) = (0usize, 0usize);
        for d in &mut depths {
            let end = (d.1 * self.block_bytes).min(bytes.len());
            chars += chars_in(&bytes[at..end]);
            at = end;
            d.1 = chars;
        }
        depths
    }

    /// Records that `backend` now holds every full block of the prompt; returns entries added.
    pub fn insert(&mut self, hashes: &BlockHashes, backend: u32) -> usize {
        debug_assert!(backend <= MAX_BACKEND);
        self.inserts += 1;
        let mut added = 0;
        // Last block first, so the first block ends up most recently used.
        for &hash in hashes.0.iter().rev() {
            if let Some(slot) = self.find(hash) {
                if let Some(e) = self.chain_find(self.head_of(slot), backend) {
                    self.touch(e);
                    continue;
                }
            }
            let Some(e) = self.alloc() else { break };
            let slot = match self.find(hash) {
                Some(slot) => slot,
                None => {
                    while self.blocks >= self.max_blocks && self.tail != NIL {
                        self.evict_tail();
                    }
                    if self.blocks >= self.max_blocks {
                        self.release(e);
                        break;
                    }
                    self.new_slot(hash)
                }
            };
            let chain = self.head_of(slot);
            self.slab[e as usize] = Entry {
                hash,
                backend,
                prev: NIL,
                next: NIL,
                chain,
            };
            self.table[slot][1] = u64::from(e) + 1;
            self.push_front(e);
            self.live += 1;
            added += 1;
        }
        added
    }

    /// Feedback: `backend` reported that only the first `cached_chars` characters of the
    /// prompt were in its cache, so it forgets the prompt's blocks past those. Returns entries
    /// dropped.
    pub fn weaken(
        &mut self,
        text: &str,
        hashes: &BlockHashes,
        backend: u32,
        cached_chars: usize,
    ) -> usize {
        let keep = byte_offset(text, cached_chars) / self.block_bytes;
        let mut dropped = 0;
        for &hash in hashes.0.iter().skip(keep) {
            let Some(slot) = self.find(hash) else { continue };
            if let Some(e) = self.chain_find(self.head_of(slot), backend) {
                self.remove_entry(e);
                dropped += 1;
            }
        }
        self.weakened += dropped as u64;
        dropped
    }

    /// Forgets everything `backend` holds; returns entries dropped. O(entries held).
    pub fn remove_backend(&mut self, backend: u32) -> usize {
        let mut dropped = 0;
        for e in 0..self.slab.len() {
            if self.slab[e].backend == backend {
                self.remove_entry(e as u32);
                dropped += 1;
            }
        }
        self.removed += dropped as u64;
        dropped
    }

    pub fn clear(&mut self) {
        // A fresh zeroed table instead of overwriting: the old one's pages go back to the
        // kernel instead of all being touched. The old one is freed first, so the two never
        // coexist.
        let slots = self.table.len();
        self.table = Vec::new();
        self.table = vec![[0u64; 2]; slots];
        self.slab.clear();
        self.head = NIL;
        self.tail = NIL;
        self.free = NIL;
        self.live = 0;
        self.blocks = 0;
    }

    pub fn stats(&self) -> PrefixStats {
        PrefixStats {
            entries: self.live as u64,
            blocks: self.blocks as u64,
            bytes_used: FIXED_BYTES
                + self.live as u64 * ENTRY_BYTES
                + self.blocks as u64 * SLOT_BYTES,
            bytes_reserved: self.bytes_reserved(),
            max_bytes: self.max_bytes,
            capacity: self.capacity as u64,
            block_chars: self.block_bytes as u64,
            lookups: self.lookups,
            matched_lookups: self.matched_lookups,
            matched_chars: self.matched_chars,
            inserts: self.inserts,
            evictions: self.evictions,
            weakened: self.weakened,
            removed: self.removed,
        }
    }

    /// Bytes the allocations hold, measured from their real capacities.
    pub fn bytes_reserved(&self) -> u64 {
        reserved_bytes(self.slab.capacity(), self.table.capacity())
    }

    // --- table ---------------------------------------------------------------------------

    fn head_of(&self, slot: usize) -> u32 {
        // Slots hold head + 1 <= NIL, so this never truncates.
        (self.table[slot][1].wrapping_sub(1)) as u32
    }

    fn find(&self, hash: u64) -> Option<usize> {
        let mut i = hash as usize & self.mask;
        loop {
            let slot = self.table[i];
            if slot[1] == 0 {
                return None;
            }
            if slot[0] == hash {
                return Some(i);
            }
            i = (i + 1) & self.mask;
        }
    }

    /// Claims an empty slot for `hash` (not present; `blocks < max_blocks`).
    fn new_slot(&mut self, hash: u64) -> usize {
        let mut i = hash as usize & self.mask;
        while self.table[i][1] != 0 {
            i = (i + 1) & self.mask;
        }
        self.table[i] = [hash, 0];
        self.blocks += 1;
        i
    }

    /// Backward-shift deletion keeps every probe run unbroken without tombstones.
    fn delete_slot(&mut self, mut hole: usize) {
        let mut j = hole;
        loop {
            j = (j + 1) & self.mask;
            let slot = self.table[j];
            if slot[1] == 0 {
                break;
            }
            let home = slot[0] as usize & self.mask;
            // The entry at j may move back to the hole unless its home lies in (hole, j].
            let stays = if hole <= j {
                hole < home && home <= j
            } else {
                hole < home || home <= j
            };
            if !stays {
                self.table[hole] = slot;
                hole = j;
            }
        }
        self.table[hole] = [0, 0];
        self.blocks -= 1;
    }

    fn chain_find(&self, mut e: u32, backend: u32) -> Option<u32> {
        while e != NIL {
            let entry = &self.slab[e as usize];
            if entry.backend == backend {
                return Some(e);
            }
            e = entry.chain;
        }
        None
    }

    // --- slab and LRU --------------------------------------------------------------------

    /// A free entry, evicting the least recently used one when the slab is full.
    fn alloc(&mut self) -> Option<u32> {
        if self.free == NIL {
            if self.slab.len() < self.capacity {
                self.slab.push(Entry {
                    hash: 0,
                    backend: NIL,
                    prev: NIL,
                    next: NIL,
                    chain: NIL,
                });
                return Some((self.slab.len() - 1) as u32);
            }
            if self.tail == NIL {
                return None;
            }
            self.evict_tail();
        }
        let e = self.free;
        if e == NIL {
            return None;
        }
        self.free = self.slab[e as usize].next;
        Some(e)
    }

    fn release(&mut self, e: u32) {
        let entry = &mut self.slab[e as usize];
        entry.backend = NIL;
        entry.next = self.free;
        self.free = e;
    }

    fn evict_tail(&mut self) {
        let e = self.tail;
        if e != NIL {
            self.remove_entry(e);
            self.evictions += 1;
        }
    }

    /// Unlinks a live entry from the LRU list and its block chain, freeing the block's slot
    /// when it was the last backend holding it.
    fn remove_entry(&mut self, e: u32) {
        self.unlink(e);
        let Entry { hash, chain, .. } = self.slab[e as usize];
        if let Some(slot) = self.find(hash) {
            let head = self.head_of(slot);
            if head == e {
                if chain == NIL {
                    self.delete_slot(slot);
                } else {
                    self.table[slot][1] = u64::from(chain) + 1;
                }
            } else {
                let mut p = head;
                while p != NIL {
                    let next = self.slab[p as usize].chain;
                    if next == e {
                        self.slab[p as usize].chain = chain;
                        break;
                    }
                    p = next;
                }
            }
        }
        self.live -= 1;
        self.release(e);
    }

    fn unlink(&mut self, e: u32) {
        let Entry { prev, next, .. } = self.slab[e as usize];
        if prev == NIL {
            self.head = next;
        } else {
            self.slab[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.slab[next as usize].prev = prev;
        }
    }

    fn push_front(&mut self, e: u32) {
        let old = self.head;
        {
            let entry = &mut self.slab[e as usize];
            entry.prev = NIL;
            entry.next = old;
        }
        if old == NIL {
            self.tail = e;
        } else {
            self.slab[old as usize].prev = e;
        }
        self.head = e;
    }

    fn touch(&mut self, e: u32) {
        if self.head != e {
            self.unlink(e);
            self.push_front(e);
        }
    }

    /// Backends of the entries from least to most recently used (tests).
    #[cfg(test)]
    fn lru_order(&self) -> Vec<(u64, u32)> {
        let mut out = Vec::new();
        let mut e = self.tail;
        while e != NIL {
            let entry = &self.slab[e as usize];
            out.push((entry.hash, entry.backend));
            e = entry.prev;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const B: usize = 8;

    fn index(max_bytes: u64) -> PrefixIndex {
        PrefixIndex::with_seed(max_bytes, B, 7).expect("valid index")
    }

    fn matches(ix: &mut PrefixIndex, text: &str) -> Vec<(u32, usize)> {
        let h = ix.hashes(text);
        let mut m = ix.match_prefix(text, &h);
        m.sort_unstable();
        m
    }

    fn insert(ix: &mut PrefixIndex, text: &str, backend: u32) -> usize {
        let h = ix.hashes(text);
        ix.insert(&h, backend)
    }

    /// Every invariant the index keeps, checked the slow way.
    fn check(ix: &PrefixIndex) {
        assert!(ix.bytes_reserved() <= ix.max_bytes, "budget exceeded");
        assert!(ix.stats().bytes_used <= ix.bytes_reserved());
        let lru = ix.lru_order();
        assert_eq!(lru.len(), ix.live, "LRU list and live count disagree");
        let occupied = ix.table.iter().filter(|s| s[1] != 0).count();
        assert_eq!(occupied, ix.blocks);
        assert!(ix.blocks <= ix.max_blocks);
        let mut chained = 0;
        for (i, slot) in ix.table.iter().enumerate() {
            if slot[1] == 0 {
                continue;
            }
            assert_eq!(ix.find(slot[0]), Some(i), "slot unreachable by probing");
            let mut e = ix.head_of(i);
            assert_ne!(e, NIL, "empty chain in an occupied slot");
            while e != NIL {
                assert_eq!(ix.slab[e as usize].hash, slot[0]);
                chained += 1;
                e = ix.slab[e as usize].chain;
            }
        }
        assert_eq!(chained, ix.live);
    }

    #[test]
    fn fixed_bytes_cover_the_struct() {
        // The struct, a parking_lot lock and atomics around it, two allocator headers.
        assert!(size_of::<PrefixIndex>() as u64 + 64 + 2 * 16 <= FIXED_BYTES);
        assert_eq!(ENTRY_BYTES, 24);
        assert_eq!(SLOT_BYTES, 16);
    }

    #[test]
    fn rejects_bad_arguments() {
        assert!(matches!(
            PrefixIndex::new(100, 64),
            Err(PrefixError::BudgetTooSmall { .. })
        ));
        assert_eq!(
            PrefixIndex::new(1 << 20, 0).err(),
            Some(PrefixError::BlockSize(0))
        );
        assert!(PrefixIndex::new(min_budget(), 64).is_ok());
    }

    #[test]
    fn longest_match_at_block_granularity() {
        let mut ix = index(1 << 16);
        let text = "aaaaaaaabbbbbbbbccccccccdd"; // 3 full blocks + 2 bytes
        assert_eq!(insert(&mut ix, text, 1), 3);
        assert_eq!(matches(&mut ix, text), vec![(1, 24)]);
        // Diverges inside block 2: blocks 0 and 1 match.
        assert_eq!(matches(&mut ix, "aaaaaaaabbbbbbbbcccXcccc"), vec![(1, 16)]);
        // Longer prompt extending it matches the three indexed blocks.
        assert_eq!(matches(&mut ix, "aaaaaaaabbbbbbbbccccccccddddddddeeee"), vec![(1, 24)]);
        // Shorter than one block, or different first block: nothing.
        assert_eq!(matches(&mut ix, "aaaa"), vec![]);
        assert_eq!(matches(&mut ix, "Xaaaaaaabbbbbbbb"), vec![]);
        // Re-inserting adds nothing.
        assert_eq!(insert(&mut ix, text, 1), 0);
        check(&ix);
    }

    #[test]
    fn chained_hashes_match_only_after_matching_predecessors() {
        let mut ix = index(1 << 16);
        insert(&mut ix, "aaaaaaaabbbbbbbb", 1);
        // Same second block behind a different first block: no match at all.
        assert_eq!(matches(&mut ix, "zzzzzzzzbbbbbbbb"), vec![]);
        // Block content equal at another position does not match either.
        assert_eq!(matches(&mut ix, "bbbbbbbbaaaaaaaa"), vec![]);
        let h1 = ix.hashes("aaaaaaaabbbbbbbb");
        let h2 = ix.hashes("zzzzzzzzbbbbbbbb");
        assert_ne!(h1.0[1], h2.0[1]);
    }

    #[test]
    fn multiple_backends_each_get_their_own_depth() {
        let mut ix = index(1 << 16);
        let sys = "SYSTEM..PROMPT..";
        insert(&mut ix, &format!("{sys}user-one........"), 1);
        insert(&mut ix, &format!("{sys}user-two........"), 2);
        insert(&mut ix, sys, 3);
        assert_eq!(
            matches(&mut ix, &format!("{sys}user-one........more")),
            vec![(1, 32), (2, 16), (3, 16)]
        );
        assert_eq!(
            matches(&mut ix, &format!("{sys}user-two........")),
            vec![(1, 16), (2, 32), (3, 16)]
        );
        let s = ix.stats();
        assert_eq!((s.lookups, s.matched_lookups, s.matched_chars), (2, 2, 64));
        assert_eq!(s.entries, 4 + 4 + 2);
        assert_eq!(s.blocks, 2 + 2 + 2);
        check(&ix);
    }

    #[test]
    fn a_backend_missing_an_early_block_stops_matching_there() {
        let mut ix = index(1 << 16);
        let text = "aaaaaaaabbbbbbbbcccccccc";
        insert(&mut ix, text, 1);
        insert(&mut ix, text, 2);
        // Take block 1 away from backend 2 only.
        let h = ix.hashes(text);
        let slot = ix.find(h.0[1]).expect("block 1 indexed");
        let e = ix.chain_find(ix.head_of(slot), 2).expect("backend 2 holds it");
        ix.remove_entry(e);
        assert_eq!(matches(&mut ix, text), vec![(1, 24), (2, 8)]);
        check(&ix);
    }

    #[test]
    fn counts_characters_not_bytes() {
        let mut ix = index(1 << 16);
        // "é" is two bytes: 26 bytes, 3 full blocks = 8 "é" + 8 digits.
        let text = "éééééééé0123456789";
        insert(&mut ix, text, 4);
        assert_eq!(matches(&mut ix, text), vec![(4, 8 + 8)]);
    }

    #[test]
    fn evicts_least_recently_used_and_deepest_first() {
        let mut ix = index(1 << 16);
        insert(&mut ix, "aaaaaaaabbbbbbbb", 1);
        insert(&mut ix, "ccccccccdddddddd", 2);
        let order: Vec<u32> = ix.lru_order().iter().map(|&(_, b)| b).collect();
        assert_eq!(order, vec![1, 1, 2, 2]);
        let h = ix.hashes("aaaaaaaabbbbbbbb");
        // The deeper block of the older prompt is the first victim, then its first block.
        assert_eq!(ix.lru_order()[0].0, h.0[1]);
        assert_eq!(ix.lru_order()[1].0, h.0[0]);
        // Touching backend 1's prompt again makes backend 2's the oldest.
        insert(&mut ix, "aaaaaaaabbbbbbbb", 1);
        let order: Vec<u32> = ix.lru_order().iter().map(|&(_, b)| b).collect();
        assert_eq!(order, vec![2, 2, 1, 1]);
        ix.evict_tail();
        assert_eq!(matches(&mut ix, "ccccccccdddddddd"), vec![(2, 8)]);
        ix.evict_tail();
        assert_eq!(matches(&mut ix, "ccccccccdddddddd"), vec![]);
        assert_eq!(matches(&mut ix, "aaaaaaaabbbbbbbb"), vec![(1, 16)]);
        assert_eq!(ix.stats().evictions, 2);
        check(&ix);
    }

    #[test]
    fn a_full_index_evicts_the_oldest_prompt_for_a_new_one() {
        let mut ix = index(min_budget() + 4 * ENTRY_BYTES);
        let room = ix.capacity.min(ix.max_blocks);
        assert!(room >= 4);
        let prompt = |i: usize| format!("{i:08}");
        for i in 0..room {
            insert(&mut ix, &prompt(i), 1);
        }
        assert!((0..room).all(|i| matches(&mut ix, &prompt(i)) == vec![(1, 8)]));
        assert_eq!(ix.stats().evictions, 0);
        // Prompt 0 is read again by an insert, so prompt 1 is now the oldest.
        insert(&mut ix, &prompt(0), 2);
        insert(&mut ix, &prompt(0), 1);
        insert(&mut ix, "newest..", 1);
        assert_eq!(matches(&mut ix, "newest.."), vec![(1, 8)]);
        assert_eq!(matches(&mut ix, &prompt(0)), vec![(1, 8), (2, 8)]);
        assert_eq!(matches(&mut ix, &prompt(1)), vec![]);
        assert_eq!(matches(&mut ix, &prompt(2)), vec![(1, 8)]);
        assert!(ix.stats().evictions >= 1);
        check(&ix);
    }

    #[test]
    fn a_prompt_larger_than_the_index_keeps_its_first_blocks() {
        let mut ix = index(min_budget());
        let room = ix.capacity.min(ix.max_blocks);
        let text: String = (0..room * 3).map(|i| format!("{i:08}")).collect();
        insert(&mut ix, &text, 9);
        assert_eq!(matches(&mut ix, &text), vec![(9, room * B)]);
        check(&ix);
    }

    #[test]
    fn remove_backend_forgets_only_that_backend() {
        let mut ix = index(1 << 16);
        let text = "aaaaaaaabbbbbbbbcccccccc";
        insert(&mut ix, text, 1);
        insert(&mut ix, text, 2);
        insert(&mut ix, "zzzzzzzz", 2);
        assert_eq!(ix.remove_backend(2), 4);
        assert_eq!(ix.remove_backend(2), 0);
        assert_eq!(matches(&mut ix, text), vec![(1, 24)]);
        assert_eq!(matches(&mut ix, "zzzzzzzz"), vec![]);
        assert_eq!(ix.stats().removed, 4);
        check(&ix);
        // Freed entries are reused.
        assert_eq!(ix.slab.len(), 7);
        insert(&mut ix, "yyyyyyyy", 3);
        assert_eq!(ix.slab.len(), 7);
        check(&ix);
    }

    #[test]
    fn weaken_drops_blocks_past_what_the_backend_confirmed() {
        let mut ix = index(1 << 16);
        let text = "aaaaaaaabbbbbbbbccccccccdddddddd";
        insert(&mut ix, text, 1);
        insert(&mut ix, text, 2);
        let h = ix.hashes(text);
        // Backend 1 had only 19 characters cached: keep 2 full blocks.
        assert_eq!(ix.weaken(text, &h, 1, 19), 2);
        assert_eq!(matches(&mut ix, text), vec![(1, 16), (2, 32)]);
        // Nothing cached: forget the whole prompt for backend 2; confirmed past the end: no-op.
        assert_eq!(ix.weaken(text, &h, 2, 0), 4);
        assert_eq!(ix.weaken(text, &h, 1, 1000), 0);
        assert_eq!(matches(&mut ix, text), vec![(1, 16)]);
        assert_eq!(ix.stats().weakened, 6);
        check(&ix);
    }

    #[test]
    fn weaken_counts_characters() {
        let mut ix = index(1 << 16);
        let text = "éééééééééééééééé"; // 16 chars, 32 bytes, 4 blocks
        insert(&mut ix, text, 1);
        let h = ix.hashes(text);
        // 8 characters = 16 bytes = 2 blocks kept.
        assert_eq!(ix.weaken(text, &h, 1, 8), 2);
        assert_eq!(matches(&mut ix, text), vec![(1, 8)]);
    }

    #[test]
    fn clear_empties_everything() {
        let mut ix = index(1 << 16);
        insert(&mut ix, "aaaaaaaabbbbbbbb", 1);
        ix.clear();
        assert!(ix.is_empty());
        assert_eq!(matches(&mut ix, "aaaaaaaabbbbbbbb"), vec![]);
        check(&ix);
        insert(&mut ix, "aaaaaaaabbbbbbbb", 1);
        assert_eq!(ix.len(), 2);
        check(&ix);
    }

    #[test]
    fn budget_never_exceeded_under_random_traffic() {
        let mut rng = StdRng::seed_from_u64(11);
        for budget in [min_budget(), 3_000, 10_000, 50_000] {
            let mut ix = index(budget);
            let reserved = ix.bytes_reserved();
            assert!(reserved <= budget);
            // Prompts from a few "system prompts" extended by random turns, as in chat.
            let roots: Vec<String> = (0..6)
                .map(|r| (0..rng.random_range(1..6)).map(|i| format!("r{r}b{i:05}")).collect())
                .collect();
            for step in 0..3_000 {
                let root = &roots[rng.random_range(0..roots.len())];
                let tail: String = (0..rng.random_range(0..12))
                    .map(|_| format!("{:08}", rng.random_range(0..50u32)))
                    .collect();
                let text = format!("{root}{tail}");
                let backend = rng.random_range(0..5u32);
                match rng.random_range(0..20) {
                    0 => {
                        ix.remove_backend(backend);
                    }
                    1 => {
                        let h = ix.hashes(&text);
                        let cached = rng.random_range(0..text.len() + 1);
                        ix.weaken(&text, &h, backend, cached);
                    }
                    2..=9 => {
                        let m = matches(&mut ix, &text);
                        for (b, chars) in m {
                            assert!(b < 5 && chars % B == 0 && chars <= text.len());
                        }
                    }
                    _ => {
                        insert(&mut ix, &text, backend);
                        // What was just inserted is matched (unless the index is smaller
                        // than the prompt).
                        let full = text.len() / B * B;
                        if full / B <= ix.capacity.min(ix.max_blocks) && full > 0 {
                            let m = matches(&mut ix, &text);
                            assert!(m.contains(&(backend, full)), "lost a fresh insert: {m:?}");
                        }
                    }
                }
                assert_eq!(ix.bytes_reserved(), reserved, "allocation changed");
                if step % 97 == 0 {
                    check(&ix);
                }
            }
            check(&ix);
            assert!(ix.stats().evictions > 0 || budget >= 50_000);
        }
    }
}
