//! Signed writes by authors: `POST /api/v1/metrics` (alias
//! `/functions/v1/metrics-collect`) and `POST /api/v1/events` (DESIGN.md §4.1).
//!
//! The order of checks is fixed so each failure has one answer: key (401) → body size
//! (413) → content type (415) → signature and clock (401) → JSON shape (400/413) → key's
//! server (403) → per-sample validation → group commit (replay 409, overload 503).

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use mcp_metrics_core::codes::Code;
use mcp_metrics_core::ingest::{decode_event, decode_json};
use mcp_metrics_core::secrets::body_digest;
use mcp_metrics_core::time::now_ms;
use mcp_metrics_store::{RequestOutcome, WriteRequest};
use serde_json::json;

use super::auth;
use super::problem::{ApiError, ApiResult};
use crate::ingest::writer::SubmitError;
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/metrics", post(collect))
        .route("/functions/v1/metrics-collect", post(collect))
        .route("/api/v1/events", post(post_event))
}

fn require_json(headers: &HeaderMap) -> ApiResult<()> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(ApiError::new(
            Code::UnsupportedMediaType,
            "send Content-Type: application/json",
        ))
    }
}

pub fn submit_error(e: SubmitError) -> ApiError {
    match e {
        SubmitError::Overloaded => {
            ApiError::new(Code::Overloaded, "the write queue is full; retry after a moment").retry_after(1)
        }
        SubmitError::Closed => ApiError::new(Code::Unavailable, "the service is shutting down").retry_after(5),
        SubmitError::Store(e) => e.into(),
    }
}

async fn collect(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    super::problem::counted(&state, collect_inner(&state, &headers, body).await)
}

async fn collect_inner(state: &AppState, headers: &HeaderMap, body: Body) -> ApiResult<Response> {
    let credential = auth::author(state, headers).await?;
    let body = super::problem::read_body(headers, body, state.config.ingest.max_body_bytes).await?;
    require_json(headers)?;
    let signature = auth::verify_signature(state, &credential, headers, &body)?;
    let limits = state.sample_limits();
    let batch = decode_json(&body, &limits).map_err(|e| ApiError::new(e.code(), e.to_string()))?;
    auth::require_server(&credential, &batch.server_id)?;

    let stored = super::write::commit(state, &credential, &batch, &body, Some(signature)).await?;
    let mut response = Json(json!({ "accepted": stored.accepted, "rejected": stored.rejected })).into_response();
    if stored.duplicate {
        // The body was already stored from this key: acknowledged again, stored once.
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
}

async fn post_event(State(state): State<AppState>, headers: HeaderMap, body: Body) -> ApiResult<Response> {
    let credential = auth::author(&state, &headers).await?;
    let body = super::problem::read_body(&headers, body, state.config.ingest.max_body_bytes).await?;
    require_json(&headers)?;
    let signature = auth::verify_signature(&state, &credential, &headers, &body)?;
    let event = decode_event(&body, now_ms()).map_err(|e| ApiError::new(e.code(), e.to_string()))?;
    auth::require_server(&credential, &event.server_id)?;
    // The event is written by the group-commit writer in the same transaction as its
    // replay and retry guards, so a replay is refused and a re-signed retry stored once.
    let (kind, title) = (event.kind.clone(), event.title.clone());
    let request = WriteRequest {
        server_id: credential.server_id.clone(),
        key_id: credential.key_id.clone(),
        require_credential: true,
        signature: Some(signature),
        body_digest: Some(body_digest(&body)),
        event: Some(event),
        ..Default::default()
    };
    let id = match state.queue.submit(request).await.map_err(submit_error)? {
        RequestOutcome::Stored { event_id, .. } => {
            let data = json!({ "id": event_id, "kind": kind, "title": title });
            state
                .live
                .publish(&credential.server_id, crate::live::LiveMessage { kind: "event", data });
            event_id
        }
        RequestOutcome::Duplicate => {
            let mut response = Json(json!({ "id": null, "duplicate": true })).into_response();
            response
                .headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
            return Ok(response);
        }
        RequestOutcome::Replayed => return Err(super::write::replayed()),
        // Revoked, or deleted with its server, after the key was checked.
        RequestOutcome::ServerGone => return Err(super::auth::refused_at_commit(&state, &credential).await),
    };
    Ok((StatusCode::CREATED, Json(json!({ "id": id }))).into_response())
}
