//! Throwaway databases for tests: each test gets a database of its own on a shared
//! PostgreSQL server, so tests run in parallel without seeing each other's rows,
//! partitions, notifications or advisory locks. Public so the HTTP integration tests of
//! other crates can use the same helper.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use tokio_postgres::NoTls;

use super::pg_err;
use crate::{StoreError, StoreResult};

/// The environment variable naming the admin URL of the test server.
pub const ENV: &str = "MCP_METRICS_TEST_POSTGRES";

/// The admin URL from [`ENV`], or `None` after printing that the caller is skipped.
pub fn admin_url_or_skip(test: &str) -> Option<String> {
    match std::env::var(ENV) {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ => {
            eprintln!("{test}: skipped: {ENV} not set");
            None
        }
    }
}

fn random_hex() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // RandomState is seeded randomly per process; the counter and time tell calls apart.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

/// `url` with its database name replaced (the query string is kept).
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{database}?{q}"),
        None => format!("{base}/{database}"),
    }
}

/// Creates an empty database `mcpm_t_<random hex>` through `admin_url` and returns the
/// URL of it.
pub async fn fresh_database(admin_url: &str) -> StoreResult<String> {
    let name = format!("mcpm_t_{}", random_hex());
    admin_execute(admin_url, &format!("CREATE DATABASE {name}")).await?;
    Ok(with_database(admin_url, &name))
}

/// Drops the database of `url` (made by [`fresh_database`]), closing its connections.
pub async fn drop_database(admin_url: &str, url: &str) -> StoreResult<()> {
    let name = url
        .split('?')
        .next()
        .and_then(|u| u.rsplit('/').next())
        .filter(|n| n.starts_with("mcpm_t_") && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        .ok_or_else(|| StoreError::Invalid(format!("{url} does not name a test database")))?;
    admin_execute(admin_url, &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await
}

async fn admin_execute(admin_url: &str, sql: &str) -> StoreResult<()> {
    let config: tokio_postgres::Config = admin_url
        .parse()
        .map_err(|e| StoreError::Invalid(format!("invalid PostgreSQL URL: {e}")))?;
    let (client, connection) = config.connect(NoTls).await.map_err(pg_err)?;
    let driver = tokio::spawn(connection);
    let result = client.batch_execute(sql).await.map_err(pg_err);
    drop(client);
    let _ = driver.await;
    result
}

/// [`drop_database`] from a `Drop` impl: on a thread with a runtime of its own, since
/// Drop cannot await and the test's runtime may be ending.
pub fn drop_database_blocking(admin_url: &str, url: &str) {
    let (admin, url) = (admin_url.to_owned(), url.to_owned());
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime to drop the test database");
        let _ = rt.block_on(drop_database(&admin, &url));
    })
    .join();
}

/// Migrates the database at `url` up to schema `version` only, so a test can leave rows
/// of an older shape behind and then open the store (which applies the rest).
pub async fn migrate_to(url: &str, version: i64) -> StoreResult<()> {
    let (mut client, connection) = tokio_postgres::connect(url, NoTls).await.map_err(pg_err)?;
    tokio::spawn(connection);
    super::migrations::run_to(&mut client, 0, version)
        .await
        .map_err(pg_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn replaces_the_database_name() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/test", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(with_database("postgres://h", "x"), "postgres://h/x");
        assert_eq!(
            with_database("postgresql://u@h/db?sslmode=disable", "x"),
            "postgresql://u@h/x?sslmode=disable"
        );
    }
}
