//! Metrics-fetch latency on a large store, cached and uncached.
//!
//! Builds a SQLite database holding 100 series (ten servers of ten series: 4 latency
//! histograms, 3 counters, 3 gauges each) with 30 days of minute rollups, 400 days of
//! hour rollups and 400 days of day rollups — what the default retention keeps — plus
//! `FETCH_BENCH_SCALE - 1` times as many other series' hour rollups, so the tables grow
//! without the fetched data changing. One server (`target`, ten series) is fetched. Then it starts the real service on it and times
//! `GET /api/v1/servers/target/metrics` over HTTP on one keep-alive connection.
//! Uncached requests vary the order of `names` (same series, new cache key).
//!
//! With `FETCH_BENCH_POSTGRES=<url of a PostgreSQL server>`, the same database is then
//! copied (`mcp_metrics_store::copy`, as `mcp-metrics copy` does) into a fresh
//! PostgreSQL database and the same requests are timed against the service on it, in
//! the same run.
//!
//! `FETCH_BENCH_SCALE=10 cargo bench -p mcp-metrics --bench fetch`

use std::time::{Duration, Instant};

use mcp_metrics_core::model::Kind;
use mcp_metrics_core::sketch::Sketch;
use mcp_metrics_core::time::now_ms;
use mcp_metrics_server::RunOptions;
use mcp_metrics_server::config::Config;
use rusqlite::params;

const MIN: i64 = 60_000;
const HOUR: i64 = 3_600_000;
const DAY: i64 = 86_400_000;

fn build(path: &std::path::Path, scale: usize) -> rusqlite::Result<()> {
    let mut conn = rusqlite::Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "OFF")?;
    let now = now_ms();
    let mut sketch = Sketch::new();
    let mut x = 1u64;
    for _ in 0..300 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        sketch.add(20.0 * (1.0 + (x >> 40) as f64 / (1u64 << 24) as f64 * 8.0));
    }
    let blob = sketch.encode();
    let tx = conn.transaction()?;
    // Ten servers of ten series each (100 series); `target` is the one fetched.
    let mut series = Vec::new();
    for server in 0..10 {
        let id = if server == 0 {
            "target".to_string()
        } else {
            format!("server-{server}")
        };
        tx.execute(
            "INSERT INTO servers (id, created_at, updated_at) VALUES (?1, 0, 0)",
            [&id],
        )?;
        for i in 0..10 {
            let (name, kind) = match i {
                0..4 => ("response_time", Kind::Histogram),
                4..7 => ("requests", Kind::Counter),
                _ => ("active_sessions", Kind::Gauge),
            };
            tx.execute(
                "INSERT INTO series (server_id, name, tags, kind, created_at) VALUES (?1, ?2, ?3, ?4, 0)",
                params![id, name, format!("{{\"tool\":\"t{i}\"}}"), kind.to_i64()],
            )?;
            series.push((tx.last_insert_rowid(), kind));
        }
    }
    for filler in 1..scale {
        for server in 0..10 {
            let id = format!("filler-{filler}-{server}");
            tx.execute(
                "INSERT INTO servers (id, created_at, updated_at) VALUES (?1, 0, 0)",
                [&id],
            )?;
            for i in 0..10 {
                tx.execute(
                    "INSERT INTO series (server_id, name, tags, kind, created_at) VALUES (?1, 'response_time', ?2, 2, 0)",
                    params![id, format!("{{\"tool\":\"t{i}\"}}")],
                )?;
            }
        }
    }
    tx.commit()?;
    let insert = |conn: &mut rusqlite::Connection, table: &str, ids: &[(i64, Kind)], step: i64, span: i64| {
        let tx = conn.transaction()?;
        {
            let mut stmt = tx.prepare(&format!(
                "INSERT INTO {table} (series_id, bucket, count, sum, min, max, first, first_ts, last, last_ts, increase, sketch)
                 VALUES (?1, ?2, 300, 15000, 20, 180, 40, ?2, 60, ?2, 120, ?3)"
            ))?;
            let start = (now - span) / step * step;
            for (id, kind) in ids {
                let blob = (*kind == Kind::Histogram).then_some(&blob);
                let mut t = start;
                while t <= now {
                    stmt.execute(params![id, t, blob])?;
                    t += step;
                }
            }
        }
        tx.commit()
    };
    insert(&mut conn, "rollups_1m", &series, MIN, 30 * DAY)?;
    insert(&mut conn, "rollups_1h", &series, HOUR, 400 * DAY)?;
    insert(&mut conn, "server_metrics_daily", &series, DAY, 400 * DAY)?;
    let filler: Vec<(i64, Kind)> = conn
        .prepare("SELECT id FROM series WHERE server_id LIKE 'filler-%'")?
        .query_map([], |r| Ok((r.get(0)?, Kind::Histogram)))?
        .collect::<rusqlite::Result<_>>()?;
    for chunk in filler.chunks(100) {
        insert(&mut conn, "rollups_1h", chunk, HOUR, 400 * DAY)?;
    }
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")?;
    Ok(())
}

fn percentile(sorted: &[Duration], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3
}

#[tokio::main]
async fn main() {
    mcp_metrics_server::install_crypto_provider();
    let scale: usize = std::env::var("FETCH_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fetch.db");
    let config = Config {
        database: format!("sqlite://{}", path.display()),
        ..Config::default()
    };
    // Let the service create the schema, then fill it.
    {
        let store = mcp_metrics_server::open_store(&config).await.unwrap();
        drop(store);
    }
    let started = Instant::now();
    tokio::task::spawn_blocking({
        let path = path.clone();
        move || build(&path, scale)
    })
    .await
    .unwrap()
    .unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    let rows: i64 = conn
        .query_row(
            "SELECT (SELECT count(*) FROM rollups_1m) + (SELECT count(*) FROM rollups_1h) + (SELECT count(*) FROM server_metrics_daily)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let bytes = std::fs::metadata(&path).unwrap().len();
    println!(
        "scale {scale}: {rows} rollup rows, {} MiB, built in {:.1} s",
        bytes >> 20,
        started.elapsed().as_secs_f64()
    );

    println!("SQLite:");
    time_fetches(config.clone()).await;
    if let Ok(admin) = std::env::var("FETCH_BENCH_POSTGRES") {
        let url = mcp_metrics_store::postgres::testing::fresh_database(&admin)
            .await
            .unwrap();
        let started = Instant::now();
        mcp_metrics_store::copy::sqlite_to_postgres(&path, &url, |_| {})
            .await
            .unwrap();
        println!("PostgreSQL (copied in {:.1} s):", started.elapsed().as_secs_f64());
        let key_file = mcp_metrics_server::keyring::key_file_for(&config.database).unwrap();
        let pg = Config {
            database: url.clone(),
            master_key: Some(std::fs::read_to_string(key_file).unwrap().trim().to_owned()),
            ..Config::default()
        };
        time_fetches(pg).await;
        let _ = mcp_metrics_store::postgres::testing::drop_database(&admin, &url).await;
    }
}

/// Starts the service on `config` and times uncached and cached fetches per period.
async fn time_fetches(config: Config) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let service = tokio::spawn(mcp_metrics_server::run(
        config,
        listener,
        async move {
            let _ = stopped.await;
        },
        RunOptions::default(),
    ));
    let client = reqwest::Client::builder().pool_max_idle_per_host(1).build().unwrap();
    for _ in 0..100 {
        if client
            .get(format!("{base}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let names = ["response_time", "requests", "active_sessions"];
    let periods = std::env::var("FETCH_BENCH_PERIODS").unwrap_or_else(|_| "24h,7d,30d,1y".into());
    let mut nonce = 0usize;
    for period in periods.split(',') {
        let mut uncached = Vec::new();
        for _ in 0..40 {
            nonce += 1;
            let i = nonce;
            // A new permutation or repetition of the same names: same series, new cache key.
            let mut list: Vec<&str> = names.to_vec();
            list.rotate_left(i % 3);
            let extra = vec![names[0]; i / 3];
            let query = [list, extra].concat().join(",");
            let t = Instant::now();
            let r = client
                .get(format!(
                    "{base}/api/v1/servers/target/metrics?period={period}&names={query}"
                ))
                .send()
                .await
                .unwrap();
            let body = r.bytes().await.unwrap();
            uncached.push(t.elapsed());
            assert!(body.len() > 1000);
        }
        let mut cached = Vec::new();
        let url = format!("{base}/api/v1/servers/target/metrics?period={period}");
        client.get(&url).send().await.unwrap().bytes().await.unwrap();
        for _ in 0..300 {
            let t = Instant::now();
            let r = client.get(&url).send().await.unwrap();
            r.bytes().await.unwrap();
            cached.push(t.elapsed());
        }
        uncached.sort();
        cached.sort();
        println!(
            "period {period:>3}: uncached p50 {:.2} ms p99 {:.2} ms | cached p50 {:.3} ms p99 {:.3} ms",
            percentile(&uncached, 0.5),
            percentile(&uncached, 0.99),
            percentile(&cached, 0.5),
            percentile(&cached, 0.99)
        );
    }
    let _ = stop.send(());
    let _ = service.await;
}
