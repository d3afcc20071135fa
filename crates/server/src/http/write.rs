//! The shared back half of every sample write (signed JSON, line protocol,
//! remote-write): limits, validation and series resolution, the group-commit writer and
//! its replay and retry guards, telemetry. One pipeline, several front doors
//! (DESIGN.md §4.1).

use std::sync::atomic::Ordering;

use mcp_metrics_core::codes::Code;
use mcp_metrics_core::ingest::{Rejection, WireBatch};
use mcp_metrics_core::model::StoredCredential;
use mcp_metrics_core::secrets::body_digest;
use mcp_metrics_core::time::now_ms;
use mcp_metrics_store::RequestOutcome;

use super::problem::{ApiError, ApiResult};
use crate::ingest::prepare;
use crate::state::AppState;

/// What became of a batch: samples stored, the ones refused (by index), and whether
/// the body was a retry acknowledged without storing again.
pub struct Stored {
    pub accepted: usize,
    pub rejected: Vec<Rejection>,
    pub duplicate: bool,
}

/// Validates and commits a decoded batch for the credential's server. A retried body
/// (same key, same bytes, inside the retry window) is acknowledged and stored once; a
/// signed request whose signature was already used is refused (409).
pub async fn commit(
    state: &AppState,
    credential: &StoredCredential,
    batch: &WireBatch<'_>,
    body: &[u8],
    signature: Option<[u8; 32]>,
) -> ApiResult<Stored> {
    commit_with_digest(state, credential, batch, body_digest(body), signature).await
}

/// [`commit`] with the retry digest given: a body written in several commits gives each
/// its own digest, so a retry recognises each part.
pub async fn commit_with_digest(
    state: &AppState,
    credential: &StoredCredential,
    batch: &WireBatch<'_>,
    digest: [u8; 32],
    signature: Option<[u8; 32]>,
) -> ApiResult<Stored> {
    let limits = state.sample_limits();
    if batch.metrics.len() > limits.max_samples {
        return Err(ApiError::new(
            Code::TooManySamples,
            format!(
                "a request may carry at most {} samples; this one has {}",
                limits.max_samples,
                batch.metrics.len()
            ),
        ));
    }
    let prepared = prepare(batch, &credential.server_id, &state.series, now_ms(), &limits);
    for r in &prepared.rejected {
        state.telemetry.sample_rejected(r.code);
        state.telemetry.server_sample_rejected(&credential.server_id, r.code);
    }
    let mut request = prepared.request;
    request.key_id = credential.key_id.clone();
    request.signature = signature;
    request.body_digest = Some(digest);
    let accepted = request.samples.len();
    let duplicate = match state.queue.submit(request).await.map_err(super::ingest::submit_error)? {
        RequestOutcome::Stored { series, .. } => {
            if !series.is_empty() {
                state.series.insert_all(&series);
                state
                    .telemetry
                    .series_cached
                    .store(state.series.len() as u64, Ordering::Relaxed);
            }
            state
                .telemetry
                .samples_accepted
                .fetch_add(accepted as u64, Ordering::Relaxed);
            false
        }
        RequestOutcome::Duplicate => {
            state.telemetry.duplicate_requests.fetch_add(1, Ordering::Relaxed);
            true
        }
        RequestOutcome::Replayed => {
            return Err(ApiError::new(
                Code::ReplayedRequest,
                "this signature was already used; sign each request afresh",
            ));
        }
    };
    Ok(Stored {
        accepted,
        rejected: prepared.rejected,
        duplicate,
    })
}
