//! The single writer task and its bounded queue: group commit.
//!
//! Request handlers enqueue validated requests and wait; the writer takes everything
//! queued (up to a batch limit), commits it in one transaction, then answers each
//! request. Under load many requests share one commit and one fsync; when idle a lone
//! request commits at once. The queue is bounded in samples by a semaphore: when it is
//! full a request is refused at once (503) instead of growing memory. A store that
//! allows it ([`Store::write_concurrency`], PostgreSQL) gets several groups in flight:
//! the next group is gathered and sent while the previous one waits for its commit.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use mcp_metrics_core::time::now_ms;
use mcp_metrics_store::{RequestOutcome, Store, StoreError, WriteBatch, WriteRequest};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use crate::config::IngestConfig;
use crate::telemetry::Telemetry;

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
    tx: mpsc::UnboundedSender<Job>,
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
        self.telemetry
            .queue_samples
            .fetch_add(samples as u64, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Job {
                request,
                samples,
                reply,
                permit,
            })
            .map_err(|_| SubmitError::Closed)?;
        Ok(answer.await.map_err(|_| SubmitError::Closed)??)
    }
}

/// Handle to stop the writer once no more requests can arrive.
pub struct WriterHandle {
    stop: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl WriterHandle {
    /// Commits whatever is still queued, then ends the task.
    pub async fn drain_and_stop(self) {
        self.stop.notify_one();
        let _ = self.task.await;
    }
}

pub fn start(store: Arc<dyn Store>, telemetry: Arc<Telemetry>, config: &IngestConfig) -> (WriteQueue, WriterHandle) {
    let (tx, rx) = mpsc::unbounded_channel();
    let capacity = config.queue_capacity_samples;
    telemetry
        .queue_capacity_samples
        .store(capacity as u64, Ordering::Relaxed);
    let stop = Arc::new(Notify::new());
    let writer = Writer {
        store,
        telemetry: telemetry.clone(),
        max_batch_samples: config.max_batch_samples,
        replay_window_ms: config.replay_window_secs * 1000,
        retry_window_ms: config.retry_window_secs * 1000,
    };
    let task = tokio::spawn(Arc::new(writer).run(rx, stop.clone()));
    (
        WriteQueue {
            tx,
            permits: Arc::new(Semaphore::new(capacity)),
            capacity,
            telemetry,
        },
        WriterHandle { stop, task },
    )
}

struct Writer {
    store: Arc<dyn Store>,
    telemetry: Arc<Telemetry>,
    max_batch_samples: usize,
    replay_window_ms: i64,
    retry_window_ms: i64,
}

impl Writer {
    async fn run(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Job>, stop: Arc<Notify>) {
        let slots = self.store.write_concurrency().max(1);
        let in_flight = Arc::new(Semaphore::new(slots));
        let mut stopping = false;
        loop {
            let first = if stopping {
                // No handler is running any more: commit what is left, in groups, and end.
                match rx.try_recv() {
                    Ok(job) => job,
                    Err(_) => break,
                }
            } else {
                tokio::select! {
                    biased;
                    job = rx.recv() => match job {
                        Some(job) => job,
                        None => break,
                    },
                    _ = stop.notified() => {
                        stopping = true;
                        continue;
                    }
                }
            };
            // Wait for a free slot before gathering the group: what arrives meanwhile
            // joins it.
            let slot = in_flight.clone().acquire_owned().await.expect("never closed");
            let mut jobs = vec![first];
            let mut samples = jobs[0].samples;
            while samples < self.max_batch_samples {
                match rx.try_recv() {
                    Ok(job) => {
                        samples += job.samples;
                        jobs.push(job);
                    }
                    Err(_) => break,
                }
            }
            if slots == 1 {
                self.commit(jobs).await;
                drop(slot);
            } else {
                let writer = self.clone();
                tokio::spawn(async move {
                    writer.commit(jobs).await;
                    drop(slot);
                });
            }
        }
        // Every group in flight is committed before the writer reports it stopped.
        let _ = in_flight.acquire_many(slots as u32).await;
    }

    async fn commit(&self, jobs: Vec<Job>) {
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
        };
        let started = Instant::now();
        let result = self.store.write_batch(batch).await;
        let t = &self.telemetry;
        t.commit_duration.observe(started.elapsed().as_secs_f64());
        t.commit_batch_samples.observe(samples as f64);
        t.commit_batch_requests.observe(replies.len() as f64);
        t.queue_samples.fetch_sub(samples as u64, Ordering::Relaxed);
        // Free queue space before answering so waiting clients can enqueue at once.
        drop(permits);
        match result {
            Ok(outcomes) => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                t.commit_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, requests = replies.len(), samples, "group commit failed");
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}
