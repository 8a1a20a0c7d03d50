//! Criterion benchmarks of the prefix index (chained block hashes, `rust/route/prefix.rs`)
//! against a lean approximate radix tree in the style of SGLang's `cache_aware` tree, on the
//! same chat-like workload: ns per lookup+insert (what the `prefix` policy does per request:
//! hash, lock, match; hash, lock, insert) for 1 KB, 10 KB and 100 KB prompts, and a printed
//! table of memory per indexed KB. Run with `cargo bench --bench prefix` (about 2 minutes).
//!
//! The radix tree here is a lower bound on SGLang's cost: byte edges in a `Vec`, children and
//! tenants in small sorted vectors (SGLang uses a `String`, a `DashMap` of children and a
//! `DashMap` of tenant timestamps per node), no eviction thread.

// The bench uses part of the API, and clippy --all-targets sees the test module's imports.
#[allow(dead_code, unused_imports)]
#[path = "../rust/route/prefix.rs"]
mod prefix;

use std::hint::black_box;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use prefix::{BlockHasher, PrefixIndex};

const BLOCK: usize = 64;
const BACKENDS: u32 = 4;
const TENANTS: usize = 8;
const SYSTEM: usize = 2048;
const TURN: usize = 1024;
const CONVERSATIONS: usize = 64;
/// Budget of the timed index. Smaller than the gateway's default (64 MiB) so that the prefill
/// below fills it and every timed insert runs in the steady state (evicting, all pages touched);
/// the time per operation does not depend on the budget once it is larger than the CPU caches.
const BUDGET: u64 = 16 << 20;
/// Random prompt text inserted before timing: more than the timed index holds (16 MiB at 32
/// bytes per 64-byte block at the load limit = 33 MB of text).
const PREFILL: usize = 40 << 20;

/// Printable text from a seeded generator (words of lower-case letters).
fn text(rng: &mut StdRng, len: usize) -> String {
    let mut s = String::with_capacity(len);
    while s.len() < len {
        if rng.random_range(0..6) == 0 {
            s.push(' ');
        } else {
            s.push(char::from(b'a' + rng.random_range(0..26u8)));
        }
    }
    s
}

/// Per size: conversations whose history (tenant system prompt + turns) is `size - TURN`
/// bytes; each request appends one fresh turn, so a lookup matches all but the last KB and
/// the insert adds one KB of new blocks, as in multi-turn chat.
struct Workload {
    histories: Vec<String>,
}

impl Workload {
    fn new(size: usize, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let systems: Vec<String> = (0..TENANTS).map(|_| text(&mut rng, SYSTEM)).collect();
        let histories = (0..CONVERSATIONS)
            .map(|c| {
                let mut h = systems[c % TENANTS].clone();
                let want = size.saturating_sub(TURN);
                if h.len() > want {
                    h.truncate(want);
                }
                h.push_str(&text(&mut rng, want - h.len()));
                h
            })
            .collect();
        Self { histories }
    }

    fn prompt(&self, i: usize, rng: &mut StdRng) -> (String, u32) {
        let c = i % CONVERSATIONS;
        let mut p = self.histories[c].clone();
        p.push_str(&text(rng, TURN));
        (p, (c as u32) % BACKENDS)
    }
}

/// What both structures offer the policy.
trait Index {
    fn lookup_insert(&self, text: &str, backend: u32) -> usize;
    fn insert(&self, text: &str, backend: u32);
    fn bytes(&self) -> u64;
    fn name(&self) -> &'static str;
}

struct Hashes {
    hasher: BlockHasher,
    inner: Mutex<PrefixIndex>,
}

impl Hashes {
    fn new(budget: u64) -> Self {
        let inner = PrefixIndex::new(budget, BLOCK).expect("valid index");
        Self {
            hasher: inner.hasher(),
            inner: Mutex::new(inner),
        }
    }
}

impl Index for Hashes {
    fn lookup_insert(&self, text: &str, backend: u32) -> usize {
        // What the glue does for one request: match_prefix hashes (and keeps the hashes),
        // insert of the same prompt reuses them; each takes the lock once.
        let h = self.hasher.hash(text);
        let found = self.inner.lock().match_prefix(text, &h);
        let _ = self.inner.lock().insert(&h, backend);
        found.len()
    }
    fn insert(&self, text: &str, backend: u32) {
        let h = self.hasher.hash(text);
        let _ = self.inner.lock().insert(&h, backend);
    }
    fn bytes(&self) -> u64 {
        self.inner.lock().stats().bytes_used
    }
    fn name(&self) -> &'static str {
        "chained-hash"
    }
}

mod radix {
    //! Approximate radix tree over bytes; tenants (backends) and a last-access clock per node.
    use std::mem::size_of;

    struct Node {
        edge: Vec<u8>,
        children: Vec<(u8, u32)>,
        tenants: Vec<(u32, u64)>,
    }

    pub struct Tree {
        nodes: Vec<Node>,
        clock: u64,
    }

    impl Tree {
        pub fn new() -> Self {
            Self {
                nodes: vec![Node {
                    edge: Vec::new(),
                    children: Vec::new(),
                    tenants: Vec::new(),
                }],
                clock: 0,
            }
        }

        fn child(&self, node: usize, byte: u8) -> Option<usize> {
            let c = &self.nodes[node].children;
            c.binary_search_by_key(&byte, |&(b, _)| b)
                .ok()
                .map(|i| c[i].1 as usize)
        }

        /// `(tenant, bytes)` for every tenant on the matched path.
        pub fn match_prefix(&self, text: &[u8]) -> Vec<(u32, usize)> {
            let mut out: Vec<(u32, usize)> = Vec::new();
            let (mut node, mut at) = (0usize, 0usize);
            while at < text.len() {
                let Some(next) = self.child(node, text[at]) else {
                    break;
                };
                let edge = &self.nodes[next].edge;
                let rest = &text[at..];
                let common = edge.iter().zip(rest).take_while(|(a, b)| a == b).count();
                at += common;
                for &(t, _) in &self.nodes[next].tenants {
                    match out.iter_mut().find(|(o, _)| *o == t) {
                        Some(o) => o.1 = at,
                        None => out.push((t, at)),
                    }
                }
                if common < edge.len() {
                    break;
                }
                node = next;
            }
            out
        }

        fn mark(&mut self, node: usize, tenant: u32, now: u64) {
            let t = &mut self.nodes[node].tenants;
            match t.iter_mut().find(|(o, _)| *o == tenant) {
                Some(o) => o.1 = now,
                None => t.push((tenant, now)),
            }
        }

        pub fn insert(&mut self, text: &[u8], tenant: u32) {
            self.clock += 1;
            let now = self.clock;
            let (mut node, mut at) = (0usize, 0usize);
            while at < text.len() {
                let Some(next) = self.child(node, text[at]) else {
                    let leaf = self.nodes.len() as u32;
                    self.nodes.push(Node {
                        edge: text[at..].to_vec(),
                        children: Vec::new(),
                        tenants: vec![(tenant, now)],
                    });
                    let c = &mut self.nodes[node].children;
                    let pos = c.partition_point(|&(b, _)| b < text[at]);
                    c.insert(pos, (text[at], leaf));
                    return;
                };
                let common = {
                    let edge = &self.nodes[next].edge;
                    edge.iter()
                        .zip(&text[at..])
                        .take_while(|(a, b)| a == b)
                        .count()
                };
                if common < self.nodes[next].edge.len() {
                    // Split `next` at `common`: a new middle node takes the head of its edge.
                    let tail = self.nodes[next].edge.split_off(common);
                    let head = std::mem::replace(&mut self.nodes[next].edge, tail);
                    let mid = self.nodes.len() as u32;
                    let tenants = self.nodes[next].tenants.clone();
                    let first = self.nodes[next].edge[0];
                    self.nodes.push(Node {
                        edge: head,
                        children: vec![(first, next as u32)],
                        tenants,
                    });
                    let c = &mut self.nodes[node].children;
                    if let Ok(i) = c.binary_search_by_key(&text[at], |&(b, _)| b) {
                        c[i].1 = mid;
                    }
                    at += common;
                    self.mark(mid as usize, tenant, now);
                    node = mid as usize;
                    continue;
                }
                at += common;
                self.mark(next, tenant, now);
                node = next;
            }
        }

        /// Heap and inline bytes by capacity, 16 bytes of allocator header per heap block.
        pub fn bytes(&self) -> u64 {
            let mut total = (self.nodes.capacity() * size_of::<Node>()) as u64;
            for n in &self.nodes {
                for (cap, each) in [
                    (n.edge.capacity(), 1),
                    (n.children.capacity(), size_of::<(u8, u32)>()),
                    (n.tenants.capacity(), size_of::<(u32, u64)>()),
                ] {
                    if cap > 0 {
                        total += (cap * each + 16) as u64;
                    }
                }
            }
            total
        }

        pub fn nodes(&self) -> usize {
            self.nodes.len()
        }
    }
}

struct Radix(Mutex<radix::Tree>);

impl Index for Radix {
    fn lookup_insert(&self, text: &str, backend: u32) -> usize {
        let found = self.0.lock().match_prefix(text.as_bytes());
        self.0.lock().insert(text.as_bytes(), backend);
        found.len()
    }
    fn insert(&self, text: &str, backend: u32) {
        self.0.lock().insert(text.as_bytes(), backend);
    }
    fn bytes(&self) -> u64 {
        self.0.lock().bytes()
    }
    fn name(&self) -> &'static str {
        "radix-tree"
    }
}

fn contenders() -> Vec<Box<dyn Index>> {
    vec![
        Box::new(Hashes::new(BUDGET)),
        Box::new(Radix(Mutex::new(radix::Tree::new()))),
    ]
}

/// Fills an index with `PREFILL` bytes of unrelated 16 KB prompts on all backends (a cheap
/// xorshift generator: this runs before anything is timed).
fn prefill(index: &dyn Index) {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut p = vec![0u8; 16 * 1024];
    for i in 0..PREFILL / p.len() {
        for b in p.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = b'a' + (x % 26) as u8;
        }
        let s = std::str::from_utf8(&p).unwrap_or_default();
        index.insert(s, (i as u32) % BACKENDS);
    }
}

fn bench_lookup_insert(c: &mut Criterion) {
    let mut group = c.benchmark_group("lookup_insert");
    for size in [1024usize, 10 * 1024, 100 * 1024] {
        let work = Workload::new(size, 1);
        group.throughput(Throughput::Bytes(size as u64));
        for index in contenders() {
            prefill(index.as_ref());
            for (i, h) in work.histories.iter().enumerate() {
                index.insert(h, (i as u32) % BACKENDS);
            }
            let mut rng = StdRng::seed_from_u64(2);
            let mut i = 0usize;
            group.bench_with_input(BenchmarkId::new(index.name(), size), &size, |b, _| {
                b.iter_batched(
                    || {
                        i += 1;
                        work.prompt(i, &mut rng)
                    },
                    |(p, backend)| black_box(index.lookup_insert(&p, backend)),
                    BatchSize::SmallInput,
                )
            });
        }
    }
    group.finish();
}

fn bench_hash_only(c: &mut Criterion) {
    let ix = PrefixIndex::new(1 << 20, BLOCK).expect("valid index");
    let hasher = ix.hasher();
    let mut rng = StdRng::seed_from_u64(3);
    let mut group = c.benchmark_group("hash_only");
    for size in [1024usize, 10 * 1024, 100 * 1024] {
        let t = text(&mut rng, size);
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &t, |b, t| {
            b.iter(|| black_box(hasher.hash(t).len()))
        });
    }
    group.finish();
}

/// Memory per indexed KB after the same chat trace (64 conversations x 12 turns of 1 KB on
/// 8 tenants' 2 KB system prompts, 4 backends): bytes held / KB of distinct prompt text, and
/// / KB of (prompt, backend) text. Also a full index's reserved bytes per KB it holds.
fn memory_table() {
    let mut rng = StdRng::seed_from_u64(4);
    let systems: Vec<String> = (0..TENANTS).map(|_| text(&mut rng, SYSTEM)).collect();
    let mut convs: Vec<String> = (0..CONVERSATIONS)
        .map(|c| systems[c % TENANTS].clone())
        .collect();
    let mut trace = Vec::new();
    for _turn in 0..12 {
        for (c, conv) in convs.iter_mut().enumerate() {
            conv.push_str(&text(&mut rng, TURN));
            trace.push((conv.clone(), (c as u32) % BACKENDS));
        }
    }
    let distinct: usize =
        convs.iter().map(String::len).sum::<usize>() - (CONVERSATIONS - TENANTS) * SYSTEM;
    let per_backend: usize = {
        // Distinct text per backend (conversation c on backend c % 4 holds its own turns and
        // its tenant's system prompt once per backend).
        let sys_copies = {
            let mut pairs = std::collections::HashSet::new();
            for c in 0..CONVERSATIONS {
                pairs.insert((c % TENANTS, c as u32 % BACKENDS));
            }
            pairs.len()
        };
        convs.iter().map(|c| c.len() - SYSTEM).sum::<usize>() + sys_copies * SYSTEM
    };
    println!();
    println!(
        "memory after the chat trace: {} KB distinct text, {} KB (text, backend)",
        distinct / 1024,
        per_backend / 1024
    );
    println!(
        "{:<14} {:>12} {:>12} {:>14} {:>10}",
        "index", "bytes", "B/KB text", "B/KB (t,b)", "insert ms"
    );
    for index in contenders() {
        let t0 = Instant::now();
        for (p, b) in &trace {
            index.insert(p, *b);
        }
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let bytes = index.bytes();
        println!(
            "{:<14} {:>12} {:>12.0} {:>14.0} {:>10.1}",
            index.name(),
            bytes,
            bytes as f64 / (distinct as f64 / 1024.0),
            bytes as f64 / (per_backend as f64 / 1024.0),
            ms
        );
    }
    let mut tree = radix::Tree::new();
    for (p, b) in &trace {
        tree.insert(p.as_bytes(), *b);
    }
    println!("radix nodes: {}", tree.nodes());
    // A full chained-hash index: reserved bytes per KB of distinct prompt text it holds.
    let mut full = PrefixIndex::new(4 << 20, BLOCK).expect("valid index");
    let mut i = 0u32;
    while full.stats().evictions == 0 {
        let p = text(&mut rng, 16 * 1024);
        let h = full.hashes(&p);
        let _ = full.insert(&h, i % BACKENDS);
        i += 1;
    }
    let s = full.stats();
    let held_kb = (s.blocks * BLOCK as u64) as f64 / 1024.0;
    println!(
        "full 4 MiB chained-hash index: {} blocks, {} entries, reserved {} B = {:.0} B per KB held, bytes_used {} B = {:.0} B/KB",
        s.blocks,
        s.entries,
        s.bytes_reserved,
        s.bytes_reserved as f64 / held_kb,
        s.bytes_used,
        s.bytes_used as f64 / held_kb
    );
}

/// Criterion reports means, which a shared machine inflates; this prints the median and the
/// minimum of single timed requests (10,000 per size, after the same warm-up), which load
/// disturbs much less.
fn quantiles() {
    println!();
    println!(
        "{:<14} {:>8} {:>12} {:>12} {:>12}",
        "index", "prompt", "min ns", "median ns", "p90 ns"
    );
    for size in [1024usize, 10 * 1024, 100 * 1024] {
        let work = Workload::new(size, 1);
        for index in contenders() {
            prefill(index.as_ref());
            for (i, h) in work.histories.iter().enumerate() {
                index.insert(h, (i as u32) % BACKENDS);
            }
            let mut rng = StdRng::seed_from_u64(2);
            let n = if size > 50_000 { 2_000 } else { 10_000 };
            let mut ns: Vec<u128> = (0..n)
                .map(|i| {
                    let (p, b) = work.prompt(i, &mut rng);
                    let t0 = Instant::now();
                    black_box(index.lookup_insert(&p, b));
                    t0.elapsed().as_nanos()
                })
                .collect();
            ns.sort_unstable();
            println!(
                "{:<14} {:>8} {:>12} {:>12} {:>12}",
                index.name(),
                size,
                ns[0],
                ns[n / 2],
                ns[n * 9 / 10]
            );
        }
    }
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2))
        .sample_size(30)
}

fn tables(_c: &mut Criterion) {
    // `cargo test --all-targets` runs benches once as a smoke test (without `--bench`): the
    // hand-made tables measure for minutes in a debug build, so only `cargo bench` prints them.
    if !std::env::args().any(|arg| arg == "--bench") {
        return;
    }
    memory_table();
    quantiles();
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_lookup_insert, bench_hash_only, tables
}
criterion_main!(benches);
