//! Cluster plumbing on dedicated connections: the LISTEN side of live-update fan-out,
//! the session advisory locks that let one node run each periodic job, and the locks
//! that serialize one piece of work across nodes (`Store::cluster_lock`).
//!
//! None can use the pool. A LISTEN belongs to a session and notifications arrive on it
//! between queries; a session advisory lock lives exactly as long as its connection, which
//! is what releases it when a node dies, even by `kill -9`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, mpsc, watch};
use tokio_postgres::{AsyncMessage, Client, Config, NoTls};

use super::pg_err;
use crate::{StoreError, StoreResult};

/// The one channel every node listens on.
pub const CHANNEL: &str = "mcp_metrics";
/// PostgreSQL refuses payloads of 8000 bytes or more.
pub const MAX_PAYLOAD: usize = 8000;
/// Notifications a slow subscriber may have waiting before new ones skip it.
const SUBSCRIBER_BUFFER: usize = 1024;
/// Any fixed value: the first key of every job lock (the second is the job name's hash).
const JOB_LOCK_SPACE: i32 = 0x6d63_706d; // "mcpm"
/// The first key of every `Store::cluster_lock` (distinct from job locks, so a job and a
/// piece of work of the same name never wait for each other).
const HELD_LOCK_SPACE: i32 = 0x6d63_706e; // "mcpn"
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `Store::cluster_lock` waits for another holder before giving up.
const LOCK_WAIT: Duration = Duration::from_secs(30);
/// Sessions kept for the next `Store::cluster_lock` once released.
const IDLE_LOCK_SESSIONS: usize = 4;
/// Cluster locks a node holds or waits for at once, each on a session of its own: more
/// wait for a turn, so many servers exporting at once cannot use up the database's
/// connections.
const MAX_LOCK_SESSIONS: usize = 16;

/// Fans the channel's notifications out to every receiver handed out by `subscribe`.
pub struct Listener {
    config: Config,
    subscribers: Arc<std::sync::Mutex<Vec<mpsc::Sender<String>>>>,
    /// Serialises starting the background task; `true` once it runs.
    started: Mutex<bool>,
    /// Dropped with the store, which stops the background task.
    shutdown: watch::Sender<()>,
}

impl Listener {
    pub fn new(config: Config) -> Self {
        Listener {
            config,
            subscribers: Arc::default(),
            started: Mutex::new(false),
            shutdown: watch::channel(()).0,
        }
    }

    /// A receiver of every notification from now on. The first call connects and runs
    /// LISTEN before returning, so a notification sent after it returns is delivered.
    pub async fn subscribe(&self) -> StoreResult<mpsc::Receiver<String>> {
        let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
        let mut started = self.started.lock().await;
        if !*started {
            let session = listen(&self.config).await.map_err(|e| match pg_err(e) {
                StoreError::Database(text) => StoreError::Unavailable(text),
                other => other,
            })?;
            tokio::spawn(run(
                self.config.clone(),
                session,
                self.subscribers.clone(),
                self.shutdown.subscribe(),
            ));
            *started = true;
        }
        lock(&self.subscribers).push(tx);
        Ok(rx)
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A listening session: its client (kept alive) and the payloads its connection receives.
/// The receiver ends when the connection does.
struct Session {
    _client: Client,
    payloads: mpsc::UnboundedReceiver<String>,
}

async fn listen(config: &Config) -> Result<Session, tokio_postgres::Error> {
    let (client, mut connection) = config.connect(NoTls).await?;
    let (tx, payloads) = mpsc::unbounded_channel();
    // The connection must be polled for the LISTEN below to complete too, so it is driven
    // here from the start; notifications are the only messages kept.
    tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if tx.send(n.payload().to_owned()).is_err() {
                        break;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "PostgreSQL listener connection lost");
                    break;
                }
                None => break,
            }
        }
    });
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    Ok(Session {
        _client: client,
        payloads,
    })
}

async fn run(
    config: Config,
    mut session: Session,
    subscribers: Arc<std::sync::Mutex<Vec<mpsc::Sender<String>>>>,
    mut shutdown: watch::Receiver<()>,
) {
    loop {
        tokio::select! {
            payload = session.payloads.recv() => match payload {
                Some(payload) => {
                    // A full receiver misses this one rather than stalling every other.
                    lock(&subscribers).retain(|s| !matches!(s.try_send(payload.clone()), Err(mpsc::error::TrySendError::Closed(_))));
                }
                None => {
                    // Notifications sent while reconnecting are lost: live updates are a
                    // best-effort signal, readers refetch state anyway.
                    let mut backoff = Duration::from_millis(100);
                    session = loop {
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = shutdown.changed() => return,
                        }
                        match listen(&config).await {
                            Ok(s) => {
                                tracing::info!("PostgreSQL listener reconnected");
                                break s;
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "PostgreSQL listener cannot reconnect yet");
                                backoff = (backoff * 2).min(Duration::from_secs(5));
                            }
                        }
                    };
                }
            },
            _ = shutdown.changed() => return,
        }
    }
}

/// Session advisory locks, one dedicated connection per job name.
pub struct JobLocks {
    config: Config,
    jobs: Mutex<HashMap<String, LockSession>>,
}

struct LockSession {
    client: Client,
    held: bool,
}

impl JobLocks {
    pub fn new(config: Config) -> Self {
        JobLocks {
            config,
            jobs: Mutex::new(HashMap::new()),
        }
    }

    /// `true` while this node holds the lock of `job`. A held lock is confirmed by a
    /// query on its connection (the lock lives as long as that session); a lost
    /// connection means the lock is gone, and a new connection tries to take it again.
    pub async fn hold(&self, job: &str) -> StoreResult<bool> {
        let mut jobs = self.jobs.lock().await;
        if let Some(session) = jobs.get_mut(job) {
            let alive = !session.client.is_closed()
                && matches!(
                    tokio::time::timeout(QUERY_TIMEOUT, session.client.simple_query("SELECT 1")).await,
                    Ok(Ok(_))
                );
            if alive && session.held {
                return Ok(true);
            }
            if alive {
                let held = try_lock(&session.client, job).await.map_err(pg_err)?;
                session.held = held;
                return Ok(held);
            }
            if session.held {
                tracing::warn!(job, "lost the connection holding a job lock; the job may run elsewhere");
            }
            jobs.remove(job);
        }
        let client = lock_session(&self.config, "a job lock").await?;
        let held = try_lock(&client, job).await.map_err(pg_err)?;
        jobs.insert(job.to_owned(), LockSession { client, held });
        Ok(held)
    }
}

async fn try_lock(client: &Client, job: &str) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT pg_try_advisory_lock($1, hashtext($2))",
            &[&JOB_LOCK_SPACE, &job],
        )
        .await?;
    Ok(row.get(0))
}

/// A session of its own for advisory locks. It ends when the client is dropped, which
/// frees every lock it holds.
async fn lock_session(config: &Config, purpose: &str) -> StoreResult<Client> {
    let (client, connection) = match tokio::time::timeout(QUERY_TIMEOUT, config.connect(NoTls)).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => return Err(StoreError::Unavailable(e.to_string())),
        Err(_) => return Err(StoreError::Unavailable(format!("timed out connecting for {purpose}"))),
    };
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "lock session ended");
        }
    });
    Ok(client)
}

/// Session advisory locks held for one piece of work and then released
/// (`Store::cluster_lock`). A released session is kept for the next lock (up to
/// [`IDLE_LOCK_SESSIONS`]); a guard dropped unreleased (an error path, a cancelled
/// request) is released in the background the same way; a lock whose release is not
/// confirmed ends its session, which frees it on the server.
pub struct HeldLocks {
    config: Config,
    idle: std::sync::Mutex<Vec<Client>>,
    sessions: Arc<tokio::sync::Semaphore>,
}

impl HeldLocks {
    pub fn new(mut config: Config) -> Self {
        // The server gives up a wait by itself too, whatever happens to this node.
        let lock_timeout = format!("-c lock_timeout={}", LOCK_WAIT.as_millis());
        let options = match config.get_options() {
            Some(given) => format!("{given} {lock_timeout}"),
            None => lock_timeout,
        };
        config.options(&options);
        HeldLocks {
            config,
            idle: std::sync::Mutex::new(Vec::new()),
            sessions: Arc::new(tokio::sync::Semaphore::new(MAX_LOCK_SESSIONS)),
        }
    }

    pub async fn acquire(self: &Arc<Self>, name: &str) -> StoreResult<crate::ClusterLock> {
        let deadline = tokio::time::Instant::now() + LOCK_WAIT;
        let busy = || StoreError::Unavailable(format!("another holder kept the lock {name:?} for {LOCK_WAIT:?}"));
        let turn = tokio::time::timeout_at(deadline, self.sessions.clone().acquire_owned())
            .await
            .map_err(|_| busy())?
            .expect("never closed");
        let reused = {
            let mut idle = lock(&self.idle);
            idle.retain(|c| !c.is_closed());
            idle.pop()
        };
        let client = match reused {
            Some(client) => client,
            None => lock_session(&self.config, "a cluster lock").await?,
        };
        let mut waiting = Waiting {
            client: Some(client),
            turn: Some(turn),
        };
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&HELD_LOCK_SPACE, &name];
        let wait = waiting
            .client
            .as_ref()
            .expect("just set")
            .execute("SELECT pg_advisory_lock($1, hashtext($2))", &params);
        let waited = tokio::time::timeout_at(deadline, wait).await;
        match waited {
            Ok(Ok(_)) => Ok(crate::ClusterLock::held(Box::new(HeldLock {
                client: waiting.client.take().expect("just set"),
                name: name.to_owned(),
                locks: self.clone(),
                _turn: waiting.turn.take().expect("just set"),
            }))),
            Ok(Err(e)) => {
                // The wait ended on the server (lock_timeout, a lost connection): nothing
                // to cancel; the session is dropped.
                waiting.client = None;
                Err(pg_err(e))
            }
            // `waiting` cancels the wait still queued on the server.
            Err(_) => Err(busy()),
        }
    }
}

/// A lock wait in progress. Dropped before the lock was granted (a timeout, or the
/// request waiting for it went away), it cancels the wait on the server: a dropped client
/// alone keeps its session open until the lock is granted. Its turn is given back once
/// the cancel is done, so the session limit counts sessions that still exist.
struct Waiting {
    client: Option<Client>,
    turn: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let (Some(client), turn) = (self.client.take(), self.turn.take()) else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let cancel = client.cancel_token();
                let _ = tokio::time::timeout(QUERY_TIMEOUT, cancel.cancel_query(NoTls)).await;
                drop(client);
                drop(turn);
            });
        }
    }
}

struct HeldLock {
    client: Client,
    name: String,
    locks: Arc<HeldLocks>,
    _turn: tokio::sync::OwnedSemaphorePermit,
}

#[async_trait::async_trait]
impl crate::ReleaseLock for HeldLock {
    async fn release(self: Box<Self>) -> StoreResult<()> {
        let HeldLock {
            client,
            name,
            locks,
            _turn,
        } = *self;
        let unlocked = tokio::time::timeout(
            QUERY_TIMEOUT,
            client.query_one(
                "SELECT pg_advisory_unlock($1, hashtext($2))",
                &[&HELD_LOCK_SPACE, &name],
            ),
        )
        .await;
        match unlocked {
            Ok(Ok(row)) if row.get::<_, bool>(0) => {
                let mut idle = lock(&locks.idle);
                if idle.len() < IDLE_LOCK_SESSIONS {
                    idle.push(client);
                }
                Ok(())
            }
            Ok(Ok(_)) => Err(StoreError::Unavailable(format!("the lock {name:?} was no longer held"))),
            Ok(Err(e)) => Err(pg_err(e)),
            Err(_) => Err(StoreError::Unavailable(format!(
                "timed out releasing the lock {name:?}"
            ))),
        }
    }
}
