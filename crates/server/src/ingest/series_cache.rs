//! Series ids by canonical key, in memory, so the ingest path resolves a sample's series
//! without a database round trip. Filled at start-up from the store and after each
//! commit with the series the writer created.

use std::collections::HashMap;
use std::sync::RwLock;

use mcp_metrics_core::model::{Kind, SeriesInfo};
use mcp_metrics_core::names::write_series_key;

#[derive(Default)]
pub struct SeriesCache {
    map: RwLock<HashMap<String, (i64, Kind)>>,
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
    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, (i64, Kind)>> {
        self.map.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn insert_all<'a>(&self, series: impl IntoIterator<Item = &'a SeriesInfo>) {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
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

    /// Forgets every series of a server (after the server is deleted).
    pub fn remove_server(&self, server_id: &str) {
        let prefix = format!("{server_id}\0");
        self.map
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| !k.starts_with(&prefix));
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
