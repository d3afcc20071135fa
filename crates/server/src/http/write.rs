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
use crate::ingest::rate_limit::{Charge, retry_after_secs};
use crate::state::AppState;

/// What became of a batch: samples stored, the ones refused (by index), and whether
/// the body was a retry acknowledged without storing again.
pub struct Stored {
    pub accepted: usize,
    pub rejected: Vec<Rejection>,
    pub duplicate: bool,
}

/// Validates and commits a decoded batch for the credential's server, charged to the
/// server's write allowance. A retried body (same key, same bytes, inside the retry
/// window) is acknowledged and stored once; a signed request whose signature was already
/// used is refused (409). Neither keeps its charge.
pub async fn commit(
    state: &AppState,
    credential: &StoredCredential,
    batch: &WireBatch<'_>,
    body: &[u8],
    signature: Option<[u8; 32]>,
) -> ApiResult<Stored> {
    check_sample_count(state, batch.metrics.len())?;
    let charged = charge(state, credential, batch.metrics.len())?;
    let stored = commit_charged(state, credential, batch, body_digest(body), signature).await;
    if !matches!(&stored, Ok(s) if !s.duplicate) {
        state
            .write_rate
            .refund(&credential.server_id, charged, batch.metrics.len());
    }
    stored
}

/// 413 for a request of more samples than one may carry.
fn check_sample_count(state: &AppState, samples: usize) -> ApiResult<()> {
    let limits = state.sample_limits();
    if samples > limits.max_samples {
        return Err(ApiError::new(
            Code::TooManySamples,
            format!(
                "a request may carry at most {} samples; this one has {samples}",
                limits.max_samples
            ),
        ));
    }
    Ok(())
}

/// Charges `samples` to the server's write allowance, or answers 429 with the seconds
/// until it would hold them. The caller gives back what it then does not store.
pub fn charge(state: &AppState, credential: &StoredCredential, samples: usize) -> ApiResult<Charge> {
    state.write_rate.admit(&credential.server_id, samples).map_err(|wait| {
        state.telemetry.write_rate_limited(&credential.server_id);
        let limit = &state.config.ingest;
        ApiError::new(
            Code::RateLimited,
            format!(
                "this server may write {} samples a second (bursts of {}); slow down, or retry after the time Retry-After gives",
                limit.samples_per_second_per_server, limit.burst_samples_per_server
            ),
        )
        .retry_after(retry_after_secs(wait))
    })
}

/// [`commit`] of a batch already charged and within the per-request sample limit (OTLP
/// cuts its parts at it), with the retry digest given: a body written in several commits
/// is charged once and gives each part its own digest, so a retry recognises each part.
pub async fn commit_charged(
    state: &AppState,
    credential: &StoredCredential,
    batch: &WireBatch<'_>,
    digest: [u8; 32],
    signature: Option<[u8; 32]>,
) -> ApiResult<Stored> {
    let limits = state.sample_limits();
    debug_assert!(
        batch.metrics.len() <= limits.max_samples,
        "callers check the count first"
    );
    let epoch = state.series.epoch();
    let prepared = prepare(batch, &credential.server_id, &state.series, now_ms(), &limits);
    let mut rejected = prepared.rejected;
    let mut request = prepared.request;
    request.key_id = credential.key_id.clone();
    request.require_credential = true;
    request.signature = signature;
    request.body_digest = Some(digest);
    let mut accepted = request.samples.len();
    let duplicate = match state.queue.submit(request).await.map_err(super::ingest::submit_error)? {
        RequestOutcome::Stored {
            series,
            kind_conflicts,
            series_refused,
            ..
        } => {
            if !kind_conflicts.is_empty() || !series_refused.is_empty() {
                // What the writer refused, by position in the prepared request.
                let mut refusals: Vec<(u32, Code, String)> = kind_conflicts
                    .iter()
                    .map(|&(position, kind)| {
                        let detail = format!(
                            "this series is a {}: another request or node created it as one first",
                            kind.as_str()
                        );
                        (position, Code::KindMismatch, detail)
                    })
                    .chain(series_refused.iter().map(|&position| {
                        let detail = format!(
                            "this server has reached its limit of {} series; samples of the series it has are still stored",
                            state.config.ingest.max_series_per_server
                        );
                        (position, Code::TooManySeries, detail)
                    }))
                    .collect();
                refusals.sort_unstable_by_key(|r| r.0);
                let positions: Vec<u32> = refusals.iter().map(|r| r.0).collect();
                let indices = indices_of_positions(batch.metrics.len(), &rejected, &positions);
                debug_assert_eq!(indices.len(), positions.len(), "every refusal names a prepared sample");
                accepted -= refusals.len();
                for (index, (_, code, detail)) in indices.into_iter().zip(refusals) {
                    rejected.push(Rejection { index, code, detail });
                }
                rejected.sort_by_key(|r| r.index);
            }
            // Counted once the writer has confirmed the key (the server's counts are on
            // its dashboard) and only for the try that was stored, not for its retries.
            state
                .telemetry
                .samples_rejected(&credential.server_id, rejected.iter().map(|r| r.code));
            if !series.is_empty() {
                state.series.insert_created(epoch, &series);
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
        RequestOutcome::Replayed => return Err(replayed()),
        // Revoked, or deleted with its server, after the key was checked.
        RequestOutcome::ServerGone => return Err(super::auth::refused_at_commit(state, credential).await),
    };
    Ok(Stored {
        accepted,
        rejected,
        duplicate,
    })
}

/// The answer to a signed request whose signature the writer found already used.
pub fn replayed() -> ApiError {
    ApiError::new(
        Code::ReplayedRequest,
        "this signature was already used; sign each request afresh",
    )
}

/// The batch indices of the samples at these positions (ascending) of the prepared
/// request, which holds, in order, every sample of the batch that was not rejected.
fn indices_of_positions(total: usize, rejected: &[Rejection], positions: &[u32]) -> Vec<usize> {
    let mut rejected = rejected.iter().map(|r| r.index).peekable();
    let mut wanted = positions.iter().peekable();
    let mut found = Vec::with_capacity(positions.len());
    let mut position = 0u32;
    for index in 0..total {
        if rejected.next_if_eq(&index).is_some() {
            continue;
        }
        if wanted.next_if_eq(&&position).is_some() {
            found.push(index);
        }
        position += 1;
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejection(index: usize) -> Rejection {
        Rejection {
            index,
            code: Code::InvalidValue,
            detail: String::new(),
        }
    }

    #[test]
    fn positions_skip_the_rejected_samples() {
        let rejected = [rejection(0), rejection(3), rejection(4)];
        // Prepared samples are batch indices 1, 2, 5, 6.
        assert_eq!(indices_of_positions(7, &rejected, &[0, 2, 3]), vec![1, 5, 6]);
        assert_eq!(indices_of_positions(7, &[], &[0, 6]), vec![0, 6]);
        assert_eq!(indices_of_positions(7, &rejected, &[]), Vec::<usize>::new());
    }
}
