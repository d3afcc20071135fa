//! `mcp-metrics copy` end to end: a SQLite service's data, copied into PostgreSQL by the
//! built binary, must give the same HTTP answers once the service runs on PostgreSQL with
//! the SQLite master key, and the copied credentials must still work (and stay revoked).
//! A second run must find nothing new; a missing source, an unreachable destination and
//! a destination with data of its own must be refused with a message naming the fix.
//!
//! Needs `MCP_METRICS_TEST_POSTGRES` (an admin URL such as
//! postgres://postgres@127.0.0.1:5432/test). Without it the test is skipped, except when
//! `CI` is set: then it fails, so CI cannot pass without running it.

mod common;

use std::process::{Command, Output};

use common::{Credential, TestService, batch};
use mcp_metrics_core::model::ServerFields;
use mcp_metrics_core::time::now_ms;
use mcp_metrics_store::StoreOptions;
use mcp_metrics_store::postgres::testing;
use reqwest::{Method, StatusCode};
use serde_json::{Map, Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_mcp-metrics");
const MIN: i64 = 60_000;
const FIREFOX: &str = "Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0";

/// A throwaway PostgreSQL database, dropped however the test ends.
struct Db {
    admin: String,
    url: String,
}

impl Db {
    async fn new(admin: &str) -> Db {
        let url = testing::fresh_database(admin).await.expect("create a test database");
        Db {
            admin: admin.to_owned(),
            url,
        }
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        testing::drop_database_blocking(&self.admin, &self.url);
    }
}

/// Runs `mcp-metrics copy ARGS...` off the async threads, as the process blocks.
async fn copy(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .arg("copy")
            .args(&args)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run the binary")
    })
    .await
    .unwrap()
}

fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

async fn get(svc: &TestService, path: &str) -> Value {
    let response = svc.client.get(svc.url(path)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "{path}");
    response.json().await.unwrap()
}

/// A metrics answer without its window, which follows the clock: each series' points
/// keyed by time, empty ones left out. The data lies well inside the window, so both
/// services see all of it.
fn without_window(mut answer: Value) -> Value {
    let object = answer.as_object_mut().unwrap();
    object.remove("from");
    object.remove("to");
    for series in object["series"].as_array_mut().unwrap() {
        let points = series["points"].as_object().unwrap();
        let mut by_time = Map::new();
        for (i, t) in points["t"].as_array().unwrap().iter().enumerate() {
            let values: Map<String, Value> = points
                .iter()
                .filter(|(field, values)| *field != "t" && !values[i].is_null())
                .map(|(field, values)| (field.clone(), values[i].clone()))
                .collect();
            if !values.is_empty() {
                by_time.insert(t.to_string(), Value::Object(values));
            }
        }
        series["points"] = Value::Object(by_time);
    }
    answer
}

/// Every public and author read the test compares, by name.
async fn answers(svc: &TestService, creds: &[&Credential]) -> Vec<(String, Value)> {
    let mut out = vec![("servers".to_owned(), get(svc, "/api/v1/servers").await)];
    for cred in creds {
        let id = &cred.server_id;
        out.push((id.to_string(), get(svc, &format!("/api/v1/servers/{id}")).await));
        for period in ["1h", "24h", "7d", "90d"] {
            let answer = get(svc, &format!("/api/v1/servers/{id}/metrics?period={period}")).await;
            out.push((format!("{id} metrics {period}"), without_window(answer)));
        }
        let samples = svc.samples(cred, "limit=7").await;
        out.push((format!("{id} samples"), Value::Array(samples)));
        out.push((
            format!("{id} events"),
            get(svc, &format!("/api/v1/servers/{id}/events?limit=500")).await,
        ));
        out.push((
            format!("{id} usage"),
            get(svc, &format!("/api/v1/servers/{id}/usage?period=30d")).await,
        ));
    }
    out
}

/// Histogram, counter and gauge samples over five minutes, ten minutes ago.
fn traffic(server: &str, first_minute: i64, scale: f64) -> String {
    let mut metrics = Vec::new();
    for minute in 0..5 {
        let m = first_minute + minute * MIN;
        for (i, tool) in ["search", "fetch"].into_iter().enumerate() {
            for j in 0..6 {
                let value = scale * (20.0 + 7.5 * (minute * 6 + j) as f64 + 40.0 * i as f64);
                metrics.push(json!({"name": "response_time", "type": "histogram", "value": value,
                    "timestamp": m + 1000 + j * 5000, "tags": {"tool": tool}}));
            }
        }
        metrics
            .push(json!({"name": "requests", "type": "counter", "value": 100 + minute * 17, "timestamp": m + 30_000}));
        metrics.push(json!({"name": "errors", "type": "counter", "value": minute, "timestamp": m + 30_000}));
        metrics.push(json!({"name": "active_sessions", "value": scale * (3 + minute) as f64, "timestamp": m + 45_000}));
    }
    batch(server, Value::Array(metrics))
}

async fn beacon(svc: &TestService, server: &str, event: &str) {
    let status = svc
        .client
        .post(svc.url("/api/v1/usage"))
        .header("content-type", "text/plain;charset=UTF-8")
        .header("user-agent", FIREFOX)
        .body(json!({"server_id": server, "event": event}).to_string())
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, StatusCode::ACCEPTED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copied_database_answers_the_same_on_postgres() {
    let Some(admin) = testing::admin_url_or_skip("a_copied_database_answers_the_same_on_postgres") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but {} is not: .ci/run starts PostgreSQL and sets it",
            testing::ENV
        );
        return;
    };
    // The database lives in a directory of the test's own, so it outlives the service.
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("lite.db");
    let sqlite_url = format!("sqlite://{}", db_path.display());
    let svc = TestService::start_with(|c| c.database = sqlite_url.clone()).await;

    let alpha = svc.server_with_key("alpha").await;
    let beta_old = svc.server_with_key("beta").await;
    let beta = svc.issue_key("beta").await; // a rotation: a system event
    let (status, body) = svc
        .admin(
            Method::DELETE,
            &format!("/api/v1/admin/servers/beta/keys/{}", beta_old.key_id),
            None,
        )
        .await;
    assert!(status.is_success(), "{status} {body}");
    let first_minute = (now_ms() / MIN - 12) * MIN;
    for (cred, scale) in [(&alpha, 1.0), (&beta, 2.5)] {
        let (status, _, answer) = svc.push(cred, &traffic(&cred.server_id, first_minute, scale)).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer["rejected"], json!([]), "{answer}");
    }
    for (title, at) in [("v1.0", first_minute), ("v1.1", first_minute + 3 * MIN)] {
        let body = json!({"server_id": "alpha", "kind": "deploy", "title": title, "at": at}).to_string();
        assert_eq!(svc.post_event(&alpha, &body).await.status(), StatusCode::CREATED);
    }
    beacon(&svc, "alpha", "view").await;
    beacon(&svc, "alpha", "install").await;
    beacon(&svc, "beta", "view").await;
    // Beacons are queued: wait until all three are stored.
    for attempt in 0.. {
        let a = get(&svc, "/api/v1/servers/alpha/usage?period=30d").await;
        let b = get(&svc, "/api/v1/servers/beta/usage?period=30d").await;
        let stored = a["raw_totals"]["views"].as_u64().unwrap()
            + a["raw_totals"]["installs"].as_u64().unwrap()
            + b["raw_totals"]["views"].as_u64().unwrap();
        if stored == 3 {
            break;
        }
        assert!(attempt < 200, "usage beacons were not stored");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (status, report) = svc.admin(Method::POST, "/api/v1/admin/aggregate", None).await;
    assert_eq!(status, StatusCode::OK, "{report}");

    let creds = [&alpha, &beta];
    let expected = answers(&svc, &creds).await;
    // Equal answers prove nothing if they are empty.
    let named = |name: &str| &expected.iter().find(|(n, _)| n == name).unwrap().1;
    assert_eq!(named("servers")["servers"].as_array().unwrap().len(), 2);
    assert_eq!(named("alpha samples").as_array().unwrap().len(), 5 * 15);
    for name in ["alpha metrics 1h", "beta metrics 90d"] {
        let series = named(name)["series"].as_array().unwrap();
        assert_eq!(series.len(), 5, "{name}");
        assert!(
            series.iter().all(|s| !s["points"].as_object().unwrap().is_empty()),
            "{name}"
        );
    }
    assert_eq!(named("alpha events")["events"].as_array().unwrap().len(), 2);
    assert_eq!(named("alpha usage")["totals"]["installs"], 1);
    svc.stop().await;
    let key_file = dir.path().join("lite.db.master-key");
    let master_key = std::fs::read_to_string(&key_file).expect("the SQLite service made a master key file");

    // Refusals name what to fix, and copy nothing.
    let missing = dir.path().join("nope.db");
    let output = copy(&["--from", missing.to_str().unwrap(), "--to", &admin]).await;
    let (_, err) = text(&output);
    assert!(!output.status.success());
    assert!(err.contains("does not exist") && err.contains("nope.db"), "{err}");
    let output = copy(&["--from", &sqlite_url, "--to", "postgres://postgres@127.0.0.1:1/nowhere"]).await;
    let (_, err) = text(&output);
    assert!(!output.status.success());
    assert!(
        err.contains("cannot open the PostgreSQL database postgres://postgres@127.0.0.1:1/nowhere"),
        "{err}"
    );
    let occupied = Db::new(&admin).await;
    mcp_metrics_store::open(&occupied.url, &StoreOptions::default())
        .await
        .unwrap()
        .create_server("own", &ServerFields::default(), 0)
        .await
        .unwrap();
    let output = copy(&["--from", &sqlite_url, "--to", &occupied.url]).await;
    let (_, err) = text(&output);
    assert!(!output.status.success());
    assert!(
        err.contains("already has data") && err.contains("empty database"),
        "{err}"
    );

    // The copy, then a rerun that finds nothing new. A plain path works as --from.
    let pg = Db::new(&admin).await;
    let output = copy(&["--from", &sqlite_url, "--to", &pg.url]).await;
    let (out, err) = text(&output);
    assert!(output.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("TABLE") && out.contains("IN SOURCE"), "{out}");
    let samples_line = out
        .lines()
        .find(|l| l.starts_with("server_metrics "))
        .unwrap_or_else(|| panic!("no server_metrics row in\n{out}"));
    let numbers: Vec<&str> = samples_line.split_whitespace().skip(1).collect();
    assert_eq!(numbers, ["150", "150"], "{out}");
    assert!(out.contains(" new rows."), "{out}");
    assert!(out.contains(&key_file.display().to_string()), "{out}");
    assert!(out.contains("MCP_METRICS_MASTER_KEY=$(cat"), "{out}");
    let output = copy(&["--from", db_path.to_str().unwrap(), "--to", &pg.url]).await;
    let (out, err) = text(&output);
    assert!(output.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("Nothing new was copied"), "{out}");

    // The service on PostgreSQL, with the SQLite service's master key.
    let pg_url = pg.url.clone();
    let svc = TestService::start_with(|c| {
        c.database = pg_url;
        c.master_key = Some(master_key.trim().to_owned());
    })
    .await;
    let actual = answers(&svc, &creds).await;
    assert_eq!(actual.len(), expected.len());
    for ((name, want), (_, got)) in expected.iter().zip(&actual) {
        assert_eq!(got, want, "{name} differs on PostgreSQL");
    }

    // Credentials and sealed secrets moved: the copied key signs a push, and the revoked
    // one stays revoked. The new series and event fail unless the id sequences moved past
    // the copied ids.
    let now = now_ms();
    let body = batch(
        "alpha",
        json!([{"name": "after_copy", "value": 1, "timestamp": now},
               {"name": "active_sessions", "value": 9, "timestamp": now}]),
    );
    let (status, _, answer) = svc.push(&alpha, &body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["rejected"], json!([]), "{answer}");
    let event = json!({"server_id": "alpha", "kind": "deploy", "title": "on postgres"}).to_string();
    assert_eq!(svc.post_event(&alpha, &event).await.status(), StatusCode::CREATED);
    let samples = svc.samples(&alpha, &format!("from={now}")).await;
    assert_eq!(samples.len(), 2, "{samples:?}");
    let body = batch(
        "beta",
        json!([{"name": "active_sessions", "value": 1, "timestamp": now}]),
    );
    let (status, _, answer) = svc.push(&beta, &body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (status, _, answer) = svc.push(&beta_old, &body).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{answer}");
    assert_eq!(answer["code"], "revoked_key", "{answer}");
    svc.stop().await;
}
