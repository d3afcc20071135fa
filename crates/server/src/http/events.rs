//! The public timeline of a server: `GET /api/v1/servers/{id}/events?limit=&before=`
//! (DESIGN.md §4.3), newest first, paged by an (at, id) position.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::routing::get;
use axum::{Json, Router};
use mcp_metrics_core::time::{format_rfc3339_ms, parse_time_param};
use serde::Deserialize;
use serde_json::{Value, json};

use super::problem::{ApiError, ApiResult};
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/v1/servers/{id}/events", get(list))
}

#[derive(Deserialize)]
struct EventsQuery {
    limit: Option<usize>,
    before: Option<String>,
}

/// `before` is a `next` value (`<at ms>.<id>`) or a time (unix ms or RFC 3339).
fn parse_before(text: &str) -> Option<(i64, i64)> {
    if let Some((at, id)) = text.split_once('.')
        && let (Ok(at), Ok(id)) = (at.parse(), id.parse())
    {
        return Some((at, id));
    }
    parse_time_param(text).map(|at| (at, i64::MIN))
}

async fn list(
    State(state): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = query?;
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::invalid("limit must be between 1 and 500"));
    }
    let before = match q.before.as_deref() {
        None => None,
        Some(b) => Some(parse_before(b).ok_or_else(|| ApiError::invalid("before must be a next value or a time"))?),
    };
    if !super::servers::exists(&state, &id).await? {
        return Err(ApiError::not_found("server"));
    }
    let mut events = state.store.list_events(&id, before, limit + 1).await?;
    let more = events.len() > limit;
    events.truncate(limit);
    let next = if more {
        events.last().map(|e| format!("{}.{}", e.event.at, e.id))
    } else {
        None
    };
    let items: Vec<Value> = events
        .iter()
        .map(|e| {
            json!({
                "id": e.id,
                "kind": e.event.kind,
                "title": e.event.title,
                "detail": e.event.detail,
                "at": format_rfc3339_ms(e.event.at),
                "source": e.event.source.as_str(),
            })
        })
        .collect();
    Ok(Json(json!({ "events": items, "next": next })))
}
