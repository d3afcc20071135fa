//! The raw samples of the SQLite store, kept as sample runs (`sample_runs`): one row per
//! write, server and minute, whose blob holds that write's samples grouped by series,
//! in arrival order within each (format and read rules in `run_codec`). Every statement that writes or reads
//! raw samples is here — the writer's inserts, the sample API's reads, the rollup pass's
//! scans, retention, deletion and copying to PostgreSQL — so callers see samples, never
//! runs.
//!
//! Why runs: a row per sample cost the writer about 0.3 µs of B-tree work per sample and
//! most of the pages each commit wrote and synced, which held ingest far below
//! VictoriaMetrics (docs/METRICS.md, "Beside VictoriaMetrics"). A run is one row per
//! request's worth. What a row used to settle on insert (a later gauge value replacing an
//! earlier one, histogram observations numbered by arrival) is settled when a minute is
//! read: all runs of the minute are gathered in write order and resolved. Runs of one
//! server are kept apart so that deleting a server deletes rows instead of rewriting
//! other servers' runs; a request's samples all belong to its own server (its series
//! come from that server's series cache or are created under it).

use std::collections::HashSet;
use std::ops::ControlFlow;

use mcp_metrics_core::model::{Kind, RawSample};
use mcp_metrics_core::rollup::align;
use rusqlite::types::Type;
use rusqlite::{Connection, OptionalExtension, ToSql, params};
use rustc_hash::FxHashMap;

use super::MINUTE;
use super::run_codec::{self, RunSample};
use crate::SampleQuery;

/// Start of the minute holding `ts` (`i64::MIN` for the open lower bound).
fn minute_of(ts: i64) -> i64 {
    align(ts, MINUTE)
}

fn corrupt(e: run_codec::Corrupt) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(1, Type::Blob, Box::new(e))
}

/// A sample the writer accepted, before it is stored.
#[derive(Clone, Copy)]
struct Pending {
    series_id: i64,
    ts: i64,
    kind: Kind,
    value: f64,
    /// Its series' place among the bucket's series, in order of first arrival.
    group: u32,
}

/// The samples of one run to be: one server's in one minute.
struct Bucket {
    slot: u32,
    minute: i64,
    samples: Vec<Pending>,
    /// Series id → group, for every series the bucket has.
    groups: FxHashMap<i64, u32>,
    /// Whether every series' samples are together already (a remote-write request sends
    /// them so); otherwise [`Bucket::group_by_series`] brings them together.
    grouped: bool,
}

impl Bucket {
    fn push(&mut self, series_id: i64, ts: i64, kind: Kind, value: f64) {
        let group = match self.samples.last() {
            Some(last) if last.series_id == series_id => last.group,
            _ => {
                let next = self.groups.len() as u32;
                let group = *self.groups.entry(series_id).or_insert(next);
                self.grouped &= group == next;
                group
            }
        };
        self.samples.push(Pending {
            series_id,
            ts,
            kind,
            value,
            group,
        });
    }

    /// Puts each series' samples together, in arrival order, series in order of first
    /// arrival: a stable counting sort by group.
    fn group_by_series(&mut self) {
        if self.grouped {
            return;
        }
        let mut start = vec![0usize; self.groups.len() + 1];
        for s in &self.samples {
            start[s.group as usize + 1] += 1;
        }
        for g in 1..start.len() {
            start[g] += start[g - 1];
        }
        let mut grouped = self.samples.clone();
        for s in &self.samples {
            let at = &mut start[s.group as usize];
            grouped[*at] = *s;
            *at += 1;
        }
        self.samples = grouped;
        self.grouped = true;
    }
}

/// One write's samples, gathered per (server, minute) as the writer accepts them and
/// stored as one run each, each series' samples together and in arrival order (so a
/// later write's sample stays later among those of its (series, ts); resolving on read
/// sorts the rest). Grouping by series, rather than sorting, costs a hash lookup per
/// change of series and makes the run name each series once; the minute marks and the
/// kept minutes then deal with a series once per group, not once per sample.
#[derive(Default)]
pub(crate) struct PendingRuns<'a> {
    servers: Vec<&'a str>,
    buckets: Vec<Bucket>,
    /// (server slot, minute) → bucket: a backfill may span thousands of minutes.
    bucket_of: FxHashMap<(u32, i64), usize>,
    /// The bucket the last sample went to: the next one usually goes there too.
    last: usize,
    /// Samples of the request being pushed: the bucket its first sample goes to reserves
    /// room for them (a request rarely spans two minutes), instead of growing a sample at
    /// a time.
    expected: usize,
}

impl<'a> PendingRuns<'a> {
    /// The next request's samples are about to be pushed.
    pub(crate) fn expect(&mut self, samples: usize) {
        self.expected = samples;
    }

    pub(crate) fn push(&mut self, server_id: &'a str, series_id: i64, ts: i64, kind: Kind, value: f64) {
        // A range check instead of aligning each sample, while samples stay in one minute.
        if let Some(b) = self.buckets.get_mut(self.last)
            && (b.minute..b.minute.saturating_add(MINUTE)).contains(&ts)
            && self.servers[b.slot as usize] == server_id
        {
            // A request that continues the last bucket reserves its room there.
            b.samples.reserve(std::mem::take(&mut self.expected));
            return b.push(series_id, ts, kind, value);
        }
        let minute = minute_of(ts);
        let slot = match self.servers.iter().position(|s| *s == server_id) {
            Some(i) => i,
            None => {
                self.servers.push(server_id);
                self.servers.len() - 1
            }
        } as u32;
        let buckets = &mut self.buckets;
        let room = std::mem::take(&mut self.expected);
        self.last = *self.bucket_of.entry((slot, minute)).or_insert_with(|| {
            buckets.push(Bucket {
                slot,
                minute,
                samples: Vec::with_capacity(room),
                groups: FxHashMap::default(),
                grouped: true,
            });
            buckets.len() - 1
        });
        self.buckets[self.last].push(series_id, ts, kind, value);
    }

    /// The distinct (minute, series) pairs written, sorted: the minutes to mark.
    pub(crate) fn minutes(&self) -> Vec<(i64, i64)> {
        // A bucket's groups are its distinct series; a series named under two servers
        // (which the HTTP layer never sends) would repeat.
        let mut minutes: Vec<(i64, i64)> = self
            .buckets
            .iter()
            .flat_map(|b| b.groups.keys().map(|&series_id| (b.minute, series_id)))
            .collect();
        minutes.sort_unstable();
        minutes.dedup();
        minutes
    }

    /// The samples as (series_id, ts, kind, value), each series' in arrival order (and
    /// together, once inserted).
    pub(crate) fn rows(&self) -> impl Iterator<Item = (i64, i64, Kind, f64)> + '_ {
        self.buckets
            .iter()
            .flat_map(|b| b.samples.iter().map(|s| (s.series_id, s.ts, s.kind, s.value)))
    }

    /// Puts each run's series' samples together (see [`Bucket::group_by_series`]), as
    /// [`PendingRuns::insert`] stores them and [`PendingRuns::rows`] then hands them over.
    pub(crate) fn group_by_series(&mut self) {
        for b in &mut self.buckets {
            b.group_by_series();
        }
    }

    /// Inserts one run per (server, minute), each series' samples together.
    pub(crate) fn insert(&mut self, tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
        self.group_by_series();
        let mut insert =
            tx.prepare_cached("INSERT INTO sample_runs (minute, server_id, samples) VALUES (?1, ?2, ?3)")?;
        let mut blob = Vec::new();
        for b in &mut self.buckets {
            blob.clear();
            // Remote-write-shaped runs take 3 to 5 bytes a sample (integers and short
            // decimals); arbitrary floats up to about 10: the vector grows for those.
            blob.reserve(b.samples.len() * 5 + 1);
            let samples = b.samples.iter().map(|s| RunSample {
                ts: s.ts,
                series_id: s.series_id,
                observation: s.kind == Kind::Histogram,
                value: s.value,
            });
            run_codec::encode(b.minute, samples, &mut blob);
            insert.execute(params![b.minute, self.servers[b.slot as usize], blob])?;
        }
        Ok(())
    }
}

/// Which runs a scan reads: a range of minutes, optionally only the servers of some
/// series (a JSON array of series ids).
struct Scan<'q> {
    from_minute: i64,
    to: i64,
    servers_of_series: Option<&'q str>,
}

/// Reads the runs of `scan` in minute order and hands each minute's samples, resolved
/// and sorted by (ts, series_id, seq), to `each`, until it breaks. `keep` drops samples
/// before resolving (a sample's fate depends only on others of its series and ts).
fn for_each_minute(
    conn: &Connection,
    scan: Scan<'_>,
    keep: impl Fn(&RunSample) -> bool,
    mut each: impl FnMut(&[RawSample]) -> ControlFlow<()>,
) -> rusqlite::Result<()> {
    // Within a minute, runs come per server in insertion (id) order: a series' samples
    // are all in its server's runs, so that is their write order.
    let (sql, args): (&str, Vec<&dyn ToSql>) = match &scan.servers_of_series {
        None => (
            "SELECT minute, samples FROM sample_runs WHERE minute >= ?1 AND minute < ?2
             ORDER BY minute, server_id, id",
            vec![&scan.from_minute, &scan.to],
        ),
        Some(series) => (
            "SELECT minute, samples FROM sample_runs WHERE minute >= ?1 AND minute < ?2
               AND server_id IN (SELECT server_id FROM series WHERE id IN (SELECT value FROM json_each(?3)))
             ORDER BY minute, server_id, id",
            vec![&scan.from_minute, &scan.to, series],
        ),
    };
    let mut stmt = conn.prepare_cached(sql)?;
    let mut rows = stmt.query(args.as_slice())?;
    let mut gathered: Vec<RunSample> = Vec::new();
    let mut resolved: Vec<RawSample> = Vec::new();
    let mut current = None;
    let mut flush = |gathered: &mut Vec<RunSample>| {
        resolved.clear();
        run_codec::resolve(gathered, &mut resolved);
        gathered.clear();
        each(&resolved)
    };
    while let Some(row) = rows.next()? {
        let minute: i64 = row.get(0)?;
        if current.is_some_and(|done| done != minute) && flush(&mut gathered).is_break() {
            return Ok(());
        }
        current = Some(minute);
        let blob = row.get_ref(1)?.as_blob()?;
        run_codec::decode(minute, blob, |s| {
            if keep(&s) {
                gathered.push(s);
            }
        })
        .map_err(corrupt)?;
    }
    if current.is_some() {
        let _ = flush(&mut gathered);
    }
    Ok(())
}

/// Raw samples of some series in [from, to), in key order after a cursor, at most `limit`.
pub(crate) fn read(conn: &Connection, q: &SampleQuery) -> rusqlite::Result<Vec<RawSample>> {
    let ids = serde_json::to_string(&q.series_ids).unwrap_or_else(|_| "[]".into());
    let wanted: HashSet<i64> = q.series_ids.iter().copied().collect();
    let after = q.after.unwrap_or((i64::MIN, i64::MIN, i64::MIN));
    let scan = Scan {
        from_minute: minute_of(q.from.max(after.0)),
        to: q.to,
        servers_of_series: Some(&ids),
    };
    let (from, to) = (q.from, q.to);
    page(
        conn,
        scan,
        |s| s.ts >= from && s.ts < to && wanted.contains(&s.series_id),
        after,
        q.limit,
    )
}

/// The first `limit` samples of `scan` that `keep` keeps, in key order after `after`:
/// a page of the sample API or of a copy.
fn page(
    conn: &Connection,
    scan: Scan<'_>,
    keep: impl Fn(&RunSample) -> bool,
    after: (i64, i64, i64),
    limit: usize,
) -> rusqlite::Result<Vec<RawSample>> {
    let mut out = Vec::new();
    if limit == 0 {
        return Ok(out);
    }
    // Samples before the cursor's millisecond are dropped before resolving (a sample's
    // fate depends only on its series and millisecond): paging through a dense minute
    // then sorts only what is left of it, not the whole minute on every page.
    let keep = |s: &RunSample| s.ts >= after.0 && keep(s);
    for_each_minute(conn, scan, keep, |samples| {
        for s in samples.iter().filter(|s| (s.timestamp, s.series_id, s.seq) > after) {
            out.push(s.clone());
            if out.len() == limit {
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    })?;
    Ok(out)
}

/// The distinct (minute, series) pairs with raw samples in [from, to).
pub(crate) fn minutes_with_samples(conn: &Connection, from: i64, to: i64) -> rusqlite::Result<Vec<(i64, i64)>> {
    let mut stmt = conn.prepare_cached("SELECT minute, samples FROM sample_runs WHERE minute >= ?1 AND minute < ?2")?;
    let mut rows = stmt.query(params![minute_of(from), to])?;
    let mut seen: HashSet<(i64, i64)> = HashSet::new();
    while let Some(row) = rows.next()? {
        let minute: i64 = row.get(0)?;
        run_codec::decode(minute, row.get_ref(1)?.as_blob()?, |s| {
            if s.ts >= from && s.ts < to {
                seen.insert((minute, s.series_id));
            }
        })
        .map_err(corrupt)?;
    }
    let mut out: Vec<_> = seen.into_iter().collect();
    out.sort_unstable();
    Ok(out)
}

/// Deletes one slice of raw samples older than `cutoff` (at most an hour of data per
/// call, so the writer lock is held briefly); returns samples deleted and whether more
/// remain. Whole minutes go as rows; the minute the cutoff falls in has its runs
/// rewritten without the samples before it.
pub(crate) fn delete_older_slice(conn: &mut Connection, cutoff: i64) -> rusqlite::Result<(u64, bool)> {
    let oldest: Option<i64> = conn
        .query_row("SELECT minute FROM sample_runs ORDER BY minute LIMIT 1", [], |r| {
            r.get(0)
        })
        .optional()?;
    let Some(oldest) = oldest.filter(|m| *m < cutoff) else {
        return Ok((0, false));
    };
    let until = cutoff.min(oldest + 3_600_000);
    let whole_until = minute_of(until);
    let tx = conn.transaction()?;
    // Counted as the API shows them: a value written twice at one ts is one sample.
    let mut deleted = 0u64;
    let scan = Scan {
        from_minute: oldest,
        to: until,
        servers_of_series: None,
    };
    for_each_minute(
        &tx,
        scan,
        |s| s.ts < until,
        |samples| {
            deleted += samples.len() as u64;
            ControlFlow::Continue(())
        },
    )?;
    tx.execute("DELETE FROM sample_runs WHERE minute < ?1", [whole_until])?;
    if whole_until < until {
        trim_minute(&tx, whole_until, until)?;
    }
    tx.commit()?;
    Ok((deleted, until < cutoff))
}

/// Rewrites the runs of `minute` without their samples before `cutoff`.
fn trim_minute(tx: &rusqlite::Transaction<'_>, minute: i64, cutoff: i64) -> rusqlite::Result<()> {
    let runs: Vec<(i64, Vec<u8>)> = tx
        .prepare("SELECT id, samples FROM sample_runs WHERE minute = ?1")?
        .query_map([minute], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (id, blob) in runs {
        let mut kept = Vec::new();
        run_codec::decode(minute, &blob, |s| kept.push(s)).map_err(corrupt)?;
        let before = kept.len();
        kept.retain(|s| s.ts >= cutoff);
        if kept.len() == before {
            continue;
        }
        if kept.is_empty() {
            tx.execute("DELETE FROM sample_runs WHERE id = ?1", [id])?;
        } else {
            let mut rewritten = Vec::new();
            run_codec::encode(minute, kept.iter().copied(), &mut rewritten);
            tx.execute(
                "UPDATE sample_runs SET samples = ?2 WHERE id = ?1",
                params![id, rewritten],
            )?;
        }
    }
    Ok(())
}

/// Calls `each(series_id, ts, value)` for every raw sample in [from, to), in key order:
/// the rollup pass's read of a bucket the writer did not keep.
pub(crate) fn for_each_in(
    conn: &Connection,
    from: i64,
    to: i64,
    wanted: impl Fn(i64) -> bool,
    mut each: impl FnMut(i64, i64, f64),
) -> rusqlite::Result<()> {
    let scan = Scan {
        from_minute: minute_of(from),
        to,
        servers_of_series: None,
    };
    for_each_minute(
        conn,
        scan,
        // Other series are dropped before the minute is resolved and sorted.
        |s| s.ts >= from && s.ts < to && wanted(s.series_id),
        |samples| {
            for s in samples {
                each(s.series_id, s.timestamp, s.value);
            }
            ControlFlow::Continue(())
        },
    )
}

/// Deletes the raw samples of a server's series, inside the caller's transaction.
pub(crate) fn delete_of_server(tx: &rusqlite::Transaction<'_>, server_id: &str) -> rusqlite::Result<usize> {
    tx.execute("DELETE FROM sample_runs WHERE server_id = ?1", [server_id])
}

/// How many raw samples there are: the copy command's total.
pub(crate) fn count(conn: &Connection) -> rusqlite::Result<u64> {
    count_through(conn, (i64::MAX, i64::MAX, i64::MAX))
}

/// How many raw samples there are up to and including `cursor` (ts, series_id, seq): how
/// far an interrupted copy had come.
pub(crate) fn count_through(conn: &Connection, cursor: (i64, i64, i64)) -> rusqlite::Result<u64> {
    let mut n = 0u64;
    let scan = Scan {
        from_minute: i64::MIN,
        to: cursor.0.saturating_add(1),
        servers_of_series: None,
    };
    for_each_minute(
        conn,
        scan,
        |s| s.ts <= cursor.0,
        |samples| {
            n += samples
                .iter()
                .filter(|s| (s.timestamp, s.series_id, s.seq) <= cursor)
                .count() as u64;
            ControlFlow::Continue(())
        },
    )?;
    Ok(n)
}

/// The next `limit` raw samples after `cursor` (ts, series_id, seq), in key order: a
/// copy's page.
pub(crate) fn page_after(conn: &Connection, cursor: (i64, i64, i64), limit: usize) -> rusqlite::Result<Vec<RawSample>> {
    let scan = Scan {
        from_minute: minute_of(cursor.0),
        to: i64::MAX,
        servers_of_series: None,
    };
    page(conn, scan, |_| true, cursor, limit)
}

/// Moves the rows of the old one-row-per-sample table into runs, one per (server,
/// minute): the migration to runs. Rows of series that no longer exist are dropped (they
/// were unreachable already).
pub(crate) fn migrate_rows_into_runs(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<u64> {
    let mut stmt = tx.prepare(
        "SELECT m.ts, m.series_id, m.value, s.server_id, s.kind FROM server_metrics m
         JOIN series s ON s.id = m.series_id ORDER BY m.ts, m.series_id, m.seq",
    )?;
    let mut rows = stmt.query([])?;
    let mut minute = None;
    let mut pending: std::collections::BTreeMap<String, Vec<RunSample>> = Default::default();
    let mut moved = 0;
    let mut insert = tx.prepare("INSERT INTO sample_runs (minute, server_id, samples) VALUES (?1, ?2, ?3)")?;
    let mut flush =
        |minute: i64, pending: &mut std::collections::BTreeMap<String, Vec<RunSample>>| -> rusqlite::Result<()> {
            for (server, samples) in std::mem::take(pending) {
                let mut blob = Vec::new();
                run_codec::encode(minute, samples.iter().copied(), &mut blob);
                insert.execute(params![minute, server, blob])?;
            }
            Ok(())
        };
    while let Some(r) = rows.next()? {
        let ts: i64 = r.get(0)?;
        if minute.is_some_and(|m| m != minute_of(ts)) {
            flush(minute.unwrap_or_default(), &mut pending)?;
        }
        minute = Some(minute_of(ts));
        let kind: i64 = r.get(4)?;
        pending.entry(r.get(3)?).or_default().push(RunSample {
            ts,
            series_id: r.get(1)?,
            observation: Kind::from_i64(kind) == Some(Kind::Histogram),
            value: super::value_codec::decode(r.get_ref(2)?),
        });
        moved += 1;
    }
    if let Some(m) = minute {
        flush(m, &mut pending)?;
    }
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sqlite::migrations;

    const M: i64 = 1_700_000_040_000; // a minute start

    /// A migrated database with servers `a` and `b`: series 1 (gauge) and 2
    /// (histogram) of `a`, series 3 (gauge) of `b`.
    fn database() -> Connection {
        let mut conn = Connection::open_in_memory().unwrap();
        migrations::run(&mut conn, 0).unwrap();
        seed(&conn);
        conn
    }

    fn seed(conn: &Connection) {
        conn.execute_batch(
            "INSERT INTO servers (id, created_at, updated_at) VALUES ('a', 0, 0), ('b', 0, 0);
             INSERT INTO series (id, server_id, name, tags, kind, created_at) VALUES
               (1, 'a', 'g', '{}', 0, 0), (2, 'a', 'h', '{}', 2, 0), (3, 'b', 'g', '{}', 0, 0);",
        )
        .unwrap();
    }

    fn kind(series_id: i64) -> Kind {
        if series_id == 2 { Kind::Histogram } else { Kind::Gauge }
    }

    fn server(series_id: i64) -> &'static str {
        if series_id == 3 { "b" } else { "a" }
    }

    /// Commits one write of (series, ts offset, value) samples, in the given order.
    fn write(conn: &mut Connection, samples: &[(i64, i64, f64)]) {
        let tx = conn.transaction().unwrap();
        let mut runs = PendingRuns::default();
        for &(series, off, value) in samples {
            runs.push(server(series), series, M + off, kind(series), value);
        }
        runs.insert(&tx).unwrap();
        tx.commit().unwrap();
    }

    fn query(series_ids: &[i64], after: Option<(i64, i64, i64)>, limit: usize) -> SampleQuery {
        SampleQuery {
            series_ids: series_ids.to_vec(),
            from: M - 3_600_000,
            to: M + 3_600_000,
            after,
            limit,
        }
    }

    fn shown(samples: &[RawSample]) -> Vec<(i64, i64, i64, f64)> {
        samples
            .iter()
            .map(|s| (s.timestamp - M, s.series_id, s.seq, s.value))
            .collect()
    }

    /// Writes spread over minutes, servers and several commits: values written again
    /// replace earlier ones, observations of one millisecond are numbered in arrival
    /// order across writes.
    fn history(conn: &mut Connection) {
        write(
            conn,
            &[(1, 0, 1.0), (2, 10, 5.0), (2, 10, 6.0), (3, 10, 30.0), (1, 61_000, 7.0)],
        );
        write(conn, &[(2, 10, 7.0), (1, 0, 2.0), (3, -60_000, 29.0)]);
        write(conn, &[(1, 0, 3.0), (2, 10, 8.0), (1, 120_500, 9.5)]);
    }

    #[test]
    fn reads_resolve_overwrites_and_observation_order_across_writes() {
        let mut conn = database();
        history(&mut conn);
        let all = read(&conn, &query(&[1, 2, 3], None, 100)).unwrap();
        assert_eq!(
            shown(&all),
            vec![
                (-60_000, 3, 0, 29.0),
                (0, 1, 0, 3.0),
                (10, 2, 0, 5.0),
                (10, 2, 1, 6.0),
                (10, 2, 2, 7.0),
                (10, 2, 3, 8.0),
                (10, 3, 0, 30.0),
                (61_000, 1, 0, 7.0),
                (120_500, 1, 0, 9.5),
            ]
        );
        // Paging one at a time gives the same list, and the time range is half-open.
        let mut paged = Vec::new();
        let mut after = None;
        loop {
            let page = read(&conn, &query(&[1, 2, 3], after, 1)).unwrap();
            let Some(last) = page.last() else { break };
            after = Some((last.timestamp, last.series_id, last.seq));
            paged.extend(page);
        }
        assert_eq!(paged, all);
        let narrow = SampleQuery {
            from: M + 10,
            to: M + 61_000,
            ..query(&[2, 1], None, 100)
        };
        assert_eq!(shown(&read(&conn, &narrow).unwrap()), shown(&all[2..6]));
        // The copy's pages and counts see the same samples.
        let mut copied = Vec::new();
        let mut cursor = (i64::MIN, i64::MIN, i64::MIN);
        loop {
            let page = page_after(&conn, cursor, 2).unwrap();
            let Some(last) = page.last() else { break };
            cursor = (last.timestamp, last.series_id, last.seq);
            copied.extend(page);
            assert_eq!(count_through(&conn, cursor).unwrap(), copied.len() as u64);
        }
        assert_eq!(copied, all);
        assert_eq!(count(&conn).unwrap(), 9);
        // The rollup scan and the minute marks.
        let mut scanned = Vec::new();
        for_each_in(
            &conn,
            M,
            M + 60_000,
            |_| true,
            |id, ts, v| scanned.push((ts - M, id, v)),
        )
        .unwrap();
        assert_eq!(
            scanned,
            vec![
                (0, 1, 3.0),
                (10, 2, 5.0),
                (10, 2, 6.0),
                (10, 2, 7.0),
                (10, 2, 8.0),
                (10, 3, 30.0)
            ]
        );
        assert_eq!(
            minutes_with_samples(&conn, M - 60_000, M + 120_000).unwrap(),
            vec![(M - 60_000, 3), (M, 1), (M, 2), (M, 3), (M + 60_000, 1)]
        );
    }

    #[test]
    fn interleaved_series_are_stored_together_in_arrival_order() {
        let mut conn = database();
        write(
            &mut conn,
            &[(1, 0, 1.0), (2, 10, 5.0), (1, 0, 2.0), (2, 10, 6.0), (1, 0, 3.0)],
        );
        let blob: Vec<u8> = conn
            .query_row("SELECT samples FROM sample_runs", [], |r| r.get(0))
            .unwrap();
        let mut stored = Vec::new();
        run_codec::decode(M, &blob, |s| stored.push((s.series_id, s.value))).unwrap();
        assert_eq!(stored, vec![(1, 1.0), (1, 2.0), (1, 3.0), (2, 5.0), (2, 6.0)]);
        let read_back = read(&conn, &query(&[1, 2], None, 100)).unwrap();
        assert_eq!(
            shown(&read_back),
            vec![(0, 1, 0, 3.0), (10, 2, 0, 5.0), (10, 2, 1, 6.0)]
        );
    }

    #[test]
    fn deleting_a_server_keeps_the_other_servers_samples_of_the_same_minutes() {
        let mut conn = database();
        history(&mut conn);
        let tx = conn.transaction().unwrap();
        delete_of_server(&tx, "a").unwrap();
        tx.commit().unwrap();
        let left = read(&conn, &query(&[1, 2, 3], None, 100)).unwrap();
        assert_eq!(shown(&left), vec![(-60_000, 3, 0, 29.0), (10, 3, 0, 30.0)]);
    }

    #[test]
    fn retention_deletes_exactly_the_samples_before_the_cutoff() {
        let mut conn = database();
        history(&mut conn);
        // Cut inside minute M: (0, 1) goes, the four observations at +10 and (10, 3) stay.
        let (deleted, more) = delete_older_slice(&mut conn, M + 10).unwrap();
        assert_eq!((deleted, more), (2, false));
        let left = read(&conn, &query(&[1, 2, 3], None, 100)).unwrap();
        assert_eq!(left.len(), 7);
        assert_eq!(left[0].timestamp, M + 10);
        assert_eq!(delete_older_slice(&mut conn, M + 10).unwrap(), (0, false));
        // Cut the minute's rest: its runs are deleted, not left empty.
        assert_eq!(delete_older_slice(&mut conn, M + 60_000).unwrap(), (5, false));
        let rows: i64 = conn
            .query_row("SELECT count(*) FROM sample_runs WHERE minute = ?1", [M], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 0);
        // Slices of an hour at most: the two samples of the next minutes, then the one
        // five hours on.
        write(&mut conn, &[(1, 5 * 3_600_000, 1.0)]);
        assert_eq!(delete_older_slice(&mut conn, M + 6 * 3_600_000).unwrap(), (2, true));
        assert_eq!(delete_older_slice(&mut conn, M + 6 * 3_600_000).unwrap(), (1, false));
    }

    #[test]
    fn migrating_moves_every_row_into_runs() {
        let mut conn = Connection::open_in_memory().unwrap();
        for (_, _, sql) in &migrations::MIGRATIONS[..4] {
            conn.execute_batch(sql).unwrap();
        }
        conn.execute_batch(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at INTEGER NOT NULL);
             INSERT INTO schema_migrations VALUES (1, '', 0), (2, '', 0), (3, '', 0), (4, '', 0);",
        )
        .unwrap();
        seed(&conn);
        let rows = [
            (M - 60_000, 3, 0, 29.0),
            (M, 1, 0, 3.0),
            (M + 10, 2, 0, 5.0),
            (M + 10, 2, 1, 6.5),
            (M + 10, 2, 2, 0.1234),
            (M + 10, 3, 0, -0.0),
            (M + 61_000, 1, 0, 7.0),
            (M + 61_000, 99, 0, 1.0), // a series that is gone
        ];
        for (ts, series, seq, value) in rows {
            conn.execute(
                "INSERT INTO server_metrics (ts, series_id, seq, value) VALUES (?1, ?2, ?3, ?4)",
                params![ts, series, seq, crate::sqlite::value_codec::encode(value)],
            )
            .unwrap();
        }
        assert_eq!(migrations::run(&mut conn, 0).unwrap(), vec![5, 6]);
        let got = read(&conn, &query(&[1, 2, 3], None, 100)).unwrap();
        let got: Vec<_> = got
            .iter()
            .map(|s| (s.timestamp, s.series_id, s.seq, s.value.to_bits()))
            .collect();
        let expected: Vec<_> = rows[..7].iter().map(|r| (r.0, r.1, r.2, r.3.to_bits())).collect();
        assert_eq!(got, expected);
        assert_eq!(
            count(&conn).unwrap(),
            7,
            "the row of the series that is gone was dropped"
        );
        let old_table: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 'server_metrics'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(old_table, 0);
    }
}
