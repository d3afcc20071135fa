//! `POST /api/v1/prom/write`: Prometheus remote-write 1.0 (DESIGN.md §4.1, §5).
//!
//! The key comes in `X-API-Key` or `Authorization: Bearer` (Prometheus' `authorization`
//! or `bearer_token` settings); samples go to the key's server through the same pipeline
//! as signed JSON. Status codes follow the remote-write contract: 204 when stored, 400
//! for data that can never be accepted (Prometheus then drops it instead of retrying),
//! 413 for oversized bodies, 429/503 only when a retry can succeed.

use std::borrow::Cow;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use mcp_metrics_core::codes::Code;
use mcp_metrics_core::ingest::{WireBatch, WireSample, WireTags, WireTime, WireValue};
use mcp_metrics_core::promwrite::{self, PromError};

use super::auth;
use super::problem::{ApiError, ApiResult};
use crate::state::AppState;

/// Compressed bodies up to 20 MiB, and at most 20 MiB once decompressed (DESIGN.md §4.1).
pub const MAX_BYTES: usize = 20 << 20;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/v1/prom/write", post(write))
}

async fn write(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    super::problem::counted(&state, write_inner(&state, &headers, body).await)
}

async fn write_inner(state: &AppState, headers: &HeaderMap, body: Body) -> ApiResult<Response> {
    let credential = auth::exporter(state, headers).await?;
    let body = super::problem::read_body(headers, body, MAX_BYTES).await?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type.starts_with("application/x-protobuf") {
        return Err(ApiError::new(
            Code::UnsupportedMediaType,
            "remote-write sends Content-Type: application/x-protobuf",
        ));
    }
    let refuse = |e: PromError| match e {
        PromError::TooLarge(_) => ApiError::new(Code::PayloadTooLarge, e.to_string()),
        other => ApiError::invalid(other.to_string()),
    };
    let raw = promwrite::decompress(&body, MAX_BYTES).map_err(refuse)?;
    let decoded = promwrite::decode(&raw).map_err(refuse)?;
    // A series that repeats a label name is refused whole; the others go on.
    let (series, repeating): (Vec<_>, Vec<_>) = decoded.series().partition(|s| s.repeated_label.is_none());
    let refused_repeating: usize = repeating.iter().map(|s| s.samples.len()).sum();
    let mut examples: Vec<String> = repeating
        .iter()
        .filter(|s| !s.samples.is_empty())
        .take(5)
        .map(|s| {
            let label = s.repeated_label.unwrap_or_default();
            format!("{} {:?}: the series repeats the label name {label:?}", s.name, s.tags)
        })
        .collect();
    let batch = WireBatch {
        server_id: Cow::Borrowed(&credential.server_id),
        metrics: series
            .iter()
            .flat_map(|s| {
                let kind = Cow::Borrowed(if s.counter { "counter" } else { "gauge" });
                // The decoder dropped NaN samples (stale markers and Prometheus' "no
                // value"), so a Prometheus does not log a non-recoverable error for its
                // own summaries. Infinities are refused per sample.
                s.samples.iter().map(move |sample| WireSample {
                    name: Cow::Borrowed(s.name),
                    value: if sample.value.is_finite() {
                        WireValue::Number(sample.value)
                    } else {
                        WireValue::NotANumber
                    },
                    kind: Some(kind.clone()),
                    timestamp: Some(WireTime::Millis(sample.timestamp as f64)),
                    tags: WireTags::Lent(s.tags),
                })
            })
            .collect(),
    };
    // Committed even with nothing left to store (all NaN samples, or every series
    // refused): the commit is where the writer confirms the key.
    let super::write::Stored { accepted, rejected, .. } =
        super::write::commit(state, &credential, &batch, &body, None).await?;
    if rejected.is_empty() && refused_repeating == 0 {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    examples.extend(rejected.iter().take(5 - examples.len()).map(|r| {
        let sample = &batch.metrics[r.index];
        format!("{} {:?}: {}", sample.name, sample.tags().collect::<Vec<_>>(), r.detail)
    }));
    Err(ApiError::invalid(format!(
        "{accepted} samples stored, {} refused (not retried), e.g. {}",
        rejected.len() + refused_repeating,
        examples.join("; ")
    )))
}
