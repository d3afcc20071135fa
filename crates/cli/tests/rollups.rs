//! Rollups and the public metrics API over real HTTP: numbers against a hand-computed
//! dataset, late data, idempotence, retention, caching with ETag, compare, summaries.

mod common;

use common::{ADMIN_TOKEN, TestService, batch};
use mcp_metrics_core::time::now_ms;
use mcp_metrics_store::sqlite::run_codec::{self, RunSample};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const MIN: i64 = 60_000;

async fn aggregate(svc: &TestService, body: Option<Value>) -> Value {
    let (status, answer) = svc.admin(Method::POST, "/api/v1/admin/aggregate", body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    answer
}

async fn fetch(svc: &TestService, server: &str, period: &str) -> Value {
    let r = svc
        .client
        .get(svc.url(&format!("/api/v1/servers/{server}/metrics?period={period}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    r.json().await.unwrap()
}

fn series<'a>(answer: &'a Value, name: &str) -> &'a Value {
    answer["series"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {answer}"))
}

/// Index of the point containing `ts` in an answer.
fn index_of(answer: &Value, name: &str, ts: i64) -> usize {
    let t = series(answer, name)["points"]["t"].as_array().unwrap();
    let step = t[1].as_i64().unwrap() - t[0].as_i64().unwrap();
    t.iter()
        .position(|x| {
            let x = x.as_i64().unwrap();
            x <= ts && ts < x + step
        })
        .unwrap()
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * b.abs() + 1e-9
}

#[tokio::test]
async fn fetch_matches_a_hand_computed_dataset() {
    let svc = TestService::start().await;
    let cred = svc.server_with_key("acme").await;
    let m = (now_ms() / MIN - 10) * MIN; // a whole minute, ten minutes ago
    // Latency 1..=100 ms in one minute: count 100, avg 50.5, p50 ≈ 50, p99 ≈ 99.
    let mut metrics: Vec<Value> = (1..=100)
        .map(|i| json!({"name":"response_time","type":"histogram","value":i,"timestamp":m + i * 100,"tags":{"tool":"search"}}))
        .collect();
    // Requests counter 100 → 130 → restart 4 → 10 in minute m; 20 in minute m+1.
    for (ts, v) in [
        (m, 100),
        (m + 1000, 130),
        (m + 2000, 4),
        (m + 3000, 10),
        (m + MIN + 5000, 20),
    ] {
        metrics.push(json!({"name":"requests","type":"counter","value":v,"timestamp":ts}));
    }
    for (ts, v) in [(m, 1), (m + MIN + 5000, 4)] {
        metrics.push(json!({"name":"errors","type":"counter","value":v,"timestamp":ts}));
    }
    for (ts, v) in [(m + 10, 3.0), (m + 20, 9.0), (m + 30, 6.0)] {
        metrics.push(json!({"name":"active_sessions","value":v,"timestamp":ts}));
    }
    let (status, _, answer) = svc.push(&cred, &batch("acme", Value::Array(metrics))).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let report = aggregate(&svc, None).await;
    assert!(report["rollups"]["minutes"].as_u64().unwrap() >= 5, "{report}");
    assert_eq!(report["rollups"]["samples_folded"], 110);

    let answer = fetch(&svc, "acme", "1h").await;
    assert_eq!(
        (answer["period"].as_str(), answer["resolution"].as_str()),
        (Some("1h"), Some("1m"))
    );
    let i = index_of(&answer, "response_time", m);
    let rt = &series(&answer, "response_time")["points"];
    assert_eq!(series(&answer, "response_time")["unit"], "ms");
    assert_eq!(series(&answer, "response_time")["tags"], json!({"tool":"search"}));
    assert_eq!(rt["t"].as_array().unwrap().len(), 60);
    assert_eq!(rt["count"][i], 100.0);
    assert_eq!(rt["avg"][i], 50.5);
    assert_eq!((rt["min"][i].as_f64(), rt["max"][i].as_f64()), (Some(1.0), Some(100.0)));
    assert!(close(rt["p50"][i].as_f64().unwrap(), 50.0, 0.01), "{}", rt["p50"][i]);
    assert!(close(rt["p95"][i].as_f64().unwrap(), 95.0, 0.01));
    assert!(close(rt["p99"][i].as_f64().unwrap(), 99.0, 0.01));
    assert!(rt["count"][i + 1].is_null(), "an empty minute is a gap");

    let req = &series(&answer, "requests")["points"];
    // Minute m: 100→130 (+30), restart to 4 (+4), →10 (+6) = 40; minute m+1: 10→20 = 10.
    assert_eq!(req["increase"][i], 40.0);
    assert_eq!(req["increase"][i + 1], 10.0);
    assert!(close(req["rate"][i].as_f64().unwrap(), 40.0 / 60.0, 1e-9));
    let sessions = &series(&answer, "active_sessions")["points"];
    assert_eq!(
        (sessions["avg"][i].as_f64(), sessions["min"][i].as_f64()),
        (Some(6.0), Some(3.0))
    );
    assert_eq!(
        (sessions["max"][i].as_f64(), sessions["last"][i].as_f64()),
        (Some(9.0), Some(6.0))
    );

    let summary = &answer["summary"];
    assert!(close(summary["p95"].as_f64().unwrap(), 95.0, 0.01));
    assert_eq!(summary["requests"], 50.0);
    assert_eq!(summary["errors"], 3.0);
    assert!(close(summary["error_rate"].as_f64().unwrap(), 3.0 / 50.0, 1e-9));

    // 24h at 5-minute resolution merges the minutes: same totals.
    let day = fetch(&svc, "acme", "24h").await;
    assert_eq!(day["resolution"], "5m");
    let j = index_of(&day, "response_time", m);
    assert_eq!(series(&day, "response_time")["points"]["count"][j], 100.0);
    assert_eq!(day["summary"]["requests"], 50.0);

    // The alias answers the same document.
    let alias: Value = svc
        .client
        .get(svc.url("/functions/v1/metrics-fetch?server_id=acme&period=1h"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(alias["series"], answer["series"]);
    // Bad periods and unknown servers.
    let r = svc
        .client
        .get(svc.url("/api/v1/servers/acme/metrics?period=2h"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = svc
        .client
        .get(svc.url("/api/v1/servers/nope/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    svc.stop().await;
}

#[tokio::test]
async fn late_sample_corrects_minute_hour_and_day_and_reaggregation_is_idempotent() {
    let svc = TestService::start().await;
    let cred = svc.server_with_key("acme").await;
    let m = (now_ms() / MIN - 3) * MIN;
    let push = |value: f64, ts: i64| {
        batch(
            "acme",
            json!([{"name":"response_time","type":"histogram","value":value,"timestamp":ts}]),
        )
    };
    assert_eq!(svc.push(&cred, &push(10.0, m + 1)).await.0, StatusCode::OK);
    aggregate(&svc, None).await;
    let counts = |a: &Value| {
        let i = index_of(a, "response_time", m);
        (
            series(a, "response_time")["points"]["count"][i].as_f64(),
            series(a, "response_time")["points"]["max"][i].as_f64(),
        )
    };
    for period in ["1h", "7d", "90d"] {
        assert_eq!(
            counts(&fetch(&svc, "acme", period).await),
            (Some(1.0), Some(10.0)),
            "{period}"
        );
    }
    // A late sample in the same minute (the job keeps running in the background too).
    assert_eq!(svc.push(&cred, &push(500.0, m + 2)).await.0, StatusCode::OK);
    aggregate(&svc, None).await;
    for period in ["1h", "7d", "90d"] {
        assert_eq!(
            counts(&fetch(&svc, "acme", period).await),
            (Some(2.0), Some(500.0)),
            "{period} after the late sample"
        );
    }
    // Recomputing a range again changes nothing.
    let tables = || async {
        let mut out = Vec::new();
        for t in ["rollups_1m", "rollups_1h", "server_metrics_daily"] {
            let sql = if svc.is_postgres() {
                format!(
                    "SELECT count(*) || '|' || coalesce(sum(sum), 0) || '|' || coalesce(sum(count), 0) || '|' || \
                     coalesce(string_agg(encode(sketch, 'hex'), ',' ORDER BY series_id, bucket), '') FROM {t}"
                )
            } else {
                format!(
                    "SELECT count(*) || '|' || total(sum) || '|' || total(count) || '|' || \
                     coalesce(group_concat(hex(sketch)), '') FROM (SELECT * FROM {t} ORDER BY series_id, bucket)"
                )
            };
            out.extend(svc.sql_strings(&sql).await);
        }
        out
    };
    let before = tables().await;
    let first = aggregate(&svc, Some(json!({"from": m - 60 * MIN, "to": now_ms()}))).await;
    assert!(first["marked_minutes"].as_u64().unwrap() >= 1, "{first}");
    assert_eq!(tables().await, before);
    aggregate(
        &svc,
        Some(json!({"from": mcp_metrics_core::time::format_rfc3339_ms(m), "to": now_ms()})),
    )
    .await;
    assert_eq!(tables().await, before);
    svc.stop().await;
}

#[tokio::test]
async fn retention_deletes_exactly_what_is_older_than_each_limit() {
    let svc = TestService::start_with(|c| {
        c.retention.raw_days = 2;
        c.retention.minute_days = 2;
        c.retention.hour_days = 3;
        c.retention.day_days = Some(4);
        // The job applies retention on its first tick, then not for an hour: the rows
        // below are deleted by the aggregate call alone.
        c.rollup.retention_interval_secs = 3600;
        c.rollup.interval_secs = 0.1;
    })
    .await;
    let cred = svc.server_with_key("acme").await;
    // Wait for the second tick: the first one's retention has then finished and cannot
    // race with the inserts below.
    let passes = |text: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix("mcp_metrics_rollup_pass_duration_seconds_count "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    for _ in 0..300 {
        if passes(&svc.metrics_text().await) >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(
        svc.push(&cred, &batch("acme", json!([{"name":"g","value":1}]))).await.0,
        StatusCode::OK
    );
    let day = 86_400_000i64;
    let now = now_ms();
    // Rows just outside and just inside each limit, written directly.
    let id = svc.sql_i64("SELECT id FROM series").await;
    if svc.is_postgres() {
        // Raw samples live in daily partitions, made ahead of time only for recent days.
        for age in [2 * day + 60_000, 2 * day - 60_000] {
            let d = (now - age).div_euclid(day);
            svc.sql_execute(&format!(
                "CREATE TABLE IF NOT EXISTS server_metrics_t{d} PARTITION OF server_metrics \
                 FOR VALUES FROM ({}) TO ({})",
                d * day,
                (d + 1) * day
            ))
            .await;
        }
    }
    for (age, tag) in [(2 * day + 60_000, 1), (2 * day - 60_000, 2)] {
        let ts = now - age;
        if svc.is_postgres() {
            svc.sql_execute(&format!(
                "INSERT INTO server_metrics (ts, series_id, seq, value) VALUES ({ts}, {id}, 0, {})",
                tag * 2
            ))
            .await;
        } else {
            // SQLite keeps raw samples as runs: one run of one sample.
            let minute = ts - ts.rem_euclid(60_000);
            let sample = RunSample {
                ts,
                series_id: id,
                observation: false,
                value: (tag * 2) as f64,
            };
            let mut run = Vec::new();
            run_codec::encode(minute, [sample], &mut run);
            let hex: String = run.iter().map(|b| format!("{b:02x}")).collect();
            svc.sql_execute(&format!(
                "INSERT INTO sample_runs (minute, server_id, samples) VALUES ({minute}, 'acme', X'{hex}')"
            ))
            .await;
        }
    }
    for (table, limit) in [("rollups_1m", 2), ("rollups_1h", 3), ("server_metrics_daily", 4)] {
        for age in [limit * day + 60_000, limit * day - 60_000] {
            svc.sql_execute(&format!(
                "INSERT INTO {table} (series_id, bucket, count, sum, min, max, first, first_ts, last, last_ts, increase) \
                 VALUES ({id}, {}, 1, 1, 1, 1, 1, 0, 1, 0, 0)",
                now - age
            ))
            .await;
        }
    }
    let report = aggregate(&svc, None).await;
    assert_eq!(
        report["retention_deleted"],
        json!({"raw": 1, "minute": 1, "hour": 1, "day": 1}),
        "{report}"
    );
    let oldest_raw = if svc.is_postgres() {
        "SELECT min(ts) FROM server_metrics"
    } else {
        "SELECT min(minute) FROM sample_runs"
    };
    assert!(now - svc.sql_i64(oldest_raw).await < 2 * day);
    assert!(now - svc.sql_i64("SELECT min(bucket) FROM rollups_1m").await < 2 * day);
    assert!(now - svc.sql_i64("SELECT min(bucket) FROM rollups_1h").await < 3 * day);
    assert!(now - svc.sql_i64("SELECT min(bucket) FROM server_metrics_daily").await < 4 * day);
    svc.stop().await;
}

#[tokio::test]
async fn etag_304_and_new_samples_visible_within_seconds() {
    let svc = TestService::start_with(|c| c.rollup.interval_secs = 0.2).await;
    let cred = svc.server_with_key("acme").await;
    let push = |v: i64| {
        batch(
            "acme",
            json!([{"name":"response_time","type":"histogram","value":v,"timestamp":now_ms() - 50}]),
        )
    };
    assert_eq!(svc.push(&cred, &push(42)).await.0, StatusCode::OK);
    let url = svc.url("/api/v1/servers/acme/metrics?period=1h");
    // Observations in the whole window, so a minute boundary between push and read
    // cannot hide one.
    let count_now = |a: &Value| -> f64 {
        a["series"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| s["points"]["count"].as_array().unwrap())
            .filter_map(Value::as_f64)
            .sum()
    };
    // The job picks the sample up on its own.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let (etag, first) = loop {
        let r = svc.client.get(&url).send().await.unwrap();
        let etag = r.headers().get("etag").unwrap().to_str().unwrap().to_owned();
        assert_eq!(r.headers().get("cache-control").unwrap(), "public, max-age=5");
        let body: Value = r.json().await.unwrap();
        if count_now(&body) >= 1.0 {
            break (etag, body);
        }
        assert!(std::time::Instant::now() < deadline, "sample not visible within 5 s");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let r = svc
        .client
        .get(&url)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(r.headers().get("etag").unwrap().to_str().unwrap(), etag);
    // A new sample refreshes the cached answer within seconds: no stale cache.
    assert_eq!(svc.push(&cred, &push(43)).await.0, StatusCode::OK);
    let before = count_now(&first);
    loop {
        let r = svc
            .client
            .get(&url)
            .header("if-none-match", &etag)
            .send()
            .await
            .unwrap();
        if r.status() == StatusCode::OK {
            assert_ne!(r.headers().get("etag").unwrap().to_str().unwrap(), etag);
            let body: Value = r.json().await.unwrap();
            if count_now(&body) > before {
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline + std::time::Duration::from_secs(5),
            "new sample not visible"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let text = svc.metrics_text().await;
    assert!(text.contains("mcp_metrics_cache_requests_total{result=\"hit\"}"));
    assert!(text.contains("mcp_metrics_rollup_samples_folded_total"));
    svc.stop().await;
}

#[tokio::test]
async fn compare_summaries_and_aggregate_auth() {
    let svc = TestService::start().await;
    let a = svc.server_with_key("alpha").await;
    let b = svc.server_with_key("beta").await;
    let m = (now_ms() / MIN - 5) * MIN;
    for (cred, base) in [(&a, 10), (&b, 100)] {
        let metrics: Vec<Value> = (0..20)
            .map(|i| json!({"name":"response_time","type":"histogram","value":base + i,"timestamp":m + i,"tags":{"tool": if i % 2 == 0 { "x" } else { "y" }}}))
            .collect();
        assert_eq!(
            svc.push(cred, &batch(&cred.server_id, Value::Array(metrics))).await.0,
            StatusCode::OK
        );
    }
    // Aggregation is an operator action.
    let r = svc
        .client
        .post(svc.url("/api/v1/admin/aggregate"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = svc
        .client
        .post(svc.url("/functions/v1/metrics-aggregate"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    let r = svc
        .client
        .get(svc.url("/api/v1/compare?servers=alpha,beta&metric=response_time&stat=max&period=1h"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let cmp: Value = r.json().await.unwrap();
    let t: Vec<i64> = cmp["t"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    let i = t.iter().position(|&x| x <= m && m < x + MIN).unwrap();
    // Both tag sets of each server are combined.
    assert_eq!(cmp["servers"][0]["id"], "alpha");
    assert_eq!(cmp["servers"][0]["values"][i], 29.0);
    assert_eq!(cmp["servers"][1]["values"][i], 119.0);
    let r = svc
        .client
        .get(svc.url("/api/v1/compare?servers=alpha&metric=response_time&stat=increase"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = svc
        .client
        .get(svc.url("/api/v1/compare?servers=alpha,nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    // Summaries: p95 over 24 h, and sort by latency.
    let list: Value = svc
        .client
        .get(svc.url("/api/v1/servers?sort=latency"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = list["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["alpha", "beta"]);
    let p95 = list["servers"][1]["summary"]["p95_24h"].as_f64().unwrap();
    assert!(close(p95, 118.0, 0.01), "{p95}");
    let detail: Value = svc
        .client
        .get(svc.url("/api/v1/servers/alpha"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(close(detail["summary"]["p95_24h"].as_f64().unwrap(), 28.0, 0.01));
    svc.stop().await;
}
