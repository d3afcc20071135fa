//! A DDSketch with 1 % relative accuracy: mergeable percentiles for rollups.
//!
//! Values map to logarithmic bins, γ = (1 + α) / (1 − α): any value in bin `i` lies in
//! (γ^(i−1), γ^i] and is reported as 2γ^i / (γ + 1), which is within α of it. Merging
//! adds bin counts, so a sketch of a union equals the merge of the sketches, and hours
//! and days are built from minutes without ever averaging a percentile.
//!
//! Written here rather than taken from `sketches-ddsketch` because rollups store one
//! sketch per series and bucket: this one serialises only its non-empty bins as
//! delta-encoded varints (a typical latency minute is 100–300 bytes instead of 8 bytes
//! per bin of a dense range through serde), and exposes its bins for that encoding.

use crate::varint;

/// α: the relative accuracy of every quantile.
pub const RELATIVE_ACCURACY: f64 = 0.01;
/// Magnitudes below this count as zero.
const MIN_INDEXABLE: f64 = 1e-9;
/// Bins kept per sign; beyond this the lowest bins collapse together (only reached by
/// data spanning about 35 orders of magnitude).
const MAX_BINS: usize = 4096;
const FORMAT_VERSION: u8 = 1;

fn gamma() -> f64 {
    (1.0 + RELATIVE_ACCURACY) / (1.0 - RELATIVE_ACCURACY)
}

fn index_of(magnitude: f64, ln_gamma: f64) -> i32 {
    (magnitude.ln() / ln_gamma).ceil() as i32
}

fn value_of(index: i32) -> f64 {
    let g = gamma();
    2.0 * g.powi(index) / (g + 1.0)
}

/// Dense bin counts starting at `offset`.
#[derive(Debug, Clone, Default, PartialEq)]
struct Bins {
    offset: i32,
    counts: Vec<u64>,
}

impl Bins {
    fn add(&mut self, index: i32, n: u64) {
        if self.counts.is_empty() {
            self.offset = index;
            self.counts.push(0);
        } else if index < self.offset {
            let grow = (self.offset - index) as usize;
            self.counts.splice(0..0, std::iter::repeat_n(0, grow));
            self.offset = index;
        } else if index >= self.offset + self.counts.len() as i32 {
            self.counts.resize((index - self.offset) as usize + 1, 0);
        }
        self.counts[(index - self.offset) as usize] += n;
        self.collapse();
    }

    fn end(&self) -> i32 {
        self.offset + self.counts.len() as i32
    }

    /// Adds `other`'s counts, growing the range at most once.
    fn merge(&mut self, other: &Bins) {
        if other.counts.is_empty() {
            return;
        }
        if self.counts.is_empty() {
            self.clone_from(other);
            return;
        }
        let (lo, hi) = (self.offset.min(other.offset), self.end().max(other.end()));
        if lo < self.offset || hi > self.end() {
            let mut counts = vec![0; (hi - lo) as usize];
            let at = (self.offset - lo) as usize;
            counts[at..at + self.counts.len()].copy_from_slice(&self.counts);
            self.counts = counts;
            self.offset = lo;
        }
        let at = (other.offset - self.offset) as usize;
        for (mine, theirs) in self.counts[at..at + other.counts.len()].iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.collapse();
    }

    fn collapse(&mut self) {
        if self.counts.len() > MAX_BINS {
            let excess = self.counts.len() - MAX_BINS;
            let collapsed: u64 = self.counts.drain(..excess).sum();
            self.counts[0] += collapsed;
            self.offset += excess as i32;
        }
    }

    /// Builds bins from ascending (index, count) pairs in one allocation.
    fn from_sorted(pairs: &[(i32, u64)]) -> Bins {
        let (Some(first), Some(last)) = (pairs.first(), pairs.last()) else {
            return Bins::default();
        };
        let mut bins = Bins {
            offset: first.0,
            counts: vec![0; (last.0 - first.0) as usize + 1],
        };
        for (index, n) in pairs {
            bins.counts[(index - first.0) as usize] += n;
        }
        bins.collapse();
        bins
    }

    fn nonzero(&self) -> impl DoubleEndedIterator<Item = (i32, u64)> + '_ {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(move |(i, n)| (self.offset + i as i32, *n))
    }
}

/// A mergeable quantile sketch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sketch {
    positive: Bins,
    negative: Bins,
    zero: u64,
    count: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("corrupt sketch encoding")]
pub struct CorruptSketch;

impl Sketch {
    pub fn new() -> Self {
        Sketch::default()
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn add(&mut self, value: f64) {
        let ln_gamma = gamma().ln();
        if value > MIN_INDEXABLE {
            self.positive.add(index_of(value, ln_gamma), 1);
        } else if value < -MIN_INDEXABLE {
            self.negative.add(index_of(-value, ln_gamma), 1);
        } else {
            self.zero += 1;
        }
        self.count += 1;
    }

    pub fn merge(&mut self, other: &Sketch) {
        self.positive.merge(&other.positive);
        self.negative.merge(&other.negative);
        self.zero += other.zero;
        self.count += other.count;
    }

    /// The value at quantile `q` in [0, 1], within 1 % relative error; `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 || !(0.0..=1.0).contains(&q) {
            return None;
        }
        let rank = q * (self.count - 1) as f64;
        let mut seen = 0u64;
        for (index, n) in self.negative.nonzero().rev() {
            seen += n;
            if seen as f64 > rank {
                return Some(-value_of(index));
            }
        }
        seen += self.zero;
        if seen as f64 > rank {
            return Some(0.0);
        }
        for (index, n) in self.positive.nonzero() {
            seen += n;
            if seen as f64 > rank {
                return Some(value_of(index));
            }
        }
        self.positive.nonzero().next_back().map(|(i, _)| value_of(i))
    }

    /// Several quantiles (ascending) in one walk over the bins.
    pub fn quantiles<const N: usize>(&self, qs: [f64; N]) -> [Option<f64>; N] {
        let mut out = [None; N];
        if self.count == 0 {
            return out;
        }
        let ranks = qs.map(|q| q.clamp(0.0, 1.0) * (self.count - 1) as f64);
        let mut next = 0;
        let mut seen = 0u64;
        let bins = self
            .negative
            .nonzero()
            .rev()
            .map(|(i, n)| (-value_of(i), n))
            .chain(std::iter::once((0.0, self.zero)))
            .chain(self.positive.nonzero().map(|(i, n)| (value_of(i), n)));
        for (value, n) in bins {
            seen += n;
            while next < N && seen as f64 > ranks[next] {
                out[next] = Some(value);
                next += 1;
            }
            if next == N {
                break;
            }
        }
        out
    }

    /// Compact binary form: version, zero count, then each sign's non-empty bins as
    /// (zig-zag index delta, count) varints.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + 3 * (self.positive.counts.len() + self.negative.counts.len()));
        out.push(FORMAT_VERSION);
        varint::put(&mut out, self.zero);
        for bins in [&self.positive, &self.negative] {
            let nonzero: Vec<(i32, u64)> = bins.nonzero().collect();
            varint::put(&mut out, nonzero.len() as u64);
            let mut previous = 0i64;
            for (index, n) in nonzero {
                varint::put(&mut out, varint::zigzag(i64::from(index) - previous));
                varint::put(&mut out, n);
                previous = i64::from(index);
            }
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Sketch, CorruptSketch> {
        let mut input = bytes;
        if input.first() != Some(&FORMAT_VERSION) {
            return Err(CorruptSketch);
        }
        input = &input[1..];
        let mut sketch = Sketch {
            zero: get_varint(&mut input)?,
            ..Sketch::default()
        };
        sketch.count = sketch.zero;
        let mut pairs = Vec::new();
        for negative in [false, true] {
            let bins = get_varint(&mut input)?;
            if bins > MAX_BINS as u64 {
                return Err(CorruptSketch);
            }
            pairs.clear();
            let mut index = 0i64;
            for _ in 0..bins {
                index = index
                    .checked_add(varint::unzigzag(get_varint(&mut input)?))
                    .ok_or(CorruptSketch)?;
                let n = get_varint(&mut input)?;
                let i = i32::try_from(index).map_err(|_| CorruptSketch)?;
                // Bins are written in ascending order; anything else is corrupt.
                if pairs.last().is_some_and(|(previous, _)| *previous >= i) {
                    return Err(CorruptSketch);
                }
                pairs.push((i, n));
                sketch.count = sketch.count.checked_add(n).ok_or(CorruptSketch)?;
            }
            // A valid sketch never spans more than MAX_BINS; a corrupt one must not make
            // decoding allocate for an absurd range.
            if let (Some(first), Some(last)) = (pairs.first(), pairs.last())
                && (i64::from(last.0) - i64::from(first.0)) >= MAX_BINS as i64
            {
                return Err(CorruptSketch);
            }
            let built = Bins::from_sorted(&pairs);
            if negative {
                sketch.negative = built;
            } else {
                sketch.positive = built;
            }
        }
        if !input.is_empty() {
            return Err(CorruptSketch);
        }
        Ok(sketch)
    }
}

fn get_varint(input: &mut &[u8]) -> Result<u64, CorruptSketch> {
    varint::get(input).ok_or(CorruptSketch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The exact quantile with the same rank convention as the sketch.
    fn exact(sorted: &[f64], q: f64) -> f64 {
        sorted[(q * (sorted.len() - 1) as f64).floor() as usize]
    }

    fn within(estimate: f64, truth: f64) -> bool {
        (estimate - truth).abs() <= RELATIVE_ACCURACY * truth.abs() + 1e-12
    }

    fn sketch_of(values: &[f64]) -> Sketch {
        let mut s = Sketch::new();
        values.iter().for_each(|v| s.add(*v));
        s
    }

    #[test]
    fn known_distribution() {
        let values: Vec<f64> = (1..=1000).map(f64::from).collect();
        let s = sketch_of(&values);
        for q in [0.0, 0.5, 0.95, 0.99, 1.0] {
            let got = s.quantile(q).unwrap();
            assert!(within(got, exact(&values, q)), "q={q} got {got}");
        }
        assert_eq!(Sketch::new().quantile(0.5), None);
        assert_eq!(s.quantile(1.5), None);
    }

    #[test]
    fn zero_and_negative_values() {
        let values = [-50.0, -1.0, 0.0, 0.0, 2.0, 300.0];
        let s = sketch_of(&values);
        assert!(within(s.quantile(0.0).unwrap(), -50.0));
        assert_eq!(s.quantile(0.5).unwrap(), 0.0);
        assert!(within(s.quantile(1.0).unwrap(), 300.0));
    }

    #[test]
    fn encoding_is_compact_and_rejects_garbage() {
        let values: Vec<f64> = (0..10_000).map(|i| 20.0 + (i % 500) as f64 * 0.37).collect();
        let s = sketch_of(&values);
        let bytes = s.encode();
        assert!(bytes.len() < 600, "{} bytes", bytes.len());
        assert_eq!(Sketch::decode(&bytes).unwrap(), s);
        assert!(Sketch::decode(&[]).is_err());
        assert!(Sketch::decode(&[2, 0, 0, 0]).is_err());
        assert!(Sketch::decode(&bytes[..bytes.len() - 1]).is_err());
        // Two bins 2^30 apart: refused, not allocated.
        let far = [1u8, 0, 2, 0, 1, 0x80, 0x80, 0x80, 0x80, 0x08, 1, 0];
        assert_eq!(Sketch::decode(&far), Err(CorruptSketch));
    }

    fn distribution() -> impl Strategy<Value = Vec<f64>> {
        prop_oneof![
            proptest::collection::vec(0.001f64..10_000.0, 1..600),
            proptest::collection::vec(-1_000.0f64..1_000.0, 1..600),
            // Log-normal-like latencies: exp of a uniform spread.
            proptest::collection::vec((0.0f64..12.0).prop_map(f64::exp), 1..600),
        ]
    }

    proptest! {
        #[test]
        fn quantiles_within_one_percent(mut values in distribution(), q in 0.0f64..=1.0) {
            let s = sketch_of(&values);
            values.sort_by(f64::total_cmp);
            let truth = exact(&values, q);
            let got = s.quantile(q).unwrap();
            prop_assert!(within(got, truth) || truth.abs() < MIN_INDEXABLE, "q={} got {} truth {}", q, got, truth);
        }

        #[test]
        fn merge_equals_sketch_of_union(a in distribution(), b in distribution()) {
            let mut merged = sketch_of(&a);
            merged.merge(&sketch_of(&b));
            let union: Vec<f64> = a.iter().chain(&b).copied().collect();
            prop_assert_eq!(merged, sketch_of(&union));
        }

        #[test]
        fn merge_is_associative_and_commutative(a in distribution(), b in distribution(), c in distribution()) {
            let (sa, sb, sc) = (sketch_of(&a), sketch_of(&b), sketch_of(&c));
            let mut left = sa.clone();
            left.merge(&sb);
            left.merge(&sc);
            let mut bc = sb.clone();
            bc.merge(&sc);
            let mut right = sa.clone();
            right.merge(&bc);
            prop_assert_eq!(&left, &right);
            let mut reversed = sc.clone();
            reversed.merge(&sb);
            reversed.merge(&sa);
            prop_assert_eq!(left, reversed);
        }

        #[test]
        fn quantiles_in_one_walk_match_single_quantiles(values in distribution()) {
            let s = sketch_of(&values);
            let [a, b, c] = s.quantiles([0.5, 0.95, 0.99]);
            prop_assert_eq!((a, b, c), (s.quantile(0.5), s.quantile(0.95), s.quantile(0.99)));
        }

        #[test]
        fn encode_round_trips(values in distribution()) {
            let s = sketch_of(&values);
            prop_assert_eq!(Sketch::decode(&s.encode()).unwrap(), s);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Sketch::decode(&bytes);
        }
    }
}
