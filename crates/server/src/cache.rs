//! The read cache of metric answers (DESIGN.md §4.3).
//!
//! An answer is cached under its server's current *version*; when the rollup job
//! changes a server's buckets it bumps the version, so the next read computes afresh and
//! a new sample is never hidden. Each entry also has a lifetime that grows with the
//! period, as a backstop for windows that move with the clock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::sync::Cache;

/// A rendered answer with its validator.
#[derive(Debug)]
pub struct Cached {
    pub body: String,
    pub etag: String,
    pub ttl: Duration,
}

impl Cached {
    pub fn new(body: String, ttl: Duration) -> Self {
        let digest = mcp_metrics_core::secrets::body_digest(body.as_bytes());
        let etag = format!("\"{}\"", hex::encode(&digest[..12]));
        Cached { body, etag, ttl }
    }
}

struct PerEntryLifetime;

impl Expiry<String, Arc<Cached>> for PerEntryLifetime {
    fn expire_after_create(&self, _key: &String, value: &Arc<Cached>, _created: Instant) -> Option<Duration> {
        Some(value.ttl)
    }
}

pub struct ReadCache {
    entries: Cache<String, Arc<Cached>>,
    versions: Mutex<HashMap<String, u64>>,
}

impl ReadCache {
    pub fn new(max_entries: u64) -> Self {
        ReadCache {
            entries: Cache::builder()
                .max_capacity(max_entries)
                .expire_after(PerEntryLifetime)
                .build(),
            versions: Mutex::new(HashMap::new()),
        }
    }

    fn version(&self, server_id: &str) -> u64 {
        self.versions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(server_id)
            .copied()
            .unwrap_or(0)
    }

    /// The cache key of `what` about these servers at their current versions.
    pub fn key<'a>(&self, servers: impl IntoIterator<Item = &'a str>, what: &str) -> String {
        let mut key = String::new();
        for server in servers {
            key.push_str(server);
            key.push('@');
            key.push_str(&self.version(server).to_string());
            key.push('\0');
        }
        key.push_str(what);
        key
    }

    pub fn get(&self, key: &str) -> Option<Arc<Cached>> {
        self.entries.get(key)
    }

    pub fn insert(&self, key: String, value: Arc<Cached>) {
        self.entries.insert(key, value);
    }

    /// Makes every cached answer about `server_id` unreachable.
    pub fn invalidate_server(&self, server_id: &str) {
        *self
            .versions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(server_id.to_owned())
            .or_default() += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalidation_changes_the_key_and_expiry_applies() {
        let cache = ReadCache::new(100);
        let key = cache.key(["a"], "24h");
        cache.insert(key.clone(), Arc::new(Cached::new("x".into(), Duration::from_secs(60))));
        assert!(cache.get(&cache.key(["a"], "24h")).is_some());
        cache.invalidate_server("b");
        assert!(cache.get(&cache.key(["a"], "24h")).is_some());
        cache.invalidate_server("a");
        assert!(cache.get(&cache.key(["a"], "24h")).is_none());
        let short = cache.key(["c"], "1h");
        cache.insert(
            short.clone(),
            Arc::new(Cached::new("y".into(), Duration::from_millis(20))),
        );
        std::thread::sleep(Duration::from_millis(60));
        cache.entries.run_pending_tasks();
        assert!(cache.get(&short).is_none());
        assert_eq!(
            Cached::new("x".into(), Duration::ZERO).etag,
            Cached::new("x".into(), Duration::ZERO).etag
        );
        assert_ne!(
            Cached::new("x".into(), Duration::ZERO).etag,
            Cached::new("y".into(), Duration::ZERO).etag
        );
    }
}
