//! The minute-mark log of the SQLite store (`rollup_log`): each write appends one row
//! per minute it wrote, naming that minute's series, and the rollup job settles the log
//! into `rollup_dirty` once per pass.
//!
//! Why: a write used to upsert a `rollup_dirty` mark for every (minute, series) it
//! touched, about 5,000 instructions each. At 100 series a request that was 22 % of the
//! service's instructions for remote-write and close to half of the writer's, the one
//! thread every acknowledgement waits on (`scripts/bench-instructions.sh`). A log row
//! costs about what one mark did, and settling upserts each (minute, series) once per
//! pass instead of once per write. PostgreSQL's store keeps a log for the same reason.
//!
//! What a mark is, with the log: a (minute, series) is dirty when `rollup_dirty` or the
//! log names it, and its generation is the greatest of theirs. Settling keeps that true:
//! in one write transaction it upserts each logged pair at its greatest logged generation
//! (a greater one already marked, such as an operator's re-aggregation, stays) and
//! empties the log. So the pass reads the marks that writes setting them directly would
//! have left, and everything the kept minutes and the generation checks rely on holds:
//! a mark's generation is still that of the last write to its minute. A write committed
//! after the settling stays in the log for the next one; if the pass already saw its
//! samples, it recomputes the minute once more.
//!
//! A row's series are a blob of zigzag varint deltas between ascending ids, a byte or
//! two each.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};

use mcp_metrics_core::varint::{self, unzigzag, zigzag};
use rusqlite::types::Type;
use rusqlite::{Connection, Transaction, params};
use rustc_hash::{FxHashMap, FxHashSet};

/// A (minute, series) the log names, with the greatest generation it names it with.
pub type LoggedMarks = FxHashMap<(i64, i64), i64>;

/// A blob that is not a list of series ids, at this byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("corrupt series list in rollup_log at byte {0}")]
pub struct Corrupt(pub usize);

/// Encodes series ids (ascending, as `PendingRuns::minutes` gives them).
pub fn encode_series(ids: impl IntoIterator<Item = i64>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut previous = 0i64;
    for id in ids {
        varint::put(&mut out, zigzag(id.wrapping_sub(previous)));
        previous = id;
    }
    out
}

/// Calls `each` with every series id of a blob [`encode_series`] made.
pub fn decode_series(blob: &[u8], mut each: impl FnMut(i64)) -> Result<(), Corrupt> {
    let mut rest = blob;
    let mut previous = 0i64;
    while !rest.is_empty() {
        let at = blob.len() - rest.len();
        let delta = varint::get(&mut rest).ok_or(Corrupt(at))?;
        previous = previous.wrapping_add(unzigzag(delta));
        each(previous);
    }
    Ok(())
}

fn corrupt(e: Corrupt) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(0, Type::Blob, Box::new(e))
}

/// Rows the writer lets the log grow to before it settles the log itself, in its own
/// transaction. The job settles every pass (each second by default), but a job set far
/// apart (`rollup.interval_secs` up to an hour) or slowed by a large backlog must not let
/// the log grow without bound: the writer reads a minute's logged rows when it first
/// meets that minute, and settling once per this many rows costs little.
const SETTLE_AFTER_ROWS: usize = 1024;

/// The writer's side of the log: appending, and settling when this process has logged
/// [`SETTLE_AFTER_ROWS`] rows since the log was last settled. Used only while holding the
/// writer connection, so a load and a store of the count suffice.
#[derive(Default)]
pub struct Writer {
    logged_rows: AtomicUsize,
}

impl Writer {
    /// [`append`], then [`settle`] in the same transaction if the log has grown long.
    pub fn append(&self, tx: &Transaction<'_>, minutes: &[(i64, i64)], generation: i64) -> rusqlite::Result<()> {
        let logged = self.logged_rows.load(Ordering::Relaxed) + append(tx, minutes, generation)?;
        if logged >= SETTLE_AFTER_ROWS {
            settle(tx)?;
            self.logged_rows.store(0, Ordering::Relaxed);
        } else {
            self.logged_rows.store(logged, Ordering::Relaxed);
        }
        Ok(())
    }

    /// [`settle_now`], the rollup job's settling at the start of a minute pass.
    pub fn settle_now(&self, conn: &mut Connection) -> rusqlite::Result<usize> {
        let settled = settle_now(conn)?;
        self.logged_rows.store(0, Ordering::Relaxed);
        Ok(settled)
    }
}

/// Logs the (minute, series) pairs one write touched, sorted by minute, at the write's
/// generation: one row per minute. Returns the rows appended.
fn append(tx: &Transaction<'_>, minutes: &[(i64, i64)], generation: i64) -> rusqlite::Result<usize> {
    let mut insert =
        tx.prepare_cached("INSERT INTO rollup_log (minute, generation, series_ids) VALUES (?1, ?2, ?3)")?;
    let mut rows = 0;
    for minute in minutes.chunk_by(|a, b| a.0 == b.0) {
        insert.execute(params![
            minute[0].0,
            generation,
            encode_series(minute.iter().map(|&(_, series)| series))
        ])?;
        rows += 1;
    }
    Ok(rows)
}

/// Which of these (minute, series) pairs, sorted, the log names: whether a minute held
/// something before a write, for the kept minutes. Reads the logged rows of each minute
/// once, keeping only the pairs asked about.
pub fn logged_among(tx: &Transaction<'_>, pairs: &[(i64, i64)]) -> rusqlite::Result<HashSet<(i64, i64)>> {
    let mut select = tx.prepare_cached("SELECT series_ids FROM rollup_log WHERE minute = ?1")?;
    let mut found = HashSet::new();
    for minute in pairs.chunk_by(|a, b| a.0 == b.0) {
        let minute_start = minute[0].0;
        let asked: FxHashSet<i64> = minute.iter().map(|&(_, series)| series).collect();
        let mut rows = select.query([minute_start])?;
        while let Some(row) = rows.next()? {
            decode_series(row.get_ref(0)?.as_blob()?, |series| {
                if asked.contains(&series) {
                    found.insert((minute_start, series));
                }
            })
            .map_err(corrupt)?;
        }
    }
    Ok(found)
}

/// Every pair the log names, at its greatest logged generation.
pub fn pending(conn: &Connection) -> rusqlite::Result<LoggedMarks> {
    let mut select = conn.prepare_cached("SELECT minute, generation, series_ids FROM rollup_log")?;
    let mut rows = select.query([])?;
    let mut marks = LoggedMarks::default();
    while let Some(row) = rows.next()? {
        let minute: i64 = row.get(0)?;
        let generation: i64 = row.get(1)?;
        decode_series(row.get_ref(2)?.as_blob()?, |series| {
            let at = marks.entry((minute, series)).or_insert(generation);
            *at = (*at).max(generation);
        })
        .map_err(corrupt)?;
    }
    Ok(marks)
}

/// Moves the log into `rollup_dirty` inside the caller's write transaction; returns the
/// pairs it marked.
pub fn settle(tx: &Transaction<'_>) -> rusqlite::Result<usize> {
    let logged = pending(tx)?;
    if logged.is_empty() {
        return Ok(0);
    }
    let mut marks: Vec<(i64, i64, i64)> = logged
        .into_iter()
        .map(|((minute, series), generation)| (minute, series, generation))
        .collect();
    // In key order: the upserts walk the mark index forwards.
    marks.sort_unstable();
    super::rollups::set_minute_marks(tx, &marks)?;
    tx.execute("DELETE FROM rollup_log", [])?;
    Ok(marks.len())
}

/// [`settle`] in a transaction of its own, committed only when the log held something
/// (an empty settle costs no sync).
fn settle_now(conn: &mut Connection) -> rusqlite::Result<usize> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let settled = settle(&tx)?;
    if settled > 0 {
        tx.commit()?;
    }
    Ok(settled)
}

/// Marks the log names that `rollup_dirty` does not hold yet (for the backlog).
pub fn unsettled(conn: &Connection) -> rusqlite::Result<u64> {
    let logged = pending(conn)?;
    let mut marked = conn.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM rollup_dirty WHERE level = 0 AND bucket = ?1 AND series_id = ?2)",
    )?;
    let mut count = 0;
    for &(minute, series) in logged.keys() {
        if !marked.query_row(params![minute, series], |r| r.get::<_, bool>(0))? {
            count += 1;
        }
    }
    Ok(count)
}

/// Forgets logged minutes older than `cutoff` (minute retention).
pub fn delete_before(tx: &Transaction<'_>, cutoff: i64) -> rusqlite::Result<usize> {
    tx.execute("DELETE FROM rollup_log WHERE minute < ?1", [cutoff])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decoded(blob: &[u8]) -> Result<Vec<i64>, Corrupt> {
        let mut out = Vec::new();
        decode_series(blob, |id| out.push(id))?;
        Ok(out)
    }

    #[test]
    fn close_ids_take_a_byte_each() {
        let blob = encode_series([1000, 1001, 1003, 1040]);
        // 1000 takes two bytes, each delta one.
        assert_eq!(blob.len(), 5);
        assert_eq!(decoded(&blob), Ok(vec![1000, 1001, 1003, 1040]));
        assert_eq!(decoded(&[]), Ok(vec![]));
    }

    #[test]
    fn a_cut_varint_is_corrupt_at_its_byte() {
        let mut blob = encode_series([5, 100_000]);
        blob.pop();
        assert_eq!(decoded(&blob), Err(Corrupt(1)));
    }

    proptest! {
        #[test]
        fn round_trips_any_ids(ids in proptest::collection::vec(any::<i64>(), 0..200)) {
            prop_assert_eq!(decoded(&encode_series(ids.iter().copied())), Ok(ids));
        }

        #[test]
        fn never_panics_on_arbitrary_bytes(blob in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decoded(&blob);
        }
    }
}
