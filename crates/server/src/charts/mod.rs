//! SVG endpoints: embeddable charts (`GET /charts/{id}/{metric}.svg?period=&stat=`)
//! and shields-style badges (`GET /badge/{id}/{uptime|latency|status|installs}.svg`)
//! (DESIGN.md §4.3). Drawing lives in [`svg`]; this module picks the data.

pub mod svg;

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use mcp_metrics_core::model::Kind;
use mcp_metrics_core::period::Period;
use mcp_metrics_core::time::now_ms;
use serde::Deserialize;

use crate::http::metrics::{combined_points, stat_allowed, stat_series};
use crate::http::problem::{ApiError, ApiResult};
use crate::state::AppState;
use svg::{Chart, ChartSeries, Style};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/charts/{id}/{file}", get(chart))
        .route("/badge/{id}/{file}", get(badge))
}

#[derive(Deserialize)]
struct ChartQuery {
    period: Option<String>,
    stat: Option<String>,
    w: Option<u32>,
    h: Option<u32>,
}

fn svg_response(body: String, max_age: u64) -> Response {
    let mut response = ([(header::CONTENT_TYPE, "image/svg+xml; charset=utf-8")], body).into_response();
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_str(&format!("public, max-age={max_age}")).expect("valid"),
    );
    response
}

fn strip_svg(file: &str) -> ApiResult<&str> {
    file.strip_suffix(".svg")
        .ok_or_else(|| ApiError::not_found("chart (the path ends in .svg)"))
}

pub fn unit_of(metric: &str) -> Option<String> {
    (metric == "response_time").then(|| "ms".to_owned())
}

/// The chart of one metric of one server; also used by the web pages.
pub async fn build_chart(
    state: &AppState,
    server_id: &str,
    metric: &str,
    period: Period,
    stat: Option<&str>,
    size: (u32, u32),
) -> ApiResult<Chart> {
    let now = now_ms();
    let step = period.resolution_ms();
    let found = combined_points(state, server_id, metric, period, now).await?;
    let (from, _) = period.window(now);
    let t: Vec<i64> = (0..period.points()).map(|i| from + i * step).collect();
    let series = match &found {
        None => Vec::new(),
        Some((kind, _, points, increases)) => {
            let stats: Vec<(&str, &'static str, Style)> = match (kind, stat) {
                (Kind::Histogram, None | Some("percentiles")) => {
                    vec![
                        ("p50", "#2563eb", Style::Line),
                        ("p95", "#f59e0b", Style::Line),
                        ("p99", "#dc2626", Style::Line),
                    ]
                }
                (Kind::Counter, None | Some("increase")) => vec![("increase", "#6366f1", Style::Bars)],
                (Kind::Gauge, None) => vec![("avg", "#059669", Style::Line)],
                (Kind::Histogram, Some("count")) => vec![("count", "#6366f1", Style::Bars)],
                (_, Some(s)) => vec![(s, "#2563eb", Style::Line)],
            };
            let mut out = Vec::with_capacity(stats.len());
            for (name, color, style) in stats {
                if !stat_allowed(*kind, name) {
                    return Err(ApiError::invalid(format!(
                        "stat {name} does not apply to {metric}, a {}",
                        kind.as_str()
                    )));
                }
                out.push(ChartSeries {
                    label: name.to_owned(),
                    color,
                    style,
                    values: stat_series(*kind, name, points, increases, step),
                });
            }
            out
        }
    };
    let unit = match (found.as_ref().map(|f| f.0), stat) {
        (Some(Kind::Histogram), Some("count")) | (Some(Kind::Counter), _) => None,
        _ => unit_of(metric),
    };
    Ok(Chart {
        title: format!("{metric} · {}", period.as_str()),
        unit,
        period,
        resolution_ms: period.resolution_ms(),
        t,
        series,
        width: size.0,
        height: size.1,
    })
}

async fn chart(
    State(state): State<AppState>,
    Path((id, file)): Path<(String, String)>,
    query: Result<Query<ChartQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = query?;
    let metric = strip_svg(&file)?;
    let period = match q.period.as_deref() {
        None => Period::H24,
        Some(p) => {
            Period::parse(p).ok_or_else(|| ApiError::invalid("period must be one of 1h, 6h, 24h, 7d, 30d, 90d, 1y"))?
        }
    };
    if !crate::http::servers::exists(&state, &id).await? {
        return Err(ApiError::not_found("server"));
    }
    let size = (q.w.unwrap_or(640).clamp(240, 1600), q.h.unwrap_or(240).clamp(120, 800));
    // Cached like metric answers: every open page refetches its charts when the server's
    // rollups change, so viewers of one server share one drawing per change.
    let what = format!(
        "chart\0{metric}\0{}\0{}\0{}x{}",
        period.as_str(),
        q.stat.as_deref().unwrap_or(""),
        size.0,
        size.1
    );
    let key = state.cache.key([id.as_str()], &what);
    let lifetime = crate::http::metrics::cache_lifetime(period);
    let entry = crate::http::metrics::cached(&state, key, lifetime, || async {
        let chart = build_chart(&state, &id, metric, period, q.stat.as_deref(), size).await?;
        Ok(svg::render_chart(&chart))
    })
    .await?;
    let body = entry.body.clone();
    Ok(svg_response(body, period.max_age_secs()))
}

/// Badge colours by p95 latency, like build badges: green is good.
fn latency_color(ms: f64) -> &'static str {
    match ms {
        x if x < 200.0 => "#4c1",
        x if x < 500.0 => "#a4a61d",
        x if x < 1000.0 => "#dfb317",
        _ => "#e05d44",
    }
}

async fn badge(State(state): State<AppState>, Path((id, file)): Path<(String, String)>) -> ApiResult<Response> {
    let kind = strip_svg(&file)?;
    if !crate::http::servers::exists(&state, &id).await? {
        return Err(ApiError::not_found("server"));
    }
    let summary = crate::http::servers::summary(&state, &id).await?;
    const GREY: &str = "#9f9f9f";
    let (label, value, color) = match kind {
        "latency" => match summary.p95_24h {
            Some(ms) => ("p95 latency", svg::format_value(ms, Some("ms")), latency_color(ms)),
            None => ("p95 latency", "no data".to_owned(), GREY),
        },
        "installs" => (
            "installs",
            format!("{}/month", svg::format_value(summary.installs_30d as f64, None)),
            "#007ec6",
        ),
        // Health and uptime come from active probes, which this build does not run yet.
        "status" => ("status", "unknown".to_owned(), GREY),
        "uptime" => ("uptime", "unknown".to_owned(), GREY),
        _ => return Err(ApiError::not_found("badge (uptime, latency, status or installs)")),
    };
    Ok(svg_response(svg::render_badge(label, &value, color), 300))
}
