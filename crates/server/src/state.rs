//! The state every handler and background task shares.

use std::ops::Deref;
use std::sync::Arc;

use mcp_metrics_core::ingest::SampleLimits;
use mcp_metrics_core::secrets::MasterKey;
use mcp_metrics_store::Store;

use crate::cache::ReadCache;
use crate::clock::Clock;
use crate::config::Config;
use crate::ingest::series_cache::SeriesCache;
use crate::ingest::writer::WriteQueue;
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
    /// One lock per server for OTLP exports: an export reads its streams' state, commits
    /// samples computed from it and stores the next state, so two exports of one server
    /// at once would both build on the same state and one delta would be lost.
    pub otlp_exports: KeyedLocks,
}

/// Async locks by key, made on first use (one per server: a handful of bytes each).
#[derive(Default)]
pub struct KeyedLocks(std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl KeyedLocks {
    pub async fn lock(&self, key: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut map = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            map.entry(key.to_owned()).or_default().clone()
        };
        lock.lock_owned().await
    }
}

impl AppState {
    pub fn new(shared: Shared) -> Self {
        AppState(Arc::new(shared))
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
