//! The ingest transaction and the raw read.
//!
//! One transaction per batch. Guards, series, events and credential touches are sent
//! pipelined (tokio-postgres queues statements on one connection and the server runs
//! them in order), so a batch of many requests costs a few round trips, not one per
//! statement, while every check still sees the statements before it exactly as the
//! SQLite writer's sequential loop does.
//!
//! Samples go in by binary COPY straight into the partitioned table (it routes each row
//! to its day); when a row exists already the batch runs again with upserts: see
//! `write_samples`.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::pin::pin;

use mcp_metrics_core::model::{Kind, RawSample, SeriesInfo};
use mcp_metrics_core::rollup::{BucketStats, align};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;

use super::rollups::BucketColumns;
use super::{PgResult, PoolClient, pipeline};
use crate::sqlite::tags_to_json;
use crate::{MINUTE, RequestOutcome, SampleQuery, SeriesRef, WriteBatch};

/// Batches of fewer rows go in by one INSERT from arrays instead of COPY. PostgreSQL
/// before 17 keeps a resource-owner entry per COPY buffer slot (up to 1,000 a statement)
/// in a hash that degrades to a linear scan when every entry is the same tuple
/// descriptor, so a COPY of 1,000 rows spends most of its time there. Measured with
/// `write_path_timing` (tests/postgres.rs): at 1,000 rows a batch INSERT from arrays
/// took 324 k rows/s and COPY 229 k; at 4,000 rows COPY 379 k and INSERT 298 k.
const COPY_MIN_ROWS: usize = 2_000;

/// A sample ready for the table: the series of a known id, or of the n-th new series of
/// request r (resolved inside the transaction).
#[derive(Debug, Clone, Copy)]
pub struct Row {
    request: u32,
    /// Place among its request's samples.
    position: u32,
    series: SeriesRef,
    ts: i64,
    kind: Kind,
    value: f64,
}

/// Flattens the batch's samples in arrival order, once per batch however often its
/// transaction has to run.
pub fn prepare_rows(batch: &WriteBatch) -> Vec<Row> {
    let total = batch.requests.iter().map(|r| r.samples.len()).sum();
    let mut rows = Vec::with_capacity(total);
    for (i, request) in batch.requests.iter().enumerate() {
        for (position, s) in request.samples.iter().enumerate() {
            rows.push(Row {
                request: i as u32,
                position: position as u32,
                series: s.series,
                ts: s.timestamp,
                kind: s.kind,
                value: s.value,
            });
        }
    }
    rows
}

/// What the checks before storing decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Store,
    ServerGone,
    Replayed,
    Duplicate,
}

/// How a batch's samples go in: `Copy` first; `Upsert` when COPY met a row that exists
/// already (the caller runs the batch again: a failed COPY aborts the transaction).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleWrite {
    Copy,
    Upsert,
}

pub async fn write_batch(
    client: &mut PoolClient,
    batch: &WriteBatch,
    rows: &[Row],
    mode: SampleWrite,
) -> PgResult<Vec<RequestOutcome>> {
    let now = batch.now;
    let tx = client.transaction().await?;
    let (lock_servers, live_keys, guard_signature, guard_digest, insert_series, find_series, insert_event, touch_credential) = tokio::try_join!(
        tx.prepare_cached("SELECT id FROM servers WHERE id = ANY($1) ORDER BY id FOR KEY SHARE"),
        tx.prepare_cached(
            "SELECT key_id, server_id FROM credentials WHERE key_id = ANY($1) AND revoked_at IS NULL
             ORDER BY key_id FOR KEY SHARE",
        ),
        // A guard row that exists and has not expired makes the upsert a no-op, so zero
        // changed rows means "seen inside the window" — also when another node's
        // transaction inserted it: the upsert waits for that one and then sees its row.
        tx.prepare_cached(
            "INSERT INTO seen_signatures (signature, expires_at) VALUES ($1, $2)
             ON CONFLICT (signature) DO UPDATE SET expires_at = EXCLUDED.expires_at
             WHERE seen_signatures.expires_at <= $3",
        ),
        tx.prepare_cached(
            "INSERT INTO request_digests (key_id, digest, expires_at) VALUES ($1, $2, $3)
             ON CONFLICT (key_id, digest) DO UPDATE SET expires_at = EXCLUDED.expires_at
             WHERE request_digests.expires_at <= $4",
        ),
        tx.prepare_cached(
            "INSERT INTO series (server_id, name, tags, kind, created_at) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (server_id, name, tags) DO NOTHING RETURNING id, kind",
        ),
        tx.prepare_cached("SELECT id, kind FROM series WHERE server_id = $1 AND name = $2 AND tags = $3"),
        tx.prepare_cached(
            "INSERT INTO server_events (server_id, kind, title, detail, at, source) VALUES ($1, $2, $3, $4, $5, $6)
             RETURNING id",
        ),
        tx.prepare_cached(
            "UPDATE credentials SET last_used_at = $2::BIGINT WHERE key_id = $1 AND (last_used_at IS NULL OR last_used_at <= $2::BIGINT - 60000)",
        ),
    )?;

    // A request for a deleted server stores nothing: its new series would break the
    // foreign key and with it the whole group's transaction, and its other samples would
    // name series that are gone. The key-share lock keeps the servers that exist from
    // being deleted until this commits (`delete_server` locks the row first, so it then
    // sees everything this write stored).
    let mut servers: Vec<&str> = batch.requests.iter().flat_map(|r| r.servers_written()).collect();
    servers.sort_unstable();
    servers.dedup();
    // A request whose key went with its server, or was revoked, stores nothing either:
    // the server may exist again under the same id, with other keys. The key-share lock
    // makes a revocation wait for this write: `revoke_credential` commits `revoked_at`
    // first (later checks find the key revoked and lock nothing), then locks the row
    // `FOR UPDATE`, which waits for every write that found the key live, so a revocation
    // that returned has no write of that key after it. Both
    // queries go in one round trip; the server runs the second after the first has its
    // locks, on a fresh snapshot.
    let mut keys: Vec<&str> = batch
        .requests
        .iter()
        .filter(|r| r.require_credential)
        .map(|r| r.key_id.as_str())
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let (locked, key_rows) = tokio::try_join!(
        async {
            if servers.is_empty() {
                Ok(Vec::new())
            } else {
                tx.query(&lock_servers, &[&servers]).await
            }
        },
        async {
            if keys.is_empty() {
                Ok(Vec::new())
            } else {
                tx.query(&live_keys, &[&keys]).await
            }
        },
    )?;
    let existing: std::collections::HashSet<String> = locked.iter().map(|row| row.get(0)).collect();
    let key_servers: HashMap<String, String> = key_rows.iter().map(|row| (row.get(0), row.get(1))).collect();
    // What becomes of each request, decided check by check; each check runs only for
    // the requests still to be stored.
    let mut verdicts: Vec<Verdict> = batch
        .requests
        .iter()
        .map(|r| {
            let key_live = !r.require_credential || key_servers.get(&r.key_id) == Some(&r.server_id);
            if key_live && r.servers_written().all(|s| existing.contains(s)) {
                Verdict::Store
            } else {
                Verdict::ServerGone
            }
        })
        .collect();
    // Replay guards, in request order.
    let replay_expiry = now + batch.replay_window_ms;
    let replayed = pipeline(batch.requests.iter().zip(&verdicts).map(|(r, &verdict)| {
        let tx = &tx;
        let stmt = &guard_signature;
        async move {
            match (&r.signature, verdict) {
                (Some(sig), Verdict::Store) => Ok(tx.execute(stmt, &[&&sig[..], &replay_expiry, &now]).await? == 0),
                _ => Ok::<_, tokio_postgres::Error>(false),
            }
        }
    }))
    .await?;
    verdicts
        .iter_mut()
        .zip(replayed)
        .filter(|(_, hit)| *hit)
        .for_each(|(v, _)| *v = Verdict::Replayed);
    // Retry guards.
    let retry_expiry = now + batch.retry_window_ms;
    let duplicate = pipeline(batch.requests.iter().zip(&verdicts).map(|(r, &verdict)| {
        let tx = &tx;
        let stmt = &guard_digest;
        async move {
            match (&r.body_digest, verdict) {
                (Some(d), Verdict::Store) => {
                    Ok(tx.execute(stmt, &[&r.key_id, &&d[..], &retry_expiry, &now]).await? == 0)
                }
                _ => Ok::<_, tokio_postgres::Error>(false),
            }
        }
    }))
    .await?;
    verdicts
        .iter_mut()
        .zip(duplicate)
        .filter(|(_, hit)| *hit)
        .for_each(|(v, _)| *v = Verdict::Duplicate);
    let stored: Vec<bool> = verdicts.iter().map(|v| *v == Verdict::Store).collect();

    // New series: inserted, or found when this batch or another node created it first.
    let wanted: Vec<(usize, &crate::NewSeries)> = batch
        .requests
        .iter()
        .enumerate()
        .filter(|(i, _)| stored[*i])
        .flat_map(|(i, r)| r.new_series.iter().map(move |n| (i, n)))
        .collect();
    let tags: Vec<String> = wanted.iter().map(|(_, n)| tags_to_json(&n.key.tags)).collect();
    let plans = plan_new_series(&tx, batch.max_series_per_server, &wanted, &tags, &find_series).await?;
    let inserted = pipeline(wanted.iter().zip(&tags).zip(&plans).map(|(((_, n), tags), plan)| {
        let (tx, insert_series) = (&tx, &insert_series);
        async move {
            if *plan != Plan::Make {
                return Ok(None);
            }
            let kind = n.kind.to_i64() as i16;
            tx.query_opt(insert_series, &[&n.key.server_id, &n.key.name, tags, &kind, &now])
                .await
        }
    }))
    .await?;
    let found = pipeline(
        wanted
            .iter()
            .zip(&tags)
            .zip(&inserted)
            .zip(&plans)
            .map(|((((_, n), tags), row), plan)| {
                let tx = &tx;
                let find = &find_series;
                async move {
                    match (plan, row) {
                        (Plan::Refused, _) => Ok(None),
                        (Plan::Found(id, kind), _) => Ok(Some((*id, *kind))),
                        (Plan::Make, Some(r)) => Ok(Some((r.get::<_, i64>(0), r.get::<_, i16>(1)))),
                        (Plan::Make, None) => tx
                            .query_one(find, &[&n.key.server_id, &n.key.name, tags])
                            .await
                            .map(|r| Some((r.get::<_, i64>(0), r.get::<_, i16>(1)))),
                    }
                }
            }),
    )
    .await?;
    // Each request's new series as made, `None` where the limit refused it.
    let mut made: Vec<Vec<Option<SeriesInfo>>> = vec![Vec::new(); batch.requests.len()];
    for ((i, n), found) in wanted.iter().zip(found) {
        made[*i].push(found.map(|(id, kind)| SeriesInfo {
            id,
            key: n.key.clone(),
            kind: Kind::from_i64(kind.into()).unwrap_or(n.kind),
        }));
    }

    // Events of stored requests.
    let event_ids = pipeline(batch.requests.iter().zip(&stored).map(|(r, &stored)| {
        let tx = &tx;
        let stmt = &insert_event;
        async move {
            match (&r.event, stored) {
                (Some(e), true) => {
                    let row = tx
                        .query_one(
                            stmt,
                            &[&e.server_id, &e.kind, &e.title, &e.detail, &e.at, &e.source.as_str()],
                        )
                        .await?;
                    Ok(Some(row.get::<_, i64>(0)))
                }
                _ => Ok::<_, tokio_postgres::Error>(None),
            }
        }
    }))
    .await?;

    // Each key once, in a fixed order, so two nodes never lock credentials crosswise.
    let mut keys: Vec<&str> = batch
        .requests
        .iter()
        .zip(&stored)
        .filter(|(_, s)| **s)
        .map(|(r, _)| r.key_id.as_str())
        .collect();
    keys.sort_unstable();
    keys.dedup();
    pipeline(keys.iter().map(|k| {
        let (tx, touch_credential) = (&tx, &touch_credential);
        async move { tx.execute(touch_credential, &[k, &now]).await }
    }))
    .await?;

    // Resolve the samples of stored requests to series ids. A series another request
    // created first as another kind keeps it; the samples meant for the other kind are
    // refused, so a series never holds rows of two kinds.
    let mut kind_conflicts: Vec<Vec<(u32, Kind)>> = vec![Vec::new(); batch.requests.len()];
    let mut series_refused: Vec<Vec<u32>> = vec![Vec::new(); batch.requests.len()];
    let mut samples: Vec<(i64, i64, i32, bool, f64)> = rows
        .iter()
        .filter(|r| stored[r.request as usize])
        .filter_map(|r| match r.series {
            SeriesRef::Known(id) => Some((r.ts, id, 0, r.kind == Kind::Histogram, r.value)),
            SeriesRef::New(n) => match &made[r.request as usize][n as usize] {
                Some(created) => {
                    if created.kind == r.kind {
                        Some((r.ts, created.id, 0, r.kind == Kind::Histogram, r.value))
                    } else {
                        kind_conflicts[r.request as usize].push((r.position, created.kind));
                        None
                    }
                }
                None => {
                    series_refused[r.request as usize].push(r.position);
                    None
                }
            },
        })
        .collect();
    // A stable sort keeps arrival order within one (ts, series): the last gauge write wins
    // and histogram observations are ranked (the seq column, counted from what is stored
    // already) in the order they came.
    samples.sort_by_key(|&(ts, series_id, ..)| (ts, series_id));
    let mut deduped: Vec<(i64, i64, i32, bool, f64)> = Vec::with_capacity(samples.len());
    let mut histograms = false;
    for s in samples {
        match deduped.last_mut() {
            Some(last) if (last.0, last.1) == (s.0, s.1) => {
                if s.3 {
                    histograms = true;
                    let rank = last.2 + 1;
                    deduped.push((s.0, s.1, rank, true, s.4));
                } else {
                    *last = s;
                }
            }
            _ => {
                histograms |= s.3;
                deduped.push(s);
            }
        }
    }

    if !deduped.is_empty() {
        write_samples(&tx, &deduped, histograms, mode).await?;

        // Every minute that received a sample is recomputed by the rollup job, from the
        // earliest sample of this batch in each (minute, series) on, and this batch's own
        // bucket of each is kept for the job to merge. deduped is in (ts, series, seq)
        // order, so each series' samples come in the order a fold takes them.
        let mut partials: HashMap<(i64, i64), BucketStats> = HashMap::new();
        for &(ts, series_id, _, histogram, value) in &deduped {
            match partials.entry((align(ts, MINUTE), series_id)) {
                Entry::Occupied(mut e) => e.get_mut().push(ts, value),
                Entry::Vacant(e) => {
                    let kind = if histogram { Kind::Histogram } else { Kind::Gauge };
                    e.insert(BucketStats::fold(kind, [(ts, value)]).expect("one sample"));
                }
            }
        }
        let mut partials: Vec<((i64, i64), BucketStats)> = partials.into_iter().collect();
        partials.sort_unstable_by_key(|p| p.0);
        let buckets: Vec<i64> = partials.iter().map(|p| p.0.0).collect();
        let ids: Vec<i64> = partials.iter().map(|p| p.0.1).collect();
        // An upsert may have replaced a stored gauge value: then the minute is recomputed
        // from its start (NULL), as the stored bucket holds the old value.
        let firsts: Vec<Option<i64>> = partials
            .iter()
            .map(|p| (mode == SampleWrite::Copy).then_some(p.1.first_ts))
            .collect();
        // Appended, not upserted: no row lock shared with concurrent commits; one row per
        // minute with its series as arrays (a row per series made logging and moving the
        // log cost more than the rest of the rollup bookkeeping). The rollup job turns the
        // log into marks (rollups.rs, `absorb_log`). The transaction id is the xmin of the
        // rows COPY just inserted (no savepoint: a subtransaction would give them an id of
        // their own).
        let log_params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&buckets, &ids, &firsts];
        // Prepared once per connection: planning them at every commit showed up in the
        // per-transaction cost.
        let (log_insert, partials_insert) = tokio::try_join!(
            tx.prepare_cached(
                "INSERT INTO rollup_log (xid, bucket, series_ids, min_ts)
                 SELECT pg_current_xact_id()::xid::text::bigint, b, array_agg(s), array_agg(m)
                 FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS x(b, s, m) GROUP BY b",
            ),
            tx.prepare_cached(
                "INSERT INTO rollup_partials (xid, series_id, bucket, count, sum, min, max, first, first_ts, last,
                                              last_ts, increase, sketch)
                 SELECT pg_current_xact_id()::xid::text::bigint, * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[],
                     $4::float8[], $5::float8[], $6::float8[], $7::float8[], $8::bigint[], $9::float8[], $10::bigint[],
                     $11::float8[], $12::bytea[])",
            ),
        )?;
        let log = tx.execute(&log_insert, &log_params);
        if mode == SampleWrite::Copy {
            let mut columns = BucketColumns::default();
            for ((bucket, series_id), stats) in &partials {
                columns.push(*series_id, *bucket, stats);
            }
            let params = columns.params();
            let partials = tx.execute(&partials_insert, &params);
            tokio::try_join!(log, partials)?;
        } else {
            log.await?;
        }
    }
    tx.commit().await?;

    let mut outcomes = Vec::with_capacity(batch.requests.len());
    for ((((verdict, made), event_id), kind_conflicts), series_refused) in verdicts
        .into_iter()
        .zip(made)
        .zip(event_ids)
        .zip(kind_conflicts)
        .zip(series_refused)
    {
        outcomes.push(match verdict {
            Verdict::ServerGone => RequestOutcome::ServerGone,
            Verdict::Replayed => RequestOutcome::Replayed,
            Verdict::Duplicate => RequestOutcome::Duplicate,
            Verdict::Store => RequestOutcome::Stored {
                series: made.into_iter().flatten().collect(),
                event_id,
                kind_conflicts,
                series_refused,
            },
        });
    }
    Ok(outcomes)
}

/// What becomes of one new series of a batch under the per-server series limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// Insert it (or find it, when it exists by then).
    Make,
    /// It exists already: (id, kind).
    Found(i64, i16),
    /// It does not exist and its server is at the limit.
    Refused,
}

/// Decides which of a batch's new series (in request order) may be created. Without a
/// limit every one is made. With one, the servers that create series are locked for it
/// (a transaction-scoped advisory lock per server, taken in sorted order, so nodes take
/// turns and the count read after it is exact), their series are counted, and a server
/// that would pass the limit keeps its series that exist and gets new ones only while it
/// is below the limit.
///
/// The lock is taken after the guards and before anything else this transaction may
/// wait on (series, samples, the credential touch), and every holder of it is past its
/// guards too, so waiting for it closes no cycle.
async fn plan_new_series(
    tx: &deadpool_postgres::Transaction<'_>,
    limit: u64,
    wanted: &[(usize, &crate::NewSeries)],
    tags: &[String],
    find_series: &tokio_postgres::Statement,
) -> PgResult<Vec<Plan>> {
    if limit == 0 || wanted.is_empty() {
        return Ok(vec![Plan::Make; wanted.len()]);
    }
    let mut servers: Vec<&str> = wanted.iter().map(|(_, n)| n.key.server_id.as_str()).collect();
    servers.sort_unstable();
    servers.dedup();
    let (lock, count) = tokio::try_join!(
        // One statement for every server, in the array's (sorted) order: a function scan
        // of `unnest` reads it in order.
        tx.prepare_cached("SELECT pg_advisory_xact_lock(hashtextextended(s, 0)) FROM unnest($1::text[]) AS s"),
        tx.prepare_cached("SELECT server_id, count(*) FROM series WHERE server_id = ANY($1) GROUP BY server_id"),
    )?;
    tx.execute(&lock, &[&servers]).await?;
    let mut held: HashMap<&str, u64> = servers.iter().map(|s| (*s, 0)).collect();
    for row in tx.query(&count, &[&servers]).await? {
        let server: String = row.get(0);
        let count: i64 = row.get(1);
        if let Some(h) = held.get_mut(server.as_str()) {
            *h = count as u64;
        }
    }
    let mut asked: HashMap<&str, u64> = HashMap::new();
    for (_, n) in wanted {
        *asked.entry(n.key.server_id.as_str()).or_default() += 1;
    }
    // Servers whose new series could take them past the limit: only theirs are checked
    // one by one.
    let tight: std::collections::HashSet<&str> =
        servers.iter().copied().filter(|s| held[s] + asked[s] > limit).collect();
    let existing = pipeline(wanted.iter().zip(tags).map(|((_, n), tags)| {
        let server = n.key.server_id.as_str();
        let check = tight.contains(server);
        async move {
            if check {
                tx.query_opt(find_series, &[&server, &n.key.name, tags]).await
            } else {
                Ok(None)
            }
        }
    }))
    .await?;
    let mut made: std::collections::HashSet<(&str, &str, &str)> = std::collections::HashSet::new();
    let mut plans = Vec::with_capacity(wanted.len());
    for (((_, n), tags), row) in wanted.iter().zip(tags).zip(existing) {
        let server = n.key.server_id.as_str();
        let plan = if !tight.contains(server) {
            Plan::Make
        } else if let Some(row) = row {
            Plan::Found(row.get(0), row.get(1))
        } else if made.contains(&(server, n.key.name.as_str(), tags.as_str())) {
            // Asked for twice in this batch: made once, counted once.
            Plan::Make
        } else if held[server] < limit {
            *held.get_mut(server).expect("every server is counted") += 1;
            made.insert((server, n.key.name.as_str(), tags.as_str()));
            Plan::Make
        } else {
            Plan::Refused
        };
        plans.push(plan);
    }
    Ok(plans)
}

/// Stores deduplicated samples (ts, series_id, rank, histogram, value).
///
/// Usually none of them exists yet, and then a bare binary COPY (or, for smaller batches,
/// a plain INSERT from arrays: `COPY_MIN_ROWS`) is the fastest way in (measured about
/// three times the rate of an upsert, see `write_path_timing` in tests/postgres.rs).
/// Neither can upsert: when a row exists already (a gauge written
/// again at the same timestamp, an observation at a stored millisecond) it fails with a
/// unique violation, and the caller runs the batch again in `Upsert` mode, where gauge
/// values are replaced and observations ranked after the stored ones.
async fn write_samples(
    tx: &deadpool_postgres::Transaction<'_>,
    rows: &[(i64, i64, i32, bool, f64)],
    histograms: bool,
    mode: SampleWrite,
) -> PgResult<()> {
    if mode == SampleWrite::Copy {
        if rows.len() >= COPY_MIN_ROWS {
            return copy_samples(tx, rows).await;
        }
        let ts: Vec<i64> = rows.iter().map(|r| r.0).collect();
        let ids: Vec<i64> = rows.iter().map(|r| r.1).collect();
        let ranks: Vec<i32> = rows.iter().map(|r| r.2).collect();
        let values: Vec<f64> = rows.iter().map(|r| r.4).collect();
        let insert = tx
            .prepare_cached(
                "INSERT INTO server_metrics (ts, series_id, seq, value)
                 SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::int[], $4::float8[])",
            )
            .await?;
        tx.execute(&insert, &[&ts, &ids, &ranks, &values]).await?;
        return Ok(());
    }
    let (ts, ids, values): (Vec<i64>, Vec<i64>, Vec<f64>) =
        rows.iter()
            .filter(|r| !r.3)
            .fold((vec![], vec![], vec![]), |mut acc, r| {
                acc.0.push(r.0);
                acc.1.push(r.1);
                acc.2.push(r.4);
                acc
            });
    if !ts.is_empty() {
        tx.execute(
            "INSERT INTO server_metrics (ts, series_id, seq, value)
             SELECT t, i, 0, v FROM unnest($1::bigint[], $2::bigint[], $3::float8[]) AS x(t, i, v)
             ON CONFLICT (ts, series_id, seq) DO UPDATE SET value = EXCLUDED.value",
            &[&ts, &ids, &values],
        )
        .await?;
    }
    if histograms {
        let hist: Vec<&(i64, i64, i32, bool, f64)> = rows.iter().filter(|r| r.3).collect();
        let ts: Vec<i64> = hist.iter().map(|r| r.0).collect();
        let ids: Vec<i64> = hist.iter().map(|r| r.1).collect();
        let ranks: Vec<i32> = hist.iter().map(|r| r.2).collect();
        let values: Vec<f64> = hist.iter().map(|r| r.4).collect();
        // Observations go after those stored already at the same (series, ts), as
        // SQLite's MAX(seq) + 1 does.
        tx.execute(
            "INSERT INTO server_metrics (ts, series_id, seq, value)
             SELECT x.t, x.i, x.r + COALESCE(
                 (SELECT MAX(m.seq) + 1 FROM server_metrics m WHERE m.ts = x.t AND m.series_id = x.i), 0), x.v
             FROM unnest($1::bigint[], $2::bigint[], $3::int[], $4::float8[]) AS x(t, i, r, v)",
            &[&ts, &ids, &ranks, &values],
        )
        .await?;
    }
    Ok(())
}

async fn copy_samples(tx: &deadpool_postgres::Transaction<'_>, rows: &[(i64, i64, i32, bool, f64)]) -> PgResult<()> {
    let sink = tx
        .copy_in("COPY server_metrics (ts, series_id, seq, value) FROM STDIN BINARY")
        .await?;
    let mut writer = pin!(BinaryCopyInWriter::new(
        sink,
        &[Type::INT8, Type::INT8, Type::INT4, Type::FLOAT8]
    ));
    for &(ts, series_id, seq, _, value) in rows {
        writer.as_mut().write(&[&ts, &series_id, &seq, &value]).await?;
    }
    writer.finish().await?;
    Ok(())
}

pub async fn read_samples(client: &PoolClient, q: &SampleQuery) -> PgResult<Vec<RawSample>> {
    // The key is (ts, series_id, seq): one range scan of the partitions in the range, in
    // the answer's order; rows of other series are skipped inside the index.
    let (after_ts, after_series, after_seq) = q.after.unwrap_or((i64::MIN, i64::MIN, i64::MIN));
    let stmt = client
        .prepare_cached(
            "SELECT ts, series_id, seq, value FROM server_metrics
             WHERE ts >= $1 AND ts < $2 AND (ts, series_id, seq) > ($3, $4, $5::bigint)
               AND series_id = ANY($6)
             ORDER BY ts, series_id, seq LIMIT $7",
        )
        .await?;
    let rows = client
        .query(
            &stmt,
            &[
                &q.from,
                &q.to,
                &after_ts,
                &after_series,
                &after_seq,
                &q.series_ids,
                &(q.limit.min(i64::MAX as usize) as i64),
            ],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| RawSample {
            timestamp: r.get(0),
            series_id: r.get(1),
            seq: i64::from(r.get::<_, i32>(2)),
            value: r.get(3),
        })
        .collect())
}
