//! The usage beacon and usage reads over real HTTP: de-duplication per visitor and
//! day, salts, bots, forwarded addresses, rate limits, figures, and server events.

mod common;

use std::sync::Arc;

use common::TestService;
use mcp_metrics_core::time::now_ms;
use mcp_metrics_core::usage::DAY_MS;
use mcp_metrics_server::RunOptions;
use mcp_metrics_server::clock::ManualClock;
use reqwest::StatusCode;
use serde_json::{Value, json};

const FIREFOX: &str = "Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0";
const SAFARI: &str = "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_1) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Safari/605.1.15";

async fn beacon(svc: &TestService, server: &str, event: &str, ip: &str, ua: &str) -> StatusCode {
    svc.client
        .post(svc.url("/api/v1/usage"))
        .header("content-type", "text/plain;charset=UTF-8")
        .header("user-agent", ua)
        .header("x-forwarded-for", ip)
        .body(json!({"server_id": server, "event": event}).to_string())
        .send()
        .await
        .unwrap()
        .status()
}

async fn usage(svc: &TestService, server: &str, period: &str) -> Value {
    svc.client
        .get(svc.url(&format!("/api/v1/servers/{server}/usage?period={period}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Waits until the writer has stored `raw_views` views in total.
async fn settle(svc: &TestService, server: &str, raw_events: u64) -> Value {
    for _ in 0..100 {
        let u = usage(svc, server, "30d").await;
        let raw = &u["raw_totals"];
        let total: u64 = ["views", "installs", "tests", "copy_config", "repo_click"]
            .iter()
            .map(|k| raw[k].as_u64().unwrap())
            .sum();
        if total >= raw_events {
            return u;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("usage events were not stored");
}

fn trusted(c: &mut mcp_metrics_server::config::Config) {
    c.trusted_proxies = vec!["127.0.0.1/32".into()];
}

#[tokio::test]
async fn installs_count_once_per_visitor_and_raw_totals_keep_all() {
    let svc = TestService::start_with(trusted).await;
    svc.create_server("acme").await;
    for _ in 0..3 {
        assert_eq!(
            beacon(&svc, "acme", "view", "203.0.113.10", FIREFOX).await,
            StatusCode::ACCEPTED
        );
        assert_eq!(
            beacon(&svc, "acme", "install", "203.0.113.10", FIREFOX).await,
            StatusCode::ACCEPTED
        );
    }
    beacon(&svc, "acme", "test", "203.0.113.10", FIREFOX).await;
    beacon(&svc, "acme", "copy_config", "203.0.113.10", FIREFOX).await;
    beacon(&svc, "acme", "copy_config", "203.0.113.10", FIREFOX).await;
    // A second visitor: another network.
    beacon(&svc, "acme", "view", "198.51.100.20", FIREFOX).await;
    beacon(&svc, "acme", "install", "198.51.100.20", FIREFOX).await;
    // Same /24 but another browser is another visitor too.
    beacon(&svc, "acme", "install", "203.0.113.99", SAFARI).await;
    // Bots and headless browsers get 202 and count nowhere.
    for ua in [
        "Googlebot/2.1 (+http://www.google.com/bot.html)",
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/120.0.0.0 Safari/537.36",
        "curl/8.5.0",
        "",
    ] {
        assert_eq!(
            beacon(&svc, "acme", "view", "192.0.2.1", ua).await,
            StatusCode::ACCEPTED,
            "{ua}"
        );
    }
    let u = settle(&svc, "acme", 12).await;
    assert_eq!(
        u["totals"],
        json!({"views": 4, "visitors": 3, "installs": 3, "tests": 1, "copy_config": 1, "repo_click": 0})
    );
    assert_eq!(
        u["raw_totals"],
        json!({"views": 4, "visitors": 3, "installs": 5, "tests": 1, "copy_config": 2, "repo_click": 0})
    );
    let daily = &u["daily"];
    assert_eq!(daily["t"].as_array().unwrap().len(), 30);
    assert_eq!(daily["t"][29], (now_ms() / DAY_MS) * DAY_MS);
    assert_eq!(
        (
            daily["views"][29].as_u64(),
            daily["installs"][29].as_u64(),
            daily["visitors"][29].as_u64()
        ),
        (Some(4), Some(3), Some(3))
    );
    assert_eq!(daily["views"][28], 0);
    // The server list shows 30-day installs and views and ranks by them.
    svc.create_server("zeta").await;
    beacon(&svc, "zeta", "view", "203.0.113.10", FIREFOX).await;
    settle(&svc, "zeta", 1).await;
    let list: Value = svc
        .client
        .get(svc.url("/api/v1/servers?sort=popular"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["servers"][0]["id"], "acme");
    assert_eq!(list["servers"][0]["summary"]["installs_30d"], 3);
    assert_eq!(list["servers"][0]["summary"]["views_30d"], 4);
    assert_eq!(list["servers"][1]["summary"]["views_30d"], 1);
    svc.stop().await;
}

#[tokio::test]
async fn unique_visitors_per_day_and_salt_rotation_with_48_hour_deletion() {
    let clock = Arc::new(ManualClock::new(now_ms()));
    let svc = TestService::start_full(
        trusted,
        RunOptions {
            clock: Some(clock.clone()),
            ..RunOptions::default()
        },
    )
    .await;
    svc.create_server("acme").await;
    let salts = || async {
        svc.sql_strings("SELECT CAST(day AS TEXT) FROM usage_salts ORDER BY day")
            .await
            .iter()
            .map(|d| d.parse::<i64>().unwrap())
            .collect::<Vec<i64>>()
    };
    let day0 = now_ms() / DAY_MS;
    beacon(&svc, "acme", "view", "203.0.113.10", FIREFOX).await;
    beacon(&svc, "acme", "view", "203.0.113.10", FIREFOX).await;
    beacon(&svc, "acme", "install", "203.0.113.10", FIREFOX).await;
    let u = settle(&svc, "acme", 3).await;
    assert_eq!(
        (u["totals"]["visitors"].as_u64(), u["totals"]["installs"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(salts().await, vec![day0]);

    clock.advance(DAY_MS);
    beacon(&svc, "acme", "view", "203.0.113.10", FIREFOX).await;
    beacon(&svc, "acme", "install", "203.0.113.10", FIREFOX).await;
    let u = settle(&svc, "acme", 5).await;
    // One visitor on two days: a unique each day, and a new install each day.
    assert_eq!(
        (u["totals"]["visitors"].as_u64(), u["totals"]["installs"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(
        (u["daily"]["visitors"][28].as_u64(), u["daily"]["visitors"][29].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(
        salts().await,
        vec![day0, day0 + 1],
        "the previous day's salt stays usable"
    );

    clock.advance(DAY_MS);
    beacon(&svc, "acme", "view", "203.0.113.10", FIREFOX).await;
    settle(&svc, "acme", 6).await;
    assert_eq!(
        salts().await,
        vec![day0 + 1, day0 + 2],
        "salts older than 48 hours are deleted"
    );
    let old = svc
        .sql_i64(&format!("SELECT count(*) FROM usage_visitors WHERE day = {day0}"))
        .await;
    assert_eq!(old, 0, "visitor records go with their salt");
    svc.stop().await;
}

#[tokio::test]
async fn forwarded_for_is_believed_only_from_trusted_proxies() {
    for (trust, expected_visitors) in [(false, 1), (true, 2)] {
        let svc = TestService::start_with(|c| {
            if trust {
                trusted(c)
            }
        })
        .await;
        svc.create_server("acme").await;
        beacon(&svc, "acme", "install", "203.0.113.10", FIREFOX).await;
        beacon(&svc, "acme", "install", "198.51.100.20", FIREFOX).await;
        let u = settle(&svc, "acme", 2).await;
        assert_eq!(u["totals"]["visitors"], expected_visitors, "trusted = {trust}");
        assert_eq!(u["totals"]["installs"], expected_visitors);
        svc.stop().await;
    }
}

#[tokio::test]
async fn rate_limit_answers_429_and_counts_nothing_beyond_it() {
    let svc = TestService::start_with(|c| {
        trusted(c);
        c.usage.burst = 5;
        c.usage.rate_per_minute = 5;
    })
    .await;
    svc.create_server("acme").await;
    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(beacon(&svc, "acme", "view", "203.0.113.10", FIREFOX).await.as_u16());
    }
    assert_eq!(statuses, vec![202, 202, 202, 202, 202, 429, 429, 429]);
    // Another network has its own allowance.
    assert_eq!(
        beacon(&svc, "acme", "view", "198.51.100.1", FIREFOX).await,
        StatusCode::ACCEPTED
    );
    let u = settle(&svc, "acme", 6).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let u2 = usage(&svc, "acme", "30d").await;
    assert_eq!(u2, u);
    assert_eq!(u["raw_totals"]["views"], 6);
    let text = svc.metrics_text().await;
    assert!(
        text.contains("mcp_metrics_usage_events_total{outcome=\"rate_limited\"} 3\n"),
        "{text}"
    );
    assert!(text.contains("mcp_metrics_usage_events_total{outcome=\"queued\"} 6\n"));
    svc.stop().await;
}

#[tokio::test]
async fn beacon_validation_cors_and_usage_periods() {
    let svc = TestService::start_with(|c| c.usage.cors_origins = vec!["https://directory.example".into()]).await;
    svc.create_server("acme").await;
    let post = |body: &'static str, content_type: &'static str| {
        svc.client
            .post(svc.url("/functions/v1/usage-track"))
            .header("content-type", content_type)
            .header("user-agent", FIREFOX)
            .header("origin", "https://directory.example")
            .body(body)
            .send()
    };
    let ok = post(
        r#"{"server_id":"acme","event":"repo_click","client":"cursor"}"#,
        "application/json",
    )
    .await
    .unwrap();
    assert_eq!(ok.status(), StatusCode::ACCEPTED);
    assert_eq!(
        ok.headers().get("access-control-allow-origin").unwrap(),
        "https://directory.example"
    );
    assert_eq!(
        post(r#"{"server_id":"nope","event":"view"}"#, "text/plain")
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        post(r#"{"server_id":"acme","event":"like"}"#, "text/plain")
            .await
            .unwrap()
            .status(),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        post("not json", "text/plain").await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        post(r#"{"server_id":"acme","event":"view"}"#, "application/xml")
            .await
            .unwrap()
            .status(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
    let preflight = svc
        .client
        .request(reqwest::Method::OPTIONS, svc.url("/api/v1/usage"))
        .header("origin", "https://directory.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), StatusCode::NO_CONTENT);
    assert!(
        preflight
            .headers()
            .get("access-control-allow-methods")
            .unwrap()
            .to_str()
            .unwrap()
            .contains("POST")
    );
    let other = svc
        .client
        .request(reqwest::Method::OPTIONS, svc.url("/api/v1/usage"))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
    let u = settle(&svc, "acme", 1).await;
    assert_eq!(u["totals"]["repo_click"], 1);
    for (period, days) in [("7d", 7), ("90d", 90), ("1y", 365)] {
        assert_eq!(
            usage(&svc, "acme", period).await["daily"]["t"]
                .as_array()
                .unwrap()
                .len(),
            days
        );
    }
    let r = svc
        .client
        .get(svc.url("/api/v1/servers/acme/usage?period=2d"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    svc.stop().await;
}

#[tokio::test]
async fn events_are_listed_newest_first_with_paging() {
    let svc = TestService::start().await;
    let cred = svc.server_with_key("acme").await;
    let base = now_ms() - 3_600_000;
    for i in 0..5 {
        let body =
            json!({"server_id":"acme","kind":"deploy","title":format!("v1.{i}"),"at":base + i * 60_000}).to_string();
        let r = svc.post_event(&cred, &body).await;
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    let _ = svc.issue_key("acme").await; // a system event, newest of all
    let mut titles = Vec::new();
    let mut url = svc.url("/api/v1/servers/acme/events?limit=2");
    loop {
        let page: Value = svc.client.get(&url).send().await.unwrap().json().await.unwrap();
        for e in page["events"].as_array().unwrap() {
            titles.push(format!(
                "{}:{}",
                e["source"].as_str().unwrap(),
                e["title"].as_str().unwrap()
            ));
        }
        match page["next"].as_str() {
            Some(next) => url = svc.url(&format!("/api/v1/servers/acme/events?limit=2&before={next}")),
            None => break,
        }
    }
    assert_eq!(titles.len(), 6);
    assert!(titles[0].starts_with("system:New credential"));
    assert_eq!(
        &titles[1..],
        [
            "author:v1.4",
            "author:v1.3",
            "author:v1.2",
            "author:v1.1",
            "author:v1.0"
        ]
    );
    let r = svc
        .client
        .get(svc.url("/api/v1/servers/nope/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    svc.stop().await;
}

#[tokio::test]
async fn a_forwarded_line_added_by_the_proxy_beats_one_sent_by_the_client() {
    let svc = TestService::start_with(trusted).await;
    svc.create_server("acme").await;
    beacon(&svc, "acme", "install", "203.0.113.10", FIREFOX).await;
    // The client claims another address in its own header line; the proxy appends a
    // second line with the real one. The right-most entry is the one believed.
    let r = svc
        .client
        .post(svc.url("/api/v1/usage"))
        .header("content-type", "text/plain")
        .header("user-agent", FIREFOX)
        .header("x-forwarded-for", "198.51.100.20")
        .header("x-forwarded-for", "203.0.113.10")
        .body(json!({"server_id": "acme", "event": "install"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let u = settle(&svc, "acme", 2).await;
    assert_eq!(
        (u["totals"]["visitors"].as_u64(), u["totals"]["installs"].as_u64()),
        (Some(1), Some(1))
    );
    svc.stop().await;
}

/// A beacon is a few dozen bytes: one over 4 KiB is refused with 413 whether it declares
/// its length or streams without one (the same body limit as every POST route), and is
/// not counted.
#[tokio::test]
async fn an_oversized_beacon_is_refused_and_not_counted() {
    let svc = TestService::start_with(trusted).await;
    svc.create_server("acme").await;
    let oversized = json!({"server_id": "acme", "event": "view", "client": "x".repeat(5000)}).to_string();
    let declared = svc
        .client
        .post(svc.url("/api/v1/usage"))
        .header("content-type", "text/plain")
        .header("x-forwarded-for", "203.0.113.10")
        .body(oversized.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(declared.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let problem: Value = declared.json().await.unwrap();
    assert_eq!(problem["code"], "payload_too_large");
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        oversized.into_bytes().chunks(1000).map(|c| Ok(c.to_vec())).collect();
    let streamed = svc
        .client
        .post(svc.url("/functions/v1/usage-track"))
        .header("content-type", "text/plain")
        .header("x-forwarded-for", "203.0.113.11")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        beacon(&svc, "acme", "install", "203.0.113.12", FIREFOX).await,
        StatusCode::ACCEPTED
    );
    let u = settle(&svc, "acme", 1).await;
    assert_eq!(u["raw_totals"]["views"], 0, "no refused beacon was counted");
    assert_eq!(u["raw_totals"]["installs"], 1);
}
