//! Public reads of the server registry: `GET /api/v1/servers` and
//! `GET /api/v1/servers/{id}` (DESIGN.md §4.3), each with a summary: p95 latency over
//! 24 h (hour rollups), installs and views over 30 days (daily usage). Health and
//! uptime stay `unknown`/null until probes exist.

use std::cmp::Ordering;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::routing::get;
use axum::{Json, Router};
use mcp_metrics_core::model::Server;
use mcp_metrics_core::time::format_rfc3339_ms;
use mcp_metrics_core::usage::{UsageKind, day_of};
use serde::Deserialize;
use serde_json::{Value, json};

use super::problem::{ApiError, ApiResult};
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/servers", get(list))
        .route("/api/v1/servers/{id}", get(detail))
}

/// Whether a server is registered; positive answers are cached briefly because the
/// usage beacon asks for every event.
pub async fn exists(state: &AppState, id: &str) -> ApiResult<bool> {
    if state.known_servers.get(id).is_some() {
        return Ok(true);
    }
    let found = state.store.get_server(id).await?.is_some();
    if found {
        state.known_servers.insert(id.to_owned(), ());
    }
    Ok(found)
}

/// The figures shown beside a server.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    pub p95_24h: Option<f64>,
    pub installs_30d: u64,
    pub views_30d: u64,
}

pub async fn summary(state: &AppState, id: &str) -> ApiResult<Summary> {
    let today = day_of(state.clock.now_ms());
    let usage = super::usage::sum_days(&state.store.usage_days(id, today - 29, today).await?);
    Ok(Summary {
        p95_24h: super::metrics::p95_24h(state, id).await?,
        installs_30d: usage.counted[UsageKind::Install.index()],
        views_30d: usage.counted[UsageKind::View.index()],
    })
}

/// The JSON shape of a server in every public answer.
pub fn server_json(server: &Server, summary: Option<&Summary>) -> Value {
    let s = summary.copied().unwrap_or_default();
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
            "p95_24h": s.p95_24h,
            "installs_30d": summary.map(|s| s.installs_30d),
            "views_30d": summary.map(|s| s.views_30d),
        },
    })
}

#[derive(Deserialize)]
struct ListQuery {
    sort: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

fn name_key(s: &Server) -> String {
    s.name.clone().unwrap_or_else(|| s.id.clone()).to_lowercase()
}

/// Ascending with nulls last.
fn by_option(a: Option<f64>, b: Option<f64>) -> Ordering {
    match (a, b) {
        (Some(x), Some(y)) => x.total_cmp(&y),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
}

/// The order of servers for `sort` (`popular`, `uptime`, `latency`, `name`), shared by
/// the API and the directory page. Installs rank popularity first (they are de-duplicated
/// per visitor and day), then views; uptime needs probes, so until then it is by name.
pub fn order(sort: &str, (a, sa): (&Server, &Summary), (b, sb): (&Server, &Summary)) -> Ordering {
    let primary = match sort {
        "popular" => sb
            .installs_30d
            .cmp(&sa.installs_30d)
            .then(sb.views_30d.cmp(&sa.views_30d)),
        "latency" => by_option(sa.p95_24h, sb.p95_24h),
        _ => Ordering::Equal,
    };
    primary
        .then_with(|| name_key(a).cmp(&name_key(b)))
        .then_with(|| a.id.cmp(&b.id))
}

async fn list(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = query?;
    let sort = q.sort.as_deref().unwrap_or("popular");
    if !matches!(sort, "popular" | "uptime" | "latency" | "name") {
        return Err(ApiError::invalid(format!(
            "sort must be popular, uptime, latency or name, not {sort:?}"
        )));
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
        let s = summary(&state, &server.id).await?;
        rows.push((server, s));
    }
    rows.sort_by(|(a, sa), (b, sb)| order(sort, (a, sa), (b, sb)));
    let total = rows.len();
    let page: Vec<Value> = rows
        .iter()
        .skip(offset)
        .take(limit)
        .map(|(s, sum)| server_json(s, Some(sum)))
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
    let s = summary(&state, &id).await?;
    Ok(Json(server_json(&server, Some(&s))))
}
