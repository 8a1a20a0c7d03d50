//! Criterion benchmarks of the response cache against moka (sync, weigher) and quick_cache
//! (weighter): get hit, get miss and put at 1 and 2 threads, a timed Zipf replay, and a printed
//! table of Zipf hit rates and of which requirement each library keeps (byte cap never
//! exceeded, every entry that fits admitted). All three are fed the same keys, values and
//! weights, so only the cache differs. Run with `cargo bench --bench cache` (under 2 minutes).

// The cache is a private module of the extension crate; its pure-Rust files are compiled in
// here directly. The bench uses only part of their API, and `cargo clippy --all-targets` sees
// their test modules (cfg(test)) without the `#[test]` functions that use the imports.
#[allow(dead_code, unused_imports)]
#[path = "../rust/cache/sharded.rs"]
mod sharded;
#[allow(dead_code, unused_imports)]
#[path = "../rust/cache/sim.rs"]
mod sim;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use sharded::{entry_weight, CachedResponse, ShardedCache};

const KEYS: usize = 2_000;
const BODY: usize = 1_024;
const CT: &str = "application/json";
const HOUR: Duration = Duration::from_secs(3600);
/// The gateway's default shard count.
const SHARDS: usize = 16;

/// The operations every contender offers, with the gateway's value type.
trait Contender: Sync {
    fn name(&self) -> &'static str;
    fn get(&self, key: u128) -> Option<Arc<CachedResponse>>;
    fn put(&self, key: u128, body: &Bytes);
    /// Bytes of the entries currently held (for ntonix, the accounted size, which also counts
    /// room a put in flight has reserved).
    fn weight(&self) -> u64;
    /// Lets a library with deferred bookkeeping catch up before it is measured or inspected.
    fn settle(&self) {}
}

fn value_weight(value: &CachedResponse) -> u64 {
    entry_weight(value.body.len(), value.content_type.len())
}

struct Ntonix(ShardedCache);

impl Contender for Ntonix {
    fn name(&self) -> &'static str {
        "ntonix"
    }
    fn get(&self, key: u128) -> Option<Arc<CachedResponse>> {
        self.0.get(key)
    }
    fn put(&self, key: u128, body: &Bytes) {
        self.0.put(key, body.clone(), CT.into(), None);
    }
    fn weight(&self) -> u64 {
        self.0.stats().size_bytes
    }
}

/// The value the library contenders store: the same body and content type the gateway caches.
fn cached(body: &Bytes) -> Arc<CachedResponse> {
    Arc::new(CachedResponse {
        body: body.clone(),
        content_type: CT.into(),
    })
}

struct Moka(moka::sync::Cache<u128, Arc<CachedResponse>>);

impl Contender for Moka {
    fn name(&self) -> &'static str {
        "moka"
    }
    fn get(&self, key: u128) -> Option<Arc<CachedResponse>> {
        self.0.get(&key)
    }
    fn put(&self, key: u128, body: &Bytes) {
        self.0.insert(key, cached(body));
    }
    /// What moka really holds: `weighted_size()` only moves when pending work is applied, so
    /// sum the entries a reader can see instead.
    fn weight(&self) -> u64 {
        self.0.iter().map(|(_, value)| value_weight(&value)).sum()
    }
    fn settle(&self) {
        self.0.run_pending_tasks();
    }
}

#[derive(Clone)]
struct ByteWeighter;

impl quick_cache::Weighter<u128, Arc<CachedResponse>> for ByteWeighter {
    fn weight(&self, _key: &u128, value: &Arc<CachedResponse>) -> u64 {
        value_weight(value)
    }
}

struct Quick(quick_cache::sync::Cache<u128, Arc<CachedResponse>, ByteWeighter>);

impl Contender for Quick {
    fn name(&self) -> &'static str {
        "quick_cache"
    }
    fn get(&self, key: u128) -> Option<Arc<CachedResponse>> {
        self.0.get(&key)
    }
    fn put(&self, key: u128, body: &Bytes) {
        self.0.insert(key, cached(body));
    }
    fn weight(&self) -> u64 {
        self.0.weight()
    }
}

/// The three contenders, each capped at `max_bytes` with a one-hour TTL where supported
/// (quick_cache has no TTL at all).
fn contenders(max_bytes: u64, entries_hint: usize) -> Vec<Box<dyn Contender>> {
    let ntonix = ShardedCache::new(max_bytes, HOUR, SHARDS).expect("valid bench config");
    let moka = moka::sync::Cache::builder()
        .max_capacity(max_bytes)
        .weigher(|_key: &u128, value: &Arc<CachedResponse>| {
            u32::try_from(value_weight(value)).unwrap_or(u32::MAX)
        })
        .time_to_live(HOUR)
        .build();
    let quick = quick_cache::sync::Cache::with_weighter(entries_hint, max_bytes, ByteWeighter);
    vec![
        Box::new(Ntonix(ntonix)),
        Box::new(Moka(moka)),
        Box::new(Quick(quick)),
    ]
}

fn key(i: usize) -> u128 {
    sim::key_of_rank(i)
}

fn body() -> Bytes {
    Bytes::from(vec![b'x'; BODY])
}

fn entry() -> u64 {
    entry_weight(BODY, CT.len())
}

/// Runs `op(i)` `iters` times on each of `threads` threads at once and returns the wall time,
/// so criterion reports time per operation per thread and, with `Throughput::Elements(threads)`,
/// total operations per second.
fn run_threads(threads: usize, iters: u64, op: &(dyn Fn(usize) + Sync)) -> Duration {
    if threads == 1 {
        let start = Instant::now();
        for i in 0..iters as usize {
            op(i);
        }
        return start.elapsed();
    }
    let barrier = std::sync::Barrier::new(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let barrier = &barrier;
                scope.spawn(move || {
                    barrier.wait();
                    let start = Instant::now();
                    // Threads walk the keys from different offsets so they do not move in step.
                    let offset = t * KEYS / threads;
                    for i in 0..iters as usize {
                        op(i + offset);
                    }
                    start.elapsed()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("bench thread panicked"))
            .max()
            .unwrap_or_default()
    })
}

fn bench_ops(c: &mut Criterion) {
    let body = body();
    // get: every key fits; put: room for 20% of the keys, so each put in steady state evicts.
    let roomy = 2 * KEYS as u64 * entry();
    let tight = (KEYS as u64 / 5) * entry();
    type Op = fn(&dyn Contender, usize, &Bytes);
    let cases: [(&str, u64, Op); 3] = [
        ("get_hit", roomy, |c, i, _| {
            black_box(c.get(key(i % KEYS)));
        }),
        ("get_miss", roomy, |c, i, _| {
            black_box(c.get(key(KEYS + i % KEYS)));
        }),
        ("put", tight, |c, i, b| c.put(key(i % KEYS), b)),
    ];
    for (name, max_bytes, op) in cases {
        let mut group = c.benchmark_group(name);
        for threads in [1usize, 2] {
            group.throughput(Throughput::Elements(threads as u64));
            for cache in contenders(max_bytes, KEYS) {
                for i in 0..KEYS {
                    cache.put(key(i), &body);
                }
                cache.settle();
                let id = BenchmarkId::new(cache.name(), format!("{threads}t"));
                group.bench_function(id, |b| {
                    b.iter_custom(|iters| {
                        run_threads(threads, iters, &|i| op(cache.as_ref(), i, &body))
                    })
                });
            }
        }
        group.finish();
    }
}

/// Zipf(1.0), 10,000 requests over 2,000 keys, room for 20% of them: the gateway pattern
/// (serve a hit, else store the fresh answer).
const ZIPF_REQUESTS: usize = 10_000;
const ZIPF_ROOM: usize = KEYS / 5;
const ZIPF_BODY: usize = 512;

fn gateway_request(cache: &dyn Contender, key: u128, body: &Bytes) -> bool {
    if cache.get(key).is_some() {
        return true;
    }
    cache.put(key, body);
    false
}

fn zipf_cap() -> u64 {
    ZIPF_ROOM as u64 * entry_weight(ZIPF_BODY, CT.len())
}

fn bench_zipf(c: &mut Criterion) {
    let trace = sim::zipf_trace(KEYS, ZIPF_REQUESTS, 1.0, 2024);
    let body = Bytes::from(vec![b'z'; ZIPF_BODY]);
    let mut group = c.benchmark_group("zipf_replay_10k");
    group.throughput(Throughput::Elements(ZIPF_REQUESTS as u64));
    for cache in contenders(zipf_cap(), ZIPF_ROOM) {
        group.bench_function(cache.name(), |b| {
            b.iter(|| sim::replay(&trace, 0, |k| gateway_request(cache.as_ref(), k, &body)))
        });
    }
    group.finish();
}

/// Prints hit rates and requirement checks; not timed.
fn report(_: &mut Criterion) {
    let cold = sim::zipf_trace(KEYS, ZIPF_REQUESTS, 1.0, 2024);
    let long = sim::zipf_trace(KEYS, 2 * ZIPF_REQUESTS, 1.0, 7);
    let body = Bytes::from(vec![b'z'; ZIPF_BODY]);
    let lru_cold = {
        let mut lru = sim::ReferenceLru::new(ZIPF_ROOM);
        sim::replay(&cold, 0, |k| lru.access(k))
    };
    let lru_warm = {
        let mut lru = sim::ReferenceLru::new(ZIPF_ROOM);
        sim::replay(&long, ZIPF_REQUESTS, |k| lru.access(k))
    };
    let che = sim::che_lru_hit_rate(&sim::Zipf::new(KEYS, 1.0).probabilities(), ZIPF_ROOM);
    let s3_cold = {
        let mut s3 = sim::ReferenceS3Fifo::new(ZIPF_ROOM);
        sim::replay(&cold, 0, |k| s3.access(k))
    };
    let s3_warm = {
        let mut s3 = sim::ReferenceS3Fifo::new(ZIPF_ROOM);
        sim::replay(&long, ZIPF_REQUESTS, |k| s3.access(k))
    };
    println!(
        "\nZipf s=1.0, {ZIPF_REQUESTS} requests over {KEYS} keys, room for {ZIPF_ROOM} \
         ({ZIPF_BODY}-byte bodies); warm = second 10k of a 20k trace"
    );
    println!("  {:<22} {:>9} {:>9}", "policy", "cold", "warm");
    let row = |name: &str, cold: f64, warm: f64| println!("  {name:<22} {cold:>9.4} {warm:>9.4}");
    row("LRU, exact simulation", lru_cold, lru_warm);
    println!("  {:<22} {:>9} {che:>9.4}", "LRU, Che approximation", "-");
    row("S3-FIFO, reference", s3_cold, s3_warm);
    for (cold_cache, warm_cache) in contenders(zipf_cap(), ZIPF_ROOM)
        .into_iter()
        .zip(contenders(zipf_cap(), ZIPF_ROOM))
    {
        let c = cold_cache.as_ref();
        let w = warm_cache.as_ref();
        let cold_rate = sim::replay(&cold, 0, |k| gateway_request(c, k, &body));
        let warm_rate = sim::replay(&long, ZIPF_REQUESTS, |k| gateway_request(w, k, &body));
        row(c.name(), cold_rate, warm_rate);
    }

    // Byte cap: 20,000 puts of mixed sizes (1 in 50 large) as fast as possible, sampling the
    // reported weight after every put and once more after the library settles.
    let cap = 256 * 1024;
    println!("\nByte cap {cap}: highest accounted weight seen during 20,000 mixed-size puts");
    for cache in contenders(cap, 256) {
        let mut rng = sim::SplitMix64::new(1);
        let mut peak = 0;
        for i in 0..20_000 {
            let len = if rng.below(50) == 0 {
                rng.below(cap / 2)
            } else {
                rng.below(4_000)
            };
            cache.put(key(i % 3_000), &Bytes::from(vec![0u8; len as usize]));
            peak = peak.max(cache.weight());
        }
        cache.settle();
        println!(
            "  {:<12} peak {:>8} ({:+.1}% of cap), after settling {:>8}",
            cache.name(),
            peak,
            (peak as f64 / cap as f64 - 1.0) * 100.0,
            cache.weight()
        );
    }

    // Admission: one entry weighing 60% of the cap into a full cache whose entries have all
    // been read, so a frequency-based admission filter has reason to turn it away.
    println!("\nAdmission of one entry weighing 60% of the cap into a full cache (cap {cap})");
    for cache in contenders(cap, 256) {
        for i in 0..400 {
            cache.put(key(i), &Bytes::from(vec![0u8; 512]));
            for _ in 0..3 {
                cache.get(key(i));
            }
        }
        cache.settle();
        let big = Bytes::from(vec![0u8; (cap * 6 / 10) as usize]);
        cache.put(key(10_000), &big);
        cache.settle();
        let kept = cache.get(key(10_000)).is_some();
        println!("  {:<12} admitted: {kept}", cache.name());
    }
    println!();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    targets = report, bench_ops, bench_zipf
}
criterion_main!(benches);
