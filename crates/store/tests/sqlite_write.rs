//! The SQLite write path stores a write's samples as runs and settles them when they are
//! read: within one write, a later value for the same (series, timestamp) must still
//! replace an earlier one, and histogram observations that share a millisecond must
//! still all be kept in arrival order, also when an earlier write already used that
//! millisecond. And a database a newer build migrated is refused, not written without
//! the migrations this build does not know.

mod common;

use common::series_ids;
use mcp_metrics_core::model::{Kind, SeriesKey, ServerFields};
use mcp_metrics_core::time::now_ms;
use mcp_metrics_store::sqlite::SqliteStore;
use mcp_metrics_store::{
    NewSeries, PendingSample, SampleQuery, SeriesRef, Store, StoreOptions, WriteBatch, WriteRequest,
};

fn series(name: &str, kind: Kind) -> NewSeries {
    NewSeries {
        key: SeriesKey {
            server_id: "s".into(),
            name: name.into(),
            tags: vec![],
        },
        kind,
    }
}

fn sample(series: u32, kind: Kind, timestamp: i64, value: f64) -> PendingSample {
    PendingSample {
        series: SeriesRef::New(series),
        kind,
        timestamp,
        value,
    }
}

async fn store_with_server() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("w.db"), &StoreOptions::default())
        .await
        .unwrap();
    store.create_server("s", &ServerFields::default(), 0).await.unwrap();
    (dir, store)
}

fn write(samples: Vec<PendingSample>, new_series: Vec<NewSeries>) -> WriteBatch {
    WriteBatch {
        requests: vec![WriteRequest {
            server_id: "s".into(),
            key_id: "k".into(),
            new_series,
            samples,
            ..Default::default()
        }],
        now: now_ms(),
        replay_window_ms: 600_000,
        retry_window_ms: 600_000,
        max_series_per_server: 0,
    }
}

async fn stored(store: &SqliteStore, from: i64) -> (Vec<i64>, Vec<mcp_metrics_core::model::RawSample>) {
    let ids = series_ids(store, "s").await;
    let samples = store
        .read_samples(&SampleQuery {
            series_ids: ids.clone(),
            from,
            to: from + 60_000,
            after: None,
            limit: 10_000,
        })
        .await
        .unwrap();
    (ids, samples)
}

/// Observations of one series at one offset: (seq, value) in stored order.
fn at(samples: &[mcp_metrics_core::model::RawSample], series: i64, ts: i64) -> Vec<(i64, f64)> {
    samples
        .iter()
        .filter(|s| s.series_id == series && s.timestamp == ts)
        .map(|s| (s.seq, s.value))
        .collect()
}

#[tokio::test]
async fn observations_at_a_millisecond_an_earlier_write_used_take_the_next_seqs() {
    let (_dir, store) = store_with_server().await;
    let m = (now_ms() / 60_000 - 2) * 60_000;
    // First write: 2 observations at m and 1 at m + 1.
    let first = vec![
        sample(0, Kind::Histogram, m, 1.0),
        sample(0, Kind::Histogram, m, 2.0),
        sample(0, Kind::Histogram, m + 1, 3.0),
    ];
    store
        .write_batch(write(first, vec![series("h", Kind::Histogram)]))
        .await
        .unwrap();
    let (ids, _) = stored(&store, m).await;
    // Second write: 300 observations over m .. m + 4, the first colliding with the first
    // write's samples, the later ones not.
    let second: Vec<PendingSample> = (0..300)
        .map(|i| PendingSample {
            series: SeriesRef::Known(ids[0]),
            kind: Kind::Histogram,
            timestamp: m + i / 60,
            value: 100.0 + i as f64,
        })
        .collect();
    store.write_batch(write(second, vec![])).await.unwrap();
    let (_, samples) = stored(&store, m).await;
    assert_eq!(samples.len(), 303);
    for t in 0..5 {
        let mut expected: Vec<f64> = match t {
            0 => vec![1.0, 2.0],
            1 => vec![3.0],
            _ => vec![],
        };
        expected.extend((0..300).filter(|i| i / 60 == t).map(|i| 100.0 + i as f64));
        let got = at(&samples, ids[0], m + t);
        assert_eq!(
            got,
            expected
                .into_iter()
                .enumerate()
                .map(|(i, v)| (i as i64, v))
                .collect::<Vec<_>>(),
            "seq 0, 1, 2, ... in arrival order at {t}"
        );
    }
}

#[tokio::test]
async fn repeated_values_in_one_write_keep_the_last_and_observations_all() {
    let (_dir, store) = store_with_server().await;
    let m = (now_ms() / 60_000 - 2) * 60_000;
    // 1,000 gauge values over 37 timestamps, interleaved with 300 histogram observations
    // over 7 timestamps.
    let mut samples = Vec::new();
    for i in 0..1000 {
        samples.push(sample(0, Kind::Gauge, m + (i % 37), i as f64));
        if i % 10 < 3 {
            samples.push(sample(1, Kind::Histogram, m + (i % 7), i as f64));
        }
    }
    store
        .write_batch(write(
            samples,
            vec![series("g", Kind::Gauge), series("h", Kind::Histogram)],
        ))
        .await
        .unwrap();
    let (ids, stored) = stored(&store, m).await;
    let gauge: Vec<(i64, f64)> = stored
        .iter()
        .filter(|s| s.series_id == ids[0])
        .map(|s| (s.timestamp - m, s.value))
        .collect();
    let last_of = |t: i64| (0..1000).filter(|i| i % 37 == t).max().unwrap() as f64;
    assert_eq!(gauge, (0..37).map(|t| (t, last_of(t))).collect::<Vec<_>>());
    let observations: Vec<(i64, i64, f64)> = stored
        .iter()
        .filter(|s| s.series_id == ids[1])
        .map(|s| (s.timestamp - m, s.seq, s.value))
        .collect();
    assert_eq!(observations.len(), 300);
    for t in 0..7 {
        let at: Vec<&(i64, i64, f64)> = observations.iter().filter(|o| o.0 == t).collect();
        let seqs: Vec<i64> = at.iter().map(|o| o.1).collect();
        assert_eq!(
            seqs,
            (0..at.len() as i64).collect::<Vec<_>>(),
            "seq 0, 1, 2, ... at {t}"
        );
        assert!(at.windows(2).all(|w| w[0].2 < w[1].2), "arrival order at {t}");
    }
}

#[tokio::test]
async fn a_database_from_a_newer_build_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("newer.db");
    drop(SqliteStore::open(&path, &StoreOptions::default()).await.unwrap());
    let newer = mcp_metrics_store::sqlite::latest_version() + 1;
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute(
            "INSERT INTO schema_migrations (version, description, applied_at) VALUES (?1, 'future', 0)",
            [newer],
        )
        .unwrap();
    let refused = SqliteStore::open(&path, &StoreOptions::default()).await.err().unwrap();
    let message = refused.to_string();
    assert!(
        message.contains(&format!("schema version {newer}, newer than this build's")),
        "{message}"
    );
}
