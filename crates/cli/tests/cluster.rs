//! Several `serve` processes on one PostgreSQL database as one service, with the real
//! binary: ingest on A and read on B; an SSE stream on B hears A's sample; a request
//! replayed on B is refused; `kill -9` of the node running the rollup job and the other
//! takes over; the database going away gives 503s (writes and `/readyz`), not a crash,
//! and the service recovers by itself; OTLP exports of one stream on both nodes at once
//! lose no increment.
//!
//! Runs when `MCP_METRICS_TEST_POSTGRES` names a PostgreSQL server (each test on a fresh
//! database of its own); skipped otherwise, except when `CI` is set: then it fails.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{ADMIN_TOKEN, Credential, eventually, free_port, register_at, wait_ready_at};
use futures_util::StreamExt;
use mcp_metrics_core::secrets::MasterKey;
use mcp_metrics_core::signature::sign;
use mcp_metrics_core::time::now_ms;
use mcp_metrics_store::postgres::testing;
use reqwest::StatusCode;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_mcp-metrics");

fn postgres_or_skip(test: &str) -> Option<String> {
    let url = std::env::var(testing::ENV).ok().filter(|u| !u.trim().is_empty());
    if url.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but {} is not: .ci/run sets it",
            testing::ENV
        );
        eprintln!("{test}: skipped: {} not set", testing::ENV);
    }
    url
}

/// One node: a `serve` process on the shared database.
struct Node {
    child: Child,
    base: String,
}

impl Node {
    fn start(database: &str, master_key: &str, config: &std::path::Path) -> Node {
        let port = free_port();
        let child = Command::new(BIN)
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--database",
                database,
            ])
            .arg("--config")
            .arg(config)
            .env("MCP_METRICS_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("MCP_METRICS_MASTER_KEY", master_key)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn mcp-metrics serve");
        Node {
            child,
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    async fn metric(&self, client: &reqwest::Client, line: &str) -> Option<f64> {
        let text = client.get(self.url("/metrics")).send().await.ok()?.text().await.ok()?;
        text.lines()
            .find(|l| l.starts_with(line))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh database, a shared master key, and a config with a fast rollup job.
struct Cluster {
    admin: String,
    database: String,
    master_key: String,
    dir: tempfile::TempDir,
    client: reqwest::Client,
}

impl Cluster {
    async fn new(admin: String) -> Cluster {
        mcp_metrics_server::install_crypto_provider();
        let database = testing::fresh_database(&admin).await.expect("fresh database");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.toml"), "[rollup]\ninterval_secs = 0.2\n").unwrap();
        Cluster {
            admin,
            database,
            master_key: MasterKey::generate().to_hex(),
            dir,
            client: reqwest::Client::new(),
        }
    }

    async fn node(&self) -> Node {
        let node = Node::start(&self.database, &self.master_key, &self.dir.path().join("config.toml"));
        wait_ready_at(&self.client, &node.base).await;
        node
    }

    async fn drop_database(self) {
        let _ = testing::drop_database(&self.admin, &self.database).await;
    }
}

/// A cluster of two nodes with the server `acme` registered (on A), or `None` when
/// PostgreSQL is not configured.
async fn two_nodes_with_server(test: &str) -> Option<(Cluster, Node, Node, Credential)> {
    let cluster = Cluster::new(postgres_or_skip(test)?).await;
    let a = cluster.node().await;
    let b = cluster.node().await;
    let key = register_at(&cluster.client, &a.base, "acme").await;
    Some((cluster, a, b, key))
}

/// A signed request: (body, signature), to send to any node.
fn signed(key: &Credential, server: &str, metrics: Value) -> (String, String) {
    let body = json!({ "server_id": server, "metrics": metrics }).to_string();
    let signature = sign(key.secret.as_bytes(), now_ms() / 1000, body.as_bytes());
    (body, signature)
}

async fn send(
    client: &reqwest::Client,
    node: &Node,
    key: &Credential,
    request: &(String, String),
) -> reqwest::Response {
    client
        .post(node.url("/api/v1/metrics"))
        .header("content-type", "application/json")
        .header("x-api-key", &key.api_key)
        .header("x-signature", &request.1)
        .body(request.0.clone())
        .send()
        .await
        .unwrap()
}

async fn samples(client: &reqwest::Client, node: &Node, key: &Credential, server: &str) -> Vec<Value> {
    let page: Value = client
        .get(node.url(&format!("/api/v1/servers/{server}/samples?limit=10000")))
        .header("x-api-key", &key.api_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    page["samples"].as_array().cloned().unwrap_or_default()
}

/// The latency count of the last hour as the metrics API of `node` reports it.
async fn latency_count(client: &reqwest::Client, node: &Node, server: &str) -> f64 {
    let Ok(response) = client
        .get(node.url(&format!(
            "/api/v1/servers/{server}/metrics?period=1h&name=response_time"
        )))
        .send()
        .await
    else {
        return 0.0;
    };
    let answer: Value = response.json().await.unwrap_or(Value::Null);
    answer["series"]
        .as_array()
        .map(|series| {
            series
                .iter()
                .flat_map(|s| s["points"]["count"].as_array().cloned().unwrap_or_default())
                .filter_map(|v| v.as_f64())
                .sum()
        })
        .unwrap_or(0.0)
}

#[tokio::test]
async fn two_nodes_are_one_service() {
    let Some((cluster, a, b, key)) = two_nodes_with_server("two_nodes_are_one_service").await else {
        return;
    };
    let client = &cluster.client;

    // A stream opened on B before the sample is ingested on A.
    let response = client.get(b.url("/api/v1/servers/acme/live")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut stream = response.bytes_stream();

    let t = now_ms() - 1_000;
    let request = signed(
        &key,
        "acme",
        json!([{"name":"response_time","type":"histogram","value":42,"timestamp":t}]),
    );
    assert_eq!(send(client, &a, &key, &request).await.status(), StatusCode::OK);

    // Read on B.
    let on_b = samples(client, &b, &key, "acme").await;
    assert_eq!(on_b.len(), 1, "{on_b:?}");
    assert_eq!(on_b[0]["value"], 42.0);

    // The stream on B hears of it, whichever node's job rolled it up.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut text = String::new();
    while !text.contains("event: metric") && Instant::now() < deadline {
        if let Ok(Some(Ok(chunk))) = tokio::time::timeout(Duration::from_millis(500), stream.next()).await {
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
    assert!(text.contains("event: metric"), "B's stream got: {text:?}");
    drop(stream);

    // The same signed request replayed on B is refused.
    let replay = send(client, &b, &key, &request).await;
    assert_eq!(replay.status(), StatusCode::CONFLICT);
    let replay: Value = replay.json().await.unwrap();
    assert_eq!(replay["code"], "replayed_request");
    assert_eq!(samples(client, &a, &key, "acme").await.len(), 1);

    // Exactly one node runs the job.
    let mut leaders = 0.0;
    for node in [&a, &b] {
        leaders += node.metric(client, "mcp_metrics_rollup_leader ").await.unwrap_or(0.0);
    }
    assert_eq!(leaders, 1.0, "one leader");
    eventually(Duration::from_secs(10), "the rollup of A's sample", || async {
        latency_count(client, &b, "acme").await == 1.0
    })
    .await;

    // The server deleted on A and registered again: B must not write under the series
    // ids it cached for the old one (they would be invisible to every read).
    let deleted = client
        .delete(a.url("/api/v1/admin/servers/acme"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let key = register_at(client, &a.base, "acme").await;
    let again = signed(
        &key,
        "acme",
        json!([{"name":"response_time","type":"histogram","value":43,"timestamp":now_ms() - 500}]),
    );
    assert_eq!(send(client, &b, &key, &again).await.status(), StatusCode::OK);
    let on_a = samples(client, &a, &key, "acme").await;
    assert_eq!(on_a.len(), 1, "{on_a:?}");
    assert_eq!(on_a[0]["value"], 43.0);
    drop(a);
    drop(b);
    cluster.drop_database().await;
}

/// An OTLP/JSON export of the delta sum `errors`: +2 at `at` (unix ms).
fn delta_export(at: i64) -> String {
    json!({"resourceMetrics": [{"scopeMetrics": [{"metrics": [
        {"name": "errors", "sum": {"aggregationTemporality": 1, "isMonotonic": true,
         "dataPoints": [{"timeUnixNano": (at as u64 * 1_000_000).to_string(), "asInt": "2"}]}}]}]}]})
    .to_string()
}

fn post_export(client: &reqwest::Client, node: &Node, key: &Credential, body: String) -> reqwest::RequestBuilder {
    client
        .post(node.url("/otlp/v1/metrics"))
        .bearer_auth(&key.api_key)
        .header("content-type", "application/json")
        .body(body)
}

/// The running totals of `errors` stored so far, in order.
async fn delta_totals(client: &reqwest::Client, node: &Node, key: &Credential) -> Vec<f64> {
    let mut totals: Vec<f64> = samples(client, node, key, "acme")
        .await
        .iter()
        .filter(|s| s["name"] == "errors")
        .map(|s| s["value"].as_f64().unwrap())
        .collect();
    totals.sort_by(f64::total_cmp);
    totals
}

/// Exports of one OTLP delta sum sent at once, half to each node: every export builds on
/// the total the one before stored, whichever node stored it, so the running totals are
/// 2, 4, …, 2n. With only a per-node lock the nodes read the same totals and some
/// increments are lost.
#[tokio::test]
async fn delta_exports_through_both_nodes_lose_no_increment() {
    let Some((cluster, a, b, key)) = two_nodes_with_server("delta_exports_through_both_nodes_lose_no_increment").await
    else {
        return;
    };
    let client = &cluster.client;
    let t0 = now_ms() - 60_000;
    let exports = (0..24i64).map(|i| {
        let node = if i % 2 == 0 { &a } else { &b };
        let request = post_export(client, node, &key, delta_export(t0 + i));
        async move { request.send().await.unwrap() }
    });
    for response in futures_util::future::join_all(exports).await {
        let status = response.status();
        assert_eq!(status, StatusCode::OK, "{}", response.text().await.unwrap_or_default());
    }
    assert_eq!(
        delta_totals(client, &b, &key).await,
        (1..=24).map(|i| 2.0 * i as f64).collect::<Vec<_>>()
    );
    drop(a);
    drop(b);
    cluster.drop_database().await;
}

/// An OTLP delta export whose client gives up while it waits for its stream lock still
/// runs to its end once the lock is free, so the next export builds on its total. Were
/// the export dropped with its request, a client giving up between the commit and the
/// state write would lose its delta from the running total.
#[tokio::test]
async fn an_export_whose_client_went_away_still_completes() {
    let Some((cluster, a, _b, key)) = two_nodes_with_server("an_export_whose_client_went_away_still_completes").await
    else {
        return;
    };
    // Hold the server's stream lock as another node's export would (the key of
    // `Store::cluster_lock("otlp.streams.acme")`).
    let (holder, connection) = tokio_postgres::connect(&cluster.database, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let lock_key: (i32, &str) = (0x6d63_706e, "otlp.streams.acme");
    holder
        .execute("SELECT pg_advisory_lock($1, hashtext($2))", &[&lock_key.0, &lock_key.1])
        .await
        .unwrap();
    let t0 = now_ms() - 60_000;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let gone = post_export(&impatient, &a, &key, delta_export(t0)).send().await;
    assert!(gone.is_err(), "the export did not wait for the lock: {gone:?}");
    holder
        .execute(
            "SELECT pg_advisory_unlock($1, hashtext($2))",
            &[&lock_key.0, &lock_key.1],
        )
        .await
        .unwrap();
    let client = &cluster.client;
    eventually(Duration::from_secs(10), "the abandoned export's sample", || async {
        delta_totals(client, &a, &key).await == [2.0]
    })
    .await;
    let next = post_export(client, &a, &key, delta_export(t0 + 1))
        .send()
        .await
        .unwrap();
    assert_eq!(next.status(), StatusCode::OK);
    assert_eq!(delta_totals(client, &a, &key).await, [2.0, 4.0]);
    drop(a);
    drop(_b);
    cluster.drop_database().await;
}

#[tokio::test]
async fn when_the_job_node_is_killed_the_other_takes_over() {
    let Some(admin) = postgres_or_skip("when_the_job_node_is_killed_the_other_takes_over") else {
        return;
    };
    let cluster = Cluster::new(admin).await;
    let client = &cluster.client;
    let mut first = cluster.node().await;
    // The first node takes the job before the second starts.
    eventually(Duration::from_secs(10), "the first node leading", || async {
        first.metric(client, "mcp_metrics_rollup_leader ").await == Some(1.0)
    })
    .await;
    let second = cluster.node().await;
    let key = register_at(client, &second.base, "acme").await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        second.metric(client, "mcp_metrics_rollup_leader ").await,
        Some(0.0),
        "the second node waits"
    );

    // kill -9 the leader: its connections die, and with them its advisory lock.
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    assert!(!first.alive());
    let killed_at = Instant::now();
    let request = signed(
        &key,
        "acme",
        json!([{"name":"response_time","type":"histogram","value":7,"timestamp":now_ms() - 500}]),
    );
    assert_eq!(send(client, &second, &key, &request).await.status(), StatusCode::OK);
    eventually(Duration::from_secs(15), "the second node taking over", || async {
        second.metric(client, "mcp_metrics_rollup_leader ").await == Some(1.0)
    })
    .await;
    eventually(Duration::from_secs(10), "the survivor rolling up", || async {
        latency_count(client, &second, "acme").await == 1.0
    })
    .await;
    eprintln!("took over and rolled up {:?} after the kill", killed_at.elapsed());
    drop(second);
    cluster.drop_database().await;
}

#[tokio::test]
async fn the_database_going_away_gives_503s_and_the_service_recovers() {
    let Some(admin) = postgres_or_skip("the_database_going_away_gives_503s_and_the_service_recovers") else {
        return;
    };
    let cluster = Cluster::new(admin.clone()).await;
    let client = &cluster.client;
    let mut node = cluster.node().await;
    let key = register_at(client, &node.base, "acme").await;
    let name = cluster.database.rsplit('/').next().unwrap().to_owned();
    let (pg, connection) = tokio_postgres::connect(&admin, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);

    // First the connections are terminated while new ones are still allowed: the pool
    // reconnects, and every answer is a success or a 503.
    pg.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
        &[&name],
    )
    .await
    .unwrap();
    for i in 0..5 {
        let request = signed(
            &key,
            "acme",
            json!([{"name":"g","value":i,"timestamp":now_ms() - 100 + i}]),
        );
        let status = send(client, &node, &key, &request).await.status();
        assert!(
            status == StatusCode::OK || status == StatusCode::SERVICE_UNAVAILABLE,
            "{status}"
        );
    }

    // Then the database refuses connections altogether.
    pg.batch_execute(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false"))
        .await
        .unwrap();
    pg.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
        &[&name],
    )
    .await
    .unwrap();
    let request = signed(&key, "acme", json!([{"name":"g","value":99,"timestamp":now_ms() - 50}]));
    let refused = send(client, &node, &key, &request).await;
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(refused.headers().get("retry-after").is_some());
    let problem: Value = refused.json().await.unwrap();
    assert_eq!(problem["code"], "unavailable", "{problem}");
    assert!(
        !problem.to_string().contains("pg_") && !problem.to_string().contains("SQLSTATE"),
        "internals are not echoed: {problem}"
    );
    let ready = client.get(node.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        client.get(node.url("/healthz")).send().await.unwrap().status(),
        StatusCode::OK
    );
    assert!(node.alive(), "the service did not crash");

    // The database comes back: the service recovers without a restart.
    pg.batch_execute(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true"))
        .await
        .unwrap();
    eventually(Duration::from_secs(20), "/readyz ready again", || async {
        client
            .get(node.url("/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
    let mut stored = false;
    for _ in 0..50 {
        let request = signed(
            &key,
            "acme",
            json!([{"name":"g","value":100,"timestamp":now_ms() - 10}]),
        );
        if send(client, &node, &key, &request).await.status() == StatusCode::OK {
            stored = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(stored, "writes succeed again");
    assert!(
        samples(client, &node, &key, "acme")
            .await
            .iter()
            .any(|s| s["value"] == 100.0)
    );
    assert!(node.alive());
    drop(node);
    cluster.drop_database().await;
}
