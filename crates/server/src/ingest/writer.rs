//! The single writer and its bounded queue: group commit.
//!
//! Request handlers enqueue validated requests and wait; the writer takes everything
//! queued (up to a batch limit), commits it in one transaction, then answers each
//! request. Under load many requests share one commit and one fsync; when idle a lone
//! request commits at once. The queue is bounded in samples by a semaphore: when it is
//! full a request is refused at once (503) instead of growing memory.
//!
//! Two ways to run it:
//! - A store whose commit is blocking work ([`Store::blocking_commit`], SQLite) gets a
//!   writer on an OS thread of its own, which calls the commit directly. As a task, each
//!   commit cost two hand-offs: to the blocking pool and back to a runtime worker, where
//!   the writer's wake-up queued behind request handlers decoding bodies; together
//!   100–160 µs of an 850–950 µs commit (docs/METRICS.md, "Beside VictoriaMetrics").
//! - Otherwise a task, and a store that allows it ([`Store::write_concurrency`],
//!   PostgreSQL) gets several groups in flight: the next group is gathered and sent while
//!   the previous one waits for its commit.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use mcp_metrics_core::time::now_ms;
use mcp_metrics_store::{BlockingCommit, RequestOutcome, Store, StoreError, StoreResult, WriteBatch, WriteRequest};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use crate::config::IngestConfig;
use crate::telemetry::Telemetry;

/// What the queue carries: requests, then, once no handler can submit any more, the
/// order to commit what is left and stop.
enum Message {
    Write(Box<Job>),
    Stop,
}

struct Job {
    request: WriteRequest,
    samples: usize,
    reply: oneshot::Sender<Result<RequestOutcome, StoreError>>,
    permit: OwnedSemaphorePermit,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the write queue is full")]
    Overloaded,
    #[error("the writer has stopped")]
    Closed,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The sending side, shared by all handlers.
pub struct WriteQueue {
    tx: mpsc::UnboundedSender<Message>,
    permits: Arc<Semaphore>,
    capacity: usize,
    telemetry: Arc<Telemetry>,
}

impl WriteQueue {
    /// Queues a request and waits until it is committed.
    pub async fn submit(&self, request: WriteRequest) -> Result<RequestOutcome, SubmitError> {
        let samples = request.samples.len();
        let wanted = samples.clamp(1, self.capacity) as u32;
        let permit = self
            .permits
            .clone()
            .try_acquire_many_owned(wanted)
            .map_err(|_| SubmitError::Overloaded)?;
        // Counted before the send: the writer may take the job and uncount it at once.
        let queued = &self.telemetry.queue_samples;
        queued.fetch_add(samples as u64, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Message::Write(Box::new(Job {
                request,
                samples,
                reply,
                permit,
            })))
            .map_err(|_| {
                queued.fetch_sub(samples as u64, Ordering::Relaxed);
                SubmitError::Closed
            })?;
        Ok(answer.await.map_err(|_| SubmitError::Closed)??)
    }
}

/// Handle to stop the writer once no more requests can arrive.
pub struct WriterHandle {
    tx: mpsc::UnboundedSender<Message>,
    stopped: oneshot::Receiver<()>,
}

impl WriterHandle {
    /// Commits whatever is still queued, then ends the writer.
    pub async fn drain_and_stop(self) {
        let _ = self.tx.send(Message::Stop);
        let _ = self.stopped.await;
    }
}

pub fn start(store: Arc<dyn Store>, telemetry: Arc<Telemetry>, config: &IngestConfig) -> (WriteQueue, WriterHandle) {
    let (tx, rx) = mpsc::unbounded_channel();
    let capacity = config.queue_capacity_samples;
    telemetry
        .queue_capacity_samples
        .store(capacity as u64, Ordering::Relaxed);
    let (done, stopped) = oneshot::channel();
    let writer = Writer {
        telemetry: telemetry.clone(),
        max_batch_samples: config.max_batch_samples,
        replay_window_ms: config.replay_window_secs * 1000,
        retry_window_ms: config.retry_window_secs * 1000,
        max_series_per_server: config.max_series_per_server,
    };
    match store.blocking_commit() {
        Some(commit) => {
            std::thread::Builder::new()
                .name("mcp-metrics-writer".into())
                .spawn(move || {
                    writer.run_on_thread(rx, commit.as_ref());
                    let _ = done.send(());
                })
                .expect("the operating system refused to start the writer thread");
        }
        None => {
            tokio::spawn(async move {
                writer.run_as_task(rx, store).await;
                let _ = done.send(());
            });
        }
    }
    (
        WriteQueue {
            tx: tx.clone(),
            permits: Arc::new(Semaphore::new(capacity)),
            capacity,
            telemetry,
        },
        WriterHandle { tx, stopped },
    )
}

struct Writer {
    telemetry: Arc<Telemetry>,
    max_batch_samples: usize,
    replay_window_ms: i64,
    retry_window_ms: i64,
    max_series_per_server: u64,
}

impl Writer {
    /// The writer of a blocking store, on its own thread.
    fn run_on_thread(&self, mut rx: mpsc::UnboundedReceiver<Message>, store: &dyn BlockingCommit) {
        // After a stop the queue is closed: what is left comes out, in groups, then `None`.
        while let Some(message) = rx.blocking_recv() {
            let Some(first) = first_of_group(message, &mut rx) else {
                continue;
            };
            let jobs = self.gather(&mut rx, first);
            let (batch, group) = self.group(jobs);
            group.answer(commit_catching_panics(store, batch));
        }
    }

    /// The writer of an async store, as a task.
    async fn run_as_task(&self, mut rx: mpsc::UnboundedReceiver<Message>, store: Arc<dyn Store>) {
        let slots = store.write_concurrency().max(1);
        let in_flight = Arc::new(Semaphore::new(slots));
        while let Some(message) = rx.recv().await {
            let Some(first) = first_of_group(message, &mut rx) else {
                continue;
            };
            // Wait for a free slot before gathering the group: what arrives meanwhile
            // joins it.
            let slot = in_flight.clone().acquire_owned().await.expect("never closed");
            let jobs = self.gather(&mut rx, first);
            let (batch, group) = self.group(jobs);
            if slots == 1 {
                group.answer(store.write_batch(batch).await);
                drop(slot);
            } else {
                let store = store.clone();
                tokio::spawn(async move {
                    group.answer(store.write_batch(batch).await);
                    drop(slot);
                });
            }
        }
        // Every group in flight is committed before the writer reports it stopped.
        let _ = in_flight.acquire_many(slots as u32).await;
    }

    /// `first` and what is queued behind it, up to the batch limit.
    fn gather(&self, rx: &mut mpsc::UnboundedReceiver<Message>, first: Job) -> Vec<Job> {
        let mut samples = first.samples;
        let mut jobs = vec![first];
        while samples < self.max_batch_samples {
            match rx.try_recv() {
                Ok(Message::Write(job)) => {
                    samples += job.samples;
                    jobs.push(*job);
                }
                Ok(Message::Stop) => rx.close(),
                Err(_) => break,
            }
        }
        jobs
    }

    fn group(&self, jobs: Vec<Job>) -> (WriteBatch, Group) {
        let samples: usize = jobs.iter().map(|j| j.samples).sum();
        let mut replies = Vec::with_capacity(jobs.len());
        let mut requests = Vec::with_capacity(jobs.len());
        let mut permits = Vec::with_capacity(jobs.len());
        for job in jobs {
            replies.push(job.reply);
            requests.push(job.request);
            permits.push(job.permit);
        }
        let batch = WriteBatch {
            requests,
            now: now_ms(),
            replay_window_ms: self.replay_window_ms,
            retry_window_ms: self.retry_window_ms,
            max_series_per_server: self.max_series_per_server,
        };
        let group = Group {
            started: Instant::now(),
            samples,
            replies,
            permits,
            telemetry: self.telemetry.clone(),
        };
        (batch, group)
    }
}

/// A panic inside a commit fails that group, not the writer: on the blocking pool it
/// used to end one task, and on the writer's thread it would stop ingest for good while
/// the service still looked healthy. The transaction rolls back as it unwinds.
fn commit_catching_panics(store: &dyn BlockingCommit, batch: WriteBatch) -> StoreResult<Vec<RequestOutcome>> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| store.write_batch(batch))).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(StoreError::Database(format!("the commit panicked: {what}")))
    })
}

/// A request starts a group. A stop closes the queue: no handler can submit any more,
/// and the writer receives what is already queued, then the end.
fn first_of_group(message: Message, rx: &mut mpsc::UnboundedReceiver<Message>) -> Option<Job> {
    match message {
        Message::Write(job) => Some(*job),
        Message::Stop => {
            rx.close();
            None
        }
    }
}

/// The requests of one group commit, to be answered with its outcome.
struct Group {
    started: Instant,
    samples: usize,
    replies: Vec<oneshot::Sender<Result<RequestOutcome, StoreError>>>,
    permits: Vec<OwnedSemaphorePermit>,
    telemetry: Arc<Telemetry>,
}

impl Group {
    fn answer(self, result: StoreResult<Vec<RequestOutcome>>) {
        let t = &self.telemetry;
        t.commit_duration.observe(self.started.elapsed().as_secs_f64());
        t.commit_batch_samples.observe(self.samples as f64);
        t.commit_batch_requests.observe(self.replies.len() as f64);
        t.queue_samples.fetch_sub(self.samples as u64, Ordering::Relaxed);
        // Free queue space before answering so waiting clients can enqueue at once.
        drop(self.permits);
        match result {
            Ok(outcomes) => {
                for (reply, outcome) in self.replies.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                t.commit_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, requests = self.replies.len(), samples = self.samples, "group commit failed");
                for reply in self.replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use mcp_metrics_core::model::{Kind, SeriesKey, ServerFields};
    use mcp_metrics_store::sqlite::SqliteStore;
    use mcp_metrics_store::{NewSeries, PendingSample, SampleQuery, SeriesRef, StoreOptions};

    use super::*;

    fn request(value: f64) -> WriteRequest {
        WriteRequest {
            server_id: "s".into(),
            new_series: vec![NewSeries {
                key: SeriesKey {
                    server_id: "s".into(),
                    name: "latency".into(),
                    tags: Vec::new(),
                },
                kind: Kind::Histogram,
            }],
            samples: vec![PendingSample {
                series: SeriesRef::New(0),
                kind: Kind::Histogram,
                timestamp: 1_700_000_000_000,
                value,
            }],
            ..WriteRequest::default()
        }
    }

    /// SQLite's writer runs on its own thread: it commits and answers groups, and when
    /// stopped it still commits what was queued before the stop.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_writer_thread_commits_everything_queued_before_it_stops() {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = SqliteStore::open(&dir.path().join("w.db"), &StoreOptions::default())
            .await
            .unwrap();
        sqlite.create_server("s", &ServerFields::default(), 0).await.unwrap();
        let store: Arc<dyn Store> = Arc::new(sqlite);
        assert!(store.blocking_commit().is_some());
        let telemetry = Arc::new(Telemetry::default());
        let (queue, handle) = start(store.clone(), telemetry.clone(), &IngestConfig::default());
        let queue = Arc::new(queue);
        assert!(matches!(
            queue.submit(request(1.0)).await,
            Ok(RequestOutcome::Stored { .. })
        ));
        // Each request is in the queue once its submit has been polled once (it sends,
        // then waits for the answer), so all are queued before the stop.
        let mut queued: Vec<_> = (2..=20)
            .map(|v| Box::pin(queue.submit(request(f64::from(v)))))
            .collect();
        let mut answers = Vec::new();
        for submit in &mut queued {
            answers.extend(futures_util::FutureExt::now_or_never(submit.as_mut()));
        }
        handle.drain_and_stop().await;
        answers.extend(futures_util::future::join_all(queued).await);
        assert_eq!(answers.len(), 19);
        for answer in answers {
            assert!(matches!(answer, Ok(RequestOutcome::Stored { .. })), "{answer:?}");
        }
        let series = store.series_of_server("s", None).await.unwrap();
        let samples = store
            .read_samples(&SampleQuery {
                series_ids: vec![series[0].id],
                from: 0,
                to: i64::MAX,
                after: None,
                limit: 100,
            })
            .await
            .unwrap();
        assert_eq!(samples.len(), 20);
        // Stopped: nothing more is taken.
        assert!(matches!(queue.submit(request(0.0)).await, Err(SubmitError::Closed)));
    }

    /// Panics on its first commit, then commits nothing and answers each request.
    struct PanicsOnce(std::sync::atomic::AtomicBool);

    impl BlockingCommit for PanicsOnce {
        fn write_batch(&self, batch: WriteBatch) -> StoreResult<Vec<RequestOutcome>> {
            if !self.0.swap(true, Ordering::SeqCst) {
                panic!("a bug in the commit");
            }
            Ok(batch.requests.iter().map(|_| RequestOutcome::Duplicate).collect())
        }
    }

    #[tokio::test]
    async fn a_panicking_commit_fails_its_group_and_the_writer_goes_on() {
        let (tx, rx) = mpsc::unbounded_channel();
        let telemetry = Arc::new(Telemetry::default());
        let writer = Writer {
            telemetry: telemetry.clone(),
            max_batch_samples: 1,
            replay_window_ms: 0,
            retry_window_ms: 0,
            max_series_per_server: 0,
        };
        let thread = std::thread::spawn(move || writer.run_on_thread(rx, &PanicsOnce(Default::default())));
        let queue = WriteQueue {
            tx: tx.clone(),
            permits: Arc::new(Semaphore::new(100)),
            capacity: 100,
            telemetry: telemetry.clone(),
        };
        let failed = queue.submit(request(1.0)).await;
        assert!(
            matches!(failed, Err(SubmitError::Store(StoreError::Database(ref m))) if m.contains("a bug in the commit")),
            "{failed:?}"
        );
        assert!(matches!(
            queue.submit(request(2.0)).await,
            Ok(RequestOutcome::Duplicate)
        ));
        assert_eq!(telemetry.commit_failures.load(Ordering::Relaxed), 1);
        tx.send(Message::Stop).unwrap();
        thread.join().unwrap();
    }
}
