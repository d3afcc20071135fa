//! `POST /otlp/v1/metrics`: OTLP/HTTP metrics export (DESIGN.md §4.1, §5), so an
//! OpenTelemetry SDK or Collector points its OTLP exporter here and is done.
//!
//! Bodies are protobuf (`application/x-protobuf`) or OTLP/JSON (`application/json`),
//! optionally gzip-compressed, at most 20 MiB once decompressed. Answers are in the
//! request's encoding, as the OTLP/HTTP specification asks: an
//! `ExportMetricsServiceResponse` (with `partial_success` naming how many data points
//! were refused and why) or, on failure, a `google.rpc.Status`. Only 429/503 invite a
//! retry; a body that can never be accepted is a 400.
//!
//! Delta sums and cumulative histograms need each stream's previous state (a running
//! total, the previous cumulative counts). It is kept in the store's meta table, so every
//! node sharing the database continues the same stream, and it is written only after the
//! samples it produced are committed.

use std::borrow::Cow;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use mcp_metrics_core::codes::Code;
use mcp_metrics_core::ingest::{WireBatch, WireSample, WireTags, WireTime, WireValue};
use mcp_metrics_core::model::StoredCredential;
use mcp_metrics_core::otlp::{self, ExportMetricsPartialSuccess, ExportMetricsServiceResponse, StreamState};
use mcp_metrics_core::secrets::body_digest;
use prost::Message;
use sha2::{Digest, Sha256};

use super::auth;
use super::problem::{ApiError, ApiResult};
use crate::state::AppState;

/// 20 MiB, compressed or not (DESIGN.md §4.1).
pub const MAX_BYTES: usize = 20 << 20;

pub fn router() -> Router<AppState> {
    Router::new().route("/otlp/v1/metrics", post(export))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Protobuf,
    Json,
}

/// `google.rpc.Status`, the body of an OTLP/HTTP failure.
#[derive(Clone, PartialEq, prost::Message, serde::Serialize)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
}

fn encoding_of(headers: &HeaderMap) -> Option<Encoding> {
    let content_type = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let essence = content_type.split(';').next()?.trim().to_ascii_lowercase();
    match essence.as_str() {
        "application/x-protobuf" | "application/protobuf" => Some(Encoding::Protobuf),
        "application/json" => Some(Encoding::Json),
        _ => None,
    }
}

fn encoded(encoding: Encoding, status: StatusCode, protobuf: Vec<u8>, json: String) -> Response {
    let (content_type, body) = match encoding {
        Encoding::Protobuf => ("application/x-protobuf", protobuf),
        Encoding::Json => ("application/json", json.into_bytes()),
    };
    let mut response = (status, body).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// The gRPC code matching an HTTP status, for the `google.rpc.Status` body.
fn rpc_code(status: StatusCode) -> i32 {
    match status.as_u16() {
        400 | 413 | 415 => 3, // INVALID_ARGUMENT
        401 => 16,            // UNAUTHENTICATED
        403 => 7,             // PERMISSION_DENIED
        409 => 6,             // ALREADY_EXISTS
        429 => 8,             // RESOURCE_EXHAUSTED
        503 => 14,            // UNAVAILABLE
        _ => 13,              // INTERNAL
    }
}

fn failure(encoding: Encoding, error: ApiError) -> Response {
    let status = StatusCode::from_u16(error.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = RpcStatus {
        code: rpc_code(status),
        message: format!("{}: {}", error.code.as_str(), error.detail),
    };
    let json = serde_json::to_string(&body).unwrap_or_default();
    let mut response = encoded(encoding, status, body.encode_to_vec(), json);
    if let Some(secs) = error.retry_after_secs {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

async fn export(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    // A body of an unknown type is answered in JSON, the only encoding we can assume.
    let encoding = encoding_of(&headers);
    // Runs to its end even when the client goes away: an export cut off between
    // committing its samples and storing its streams' next state would leave the next
    // export building on the state before it, losing that export's deltas.
    let exporting = {
        let state = state.clone();
        tokio::spawn(async move { export_inner(&state, &headers, encoding, body).await })
    };
    let result = exporting
        .await
        .unwrap_or_else(|e| Err(ApiError::internal("an OTLP export task failed", e)));
    match result {
        Ok(response) => response,
        Err(error) => {
            state.telemetry.request_rejected(error.code);
            failure(encoding.unwrap_or(Encoding::Json), error)
        }
    }
}

/// A stream's stored state: the state after the last export that changed it, the state
/// before it, and that export's body digest (hex).
#[derive(serde::Serialize, serde::Deserialize)]
struct StreamRecord {
    before: Option<StreamState>,
    after: StreamState,
    digest: String,
}

/// Where a stream's state lives in the meta table: one key per (server, name, tags).
fn state_key(server_id: &str, name: &str, tags: &[(String, String)]) -> String {
    let mut hasher = Sha256::new();
    for part in [server_id, name]
        .into_iter()
        .chain(tags.iter().flat_map(|(k, v)| [k.as_str(), v.as_str()]))
    {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    format!("otlp.stream.{}", hex::encode(hasher.finalize()))
}

async fn export_inner(
    state: &AppState,
    headers: &HeaderMap,
    encoding: Option<Encoding>,
    body: Body,
) -> ApiResult<Response> {
    let credential = auth::exporter(state, headers).await?;
    let body = super::problem::read_body(headers, body, MAX_BYTES).await?;
    let encoding = encoding.ok_or_else(|| {
        ApiError::new(
            Code::UnsupportedMediaType,
            "OTLP/HTTP sends Content-Type: application/x-protobuf or application/json",
        )
    })?;
    let body = super::problem::decoded_body(headers, body, MAX_BYTES)?;
    let digest = body_digest(&body);
    // Decoding and mapping up to 20 MiB is CPU work: off the async workers.
    let mut mapped = tokio::task::spawn_blocking(move || {
        let request = match encoding {
            Encoding::Protobuf => otlp::decode_protobuf(&body),
            Encoding::Json => otlp::decode_json(&body),
        }
        .map_err(|e| e.to_string())?;
        Ok::<_, String>(otlp::map_request(&request))
    })
    .await
    .map_err(|e| ApiError::internal("decoding an OTLP export failed", e))?
    .map_err(ApiError::invalid)?;
    // Held from reading the streams' state to storing the next one: first this node's
    // turn (see `otlp_exports`), then the cluster's, so two nodes never continue one
    // stream from the same state. Exports without such streams (gauges, delta
    // histograms) read no state and need no turn: holding it across their commit capped
    // one server's OTLP ingest at one export per commit.
    let turn = if mapped.streams.is_empty() {
        None
    } else {
        let node = state.otlp_exports.lock(&credential.server_id).await;
        let cluster = state
            .store
            .cluster_lock(&format!("otlp.streams.{}", credential.server_id))
            .await?;
        Some((node, cluster))
    };

    // Released here whatever the storing returns: before the answer and while this
    // node's turn is still held, so the next export of the server finds the cluster's
    // lock free. A lock dropped instead (a panic) is released in the background.
    let stored = store_export(state, &credential, &mut mapped, digest).await;
    if let Some((_node, cluster)) = turn
        && let Err(e) = cluster.release().await
    {
        // The lock goes with its session.
        tracing::warn!(error = %e, "releasing an OTLP stream lock");
    }
    let (accepted, refused_points) = stored?;

    let message = mapped.refused.examples().join("; ");
    if !refused_points.is_empty() && refused_points.len() == mapped.data_points && accepted == 0 {
        return Err(ApiError::invalid(format!(
            "all {} data points were refused, e.g. {message}",
            mapped.data_points
        )));
    }
    let partial = (!refused_points.is_empty()).then(|| ExportMetricsPartialSuccess {
        rejected_data_points: refused_points.len() as i64,
        error_message: format!("{} data points refused, e.g. {message}", refused_points.len()),
    });
    // OTLP/JSON writes 64-bit integers as strings, which the generated serializer does not.
    let json = match &partial {
        Some(p) => serde_json::json!({"partialSuccess": {
            "rejectedDataPoints": p.rejected_data_points.to_string(),
            "errorMessage": p.error_message,
        }})
        .to_string(),
        None => "{}".to_string(),
    };
    let response = ExportMetricsServiceResponse {
        partial_success: partial,
    };
    Ok(encoded(encoding, StatusCode::OK, response.encode_to_vec(), json))
}

/// Continues the export's streams from their stored state, commits all its samples in
/// parts, then stores the streams' next state; returns the samples accepted and the data
/// points refused. Called holding the streams' lock, if the export has streams.
async fn store_export(
    state: &AppState,
    credential: &StoredCredential,
    mapped: &mut otlp::Mapped,
    digest: [u8; 32],
) -> ApiResult<(usize, Vec<usize>)> {
    let otlp::Mapped {
        points,
        streams,
        refused,
        budget_left: budget,
        ..
    } = mapped;
    // Streams continue from their stored state. The record keeps the state before the
    // export that produced it and that export's digest, so a retry of it (whose parts
    // are all duplicates) computes the same state again instead of applying it twice,
    // and a retry after a lost state write still writes it.
    let digest_hex = hex::encode(digest);
    let mut new_states = Vec::with_capacity(streams.len());
    for stream in streams.iter() {
        let key = state_key(&credential.server_id, &stream.name, &stream.tags);
        let stored = state
            .store
            .meta_get(&key)
            .await?
            .and_then(|text| serde_json::from_str::<StreamRecord>(&text).ok());
        let base = match &stored {
            Some(r) if r.digest == digest_hex => r.before.clone(),
            Some(r) => Some(r.after.clone()),
            None => None,
        };
        let (values, next) = otlp::resolve_stream(stream, base.as_ref());
        let values = match values {
            Ok(values) => values,
            Err(reason) => {
                refused.add(stream.data_point, || format!("{}: {reason}", stream.name));
                Vec::new()
            }
        };
        let copies = if stream.response_time.is_some() { 2 } else { 1 };
        if values.len() * copies > *budget {
            refused.add(stream.data_point, || {
                format!(
                    "{}: the request maps to more than {} samples; send fewer points per export",
                    stream.name,
                    otlp::MAX_SAMPLES_PER_REQUEST
                )
            });
            continue;
        }
        *budget -= values.len() * copies;
        if stream.kind == mcp_metrics_core::model::Kind::Histogram {
            otlp::push_observations(
                points,
                &stream.name,
                &stream.tags,
                stream.response_time.as_ref(),
                stream.timestamp_ms,
                &values,
                stream.data_point,
            );
        } else {
            let at = (stream.timestamp_ms, stream.data_point);
            otlp::push_values(points, &stream.name, &stream.tags, stream.kind, at, values);
        }
        let record = StreamRecord {
            before: base,
            after: next,
            digest: digest_hex.clone(),
        };
        new_states.push((key, stream.data_point, record));
    }

    // Written in parts of at most the per-request sample limit, each with its own retry
    // digest: a retried export skips the parts that were already committed. An export
    // with no samples still commits one empty part: the commit is where the writer
    // confirms the key, before any stream state is stored below.
    let chunk = state.sample_limits().max_samples.max(1);
    let parts: Vec<&[otlp::Point]> = if points.is_empty() {
        vec![&[]]
    } else {
        points.chunks(chunk).collect()
    };
    // The whole export is charged to the server's allowance before its first part, so a
    // 429 stores nothing of it; the parts a retry finds stored already, and those never
    // committed, are given back.
    let charged = super::write::charge(state, credential, points.len())?;
    let mut not_stored = points.len();
    let mut accepted = 0;
    for (part, slice) in parts.into_iter().enumerate() {
        let batch = WireBatch {
            server_id: Cow::Borrowed(&credential.server_id),
            metrics: slice
                .iter()
                .map(|p| WireSample {
                    name: Cow::Borrowed(&p.name),
                    value: if p.value.is_finite() {
                        WireValue::Number(p.value)
                    } else {
                        WireValue::NotANumber
                    },
                    kind: Some(Cow::Borrowed(p.kind.as_str())),
                    timestamp: Some(WireTime::Millis(p.timestamp_ms as f64)),
                    tags: WireTags::Strings(&p.tags),
                })
                .collect(),
        };
        let part_digest = if part == 0 {
            digest
        } else {
            let mut hasher = Sha256::new();
            hasher.update(digest);
            hasher.update((part as u64).to_le_bytes());
            hasher.finalize().into()
        };
        let stored = match super::write::commit_charged(state, credential, &batch, part_digest, None).await {
            Ok(stored) => stored,
            Err(e) => {
                state.write_rate.refund(&credential.server_id, charged, not_stored);
                return Err(e);
            }
        };
        if !stored.duplicate {
            accepted += stored.accepted;
            not_stored -= slice.len();
        }
        for r in stored.rejected {
            let point = &slice[r.index];
            refused.add(point.data_point, || format!("{}: {}", point.name, r.detail));
        }
    }
    state.write_rate.refund(&credential.server_id, charged, not_stored);
    // Every part is committed (or was, by an earlier try of this body). A stream whose
    // samples were refused keeps no state: nothing of it was stored.
    let refused_points = refused.points();
    for (key, data_point, record) in new_states {
        if refused_points.binary_search(&data_point).is_ok() {
            continue;
        }
        let text =
            serde_json::to_string(&record).map_err(|e| ApiError::internal("encoding an OTLP stream state", e))?;
        state.store.meta_set(&key, &text).await?;
    }
    Ok((accepted, refused_points))
}
