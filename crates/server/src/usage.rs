//! The usage pipeline: bot filtering, per-address rate limiting, anonymous visitor ids
//! under daily salts, and a batching writer (DESIGN.md §2 Usage event, §4.2).
//!
//! Nothing here keeps an address: the handler passes the client address in, it is
//! truncated at once, and only the keyed hash of the truncated form leaves this module.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use mcp_metrics_core::secrets::random_bytes;
use mcp_metrics_core::usage::{self, Cidr, HEADLESS_PATTERNS, UsageKind};
use mcp_metrics_store::{Store, StoreResult, UsageRecord};
use tokio::sync::{Notify, mpsc};

use crate::clock::Clock;
use crate::config::UsageConfig;

/// Who sent a beacon, decided before anything else is looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// A person, from this truncated network address.
    Human(IpAddr),
    Bot,
    RateLimited,
}

/// What became of a human's event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Queued,
    Overloaded,
}

#[derive(Default)]
pub struct UsageStats {
    pub queued: AtomicU64,
    pub bots: AtomicU64,
    pub rate_limited: AtomicU64,
    pub overloaded: AtomicU64,
    pub write_failures: AtomicU64,
}

pub struct UsageService {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    bots: isbot::Bots,
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    trusted: Vec<Cidr>,
    salts: Mutex<HashMap<i64, [u8; 32]>>,
    tx: mpsc::Sender<UsageRecord>,
    event_days: i64,
    live: Arc<crate::live::LiveHub>,
    pub stats: UsageStats,
}

/// Stops the usage writer after committing what is queued.
pub struct UsageWriterHandle {
    stop: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl UsageWriterHandle {
    pub async fn drain_and_stop(self) {
        self.stop.notify_one();
        let _ = self.task.await;
    }
}

impl UsageService {
    pub fn start(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        config: &UsageConfig,
        trusted_proxies: &[String],
        live: Arc<crate::live::LiveHub>,
    ) -> (Arc<UsageService>, UsageWriterHandle) {
        let mut bots = isbot::Bots::default();
        bots.append(&HEADLESS_PATTERNS);
        let per_minute = NonZeroU32::new(config.rate_per_minute).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(config.burst).unwrap_or(NonZeroU32::MIN);
        let (tx, rx) = mpsc::channel(config.queue_capacity);
        let service = Arc::new(UsageService {
            store: store.clone(),
            clock,
            bots,
            limiter: RateLimiter::keyed(Quota::per_minute(per_minute).allow_burst(burst)),
            trusted: trusted_proxies.iter().filter_map(|c| Cidr::parse(c)).collect(),
            salts: Mutex::new(HashMap::new()),
            tx,
            event_days: config.event_days,
            live,
            stats: UsageStats::default(),
        });
        let stop = Arc::new(Notify::new());
        let task = tokio::spawn(write_loop(store, rx, stop.clone(), service.clone()));
        (service, UsageWriterHandle { stop, task })
    }

    /// Whether a user agent is automation (search bots, crawlers, headless browsers) or
    /// absent, which no real browser sends.
    pub fn is_bot(&self, user_agent: &str) -> bool {
        user_agent.trim().is_empty() || self.bots.is_bot(user_agent)
    }

    /// The salt of the UTC day `day`, created (and older salts forgotten) on first use.
    async fn salt(&self, day: i64) -> StoreResult<[u8; 32]> {
        if let Some(salt) = self.salts.lock().unwrap_or_else(|p| p.into_inner()).get(&day) {
            return Ok(*salt);
        }
        let salt = self.store.usage_salt(day, random_bytes()).await?;
        // A new day: salts (and visitor records) older than yesterday's go, so none
        // lives more than 48 hours.
        let forgotten = self.store.forget_usage_before(day - 1).await?;
        if forgotten > 0 {
            tracing::info!(forgotten, "deleted usage salts older than 48 hours");
        }
        let mut salts = self.salts.lock().unwrap_or_else(|p| p.into_inner());
        salts.retain(|d, _| *d >= day - 1);
        salts.insert(day, salt);
        Ok(salt)
    }

    /// Whether a peer is one of the configured proxies, whose forwarding headers are
    /// believed.
    pub fn trusts_proxy(&self, peer: IpAddr) -> bool {
        usage::is_trusted(peer, &self.trusted)
    }

    /// The network a request comes from (its client's address, believed from a trusted
    /// proxy's `X-Forwarded-For`, truncated to /24 or /48): the key of per-client limits.
    pub fn client_network(&self, peer: IpAddr, forwarded_for: Option<&str>) -> IpAddr {
        usage::truncate_ip(usage::client_ip(peer, forwarded_for, &self.trusted))
    }

    /// Classifies a sender: bots (and absent user agents) first, then the per-network
    /// rate limit. The address is truncated here, before it is used for anything.
    pub fn admit(&self, peer: IpAddr, forwarded_for: Option<&str>, user_agent: &str) -> Admission {
        let address = self.client_network(peer, forwarded_for);
        if self.limiter.check_key(&address).is_err() {
            self.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
            return Admission::RateLimited;
        }
        if self.is_bot(user_agent) {
            self.stats.bots.fetch_add(1, Ordering::Relaxed);
            return Admission::Bot;
        }
        Admission::Human(address)
    }

    /// Queues a human's event under today's visitor id.
    pub async fn record(
        &self,
        server_id: &str,
        kind: UsageKind,
        client: Option<String>,
        address: IpAddr,
        user_agent: &str,
    ) -> StoreResult<Outcome> {
        let at = self.clock.now_ms();
        let salt = self.salt(usage::day_of(at)).await?;
        let record = UsageRecord {
            server_id: server_id.to_owned(),
            kind,
            client,
            at,
            visitor: usage::visitor_id(&salt, server_id, address, user_agent),
        };
        if self.tx.try_send(record).is_err() {
            self.stats.overloaded.fetch_add(1, Ordering::Relaxed);
            return Ok(Outcome::Overloaded);
        }
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        Ok(Outcome::Queued)
    }

    /// Periodic upkeep: salts (and visitor day records) older than 48 hours go even when
    /// no beacon arrives, and the anonymous event log is cut to `event_days`.
    pub async fn housekeeping(&self) -> StoreResult<()> {
        let now = self.clock.now_ms();
        self.store.forget_usage_before(usage::day_of(now) - 1).await?;
        self.salts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|d, _| *d >= usage::day_of(now) - 1);
        self.store
            .purge_usage_events(now - self.event_days * usage::DAY_MS)
            .await?;
        Ok(())
    }

    /// Forgets idle rate-limiter entries so memory follows the active addresses, not
    /// every address seen.
    pub fn prune(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    pub fn tracked_addresses(&self) -> usize {
        self.limiter.len()
    }

    /// Appends the usage pipeline's metrics in the Prometheus text format.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let s = &self.stats;
        let _ = writeln!(out, "# HELP mcp_metrics_usage_events_total Usage beacons by outcome.");
        let _ = writeln!(out, "# TYPE mcp_metrics_usage_events_total counter");
        for (outcome, n) in [
            ("queued", &s.queued),
            ("bot", &s.bots),
            ("rate_limited", &s.rate_limited),
            ("overloaded", &s.overloaded),
            ("write_failed", &s.write_failures),
        ] {
            let _ = writeln!(
                out,
                "mcp_metrics_usage_events_total{{outcome=\"{outcome}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP mcp_metrics_usage_rate_limited_networks Client networks the rate limiter tracks."
        );
        let _ = writeln!(out, "# TYPE mcp_metrics_usage_rate_limited_networks gauge");
        let _ = writeln!(
            out,
            "mcp_metrics_usage_rate_limited_networks {}",
            self.tracked_addresses()
        );
    }
}

async fn write_loop(
    store: Arc<dyn Store>,
    mut rx: mpsc::Receiver<UsageRecord>,
    stop: Arc<Notify>,
    service: Arc<UsageService>,
) {
    const BATCH: usize = 5_000;
    let mut stopping = false;
    let mut prune = tokio::time::interval(Duration::from_secs(60));
    loop {
        let first = if stopping {
            match rx.try_recv() {
                Ok(r) => r,
                Err(_) => return,
            }
        } else {
            tokio::select! {
                record = rx.recv() => match record {
                    Some(r) => r,
                    None => return,
                },
                _ = prune.tick() => {
                    service.prune();
                    if let Err(e) = service.housekeeping().await {
                        tracing::warn!(error = %e, "usage housekeeping failed; retrying in a minute");
                    }
                    continue;
                }
                _ = stop.notified() => {
                    stopping = true;
                    continue;
                }
            }
        };
        let mut batch = Vec::with_capacity(64);
        batch.push(first);
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let n = batch.len();
        // What each server's open pages hear once the batch is stored.
        let mut per_server: HashMap<String, u64> = HashMap::new();
        for record in &batch {
            *per_server.entry(record.server_id.clone()).or_default() += 1;
        }
        match store.record_usage(batch).await {
            Ok(()) => {
                for (server, events) in per_server {
                    let data = serde_json::json!({ "events": events });
                    service
                        .live
                        .publish(&server, crate::live::LiveMessage { kind: "usage", data });
                }
            }
            Err(e) => {
                service.stats.write_failures.fetch_add(n as u64, Ordering::Relaxed);
                tracing::warn!(error = %e, events = n, "could not store usage events");
            }
        }
    }
}
