//! Approximate KV-prefix index: which backends were last sent each prompt prefix. Invariant: the
//! memory it allocates (`bytes_reserved = FIXED_BYTES + slots * SLOT_BYTES`) never exceeds
//! `max_bytes`; it is allocated once, at construction, and never grows.
//!
//! Pure Rust, no Python: the PyO3 glue lives in `mod.rs`.
//!
//! Layout and why (measurements in docs/adr/006-prefix-index.md):
//! - A prompt is cut into blocks of `block_bytes` UTF-8 bytes; block i is named by the chained
//!   hash `h_i = xxh3_64(block_i, seed = h_{i-1})`, `h_{-1}` a random per-index seed (llm-d's
//!   scheme). A block hash therefore names the whole prefix up to its end: two prompts share
//!   block i only if they share every byte before it. A trailing partial block is not indexed.
//! - One open-addressing table (linear probing, backward-shift deletion, load <= 3/4) of 24-byte
//!   slots `[hash, backends, recency]`: `backends` is a bit set over at most [`MAX_BACKENDS`]
//!   backends (ids mapped to bits by a small registry), so a block costs one slot however many
//!   backends hold it, and a lookup reads one slot per block and chases no pointers. The hashes
//!   are uniform and keyed by a secret seed, so the table takes its position from them
//!   directly (multiply-shift onto any table size, so the whole budget is usable) and a client
//!   cannot aim prompts at one probe run.
//! - Recency is `tick << 24 | (2^24 - 1 - depth)`, `tick` counting inserts: a full table evicts,
//!   among [`SAMPLE`] occupied slots read on from a moving hand, the one with the smallest
//!   recency: least recently inserted, and the deepest block of a prompt before its prefix
//!   (sampled LRU, as Redis does). What is left of a prompt is then mostly still a prefix of it;
//!   a block left behind a gap is never matched (a match stops at the first missing block) and
//!   ages out. The budget is global, not per backend, so busy backends take room from idle ones
//!   instead of the total growing with the fleet.
//! - `match_prefix` walks the blocks from the first, intersecting the backend sets, and stops
//!   when the set is empty: O(prompt length) hashing plus one probe per matched block.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::mem::size_of;

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Backends one index can tell apart (bits of a slot's backend set).
pub const MAX_BACKENDS: usize = 64;
/// Largest backend id accepted.
pub const MAX_BACKEND_ID: u32 = u32::MAX - 1;

/// Table slot `[hash, backend bits, recency]`; all zeros (no backend) is empty, which lets the
/// table come from zeroed memory whose pages the kernel only backs once touched.
type Slot = [u64; 3];

/// Bytes of one table slot.
pub const SLOT_BYTES: u64 = size_of::<Slot>() as u64;
/// Fixed cost charged once: the index struct (with its backend registry), the lock and
/// counters around it in the glue, the allocator header of the table (checked by
/// `fixed_bytes_cover_the_struct`).
pub const FIXED_BYTES: u64 = 1024;
/// The smallest table; below this the index is useless.
const MIN_SLOTS: usize = 16;
/// Largest block size accepted (a block larger than a prompt never matches anything).
pub const MAX_BLOCK_BYTES: usize = 1 << 20;
/// Occupied slots compared per eviction (Redis samples 5 by default; 10 is "very close to true
/// LRU" in its measurements).
pub const SAMPLE: usize = 8;

/// Blocks ahead whose home slot is prefetched while one is probed: a long prompt's probes are
/// independent cache misses, and without the hint the CPU overlaps few of them.
const PREFETCH_AHEAD: usize = 8;

const DEPTH_BITS: u32 = 24;
const DEPTH_MAX: u64 = (1 << DEPTH_BITS) - 1;

/// Memory reserved for a table of `slots` slots: the whole formula the budget is checked
/// against.
pub fn reserved_bytes(slots: usize) -> u64 {
    FIXED_BYTES.saturating_add((slots as u64).saturating_mul(SLOT_BYTES))
}

/// Smallest `max_bytes` accepted.
pub fn min_budget() -> u64 {
    reserved_bytes(MIN_SLOTS)
}

/// Invalid construction or call arguments.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PrefixError {
    #[error("max_bytes must be at least {min} for a useful prefix index, got {got}")]
    BudgetTooSmall { min: u64, got: u64 },
    #[error("block_chars must be between 1 and {MAX_BLOCK_BYTES}, got {0}")]
    BlockSize(usize),
    #[error("backend id must be between 0 and {MAX_BACKEND_ID}, got {0}")]
    Backend(i128),
    #[error("a prefix index tells at most {MAX_BACKENDS} backends apart; remove one first")]
    TooManyBackends,
}

/// Counters and sizes reported by [`PrefixIndex::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// (block, backend) pairs held.
    pub entries: u64,
    /// Distinct blocks held (by one backend or more).
    pub blocks: u64,
    /// Reserved bytes holding live blocks: `FIXED_BYTES + blocks * SLOT_BYTES`.
    pub bytes_used: u64,
    /// Bytes reserved at construction, <= `max_bytes`.
    pub bytes_reserved: u64,
    pub max_bytes: u64,
    /// Blocks the table holds at its load limit.
    pub capacity: u64,
    pub block_chars: u64,
    pub backends: u64,
    pub lookups: u64,
    /// Lookups that found at least one backend.
    pub matched_lookups: u64,
    /// Sum over lookups of the longest match, in characters.
    pub matched_chars: u64,
    pub inserts: u64,
    /// Blocks evicted to make room.
    pub evictions: u64,
    /// (block, backend) pairs dropped by `weaken`.
    pub weakened: u64,
    /// (block, backend) pairs dropped by `remove_backend`.
    pub removed: u64,
}

/// Chained block hashes of a prompt's full blocks.
pub struct BlockHashes(Vec<u64>);

// Used by tests and benches only.
#[allow(dead_code)]
impl BlockHashes {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

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

/// Backend ids to bit positions.
struct Registry {
    ids: [u32; MAX_BACKENDS],
    used: u64,
}

impl Registry {
    fn bit_of(&self, id: u32) -> Option<usize> {
        let mut used = self.used;
        while used != 0 {
            let bit = used.trailing_zeros() as usize;
            if self.ids[bit] == id {
                return Some(bit);
            }
            used &= used - 1;
        }
        None
    }

    fn bit_or_assign(&mut self, id: u32) -> Option<usize> {
        if let Some(bit) = self.bit_of(id) {
            return Some(bit);
        }
        if self.used == u64::MAX {
            return None;
        }
        let bit = (!self.used).trailing_zeros() as usize;
        self.ids[bit] = id;
        self.used |= 1 << bit;
        Some(bit)
    }
}

/// Mutable part of the index; callers hold it behind one lock.
pub struct PrefixIndex {
    hasher: BlockHasher,
    max_bytes: u64,
    table: Vec<Slot>,
    max_blocks: usize,
    sample: usize,
    hand: usize,
    tick: u64,
    registry: Registry,
    blocks: usize,
    entries: usize,
    lookups: u64,
    matched_lookups: u64,
    matched_chars: u64,
    inserts: u64,
    evictions: u64,
    weakened: u64,
    removed: u64,
}

/// Asks for transparent huge pages over the table: probes land on random slots, and with 4 KiB
/// pages nearly every probe of a large table also misses the TLB. Linux only; a hint, so a
/// refusal changes nothing.
fn advise_huge_pages(table: &[Slot]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let bytes = std::mem::size_of_val(table);
        if bytes < 2 * HUGE {
            return;
        }
        let start = table.as_ptr() as usize;
        let aligned = (start + HUGE - 1) & !(HUGE - 1);
        let len = (start + bytes - aligned) & !(HUGE - 1);
        // SAFETY: MADV_HUGEPAGE only changes how the kernel backs these pages, not their
        // contents; the range lies inside the table's allocation.
        unsafe {
            libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = table;
}

fn random_seed() -> u64 {
    RandomState::new().build_hasher().finish()
}

/// Characters (Unicode scalar values, Python's `len`) in `text`: every byte that does not
/// continue a UTF-8 sequence starts one.
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

fn bits(mut set: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if set == 0 {
            return None;
        }
        let bit = set.trailing_zeros() as usize;
        set &= set - 1;
        Some(bit)
    })
}

impl PrefixIndex {
    pub fn new(max_bytes: u64, block_bytes: usize) -> Result<Self, PrefixError> {
        Self::with_seed(max_bytes, block_bytes, random_seed())
    }

    pub fn with_seed(max_bytes: u64, block_bytes: usize, seed: u64) -> Result<Self, PrefixError> {
        if block_bytes == 0 || block_bytes > MAX_BLOCK_BYTES {
            return Err(PrefixError::BlockSize(block_bytes));
        }
        let too_small = PrefixError::BudgetTooSmall {
            min: min_budget(),
            got: max_bytes,
        };
        let slots = max_bytes
            .checked_sub(FIXED_BYTES)
            .map(|room| room / SLOT_BYTES)
            .and_then(|s| usize::try_from(s).ok())
            .filter(|&s| s >= MIN_SLOTS)
            .ok_or(too_small)?;
        // Zeroed memory (calloc): pages are backed only once a block lands on them.
        let table = vec![[0u64; 3]; slots];
        advise_huge_pages(&table);
        Ok(Self {
            hasher: BlockHasher { seed, block_bytes },
            max_bytes,
            max_blocks: slots / 4 * 3,
            table,
            sample: SAMPLE,
            hand: 0,
            tick: 0,
            registry: Registry {
                ids: [0; MAX_BACKENDS],
                used: 0,
            },
            blocks: 0,
            entries: 0,
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

    /// (block, backend) pairs held.
    pub fn len(&self) -> usize {
        self.entries
    }

    #[cfg_attr(not(test), allow(dead_code))]
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Hashes of `text`'s full blocks (callers holding the index behind a lock use
    /// [`Self::hasher`] instead, before taking it).
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn hashes(&self, text: &str) -> BlockHashes {
        self.hasher.hash(text)
    }

    /// For each backend holding a prefix of `text`: characters of `text` it holds (at block
    /// granularity). Changes nothing but the counters.
    pub fn match_prefix(&mut self, text: &str, hashes: &BlockHashes) -> Vec<(u32, usize)> {
        let mut depth = [0usize; MAX_BACKENDS];
        let mut alive = u64::MAX;
        let mut reached = 0u64;
        self.prefetch_first(&hashes.0);
        for (i, &hash) in hashes.0.iter().enumerate() {
            self.prefetch_ahead(&hashes.0, i);
            let held = match self.find(hash) {
                Some(slot) => self.table[slot][1] & alive,
                None => 0,
            };
            for bit in bits(alive & !held & reached) {
                depth[bit] = i;
            }
            reached |= held;
            alive = held;
            if alive == 0 {
                break;
            }
        }
        for bit in bits(alive & reached) {
            depth[bit] = hashes.0.len();
        }
        let mut out: Vec<(u32, usize)> = bits(reached)
            .map(|bit| (self.registry.ids[bit], depth[bit]))
            .collect();
        self.to_chars(text, &mut out);
        self.lookups += 1;
        if let Some(best) = out.iter().map(|&(_, c)| c).max() {
            self.matched_lookups += 1;
            self.matched_chars += best as u64;
        }
        out
    }

    /// Turns block counts into characters of `text`.
    fn to_chars(&self, text: &str, depths: &mut [(u32, usize)]) {
        let block = self.hasher.block_bytes;
        let bytes = text.as_bytes();
        if bytes.is_ascii() {
            for d in depths.iter_mut() {
                d.1 *= block;
            }
            return;
        }
        // One pass over the longest match, stopping at each shorter one.
        depths.sort_unstable_by_key(|&(_, blocks)| blocks);
        let (mut at, mut chars) = (0usize, 0usize);
        for d in depths.iter_mut() {
            let end = (d.1 * block).min(bytes.len());
            chars += chars_in(&bytes[at..end]);
            at = end;
            d.1 = chars;
        }
    }

    /// Records that `backend` now holds every full block of the prompt, evicting the least
    /// recently used blocks when the table is full; returns the pairs added.
    pub fn insert(&mut self, hashes: &BlockHashes, backend: u32) -> Result<usize, PrefixError> {
        if backend > MAX_BACKEND_ID {
            return Err(PrefixError::Backend(i128::from(backend)));
        }
        let bit = self
            .registry
            .bit_or_assign(backend)
            .ok_or(PrefixError::TooManyBackends)?;
        let mask = 1u64 << bit;
        self.inserts += 1;
        self.tick += 1;
        let mut added = 0;
        self.prefetch_first(&hashes.0);
        for (depth, &hash) in hashes.0.iter().enumerate() {
            self.prefetch_ahead(&hashes.0, depth);
            let recency = self.recency(depth);
            let slot = match self.find(hash) {
                Some(slot) => slot,
                None => {
                    while self.blocks >= self.max_blocks {
                        if !self.evict_one() {
                            break;
                        }
                    }
                    if self.blocks >= self.max_blocks {
                        break;
                    }
                    self.claim(hash)
                }
            };
            let s = &mut self.table[slot];
            if s[1] & mask == 0 {
                s[1] |= mask;
                added += 1;
                // Counted at once: a later block of this prompt may evict this one.
                self.entries += 1;
            }
            s[2] = recency;
        }
        Ok(added)
    }

    fn recency(&self, depth: usize) -> u64 {
        (self.tick << DEPTH_BITS) | (DEPTH_MAX - (depth as u64).min(DEPTH_MAX))
    }

    /// Feedback: `backend` reported that only the first `cached_chars` characters of the
    /// prompt were in its cache, so it forgets the prompt's blocks past those. Returns pairs
    /// dropped.
    pub fn weaken(
        &mut self,
        text: &str,
        hashes: &BlockHashes,
        backend: u32,
        cached_chars: usize,
    ) -> usize {
        let Some(bit) = self.registry.bit_of(backend) else {
            return 0;
        };
        let keep = byte_offset(text, cached_chars) / self.hasher.block_bytes;
        let mut dropped = 0;
        for &hash in hashes.0.iter().skip(keep) {
            if let Some(slot) = self.find(hash) {
                dropped += self.drop_bit(slot, bit);
            }
        }
        self.weakened += dropped as u64;
        dropped
    }

    /// Forgets everything `backend` holds and frees its bit; returns pairs dropped.
    /// O(table size).
    pub fn remove_backend(&mut self, backend: u32) -> usize {
        let Some(bit) = self.registry.bit_of(backend) else {
            return 0;
        };
        let mut dropped = 0;
        let mut i = 0;
        while i < self.table.len() {
            // After a drop, `i` is looked at again: a deletion may have shifted a later slot
            // into it (or one wrapped round from the start, already cleared: harmless).
            let n = self.drop_bit(i, bit);
            dropped += n;
            if n == 0 {
                i += 1;
            }
        }
        self.registry.used &= !(1u64 << bit);
        self.removed += dropped as u64;
        dropped
    }

    pub fn clear(&mut self) {
        // A fresh zeroed table rather than overwriting every slot: the old one's pages go back
        // to the kernel instead of all being touched. The old one is freed first, so the two
        // never coexist.
        let slots = self.table.len();
        self.table = Vec::new();
        self.table = vec![[0u64; 3]; slots];
        advise_huge_pages(&self.table);
        self.registry.used = 0;
        self.blocks = 0;
        self.entries = 0;
        self.hand = 0;
    }

    pub fn stats(&self) -> PrefixStats {
        PrefixStats {
            entries: self.entries as u64,
            blocks: self.blocks as u64,
            bytes_used: FIXED_BYTES + self.blocks as u64 * SLOT_BYTES,
            bytes_reserved: self.bytes_reserved(),
            max_bytes: self.max_bytes,
            capacity: self.max_blocks as u64,
            block_chars: self.hasher.block_bytes as u64,
            backends: u64::from(self.registry.used.count_ones()),
            lookups: self.lookups,
            matched_lookups: self.matched_lookups,
            matched_chars: self.matched_chars,
            inserts: self.inserts,
            evictions: self.evictions,
            weakened: self.weakened,
            removed: self.removed,
        }
    }

    /// Bytes the allocation holds, from its real capacity.
    pub fn bytes_reserved(&self) -> u64 {
        reserved_bytes(self.table.capacity())
    }

    // --- table ---------------------------------------------------------------------------

    fn prefetch_first(&self, hashes: &[u64]) {
        for &hash in hashes.iter().take(PREFETCH_AHEAD) {
            self.prefetch(hash);
        }
    }

    fn prefetch_ahead(&self, hashes: &[u64], i: usize) {
        if let Some(&hash) = hashes.get(i + PREFETCH_AHEAD) {
            self.prefetch(hash);
        }
    }

    #[inline(always)]
    fn prefetch(&self, hash: u64) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let slot = self.table.as_ptr().wrapping_add(self.home(hash));
            // SAFETY: a prefetch is a hint: it never faults and changes no memory, and `slot`
            // points into the table (home() < len).
            unsafe { _mm_prefetch::<_MM_HINT_T0>(slot.cast::<i8>()) };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = hash;
    }

    /// Home slot: multiply-shift maps the uniform hash onto any table size.
    fn home(&self, hash: u64) -> usize {
        ((u128::from(hash) * self.table.len() as u128) >> 64) as usize
    }

    fn next(&self, i: usize) -> usize {
        if i + 1 == self.table.len() {
            0
        } else {
            i + 1
        }
    }

    fn find(&self, hash: u64) -> Option<usize> {
        let mut i = self.home(hash);
        loop {
            let slot = &self.table[i];
            if slot[1] == 0 {
                return None;
            }
            if slot[0] == hash {
                return Some(i);
            }
            i = self.next(i);
        }
    }

    /// Claims an empty slot for `hash` (absent; `blocks < max_blocks`, so one exists). The
    /// caller sets a backend bit at once, which is what marks the slot occupied.
    fn claim(&mut self, hash: u64) -> usize {
        let mut i = self.home(hash);
        while self.table[i][1] != 0 {
            i = self.next(i);
        }
        self.table[i] = [hash, 0, 0];
        self.blocks += 1;
        i
    }

    /// Clears `bit` in `slot`, deleting the slot when no backend is left; returns pairs dropped.
    fn drop_bit(&mut self, slot: usize, bit: usize) -> usize {
        let s = &mut self.table[slot];
        if s[1] & (1u64 << bit) == 0 {
            return 0;
        }
        s[1] &= !(1u64 << bit);
        self.entries -= 1;
        if s[1] == 0 {
            self.delete(slot);
        }
        1
    }

    /// Backward-shift deletion keeps every probe run unbroken without tombstones.
    fn delete(&mut self, mut hole: usize) {
        let mut j = hole;
        loop {
            j = self.next(j);
            let slot = self.table[j];
            if slot[1] == 0 {
                break;
            }
            let home = self.home(slot[0]);
            // The slot at j may move back into the hole unless its home lies in (hole, j].
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
        self.table[hole] = [0, 0, 0];
        self.blocks -= 1;
    }

    /// Evicts the least recent of `sample` occupied slots read from the hand on, reading on
    /// while every slot read so far belongs to the insert in progress (so a prompt never
    /// evicts its own blocks unless it is larger than the table). False if the table is empty.
    fn evict_one(&mut self) -> bool {
        let current = self.tick << DEPTH_BITS;
        let (mut seen, mut best, mut best_recency) = (0, usize::MAX, u64::MAX);
        let mut i = self.hand;
        for _ in 0..self.table.len() {
            let slot = &self.table[i];
            if slot[1] != 0 {
                if slot[2] < best_recency {
                    best = i;
                    best_recency = slot[2];
                }
                seen += 1;
                if seen >= self.sample && best_recency < current {
                    break;
                }
            }
            i = self.next(i);
        }
        if best == usize::MAX {
            return false;
        }
        self.hand = self.next(i);
        self.entries -= self.table[best][1].count_ones() as usize;
        self.delete(best);
        self.evictions += 1;
        true
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
        ix.insert(&h, backend).expect("insert")
    }

    /// Every invariant the index keeps, checked the slow way.
    fn check(ix: &PrefixIndex) {
        assert!(ix.bytes_reserved() <= ix.max_bytes, "budget exceeded");
        assert!(ix.stats().bytes_used <= ix.bytes_reserved());
        let occupied: Vec<usize> = (0..ix.table.len())
            .filter(|&i| ix.table[i][1] != 0)
            .collect();
        assert_eq!(occupied.len(), ix.blocks);
        assert!(ix.blocks <= ix.max_blocks);
        let pairs: usize = occupied
            .iter()
            .map(|&i| ix.table[i][1].count_ones() as usize)
            .sum();
        assert_eq!(pairs, ix.entries);
        for &i in &occupied {
            assert_eq!(
                ix.find(ix.table[i][0]),
                Some(i),
                "slot unreachable by probing"
            );
            assert_eq!(
                ix.table[i][1] & !ix.registry.used,
                0,
                "bit of an unregistered backend"
            );
        }
    }

    #[test]
    fn fixed_bytes_cover_the_struct() {
        // The struct, a parking_lot mutex, the glue's hash memo, one allocator header.
        assert!(size_of::<PrefixIndex>() as u64 + 8 + 64 + 16 <= FIXED_BYTES);
        assert_eq!(SLOT_BYTES, 24);
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
        assert!(PrefixIndex::new(min_budget() - 1, 64).is_err());
        let mut ix = index(1 << 16);
        let h = ix.hashes("aaaaaaaa");
        assert_eq!(
            ix.insert(&h, u32::MAX),
            Err(PrefixError::Backend(4294967295))
        );
    }

    #[test]
    fn the_whole_budget_is_one_table() {
        for budget in [min_budget(), 10_000, 1 << 20, 64 << 20] {
            let ix = index(budget);
            assert!(ix.bytes_reserved() <= budget);
            assert!(budget - ix.bytes_reserved() < SLOT_BYTES);
        }
    }

    #[test]
    fn longest_match_at_block_granularity() {
        let mut ix = index(1 << 16);
        let text = "aaaaaaaabbbbbbbbccccccccdd"; // 3 full blocks + 2 bytes
        assert_eq!(insert(&mut ix, text, 1), 3);
        assert_eq!(matches(&mut ix, text), vec![(1, 24)]);
        // Diverges inside block 2: blocks 0 and 1 match.
        assert_eq!(matches(&mut ix, "aaaaaaaabbbbbbbbcccXcccc"), vec![(1, 16)]);
        // A longer prompt extending it matches the three indexed blocks.
        assert_eq!(
            matches(&mut ix, "aaaaaaaabbbbbbbbccccccccddddddddeeee"),
            vec![(1, 24)]
        );
        // Shorter than one block, or a different first block: nothing.
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
        // Equal block content at another position does not match either.
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
        assert_eq!(s.backends, 3);
        check(&ix);
    }

    #[test]
    fn a_backend_missing_an_early_block_stops_matching_there() {
        let mut ix = index(1 << 16);
        let text = "aaaaaaaabbbbbbbbcccccccc";
        insert(&mut ix, text, 1);
        insert(&mut ix, text, 2);
        // Take block 1 away from backend 2 only: its block 2 is then never matched.
        let h = ix.hashes(text);
        let slot = ix.find(h.0[1]).expect("block 1 indexed");
        let bit = ix.registry.bit_of(2).expect("registered");
        assert_eq!(ix.drop_bit(slot, bit), 1);
        assert_eq!(matches(&mut ix, text), vec![(1, 24), (2, 8)]);
        check(&ix);
    }

    #[test]
    fn counts_characters_not_bytes() {
        let mut ix = index(1 << 16);
        // "é" is two bytes: 26 bytes, 3 full blocks = 8 "é" + 8 digits.
        let text = "éééééééé0123456789";
        insert(&mut ix, text, 4);
        insert(&mut ix, "éééééééé", 5);
        assert_eq!(matches(&mut ix, text), vec![(4, 16), (5, 8)]);
    }

    #[test]
    fn eviction_takes_the_least_recent_prompt_deepest_block_first() {
        let mut ix = index(min_budget());
        ix.sample = usize::MAX; // exact LRU, to test the order
        let room = ix.max_blocks; // 12
        assert_eq!(room, 12);
        let prompt = |i: usize| format!("{i:08}{i:08}{i:08}");
        for i in 0..4 {
            insert(&mut ix, &prompt(i), 1);
        }
        // Prompt 0 is inserted again (for backend 2), so prompt 1 is now the oldest.
        insert(&mut ix, &prompt(0), 2);
        assert_eq!(ix.stats().evictions, 0);
        insert(&mut ix, "newest..", 1);
        // One block had to go: prompt 1's deepest.
        assert_eq!(ix.stats().evictions, 1);
        assert_eq!(matches(&mut ix, &prompt(1)), vec![(1, 16)]);
        insert(&mut ix, "newer...newer...", 3);
        assert_eq!(matches(&mut ix, &prompt(1)), vec![]);
        assert_eq!(matches(&mut ix, &prompt(2)), vec![(1, 24)]);
        assert_eq!(matches(&mut ix, &prompt(0)), vec![(1, 24), (2, 24)]);
        assert_eq!(matches(&mut ix, "newest.."), vec![(1, 8)]);
        check(&ix);
    }

    #[test]
    fn a_prompt_larger_than_the_index_keeps_a_prefix() {
        let mut ix = index(min_budget());
        let room = ix.max_blocks;
        let text: String = (0..room * 3).map(|i| format!("{i:08}")).collect();
        insert(&mut ix, &text, 9);
        // Once the table is full of its own blocks, each new one evicts the deepest so far:
        // all but one slot keep the prompt's first blocks.
        assert_eq!(matches(&mut ix, &text), vec![(9, (room - 1) * B)]);
        check(&ix);
    }

    #[test]
    fn too_many_backends_is_an_error_until_one_is_removed() {
        let mut ix = index(1 << 20);
        let h = ix.hashes("aaaaaaaa");
        for b in 0..MAX_BACKENDS as u32 {
            ix.insert(&h, b * 10).expect("room for 64");
        }
        assert_eq!(ix.insert(&h, 7), Err(PrefixError::TooManyBackends));
        assert_eq!(ix.remove_backend(30), 1);
        assert_eq!(ix.insert(&h, 7), Ok(1));
        let m = matches(&mut ix, "aaaaaaaa");
        assert_eq!(m.len(), MAX_BACKENDS);
        assert!(m.contains(&(7, 8)) && !m.contains(&(30, 8)));
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
        assert_eq!(ix.remove_backend(99), 0);
        assert_eq!(matches(&mut ix, text), vec![(1, 24)]);
        assert_eq!(matches(&mut ix, "zzzzzzzz"), vec![]);
        assert_eq!(ix.stats().removed, 4);
        assert_eq!(ix.stats().blocks, 3);
        check(&ix);
    }

    #[test]
    fn remove_backend_on_a_crowded_table() {
        // Many deletions in long probe runs, including runs wrapping round the end.
        let mut ix = index(min_budget() + 200 * SLOT_BYTES);
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..300 {
            let t: String = (0..4)
                .map(|_| format!("{:08}", rng.random_range(0..10_000)))
                .collect();
            insert(&mut ix, &t, rng.random_range(0..3));
        }
        check(&ix);
        let before = ix.stats().entries;
        let dropped = ix.remove_backend(1);
        assert!(dropped > 0);
        assert_eq!(ix.stats().entries, before - dropped as u64);
        assert!(ix
            .table
            .iter()
            .all(|s| s[1] & 0b10 == 0 || ix.registry.bit_of(1).is_none()));
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
        // Nothing cached: forget the whole prompt for backend 2; past the end: no-op.
        assert_eq!(ix.weaken(text, &h, 2, 0), 4);
        assert_eq!(ix.weaken(text, &h, 1, 1000), 0);
        assert_eq!(ix.weaken(text, &h, 42, 0), 0);
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
                .map(|r| {
                    (0..rng.random_range(1..6))
                        .map(|i| format!("r{r}b{i:05}"))
                        .collect()
                })
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
                        for (b, chars) in matches(&mut ix, &text) {
                            assert!(b < 5 && chars % B == 0 && chars <= text.len());
                        }
                    }
                    _ => {
                        insert(&mut ix, &text, backend);
                        // The prompt just inserted is matched whole when the table has room
                        // for it beside what its own insert could not evict.
                        let full = text.len() / B * B;
                        if full > 0 && 2 * full / B <= ix.max_blocks {
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
