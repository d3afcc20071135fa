//! Minute buckets kept up to date in memory by the SQLite writer as it commits samples,
//! so the rollup job does not read a busy minute back from its start at every pass.
//!
//! Without this, each pass re-read and re-folded the whole open minute of every marked
//! series: under sustained ingest the job's work per pass grew with the minute, and it
//! took about a fifth of the service's CPU. SQLite has one writer, so the writer sees
//! every sample as it commits it and can keep the bucket — when it knows it is complete:
//!
//! - An entry is *trusted* only if the minute held nothing when the writer first touched
//!   it (no dirty mark and no stored bucket: every sample ever written to a minute left
//!   one of the two until retention).
//! - Samples of several connections arrive slightly out of order, so an entry keeps its
//!   newest samples unsorted (up to [`TAIL_MAX`]) and folds the oldest half, in
//!   (timestamp, arrival) order, into its bucket when the tail is full; a gauge or
//!   counter value at a timestamp already in the tail replaces it, as reading runs
//!   does. A sample older than the folded part (or a rewrite of its last value) makes
//!   the entry untrusted for good, and the job reads that minute.
//! - The job uses an entry only when its generation is at least the mark's: the entry
//!   then holds every sample of the writes the mark names, and perhaps those of later
//!   writes, which logged the minute again (`mark_log`), so a later pass computes it once
//!   more. Writes go on while a pass reads, so an entry is usually a write or two ahead
//!   of the marks the pass settled. A mark newer than the entry — a write committed but
//!   not recorded yet, or a mark set by someone else, such as an operator's
//!   re-aggregation — falls back to reading.
//! - A commit by another connection (another process writing the same file) could add
//!   samples the writer never saw: SQLite's `data_version` tells, and the writer then
//!   forgets every entry.
//!
//! Entries of minutes well behind the newest written one are dropped; a dropped entry
//! only means the job reads that minute as before.

use std::collections::hash_map::Entry as MapEntry;

use rustc_hash::FxHashMap;

use mcp_metrics_core::model::Kind;
use mcp_metrics_core::rollup::{BucketStats, align};

use super::MINUTE;
/// Minutes older than the newest written one by more than this are forgotten.
const KEEP_MINUTES: i64 = 10;
/// Past this many entries (series × recent minutes) the older minutes are forgotten, and
/// if that is not enough all are: memory stays bounded whatever the cardinality, at the
/// price of reads.
const MAX_ENTRIES: usize = 100_000;
/// Past about this many unsorted samples in all tails together, every tail is folded
/// (16 bytes each: 16 MB).
const MAX_BUFFERED: usize = 1_000_000;
/// Unsorted samples an entry keeps before folding the oldest half: how far out of order
/// samples of one series may arrive (in samples) and still be kept.
pub const TAIL_MAX: usize = 512;

/// A minute of one series: `(minute start, series id)`.
pub type MinuteKey = (i64, i64);

/// Maps keyed by minute and series. The writer looks one up per sample it commits, and
/// SipHash was most of that cost. A client cannot steer a fast unkeyed hash of these keys
/// into long probe chains: series ids are assigned by the store, minutes are multiples of
/// 60,000 inside the accepted time window, and the map is capped at [`MAX_ENTRIES`].
pub type MinuteMap<V> = FxHashMap<MinuteKey, V>;

#[derive(Debug)]
struct Entry {
    kind: Kind,
    /// The oldest samples, folded; `None` before the first fold.
    folded: Option<BucketStats>,
    /// The newest samples as they arrived: (timestamp, value).
    tail: Vec<(i64, f64)>,
    /// False when the minute may hold samples this entry never saw.
    trusted: bool,
    /// Generation of the last write that touched this minute of this series.
    generation: i64,
    /// Samples recorded since a pass last took the bucket (for the job's telemetry).
    new_samples: u64,
}

impl Entry {
    fn distrust(&mut self) {
        self.trusted = false;
        self.folded = None;
        self.tail = Vec::new();
    }

    fn add(&mut self, ts: i64, value: f64, tail_max: usize) {
        if let Some(folded) = &self.folded
            && (ts < folded.last_ts || (ts == folded.last_ts && self.kind != Kind::Histogram))
        {
            return self.distrust();
        }
        self.tail.push((ts, value));
        if self.tail.len() >= tail_max {
            self.normalize_tail();
            let rest = self.tail.split_off(self.tail.len() / 2);
            let oldest = std::mem::replace(&mut self.tail, rest);
            self.folded = fold_onto(self.folded.take(), self.kind, &oldest);
        }
    }

    /// Folds the whole tail: a sample that arrives later behind it makes the entry
    /// untrusted, so this is for minutes that are done or when memory is short.
    fn fold_tail(&mut self) {
        if self.tail.is_empty() {
            return;
        }
        self.normalize_tail();
        self.folded = fold_onto(self.folded.take(), self.kind, &self.tail);
        self.tail = Vec::new();
    }

    /// Sorts the tail by timestamp, keeping arrival order among equal ones (a
    /// histogram's `seq`), and keeps only the last gauge or counter value of a timestamp.
    fn normalize_tail(&mut self) {
        // Mostly in order already (one connection's samples of a series are).
        if !self.tail.is_sorted_by_key(|s| s.0) {
            self.tail.sort_by_key(|s| s.0);
        }
        if self.kind != Kind::Histogram {
            let mut kept = 0;
            for i in 0..self.tail.len() {
                if kept > 0 && self.tail[kept - 1].0 == self.tail[i].0 {
                    self.tail[kept - 1] = self.tail[i];
                } else {
                    self.tail[kept] = self.tail[i];
                    kept += 1;
                }
            }
            self.tail.truncate(kept);
        }
    }
}

/// Pushes samples (in order, all after the bucket's last) onto a bucket.
fn fold_onto(bucket: Option<BucketStats>, kind: Kind, samples: &[(i64, f64)]) -> Option<BucketStats> {
    match bucket {
        None => BucketStats::fold(kind, samples.iter().copied()),
        Some(mut bucket) => {
            samples.iter().for_each(|&(ts, value)| bucket.push(ts, value));
            Some(bucket)
        }
    }
}

#[derive(Debug)]
pub struct KeptMinutes {
    entries: MinuteMap<Entry>,
    /// The writer connection's `PRAGMA data_version` in its last write (its own commits
    /// do not change it).
    data_version: Option<i64>,
    newest_minute: i64,
    /// Samples added to tails since the tails were last counted (an upper bound of what
    /// they hold).
    buffered: usize,
    /// [`TAIL_MAX`], [`MAX_ENTRIES`] and [`MAX_BUFFERED`]; smaller in tests so they
    /// reach every path.
    tail_max: usize,
    max_entries: usize,
    max_buffered: usize,
}

impl Default for KeptMinutes {
    fn default() -> Self {
        KeptMinutes {
            entries: MinuteMap::default(),
            data_version: None,
            newest_minute: i64::MIN,
            buffered: 0,
            tail_max: TAIL_MAX,
            max_entries: MAX_ENTRIES,
            max_buffered: MAX_BUFFERED,
        }
    }
}

impl KeptMinutes {
    /// Called in each write transaction with the writer connection's `data_version`: a
    /// change means another connection committed, so every entry is forgotten.
    pub fn observe_data_version(&mut self, version: i64) {
        if self.data_version.is_some_and(|v| v != version) {
            self.forget_all();
        }
        self.data_version = Some(version);
    }

    pub fn forget_all(&mut self) {
        self.entries.clear();
    }

    /// Of these minutes, the ones without an entry: the writer checks inside its
    /// transaction whether each held nothing before it.
    pub fn unknown(&self, keys: &[MinuteKey]) -> Vec<MinuteKey> {
        keys.iter().filter(|k| !self.entries.contains_key(k)).copied().collect()
    }

    /// After a commit: records the write's samples as `(series, ts, kind, value)`, each
    /// series' in arrival order. `was_empty` answers, for each minute
    /// [`unknown`](Self::unknown) returned, whether it held nothing before.
    pub fn record(
        &mut self,
        generation: i64,
        was_empty: &MinuteMap<bool>,
        rows: impl IntoIterator<Item = (i64, i64, Kind, f64)>,
    ) {
        let newest_before = self.newest_minute;
        let mut rows = rows.into_iter().peekable();
        while let Some((series_id, ts, kind, value)) = rows.next() {
            let key = (align(ts, MINUTE), series_id);
            self.newest_minute = self.newest_minute.max(key.0);
            let entry = match self.entries.entry(key) {
                MapEntry::Occupied(e) => e.into_mut(),
                MapEntry::Vacant(v) => v.insert(Entry {
                    kind,
                    folded: None,
                    tail: Vec::new(),
                    trusted: was_empty.get(&key).copied().unwrap_or(false),
                    generation,
                    new_samples: 0,
                }),
            };
            entry.generation = generation;
            // Samples of one series and minute mostly come together: one lookup for them.
            let minute = key.0..key.0.saturating_add(MINUTE);
            let same_entry = std::iter::from_fn(|| rows.next_if(|&(s, t, _, _)| s == series_id && minute.contains(&t)));
            for (_, ts, kind, value) in std::iter::once((series_id, ts, kind, value)).chain(same_entry) {
                if entry.trusted && entry.kind != kind {
                    // Rows of two kinds in one series (the store prevents it): fold nothing.
                    entry.distrust();
                }
                if entry.trusted {
                    entry.add(ts, value, self.tail_max);
                    entry.new_samples += 1;
                    self.buffered += 1;
                }
            }
        }
        if self.newest_minute > newest_before {
            // A new minute started: forget minutes too old to matter, and fold the tails
            // of all but the last two (late samples to them are rare; slow series would
            // otherwise keep every sample of their minutes).
            let horizon = self.newest_minute - KEEP_MINUTES * MINUTE;
            let settled = self.newest_minute - MINUTE;
            self.entries.retain(|&(minute, _), _| minute >= horizon);
            for (&(minute, _), entry) in self.entries.iter_mut() {
                if minute < settled {
                    entry.fold_tail();
                }
            }
            self.buffered = self.tail_samples();
        }
        if self.entries.len() > self.max_entries {
            let newest = self.newest_minute;
            self.entries.retain(|&(minute, _), _| minute >= newest);
            if self.entries.len() > self.max_entries {
                self.forget_all();
            }
            self.buffered = self.tail_samples();
        }
        if self.buffered > self.max_buffered {
            self.buffered = self.tail_samples();
            if self.buffered > self.max_buffered {
                self.entries.values_mut().for_each(Entry::fold_tail);
                self.buffered = 0;
            }
        }
    }

    fn tail_samples(&self) -> usize {
        self.entries.values().map(|e| e.tail.len()).sum()
    }

    /// The complete bucket of a marked minute, if this cache holds at least what the
    /// mark's generation names; with the samples it gained since a pass last took it.
    pub fn take(&mut self, key: MinuteKey, generation: i64) -> Option<(BucketStats, u64)> {
        let entry = self.entries.get_mut(&key)?;
        if !entry.trusted || entry.generation < generation {
            return None;
        }
        entry.normalize_tail();
        let bucket = fold_onto(entry.folded.clone(), entry.kind, &entry.tail)?;
        Some((bucket, std::mem::take(&mut entry.new_samples)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const M: i64 = 1_750_000_020 * 1000 / MINUTE * MINUTE;

    /// A model of the raw table: per (minute, series) the samples in (ts, seq) order,
    /// with a gauge or counter value at an existing timestamp replacing the old one.
    #[derive(Default)]
    struct Table(std::collections::HashMap<MinuteKey, Vec<(i64, f64)>>);

    impl Table {
        fn write(&mut self, rows: &[(i64, i64, Kind, f64)]) {
            for &(series, ts, kind, value) in rows {
                let samples = self.0.entry((align(ts, MINUTE), series)).or_default();
                let at = samples.partition_point(|s| s.0 <= ts);
                if kind != Kind::Histogram && at > 0 && samples[at - 1].0 == ts {
                    samples[at - 1].1 = value;
                } else {
                    samples.insert(at, (ts, value));
                }
            }
        }

        fn bucket(&self, key: MinuteKey, kind: Kind) -> Option<BucketStats> {
            BucketStats::fold(kind, self.0.get(&key)?.iter().copied())
        }
    }

    /// Writes like the store does: the kept minutes get the rows as the writer's runs
    /// hand them over (grouped by series), the model table in arrival order, so a
    /// grouping that reordered a series' samples would show; checked minutes are empty
    /// unless the table already has them.
    fn write(kept: &mut KeptMinutes, table: &mut Table, generation: i64, rows: Vec<(i64, i64, Kind, f64)>) {
        let mut runs = crate::sqlite::raw::PendingRuns::default();
        for &(series, ts, kind, value) in &rows {
            runs.push("s", series, ts, kind, value);
        }
        runs.group_by_series();
        let was_empty = kept
            .unknown(&runs.minutes())
            .into_iter()
            .map(|k| (k, !table.0.contains_key(&k)))
            .collect();
        table.write(&rows);
        kept.record(generation, &was_empty, runs.rows());
    }

    #[test]
    fn in_order_writes_keep_the_whole_bucket() {
        let (mut kept, mut table) = (KeptMinutes::default(), Table::default());
        write(
            &mut kept,
            &mut table,
            1,
            vec![(7, M + 10, Kind::Counter, 5.0), (7, M + 20, Kind::Counter, 9.0)],
        );
        write(&mut kept, &mut table, 2, vec![(7, M + 30, Kind::Counter, 2.0)]);
        let (bucket, new) = kept.take((M, 7), 2).expect("kept");
        assert_eq!(Some(bucket), table.bucket((M, 7), Kind::Counter));
        assert_eq!(new, 3);
        assert_eq!(kept.take((M, 7), 2).map(|(_, n)| n), Some(0), "counted once");
        assert!(kept.take((M, 7), 1).is_some(), "an older mark takes the newer bucket");
        assert!(kept.take((M, 7), 3).is_none(), "a newer mark is read, not taken");
        assert!(kept.take((M, 8), 2).is_none());
    }

    #[test]
    fn out_of_order_and_rewritten_samples_in_the_tail_are_kept() {
        let (mut kept, mut table) = (KeptMinutes::default(), Table::default());
        write(&mut kept, &mut table, 1, vec![(1, M + 20, Kind::Counter, 10.0)]);
        write(
            &mut kept,
            &mut table,
            2,
            vec![(1, M + 10, Kind::Counter, 4.0), (1, M + 20, Kind::Counter, 12.0)],
        );
        let (bucket, new) = kept.take((M, 1), 2).expect("kept");
        assert_eq!(Some(bucket.clone()), table.bucket((M, 1), Kind::Counter));
        assert_eq!(
            (bucket.count, bucket.first, bucket.last, bucket.increase, new),
            (2, 4.0, 12.0, 8.0, 3)
        );

        write(&mut kept, &mut table, 3, vec![(3, M + 20, Kind::Histogram, 1.0)]);
        write(&mut kept, &mut table, 4, vec![(3, M + 20, Kind::Histogram, 4.0)]);
        let (bucket, _) = kept.take((M, 3), 4).expect("a second observation in the same ms");
        assert_eq!(Some(bucket), table.bucket((M, 3), Kind::Histogram));
    }

    #[test]
    fn samples_older_than_the_folded_part_or_history_are_read_instead() {
        let mut kept = KeptMinutes {
            tail_max: 4,
            ..Default::default()
        };
        let mut table = Table::default();
        // Four samples fill the tail: the oldest two (up to M + 20) are folded.
        let rows = (1..=4).map(|i| (1, M + i * 10, Kind::Gauge, i as f64)).collect();
        write(&mut kept, &mut table, 1, rows);
        assert_eq!(kept.take((M, 1), 1).map(|(b, _)| b), table.bucket((M, 1), Kind::Gauge));
        write(&mut kept, &mut table, 2, vec![(1, M + 25, Kind::Gauge, 9.0)]);
        assert!(kept.take((M, 1), 2).is_some(), "after the folded part: kept");
        write(&mut kept, &mut table, 3, vec![(1, M + 20, Kind::Gauge, 9.0)]);
        assert!(kept.take((M, 1), 3).is_none(), "rewrites the folded part's last value");
        write(&mut kept, &mut table, 4, vec![(1, M + 50, Kind::Gauge, 1.0)]);
        assert!(kept.take((M, 1), 4).is_none(), "untrusted for good");

        let rows = (1..=4).map(|i| (2, M + i * 10, Kind::Histogram, i as f64)).collect();
        write(&mut kept, &mut table, 5, rows);
        write(&mut kept, &mut table, 6, vec![(2, M + 20, Kind::Histogram, 7.0)]);
        assert!(
            kept.take((M, 2), 6).is_some(),
            "a histogram may share the last folded ms"
        );
        write(&mut kept, &mut table, 7, vec![(2, M + 15, Kind::Histogram, 7.0)]);
        assert!(kept.take((M, 2), 7).is_none(), "older than the folded part");

        // A minute that held samples before the writer saw it.
        table.write(&[(4, M + 5, Kind::Gauge, 1.0)]);
        write(&mut kept, &mut table, 8, vec![(4, M + 20, Kind::Gauge, 2.0)]);
        assert!(kept.take((M, 4), 8).is_none());
    }

    #[test]
    fn another_connection_committing_forgets_everything() {
        let (mut kept, mut table) = (KeptMinutes::default(), Table::default());
        kept.observe_data_version(1);
        write(&mut kept, &mut table, 1, vec![(1, M + 20, Kind::Gauge, 1.0)]);
        kept.observe_data_version(1);
        assert!(kept.take((M, 1), 1).is_some());
        kept.observe_data_version(2);
        assert!(kept.take((M, 1), 1).is_none());
    }

    #[test]
    fn old_minutes_are_forgotten() {
        let (mut kept, mut table) = (KeptMinutes::default(), Table::default());
        write(&mut kept, &mut table, 1, vec![(1, M, Kind::Gauge, 1.0)]);
        write(
            &mut kept,
            &mut table,
            2,
            vec![(1, M + KEEP_MINUTES * MINUTE, Kind::Gauge, 1.0)],
        );
        assert!(kept.take((M, 1), 1).is_some(), "still within reach");
        write(
            &mut kept,
            &mut table,
            3,
            vec![(1, M + (KEEP_MINUTES + 1) * MINUTE, Kind::Gauge, 1.0)],
        );
        assert!(kept.take((M, 1), 1).is_none());
        assert_eq!(kept.entries.len(), 2);
    }

    #[test]
    fn memory_stays_bounded_and_buckets_exact() {
        let mut kept = KeptMinutes {
            max_entries: 4,
            max_buffered: 10,
            ..Default::default()
        };
        let mut table = Table::default();
        // One slow series over three minutes: the first minute's tail is folded when the
        // third starts.
        for (g, t) in [0, 20_000, 40_000, 60_000, 80_000, 120_000].into_iter().enumerate() {
            write(
                &mut kept,
                &mut table,
                g as i64 + 1,
                vec![(1, M + t, Kind::Gauge, t as f64)],
            );
        }
        assert!(kept.entries[&(M, 1)].tail.is_empty());
        assert_eq!(
            kept.entries[&(M + MINUTE, 1)].tail.len(),
            2,
            "the previous minute keeps its tail"
        );
        // Many samples: the tails together stay under the limit.
        let rows = (0..30)
            .map(|i| (1 + i % 3, M + 120_000 + i, Kind::Gauge, i as f64))
            .collect();
        write(&mut kept, &mut table, 7, rows);
        assert!(kept.tail_samples() <= 10, "{} buffered", kept.tail_samples());
        for series in 1..=3 {
            let key = (M + 2 * MINUTE, series);
            assert_eq!(kept.take(key, 7).map(|(b, _)| b), table.bucket(key, Kind::Gauge));
        }
        // Many series: older minutes go first, then everything.
        assert!(kept.entries.len() <= 4);
        let rows = (10..20).map(|i| (i, M + 120_500, Kind::Gauge, 1.0)).collect();
        write(&mut kept, &mut table, 8, rows);
        assert!(kept.entries.len() <= 4, "{} entries", kept.entries.len());
    }

    fn kind_of(series: i64) -> Kind {
        [Kind::Gauge, Kind::Counter, Kind::Histogram][series as usize % 3]
    }

    proptest! {
        /// Whatever arrives in whatever order, under any limits, a bucket the cache hands
        /// out equals the bucket folded from the table; in-order traffic is always kept
        /// when no entry has to be dropped for room.
        #[test]
        fn a_kept_bucket_is_the_folded_bucket(
            batches in proptest::collection::vec(
                // Few distinct timestamps, so values at the same one are common.
                proptest::collection::vec((0i64..3, 0i64..30, -5.0f64..100.0), 1..20),
                1..12,
            ),
            in_order in any::<bool>(),
            tail_max in 2usize..40,
            max_entries in 1usize..20,
            max_buffered in 1usize..60,
        ) {
            let mut kept = KeptMinutes { tail_max, max_entries, max_buffered, ..Default::default() };
            let mut table = Table::default();
            let mut all: Vec<(i64, i64, Kind, f64)> = batches
                .iter()
                .flatten()
                .map(|&(series, step, value)| (series, M + step * 5_000, kind_of(series), value.max(0.0)))
                .collect();
            if in_order {
                all.sort_by_key(|r| (r.1, r.0));
                all.dedup_by_key(|r| (r.0, r.1));
            }
            let mut rest = &all[..];
            let mut generation = 0;
            for batch in &batches {
                let (now, later) = rest.split_at(batch.len().min(rest.len()));
                rest = later;
                generation += 1;
                write(&mut kept, &mut table, generation, now.to_vec());
                for &key in table.0.keys() {
                    if let Some((bucket, _)) = kept.take(key, generation) {
                        prop_assert_eq!(Some(bucket), table.bucket(key, kind_of(key.1)));
                    } else if in_order
                        // 3 series × 3 minutes: no entry is dropped for room.
                        && max_entries >= 9
                        && now.iter().any(|r| (align(r.1, MINUTE), r.0) == key)
                    {
                        prop_assert!(false, "in-order minute {:?} was not kept", key);
                    }
                }
            }
        }
    }
}
