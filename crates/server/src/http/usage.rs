//! The public usage beacon (`POST /api/v1/usage`, alias `/functions/v1/usage-track`)
//! and the usage read (`GET /api/v1/servers/{id}/usage`) (DESIGN.md §4.2, §4.3).
//!
//! The beacon answers 202 for any known server and event whether or not the event
//! counted (bot, repeat), so gaming attempts learn nothing; 429 past the rate limit.

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use mcp_metrics_core::codes::Code;
use mcp_metrics_core::usage::{DAY_MS, UsageKind, day_of};
use mcp_metrics_store::UsageDay;
use serde::Deserialize;
use serde_json::{Value, json};

use super::problem::{ApiError, ApiResult};
use crate::state::AppState;
use crate::usage::{Admission, Outcome};

/// A beacon is a few dozen bytes; anything far larger is not one.
const BEACON_MAX_BYTES: usize = 4096;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/usage", post(beacon).options(preflight))
        .route("/functions/v1/usage-track", post(beacon).options(preflight))
        .route("/api/v1/servers/{id}/usage", get(read))
}

/// CORS headers for an allowed origin.
fn cors(state: &AppState, headers: &HeaderMap, response: &mut Response) {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) else {
        return;
    };
    let allowed = &state.config.usage.cors_origins;
    if allowed.iter().any(|a| a == "*" || a.eq_ignore_ascii_case(origin)) {
        let h = response.headers_mut();
        if let Ok(value) = HeaderValue::from_str(origin) {
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, value);
        }
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
    }
}

async fn preflight(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    cors(&state, &headers, &mut response);
    if response.headers().contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN) {
        let h = response.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("POST, OPTIONS"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("content-type"),
        );
        h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("86400"));
    }
    response
}

async fn beacon(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = beacon_inner(&state, peer, &headers, body).await;
    let mut response = match result {
        Ok(()) => StatusCode::ACCEPTED.into_response(),
        Err(e) => e.into_response(),
    };
    cors(&state, &headers, &mut response);
    response
}

async fn beacon_inner(state: &AppState, peer: SocketAddr, headers: &HeaderMap, body: Body) -> ApiResult<()> {
    let body = super::problem::read_body(headers, body, BEACON_MAX_BYTES).await?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("text/plain");
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if essence != "application/json" && essence != "text/plain" {
        return Err(ApiError::new(
            Code::UnsupportedMediaType,
            "send JSON as application/json or text/plain",
        ));
    }
    // The rate limit applies to every beacon, valid or not, before any database read.
    let forwarded = forwarded_for(headers);
    let user_agent = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let admission = state.usage.admit(peer.ip(), forwarded.as_deref(), user_agent);
    if admission == Admission::RateLimited {
        return Err(
            ApiError::new(Code::RateLimited, "too many usage events from this network; slow down").retry_after(60),
        );
    }
    let (server_id, kind, client) =
        mcp_metrics_core::usage::decode(&body).map_err(|e| ApiError::invalid(e.to_string()))?;
    if !super::servers::exists(state, &server_id).await? {
        return Err(ApiError::not_found("server"));
    }
    let Admission::Human(address) = admission else {
        // Bots get the same 202 as everyone and count nowhere.
        return Ok(());
    };
    match state
        .usage
        .record(&server_id, kind, client, address, user_agent)
        .await?
    {
        Outcome::Queued => Ok(()),
        Outcome::Overloaded => Err(ApiError::new(
            Code::Overloaded,
            "usage events are arriving faster than they are stored",
        )
        .retry_after(1)),
    }
}

#[derive(Deserialize)]
struct UsageQuery {
    period: Option<String>,
}

fn period_days(text: Option<&str>) -> ApiResult<(&'static str, i64)> {
    match text.unwrap_or("30d") {
        "7d" => Ok(("7d", 7)),
        "30d" => Ok(("30d", 30)),
        "90d" => Ok(("90d", 90)),
        "1y" => Ok(("1y", 365)),
        _ => Err(ApiError::invalid("period must be one of 7d, 30d, 90d, 1y")),
    }
}

/// Totals of the last `days` days including today.
pub fn sum_days(rows: &[UsageDay]) -> UsageDay {
    rows.iter().fold(UsageDay::default(), |mut acc, d| {
        acc.visitors += d.visitors;
        for i in 0..5 {
            acc.counted[i] += d.counted[i];
            acc.raw[i] += d.raw[i];
        }
        acc
    })
}

async fn read(
    State(state): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<UsageQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = query?;
    let (period, days) = period_days(q.period.as_deref())?;
    if !super::servers::exists(&state, &id).await? {
        return Err(ApiError::not_found("server"));
    }
    let today = day_of(state.clock.now_ms());
    let first = today - days + 1;
    let rows = state.store.usage_days(&id, first, today).await?;
    let totals = sum_days(&rows);
    let mut by_day = vec![UsageDay::default(); days as usize];
    for r in &rows {
        by_day[(r.day - first) as usize] = *r;
    }
    let column = |f: &dyn Fn(&UsageDay) -> u64| by_day.iter().map(f).collect::<Vec<u64>>();
    let figures = |d: &UsageDay, raw: bool| {
        let c = if raw { d.raw } else { d.counted };
        json!({
            "views": c[UsageKind::View.index()],
            "visitors": d.visitors,
            "installs": c[UsageKind::Install.index()],
            "tests": c[UsageKind::Test.index()],
            "copy_config": c[UsageKind::CopyConfig.index()],
            "repo_click": c[UsageKind::RepoClick.index()],
        })
    };
    let body: Value = json!({
        "server_id": id,
        "period": period,
        "totals": figures(&totals, false),
        "raw_totals": figures(&totals, true),
        "visitors_note": "visitors are daily unique visitors; a period's figure is the sum of its days",
        "daily": {
            "t": (0..days).map(|i| (first + i) * DAY_MS).collect::<Vec<i64>>(),
            "views": column(&|d| d.counted[UsageKind::View.index()]),
            "visitors": column(&|d| d.visitors),
            "installs": column(&|d| d.counted[UsageKind::Install.index()]),
            "tests": column(&|d| d.counted[UsageKind::Test.index()]),
        },
    });
    let mut response = Json(body).into_response();
    let max_age = Duration::from_secs(30).as_secs();
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_str(&format!("public, max-age={max_age}")).expect("valid"),
    );
    Ok(response)
}

/// Every `X-Forwarded-For` line of a request as one list: a proxy may add its own line
/// below the client's.
pub fn forwarded_for(headers: &HeaderMap) -> Option<String> {
    let lines: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    (!lines.is_empty()).then(|| lines.join(","))
}
