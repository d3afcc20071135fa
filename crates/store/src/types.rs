//! Inputs and outputs of the store's ingest and read operations.

use std::collections::HashMap;

use mcp_metrics_core::model::{Kind, NewEvent, SeriesInfo, SeriesKey};
use mcp_metrics_core::rollup::{BucketStats, Level};

/// Tunables of a store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// SQLite `synchronous`: `true` → FULL (survives power loss), `false` → NORMAL
    /// (survives a process crash, the contract's `kill -9`).
    pub durable_fsync: bool,
    /// Read connections kept open.
    pub read_pool_size: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            durable_fsync: true,
            read_pool_size: 4,
        }
    }
}

/// Which series a pending sample belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeriesRef {
    /// Already in the store.
    Known(i64),
    /// Index into [`WriteRequest::new_series`]; the store creates it (or finds it, if
    /// another request created it first).
    New(u32),
}

/// A validated sample waiting to be written.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PendingSample {
    pub series: SeriesRef,
    pub kind: Kind,
    pub timestamp: i64,
    pub value: f64,
}

/// A series first seen in this request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSeries {
    pub key: SeriesKey,
    pub kind: Kind,
}

/// One acknowledged-after-commit ingest request.
#[derive(Debug, Clone, Default)]
pub struct WriteRequest {
    /// The server the request's key belongs to; everything it stores is under it.
    pub server_id: String,
    pub key_id: String,
    /// Set when `key_id` authenticated the request (the HTTP layer always sets it): the
    /// writer then stores nothing unless that credential still exists, unrevoked, for
    /// `server_id`, and answers [`RequestOutcome::ServerGone`]. A server deleted and re-created under
    /// the same id between the key check and the commit has new keys, so the request does
    /// not land in it. Store tests that name no real credential leave it unset.
    pub require_credential: bool,
    /// The verified signature; a second request with it inside the window is a replay.
    pub signature: Option<[u8; 32]>,
    /// SHA-256 of the body; a second request from the same key with it inside the window
    /// is a retry, acknowledged without storing anything.
    pub body_digest: Option<[u8; 32]>,
    pub new_series: Vec<NewSeries>,
    pub samples: Vec<PendingSample>,
    /// A server event to store in the same transaction as the request's guards.
    pub event: Option<NewEvent>,
}

impl WriteRequest {
    /// Servers this request stores rows under: its own, and those its new series and
    /// event name (the same one, from the HTTP layer). A server deleted since the request
    /// was authenticated makes it [`RequestOutcome::ServerGone`]: nothing of it is stored,
    /// not even samples of series the request's node already knew.
    ///
    /// Other servers are listed only where they differ from the request's own: the HTTP
    /// layer's new series and event all name it, so a request of 1,000 new series yields
    /// one id, not 1,001 for the writers to hash and look up.
    pub fn servers_written(&self) -> impl Iterator<Item = &str> {
        let own = self.server_id.as_str();
        std::iter::once(own).chain(
            self.new_series
                .iter()
                .map(|n| n.key.server_id.as_str())
                .chain(self.event.iter().map(|e| e.server_id.as_str()))
                .filter(move |s| *s != own),
        )
    }
}

/// Requests committed together.
#[derive(Debug, Clone, Default)]
pub struct WriteBatch {
    pub requests: Vec<WriteRequest>,
    /// Unix ms at commit time; guards expire relative to it.
    pub now: i64,
    /// How long signatures and body digests are remembered, in ms.
    pub replay_window_ms: i64,
    pub retry_window_ms: i64,
    /// Most series one server may have; a request's new series beyond it are not created
    /// and their samples are refused (`series_refused`). 0: no limit.
    pub max_series_per_server: u64,
}

/// What happened to one request of a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum RequestOutcome {
    /// Samples stored; the series the store created or found for `new_series`, in order.
    Stored {
        series: Vec<SeriesInfo>,
        /// Id of the request's event, when it carried one.
        event_id: Option<i64>,
        /// Samples not stored, as (position in the request's samples, the series' kind):
        /// their new series had just been created as another kind by another request (of
        /// this group, or another node), so they get the same answer as a sample sent to
        /// a series already known as another kind.
        kind_conflicts: Vec<(u32, Kind)>,
        /// Samples not stored (positions in the request's samples, ascending) because
        /// their series was new and its server already had
        /// [`WriteBatch::max_series_per_server`] series. Series that exist already are
        /// never refused, so known series keep flowing at the limit.
        series_refused: Vec<u32>,
    },
    /// Same key and body seen inside the retry window: nothing stored.
    Duplicate,
    /// Same signature seen inside the replay window: nothing stored.
    Replayed,
    /// The server it writes under was deleted after the request was authenticated:
    /// nothing stored, and the rest of the group is stored as usual.
    ServerGone,
}

/// A page of raw samples.
#[derive(Debug, Clone)]
pub struct SampleQuery {
    pub series_ids: Vec<i64>,
    /// Inclusive lower bound, unix ms.
    pub from: i64,
    /// Exclusive upper bound, unix ms.
    pub to: i64,
    /// Position after which to continue: (timestamp, series_id, seq).
    pub after: Option<(i64, i64, i64)>,
    pub limit: usize,
}

/// A (level, bucket, series) whose rollup must be recomputed. `generation` changes each
/// time the mark is set again, so a pass only clears marks that nothing renewed while it
/// computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DirtyMark {
    pub level: Level,
    pub bucket: i64,
    pub series_id: i64,
    pub generation: i64,
}

/// What a dirty bucket is recomputed from.
#[derive(Debug, Clone, PartialEq)]
pub enum RollupInput {
    /// Raw samples of a minute, in (timestamp, seq) order.
    Raw(Vec<(i64, f64)>),
    /// The finer buckets of an hour or a day, oldest first.
    Children(Vec<BucketStats>),
    /// The stored minute bucket and what was written to it since it was computed, for
    /// `BucketStats::splice`: every sample from the earliest new one to the end of the
    /// minute in (timestamp, seq) order, flagged `true` when new, and the stored sample
    /// just before them. A store offers this when it knows exactly which samples are new,
    /// so a busy minute is not read again from its start at every pass.
    Splice {
        base: BucketStats,
        before: Option<(i64, f64)>,
        tail: Vec<(i64, f64, bool)>,
    },
    /// The stored minute bucket and the buckets of the writes since, each write's
    /// samples later than everything before it: merged as consecutive buckets, with no
    /// sample read back.
    Merge {
        base: BucketStats,
        writes: Vec<BucketStats>,
    },
    /// The whole minute bucket, kept up to date in memory by the writer as it committed
    /// the samples (SQLite): nothing to read or fold. `new_samples` counts the samples
    /// it gained since a pass last took it.
    Kept { bucket: BucketStats, new_samples: u64 },
}

impl RollupInput {
    /// The bucket this input makes (`None` for a minute without samples).
    pub fn fold(self, kind: Kind) -> Option<BucketStats> {
        match self {
            RollupInput::Raw(samples) => BucketStats::fold(kind, samples),
            RollupInput::Children(children) => BucketStats::merge_all(&children),
            RollupInput::Splice { mut base, before, tail } => {
                base.splice(before, &tail);
                Some(base)
            }
            RollupInput::Merge { mut base, writes } => {
                writes.iter().for_each(|w| base.merge_next(w));
                Some(base)
            }
            RollupInput::Kept { bucket, .. } => Some(bucket),
        }
    }

    /// Raw samples this input adds to its bucket (none for hours and days).
    pub fn new_samples(&self) -> u64 {
        match self {
            RollupInput::Raw(samples) => samples.len() as u64,
            RollupInput::Children(_) => 0,
            RollupInput::Splice { tail, .. } => tail.iter().filter(|s| s.2).count() as u64,
            RollupInput::Merge { writes, .. } => writes.iter().map(|w| w.count).sum(),
            RollupInput::Kept { new_samples, .. } => *new_samples,
        }
    }
}

/// One pass's worth of dirty buckets with their inputs, read from one snapshot.
#[derive(Debug, Clone, Default)]
pub struct RollupWork {
    pub items: Vec<(DirtyMark, RollupInput)>,
    /// Kind, server and metric name of every series in `items`.
    pub series: HashMap<i64, (Kind, String, String)>,
}

/// A stored rollup bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct RollupRow {
    pub series_id: i64,
    pub bucket: i64,
    pub stats: BucketStats,
}

/// Data older than these instants (unix ms) is deleted; `None` keeps it forever.
#[derive(Debug, Clone, Copy, Default)]
pub struct RetentionCutoffs {
    pub raw: Option<i64>,
    pub minute: Option<i64>,
    pub hour: Option<i64>,
    pub day: Option<i64>,
}

/// Rows deleted by one retention run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RetentionReport {
    pub raw: u64,
    pub minute: u64,
    pub hour: u64,
    pub day: u64,
}

/// One accepted usage event, already anonymous: no address, only the visitor's keyed
/// hash for the day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRecord {
    pub server_id: String,
    pub kind: mcp_metrics_core::usage::UsageKind,
    pub client: Option<String>,
    /// Unix ms.
    pub at: i64,
    pub visitor: [u8; 16],
}

/// Usage of one server on one UTC day. `counted` applies the once-per-visitor rule to
/// installs, tests, config copies and repository clicks; `raw` counts every event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct UsageDay {
    /// Days since the epoch.
    pub day: i64,
    pub visitors: u64,
    /// Indexed by `UsageKind::index()`.
    pub counted: [u64; 5],
    pub raw: [u64; 5],
}
