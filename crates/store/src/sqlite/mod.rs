//! The SQLite store: WAL mode, one writer connection behind a mutex and a small pool of
//! read connections, each used from the blocking thread pool so async tasks never wait
//! on disk.
//!
//! The single writer matches SQLite's own single-writer design and the pipeline's group
//! commit: many requests share one transaction and one fsync.

mod kept_minutes;
pub(crate) mod mark_log;
mod migrations;
pub(crate) mod raw;
mod rollups;
pub mod run_codec;
mod usage;
mod value_codec;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use mcp_metrics_core::model::{
    CredentialInfo, EventSource, Kind, NewEvent, RawSample, SeriesInfo, SeriesKey, Server, ServerFields,
    StoredCredential, StoredEvent, Tags,
};
use mcp_metrics_core::rollup::{BucketStats, Level};
use mcp_metrics_core::time::now_ms;
use rusqlite::{Connection, ErrorCode, OptionalExtension, Row, TransactionBehavior, params};

use crate::{
    BlockingCommit, DirtyMark, NewSeries, RequestOutcome, RetentionCutoffs, RetentionReport, RollupRow, RollupWork,
    SampleQuery, SeriesRef, Store, StoreError, StoreOptions, StoreResult, UsageDay, UsageRecord, WriteBatch,
};

use kept_minutes::KeptMinutes;
pub use migrations::latest_version;

use crate::MINUTE;

/// Extracts the file path from `sqlite://path`, `sqlite:path` or a bare path.
pub fn path_from_url(url: &str) -> StoreResult<PathBuf> {
    let path = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or(url);
    if path.is_empty() {
        return Err(StoreError::Invalid(format!("database URL {url:?} names no file")));
    }
    if path.contains("://") {
        return Err(StoreError::Invalid(format!(
            "unsupported database URL {url:?}: use sqlite://PATH"
        )));
    }
    Ok(PathBuf::from(path))
}

fn map_err(e: rusqlite::Error) -> StoreError {
    match &e {
        rusqlite::Error::SqliteFailure(f, _) => match f.code {
            ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked | ErrorCode::CannotOpen => {
                StoreError::Unavailable(e.to_string())
            }
            ErrorCode::ConstraintViolation => StoreError::Conflict,
            _ => StoreError::Database(e.to_string()),
        },
        _ => StoreError::Database(e.to_string()),
    }
}

fn join_err(e: tokio::task::JoinError) -> StoreError {
    StoreError::Database(format!("database task failed: {e}"))
}

struct Inner {
    path: PathBuf,
    writer: Mutex<Connection>,
    /// Open minute buckets the writer keeps for the rollup job (see `kept_minutes`).
    kept: Arc<Mutex<KeptMinutes>>,
    /// The writer's side of the minute-mark log.
    mark_log: mark_log::Writer,
    readers: Mutex<Vec<Connection>>,
    read_pool_size: usize,
}

impl Inner {
    /// The write connection. A panic while it was held rolled its transaction back, so a
    /// poisoned lock still guards a usable connection.
    fn writer(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.writer.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn open_reader(&self) -> rusqlite::Result<Connection> {
        let conn = Connection::open(&self.path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "query_only", "ON")?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        // Reads map the file instead of copying pages through read(2).
        conn.pragma_update(None, "mmap_size", 1i64 << 30)?;
        Ok(conn)
    }
}

/// SQLite implementation of [`Store`].
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

fn configure_writer(conn: &Connection, options: &StoreOptions) -> rusqlite::Result<()> {
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "could not switch the database to WAL mode (got {mode})"
        )));
    }
    conn.pragma_update(
        None,
        "synchronous",
        if options.durable_fsync { "FULL" } else { "NORMAL" },
    )?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // 32 MiB of page cache keeps the hot end of the sample index in memory.
    conn.pragma_update(None, "cache_size", -32_768)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(())
}

/// The kept minutes. A panic while they were locked may have left an entry half
/// recorded (its generation renewed, samples missing), which the rollup job would then
/// take as complete: a poisoned lock forgets every entry (the job reads those minutes).
pub(crate) fn lock_kept(kept: &Mutex<KeptMinutes>) -> std::sync::MutexGuard<'_, KeptMinutes> {
    kept.lock().unwrap_or_else(|poisoned| {
        kept.clear_poison();
        let mut entries = poisoned.into_inner();
        entries.forget_all();
        entries
    })
}

/// Prepared statements kept per connection: the writer alone uses more than rusqlite's
/// default 16 (a write, a rollup apply, usage), which made it prepare them again.
const STATEMENT_CACHE: usize = 64;

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and applies migrations.
    pub async fn open(path: &Path, options: &StoreOptions) -> StoreResult<Self> {
        let path = path.to_path_buf();
        let options = options.clone();
        tokio::task::spawn_blocking(move || -> StoreResult<Self> {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .map_err(|e| StoreError::Unavailable(format!("cannot create directory {}: {e}", dir.display())))?;
            }
            let mut writer = Connection::open(&path)
                .map_err(|e| StoreError::Unavailable(format!("cannot open SQLite database {}: {e}", path.display())))?;
            configure_writer(&writer, &options).map_err(map_err)?;
            // A build that does not know the newest migration would write without it: an
            // older one, for example, marks minutes without the log of migration 6, and
            // the rollups it stores could then refuse the newer build's results.
            let version = migrations::current_version(&writer).map_err(map_err)?;
            if version > latest_version() {
                return Err(StoreError::Invalid(format!(
                    "{} is at schema version {version}, newer than this build's {}: run the mcp-metrics \
                     release that migrated it, or a newer one",
                    path.display(),
                    latest_version()
                )));
            }
            let applied = migrations::run(&mut writer, now_ms()).map_err(map_err)?;
            if !applied.is_empty() {
                tracing::info!(path = %path.display(), ?applied, "applied SQLite migrations");
            }
            Ok(SqliteStore {
                inner: Arc::new(Inner {
                    path,
                    writer: Mutex::new(writer),
                    kept: Arc::default(),
                    mark_log: mark_log::Writer::default(),
                    readers: Mutex::new(Vec::new()),
                    read_pool_size: options.read_pool_size.max(1),
                }),
            })
        })
        .await
        .map_err(join_err)?
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    async fn read<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let conn = match inner.readers.lock().expect("reader pool poisoned").pop() {
                Some(conn) => conn,
                None => inner.open_reader().map_err(map_err)?,
            };
            let result = f(&conn).map_err(map_err);
            let mut idle = inner.readers.lock().expect("reader pool poisoned");
            if idle.len() < inner.read_pool_size {
                idle.push(conn);
            }
            result
        })
        .await
        .map_err(join_err)?
    }

    async fn write<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&mut inner.writer()))
            .await
            .map_err(join_err)?
    }
}

const SERVER_COLUMNS: &str =
    "id, registry_name, name, description, repository_url, remote_url, owner, created_at, updated_at";

fn server_from_row(r: &Row<'_>) -> rusqlite::Result<Server> {
    Ok(Server {
        id: r.get(0)?,
        registry_name: r.get(1)?,
        name: r.get(2)?,
        description: r.get(3)?,
        repository_url: r.get(4)?,
        remote_url: r.get(5)?,
        owner: r.get(6)?,
        created_at: r.get(7)?,
        updated_at: r.get(8)?,
    })
}

fn get_server(conn: &Connection, id: &str) -> rusqlite::Result<Option<Server>> {
    conn.prepare_cached(&format!("SELECT {SERVER_COLUMNS} FROM servers WHERE id = ?1"))?
        .query_row([id], server_from_row)
        .optional()
}

const CREDENTIAL_COLUMNS: &str = "key_id, server_id, api_key_hash, sealed_secret, created_at, revoked_at, last_used_at";

fn credential_from_row(r: &Row<'_>) -> rusqlite::Result<StoredCredential> {
    let hash: Vec<u8> = r.get(2)?;
    Ok(StoredCredential {
        key_id: r.get(0)?,
        server_id: r.get(1)?,
        api_key_hash: hash.try_into().unwrap_or([0; 32]),
        sealed_secret: r.get(3)?,
        created_at: r.get(4)?,
        revoked_at: r.get(5)?,
        last_used_at: r.get(6)?,
    })
}

/// Canonical JSON for a sorted tag list: the stored identity of a series' tags.
pub(crate) fn tags_to_json(tags: &Tags) -> String {
    let map: serde_json::Map<String, serde_json::Value> = tags
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    serde_json::Value::Object(map).to_string()
}

pub(crate) fn tags_from_json(text: &str) -> Tags {
    serde_json::from_str::<BTreeMap<String, String>>(text)
        .map(|m| m.into_iter().collect())
        .unwrap_or_default()
}

fn series_from_row(r: &Row<'_>) -> rusqlite::Result<SeriesInfo> {
    let tags: String = r.get(3)?;
    let kind: i64 = r.get(4)?;
    Ok(SeriesInfo {
        id: r.get(0)?,
        key: SeriesKey {
            server_id: r.get(1)?,
            name: r.get(2)?,
            tags: tags_from_json(&tags),
        },
        kind: Kind::from_i64(kind).unwrap_or(Kind::Gauge),
    })
}

fn event_from_row(r: &Row<'_>) -> rusqlite::Result<StoredEvent> {
    let source: String = r.get(6)?;
    Ok(StoredEvent {
        id: r.get(0)?,
        event: NewEvent {
            server_id: r.get(1)?,
            kind: r.get(2)?,
            title: r.get(3)?,
            detail: r.get(4)?,
            at: r.get(5)?,
            source: if source == "system" {
                EventSource::System
            } else {
                EventSource::Author
            },
        },
    })
}

/// Whether rows still exist, asked once per key per transaction: work queued for a
/// server deleted meanwhile (a write, usage events) is dropped, instead of breaking a
/// foreign key and with it the whole transaction.
pub(crate) struct Exists<'t, K> {
    query: rusqlite::CachedStatement<'t>,
    known: HashMap<K, bool>,
}

/// Servers by id.
pub(crate) type LiveServers<'t, 'a> = Exists<'t, [&'a str; 1]>;

/// Credentials by (key id, server id): a server deleted and re-created under the same id
/// has new keys, so a request authenticated with an old one finds its credential gone.
pub(crate) type LiveCredentials<'t, 'a> = Exists<'t, [&'a str; 2]>;

impl<'t> Exists<'t, [&str; 1]> {
    pub(crate) fn new(tx: &'t rusqlite::Transaction<'_>) -> rusqlite::Result<Self> {
        Exists::asking(tx, "SELECT 1 FROM servers WHERE id = ?1")
    }
}

impl<'t> Exists<'t, [&str; 2]> {
    pub(crate) fn credentials(tx: &'t rusqlite::Transaction<'_>) -> rusqlite::Result<Self> {
        Exists::asking(
            tx,
            "SELECT 1 FROM credentials WHERE key_id = ?1 AND server_id = ?2 AND revoked_at IS NULL",
        )
    }
}

impl<'t, K: Copy + Eq + std::hash::Hash + rusqlite::Params> Exists<'t, K> {
    fn asking(tx: &'t rusqlite::Transaction<'_>, sql: &str) -> rusqlite::Result<Self> {
        Ok(Exists {
            query: tx.prepare_cached(sql)?,
            known: HashMap::new(),
        })
    }

    pub(crate) fn contains(&mut self, key: K) -> rusqlite::Result<bool> {
        if let Some(&found) = self.known.get(&key) {
            return Ok(found);
        }
        let found = self.query.exists(key)?;
        self.known.insert(key, found);
        Ok(found)
    }
}

impl<'t, 'a> LiveServers<'t, 'a> {
    /// Whether every one of these servers exists.
    pub(crate) fn all(&mut self, ids: impl IntoIterator<Item = &'a str>) -> rusqlite::Result<bool> {
        for id in ids {
            if !self.contains([id])? {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// Creates a write's new series, or finds them when another request or process created
/// them first, under the per-server series limit.
struct SeriesMaker<'t> {
    insert: rusqlite::CachedStatement<'t>,
    find: rusqlite::CachedStatement<'t>,
    count: rusqlite::CachedStatement<'t>,
    limit: u64,
    now: i64,
    /// Series each server holds: counted when the server first makes one in this write
    /// (under the write lock, so exact), then kept up to date.
    held: HashMap<String, u64>,
}

impl<'t> SeriesMaker<'t> {
    fn new(tx: &'t rusqlite::Transaction<'_>, batch: &WriteBatch) -> rusqlite::Result<Self> {
        Ok(SeriesMaker {
            insert: tx.prepare_cached(
                "INSERT INTO series (server_id, name, tags, kind, created_at) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (server_id, name, tags) DO NOTHING",
            )?,
            find: tx.prepare_cached("SELECT id, kind FROM series WHERE server_id = ?1 AND name = ?2 AND tags = ?3")?,
            count: tx.prepare_cached("SELECT count(*) FROM series WHERE server_id = ?1")?,
            limit: batch.max_series_per_server,
            now: batch.now,
            held: HashMap::new(),
        })
    }

    /// The series, created if it is new and its server is below the limit; `None` when
    /// it does not exist and the limit refuses it.
    fn make(&mut self, new: &NewSeries) -> rusqlite::Result<Option<SeriesInfo>> {
        let server = new.key.server_id.as_str();
        let tags = tags_to_json(&new.key.tags);
        let room = if self.limit == 0 {
            None
        } else {
            if !self.held.contains_key(server) {
                let counted: i64 = self.count.query_row([server], |r| r.get(0))?;
                self.held.insert(server.to_owned(), counted as u64);
            }
            self.held.get_mut(server)
        };
        match room {
            Some(held) if *held >= self.limit => {}
            room => {
                let created = self
                    .insert
                    .execute(params![server, new.key.name, tags, new.kind.to_i64(), self.now])?;
                if let Some(held) = room {
                    *held += created as u64;
                }
            }
        }
        let found: Option<(i64, i64)> = self
            .find
            .query_row(params![server, new.key.name, tags], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        Ok(found.map(|(id, kind)| SeriesInfo {
            id,
            key: new.key.clone(),
            kind: Kind::from_i64(kind).unwrap_or(new.kind),
        }))
    }
}

fn write_batch_blocking(
    conn: &mut Connection,
    batch: &WriteBatch,
    kept: &Mutex<KeptMinutes>,
    log_writer: &mark_log::Writer,
) -> rusqlite::Result<Vec<RequestOutcome>> {
    let now = batch.now;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // Read under the write lock: no other connection can commit until this one does.
    // Cached like every statement of a write: `query_row` would parse it again each time.
    let data_version: i64 = tx.prepare_cached("PRAGMA data_version")?.query_row([], |r| r.get(0))?;
    lock_kept(kept).observe_data_version(data_version);
    let mut outcomes = Vec::with_capacity(batch.requests.len());
    let mut was_empty = kept_minutes::MinuteMap::default();
    let generation;
    let mut runs = raw::PendingRuns::default();
    {
        // A guard row that exists and has not expired makes the upsert a no-op, so
        // `execute` reporting 0 changed rows means "seen inside the window".
        let mut guard_signature = tx.prepare_cached(
            "INSERT INTO seen_signatures (signature, expires_at) VALUES (?1, ?2)
             ON CONFLICT (signature) DO UPDATE SET expires_at = excluded.expires_at
             WHERE seen_signatures.expires_at <= ?3",
        )?;
        let mut guard_digest = tx.prepare_cached(
            "INSERT INTO request_digests (key_id, digest, expires_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (key_id, digest) DO UPDATE SET expires_at = excluded.expires_at
             WHERE request_digests.expires_at <= ?4",
        )?;
        let mut series_maker = SeriesMaker::new(&tx, batch)?;
        let mut insert_event = tx.prepare_cached(
            "INSERT INTO server_events (server_id, kind, title, detail, at, source) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        let mut touch_credential = tx.prepare_cached(
            "UPDATE credentials SET last_used_at = ?2 WHERE key_id = ?1 AND (last_used_at IS NULL OR last_used_at <= ?2 - 60000)",
        )?;

        // A request for a deleted server stores nothing: its new series would break the
        // foreign key and with it the whole group's transaction, and its other samples
        // would name series that are gone. Nor does one whose key went with its server
        // (the server may exist again under the same id, with other keys).
        let mut live = LiveServers::new(&tx)?;
        let mut credentials = LiveCredentials::credentials(&tx)?;
        for request in &batch.requests {
            let gone = !live.all(request.servers_written())?
                || (request.require_credential
                    && !credentials.contains([request.key_id.as_str(), request.server_id.as_str()])?);
            if gone {
                outcomes.push(RequestOutcome::ServerGone);
                continue;
            }
            if let Some(signature) = &request.signature
                && guard_signature.execute(params![&signature[..], now + batch.replay_window_ms, now])? == 0
            {
                outcomes.push(RequestOutcome::Replayed);
                continue;
            }
            if let Some(digest) = &request.body_digest
                && guard_digest.execute(params![request.key_id, &digest[..], now + batch.retry_window_ms, now])? == 0
            {
                outcomes.push(RequestOutcome::Duplicate);
                continue;
            }
            // Each new series as made, `None` where the limit refused it.
            let made = request
                .new_series
                .iter()
                .map(|new| series_maker.make(new))
                .collect::<rusqlite::Result<Vec<_>>>()?;
            // A series another request created first as another kind keeps it; the
            // samples meant for the other kind are refused, so a series never holds
            // samples of two kinds (reading runs and the kept minutes rely on it).
            let mut kind_conflicts = Vec::new();
            let mut series_refused = Vec::new();
            runs.expect(request.samples.len());
            for (position, sample) in request.samples.iter().enumerate() {
                match sample.series {
                    SeriesRef::Known(id) => {
                        runs.push(&request.server_id, id, sample.timestamp, sample.kind, sample.value);
                    }
                    SeriesRef::New(i) => match &made[i as usize] {
                        Some(created) if created.kind == sample.kind => {
                            // The batch's copy: `runs` holds it past this request.
                            let server = request.new_series[i as usize].key.server_id.as_str();
                            runs.push(server, created.id, sample.timestamp, created.kind, sample.value);
                        }
                        Some(created) => kind_conflicts.push((position as u32, created.kind)),
                        None => series_refused.push(position as u32),
                    },
                }
            }
            let event_id = match &request.event {
                Some(e) => {
                    insert_event.execute(params![e.server_id, e.kind, e.title, e.detail, e.at, e.source.as_str()])?;
                    Some(tx.last_insert_rowid())
                }
                None => None,
            };
            touch_credential.execute(params![request.key_id, now])?;
            outcomes.push(RequestOutcome::Stored {
                series: made.into_iter().flatten().collect(),
                event_id,
                kind_conflicts,
                series_refused,
            });
        }
        runs.insert(&tx)?;
        // Every minute that received a sample is recomputed by the rollup job.
        let dirty = runs.minutes();
        // A minute the kept buckets have not seen yet can be kept only if it held
        // nothing before this write: no mark waiting (set or logged) and no bucket stored.
        let unknown = lock_kept(kept).unknown(&dirty);
        if !unknown.is_empty() {
            // `unknown` keeps `dirty`'s order: sorted by minute.
            let logged = mark_log::logged_among(&tx, &unknown)?;
            let mut held_something = tx.prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM rollup_dirty WHERE level = 0 AND bucket = ?1 AND series_id = ?2)
                     OR EXISTS (SELECT 1 FROM rollups_1m WHERE series_id = ?2 AND bucket = ?1)",
            )?;
            for key in unknown {
                let held = logged.contains(&key) || held_something.query_row(params![key.0, key.1], |r| r.get(0))?;
                was_empty.insert(key, !held);
            }
        }
        generation = rollups::next_generation(&tx)?;
        log_writer.append(&tx, &dirty, generation)?;
    }
    let committed = tx.commit();
    let mut kept = lock_kept(kept);
    match committed {
        Ok(()) => kept.record(generation, &was_empty, runs.rows()),
        // A failed commit may still have reached the file: nothing kept can be vouched for.
        Err(_) => kept.forget_all(),
    }
    committed?;
    Ok(outcomes)
}

impl BlockingCommit for SqliteStore {
    fn write_batch(&self, batch: WriteBatch) -> StoreResult<Vec<RequestOutcome>> {
        write_batch_blocking(&mut self.inner.writer(), &batch, &self.inner.kept, &self.inner.mark_log).map_err(map_err)
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn ping(&self) -> StoreResult<()> {
        let version = self.schema_version().await?;
        if version < migrations::latest_version() {
            return Err(StoreError::Unavailable(format!(
                "schema version {version} is older than {}: run `mcp-metrics migrate`",
                migrations::latest_version()
            )));
        }
        Ok(())
    }

    async fn schema_version(&self) -> StoreResult<i64> {
        self.read(|c| {
            c.query_row("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", [], |r| {
                r.get(0)
            })
        })
        .await
    }

    async fn meta_get(&self, key: &str) -> StoreResult<Option<String>> {
        let key = key.to_owned();
        self.read(move |c| {
            c.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()
        })
        .await
    }

    async fn meta_set(&self, key: &str, value: &str) -> StoreResult<()> {
        let (key, value) = (key.to_owned(), value.to_owned());
        self.write(move |c| {
            c.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [key, value],
            )
            .map_err(map_err)?;
            Ok(())
        })
        .await
    }

    async fn create_server(&self, id: &str, fields: &ServerFields, now: i64) -> StoreResult<Server> {
        let (id, f) = (id.to_owned(), fields.clone());
        self.write(move |c| {
            c.execute(
                "INSERT INTO servers (id, registry_name, name, description, repository_url, remote_url, owner, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8)",
                params![id, f.registry_name, f.name, f.description, f.repository_url, f.remote_url, f.owner, now],
            )
            .map_err(map_err)?;
            get_server(c, &id).map_err(map_err)?.ok_or(StoreError::NotFound)
        })
        .await
    }

    async fn update_server(&self, id: &str, fields: &ServerFields, now: i64) -> StoreResult<Server> {
        let (id, f) = (id.to_owned(), fields.clone());
        self.write(move |c| {
            let changed = c
                .execute(
                    "UPDATE servers SET
                        registry_name = COALESCE(?2, registry_name), name = COALESCE(?3, name),
                        description = COALESCE(?4, description), repository_url = COALESCE(?5, repository_url),
                        remote_url = COALESCE(?6, remote_url), owner = COALESCE(?7, owner), updated_at = ?8
                     WHERE id = ?1",
                    params![
                        id,
                        f.registry_name,
                        f.name,
                        f.description,
                        f.repository_url,
                        f.remote_url,
                        f.owner,
                        now
                    ],
                )
                .map_err(map_err)?;
            if changed == 0 {
                return Err(StoreError::NotFound);
            }
            get_server(c, &id).map_err(map_err)?.ok_or(StoreError::NotFound)
        })
        .await
    }

    async fn delete_server(&self, id: &str) -> StoreResult<()> {
        let id = id.to_owned();
        self.write(move |c| {
            // Immediate: the settling reads before it writes, and a deferred transaction
            // could then fail at its first write instead of waiting for another process.
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(map_err)?;
            // Logged marks become marks first, so the server's go with the rest.
            mark_log::settle(&tx).map_err(map_err)?;
            raw::delete_of_server(&tx, &id).map_err(map_err)?;
            // Rollups and pending marks name series, not servers: no cascade.
            for table in ["rollups_1m", "rollups_1h", "server_metrics_daily", "rollup_dirty"] {
                tx.execute(
                    &format!("DELETE FROM {table} WHERE series_id IN (SELECT id FROM series WHERE server_id = ?1)"),
                    [&id],
                )
                .map_err(map_err)?;
            }
            // Credentials, series and events go with the server (ON DELETE CASCADE).
            let deleted = tx
                .execute("DELETE FROM servers WHERE id = ?1", [&id])
                .map_err(map_err)?;
            if deleted == 0 {
                return Err(StoreError::NotFound);
            }
            tx.commit().map_err(map_err)
        })
        .await
    }

    async fn get_server(&self, id: &str) -> StoreResult<Option<Server>> {
        let id = id.to_owned();
        self.read(move |c| get_server(c, &id)).await
    }

    async fn list_servers(&self) -> StoreResult<Vec<Server>> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(&format!("SELECT {SERVER_COLUMNS} FROM servers ORDER BY id"))?;
            stmt.query_map([], server_from_row)?.collect()
        })
        .await
    }

    async fn insert_credential(&self, cred: &StoredCredential) -> StoreResult<()> {
        let cred = cred.clone();
        self.write(move |c| {
            c.execute(
                "INSERT INTO credentials (key_id, server_id, api_key_hash, sealed_secret, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![cred.key_id, cred.server_id, &cred.api_key_hash[..], cred.sealed_secret, cred.created_at],
            )
            .map_err(|e| match map_err(e) {
                // The only other constraint is the server reference.
                StoreError::Conflict => StoreError::NotFound,
                other => other,
            })?;
            Ok(())
        })
        .await
    }

    async fn credential_by_hash(&self, api_key_hash: &[u8; 32]) -> StoreResult<Option<StoredCredential>> {
        let hash = *api_key_hash;
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {CREDENTIAL_COLUMNS} FROM credentials WHERE api_key_hash = ?1"
            ))?
            .query_row([&hash[..]], credential_from_row)
            .optional()
        })
        .await
    }

    async fn list_credentials(&self, server_id: Option<&str>) -> StoreResult<Vec<CredentialInfo>> {
        let server_id = server_id.map(str::to_owned);
        self.read(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {CREDENTIAL_COLUMNS} FROM credentials WHERE ?1 IS NULL OR server_id = ?1 ORDER BY server_id, created_at, key_id"
            ))?;
            stmt.query_map([server_id], |r| credential_from_row(r).map(|c| CredentialInfo::from(&c)))?
                .collect()
        })
        .await
    }

    async fn all_sealed_credentials(&self) -> StoreResult<Vec<StoredCredential>> {
        self.read(|c| {
            let mut stmt =
                c.prepare_cached(&format!("SELECT {CREDENTIAL_COLUMNS} FROM credentials ORDER BY key_id"))?;
            stmt.query_map([], credential_from_row)?.collect()
        })
        .await
    }

    async fn reseal_credentials(
        &self,
        resealed: &[(String, Vec<u8>)],
        fingerprint_key: &str,
        fingerprint: &str,
    ) -> StoreResult<()> {
        let resealed = resealed.to_vec();
        let (fingerprint_key, fingerprint) = (fingerprint_key.to_owned(), fingerprint.to_owned());
        self.write(move |c| {
            let tx = c.transaction().map_err(map_err)?;
            for (key_id, sealed) in &resealed {
                tx.execute(
                    "UPDATE credentials SET sealed_secret = ?2 WHERE key_id = ?1",
                    params![key_id, sealed],
                )
                .map_err(map_err)?;
            }
            tx.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![fingerprint_key, fingerprint],
            )
            .map_err(map_err)?;
            tx.commit().map_err(map_err)
        })
        .await
    }

    async fn revoke_credential(&self, server_id: &str, key_id: &str, now: i64) -> StoreResult<bool> {
        let (server_id, key_id) = (server_id.to_owned(), key_id.to_owned());
        self.write(move |c| {
            let revoked_at: Option<Option<i64>> = c
                .query_row(
                    "SELECT revoked_at FROM credentials WHERE server_id = ?1 AND key_id = ?2",
                    params![server_id, key_id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(map_err)?;
            match revoked_at {
                None => Err(StoreError::NotFound),
                Some(Some(_)) => Ok(false),
                Some(None) => {
                    c.execute(
                        "UPDATE credentials SET revoked_at = ?3 WHERE server_id = ?1 AND key_id = ?2",
                        params![server_id, key_id, now],
                    )
                    .map_err(map_err)?;
                    Ok(true)
                }
            }
        })
        .await
    }

    async fn all_series(&self) -> StoreResult<Vec<SeriesInfo>> {
        self.read(|c| {
            let mut stmt = c.prepare_cached("SELECT id, server_id, name, tags, kind FROM series ORDER BY id")?;
            stmt.query_map([], series_from_row)?.collect()
        })
        .await
    }

    async fn series_of_server(&self, server_id: &str, name: Option<&str>) -> StoreResult<Vec<SeriesInfo>> {
        let (server_id, name) = (server_id.to_owned(), name.map(str::to_owned));
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, server_id, name, tags, kind FROM series
                 WHERE server_id = ?1 AND (?2 IS NULL OR name = ?2) ORDER BY id",
            )?;
            stmt.query_map(params![server_id, name], series_from_row)?.collect()
        })
        .await
    }

    async fn write_batch(&self, batch: WriteBatch) -> StoreResult<Vec<RequestOutcome>> {
        let inner = self.inner.clone();
        self.write(move |c| write_batch_blocking(c, &batch, &inner.kept, &inner.mark_log).map_err(map_err))
            .await
    }

    fn blocking_commit(&self) -> Option<Arc<dyn BlockingCommit>> {
        Some(Arc::new(self.clone()))
    }

    async fn read_samples(&self, query: &SampleQuery) -> StoreResult<Vec<RawSample>> {
        let query = query.clone();
        self.read(move |c| raw::read(c, &query)).await
    }

    async fn purge_request_guards(&self, now: i64) -> StoreResult<u64> {
        self.write(move |c| {
            let a = c
                .execute("DELETE FROM seen_signatures WHERE expires_at <= ?1", [now])
                .map_err(map_err)?;
            let b = c
                .execute("DELETE FROM request_digests WHERE expires_at <= ?1", [now])
                .map_err(map_err)?;
            Ok((a + b) as u64)
        })
        .await
    }

    async fn rollup_work(&self, level: Level, max_marks: usize) -> StoreResult<RollupWork> {
        if level == Level::Minute {
            let inner = self.inner.clone();
            self.write(move |c| inner.mark_log.settle_now(c).map_err(map_err))
                .await?;
        }
        let kept = self.inner.kept.clone();
        self.read(move |c| rollups::work(c, level, max_marks, &kept)).await
    }

    async fn apply_rollups(&self, level: Level, results: Vec<(DirtyMark, Option<BucketStats>)>) -> StoreResult<()> {
        self.write(move |c| {
            // Marks whose inputs are past retention are only cleared: recomputing them
            // from what is left would erase good buckets.
            rollups::apply(c, level, &results).map_err(map_err)
        })
        .await
    }

    async fn drop_dirty_marks(&self, marks: Vec<DirtyMark>) -> StoreResult<()> {
        self.write(move |c| rollups::drop_marks(c, &marks).map_err(map_err))
            .await
    }

    async fn mark_range_dirty(&self, from: i64, to: i64) -> StoreResult<u64> {
        let minutes = self.read(move |c| raw::minutes_with_samples(c, from, to)).await?;
        self.write(move |c| rollups::mark_minutes(c, &minutes).map_err(map_err))
            .await
    }

    async fn dirty_backlog(&self) -> StoreResult<[u64; 3]> {
        self.read(rollups::backlog).await
    }

    async fn read_rollups(&self, level: Level, series_ids: &[i64], from: i64, to: i64) -> StoreResult<Vec<RollupRow>> {
        let ids = series_ids.to_vec();
        self.read(move |c| rollups::read(c, level, &ids, from, to)).await
    }

    async fn apply_retention(&self, cutoffs: &RetentionCutoffs) -> StoreResult<RetentionReport> {
        let mut report = RetentionReport::default();
        if let Some(cutoff) = cutoffs.raw {
            loop {
                let (deleted, more) = self
                    .write(move |c| raw::delete_older_slice(c, cutoff).map_err(map_err))
                    .await?;
                report.raw += deleted;
                if !more {
                    break;
                }
            }
        }
        for (level, cutoff, slot) in [
            (Level::Minute, cutoffs.minute, &mut report.minute),
            (Level::Hour, cutoffs.hour, &mut report.hour),
            (Level::Day, cutoffs.day, &mut report.day),
        ] {
            if let Some(cutoff) = cutoff {
                *slot = self
                    .write(move |c| rollups::retention_level(c, level, cutoff).map_err(map_err))
                    .await?;
            }
        }
        Ok(report)
    }

    async fn usage_salt(&self, day: i64, candidate: [u8; 32]) -> StoreResult<[u8; 32]> {
        self.write(move |c| usage::salt(c, day, candidate, now_ms()).map_err(map_err))
            .await
    }

    async fn forget_usage_before(&self, day: i64) -> StoreResult<u64> {
        self.write(move |c| usage::forget_before(c, day).map_err(map_err)).await
    }

    async fn record_usage(&self, events: Vec<UsageRecord>) -> StoreResult<()> {
        self.write(move |c| usage::record(c, &events).map_err(map_err)).await
    }

    async fn usage_days(&self, server_id: &str, from_day: i64, to_day: i64) -> StoreResult<Vec<UsageDay>> {
        let server_id = server_id.to_owned();
        self.read(move |c| usage::days(c, &server_id, from_day, to_day)).await
    }

    async fn purge_usage_events(&self, cutoff: i64) -> StoreResult<u64> {
        self.write(move |c| usage::purge_events(c, cutoff).map_err(map_err))
            .await
    }

    async fn insert_event(&self, event: &NewEvent) -> StoreResult<i64> {
        let e = event.clone();
        self.write(move |c| {
            c.execute(
                "INSERT INTO server_events (server_id, kind, title, detail, at, source) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![e.server_id, e.kind, e.title, e.detail, e.at, e.source.as_str()],
            )
            .map_err(|e| match map_err(e) {
                StoreError::Conflict => StoreError::NotFound,
                other => other,
            })?;
            Ok(c.last_insert_rowid())
        })
        .await
    }

    async fn list_events(
        &self,
        server_id: &str,
        before: Option<(i64, i64)>,
        limit: usize,
    ) -> StoreResult<Vec<StoredEvent>> {
        let server_id = server_id.to_owned();
        let (at, id) = before.unwrap_or((i64::MAX, i64::MAX));
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, server_id, kind, title, detail, at, source FROM server_events
                 WHERE server_id = ?1 AND (at, id) < (?2, ?3) ORDER BY at DESC, id DESC LIMIT ?4",
            )?;
            stmt.query_map(params![server_id, at, id, limit as i64], event_from_row)?
                .collect()
        })
        .await
    }

    async fn notify(&self, _payload: &str) -> StoreResult<()> {
        // One process owns a SQLite database: nobody else to tell.
        Ok(())
    }

    async fn listen(&self) -> StoreResult<Option<tokio::sync::mpsc::Receiver<String>>> {
        Ok(None)
    }

    async fn hold_job_lock(&self, _job: &str) -> StoreResult<bool> {
        Ok(true)
    }
}
