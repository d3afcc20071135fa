//! The generation check of dirty marks: a pass whose inputs went stale while it
//! computed must not overwrite the bucket, and must leave the mark for the next pass.
//! And the SQLite store's mark log, which writes append to and passes settle into marks.

mod common;

use common::series_ids;
use mcp_metrics_core::model::{Kind, SeriesKey, ServerFields};
use mcp_metrics_core::rollup::{BucketStats, Level};
use mcp_metrics_core::time::now_ms;
use mcp_metrics_store::sqlite::SqliteStore;
use mcp_metrics_store::{
    NewSeries, PendingSample, RetentionCutoffs, RollupInput, SeriesRef, Store, StoreOptions, WriteBatch, WriteRequest,
};

fn sample(value: f64, ts: i64) -> WriteBatch {
    WriteBatch {
        requests: vec![WriteRequest {
            server_id: "s".into(),
            key_id: "k".into(),
            new_series: vec![NewSeries {
                key: SeriesKey {
                    server_id: "s".into(),
                    name: "rt".into(),
                    tags: vec![],
                },
                kind: Kind::Histogram,
            }],
            samples: vec![PendingSample {
                series: SeriesRef::New(0),
                kind: Kind::Histogram,
                timestamp: ts,
                value,
            }],
            ..Default::default()
        }],
        now: now_ms(),
        replay_window_ms: 600_000,
        retry_window_ms: 600_000,
        max_series_per_server: 0,
    }
}

fn fold(input: &RollupInput) -> Option<BucketStats> {
    input.clone().fold(Kind::Histogram)
}

/// A fresh store holding server "s".
async fn store_with_server() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("m.db"), &StoreOptions::default())
        .await
        .unwrap();
    store.create_server("s", &ServerFields::default(), 0).await.unwrap();
    (dir, store)
}

#[tokio::test]
async fn stale_pass_does_not_overwrite_and_keeps_the_mark() {
    let (_dir, store) = store_with_server().await;
    let ts = (now_ms() / 60_000 - 2) * 60_000;
    store.write_batch(sample(10.0, ts)).await.unwrap();

    // Pass A reads the minute with one sample...
    let stale = store.rollup_work(Level::Minute, 100).await.unwrap();
    assert_eq!(stale.items.len(), 1);
    // ...a second sample lands in the same minute, renewing the mark...
    store.write_batch(sample(20.0, ts + 1)).await.unwrap();
    // ...a fresh pass B handles it completely...
    let fresh = store.rollup_work(Level::Minute, 100).await.unwrap();
    let results: Vec<_> = fresh.items.iter().map(|(m, i)| (*m, fold(i))).collect();
    store.apply_rollups(Level::Minute, results).await.unwrap();
    // ...and then the stale pass A tries to write its older result.
    let results: Vec<_> = stale.items.iter().map(|(m, i)| (*m, fold(i))).collect();
    store.apply_rollups(Level::Minute, results).await.unwrap();

    let series = store.series_of_server("s", None).await.unwrap();
    let rows = store
        .read_rollups(Level::Minute, &[series[0].id], 0, i64::MAX)
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].stats.count, 2, "the newer result stands");
    assert_eq!(store.dirty_backlog().await.unwrap()[0], 0);
    // The hour is marked (once: one mark per hour and series).
    assert_eq!(store.dirty_backlog().await.unwrap()[1], 1);
}

#[tokio::test]
async fn renewed_mark_survives_a_pass_that_read_it_before() {
    let (_dir, store) = store_with_server().await;
    let ts = (now_ms() / 60_000 - 2) * 60_000;
    store.write_batch(sample(10.0, ts)).await.unwrap();
    let stale = store.rollup_work(Level::Minute, 100).await.unwrap();
    store.write_batch(sample(20.0, ts + 1)).await.unwrap();
    let results: Vec<_> = stale.items.iter().map(|(m, i)| (*m, fold(i))).collect();
    store.apply_rollups(Level::Minute, results).await.unwrap();
    // The pass's result is stored (a minute written without pause keeps being updated),
    // and the minute stays dirty for the sample it missed.
    let series = store.series_of_server("s", None).await.unwrap();
    let rows = store
        .read_rollups(Level::Minute, &[series[0].id], 0, i64::MAX)
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].stats.count, 1);
    assert_eq!(store.dirty_backlog().await.unwrap()[0], 1);
    // The next pass completes it.
    let fresh = store.rollup_work(Level::Minute, 100).await.unwrap();
    let results: Vec<_> = fresh.items.iter().map(|(m, i)| (*m, fold(i))).collect();
    store.apply_rollups(Level::Minute, results).await.unwrap();
    let rows = store
        .read_rollups(Level::Minute, &[series[0].id], 0, i64::MAX)
        .await
        .unwrap();
    assert_eq!(rows[0].stats.count, 2);
    assert_eq!(store.dirty_backlog().await.unwrap()[0], 0);
}

/// One sample in each of `series` histogram series `m0`, `m1`, … at `ts`.
fn many(series: usize, value: f64, ts: i64) -> WriteBatch {
    let mut batch = sample(value, ts);
    let request = &mut batch.requests[0];
    request.new_series = (0..series)
        .map(|i| NewSeries {
            key: SeriesKey {
                server_id: "s".into(),
                name: format!("m{i}"),
                tags: vec![],
            },
            kind: Kind::Histogram,
        })
        .collect();
    request.samples = (0..series as u32)
        .map(|i| PendingSample {
            series: SeriesRef::New(i),
            kind: Kind::Histogram,
            timestamp: ts,
            value,
        })
        .collect();
    batch
}

/// A write's minute marks are set several per statement: a write of 130 series (two full
/// statements and a remainder) marks every one, and a second write to them renews every
/// mark, so a pass that read them before leaves all 130 dirty.
#[tokio::test]
async fn every_series_of_a_large_write_is_marked_and_renewed() {
    let (_dir, store) = store_with_server().await;
    let ts = (now_ms() / 60_000 - 2) * 60_000;
    store.write_batch(many(130, 10.0, ts)).await.unwrap();
    assert_eq!(store.dirty_backlog().await.unwrap()[0], 130);
    let stale = store.rollup_work(Level::Minute, 1000).await.unwrap();
    let ids = series_ids(&store, "s").await;
    let mut marked: Vec<(i64, i64)> = stale.items.iter().map(|(m, _)| (m.bucket, m.series_id)).collect();
    marked.sort_unstable();
    assert_eq!(
        marked,
        ids.iter().map(|&id| (ts, id)).collect::<Vec<_>>(),
        "one mark per series, at its minute"
    );
    store.write_batch(many(130, 20.0, ts + 1)).await.unwrap();
    let results: Vec<_> = stale.items.iter().map(|(m, i)| (*m, fold(i))).collect();
    store.apply_rollups(Level::Minute, results).await.unwrap();
    assert_eq!(
        store.dirty_backlog().await.unwrap()[0],
        130,
        "every renewed mark survives the stale pass"
    );
    let fresh = store.rollup_work(Level::Minute, 1000).await.unwrap();
    let results: Vec<_> = fresh.items.iter().map(|(m, i)| (*m, fold(i))).collect();
    store.apply_rollups(Level::Minute, results).await.unwrap();
    assert_eq!(store.dirty_backlog().await.unwrap()[0], 0);
    let rows = store.read_rollups(Level::Minute, &ids, 0, i64::MAX).await.unwrap();
    assert_eq!(rows.len(), 130);
    assert!(
        rows.iter().all(|r| r.stats.count == 2),
        "every minute holds both writes"
    );
}

/// Writes log their marks (`sqlite/mark_log.rs`): a (minute, series) written many times
/// counts once in the backlog, before and after a pass settles the log, and its mark
/// carries the generation of the last write to it, as a mark renewed by every write did.
#[tokio::test]
async fn logged_marks_count_once_and_settle_at_the_last_writes_generation() {
    let (_dir, store) = store_with_server().await;
    // Both minutes inside one hour.
    let ts = (now_ms() / 3_600_000 - 1) * 3_600_000 + 300_000;
    // m0, m1 and m2 in the first minute; then m0 alone, four times; then m0 in the next.
    store.write_batch(many(3, 1.0, ts)).await.unwrap();
    for i in 0..4 {
        store.write_batch(many(1, 2.0, ts + 1 + i)).await.unwrap();
    }
    store.write_batch(many(1, 3.0, ts + 60_000)).await.unwrap();
    assert_eq!(store.dirty_backlog().await.unwrap(), [4, 0, 0]);

    let work = store.rollup_work(Level::Minute, 100).await.unwrap();
    assert_eq!(store.dirty_backlog().await.unwrap(), [4, 0, 0], "settled, not doubled");
    let ids = series_ids(&store, "s").await;
    let generation = |bucket: i64, id: i64| {
        work.items
            .iter()
            .find(|(m, _)| (m.bucket, m.series_id) == (bucket, id))
            .map(|(m, _)| m.generation)
            .unwrap()
    };
    let (m0, m1, m2) = (ids[0], ids[1], ids[2]);
    assert_eq!(work.items.len(), 4);
    assert_eq!(generation(ts, m1), generation(ts, m2), "one write");
    assert!(generation(ts, m0) > generation(ts, m1), "m0 was written last");
    assert!(generation(ts + 60_000, m0) > generation(ts, m0));
    // A write after the settling: its minute is marked and logged, and counts once.
    store.write_batch(many(1, 4.0, ts + 10)).await.unwrap();
    assert_eq!(
        store.dirty_backlog().await.unwrap(),
        [4, 0, 0],
        "marked and logged: once"
    );
    let results: Vec<_> = work.items.iter().map(|(m, i)| (*m, fold(i))).collect();
    store.apply_rollups(Level::Minute, results).await.unwrap();
    // The pass cleared the mark it read; the log keeps the minute dirty.
    assert_eq!(
        store.dirty_backlog().await.unwrap(),
        [1, 3, 0],
        "an hour mark per series"
    );
    let counts = async || {
        let rows = store.read_rollups(Level::Minute, &[m0], 0, i64::MAX).await.unwrap();
        rows.iter().map(|r| r.stats.count).collect::<Vec<_>>()
    };
    assert_eq!(counts().await, vec![5, 1]);
    let next = store.rollup_work(Level::Minute, 100).await.unwrap();
    assert_eq!(next.items.len(), 1);
    let results: Vec<_> = next.items.iter().map(|(m, i)| (*m, fold(i))).collect();
    store.apply_rollups(Level::Minute, results).await.unwrap();
    assert_eq!(counts().await, vec![6, 1], "the next pass adds the later write");
    assert_eq!(store.dirty_backlog().await.unwrap()[0], 0);
}

/// Settling never lowers a mark: an operator's re-aggregation, newer than the writes
/// still in the log, keeps its generation for every minute it marked.
#[tokio::test]
async fn settling_keeps_a_newer_mark() {
    let (_dir, store) = store_with_server().await;
    let ts = (now_ms() / 60_000 - 3) * 60_000;
    // m0 and m1 logged, then m0 again: their logged generations differ.
    store.write_batch(many(2, 1.0, ts)).await.unwrap();
    store.write_batch(many(1, 1.0, ts + 1)).await.unwrap();
    assert_eq!(store.mark_range_dirty(ts, ts + 60_000).await.unwrap(), 2);
    let work = store.rollup_work(Level::Minute, 100).await.unwrap();
    let generations: Vec<i64> = work.items.iter().map(|(m, _)| m.generation).collect();
    assert_eq!(generations.len(), 2);
    // Logged at two generations, re-marked at one: lowered, they would differ.
    assert_eq!(generations[0], generations[1], "{generations:?}");
}

/// A server deleted before a pass settled its writes' marks leaves none behind: they
/// would name series that are gone.
#[tokio::test]
async fn a_deleted_servers_logged_marks_do_not_come_back() {
    let (_dir, store) = store_with_server().await;
    let ts = (now_ms() / 60_000 - 2) * 60_000;
    store.write_batch(many(5, 1.0, ts)).await.unwrap();
    assert_eq!(store.dirty_backlog().await.unwrap(), [5, 0, 0]);
    store.delete_server("s").await.unwrap();
    assert_eq!(store.dirty_backlog().await.unwrap(), [0, 0, 0]);
    assert!(store.rollup_work(Level::Minute, 100).await.unwrap().items.is_empty());
}

/// Minute retention forgets logged minutes before its cutoff, as it does marks.
#[tokio::test]
async fn minute_retention_forgets_old_logged_minutes() {
    let (_dir, store) = store_with_server().await;
    let recent = (now_ms() / 60_000 - 2) * 60_000;
    let old = recent - 40 * 86_400_000;
    store.write_batch(many(2, 1.0, old)).await.unwrap();
    store.write_batch(many(3, 1.0, recent)).await.unwrap();
    assert_eq!(store.dirty_backlog().await.unwrap(), [5, 0, 0]);
    store
        .apply_retention(&RetentionCutoffs {
            raw: None,
            minute: Some(recent - 86_400_000),
            hour: None,
            day: None,
        })
        .await
        .unwrap();
    assert_eq!(store.dirty_backlog().await.unwrap(), [3, 0, 0]);
    let work = store.rollup_work(Level::Minute, 100).await.unwrap();
    assert!(work.items.iter().all(|(m, _)| m.bucket == recent));
}

/// With the job far apart (or slowed by a backlog), the writer settles the log itself
/// once it holds about a thousand rows, so the log, a minute of which the writer reads
/// when it first meets that minute, stays bounded; the marks are the same.
#[tokio::test]
async fn the_writer_settles_a_long_log_itself() {
    let (dir, store) = store_with_server().await;
    let ts = (now_ms() / 60_000 - 3) * 60_000;
    for i in 0..1100 {
        store.write_batch(many(1, 1.0, ts + i)).await.unwrap();
    }
    let file = rusqlite::Connection::open(dir.path().join("m.db")).unwrap();
    let count = |table: &str| -> i64 {
        file.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
            .unwrap()
    };
    assert!(count("rollup_log") < 200, "{} rows logged", count("rollup_log"));
    assert_eq!(count("rollup_dirty"), 1, "settled into one mark");
    assert_eq!(store.dirty_backlog().await.unwrap(), [1, 0, 0]);
    let work = store.rollup_work(Level::Minute, 100).await.unwrap();
    let results: Vec<_> = work.items.iter().map(|(m, i)| (*m, fold(i))).collect();
    store.apply_rollups(Level::Minute, results).await.unwrap();
    let ids = series_ids(&store, "s").await;
    let rows = store.read_rollups(Level::Minute, &ids, 0, i64::MAX).await.unwrap();
    assert_eq!(rows[0].stats.count, 1100);
}
