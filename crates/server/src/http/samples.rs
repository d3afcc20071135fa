//! The author's raw read: `GET /api/v1/servers/{id}/samples` (DESIGN.md §4.1).
//!
//! Samples come oldest first in (timestamp, series, seq) order; `next` is that position
//! of the last sample, so paging neither skips nor repeats samples that share a time.

use std::collections::HashMap;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::routing::get;
use axum::{Json, Router};
use mcp_metrics_core::ingest::MAX_FUTURE_MS;
use mcp_metrics_core::time::{now_ms, parse_time_param};
use mcp_metrics_store::SampleQuery;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::auth;
use super::problem::{ApiError, ApiResult};
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/v1/servers/{id}/samples", get(samples))
}

#[derive(Deserialize)]
struct SamplesQuery {
    name: Option<String>,
    from: Option<String>,
    to: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

fn parse_cursor(text: &str) -> Option<(i64, i64, i64)> {
    let mut parts = text.splitn(3, '.');
    let t = parts.next()?.parse().ok()?;
    let s = parts.next()?.parse().ok()?;
    let q = parts.next()?.parse().ok()?;
    Some((t, s, q))
}

async fn samples(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    query: Result<Query<SamplesQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let credential = auth::reader(&state, &headers).await?;
    auth::require_server(&credential, &id)?;
    let Query(q) = query?;
    let time = |value: &Option<String>, default: i64, what: &str| -> ApiResult<i64> {
        match value {
            None => Ok(default),
            Some(v) => {
                parse_time_param(v).ok_or_else(|| ApiError::invalid(format!("{what} must be unix ms or RFC 3339")))
            }
        }
    };
    let now = now_ms();
    let from = time(&q.from, 0, "from")?;
    let to = time(&q.to, now + MAX_FUTURE_MS + 1, "to")?;
    let limit = q.limit.unwrap_or(1000);
    if !(1..=10_000).contains(&limit) {
        return Err(ApiError::invalid("limit must be between 1 and 10000"));
    }
    let after = match &q.cursor {
        None => None,
        Some(c) => Some(parse_cursor(c).ok_or_else(|| ApiError::invalid("cursor must be a value returned as next"))?),
    };
    let series = state.store.series_of_server(&id, q.name.as_deref()).await?;
    let by_id: HashMap<i64, &mcp_metrics_core::model::SeriesInfo> = series.iter().map(|s| (s.id, s)).collect();
    let mut rows = state
        .store
        .read_samples(&SampleQuery {
            series_ids: series.iter().map(|s| s.id).collect(),
            from,
            to,
            after,
            limit: limit + 1,
        })
        .await?;
    let has_more = rows.len() > limit;
    rows.truncate(limit);
    let next = if has_more {
        rows.last()
            .map(|r| format!("{}.{}.{}", r.timestamp, r.series_id, r.seq))
    } else {
        None
    };
    let samples: Vec<Value> = rows
        .iter()
        .filter_map(|r| {
            let s = by_id.get(&r.series_id)?;
            let tags: Map<String, Value> = s
                .key
                .tags
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect();
            Some(json!({ "name": s.key.name, "tags": tags, "timestamp": r.timestamp, "value": r.value }))
        })
        .collect();
    Ok(Json(json!({ "samples": samples, "next": next })))
}
