//! The live hub: per-server fan-out of "something changed" messages to SSE and
//! WebSocket clients (DESIGN.md §4.3 live).
//!
//! Each server has a bounded broadcast channel. A client that falls more than the
//! channel's capacity behind is dropped (its stream ends and the browser reconnects)
//! instead of being buffered without limit, and the number of open streams is capped,
//! in all and per client network (so one client cannot hold every stream).
//!
//! When several nodes share a PostgreSQL database, [`LiveHub::publish`] also hands each
//! message to an outbox that `cluster.rs` relays to the other nodes, whose listener
//! delivers it with [`LiveHub::publish_local`]: a sample ingested on node A reaches a
//! stream opened on node B.

use std::collections::HashMap;
use std::net::IpAddr;
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
    /// Open streams per client network, and how many one may hold.
    per_client: Arc<Mutex<HashMap<IpAddr, usize>>>,
    max_per_client: usize,
    /// Where messages for other nodes go, when the service runs as a cluster. Bounded:
    /// while the database is slow or away, messages beyond it are dropped (other nodes'
    /// pages catch up at the next one) instead of growing memory.
    outbox: Mutex<Option<mpsc::Sender<(String, LiveMessage)>>>,
}

/// A subscription; holding it counts against the stream limits.
pub struct Subscription {
    pub receiver: broadcast::Receiver<Arc<LiveMessage>>,
    _permit: OwnedSemaphorePermit,
    _client: ClientSlot,
}

/// One of a client network's streams; given back when dropped.
struct ClientSlot {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    client: IpAddr,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.client);
            }
        }
    }
}

/// Why a stream was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// All streams are taken, or the hub is closed.
    Full,
    /// This client network holds its share already.
    ClientLimit,
}

impl LiveHub {
    pub fn new(max_streams: usize, max_per_client: usize) -> Self {
        LiveHub {
            channels: Mutex::new(Some(HashMap::new())),
            streams: Arc::new(Semaphore::new(max_streams)),
            per_client: Arc::default(),
            max_per_client,
            outbox: Mutex::new(None),
        }
    }

    /// Relays every later [`LiveHub::publish`] to other nodes through `outbox`.
    pub fn set_outbox(&self, outbox: mpsc::Sender<(String, LiveMessage)>) {
        *self.outbox.lock().unwrap_or_else(|p| p.into_inner()) = Some(outbox);
    }

    /// A stream of `server_id` for a client from the network `client` (its address
    /// truncated, as for usage), unless a limit is reached or the hub is closed.
    pub fn subscribe(&self, server_id: &str, client: IpAddr) -> Result<Subscription, Refused> {
        let slot = {
            let mut counts = self.per_client.lock().unwrap_or_else(|p| p.into_inner());
            let n = counts.entry(client).or_insert(0);
            if *n >= self.max_per_client {
                return Err(Refused::ClientLimit);
            }
            *n += 1;
            ClientSlot {
                counts: self.per_client.clone(),
                client,
            }
        };
        let permit = self.streams.clone().try_acquire_owned().map_err(|_| Refused::Full)?;
        let mut guard = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let channels = guard.as_mut().ok_or(Refused::Full)?;
        let sender = channels
            .entry(server_id.to_owned())
            .or_insert_with(|| broadcast::channel(CHANNEL_CAPACITY).0);
        Ok(Subscription {
            receiver: sender.subscribe(),
            _permit: permit,
            _client: slot,
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

    /// Ends the streams of a server that was deleted (its channel goes, so they see it
    /// closed); a browser reconnecting gets 404.
    pub fn close_server(&self, server_id: &str) {
        if let Some(channels) = self.channels.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            channels.remove(server_id);
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

    const HOME: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 0));
    const AWAY: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, 0));

    #[test]
    fn one_client_network_cannot_take_every_stream() {
        let hub = LiveHub::new(3, 2);
        let a = hub.subscribe("s", HOME).unwrap();
        let _b = hub.subscribe("t", HOME).unwrap();
        assert_eq!(hub.subscribe("s", HOME).err(), Some(Refused::ClientLimit));
        let _c = hub.subscribe("s", AWAY).unwrap();
        assert_eq!(hub.subscribe("s", AWAY).err(), Some(Refused::Full), "3 in all");
        drop(a);
        assert!(hub.subscribe("s", HOME).is_ok(), "its slot came back");
        assert_eq!(hub.per_client.lock().unwrap().get(&HOME), Some(&1));
    }

    #[tokio::test]
    async fn fans_out_drops_laggards_and_caps_streams() {
        let hub = LiveHub::new(2, 10);
        let mut a = hub.subscribe("s", HOME).unwrap();
        let mut b = hub.subscribe("s", HOME).unwrap();
        assert!(hub.subscribe("s", AWAY).is_err(), "stream limit");
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
        assert!(hub.subscribe("s", HOME).is_ok(), "permits come back");
        let mut c = hub.subscribe("s", HOME).unwrap();
        hub.close_server("s");
        assert!(matches!(
            c.receiver.recv().await,
            Err(broadcast::error::RecvError::Closed)
        ));
        assert!(
            hub.per_client.lock().unwrap().get(&AWAY).is_none(),
            "refused streams hold no slot"
        );
    }
}
