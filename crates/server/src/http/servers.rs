//! Public reads of the server registry: `GET /api/v1/servers` and
//! `GET /api/v1/servers/{id}` (DESIGN.md §4.3).
//!
//! The summary block's fields are null until the subsystems that compute them (rollups,
//! usage, probes) exist; the shape is already the final one so clients need no change.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::routing::get;
use axum::{Json, Router};
use mcp_metrics_core::model::Server;
use mcp_metrics_core::time::format_rfc3339_ms;
use serde::Deserialize;
use serde_json::{Value, json};

use super::problem::{ApiError, ApiResult};
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/servers", get(list))
        .route("/api/v1/servers/{id}", get(detail))
}

/// The JSON shape of a server in every public answer.
pub fn server_json(server: &Server, p95_24h: Option<f64>) -> Value {
    json!({
        "id": server.id,
        "registry_name": server.registry_name,
        "name": server.name,
        "description": server.description,
        "repository_url": server.repository_url,
        "remote_url": server.remote_url,
        "owner": server.owner,
        "created_at": format_rfc3339_ms(server.created_at),
        "updated_at": format_rfc3339_ms(server.updated_at),
        "summary": {
            "health": "unknown",
            "uptime_7d": null,
            "p95_24h": p95_24h,
            "installs_30d": null,
            "views_30d": null,
        },
    })
}

#[derive(Deserialize)]
struct ListQuery {
    sort: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

async fn list(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = query?;
    match q.sort.as_deref() {
        None | Some("popular" | "uptime" | "latency" | "name") => {}
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "sort must be popular, uptime, latency or name, not {other:?}"
            )));
        }
    }
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let offset = match q.cursor.as_deref() {
        None => 0,
        Some(c) => c
            .parse::<usize>()
            .map_err(|_| ApiError::invalid("cursor must be a value returned as next"))?,
    };
    let servers = state.store.list_servers().await?;
    let mut rows = Vec::with_capacity(servers.len());
    for server in servers {
        let p95 = super::metrics::p95_24h(&state, &server.id).await?;
        rows.push((server, p95));
    }
    let name_key = |s: &Server| s.name.clone().unwrap_or_else(|| s.id.clone()).to_lowercase();
    // Summaries not computed yet (popularity needs usage, uptime needs probes) are null:
    // those orders fall back to the name. Nulls sort last.
    match q.sort.as_deref() {
        Some("latency") => rows.sort_by(|(a, pa), (b, pb)| match (pa, pb) {
            (Some(x), Some(y)) => x.total_cmp(y).then_with(|| name_key(a).cmp(&name_key(b))),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => name_key(a).cmp(&name_key(b)),
        }),
        _ => rows.sort_by(|(a, _), (b, _)| name_key(a).cmp(&name_key(b)).then_with(|| a.id.cmp(&b.id))),
    }
    let total = rows.len();
    let page: Vec<Value> = rows
        .iter()
        .skip(offset)
        .take(limit)
        .map(|(s, p95)| server_json(s, *p95))
        .collect();
    let next = (offset + limit < total).then(|| (offset + limit).to_string());
    Ok(Json(json!({ "servers": page, "next": next })))
}

async fn detail(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let server = state
        .store
        .get_server(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("server"))?;
    let p95 = super::metrics::p95_24h(&state, &id).await?;
    Ok(Json(server_json(&server, p95)))
}
