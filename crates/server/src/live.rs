//! The live hub: per-server fan-out of "something changed" messages to SSE and
//! WebSocket clients (DESIGN.md §4.3 live).
//!
//! Each server has a bounded broadcast channel. A client that falls more than the
//! channel's capacity behind is dropped (its stream ends and the browser reconnects)
//! instead of being buffered without limit, and the number of open streams is capped.
//!
//! When several nodes share a PostgreSQL database, [`LiveHub::publish`] also hands each
//! message to an outbox that `cluster.rs` relays to the other nodes, whose listener
//! delivers it with [`LiveHub::publish_local`]: a sample ingested on node A reaches a
//! stream opened on node B.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, mpsc};

/// Messages buffered per server before a slow client is dropped.
const CHANNEL_CAPACITY: usize = 64;

/// One message: `kind` is the SSE event name (`metric`, `usage`, `event`, ...).
#[derive(Debug, Clone, Serialize)]
pub struct LiveMessage {
    pub kind: &'static str,
    pub data: serde_json::Value,
}

/// The kinds of message a hub sends; a kind relayed from another node is mapped back
/// onto one of these (anything else is ignored).
pub const KINDS: [&str; 5] = ["metric", "usage", "event", "ready", SERVER_DELETED];

/// Relayed between nodes only: the server was deleted; drop what is cached about it.
pub const SERVER_DELETED: &str = "server_deleted";

pub struct LiveHub {
    /// `None` once closed: no new channel can appear after shutdown began.
    channels: Mutex<Option<HashMap<String, broadcast::Sender<Arc<LiveMessage>>>>>,
    streams: Arc<Semaphore>,
    /// Where messages for other nodes go, when the service runs as a cluster. Bounded:
    /// while the database is slow or away, messages beyond it are dropped (other nodes'
    /// pages catch up at the next one) instead of growing memory.
    outbox: Mutex<Option<mpsc::Sender<(String, LiveMessage)>>>,
}

/// A subscription; holding it counts against the stream limit.
pub struct Subscription {
    pub receiver: broadcast::Receiver<Arc<LiveMessage>>,
    _permit: OwnedSemaphorePermit,
}

impl LiveHub {
    pub fn new(max_streams: usize) -> Self {
        LiveHub {
            channels: Mutex::new(Some(HashMap::new())),
            streams: Arc::new(Semaphore::new(max_streams)),
            outbox: Mutex::new(None),
        }
    }

    /// Relays every later [`LiveHub::publish`] to other nodes through `outbox`.
    pub fn set_outbox(&self, outbox: mpsc::Sender<(String, LiveMessage)>) {
        *self.outbox.lock().unwrap_or_else(|p| p.into_inner()) = Some(outbox);
    }

    /// `None` when the stream limit is reached or the hub is closed.
    pub fn subscribe(&self, server_id: &str) -> Option<Subscription> {
        let permit = self.streams.clone().try_acquire_owned().ok()?;
        let mut guard = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let channels = guard.as_mut()?;
        let sender = channels
            .entry(server_id.to_owned())
            .or_insert_with(|| broadcast::channel(CHANNEL_CAPACITY).0);
        Some(Subscription {
            receiver: sender.subscribe(),
            _permit: permit,
        })
    }

    /// Sends to everyone watching `server_id`, on this node and (in a cluster) on the
    /// others.
    pub fn publish(&self, server_id: &str, message: LiveMessage) {
        self.relay(server_id, &message);
        self.publish_local(server_id, message);
    }

    /// Sends to the other nodes only (cluster housekeeping such as a deleted server).
    pub fn relay(&self, server_id: &str, message: &LiveMessage) {
        if let Some(outbox) = self.outbox.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = outbox.try_send((server_id.to_owned(), message.clone()));
        }
    }

    /// Sends to everyone watching `server_id` on this node; a server nobody watches
    /// costs a lookup.
    pub fn publish_local(&self, server_id: &str, message: LiveMessage) {
        let mut guard = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let Some(channels) = guard.as_mut() else { return };
        if let Some(sender) = channels.get(server_id) {
            if sender.receiver_count() == 0 {
                channels.remove(server_id);
            } else {
                let _ = sender.send(Arc::new(message));
            }
        }
    }

    /// Ends every open stream (at shutdown, so open SSE connections do not hold the
    /// graceful stop until its deadline) and refuses new ones. The map is replaced under
    /// its lock, so no subscription racing with this can create a channel afterwards.
    pub fn close(&self) {
        self.streams.close();
        *self.channels.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn fans_out_drops_laggards_and_caps_streams() {
        let hub = LiveHub::new(2);
        let mut a = hub.subscribe("s").unwrap();
        let mut b = hub.subscribe("s").unwrap();
        assert!(hub.subscribe("s").is_none(), "stream limit");
        hub.publish(
            "s",
            LiveMessage {
                kind: "metric",
                data: json!({"n": 1}),
            },
        );
        hub.publish(
            "other",
            LiveMessage {
                kind: "metric",
                data: json!({}),
            },
        );
        assert_eq!(a.receiver.recv().await.unwrap().data["n"], 1);
        for n in 0..(CHANNEL_CAPACITY + 5) {
            hub.publish(
                "s",
                LiveMessage {
                    kind: "metric",
                    data: json!({ "n": n }),
                },
            );
        }
        // b never read: it lagged and must be dropped by its stream.
        assert!(matches!(
            b.receiver.recv().await,
            Err(broadcast::error::RecvError::Lagged(_))
        ));
        drop(a);
        drop(b);
        assert!(hub.subscribe("s").is_some(), "permits come back");
    }
}
