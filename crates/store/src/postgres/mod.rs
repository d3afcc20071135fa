//! The PostgreSQL store: a pool of connections shared by every task, so several
//! `serve` processes on one database form one service.
//!
//! What differs from SQLite follows from many writers on many nodes: replay and retry
//! guards are unique keys checked inside the write transaction, new series are found
//! through `ON CONFLICT`, samples go in by binary COPY into daily partitions (retention
//! drops whole days), mark generations come from a sequence, live updates fan out with
//! LISTEN/NOTIFY, and periodic jobs are guarded by session advisory locks.

mod migrations;
mod notify;
mod partitions;
mod rollups;
pub mod testing;
mod usage;
mod write;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use mcp_metrics_core::model::{
    CredentialInfo, EventSource, Kind, NewEvent, RawSample, SeriesInfo, SeriesKey, Server, ServerFields,
    StoredCredential, StoredEvent,
};
use mcp_metrics_core::rollup::{BucketStats, Level};
use mcp_metrics_core::time::now_ms;
use tokio_postgres::{NoTls, Row};

use crate::sqlite::tags_from_json;
use crate::{
    DirtyMark, RequestOutcome, RetentionCutoffs, RetentionReport, RollupRow, RollupWork, SampleQuery, Store,
    StoreError, StoreOptions, StoreResult, UsageDay, UsageRecord, WriteBatch,
};

pub use migrations::latest_version;
pub use partitions::name as partition_name;

type PgResult<T> = Result<T, tokio_postgres::Error>;
pub(crate) type PoolClient = deadpool_postgres::Client;

/// Turns a driver error into the store's: lost connections and server shutdowns are
/// `Unavailable` (worth retrying), constraint violations `Conflict`, the rest `Database`.
pub(crate) fn pg_err(e: tokio_postgres::Error) -> StoreError {
    if let Some(code) = e.code() {
        let code = code.code();
        return match code {
            // admin_shutdown, crash_shutdown, cannot_connect_now, too_many_connections,
            // serialization_failure and deadlock_detected (both mean "try again"), and
            // lock_not_available (a cluster lock's `lock_timeout`).
            "57P01" | "57P02" | "57P03" | "53300" | "40001" | "40P01" | "55P03" => {
                StoreError::Unavailable(e.to_string())
            }
            c if c.starts_with("08") => StoreError::Unavailable(e.to_string()),
            c if c.starts_with("23") => StoreError::Conflict,
            _ => StoreError::Database(db_text(&e)),
        };
    }
    let io = std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>());
    if e.is_closed() || io || e.to_string().contains("timeout") || e.to_string().contains("connect") {
        StoreError::Unavailable(e.to_string())
    } else {
        StoreError::Database(e.to_string())
    }
}

/// The server's own message (the driver's Display says only "db error").
fn db_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

fn pool_err(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => match pg_err(e) {
            StoreError::Database(text) => StoreError::Unavailable(text),
            other => other,
        },
        other => StoreError::Unavailable(other.to_string()),
    }
}

/// The SQLSTATE of a driver error, if the server sent one.
fn sqlstate(e: &tokio_postgres::Error) -> Option<&str> {
    e.code().map(|c| c.code())
}

struct Inner {
    pool: Pool,
    config: tokio_postgres::Config,
    /// Days whose raw partition is known to exist: a write touching another day creates
    /// it first.
    known_days: Mutex<HashSet<i64>>,
    listener: notify::Listener,
    locks: notify::JobLocks,
    held_locks: Arc<notify::HeldLocks>,
}

/// PostgreSQL implementation of [`Store`].
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

impl PostgresStore {
    /// Connects, applies migrations and creates the raw partitions of yesterday through
    /// three days ahead.
    pub async fn open(url: &str, options: &StoreOptions) -> StoreResult<Self> {
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Invalid(format!("invalid PostgreSQL URL: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        if config.get_application_name().is_none() {
            config.application_name("mcp-metrics");
        }
        // `Fast` drops connections whose socket closed (a terminated backend closes it at
        // once); a call that races a termination gets `Unavailable` and the next one a
        // fresh connection.
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.read_pool_size.max(1) + 4)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(10)))
            .create_timeout(Some(Duration::from_secs(5)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(|e| StoreError::Invalid(format!("cannot build the PostgreSQL pool: {e}")))?;
        let store = PostgresStore {
            inner: Arc::new(Inner {
                pool,
                config: config.clone(),
                known_days: Mutex::new(HashSet::new()),
                listener: notify::Listener::new(config.clone()),
                locks: notify::JobLocks::new(config.clone()),
                held_locks: Arc::new(notify::HeldLocks::new(config)),
            }),
        };
        {
            let mut client = store.client().await?;
            let applied = migrations::run(&mut client, now_ms()).await.map_err(pg_err)?;
            if !applied.is_empty() {
                tracing::info!(?applied, "applied PostgreSQL migrations");
            }
            let days = partitions::existing(&client).await.map_err(pg_err)?;
            store.known_days().extend(days);
        }
        store.ensure_partitions(now_ms(), 3).await?;
        Ok(store)
    }

    pub(crate) async fn client(&self) -> StoreResult<PoolClient> {
        self.inner.pool.get().await.map_err(pool_err)
    }

    fn known_days(&self) -> std::sync::MutexGuard<'_, HashSet<i64>> {
        self.inner.known_days.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates the raw partitions from yesterday through `days_ahead` days after the day
    /// of `now_ms`, so the writer rarely meets a day without one.
    pub async fn ensure_partitions(&self, now_ms: i64, days_ahead: i64) -> StoreResult<()> {
        let today = partitions::day_of(now_ms);
        self.ensure_days((today - 1..=today + days_ahead).collect()).await
    }

    /// Creates the partitions of `days` not known to exist yet.
    pub(crate) async fn ensure_days(&self, days: Vec<i64>) -> StoreResult<()> {
        let missing: Vec<i64> = {
            let known = self.known_days();
            days.into_iter().filter(|d| !known.contains(d)).collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let client = self.client().await?;
        for day in missing {
            partitions::create(&client, day).await.map_err(pg_err)?;
            self.known_days().insert(day);
        }
        Ok(())
    }

    /// Forgets the known partitions and reloads them from the catalog: another node's
    /// retention may have dropped one this node still counted on.
    async fn reload_days(&self) -> StoreResult<()> {
        let client = self.client().await?;
        let days = partitions::existing(&client).await.map_err(pg_err)?;
        let mut known = self.known_days();
        known.clear();
        known.extend(days);
        Ok(())
    }
}

const SERVER_COLUMNS: &str =
    "id, registry_name, name, description, repository_url, remote_url, owner, created_at, updated_at";

fn server_from_row(r: &Row) -> Server {
    Server {
        id: r.get(0),
        registry_name: r.get(1),
        name: r.get(2),
        description: r.get(3),
        repository_url: r.get(4),
        remote_url: r.get(5),
        owner: r.get(6),
        created_at: r.get(7),
        updated_at: r.get(8),
    }
}

const CREDENTIAL_COLUMNS: &str = "key_id, server_id, api_key_hash, sealed_secret, created_at, revoked_at, last_used_at";

fn credential_from_row(r: &Row) -> StoredCredential {
    let hash: &[u8] = r.get(2);
    StoredCredential {
        key_id: r.get(0),
        server_id: r.get(1),
        api_key_hash: hash.try_into().unwrap_or([0; 32]),
        sealed_secret: r.get(3),
        created_at: r.get(4),
        revoked_at: r.get(5),
        last_used_at: r.get(6),
    }
}

fn series_from_row(r: &Row) -> SeriesInfo {
    let kind: i16 = r.get(4);
    SeriesInfo {
        id: r.get(0),
        key: SeriesKey {
            server_id: r.get(1),
            name: r.get(2),
            tags: tags_from_json(r.get(3)),
        },
        kind: Kind::from_i64(kind.into()).unwrap_or(Kind::Gauge),
    }
}

fn event_from_row(r: &Row) -> StoredEvent {
    let source: &str = r.get(6);
    StoredEvent {
        id: r.get(0),
        event: NewEvent {
            server_id: r.get(1),
            kind: r.get(2),
            title: r.get(3),
            detail: r.get(4),
            at: r.get(5),
            source: if source == "system" {
                EventSource::System
            } else {
                EventSource::Author
            },
        },
    }
}

async fn get_server(client: &PoolClient, id: &str) -> PgResult<Option<Server>> {
    let stmt = client
        .prepare_cached(&format!("SELECT {SERVER_COLUMNS} FROM servers WHERE id = $1"))
        .await?;
    Ok(client.query_opt(&stmt, &[&id]).await?.as_ref().map(server_from_row))
}

/// How often a write transaction that lost a race (deadlock, a histogram seq taken by
/// another node, a partition dropped under it) is run again before giving up.
const WRITE_ATTEMPTS: usize = 4;
/// Tries of a rollup pass's read that met a concurrent pass (a short, growing pause
/// between them lets the other one commit).
const ROLLUP_ATTEMPTS: usize = 8;

fn is_retryable(e: &tokio_postgres::Error) -> bool {
    // 40001 serialization, 40P01 deadlock, 23505 a histogram seq another node took
    // first, 23514 no partition for a row (another node's retention dropped the day).
    matches!(sqlstate(e), Some("40001" | "40P01" | "23505" | "23514"))
}

/// Group commits in flight at once (each holds one pooled connection).
const WRITE_CONCURRENCY: usize = 4;

#[async_trait]
impl Store for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    /// While one batch waits for its commit (WAL flush) another can be sent: measured
    /// with `scripts/bench-postgres.sh`, one batch at a time left the server's backend
    /// waiting on round trips and fsync rather than busy.
    fn write_concurrency(&self) -> usize {
        WRITE_CONCURRENCY
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
        let client = self.client().await?;
        let row = client
            .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", &[])
            .await
            .map_err(pg_err)?;
        Ok(row.get(0))
    }

    async fn meta_get(&self, key: &str) -> StoreResult<Option<String>> {
        let client = self.client().await?;
        let row = client
            .query_opt("SELECT value FROM meta WHERE key = $1", &[&key])
            .await
            .map_err(pg_err)?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn meta_set(&self, key: &str, value: &str) -> StoreResult<()> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                &[&key, &value],
            )
            .await
            .map_err(pg_err)?;
        Ok(())
    }

    async fn create_server(&self, id: &str, fields: &ServerFields, now: i64) -> StoreResult<Server> {
        let f = fields;
        let client = self.client().await?;
        let row = client
            .query_one(
                &format!(
                    "INSERT INTO servers (id, registry_name, name, description, repository_url, remote_url, owner, created_at, updated_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8) RETURNING {SERVER_COLUMNS}"
                ),
                &[&id, &f.registry_name, &f.name, &f.description, &f.repository_url, &f.remote_url, &f.owner, &now],
            )
            .await
            .map_err(pg_err)?;
        Ok(server_from_row(&row))
    }

    async fn update_server(&self, id: &str, fields: &ServerFields, now: i64) -> StoreResult<Server> {
        let f = fields;
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!(
                    "UPDATE servers SET
                        registry_name = COALESCE($2, registry_name), name = COALESCE($3, name),
                        description = COALESCE($4, description), repository_url = COALESCE($5, repository_url),
                        remote_url = COALESCE($6, remote_url), owner = COALESCE($7, owner), updated_at = $8
                     WHERE id = $1 RETURNING {SERVER_COLUMNS}"
                ),
                &[
                    &id,
                    &f.registry_name,
                    &f.name,
                    &f.description,
                    &f.repository_url,
                    &f.remote_url,
                    &f.owner,
                    &now,
                ],
            )
            .await
            .map_err(pg_err)?;
        row.as_ref().map(server_from_row).ok_or(StoreError::NotFound)
    }

    async fn delete_server(&self, id: &str) -> StoreResult<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_err)?;
        // The server row first: a write creating series under it holds a key-share lock
        // on it until it commits (see the write path), so once this lock is granted every
        // series of the server is committed and the next statement sees them all; writes
        // creating series or events after it wait, then find the server gone.
        let found = tx
            .query_opt("SELECT id FROM servers WHERE id = $1 FOR UPDATE", &[&id])
            .await
            .map_err(pg_err)?;
        if found.is_none() {
            return Err(StoreError::NotFound);
        }
        // Then its series, in id order, as a rollup apply key-shares the series it
        // stores (see `rollups::apply`): one lock order, no deadlock between the two (the
        // cascade below would lock them in its scan order).
        let series: Vec<i64> = tx
            .query(
                "SELECT id FROM series WHERE server_id = $1 ORDER BY id FOR UPDATE",
                &[&id],
            )
            .await
            .map_err(pg_err)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        // Credentials, series, events and usage go with the server (ON DELETE CASCADE).
        // The series lock waited for any rollup apply holding them (key share), so the
        // statements below also see the buckets it stored.
        // The row is locked above, so it is there to delete.
        tx.execute("DELETE FROM servers WHERE id = $1", &[&id])
            .await
            .map_err(pg_err)?;
        // Samples and rollups name series, not servers: no cascade. Pending marks and
        // write buckets clear themselves: a pass finds no series and deletes the bucket.
        // The four are prepared in one round trip and run in another, still one
        // statement (and snapshot) each, in this order.
        const DELETES: [&str; 4] = [
            "DELETE FROM server_metrics WHERE series_id = ANY($1)",
            "DELETE FROM rollups_1m WHERE series_id = ANY($1)",
            "DELETE FROM rollups_1h WHERE series_id = ANY($1)",
            "DELETE FROM server_metrics_daily WHERE series_id = ANY($1)",
        ];
        let prepared = pipeline(DELETES.iter().map(|sql| tx.prepare_cached(sql)))
            .await
            .map_err(pg_err)?;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&series];
        pipeline(prepared.iter().map(|statement| tx.execute(statement, &params)))
            .await
            .map_err(pg_err)?;
        tx.commit().await.map_err(pg_err)
    }

    async fn get_server(&self, id: &str) -> StoreResult<Option<Server>> {
        let client = self.client().await?;
        get_server(&client, id).await.map_err(pg_err)
    }

    async fn list_servers(&self) -> StoreResult<Vec<Server>> {
        let client = self.client().await?;
        let rows = client
            .query(&format!("SELECT {SERVER_COLUMNS} FROM servers ORDER BY id"), &[])
            .await
            .map_err(pg_err)?;
        Ok(rows.iter().map(server_from_row).collect())
    }

    async fn insert_credential(&self, cred: &StoredCredential) -> StoreResult<()> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO credentials (key_id, server_id, api_key_hash, sealed_secret, created_at) VALUES ($1, $2, $3, $4, $5)",
                &[&cred.key_id, &cred.server_id, &&cred.api_key_hash[..], &cred.sealed_secret, &cred.created_at],
            )
            .await
            .map_err(|e| match pg_err(e) {
                // Same answer as SQLite gives for any constraint here.
                StoreError::Conflict => StoreError::NotFound,
                other => other,
            })?;
        Ok(())
    }

    async fn credential_by_hash(&self, api_key_hash: &[u8; 32]) -> StoreResult<Option<StoredCredential>> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {CREDENTIAL_COLUMNS} FROM credentials WHERE api_key_hash = $1"
            ))
            .await
            .map_err(pg_err)?;
        let row = client.query_opt(&stmt, &[&&api_key_hash[..]]).await.map_err(pg_err)?;
        Ok(row.as_ref().map(credential_from_row))
    }

    async fn list_credentials(&self, server_id: Option<&str>) -> StoreResult<Vec<CredentialInfo>> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {CREDENTIAL_COLUMNS} FROM credentials WHERE $1::text IS NULL OR server_id = $1
                     ORDER BY server_id, created_at, key_id"
                ),
                &[&server_id],
            )
            .await
            .map_err(pg_err)?;
        Ok(rows
            .iter()
            .map(|r| CredentialInfo::from(&credential_from_row(r)))
            .collect())
    }

    async fn all_sealed_credentials(&self) -> StoreResult<Vec<StoredCredential>> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!("SELECT {CREDENTIAL_COLUMNS} FROM credentials ORDER BY key_id"),
                &[],
            )
            .await
            .map_err(pg_err)?;
        Ok(rows.iter().map(credential_from_row).collect())
    }

    async fn reseal_credentials(
        &self,
        resealed: &[(String, Vec<u8>)],
        fingerprint_key: &str,
        fingerprint: &str,
    ) -> StoreResult<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_err)?;
        let update = tx
            .prepare("UPDATE credentials SET sealed_secret = $2 WHERE key_id = $1")
            .await
            .map_err(pg_err)?;
        for (key_id, sealed) in resealed {
            tx.execute(&update, &[key_id, sealed]).await.map_err(pg_err)?;
        }
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            &[&fingerprint_key, &fingerprint],
        )
        .await
        .map_err(pg_err)?;
        tx.commit().await.map_err(pg_err)
    }

    async fn revoke_credential(&self, server_id: &str, key_id: &str, now: i64) -> StoreResult<bool> {
        let client = self.client().await?;
        // Revoked first, and committed: a write's key check locks only live keys, so
        // every check that starts afterwards finds it revoked and locks nothing. The
        // update does not wait for writes that found the key live before: its lock does
        // not conflict with their key-share locks.
        let revoked = client
            .execute(
                "UPDATE credentials SET revoked_at = $3 WHERE server_id = $1 AND key_id = $2 AND revoked_at IS NULL",
                &[&server_id, &key_id, &now],
            )
            .await
            .map_err(pg_err)?
            == 1;
        // Then the row, exclusively, for the length of the statement: this waits for each
        // write that found the key live, which holds its key-share lock until it commits,
        // and for no other, since none can join them now. (Taking this lock before the
        // update could wait without end behind writes whose key-share locks overlap: a
        // new key-share lock does not queue behind a waiting exclusive one.)
        let exists = client
            .query_opt(
                "SELECT 1 FROM credentials WHERE server_id = $1 AND key_id = $2 FOR UPDATE",
                &[&server_id, &key_id],
            )
            .await
            .map_err(pg_err)?
            .is_some();
        if !revoked && !exists {
            return Err(StoreError::NotFound);
        }
        Ok(revoked)
    }

    async fn all_series(&self) -> StoreResult<Vec<SeriesInfo>> {
        let client = self.client().await?;
        let rows = client
            .query("SELECT id, server_id, name, tags, kind FROM series ORDER BY id", &[])
            .await
            .map_err(pg_err)?;
        Ok(rows.iter().map(series_from_row).collect())
    }

    async fn series_of_server(&self, server_id: &str, name: Option<&str>) -> StoreResult<Vec<SeriesInfo>> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id, server_id, name, tags, kind FROM series
                 WHERE server_id = $1 AND ($2::text IS NULL OR name = $2) ORDER BY id",
                &[&server_id, &name],
            )
            .await
            .map_err(pg_err)?;
        Ok(rows.iter().map(series_from_row).collect())
    }

    async fn write_batch(&self, batch: WriteBatch) -> StoreResult<Vec<RequestOutcome>> {
        let mut days: Vec<i64> = batch
            .requests
            .iter()
            .flat_map(|r| r.samples.iter().map(|s| partitions::day_of(s.timestamp)))
            .collect();
        days.sort_unstable();
        days.dedup();
        let rows = write::prepare_rows(&batch);
        let mut attempt = 0;
        let mut mode = write::SampleWrite::Copy;
        loop {
            attempt += 1;
            self.ensure_days(days.clone()).await?;
            let mut client = self.client().await?;
            match write::write_batch(&mut client, &batch, &rows, mode).await {
                Ok(outcomes) => return Ok(outcomes),
                // COPY met a stored row: the batch needs upserts (not an attempt lost).
                Err(e) if mode == write::SampleWrite::Copy && sqlstate(&e) == Some("23505") => {
                    mode = write::SampleWrite::Upsert;
                    attempt -= 1;
                }
                Err(e) if attempt < WRITE_ATTEMPTS && is_retryable(&e) => {
                    tracing::debug!(error = %db_text(&e), attempt, "write batch lost a race; running it again");
                    if sqlstate(&e) == Some("23514") {
                        drop(client);
                        self.reload_days().await?;
                    }
                }
                Err(e) => return Err(pg_err(e)),
            }
        }
    }

    async fn read_samples(&self, query: &SampleQuery) -> StoreResult<Vec<RawSample>> {
        let client = self.client().await?;
        write::read_samples(&client, query).await.map_err(pg_err)
    }

    async fn purge_request_guards(&self, now: i64) -> StoreResult<u64> {
        let client = self.client().await?;
        let a = client
            .execute("DELETE FROM seen_signatures WHERE expires_at <= $1", &[&now])
            .await
            .map_err(pg_err)?;
        let b = client
            .execute("DELETE FROM request_digests WHERE expires_at <= $1", &[&now])
            .await
            .map_err(pg_err)?;
        Ok(a + b)
    }

    async fn rollup_work(&self, level: Level, max_marks: usize) -> StoreResult<RollupWork> {
        let mut client = self.client().await?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match rollups::work(&mut client, level, max_marks).await {
                Ok(work) => return Ok(work),
                // Two passes at once (the job and an operator's `aggregate`, or a leader
                // taking over) move the same log rows or marks in REPEATABLE READ: the
                // later one fails and, run again, sees what the first committed.
                Err(e) if attempt < ROLLUP_ATTEMPTS && matches!(sqlstate(&e), Some("40001" | "40P01")) => {
                    tracing::debug!(error = %db_text(&e), attempt, "rollup pass met another one; reading again");
                    tokio::time::sleep(std::time::Duration::from_millis(5 * attempt as u64)).await;
                }
                Err(e) => return Err(pg_err(e)),
            }
        }
    }

    async fn apply_rollups(&self, level: Level, results: Vec<(DirtyMark, Option<BucketStats>)>) -> StoreResult<()> {
        let mut client = self.client().await?;
        rollups::apply(&mut client, level, &results).await.map_err(pg_err)
    }

    async fn drop_dirty_marks(&self, marks: Vec<DirtyMark>) -> StoreResult<()> {
        let client = self.client().await?;
        rollups::drop_marks(&client, &marks).await.map_err(pg_err)
    }

    async fn mark_range_dirty(&self, from: i64, to: i64) -> StoreResult<u64> {
        let client = self.client().await?;
        rollups::mark_range(&client, from, to).await.map_err(pg_err)
    }

    async fn dirty_backlog(&self) -> StoreResult<[u64; 3]> {
        let client = self.client().await?;
        rollups::backlog(&client).await.map_err(pg_err)
    }

    async fn read_rollups(&self, level: Level, series_ids: &[i64], from: i64, to: i64) -> StoreResult<Vec<RollupRow>> {
        let client = self.client().await?;
        rollups::read(&client, level, series_ids, from, to)
            .await
            .map_err(pg_err)
    }

    async fn apply_retention(&self, cutoffs: &RetentionCutoffs) -> StoreResult<RetentionReport> {
        let mut report = RetentionReport::default();
        if let Some(cutoff) = cutoffs.raw {
            let mut client = self.client().await?;
            let (deleted, dropped) = rollups::retention_raw(&mut client, cutoff).await.map_err(pg_err)?;
            report.raw = deleted;
            let mut known = self.known_days();
            for day in dropped {
                known.remove(&day);
            }
        }
        let client = self.client().await?;
        for (level, cutoff, slot) in [
            (Level::Minute, cutoffs.minute, &mut report.minute),
            (Level::Hour, cutoffs.hour, &mut report.hour),
            (Level::Day, cutoffs.day, &mut report.day),
        ] {
            if let Some(cutoff) = cutoff {
                *slot = rollups::retention_level(&client, level, cutoff).await.map_err(pg_err)?;
            }
        }
        Ok(report)
    }

    async fn usage_salt(&self, day: i64, candidate: [u8; 32]) -> StoreResult<[u8; 32]> {
        let client = self.client().await?;
        usage::salt(&client, day, candidate, now_ms()).await.map_err(pg_err)
    }

    async fn forget_usage_before(&self, day: i64) -> StoreResult<u64> {
        let mut client = self.client().await?;
        usage::forget_before(&mut client, day).await.map_err(pg_err)
    }

    async fn record_usage(&self, events: Vec<UsageRecord>) -> StoreResult<()> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut client = self.client().await?;
            match usage::record(&mut client, &events).await {
                Ok(()) => return Ok(()),
                Err(e) if attempt < WRITE_ATTEMPTS && matches!(sqlstate(&e), Some("40001" | "40P01")) => {}
                Err(e) => return Err(pg_err(e)),
            }
        }
    }

    async fn usage_days(&self, server_id: &str, from_day: i64, to_day: i64) -> StoreResult<Vec<UsageDay>> {
        let client = self.client().await?;
        usage::days(&client, server_id, from_day, to_day).await.map_err(pg_err)
    }

    async fn purge_usage_events(&self, cutoff: i64) -> StoreResult<u64> {
        let client = self.client().await?;
        client
            .execute("DELETE FROM server_usage WHERE at < $1", &[&cutoff])
            .await
            .map_err(pg_err)
    }

    async fn insert_event(&self, e: &NewEvent) -> StoreResult<i64> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "INSERT INTO server_events (server_id, kind, title, detail, at, source) VALUES ($1, $2, $3, $4, $5, $6)
                 RETURNING id",
                &[&e.server_id, &e.kind, &e.title, &e.detail, &e.at, &e.source.as_str()],
            )
            .await
            .map_err(|e| match pg_err(e) {
                StoreError::Conflict => StoreError::NotFound,
                other => other,
            })?;
        Ok(row.get(0))
    }

    async fn list_events(
        &self,
        server_id: &str,
        before: Option<(i64, i64)>,
        limit: usize,
    ) -> StoreResult<Vec<StoredEvent>> {
        let (at, id) = before.unwrap_or((i64::MAX, i64::MAX));
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT id, server_id, kind, title, detail, at, source FROM server_events
                 WHERE server_id = $1 AND (at, id) < ($2, $3) ORDER BY at DESC, id DESC LIMIT $4",
            )
            .await
            .map_err(pg_err)?;
        let rows = client
            .query(&stmt, &[&server_id, &at, &id, &(limit as i64)])
            .await
            .map_err(pg_err)?;
        Ok(rows.iter().map(event_from_row).collect())
    }

    async fn notify(&self, payload: &str) -> StoreResult<()> {
        if payload.len() >= notify::MAX_PAYLOAD {
            return Err(StoreError::Invalid(format!(
                "notification payload of {} bytes is over PostgreSQL's limit of {}",
                payload.len(),
                notify::MAX_PAYLOAD - 1
            )));
        }
        let client = self.client().await?;
        client
            .execute("SELECT pg_notify($1, $2)", &[&notify::CHANNEL, &payload])
            .await
            .map_err(pg_err)?;
        Ok(())
    }

    async fn listen(&self) -> StoreResult<Option<tokio::sync::mpsc::Receiver<String>>> {
        self.inner.listener.subscribe().await.map(Some)
    }

    async fn hold_job_lock(&self, job: &str) -> StoreResult<bool> {
        self.inner.locks.hold(job).await
    }

    async fn cluster_lock(&self, name: &str) -> StoreResult<crate::ClusterLock> {
        self.inner.held_locks.acquire(name).await
    }
}

impl PostgresStore {
    /// The connection settings the store was opened with (for the copy routine and
    /// tests that need a connection of their own).
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.inner.config
    }
}

/// Runs statement futures as one pipeline: each is polled once, in the given order, which
/// sends its statement (tokio-postgres sends a prepared statement on the first poll), and
/// then they are awaited in the same order, which is the order the answers arrive in.
/// The server thus runs them in exactly this order, as a sequential loop would, at the
/// cost of one round trip instead of one per statement. Only pass futures of prepared
/// statements (one that still has to prepare would send later, out of order), or
/// futures that only prepare, whose order does not matter.
pub(crate) async fn pipeline<T, E, F>(futures: impl IntoIterator<Item = F>) -> Result<Vec<T>, E>
where
    F: std::future::Future<Output = Result<T, E>>,
{
    use std::task::Poll;
    let mut futures: Vec<std::pin::Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut first: Vec<Option<T>> = Vec::with_capacity(futures.len());
    std::future::poll_fn(|cx| {
        for f in &mut futures {
            first.push(match f.as_mut().poll(cx) {
                Poll::Ready(Ok(v)) => Some(v),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => None,
            });
        }
        Poll::Ready(Ok(()))
    })
    .await?;
    let mut out = Vec::with_capacity(futures.len());
    for (f, ready) in futures.into_iter().zip(first) {
        out.push(match ready {
            Some(v) => v,
            None => f.await?,
        });
    }
    Ok(out)
}
