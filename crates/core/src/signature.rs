//! The request-signing scheme of signed JSON writes (DESIGN.md §4.1).
//!
//! `X-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(signing_secret, "<t>.<raw body>")>`.
//! Several `v1=` entries may be present so a client can sign with an old and a new
//! secret during rotation. Each candidate is decoded, its length checked explicitly
//! (an empty or short `v1=` can never match), then compared in constant time.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Allowed distance between the signature's `t` and the server clock, in seconds.
pub const DEFAULT_TOLERANCE_SECS: i64 = 300;
/// Most `v1=` candidates considered, so a header cannot make us compute without bound.
const MAX_CANDIDATES: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the X-Signature header is missing")]
    Missing,
    #[error("the X-Signature header must look like t=<unix seconds>,v1=<hex>")]
    Malformed,
    #[error("no v1 signature matches the request body")]
    Mismatch,
    #[error("the signature timestamp is more than the allowed window away from the server clock")]
    Stale,
}

/// A parsed `X-Signature` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureHeader<'a> {
    /// The `t` value exactly as sent: it is part of the signed message.
    pub timestamp_text: &'a str,
    pub timestamp: i64,
    /// The `v1` candidates as sent (hex); may be empty strings.
    pub candidates: Vec<&'a str>,
}

impl<'a> SignatureHeader<'a> {
    pub fn parse(header: &'a str) -> Result<Self, SignatureError> {
        let mut timestamp = None;
        let mut candidates = Vec::new();
        for part in header.split(',') {
            let (key, value) = part.trim().split_once('=').ok_or(SignatureError::Malformed)?;
            match key.trim() {
                "t" => {
                    if timestamp.is_some() {
                        return Err(SignatureError::Malformed);
                    }
                    let value = value.trim();
                    if value.is_empty() || value.len() > 12 || !value.bytes().all(|b| b.is_ascii_digit()) {
                        return Err(SignatureError::Malformed);
                    }
                    timestamp = Some((value, value.parse::<i64>().map_err(|_| SignatureError::Malformed)?));
                }
                "v1" => {
                    if candidates.len() == MAX_CANDIDATES {
                        return Err(SignatureError::Malformed);
                    }
                    candidates.push(value.trim());
                }
                // Unknown schemes are ignored so the format can grow (as Stripe's does).
                _ => {}
            }
        }
        let (timestamp_text, timestamp) = timestamp.ok_or(SignatureError::Malformed)?;
        if candidates.is_empty() {
            return Err(SignatureError::Malformed);
        }
        Ok(SignatureHeader {
            timestamp_text,
            timestamp,
            candidates,
        })
    }

    /// Checks that one candidate is the HMAC of `"<t>.<body>"` under `secret`, then that
    /// `t` is within `tolerance_secs` of `now_secs`. Returns the matching signature bytes,
    /// which identify the request for replay protection.
    pub fn verify(
        &self,
        secret: &[u8],
        body: &[u8],
        now_secs: i64,
        tolerance_secs: i64,
    ) -> Result<[u8; 32], SignatureError> {
        let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
        mac.update(self.timestamp_text.as_bytes());
        mac.update(b".");
        mac.update(body);
        let mut matched = None;
        for candidate in &self.candidates {
            let mut decoded = [0u8; 32];
            // The explicit length check: anything but 64 hex digits is a mismatch before
            // any comparison happens, so truncated or empty signatures cannot match a prefix.
            if candidate.len() != 64 || hex::decode_to_slice(candidate, &mut decoded).is_err() {
                continue;
            }
            if mac.clone().verify_slice(&decoded).is_ok() {
                matched = Some(decoded);
                break;
            }
        }
        let signature = matched.ok_or(SignatureError::Mismatch)?;
        if (now_secs - self.timestamp).abs() > tolerance_secs {
            return Err(SignatureError::Stale);
        }
        Ok(signature)
    }
}

/// Computes the hex HMAC-SHA256 of `"<t>.<body>"`.
pub fn compute(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// Builds a complete `X-Signature` header value.
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    format!("t={timestamp},v1={}", compute(secret, timestamp, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SECRET: &[u8] = b"mcpm_ss_test";
    const BODY: &[u8] = br#"{"server_id":"a","metrics":[]}"#;

    fn check(header: &str, body: &[u8], now: i64) -> Result<[u8; 32], SignatureError> {
        SignatureHeader::parse(header)?.verify(SECRET, body, now, DEFAULT_TOLERANCE_SECS)
    }

    #[test]
    fn matches_openssl_reference() {
        // printf '%s' '1700000000.{"server_id":"a","metrics":[]}' | openssl dgst -sha256 -hmac mcpm_ss_test
        assert_eq!(
            compute(SECRET, 1_700_000_000, BODY),
            "59fc857a15b4fc53179e474b2c697e0846591b0d6d8b051a5c3b1c0f74b84795"
        );
    }

    #[test]
    fn valid_signature_verifies() {
        let header = sign(SECRET, 1_700_000_000, BODY);
        assert!(check(&header, BODY, 1_700_000_000).is_ok());
        assert!(check(&header, BODY, 1_700_000_300).is_ok());
        assert!(check(&header, BODY, 1_699_999_700).is_ok());
    }

    #[test]
    fn stale_in_both_directions() {
        let header = sign(SECRET, 1_700_000_000, BODY);
        assert_eq!(check(&header, BODY, 1_700_000_301), Err(SignatureError::Stale));
        assert_eq!(check(&header, BODY, 1_699_999_699), Err(SignatureError::Stale));
    }

    #[test]
    fn other_body_or_secret_fails() {
        let header = sign(SECRET, 1_700_000_000, BODY);
        assert_eq!(check(&header, b"{}", 1_700_000_000), Err(SignatureError::Mismatch));
        let other = sign(b"other", 1_700_000_000, BODY);
        assert_eq!(check(&other, BODY, 1_700_000_000), Err(SignatureError::Mismatch));
    }

    #[test]
    fn empty_short_and_long_signatures_fail() {
        let full = compute(SECRET, 1_700_000_000, BODY);
        for v1 in [
            "",
            &full[..62],
            &full[..2],
            &format!("{full}00"),
            &full.to_uppercase()[..63],
        ] {
            let header = format!("t=1700000000,v1={v1}");
            assert_eq!(
                check(&header, BODY, 1_700_000_000),
                Err(SignatureError::Mismatch),
                "{v1:?}"
            );
        }
    }

    #[test]
    fn rotation_accepts_any_matching_candidate() {
        let good = compute(SECRET, 1_700_000_000, BODY);
        let header = format!("t=1700000000,v1={},v1={good}", "0".repeat(64));
        assert!(check(&header, BODY, 1_700_000_000).is_ok());
    }

    #[test]
    fn malformed_headers() {
        for h in [
            "",
            "v1=abc",
            "t=,v1=ab",
            "t=12a,v1=ab",
            "t=1,t=2,v1=ab",
            "t=1",
            "garbage",
        ] {
            assert_eq!(SignatureHeader::parse(h).err(), Some(SignatureError::Malformed), "{h}");
        }
    }

    proptest! {
        #[test]
        fn parse_never_panics(h in "\\PC{0,200}") {
            let _ = SignatureHeader::parse(&h);
        }

        #[test]
        fn flipping_any_body_byte_breaks_the_signature(body in proptest::collection::vec(any::<u8>(), 1..256), idx in any::<proptest::sample::Index>()) {
            let header = sign(SECRET, 1_700_000_000, &body);
            let mut tampered = body.clone();
            let i = idx.index(tampered.len());
            tampered[i] ^= 0x01;
            prop_assert!(check(&header, &body, 1_700_000_000).is_ok());
            prop_assert_eq!(check(&header, &tampered, 1_700_000_000), Err(SignatureError::Mismatch));
        }
    }
}
