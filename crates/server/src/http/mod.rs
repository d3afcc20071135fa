//! The HTTP surface: one module per resource, each with its own `router()`, assembled
//! here with the request-metrics middleware and a problem+json 404.

pub mod admin;
pub mod auth;
pub mod events;
pub mod influx;
pub mod ingest;
pub mod live;
pub mod metrics;
pub mod ops;
pub mod otlp;
pub mod problem;
pub mod promwrite;
pub mod samples;
pub mod servers;
pub mod usage;
pub mod write;

use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use mcp_metrics_core::codes::Code;

use crate::state::AppState;
use problem::ApiError;

/// The whole application.
pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(ingest::router())
        .merge(influx::router())
        .merge(promwrite::router())
        .merge(otlp::router())
        .merge(servers::router())
        .merge(samples::router())
        .merge(metrics::router())
        .merge(usage::router())
        .merge(events::router())
        .merge(live::router())
        .merge(crate::charts::router())
        .merge(crate::web::router())
        .merge(admin::router())
        .merge(ops::router())
        .route_layer(middleware::from_fn_with_state(state.clone(), track))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn method_not_allowed() -> Response {
    ApiError::new(Code::MethodNotAllowed, "this endpoint does not accept that method").into_response()
}

async fn not_found() -> Response {
    ApiError::new(Code::NotFound, "no such endpoint; see docs/METRICS.md for the API").into_response()
}

/// Counts requests and their latency by route template (never by concrete path, which
/// would let clients create unbounded label values).
async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let method = request.method().as_str().to_owned();
    let response = next.run(request).await;
    state
        .telemetry
        .http_request(&route, &method, response.status().as_u16(), started.elapsed());
    response
}
