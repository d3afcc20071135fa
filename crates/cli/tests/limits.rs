//! Per-server write limits on every sample endpoint (DESIGN.md §4.1): past its rate a
//! server's writes get 429 `rate_limited` with `Retry-After` and store nothing, and a
//! retry after the wait is stored; at its series limit a server's existing series keep
//! flowing while samples of new series are refused one by one (`too_many_series`).
//! Other servers are never affected.

mod common;

use std::time::Duration;

use common::{TestService, batch};
use mcp_metrics_core::promwrite::{TimeSeries, WriteRequest, encode};
use mcp_metrics_core::time::now_ms;
use reqwest::StatusCode;
use serde_json::{Value, json};

fn ns(ms: i64) -> String {
    (ms as u64 * 1_000_000).to_string()
}

/// `n` gauges named `name0`, `name1`, … at `t`, as a signed-JSON batch.
fn gauges(server: &str, name: &str, n: usize, t: i64) -> String {
    let metrics: Vec<Value> = (0..n)
        .map(|i| json!({"name": format!("{name}{i}"), "value": i, "timestamp": t}))
        .collect();
    batch(server, Value::Array(metrics))
}

/// A service whose servers may write one sample a second, in bursts of ten, and at
/// most `max_samples_per_request` samples a request: each write meets the allowance at
/// once, and none of the tests' sequences lasts the seconds it takes to recover.
async fn one_sample_a_second(max_samples_per_request: usize) -> TestService {
    TestService::start_with(|c| {
        c.ingest.samples_per_second_per_server = 1;
        c.ingest.burst_samples_per_server = 10;
        c.ingest.max_samples_per_request = max_samples_per_request;
    })
    .await
}

/// POSTs to an exporter endpoint with the key as a bearer token: (status, headers, body).
async fn post(
    svc: &TestService,
    path: &str,
    key: &str,
    content_type: &str,
    body: Vec<u8>,
) -> (StatusCode, reqwest::header::HeaderMap, Vec<u8>) {
    let mut request = svc
        .client
        .post(svc.url(path))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", content_type)
        .body(body);
    if path == "/api/v1/prom/write" {
        request = request
            .header("content-encoding", "snappy")
            .header("x-prometheus-remote-write-version", "0.1.0");
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    (status, headers, response.bytes().await.unwrap().to_vec())
}

fn line_protocol(names: &[&str], t: i64) -> Vec<u8> {
    names
        .iter()
        .map(|n| format!("{n} value=1 {}\n", t * 1_000_000))
        .collect::<String>()
        .into_bytes()
}

fn remote_write(names: &[&str], t: i64) -> Vec<u8> {
    encode(&WriteRequest {
        timeseries: names.iter().map(|n| TimeSeries::named(n, &[], &[(1.0, t)])).collect(),
    })
}

fn otlp_gauges(names: &[&str], t: i64) -> Vec<u8> {
    let metrics: Vec<Value> = names
        .iter()
        .map(|n| json!({"name": n, "gauge": {"dataPoints": [{"timeUnixNano": ns(t), "asDouble": 1.0}]}}))
        .collect();
    serde_json::to_vec(&json!({"resourceMetrics": [{"scopeMetrics": [{"metrics": metrics}]}]})).unwrap()
}

/// The (index, code) of each rejection in a signed write's answer.
fn refusals(answer: &Value) -> Vec<(u64, &str)> {
    answer["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["index"].as_u64().unwrap(), r["code"].as_str().unwrap()))
        .collect()
}

/// The author dashboard's page, signed in with the key.
async fn dashboard(svc: &TestService, api_key: &str) -> String {
    let browser = reqwest::Client::builder().cookie_store(true).build().unwrap();
    let r = browser
        .post(svc.url("/dashboard/login"))
        .form(&[("api_key", api_key)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    r.text().await.unwrap()
}

fn retry_after(headers: &reqwest::header::HeaderMap) -> u64 {
    headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("a Retry-After of whole seconds")
}

#[tokio::test]
async fn past_its_rate_a_server_gets_429_on_every_endpoint_and_others_go_on() {
    // One sample a second with bursts of ten: after ten, a five-sample write waits
    // about five seconds, so every endpoint below meets the limit.
    let svc = one_sample_a_second(10).await;
    let busy = svc.server_with_key("busy").await;
    let calm = svc.server_with_key("calm").await;
    let t = now_ms() - 1000;
    let (status, _, answer) = svc.push(&busy, &gauges("busy", "burst", 10, t)).await;
    assert_eq!((status, &answer["accepted"]), (StatusCode::OK, &json!(10)), "{answer}");

    let (status, headers, answer) = svc.push(&busy, &gauges("busy", "over", 5, t)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{answer}");
    assert_eq!(answer["code"], "rate_limited");
    assert!((1..=6).contains(&retry_after(&headers)), "{headers:?}");
    let five = ["o0", "o1", "o2", "o3", "o4"];
    for (path, content_type, body) in [
        ("/api/v1/write", "text/plain", line_protocol(&five, t)),
        ("/api/v1/prom/write", "application/x-protobuf", remote_write(&five, t)),
    ] {
        let (status, headers, body) = post(&svc, path, &busy.api_key, content_type, body).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{path}");
        let problem: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(problem["code"], "rate_limited", "{path}: {problem}");
        assert!(retry_after(&headers) >= 1, "{path}");
    }
    // OTLP answers with a google.rpc.Status: 8 is RESOURCE_EXHAUSTED.
    let (status, headers, body) = post(
        &svc,
        "/otlp/v1/metrics",
        &busy.api_key,
        "application/json",
        otlp_gauges(&five, t),
    )
    .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["code"], 8, "{answer}");
    assert!(retry_after(&headers) >= 1);
    assert_eq!(svc.samples(&busy, "").await.len(), 10, "nothing refused was stored");

    // Another server has its own allowance.
    let (status, _, answer) = svc.push(&calm, &gauges("calm", "g", 10, t)).await;
    assert_eq!((status, &answer["accepted"]), (StatusCode::OK, &json!(10)), "{answer}");
    // A refused signed request did not use up its signature: sent again after the wait,
    // the same body and signature are stored.
    // Two samples: refused unless two seconds passed since the burst.
    let body = gauges("calm", "late", 2, t);
    let signature = mcp_metrics_core::signature::sign(calm.secret.as_bytes(), now_ms() / 1000, body.as_bytes());
    let (status, headers, _) = svc
        .push_raw(Some(&calm.api_key), Some(&signature), "application/json", &body)
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    tokio::time::sleep(Duration::from_secs(retry_after(&headers)) + Duration::from_millis(100)).await;
    let (status, _, answer) = svc
        .push_raw(Some(&calm.api_key), Some(&signature), "application/json", &body)
        .await;
    assert_eq!((status, &answer["accepted"]), (StatusCode::OK, &json!(2)), "{answer}");

    let text = svc.metrics_text().await;
    assert!(
        text.contains("mcp_metrics_ingest_requests_rejected_total{code=\"rate_limited\"} 5\n"),
        "{text}"
    );
    // Each author sees their own refusals and the allowance on the dashboard.
    let html = dashboard(&svc, &busy.api_key).await;
    assert!(html.contains("1 samples a second, bursts of 10"), "{html}");
    assert!(html.contains("(this node)</th><td>4</td>"), "{html}");
    let html = dashboard(&svc, &calm.api_key).await;
    assert!(html.contains("(this node)</th><td>1</td>"), "{html}");
    svc.stop().await;
}

#[tokio::test]
async fn at_its_series_limit_a_server_keeps_its_series_and_new_ones_are_refused() {
    let svc = TestService::start_with(|c| c.ingest.max_series_per_server = 3).await;
    let full = svc.server_with_key("full").await;
    let other = svc.server_with_key("other").await;
    let t = now_ms() - 1000;
    // Five new series: the first three fit.
    let (status, _, answer) = svc.push(&full, &gauges("full", "g", 5, t)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["accepted"], 3, "{answer}");
    let refused = refusals(&answer);
    assert_eq!(refused, vec![(3, "too_many_series"), (4, "too_many_series")]);
    assert!(
        answer["rejected"][0]["detail"]
            .as_str()
            .unwrap()
            .contains("limit of 3 series")
    );

    // Known series go on through every endpoint; a new one beside them is refused.
    let (status, _, body) = post(
        &svc,
        "/api/v1/write",
        &full.api_key,
        "text/plain",
        line_protocol(&["g0", "h"], t + 1),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let problem: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(problem["accepted"], 1, "{problem}");
    assert_eq!(
        problem["rejected"],
        json!([{"line": 2, "code": "too_many_series",
        "detail": "this server has reached its limit of 3 series; samples of the series it has are still stored"}])
    );
    let (status, _, body) = post(
        &svc,
        "/api/v1/prom/write",
        &full.api_key,
        "application/x-protobuf",
        remote_write(&["g1", "h"], t + 2),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "a refusal that will not change is not retried"
    );
    assert!(String::from_utf8_lossy(&body).contains("1 samples stored, 1 refused"));
    let (status, _, body) = post(
        &svc,
        "/otlp/v1/metrics",
        &full.api_key,
        "application/json",
        otlp_gauges(&["g2", "h"], t + 3),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["partialSuccess"]["rejectedDataPoints"], "1", "{answer}");
    assert!(
        answer["partialSuccess"]["errorMessage"]
            .as_str()
            .unwrap()
            .contains("limit of 3 series")
    );

    let names: Vec<String> = svc
        .samples(&full, "")
        .await
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["g0", "g1", "g2", "g0", "g1", "g2"], "the known series only");
    let (status, _, answer) = svc.push(&other, &gauges("other", "g", 3, t)).await;
    assert_eq!((status, &answer["accepted"]), (StatusCode::OK, &json!(3)), "{answer}");
    let html = dashboard(&svc, &full.api_key).await;
    assert!(html.contains("<td>3 of 3: samples of new series beyond it"), "{html}");
    assert!(html.contains("<code>too_many_series</code></td><td>5</td>"), "{html}");
    let text = svc.metrics_text().await;
    assert!(
        text.contains("mcp_metrics_ingest_samples_rejected_total{code=\"too_many_series\"} 5\n"),
        "{text}"
    );
    svc.stop().await;
}

#[tokio::test]
async fn what_is_not_stored_gives_its_charge_back_and_an_otlp_export_is_charged_whole() {
    // Ten samples a burst, one a second back: a request stored or refused shows at once.
    let svc = one_sample_a_second(4).await;
    let cred = svc.server_with_key("acme").await;
    let t = now_ms() - 1000;
    let body = gauges("acme", "g", 4, t);
    let signature = mcp_metrics_core::signature::sign(cred.secret.as_bytes(), now_ms() / 1000, body.as_bytes());
    let send = || svc.push_raw(Some(&cred.api_key), Some(&signature), "application/json", &body);
    assert_eq!(send().await.0, StatusCode::OK);
    // Replays of the signed request (409) and retries of a line-protocol body stored
    // already (204, stored once) are given back: 6 left, whatever is resent.
    for _ in 0..5 {
        assert_eq!(send().await.0, StatusCode::CONFLICT);
    }
    let lines = line_protocol(&["l0", "l1"], t);
    for _ in 0..5 {
        let (status, ..) = post(&svc, "/api/v1/write", &cred.api_key, "text/plain", lines.clone()).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
    }
    // 4 left. An OTLP export of 6 points (written in two parts of at most 4) is charged
    // whole before its first part: refused, and nothing of it is stored.
    let six = ["o0", "o1", "o2", "o3", "o4", "o5"];
    let (status, headers, _) = post(
        &svc,
        "/otlp/v1/metrics",
        &cred.api_key,
        "application/json",
        otlp_gauges(&six, t),
    )
    .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(
        retry_after(&headers) >= 2,
        "two samples short at one a second: {headers:?}"
    );
    assert_eq!(
        svc.samples(&cred, "").await.len(),
        6,
        "4 gauges and 2 lines, no OTLP point"
    );
    let (status, ..) = post(
        &svc,
        "/otlp/v1/metrics",
        &cred.api_key,
        "application/json",
        otlp_gauges(&six[..4], t),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "the 4 left fit");
    svc.stop().await;
}

#[tokio::test]
async fn refusals_of_every_stage_come_back_at_their_indices() {
    let svc = TestService::start_with(|c| c.ingest.max_series_per_server = 3).await;
    let cred = svc.server_with_key("s1").await;
    // A counter series this node has not cached (as if another node created it): the
    // request names it as new and the writer finds it as another kind.
    svc.sql_execute("INSERT INTO series (server_id, name, tags, kind, created_at) VALUES ('s1', 'raced', '{}', 1, 0)")
        .await;
    let t = now_ms() - 1000;
    let body = batch(
        "s1",
        json!([
            {"name": "bad name!", "value": 1, "timestamp": t},
            {"name": "first", "value": 2, "timestamp": t},
            {"name": "raced", "value": 3, "timestamp": t, "type": "gauge"},
            {"name": "second", "value": 4, "timestamp": t},
            {"name": "third", "value": 5, "timestamp": t},
            {"name": "first", "value": 6, "timestamp": t + 1}
        ]),
    );
    let (status, _, answer) = svc.push(&cred, &body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let refused = refusals(&answer);
    // raced, first and second make 3 series; third is one too many.
    assert_eq!(
        refused,
        vec![(0, "invalid_name"), (2, "kind_mismatch"), (4, "too_many_series")],
        "{answer}"
    );
    assert_eq!(answer["accepted"], 3, "{answer}");
    assert_eq!(svc.sample_values(&cred, "").await, vec![2.0, 4.0, 6.0]);
    svc.stop().await;
}

#[tokio::test]
async fn a_server_registered_again_under_a_deleted_ones_id_starts_afresh() {
    let svc = one_sample_a_second(10).await;
    let old = svc.server_with_key("acme").await;
    let t = now_ms() - 1000;
    // A whole burst, one sample of it refused by name: the dashboard counts both.
    let mut metrics: Vec<Value> = (0..9)
        .map(|i| json!({"name": format!("g{i}"), "value": i, "timestamp": t}))
        .collect();
    metrics.push(json!({"name": "bad name!", "value": 1, "timestamp": t}));
    let (status, _, answer) = svc.push(&old, &batch("acme", Value::Array(metrics))).await;
    assert_eq!((status, &answer["accepted"]), (StatusCode::OK, &json!(9)), "{answer}");
    // Five samples: refused unless five seconds passed since the burst.
    let (status, _, answer) = svc.push(&old, &gauges("acme", "g", 5, t)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{answer}");
    let html = dashboard(&svc, &old.api_key).await;
    assert!(html.contains("invalid_name"), "{html}");
    assert!(html.contains("(this node)</th><td>1</td>"), "{html}");
    let (status, _) = svc
        .admin(reqwest::Method::DELETE, "/api/v1/admin/servers/acme", None)
        .await;
    assert!(status.is_success(), "{status}");
    // The new server's allowance is whole, and its dashboard shows none of the old counts.
    let new = svc.server_with_key("acme").await;
    let (status, _, answer) = svc.push(&new, &gauges("acme", "g", 10, t)).await;
    assert_eq!((status, &answer["accepted"]), (StatusCode::OK, &json!(10)), "{answer}");
    let html = dashboard(&svc, &new.api_key).await;
    assert!(html.contains("(this node)</th><td>0</td>"), "{html}");
    assert!(!html.contains("invalid_name"), "the old server's refusals: {html}");
    svc.stop().await;
}

/// Settings built in code are checked as those loaded from a file are: a burst smaller
/// than a whole request, while the allowance is on, is refused before the database is
/// opened.
#[tokio::test]
async fn settings_built_in_code_are_refused_as_a_file_would_be() {
    let dir = tempfile::tempdir().unwrap();
    let database = dir.path().join("refused.db");
    let mut config = mcp_metrics_server::config::Config {
        database: format!("sqlite://{}", database.display()),
        ..Default::default()
    };
    config.ingest.burst_samples_per_server = 10;
    config.ingest.max_samples_per_request = 100;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let run = mcp_metrics_server::run(
        config,
        listener,
        std::future::pending(),
        mcp_metrics_server::RunOptions::default(),
    );
    let refused = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the service started on settings it must refuse")
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("ingest.burst_samples_per_server (10) must be at least ingest.max_samples_per_request (100)"),
        "{refused}"
    );
    assert!(!database.exists());
}
