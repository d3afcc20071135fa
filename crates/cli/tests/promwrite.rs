//! Prometheus remote-write over HTTP: snappy-compressed protobuf, labels to tags,
//! counters by name, stale markers dropped, and the status codes senders act on.

mod common;

use common::TestService;
use mcp_metrics_core::promwrite::{STALE_NAN_BITS, TimeSeries, WriteRequest, encode};
use mcp_metrics_core::time::now_ms;
use reqwest::{Method, StatusCode};

async fn send(svc: &TestService, auth: Option<&str>, content_type: &str, body: Vec<u8>) -> (StatusCode, String) {
    let mut r = svc
        .client
        .post(svc.url("/api/v1/prom/write"))
        .header("content-type", content_type)
        .header("content-encoding", "snappy")
        .header("x-prometheus-remote-write-version", "0.1.0")
        .body(body);
    if let Some(a) = auth {
        r = r.header("authorization", a);
    }
    let response = r.send().await.unwrap();
    (response.status(), response.text().await.unwrap())
}

#[tokio::test]
async fn remote_write_lands_with_labels_kinds_and_without_stale_markers() {
    let svc = TestService::start().await;
    let cred = svc.server_with_key("acme").await;
    let bearer = format!("Bearer {}", cred.api_key);
    let t = now_ms() - 30_000;
    let request = WriteRequest {
        timeseries: vec![
            TimeSeries::named(
                "http_requests_total",
                &[("job", "mcp"), ("code", "200")],
                &[(10.0, t), (12.0, t + 1000), (f64::from_bits(STALE_NAN_BITS), t + 2000)],
            ),
            TimeSeries::named("mcp_active_sessions", &[("job", "mcp")], &[(3.0, t)]),
        ],
    };
    let (status, text) = send(&svc, Some(&bearer), "application/x-protobuf", encode(&request)).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{text}");
    let samples = svc.samples(&cred, "name=http_requests_total").await;
    let got: Vec<(i64, f64)> = samples
        .iter()
        .map(|s| (s["timestamp"].as_i64().unwrap(), s["value"].as_f64().unwrap()))
        .collect();
    assert_eq!(got, vec![(t, 10.0), (t + 1000, 12.0)], "the stale marker is not stored");
    assert_eq!(samples[0]["tags"], serde_json::json!({"code": "200", "job": "mcp"}));
    svc.admin(Method::POST, "/api/v1/admin/aggregate", None).await;
    let answer: serde_json::Value = svc
        .client
        .get(svc.url("/api/v1/servers/acme/metrics?period=1h"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let kinds: Vec<(String, String)> = answer["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_owned(),
                s["kind"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(
        kinds.contains(&("http_requests_total".into(), "counter".into())),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&("mcp_active_sessions".into(), "gauge".into())),
        "{kinds:?}"
    );
    svc.stop().await;
}

#[tokio::test]
async fn invalid_data_is_400_so_prometheus_does_not_retry_it() {
    let svc = TestService::start().await;
    let cred = svc.server_with_key("acme").await;
    let bearer = format!("Bearer {}", cred.api_key);
    let t = now_ms() - 1000;
    // One bad sample (an infinity) among good ones: the rest is stored.
    let request = WriteRequest {
        timeseries: vec![TimeSeries::named("g", &[], &[(f64::INFINITY, t), (1.0, t + 1)])],
    };
    let (status, text) = send(&svc, Some(&bearer), "application/x-protobuf", encode(&request)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    assert!(text.contains("1 samples stored, 1 refused"), "{text}");
    assert_eq!(svc.samples(&cred, "").await.len(), 1);
    // A NaN (a summary's quantile before any observation) is "no value": dropped like a
    // stale marker, and the request is a success.
    let nan = WriteRequest {
        timeseries: vec![TimeSeries::named(
            "q",
            &[("quantile", "0.5")],
            &[(f64::NAN, t), (2.0, t + 1)],
        )],
    };
    let (status, text) = send(&svc, Some(&bearer), "application/x-protobuf", encode(&nan)).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{text}");
    assert_eq!(svc.sample_values(&cred, "name=q").await, vec![2.0]);
    // Not snappy, and snappy around garbage.
    assert_eq!(
        send(&svc, Some(&bearer), "application/x-protobuf", b"plain".to_vec())
            .await
            .0,
        StatusCode::BAD_REQUEST
    );
    let garbage = snap::raw::Encoder::new().compress_vec(&[0x0a, 0xff, 0xff]).unwrap();
    assert_eq!(
        send(&svc, Some(&bearer), "application/x-protobuf", garbage).await.0,
        StatusCode::BAD_REQUEST
    );
    // A series that repeats a label name is refused (as Prometheus' own receiver skips
    // it); the request's other series are stored, and the 400 names it.
    let repeated = WriteRequest {
        timeseries: vec![
            TimeSeries::named("fine", &[], &[(1.0, t)]),
            TimeSeries::named("twice", &[("job", "a"), ("job", "b")], &[(1.0, t), (2.0, t + 1)]),
        ],
    };
    let (status, text) = send(&svc, Some(&bearer), "application/x-protobuf", encode(&repeated)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    let problem: serde_json::Value = serde_json::from_str(&text).unwrap();
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.starts_with("1 samples stored, 2 refused"), "{detail}");
    assert!(detail.contains("repeats the label name \"job\""), "{detail}");
    assert_eq!(svc.samples(&cred, "name=fine").await.len(), 1);
    assert_eq!(svc.samples(&cred, "name=twice").await.len(), 0);
    assert_eq!(
        send(&svc, Some(&bearer), "application/json", encode(&request)).await.0,
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
    // Auth.
    assert_eq!(
        send(&svc, None, "application/x-protobuf", encode(&request)).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        send(&svc, Some("Bearer nope"), "application/x-protobuf", encode(&request))
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    // A body that decompresses beyond 20 MiB.
    let huge = WriteRequest {
        timeseries: vec![TimeSeries::named("x", &[("pad", &"p".repeat(21 << 20))], &[(1.0, t)])],
    };
    assert_eq!(
        send(&svc, Some(&bearer), "application/x-protobuf", encode(&huge))
            .await
            .0,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    // The good sample beside the infinity, the one beside the NaN and the series beside
    // the repeated label; nothing more.
    assert_eq!(svc.samples(&cred, "").await.len(), 3);
    svc.stop().await;
}
