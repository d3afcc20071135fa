//! Helpers shared by the store's test binaries.

use mcp_metrics_store::Store;

/// The ids of `server`'s series, in id order (the order they were created in).
pub async fn series_ids(store: &dyn Store, server: &str) -> Vec<i64> {
    let mut ids: Vec<i64> = store
        .series_of_server(server, None)
        .await
        .unwrap()
        .iter()
        .map(|s| s.id)
        .collect();
    ids.sort_unstable();
    ids
}
