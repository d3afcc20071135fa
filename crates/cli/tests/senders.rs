//! Real senders against the running service on loopback: the OpenTelemetry Python SDK
//! (OTLP/HTTP protobuf, gzip), Prometheus (remote_write while scraping its own metrics)
//! and curl (line protocol with each precision).
//!
//! `.ci/run` installs them: Debian's `prometheus` package and a virtualenv with PyPI's
//! `opentelemetry-sdk` and `opentelemetry-exporter-otlp-proto-http` in
//! `target/otel-venv` (or `OTEL_PYTHON`). Without them a test is skipped, except when
//! `CI` is set: then it fails, so CI cannot pass without running them.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Credential, TestService};
use mcp_metrics_core::time::now_ms;
use reqwest::StatusCode;
use serde_json::{Value, json};

fn tool_or_skip(path: &Path, what: &str) -> bool {
    if path.exists() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI is set but {} ({what}) is missing: .ci/run installs it",
        path.display()
    );
    eprintln!(
        "skipping: {} ({what}) is not installed; .ci/run installs it",
        path.display()
    );
    false
}

/// Runs a sender off the runtime's thread: the service under test shares the runtime.
async fn run(mut command: Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || command.output().expect("run the sender"))
        .await
        .unwrap()
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Polls raw samples until `done` holds or the deadline passes.
async fn wait_for(
    svc: &TestService,
    cred: &Credential,
    query: &str,
    seconds: u64,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        let samples = svc.samples(cred, query).await;
        if done(&samples) || Instant::now() > deadline {
            return samples;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn opentelemetry_python_sdk_exports_a_histogram_and_a_counter() {
    let python = std::env::var_os("OTEL_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/otel-venv/bin/python3"));
    if !tool_or_skip(
        &python,
        "a Python with opentelemetry-sdk and opentelemetry-exporter-otlp-proto-http",
    ) {
        return;
    }
    let svc = TestService::start().await;
    let cred = svc.server_with_key("weather").await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/senders/otel_export.py");
    let mut command = Command::new(&python);
    command
        .arg(&script)
        .env("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", svc.url("/otlp/v1/metrics"))
        .env(
            "OTEL_EXPORTER_OTLP_METRICS_HEADERS",
            format!("Authorization=Bearer%20{}", cred.api_key),
        )
        .env("OTEL_EXPORTER_OTLP_METRICS_COMPRESSION", "gzip")
        .env("OTEL_SERVICE_NAME", "weather-mcp");
    let output = run(command).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "exporter failed: {stderr}");
    assert!(!stderr.contains("Failed to export"), "{stderr}");

    // Counter: cumulative 3, then 5, tagged with the service and the attribute.
    let calls = svc.samples(&cred, "name=tool_calls").await;
    let values: Vec<f64> = calls.iter().map(|s| s["value"].as_f64().unwrap()).collect();
    // The shutdown exports once more, the same cumulative 5.
    assert_eq!(values[..2], [3.0, 5.0], "{calls:?}");
    assert!(values[2..].iter().all(|v| *v == 5.0), "{calls:?}");
    assert_eq!(
        calls[0]["tags"].as_object().unwrap().len(),
        2,
        "no per-process tags: {calls:?}"
    );
    assert_eq!(calls[0]["tags"]["service"], "weather-mcp");
    assert_eq!(calls[0]["tags"]["tool"], "forecast");
    let metrics: Value = svc
        .client
        .get(svc.url("/api/v1/servers/weather/metrics?period=1h&name=tool_calls"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(metrics["series"][0]["kind"], "counter", "{metrics}");
    // Histogram (cumulative, seconds): 4 observations, then the increase of 1; their
    // response_time copies in ms add up to exactly the recorded sum.
    let rt = svc.samples(&cred, "name=response_time").await;
    assert_eq!(rt.len(), 5, "{rt:?}");
    let sum: f64 = rt.iter().map(|s| s["value"].as_f64().unwrap()).sum();
    assert!((sum - 2250.0).abs() < 1e-6, "{sum}");
    assert_eq!(rt[0]["tags"], json!({"method": "tools/call", "tool": "forecast"}));
    let own = svc.samples(&cred, "name=mcp.server.operation.duration").await;
    assert_eq!(own.len(), 5);
    let seconds: f64 = own.iter().map(|s| s["value"].as_f64().unwrap()).sum();
    assert!((seconds - 2.25).abs() < 1e-9, "{seconds}");
    svc.stop().await;
}

/// Prometheus scraping its own metrics every second on `port` and remote-writing them
/// with the key, configured as docs/METRICS.md shows (`retry_on_http_429` included).
fn start_prometheus(
    prometheus: &Path,
    svc: &TestService,
    cred: &Credential,
    dir: &Path,
    port: u16,
) -> std::process::Child {
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            r#"global:
  scrape_interval: 1s
scrape_configs:
  - job_name: self
    static_configs:
      - targets: ["127.0.0.1:{port}"]
remote_write:
  - url: {url}
    authorization:
      credentials: {key}
    queue_config:
      retry_on_http_429: true
      batch_send_deadline: 1s
"#,
            url = svc.url("/api/v1/prom/write"),
            key = cred.api_key,
        ),
    )
    .unwrap();
    Command::new(prometheus)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start prometheus")
}

/// The sum of a Prometheus counter over its labels, read from its own `/metrics`; `None`
/// while Prometheus does not answer or does not have the counter yet, so a misspelt name
/// or an unreachable Prometheus never reads as 0.
async fn prometheus_counter(client: &reqwest::Client, port: u16, name: &str) -> Option<f64> {
    let response = client
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .ok()?;
    let text = response.text().await.ok()?;
    let values: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// [`prometheus_counter`] once Prometheus has sent at least `samples` samples to the
/// service (its batches answered, so their failures are counted), within 20 s.
async fn counter_after_sending(client: &reqwest::Client, port: u16, samples: f64, name: &str) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let sent = prometheus_counter(client, port, "prometheus_remote_storage_samples_total").await;
        if sent.is_some_and(|n| n >= samples) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    prometheus_counter(client, port, name)
        .await
        .unwrap_or_else(|| panic!("Prometheus has no {name}"))
}

#[tokio::test]
async fn prometheus_waits_and_resends_what_the_write_allowance_refused() {
    let prometheus = PathBuf::from(std::env::var("PROMETHEUS").unwrap_or_else(|_| "/usr/bin/prometheus".into()));
    if !tool_or_skip(&prometheus, "Debian's prometheus package") {
        return;
    }
    // Prometheus' own metrics are several hundred samples a scrape: past 100 a second.
    // A burst holds a whole request (the service refuses a smaller one), and Prometheus
    // sends at most 2,000 samples a request by default.
    let svc = TestService::start_with(|c| {
        c.ingest.samples_per_second_per_server = 100;
        c.ingest.burst_samples_per_server = 2_000;
        c.ingest.max_samples_per_request = 2_000;
    })
    .await;
    let cred = svc.server_with_key("prom").await;
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let mut child = start_prometheus(&prometheus, &svc, &cred, dir.path(), port);
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut refused, mut retried) = (0.0, 0.0);
    while Instant::now() < deadline && (refused < 1.0 || retried < 1.0) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        refused = svc
            .metric("mcp_metrics_ingest_requests_rejected_total{code=\"rate_limited\"}")
            .await;
        retried = prometheus_counter(&svc.client, port, "prometheus_remote_storage_samples_retried_total")
            .await
            .unwrap_or(0.0);
    }
    let failed = counter_after_sending(&svc.client, port, 0.0, "prometheus_remote_storage_samples_failed_total").await;
    let dropped = counter_after_sending(
        &svc.client,
        port,
        0.0,
        "prometheus_remote_storage_samples_dropped_total",
    )
    .await;
    let _ = child.kill();
    let _ = child.wait();
    assert!(refused >= 1.0, "no write was refused with 429 within 60 s");
    assert!(retried >= 1.0, "Prometheus resent nothing it was refused");
    assert_eq!((failed, dropped), (0.0, 0.0), "Prometheus gave up on samples");
    let up = svc.samples(&cred, "name=up").await;
    assert!(!up.is_empty(), "samples still land");
    svc.stop().await;
}

#[tokio::test]
async fn prometheus_remote_writes_its_own_metrics() {
    let prometheus = PathBuf::from(std::env::var("PROMETHEUS").unwrap_or_else(|_| "/usr/bin/prometheus".into()));
    if !tool_or_skip(&prometheus, "Debian's prometheus package") {
        return;
    }
    let svc = TestService::start().await;
    let cred = svc.server_with_key("prom").await;
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let mut child = start_prometheus(&prometheus, &svc, &cred, dir.path(), port);
    let up = wait_for(&svc, &cred, "name=up", 40, |s| !s.is_empty()).await;
    let requests = wait_for(&svc, &cred, "name=prometheus_http_requests_total", 20, |s| {
        !s.is_empty()
    })
    .await;
    // Nothing Prometheus sends of itself is refused: its summaries' NaN quantiles are
    // "no value", not bad data (they were once answered 400, and Prometheus logged a
    // non-recoverable error every second).
    // Several scrapes' worth sent and answered first, so a refusal would have been counted.
    let failed = counter_after_sending(
        &svc.client,
        port,
        3_000.0,
        "prometheus_remote_storage_samples_failed_total",
    )
    .await;
    let _ = child.kill();
    let _ = child.wait();
    assert!(!up.is_empty(), "no `up` sample arrived from Prometheus within 40 s");
    assert_eq!(up[0]["value"], 1.0);
    assert_eq!(up[0]["tags"]["job"], "self");
    assert_eq!(up[0]["tags"]["instance"], format!("127.0.0.1:{port}"));
    assert!(!requests.is_empty());
    assert!(requests[0]["tags"]["handler"].is_string(), "{:?}", requests[0]);
    assert_eq!(failed, 0.0, "samples Prometheus sent were refused");
    svc.stop().await;
}

#[tokio::test]
async fn curl_sends_line_protocol_with_each_precision() {
    let curl = PathBuf::from("/usr/bin/curl");
    if !tool_or_skip(&curl, "curl") {
        return;
    }
    let svc = TestService::start().await;
    let cred = svc.server_with_key("acme").await;
    let base = now_ms() - 60_000;
    let cases = [
        ("ns", (base + 1) * 1_000_000, base + 1),
        ("us", (base + 2) * 1_000, base + 2),
        ("ms", base + 3, base + 3),
        ("s", base / 1000 + 10, (base / 1000 + 10) * 1000),
    ];
    for (i, (precision, ts, _)) in cases.iter().enumerate() {
        let mut command = Command::new(&curl);
        command
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(svc.url(&format!("/api/v1/write?precision={precision}")))
            .args(["-H", &format!("Authorization: Token {}", cred.api_key)])
            .args(["--data-binary", &format!("curl,via=cli latency={}.25 {ts}", 10 + i)]);
        let output = run(command).await;
        assert_eq!(String::from_utf8_lossy(&output.stdout), "204", "{precision}");
    }
    let samples = svc.samples(&cred, "name=curl_latency").await;
    let got: Vec<(i64, f64)> = samples
        .iter()
        .map(|s| (s["timestamp"].as_i64().unwrap(), s["value"].as_f64().unwrap()))
        .collect();
    let expected: Vec<(i64, f64)> = cases.iter().enumerate().map(|(i, c)| (c.2, 10.25 + i as f64)).collect();
    assert_eq!(got, expected);
    // A bad key is refused the same way.
    let mut command = Command::new(&curl);
    command
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(svc.url("/api/v1/write"))
        .args(["-H", "Authorization: Token nope", "--data-binary", "x v=1"]);
    let output = run(command).await;
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        StatusCode::UNAUTHORIZED.as_str()
    );
    svc.stop().await;
}
