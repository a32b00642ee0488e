//! A log-linear latency histogram with bounded memory.
//!
//! Latencies span six orders of magnitude (a 30 µs TTFT, a 3 s stall), and a run records
//! millions of them, so keeping samples is out. Like an HDR histogram, values are counted in
//! buckets whose width grows with the value: below 256 ns every nanosecond has its own
//! bucket; above, every power of two is split into 128 equal buckets. A bucket is then at
//! most 1/128 of its lower bound wide, and reporting its midpoint is off by at most 1/256
//! (0.4 %) — finer than the 1 % the load tool promises. The whole `u64` range fits in
//! `BUCKETS` counters (58 KiB), however many values are recorded.

/// Sub-bucket bits: each power of two is split into `2^SUB_BITS` buckets.
const SUB_BITS: u32 = 7;
/// Buckets per power of two.
const SUB: u64 = 1 << SUB_BITS;
/// Values below this are counted exactly, one bucket each.
const LINEAR_LIMIT: u64 = SUB << 1;
/// Buckets needed for every `u64`: the exact range, then `SUB` per remaining power of two.
pub(crate) const BUCKETS: usize = ((64 - SUB_BITS + 1) as usize) * (SUB as usize);

/// Counts of nanosecond values; see the module doc for its precision.
#[derive(Clone, Debug)]
pub struct Histogram {
    counts: Box<[u64]>,
    count: u64,
    /// Exact, so the reported minimum and maximum are not bucket approximations.
    min: u64,
    max: u64,
    /// For the mean; u128 so a long run of large values cannot overflow it.
    sum: u128,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Histogram {
    /// An empty histogram.
    pub(crate) fn new() -> Self {
        Histogram {
            counts: vec![0; BUCKETS].into_boxed_slice(),
            count: 0,
            min: u64::MAX,
            max: 0,
            sum: 0,
        }
    }

    /// Counts one value (nanoseconds).
    #[inline]
    pub(crate) fn record(&mut self, value: u64) {
        self.counts[index(value)] += 1;
        self.count += 1;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        self.sum += u128::from(value);
    }

    /// Counts a duration, saturating at `u64::MAX` nanoseconds (584 years).
    #[inline]
    pub(crate) fn record_duration(&mut self, d: std::time::Duration) {
        self.record(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Adds every value counted by `other`.
    pub(crate) fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.count += other.count;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        self.sum += other.sum;
    }

    /// Forgets every value, keeping the memory.
    pub(crate) fn clear(&mut self) {
        self.counts.fill(0);
        self.count = 0;
        self.min = u64::MAX;
        self.max = 0;
        self.sum = 0;
    }

    /// How many values were recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The smallest value recorded, if any.
    pub fn min(&self) -> Option<u64> {
        (self.count > 0).then_some(self.min)
    }

    /// The largest value recorded, if any.
    pub fn max(&self) -> Option<u64> {
        (self.count > 0).then_some(self.max)
    }

    /// The mean of the values recorded, if any.
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum as f64 / self.count as f64)
    }

    /// The value at quantile `q` (0.0..=1.0): the smallest recorded value with at least
    /// `q` of all values at or below it (rank `ceil(q * count)`, at least 1), within the
    /// bucket precision and clamped to the exact minimum and maximum. `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let q = q.clamp(0.0, 1.0);
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        if rank == self.count {
            return Some(self.max);
        }
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(midpoint(i).clamp(self.min, self.max));
            }
        }
        Some(self.max)
    }

    /// The non-empty buckets as `(lowest value, highest value, count)`, in order.
    pub fn buckets(&self) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(i, &c)| {
                let (lo, hi) = bounds(i);
                (lo, hi, c)
            })
    }

    /// Bytes this histogram holds, whatever it has recorded.
    #[cfg(test)]
    pub(crate) fn memory_bytes(&self) -> usize {
        std::mem::size_of::<Self>() + std::mem::size_of_val(&*self.counts)
    }
}

/// The bucket of `value`.
#[inline]
fn index(value: u64) -> usize {
    if value < LINEAR_LIMIT {
        return value as usize;
    }
    // value >= 256, so its highest set bit is at least SUB_BITS + 1.
    let shift = 63 - value.leading_zeros() - SUB_BITS;
    let top = value >> shift; // in SUB..2*SUB
    (u64::from(shift) * SUB + top) as usize
}

/// The lowest and highest value of bucket `i`.
fn bounds(i: usize) -> (u64, u64) {
    let i = i as u64;
    if i < LINEAR_LIMIT {
        return (i, i);
    }
    let shift = i / SUB - 1;
    let top = i % SUB + SUB;
    let lo = top << shift;
    let hi = lo + ((1u64 << shift) - 1);
    (lo, hi)
}

/// The value reported for bucket `i`: its middle, which halves the worst error.
fn midpoint(i: usize) -> u64 {
    let (lo, hi) = bounds(i);
    lo + (hi - lo) / 2
}

#[cfg(test)]
mod tests {
    use super::*;

    /// splitmix64: deterministic test data without a rand dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        /// Log-uniform over 1 ns ..= 2^bits ns, like latencies spread over decades.
        fn latency(&mut self, bits: u32) -> u64 {
            let exp = self.next() % u64::from(bits);
            (1u64 << exp) + self.next() % (1u64 << exp)
        }
    }

    /// The oracle: the value at rank `ceil(q * n)` of the sorted samples.
    fn oracle(sorted: &[u64], q: f64) -> u64 {
        let n = sorted.len() as u64;
        let rank = ((q * n as f64).ceil() as u64).clamp(1, n);
        sorted[rank as usize - 1]
    }

    fn assert_close(got: u64, want: u64, what: &str) {
        let err = (got as f64 - want as f64).abs() / (want.max(1) as f64);
        assert!(
            err <= 0.01,
            "{what}: got {got}, want {want} (error {err:.4})"
        );
    }

    #[test]
    fn every_bucket_maps_back_to_itself() {
        for i in 0..BUCKETS {
            let (lo, hi) = bounds(i);
            assert!(lo <= hi);
            assert_eq!(index(lo), i, "lowest value of bucket {i}");
            assert_eq!(index(hi), i, "highest value of bucket {i}");
            if i + 1 < BUCKETS {
                assert_eq!(bounds(i + 1).0, hi + 1, "buckets {i} and {} touch", i + 1);
            }
            if lo >= LINEAR_LIMIT {
                assert!((hi - lo) as f64 / lo as f64 <= 1.0 / SUB as f64);
            }
        }
        assert_eq!(index(u64::MAX), BUCKETS - 1);
        assert_eq!(bounds(BUCKETS - 1).1, u64::MAX);
    }

    #[test]
    fn small_values_are_exact() {
        let mut h = Histogram::new();
        for v in [0, 1, 2, 3, 255] {
            h.record(v);
        }
        assert_eq!(h.quantile(0.0), Some(0));
        assert_eq!(h.quantile(0.4), Some(1));
        assert_eq!(h.quantile(0.6), Some(2));
        assert_eq!(h.quantile(0.8), Some(3));
        assert_eq!(h.quantile(1.0), Some(255));
        assert_eq!((h.min(), h.max(), h.count()), (Some(0), Some(255), 5));
    }

    #[test]
    fn empty_has_no_quantiles() {
        let h = Histogram::new();
        assert_eq!(h.quantile(0.5), None);
        assert_eq!((h.min(), h.max(), h.mean()), (None, None, None));
    }

    #[test]
    fn quantiles_match_a_sorted_oracle_within_one_percent() {
        for seed in 1..=5u64 {
            let mut rng = Rng(seed);
            let n = 1000 * seed as usize + 7;
            let samples: Vec<u64> = (0..n).map(|_| rng.latency(40)).collect();
            let mut h = Histogram::new();
            samples.iter().for_each(|&v| h.record(v));
            let mut sorted = samples.clone();
            sorted.sort_unstable();
            for q in [
                0.0, 0.001, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999, 0.9999, 1.0,
            ] {
                let got = h.quantile(q).unwrap();
                assert_close(got, oracle(&sorted, q), &format!("seed {seed} q {q}"));
            }
            assert_eq!(h.max(), sorted.last().copied());
            assert_eq!(h.min(), sorted.first().copied());
            let mean = sorted.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
            assert!((h.mean().unwrap() - mean).abs() / mean < 1e-9);
        }
    }

    #[test]
    fn merging_equals_recording_everything_in_one() {
        let mut rng = Rng(42);
        let (mut a, mut b, mut all) = (Histogram::new(), Histogram::new(), Histogram::new());
        for i in 0..20_000 {
            let v = rng.latency(34);
            all.record(v);
            if i % 3 == 0 { &mut a } else { &mut b }.record(v);
        }
        a.merge(&b);
        assert_eq!(a.count(), all.count());
        assert_eq!(
            (a.min(), a.max(), a.mean()),
            (all.min(), all.max(), all.mean())
        );
        for q in [0.5, 0.9, 0.99, 0.999] {
            assert_eq!(a.quantile(q), all.quantile(q));
        }
        assert!(a.buckets().eq(all.buckets()));
        // Merging an empty histogram changes nothing.
        a.merge(&Histogram::new());
        assert_eq!(a.min(), all.min());
        // A cleared histogram is empty again, and merging into it copies.
        let mut c = a.clone();
        c.clear();
        assert_eq!((c.count(), c.quantile(0.5), c.max()), (0, None, None));
        c.merge(&all);
        assert!(c.buckets().eq(all.buckets()));
    }

    #[test]
    fn memory_is_bounded_whatever_is_recorded() {
        let mut h = Histogram::new();
        let before = h.memory_bytes();
        let mut rng = Rng(7);
        for _ in 0..1_000_000 {
            h.record(rng.next());
        }
        h.record(u64::MAX);
        h.record(0);
        assert_eq!(h.memory_bytes(), before);
        assert!(before < 64 * 1024, "{before} bytes");
        assert_eq!(h.count(), 1_000_002);
        assert_eq!(h.quantile(1.0), Some(u64::MAX));
    }

    #[test]
    fn buckets_cover_every_count_in_order() {
        let mut h = Histogram::new();
        for v in [5, 5, 300, 1_000_000, 1_000_001] {
            h.record(v);
        }
        let buckets: Vec<_> = h.buckets().collect();
        assert_eq!(buckets.iter().map(|b| b.2).sum::<u64>(), 5);
        assert!(buckets.windows(2).all(|w| w[0].1 < w[1].0));
        assert_eq!(buckets[0], (5, 5, 2));
        assert!(buckets[1].0 <= 300 && 300 <= buckets[1].1);
    }
}
