//! Series ids by canonical key, in memory, so the ingest path resolves a sample's series
//! without a database round trip. Filled at start-up from the store and after each
//! commit with the series the writer created.

use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};

use mcp_metrics_core::model::{Kind, SeriesInfo};
use mcp_metrics_core::names::write_series_key;

/// Maps keyed by series text, which clients choose. SipHash was 3–4 % of the service's
/// CPU under line-protocol load (a lookup per line); with foldhash's quality hasher the
/// service used 2–4 % less CPU (docs/METRICS.md). It is seeded at random per process but claims only minimal resistance to
/// chosen keys: accepted because only holders of a server's API key name its series, and
/// nothing the service answers reveals the seed.
pub type KeyMap<V> = std::collections::HashMap<String, V, foldhash::quality::RandomState>;

#[derive(Default)]
pub struct SeriesCache {
    map: RwLock<KeyMap<(i64, Kind)>>,
    /// How many times a server's series were forgotten (changed under the map's lock).
    forgets: AtomicU64,
}

/// Writes the cache key of a series into `out` (cleared first).
pub fn cache_key<'a>(
    out: &mut String,
    server_id: &str,
    name: &str,
    tags: impl IntoIterator<Item = (&'a str, &'a str)>,
) {
    out.clear();
    out.push_str(server_id);
    out.push('\0');
    write_series_key(out, name, tags);
}

impl SeriesCache {
    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, KeyMap<(i64, Kind)>> {
        self.map.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Caches series read from the store (start-up).
    pub fn insert_all<'a>(&self, series: impl IntoIterator<Item = &'a SeriesInfo>) {
        insert_into(&mut self.map.write().unwrap_or_else(|p| p.into_inner()), series);
    }

    /// Forgets every series of a server (after the server is deleted).
    pub fn remove_server(&self, server_id: &str) {
        let prefix = format!("{server_id}\0");
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        map.retain(|k, _| !k.starts_with(&prefix));
        self.forgets.fetch_add(1, Ordering::Relaxed);
    }

    /// A mark to take before a request is prepared and hand to
    /// [`SeriesCache::insert_created`] once its commit returns.
    pub fn epoch(&self) -> u64 {
        let _map = self.read();
        self.forgets.load(Ordering::Relaxed)
    }

    /// Caches the series a commit created, unless some server's series were forgotten
    /// since `epoch`: the commit may have landed just before that server was deleted,
    /// and its ids must not come back (a server created again under the same id would
    /// resolve to series that no longer exist, and its samples would be lost). Requests
    /// then resolve those series through the writer once more. Returns whether it cached.
    pub fn insert_created<'a>(&self, epoch: u64, series: impl IntoIterator<Item = &'a SeriesInfo>) -> bool {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        if self.forgets.load(Ordering::Relaxed) != epoch {
            return false;
        }
        insert_into(&mut map, series);
        true
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn insert_into<'a>(map: &mut KeyMap<(i64, Kind)>, series: impl IntoIterator<Item = &'a SeriesInfo>) {
    let mut key = String::new();
    for s in series {
        cache_key(
            &mut key,
            &s.key.server_id,
            &s.key.name,
            s.key.tags.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        );
        map.insert(key.clone(), (s.id, s.kind));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mcp_metrics_core::model::SeriesKey;

    fn info(server: &str, id: i64) -> SeriesInfo {
        SeriesInfo {
            id,
            key: SeriesKey {
                server_id: server.into(),
                name: "m".into(),
                tags: vec![],
            },
            kind: Kind::Gauge,
        }
    }

    /// A commit's series are cached only if no server was forgotten since the request
    /// took its epoch: one that committed just before its server's deletion must not put
    /// the deleted ids back.
    #[test]
    fn series_of_a_commit_older_than_a_deletion_are_not_cached() {
        let cache = SeriesCache::default();
        let before = cache.epoch();
        cache.remove_server("s");
        assert!(!cache.insert_created(before, &[info("s", 1)]));
        assert!(cache.is_empty(), "the deleted server's series stay forgotten");
        let now = cache.epoch();
        assert!(cache.insert_created(now, &[info("s", 2)]));
        assert_eq!(cache.len(), 1);
    }
}
