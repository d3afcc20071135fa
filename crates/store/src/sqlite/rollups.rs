//! SQL of the rollup tables: reading dirty buckets with their inputs from one snapshot,
//! writing recomputed buckets and clearing marks with a generation check, retention.

use std::collections::{HashMap, HashSet};
use std::sync::{LazyLock, Mutex};

use mcp_metrics_core::model::Kind;
use mcp_metrics_core::rollup::{BucketStats, Level, align};
use mcp_metrics_core::sketch::Sketch;
use rusqlite::{Connection, Row, TransactionBehavior, params};

use super::kept_minutes::KeptMinutes;
use super::lock_kept;
use crate::{DirtyMark, RollupInput, RollupRow, RollupWork};

/// A value larger than every mark generation handed out before, by any process: a
/// counter in `meta`, advanced inside the caller's write transaction. A mark set
/// (or set again after deletion) always gets a generation no pass has read.
pub fn next_generation(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<i64> {
    // Cached: every write takes a generation.
    tx.prepare_cached(
        "INSERT INTO meta (key, value) VALUES ('rollup_generation', '1')
         ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1
         RETURNING CAST(value AS INTEGER)",
    )?
    .query_row([], |r| r.get(0))
}

pub fn table(level: Level) -> &'static str {
    match level {
        Level::Minute => "rollups_1m",
        Level::Hour => "rollups_1h",
        Level::Day => "server_metrics_daily",
    }
}

const STATS_COLUMNS: &str = "count, sum, min, max, first, first_ts, last, last_ts, increase, sketch";

/// Reads the ten stats columns starting at `at`.
fn stats_from_row(r: &Row<'_>, at: usize) -> rusqlite::Result<BucketStats> {
    let count: i64 = r.get(at)?;
    // Decoded straight from SQLite's buffer: no copy of the blob.
    let sketch = match r.get_ref(at + 9)? {
        rusqlite::types::ValueRef::Blob(bytes) => Some(bytes),
        _ => None,
    };
    Ok(BucketStats {
        count: count as u64,
        sum: r.get(at + 1)?,
        min: r.get(at + 2)?,
        max: r.get(at + 3)?,
        first: r.get(at + 4)?,
        first_ts: r.get(at + 5)?,
        last: r.get(at + 6)?,
        last_ts: r.get(at + 7)?,
        increase: r.get(at + 8)?,
        sketch: match sketch {
            None => None,
            Some(bytes) => Some(Sketch::decode(bytes).map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(at + 9, rusqlite::types::Type::Blob, Box::new(e))
            })?),
        },
    })
}

pub fn work(
    conn: &Connection,
    level: Level,
    max_marks: usize,
    kept: &Mutex<KeptMinutes>,
) -> rusqlite::Result<RollupWork> {
    // One read transaction: the marks and the data they are rebuilt from come from the
    // same WAL snapshot, so a sample committed later also renewed its mark.
    let tx = conn.unchecked_transaction()?;
    let marks: Vec<DirtyMark> = tx
        .prepare_cached(
            "SELECT bucket, series_id, generation FROM rollup_dirty WHERE level = ?1
             ORDER BY bucket, series_id LIMIT ?2",
        )?
        .query_map(params![level.as_i64(), max_marks as i64], |r| {
            Ok(DirtyMark {
                level,
                bucket: r.get(0)?,
                series_id: r.get(1)?,
                generation: r.get(2)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut items = Vec::with_capacity(marks.len());
    match level.child() {
        None => {
            // Minutes the writer kept whole need no read (taken before any scan, so the
            // writer never waits on one); the others: one range scan of the raw table per
            // marked minute.
            let mut taken: Vec<(DirtyMark, Option<(BucketStats, u64)>)> = {
                let mut kept = lock_kept(kept);
                marks
                    .into_iter()
                    .map(|m| (m, kept.take((m.bucket, m.series_id), m.generation)))
                    .collect()
            };
            for minute in taken.chunk_by_mut(|a, b| a.0.bucket == b.0.bucket) {
                let bucket = minute[0].0.bucket;
                let wanted: HashSet<i64> = minute
                    .iter()
                    .filter(|(_, kept)| kept.is_none())
                    .map(|(m, _)| m.series_id)
                    .collect();
                let mut by_series: HashMap<i64, Vec<(i64, f64)>> = HashMap::new();
                if !wanted.is_empty() {
                    super::raw::for_each_in(
                        &tx,
                        bucket,
                        bucket + level.bucket_ms(),
                        |series_id| wanted.contains(&series_id),
                        |series_id, ts, value| by_series.entry(series_id).or_default().push((ts, value)),
                    )?;
                }
                for (mark, kept) in minute {
                    let input = match kept.take() {
                        Some((bucket, new_samples)) => RollupInput::Kept { bucket, new_samples },
                        None => RollupInput::Raw(by_series.remove(&mark.series_id).unwrap_or_default()),
                    };
                    items.push((*mark, input));
                }
            }
        }
        Some(child) => {
            let mut children = tx.prepare_cached(&format!(
                "SELECT {STATS_COLUMNS} FROM {} WHERE series_id = ?1 AND bucket >= ?2 AND bucket < ?3 ORDER BY bucket",
                table(child)
            ))?;
            for mark in marks {
                let stats = children
                    .query_map(
                        params![mark.series_id, mark.bucket, mark.bucket + level.bucket_ms()],
                        |r| stats_from_row(r, 0),
                    )?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                items.push((mark, RollupInput::Children(stats)));
            }
        }
    }
    let ids: Vec<i64> = items
        .iter()
        .map(|(m, _)| m.series_id)
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let mut series = HashMap::with_capacity(ids.len());
    let ids_json = serde_json::to_string(&ids).unwrap_or_else(|_| "[]".into());
    let mut stmt = tx
        .prepare_cached("SELECT id, kind, server_id, name FROM series WHERE id IN (SELECT value FROM json_each(?1))")?;
    let mut rows = stmt.query([ids_json])?;
    while let Some(r) = rows.next()? {
        let kind: i64 = r.get(1)?;
        let kind = Kind::from_i64(kind).unwrap_or(Kind::Gauge);
        series.insert(
            r.get::<_, i64>(0)?,
            (kind, r.get::<_, String>(2)?, r.get::<_, String>(3)?),
        );
    }
    drop(rows);
    drop(stmt);
    tx.commit()?;
    Ok(RollupWork { items, series })
}

/// Stores recomputed buckets and clears the marks nothing renewed since the pass read
/// them (a renewed mark stays for the next pass). A bucket is written unless the stored
/// one was computed from a newer generation: a result from an older snapshot never
/// overwrites a newer one, and a minute written without pause is still updated at every
/// pass.
pub fn apply(
    conn: &mut Connection,
    level: Level,
    results: &[(DirtyMark, Option<BucketStats>)],
) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let generation = next_generation(&tx)?;
    {
        let name = table(level);
        let mut upsert = tx.prepare_cached(&format!(
            "INSERT INTO {name} (series_id, bucket, {STATS_COLUMNS}, generation)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
             ON CONFLICT (series_id, bucket) DO UPDATE SET
               count = excluded.count, sum = excluded.sum, min = excluded.min, max = excluded.max,
               first = excluded.first, first_ts = excluded.first_ts, last = excluded.last,
               last_ts = excluded.last_ts, increase = excluded.increase, sketch = excluded.sketch,
               generation = excluded.generation
             WHERE {name}.generation IS NULL OR {name}.generation <= excluded.generation"
        ))?;
        let mut delete = tx.prepare_cached(&format!(
            "DELETE FROM {name} WHERE series_id = ?1 AND bucket = ?2 AND (generation IS NULL OR generation <= ?3)"
        ))?;
        let mut clear = tx.prepare_cached(
            "DELETE FROM rollup_dirty WHERE level = ?1 AND bucket = ?2 AND series_id = ?3 AND generation = ?4",
        )?;
        let mut mark_parent = tx.prepare_cached(
            "INSERT INTO rollup_dirty (level, bucket, series_id, generation) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (level, bucket, series_id) DO UPDATE SET generation = excluded.generation",
        )?;
        let mut series_exists = tx.prepare_cached("SELECT 1 FROM series WHERE id = ?1")?;
        let mut live: HashMap<i64, bool> = HashMap::new();
        for (mark, stats) in results {
            // Cleared unless renewed meanwhile (then the next pass recomputes the bucket);
            // the result is stored either way unless a newer one is.
            clear.execute(params![level.as_i64(), mark.bucket, mark.series_id, mark.generation])?;
            // Nothing more for a series that is gone: a server deleted while the pass
            // computed took its rollup rows with it, and neither they nor a mark for the
            // next level (which would find no series) may come back.
            let exists = match live.get(&mark.series_id) {
                Some(&known) => known,
                None => {
                    let found = series_exists.exists([mark.series_id])?;
                    live.insert(mark.series_id, found);
                    found
                }
            };
            if !exists {
                continue;
            }
            match stats {
                Some(s) => {
                    upsert.execute(params![
                        mark.series_id,
                        mark.bucket,
                        s.count as i64,
                        s.sum,
                        s.min,
                        s.max,
                        s.first,
                        s.first_ts,
                        s.last,
                        s.last_ts,
                        s.increase,
                        s.sketch.as_ref().map(Sketch::encode),
                        mark.generation,
                    ])?;
                }
                None => {
                    delete.execute(params![mark.series_id, mark.bucket, mark.generation])?;
                }
            }
            if let Some(parent) = level.parent() {
                mark_parent.execute(params![
                    parent.as_i64(),
                    align(mark.bucket, parent.bucket_ms()),
                    mark.series_id,
                    generation
                ])?;
            }
        }
    }
    tx.commit()
}

/// Drops marks without recomputing (their inputs are past retention).
pub fn drop_marks(conn: &mut Connection, marks: &[DirtyMark]) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    {
        let mut clear = tx.prepare_cached(
            "DELETE FROM rollup_dirty WHERE level = ?1 AND bucket = ?2 AND series_id = ?3 AND generation = ?4",
        )?;
        for m in marks {
            clear.execute(params![m.level.as_i64(), m.bucket, m.series_id, m.generation])?;
        }
    }
    tx.commit()
}

pub fn mark_minutes(conn: &mut Connection, minutes: &[(i64, i64)]) -> rusqlite::Result<u64> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let generation = next_generation(&tx)?;
    let marks: Vec<(i64, i64, i64)> = minutes
        .iter()
        .map(|&(minute, series)| (minute, series, generation))
        .collect();
    set_minute_marks(&tx, &marks)?;
    tx.commit()?;
    Ok(minutes.len() as u64)
}

/// Rows per multi-row upsert of minute marks, largest first: as many 64-row statements as
/// fit, then at most one of each smaller size (100 marks: 64 + 32 + 4), where a remainder
/// set one row at a time took 36 statements.
const MARK_CHUNKS: [usize; 7] = [64, 32, 16, 8, 4, 2, 1];

const MARK_HEAD: &str = "INSERT INTO rollup_dirty (level, bucket, series_id, generation)";
const MARK_ROW: &str = "(0, ?, ?, ?)";
const MARK_TAIL: &str = "ON CONFLICT (level, bucket, series_id) DO UPDATE SET
    generation = max(rollup_dirty.generation, excluded.generation)";

/// `INSERT … VALUES (…), (…), …` runs SQLite's VM once for a chunk of marks instead of
/// once per mark.
static MARK_SQL: LazyLock<[String; MARK_CHUNKS.len()]> = LazyLock::new(|| {
    MARK_CHUNKS.map(|rows| format!("{MARK_HEAD} VALUES {} {MARK_TAIL}", vec![MARK_ROW; rows].join(", ")))
});

/// Sets these distinct (minute, series, generation) marks, or raises a mark's
/// generation to the given one, many rows per statement. A mark never goes back to an
/// older generation: the newest write (or re-aggregation) of its minute decides.
pub fn set_minute_marks(tx: &rusqlite::Transaction<'_>, marks: &[(i64, i64, i64)]) -> rusqlite::Result<()> {
    let mut rest = marks;
    for (&rows, sql) in MARK_CHUNKS.iter().zip(MARK_SQL.iter()) {
        if rest.len() < rows {
            continue;
        }
        let mut statement = tx.prepare_cached(sql)?;
        while rest.len() >= rows {
            let (chunk, after) = rest.split_at(rows);
            for (i, &(minute, series_id, generation)) in chunk.iter().enumerate() {
                statement.raw_bind_parameter(3 * i + 1, minute)?;
                statement.raw_bind_parameter(3 * i + 2, series_id)?;
                statement.raw_bind_parameter(3 * i + 3, generation)?;
            }
            statement.raw_execute()?;
            rest = after;
        }
    }
    Ok(())
}

/// Dirty buckets per level: the marks, and for minutes also the logged pairs not
/// marked yet.
pub fn backlog(conn: &Connection) -> rusqlite::Result<[u64; 3]> {
    // One snapshot: a settling between the two reads would count its marks twice.
    let tx = conn.unchecked_transaction()?;
    let mut out = [super::mark_log::unsettled(&tx)?, 0, 0];
    let mut stmt = tx.prepare_cached("SELECT level, count(*) FROM rollup_dirty GROUP BY level")?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let level: i64 = r.get(0)?;
        let n: i64 = r.get(1)?;
        if let Some(slot) = out.get_mut(level as usize) {
            *slot += n as u64;
        }
    }
    Ok(out)
}

pub fn read(
    conn: &Connection,
    level: Level,
    series_ids: &[i64],
    from: i64,
    to: i64,
) -> rusqlite::Result<Vec<RollupRow>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT bucket, {STATS_COLUMNS} FROM {} WHERE series_id = ?1 AND bucket >= ?2 AND bucket < ?3 ORDER BY bucket",
        table(level)
    ))?;
    let mut out = Vec::new();
    for &series_id in series_ids {
        let rows = stmt.query_map(params![series_id, from, to], |r| {
            Ok(RollupRow {
                series_id,
                bucket: r.get(0)?,
                stats: stats_from_row(r, 1)?,
            })
        })?;
        for row in rows {
            out.push(row?);
        }
    }
    Ok(out)
}

/// Deletes rollups of `level` older than `cutoff`, series by series, and the dirty marks
/// (and for minutes, the logged ones) of that level older than it.
pub fn retention_level(conn: &mut Connection, level: Level, cutoff: i64) -> rusqlite::Result<u64> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut deleted = 0u64;
    {
        let ids: Vec<i64> = tx
            .prepare_cached("SELECT id FROM series")?
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let mut delete = tx.prepare_cached(&format!(
            "DELETE FROM {} WHERE series_id = ?1 AND bucket < ?2",
            table(level)
        ))?;
        for id in ids {
            deleted += delete.execute(params![id, cutoff])? as u64;
        }
        tx.execute(
            "DELETE FROM rollup_dirty WHERE level = ?1 AND bucket < ?2",
            params![level.as_i64(), cutoff],
        )?;
        if level == Level::Minute {
            super::mark_log::delete_before(&tx, cutoff)?;
        }
    }
    tx.commit()?;
    Ok(deleted)
}
