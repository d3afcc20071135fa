//! Embeddable SVG charts and badges over HTTP.

mod common;

use common::{TestService, batch};
use mcp_metrics_core::time::now_ms;
use reqwest::{Method, StatusCode};
use serde_json::json;

async fn svg(svc: &TestService, path: &str) -> (StatusCode, String, String) {
    let r = svc.client.get(svc.url(path)).send().await.unwrap();
    let status = r.status();
    let cache = r
        .headers()
        .get("cache-control")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    if status == StatusCode::OK {
        assert_eq!(r.headers().get("content-type").unwrap(), "image/svg+xml; charset=utf-8");
    }
    (status, cache, r.text().await.unwrap())
}

fn points(text: &str) -> usize {
    let doc = roxmltree::Document::parse(text).expect("well-formed SVG");
    doc.descendants().filter(|n| n.attribute("class") == Some("pt")).count()
}

#[tokio::test]
async fn charts_and_badges_show_the_data() {
    let svc = TestService::start().await;
    let cred = svc.server_with_key("acme").await;
    let m = (now_ms() / 60_000 - 5) * 60_000;
    let mut metrics: Vec<serde_json::Value> = (0..50)
        .map(|i| json!({"name":"response_time","type":"histogram","value":100 + i,"timestamp":m + i}))
        .collect();
    metrics.push(json!({"name":"requests","type":"counter","value":10,"timestamp":m}));
    metrics.push(json!({"name":"requests","type":"counter","value":25,"timestamp":m + 60_000}));
    assert_eq!(
        svc.push(&cred, &batch("acme", serde_json::Value::Array(metrics)))
            .await
            .0,
        StatusCode::OK
    );
    let (status, _) = svc.admin(Method::POST, "/api/v1/admin/aggregate", None).await;
    assert_eq!(status, StatusCode::OK);

    let (status, cache, text) = svg(&svc, "/charts/acme/response_time.svg?period=1h").await;
    assert_eq!((status, cache.as_str()), (StatusCode::OK, "public, max-age=5"));
    assert_eq!(
        points(&text),
        1,
        "one minute with data: one hover target for its three percentiles"
    );
    assert!(text.contains(">p95<") && text.contains(" ms"), "legend and units");
    let (_, _, bars) = svg(&svc, "/charts/acme/requests.svg?period=1h").await;
    assert_eq!(points(&bars), 2, "one bar per minute with counter samples");
    let (_, _, empty) = svg(&svc, "/charts/acme/nothing.svg?period=7d").await;
    assert!(empty.contains("No data for this period"));
    assert_eq!(
        svg(&svc, "/charts/acme/response_time.svg?stat=increase").await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        svg(&svc, "/charts/nope/response_time.svg").await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        svg(&svc, "/charts/acme/response_time.png").await.0,
        StatusCode::NOT_FOUND
    );

    let (status, cache, badge) = svg(&svc, "/badge/acme/latency.svg").await;
    assert_eq!((status, cache.as_str()), (StatusCode::OK, "public, max-age=300"));
    assert!(badge.contains("p95 latency") && badge.contains("ms"), "{badge}");
    roxmltree::Document::parse(&badge).unwrap();
    for kind in ["uptime", "status", "installs"] {
        let (status, _, text) = svg(&svc, &format!("/badge/acme/{kind}.svg")).await;
        assert_eq!(status, StatusCode::OK);
        roxmltree::Document::parse(&text).unwrap();
    }
    assert_eq!(svg(&svc, "/badge/acme/stars.svg").await.0, StatusCode::NOT_FOUND);
    svc.stop().await;
}
