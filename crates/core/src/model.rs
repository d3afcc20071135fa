//! Domain types exchanged between the HTTP layer, the ingest pipeline and the store.
//!
//! They say nothing about SQL or JSON wire shapes of storage, so the store trait can be
//! implemented for any database without the layers above changing.

use serde::{Deserialize, Serialize};

/// How a series' samples are interpreted by rollups (DESIGN.md §2 Kinds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Gauge,
    Counter,
    Histogram,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Gauge => "gauge",
            Kind::Counter => "counter",
            Kind::Histogram => "histogram",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "gauge" => Some(Kind::Gauge),
            "counter" => Some(Kind::Counter),
            "histogram" => Some(Kind::Histogram),
            _ => None,
        }
    }

    /// Stable small integer used by stores.
    pub fn to_i64(self) -> i64 {
        match self {
            Kind::Gauge => 0,
            Kind::Counter => 1,
            Kind::Histogram => 2,
        }
    }

    pub fn from_i64(v: i64) -> Option<Kind> {
        match v {
            0 => Some(Kind::Gauge),
            1 => Some(Kind::Counter),
            2 => Some(Kind::Histogram),
            _ => None,
        }
    }
}

/// Sorted, unique tag pairs.
pub type Tags = Vec<(String, String)>;

/// A listed MCP server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Server {
    pub id: String,
    pub registry_name: Option<String>,
    pub name: Option<String>,
    pub description: Option<String>,
    pub repository_url: Option<String>,
    pub remote_url: Option<String>,
    pub owner: Option<String>,
    /// Unix milliseconds.
    pub created_at: i64,
    pub updated_at: i64,
}

/// The editable fields of a server; `None` leaves a field unchanged on update.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerFields {
    pub registry_name: Option<String>,
    pub name: Option<String>,
    pub description: Option<String>,
    pub repository_url: Option<String>,
    pub remote_url: Option<String>,
    pub owner: Option<String>,
}

/// A credential as the store keeps it: the API key only as a hash, the signing secret
/// only sealed with the master key.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredCredential {
    pub key_id: String,
    pub server_id: String,
    pub api_key_hash: [u8; 32],
    pub sealed_secret: Vec<u8>,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
    pub last_used_at: Option<i64>,
}

/// What anyone may learn about a credential: never its secrets.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CredentialInfo {
    pub key_id: String,
    pub server_id: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
    pub last_used_at: Option<i64>,
}

impl From<&StoredCredential> for CredentialInfo {
    fn from(c: &StoredCredential) -> Self {
        CredentialInfo {
            key_id: c.key_id.clone(),
            server_id: c.server_id.clone(),
            created_at: c.created_at,
            revoked_at: c.revoked_at,
            last_used_at: c.last_used_at,
        }
    }
}

/// Where a server event came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventSource {
    Author,
    System,
}

impl EventSource {
    pub fn as_str(self) -> &'static str {
        match self {
            EventSource::Author => "author",
            EventSource::System => "system",
        }
    }
}

/// A dated note on a server's timeline.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub server_id: String,
    pub kind: String,
    pub title: String,
    pub detail: Option<String>,
    /// Unix milliseconds.
    pub at: i64,
    pub source: EventSource,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub id: i64,
    pub event: NewEvent,
}

/// A series as identified on the wire: server, name and sorted tags.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SeriesKey {
    pub server_id: String,
    pub name: String,
    pub tags: Tags,
}

/// A series the store knows, with its id.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesInfo {
    pub id: i64,
    pub key: SeriesKey,
    pub kind: Kind,
}

/// One raw sample read back, for the author's raw read.
#[derive(Debug, Clone, PartialEq)]
pub struct RawSample {
    pub series_id: i64,
    pub timestamp: i64,
    /// Distinguishes histogram observations that share a millisecond.
    pub seq: i64,
    pub value: f64,
}
