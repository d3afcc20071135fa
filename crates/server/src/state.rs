//! The state every handler and background task shares.

use std::ops::Deref;
use std::sync::Arc;

use mcp_metrics_core::ingest::SampleLimits;
use mcp_metrics_core::secrets::MasterKey;
use mcp_metrics_store::Store;

use crate::cache::ReadCache;
use crate::clock::Clock;
use crate::config::Config;
use crate::ingest::rate_limit::WriteRateLimit;
use crate::ingest::series_cache::SeriesCache;
use crate::ingest::writer::WriteQueue;
use crate::key_cache::KeyCache;
use crate::live::LiveHub;
use crate::telemetry::Telemetry;
use crate::usage::UsageService;

#[derive(Clone)]
pub struct AppState(Arc<Shared>);

pub struct Shared {
    pub store: Arc<dyn Store>,
    pub config: Config,
    pub master_key: MasterKey,
    pub queue: WriteQueue,
    pub series: SeriesCache,
    pub telemetry: Arc<Telemetry>,
    pub cache: ReadCache,
    pub usage: Arc<UsageService>,
    pub clock: Arc<dyn Clock>,
    pub live: Arc<LiveHub>,
    /// Ids of registered servers seen recently (positive answers only).
    pub known_servers: moka::sync::Cache<String, ()>,
    /// Active credentials by API-key hash, looked up recently: writes use them, reads
    /// refresh them, and a lookup that finds a key revoked or unknown removes it.
    pub credentials: KeyCache,
    /// One lock per server for OTLP exports: an export reads its streams' state, commits
    /// samples computed from it and stores the next state, so two exports of one server
    /// at once would both build on the same state and one delta would be lost. Across
    /// nodes the store's `cluster_lock` does the same; this one keeps a node's waiting
    /// exports from each holding a database session.
    pub otlp_exports: KeyedLocks,
    /// Each server's write allowance on this node.
    pub write_rate: WriteRateLimit,
}

/// Async locks by key, made on first use. Locks nobody holds or waits for are dropped
/// whenever the map has doubled since the last sweep, so it stays about as large as the
/// number of keys in use, not of every key ever seen.
#[derive(Default)]
pub struct KeyedLocks(std::sync::Mutex<LockMap>);

#[derive(Default)]
struct LockMap {
    locks: std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>,
    sweep_at: usize,
}

impl KeyedLocks {
    pub async fn lock(&self, key: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut map = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if map.locks.len() >= map.sweep_at {
                // Held only by the map: no guard and no waiter has it.
                map.locks.retain(|_, lock| Arc::strong_count(lock) > 1);
                map.sweep_at = (map.locks.len() * 2).max(64);
            }
            map.locks.entry(key.to_owned()).or_default().clone()
        };
        lock.lock_owned().await
    }

    /// Locks kept right now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .locks
            .len()
    }
}

impl AppState {
    pub fn new(shared: Shared) -> Self {
        AppState(Arc::new(shared))
    }

    /// Forgets what this node holds of a deleted server: its cached series ids (a server
    /// registered again under the id must not write under them), its "known" entry, its
    /// cached answers, its open live streams, its write allowance and its dashboard counts.
    pub fn forget_server(&self, id: &str) {
        self.series.remove_server(id);
        self.known_servers.invalidate(id);
        // Its keys went with it. Deleting a server is rare: forgetting every cached key
        // is simpler than finding its own, and costs one lookup per key.
        self.credentials.forget_all();
        self.cache.invalidate_server(id);
        self.live.close_server(id);
        self.write_rate.forget(id);
        self.telemetry.forget_server(id);
    }

    pub fn sample_limits(&self) -> SampleLimits {
        SampleLimits {
            max_samples: self.config.ingest.max_samples_per_request,
            max_age_ms: self.config.retention.raw_days * 86_400_000,
        }
    }
}

impl Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unused_locks_are_dropped_and_held_ones_kept() {
        let locks = KeyedLocks::default();
        let held = locks.lock("held").await;
        for i in 0..10_000 {
            drop(locks.lock(&format!("server-{i}")).await);
        }
        assert!(locks.len() <= 128, "{} locks kept", locks.len());
        // The held lock survived every sweep: a second holder still has to wait for it.
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(50), locks.lock("held")).await;
        assert!(waiting.is_err(), "the held lock was replaced by a new one");
        drop(held);
        drop(locks.lock("held").await);
    }
}
