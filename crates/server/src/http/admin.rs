//! The operator API (DESIGN.md §4.4): registering servers and issuing and revoking
//! credentials, behind `Authorization: Bearer $MCP_METRICS_ADMIN_TOKEN`.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use mcp_metrics_core::model::ServerFields;
use mcp_metrics_core::names::is_valid_server_id;
use mcp_metrics_core::time::{format_rfc3339_ms, now_ms};
use mcp_metrics_store::StoreError;
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth;
use super::problem::{ApiError, ApiResult};
use super::servers::server_json;
use crate::keyring;
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/admin/servers", post(create_server))
        .route(
            "/api/v1/admin/servers/{id}",
            axum::routing::patch(update_server).delete(delete_server),
        )
        .route("/api/v1/admin/servers/{id}/keys", post(issue_key).get(list_keys))
        .route("/api/v1/admin/servers/{id}/keys/{key_id}", delete(revoke_key))
        .route("/api/v1/admin/ping", get(ping))
        .route("/api/v1/admin/aggregate", post(aggregate))
        .route("/functions/v1/metrics-aggregate", post(aggregate))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerBody {
    id: Option<String>,
    #[serde(flatten)]
    fields: ServerFields,
}

/// Checks the free-text fields of a server so the registry stays tidy.
pub fn validate_fields(fields: &ServerFields) -> Result<(), String> {
    let checks = [
        ("registry_name", &fields.registry_name, 200),
        ("name", &fields.name, 200),
        ("description", &fields.description, 2000),
        ("repository_url", &fields.repository_url, 500),
        ("remote_url", &fields.remote_url, 500),
        ("owner", &fields.owner, 200),
    ];
    for (field, value, max) in checks {
        if let Some(v) = value
            && (v.chars().count() > max || v.chars().any(char::is_control))
        {
            return Err(format!(
                "{field} must be at most {max} characters without control characters"
            ));
        }
    }
    for (field, value) in [
        ("repository_url", &fields.repository_url),
        ("remote_url", &fields.remote_url),
    ] {
        if let Some(v) = value
            && !(v.starts_with("https://") || v.starts_with("http://"))
        {
            return Err(format!("{field} must be an http(s) URL"));
        }
    }
    Ok(())
}

async fn ping(State(state): State<AppState>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    auth::operator(&state, &headers)?;
    Ok(Json(json!({ "ok": true })))
}

async fn create_server(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<ServerBody>, JsonRejection>,
) -> ApiResult<Response> {
    auth::operator(&state, &headers)?;
    let Json(ServerBody { id, fields }) = body?;
    let id = id.ok_or_else(|| ApiError::invalid("id is required"))?;
    if !is_valid_server_id(&id) {
        return Err(ApiError::invalid("id must match [a-z0-9][a-z0-9._-]{0,63}"));
    }
    validate_fields(&fields).map_err(ApiError::invalid)?;
    let server = state
        .store
        .create_server(&id, &fields, now_ms())
        .await
        .map_err(|e| match e {
            StoreError::Conflict => ApiError::new(
                mcp_metrics_core::codes::Code::Conflict,
                format!("server {id} already exists"),
            ),
            other => other.into(),
        })?;
    Ok((StatusCode::CREATED, Json(server_json(&server, None))).into_response())
}

async fn update_server(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Json<ServerBody>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    auth::operator(&state, &headers)?;
    let Json(body) = body?;
    if body.id.as_ref().is_some_and(|new| *new != id) {
        return Err(ApiError::invalid("a server's id cannot change"));
    }
    validate_fields(&body.fields).map_err(ApiError::invalid)?;
    let server = state
        .store
        .update_server(&id, &body.fields, now_ms())
        .await
        .map_err(|e| match e {
            StoreError::NotFound => ApiError::not_found("server"),
            other => other.into(),
        })?;
    Ok(Json(server_json(&server, None)))
}

async fn delete_server(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    auth::operator(&state, &headers)?;
    state.store.delete_server(&id).await.map_err(|e| match e {
        StoreError::NotFound => ApiError::not_found("server"),
        other => other.into(),
    })?;
    state.forget_server(&id);
    state.live.relay(
        &id,
        &crate::live::LiveMessage {
            kind: crate::live::SERVER_DELETED,
            data: json!({}),
        },
    );
    Ok(StatusCode::NO_CONTENT)
}

async fn issue_key(State(state): State<AppState>, headers: HeaderMap, Path(id): Path<String>) -> ApiResult<Response> {
    auth::operator(&state, &headers)?;
    if state.store.get_server(&id).await?.is_none() {
        return Err(ApiError::not_found("server"));
    }
    let issued = keyring::issue_credential(state.store.as_ref(), &state.master_key, &id).await?;
    tracing::info!(server_id = %id, key_id = %issued.key_id, "issued a credential");
    let body = json!({ "key_id": issued.key_id, "api_key": issued.api_key, "signing_secret": issued.signing_secret });
    Ok((StatusCode::CREATED, [("cache-control", "no-store")], Json(body)).into_response())
}

async fn list_keys(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    auth::operator(&state, &headers)?;
    if state.store.get_server(&id).await?.is_none() {
        return Err(ApiError::not_found("server"));
    }
    let keys: Vec<Value> = state
        .store
        .list_credentials(Some(&id))
        .await?
        .iter()
        .map(|c| {
            json!({
                "key_id": c.key_id,
                "created_at": format_rfc3339_ms(c.created_at),
                "revoked_at": c.revoked_at.map(format_rfc3339_ms),
                "last_used_at": c.last_used_at.map(format_rfc3339_ms),
            })
        })
        .collect();
    Ok(Json(json!({ "keys": keys, "next": null })))
}

async fn revoke_key(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((id, key_id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    auth::operator(&state, &headers)?;
    keyring::revoke_credential(state.store.as_ref(), &id, &key_id)
        .await
        .map_err(|e| match e {
            StoreError::NotFound => ApiError::not_found("credential"),
            other => other.into(),
        })?;
    // Writes would be refused at commit anyway; this node's next writes answer
    // `revoked_key` from the first check instead. Rare enough to forget every cached key.
    state.credentials.forget_all();
    tracing::info!(server_id = %id, key_id = %key_id, "revoked a credential");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AggregateBody {
    from: Option<Value>,
    to: Option<Value>,
}

fn time_value(v: &Value, what: &str) -> ApiResult<i64> {
    match v {
        Value::Number(n) => n
            .as_i64()
            .ok_or_else(|| ApiError::invalid(format!("{what} must be unix ms or RFC 3339"))),
        Value::String(s) => mcp_metrics_core::time::parse_time_param(s)
            .ok_or_else(|| ApiError::invalid(format!("{what} must be unix ms or RFC 3339"))),
        _ => Err(ApiError::invalid(format!("{what} must be unix ms or RFC 3339"))),
    }
}

/// Recomputes rollups (all dirty buckets, plus every minute with raw samples in
/// [from, to) when given) and applies retention; answers what was done.
async fn aggregate(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
    auth::operator(&state, &headers)?;
    let request: AggregateBody = if body.iter().all(u8::is_ascii_whitespace) {
        AggregateBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::invalid(e.to_string()))?
    };
    let started = std::time::Instant::now();
    let marked = match (&request.from, &request.to) {
        (None, None) => 0,
        (from, to) => {
            let from = from.as_ref().map(|v| time_value(v, "from")).transpose()?.unwrap_or(0);
            let to = to
                .as_ref()
                .map(|v| time_value(v, "to"))
                .transpose()?
                .unwrap_or(i64::MAX);
            if from >= to {
                return Err(ApiError::invalid("from must be before to"));
            }
            state.store.mark_range_dirty(from, to).await?
        }
    };
    let retention = &state.config.retention;
    let report = crate::rollup::run_until_idle(&state.store, retention, 3, |_, _| {}).await?;
    // As after the background job's passes: caches here and on other nodes refresh, and
    // open pages hear of the change.
    for (server, names) in &report.servers {
        state.cache.invalidate_server(server);
        let data = json!({ "names": names });
        state
            .live
            .publish(server, crate::live::LiveMessage { kind: "metric", data });
    }
    let deleted = crate::rollup::apply_retention(&state.store, retention).await?;
    tracing::info!(marked, buckets = report.buckets(), "aggregation run by the operator");
    Ok(Json(json!({
        "marked_minutes": marked,
        "rollups": report,
        "retention_deleted": deleted,
        "elapsed_ms": started.elapsed().as_millis() as u64,
    })))
}
