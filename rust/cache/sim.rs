//! Workload simulation for the response cache: a seeded Zipf trace, an exact reference LRU and
//! Che's approximation, so that a replayed hit rate can be checked against what LRU predicts.
//!
//! Pure Rust with no dependencies, so the unit tests and `benches/cache.rs` share one definition
//! of the workload. Keeps one invariant: a trace depends only on its seed, so every policy
//! compared on it sees the same requests.

use std::collections::{BTreeMap, HashMap};

/// SplitMix64: tiny, seedable and good enough to drive a workload; not for anything secret.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) from the top 53 bits, the precision of an f64 mantissa.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [0, n); the multiply-shift keeps the bias below 2^-32 for the small n used here.
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// Zipf(s) over ranks 0..n (rank 0 the most popular), sampled by inverting the exact CDF.
#[derive(Debug, Clone)]
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    pub fn new(n: usize, s: f64) -> Self {
        let mut cdf = Vec::with_capacity(n);
        let mut total = 0.0;
        for rank in 1..=n {
            total += 1.0 / (rank as f64).powf(s);
            cdf.push(total);
        }
        for c in &mut cdf {
            *c /= total;
        }
        Self { cdf }
    }

    /// Probability of each rank, in rank order.
    pub fn probabilities(&self) -> Vec<f64> {
        let mut previous = 0.0;
        self.cdf
            .iter()
            .map(|&c| {
                let p = c - previous;
                previous = c;
                p
            })
            .collect()
    }

    pub fn sample(&self, rng: &mut SplitMix64) -> usize {
        let u = rng.next_f64();
        // The last CDF value may round below 1.0; clamp so a u past it still maps to a rank.
        self.cdf
            .partition_point(|&c| c <= u)
            .min(self.cdf.len().saturating_sub(1))
    }
}

/// Maps a rank to a key that looks like an xxh3_128 digest: an odd multiplier is a bijection on
/// u128, so distinct ranks stay distinct while the bits spread over every shard.
pub fn key_of_rank(rank: usize) -> u128 {
    (rank as u128 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835)
}

/// `requests` keys drawn from Zipf(`s`) over `distinct` ranks with a fixed seed.
pub fn zipf_trace(distinct: usize, requests: usize, s: f64, seed: u64) -> Vec<u128> {
    let zipf = Zipf::new(distinct, s);
    let mut rng = SplitMix64::new(seed);
    (0..requests)
        .map(|_| key_of_rank(zipf.sample(&mut rng)))
        .collect()
}

/// Exact LRU over a capacity counted in entries: the yardstick the sharded cache is held to.
/// O(log n) per access, which is plenty for a simulation.
#[derive(Debug, Default)]
pub struct ReferenceLru {
    capacity: usize,
    tick: u64,
    stamp_of: HashMap<u128, u64>,
    by_stamp: BTreeMap<u64, u128>,
}

impl ReferenceLru {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            ..Self::default()
        }
    }

    /// A gateway request: look the key up and, on a miss, store the fresh answer.
    /// Returns whether it was a hit.
    pub fn access(&mut self, key: u128) -> bool {
        self.tick += 1;
        let hit = match self.stamp_of.insert(key, self.tick) {
            Some(old) => {
                self.by_stamp.remove(&old);
                true
            }
            None => false,
        };
        self.by_stamp.insert(self.tick, key);
        if self.stamp_of.len() > self.capacity {
            if let Some((_, victim)) = self.by_stamp.pop_first() {
                self.stamp_of.remove(&victim);
            }
        }
        hit
    }
}

/// S3-FIFO (Yang et al., SOSP 2023) over a capacity counted in entries, written plainly with
/// `VecDeque`s as the yardstick for the sharded cache's slab implementation: a small FIFO `S`
/// that new keys enter, a main FIFO `M` with a CLOCK-like second chance, and a ghost FIFO `G`
/// of keys recently dropped from `S`, whose return sends them straight to `M`.
#[derive(Debug, Default)]
pub struct ReferenceS3Fifo {
    capacity: usize,
    /// Newest at the back; each key with its access count (0..=3).
    small: std::collections::VecDeque<u128>,
    main: std::collections::VecDeque<u128>,
    freq: HashMap<u128, u8>,
    ghost: std::collections::VecDeque<u128>,
    in_ghost: std::collections::HashSet<u128>,
}

impl ReferenceS3Fifo {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            ..Self::default()
        }
    }

    pub fn access(&mut self, key: u128) -> bool {
        if let Some(f) = self.freq.get_mut(&key) {
            *f = (*f + 1).min(3);
            return true;
        }
        if self.capacity == 0 {
            return false;
        }
        while self.freq.len() >= self.capacity {
            self.evict();
        }
        if self.in_ghost.remove(&key) {
            self.ghost.retain(|&k| k != key);
            self.main.push_back(key);
        } else {
            self.small.push_back(key);
        }
        self.freq.insert(key, 0);
        false
    }

    fn evict(&mut self) {
        loop {
            let total = self.small.len() + self.main.len();
            let from_small =
                !self.small.is_empty() && (self.small.len() * 10 >= total || self.main.is_empty());
            if from_small {
                let Some(key) = self.small.pop_front() else {
                    return;
                };
                if self.freq.get(&key).copied().unwrap_or(0) >= 1 {
                    self.main.push_back(key);
                    continue;
                }
                self.freq.remove(&key);
                self.ghost.push_back(key);
                self.in_ghost.insert(key);
                while self.ghost.len() > self.freq.len() {
                    if let Some(old) = self.ghost.pop_front() {
                        self.in_ghost.remove(&old);
                    }
                }
                return;
            }
            let Some(key) = self.main.pop_front() else {
                return;
            };
            match self.freq.get_mut(&key) {
                Some(f) if *f > 0 => {
                    *f -= 1;
                    self.main.push_back(key);
                }
                _ => {
                    self.freq.remove(&key);
                    return;
                }
            }
        }
    }
}

/// Che's approximation of the steady-state LRU hit rate under independent requests with the
/// given popularity: find the characteristic time T at which the expected number of distinct
/// keys seen equals the capacity, then a key hits with probability 1 - exp(-p T).
pub fn che_lru_hit_rate(probabilities: &[f64], capacity: usize) -> f64 {
    if capacity >= probabilities.len() {
        return 1.0;
    }
    let occupancy = |t: f64| -> f64 { probabilities.iter().map(|p| 1.0 - (-p * t).exp()).sum() };
    let target = capacity as f64;
    let (mut lo, mut hi) = (0.0_f64, 1.0_f64);
    while occupancy(hi) < target {
        hi *= 2.0;
    }
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if occupancy(mid) < target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let t = 0.5 * (lo + hi);
    probabilities
        .iter()
        .map(|p| p * (1.0 - (-p * t).exp()))
        .sum()
}

/// Hit rate of `access` (true on a hit) over `trace`, counting only requests from `warmup` on.
pub fn replay(trace: &[u128], warmup: usize, mut access: impl FnMut(u128) -> bool) -> f64 {
    let mut hits = 0usize;
    let mut counted = 0usize;
    for (i, &key) in trace.iter().enumerate() {
        let hit = access(key);
        if i >= warmup {
            counted += 1;
            hits += usize::from(hit);
        }
    }
    if counted == 0 {
        0.0
    } else {
        hits as f64 / counted as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_rank_frequencies_follow_the_law() {
        let zipf = Zipf::new(100, 1.0);
        let mut rng = SplitMix64::new(7);
        let mut counts = [0u32; 100];
        for _ in 0..200_000 {
            counts[zipf.sample(&mut rng)] += 1;
        }
        // Rank 1 is twice as popular as rank 2 and ten times rank 10 under s = 1.
        let ratio_2 = f64::from(counts[0]) / f64::from(counts[1]);
        let ratio_10 = f64::from(counts[0]) / f64::from(counts[9]);
        assert!((ratio_2 - 2.0).abs() < 0.1, "rank1/rank2 = {ratio_2}");
        assert!((ratio_10 - 10.0).abs() < 1.0, "rank1/rank10 = {ratio_10}");
    }

    #[test]
    fn reference_lru_evicts_least_recent() {
        let mut lru = ReferenceLru::new(2);
        assert!(!lru.access(1));
        assert!(!lru.access(2));
        assert!(lru.access(1));
        assert!(!lru.access(3)); // evicts 2
        assert!(lru.access(1));
        assert!(!lru.access(2));
    }

    #[test]
    fn reference_s3fifo_keeps_a_read_key_through_a_scan() {
        let mut s3 = ReferenceS3Fifo::new(10);
        assert!(!s3.access(0));
        assert!(s3.access(0));
        for key in 1..=100 {
            assert!(!s3.access(key));
        }
        assert!(s3.access(0));
    }

    #[test]
    fn che_is_exact_at_the_edges() {
        let p = vec![0.25; 4];
        assert!((che_lru_hit_rate(&p, 4) - 1.0).abs() < 1e-12);
        // Uniform popularity: LRU hit rate is capacity / keys, which Che reproduces closely.
        let p = vec![0.001; 1000];
        assert!((che_lru_hit_rate(&p, 200) - 0.2).abs() < 0.01);
    }
}
