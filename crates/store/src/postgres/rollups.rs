//! SQL of the rollup tables on PostgreSQL: dirty buckets with their inputs read from one
//! REPEATABLE READ snapshot, recomputed buckets written with the generation check, and
//! retention (raw data by dropping whole day partitions).
//!
//! A minute with a stored bucket is never folded again from its start while its marks
//! name the writes it has not seen: their own buckets are merged when they follow it in
//! time (`RollupInput::Merge`, no sample read), otherwise the new samples are spliced in
//! from the earliest one on (`RollupInput::Splice`, new rows told apart by `xmin`).
//!
//! Statements take arrays (`unnest`) instead of one round trip per mark: a pass handles
//! thousands of marks and the database is across a socket, not in-process.

use std::collections::{HashMap, HashSet};

use mcp_metrics_core::model::Kind;
use mcp_metrics_core::rollup::{BucketStats, Level, align};
use mcp_metrics_core::sketch::Sketch;
use tokio_postgres::{IsolationLevel, Row};

use super::{PgResult, PoolClient, partitions, pipeline};
use crate::{DirtyMark, RollupInput, RollupRow, RollupWork};

pub fn table(level: Level) -> &'static str {
    match level {
        Level::Minute => "rollups_1m",
        Level::Hour => "rollups_1h",
        Level::Day => "server_metrics_daily",
    }
}

pub const STATS_COLUMNS: &str = "count, sum, min, max, first, first_ts, last, last_ts, increase, sketch";

fn level_code(level: Level) -> i16 {
    level.as_i64() as i16
}

/// Reads the ten stats columns starting at `at`. A sketch that does not decode is
/// dropped rather than failing the whole read (the other figures stay exact).
fn stats_from_row(r: &Row, at: usize) -> BucketStats {
    let count: i64 = r.get(at);
    let sketch: Option<&[u8]> = r.get(at + 9);
    BucketStats {
        count: count as u64,
        sum: r.get(at + 1),
        min: r.get(at + 2),
        max: r.get(at + 3),
        first: r.get(at + 4),
        first_ts: r.get(at + 5),
        last: r.get(at + 6),
        last_ts: r.get(at + 7),
        increase: r.get(at + 8),
        sketch: sketch.and_then(|b| Sketch::decode(b).ok()),
    }
}

/// Moves the minutes that writes logged into minute marks, each with a new generation,
/// the earliest new sample and the ids of the writes not folded yet. Runs in the pass's
/// snapshot: the DELETE removes exactly the log rows that snapshot sees, so the marks
/// name every write whose samples the pass can see and the stored buckets do not hold;
/// rows of writes still in flight stay for the next pass.
async fn absorb_log(client: &tokio_postgres::Transaction<'_>) -> PgResult<u64> {
    client
        .execute(
            "WITH moved AS (DELETE FROM rollup_log RETURNING xid, bucket, series_ids, min_ts),
                  g AS MATERIALIZED (SELECT nextval('rollup_generation') AS generation)
             INSERT INTO rollup_dirty (level, bucket, series_id, generation, min_ts, xids)
             SELECT 0::smallint, m.bucket, u.series_id, min(g.generation),
                    CASE WHEN bool_or(u.min_ts IS NULL) THEN NULL ELSE min(u.min_ts) END,
                    array_agg(DISTINCT m.xid)
             FROM moved m CROSS JOIN LATERAL unnest(m.series_ids, m.min_ts) AS u(series_id, min_ts), g
             GROUP BY m.bucket, u.series_id
             ON CONFLICT (level, bucket, series_id) DO UPDATE SET generation = EXCLUDED.generation,
                 min_ts = CASE WHEN rollup_dirty.min_ts IS NULL OR EXCLUDED.min_ts IS NULL THEN NULL
                               ELSE LEAST(rollup_dirty.min_ts, EXCLUDED.min_ts) END,
                 xids = rollup_dirty.xids || EXCLUDED.xids",
            &[],
        )
        .await
}

/// A minute mark with what its pass needs to splice the new samples in.
struct Pending {
    /// The earliest new sample.
    min_ts: i64,
    /// Low 32 bits of the writes not folded yet (the xmin of their rows).
    xids: HashSet<i64>,
}

/// A (minute, series).
type Key = (i64, i64);
type Tx<'a> = tokio_postgres::Transaction<'a>;

pub async fn work(client: &mut PoolClient, level: Level, max_marks: usize) -> PgResult<RollupWork> {
    // One snapshot for moving the log, reading the marks and the data they are rebuilt
    // from, so the marks' write ids are exactly the visible writes not folded yet.
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .start()
        .await?;
    if level == Level::Minute {
        absorb_log(&tx).await?;
    }
    let (marks, pending) = read_marks(&tx, level, max_marks).await?;
    let items = match level.child() {
        None => minute_inputs(&tx, &marks, pending).await?,
        Some(child) => child_inputs(&tx, level, child, &marks).await?,
    };
    let series = series_of(&tx, &items).await?;
    tx.commit().await?;
    Ok(RollupWork { items, series })
}

/// The first `max_marks` marks of a level, and of minute marks the new writes they name.
async fn read_marks(tx: &Tx<'_>, level: Level, max_marks: usize) -> PgResult<(Vec<DirtyMark>, HashMap<Key, Pending>)> {
    let rows = tx
        .query(
            "SELECT bucket, series_id, generation, min_ts, xids FROM rollup_dirty WHERE level = $1
             ORDER BY bucket, series_id LIMIT $2",
            &[&level_code(level), &(max_marks as i64)],
        )
        .await?;
    let marks = rows
        .iter()
        .map(|r| DirtyMark {
            level,
            bucket: r.get(0),
            series_id: r.get(1),
            generation: r.get(2),
        })
        .collect();
    let pending = rows
        .iter()
        .filter_map(|r| {
            let min_ts: Option<i64> = r.get(3);
            let xids: Option<Vec<Option<i64>>> = r.get(4);
            let xids: Option<HashSet<i64>> = xids.and_then(|x| x.into_iter().collect());
            match (min_ts, xids) {
                (Some(min_ts), Some(xids)) => Some(((r.get(0), r.get(1)), Pending { min_ts, xids })),
                _ => None,
            }
        })
        .collect();
    Ok((marks, pending))
}

/// Inputs of minute marks: merged from the pending writes' own buckets when they follow
/// the stored bucket in time, spliced from the earliest new sample when the minute has a
/// stored bucket and known new writes, folded again from its start otherwise.
async fn minute_inputs(
    tx: &Tx<'_>,
    marks: &[DirtyMark],
    pending: HashMap<Key, Pending>,
) -> PgResult<Vec<(DirtyMark, RollupInput)>> {
    let mut stored = stored_minutes(tx, &pending).await?;
    let written = take_partials(tx, marks).await?;
    let mut merged = mergeable(&pending, &stored, written);
    let splice_at: HashMap<Key, i64> = stored
        .keys()
        .filter(|k| !merged.contains_key(k))
        .map(|k| (*k, pending[k].min_ts))
        .collect();
    let splice_from = |m: &DirtyMark| splice_at.get(&(m.bucket, m.series_id)).copied();
    // The stored sample just before the new ones: the bucket's last when they all come
    // after it, otherwise read.
    let late: Vec<(i64, i64, i64)> = marks
        .iter()
        .filter_map(|m| {
            let from = splice_from(m)?;
            (from <= stored[&(m.bucket, m.series_id)].last_ts).then_some((m.series_id, m.bucket, from))
        })
        .collect();
    let before = samples_before(tx, &late).await?;

    let mut items = Vec::with_capacity(marks.len());
    let mut to_read: Vec<DirtyMark> = Vec::with_capacity(marks.len() - merged.len());
    for mark in marks {
        let key = (mark.bucket, mark.series_id);
        match merged.remove(&key) {
            Some(writes) => {
                let base = stored.remove(&key).expect("merged minutes have a stored bucket");
                items.push((*mark, RollupInput::Merge { base, writes }));
            }
            None => to_read.push(*mark),
        }
    }
    let mut groups: Vec<&[DirtyMark]> = Vec::new();
    let mut rest = &to_read[..];
    while let Some(first) = rest.first() {
        let n = rest.iter().position(|m| m.bucket != first.bucket).unwrap_or(rest.len());
        groups.push(&rest[..n]);
        rest = &rest[n..];
    }
    let scans = scan_minutes(tx, &groups, &splice_from).await?;
    for (group, mut by_series) in groups.iter().zip(scans) {
        for mark in group.iter() {
            let samples = by_series.remove(&mark.series_id).unwrap_or_default();
            let key = (mark.bucket, mark.series_id);
            let input = match (splice_from(mark), stored.remove(&key)) {
                (Some(from), Some(base)) => {
                    let xids = &pending[&key].xids;
                    let before = if from > base.last_ts {
                        Some((base.last_ts, base.last))
                    } else {
                        before.get(&key).copied()
                    };
                    RollupInput::Splice {
                        base,
                        before,
                        tail: samples
                            .into_iter()
                            .filter(|s| s.0 >= from)
                            .map(|(ts, value, xid)| (ts, value, xids.contains(&xid)))
                            .collect(),
                    }
                }
                _ => RollupInput::Raw(samples.into_iter().map(|(ts, value, _)| (ts, value)).collect()),
            };
            items.push((*mark, input));
        }
    }
    Ok(items)
}

/// The stored buckets of minutes with known new writes.
async fn stored_minutes(tx: &Tx<'_>, pending: &HashMap<Key, Pending>) -> PgResult<HashMap<Key, BucketStats>> {
    let mut stored = HashMap::new();
    if pending.is_empty() {
        return Ok(stored);
    }
    let (buckets, ids): (Vec<i64>, Vec<i64>) = pending.keys().copied().unzip();
    for r in tx
        .query(
            &format!(
                "SELECT c.bucket, c.series_id, c.{} FROM unnest($1::bigint[], $2::bigint[]) AS m(bucket, series_id)
                 JOIN rollups_1m c ON c.series_id = m.series_id AND c.bucket = m.bucket",
                STATS_COLUMNS.replace(", ", ", c.")
            ),
            &[&buckets, &ids],
        )
        .await?
    {
        stored.insert((r.get(0), r.get(1)), stats_from_row(&r, 2));
    }
    Ok(stored)
}

/// The buckets the pending writes stored of their own samples, with their write ids,
/// taken for every mark of the pass (a minute folded from its samples needs none of
/// them again).
async fn take_partials(tx: &Tx<'_>, marks: &[DirtyMark]) -> PgResult<HashMap<Key, Vec<(i64, BucketStats)>>> {
    let mut written: HashMap<Key, Vec<(i64, BucketStats)>> = HashMap::new();
    if marks.is_empty() {
        return Ok(written);
    }
    let buckets: Vec<i64> = marks.iter().map(|m| m.bucket).collect();
    let ids: Vec<i64> = marks.iter().map(|m| m.series_id).collect();
    for r in tx
        .query(
            &format!(
                "DELETE FROM rollup_partials p USING unnest($1::bigint[], $2::bigint[]) AS m(bucket, series_id)
                 WHERE p.bucket = m.bucket AND p.series_id = m.series_id
                 RETURNING p.bucket, p.series_id, p.xid, p.{}",
                STATS_COLUMNS.replace(", ", ", p.")
            ),
            &[&buckets, &ids],
        )
        .await?
    {
        written
            .entry((r.get(0), r.get(1)))
            .or_default()
            .push((r.get(2), stats_from_row(&r, 3)));
    }
    Ok(written)
}

/// Minutes whose pending writes each come after the stored bucket and after one another,
/// with those writes' buckets in time order: merged without reading samples. A minute
/// misses out when any pending write's bucket is missing (lost in a crash, or taken by
/// an earlier pass).
fn mergeable(
    pending: &HashMap<Key, Pending>,
    stored: &HashMap<Key, BucketStats>,
    mut written: HashMap<Key, Vec<(i64, BucketStats)>>,
) -> HashMap<Key, Vec<BucketStats>> {
    let mut merged = HashMap::new();
    for (key, p) in pending {
        let (Some(base), Some(mut writes)) = (stored.get(key), written.remove(key)) else {
            continue;
        };
        if writes.len() != p.xids.len() || !writes.iter().all(|(xid, _)| p.xids.contains(xid)) {
            continue;
        }
        writes.sort_by_key(|w| w.1.first_ts);
        let in_order = writes
            .iter()
            .try_fold(base.last_ts, |last, w| (w.1.first_ts > last).then_some(w.1.last_ts))
            .is_some();
        if in_order {
            merged.insert(*key, writes.into_iter().map(|w| w.1).collect());
        }
    }
    merged
}

/// For each `(series, minute, from_ts)`, the minute's last stored sample before
/// `from_ts`.
async fn samples_before(tx: &Tx<'_>, late: &[(i64, i64, i64)]) -> PgResult<HashMap<Key, (i64, f64)>> {
    let mut before = HashMap::new();
    if late.is_empty() {
        return Ok(before);
    }
    let ids: Vec<i64> = late.iter().map(|l| l.0).collect();
    let buckets: Vec<i64> = late.iter().map(|l| l.1).collect();
    let froms: Vec<i64> = late.iter().map(|l| l.2).collect();
    for r in tx
        .query(
            "SELECT m.bucket, m.series_id, p.ts, p.value
             FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS m(series_id, bucket, from_ts)
             CROSS JOIN LATERAL (SELECT ts, value FROM server_metrics s
                 WHERE s.series_id = m.series_id AND s.ts >= m.bucket AND s.ts < m.from_ts
                 ORDER BY s.ts DESC, s.seq DESC LIMIT 1) p",
            &[&ids, &buckets, &froms],
        )
        .await?
    {
        before.insert((r.get(0), r.get(1)), (r.get(2), r.get(3)));
    }
    Ok(before)
}

/// One range scan per group of marks of one minute (from the earliest point any of its
/// series needs), pipelined: per group, each series' samples in (ts, seq) order with
/// the low 32 bits of their writer's id.
async fn scan_minutes(
    tx: &Tx<'_>,
    groups: &[&[DirtyMark]],
    splice_from: &impl Fn(&DirtyMark) -> Option<i64>,
) -> PgResult<Vec<HashMap<i64, Vec<(i64, f64, i64)>>>> {
    let scan = tx
        .prepare(
            "SELECT series_id, ts, value, xmin::text::bigint FROM server_metrics
             WHERE ts >= $1 AND ts < $2 AND series_id = ANY($3) ORDER BY ts, series_id, seq",
        )
        .await?;
    let results = pipeline(groups.iter().map(|g| {
        let ids: Vec<i64> = g.iter().map(|m| m.series_id).collect();
        let bucket = g[0].bucket;
        let from = g
            .iter()
            .map(|m| splice_from(m).unwrap_or(bucket))
            .min()
            .unwrap_or(bucket);
        let scan = &scan;
        async move {
            tx.query(scan, &[&from, &(bucket + Level::Minute.bucket_ms()), &ids])
                .await
        }
    }))
    .await?;
    Ok(results
        .into_iter()
        .map(|rows| {
            let mut by_series: HashMap<i64, Vec<(i64, f64, i64)>> = HashMap::new();
            for r in &rows {
                by_series
                    .entry(r.get(0))
                    .or_default()
                    .push((r.get(1), r.get(2), r.get(3)));
            }
            by_series
        })
        .collect())
}

/// Inputs of hour and day marks: their child buckets, oldest first.
async fn child_inputs(
    tx: &Tx<'_>,
    level: Level,
    child: Level,
    marks: &[DirtyMark],
) -> PgResult<Vec<(DirtyMark, RollupInput)>> {
    let ids: Vec<i64> = marks.iter().map(|m| m.series_id).collect();
    let buckets: Vec<i64> = marks.iter().map(|m| m.bucket).collect();
    let rows = tx
        .query(
            &format!(
                "SELECT m.i, c.{} FROM unnest($1::bigint[], $2::bigint[]) WITH ORDINALITY AS m(series_id, bucket, i)
                 JOIN {} c ON c.series_id = m.series_id AND c.bucket >= m.bucket AND c.bucket < m.bucket + $3
                 ORDER BY m.i, c.bucket",
                STATS_COLUMNS.replace(", ", ", c."),
                table(child)
            ),
            &[&ids, &buckets, &level.bucket_ms()],
        )
        .await?;
    let mut children: Vec<Vec<BucketStats>> = vec![Vec::new(); marks.len()];
    for r in &rows {
        let i: i64 = r.get(0);
        children[(i - 1) as usize].push(stats_from_row(r, 1));
    }
    Ok(marks
        .iter()
        .zip(children)
        .map(|(m, c)| (*m, RollupInput::Children(c)))
        .collect())
}

/// Kind, server and name of every series the items name.
async fn series_of(tx: &Tx<'_>, items: &[(DirtyMark, RollupInput)]) -> PgResult<HashMap<i64, (Kind, String, String)>> {
    let ids: Vec<i64> = items
        .iter()
        .map(|(m, _)| m.series_id)
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let mut series = HashMap::with_capacity(ids.len());
    for r in tx
        .query(
            "SELECT id, kind, server_id, name FROM series WHERE id = ANY($1)",
            &[&ids],
        )
        .await?
    {
        let kind: i16 = r.get(1);
        let kind = Kind::from_i64(kind.into()).unwrap_or(Kind::Gauge);
        series.insert(r.get::<_, i64>(0), (kind, r.get::<_, String>(2), r.get::<_, String>(3)));
    }
    Ok(series)
}

/// Stores recomputed buckets and clears the marks nothing renewed since the pass read
/// them. A bucket is written unless the stored one was computed from a newer mark
/// generation, so a result from an older snapshot never replaces a newer one, while a
/// minute that keeps receiving samples (its mark renewed at every pass) is still stored
/// at every pass, and its next pass can extend it (`work`).
pub async fn apply(
    client: &mut PoolClient,
    level: Level,
    results: &[(DirtyMark, Option<BucketStats>)],
) -> PgResult<()> {
    // Writes logged since the pass read its marks stay in the log for the next pass,
    // which splices them into the buckets stored here.
    let tx = client.transaction().await?;
    let buckets: Vec<i64> = results.iter().map(|(m, _)| m.bucket).collect();
    let ids: Vec<i64> = results.iter().map(|(m, _)| m.series_id).collect();
    let generations: Vec<i64> = results.iter().map(|(m, _)| m.generation).collect();
    tx.execute(
            "DELETE FROM rollup_dirty d USING unnest($2::bigint[], $3::bigint[], $4::bigint[]) AS m(bucket, series_id, generation)
             WHERE d.level = $1 AND d.bucket = m.bucket AND d.series_id = m.series_id AND d.generation = m.generation",
        &[&level_code(level), &buckets, &ids, &generations],
    )
    .await?;

    // The newest result per bucket wins, and ON CONFLICT may touch each row only once.
    let mut latest: HashMap<(i64, i64), (i64, &Option<BucketStats>)> = HashMap::new();
    for (m, stats) in results {
        let entry = latest.entry((m.bucket, m.series_id)).or_insert((m.generation, stats));
        if m.generation >= entry.0 {
            *entry = (m.generation, stats);
        }
    }
    // Key-share the series first, all of them in id order, as `delete_server` locks a
    // server's series (FOR UPDATE, id order) before it deletes anything: the two then
    // take these locks in one order and cannot deadlock, and a deletion in flight either
    // waits for this transaction (then deletes what it stored) or makes it wait (then
    // this stores nothing for the series it deleted). Locking row by row inside the
    // upsert, in (bucket, id) order, could deadlock with a deletion's cascade.
    let mut wanted: Vec<i64> = latest.keys().map(|(_, id)| *id).collect();
    wanted.sort_unstable();
    wanted.dedup();
    let live: HashSet<i64> = tx
        .query(
            "SELECT id FROM series WHERE id = ANY($1) ORDER BY id FOR KEY SHARE",
            &[&wanted],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    // A bucket of a deleted series must not come back, nor its parent be marked.
    let mut keys: Vec<(i64, i64)> = latest.keys().copied().filter(|(_, id)| live.contains(id)).collect();
    keys.sort_unstable();

    let mut up = BucketColumns::default();
    let mut up_generations = Vec::new();
    let (mut gone_buckets, mut gone_ids, mut gone_generations) = (Vec::new(), Vec::new(), Vec::new());
    for key in &keys {
        let (generation, stats) = latest[key];
        match stats {
            Some(s) => {
                up.push(key.1, key.0, s);
                up_generations.push(generation);
            }
            None => {
                gone_buckets.push(key.0);
                gone_ids.push(key.1);
                gone_generations.push(generation);
            }
        }
    }
    let name = table(level);
    if !up.series_id.is_empty() {
        tx.execute(
            &format!(
                "INSERT INTO {name} (series_id, bucket, {STATS_COLUMNS}, generation)
                 SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::float8[], $5::float8[], $6::float8[],
                                      $7::float8[], $8::bigint[], $9::float8[], $10::bigint[], $11::float8[], $12::bytea[],
                                      $13::bigint[])
                        AS u(series_id, bucket, {STATS_COLUMNS}, generation)
                 ON CONFLICT (series_id, bucket) DO UPDATE SET
                   count = EXCLUDED.count, sum = EXCLUDED.sum, min = EXCLUDED.min, max = EXCLUDED.max,
                   first = EXCLUDED.first, first_ts = EXCLUDED.first_ts, last = EXCLUDED.last,
                   last_ts = EXCLUDED.last_ts, increase = EXCLUDED.increase, sketch = EXCLUDED.sketch,
                   generation = EXCLUDED.generation
                 WHERE {name}.generation IS NULL OR {name}.generation <= EXCLUDED.generation"
            ),
            &[&up.params()[..], &[&up_generations]].concat(),
        )
        .await?;
    }
    if !gone_ids.is_empty() {
        tx.execute(
            &format!(
                "DELETE FROM {name} t USING unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS g(series_id, bucket, generation)
                 WHERE t.series_id = g.series_id AND t.bucket = g.bucket
                   AND (t.generation IS NULL OR t.generation <= g.generation)"
            ),
            &[&gone_ids, &gone_buckets, &gone_generations],
        )
        .await?;
    }
    if let Some(parent) = level.parent() {
        let mut parents: Vec<(i64, i64)> = keys
            .iter()
            .map(|(bucket, id)| (align(*bucket, parent.bucket_ms()), *id))
            .collect();
        parents.sort_unstable();
        parents.dedup();
        if !parents.is_empty() {
            let (pb, pi): (Vec<i64>, Vec<i64>) = parents.into_iter().unzip();
            mark(&tx, parent, &pb, &pi).await?;
        }
    }
    tx.commit().await
}

/// Sets marks of `level` with one new generation for the whole statement. The caller
/// holds key-share locks on these series, so none is deleted before it commits; a
/// deletion that waited for it leaves these marks to the next pass, which finds no
/// series and clears them, as it clears the deleted server's other marks.
async fn mark(client: &tokio_postgres::Transaction<'_>, level: Level, buckets: &[i64], ids: &[i64]) -> PgResult<u64> {
    client
        .execute(
            "WITH g AS MATERIALIZED (SELECT nextval('rollup_generation') AS generation)
             INSERT INTO rollup_dirty (level, bucket, series_id, generation)
             SELECT $1::smallint, t.bucket, t.series_id, g.generation FROM unnest($2::bigint[], $3::bigint[]) AS t(bucket, series_id), g
             ON CONFLICT (level, bucket, series_id) DO UPDATE SET generation = EXCLUDED.generation",
            &[&level_code(level), &buckets, &ids],
        )
        .await
}

/// Bucket statistics as column arrays, for `unnest`.
#[derive(Default)]
pub(super) struct BucketColumns {
    series_id: Vec<i64>,
    bucket: Vec<i64>,
    count: Vec<i64>,
    sum: Vec<f64>,
    min: Vec<f64>,
    max: Vec<f64>,
    first: Vec<f64>,
    first_ts: Vec<i64>,
    last: Vec<f64>,
    last_ts: Vec<i64>,
    increase: Vec<f64>,
    sketch: Vec<Option<Vec<u8>>>,
}

impl BucketColumns {
    pub(super) fn push(&mut self, series_id: i64, bucket: i64, s: &BucketStats) {
        self.series_id.push(series_id);
        self.bucket.push(bucket);
        self.count.push(s.count as i64);
        self.sum.push(s.sum);
        self.min.push(s.min);
        self.max.push(s.max);
        self.first.push(s.first);
        self.first_ts.push(s.first_ts);
        self.last.push(s.last);
        self.last_ts.push(s.last_ts);
        self.increase.push(s.increase);
        self.sketch.push(s.sketch.as_ref().map(Sketch::encode));
    }

    /// The twelve arrays, series and bucket first, then `STATS_COLUMNS` in order.
    pub(super) fn params(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 12] {
        [
            &self.series_id,
            &self.bucket,
            &self.count,
            &self.sum,
            &self.min,
            &self.max,
            &self.first,
            &self.first_ts,
            &self.last,
            &self.last_ts,
            &self.increase,
            &self.sketch,
        ]
    }
}

/// Drops marks without recomputing (their inputs are past retention).
pub async fn drop_marks(client: &PoolClient, marks: &[DirtyMark]) -> PgResult<()> {
    let levels: Vec<i16> = marks.iter().map(|m| level_code(m.level)).collect();
    let buckets: Vec<i64> = marks.iter().map(|m| m.bucket).collect();
    let ids: Vec<i64> = marks.iter().map(|m| m.series_id).collect();
    let generations: Vec<i64> = marks.iter().map(|m| m.generation).collect();
    client
        .execute(
            "DELETE FROM rollup_dirty d
             USING unnest($1::smallint[], $2::bigint[], $3::bigint[], $4::bigint[]) AS m(level, bucket, series_id, generation)
             WHERE d.level = m.level AND d.bucket = m.bucket AND d.series_id = m.series_id AND d.generation = m.generation",
            &[&levels, &buckets, &ids, &generations],
        )
        .await?;
    Ok(())
}

/// Marks every (minute, series) with raw samples in [from, to) dirty, in one statement
/// (the marks get one new generation).
pub async fn mark_range(client: &PoolClient, from: i64, to: i64) -> PgResult<u64> {
    client
        .execute(
            "WITH g AS MATERIALIZED (SELECT nextval('rollup_generation') AS generation)
             INSERT INTO rollup_dirty (level, bucket, series_id, generation)
             SELECT 0, m.bucket, m.series_id, g.generation
             FROM (SELECT DISTINCT ts - ((ts % 60000) + 60000) % 60000 AS bucket, series_id
                   FROM server_metrics WHERE ts >= $1 AND ts < $2) AS m, g
             ON CONFLICT (level, bucket, series_id) DO UPDATE SET generation = EXCLUDED.generation, min_ts = NULL,
                 xids = NULL",
            &[&from, &to],
        )
        .await
}

pub async fn backlog(client: &PoolClient) -> PgResult<[u64; 3]> {
    let mut out = [0u64; 3];
    for r in client
        .query(
            // Buckets, not writes: a logged (minute, series) counts once, and not at all
            // when it is marked already (one statement, one snapshot).
            "SELECT level, count(*) FROM rollup_dirty GROUP BY level
             UNION ALL
             SELECT 0::smallint, count(*) FROM (
                 SELECT DISTINCT l.bucket, logged.series_id
                 FROM rollup_log l, unnest(l.series_ids) AS logged(series_id)
             ) p
             WHERE NOT EXISTS (SELECT 1 FROM rollup_dirty d
                               WHERE d.level = 0 AND d.bucket = p.bucket AND d.series_id = p.series_id)",
            &[],
        )
        .await?
    {
        let level: i16 = r.get(0);
        let n: i64 = r.get(1);
        if let Some(slot) = out.get_mut(level as usize) {
            *slot += n as u64;
        }
    }
    Ok(out)
}

pub async fn read(
    client: &PoolClient,
    level: Level,
    series_ids: &[i64],
    from: i64,
    to: i64,
) -> PgResult<Vec<RollupRow>> {
    // Ordered by the caller's series order, then time, like SQLite's loop over the ids.
    let stmt = client
        .prepare_cached(&format!(
            "SELECT t.series_id, t.bucket, t.{} FROM unnest($1::bigint[]) WITH ORDINALITY AS s(id, i)
             JOIN {} t ON t.series_id = s.id AND t.bucket >= $2 AND t.bucket < $3
             ORDER BY s.i, t.bucket",
            STATS_COLUMNS.replace(", ", ", t."),
            table(level)
        ))
        .await?;
    let rows = client.query(&stmt, &[&series_ids, &from, &to]).await?;
    Ok(rows
        .iter()
        .map(|r| RollupRow {
            series_id: r.get(0),
            bucket: r.get(1),
            stats: stats_from_row(r, 2),
        })
        .collect())
}

/// Deletes raw samples older than `cutoff`: partitions whose whole day ends at or before
/// it are counted and dropped, and the rows before it in the partition that straddles it
/// are deleted. Returns the rows removed and the days dropped.
pub async fn retention_raw(client: &mut PoolClient, cutoff: i64) -> PgResult<(u64, Vec<i64>)> {
    let mut days = partitions::existing(client).await?;
    days.sort_unstable();
    let mut deleted = 0u64;
    let mut dropped = Vec::new();
    for day in days.into_iter().filter(|d| (d + 1) * partitions::DAY_MS <= cutoff) {
        // Counting and dropping in one transaction: nothing lands in between.
        let tx = client.transaction().await?;
        // Dropping a partition locks the parent table: give up after a moment (and try at
        // the next retention run) rather than make every write queue behind the drop
        // while it waits for a long reader.
        tx.batch_execute("SET LOCAL lock_timeout = '2s'").await?;
        let name = partitions::name(day);
        let count: i64 = tx.query_one(&format!("SELECT count(*) FROM {name}"), &[]).await?.get(0);
        tx.batch_execute(&format!("DROP TABLE IF EXISTS {name}")).await?;
        tx.commit().await?;
        deleted += count as u64;
        dropped.push(day);
    }
    deleted += client
        .execute("DELETE FROM server_metrics WHERE ts < $1", &[&cutoff])
        .await?;
    Ok((deleted, dropped))
}

/// Deletes rollups of `level` older than `cutoff` and the dirty marks of that level
/// older than it.
pub async fn retention_level(client: &PoolClient, level: Level, cutoff: i64) -> PgResult<u64> {
    let deleted = client
        .execute(&format!("DELETE FROM {} WHERE bucket < $1", table(level)), &[&cutoff])
        .await?;
    client
        .execute(
            "DELETE FROM rollup_dirty WHERE level = $1 AND bucket < $2",
            &[&level_code(level), &cutoff],
        )
        .await?;
    if level == Level::Minute {
        // Buckets of writes whose minute no pass took (its series deleted meanwhile).
        client
            .execute("DELETE FROM rollup_partials WHERE bucket < $1", &[&cutoff])
            .await?;
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(samples: &[(i64, f64)]) -> BucketStats {
        BucketStats::fold(Kind::Counter, samples.iter().copied()).unwrap()
    }

    #[test]
    fn writes_are_merged_only_when_all_are_known_and_in_order() {
        let key = (0, 7);
        let pending = HashMap::from([(
            key,
            Pending {
                min_ts: 110,
                xids: HashSet::from([1, 2]),
            },
        )]);
        let stored = HashMap::from([(key, bucket(&[(100, 1.0)]))]);
        let writes = |a: &[(i64, f64)], b: &[(i64, f64)]| HashMap::from([(key, vec![(2, bucket(b)), (1, bucket(a))])]);

        let merged = mergeable(&pending, &stored, writes(&[(110, 2.0), (120, 3.0)], &[(130, 4.0)]));
        let in_time_order: Vec<i64> = merged[&key].iter().map(|b| b.first_ts).collect();
        assert_eq!(in_time_order, vec![110, 130]);

        assert!(
            mergeable(&pending, &stored, writes(&[(110, 2.0), (130, 3.0)], &[(120, 4.0)])).is_empty(),
            "overlapping writes"
        );
        assert!(
            mergeable(&pending, &stored, writes(&[(90, 2.0)], &[(130, 4.0)])).is_empty(),
            "a write before the bucket's last"
        );
        let one_missing = HashMap::from([(key, vec![(1, bucket(&[(110, 2.0)]))])]);
        assert!(
            mergeable(&pending, &stored, one_missing).is_empty(),
            "a write's bucket is missing"
        );
        assert!(
            mergeable(&pending, &HashMap::new(), writes(&[(110, 2.0)], &[(130, 4.0)])).is_empty(),
            "no stored bucket"
        );
    }
}
