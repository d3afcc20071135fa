//! `POST /api/v1/write?precision=ns|us|ms|s`: InfluxDB line protocol (DESIGN.md §4.1, §5).
//!
//! The API key comes in `X-API-Key` or `Authorization: Bearer|Token` (exporters cannot
//! sign); samples go to the key's server through the same validation, group-commit
//! writer, rollups and live hub as signed JSON. A success is `204 No Content`, as
//! InfluxDB answers. Bad lines are refused and named while the other lines are stored;
//! the answer is then a 400 (so senders do not retry data that cannot succeed) listing
//! each refused line. Bodies may be gzip-compressed (`Content-Encoding: gzip`), as
//! Telegraf sends them.

use std::borrow::Cow;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use mcp_metrics_core::codes::Code;
use mcp_metrics_core::influx::{self, Precision};
use mcp_metrics_core::ingest::{WireBatch, WireSample, WireTags, WireTime, WireValue};
use serde::Deserialize;
use serde_json::json;

use super::auth;
use super::problem::{ApiError, ApiResult};
use crate::state::AppState;

/// Line protocol bodies may be larger than JSON ones: 20 MiB, as for protobuf.
pub const MAX_BODY_BYTES: usize = 20 << 20;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/v1/write", post(write))
}

#[derive(Deserialize)]
struct WriteQuery {
    precision: Option<String>,
}

async fn write(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<WriteQuery>, QueryRejection>,
    body: Body,
) -> Response {
    super::problem::counted(&state, write_inner(&state, &headers, query, body).await)
}

async fn write_inner(
    state: &AppState,
    headers: &HeaderMap,
    query: Result<Query<WriteQuery>, QueryRejection>,
    body: Body,
) -> ApiResult<Response> {
    let credential = auth::exporter(state, headers).await?;
    let body = super::problem::read_body(headers, body, MAX_BODY_BYTES).await?;
    let body = super::problem::decoded_body(headers, body, MAX_BODY_BYTES)?;
    let Query(q) = query?;
    let precision = match q.precision.as_deref() {
        None => Precision::Ns,
        Some(p) => Precision::parse(p).ok_or_else(|| ApiError::invalid("precision must be ns, us, ms or s"))?,
    };
    let text = std::str::from_utf8(&body).map_err(|_| ApiError::invalid("line protocol must be UTF-8"))?;
    let lines = influx::parse(text, precision);
    let batch = WireBatch {
        server_id: Cow::Borrowed(&credential.server_id),
        metrics: lines
            .points
            .iter()
            .map(|p| WireSample {
                name: Cow::Borrowed(p.name.as_ref()),
                value: WireValue::Number(p.value),
                kind: None,
                timestamp: p.timestamp_ms.map(|ms| WireTime::Millis(ms as f64)),
                tags: WireTags::Lent(lines.tags(p)),
            })
            .collect(),
    };
    let stored = super::write::commit(state, &credential, &batch, &body, None).await?;
    let accepted = stored.accepted;
    let mut refused: Vec<serde_json::Value> = lines
        .errors
        .iter()
        .map(|e| json!({ "line": e.line, "code": "invalid_payload", "detail": e.message }))
        .collect();
    for r in &stored.rejected {
        refused.push(json!({ "line": lines.points[r.index].line, "code": r.code.as_str(), "detail": r.detail }));
    }
    if refused.is_empty() {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    refused.sort_by_key(|r| r["line"].as_u64());
    let summary: Vec<String> = refused
        .iter()
        .take(5)
        .map(|r| format!("line {}: {}", r["line"], r["detail"].as_str().unwrap_or("")))
        .collect();
    let body = json!({
        "type": "https://mcp-metrics.dev/problems/invalid_payload",
        "title": Code::InvalidPayload.title(),
        "status": 400,
        "detail": format!("{} samples stored; refused: {}", accepted, summary.join("; ")),
        "code": "invalid_payload",
        "accepted": accepted,
        "rejected": refused,
    });
    let mut response = (StatusCode::BAD_REQUEST, Json(body)).into_response();
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/problem+json"),
    );
    Ok(response)
}
