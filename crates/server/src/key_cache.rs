//! The node's cache of active API keys, for writes (see `http::auth`): a database read
//! per write was a tenth of the service's CPU under remote-write load, and the writer
//! checks every write's key again inside its commit, so a cached key only decides which
//! check refuses a revoked key, not whether its write is stored.
//!
//! What it adds to a plain cache: forgetting every key (a revocation, a deleted server)
//! also stops a lookup that read the database before the forgetting from caching what
//! it read afterwards, so a revocation through this node's API is answered from the
//! first check at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use mcp_metrics_core::model::StoredCredential;

/// How long a write's key lookup is reused by later writes with the same key.
pub const CREDENTIAL_TTL: Duration = Duration::from_secs(10);

/// Active credentials by API-key hash, looked up recently; positive answers only, for
/// [`CREDENTIAL_TTL`] at most.
pub struct KeyCache {
    keys: moka::sync::Cache<[u8; 32], Arc<StoredCredential>>,
    /// Counts [`KeyCache::forget_all`] calls.
    forgets: AtomicU64,
}

impl KeyCache {
    pub fn new(capacity: u64, ttl: Duration) -> Self {
        KeyCache {
            keys: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .build(),
            forgets: AtomicU64::new(0),
        }
    }

    pub fn get(&self, api_key_hash: &[u8; 32]) -> Option<Arc<StoredCredential>> {
        self.keys.get(api_key_hash)
    }

    /// A mark to take before reading a key from the database and to hand to
    /// [`KeyCache::insert`] with what was read.
    pub fn epoch(&self) -> u64 {
        self.forgets.load(Ordering::SeqCst)
    }

    /// Caches a key read from the database, unless every key was forgotten since
    /// `epoch`: what was read may be what the forgetting was for.
    pub fn insert(&self, epoch: u64, api_key_hash: [u8; 32], credential: Arc<StoredCredential>) {
        if self.epoch() != epoch {
            return;
        }
        self.keys.insert(api_key_hash, credential);
        // A `forget_all` between the check and the insert has either counted already
        // (seen here) or has yet to clear the cache (and clears this entry too).
        if self.epoch() != epoch {
            self.keys.invalidate(&api_key_hash);
        }
    }

    /// Forgets one key: it was found revoked or gone.
    pub fn forget(&self, api_key_hash: &[u8; 32]) {
        self.keys.invalidate(api_key_hash);
    }

    /// Forgets every key, and what lookups under way would cache.
    pub fn forget_all(&self) {
        self.forgets.fetch_add(1, Ordering::SeqCst);
        self.keys.invalidate_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credential() -> Arc<StoredCredential> {
        Arc::new(StoredCredential {
            key_id: "k".into(),
            server_id: "s".into(),
            api_key_hash: [1; 32],
            sealed_secret: Vec::new(),
            created_at: 0,
            revoked_at: None,
            last_used_at: None,
        })
    }

    #[test]
    fn a_lookup_from_before_forget_all_caches_nothing() {
        let cache = KeyCache::new(10, CREDENTIAL_TTL);
        let before = cache.epoch();
        cache.forget_all();
        cache.insert(before, [1; 32], credential());
        assert!(cache.get(&[1; 32]).is_none());
        // A lookup that starts afterwards caches again.
        cache.insert(cache.epoch(), [1; 32], credential());
        assert!(cache.get(&[1; 32]).is_some());
        cache.forget(&[1; 32]);
        assert!(cache.get(&[1; 32]).is_none());
    }
}
