//! OTLP/HTTP metrics over real HTTP: protobuf and JSON, gzip, the mapping of every point
//! type, streams continued across requests, partial success, retries, and the failures
//! exporters act on (401/413/415/400 in the request's encoding).

mod common;

use std::io::Write;

use common::{Credential, TestService};
use mcp_metrics_core::otlp::ExportMetricsServiceResponse;
use mcp_metrics_core::time::now_ms;
use prost::Message;
use reqwest::StatusCode;
use serde_json::{Value, json};

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

async fn export(
    svc: &TestService,
    auth: Option<&str>,
    content_type: &str,
    gzipped: bool,
    body: Vec<u8>,
) -> (StatusCode, reqwest::header::HeaderMap, Vec<u8>) {
    let mut r = svc
        .client
        .post(svc.url("/otlp/v1/metrics"))
        .header("content-type", content_type);
    let body = if gzipped {
        r = r.header("content-encoding", "gzip");
        gzip(&body)
    } else {
        body
    };
    if let Some(a) = auth {
        r = r.header("authorization", a);
    }
    let response = r.body(body).send().await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    (status, headers, response.bytes().await.unwrap().to_vec())
}

fn ns(ms: i64) -> String {
    (ms as u64 * 1_000_000).to_string()
}

/// One request in OTLP/JSON: a gauge, a cumulative counter, a delta sum, a cumulative
/// histogram and an MCP operation duration (seconds), all at `t`, with counts scaled by `n`.
fn request(start: i64, t: i64, n: u64) -> Value {
    json!({"resourceMetrics": [{
    "resource": {"attributes": [
        {"key": "service.name", "value": {"stringValue": "weather-mcp"}},
        {"key": "telemetry.sdk.language", "value": {"stringValue": "python"}}]},
    "scopeMetrics": [{"scope": {"name": "test"}, "metrics": [
        {"name": "active_sessions", "unit": "1",
         "gauge": {"dataPoints": [{"timeUnixNano": ns(t), "asInt": (3 * n).to_string()}]}},
        {"name": "requests", "unit": "1",
         "sum": {"aggregationTemporality": 2, "isMonotonic": true,
                 "dataPoints": [{"startTimeUnixNano": ns(start), "timeUnixNano": ns(t), "asDouble": 10.0 * n as f64}]}},
        {"name": "errors", "unit": "1",
         "sum": {"aggregationTemporality": 1, "isMonotonic": true,
                 "dataPoints": [{"startTimeUnixNano": ns(start), "timeUnixNano": ns(t), "asInt": "2"}]}},
        {"name": "payload_bytes", "unit": "By",
         "histogram": {"aggregationTemporality": 2, "dataPoints": [{
             "startTimeUnixNano": ns(start), "timeUnixNano": ns(t),
             "count": (4 * n).to_string(), "sum": 1000.0 * n as f64,
             "bucketCounts": [n.to_string(), (3 * n).to_string(), "0"], "explicitBounds": [100, 500]}]}},
        {"name": "mcp.server.operation.duration", "unit": "s",
         "histogram": {"aggregationTemporality": 1, "dataPoints": [{
             "timeUnixNano": ns(t), "count": "2", "sum": 0.5,
             "bucketCounts": ["0", "2", "0"], "explicitBounds": [0.1, 1.0],
             "attributes": [{"key": "mcp.method.name", "value": {"stringValue": "tools/call"}},
                            {"key": "gen_ai.tool.name", "value": {"stringValue": "forecast"}}]}]}}
    ]}]}]})
}

async fn values(svc: &TestService, cred: &Credential, name: &str) -> Vec<f64> {
    svc.sample_values(cred, &format!("name={name}")).await
}

#[tokio::test]
async fn every_point_type_lands_and_streams_continue_across_requests() {
    let svc = TestService::start().await;
    let cred = svc.server_with_key("acme").await;
    let bearer = format!("Bearer {}", cred.api_key);
    let start = now_ms() - 120_000;
    let t1 = now_ms() - 60_000;
    let t2 = t1 + 30_000;

    // First export: protobuf, gzip-compressed.
    let first: mcp_metrics_core::otlp::ExportMetricsServiceRequest =
        serde_json::from_value(request(start, t1, 1)).unwrap();
    let (status, headers, body) = export(
        &svc,
        Some(&bearer),
        "application/x-protobuf",
        true,
        first.encode_to_vec(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(headers["content-type"], "application/x-protobuf");
    let answer = ExportMetricsServiceResponse::decode(&body[..]).unwrap();
    assert_eq!(answer.partial_success, None);

    // Second export: OTLP/JSON, later time, doubled cumulative counts.
    let second = serde_json::to_vec(&request(start, t2, 2)).unwrap();
    let (status, headers, body) = export(&svc, Some(cred.api_key.as_str()), "application/json", false, vec![]).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "a key without a scheme is not a bearer token"
    );
    assert_eq!(headers["content-type"], "application/json");
    assert!(String::from_utf8_lossy(&body).contains("\"code\":16"));
    let (status, headers, body) = export(
        &svc,
        Some(&format!("Token {}", cred.api_key)),
        "application/json",
        false,
        second.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(headers["content-type"], "application/json");
    // A retry of the same body (the exporter did not see the answer) stores nothing more.
    let (status, _, _) = export(&svc, Some(&bearer), "application/json", false, second).await;
    assert_eq!(status, StatusCode::OK);

    assert_eq!(values(&svc, &cred, "active_sessions").await, vec![3.0, 6.0]);
    assert_eq!(values(&svc, &cred, "requests").await, vec![10.0, 20.0]);
    // Delta increments of 2 become a running total, not doubled by the retry.
    assert_eq!(values(&svc, &cred, "errors").await, vec![2.0, 4.0]);
    // Cumulative histogram: 4 observations summing to 1000, then the increase (4 more, 1000 more).
    let payload = svc.samples(&cred, "name=payload_bytes").await;
    assert_eq!(payload.len(), 8);
    for at in [t1, t2] {
        let part: Vec<f64> = payload
            .iter()
            .filter(|s| s["timestamp"].as_i64() == Some(at))
            .map(|s| s["value"].as_f64().unwrap())
            .collect();
        assert_eq!(part.len(), 4);
        assert!((part.iter().sum::<f64>() - 1000.0).abs() < 1e-6, "{part:?}");
        assert_eq!(part.iter().filter(|v| **v <= 100.0).count(), 1);
        assert_eq!(part.iter().filter(|v| **v > 100.0 && **v <= 500.0).count(), 3);
    }
    assert_eq!(payload[0]["tags"], json!({"service": "weather-mcp"}));
    // The MCP duration in seconds also feeds response_time in ms with tool and method.
    let rt = svc.samples(&cred, "name=response_time").await;
    assert_eq!(rt.len(), 4);
    assert_eq!(rt[0]["tags"], json!({"method": "tools/call", "tool": "forecast"}));
    let sum: f64 = rt.iter().map(|s| s["value"].as_f64().unwrap()).sum();
    assert!((sum - 1000.0).abs() < 1e-6, "{sum}");

    // The rollups see the exact count and sum.
    svc.admin(reqwest::Method::POST, "/api/v1/admin/aggregate", None).await;
    let metrics: Value = svc
        .client
        .get(svc.url("/api/v1/servers/acme/metrics?period=1h&name=response_time"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let series = metrics["series"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "response_time")
        .expect("a response_time series");
    let column = |stat: &str| -> Vec<f64> {
        series["points"][stat]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap_or(0.0))
            .collect()
    };
    let count: f64 = column("count").iter().sum();
    let total: f64 = column("count").iter().zip(column("avg")).map(|(c, a)| c * a).sum();
    assert_eq!(count, 4.0, "{metrics}");
    assert!((total - 1000.0).abs() < 1e-6, "{metrics}");
    svc.stop().await;
}

#[tokio::test]
async fn refused_points_are_a_partial_success_and_broken_bodies_a_400() {
    let svc = TestService::start().await;
    let cred = svc.server_with_key("acme").await;
    let key = format!("Bearer {}", cred.api_key);
    let t = now_ms() - 1000;
    let body = json!({"resourceMetrics": [{"scopeMetrics": [{"metrics": [
        {"name": "good", "gauge": {"dataPoints": [{"timeUnixNano": ns(t), "asDouble": 1.5}]}},
        {"name": "bad name!", "gauge": {"dataPoints": [{"timeUnixNano": ns(t), "asDouble": 1}]}},
        {"name": "latency", "summary": {"dataPoints": [{"timeUnixNano": ns(t)}]}}
    ]}]}]});
    let (status, _, answer) = export(
        &svc,
        Some(&key),
        "application/json",
        true,
        serde_json::to_vec(&body).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let answer: Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(answer["partialSuccess"]["rejectedDataPoints"], "2", "{answer}");
    let message = answer["partialSuccess"]["errorMessage"].as_str().unwrap();
    assert!(
        message.contains("bad name!") && message.contains("Summary"),
        "{message}"
    );
    assert_eq!(values(&svc, &cred, "good").await, vec![1.5]);

    // Everything refused: a 400, so the exporter does not retry it.
    let none = json!({"resourceMetrics": [{"scopeMetrics": [{"metrics": [
        {"name": "bad name!", "gauge": {"dataPoints": [{"timeUnixNano": ns(t), "asDouble": 1}]}}]}]}]});
    let (status, _, _) = export(
        &svc,
        Some(&key),
        "application/json",
        false,
        serde_json::to_vec(&none).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // Not protobuf, not JSON, not gzip.
    let (status, headers, body) = export(
        &svc,
        Some(&key),
        "application/x-protobuf",
        false,
        b"\xff\xff\xff".to_vec(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(headers["content-type"], "application/x-protobuf");
    assert!(!body.is_empty(), "a google.rpc.Status body");
    assert_eq!(
        export(&svc, Some(&key), "application/json", false, b"{".to_vec())
            .await
            .0,
        StatusCode::BAD_REQUEST
    );
    let garbage_gzip = svc
        .client
        .post(svc.url("/otlp/v1/metrics"))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .header("authorization", &key)
        .body("not gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(garbage_gzip.status(), StatusCode::BAD_REQUEST);
    let brotli = svc
        .client
        .post(svc.url("/otlp/v1/metrics"))
        .header("content-type", "application/json")
        .header("content-encoding", "br")
        .header("authorization", &key)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(brotli.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(
        export(&svc, Some(&key), "text/plain", false, b"{}".to_vec()).await.0,
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
    svc.stop().await;
}

#[tokio::test]
async fn auth_failures_and_oversize_bodies() {
    let svc = TestService::start().await;
    let cred = svc.server_with_key("acme").await;
    let empty = b"{}".to_vec();
    assert_eq!(
        export(&svc, None, "application/json", false, empty.clone()).await.0,
        StatusCode::UNAUTHORIZED
    );
    let (status, headers, body) = export(&svc, Some("Bearer nope"), "application/x-protobuf", false, vec![]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers["content-type"], "application/x-protobuf");
    assert!(!body.is_empty(), "a google.rpc.Status body");
    // X-API-Key works too; a revoked key does not.
    let ok = svc
        .client
        .post(svc.url("/otlp/v1/metrics"))
        .header("content-type", "application/json")
        .header("x-api-key", &cred.api_key)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    let (status, _) = svc
        .admin(
            reqwest::Method::DELETE,
            &format!("/api/v1/admin/servers/acme/keys/{}", cred.key_id),
            None,
        )
        .await;
    assert!(status.is_success(), "{status}");
    let bearer = format!("Bearer {}", cred.api_key);
    assert_eq!(
        export(&svc, Some(&bearer), "application/json", false, empty).await.0,
        StatusCode::UNAUTHORIZED
    );

    let other = svc.server_with_key("other").await;
    let bearer = format!("Bearer {}", other.api_key);
    // 21 MiB of JSON whitespace: over the limit sent plainly, and as a small gzip bomb.
    let big = vec![b' '; 21 << 20];
    assert_eq!(
        export(&svc, Some(&bearer), "application/json", true, big.clone())
            .await
            .0,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    let response = svc
        .client
        .post(svc.url("/otlp/v1/metrics"))
        .header("content-type", "application/json")
        .header("authorization", &bearer)
        .body(big)
        .send()
        .await;
    // The server answers from the declared length and may close the connection while the
    // client still sends; a status, if any, is 413 (`writes_are_refused_before_their_bodies_are_read`
    // in auth.rs sees that answer every time, sending the headers alone).
    if let Ok(response) = response {
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }
    svc.stop().await;
}

/// A key revoked elsewhere (another node, the CLI) after this node cached it: an export
/// of a cumulative stream with nothing new has no sample to store, yet it still commits
/// (an empty part), so the writer refuses the key before any stream state is stored. On
/// PostgreSQL the refused export still releases its stream lock.
#[tokio::test]
async fn an_export_with_a_key_revoked_elsewhere_stores_no_stream_state() {
    let svc = TestService::start().await;
    let cred = svc.server_with_key("acme").await;
    let bearer = format!("Bearer {}", cred.api_key);
    let t = now_ms() - 60_000;
    let gauge = json!({"resourceMetrics": [{"scopeMetrics": [{"metrics": [
        {"name": "active_sessions", "gauge": {"dataPoints": [{"timeUnixNano": ns(t), "asInt": "3"}]}}]}]}]});
    let (status, _, body) = export(&svc, Some(&bearer), "application/json", false, gauge.to_string().into()).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    svc.sql_execute(&format!(
        "UPDATE credentials SET revoked_at = 1 WHERE key_id = '{}'",
        cred.key_id
    ))
    .await;
    // No observation yet: nothing to commit, only the stream's state to store.
    let empty_histogram = json!({"resourceMetrics": [{"scopeMetrics": [{"metrics": [
        {"name": "payload_bytes", "histogram": {"aggregationTemporality": 2, "dataPoints": [{
            "startTimeUnixNano": ns(t - 60_000), "timeUnixNano": ns(t),
            "count": "0", "sum": 0.0, "bucketCounts": ["0", "0"], "explicitBounds": [100]}]}}]}]}]});
    let (status, _, body) = export(
        &svc,
        Some(&bearer),
        "application/json",
        false,
        empty_histogram.to_string().into(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{}", String::from_utf8_lossy(&body));
    assert!(
        String::from_utf8_lossy(&body).contains("revoked"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(
        svc.sql_i64("SELECT COUNT(*) FROM meta WHERE key LIKE 'otlp.stream.%'")
            .await,
        0
    );
    assert_eq!(svc.sql_i64("SELECT COUNT(*) FROM series").await, 1);
    if svc.is_postgres() {
        // The refused export's stream lock was released, and its session kept for the
        // next lock, not closed (a sender retrying a refused export used to open a
        // session per try). The handler releases it before answering, so the unlock has
        // run by now; were it only dropped, it would be released in the background, and
        // this count could race the answer.
        assert_eq!(
            svc.sql_i64(
                "SELECT COUNT(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND query LIKE 'SELECT pg_advisory_unlock%'"
            )
            .await,
            1
        );
    }
    svc.stop().await;
}

/// Exports of one delta sum sent at once: each builds on the total the one before
/// stored, so no increment is lost (the running totals are 2, 4, …, 2n).
#[tokio::test]
async fn concurrent_delta_exports_lose_no_increment() {
    let svc = TestService::start().await;
    let cred = svc.server_with_key("acme").await;
    let bearer = format!("Bearer {}", cred.api_key);
    let t0 = now_ms() - 60_000;
    let exports = (0..16).map(|i| {
        let body = serde_json::to_vec(&json!({"resourceMetrics": [{"scopeMetrics": [{"metrics": [
            {"name": "errors", "sum": {"aggregationTemporality": 1, "isMonotonic": true,
             "dataPoints": [{"timeUnixNano": ns(t0 + i), "asInt": "2"}]}}]}]}]}))
        .unwrap();
        let (svc, bearer) = (&svc, &bearer);
        async move { export(svc, Some(bearer), "application/json", false, body).await }
    });
    for (status, _, body) in futures_util::future::join_all(exports).await {
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    }
    let mut totals = values(&svc, &cred, "errors").await;
    totals.sort_by(f64::total_cmp);
    assert_eq!(totals, (1..=16).map(|i| 2.0 * i as f64).collect::<Vec<_>>());
}
