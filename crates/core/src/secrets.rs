//! Credentials and the master key (DESIGN.md §2 Credential, §4.6).
//!
//! * `api_key`: 192 random bits shown once; the store keeps only its SHA-256. A fast
//!   hash is enough because the key is random, not a password: there is nothing to
//!   guess from the hash.
//! * `signing_secret`: the HMAC key of signed writes. The service must be able to use it,
//!   so it cannot be hashed; it is sealed with XChaCha20-Poly1305 under the master key,
//!   with the credential's `key_id` as associated data (a sealed secret copied onto
//!   another credential row does not open). A database dump without the master key
//!   cannot forge signatures.
//! * The master key is 32 random bytes given as 64 hex characters. Its fingerprint (an
//!   HMAC of a fixed label) is stored so that starting with the wrong key is refused
//!   with a clear message instead of failing every signed request.

use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

const NONCE_LEN: usize = 24;
const SEALED_VERSION: u8 = 1;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("the master key must be 64 hex characters (32 bytes), e.g. from `openssl rand -hex 32`")]
    BadMasterKey,
    #[error("a sealed signing secret could not be opened: wrong master key or corrupted row")]
    CannotOpen,
}

/// Fills a buffer from the operating system's CSPRNG.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    getrandom::fill(&mut buf).expect("the operating system random source is unavailable");
    buf
}

/// A fresh public credential identifier.
pub fn new_key_id() -> String {
    format!("key_{}", hex::encode(random_bytes::<8>()))
}

/// A fresh API key (`X-API-Key`).
pub fn new_api_key() -> String {
    format!("mcpm_ak_{}", hex::encode(random_bytes::<24>()))
}

/// A fresh signing secret. Its UTF-8 bytes are the HMAC key, so shell users can sign
/// with `openssl dgst -sha256 -hmac "$SECRET"`.
pub fn new_signing_secret() -> String {
    format!("mcpm_ss_{}", hex::encode(random_bytes::<32>()))
}

/// The stored form of an API key.
pub fn hash_api_key(api_key: &str) -> [u8; 32] {
    Sha256::digest(api_key.as_bytes()).into()
}

/// BLAKE3 of a body: the identity of a retried request, and the read cache's ETag of an
/// answer. Every write hashes its whole body (53 KB for 1,000 lines of line protocol):
/// BLAKE3 takes 8 µs for that where SHA-256 took 30 with the CPU's SHA extensions
/// (`cargo bench -p mcp-metrics-core --bench digest`), and it is as hard to collide, so a
/// sender cannot make one body pass for another.
pub fn body_digest(body: &[u8]) -> [u8; 32] {
    blake3::hash(body).into()
}

/// The key that seals signing secrets at rest.
#[derive(Clone)]
pub struct MasterKey([u8; 32]);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

impl MasterKey {
    pub fn generate() -> Self {
        MasterKey(random_bytes())
    }

    pub fn from_hex(text: &str) -> Result<Self, SecretError> {
        let mut key = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut key).map_err(|_| SecretError::BadMasterKey)?;
        Ok(MasterKey(key))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// A value that identifies this key without revealing it.
    pub fn fingerprint(&self) -> String {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0).expect("any key length");
        mac.update(b"mcp-metrics master key fingerprint v1");
        hex::encode(&mac.finalize().into_bytes()[..16])
    }

    /// A key for another purpose (e.g. signing session cookies), derived so that it
    /// reveals nothing about the master key and rotates with it.
    pub fn derive(&self, purpose: &str) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0).expect("any key length");
        mac.update(b"mcp-metrics derived key v1\0");
        mac.update(purpose.as_bytes());
        mac.finalize().into_bytes().into()
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(&self.0.into())
    }

    /// Seals `secret` for the credential `key_id`: `version || nonce || ciphertext+tag`.
    pub fn seal(&self, key_id: &str, secret: &str) -> Vec<u8> {
        let nonce_bytes: [u8; NONCE_LEN] = random_bytes();
        let nonce = XNonce::from(nonce_bytes);
        let ciphertext = self
            .cipher()
            .encrypt(
                &nonce,
                Payload {
                    msg: secret.as_bytes(),
                    aad: key_id.as_bytes(),
                },
            )
            .expect("XChaCha20-Poly1305 encryption of a short secret cannot fail");
        let mut out = Vec::with_capacity(1 + NONCE_LEN + ciphertext.len());
        out.push(SEALED_VERSION);
        out.extend_from_slice(&nonce_bytes);
        out.extend_from_slice(&ciphertext);
        out
    }

    pub fn open(&self, key_id: &str, sealed: &[u8]) -> Result<String, SecretError> {
        if sealed.len() < 1 + NONCE_LEN + 16 || sealed[0] != SEALED_VERSION {
            return Err(SecretError::CannotOpen);
        }
        let nonce_bytes: [u8; NONCE_LEN] = sealed[1..1 + NONCE_LEN].try_into().expect("length checked");
        let plain = self
            .cipher()
            .decrypt(
                &XNonce::from(nonce_bytes),
                Payload {
                    msg: &sealed[1 + NONCE_LEN..],
                    aad: key_id.as_bytes(),
                },
            )
            .map_err(|_| SecretError::CannotOpen)?;
        String::from_utf8(plain).map_err(|_| SecretError::CannotOpen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_values_have_their_shape() {
        assert_eq!(new_key_id().len(), 4 + 16);
        assert_eq!(new_api_key().len(), 8 + 48);
        assert_eq!(new_signing_secret().len(), 8 + 64);
        assert_ne!(new_api_key(), new_api_key());
    }

    #[test]
    fn seal_round_trips_and_binds_key_id() {
        let key = MasterKey::generate();
        let sealed = key.seal("key_1", "mcpm_ss_secret");
        assert!(
            !sealed.windows(6).any(|w| w == b"secret"),
            "plaintext leaked into sealed form"
        );
        assert_eq!(key.open("key_1", &sealed).unwrap(), "mcpm_ss_secret");
        assert_eq!(key.open("key_2", &sealed), Err(SecretError::CannotOpen));
        assert_eq!(
            MasterKey::generate().open("key_1", &sealed),
            Err(SecretError::CannotOpen)
        );
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(key.open("key_1", &tampered), Err(SecretError::CannotOpen));
        assert_eq!(key.open("key_1", &sealed[..10]), Err(SecretError::CannotOpen));
    }

    #[test]
    fn master_key_hex_and_fingerprint() {
        let key = MasterKey::generate();
        let again = MasterKey::from_hex(&key.to_hex()).unwrap();
        assert_eq!(key.fingerprint(), again.fingerprint());
        assert_ne!(key.fingerprint(), MasterKey::generate().fingerprint());
        assert!(MasterKey::from_hex("abc").is_err());
        assert!(MasterKey::from_hex(&"zz".repeat(32)).is_err());
        assert_eq!(format!("{key:?}"), "MasterKey(<redacted>)");
    }
}
