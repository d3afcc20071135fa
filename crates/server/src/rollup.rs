//! The rollup job: turns dirty marks into minute, hour and day buckets, and applies
//! retention (DESIGN.md §2 Rollups).
//!
//! Ingest marks each (minute, series) it writes to. A pass reads a batch of marks of one
//! level together with their inputs from one snapshot, folds them (raw samples into
//! minutes; minutes into hours; hours into days, merging sketches), writes the buckets
//! and clears exactly the marks it read — a mark renewed meanwhile by a new sample keeps
//! its bucket dirty for the next pass. Recomputing is therefore idempotent and late
//! samples anywhere inside raw retention correct their minute, hour and day.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mcp_metrics_core::model::Kind;
use mcp_metrics_core::rollup::{BucketStats, Level};
use mcp_metrics_core::time::now_ms;
use mcp_metrics_store::{DirtyMark, RetentionCutoffs, RetentionReport, Store, StoreResult};
use serde::Serialize;

use crate::config::RetentionConfig;

/// Name of the cluster-wide lock held by the node that runs the job.
pub const JOB_LOCK: &str = "rollups";

/// Marks handled per store round trip.
const MARKS_PER_BATCH: usize = 4096;
const DAY_MS: i64 = 86_400_000;

/// What one or more passes did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PassReport {
    pub minutes: u64,
    pub hours: u64,
    pub days: u64,
    pub samples_folded: u64,
    /// Marks cleared without recomputing because their inputs are past retention.
    pub skipped_past_retention: u64,
    /// Servers whose rollups changed, with the metric names that changed (for cache
    /// invalidation and live updates).
    #[serde(skip)]
    pub servers: BTreeMap<String, BTreeSet<String>>,
}

impl PassReport {
    fn absorb(&mut self, other: PassReport) {
        self.minutes += other.minutes;
        self.hours += other.hours;
        self.days += other.days;
        self.samples_folded += other.samples_folded;
        self.skipped_past_retention += other.skipped_past_retention;
        for (server, names) in other.servers {
            self.servers.entry(server).or_default().extend(names);
        }
    }

    pub fn buckets(&self) -> u64 {
        self.minutes + self.hours + self.days
    }
}

/// The instants before which each kind of data is deleted.
pub fn cutoffs(retention: &RetentionConfig, now: i64) -> RetentionCutoffs {
    let days = |d: Option<i64>| d.filter(|d| *d > 0).map(|d| now - d * DAY_MS);
    RetentionCutoffs {
        raw: days(Some(retention.raw_days)),
        minute: days(Some(retention.minute_days)),
        hour: days(Some(retention.hour_days)),
        day: days(retention.day_days),
    }
}

/// Where inputs of a level's buckets may be incomplete: raw samples before the raw
/// cutoff, minutes before the minute cutoff, hours before the hour cutoff.
fn input_cutoff(level: Level, c: &RetentionCutoffs) -> Option<i64> {
    match level {
        Level::Minute => c.raw,
        Level::Hour => c.minute,
        Level::Day => c.hour,
    }
}

/// Processes every dirty mark of every level once (more marks may arrive meanwhile).
pub async fn run_pass(store: &Arc<dyn Store>, retention: &RetentionConfig) -> StoreResult<PassReport> {
    let mut report = PassReport::default();
    let limits = cutoffs(retention, now_ms());
    for level in Level::ALL {
        loop {
            let work = store.rollup_work(level, MARKS_PER_BATCH).await?;
            let taken = work.items.len();
            if taken == 0 {
                break;
            }
            let cutoff = input_cutoff(level, &limits);
            let computed = tokio::task::spawn_blocking(move || compute(level, work, cutoff))
                .await
                .map_err(|e| mcp_metrics_store::StoreError::Database(format!("rollup computation failed: {e}")))?;
            let (results, stale, part) = computed;
            if !stale.is_empty() {
                store.drop_dirty_marks(stale).await?;
            }
            if !results.is_empty() {
                store.apply_rollups(level, results).await?;
            }
            report.absorb(part);
            if taken < MARKS_PER_BATCH {
                break;
            }
        }
    }
    Ok(report)
}

type Computed = (Vec<(DirtyMark, Option<BucketStats>)>, Vec<DirtyMark>, PassReport);

/// The CPU part of a pass: pure folding and merging.
fn compute(level: Level, work: mcp_metrics_store::RollupWork, cutoff: Option<i64>) -> Computed {
    let mut report = PassReport::default();
    let mut results = Vec::with_capacity(work.items.len());
    let mut stale = Vec::new();
    for (mark, input) in work.items {
        if cutoff.is_some_and(|c| mark.bucket < c) {
            report.skipped_past_retention += 1;
            stale.push(mark);
            continue;
        }
        // A series deleted with its server has no entry: its bucket is removed.
        let (kind, server) = match work.series.get(&mark.series_id) {
            Some((kind, server, name)) => (*kind, Some((server, name))),
            None => (Kind::Gauge, None),
        };
        let stats = server.and_then(|_| {
            report.samples_folded += input.new_samples();
            input.fold(kind)
        });
        if let Some((server, name)) = server {
            report.servers.entry(server.clone()).or_default().insert(name.clone());
        }
        match level {
            Level::Minute => report.minutes += 1,
            Level::Hour => report.hours += 1,
            Level::Day => report.days += 1,
        }
        results.push((mark, stats));
    }
    (results, stale, report)
}

/// Runs passes until no mark is left (or `max_passes`), calling `progress` with the
/// backlog after each pass. Used by the aggregate endpoint and command.
pub async fn run_until_idle(
    store: &Arc<dyn Store>,
    retention: &RetentionConfig,
    max_passes: usize,
    mut progress: impl FnMut(&PassReport, u64),
) -> StoreResult<PassReport> {
    let mut total = PassReport::default();
    for _ in 0..max_passes {
        let pass = run_pass(store, retention).await?;
        let done = pass.buckets() == 0 && pass.skipped_past_retention == 0;
        total.absorb(pass);
        let backlog: u64 = store.dirty_backlog().await?.iter().sum();
        progress(&total, backlog);
        if done || backlog == 0 {
            break;
        }
    }
    Ok(total)
}

/// Deletes data past retention.
pub async fn apply_retention(store: &Arc<dyn Store>, retention: &RetentionConfig) -> StoreResult<RetentionReport> {
    store.apply_retention(&cutoffs(retention, now_ms())).await
}

/// The background loop: a pass every `interval`, retention every `retention_interval`,
/// on the one node of a cluster that holds the job lock. `on_change` hears which
/// servers' rollups changed.
pub async fn run_job(
    store: Arc<dyn Store>,
    retention: RetentionConfig,
    interval: Duration,
    retention_interval: Duration,
    telemetry: Arc<crate::telemetry::Telemetry>,
    on_change: impl Fn(&BTreeMap<String, BTreeSet<String>>) + Send + 'static,
) {
    // The wait before the next tick: the interval, but at least as long as the last pass
    // took, so under a load that makes passes slow (many minutes that must be read again)
    // the job uses at most about half of its database connection and core,
    // and ingest keeps the rest; rollups then lag by a few passes instead.
    let mut pause = Duration::ZERO;
    let mut last_retention: Option<Instant> = None;
    let mut leading = false;
    loop {
        tokio::time::sleep(pause).await;
        pause = interval;
        // One node of a cluster runs the job; the others wait to take over. A node that
        // dies releases the lock with its connection, so a follower takes over at its next
        // tick.
        match store.hold_job_lock(JOB_LOCK).await {
            Ok(true) => {
                if !leading {
                    tracing::info!("this node now runs the rollup and retention job");
                    // A new leader applies retention at once rather than inheriting a timer.
                    last_retention = None;
                }
                leading = true;
            }
            Ok(false) => {
                if leading {
                    tracing::warn!("another node took over the rollup and retention job");
                }
                leading = false;
            }
            Err(e) => {
                if leading {
                    tracing::warn!(error = %e, "lost the rollup job lock (database unavailable); retrying");
                }
                leading = false;
            }
        }
        telemetry
            .rollup_leader
            .store(u64::from(leading), std::sync::atomic::Ordering::Relaxed);
        if !leading {
            continue;
        }
        let started = Instant::now();
        match run_pass(&store, &retention).await {
            Ok(report) => {
                pause = interval.max(started.elapsed());
                telemetry.rollup_pass(started.elapsed(), &report);
                if !report.servers.is_empty() {
                    on_change(&report.servers);
                }
            }
            Err(e) => tracing::warn!(error = %e, "rollup pass failed; retrying at the next tick"),
        }
        if let Ok(backlog) = store.dirty_backlog().await {
            telemetry
                .rollup_backlog
                .store(backlog.iter().sum(), std::sync::atomic::Ordering::Relaxed);
        }
        if last_retention.is_none_or(|t| t.elapsed() >= retention_interval) {
            last_retention = Some(Instant::now());
            match apply_retention(&store, &retention).await {
                Ok(r) if r != RetentionReport::default() => tracing::info!(?r, "retention deleted old data"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "retention failed; retrying later"),
            }
        }
    }
}
