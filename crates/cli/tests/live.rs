//! Live updates over SSE and WebSocket: a new sample reaches an open stream within
//! seconds; unknown servers and the stream limit are refused.

mod common;

use std::time::{Duration, Instant};

use common::{TestService, batch};
use futures_util::StreamExt;
use mcp_metrics_core::time::now_ms;
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn push_latency(svc: &TestService, cred: &common::Credential) {
    let body = batch(
        &cred.server_id,
        json!([{"name":"response_time","type":"histogram","value":12,"timestamp":now_ms() - 10}]),
    );
    assert_eq!(svc.push(cred, &body).await.0, StatusCode::OK);
}

/// Reads SSE text until `needle` shows up or the deadline passes.
async fn sse_until<B: AsRef<[u8]>>(
    stream: &mut (impl futures_util::Stream<Item = reqwest::Result<B>> + Unpin),
    needle: &str,
    within: Duration,
) -> String {
    let deadline = Instant::now() + within;
    let mut text = String::new();
    while Instant::now() < deadline {
        match tokio::time::timeout(deadline - Instant::now(), stream.next()).await {
            Ok(Some(Ok(chunk))) => {
                text.push_str(&String::from_utf8_lossy(chunk.as_ref()));
                if text.contains(needle) {
                    return text;
                }
            }
            _ => break,
        }
    }
    panic!("{needle:?} not received within {within:?}; got {text:?}");
}

/// Opens the SSE stream of `server`, as a client a proxy forwarded when `forwarded_for`
/// is given.
async fn open_live(svc: &TestService, server: &str, forwarded_for: Option<&str>) -> reqwest::Response {
    let mut request = svc.client.get(svc.url(&format!("/api/v1/servers/{server}/live")));
    if let Some(client) = forwarded_for {
        request = request.header("x-forwarded-for", client);
    }
    request.send().await.unwrap()
}

/// Whether a new stream is accepted within 2.5 s: a closed one frees its slot once the
/// service notices the disconnect.
async fn accepted_soon(svc: &TestService, server: &str, forwarded_for: Option<&str>) -> bool {
    for _ in 0..50 {
        if open_live(svc, server, forwarded_for).await.status() == StatusCode::OK {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn a_new_sample_reaches_an_open_sse_stream_within_seconds() {
    let svc = TestService::start_with(|c| c.rollup.interval_secs = 0.2).await;
    let cred = svc.server_with_key("acme").await;
    let response = open_live(&svc, "acme", None).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response
            .headers()
            .get("content-type")
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut stream = response.bytes_stream();
    sse_until(&mut stream, "event: ready", Duration::from_secs(2)).await;
    let sent = Instant::now();
    push_latency(&svc, &cred).await;
    let text = sse_until(&mut stream, "event: metric", Duration::from_secs(3)).await;
    assert!(text.contains("response_time"), "{text}");
    assert!(
        sent.elapsed() < Duration::from_secs(2),
        "update took {:?}",
        sent.elapsed()
    );
    // Author events are announced too.
    let event = json!({"server_id":"acme","kind":"release","title":"v2"}).to_string();
    let r = svc.post_event(&cred, &event).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let text = sse_until(&mut stream, "event: event", Duration::from_secs(2)).await;
    assert!(text.contains("\"title\":\"v2\""), "{text}");
    // A page view is announced once it is stored.
    let r = svc
        .client
        .post(svc.url("/api/v1/usage"))
        .header("content-type", "text/plain")
        .header(
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0",
        )
        .body(json!({"server_id":"acme","event":"view"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let text = sse_until(&mut stream, "event: usage", Duration::from_secs(2)).await;
    assert!(text.contains("\"events\":1"), "{text}");
    svc.stop().await;
}

#[tokio::test]
async fn websocket_carries_the_same_messages() {
    let svc = TestService::start_with(|c| c.rollup.interval_secs = 0.2).await;
    let cred = svc.server_with_key("acme").await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/api/v1/servers/acme/ws", svc.addr))
        .await
        .unwrap();
    let next_json = |msg: tokio_tungstenite::tungstenite::Message| -> Value {
        serde_json::from_str(msg.to_text().unwrap()).unwrap()
    };
    let first = tokio::time::timeout(Duration::from_secs(2), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(next_json(first)["type"], "ready");
    push_latency(&svc, &cred).await;
    let message = tokio::time::timeout(Duration::from_secs(3), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let message = next_json(message);
    assert_eq!(message["type"], "metric");
    assert_eq!(message["data"]["names"], json!(["response_time"]));
    ws.close(None).await.unwrap();
    svc.stop().await;
}

#[tokio::test]
async fn unknown_servers_and_the_stream_limit_are_refused() {
    let svc = TestService::start_with(|c| c.live.max_streams = 1).await;
    svc.create_server("acme").await;
    assert_eq!(open_live(&svc, "nope", None).await.status(), StatusCode::NOT_FOUND);
    let held = open_live(&svc, "acme", None).await;
    assert_eq!(held.status(), StatusCode::OK);
    let refused = open_live(&svc, "acme", None).await;
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    drop(held);
    let ok = accepted_soon(&svc, "acme", None).await;
    assert!(ok, "a closed stream frees its slot");
    let _ = svc.client.get(svc.url("/api/v1/servers/acme/ws")).send().await;
    svc.stop().await;
}

#[tokio::test]
async fn one_network_cannot_hold_every_stream() {
    let svc = TestService::start_with(|c| {
        c.live.max_streams_per_client = 2;
        c.trusted_proxies = vec!["127.0.0.1/32".into()];
    })
    .await;
    svc.create_server("acme").await;
    let open = |client: &'static str| open_live(&svc, "acme", Some(client));
    // Two visitors of one /24 take its two streams; a third from it is refused.
    let a = open("203.0.113.7").await;
    let b = open("203.0.113.8").await;
    assert_eq!((a.status(), b.status()), (StatusCode::OK, StatusCode::OK));
    let refused = open("203.0.113.9").await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.headers()["retry-after"], "5");
    let problem: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(problem["code"], "rate_limited");
    // Another network is not affected, and a closed stream gives its slot back.
    assert_eq!(open("198.51.100.1").await.status(), StatusCode::OK);
    drop(a);
    let ok = accepted_soon(&svc, "acme", Some("203.0.113.9")).await;
    assert!(ok, "a closed stream frees its network's slot");
    drop(b);
    svc.stop().await;
}

#[tokio::test]
async fn deleting_a_server_ends_its_open_streams() {
    let svc = TestService::start().await;
    svc.create_server("acme").await;
    let mut stream = open_live(&svc, "acme", None).await.bytes_stream();
    sse_until(&mut stream, "event: ready", Duration::from_secs(2)).await;
    let (status, _) = svc
        .admin(reqwest::Method::DELETE, "/api/v1/admin/servers/acme", None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    // The stream ends (keep-alive comments aside) instead of staying open forever.
    let ended = tokio::time::timeout(Duration::from_secs(3), async {
        while let Some(chunk) = stream.next().await {
            if chunk.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the stream of a deleted server stayed open");
    assert_eq!(open_live(&svc, "acme", None).await.status(), StatusCode::NOT_FOUND);
    svc.stop().await;
}
