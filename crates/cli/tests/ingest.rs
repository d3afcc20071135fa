//! Signed ingest over real HTTP: acceptance and exact read-back, idempotent retries,
//! histogram events, last-write-wins, per-sample rejections and whole-request errors.

mod common;

use common::{Credential, TestService, batch};
use mcp_metrics_core::signature::sign;
use mcp_metrics_core::time::now_ms;
use reqwest::StatusCode;
use serde_json::{Value, json};

/// `(index, code)` of each rejection in a write's answer.
fn rejected_codes(answer: &Value) -> Vec<(u64, &str)> {
    answer["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["index"].as_u64().unwrap(), r["code"].as_str().unwrap()))
        .collect()
}

/// The names of the server's stored raw samples, in the API's order.
async fn sample_names(svc: &TestService, cred: &Credential) -> Vec<String> {
    svc.samples(cred, "")
        .await
        .iter()
        .map(|s| s["name"].as_str().unwrap().into())
        .collect()
}

#[tokio::test]
async fn signed_batch_is_read_back_exactly() {
    let svc = TestService::start().await;
    let cred = svc.server_with_key("acme-search").await;
    let t0 = now_ms() - 60_000;
    let body = batch(
        "acme-search",
        json!([
            {"name":"response_time","value":120.25,"type":"histogram","timestamp":t0,"tags":{"tool":"search","region":"eu"}},
            {"name":"requests","value":42,"type":"counter","timestamp":mcp_metrics_core::time::format_rfc3339_ms(t0 + 1)},
            {"name":"active_sessions","value":-3.5,"timestamp":t0 + 2,"tags":{"zone":"b\"q\u{e9}"}}
        ]),
    );
    let (status, _, answer) = svc.push(&cred, &body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer, json!({"accepted": 3, "rejected": []}));

    let samples = svc.samples(&cred, "").await;
    assert_eq!(
        samples,
        vec![
            json!({"name":"response_time","tags":{"region":"eu","tool":"search"},"timestamp":t0,"value":120.25}),
            json!({"name":"requests","tags":{},"timestamp":t0 + 1,"value":42.0}),
            json!({"name":"active_sessions","tags":{"zone":"b\"q\u{e9}"},"timestamp":t0 + 2,"value":-3.5}),
        ]
    );
    // Filter by name and time range.
    let only = svc
        .samples(&cred, &format!("name=requests&from={}&to={}", t0, t0 + 2))
        .await;
    assert_eq!(only.len(), 1);
    assert_eq!(only[0]["name"], "requests");
    svc.stop().await;
}

#[tokio::test]
async fn retried_body_is_stored_once_even_when_resigned() {
    let svc = TestService::start().await;
    let cred = svc.server_with_key("s1").await;
    let t = now_ms() - 1000;
    let body = batch(
        "s1",
        json!([{"name":"response_time","value":5,"type":"histogram","timestamp":t}]),
    );
    let (status, headers, answer) = svc.push(&cred, &body).await;
    assert_eq!((status, answer["accepted"].as_u64()), (StatusCode::OK, Some(1)));
    assert!(headers.get("idempotent-replayed").is_none());
    // Same body, new signature (different t): acknowledged, not stored again.
    let signature = sign(cred.secret.as_bytes(), now_ms() / 1000 - 7, body.as_bytes());
    let (status, headers, answer) = svc
        .push_raw(Some(&cred.api_key), Some(&signature), "application/json", &body)
        .await;
    assert_eq!((status, answer["accepted"].as_u64()), (StatusCode::OK, Some(1)));
    assert_eq!(headers.get("idempotent-replayed").unwrap(), "true");
    assert_eq!(svc.samples(&cred, "").await.len(), 1);
    assert!(
        svc.metrics_text()
            .await
            .contains("mcp_metrics_ingest_duplicate_requests_total 1\n")
    );
    svc.stop().await;
}

#[tokio::test]
async fn histogram_events_in_one_millisecond_are_all_kept() {
    let svc = TestService::start().await;
    let cred = svc.server_with_key("s1").await;
    let t = now_ms() - 1000;
    let body = batch(
        "s1",
        json!([
            {"name":"response_time","value":10,"type":"histogram","timestamp":t},
            {"name":"response_time","value":20,"type":"histogram","timestamp":t},
        ]),
    );
    assert_eq!(svc.push(&cred, &body).await.0, StatusCode::OK);
    // A third observation in the same millisecond from another request.
    let body = batch(
        "s1",
        json!([{"name":"response_time","value":30,"type":"histogram","timestamp":t}]),
    );
    assert_eq!(svc.push(&cred, &body).await.0, StatusCode::OK);
    assert_eq!(svc.sample_values(&cred, "").await, vec![10.0, 20.0, 30.0]);
    svc.stop().await;
}

#[tokio::test]
async fn gauge_rewritten_at_same_timestamp_keeps_last_value() {
    let svc = TestService::start().await;
    let cred = svc.server_with_key("s1").await;
    let t = now_ms() - 1000;
    for value in [1.0, 2.0, 3.0] {
        let body = batch("s1", json!([{"name":"active_sessions","value":value,"timestamp":t}]));
        assert_eq!(svc.push(&cred, &body).await.0, StatusCode::OK);
    }
    // Also inside one request: the later sample wins.
    let body = batch(
        "s1",
        json!([{"name":"requests","type":"counter","value":7,"timestamp":t},{"name":"requests","type":"counter","value":9,"timestamp":t}]),
    );
    assert_eq!(svc.push(&cred, &body).await.0, StatusCode::OK);
    let samples = svc.samples(&cred, "").await;
    let pairs: Vec<(String, f64)> = samples
        .iter()
        .map(|s| (s["name"].as_str().unwrap().to_owned(), s["value"].as_f64().unwrap()))
        .collect();
    assert_eq!(pairs, vec![("active_sessions".into(), 3.0), ("requests".into(), 9.0)]);
    svc.stop().await;
}

/// A series created as a gauge behind this node's back (another node, or a request that
/// raced this one past the series cache) is new to the request: its histogram samples are
/// refused when the writer finds the series, answered like any kind mismatch.
#[tokio::test]
async fn samples_for_a_series_just_created_as_another_kind_are_refused_by_index() {
    let svc = TestService::start().await;
    let cred = svc.server_with_key("s1").await;
    svc.sql_execute("INSERT INTO series (server_id, name, tags, kind, created_at) VALUES ('s1', 'raced', '{}', 0, 0)")
        .await;
    let now = now_ms();
    let body = batch(
        "s1",
        json!([
            {"name":"raced","value":1,"type":"histogram","timestamp":now - 30},
            {"name":"9bad","value":1},
            {"name":"ok","value":1,"timestamp":now - 20},
            {"name":"raced","value":2,"type":"histogram","timestamp":now - 10},
        ]),
    );
    let (status, _, answer) = svc.push(&cred, &body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["accepted"], 1, "{answer}");
    let rejected = rejected_codes(&answer);
    assert_eq!(
        rejected,
        vec![(0, "kind_mismatch"), (1, "invalid_name"), (3, "kind_mismatch")]
    );
    assert!(
        answer["rejected"][0]["detail"].as_str().unwrap().contains("gauge"),
        "{answer}"
    );
    let names = sample_names(&svc, &cred).await;
    assert_eq!(names, vec!["ok"]);
    let text = svc.metrics_text().await;
    assert!(
        text.contains("mcp_metrics_ingest_samples_rejected_total{code=\"kind_mismatch\"} 2\n"),
        "{text}"
    );
    assert!(text.contains("mcp_metrics_ingest_samples_accepted_total 1\n"), "{text}");
    // The series is known now: the next histogram sample is refused before the writer.
    let body = batch("s1", json!([{"name":"raced","value":3,"type":"histogram"}]));
    let (_, _, answer) = svc.push(&cred, &body).await;
    assert_eq!(answer["rejected"][0]["code"], "kind_mismatch", "{answer}");
    svc.stop().await;
}

#[tokio::test]
async fn per_sample_rejections_are_reported_by_index_and_the_rest_is_stored() {
    let svc = TestService::start().await;
    let cred = svc.server_with_key("s1").await;
    let now = now_ms();
    let tags: serde_json::Map<String, Value> = (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
    let body = batch(
        "s1",
        json!([
            {"name":"ok_one","value":1,"timestamp":now - 10},
            {"name":"9bad","value":1},
            {"name":"x","value":"Infinity"},
            {"name":"x","value":1,"tags":tags},
            {"name":"x","value":1,"timestamp":now - 31 * 86_400_000i64},
            {"name":"x","value":1,"timestamp":now + 301_000},
            {"name":"ok_two","value":2,"timestamp":now - 5},
            {"name":"ok_one","value":1,"type":"histogram","timestamp":now - 4},
        ]),
    );
    let (status, _, answer) = svc.push(&cred, &body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["accepted"], 2);
    let rejected = rejected_codes(&answer);
    assert_eq!(
        rejected,
        vec![
            (1, "invalid_name"),
            (2, "invalid_value"),
            (3, "too_many_tags"),
            (4, "too_old"),
            (5, "too_far_ahead"),
            (7, "kind_mismatch"),
        ]
    );
    assert!(answer["rejected"][0]["detail"].as_str().unwrap().len() > 10);
    let names = sample_names(&svc, &cred).await;
    assert_eq!(names, vec!["ok_one", "ok_two"]);
    let text = svc.metrics_text().await;
    assert!(
        text.contains("mcp_metrics_ingest_samples_rejected_total{code=\"too_old\"} 1\n"),
        "{text}"
    );
    assert!(text.contains("mcp_metrics_ingest_samples_accepted_total 2\n"));
    svc.stop().await;
}

async fn expect_problem(
    svc: &TestService,
    result: (StatusCode, reqwest::header::HeaderMap, Value),
    status: u16,
    code: &str,
) {
    let (got, headers, body) = result;
    assert_eq!(got.as_u16(), status, "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status);
    assert!(body["title"].is_string() && body["detail"].is_string() && body["type"].is_string());
    assert_eq!(headers.get("content-type").unwrap(), "application/problem+json");
    let _ = svc;
}

#[tokio::test]
async fn whole_request_errors_are_problem_documents_and_store_nothing() {
    let svc = TestService::start_with(|c| {
        c.ingest.max_body_bytes = 4096;
        c.ingest.max_samples_per_request = 5;
        c.ingest.queue_capacity_samples = 100;
    })
    .await;
    let cred = svc.server_with_key("s1").await;
    let sig = |body: &str| sign(cred.secret.as_bytes(), now_ms() / 1000, body.as_bytes());

    let big = batch("s1", json!([{"name":"x","value":1,"tags":{"pad":"p".repeat(5000)}}]));
    expect_problem(
        &svc,
        svc.push_raw(Some(&cred.api_key), Some(&sig(&big)), "application/json", &big)
            .await,
        413,
        "payload_too_large",
    )
    .await;

    let six = batch(
        "s1",
        Value::Array((0..6).map(|i| json!({"name":"x","value":i})).collect()),
    );
    expect_problem(
        &svc,
        svc.push_raw(Some(&cred.api_key), Some(&sig(&six)), "application/json", &six)
            .await,
        413,
        "too_many_samples",
    )
    .await;

    let broken = "{\"server_id\":\"s1\",\"metrics\":[";
    expect_problem(
        &svc,
        svc.push_raw(Some(&cred.api_key), Some(&sig(broken)), "application/json", broken)
            .await,
        400,
        "invalid_payload",
    )
    .await;

    let shape = r#"{"server_id":"s1","metrics":{"name":"x"}}"#;
    expect_problem(
        &svc,
        svc.push_raw(Some(&cred.api_key), Some(&sig(shape)), "application/json", shape)
            .await,
        400,
        "invalid_payload",
    )
    .await;

    let ok = batch("s1", json!([{"name":"x","value":1}]));
    expect_problem(
        &svc,
        svc.push_raw(Some(&cred.api_key), Some(&sig(&ok)), "text/plain", &ok)
            .await,
        415,
        "unsupported_media_type",
    )
    .await;

    assert!(svc.samples(&cred, "").await.is_empty());
    svc.stop().await;
}

#[tokio::test]
async fn alias_route_and_events_accept_signed_writes() {
    let svc = TestService::start().await;
    let cred = svc.server_with_key("s1").await;
    let body = batch("s1", json!([{"name":"x","value":1}]));
    let signature = sign(cred.secret.as_bytes(), now_ms() / 1000, body.as_bytes());
    let response = svc
        .client
        .post(svc.url("/functions/v1/metrics-collect"))
        .header("content-type", "application/json")
        .header("x-api-key", &cred.api_key)
        .header("x-signature", &signature)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(svc.samples(&cred, "").await.len(), 1);

    let event = json!({"server_id":"s1","kind":"deploy","title":"v1.2.0","at":"2026-01-02T03:04:05Z"}).to_string();
    let signature = sign(cred.secret.as_bytes(), now_ms() / 1000, event.as_bytes());
    let post = || {
        svc.client
            .post(svc.url("/api/v1/events"))
            .header("content-type", "application/json")
            .header("x-api-key", &cred.api_key)
            .header("x-signature", &signature)
            .body(event.clone())
            .send()
    };
    let response = post().await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let replay = post().await.unwrap();
    assert_eq!(replay.status(), StatusCode::CONFLICT);
    // The same event re-signed is a retry: acknowledged, stored once.
    let resigned = sign(cred.secret.as_bytes(), now_ms() / 1000 - 3, event.as_bytes());
    let retry = svc
        .client
        .post(svc.url("/api/v1/events"))
        .header("content-type", "application/json")
        .header("x-api-key", &cred.api_key)
        .header("x-signature", &resigned)
        .body(event.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(retry.status(), StatusCode::OK);
    assert_eq!(retry.headers().get("idempotent-replayed").unwrap(), "true");
    let rows = svc
        .sql_i64("SELECT count(*) FROM server_events WHERE kind = 'deploy'")
        .await;
    assert_eq!(rows, 1);
    svc.stop().await;
}

#[tokio::test]
async fn full_queue_answers_503_with_retry_after() {
    let svc = TestService::start_with(|c| {
        c.ingest.max_samples_per_request = 10;
        c.ingest.queue_capacity_samples = 10;
    })
    .await;
    let cred = svc.server_with_key("s1").await;
    // Hold the database's write lock so the writer's commit waits and the queue stays full.
    let blocker = svc.block_writes().await;
    let first_body = batch(
        "s1",
        Value::Array(
            (0..10)
                .map(|i| json!({"name":"x","value":i,"timestamp":now_ms() - 100 + i}))
                .collect(),
        ),
    );
    let first = {
        let svc_client = svc.client.clone();
        let url = svc.url("/api/v1/metrics");
        let signature = sign(cred.secret.as_bytes(), now_ms() / 1000, first_body.as_bytes());
        let key = cred.api_key.clone();
        tokio::spawn(async move {
            svc_client
                .post(url)
                .header("content-type", "application/json")
                .header("x-api-key", key)
                .header("x-signature", signature)
                .body(first_body)
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let second = batch("s1", json!([{"name":"y","value":1}]));
    let (status, headers, body) = svc.push(&cred, &second).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["code"], "overloaded");
    assert_eq!(headers.get("retry-after").unwrap(), "1");
    blocker.release().await;
    assert_eq!(first.await.unwrap(), StatusCode::OK);
    // The refused request stored nothing, and may be retried with the same signature.
    let names = sample_names(&svc, &cred).await;
    assert_eq!(names.len(), 10);
    assert!(names.iter().all(|n| n == "x"));
    svc.stop().await;
}

#[tokio::test]
async fn raw_read_pages_without_gaps_or_repeats() {
    let svc = TestService::start().await;
    let cred = svc.server_with_key("s1").await;
    let t = now_ms() - 10_000;
    // Three series, shared timestamps, several observations per millisecond.
    let mut metrics = Vec::new();
    for i in 0..50 {
        metrics.push(json!({"name":"response_time","type":"histogram","value":i,"timestamp":t + i / 5}));
        metrics.push(json!({"name":"requests","type":"counter","value":i,"timestamp":t + i}));
        metrics.push(json!({"name":"active_sessions","value":i,"timestamp":t + i,"tags":{"zone":"a"}}));
    }
    let (status, _, answer) = svc.push(&cred, &batch("s1", Value::Array(metrics))).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let all = svc.samples(&cred, "limit=10000").await;
    assert_eq!(all.len(), 150);
    let paged = svc.samples(&cred, "limit=7").await;
    assert_eq!(paged, all);
    let timestamps: Vec<i64> = all.iter().map(|s| s["timestamp"].as_i64().unwrap()).collect();
    assert!(timestamps.windows(2).all(|w| w[0] <= w[1]), "oldest first");
    // Bad parameters are 400s.
    let r = svc.read_samples("s1", Some(&cred.api_key), "limit=0").await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = svc.read_samples("s1", Some(&cred.api_key), "cursor=zz").await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    svc.stop().await;
}
