//! The raw sample table of the SQLite store, `server_metrics`: one row per sample, keyed
//! (ts, series_id, seq) so that a time range is one ordered scan. Every statement that
//! writes or reads raw samples is here — the writer's inserts, the sample API's reads, the
//! rollup pass's scans, retention, deletion and copying to PostgreSQL — so they share one
//! view of how samples are stored, and a different layout (runs of samples instead of a
//! row each, which the ingest target needs: docs/METRICS.md, "Beside VictoriaMetrics")
//! changes this module and not its callers.

use std::collections::HashSet;
use std::sync::LazyLock;

use mcp_metrics_core::model::{Kind, RawSample};
use mcp_metrics_core::rollup::align;
use rusqlite::{Connection, OptionalExtension, params};

use super::multi_row::{self, bind_rows};
use super::value_codec;
use crate::SampleQuery;

/// Gauge and counter rows per upsert statement.
const UPSERT_CHUNK: usize = 64;

const UPSERT_HEAD: &str = "INSERT INTO server_metrics (series_id, ts, seq, value)";
const UPSERT_ROW: &str = "(?, ?, 0, ?)";
const UPSERT_TAIL: &str = "ON CONFLICT (ts, series_id, seq) DO UPDATE SET value = excluded.value";

static UPSERT_MANY_SQL: LazyLock<String> =
    LazyLock::new(|| multi_row::statement(UPSERT_HEAD, UPSERT_ROW, UPSERT_CHUNK, UPSERT_TAIL));
static UPSERT_ONE_SQL: LazyLock<String> =
    LazyLock::new(|| multi_row::statement(UPSERT_HEAD, UPSERT_ROW, 1, UPSERT_TAIL));

/// Histogram observations per multi-row INSERT. Each gets its seq from its place in the
/// write (0, 1, 2, … per (series, ts)); a chunk that collides with rows already stored
/// fails as a whole and goes in row by row instead.
const OBSERVATION_CHUNK: usize = 64;

static INSERT_OBSERVATIONS_SQL: LazyLock<String> = LazyLock::new(|| {
    multi_row::statement(
        "INSERT INTO server_metrics (series_id, ts, seq, value)",
        "(?, ?, ?, ?)",
        OBSERVATION_CHUNK,
        "",
    )
});

/// Inserts one write's raw rows, given in key order, in multi-row statements (one VM
/// run per chunk instead of one per row). Gauge and counter values are upserted, so a
/// later row for the same (series, ts) updates the earlier one. Histogram observations
/// of one (series, ts) take seq 0, 1, 2, … in arrival order, after any an earlier write
/// stored there; they never share a series with values, so the two kinds interleave
/// freely.
pub(crate) struct RawRows<'t> {
    upsert_chunk: rusqlite::CachedStatement<'t>,
    upsert_one: rusqlite::CachedStatement<'t>,
    values: Vec<(i64, i64, rusqlite::types::Value)>,
    insert_chunk: rusqlite::CachedStatement<'t>,
    insert_at_zero: rusqlite::CachedStatement<'t>,
    insert_at_next: rusqlite::CachedStatement<'t>,
    observations: Vec<(i64, i64, i64, rusqlite::types::Value)>,
    /// The (series, ts) of the last observation pushed and the seq it was given.
    last_seq: Option<(i64, i64, i64)>,
}

impl<'t> RawRows<'t> {
    pub(crate) fn new(tx: &'t rusqlite::Transaction<'_>) -> rusqlite::Result<Self> {
        Ok(RawRows {
            upsert_chunk: tx.prepare_cached(&UPSERT_MANY_SQL)?,
            upsert_one: tx.prepare_cached(&UPSERT_ONE_SQL)?,
            values: Vec::with_capacity(UPSERT_CHUNK),
            insert_chunk: tx.prepare_cached(&INSERT_OBSERVATIONS_SQL)?,
            insert_at_zero: tx.prepare_cached(
                "INSERT INTO server_metrics (series_id, ts, seq, value) VALUES (?1, ?2, 0, ?3)
                 ON CONFLICT (ts, series_id, seq) DO NOTHING RETURNING seq",
            )?,
            insert_at_next: tx.prepare_cached(
                "INSERT INTO server_metrics (series_id, ts, seq, value)
                 SELECT ?1, ?2, MAX(seq) + 1, ?3 FROM server_metrics WHERE series_id = ?1 AND ts = ?2
                 RETURNING seq",
            )?,
            observations: Vec::with_capacity(OBSERVATION_CHUNK),
            last_seq: None,
        })
    }

    pub(crate) fn push(&mut self, series_id: i64, ts: i64, kind: Kind, value: f64) -> rusqlite::Result<()> {
        let value = value_codec::encode(value);
        if kind != Kind::Histogram {
            self.values.push((series_id, ts, value));
            if self.values.len() == UPSERT_CHUNK {
                bind_rows(&mut self.upsert_chunk, &self.values)?;
                self.upsert_chunk.raw_execute()?;
                self.values.clear();
            }
            return Ok(());
        }
        // Rows of one (series, ts) are adjacent in key order.
        let seq = match self.last_seq {
            Some((s, t, seq)) if s == series_id && t == ts => seq + 1,
            _ => 0,
        };
        self.last_seq = Some((series_id, ts, seq));
        self.observations.push((series_id, ts, seq, value));
        if self.observations.len() == OBSERVATION_CHUNK {
            self.flush_observations()?;
        }
        Ok(())
    }

    /// Inserts the pending observations as one statement; when one of them meets a row
    /// an earlier write stored (the statement then changes nothing), one by one instead.
    fn flush_observations(&mut self) -> rusqlite::Result<()> {
        bind_rows(&mut self.insert_chunk, &self.observations)?;
        match self.insert_chunk.raw_execute() {
            Ok(_) => {
                self.observations.clear();
                Ok(())
            }
            Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::ConstraintViolation => {
                self.insert_one_by_one()
            }
            Err(e) => Err(e),
        }
    }

    /// Inserts the pending observations one statement each, in order: at seq 0, or when
    /// that is taken at the next free seq. The run they end continues after the seq the
    /// last one got, so later chunks of the same (series, ts) do not collide again.
    fn insert_one_by_one(&mut self) -> rusqlite::Result<()> {
        for (series_id, ts, _, value) in self.observations.drain(..) {
            let at_zero: Option<i64> = self
                .insert_at_zero
                .query_row(params![series_id, ts, value], |r| r.get(0))
                .optional()?;
            let seq = match at_zero {
                Some(seq) => seq,
                None => self
                    .insert_at_next
                    .query_row(params![series_id, ts, value], |r| r.get(0))?,
            };
            if self.last_seq.is_some_and(|(s, t, _)| s == series_id && t == ts) {
                self.last_seq = Some((series_id, ts, seq));
            }
        }
        Ok(())
    }

    /// Inserts what is still pending: values one statement each, observations as above.
    pub(crate) fn finish(mut self) -> rusqlite::Result<()> {
        for (series_id, ts, value) in std::mem::take(&mut self.values) {
            self.upsert_one.execute(params![series_id, ts, value])?;
        }
        self.insert_one_by_one()
    }
}

/// Raw samples of some series in [from, to), in key order after a cursor, at most `limit`.
pub(crate) fn read(conn: &Connection, q: &SampleQuery) -> rusqlite::Result<Vec<RawSample>> {
    // The key is (ts, series_id, seq), so this is one range scan in the answer's order;
    // rows of other series in the range are skipped by the IN filter.
    let (after_ts, after_series, after_seq) = q.after.unwrap_or((i64::MIN, i64::MIN, i64::MIN));
    let ids = serde_json::to_string(&q.series_ids).unwrap_or_else(|_| "[]".into());
    let mut stmt = conn.prepare_cached(
        "SELECT ts, series_id, seq, value FROM server_metrics
         WHERE ts >= ?1 AND ts < ?2 AND (ts, series_id, seq) > (?3, ?4, ?5)
           AND series_id IN (SELECT value FROM json_each(?6))
         ORDER BY ts, series_id, seq LIMIT ?7",
    )?;
    let rows = stmt.query_map(
        params![q.from, q.to, after_ts, after_series, after_seq, ids, q.limit as i64],
        |r| {
            Ok(RawSample {
                timestamp: r.get(0)?,
                series_id: r.get(1)?,
                seq: r.get(2)?,
                value: value_codec::decode(r.get_ref(3)?),
            })
        },
    )?;
    rows.collect()
}

/// The distinct (minute, series) pairs with raw samples in [from, to). One ordered scan
/// of the time-first key; a GROUP BY would sort every row instead.
pub(crate) fn minutes_with_samples(conn: &Connection, from: i64, to: i64) -> rusqlite::Result<Vec<(i64, i64)>> {
    let mut stmt = conn.prepare_cached("SELECT ts, series_id FROM server_metrics WHERE ts >= ?1 AND ts < ?2")?;
    let mut rows = stmt.query(params![from, to])?;
    let mut out = Vec::new();
    let mut minute = i64::MIN;
    let mut seen: HashSet<i64> = HashSet::new();
    while let Some(r) = rows.next()? {
        let (ts, series_id): (i64, i64) = (r.get(0)?, r.get(1)?);
        let m = align(ts, 60_000);
        if m != minute {
            minute = m;
            seen.clear();
        }
        if seen.insert(series_id) {
            out.push((m, series_id));
        }
    }
    Ok(out)
}

/// Deletes one slice of raw samples older than `cutoff` (at most an hour of data per
/// call, so the writer lock is held briefly); returns rows deleted and whether more
/// remain.
pub(crate) fn delete_older_slice(conn: &mut Connection, cutoff: i64) -> rusqlite::Result<(u64, bool)> {
    let oldest: Option<i64> = conn
        .query_row("SELECT ts FROM server_metrics ORDER BY ts LIMIT 1", [], |r| r.get(0))
        .optional()?;
    let Some(oldest) = oldest.filter(|t| *t < cutoff) else {
        return Ok((0, false));
    };
    let until = cutoff.min(oldest + 3_600_000);
    let deleted = conn.execute("DELETE FROM server_metrics WHERE ts < ?1", [until])? as u64;
    Ok((deleted, until < cutoff))
}

/// Calls `each(series_id, ts, value)` for every raw sample in [from, to), in key order:
/// the rollup pass's read of a bucket the writer did not keep.
pub(crate) fn for_each_in(
    conn: &Connection,
    from: i64,
    to: i64,
    mut each: impl FnMut(i64, i64, f64),
) -> rusqlite::Result<()> {
    let mut scan = conn.prepare_cached(
        "SELECT series_id, ts, value FROM server_metrics WHERE ts >= ?1 AND ts < ?2 ORDER BY ts, series_id, seq",
    )?;
    let mut rows = scan.query(params![from, to])?;
    while let Some(r) = rows.next()? {
        each(r.get(0)?, r.get(1)?, value_codec::decode(r.get_ref(2)?));
    }
    Ok(())
}

/// Deletes the raw samples of a server's series (they name series, not servers: no
/// cascade), inside the caller's transaction.
pub(crate) fn delete_of_server(tx: &rusqlite::Transaction<'_>, server_id: &str) -> rusqlite::Result<usize> {
    tx.execute(
        "DELETE FROM server_metrics WHERE series_id IN (SELECT id FROM series WHERE server_id = ?1)",
        [server_id],
    )
}

/// How many raw samples there are: the copy command's total.
pub(crate) fn count(conn: &Connection) -> rusqlite::Result<u64> {
    conn.query_row("SELECT count(*) FROM server_metrics", [], |r| r.get::<_, i64>(0))
        .map(|n| n as u64)
}

/// How many raw samples there are up to and including `cursor` (ts, series_id, seq): how
/// far an interrupted copy had come.
pub(crate) fn count_through(conn: &Connection, cursor: (i64, i64, i64)) -> rusqlite::Result<u64> {
    conn.query_row(
        "SELECT count(*) FROM server_metrics WHERE (ts, series_id, seq) <= (?1, ?2, ?3)",
        [cursor.0, cursor.1, cursor.2],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n as u64)
}

/// The next `limit` raw samples after `cursor`, in key order, as (ts, series_id, seq,
/// value): a copy's page.
pub(crate) fn page_after(
    conn: &Connection,
    cursor: (i64, i64, i64),
    limit: usize,
) -> rusqlite::Result<Vec<(i64, i64, i64, f64)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT ts, series_id, seq, value FROM server_metrics WHERE (ts, series_id, seq) > (?1, ?2, ?3)
         ORDER BY ts, series_id, seq LIMIT ?4",
    )?;
    let rows = stmt.query_map(params![cursor.0, cursor.1, cursor.2, limit as i64], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, value_codec::decode(r.get_ref(3)?)))
    })?;
    rows.collect()
}
