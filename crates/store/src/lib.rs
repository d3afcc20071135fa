//! Durable storage for mcp-metrics behind one trait.
//!
//! The [`Store`] trait speaks only domain types from `mcp-metrics-core`; SQL, drivers
//! and migrations stay inside each implementation, so the HTTP layer and the ingest
//! pipeline never change when a backend is added. [`open`] picks the implementation
//! from the database URL: SQLite for a file, PostgreSQL for a `postgres://` URL (several
//! nodes sharing one database).

pub mod copy;
mod error;
pub mod postgres;
pub mod sqlite;
mod types;

use std::sync::Arc;

pub use error::{StoreError, StoreResult};
pub use types::*;

/// A minute in ms: raw samples are kept, and rollups marked, per minute.
pub(crate) const MINUTE: i64 = 60_000;

use async_trait::async_trait;
use mcp_metrics_core::model::{
    CredentialInfo, NewEvent, SeriesInfo, Server, ServerFields, StoredCredential, StoredEvent,
};
use mcp_metrics_core::rollup::{BucketStats, Level};

/// A group commit run on the caller's thread; see [`Store::blocking_commit`].
pub trait BlockingCommit: Send + Sync {
    /// What [`Store::write_batch`] does, blocking until the commit is durable.
    fn write_batch(&self, batch: WriteBatch) -> StoreResult<Vec<RequestOutcome>>;
}

/// Everything the service persists. Implementations must be safe to share between
/// tasks; [`Store::write_batch`] is called by at most [`Store::write_concurrency`]
/// writer tasks at a time.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `"sqlite"` or `"postgres"`, for logs and `/readyz`.
    fn backend(&self) -> &'static str;
    /// How many [`Store::write_batch`] calls the writer may run at once. SQLite has one
    /// write lock, so one; a server database overlaps one batch's commit with the next.
    fn write_concurrency(&self) -> usize {
        1
    }
    /// Succeeds when the database answers and its schema is current.
    async fn ping(&self) -> StoreResult<()>;
    /// The newest applied migration.
    async fn schema_version(&self) -> StoreResult<i64>;
    async fn meta_get(&self, key: &str) -> StoreResult<Option<String>>;
    async fn meta_set(&self, key: &str, value: &str) -> StoreResult<()>;

    /// Registers a server; [`StoreError::Conflict`] when the id is taken.
    async fn create_server(&self, id: &str, fields: &ServerFields, now: i64) -> StoreResult<Server>;
    /// Changes the fields that are `Some`; [`StoreError::NotFound`] for an unknown id.
    async fn update_server(&self, id: &str, fields: &ServerFields, now: i64) -> StoreResult<Server>;
    /// Removes a server with its credentials, series, samples and events.
    async fn delete_server(&self, id: &str) -> StoreResult<()>;
    async fn get_server(&self, id: &str) -> StoreResult<Option<Server>>;
    async fn list_servers(&self) -> StoreResult<Vec<Server>>;

    async fn insert_credential(&self, credential: &StoredCredential) -> StoreResult<()>;
    async fn credential_by_hash(&self, api_key_hash: &[u8; 32]) -> StoreResult<Option<StoredCredential>>;
    /// Credentials of one server, or of all servers when `server_id` is `None`.
    async fn list_credentials(&self, server_id: Option<&str>) -> StoreResult<Vec<CredentialInfo>>;
    /// Every credential with its sealed secret, for re-sealing under a new master key.
    async fn all_sealed_credentials(&self) -> StoreResult<Vec<StoredCredential>>;
    /// Replaces sealed secrets and records the new master key's fingerprint under
    /// `meta[fingerprint_key]`, all in one transaction (master key rotation).
    async fn reseal_credentials(
        &self,
        resealed: &[(String, Vec<u8>)],
        fingerprint_key: &str,
        fingerprint: &str,
    ) -> StoreResult<()>;
    /// Marks a credential revoked. Returns `false` when it already was;
    /// [`StoreError::NotFound`] if the server has no such credential. Once it returns, no
    /// write that found the key live is still to commit (SQLite's one writer gives that
    /// for free; PostgreSQL waits for such writes).
    async fn revoke_credential(&self, server_id: &str, key_id: &str, now: i64) -> StoreResult<bool>;

    /// Every known series, to warm the in-memory series cache at start-up.
    async fn all_series(&self) -> StoreResult<Vec<SeriesInfo>>;
    /// Series of one server, optionally only those with one metric name.
    async fn series_of_server(&self, server_id: &str, name: Option<&str>) -> StoreResult<Vec<SeriesInfo>>;
    /// Commits many ingest requests in one transaction (group commit). Each request is
    /// checked for replay and retry inside the transaction, so the checks hold for every
    /// process sharing the database.
    async fn write_batch(&self, batch: WriteBatch) -> StoreResult<Vec<RequestOutcome>>;
    /// The same group commit as blocking work, for a store whose commit is blocking work
    /// anyway (SQLite): the writer then runs on a thread of its own and calls it there,
    /// instead of handing each group to the blocking pool and waiting to be woken.
    fn blocking_commit(&self) -> Option<Arc<dyn BlockingCommit>> {
        None
    }
    /// Raw samples of the given series, ordered by (timestamp, series, seq).
    async fn read_samples(&self, query: &SampleQuery) -> StoreResult<Vec<mcp_metrics_core::model::RawSample>>;
    /// Deletes replay and retry records that have expired; returns how many.
    async fn purge_request_guards(&self, now: i64) -> StoreResult<u64>;

    /// Dirty buckets of `level` (at most `max_marks`) with what they are rebuilt from,
    /// read from one consistent snapshot.
    async fn rollup_work(&self, level: Level, max_marks: usize) -> StoreResult<RollupWork>;
    /// Stores recomputed buckets (`None` deletes an emptied bucket) unless a stored bucket
    /// was computed from a newer mark generation, clears the marks that were not renewed
    /// meanwhile, and marks the parent buckets dirty.
    async fn apply_rollups(&self, level: Level, results: Vec<(DirtyMark, Option<BucketStats>)>) -> StoreResult<()>;
    /// Clears marks without recomputing their buckets.
    async fn drop_dirty_marks(&self, marks: Vec<DirtyMark>) -> StoreResult<()>;
    /// Marks every minute with raw samples in [from, to) dirty; returns how many.
    async fn mark_range_dirty(&self, from: i64, to: i64) -> StoreResult<u64>;
    /// Dirty marks waiting, by level.
    async fn dirty_backlog(&self) -> StoreResult<[u64; 3]>;
    /// Stored buckets of `level` for these series in [from, to), by series then time.
    async fn read_rollups(&self, level: Level, series_ids: &[i64], from: i64, to: i64) -> StoreResult<Vec<RollupRow>>;
    /// Deletes data older than the cutoffs.
    async fn apply_retention(&self, cutoffs: &RetentionCutoffs) -> StoreResult<RetentionReport>;

    /// The salt of a UTC day: `candidate` is stored if the day has none yet; the stored
    /// one is returned, so every node uses the same salt.
    async fn usage_salt(&self, day: i64, candidate: [u8; 32]) -> StoreResult<[u8; 32]>;
    /// Deletes salts, and the per-visitor day records keyed by them, of days before
    /// `day`; returns how many salts.
    async fn forget_usage_before(&self, day: i64) -> StoreResult<u64>;
    /// Stores usage events and updates the daily figures in one transaction.
    async fn record_usage(&self, events: Vec<UsageRecord>) -> StoreResult<()>;
    /// Daily usage of a server for days in [from_day, to_day], oldest first; days
    /// without events are absent.
    async fn usage_days(&self, server_id: &str, from_day: i64, to_day: i64) -> StoreResult<Vec<UsageDay>>;
    /// Deletes anonymous usage events older than `cutoff` (unix ms).
    async fn purge_usage_events(&self, cutoff: i64) -> StoreResult<u64>;

    async fn insert_event(&self, event: &NewEvent) -> StoreResult<i64>;
    /// Newest first; `before` is an (at, id) position from a previous page.
    async fn list_events(
        &self,
        server_id: &str,
        before: Option<(i64, i64)>,
        limit: usize,
    ) -> StoreResult<Vec<StoredEvent>>;

    /// Sends `payload` to every node sharing the database (PostgreSQL NOTIFY on one
    /// channel, delivered after commit). Single-node backends do nothing.
    async fn notify(&self, payload: &str) -> StoreResult<()>;
    /// A stream of every node's `notify` payloads (this node's own included), or `None`
    /// when the backend serves a single node. The PostgreSQL listener reconnects by itself
    /// when its connection drops; the receiver stays valid across reconnects.
    async fn listen(&self) -> StoreResult<Option<tokio::sync::mpsc::Receiver<String>>>;
    /// Takes or keeps the named cluster-wide job lock; `true` while this node holds it.
    /// Called every job tick: a node that dies (even by kill -9) releases the lock with its
    /// connection, and another node's next call takes it over.
    async fn hold_job_lock(&self, job: &str) -> StoreResult<bool>;
    /// Holds the named lock on every node sharing the database until the guard is
    /// released or dropped, waiting while another node holds it (at most half a minute,
    /// then `Unavailable`). For work that reads shared state and writes what follows from
    /// it, such as an OTLP stream's running total. Single-node backends hand out a guard
    /// at once: callers already serialize such work within their process.
    async fn cluster_lock(&self, _name: &str) -> StoreResult<ClusterLock> {
        Ok(ClusterLock::default())
    }
}

/// A held [`Store::cluster_lock`]. Release it with [`ClusterLock::release`] to know the
/// outcome; dropping it releases it in the background (PostgreSQL keeps the session for
/// the next lock), or, outside a runtime, frees it by closing its session.
#[derive(Default)]
pub struct ClusterLock(Option<Box<dyn ReleaseLock>>);

impl Drop for ClusterLock {
    fn drop(&mut self) {
        let Some(lock) = self.0.take() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = lock.release().await {
                    // The lock goes with its session.
                    tracing::warn!(error = %e, "releasing a dropped cluster lock");
                }
            });
        }
    }
}

#[async_trait]
pub(crate) trait ReleaseLock: Send {
    async fn release(self: Box<Self>) -> StoreResult<()>;
}

impl ClusterLock {
    pub(crate) fn held(lock: Box<dyn ReleaseLock>) -> Self {
        ClusterLock(Some(lock))
    }

    /// Frees the lock now. An error means the release could not be confirmed; the lock
    /// is freed anyway, with the session that held it.
    pub async fn release(mut self) -> StoreResult<()> {
        match self.0.take() {
            Some(lock) => lock.release().await,
            None => Ok(()),
        }
    }
}

/// Opens the store named by a database URL, running migrations.
///
/// `sqlite://relative/path.db`, `sqlite:///absolute/path.db` and plain paths open SQLite;
/// `postgres://` and `postgresql://` URLs open PostgreSQL.
pub async fn open(url: &str, options: &StoreOptions) -> StoreResult<Arc<dyn Store>> {
    if is_postgres_url(url) {
        return Ok(Arc::new(postgres::PostgresStore::open(url, options).await?));
    }
    let path = sqlite::path_from_url(url)?;
    let store = sqlite::SqliteStore::open(&path, options).await?;
    Ok(Arc::new(store))
}

/// Whether `url` names a PostgreSQL database.
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}
