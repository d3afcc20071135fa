//! Authentication of authors (API key, optionally a request signature) and of the
//! operator (admin bearer token), as DESIGN.md §3 assigns roles.
//!
//! Writes find their key in a short-lived cache of this node's recent lookups: the
//! group-commit writer checks the key again inside the commit's transaction, so a key
//! revoked (on any node, or by the CLI) since it was cached still stores nothing, and the
//! answer then says why from a fresh lookup. Every write therefore ends in a commit, even
//! one with nothing to store (see `crate::key_cache`). Reads (the sample API, the
//! dashboard login) are not checked again later, so they always look the key up.

use std::sync::Arc;

use axum::http::HeaderMap;
use mcp_metrics_core::codes::Code;
use mcp_metrics_core::model::StoredCredential;
use mcp_metrics_core::secrets::hash_api_key;
use mcp_metrics_core::signature::{SignatureError, SignatureHeader};
use mcp_metrics_core::time::now_ms;
use subtle::ConstantTimeEq;

use super::problem::{ApiError, ApiResult};
use crate::state::AppState;

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// The API key from `X-API-Key`, or from `Authorization: Bearer|Token` where allowed.
fn api_key(headers: &HeaderMap, allow_authorization: bool) -> Option<&str> {
    header(headers, "x-api-key").or_else(|| {
        if !allow_authorization {
            return None;
        }
        let value = header(headers, "authorization")?;
        let (scheme, token) = value.split_once(' ')?;
        (scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("token")).then(|| token.trim())
    })
}

/// Finds the active credential the API key (in `X-API-Key`) of a request that writes
/// belongs to; the writer confirms it at commit (see the module doc).
pub async fn author(state: &AppState, headers: &HeaderMap) -> ApiResult<Arc<StoredCredential>> {
    credential_for(state, api_key(headers, false), Lookup::Cached).await
}

/// Like [`author`], also accepting `Authorization: Bearer|Token <key>`, for standard
/// exporters that cannot send custom headers or sign (DESIGN.md §4.1 ecosystem).
pub async fn exporter(state: &AppState, headers: &HeaderMap) -> ApiResult<Arc<StoredCredential>> {
    credential_for(state, api_key(headers, true), Lookup::Cached).await
}

/// Finds the active credential the API key (in `X-API-Key`) of a request that only
/// reads belongs to, from the database: nothing checks it again.
pub async fn reader(state: &AppState, headers: &HeaderMap) -> ApiResult<Arc<StoredCredential>> {
    credential_for(state, api_key(headers, false), Lookup::Fresh).await
}

/// The answer to a write the writer refused because its key is no longer its server's
/// active credential: `revoked_key` if it was revoked, else `unknown_key` (the key
/// went with its deleted server).
pub async fn refused_at_commit(state: &AppState, credential: &StoredCredential) -> ApiError {
    state.credentials.forget(&credential.api_key_hash);
    match state.store.credential_by_hash(&credential.api_key_hash).await {
        // Still active means it went and came back between the commit and this look.
        Ok(found) => active(found).err().unwrap_or_else(unknown_key),
        Err(e) => e.into(),
    }
}

/// A key that no credential has (never issued, or gone with its server).
pub fn unknown_key() -> ApiError {
    ApiError::new(Code::UnknownKey, "this API key is not known")
}

fn revoked_key() -> ApiError {
    ApiError::new(Code::RevokedKey, "this API key has been revoked")
}

#[derive(Clone, Copy, PartialEq)]
enum Lookup {
    /// From the node's cache when there, for writes: the writer checks again.
    Cached,
    /// From the database, for what nothing checks again.
    Fresh,
}

async fn credential_for(state: &AppState, key: Option<&str>, lookup: Lookup) -> ApiResult<Arc<StoredCredential>> {
    let key = key.ok_or_else(|| {
        ApiError::new(
            Code::MissingKey,
            "send the server's API key in X-API-Key (or Authorization: Bearer)",
        )
    })?;
    let hash = hash_api_key(key);
    if lookup == Lookup::Cached
        && let Some(credential) = state.credentials.get(&hash)
    {
        return Ok(credential);
    }
    let epoch = state.credentials.epoch();
    // Only active keys are cached: unknown keys cannot fill the cache, and a revoked key
    // is refused from the database every time, and forgotten if this node cached it.
    let credential = match active(state.store.credential_by_hash(&hash).await?) {
        Ok(credential) => Arc::new(credential),
        Err(refused) => {
            state.credentials.forget(&hash);
            return Err(refused);
        }
    };
    state.credentials.insert(epoch, hash, credential.clone());
    Ok(credential)
}

fn active(credential: Option<StoredCredential>) -> ApiResult<StoredCredential> {
    let credential = credential.ok_or_else(unknown_key)?;
    if credential.revoked_at.is_some() {
        return Err(revoked_key());
    }
    Ok(credential)
}

/// Checks `X-Signature` over the raw body with the credential's signing secret and
/// returns the signature, which identifies the request for replay protection.
pub fn verify_signature(
    state: &AppState,
    credential: &StoredCredential,
    headers: &HeaderMap,
    body: &[u8],
) -> ApiResult<[u8; 32]> {
    let value = header(headers, "x-signature").ok_or_else(|| {
        ApiError::new(
            Code::InvalidSignature,
            "send X-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>",
        )
    })?;
    let tolerance = state.config.ingest.signature_tolerance_secs;
    let parsed = SignatureHeader::parse(value).map_err(|e| signature_error(e, tolerance))?;
    let secret = state
        .master_key
        .open(&credential.key_id, &credential.sealed_secret)
        .map_err(|e| {
            ApiError::internal(
                &format!("cannot open the signing secret of key {}", credential.key_id),
                e,
            )
        })?;
    parsed
        .verify(secret.as_bytes(), body, now_ms() / 1000, tolerance)
        .map_err(|e| signature_error(e, tolerance))
}

fn signature_error(e: SignatureError, tolerance_secs: i64) -> ApiError {
    match e {
        SignatureError::Stale => ApiError::new(
            Code::StaleTimestamp,
            format!(
                "the signature's t is more than {tolerance_secs} seconds from the server clock; check the client's clock"
            ),
        ),
        other => ApiError::new(Code::InvalidSignature, other.to_string()),
    }
}

/// Refuses a credential of another server (403).
pub fn require_server(credential: &StoredCredential, server_id: &str) -> ApiResult<()> {
    if credential.server_id != server_id {
        return Err(ApiError::new(
            Code::ForbiddenServer,
            "this API key belongs to another server",
        ));
    }
    Ok(())
}

/// Checks the operator's bearer token in constant time.
pub fn operator(state: &AppState, headers: &HeaderMap) -> ApiResult<()> {
    let Some(expected) = &state.config.admin_token else {
        return Err(ApiError::new(
            Code::AdminDisabled,
            "the admin API is off: set MCP_METRICS_ADMIN_TOKEN to enable it",
        ));
    };
    let given = header(headers, "authorization")
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .unwrap_or("");
    if given.len() == expected.len() && bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::new(
            Code::Unauthorized,
            "send Authorization: Bearer <admin token>",
        ))
    }
}
