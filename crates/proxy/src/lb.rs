//! Load balancers: pick an endpoint of a cluster (RoundRobin, LeastRequest, Random,
//! RingHash, Maglev), plus the fast RNG and the fixed 64-bit hash the data plane uses.
//!
//! Everything here is pure and synchronous: a [`Balancer`] is built once per cluster when a
//! config snapshot is compiled and then picks endpoint *indices* (into the cluster's endpoint
//! list). Per pick it costs at most an atomic or two, or a short uncontended lock for
//! smooth weighted round robin with unequal weights.

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use biplane_config::LbPolicy;

// ---------------------------------------------------------------------------------------
// Fast RNG and hash
// ---------------------------------------------------------------------------------------

thread_local! {
    static RNG: Cell<u64> = const { Cell::new(0) };
}

/// A fast, non-cryptographic random `u64` (wyrand over a thread-local state seeded once
/// from the OS RNG). Good for load balancing, not for secrets.
pub fn random_u64() -> u64 {
    RNG.with(|cell| {
        let mut s = cell.get();
        if s == 0 {
            s = rand::random::<u64>() | 1;
        }
        s = s.wrapping_add(0xa076_1d64_78bd_642f);
        cell.set(s);
        let t = u128::from(s) * u128::from(s ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) as u64) ^ (t as u64)
    })
}

/// Uniform random number in `0..n` (`n > 0`), by multiply-shift (no modulo bias worth
/// caring about for balancing).
pub fn random_below(n: u64) -> u64 {
    ((u128::from(random_u64()) * u128::from(n)) >> 64) as u64
}

/// Fixed, fast 64-bit hash (FNV-1a over the bytes, then the murmur3 `fmix64` finalizer for
/// avalanche). Stable across processes and versions: ring positions and hash keys computed
/// by two proxies agree.
pub fn hash64(bytes: &[u8]) -> u64 {
    hash64_seeded(bytes, 0)
}

/// [`hash64`] with a seed mixed in first (Maglev needs two independent hashes).
pub fn hash64_seeded(bytes: &[u8], seed: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    fmix64(h)
}

fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

// ---------------------------------------------------------------------------------------
// Balancer
// ---------------------------------------------------------------------------------------

/// Counts a request as active on an endpoint (for LeastRequest) until dropped.
#[derive(Debug)]
pub struct LoadGuard {
    active: Option<(Arc<[AtomicU32]>, usize)>,
}

impl LoadGuard {
    /// A guard that counts nothing (balancers other than LeastRequest).
    pub fn none() -> Self {
        Self { active: None }
    }
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        if let Some((counts, idx)) = &self.active
            && let Some(c) = counts.get(*idx)
        {
            c.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// One endpoint as the balancer sees it.
#[derive(Debug, Clone, Copy)]
pub struct LbEndpoint {
    pub address: SocketAddr,
    /// 0 is treated as 1 (config validation guarantees >= 1).
    pub weight: u32,
}

/// A compiled balancer over a fixed endpoint list.
#[derive(Debug)]
pub struct Balancer {
    kind: Kind,
    len: usize,
}

#[derive(Debug)]
enum Kind {
    Empty,
    Single,
    RoundRobin(RoundRobin),
    LeastRequest(LeastRequest),
    Random(WeightedRandom),
    Ring(Ring),
    Maglev(Maglev),
}

impl Balancer {
    pub fn new(policy: LbPolicy, endpoints: &[LbEndpoint]) -> Self {
        let len = endpoints.len();
        let weights: Vec<u32> = endpoints.iter().map(|e| e.weight.max(1)).collect();
        let kind = match (len, policy) {
            (0, _) => Kind::Empty,
            // One endpoint: nothing to choose (and nothing to count).
            (1, _) => Kind::Single,
            (_, LbPolicy::RoundRobin) => Kind::RoundRobin(RoundRobin::new(weights)),
            (_, LbPolicy::LeastRequest) => Kind::LeastRequest(LeastRequest::new(&weights)),
            (_, LbPolicy::Random) => Kind::Random(WeightedRandom::new(&weights)),
            (
                _,
                LbPolicy::RingHash {
                    minimum_ring_size,
                    maximum_ring_size,
                },
            ) => Kind::Ring(Ring::new(endpoints, minimum_ring_size, maximum_ring_size)),
            (_, LbPolicy::Maglev { table_size }) => {
                Kind::Maglev(Maglev::new(endpoints, table_size))
            }
        };
        Self { kind, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Pick an endpoint index. `hash` is the request's hash key for RingHash/Maglev (a
    /// random one is used when `None`); other balancers ignore it.
    pub fn pick(&self, hash: Option<u64>) -> Option<(usize, LoadGuard)> {
        let idx = match &self.kind {
            Kind::Empty => return None,
            Kind::Single => 0,
            Kind::RoundRobin(rr) => rr.pick(),
            Kind::LeastRequest(lr) => return Some(lr.pick()),
            Kind::Random(r) => r.pick(),
            Kind::Ring(r) => r.pick(hash.unwrap_or_else(random_u64)),
            Kind::Maglev(m) => m.pick(hash.unwrap_or_else(random_u64)),
        };
        Some((idx, LoadGuard::none()))
    }
}

// ---------------------------------------------------------------------------------------
// RoundRobin: smooth weighted round robin (nginx), or a plain cursor for equal weights.
// ---------------------------------------------------------------------------------------

#[derive(Debug)]
struct RoundRobin {
    cursor: AtomicUsize,
    /// `None` when all weights are equal (then the cursor is enough).
    smooth: Option<Mutex<Smooth>>,
    n: usize,
}

#[derive(Debug)]
struct Smooth {
    weights: Vec<i64>,
    current: Vec<i64>,
    total: i64,
}

impl RoundRobin {
    fn new(weights: Vec<u32>) -> Self {
        let n = weights.len();
        let equal = weights.windows(2).all(|w| w[0] == w[1]);
        let smooth = (!equal).then(|| {
            let weights: Vec<i64> = weights.iter().map(|&w| i64::from(w)).collect();
            let total = weights.iter().sum();
            Mutex::new(Smooth {
                current: vec![0; weights.len()],
                weights,
                total,
            })
        });
        // Start at a random position so that many proxies do not all hit endpoint 0 first.
        let start = random_below(n as u64) as usize;
        Self {
            cursor: AtomicUsize::new(start),
            smooth,
            n,
        }
    }

    fn pick(&self) -> usize {
        match &self.smooth {
            None => self.cursor.fetch_add(1, Ordering::Relaxed) % self.n,
            Some(m) => {
                // Short critical section, never held across an await.
                let mut s = match m.lock() {
                    Ok(g) => g,
                    Err(poisoned) => poisoned.into_inner(),
                };
                let Smooth {
                    weights,
                    current,
                    total,
                } = &mut *s;
                let mut best = 0;
                let mut best_w = i64::MIN;
                for (i, (c, w)) in current.iter_mut().zip(weights.iter()).enumerate() {
                    *c += *w;
                    if *c > best_w {
                        best_w = *c;
                        best = i;
                    }
                }
                if let Some(c) = current.get_mut(best) {
                    *c -= *total;
                }
                best
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Random (weighted)
// ---------------------------------------------------------------------------------------

#[derive(Debug)]
struct WeightedRandom {
    /// `None` when weights are equal; else cumulative sums.
    cumulative: Option<Vec<u64>>,
    n: usize,
}

impl WeightedRandom {
    fn new(weights: &[u32]) -> Self {
        let equal = weights.windows(2).all(|w| w[0] == w[1]);
        let cumulative = (!equal).then(|| {
            let mut acc = 0u64;
            weights
                .iter()
                .map(|&w| {
                    acc += u64::from(w);
                    acc
                })
                .collect()
        });
        Self {
            cumulative,
            n: weights.len(),
        }
    }

    fn pick(&self) -> usize {
        match &self.cumulative {
            None => random_below(self.n as u64) as usize,
            Some(cum) => {
                let total = cum.last().copied().unwrap_or(1);
                let r = random_below(total);
                cum.partition_point(|&c| c <= r).min(self.n - 1)
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// LeastRequest: power of two choices, weighted.
// ---------------------------------------------------------------------------------------

#[derive(Debug)]
struct LeastRequest {
    choose: WeightedRandom,
    active: Arc<[AtomicU32]>,
}

impl LeastRequest {
    fn new(weights: &[u32]) -> Self {
        let active: Arc<[AtomicU32]> = weights.iter().map(|_| AtomicU32::new(0)).collect();
        Self {
            choose: WeightedRandom::new(weights),
            active,
        }
    }

    /// Power of two choices: two candidates drawn by weight, the one with fewer active
    /// requests wins (ties go to the first drawn, so idle endpoints share traffic by
    /// weight). With equal weights this is exactly Envoy's P2C.
    fn pick(&self) -> (usize, LoadGuard) {
        let a = self.choose.pick();
        let mut b = self.choose.pick();
        if b == a {
            // Draw once more; a second collision is fine (then `a` it is).
            b = self.choose.pick();
        }
        let load = |i: usize| self.active.get(i).map_or(0, |c| c.load(Ordering::Relaxed));
        let idx = if load(b) < load(a) { b } else { a };
        if let Some(c) = self.active.get(idx) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        (
            idx,
            LoadGuard {
                active: Some((self.active.clone(), idx)),
            },
        )
    }
}

// ---------------------------------------------------------------------------------------
// RingHash (ketama)
// ---------------------------------------------------------------------------------------

#[derive(Debug)]
struct Ring {
    /// Sorted by hash.
    points: Vec<(u64, u32)>,
}

impl Ring {
    /// Each endpoint gets `weight * per_weight` points hashed from `"{address}_{i}"`.
    /// `per_weight` is the smallest power of two that brings the ring to at least
    /// `min_size` (capped so the ring stays under `max_size`). Rounding to a power of two
    /// keeps `per_weight` unchanged when an endpoint is added or removed (unless the total
    /// crosses a power of two), so the surviving endpoints keep exactly their points and
    /// only the keys of the removed endpoint move.
    fn new(endpoints: &[LbEndpoint], min_size: u64, max_size: u64) -> Self {
        let total_weight: u64 = endpoints.iter().map(|e| u64::from(e.weight.max(1))).sum();
        let min_size = min_size.max(1);
        let max_size = max_size.max(min_size).min(8 * 1024 * 1024);
        let mut per_weight = min_size.div_ceil(total_weight.max(1)).next_power_of_two();
        while per_weight > 1 && per_weight * total_weight > max_size {
            per_weight /= 2;
        }
        let mut points = Vec::with_capacity((per_weight * total_weight) as usize);
        let mut key = String::with_capacity(64);
        for (idx, ep) in endpoints.iter().enumerate() {
            let count = u64::from(ep.weight.max(1)) * per_weight;
            key.clear();
            use std::fmt::Write as _;
            let _ = write!(key, "{}_", ep.address);
            let base = key.len();
            for i in 0..count {
                key.truncate(base);
                let _ = write!(key, "{i}");
                points.push((hash64(key.as_bytes()), idx as u32));
            }
        }
        points.sort_unstable();
        Self { points }
    }

    fn pick(&self, hash: u64) -> usize {
        let i = self.points.partition_point(|p| p.0 < hash);
        let p = self.points.get(i).or_else(|| self.points.first());
        p.map_or(0, |p| p.1 as usize)
    }
}

// ---------------------------------------------------------------------------------------
// Maglev
// ---------------------------------------------------------------------------------------

#[derive(Debug)]
struct Maglev {
    table: Vec<u32>,
}

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

impl Maglev {
    /// Google's Maglev lookup table with Envoy's weighting: in round `r` an endpoint of
    /// weight `w` may take its next preferred slot only while it holds fewer than
    /// `r * w / max_w` slots. The table size is rounded up to a prime (65537 by default).
    fn new(endpoints: &[LbEndpoint], table_size: u64) -> Self {
        let mut m = table_size.clamp(3, 5_000_011);
        while !is_prime(m) {
            m += 1;
        }
        let n = endpoints.len();
        let max_w = endpoints
            .iter()
            .map(|e| u64::from(e.weight.max(1)))
            .max()
            .unwrap_or(1);
        let mut offset = Vec::with_capacity(n);
        let mut skip = Vec::with_capacity(n);
        let mut key = String::with_capacity(64);
        for ep in endpoints {
            key.clear();
            use std::fmt::Write as _;
            let _ = write!(key, "{}", ep.address);
            offset.push(hash64_seeded(key.as_bytes(), 1) % m);
            skip.push(hash64_seeded(key.as_bytes(), 2) % (m - 1) + 1);
        }
        let mut next = vec![0u64; n];
        let mut count = vec![0u64; n];
        let mut table = vec![u32::MAX; m as usize];
        let mut filled = 0u64;
        let mut round = 1u64;
        while filled < m {
            for i in 0..n {
                if filled >= m {
                    break;
                }
                let w = u64::from(endpoints[i].weight.max(1));
                if round * w < count[i] {
                    continue;
                }
                count[i] += max_w;
                // Next free slot in i's permutation.
                loop {
                    let slot = ((offset[i] + next[i] * skip[i]) % m) as usize;
                    next[i] += 1;
                    if table[slot] == u32::MAX {
                        table[slot] = i as u32;
                        filled += 1;
                        break;
                    }
                }
            }
            round += 1;
        }
        Self { table }
    }

    fn pick(&self, hash: u64) -> usize {
        let len = self.table.len() as u64;
        self.table
            .get((hash % len.max(1)) as usize)
            .map_or(0, |&i| i as usize)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

    use super::*;

    fn eps(weights: &[u32]) -> Vec<LbEndpoint> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| LbEndpoint {
                address: SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250) as u8 + 1], 8080)),
                weight: w,
            })
            .collect()
    }

    fn distribution(b: &Balancer, n: usize, draws: usize, hashed: bool) -> Vec<usize> {
        let mut counts = vec![0; n];
        for k in 0..draws {
            let h = hashed.then(|| hash64(format!("key-{k}").as_bytes()));
            let (i, _g) = b.pick(h).unwrap();
            counts[i] += 1;
        }
        counts
    }

    /// Each endpoint's share is within `tol` (relative) of its weight share.
    fn assert_weighted(counts: &[usize], weights: &[u32], tol: f64) {
        let total: usize = counts.iter().sum();
        let wsum: u32 = weights.iter().sum();
        for (i, (&c, &w)) in counts.iter().zip(weights).enumerate() {
            let want = total as f64 * f64::from(w) / f64::from(wsum);
            let err = (c as f64 - want).abs() / want;
            assert!(
                err <= tol,
                "endpoint {i}: got {c}, want ~{want:.0} (err {err:.3}); all {counts:?}"
            );
        }
    }

    #[test]
    fn empty_and_single() {
        assert!(
            Balancer::new(LbPolicy::RoundRobin, &[])
                .pick(None)
                .is_none()
        );
        let b = Balancer::new(LbPolicy::LeastRequest, &eps(&[3]));
        for _ in 0..10 {
            assert_eq!(b.pick(None).unwrap().0, 0);
        }
    }

    #[test]
    fn round_robin_equal_is_exact_rotation() {
        let b = Balancer::new(LbPolicy::RoundRobin, &eps(&[1, 1, 1]));
        let first = b.pick(None).unwrap().0;
        let seq: Vec<usize> = (0..6).map(|_| b.pick(None).unwrap().0).collect();
        let expect: Vec<usize> = (1..7).map(|k| (first + k) % 3).collect();
        assert_eq!(seq, expect);
    }

    #[test]
    fn round_robin_smooth_weighted() {
        let b = Balancer::new(LbPolicy::RoundRobin, &eps(&[5, 1, 1]));
        let seq: Vec<usize> = (0..7).map(|_| b.pick(None).unwrap().0).collect();
        // nginx's smooth WRR sequence for {a:5, b:1, c:1}: a a b a c a a.
        assert_eq!(seq, vec![0, 0, 1, 0, 2, 0, 0]);
        let counts = distribution(&b, 3, 7000, false);
        assert_eq!(counts, vec![5000, 1000, 1000]);
    }

    #[test]
    fn random_weighted_within_tolerance() {
        let w = [1, 2, 7];
        let b = Balancer::new(LbPolicy::Random, &eps(&w));
        assert_weighted(&distribution(&b, 3, 100_000, false), &w, 0.05);
        let w = [1, 1, 1, 1];
        let b = Balancer::new(LbPolicy::Random, &eps(&w));
        assert_weighted(&distribution(&b, 4, 100_000, false), &w, 0.05);
    }

    #[test]
    fn least_request_prefers_idle_endpoints() {
        let b = Balancer::new(LbPolicy::LeastRequest, &eps(&[1, 1, 1, 1]));
        // Hold many requests on whatever gets picked first 3 times on distinct endpoints.
        let mut held = Vec::new();
        while held.len() < 30 {
            let (i, g) = b.pick(None).unwrap();
            if i != 3 {
                held.push(g);
            }
        }
        // Endpoint 3 is idle; with P2C it must win every draw it takes part in, and it is in
        // a draw with probability ~ 1 - (3/4)^2 ≈ 44%: far above the 25% of a uniform pick.
        let mut on_idle = 0;
        for _ in 0..1000 {
            let (i, g) = b.pick(None).unwrap();
            if i == 3 {
                on_idle += 1;
            }
            drop(g);
        }
        assert!(on_idle > 380, "idle endpoint picked {on_idle}/1000");
    }

    #[test]
    fn least_request_guard_releases() {
        let b = Balancer::new(LbPolicy::LeastRequest, &eps(&[1, 1]));
        let Kind::LeastRequest(lr) = &b.kind else {
            panic!("kind")
        };
        let guards: Vec<_> = (0..10).map(|_| b.pick(None).unwrap().1).collect();
        let sum: u32 = lr.active.iter().map(|c| c.load(Ordering::Relaxed)).sum();
        assert_eq!(sum, 10);
        drop(guards);
        let sum: u32 = lr.active.iter().map(|c| c.load(Ordering::Relaxed)).sum();
        assert_eq!(sum, 0);
    }

    #[test]
    fn least_request_weighted_when_idle() {
        let w = [1, 3];
        let b = Balancer::new(LbPolicy::LeastRequest, &eps(&w));
        // Guards dropped at once: all endpoints idle, so the weighted draw decides.
        assert_weighted(&distribution(&b, 2, 50_000, false), &w, 0.1);
    }

    fn hash_policy_consistency(policy: LbPolicy, max_moved_from_survivors: f64) {
        let all = eps(&[1; 10]);
        let b = Balancer::new(policy, &all);
        let keys: Vec<u64> = (0..20_000)
            .map(|k| hash64(format!("user-{k}").as_bytes()))
            .collect();
        let before: Vec<usize> = keys.iter().map(|&h| b.pick(Some(h)).unwrap().0).collect();
        // Same key, same endpoint.
        for (&h, &i) in keys.iter().zip(&before) {
            assert_eq!(b.pick(Some(h)).unwrap().0, i);
        }
        // Spread across endpoints.
        let mut counts = vec![0usize; 10];
        for &i in &before {
            counts[i] += 1;
        }
        assert_weighted(&counts, &[1; 10], 0.35);
        // Remove endpoint 4: indices above 4 shift down by one.
        let mut fewer = all.clone();
        fewer.remove(4);
        let b2 = Balancer::new(policy, &fewer);
        let mut moved = 0;
        let mut survivors = 0;
        for (&h, &old) in keys.iter().zip(&before) {
            let new = b2.pick(Some(h)).unwrap().0;
            let new_orig = if new >= 4 { new + 1 } else { new };
            if old != 4 {
                survivors += 1;
                if new_orig != old {
                    moved += 1;
                }
            }
        }
        let frac = moved as f64 / survivors as f64;
        assert!(
            frac <= max_moved_from_survivors,
            "{policy:?}: {frac:.4} of survivors' keys moved"
        );
    }

    #[test]
    fn ring_hash_is_consistent() {
        hash_policy_consistency(
            LbPolicy::RingHash {
                minimum_ring_size: 1024,
                maximum_ring_size: 8_388_608,
            },
            0.0,
        );
    }

    #[test]
    fn maglev_is_consistent() {
        // Maglev trades a little disruption for balance; the paper measures a few percent.
        hash_policy_consistency(LbPolicy::Maglev { table_size: 65537 }, 0.05);
    }

    #[test]
    fn ring_hash_respects_weights() {
        let w = [1, 2, 5];
        let b = Balancer::new(
            LbPolicy::RingHash {
                minimum_ring_size: 4096,
                maximum_ring_size: 1 << 20,
            },
            &eps(&w),
        );
        assert_weighted(&distribution(&b, 3, 60_000, true), &w, 0.2);
    }

    #[test]
    fn maglev_respects_weights() {
        let w = [1, 2, 5];
        let b = Balancer::new(LbPolicy::Maglev { table_size: 65537 }, &eps(&w));
        let Kind::Maglev(m) = &b.kind else {
            panic!("kind")
        };
        let mut slots = [0usize; 3];
        for &i in &m.table {
            slots[i as usize] += 1;
        }
        assert_weighted(&slots, &w, 0.02);
        assert_weighted(&distribution(&b, 3, 60_000, true), &w, 0.05);
    }

    #[test]
    fn maglev_rounds_table_to_prime() {
        let b = Balancer::new(LbPolicy::Maglev { table_size: 100 }, &eps(&[1, 1]));
        let Kind::Maglev(m) = &b.kind else {
            panic!("kind")
        };
        assert_eq!(m.table.len(), 101);
        assert!(m.table.iter().all(|&i| i < 2));
    }

    #[test]
    fn hash_is_stable_and_spreads() {
        assert_eq!(hash64(b"abc"), hash64(b"abc"));
        assert_ne!(hash64(b"abc"), hash64(b"abd"));
        assert_ne!(hash64_seeded(b"abc", 1), hash64_seeded(b"abc", 2));
        // Bits are used evenly: top bit set about half the time.
        let ones = (0..10_000u32)
            .filter(|k| hash64(&k.to_le_bytes()) >> 63 == 1)
            .count();
        assert!((4500..5500).contains(&ones), "{ones}");
    }

    #[test]
    fn random_below_in_range() {
        for n in [1u64, 2, 3, 1000] {
            for _ in 0..1000 {
                assert!(random_below(n) < n);
            }
        }
    }
}
