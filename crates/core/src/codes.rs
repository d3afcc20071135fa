//! The stable machine-readable error codes of the wire contract (DESIGN.md §4).
//!
//! Clients branch on these strings, so they live in one place: the HTTP layer maps a
//! code to its status and title, per-sample rejections carry a code, and `/metrics`
//! counts rejected samples by code.

use std::fmt;

/// A stable error code. The string form is part of the public API and never changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Code {
    // Whole-request failures.
    MissingKey,
    UnknownKey,
    RevokedKey,
    InvalidSignature,
    StaleTimestamp,
    ReplayedRequest,
    ForbiddenServer,
    PayloadTooLarge,
    TooManySamples,
    UnsupportedMediaType,
    InvalidPayload,
    RateLimited,
    Overloaded,
    Unauthorized,
    AdminDisabled,
    NotFound,
    MethodNotAllowed,
    Conflict,
    Internal,
    Unavailable,
    // Per-sample rejections.
    InvalidName,
    InvalidValue,
    InvalidType,
    InvalidTimestamp,
    InvalidTag,
    TooManyTags,
    TooOld,
    TooFarAhead,
    KindMismatch,
    TooManySeries,
}

impl Code {
    /// Every code, for exhaustive metrics exposition and documentation tests.
    pub const ALL: [Code; 30] = [
        Code::MissingKey,
        Code::UnknownKey,
        Code::RevokedKey,
        Code::InvalidSignature,
        Code::StaleTimestamp,
        Code::ReplayedRequest,
        Code::ForbiddenServer,
        Code::PayloadTooLarge,
        Code::TooManySamples,
        Code::UnsupportedMediaType,
        Code::InvalidPayload,
        Code::RateLimited,
        Code::Overloaded,
        Code::Unauthorized,
        Code::AdminDisabled,
        Code::NotFound,
        Code::MethodNotAllowed,
        Code::Conflict,
        Code::Internal,
        Code::Unavailable,
        Code::InvalidName,
        Code::InvalidValue,
        Code::InvalidType,
        Code::InvalidTimestamp,
        Code::InvalidTag,
        Code::TooManyTags,
        Code::TooOld,
        Code::TooFarAhead,
        Code::KindMismatch,
        Code::TooManySeries,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Code::MissingKey => "missing_key",
            Code::UnknownKey => "unknown_key",
            Code::RevokedKey => "revoked_key",
            Code::InvalidSignature => "invalid_signature",
            Code::StaleTimestamp => "stale_timestamp",
            Code::ReplayedRequest => "replayed_request",
            Code::ForbiddenServer => "forbidden_server",
            Code::PayloadTooLarge => "payload_too_large",
            Code::TooManySamples => "too_many_samples",
            Code::UnsupportedMediaType => "unsupported_media_type",
            Code::InvalidPayload => "invalid_payload",
            Code::RateLimited => "rate_limited",
            Code::Overloaded => "overloaded",
            Code::Unauthorized => "unauthorized",
            Code::AdminDisabled => "admin_disabled",
            Code::NotFound => "not_found",
            Code::MethodNotAllowed => "method_not_allowed",
            Code::Conflict => "conflict",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
            Code::InvalidName => "invalid_name",
            Code::InvalidValue => "invalid_value",
            Code::InvalidType => "invalid_type",
            Code::InvalidTimestamp => "invalid_timestamp",
            Code::InvalidTag => "invalid_tag",
            Code::TooManyTags => "too_many_tags",
            Code::TooOld => "too_old",
            Code::TooFarAhead => "too_far_ahead",
            Code::KindMismatch => "kind_mismatch",
            Code::TooManySeries => "too_many_series",
        }
    }

    /// The HTTP status a whole-request failure with this code is answered with.
    pub fn status(self) -> u16 {
        match self {
            Code::MissingKey
            | Code::UnknownKey
            | Code::RevokedKey
            | Code::InvalidSignature
            | Code::StaleTimestamp
            | Code::Unauthorized => 401,
            Code::ForbiddenServer => 403,
            Code::NotFound | Code::AdminDisabled => 404,
            Code::MethodNotAllowed => 405,
            Code::ReplayedRequest | Code::Conflict => 409,
            Code::PayloadTooLarge | Code::TooManySamples => 413,
            Code::UnsupportedMediaType => 415,
            Code::RateLimited => 429,
            Code::Internal => 500,
            Code::Overloaded | Code::Unavailable => 503,
            _ => 400,
        }
    }

    /// A short human title for problem+json documents.
    pub fn title(self) -> &'static str {
        match self {
            Code::MissingKey => "API key missing",
            Code::UnknownKey => "Unknown API key",
            Code::RevokedKey => "API key revoked",
            Code::InvalidSignature => "Invalid request signature",
            Code::StaleTimestamp => "Signature timestamp outside the allowed window",
            Code::ReplayedRequest => "Request already seen",
            Code::ForbiddenServer => "Key does not belong to this server",
            Code::PayloadTooLarge => "Payload too large",
            Code::TooManySamples => "Too many samples in one request",
            Code::UnsupportedMediaType => "Unsupported media type",
            Code::InvalidPayload => "Invalid payload",
            Code::RateLimited => "Rate limited",
            Code::Overloaded => "Service overloaded",
            Code::Unauthorized => "Unauthorized",
            Code::AdminDisabled => "Admin API disabled",
            Code::NotFound => "Not found",
            Code::MethodNotAllowed => "Method not allowed",
            Code::Conflict => "Conflict",
            Code::Internal => "Internal error",
            Code::Unavailable => "Service unavailable",
            Code::InvalidName => "Invalid metric name",
            Code::InvalidValue => "Invalid value",
            Code::InvalidType => "Invalid metric type",
            Code::InvalidTimestamp => "Invalid timestamp",
            Code::InvalidTag => "Invalid tag",
            Code::TooManyTags => "Too many tags",
            Code::TooOld => "Timestamp older than raw retention",
            Code::TooFarAhead => "Timestamp too far in the future",
            Code::KindMismatch => "Metric type differs from the series' type",
            Code::TooManySeries => "Server's series limit reached",
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for code in Code::ALL {
            let s = code.as_str();
            assert!(seen.insert(s), "duplicate code {s}");
            assert!(s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "{s}");
            assert!((400..600).contains(&code.status()));
        }
        // Telemetry indexes per-code counters by discriminant: ALL must follow it.
        for (i, code) in Code::ALL.iter().enumerate() {
            assert_eq!(*code as usize, i, "{code}");
        }
    }
}
