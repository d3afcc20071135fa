//! Rollup math: what one bucket (a minute, an hour, a day) remembers of a series, how
//! it is folded from raw samples, and how consecutive buckets merge.
//!
//! Count, sum, min and max are exact. Percentiles come from a [`Sketch`] (histograms
//! only). Counters keep the increase inside the bucket plus their first and last value,
//! so merging consecutive buckets adds the step across the boundary; a drop means the
//! counter restarted, and the new run counts from zero (Prometheus' `increase` rule).

use crate::model::Kind;
use crate::sketch::Sketch;

/// Granularity of stored rollups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Level {
    Minute,
    Hour,
    Day,
}

impl Level {
    pub const ALL: [Level; 3] = [Level::Minute, Level::Hour, Level::Day];

    pub fn bucket_ms(self) -> i64 {
        match self {
            Level::Minute => 60_000,
            Level::Hour => 3_600_000,
            Level::Day => 86_400_000,
        }
    }

    /// The level whose buckets are built from this one's.
    pub fn parent(self) -> Option<Level> {
        match self {
            Level::Minute => Some(Level::Hour),
            Level::Hour => Some(Level::Day),
            Level::Day => None,
        }
    }

    /// The level this one's buckets are built from (`None` for minutes: raw samples).
    pub fn child(self) -> Option<Level> {
        match self {
            Level::Minute => None,
            Level::Hour => Some(Level::Minute),
            Level::Day => Some(Level::Hour),
        }
    }

    pub fn as_i64(self) -> i64 {
        match self {
            Level::Minute => 0,
            Level::Hour => 1,
            Level::Day => 2,
        }
    }

    pub fn from_i64(v: i64) -> Option<Level> {
        Level::ALL.into_iter().find(|l| l.as_i64() == v)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Level::Minute => "minute",
            Level::Hour => "hour",
            Level::Day => "day",
        }
    }
}

/// Start of the bucket of width `step` that contains `ts` (epoch-aligned, UTC).
/// Saturates at `i64::MIN`, so an open lower bound aligns to itself.
pub fn align(ts: i64, step: i64) -> i64 {
    ts.saturating_sub(ts.rem_euclid(step))
}

/// The increase from `previous` to `next` of a cumulative counter: a drop is a restart.
pub fn counter_step(previous: f64, next: f64) -> f64 {
    if next >= previous { next - previous } else { next }
}

/// Everything a bucket keeps about one series.
#[derive(Debug, Clone, PartialEq)]
pub struct BucketStats {
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    pub first: f64,
    pub first_ts: i64,
    pub last: f64,
    pub last_ts: i64,
    /// Counter increase between samples inside the bucket (reset-aware).
    pub increase: f64,
    /// Histograms only.
    pub sketch: Option<Sketch>,
}

impl BucketStats {
    /// Folds samples of one series, in (timestamp, seq) order.
    pub fn fold(kind: Kind, samples: impl IntoIterator<Item = (i64, f64)>) -> Option<BucketStats> {
        let mut iter = samples.into_iter();
        let (ts, value) = iter.next()?;
        let mut stats = BucketStats {
            count: 1,
            sum: value,
            min: value,
            max: value,
            first: value,
            first_ts: ts,
            last: value,
            last_ts: ts,
            increase: 0.0,
            sketch: (kind == Kind::Histogram).then(Sketch::new),
        };
        if let Some(s) = &mut stats.sketch {
            s.add(value);
        }
        for (ts, value) in iter {
            stats.push(ts, value);
        }
        Some(stats)
    }

    /// Folds samples written after the bucket was computed, wherever they fall in its
    /// span: the same bucket as folding every sample at once (sums up to float rounding).
    ///
    /// `tail` is every sample of the bucket from the earliest new one on, in (timestamp,
    /// seq) order, flagged `true` when new (not yet in the bucket); `before` is the
    /// bucket's last sample ahead of the tail, if it has one. The counter increase is
    /// corrected by the steps the new samples put into the chain between `before` and the
    /// bucket's end, so late samples cost a read of the tail, not of the whole bucket.
    pub fn splice(&mut self, before: Option<(i64, f64)>, tail: &[(i64, f64, bool)]) {
        let (mut old_prev, mut all_prev) = (before.map(|b| b.1), before.map(|b| b.1));
        let (mut old_steps, mut all_steps) = (0.0, 0.0);
        for &(_, value, new) in tail {
            if let Some(p) = all_prev {
                all_steps += counter_step(p, value);
            }
            all_prev = Some(value);
            if new {
                self.count += 1;
                self.sum += value;
                self.min = self.min.min(value);
                self.max = self.max.max(value);
                if let Some(s) = &mut self.sketch {
                    s.add(value);
                }
            } else {
                if let Some(p) = old_prev {
                    old_steps += counter_step(p, value);
                }
                old_prev = Some(value);
            }
        }
        self.increase += all_steps - old_steps;
        if let (None, Some(&(ts, value, _))) = (before, tail.first()) {
            self.first = value;
            self.first_ts = ts;
        }
        if let Some(&(ts, value, _)) = tail.last() {
            self.last = value;
            self.last_ts = ts;
        }
    }

    /// Adds a sample that comes after every sample already in the bucket.
    pub fn push(&mut self, ts: i64, value: f64) {
        self.count += 1;
        self.sum += value;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        // Tracked for every kind so folding and merging agree; only counters report it.
        self.increase += counter_step(self.last, value);
        self.last = value;
        self.last_ts = ts;
        if let Some(s) = &mut self.sketch {
            s.add(value);
        }
    }

    /// Appends the bucket that follows this one in time. For counters the step from this
    /// bucket's last value to the next bucket's first value is part of the increase.
    pub fn merge_next(&mut self, next: &BucketStats) {
        self.increase += next.increase + counter_step(self.last, next.first);
        self.count += next.count;
        self.sum += next.sum;
        self.min = self.min.min(next.min);
        self.max = self.max.max(next.max);
        self.last = next.last;
        self.last_ts = next.last_ts;
        match (&mut self.sketch, &next.sketch) {
            (Some(mine), Some(theirs)) => mine.merge(theirs),
            (None, Some(theirs)) => self.sketch = Some(theirs.clone()),
            _ => {}
        }
    }

    /// Merges buckets given oldest first.
    pub fn merge_all<'a>(buckets: impl IntoIterator<Item = &'a BucketStats>) -> Option<BucketStats> {
        let mut iter = buckets.into_iter();
        let mut merged = iter.next()?.clone();
        for next in iter {
            merged.merge_next(next);
        }
        Some(merged)
    }

    pub fn avg(&self) -> f64 {
        self.sum / self.count as f64
    }

    /// p50, p95 and p99 in one pass, clamped to the exact min and max.
    pub fn percentiles(&self) -> [Option<f64>; 3] {
        match &self.sketch {
            None => [None; 3],
            Some(s) => s
                .quantiles([0.50, 0.95, 0.99])
                .map(|v| v.map(|v| v.clamp(self.min, self.max))),
        }
    }

    /// A percentile from the sketch, clamped to the exact min and max.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        self.sketch.as_ref()?.quantile(q).map(|v| v.clamp(self.min, self.max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn counter_increase_survives_resets() {
        // 10 → 15 → 3 (restart) → 8: increase 5 + 3 + 5 = 13.
        let s = BucketStats::fold(Kind::Counter, [(1, 10.0), (2, 15.0), (3, 3.0), (4, 8.0)]).unwrap();
        assert_eq!(s.increase, 13.0);
        // Across buckets: [10, 15] then [3, 8] gives the same 13.
        let mut a = BucketStats::fold(Kind::Counter, [(1, 10.0), (2, 15.0)]).unwrap();
        let b = BucketStats::fold(Kind::Counter, [(3, 3.0), (4, 8.0)]).unwrap();
        a.merge_next(&b);
        assert_eq!(a.increase, 13.0);
        // A plain rise across the boundary counts once.
        let mut a = BucketStats::fold(Kind::Counter, [(1, 10.0)]).unwrap();
        a.merge_next(&BucketStats::fold(Kind::Counter, [(2, 12.0), (3, 20.0)]).unwrap());
        assert_eq!(a.increase, 10.0);
    }

    #[test]
    fn gauge_and_histogram_fields() {
        let g = BucketStats::fold(Kind::Gauge, [(1, 4.0), (2, 1.0), (3, 7.0), (4, 2.0)]).unwrap();
        assert_eq!(
            (g.count, g.sum, g.min, g.max, g.last, g.first),
            (4, 14.0, 1.0, 7.0, 2.0, 4.0)
        );
        assert!(g.sketch.is_none());
        let h = BucketStats::fold(Kind::Histogram, (1..=100).map(|i| (i, i as f64))).unwrap();
        assert!((h.quantile(0.5).unwrap() - 50.0).abs() <= 0.5);
        assert_eq!(h.quantile(1.0).unwrap(), 100.0);
        assert_eq!(BucketStats::fold(Kind::Gauge, []), None);
    }

    #[test]
    fn alignment() {
        assert_eq!(align(119_999, 60_000), 60_000);
        assert_eq!(align(-1, 60_000), -60_000);
        assert_eq!(Level::from_i64(Level::Day.as_i64()), Some(Level::Day));
    }

    /// Values on a 1/64 grid of bounded size add exactly in any order.
    fn grid_values() -> impl Strategy<Value = Vec<f64>> {
        proptest::collection::vec((-64_000i32..64_000).prop_map(|v| f64::from(v) / 64.0), 1..200)
    }

    fn buckets(values: &[f64], kind: Kind, start: i64) -> BucketStats {
        BucketStats::fold(kind, values.iter().enumerate().map(|(i, v)| (start + i as i64, *v))).unwrap()
    }

    proptest! {
        #[test]
        fn merging_consecutive_buckets_equals_folding_everything(
            a in grid_values(), b in grid_values(), c in grid_values(),
            kind in prop_oneof![Just(Kind::Gauge), Just(Kind::Counter), Just(Kind::Histogram)],
        ) {
            let (ba, bb, bc) = (buckets(&a, kind, 0), buckets(&b, kind, 1_000), buckets(&c, kind, 2_000));
            // (a + b) + c
            let mut left = ba.clone();
            left.merge_next(&bb);
            left.merge_next(&bc);
            // a + (b + c)
            let mut right_tail = bb.clone();
            right_tail.merge_next(&bc);
            let mut right = ba.clone();
            right.merge_next(&right_tail);
            prop_assert_eq!(&left, &right);
            // Both equal one fold over all samples: count and sum exact, sketch identical.
            let all: Vec<f64> = a.iter().chain(&b).chain(&c).copied().collect();
            let whole = BucketStats::fold(kind, a.iter().enumerate().map(|(i, v)| (i as i64, *v))
                .chain(b.iter().enumerate().map(|(i, v)| (1_000 + i as i64, *v)))
                .chain(c.iter().enumerate().map(|(i, v)| (2_000 + i as i64, *v)))).unwrap();
            prop_assert_eq!(left.count, all.len() as u64);
            prop_assert_eq!(left.sum, all.iter().sum::<f64>());
            prop_assert_eq!(&left, &whole);
        }

        #[test]
        fn splicing_new_samples_into_a_bucket_equals_folding_everything(
            samples in proptest::collection::vec((0i64..400, (-64_000i32..64_000).prop_map(|v| f64::from(v) / 64.0), any::<bool>()), 2..200),
            kind in prop_oneof![Just(Kind::Gauge), Just(Kind::Counter), Just(Kind::Histogram)],
        ) {
            // What an incremental minute pass does: samples at any timestamps, some stored
            // in the bucket already (false) and some written since (true), in (ts, seq)
            // order; the pass reads the tail from the earliest new one and the one
            // stored sample before it.
            let mut samples = samples;
            samples.sort_by_key(|s| s.0);
            prop_assume!(samples.iter().any(|s| !s.2) && samples.iter().any(|s| s.2));
            let old = BucketStats::fold(kind, samples.iter().filter(|s| !s.2).map(|s| (s.0, s.1))).unwrap();
            let start = samples.iter().position(|s| s.2).unwrap();
            let before = samples[..start].last().map(|s| (s.0, s.1));
            let mut spliced = old;
            spliced.splice(before, &samples[start..]);
            let whole = BucketStats::fold(kind, samples.iter().map(|s| (s.0, s.1))).unwrap();
            prop_assert_eq!(spliced, whole);
        }
    }
}
