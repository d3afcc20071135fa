//! The author dashboard's session: a signed cookie naming the server and credential,
//! with an expiry. HttpOnly and SameSite=Strict, so scripts cannot read it and other
//! sites cannot send it; forms also carry a token derived from the session (CSRF).

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

pub const COOKIE: &str = "mcpm_session";
/// Eight hours.
pub const LIFETIME_MS: i64 = 8 * 3_600_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub server_id: String,
    pub key_id: String,
    pub expires: i64,
}

fn mac(key: &[u8; 32], parts: &[&str]) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("any key length");
    for p in parts {
        mac.update(p.as_bytes());
        mac.update(b"\0");
    }
    hex::encode(mac.finalize().into_bytes())
}

impl Session {
    /// The cookie value: `server.key_id.expires.signature`.
    pub fn encode(&self, key: &[u8; 32]) -> String {
        let expires = self.expires.to_string();
        let signature = mac(key, &["session", &self.server_id, &self.key_id, &expires]);
        format!("{}.{}.{}.{}", self.server_id, self.key_id, expires, signature)
    }

    pub fn decode(value: &str, key: &[u8; 32], now: i64) -> Option<Session> {
        let mut parts = value.rsplitn(4, '.');
        let (signature, expires, key_id, server_id) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let expected = mac(key, &["session", server_id, key_id, expires]);
        if signature.len() != expected.len()
            || !bool::from(subtle::ConstantTimeEq::ct_eq(signature.as_bytes(), expected.as_bytes()))
        {
            return None;
        }
        let expires: i64 = expires.parse().ok()?;
        (expires > now).then(|| Session {
            server_id: server_id.into(),
            key_id: key_id.into(),
            expires,
        })
    }

    /// The token forms of this session must carry.
    pub fn csrf(&self, key: &[u8; 32]) -> String {
        mac(key, &["csrf", &self.server_id, &self.key_id, &self.expires.to_string()])
    }
}

/// The session cookie's value from a `Cookie` header.
pub fn from_cookie_header(header: &str) -> Option<&str> {
    header
        .split(';')
        .map(str::trim)
        .find_map(|c| c.strip_prefix(COOKIE).and_then(|r| r.strip_prefix('=')))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_tamper_and_expiry() {
        let key = [3u8; 32];
        let s = Session {
            server_id: "acme.search".into(),
            key_id: "key_1".into(),
            expires: 1_000,
        };
        let v = s.encode(&key);
        assert_eq!(Session::decode(&v, &key, 999), Some(s.clone()));
        assert_eq!(Session::decode(&v, &key, 1_000), None, "expired");
        assert_eq!(
            Session::decode(&v.replace("acme.search", "other"), &key, 0),
            None,
            "tampered"
        );
        assert_eq!(Session::decode(&v, &[4u8; 32], 0), None, "other key");
        assert_eq!(from_cookie_header(&format!("a=b; {COOKIE}={v}; c=d")), Some(v.as_str()));
        assert_ne!(s.csrf(&key), s.csrf(&[4u8; 32]));
    }
}
