//! The PostgreSQL store against a real server: the same answers as SQLite for the same
//! calls, and what only a shared database has (several nodes writing at once, daily
//! partitions, LISTEN/NOTIFY, job locks, recovery from killed connections).
//!
//! Runs when `MCP_METRICS_TEST_POSTGRES` holds an admin URL; each test works in a fresh
//! database of its own, dropped afterwards.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::series_ids;
use mcp_metrics_core::model::{EventSource, Kind, NewEvent, SeriesKey, ServerFields, StoredCredential};
use mcp_metrics_core::rollup::{BucketStats, Level};
use mcp_metrics_core::time::now_ms;
use mcp_metrics_core::usage::UsageKind;
use mcp_metrics_store::postgres::{PostgresStore, partition_name, testing};
use mcp_metrics_store::sqlite::SqliteStore;
use mcp_metrics_store::{
    DirtyMark, NewSeries, PendingSample, RequestOutcome, RetentionCutoffs, RollupInput, RollupWork, SampleQuery,
    SeriesRef, Store, StoreError, StoreOptions, UsageRecord, WriteBatch, WriteRequest,
};

const DAY: i64 = 86_400_000;

/// A fresh database, dropped (best effort) when the test ends, also by panic.
struct Db {
    admin: String,
    url: String,
}

impl Db {
    async fn new(test: &str) -> Option<Db> {
        let admin = testing::admin_url_or_skip(test)?;
        let url = testing::fresh_database(&admin).await.expect("create a test database");
        Some(Db { admin, url })
    }

    async fn open(&self) -> PostgresStore {
        PostgresStore::open(&self.url, &StoreOptions::default())
            .await
            .expect("open the PostgreSQL store")
    }

    async fn admin_client(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        client
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        testing::drop_database_blocking(&self.admin, &self.url);
    }
}

async fn sqlite() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("t.db"), &StoreOptions::default())
        .await
        .unwrap();
    (dir, store)
}

fn key(server: &str, name: &str) -> SeriesKey {
    SeriesKey {
        server_id: server.into(),
        name: name.into(),
        tags: vec![("region".into(), "eu".into())],
    }
}

/// A request of server "s", or of the server its first new series names.
fn request(series: Vec<NewSeries>, samples: Vec<PendingSample>) -> WriteRequest {
    WriteRequest {
        server_id: series.first().map_or("s".into(), |n| n.key.server_id.clone()),
        key_id: "k1".into(),
        new_series: series,
        samples,
        ..Default::default()
    }
}

fn batch(requests: Vec<WriteRequest>) -> WriteBatch {
    WriteBatch {
        requests,
        now: now_ms(),
        replay_window_ms: 600_000,
        retry_window_ms: 600_000,
        max_series_per_server: 0,
    }
}

fn sample(series: SeriesRef, kind: Kind, ts: i64, value: f64) -> PendingSample {
    PendingSample {
        series,
        kind,
        timestamp: ts,
        value,
    }
}

fn stored_series(outcome: &RequestOutcome) -> Vec<i64> {
    match outcome {
        RequestOutcome::Stored { series, .. } => series.iter().map(|s| s.id).collect(),
        other => panic!("expected Stored, got {other:?}"),
    }
}

/// A test named `$test` that runs `$check(&dyn Store)` on both backends (see
/// [`on_both_backends`]).
macro_rules! test_on_both_backends {
    ($test:ident, $check:ident) => {
        #[tokio::test]
        async fn $test() {
            on_both_backends(stringify!($test), async |store| $check(store).await).await;
        }
    };
}

/// Everything the trait answers after one fixed sequence of calls, with series ids
/// replaced by names (the backends number series independently).
async fn scenario(store: &dyn Store) -> String {
    let base = (now_ms() / DAY - 2) * DAY + 3_600_000;
    store.create_server("s", &ServerFields::default(), 1).await.unwrap();
    assert!(matches!(
        store.create_server("s", &ServerFields::default(), 1).await,
        Err(StoreError::Conflict)
    ));
    store
        .insert_credential(&StoredCredential {
            key_id: "k1".into(),
            server_id: "s".into(),
            api_key_hash: [7; 32],
            sealed_secret: vec![1, 2, 3],
            created_at: 5,
            revoked_at: None,
            last_used_at: None,
        })
        .await
        .unwrap();
    let gauge = NewSeries {
        key: key("s", "latency"),
        kind: Kind::Gauge,
    };
    let hist = NewSeries {
        key: key("s", "rt"),
        kind: Kind::Histogram,
    };
    let mut samples = Vec::new();
    for i in 0..10 {
        samples.push(sample(SeriesRef::New(0), Kind::Gauge, base + i * 1000, i as f64 + 0.5));
    }
    // Same (series, ts) twice in one batch: the later value wins.
    samples.push(sample(SeriesRef::New(0), Kind::Gauge, base, 99.0));
    // Three observations in one millisecond: seq 0, 1, 2.
    for v in [1.0, 2.0, 3.0] {
        samples.push(sample(SeriesRef::New(1), Kind::Histogram, base + 500, v));
    }
    let mut first = request(vec![gauge.clone(), hist.clone()], samples);
    first.signature = Some([1; 32]);
    first.body_digest = Some([2; 32]);
    first.event = Some(NewEvent {
        server_id: "s".into(),
        kind: "deploy".into(),
        title: "v1".into(),
        detail: None,
        at: base,
        source: EventSource::Author,
    });
    // Same signature again in the same batch: a replay.
    let mut replay = request(vec![], vec![]);
    replay.signature = Some([1; 32]);
    let outcomes = store.write_batch(batch(vec![first, replay])).await.unwrap();
    let ids = stored_series(&outcomes[0]);
    assert_eq!(outcomes[1], RequestOutcome::Replayed);
    let (g, h) = (ids[0], ids[1]);

    // A later batch: another value at a stored (series, ts) replaces it, another
    // observation at a stored histogram ms gets the next seq, a retry is a duplicate.
    let mut again = request(
        vec![],
        vec![
            sample(SeriesRef::Known(g), Kind::Gauge, base + 1000, -1.25),
            sample(SeriesRef::Known(h), Kind::Histogram, base + 500, 4.0),
        ],
    );
    again.signature = Some([3; 32]);
    let mut retry = request(vec![], vec![sample(SeriesRef::Known(g), Kind::Gauge, base, 0.0)]);
    retry.signature = Some([4; 32]);
    retry.body_digest = Some([2; 32]);
    let outcomes = store.write_batch(batch(vec![again, retry])).await.unwrap();
    assert!(matches!(outcomes[0], RequestOutcome::Stored { .. }));
    assert_eq!(outcomes[1], RequestOutcome::Duplicate);
    // A new series that exists already is found, not duplicated.
    let outcomes = store
        .write_batch(batch(vec![request(vec![gauge.clone()], vec![])]))
        .await
        .unwrap();
    assert_eq!(stored_series(&outcomes[0]), vec![g]);

    let name = |id: i64| if id == g { "latency" } else { "rt" };
    let mut out = String::new();
    // Paging through everything three rows at a time.
    let mut after = None;
    loop {
        let page = store
            .read_samples(&SampleQuery {
                series_ids: vec![g, h],
                from: base,
                to: base + DAY,
                after,
                limit: 3,
            })
            .await
            .unwrap();
        for s in &page {
            out += &format!(
                "sample {} {} {} {}\n",
                s.timestamp - base,
                name(s.series_id),
                s.seq,
                s.value
            );
        }
        match page.last() {
            Some(s) if page.len() == 3 => after = Some((s.timestamp, s.series_id, s.seq)),
            _ => break,
        }
    }

    // Rollups: minute, hour, day.
    for level in [Level::Minute, Level::Hour, Level::Day] {
        let work = store.rollup_work(level, 1000).await.unwrap();
        let results: Vec<_> = work
            .items
            .iter()
            .map(|(m, input)| {
                let kind = work.series[&m.series_id].0;
                let stats = fold_kind(kind, input);
                (*m, stats)
            })
            .collect();
        out += &format!(
            "work {level:?} {} backlog {:?}\n",
            results.len(),
            store.dirty_backlog().await.unwrap()
        );
        store.apply_rollups(level, results).await.unwrap();
    }
    out += &format!("backlog {:?}\n", store.dirty_backlog().await.unwrap());
    for level in [Level::Minute, Level::Hour, Level::Day] {
        for r in store.read_rollups(level, &[h, g], 0, i64::MAX).await.unwrap() {
            let s = &r.stats;
            out += &format!(
                "rollup {level:?} {} {} n={} sum={} min={} max={} first={}@{} last={}@{} inc={} p50={:?}\n",
                name(r.series_id),
                r.bucket - base,
                s.count,
                s.sum,
                s.min,
                s.max,
                s.first,
                s.first_ts - base,
                s.last,
                s.last_ts - base,
                s.increase,
                s.quantile(0.5)
            );
        }
    }
    out += &format!("marked {}\n", store.mark_range_dirty(base, base + DAY).await.unwrap());
    out += &format!("backlog {:?}\n", store.dirty_backlog().await.unwrap());

    // Usage.
    let day = base / DAY;
    let events: Vec<UsageRecord> = [
        (UsageKind::View, 1u8),
        (UsageKind::View, 1),
        (UsageKind::Install, 1),
        (UsageKind::Install, 1),
        (UsageKind::Install, 2),
    ]
    .into_iter()
    .map(|(kind, v)| UsageRecord {
        server_id: "s".into(),
        kind,
        client: Some("cli".into()),
        at: base,
        visitor: [v; 16],
    })
    .chain(std::iter::once(UsageRecord {
        server_id: "gone".into(),
        kind: UsageKind::View,
        client: None,
        at: base,
        visitor: [9; 16],
    }))
    .collect();
    store.record_usage(events.clone()).await.unwrap();
    store.record_usage(events[..1].to_vec()).await.unwrap();
    out += &format!("usage {:?}\n", store.usage_days("s", day - 1, day + 1).await.unwrap());
    let salt = store.usage_salt(day, [5; 32]).await.unwrap();
    assert_eq!(store.usage_salt(day, [6; 32]).await.unwrap(), salt);
    out += &format!("forgot {}\n", store.forget_usage_before(day + 1).await.unwrap());
    out += &format!("purged usage {}\n", store.purge_usage_events(base + 1).await.unwrap());

    // Events and credentials.
    for i in 0..4 {
        store
            .insert_event(&NewEvent {
                server_id: "s".into(),
                kind: "note".into(),
                title: format!("e{i}"),
                detail: Some("d".into()),
                at: base + i / 2,
                source: EventSource::System,
            })
            .await
            .unwrap();
    }
    let page1 = store.list_events("s", None, 3).await.unwrap();
    let last = page1.last().unwrap();
    let page2 = store.list_events("s", Some((last.event.at, last.id)), 3).await.unwrap();
    for e in page1.iter().chain(&page2) {
        out += &format!("event {} {} {:?}\n", e.event.title, e.event.at - base, e.event.source);
    }
    let creds = store.list_credentials(Some("s")).await.unwrap();
    out += &format!("credentials {} used {}\n", creds.len(), creds[0].last_used_at.is_some());
    assert!(store.revoke_credential("s", "k1", 9).await.unwrap());
    assert!(!store.revoke_credential("s", "k1", 9).await.unwrap());
    assert!(matches!(
        store.revoke_credential("s", "nope", 9).await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(
        store.credential_by_hash(&[7; 32]).await.unwrap().unwrap().revoked_at,
        Some(9)
    );
    assert!(matches!(
        store
            .insert_credential(&StoredCredential {
                key_id: "k2".into(),
                server_id: "missing".into(),
                api_key_hash: [8; 32],
                sealed_secret: vec![],
                created_at: 0,
                revoked_at: None,
                last_used_at: None,
            })
            .await,
        Err(StoreError::NotFound)
    ));
    store.meta_set("a", "1").await.unwrap();
    store.meta_set("a", "2").await.unwrap();
    out += &format!("meta {:?}\n", store.meta_get("a").await.unwrap());
    out += &format!(
        "retention {:?}\n",
        store
            .apply_retention(&RetentionCutoffs {
                raw: Some(base + 5000),
                minute: Some(base + 60_000),
                hour: None,
                day: None,
            })
            .await
            .unwrap()
    );
    out += &format!(
        "left {}\n",
        store
            .read_samples(&SampleQuery {
                series_ids: vec![g, h],
                from: 0,
                to: i64::MAX,
                after: None,
                limit: 100,
            })
            .await
            .unwrap()
            .len()
    );
    let updated = store
        .update_server(
            "s",
            &ServerFields {
                name: Some("S".into()),
                ..Default::default()
            },
            2,
        )
        .await
        .unwrap();
    out += &format!("server {:?} {}\n", updated.name, updated.updated_at);
    store.delete_server("s").await.unwrap();
    assert!(matches!(store.delete_server("s").await, Err(StoreError::NotFound)));
    out += &format!(
        "after delete {} servers {} series\n",
        store.list_servers().await.unwrap().len(),
        store.all_series().await.unwrap().len()
    );
    out
}

#[tokio::test]
async fn answers_like_sqlite() {
    let Some(db) = Db::new("answers_like_sqlite").await else {
        return;
    };
    let pg = db.open().await;
    let (_dir, lite) = sqlite().await;
    let expected = scenario(&lite).await;
    let got = scenario(&pg).await;
    println!("{got}");
    assert_eq!(got, expected);
    assert!(expected.contains("sample 0 latency 0 99"), "{expected}");
    assert!(expected.contains("sample 500 rt 3 4"), "{expected}");
}

fn one_histogram_sample(value: f64, ts: i64) -> WriteBatch {
    batch(vec![request(
        vec![NewSeries {
            key: key("s", "rt"),
            kind: Kind::Histogram,
        }],
        vec![sample(SeriesRef::New(0), Kind::Histogram, ts, value)],
    )])
}

fn fold(input: &RollupInput) -> Option<BucketStats> {
    fold_kind(Kind::Histogram, input)
}

/// What the rollup job computes from an input.
fn fold_kind(kind: Kind, input: &RollupInput) -> Option<BucketStats> {
    input.clone().fold(kind)
}

/// A pass's results when every series it read is a gauge.
fn folded_gauges(work: &RollupWork) -> Vec<(DirtyMark, Option<BucketStats>)> {
    work.items
        .iter()
        .map(|(m, i)| (*m, fold_kind(Kind::Gauge, i)))
        .collect()
}

/// One minute pass, as the job runs it; returns the inputs it was given.
async fn minute_pass(store: &dyn Store) -> Vec<RollupInput> {
    let work = store.rollup_work(Level::Minute, 100).await.unwrap();
    let results: Vec<_> = work.items.iter().map(|(m, i)| (*m, fold(i))).collect();
    store.apply_rollups(Level::Minute, results).await.unwrap();
    work.items.into_iter().map(|(_, i)| i).collect()
}

fn one_sample(kind: Kind, value: f64, ts: i64) -> WriteBatch {
    batch(vec![request(
        vec![NewSeries {
            key: key("s", "m"),
            kind,
        }],
        vec![sample(SeriesRef::New(0), kind, ts, value)],
    )])
}

/// One minute pass for series of `kind`, folded as the job folds them (by the kind the
/// store reports for each series, which must be `kind`); returns the inputs it was given.
async fn minute_pass_of(store: &dyn Store, kind: Kind) -> Vec<RollupInput> {
    let work = store.rollup_work(Level::Minute, 100).await.unwrap();
    let results: Vec<_> = work
        .items
        .iter()
        .map(|(m, i)| {
            let stored_kind = work.series[&m.series_id].0;
            assert_eq!(
                stored_kind, kind,
                "the kind the store reports for series {}",
                m.series_id
            );
            (*m, fold_kind(stored_kind, i))
        })
        .collect();
    store.apply_rollups(Level::Minute, results).await.unwrap();
    work.items.into_iter().map(|(_, i)| i).collect()
}

async fn stored_minute(store: &dyn Store) -> BucketStats {
    let id = store.series_of_server("s", None).await.unwrap()[0].id;
    let rows = store.read_rollups(Level::Minute, &[id], 0, i64::MAX).await.unwrap();
    assert_eq!(rows.len(), 1);
    rows[0].stats.clone()
}

#[tokio::test]
async fn a_busy_minute_is_spliced_instead_of_read_again() {
    let Some(db) = Db::new("a_busy_minute_is_spliced_instead_of_read_again").await else {
        return;
    };
    let store = db.open().await;
    store.create_server("s", &ServerFields::default(), 0).await.unwrap();
    let m = (now_ms() / 60_000 - 2) * 60_000;
    store.write_batch(one_histogram_sample(10.0, m + 10)).await.unwrap();
    store.write_batch(one_histogram_sample(20.0, m + 20)).await.unwrap();
    assert!(matches!(&minute_pass(&store).await[..], [RollupInput::Raw(s)] if s.len() == 2));
    // A later sample: the write's own bucket is merged after the stored one.
    store.write_batch(one_histogram_sample(30.0, m + 30)).await.unwrap();
    match &minute_pass(&store).await[..] {
        [RollupInput::Merge { base, writes }] => {
            assert_eq!(base.count, 2);
            assert_eq!(
                writes.clone(),
                vec![BucketStats::fold(Kind::Histogram, [(m + 30, 30.0)]).unwrap()]
            );
        }
        other => panic!("expected a merge, got {other:?}"),
    }
    let all = BucketStats::fold(Kind::Histogram, [(m + 10, 10.0), (m + 20, 20.0), (m + 30, 30.0)]);
    assert_eq!(Some(stored_minute(&store).await), all);
    // A late sample, from another write committed in between: the tail from it on, the
    // stored sample before it, and only the late one flagged new.
    store.write_batch(one_histogram_sample(15.0, m + 15)).await.unwrap();
    match &minute_pass(&store).await[..] {
        [RollupInput::Splice { base, before, tail }] => {
            assert_eq!(base.count, 3);
            assert_eq!(*before, Some((m + 10, 10.0)));
            assert_eq!(
                tail.clone(),
                vec![(m + 15, 15.0, true), (m + 20, 20.0, false), (m + 30, 30.0, false)]
            );
        }
        other => panic!("expected a splice, got {other:?}"),
    }
    // Two writes between passes, one earlier than every stored sample: no sample before.
    store.write_batch(one_histogram_sample(5.0, m + 5)).await.unwrap();
    store.write_batch(one_histogram_sample(25.0, m + 25)).await.unwrap();
    match &minute_pass(&store).await[..] {
        [RollupInput::Splice { before, tail, .. }] if before.is_none() => {
            let new: Vec<f64> = tail.iter().filter(|s| s.2).map(|s| s.1).collect();
            assert_eq!((tail.len(), new), (6, vec![5.0, 25.0]));
        }
        other => panic!("expected a splice from the minute's start, got {other:?}"),
    }
    let all = BucketStats::fold(
        Kind::Histogram,
        [5.0, 10.0, 15.0, 20.0, 25.0, 30.0].map(|v| (m + v as i64, v)),
    );
    assert_eq!(Some(stored_minute(&store).await), all);
    // A same-millisecond observation goes in by upsert: the minute is folded again.
    store.write_batch(one_histogram_sample(31.0, m + 30)).await.unwrap();
    assert!(matches!(&minute_pass(&store).await[..], [RollupInput::Raw(s)] if s.len() == 7));
    // So does an operator's re-aggregation of a range.
    store.write_batch(one_histogram_sample(40.0, m + 40)).await.unwrap();
    store.mark_range_dirty(m, m + 60_000).await.unwrap();
    assert!(matches!(&minute_pass(&store).await[..], [RollupInput::Raw(s)] if s.len() == 8));
    let stats = stored_minute(&store).await;
    assert_eq!((stats.count, stats.sum), (8, 176.0));
}

#[tokio::test]
async fn late_counter_samples_and_rewritten_gauges_keep_exact_buckets() {
    let Some(db) = Db::new("late_counter_samples_and_rewritten_gauges").await else {
        return;
    };
    let store = db.open().await;
    store.create_server("s", &ServerFields::default(), 0).await.unwrap();
    let m = (now_ms() / 60_000 - 2) * 60_000;
    // A counter whose samples arrive out of order, with a restart among them: every pass
    // splices, and the stored increase equals folding all samples in time order.
    let arrivals = [
        (30, 30.0),
        (10, 10.0),
        (50, 4.0),
        (20, 25.0),
        (40, 35.0),
        (5, 2.0),
        (45, 1.0),
    ];
    let mut seen = Vec::new();
    for (i, (offset, value)) in arrivals.into_iter().enumerate() {
        store
            .write_batch(one_sample(Kind::Counter, value, m + offset))
            .await
            .unwrap();
        seen.push((m + offset, value));
        let inputs = minute_pass_of(&store, Kind::Counter).await;
        // Later than every stored sample: merged; earlier: spliced.
        match (i, &inputs[..]) {
            (0, [RollupInput::Raw(_)]) | (2, [RollupInput::Merge { .. }]) => {}
            (1 | 3..=6, [RollupInput::Splice { .. }]) => {}
            other => panic!("{other:?}"),
        }
        seen.sort_by_key(|s| s.0);
        let expected = BucketStats::fold(Kind::Counter, seen.iter().copied()).unwrap();
        assert_eq!(stored_minute(&store).await, expected, "after {} samples", i + 1);
    }
    assert_eq!(stored_minute(&store).await.increase, 8.0 + 15.0 + 5.0 + 5.0 + 1.0 + 3.0);
}

/// A write of several series: `(series name, timestamp, value)`.
fn gauges(samples: &[(&str, i64, f64)]) -> WriteBatch {
    let mut names: Vec<&str> = Vec::new();
    for s in samples {
        if !names.contains(&s.0) {
            names.push(s.0);
        }
    }
    batch(vec![request(
        names
            .iter()
            .map(|n| NewSeries {
                key: key("s", n),
                kind: Kind::Gauge,
            })
            .collect(),
        samples
            .iter()
            .map(|(n, ts, v)| {
                let i = names.iter().position(|x| x == n).unwrap() as u32;
                sample(SeriesRef::New(i), Kind::Gauge, *ts, *v)
            })
            .collect(),
    )])
}

#[tokio::test]
async fn writes_in_order_are_merged_and_the_rest_read() {
    let Some(db) = Db::new("writes_in_order_are_merged").await else {
        return;
    };
    let store = db.open().await;
    store.create_server("s", &ServerFields::default(), 0).await.unwrap();
    let m = (now_ms() / 60_000 - 2) * 60_000;
    store
        .write_batch(gauges(&[("a", m + 1, 1.0), ("b", m + 1, 10.0)]))
        .await
        .unwrap();
    minute_pass_of(&store, Kind::Gauge).await;
    // Two writes between passes, each later than the last: both minutes merge them.
    store
        .write_batch(gauges(&[("a", m + 2, 2.0), ("a", m + 3, 3.0), ("b", m + 2, 20.0)]))
        .await
        .unwrap();
    store
        .write_batch(gauges(&[("a", m + 4, 4.0), ("b", m + 5, 50.0)]))
        .await
        .unwrap();
    let inputs = minute_pass_of(&store, Kind::Gauge).await;
    assert_eq!(inputs.len(), 2);
    for input in &inputs {
        assert!(
            matches!(input, RollupInput::Merge { writes, .. } if writes.len() == 2),
            "{input:?}"
        );
    }
    // Writes that overlap in time (two connections' batches committed out of order):
    // read from the earliest new sample.
    store
        .write_batch(gauges(&[("a", m + 6, 6.0), ("a", m + 8, 8.0)]))
        .await
        .unwrap();
    store.write_batch(gauges(&[("a", m + 7, 7.0)])).await.unwrap();
    let inputs = minute_pass_of(&store, Kind::Gauge).await;
    assert!(
        matches!(&inputs[..], [RollupInput::Splice { tail, .. }] if tail.len() == 3),
        "{inputs:?}"
    );
    // Buckets lost with the unlogged table (a crash): read, same answer.
    store.write_batch(gauges(&[("a", m + 9, 9.0)])).await.unwrap();
    let admin = db.admin_client().await;
    admin.batch_execute("TRUNCATE rollup_partials").await.unwrap();
    let inputs = minute_pass_of(&store, Kind::Gauge).await;
    assert!(
        matches!(&inputs[..], [RollupInput::Splice { tail, .. }] if tail.len() == 1),
        "{inputs:?}"
    );
    let ids = series_ids(&store, "s").await;
    let rows = store.read_rollups(Level::Minute, &ids, 0, i64::MAX).await.unwrap();
    let a = BucketStats::fold(Kind::Gauge, [1, 2, 3, 4, 6, 7, 8, 9].map(|i| (m + i, i as f64))).unwrap();
    let b = BucketStats::fold(Kind::Gauge, [(m + 1, 10.0), (m + 2, 20.0), (m + 5, 50.0)]).unwrap();
    let mut got: Vec<BucketStats> = rows.into_iter().map(|r| r.stats).collect();
    got.sort_by_key(|s| s.count);
    assert_eq!(got, vec![b, a]);
    // Nothing is left behind for minutes no pass needs any more.
    assert_eq!(scalar(&db, "SELECT count(*) FROM rollup_partials").await, 0);
}

#[tokio::test]
async fn upgrading_turns_old_log_rows_into_marks_folded_from_the_start() {
    let Some(db) = Db::new("upgrading_turns_old_log_rows_into_marks").await else {
        return;
    };
    // A database at schema 6 with two writes logged in the old shape, one row per series.
    testing::migrate_to(&db.url, 6).await.unwrap();
    let admin = db.admin_client().await;
    admin
        .batch_execute(
            "INSERT INTO rollup_log (bucket, series_id, min_ts, xid) VALUES (60000, 42, 60010, 7), (60000, 42, 60005, 8),
                 (120000, 43, 120001, 8)",
        )
        .await
        .unwrap();
    let store = db.open().await;
    assert_eq!(store.schema_version().await.unwrap(), 7);
    let marks: Vec<(i64, i64, Option<i64>)> = admin
        .query(
            "SELECT bucket, series_id, min_ts FROM rollup_dirty WHERE level = 0 ORDER BY bucket",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(marks, vec![(60000, 42, None), (120000, 43, None)]);
    assert_eq!(scalar(&db, "SELECT count(*) FROM rollup_log").await, 0);
}

/// The job and an operator's `aggregate` can run minute passes at the same moment: both
/// succeed (the later one reads again after a serialization failure) and the buckets are
/// exact.
#[tokio::test]
async fn concurrent_passes_both_succeed_and_stay_exact() {
    let Some(db) = Db::new("concurrent_passes_both_succeed").await else {
        return;
    };
    let store = Arc::new(db.open().await);
    store.create_server("s", &ServerFields::default(), 0).await.unwrap();
    let m = (now_ms() / 60_000 - 2) * 60_000;
    let mut all = Vec::new();
    for round in 0..20i64 {
        let samples: Vec<(&str, i64, f64)> = (0..5)
            .flat_map(|i| {
                [
                    ("a", m + round * 10 + i, (round * 10 + i) as f64),
                    ("b", m + round * 10 + i, 1.0),
                ]
            })
            .collect();
        all.extend(samples.iter().filter(|s| s.0 == "a").map(|s| (s.1, s.2)));
        store.write_batch(gauges(&samples)).await.unwrap();
        let passes = (0..2).map(|_| {
            let store = store.clone();
            tokio::spawn(async move { minute_pass_of(store.as_ref(), Kind::Gauge).await })
        });
        for pass in futures_util::future::join_all(passes).await {
            pass.unwrap();
        }
    }
    minute_pass_of(store.as_ref(), Kind::Gauge).await;
    let a = store.series_of_server("s", Some("a")).await.unwrap()[0].id;
    let rows = store.read_rollups(Level::Minute, &[a], 0, i64::MAX).await.unwrap();
    assert_eq!(Some(rows[0].stats.clone()), BucketStats::fold(Kind::Gauge, all));
}

#[tokio::test]
async fn a_rewritten_gauge_is_folded_again() {
    let Some(db) = Db::new("a_rewritten_gauge_is_folded_again").await else {
        return;
    };
    let store = db.open().await;
    store.create_server("s", &ServerFields::default(), 0).await.unwrap();
    let m = (now_ms() / 60_000 - 2) * 60_000;
    store.write_batch(one_sample(Kind::Gauge, 5.0, m + 10)).await.unwrap();
    store.write_batch(one_sample(Kind::Gauge, 6.0, m + 20)).await.unwrap();
    minute_pass_of(&store, Kind::Gauge).await;
    // The same timestamp again replaces the stored value: splicing would count both.
    store.write_batch(one_sample(Kind::Gauge, 7.0, m + 10)).await.unwrap();
    assert!(matches!(&minute_pass_of(&store, Kind::Gauge).await[..], [RollupInput::Raw(s)] if s.len() == 2));
    let stats = stored_minute(&store).await;
    assert_eq!((stats.count, stats.sum, stats.first), (2, 13.0, 7.0));
}

/// The backlog counts dirty buckets, not writes: a (minute, series) written several
/// times, or marked by a pass and written again, counts once on both backends.
async fn backlog_counts_buckets_not_writes(store: &dyn Store) {
    store.create_server("s", &ServerFields::default(), 0).await.unwrap();
    let t = (now_ms() / 60_000 - 2) * 60_000;
    for i in 0..3 {
        store.write_batch(one_sample(Kind::Gauge, 1.0, t + i)).await.unwrap();
    }
    store
        .write_batch(one_sample(Kind::Gauge, 1.0, t + 60_000))
        .await
        .unwrap();
    assert_eq!(store.dirty_backlog().await.unwrap(), [2, 0, 0]);
    let work = store.rollup_work(Level::Minute, 100).await.unwrap();
    assert_eq!(work.items.len(), 2);
    store.write_batch(one_sample(Kind::Gauge, 1.0, t + 3)).await.unwrap();
    assert_eq!(
        store.dirty_backlog().await.unwrap(),
        [2, 0, 0],
        "marked and written again: once"
    );
}

test_on_both_backends!(
    backlog_counts_buckets_not_writes_on_both_backends,
    backlog_counts_buckets_not_writes
);

/// rollup_marks.rs' stale-pass case, on any backend.
async fn stale_pass_keeps_the_newer_result(store: &dyn Store) {
    store.create_server("s", &ServerFields::default(), 0).await.unwrap();
    let ts = (now_ms() / 60_000 - 2) * 60_000;
    store.write_batch(one_histogram_sample(10.0, ts)).await.unwrap();
    let stale = store.rollup_work(Level::Minute, 100).await.unwrap();
    assert_eq!(stale.items.len(), 1);
    store.write_batch(one_histogram_sample(20.0, ts + 1)).await.unwrap();
    // The renewed mark survives a pass that read it before; that pass still stores its
    // result (so a minute written without pause is updated at every pass) and marks the
    // hour.
    let results: Vec<_> = stale.items.iter().map(|(m, i)| (*m, fold(i))).collect();
    store.apply_rollups(Level::Minute, results.clone()).await.unwrap();
    assert_eq!(store.dirty_backlog().await.unwrap(), [1, 1, 0]);
    let fresh = store.rollup_work(Level::Minute, 100).await.unwrap();
    let fresh_results: Vec<_> = fresh.items.iter().map(|(m, i)| (*m, fold(i))).collect();
    store.apply_rollups(Level::Minute, fresh_results).await.unwrap();
    store.apply_rollups(Level::Minute, results).await.unwrap();
    // One stored bucket (`stored_minute` checks it), from the newer pass.
    assert_eq!(stored_minute(store).await.count, 2, "the newer result stands");
    assert_eq!(store.dirty_backlog().await.unwrap(), [0, 1, 0]);
}

test_on_both_backends!(rollup_generations_on_both_backends, stale_pass_keeps_the_newer_result);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_guards_and_series() {
    let Some(db) = Db::new("two_nodes_share_guards_and_series").await else {
        return;
    };
    let (a, b) = (db.open().await, db.open().await);
    a.create_server("s", &ServerFields::default(), 0).await.unwrap();
    let ts = now_ms();
    for round in 0..10u8 {
        // The same signed request reaches both nodes at once: exactly one stores it.
        let signed = |value: f64| {
            let mut r = request(
                vec![NewSeries {
                    key: key("s", &format!("m{round}")),
                    kind: Kind::Gauge,
                }],
                vec![sample(SeriesRef::New(0), Kind::Gauge, ts + i64::from(round), value)],
            );
            r.signature = Some([round; 32]);
            batch(vec![r])
        };
        let (x, y) = tokio::join!(a.write_batch(signed(1.0)), b.write_batch(signed(2.0)));
        let (x, y) = (x.unwrap(), y.unwrap());
        let replays = [&x[0], &y[0]]
            .iter()
            .filter(|o| ***o == RequestOutcome::Replayed)
            .count();
        assert_eq!(replays, 1, "round {round}: {x:?} {y:?}");
        // Different requests creating the same series at once find one series.
        let unsigned = |value: f64| {
            batch(vec![request(
                vec![NewSeries {
                    key: key("s", &format!("n{round}")),
                    kind: Kind::Counter,
                }],
                vec![sample(SeriesRef::New(0), Kind::Counter, ts, value)],
            )])
        };
        let (x, y) = tokio::join!(a.write_batch(unsigned(1.0)), b.write_batch(unsigned(2.0)));
        assert_eq!(stored_series(&x.unwrap()[0]), stored_series(&y.unwrap()[0]));
    }
    let series = a.all_series().await.unwrap();
    assert_eq!(series.len(), 20);
    let ids: Vec<i64> = series.iter().map(|s| s.id).collect();
    let rows = b
        .read_samples(&SampleQuery {
            series_ids: ids,
            from: 0,
            to: i64::MAX,
            after: None,
            limit: 1000,
        })
        .await
        .unwrap();
    assert_eq!(rows.len(), 20, "one sample per signed round and per series");
}

async fn partitions(client: &tokio_postgres::Client) -> Vec<String> {
    let mut names: Vec<String> = client
        .query(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'server_metrics'::regclass",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn partitions_ahead_on_demand_and_dropped_by_retention() {
    let Some(db) = Db::new("partitions_ahead_on_demand_and_dropped_by_retention").await else {
        return;
    };
    let store = db.open().await;
    let client = db.admin_client().await;
    let today = now_ms() / DAY;
    let made = partitions(&client).await;
    for day in today - 1..=today + 3 {
        assert!(made.contains(&partition_name(day)), "{made:?}");
    }
    store.ensure_partitions(now_ms(), 7).await.unwrap();
    assert!(partitions(&client).await.contains(&partition_name(today + 7)));

    store.create_server("s", &ServerFields::default(), 0).await.unwrap();
    let old = today - 400;
    let straddle = today - 30;
    let mut samples = vec![];
    for i in 0..5 {
        samples.push(sample(SeriesRef::New(0), Kind::Gauge, old * DAY + i * 1000, 1.0));
        samples.push(sample(
            SeriesRef::New(0),
            Kind::Gauge,
            straddle * DAY + i * 3_600_000,
            2.0,
        ));
    }
    samples.push(sample(SeriesRef::New(0), Kind::Gauge, now_ms(), 3.0));
    let out = store
        .write_batch(batch(vec![request(
            vec![NewSeries {
                key: key("s", "g"),
                kind: Kind::Gauge,
            }],
            samples,
        )]))
        .await
        .unwrap();
    let id = stored_series(&out[0])[0];
    assert!(
        partitions(&client).await.contains(&partition_name(old)),
        "made on demand"
    );

    // The cutoff falls inside the straddling day, after its first three samples.
    let cutoff = straddle * DAY + 2 * 3_600_000 + 1;
    let report = store
        .apply_retention(&RetentionCutoffs {
            raw: Some(cutoff),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(report.raw, 5 + 3);
    let left = partitions(&client).await;
    assert!(!left.contains(&partition_name(old)), "{left:?}");
    assert!(left.contains(&partition_name(straddle)));
    let rows = store
        .read_samples(&SampleQuery {
            series_ids: vec![id],
            from: 0,
            to: i64::MAX,
            after: None,
            limit: 100,
        })
        .await
        .unwrap();
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().all(|r| r.timestamp >= cutoff));

    // Writing to the dropped day again recreates it, from this node's forgotten list and
    // from another node's stale one.
    let other = db.open().await;
    let again = batch(vec![request(
        vec![],
        vec![sample(SeriesRef::Known(id), Kind::Gauge, old * DAY, 4.0)],
    )]);
    other
        .apply_retention(&RetentionCutoffs {
            raw: Some(cutoff),
            ..Default::default()
        })
        .await
        .unwrap();
    store.write_batch(again.clone()).await.unwrap();
    store
        .apply_retention(&RetentionCutoffs {
            raw: Some(cutoff),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!partitions(&client).await.contains(&partition_name(old)));
    other.write_batch(again).await.unwrap();
    assert!(partitions(&client).await.contains(&partition_name(old)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_salt_is_shared() {
    let Some(db) = Db::new("usage_salt_is_shared").await else {
        return;
    };
    let (a, b) = (db.open().await, db.open().await);
    let (x, y) = tokio::join!(a.usage_salt(100, [1; 32]), b.usage_salt(100, [2; 32]));
    assert_eq!(x.unwrap(), y.unwrap());
    assert_eq!(
        b.usage_salt(100, [3; 32]).await.unwrap(),
        a.usage_salt(100, [4; 32]).await.unwrap()
    );
}

async fn receive(rx: &mut tokio::sync::mpsc::Receiver<String>) -> Option<String> {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .ok()
        .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_reach_every_node() {
    let Some(db) = Db::new("notifications_reach_every_node").await else {
        return;
    };
    let (a, b) = (db.open().await, db.open().await);
    let mut ra = a.listen().await.unwrap().unwrap();
    let mut rb = b.listen().await.unwrap().unwrap();
    a.notify("hello").await.unwrap();
    assert_eq!(receive(&mut rb).await.as_deref(), Some("hello"));
    assert_eq!(
        receive(&mut ra).await.as_deref(),
        Some("hello"),
        "own notifications too"
    );
    assert!(matches!(a.notify(&"x".repeat(8000)).await, Err(StoreError::Invalid(_))));
    let (_dir, lite) = sqlite().await;
    assert!(lite.listen().await.unwrap().is_none());
    lite.notify("nobody").await.unwrap();
    assert!(lite.hold_job_lock("x").await.unwrap());
}

/// Runs `check` on a fresh SQLite store, then on a fresh PostgreSQL database when
/// one is configured.
async fn on_both_backends(test: &str, check: impl AsyncFn(&dyn Store)) {
    let (_dir, lite) = sqlite().await;
    check(&lite).await;
    let Some(db) = Db::new(test).await else {
        return;
    };
    check(&db.open().await).await;
}

/// Polls `condition` every 50 ms until it holds; fails with `what` after 5 s.
async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !condition().await {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The one bigint a query on `db` returns (a count, or how many backends a
/// `SELECT count(pg_terminate_backend(..))` terminated).
async fn scalar(db: &Db, sql: &str) -> i64 {
    let client = db.admin_client().await;
    client.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_lock_moves_to_another_node() {
    let Some(db) = Db::new("job_lock_moves_to_another_node").await else {
        return;
    };
    let (a, b) = (db.open().await, db.open().await);
    assert!(a.hold_job_lock("rollups").await.unwrap());
    assert!(a.hold_job_lock("rollups").await.unwrap(), "kept");
    assert!(!b.hold_job_lock("rollups").await.unwrap());
    assert!(b.hold_job_lock("retention").await.unwrap(), "locks are per job");

    // A's lock connection dies (as with a network cut or an administrator's kill).
    let killed = scalar(
        &db,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_locks
         WHERE locktype = 'advisory' AND granted AND objsubid = 2 AND objid = hashtext('rollups')::oid
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .await;
    assert_eq!(killed, 1);
    eventually("B never took the lock", || async {
        b.hold_job_lock("rollups").await.unwrap()
    })
    .await;
    assert!(!a.hold_job_lock("rollups").await.unwrap(), "A lost it");
    assert!(b.hold_job_lock("rollups").await.unwrap());

    // B goes away entirely: A takes over.
    drop(b);
    eventually("A never took the lock back", || async {
        a.hold_job_lock("rollups").await.unwrap()
    })
    .await;
}

/// Sessions of the test's own database waiting for a lock (a row, a transaction).
const LOCK_WAITS: &str =
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'";

/// Waits until `waits` (a query counting waiting sessions) counts `n`; fails with `what`.
async fn until_waiting(db: &Db, waits: &str, n: i64, what: &str) {
    eventually(what, || async { scalar(db, waits).await == n }).await;
}

/// Advisory-lock waits in the test's own database (other tests running at once wait for
/// locks too).
const ADVISORY_WAITS: &str = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
     AND database = (SELECT oid FROM pg_database WHERE datname = current_database())";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_locks_serialize_work_across_nodes() {
    let Some(db) = Db::new("cluster_locks_serialize_work_across_nodes").await else {
        return;
    };
    let (a, b) = (Arc::new(db.open().await), Arc::new(db.open().await));
    let held = a.cluster_lock("otlp.streams.s").await.unwrap();
    let waiting = {
        let b = b.clone();
        tokio::spawn(async move { b.cluster_lock("otlp.streams.s").await })
    };
    until_waiting(&db, ADVISORY_WAITS, 1, "B never queued for the lock").await;
    assert!(!waiting.is_finished(), "B took a lock A holds");
    let other = b.cluster_lock("otlp.streams.t").await.unwrap();
    other.release().await.unwrap();
    assert!(
        b.hold_job_lock("otlp.streams.s").await.unwrap(),
        "a job of the same name does not wait for it"
    );

    held.release().await.unwrap();
    let on_b = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("B got the lock once A released it")
        .unwrap()
        .unwrap();

    // A guard dropped without release (an error path, a cancelled request) frees the
    // lock: released in the background, its session kept for the next lock.
    let waiting = {
        let a = a.clone();
        tokio::spawn(async move { a.cluster_lock("otlp.streams.s").await })
    };
    until_waiting(&db, ADVISORY_WAITS, 1, "A never queued for the lock").await;
    assert!(!waiting.is_finished(), "A took a lock B holds");
    drop(on_b);
    let again = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("A got the lock once B's guard was dropped")
        .unwrap()
        .unwrap();
    again.release().await.unwrap();
    // Every lock session is still open, each last used to unlock: A's, and B's two (the
    // one that held "t", and the dropped guard's, which a drop used to close).
    eventually("the dropped guard's session was not kept", || async {
        scalar(
            &db,
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND query LIKE 'SELECT pg_advisory_unlock%'",
        )
        .await
            == 3
    })
    .await;

    let (_dir, lite) = sqlite().await;
    let first = lite.cluster_lock("x").await.unwrap();
    lite.cluster_lock("x").await.unwrap().release().await.unwrap();
    first.release().await.unwrap();
}

/// A wait for a cluster lock that is given up (the request waiting went away) is
/// cancelled on the server at once: a dropped client alone would keep its session
/// queued for the lock until the holder let go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_cluster_lock_wait_leaves_no_session_waiting() {
    let Some(db) = Db::new("an_abandoned_cluster_lock_wait_leaves_no_session_waiting").await else {
        return;
    };
    let (a, b) = (db.open().await, Arc::new(db.open().await));
    let held = a.cluster_lock("x").await.unwrap();
    let waiting = {
        let b = b.clone();
        tokio::spawn(async move { b.cluster_lock("x").await.map(|_| ()) })
    };
    until_waiting(&db, ADVISORY_WAITS, 1, "B never queued for the lock").await;
    waiting.abort();
    until_waiting(&db, ADVISORY_WAITS, 0, "the abandoned wait still queues on the server").await;
    held.release().await.unwrap();
    // B's next lock works (the cancelled session was not reused).
    b.cluster_lock("x").await.unwrap().release().await.unwrap();
}

/// A node holds at most 16 cluster locks at once (one session each): the 17th, even of a
/// free name, waits for a turn instead of opening yet another connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_locks_take_at_most_sixteen_sessions() {
    let Some(db) = Db::new("cluster_locks_take_at_most_sixteen_sessions").await else {
        return;
    };
    let a = Arc::new(db.open().await);
    let mut held = Vec::new();
    for i in 0..16 {
        held.push(a.cluster_lock(&format!("s{i}")).await.unwrap());
    }
    let waiting = {
        let a = a.clone();
        tokio::spawn(async move { a.cluster_lock("s16").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "a 17th session was opened");
    held.pop().unwrap().release().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the 17th got a turn once one was released")
        .unwrap()
        .unwrap()
        .release()
        .await
        .unwrap();
    for lock in held {
        lock.release().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovers_after_connections_are_killed() {
    let Some(db) = Db::new("recovers_after_connections_are_killed").await else {
        return;
    };
    let (a, b) = (db.open().await, db.open().await);
    a.create_server("s", &ServerFields::default(), 0).await.unwrap();
    let mut rx = a.listen().await.unwrap().unwrap();
    // Fill the pool with several connections.
    let reads: Vec<_> = (0..4).map(|_| a.list_servers()).collect();
    for r in futures_join(reads).await {
        r.unwrap();
    }
    assert!(a.hold_job_lock("j").await.unwrap());
    let killed = scalar(
        &db,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .await;
    assert!(killed >= 3, "{killed}");
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Every call either works or says Unavailable; none panics, and soon all work.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let results = [
            a.list_servers().await.map(|_| ()),
            a.get_server("s").await.map(|_| ()),
            a.write_batch(batch(vec![request(vec![], vec![])])).await.map(|_| ()),
            a.dirty_backlog().await.map(|_| ()),
            a.hold_job_lock("j").await.map(|_| ()),
        ];
        for r in &results {
            assert!(matches!(r, Ok(()) | Err(StoreError::Unavailable(_))), "{r:?}");
        }
        if results.iter().all(Result::is_ok) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still failing: {results:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The lock was lost with its connection and is taken again.
    eventually("A never took the lock again", || async {
        a.hold_job_lock("j").await.unwrap()
    })
    .await;
    // The listener reconnected: a notification sent now arrives.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        b.notify("after").await.unwrap();
        if let Ok(Some(p)) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
            assert_eq!(p, "after");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "listener never came back");
    }
}

async fn futures_join<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    let handles: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut out = Vec::new();
    // Started together so the pool has to open several connections.
    let all = futures_util::future::join_all(handles).await;
    out.extend(all);
    out
}

#[tokio::test]
async fn open_selects_postgres_from_the_url() {
    let Some(db) = Db::new("open_selects_postgres_from_the_url").await else {
        return;
    };
    let store: Arc<dyn Store> = mcp_metrics_store::open(&db.url, &StoreOptions::default())
        .await
        .unwrap();
    assert_eq!(store.backend(), "postgres");
    store.ping().await.unwrap();
    assert_eq!(
        store.schema_version().await.unwrap(),
        mcp_metrics_store::postgres::latest_version()
    );
    // A second open (another node starting) finds the schema applied.
    let again = mcp_metrics_store::open(&db.url, &StoreOptions::default())
        .await
        .unwrap();
    again.ping().await.unwrap();
}

/// Fills a store through the trait with a bit of everything.
async fn fill(store: &dyn Store) {
    let base = (now_ms() / DAY - 3) * DAY;
    for id in ["a", "b"] {
        store
            .create_server(
                id,
                &ServerFields {
                    name: Some(format!("Server {id}")),
                    ..Default::default()
                },
                1,
            )
            .await
            .unwrap();
        store
            .insert_credential(&StoredCredential {
                key_id: format!("key-{id}"),
                server_id: id.into(),
                api_key_hash: [id.as_bytes()[0]; 32],
                sealed_secret: vec![1, 2, 3],
                created_at: 5,
                revoked_at: None,
                last_used_at: None,
            })
            .await
            .unwrap();
    }
    // A series created and deleted: its id must never come back.
    store.create_server("c", &ServerFields::default(), 1).await.unwrap();
    store
        .write_batch(batch(vec![request(
            vec![NewSeries {
                key: key("c", "x"),
                kind: Kind::Gauge,
            }],
            vec![],
        )]))
        .await
        .unwrap();
    store.delete_server("c").await.unwrap();
    let mut samples = Vec::new();
    for i in 0..3000 {
        samples.push(sample(
            SeriesRef::New(0),
            Kind::Gauge,
            base + i * 61_000,
            (i % 17) as f64 * 0.25,
        ));
        samples.push(sample(SeriesRef::New(1), Kind::Counter, base + i * 61_000, i as f64));
        samples.push(sample(
            SeriesRef::New(2),
            Kind::Histogram,
            base + i * 61_000,
            0.1 * i as f64,
        ));
        samples.push(sample(SeriesRef::New(2), Kind::Histogram, base + i * 61_000, 7.0));
    }
    let mut r = request(
        vec![
            NewSeries {
                key: key("a", "g"),
                kind: Kind::Gauge,
            },
            NewSeries {
                key: key("a", "c"),
                kind: Kind::Counter,
            },
            NewSeries {
                key: key("b", "h"),
                kind: Kind::Histogram,
            },
        ],
        samples,
    );
    r.key_id = "key-a".into();
    r.event = Some(NewEvent {
        server_id: "a".into(),
        kind: "deploy".into(),
        title: "v2".into(),
        detail: Some("notes".into()),
        at: base,
        source: EventSource::Author,
    });
    store.write_batch(batch(vec![r])).await.unwrap();
    for level in [Level::Minute, Level::Hour] {
        let work = store.rollup_work(level, 2000).await.unwrap();
        let results = work
            .items
            .iter()
            .map(|(m, input)| {
                let kind = work.series[&m.series_id].0;
                let stats = fold_kind(kind, input);
                (*m, stats)
            })
            .collect();
        store.apply_rollups(level, results).await.unwrap();
    }
    // Written after the last pass: on SQLite its minute marks are still in the log.
    store
        .write_batch(batch(vec![request(
            vec![NewSeries {
                key: key("b", "late"),
                kind: Kind::Gauge,
            }],
            vec![
                sample(SeriesRef::New(0), Kind::Gauge, base + 1, 1.0),
                sample(SeriesRef::New(0), Kind::Gauge, base + 120_000, 2.0),
            ],
        )]))
        .await
        .unwrap();
    store
        .record_usage(
            (0..20)
                .map(|i| UsageRecord {
                    server_id: if i % 2 == 0 { "a" } else { "b" }.into(),
                    kind: if i % 3 == 0 {
                        UsageKind::Install
                    } else {
                        UsageKind::View
                    },
                    client: None,
                    at: base + i * 3_600_000,
                    visitor: [(i % 4) as u8; 16],
                })
                .collect(),
        )
        .await
        .unwrap();
    store.usage_salt(base / DAY, [3; 32]).await.unwrap();
    store.meta_set("master_key_fingerprint", "fp").await.unwrap();
}

/// What the fetch API can see of a store.
async fn snapshot(store: &dyn Store) -> String {
    let mut out = format!("{:?}\n", store.list_servers().await.unwrap());
    out += &format!("{:?}\n", store.all_sealed_credentials().await.unwrap());
    out += &format!("{:?}\n", store.list_credentials(None).await.unwrap());
    let series = store.all_series().await.unwrap();
    out += &format!("{series:?}\n");
    let ids: Vec<i64> = series.iter().map(|s| s.id).collect();
    let mut after = None;
    loop {
        let page = store
            .read_samples(&SampleQuery {
                series_ids: ids.clone(),
                from: 0,
                to: i64::MAX,
                after,
                limit: 5000,
            })
            .await
            .unwrap();
        out += &format!("{page:?}\n");
        match page.last() {
            Some(s) if page.len() == 5000 => after = Some((s.timestamp, s.series_id, s.seq)),
            _ => break,
        }
    }
    for level in [Level::Minute, Level::Hour, Level::Day] {
        out += &format!("{:?}\n", store.read_rollups(level, &ids, 0, i64::MAX).await.unwrap());
    }
    out += &format!("{:?}\n", store.dirty_backlog().await.unwrap());
    for id in ["a", "b"] {
        out += &format!("{:?}\n", store.usage_days(id, 0, i64::MAX / DAY).await.unwrap());
        out += &format!("{:?}\n", store.list_events(id, None, 100).await.unwrap());
    }
    out += &format!("{:?}\n", store.meta_get("master_key_fingerprint").await.unwrap());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_sqlite_to_postgres() {
    let Some(db) = Db::new("copies_sqlite_to_postgres").await else {
        return;
    };
    let (dir, lite) = sqlite().await;
    fill(&lite).await;
    let expected = snapshot(&lite).await;
    let path = dir.path().join("t.db");

    let mut seen = Vec::new();
    let report = mcp_metrics_store::copy::sqlite_to_postgres(&path, &db.url, |p| seen.push(p))
        .await
        .unwrap();
    let samples = report.tables.iter().find(|t| t.0 == "server_metrics").unwrap().1;
    assert_eq!(samples, 12_002);
    assert_eq!(report.samples_resumed, 0);
    assert_eq!(report.new_rows.len(), report.tables.len());
    assert!(
        report.new_rows.iter().any(|t| t.0 == "servers" && t.1 > 0),
        "{report:?}"
    );
    // The two minutes written after the last pass were still only logged.
    assert!(report.tables.contains(&("rollup_log", 2)), "{report:?}");
    assert!(report.new_rows.contains(&("rollup_log", 2)), "{report:?}");
    let last = seen.iter().rev().find(|p| p.table == "server_metrics").unwrap();
    assert_eq!((last.done, last.total), (12_002, 12_002));
    assert!(
        seen.iter()
            .any(|p| p.table == "rollups_1m" && p.done == p.total && p.total > 0)
    );

    let pg = db.open().await;
    assert_eq!(snapshot(&pg).await, expected);

    // A second run copies nothing new and changes nothing.
    let report = mcp_metrics_store::copy::sqlite_to_postgres(&path, &db.url, |_| {})
        .await
        .unwrap();
    assert_eq!(report.tables.iter().find(|t| t.0 == "server_metrics").unwrap().1, 0);
    assert_eq!(report.samples_resumed, 12_002);
    assert!(report.new_rows.iter().all(|t| t.1 == 0), "{:?}", report.new_rows);
    assert_eq!(snapshot(&pg).await, expected);

    // New series and events continue after the copied ids.
    let max_lite = lite.all_series().await.unwrap().iter().map(|s| s.id).max().unwrap();
    let out = pg
        .write_batch(batch(vec![request(
            vec![NewSeries {
                key: key("a", "new"),
                kind: Kind::Gauge,
            }],
            vec![],
        )]))
        .await
        .unwrap();
    assert!(stored_series(&out[0])[0] > max_lite);
    let event = pg
        .insert_event(&NewEvent {
            server_id: "a".into(),
            kind: "k".into(),
            title: "t".into(),
            detail: None,
            at: 0,
            source: EventSource::System,
        })
        .await
        .unwrap();
    assert!(event > 1);

    // Another source is refused, and so is a destination with data of its own.
    let (_other_dir, other) = sqlite().await;
    other.create_server("z", &ServerFields::default(), 0).await.unwrap();
    let other_path = _other_dir.path().join("t.db");
    let err = mcp_metrics_store::copy::sqlite_to_postgres(&other_path, &db.url, |_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
    let Some(db2) = Db::new("copies_sqlite_to_postgres").await else {
        return;
    };
    db2.open()
        .await
        .create_server("own", &ServerFields::default(), 0)
        .await
        .unwrap();
    let err = mcp_metrics_store::copy::sqlite_to_postgres(&path, &db2.url, |_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
}

/// Writes (ts, series, value) rows with seq `seq` into a binary COPY.
async fn write_copy(sink: tokio_postgres::CopyInSink<bytes::Bytes>, rows: &[(i64, i64, f64)], seq: i32) {
    use tokio_postgres::types::Type;
    let mut writer = std::pin::pin!(tokio_postgres::binary_copy::BinaryCopyInWriter::new(
        sink,
        &[Type::INT8, Type::INT8, Type::INT4, Type::FLOAT8]
    ));
    for (ts, id, v) in rows {
        writer.as_mut().write(&[ts, id, &seq, v]).await.unwrap();
    }
    writer.finish().await.unwrap();
}

/// Runs `sql` with the rows as three arrays (ts, series, value).
async fn insert_arrays(client: &tokio_postgres::Client, sql: &str, rows: &[(i64, i64, f64)]) {
    let ts: Vec<i64> = rows.iter().map(|r| r.0).collect();
    let id: Vec<i64> = rows.iter().map(|r| r.1).collect();
    let v: Vec<f64> = rows.iter().map(|r| r.2).collect();
    client.execute(sql, &[&ts, &id, &v]).await.unwrap();
}

/// Compares ways to write a batch of samples: the store's `write_batch`, upserts (COPY
/// into staging then INSERT ... ON CONFLICT, or INSERT ... FROM unnest(arrays) ... ON
/// CONFLICT), and the plain ways when no row exists yet (bare COPY, COPY split into
/// statements, INSERT from arrays). `PER_BATCH` (default 10,000) sets the rows per batch
/// and `COPY_CHUNK` (250) the split. Run by hand:
/// `PER_BATCH=1000 cargo test --release -p mcp-metrics-store --test postgres write_path_timing -- --ignored --nocapture`.
#[tokio::test]
#[ignore]
async fn write_path_timing() {
    let Some(db) = Db::new("write_path_timing").await else {
        return;
    };
    let store = db.open().await;
    store.create_server("s", &ServerFields::default(), 0).await.unwrap();
    let start = (now_ms() / DAY) * DAY;
    let per_batch: usize = std::env::var("PER_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let (series, rounds) = (200i64, 200_000 / per_batch);
    let ids: Vec<i64> = {
        let out = store
            .write_batch(batch(vec![request(
                (0..series)
                    .map(|i| NewSeries {
                        key: key("s", &format!("m{i}")),
                        kind: Kind::Gauge,
                    })
                    .collect(),
                vec![],
            )]))
            .await
            .unwrap();
        stored_series(&out[0])
    };
    let rows = |round: usize, offset: i64| -> Vec<(i64, i64, f64)> {
        (0..per_batch)
            .map(|i| {
                let ts = start + offset + (round * per_batch + i) as i64 / series * 1000;
                (ts, ids[i % series as usize], i as f64 * 0.5)
            })
            .collect()
    };
    let client = db.admin_client().await;

    // 1. The store's own write_batch (guards, marks and all).
    let t = std::time::Instant::now();
    for round in 0..rounds {
        let samples = rows(round, 0)
            .into_iter()
            .map(|(ts, id, v)| sample(SeriesRef::Known(id), Kind::Gauge, ts, v))
            .collect();
        store.write_batch(batch(vec![request(vec![], samples)])).await.unwrap();
    }
    let store_rate = (rounds * per_batch) as f64 / t.elapsed().as_secs_f64();

    // 2. unnest arrays, one statement per batch.
    let t = std::time::Instant::now();
    for round in 0..rounds {
        insert_arrays(
            &client,
            "INSERT INTO server_metrics (ts, series_id, seq, value)
                 SELECT t, i, 0, v FROM unnest($1::bigint[], $2::bigint[], $3::float8[]) AS x(t, i, v)
                 ON CONFLICT (ts, series_id, seq) DO UPDATE SET value = EXCLUDED.value",
            &rows(round, 3_600_000),
        )
        .await;
    }
    let unnest_rate = (rounds * per_batch) as f64 / t.elapsed().as_secs_f64();

    // 3. Plain binary COPY straight into the table (no upsert: only correct when no row
    // can exist yet, shown as the ceiling).
    let t = std::time::Instant::now();
    for round in 0..rounds {
        let sink = client
            .copy_in("COPY server_metrics (ts, series_id, seq, value) FROM STDIN BINARY")
            .await
            .unwrap();
        write_copy(sink, &rows(round, 7_200_000), 0).await;
    }
    let copy_rate = (rounds * per_batch) as f64 / t.elapsed().as_secs_f64();

    // 4. The store's sample statements alone: COPY into staging, upsert from it.
    let mut client = client;
    client
        .batch_execute(
            "CREATE TEMP TABLE metrics_staging (ts BIGINT NOT NULL, series_id BIGINT NOT NULL, seq INTEGER NOT NULL,
             value DOUBLE PRECISION NOT NULL) ON COMMIT DELETE ROWS",
        )
        .await
        .unwrap();
    let t = std::time::Instant::now();
    for round in 0..rounds {
        let tx = client.transaction().await.unwrap();
        let sink = tx
            .copy_in("COPY metrics_staging (ts, series_id, seq, value) FROM STDIN BINARY")
            .await
            .unwrap();
        write_copy(sink, &rows(round, 10_800_000), -1).await;
        tx.execute(
            "INSERT INTO server_metrics (ts, series_id, seq, value)
             SELECT ts, series_id, 0, value FROM metrics_staging WHERE seq < 0
             ON CONFLICT (ts, series_id, seq) DO UPDATE SET value = EXCLUDED.value",
            &[],
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
    }
    let staging_rate = (rounds * per_batch) as f64 / t.elapsed().as_secs_f64();

    // 5. Bare COPY in statements of at most copy_chunk rows.
    let copy_chunk: usize = std::env::var("COPY_CHUNK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(250);
    let t = std::time::Instant::now();
    for round in 0..rounds {
        for chunk in rows(round, 14_400_000).chunks(copy_chunk) {
            let sink = client
                .copy_in("COPY server_metrics (ts, series_id, seq, value) FROM STDIN BINARY")
                .await
                .unwrap();
            write_copy(sink, chunk, 0).await;
        }
    }
    let chunked_rate = (rounds * per_batch) as f64 / t.elapsed().as_secs_f64();

    // 6. A plain INSERT from unnest arrays (no upsert).
    let t = std::time::Instant::now();
    for round in 0..rounds {
        insert_arrays(
            &client,
            "INSERT INTO server_metrics (ts, series_id, seq, value)
                 SELECT t, i, 0, v FROM unnest($1::bigint[], $2::bigint[], $3::float8[]) AS x(t, i, v)",
            &rows(round, 18_000_000),
        )
        .await;
    }
    let insert_rate = (rounds * per_batch) as f64 / t.elapsed().as_secs_f64();
    println!(
        "samples/s with {per_batch} per batch: store write_batch {store_rate:.0}; sample statements only: \
         COPY + staging upsert {staging_rate:.0}, unnest upsert {unnest_rate:.0}, bare COPY (no upsert) {copy_rate:.0}, \
         bare COPY in statements of {copy_chunk} rows {chunked_rate:.0}, plain INSERT from unnest {insert_rate:.0}"
    );
}

/// The raw samples of one series at millisecond `t`.
async fn samples_at(store: &dyn Store, series_id: i64, t: i64) -> Vec<mcp_metrics_core::model::RawSample> {
    store
        .read_samples(&SampleQuery {
            series_ids: vec![series_id],
            from: t,
            to: t + 1,
            after: None,
            limit: 10,
        })
        .await
        .unwrap()
}

/// Requests of one write create the same series with different kinds (their senders
/// raced past the series cache): the series keeps the first kind, the samples meant for
/// another kind are refused (reported by their place in the request, with the kind the
/// series has), and the series never holds rows of two kinds.
async fn first_kind_wins(store: &dyn Store) {
    store.create_server("s", &ServerFields::default(), 0).await.unwrap();
    let t = (now_ms() / 60_000 - 2) * 60_000;
    let as_kind = |kind: Kind, values: &[f64]| {
        request(
            vec![NewSeries {
                key: key("s", "x"),
                kind,
            }],
            values.iter().map(|&v| sample(SeriesRef::New(0), kind, t, v)).collect(),
        )
    };
    let outcomes = store
        .write_batch(batch(vec![
            as_kind(Kind::Counter, &[1.0]),
            as_kind(Kind::Histogram, &[2.0, 3.0]),
            as_kind(Kind::Counter, &[4.0]),
        ]))
        .await
        .unwrap();
    let conflicts: Vec<Vec<(u32, Kind)>> = outcomes
        .iter()
        .map(|o| match o {
            RequestOutcome::Stored { kind_conflicts, .. } => kind_conflicts.clone(),
            other => panic!("not stored: {other:?}"),
        })
        .collect();
    assert_eq!(
        conflicts,
        vec![vec![], vec![(0, Kind::Counter), (1, Kind::Counter)], vec![]]
    );
    let series = store.series_of_server("s", None).await.unwrap();
    assert_eq!((series.len(), series[0].kind), (1, Kind::Counter));
    let stored = samples_at(store, series[0].id, t).await;
    let rows: Vec<(i64, f64)> = stored.iter().map(|s| (s.seq, s.value)).collect();
    assert_eq!(rows, vec![(0, 4.0)], "one counter value, the last counter written");
    let inputs = minute_pass_of(store, Kind::Counter).await;
    assert_eq!(inputs.len(), 1);
    let minute = stored_minute(store).await;
    assert_eq!((minute.count, minute.last, minute.sketch.is_some()), (1, 4.0, false));
}

test_on_both_backends!(
    a_series_created_with_two_kinds_keeps_the_first_and_refuses_the_other_on_both_backends,
    first_kind_wins
);

/// A request of a server deleted since it was authenticated (new series, an event, or
/// samples of a series the node still knew) is answered `ServerGone` and stores nothing,
/// while the rest of its group commits: before, a new series' or event's foreign key
/// broke the whole group's transaction, and known series' samples were stored orphaned.
async fn a_deleted_servers_request_leaves_its_group_alone(store: &dyn Store) {
    store.create_server("s", &ServerFields::default(), 0).await.unwrap();
    store.create_server("gone", &ServerFields::default(), 0).await.unwrap();
    let t = (now_ms() / 60_000 - 2) * 60_000;
    let new_series = |server: &str, value: f64| {
        request(
            vec![NewSeries {
                key: key(server, "x"),
                kind: Kind::Gauge,
            }],
            vec![sample(SeriesRef::New(0), Kind::Gauge, t, value)],
        )
    };
    // A series the deleted server had, still known to a node's cache.
    store.write_batch(batch(vec![new_series("gone", 0.5)])).await.unwrap();
    let gone_series = store.series_of_server("gone", None).await.unwrap()[0].id;
    store.delete_server("gone").await.unwrap();
    let mut known = request(
        vec![],
        vec![sample(SeriesRef::Known(gone_series), Kind::Gauge, t + 1, 3.0)],
    );
    known.server_id = "gone".into();
    let mut event = request(vec![], vec![]);
    event.event = Some(NewEvent {
        server_id: "gone".into(),
        kind: "deploy".into(),
        title: "v2".into(),
        detail: None,
        at: t,
        source: EventSource::Author,
    });
    event.body_digest = Some([7; 32]);
    let outcomes = store
        .write_batch(batch(vec![
            new_series("gone", 1.0),
            new_series("s", 2.0),
            event.clone(),
            known,
        ]))
        .await
        .unwrap();
    assert!(matches!(outcomes[0], RequestOutcome::ServerGone), "{outcomes:?}");
    assert!(matches!(outcomes[1], RequestOutcome::Stored { .. }), "{outcomes:?}");
    assert!(matches!(outcomes[2], RequestOutcome::ServerGone), "{outcomes:?}");
    assert!(matches!(outcomes[3], RequestOutcome::ServerGone), "{outcomes:?}");
    assert!(
        samples_at(store, gone_series, t + 1).await.is_empty(),
        "no sample under a series of the deleted server"
    );
    let kept = store.series_of_server("s", None).await.unwrap();
    let stored = samples_at(store, kept[0].id, t).await;
    assert_eq!(stored.iter().map(|s| s.value).collect::<Vec<_>>(), vec![2.0]);
    // Nothing of the gone request was kept, not even its retry digest: the same request
    // once the server exists again is stored, not taken for a retry.
    store.create_server("gone", &ServerFields::default(), 0).await.unwrap();
    let outcomes = store.write_batch(batch(vec![event])).await.unwrap();
    assert!(matches!(outcomes[0], RequestOutcome::Stored { .. }), "{outcomes:?}");
}

/// A request authenticated with a key of a server deleted and created again under the
/// same id (both between the key check and the commit) stores nothing: its key went with
/// the old server. Nor does one whose key was revoked between the check and the commit.
/// With a key the server still has, or without a credential to check (callers other than
/// the HTTP layer), the same request is stored.
async fn a_recreated_servers_old_key_stores_nothing(store: &dyn Store) {
    let credential = |key_id: &str| StoredCredential {
        key_id: key_id.into(),
        server_id: "s".into(),
        api_key_hash: {
            let mut hash = [0u8; 32];
            hash[..key_id.len()].copy_from_slice(key_id.as_bytes());
            hash
        },
        sealed_secret: vec![1],
        created_at: 0,
        revoked_at: None,
        last_used_at: None,
    };
    let t = (now_ms() / 60_000 - 2) * 60_000;
    let authenticated = |key_id: &str, value: f64| {
        let mut r = request(
            vec![NewSeries {
                key: key("s", "x"),
                kind: Kind::Gauge,
            }],
            vec![sample(SeriesRef::New(0), Kind::Gauge, t + value as i64, value)],
        );
        r.key_id = key_id.into();
        r.require_credential = true;
        r
    };
    store.create_server("s", &ServerFields::default(), 0).await.unwrap();
    store.insert_credential(&credential("old")).await.unwrap();
    let outcome = store.write_batch(batch(vec![authenticated("old", 1.0)])).await.unwrap();
    assert!(matches!(outcome[0], RequestOutcome::Stored { .. }), "{outcome:?}");
    store.delete_server("s").await.unwrap();
    store.create_server("s", &ServerFields::default(), 1).await.unwrap();
    store.insert_credential(&credential("new-key")).await.unwrap();
    let outcome = store
        .write_batch(batch(vec![authenticated("old", 2.0), authenticated("new-key", 3.0)]))
        .await
        .unwrap();
    assert!(matches!(outcome[0], RequestOutcome::ServerGone), "{outcome:?}");
    assert!(matches!(outcome[1], RequestOutcome::Stored { .. }), "{outcome:?}");
    let mut unchecked = authenticated("old", 4.0);
    unchecked.require_credential = false;
    let outcome = store.write_batch(batch(vec![unchecked])).await.unwrap();
    assert!(matches!(outcome[0], RequestOutcome::Stored { .. }), "{outcome:?}");
    assert!(store.revoke_credential("s", "new-key", 2).await.unwrap());
    let outcome = store
        .write_batch(batch(vec![authenticated("new-key", 5.0)]))
        .await
        .unwrap();
    assert!(matches!(outcome[0], RequestOutcome::ServerGone), "{outcome:?}");
    let id = store.series_of_server("s", None).await.unwrap()[0].id;
    let stored: Vec<f64> = store
        .read_samples(&SampleQuery {
            series_ids: vec![id],
            from: 0,
            to: i64::MAX,
            after: None,
            limit: 10,
        })
        .await
        .unwrap()
        .iter()
        .map(|s| s.value)
        .collect();
    assert_eq!(
        stored,
        vec![3.0, 4.0],
        "neither the old key's request nor the revoked key's left anything"
    );
}

test_on_both_backends!(
    a_recreated_servers_old_key_stores_nothing_on_both_backends,
    a_recreated_servers_old_key_stores_nothing
);

test_on_both_backends!(
    a_deleted_servers_request_leaves_its_group_alone_on_both_backends,
    a_deleted_servers_request_leaves_its_group_alone
);

/// `delete_server` locks the server's row before reading its series: a write that has
/// created a series under it (holding the key-share lock every such write takes) and not
/// committed yet is waited for, and its series and samples go with the server. Reading the
/// series first would miss that series and leave its samples behind.
#[tokio::test]
async fn a_deletion_waits_for_a_write_creating_series_and_takes_its_rows() {
    let Some(db) = Db::new("a_deletion_waits_for_a_write_creating_series_and_takes_its_rows").await else {
        return;
    };
    let store = Arc::new(db.open().await);
    store.create_server("s", &ServerFields::default(), 0).await.unwrap();
    let writer = db.admin_client().await;
    writer
        .batch_execute(
            "BEGIN; SELECT id FROM servers WHERE id = 's' FOR KEY SHARE;
             INSERT INTO series (server_id, name, tags, kind, created_at) VALUES ('s', 'x', '{}', 0, 0)",
        )
        .await
        .unwrap();
    let id: i64 = writer
        .query_one("SELECT id FROM series WHERE server_id = 's'", &[])
        .await
        .unwrap()
        .get(0);
    writer
        .execute(
            "INSERT INTO server_metrics (ts, series_id, seq, value) VALUES ($1, $2, 0, 1.0)",
            &[&now_ms(), &id],
        )
        .await
        .unwrap();
    let deleting = {
        let store = store.clone();
        tokio::spawn(async move { store.delete_server("s").await })
    };
    until_waiting(&db, LOCK_WAITS, 1, "the deletion never waited for the write").await;
    writer.batch_execute("COMMIT").await.unwrap();
    deleting.await.unwrap().unwrap();
    assert_eq!(scalar(&db, "SELECT count(*) FROM series").await, 0);
    assert_eq!(
        scalar(
            &db,
            &format!("SELECT count(*) FROM server_metrics WHERE series_id = {id}")
        )
        .await,
        0,
        "the write's samples went with its series"
    );
}

/// A server "s" with the live key "k", and a request authenticated with it.
async fn server_with_live_key(store: &PostgresStore) -> WriteRequest {
    store.create_server("s", &ServerFields::default(), 0).await.unwrap();
    store
        .insert_credential(&StoredCredential {
            key_id: "k".into(),
            server_id: "s".into(),
            api_key_hash: [3; 32],
            sealed_secret: vec![1],
            created_at: 0,
            revoked_at: None,
            last_used_at: None,
        })
        .await
        .unwrap();
    let t = (now_ms() / 60_000 - 2) * 60_000;
    let mut request = request(
        vec![NewSeries {
            key: key("s", "x"),
            kind: Kind::Gauge,
        }],
        vec![sample(SeriesRef::New(0), Kind::Gauge, t, 1.0)],
    );
    request.key_id = "k".into();
    request.require_credential = true;
    request
}

/// A revocation waits for a write that found the key live and has not committed (here a
/// transaction taking the key-share lock the write path's key check takes, in
/// `postgres/write.rs`): once `revoke_credential` returns, no write of that key is still
/// to commit. Meanwhile the key is already revoked for writes that check it later: they
/// store nothing and do not wait, so writes whose locks overlap cannot keep a revocation
/// waiting (they could when it locked the row before revoking it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_waits_for_a_write_that_found_the_key_live() {
    let Some(db) = Db::new("a_revocation_waits_for_a_write_that_found_the_key_live").await else {
        return;
    };
    let store = Arc::new(db.open().await);
    let request = server_with_live_key(&store).await;
    let writer = db.admin_client().await;
    writer
        .batch_execute("BEGIN; SELECT key_id FROM credentials WHERE key_id = 'k' AND revoked_at IS NULL FOR KEY SHARE")
        .await
        .unwrap();
    let revoking = {
        let store = store.clone();
        tokio::spawn(async move { store.revoke_credential("s", "k", 5).await })
    };
    until_waiting(&db, LOCK_WAITS, 1, "the revocation never waited for the write").await;
    let later = tokio::time::timeout(Duration::from_secs(10), store.write_batch(batch(vec![request])))
        .await
        .expect("a write checking the key while the revocation waits must not wait")
        .unwrap();
    assert!(matches!(later[0], RequestOutcome::ServerGone), "{later:?}");
    assert_eq!(scalar(&db, "SELECT count(*) FROM series").await, 0, "nothing stored");
    assert!(!revoking.is_finished());
    writer.batch_execute("COMMIT").await.unwrap();
    assert!(revoking.await.unwrap().unwrap());
    assert!(!store.revoke_credential("s", "k", 6).await.unwrap(), "already revoked");
    assert!(matches!(
        store.revoke_credential("s", "nope", 7).await,
        Err(StoreError::NotFound)
    ));
}

/// A write's key check takes a lock on the key's row that the revocation's exclusive
/// lock waits for (here a transaction holding the row `FOR UPDATE`, as
/// `revoke_credential`'s second statement does, and revoking the key before it commits):
/// the write waits, then stores nothing. Without that lock the revocation would not wait
/// for a write that found the key live, which would then store after it returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_checking_a_key_being_revoked_waits_and_stores_nothing() {
    let Some(db) = Db::new("a_write_checking_a_key_being_revoked_waits_and_stores_nothing").await else {
        return;
    };
    let store = Arc::new(db.open().await);
    let request = server_with_live_key(&store).await;
    let revoker = db.admin_client().await;
    revoker
        .batch_execute(
            "BEGIN; SELECT 1 FROM credentials WHERE key_id = 'k' FOR UPDATE;
             UPDATE credentials SET revoked_at = 5 WHERE key_id = 'k'",
        )
        .await
        .unwrap();
    let writing = {
        let store = store.clone();
        tokio::spawn(async move { store.write_batch(batch(vec![request])).await })
    };
    until_waiting(&db, LOCK_WAITS, 1, "the write never waited for the revocation").await;
    revoker.batch_execute("COMMIT").await.unwrap();
    let outcome = writing.await.unwrap().unwrap();
    assert!(matches!(outcome[0], RequestOutcome::ServerGone), "{outcome:?}");
    assert_eq!(scalar(&db, "SELECT count(*) FROM series").await, 0, "nothing stored");
}

/// A rollup apply and a server's deletion lock the server's series in one order (by id),
/// so they cannot deadlock. Here the apply holds the lowest series and waits (behind a
/// third transaction) for the next one when the deletion starts; the deletion's cascade
/// reaches the two lowest series last (their rows rewritten, their names made to sort
/// last), so, locking in its scan order, it took the others and waited for the apply,
/// which then waited for it: PostgreSQL broke the cycle by failing one (40P01).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollup_apply_and_a_deletion_take_series_locks_in_one_order() {
    let Some(db) = Db::new("a_rollup_apply_and_a_deletion_take_series_locks_in_one_order").await else {
        return;
    };
    let store = Arc::new(db.open().await);
    store.create_server("s", &ServerFields::default(), 0).await.unwrap();
    let t = (now_ms() / 60_000 - 2) * 60_000;
    store
        .write_batch(gauges(&[("a", t, 1.0), ("b", t, 2.0), ("c", t, 3.0), ("d", t, 4.0)]))
        .await
        .unwrap();
    let ids = series_ids(store.as_ref(), "s").await;
    let work = store.rollup_work(Level::Minute, 100).await.unwrap();
    let results = folded_gauges(&work);
    assert_eq!(results.len(), 4, "a bucket per series");

    let blocker = db.admin_client().await;
    blocker
        .batch_execute(&format!(
            "UPDATE series SET name = 'z' || name WHERE id IN ({}, {})",
            ids[0], ids[1]
        ))
        .await
        .unwrap();
    blocker
        .batch_execute(&format!(
            "BEGIN; SELECT id FROM series WHERE id = {} FOR UPDATE",
            ids[1]
        ))
        .await
        .unwrap();
    let applying = {
        let store = store.clone();
        tokio::spawn(async move { store.apply_rollups(Level::Minute, results).await })
    };
    until_waiting(&db, LOCK_WAITS, 1, "the apply never waited for the blocker").await;
    let deleting = {
        let store = store.clone();
        tokio::spawn(async move { store.delete_server("s").await })
    };
    until_waiting(&db, LOCK_WAITS, 2, "the deletion never waited").await;
    blocker.batch_execute("COMMIT").await.unwrap();
    applying.await.unwrap().expect("the apply commits");
    deleting.await.unwrap().expect("the deletion commits");
    assert!(
        store
            .read_rollups(Level::Minute, &ids, 0, i64::MAX)
            .await
            .unwrap()
            .is_empty(),
        "the deletion took the buckets the apply stored"
    );
    assert_eq!(scalar(&db, "SELECT count(*) FROM series").await, 0);
}

/// Deleting a server takes its rollup rows and pending marks with it, and a pass that
/// read its minutes before the deletion does not bring them back.
async fn deleted_servers_leave_no_rollups(store: &dyn Store) {
    store.create_server("s", &ServerFields::default(), 0).await.unwrap();
    let t = (now_ms() / 60_000 - 2) * 60_000;
    store.write_batch(one_sample(Kind::Gauge, 1.0, t)).await.unwrap();
    for level in Level::ALL {
        let work = store.rollup_work(level, 100).await.unwrap();
        let results = folded_gauges(&work);
        store.apply_rollups(level, results).await.unwrap();
    }
    let id = store.series_of_server("s", None).await.unwrap()[0].id;
    for level in Level::ALL {
        assert_eq!(
            store.read_rollups(level, &[id], 0, i64::MAX).await.unwrap().len(),
            1,
            "{level:?}"
        );
    }
    // A new sample marks the minute; a pass reads it, then the server is deleted.
    store.write_batch(one_sample(Kind::Gauge, 2.0, t + 1)).await.unwrap();
    let work = store.rollup_work(Level::Minute, 100).await.unwrap();
    store.delete_server("s").await.unwrap();
    let results = folded_gauges(&work);
    assert!(results.iter().all(|(_, b)| b.is_some()), "the pass computed a bucket");
    store.apply_rollups(Level::Minute, results).await.unwrap();
    for level in Level::ALL {
        assert!(
            store.read_rollups(level, &[id], 0, i64::MAX).await.unwrap().is_empty(),
            "{level:?}"
        );
    }
    // Nor does it mark the hour of a series that is gone.
    assert_eq!(store.dirty_backlog().await.unwrap(), [0, 0, 0], "no mark left behind");
}

test_on_both_backends!(
    deleted_servers_leave_no_rollups_on_both_backends,
    deleted_servers_leave_no_rollups
);

fn named(server: &str, name: &str) -> NewSeries {
    NewSeries {
        key: key(server, name),
        kind: Kind::Gauge,
    }
}

/// The series each request's samples were refused for by the series limit.
fn refused_by_limit(outcomes: &[RequestOutcome]) -> Vec<Vec<u32>> {
    outcomes
        .iter()
        .map(|o| match o {
            RequestOutcome::Stored { series_refused, .. } => series_refused.clone(),
            other => panic!("not stored: {other:?}"),
        })
        .collect()
}

fn series_names(outcome: &RequestOutcome) -> Vec<String> {
    match outcome {
        RequestOutcome::Stored { series, .. } => series.iter().map(|s| s.key.name.clone()).collect(),
        other => panic!("not stored: {other:?}"),
    }
}

/// The per-server series limit: a server at it keeps its series (also ones it names as
/// new, as a node that has not cached them does), its series past the limit are not
/// created and their samples are listed as refused, a series two requests of one batch
/// create counts once, and other servers have their own count.
async fn series_limit(store: &dyn Store) {
    for server in ["s", "t"] {
        store.create_server(server, &ServerFields::default(), 1).await.unwrap();
    }
    let ts = now_ms();
    let gauge = |n: u32, value: f64| sample(SeriesRef::New(n), Kind::Gauge, ts, value);
    // "a" exists before the limit is set.
    store
        .write_batch(batch(vec![request(vec![named("s", "a")], vec![gauge(0, 1.0)])]))
        .await
        .unwrap();

    let mut limited = batch(vec![
        // a exists; b and c reach the limit of 3; d is one too many (samples 3 and 5).
        request(
            vec![named("s", "a"), named("s", "b"), named("s", "c"), named("s", "d")],
            vec![
                gauge(0, 1.0),
                gauge(1, 2.0),
                gauge(2, 3.0),
                gauge(3, 4.0),
                gauge(1, 5.0),
                gauge(3, 6.0),
            ],
        ),
        // c was just created by the request before; e does not fit.
        request(
            vec![named("s", "c"), named("s", "e")],
            vec![gauge(0, 7.0), gauge(1, 8.0)],
        ),
        // t has a limit of its own.
        request(
            vec![named("t", "x"), named("t", "y"), named("t", "z"), named("t", "w")],
            vec![gauge(3, 9.0), gauge(0, 10.0), gauge(1, 11.0), gauge(2, 12.0)],
        ),
    ]);
    limited.max_series_per_server = 3;
    let outcomes = store.write_batch(limited.clone()).await.unwrap();
    assert_eq!(refused_by_limit(&outcomes), vec![vec![3, 5], vec![1], vec![0]]);
    assert_eq!(series_names(&outcomes[0]), ["a", "b", "c"]);
    assert_eq!(series_names(&outcomes[1]), ["c"]);
    assert_eq!(series_names(&outcomes[2]), ["x", "y", "z"]);
    for server in ["s", "t"] {
        assert_eq!(series_ids(store, server).await.len(), 3, "{server}");
    }
    let ids = series_ids(store, "s").await;
    let stored = store
        .read_samples(&SampleQuery {
            series_ids: ids,
            from: ts,
            to: ts + 1,
            after: None,
            limit: 100,
        })
        .await
        .unwrap();
    let mut values: Vec<f64> = stored.iter().map(|s| s.value).collect();
    values.sort_by(f64::total_cmp);
    // a's 1.0 then again 1.0 (the same gauge point), b's 5.0 replacing 2.0, c's 7.0.
    assert_eq!(values, vec![1.0, 5.0, 7.0], "{stored:?}");

    // At the limit nothing new is made, later either; a higher limit makes d.
    limited.requests.truncate(1);
    let outcomes = store.write_batch(limited.clone()).await.unwrap();
    assert_eq!(refused_by_limit(&outcomes), vec![vec![3, 5]]);
    limited.max_series_per_server = 4;
    let outcomes = store.write_batch(limited).await.unwrap();
    assert_eq!(refused_by_limit(&outcomes), vec![Vec::<u32>::new()]);
    assert_eq!(series_names(&outcomes[0]), ["a", "b", "c", "d"]);
}

test_on_both_backends!(the_series_limit_refuses_only_new_series_on_both_backends, series_limit);

/// Two nodes creating series of one server at the same moment stay within its limit
/// together: each counts the server's series only after the other's creation committed.
/// Every round raises the limit by 6 and both nodes ask for 5 new series, so each round
/// can pass the limit if the counts race.
#[tokio::test]
async fn two_nodes_share_the_series_limit() {
    let Some(db) = Db::new("two_nodes_share_the_series_limit").await else {
        return;
    };
    let (one, two) = (db.open().await, db.open().await);
    one.create_server("s", &ServerFields::default(), 1).await.unwrap();
    let ts = now_ms();
    let limited = |node: usize, limit: u64| {
        let series: Vec<NewSeries> = (0..5).map(|i| named("s", &format!("node{node}-{i}"))).collect();
        let samples = (0..5)
            .map(|i| sample(SeriesRef::New(i), Kind::Gauge, ts, 1.0))
            .collect();
        let mut b = batch(vec![request(series, samples)]);
        b.max_series_per_server = limit;
        b
    };
    for round in 0..5 {
        let limit = 6 * (round as u64 + 1);
        let (a, b) = tokio::join!(
            one.write_batch(limited(2 * round, limit)),
            two.write_batch(limited(2 * round + 1, limit))
        );
        let refused = refused_by_limit(&a.unwrap())[0].len() + refused_by_limit(&b.unwrap())[0].len();
        let held = series_ids(&one, "s").await.len() as u64;
        assert_eq!(
            (held, refused),
            (limit, 4),
            "round {round}: the limit held across nodes"
        );
    }
}
