//! Public metric reads built from rollups (DESIGN.md §4.3):
//! `GET /api/v1/servers/{id}/metrics` (alias `GET /functions/v1/metrics-fetch`) and
//! `GET /api/v1/compare`, with the read cache, `ETag`/`If-None-Match` and
//! `Cache-Control` that grows with the period.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use mcp_metrics_core::model::{Kind, SeriesInfo};
use mcp_metrics_core::period::Period;
use mcp_metrics_core::points::{bucketize, combine_parallel, counter_increases};
use mcp_metrics_core::rollup::{BucketStats, Level, align};
use mcp_metrics_core::time::{format_rfc3339_ms, now_ms};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::problem::{ApiError, ApiResult};
use crate::cache::Cached;
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/servers/{id}/metrics", get(metrics))
        .route("/functions/v1/metrics-fetch", get(metrics_alias))
        .route("/api/v1/compare", get(compare))
}

#[derive(Deserialize)]
struct MetricsQuery {
    period: Option<String>,
    names: Option<String>,
    server_id: Option<String>,
}

fn parse_period(text: Option<&str>) -> ApiResult<Period> {
    match text {
        None => Ok(Period::H24),
        Some(p) => {
            Period::parse(p).ok_or_else(|| ApiError::invalid("period must be one of 1h, 6h, 24h, 7d, 30d, 90d, 1y"))
        }
    }
}

/// How long a cached answer may live at most, whatever happens to the data.
pub fn cache_lifetime(period: Period) -> Duration {
    Duration::from_secs(match period {
        Period::H1 => 10,
        Period::H6 => 30,
        Period::H24 => 60,
        Period::D7 => 300,
        Period::D30 => 600,
        Period::D90 | Period::Y1 => 3600,
    })
}

/// The cached text under `key`, or `compute`d and cached for `lifetime`; counts hits and
/// misses for `/metrics`. Every read cache user goes through here.
pub async fn cached<F, Fut>(state: &AppState, key: String, lifetime: Duration, compute: F) -> ApiResult<Arc<Cached>>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ApiResult<String>>,
{
    if let Some(hit) = state.cache.get(&key) {
        state
            .telemetry
            .cache_hits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return Ok(hit);
    }
    state
        .telemetry
        .cache_misses
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let fresh = Arc::new(Cached::new(compute().await?, lifetime));
    state.cache.insert(key, fresh.clone());
    Ok(fresh)
}

/// Answers from the cache or computes, with conditional-request handling.
async fn cached_answer<F, Fut>(
    state: &AppState,
    key: String,
    period: Period,
    headers: &HeaderMap,
    compute: F,
) -> ApiResult<Response>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ApiResult<Value>>,
{
    let entry = cached(state, key, cache_lifetime(period), || async {
        Ok(compute().await?.to_string())
    })
    .await?;
    let etag = HeaderValue::from_str(&entry.etag).expect("hex etag is a valid header");
    let cache_control = HeaderValue::from_str(&format!("public, max-age={}", period.max_age_secs())).expect("valid");
    let not_modified = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == entry.etag || t.trim() == "*"));
    let mut response = if not_modified {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, "application/json")], entry.body.clone()).into_response()
    };
    response.headers_mut().insert(header::ETAG, etag);
    response.headers_mut().insert(header::CACHE_CONTROL, cache_control);
    Ok(response)
}

async fn metrics(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    query: Result<Query<MetricsQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = query?;
    serve_metrics(state, id, q, headers).await
}

async fn metrics_alias(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<MetricsQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(mut q) = query?;
    let id = q
        .server_id
        .take()
        .ok_or_else(|| ApiError::invalid("server_id is required"))?;
    serve_metrics(state, id, q, headers).await
}

async fn serve_metrics(state: AppState, id: String, q: MetricsQuery, headers: HeaderMap) -> ApiResult<Response> {
    let period = parse_period(q.period.as_deref())?;
    // `names=` with nothing in it means no filter, like leaving it out.
    let names: Option<Vec<String>> = q
        .names
        .map(|n| {
            n.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .filter(|n| !n.is_empty());
    if state.store.get_server(&id).await?.is_none() {
        return Err(ApiError::not_found("server"));
    }
    let what = format!(
        "metrics\0{}\0{}",
        period.as_str(),
        names.as_ref().map(|n| n.join(",")).unwrap_or_default()
    );
    let key = state.cache.key([id.as_str()], &what);
    let compute_state = state.clone();
    cached_answer(&state, key, period, &headers, || async move {
        compute_metrics(&compute_state, &id, period, names.as_deref(), now_ms()).await
    })
    .await
}

/// Points of one series over a period: merged buckets and, for counters, increases.
struct SeriesPoints {
    points: Vec<Option<BucketStats>>,
    increases: Vec<Option<f64>>,
}

fn series_points(kind: Kind, rows: Vec<(i64, BucketStats)>, from: i64, period: Period) -> SeriesPoints {
    let seed = if kind == Kind::Counter {
        rows.iter().rev().find(|(b, _)| *b < from).map(|(_, s)| s.clone())
    } else {
        None
    };
    let points = bucketize(rows, from, period.resolution_ms(), period.points() as usize);
    let increases = if kind == Kind::Counter {
        counter_increases(&points, seed.as_ref())
    } else {
        Vec::new()
    };
    SeriesPoints { points, increases }
}

/// Reads the rollups of `series` for `period` ending at `now`, grouped by series id.
async fn load(
    state: &AppState,
    series: &[SeriesInfo],
    period: Period,
    now: i64,
) -> ApiResult<(i64, i64, BTreeMap<i64, Vec<(i64, BucketStats)>>)> {
    let (from, to) = period.window(now);
    let ids: Vec<i64> = series.iter().map(|s| s.id).collect();
    // One extra point before the window seeds counters' first increase.
    let rows = state
        .store
        .read_rollups(period.source_level(), &ids, from - period.resolution_ms(), to)
        .await?;
    let mut grouped: BTreeMap<i64, Vec<(i64, BucketStats)>> = BTreeMap::new();
    for row in rows {
        grouped.entry(row.series_id).or_default().push((row.bucket, row.stats));
    }
    Ok((from, to, grouped))
}

fn opt(values: impl Iterator<Item = Option<f64>>) -> Value {
    Value::Array(values.map(|v| v.map_or(Value::Null, Value::from)).collect())
}

fn unit_of(name: &str) -> Value {
    match name {
        "response_time" => json!("ms"),
        _ => Value::Null,
    }
}

pub async fn compute_metrics(
    state: &AppState,
    server_id: &str,
    period: Period,
    names: Option<&[String]>,
    now: i64,
) -> ApiResult<Value> {
    let mut series = state.store.series_of_server(server_id, None).await?;
    if let Some(names) = names {
        series.retain(|s| names.contains(&s.key.name));
    }
    let (from, to, mut grouped) = load(state, &series, period, now).await?;
    let step = period.resolution_ms();
    let t: Vec<Value> = (0..period.points()).map(|i| json!(from + i * step)).collect();
    let mut latency: Option<BucketStats> = None;
    let (mut requests, mut errors, mut have_requests, mut have_errors) = (0.0, 0.0, false, false);
    let mut out = Vec::with_capacity(series.len());
    for s in &series {
        let sp = series_points(s.kind, grouped.remove(&s.id).unwrap_or_default(), from, period);
        let mut points = Map::new();
        points.insert("t".into(), Value::Array(t.clone()));
        let field = |f: &dyn Fn(&BucketStats) -> Option<f64>| opt(sp.points.iter().map(|p| p.as_ref().and_then(f)));
        match s.kind {
            Kind::Histogram => {
                points.insert("count".into(), field(&|p| Some(p.count as f64)));
                points.insert("avg".into(), field(&|p| Some(p.avg())));
                points.insert("min".into(), field(&|p| Some(p.min)));
                points.insert("max".into(), field(&|p| Some(p.max)));
                let percentiles: Vec<[Option<f64>; 3]> = sp
                    .points
                    .iter()
                    .map(|p| p.as_ref().map_or([None; 3], BucketStats::percentiles))
                    .collect();
                for (i, name) in ["p50", "p95", "p99"].into_iter().enumerate() {
                    points.insert(name.into(), opt(percentiles.iter().map(|p| p[i])));
                }
                if s.key.name == "response_time" {
                    sp.points
                        .iter()
                        .flatten()
                        .for_each(|p| combine_parallel(&mut latency, p));
                }
            }
            Kind::Counter => {
                points.insert("increase".into(), opt(sp.increases.iter().copied()));
                points.insert(
                    "rate".into(),
                    opt(sp.increases.iter().map(|i| i.map(|v| v * 1000.0 / step as f64))),
                );
                let total: f64 = sp.increases.iter().flatten().sum();
                match s.key.name.as_str() {
                    "requests" => (requests, have_requests) = (requests + total, true),
                    "errors" => (errors, have_errors) = (errors + total, true),
                    _ => {}
                }
            }
            Kind::Gauge => {
                points.insert("avg".into(), field(&|p| Some(p.avg())));
                points.insert("min".into(), field(&|p| Some(p.min)));
                points.insert("max".into(), field(&|p| Some(p.max)));
                points.insert("last".into(), field(&|p| Some(p.last)));
            }
        }
        let tags: Map<String, Value> = s
            .key
            .tags
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        out.push(json!({
            "name": s.key.name, "tags": tags, "kind": s.kind.as_str(), "unit": unit_of(&s.key.name), "points": points,
        }));
    }
    if !have_requests && let Some(l) = &latency {
        // Without a requests counter, every latency observation is a request.
        (requests, have_requests) = (l.count as f64, true);
    }
    let error_rate = (have_requests && have_errors && requests > 0.0).then(|| errors / requests);
    Ok(json!({
        "server_id": server_id,
        "period": period.as_str(),
        "resolution": period.resolution_label(),
        "from": format_rfc3339_ms(from),
        "to": format_rfc3339_ms(to),
        "series": out,
        "summary": {
            "p50": latency.as_ref().and_then(|l| l.quantile(0.50)),
            "p95": latency.as_ref().and_then(|l| l.quantile(0.95)),
            "p99": latency.as_ref().and_then(|l| l.quantile(0.99)),
            "requests": have_requests.then_some(requests),
            "errors": have_errors.then_some(errors),
            "error_rate": error_rate,
        },
    }))
}

/// p95 of `response_time` over the last 24 hours, from hour rollups (server summaries).
pub async fn p95_24h(state: &AppState, server_id: &str) -> ApiResult<Option<f64>> {
    let key = state.cache.key([server_id], "p95_24h");
    let entry = cached(state, key, Duration::from_secs(60), || async {
        let series = state.store.series_of_server(server_id, Some("response_time")).await?;
        let ids: Vec<i64> = series
            .iter()
            .filter(|s| s.kind == Kind::Histogram)
            .map(|s| s.id)
            .collect();
        let to = align(now_ms(), Level::Hour.bucket_ms()) + Level::Hour.bucket_ms();
        let rows = state
            .store
            .read_rollups(Level::Hour, &ids, to - 24 * Level::Hour.bucket_ms(), to)
            .await?;
        let mut merged = None;
        rows.iter().for_each(|r| combine_parallel(&mut merged, &r.stats));
        Ok(merged
            .and_then(|m| m.quantile(0.95))
            .map(|v| v.to_string())
            .unwrap_or_default())
    })
    .await?;
    Ok(entry.body.parse().ok())
}

#[derive(Deserialize)]
struct CompareQuery {
    servers: Option<String>,
    metric: Option<String>,
    stat: Option<String>,
    period: Option<String>,
}

const MAX_COMPARED: usize = 10;

pub fn stat_allowed(kind: Kind, stat: &str) -> bool {
    match kind {
        Kind::Histogram => matches!(stat, "count" | "avg" | "min" | "max" | "p50" | "p95" | "p99"),
        Kind::Counter => matches!(stat, "increase" | "rate"),
        Kind::Gauge => matches!(stat, "avg" | "min" | "max" | "last"),
    }
}

pub fn stat_value(stat: &str, p: &BucketStats) -> Option<f64> {
    match stat {
        "count" => Some(p.count as f64),
        "avg" => Some(p.avg()),
        "min" => Some(p.min),
        "max" => Some(p.max),
        "last" => Some(p.last),
        "p50" => p.quantile(0.50),
        "p95" => p.quantile(0.95),
        "p99" => p.quantile(0.99),
        _ => None,
    }
}

async fn compare(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<CompareQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = query?;
    let period = parse_period(q.period.as_deref())?;
    let metric = q.metric.unwrap_or_else(|| "response_time".into());
    let stat = q.stat.unwrap_or_else(|| "p95".into());
    let servers: Vec<String> = q
        .servers
        .as_deref()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    if servers.is_empty() || servers.len() > MAX_COMPARED {
        return Err(ApiError::invalid(format!(
            "servers must list 1 to {MAX_COMPARED} server ids, comma-separated"
        )));
    }
    for id in &servers {
        if state.store.get_server(id).await?.is_none() {
            return Err(ApiError::not_found(&format!("server {id}")));
        }
    }
    let what = format!("compare\0{metric}\0{stat}\0{}", period.as_str());
    let key = state.cache.key(servers.iter().map(String::as_str), &what);
    let compute_state = state.clone();
    cached_answer(&state, key, period, &headers, || async move {
        compute_compare(&compute_state, &servers, &metric, &stat, period, now_ms()).await
    })
    .await
}

/// One metric of one server over a period, all its tag sets combined per point:
/// (kind, point starts, merged buckets, counter increases).
pub type CombinedPoints = (Kind, Vec<i64>, Vec<Option<BucketStats>>, Vec<Option<f64>>);

pub async fn combined_points(
    state: &AppState,
    server_id: &str,
    metric: &str,
    period: Period,
    now: i64,
) -> ApiResult<Option<CombinedPoints>> {
    let series = state.store.series_of_server(server_id, Some(metric)).await?;
    let Some(kind) = series.first().map(|s| s.kind) else {
        return Ok(None);
    };
    let (from, _, mut grouped) = load(state, &series, period, now).await?;
    let n = period.points() as usize;
    let mut combined: Vec<Option<BucketStats>> = vec![None; n];
    let mut increases: Vec<Option<f64>> = vec![None; n];
    // Tag sets of another kind than the first cannot be combined with it; skip them.
    for s in series.iter().filter(|s| s.kind == kind) {
        let sp = series_points(s.kind, grouped.remove(&s.id).unwrap_or_default(), from, period);
        for (slot, p) in combined.iter_mut().zip(&sp.points) {
            if let Some(p) = p {
                combine_parallel(slot, p);
            }
        }
        for (slot, inc) in increases.iter_mut().zip(&sp.increases) {
            if let Some(inc) = inc {
                *slot = Some(slot.unwrap_or(0.0) + inc);
            }
        }
    }
    let t = (0..n as i64).map(|i| from + i * period.resolution_ms()).collect();
    Ok(Some((kind, t, combined, increases)))
}

/// A statistic of combined points (`increase` and `rate` for counters).
pub fn stat_series(
    kind: Kind,
    stat: &str,
    points: &[Option<BucketStats>],
    increases: &[Option<f64>],
    step: i64,
) -> Vec<Option<f64>> {
    match (kind, stat) {
        (Kind::Counter, "increase") => increases.to_vec(),
        (Kind::Counter, _) => increases.iter().map(|i| i.map(|v| v * 1000.0 / step as f64)).collect(),
        _ => points
            .iter()
            .map(|p| p.as_ref().and_then(|p| stat_value(stat, p)))
            .collect(),
    }
}

async fn compute_compare(
    state: &AppState,
    servers: &[String],
    metric: &str,
    stat: &str,
    period: Period,
    now: i64,
) -> ApiResult<Value> {
    let (from, to) = period.window(now);
    let step = period.resolution_ms();
    let n = period.points() as usize;
    let mut entries = Vec::with_capacity(servers.len());
    for id in servers {
        let Some((kind, _, points, increases)) = combined_points(state, id, metric, period, now).await? else {
            entries.push(json!({ "id": id, "kind": null, "values": vec![Value::Null; n] }));
            continue;
        };
        if !stat_allowed(kind, stat) {
            return Err(ApiError::invalid(format!(
                "stat {stat} does not apply to {metric}, a {}",
                kind.as_str()
            )));
        }
        let values = opt(stat_series(kind, stat, &points, &increases, step).into_iter());
        entries.push(json!({ "id": id, "kind": kind.as_str(), "values": values }));
    }
    Ok(json!({
        "metric": metric,
        "stat": stat,
        "period": period.as_str(),
        "resolution": period.resolution_label(),
        "from": format_rfc3339_ms(from),
        "to": format_rfc3339_ms(to),
        "t": (0..n as i64).map(|i| from + i * step).collect::<Vec<_>>(),
        "servers": entries,
    }))
}
