//! RFC 9457 problem details: the one error type of the HTTP layer.
//!
//! Every handler returns `Result<_, ApiError>`. A store failure is logged with its
//! internal text and answered with a generic detail, so internals never reach a client.

use axum::body::{Body, Bytes};
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::http::HeaderMap;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use mcp_metrics_core::codes::Code;
use mcp_metrics_store::StoreError;
use serde_json::json;

#[derive(Debug)]
pub struct ApiError {
    pub code: Code,
    pub detail: String,
    pub retry_after_secs: Option<u64>,
}

impl ApiError {
    pub fn new(code: Code, detail: impl Into<String>) -> Self {
        ApiError {
            code,
            detail: detail.into(),
            retry_after_secs: None,
        }
    }

    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }

    pub fn not_found(what: &str) -> Self {
        ApiError::new(Code::NotFound, format!("{what} not found"))
    }

    pub fn invalid(detail: impl Into<String>) -> Self {
        ApiError::new(Code::InvalidPayload, detail)
    }

    /// A failure of ours: `error` is logged with `what` went wrong, and the client hears
    /// only that something did.
    pub fn internal(what: &str, error: impl std::fmt::Display) -> Self {
        tracing::error!(error = %error, "{what}");
        ApiError::new(Code::Internal, "an internal error occurred; it has been logged")
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => ApiError::not_found("resource"),
            StoreError::Conflict => ApiError::new(Code::Conflict, "a resource with this identity already exists"),
            StoreError::Invalid(detail) => ApiError::invalid(detail),
            StoreError::Unavailable(internal) => {
                tracing::warn!(error = %internal, "database unavailable");
                ApiError::new(Code::Unavailable, "the database is unavailable; retry shortly").retry_after(2)
            }
            StoreError::Database(internal) => ApiError::internal("database error", internal),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection.status() {
            StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                ApiError::new(Code::UnsupportedMediaType, "send Content-Type: application/json")
            }
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(Code::PayloadTooLarge, "the body is too large"),
            _ => ApiError::invalid(rejection.body_text()),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        ApiError::invalid(rejection.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = json!({
            "type": format!("https://mcp-metrics.dev/problems/{}", self.code),
            "title": self.code.title(),
            "status": status.as_u16(),
            "detail": self.detail,
            "code": self.code.as_str(),
        });
        let mut response = (status, body.to_string()).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(secs) = self.retry_after_secs {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if status == StatusCode::UNAUTHORIZED {
            // The operator proves itself with a bearer token, authors with an API key.
            let scheme = if self.code == Code::Unauthorized {
                "Bearer"
            } else {
                "ApiKey"
            };
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(scheme));
        }
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// 413 for a body over `limit` bytes.
fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        Code::PayloadTooLarge,
        format!("the body is larger than the limit of {limit} bytes"),
    )
}

/// Reads a request body of at most `limit` bytes: the one way every POST route limits its
/// body (413 past it). Write routes authenticate from the headers first, so a client
/// without a valid key never gets the server to buffer a body (up to 20 MiB on the
/// exporter endpoints); a declared `Content-Length` over the limit is refused before any
/// of the body is read, and a body sent without one is cut off at the limit.
pub async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> ApiResult<Bytes> {
    use futures_util::StreamExt;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large(limit));
    }
    let mut stream = body.into_data_stream();
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut total = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| ApiError::invalid("the request body could not be read"))?;
        total += chunk.len();
        if total > limit {
            return Err(too_large(limit));
        }
        chunks.push(chunk);
    }
    Ok(match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.swap_remove(0),
        _ => {
            let mut whole = Vec::with_capacity(total);
            for chunk in &chunks {
                whole.extend_from_slice(chunk);
            }
            Bytes::from(whole)
        }
    })
}

/// Answers a write endpoint, counting a refused request by its code in `/metrics`.
pub fn counted(state: &crate::state::AppState, result: ApiResult<Response>) -> Response {
    result.unwrap_or_else(|e| {
        state.telemetry.request_rejected(e.code);
        e.into_response()
    })
}

/// The body with its `Content-Encoding` undone: identity, or gzip (OTLP exporters and
/// Telegraf compress). The decompressed size is limited too, so a small "zip bomb" is a
/// 413 rather than a large allocation; an unknown encoding is a 415.
pub fn decoded_body(headers: &axum::http::HeaderMap, body: Bytes, limit: usize) -> ApiResult<Bytes> {
    use std::io::Read;
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default();
    match encoding.as_str() {
        "" | "identity" => Ok(body),
        "gzip" | "x-gzip" => {
            let mut decoded = Vec::with_capacity(body.len().saturating_mul(4).min(limit));
            flate2::read::MultiGzDecoder::new(&body[..])
                .take(limit as u64 + 1)
                .read_to_end(&mut decoded)
                .map_err(|e| ApiError::invalid(format!("the gzip body could not be decompressed: {e}")))?;
            if decoded.len() > limit {
                return Err(ApiError::new(
                    Code::PayloadTooLarge,
                    format!("the decompressed body is larger than the limit of {limit} bytes"),
                ));
            }
            Ok(Bytes::from(decoded))
        }
        other => Err(ApiError::new(
            Code::UnsupportedMediaType,
            format!("Content-Encoding {other} is not supported; send gzip or no encoding"),
        )),
    }
}
