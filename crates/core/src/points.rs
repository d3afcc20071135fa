//! Turning stored rollup buckets into chart points: merging source buckets into the
//! period's resolution (5-minute points from minutes, 6-hour points from hours) and the
//! per-kind statistics of each point.

use crate::rollup::{BucketStats, counter_step};

/// Merges buckets (sorted by start) into `count` points of width `step` from `from`.
/// Buckets before `from` are ignored; a point without buckets is `None`, a gap.
pub fn bucketize(
    buckets: impl IntoIterator<Item = (i64, BucketStats)>,
    from: i64,
    step: i64,
    count: usize,
) -> Vec<Option<BucketStats>> {
    let mut points: Vec<Option<BucketStats>> = vec![None; count];
    for (start, stats) in buckets {
        if start < from {
            continue;
        }
        let i = ((start - from) / step) as usize;
        let Some(slot) = points.get_mut(i) else { continue };
        match slot {
            Some(point) => point.merge_next(&stats),
            None => *slot = Some(stats),
        }
    }
    points
}

/// The counter increase of each point: the increase inside it plus the step from the
/// previous non-empty point (or `seed`, the last bucket before the window) to its first
/// sample, reset-aware.
pub fn counter_increases(points: &[Option<BucketStats>], seed: Option<&BucketStats>) -> Vec<Option<f64>> {
    let mut previous_last = seed.map(|s| s.last);
    points
        .iter()
        .map(|p| {
            p.as_ref().map(|p| {
                let boundary = previous_last.map_or(0.0, |last| counter_step(last, p.first));
                previous_last = Some(p.last);
                p.increase + boundary
            })
        })
        .collect()
}

/// Combines the points of several series that share timestamps (e.g. one metric with
/// several tag sets): counts, sums, extremes and sketches add up; `last` is the sum of
/// each series' last value, the total of a gauge split by tags.
pub fn combine_parallel(into: &mut Option<BucketStats>, other: &BucketStats) {
    match into {
        None => *into = Some(other.clone()),
        Some(acc) => {
            acc.count += other.count;
            acc.sum += other.sum;
            acc.min = acc.min.min(other.min);
            acc.max = acc.max.max(other.max);
            acc.last += other.last;
            acc.increase += other.increase;
            match (&mut acc.sketch, &other.sketch) {
                (Some(mine), Some(theirs)) => mine.merge(theirs),
                (None, Some(theirs)) => acc.sketch = Some(theirs.clone()),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Kind;

    fn gauge(ts: i64, values: &[f64]) -> (i64, BucketStats) {
        (
            ts,
            BucketStats::fold(Kind::Gauge, values.iter().map(|v| (ts, *v))).unwrap(),
        )
    }

    #[test]
    fn merges_source_buckets_into_points_with_gaps() {
        // Minutes 0..10 merged into 5-minute points; minute 3 and the second point's
        // minutes 5..9 hold data, the third point is empty.
        let buckets = vec![
            gauge(-60_000, &[99.0]),
            gauge(0, &[1.0]),
            gauge(180_000, &[3.0, 5.0]),
            gauge(300_000, &[7.0]),
        ];
        let points = bucketize(buckets, 0, 300_000, 3);
        let p0 = points[0].as_ref().unwrap();
        assert_eq!((p0.count, p0.sum, p0.min, p0.max, p0.last), (3, 9.0, 1.0, 5.0, 5.0));
        assert_eq!(points[1].as_ref().unwrap().count, 1);
        assert!(points[2].is_none());
    }

    #[test]
    fn counter_increases_span_boundaries_and_resets() {
        let c = |ts: i64, v: &[f64]| {
            (
                ts,
                BucketStats::fold(Kind::Counter, v.iter().map(|x| (ts, *x))).unwrap(),
            )
        };
        let seed = c(-60_000, &[100.0]).1;
        let buckets = vec![c(0, &[110.0, 120.0]), c(60_000, &[5.0]), c(180_000, &[9.0])];
        let points = bucketize(buckets, 0, 60_000, 4);
        // 100→110→120: 20; restart to 5: 5; gap; 5→9: 4.
        assert_eq!(
            counter_increases(&points, Some(&seed)),
            vec![Some(20.0), Some(5.0), None, Some(4.0)]
        );
        assert_eq!(
            counter_increases(&points, None),
            vec![Some(10.0), Some(5.0), None, Some(4.0)]
        );
    }

    #[test]
    fn parallel_combination_adds_up() {
        let mut acc = None;
        combine_parallel(&mut acc, &gauge(0, &[1.0, 3.0]).1);
        combine_parallel(&mut acc, &gauge(0, &[10.0]).1);
        let acc = acc.unwrap();
        assert_eq!(
            (acc.count, acc.sum, acc.min, acc.max, acc.last),
            (3, 14.0, 1.0, 10.0, 13.0)
        );
    }
}
