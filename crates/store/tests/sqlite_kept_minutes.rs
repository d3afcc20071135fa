//! The SQLite writer keeps open minute buckets for the rollup job: in-order traffic is
//! rolled up without reading samples back, and anything the writer cannot vouch for (a
//! late sample, a minute with history, another connection's commit, a re-aggregation)
//! is read as before — with the same buckets either way.

use mcp_metrics_core::model::{Kind, SeriesKey, ServerFields};
use mcp_metrics_core::rollup::{BucketStats, Level};
use mcp_metrics_core::time::now_ms;
use mcp_metrics_store::sqlite::SqliteStore;
use mcp_metrics_store::{
    NewSeries, PendingSample, RollupInput, SeriesRef, Store, StoreOptions, WriteBatch, WriteRequest,
};

/// One request writing `(name, kind, ts, value)` samples, creating their series.
fn batch(samples: &[(&str, Kind, i64, f64)]) -> WriteBatch {
    let mut request = WriteRequest {
        server_id: "s".into(),
        key_id: "k".into(),
        ..Default::default()
    };
    for &(name, kind, ts, value) in samples {
        let index = match request.new_series.iter().position(|s| s.key.name == name) {
            Some(i) => i,
            None => {
                request.new_series.push(NewSeries {
                    key: SeriesKey {
                        server_id: "s".into(),
                        name: name.into(),
                        tags: vec![],
                    },
                    kind,
                });
                request.new_series.len() - 1
            }
        };
        request.samples.push(PendingSample {
            series: SeriesRef::New(index as u32),
            kind,
            timestamp: ts,
            value,
        });
    }
    WriteBatch {
        requests: vec![request],
        now: now_ms(),
        replay_window_ms: 600_000,
        retry_window_ms: 600_000,
        max_series_per_server: 0,
    }
}

/// Writes `samples` as one request and waits for its commit.
async fn write(store: &SqliteStore, samples: &[(&str, Kind, i64, f64)]) {
    store.write_batch(batch(samples)).await.unwrap();
}

async fn open(path: &std::path::Path) -> SqliteStore {
    SqliteStore::open(path, &StoreOptions::default()).await.unwrap()
}

/// A new database file holding the server `s`: its directory, its path and the store.
async fn fresh() -> (tempfile::TempDir, std::path::PathBuf, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.db");
    let store = open(&path).await;
    store.create_server("s", &ServerFields::default(), 0).await.unwrap();
    (dir, path, store)
}

/// One minute pass; returns the kind of input of each bucket by series name.
async fn minute_pass(store: &SqliteStore) -> Vec<(String, &'static str)> {
    let work = store.rollup_work(Level::Minute, 100).await.unwrap();
    let mut inputs = Vec::new();
    let mut results = Vec::new();
    for (mark, input) in work.items {
        let (kind, _, name) = work.series[&mark.series_id].clone();
        inputs.push((
            name,
            match input {
                RollupInput::Kept { .. } => "kept",
                RollupInput::Raw(_) => "read",
                _ => "other",
            },
        ));
        results.push((mark, input.fold(kind)));
    }
    store.apply_rollups(Level::Minute, results).await.unwrap();
    inputs.sort();
    inputs
}

/// Every stored minute bucket, by series name.
async fn minutes(store: &SqliteStore) -> Vec<(String, i64, BucketStats)> {
    let mut out = Vec::new();
    for series in store.series_of_server("s", None).await.unwrap() {
        for row in store
            .read_rollups(Level::Minute, &[series.id], 0, i64::MAX)
            .await
            .unwrap()
        {
            out.push((series.key.name.clone(), row.bucket, row.stats));
        }
    }
    out.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    out
}

/// The earliest stored minute bucket of a series.
async fn first_minute(store: &SqliteStore, name: &str) -> BucketStats {
    minutes(store).await.into_iter().find(|b| b.0 == name).unwrap().2
}

fn kept(names: &[&str]) -> Vec<(String, &'static str)> {
    names.iter().map(|n| (n.to_string(), "kept")).collect()
}

#[tokio::test]
async fn in_order_minutes_are_kept_and_equal_a_full_read() {
    let (_dir, _, store) = fresh().await;
    let m = (now_ms() / 60_000 - 3) * 60_000;
    write(
        &store,
        &[
            ("g", Kind::Gauge, m + 10, 3.0),
            ("c", Kind::Counter, m + 10, 100.0),
            ("h", Kind::Histogram, m + 10, 12.0),
            ("h", Kind::Histogram, m + 10, 14.0),
        ],
    )
    .await;
    assert_eq!(minute_pass(&store).await, kept(&["c", "g", "h"]));
    // More of the same minutes, a counter restart and the next minute, over two writes.
    write(
        &store,
        &[
            ("c", Kind::Counter, m + 20, 130.0),
            ("c", Kind::Counter, m + 30, 4.0),
            ("h", Kind::Histogram, m + 10, 20.0),
        ],
    )
    .await;
    write(
        &store,
        &[("g", Kind::Gauge, m + 40, 9.0), ("g", Kind::Gauge, m + 60_010, 1.0)],
    )
    .await;
    assert_eq!(minute_pass(&store).await, kept(&["c", "g", "g", "h"]));
    let from_memory = minutes(&store).await;
    let counter = &from_memory.iter().find(|b| b.0 == "c").unwrap().2;
    assert_eq!((counter.count, counter.increase), (3, 34.0));

    // An operator's re-aggregation reads every minute from the table: same buckets.
    store.mark_range_dirty(0, i64::MAX).await.unwrap();
    let read = minute_pass(&store).await;
    assert!(read.iter().all(|(_, how)| *how == "read"), "{read:?}");
    assert_eq!(minutes(&store).await, from_memory);
    // After that the writer's buckets are used again.
    write(&store, &[("g", Kind::Gauge, m + 50, 2.0)]).await;
    assert_eq!(minute_pass(&store).await, kept(&["g"]));
    let g = first_minute(&store, "g").await;
    assert_eq!((g.count, g.last), (3, 2.0));
}

#[tokio::test]
async fn late_and_rewritten_samples_are_kept_unless_far_behind_or_history() {
    let (_dir, path, store) = fresh().await;
    let m = (now_ms() / 60_000 - 3) * 60_000;
    write(
        &store,
        &[
            ("late", Kind::Counter, m + 20, 10.0),
            ("same", Kind::Gauge, m + 20, 1.0),
        ],
    )
    .await;
    minute_pass(&store).await;
    // Slightly out of order (as from several connections) and a rewritten value.
    write(
        &store,
        &[("late", Kind::Counter, m + 10, 4.0), ("same", Kind::Gauge, m + 20, 5.0)],
    )
    .await;
    assert_eq!(minute_pass(&store).await, kept(&["late", "same"]));
    let buckets = minutes(&store).await;
    let late = &buckets[0].2;
    assert_eq!((late.count, late.first, late.last, late.increase), (2, 4.0, 10.0, 6.0));
    let same = &buckets[1].2;
    assert_eq!(
        (same.count, same.sum),
        (1, 5.0),
        "the rewritten value replaced the old one"
    );

    // Far out of order: more samples than the writer keeps unsorted, then one older than
    // all but the first.
    let many: Vec<_> = (0..1000)
        .map(|i| ("far", Kind::Counter, m + 100 + i, i as f64))
        .collect();
    write(&store, &many).await;
    write(&store, &[("far", Kind::Counter, m + 101, 0.5)]).await;
    assert_eq!(minute_pass(&store).await, vec![("far".to_string(), "read")]);
    let far = first_minute(&store, "far").await;
    assert_eq!((far.count, far.last, far.increase), (1000, 999.0, 999.0));
    assert_eq!(far.sum, 499_500.0 - 1.0 + 0.5, "the value at m + 101 was rewritten");

    // A restarted writer has not seen the minute: it reads it, history included.
    drop(store);
    let store = open(&path).await;
    write(&store, &[("same", Kind::Gauge, m + 30, 7.0)]).await;
    assert_eq!(minute_pass(&store).await, vec![("same".to_string(), "read")]);
    let same = first_minute(&store, "same").await;
    assert_eq!((same.count, same.sum), (2, 12.0));
}

#[tokio::test]
async fn another_connection_writing_the_file_is_noticed() {
    let (_dir, path, a) = fresh().await;
    let m = (now_ms() / 60_000 - 3) * 60_000;
    write(&a, &[("g", Kind::Gauge, m + 10, 1.0)]).await;
    // Another process (here: another store on the same file) writes the same minute in
    // order, then this one writes again: its kept bucket lacks the other's sample.
    let b = open(&path).await;
    write(&b, &[("g", Kind::Gauge, m + 20, 2.0)]).await;
    write(&a, &[("g", Kind::Gauge, m + 30, 3.0)]).await;
    assert_eq!(minute_pass(&a).await, vec![("g".to_string(), "read")]);
    let g = first_minute(&a, "g").await;
    assert_eq!((g.count, g.sum), (3, 6.0));
}
