//! `mcp-metrics bench`: the end-to-end load generator. It creates a fresh server and
//! credential through the operator API, builds and signs every request before the clock
//! starts, then sends them over N keep-alive connections and reports samples/s and
//! acknowledgement latency percentiles.
//!
//! Signatures are valid for 300 s, so a run must finish within that; the sample count
//! bounds the run.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use mcp_metrics_core::signature::sign;
use mcp_metrics_core::time::now_ms;
use serde_json::{Value, json};

use crate::cli::BenchArgs;

struct Prepared {
    body: Vec<u8>,
    /// Only signed JSON carries one.
    signature: Option<String>,
    samples: u64,
}

/// The same samples as [`build_body`], as InfluxDB lines (ms precision).
fn build_lines(index: usize, batch: usize, series: usize, base_ms: i64) -> Vec<u8> {
    use std::fmt::Write;
    let mut out = String::with_capacity(batch * 48);
    for j in 0..batch {
        let s = (index * batch + j) % series;
        let ts = base_ms + ((index * batch + j) / series) as i64;
        let value = ((index * 7919 + j * 104_729) % 50_000) as f64 / 100.0;
        let _ = writeln!(out, "response_time,tool=tool_{s} value={value} {ts}");
    }
    out.into_bytes()
}

/// The same samples as a snappy-compressed remote-write request.
fn build_remote_write(index: usize, batch: usize, series: usize, base_ms: i64) -> Vec<u8> {
    use mcp_metrics_core::promwrite::{Label, Sample, TimeSeries, WriteRequest, encode};
    let mut by_series: Vec<Vec<Sample>> = vec![Vec::new(); series];
    for j in 0..batch {
        let s = (index * batch + j) % series;
        let ts = base_ms + ((index * batch + j) / series) as i64;
        by_series[s].push(Sample {
            value: ((index * 7919 + j * 104_729) % 50_000) as f64 / 100.0,
            timestamp: ts,
        });
    }
    let timeseries = by_series
        .into_iter()
        .enumerate()
        .filter(|(_, samples)| !samples.is_empty())
        .map(|(s, samples)| TimeSeries {
            labels: vec![
                Label {
                    name: "__name__".into(),
                    value: "response_time".into(),
                },
                Label {
                    name: "tool".into(),
                    value: format!("tool_{s}"),
                },
            ],
            samples,
        })
        .collect();
    encode(&WriteRequest { timeseries })
}

/// The same samples as an OTLP/HTTP protobuf request: one gauge metric per series.
fn build_otlp(index: usize, batch: usize, series: usize, base_ms: i64) -> Vec<u8> {
    use mcp_metrics_core::otlp::proto::metrics::v1::{Gauge, Metric, NumberDataPoint, metric, number_data_point};
    use prost::Message;
    let mut by_series: Vec<Vec<NumberDataPoint>> = vec![Vec::new(); series];
    for j in 0..batch {
        let s = (index * batch + j) % series;
        let ts = base_ms + ((index * batch + j) / series) as i64;
        by_series[s].push(NumberDataPoint {
            time_unix_nano: ts as u64 * 1_000_000,
            value: Some(number_data_point::Value::AsDouble(
                ((index * 7919 + j * 104_729) % 50_000) as f64 / 100.0,
            )),
            attributes: vec![mcp_metrics_core::otlp::string_attribute("tool", &format!("tool_{s}"))],
            ..Default::default()
        });
    }
    let metrics = by_series
        .into_iter()
        .filter(|points| !points.is_empty())
        .map(|data_points| Metric {
            name: "response_time".into(),
            data: Some(metric::Data::Gauge(Gauge { data_points })),
            ..Default::default()
        })
        .collect();
    mcp_metrics_core::otlp::export_of(Vec::new(), metrics).encode_to_vec()
}

/// Histogram points per `otlp-histogram` request: one per series, or per sample when
/// there are fewer samples.
fn histogram_points(batch: usize, series: usize) -> usize {
    series.min(batch).max(1)
}

/// `batch` samples as OTLP/HTTP delta histogram points of `tool_duration` (ms), one point
/// per series, every observation of a request at the same instant: the server maps each
/// point's bucket counts to that many observations.
fn build_otlp_histograms(index: usize, batch: usize, series: usize, base_ms: i64) -> Vec<u8> {
    use mcp_metrics_core::otlp::proto::metrics::v1::HistogramDataPoint;
    use prost::Message;
    let bounds = vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0];
    let points = histogram_points(batch, series);
    let data_points = (0..points)
        .map(|p| {
            let count = (batch / points + usize::from(p < batch % points)) as u64;
            // Spread over the ten buckets, starting at a bucket that moves with the request.
            let bucket_counts: Vec<u64> = (0..10u64)
                .map(|b| count / 10 + u64::from((b + index as u64) % 10 < count % 10))
                .collect();
            HistogramDataPoint {
                attributes: vec![mcp_metrics_core::otlp::string_attribute("tool", &format!("tool_{p}"))],
                start_time_unix_nano: (base_ms + index as i64) as u64 * 1_000_000,
                time_unix_nano: (base_ms + index as i64 + 1) as u64 * 1_000_000,
                count,
                bucket_counts,
                explicit_bounds: bounds.clone(),
                ..Default::default()
            }
        })
        .collect();
    let metric = mcp_metrics_core::otlp::delta_histogram("tool_duration", "ms", data_points);
    mcp_metrics_core::otlp::export_of(Vec::new(), vec![metric]).encode_to_vec()
}

/// Builds the `index`-th request: `batch` samples over `series` series with distinct
/// timestamps, kinds mixed as a real MCP server reports them.
fn build_body(server_id: &str, index: usize, batch: usize, series: usize, base_ms: i64) -> Vec<u8> {
    use std::fmt::Write;
    let mut out = String::with_capacity(batch * 110 + 64);
    let _ = write!(out, r#"{{"server_id":"{server_id}","metrics":["#);
    for j in 0..batch {
        if j > 0 {
            out.push(',');
        }
        let s = (index * batch + j) % series;
        let ts = base_ms + ((index * batch + j) / series) as i64;
        let (name, kind) = match s % 5 {
            0..=2 => ("response_time", "histogram"),
            3 => ("requests", "counter"),
            _ => ("active_sessions", "gauge"),
        };
        let value = match kind {
            "counter" => (index * batch + j) as f64,
            _ => ((index * 7919 + j * 104_729) % 50_000) as f64 / 100.0,
        };
        let _ = write!(
            out,
            r#"{{"name":"{name}","type":"{kind}","value":{value},"timestamp":{ts},"tags":{{"tool":"tool_{s}"}}}}"#
        );
    }
    out.push_str("]}");
    out.into_bytes()
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    mcp_metrics_server::install_crypto_provider();
    if args.batch == 0 || args.connections == 0 || args.series == 0 {
        bail!("--batch, --connections and --series must be positive");
    }
    let base = args.url.trim_end_matches('/').to_owned();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections)
        .build()?;
    let mode = args.mode;
    // (server id, API key, signing secret, Authorization header) of the target.
    let (server_id, api_key, secret, authorization) = if let Some(foreign) = &args.foreign_url {
        if !matches!(mode, crate::cli::BenchMode::Influx | crate::cli::BenchMode::PromWrite) {
            bail!("--foreign-url works with --mode influx or --mode prom-write");
        }
        tracing::debug!(url = %foreign, "sending to a foreign endpoint");
        (
            "foreign".to_owned(),
            None,
            String::new(),
            args.foreign_authorization.clone(),
        )
    } else {
        let admin_token = args
            .admin_token
            .as_deref()
            .context("--admin-token (or MCP_METRICS_ADMIN_TOKEN) is needed to create the benchmark server")?;
        let admin = format!("Bearer {admin_token}");
        // Random too: load generators started together against one cluster must not collide.
        let server_id = format!("bench-{}-{:04x}", now_ms(), std::process::id() & 0xffff);
        let created = client
            .post(format!("{base}/api/v1/admin/servers"))
            .header("authorization", &admin)
            .json(&json!({"id": server_id, "name": "Load generator"}))
            .send()
            .await
            .with_context(|| format!("cannot reach {base}"))?;
        if !created.status().is_success() {
            bail!(
                "creating the benchmark server failed: {} {}",
                created.status(),
                created.text().await.unwrap_or_default()
            );
        }
        let key: Value = client
            .post(format!("{base}/api/v1/admin/servers/{server_id}/keys"))
            .header("authorization", &admin)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let api_key = key["api_key"].as_str().context("no api_key in the answer")?.to_owned();
        let secret = key["signing_secret"]
            .as_str()
            .context("no signing_secret in the answer")?
            .to_owned();
        (server_id, Some(api_key), secret, None)
    };

    if args.mode == crate::cli::BenchMode::Usage {
        return run_usage(&client, &base, &server_id, &args).await;
    }
    let requests = args.samples.div_ceil(args.batch);
    let base_ms = now_ms() - 3_600_000;
    let t = now_ms() / 1000;
    let progress = ProgressBar::new(requests as u64);
    progress.set_style(
        ProgressStyle::with_template("{msg:12} [{bar:40}] {pos}/{len} requests {elapsed}").expect("valid template"),
    );
    progress.set_message("signing");
    let mut prepared = Vec::with_capacity(requests);
    for i in 0..requests {
        let (body, signature) = match mode {
            crate::cli::BenchMode::Influx => (build_lines(i, args.batch, args.series, base_ms), None),
            crate::cli::BenchMode::PromWrite => (build_remote_write(i, args.batch, args.series, base_ms), None),
            crate::cli::BenchMode::Otlp => (build_otlp(i, args.batch, args.series, base_ms), None),
            crate::cli::BenchMode::OtlpHistogram => (build_otlp_histograms(i, args.batch, args.series, base_ms), None),
            _ => {
                let body = build_body(&server_id, i, args.batch, args.series, base_ms);
                let signature = sign(secret.as_bytes(), t, &body);
                (body, Some(signature))
            }
        };
        prepared.push(Prepared {
            body,
            signature,
            samples: args.batch as u64,
        });
        progress.inc(1);
    }
    let prepared = Arc::new(prepared);
    let bytes: usize = prepared.iter().map(|p| p.body.len()).sum();

    progress.reset();
    progress.set_message("sending");
    let next = Arc::new(AtomicUsize::new(0));
    // What one refused OTLP data point takes with it (each gauge point is one sample; a
    // histogram point batch/points, one more for the first batch % points of them: the
    // answer names only how many points were refused, so each counts the larger share).
    let samples_per_point = match mode {
        crate::cli::BenchMode::OtlpHistogram => args.batch.div_ceil(histogram_points(args.batch, args.series)) as u64,
        _ => 1,
    };
    let (path, content_type) = match mode {
        crate::cli::BenchMode::Influx => ("/api/v1/write?precision=ms", "text/plain; charset=utf-8"),
        crate::cli::BenchMode::PromWrite => ("/api/v1/prom/write", "application/x-protobuf"),
        crate::cli::BenchMode::Otlp | crate::cli::BenchMode::OtlpHistogram => {
            ("/otlp/v1/metrics", "application/x-protobuf")
        }
        _ => ("/api/v1/metrics", "application/json"),
    };
    let url = args.foreign_url.clone().unwrap_or_else(|| format!("{base}{path}"));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.connections {
        let (client, url, api_key, authorization, prepared, next, progress) = (
            client.clone(),
            url.clone(),
            api_key.clone(),
            authorization.clone(),
            prepared.clone(),
            next.clone(),
            progress.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut accepted = 0u64;
            let mut errors = 0u64;
            let mut rate_limited = 0u64;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(p) = prepared.get(i) else { break };
                let sent = Instant::now();
                let mut request = client
                    .post(&url)
                    .header("content-type", content_type)
                    .body(p.body.clone());
                if let Some(key) = &api_key {
                    request = request.header("x-api-key", key);
                }
                if let Some(value) = &authorization {
                    request = request.header("authorization", value);
                }
                if let Some(signature) = &p.signature {
                    request = request.header("x-signature", signature);
                }
                if mode == crate::cli::BenchMode::PromWrite {
                    request = request
                        .header("content-encoding", "snappy")
                        .header("x-prometheus-remote-write-version", "0.1.0");
                }
                match request.send().await {
                    Ok(r) if r.status() == reqwest::StatusCode::NO_CONTENT => {
                        accepted += p.samples;
                        latencies.push(sent.elapsed());
                    }
                    Ok(r)
                        if r.status().is_success()
                            && matches!(mode, crate::cli::BenchMode::Otlp | crate::cli::BenchMode::OtlpHistogram) =>
                    {
                        use prost::Message;
                        let answer = r.bytes().await.unwrap_or_default();
                        let refused = mcp_metrics_core::otlp::ExportMetricsServiceResponse::decode(answer)
                            .ok()
                            .and_then(|a| a.partial_success)
                            .map_or(0, |p| p.rejected_data_points as u64);
                        accepted += p.samples.saturating_sub(refused * samples_per_point);
                        latencies.push(sent.elapsed());
                    }
                    Ok(r) if r.status().is_success() => {
                        let answer: Value = r.json().await.unwrap_or(Value::Null);
                        accepted += answer["accepted"].as_u64().unwrap_or(0);
                        latencies.push(sent.elapsed());
                    }
                    Ok(r) if r.status() == reqwest::StatusCode::TOO_MANY_REQUESTS => {
                        rate_limited += 1;
                        errors += 1;
                    }
                    _ => errors += 1,
                }
                progress.inc(1);
            }
            (latencies, accepted, errors, rate_limited)
        }));
    }
    let mut latencies = Vec::new();
    let (mut accepted, mut errors, mut rate_limited) = (0u64, 0u64, 0u64);
    for worker in workers {
        let (l, a, e, r) = worker.await?;
        latencies.extend(l);
        accepted += a;
        errors += e;
        rate_limited += r;
    }
    let elapsed = started.elapsed();
    progress.finish_and_clear();
    latencies.sort();
    let rate = accepted as f64 / elapsed.as_secs_f64();
    let result = json!({
        "server_id": server_id,
        "requests": requests,
        "samples_per_request": args.batch,
        "connections": args.connections,
        "accepted_samples": accepted,
        "errors": errors,
        "seconds": elapsed.as_secs_f64(),
        "samples_per_second": rate.round(),
        "request_bytes_mean": bytes / requests.max(1),
        "ack_p50_ms": percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        "ack_p99_ms": percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        "ack_max_ms": latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    });
    if args.json {
        println!("{result}");
    } else {
        println!(
            "{} samples in {:.2} s over {} connections, {} per request: {:.0} samples/s, ack p50 {:.1} ms, p99 {:.1} ms, {} errors",
            accepted,
            elapsed.as_secs_f64(),
            args.connections,
            args.batch,
            rate,
            result["ack_p50_ms"].as_f64().unwrap_or(0.0),
            result["ack_p99_ms"].as_f64().unwrap_or(0.0),
            errors
        );
    }
    if rate_limited > 0 {
        bail!(
            "{errors} requests failed, {rate_limited} of them refused by the server's write allowance (429): \
             to measure the pipeline, start the service with a higher [ingest] samples_per_second_per_server \
             and burst_samples_per_server (scripts/lib.sh does), or 0 to turn the limit off"
        );
    }
    if errors > 0 {
        bail!("{errors} requests failed");
    }
    Ok(())
}

/// Sends usage beacons, each from its own simulated visitor and network.
async fn run_usage(client: &reqwest::Client, base: &str, server_id: &str, args: &BenchArgs) -> anyhow::Result<()> {
    let body = json!({"server_id": server_id, "event": "view"}).to_string();
    let next = Arc::new(AtomicUsize::new(0));
    let url = format!("{base}/api/v1/usage");
    let progress = ProgressBar::new(args.events as u64);
    progress.set_style(
        ProgressStyle::with_template("sending [{bar:40}] {pos}/{len} beacons {elapsed}").expect("valid template"),
    );
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.connections {
        let (client, url, body, next, progress, total) = (
            client.clone(),
            url.clone(),
            body.clone(),
            next.clone(),
            progress.clone(),
            args.events,
        );
        workers.push(tokio::spawn(async move {
            let (mut latencies, mut accepted, mut errors) = (Vec::new(), 0u64, 0u64);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                // A distinct /24 per visitor (the rate limit and visitor ids are per network).
                let ip = format!("{}.{}.{}.1", 10 + ((i >> 16) & 127), (i >> 8) & 255, i & 255);
                let sent = Instant::now();
                let r = client
                    .post(&url)
                    .header("content-type", "text/plain")
                    .header(
                        "user-agent",
                        "Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0",
                    )
                    .header("x-forwarded-for", ip)
                    .body(body.clone())
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == reqwest::StatusCode::ACCEPTED => {
                        accepted += 1;
                        latencies.push(sent.elapsed());
                    }
                    _ => errors += 1,
                }
                if i % 256 == 0 {
                    progress.set_position(i as u64);
                }
            }
            (latencies, accepted, errors)
        }));
    }
    let (mut latencies, mut accepted, mut errors) = (Vec::new(), 0u64, 0u64);
    for w in workers {
        let (l, a, e) = w.await?;
        latencies.extend(l);
        accepted += a;
        errors += e;
    }
    let elapsed = started.elapsed();
    progress.finish_and_clear();
    latencies.sort();
    let rate = accepted as f64 / elapsed.as_secs_f64();
    let result = json!({
        "server_id": server_id,
        "events": args.events,
        "connections": args.connections,
        "accepted": accepted,
        "errors": errors,
        "seconds": elapsed.as_secs_f64(),
        "events_per_second": rate.round(),
        "p50_ms": percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        "p99_ms": percentile(&latencies, 0.99).as_secs_f64() * 1e3,
    });
    if args.json {
        println!("{result}");
    } else {
        println!(
            "{accepted} usage beacons in {:.2} s over {} connections: {rate:.0} events/s, p50 {:.2} ms, p99 {:.2} ms, {errors} errors",
            elapsed.as_secs_f64(),
            args.connections,
            result["p50_ms"].as_f64().unwrap_or(0.0),
            result["p99_ms"].as_f64().unwrap_or(0.0),
        );
    }
    if errors > 0 {
        bail!("{errors} beacons failed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_protocol_remote_write_and_otlp_bodies_carry_the_batch() {
        let body = build_lines(3, 50, 7, 1_000);
        let lines = mcp_metrics_core::influx::parse(
            std::str::from_utf8(&body).unwrap(),
            mcp_metrics_core::influx::Precision::Ms,
        );
        assert!(lines.errors.is_empty());
        assert_eq!(lines.points.len(), 50);
        let raw = mcp_metrics_core::promwrite::decompress(&build_remote_write(3, 50, 7, 1_000), 1 << 20).unwrap();
        let decoded = mcp_metrics_core::promwrite::decode(&raw).unwrap();
        let series: Vec<_> = decoded.series().collect();
        assert_eq!(
            (
                series.iter().map(|s| s.samples.len()).sum::<usize>(),
                decoded.nan_dropped
            ),
            (50, 0)
        );
        assert!(
            series
                .iter()
                .all(|s| s.name == "response_time" && s.tags[0].0 == "tool")
        );
        let request = mcp_metrics_core::otlp::decode_protobuf(&build_otlp(3, 50, 7, 1_000)).unwrap();
        let mapped = mcp_metrics_core::otlp::map_request(&request);
        assert!(mapped.refused.is_empty());
        assert_eq!(mapped.points.len(), 50);
        assert!(
            mapped
                .points
                .iter()
                .all(|p| p.name.as_ref() == "response_time" && p.tags[0].0 == "tool")
        );
        // Histogram points: 53 observations over 7 tools, none refused, as histogram samples.
        for (batch, series) in [(53, 7), (5, 7)] {
            let body = build_otlp_histograms(3, batch, series, 1_000);
            let mapped = mcp_metrics_core::otlp::map_request(&mcp_metrics_core::otlp::decode_protobuf(&body).unwrap());
            assert!(mapped.refused.is_empty(), "{:?}", mapped.refused);
            assert_eq!(mapped.points.len(), batch);
            let tools: std::collections::BTreeSet<&str> = mapped.points.iter().map(|p| p.tags[0].1.as_str()).collect();
            assert_eq!(tools.len(), series.min(batch));
            assert!(
                mapped
                    .points
                    .iter()
                    .all(|p| p.kind == mcp_metrics_core::model::Kind::Histogram
                        && p.name.as_ref() == "tool_duration"
                        && p.timestamp_ms == 1_004)
            );
        }
    }

    #[test]
    fn bodies_are_valid_distinct_batches() {
        let a = build_body("s", 0, 10, 4, 1_000);
        let b = build_body("s", 1, 10, 4, 1_000);
        assert_ne!(a, b);
        let v: Value = serde_json::from_slice(&a).unwrap();
        assert_eq!(v["metrics"].as_array().unwrap().len(), 10);
        assert_eq!(v["server_id"], "s");
    }
}
