//! Several `serve` processes on one PostgreSQL database acting as one service
//! (DESIGN.md §7).
//!
//! Ingest, reads and the replay window need nothing here: every node writes and reads
//! the same tables, and replay and retry guards are checked inside each write
//! transaction. What a node keeps in memory does need help:
//!
//! - live messages: every message a node's hub publishes is also sent through the
//!   database (`NOTIFY`), and every node's listener delivers the other nodes' messages
//!   to its own streams, so a sample ingested on node A reaches a stream open on node B;
//! - read caches: a `metric` message from another node (its rollup job changed a
//!   server's buckets) invalidates that server's cached answers here, as the local job's
//!   changes do; a `server_deleted` message drops the deleted server's series ids and
//!   its "known server" entry, so a server registered again under the same id does not
//!   get samples written under the old ids;
//! - periodic jobs run under cluster-wide locks ([`mcp_metrics_store::Store::hold_job_lock`]),
//!   taken in `rollup.rs`.
//!
//! On SQLite (one node) none of this starts.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::live::{KINDS, LiveMessage, SERVER_DELETED};
use crate::state::AppState;

/// Messages waiting to be relayed; more are dropped while the database is slow.
const OUTBOX_CAPACITY: usize = 10_000;

/// NOTIFY payloads must stay under 8000 bytes.
const MAX_PAYLOAD: usize = 7_900;

#[derive(Serialize, Deserialize)]
struct Envelope {
    /// The sending node, so a node ignores its own messages.
    node: String,
    server: String,
    kind: String,
    data: serde_json::Value,
}

/// Starts the relay when the store serves several nodes; returns its tasks.
pub async fn start(state: AppState) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let Some(incoming) = state.store.listen().await? else {
        return Ok(Vec::new());
    };
    let node = hex::encode(rand_bytes());
    let (outbox, outgoing) = mpsc::channel(OUTBOX_CAPACITY);
    state.live.set_outbox(outbox);
    tracing::info!(node = %node, "cluster mode: live messages and cache invalidations relay through the database");
    Ok(vec![
        tokio::spawn(send_loop(state.clone(), node.clone(), outgoing)),
        tokio::spawn(receive_loop(state, node, incoming)),
    ])
}

fn rand_bytes() -> [u8; 8] {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("the operating system's random source");
    bytes
}

async fn send_loop(state: AppState, node: String, mut outgoing: mpsc::Receiver<(String, LiveMessage)>) {
    let mut last_warning: Option<Instant> = None;
    while let Some((server, message)) = outgoing.recv().await {
        let mut envelope = Envelope {
            node: node.clone(),
            server,
            kind: message.kind.to_owned(),
            data: message.data,
        };
        let mut payload = serde_json::to_string(&envelope).unwrap_or_default();
        if payload.len() > MAX_PAYLOAD {
            // Streams treat a message as "something changed; refetch", so the gist survives.
            envelope.data = serde_json::json!({ "truncated": true });
            payload = serde_json::to_string(&envelope).unwrap_or_default();
        }
        match state.store.notify(&payload).await {
            Ok(()) => {
                state.telemetry.cluster_messages_sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                // The database is away: other nodes miss this message; their pages catch
                // up at the next one. Say so once in a while, not per message.
                if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    last_warning = Some(Instant::now());
                    tracing::warn!(error = %e, "cannot relay live messages to other nodes");
                }
            }
        }
    }
}

async fn receive_loop(state: AppState, node: String, mut incoming: mpsc::Receiver<String>) {
    while let Some(payload) = incoming.recv().await {
        let Ok(envelope) = serde_json::from_str::<Envelope>(&payload) else {
            tracing::debug!("ignoring a malformed cluster message");
            continue;
        };
        if envelope.node == node {
            continue;
        }
        let Some(kind) = KINDS.iter().copied().find(|k| *k == envelope.kind) else {
            continue;
        };
        state
            .telemetry
            .cluster_messages_received
            .fetch_add(1, Ordering::Relaxed);
        if kind == SERVER_DELETED {
            state.forget_server(&envelope.server);
            continue;
        }
        if kind == "metric" {
            state.cache.invalidate_server(&envelope.server);
        }
        state.live.publish_local(
            &envelope.server,
            LiveMessage {
                kind,
                data: envelope.data,
            },
        );
    }
    tracing::warn!("the cluster listener stopped; live messages from other nodes no longer arrive");
}
