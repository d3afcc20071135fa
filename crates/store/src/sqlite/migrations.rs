//! Versioned SQLite migrations. Each entry runs once, in order, inside a transaction,
//! and is recorded in `schema_migrations`. Never edit an applied entry: add a new one.

use rusqlite::{Connection, Transaction};

/// (version, description, SQL)
pub const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "servers, credentials, series, raw samples, events, request guards",
        r#"
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE servers (
    id             TEXT PRIMARY KEY,
    registry_name  TEXT,
    name           TEXT,
    description    TEXT,
    repository_url TEXT,
    remote_url     TEXT,
    owner          TEXT,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL
);

-- api_key_hash: SHA-256 of the API key. sealed_secret: the signing secret sealed with
-- the master key (XChaCha20-Poly1305, key_id as associated data).
CREATE TABLE credentials (
    key_id        TEXT PRIMARY KEY,
    server_id     TEXT NOT NULL REFERENCES servers(id) ON DELETE CASCADE,
    api_key_hash  BLOB NOT NULL UNIQUE,
    sealed_secret BLOB NOT NULL,
    created_at    INTEGER NOT NULL,
    revoked_at    INTEGER,
    last_used_at  INTEGER
);
CREATE INDEX credentials_by_server ON credentials(server_id);

-- tags: canonical JSON object with sorted keys. kind: 0 gauge, 1 counter, 2 histogram.
-- AUTOINCREMENT: ids of deleted series are never reused, so a stale id held in some
-- process's cache can never point at another server's series.
CREATE TABLE series (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    server_id  TEXT NOT NULL REFERENCES servers(id) ON DELETE CASCADE,
    name       TEXT NOT NULL,
    tags       TEXT NOT NULL,
    kind       INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    UNIQUE (server_id, name, tags)
);

-- Raw samples (the seed's table name). Gauges and counters always have seq 0, so a
-- second write at the same (series, ts) replaces the value; histogram observations
-- that share a millisecond take seq 0, 1, 2, ... SQLite stores the constant 0 in no bytes.
-- value has no declared type so it keeps the storage class it is given: a tagged
-- integer for whole numbers and thousandths, a REAL otherwise (see value_codec.rs).
-- Time leads the key: samples arrive roughly in time order, so inserts append to the
-- right edge of the B-tree (full pages, few dirty pages per commit), retention deletes
-- a prefix, and rollups read a time range of every series in one scan.
CREATE TABLE server_metrics (
    ts        INTEGER NOT NULL,
    series_id INTEGER NOT NULL,
    seq       INTEGER NOT NULL,
    value     NOT NULL,
    PRIMARY KEY (ts, series_id, seq)
) WITHOUT ROWID;

CREATE TABLE server_events (
    id        INTEGER PRIMARY KEY,
    server_id TEXT NOT NULL REFERENCES servers(id) ON DELETE CASCADE,
    kind      TEXT NOT NULL,
    title     TEXT NOT NULL,
    detail    TEXT,
    at        INTEGER NOT NULL,
    source    TEXT NOT NULL
);
CREATE INDEX server_events_by_time ON server_events(server_id, at, id);

CREATE TABLE seen_signatures (
    signature  BLOB PRIMARY KEY,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE request_digests (
    key_id     TEXT NOT NULL,
    digest     BLOB NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (key_id, digest)
) WITHOUT ROWID;
"#,
    ),
    (
        2,
        "rollups per minute, hour and day, and their dirty marks",
        r#"
-- One row per series and bucket. sketch: the DDSketch of histogram series (NULL for
-- other kinds). The daily table keeps the seed's name.
CREATE TABLE rollups_1m (
    series_id INTEGER NOT NULL,
    bucket    INTEGER NOT NULL,
    count     INTEGER NOT NULL,
    sum       REAL NOT NULL,
    min       REAL NOT NULL,
    max       REAL NOT NULL,
    first     REAL NOT NULL,
    first_ts  INTEGER NOT NULL,
    last      REAL NOT NULL,
    last_ts   INTEGER NOT NULL,
    increase  REAL NOT NULL,
    sketch    BLOB,
    PRIMARY KEY (series_id, bucket)
) WITHOUT ROWID;
CREATE TABLE rollups_1h (
    series_id INTEGER NOT NULL,
    bucket    INTEGER NOT NULL,
    count     INTEGER NOT NULL,
    sum       REAL NOT NULL,
    min       REAL NOT NULL,
    max       REAL NOT NULL,
    first     REAL NOT NULL,
    first_ts  INTEGER NOT NULL,
    last      REAL NOT NULL,
    last_ts   INTEGER NOT NULL,
    increase  REAL NOT NULL,
    sketch    BLOB,
    PRIMARY KEY (series_id, bucket)
) WITHOUT ROWID;
CREATE TABLE server_metrics_daily (
    series_id INTEGER NOT NULL,
    bucket    INTEGER NOT NULL,
    count     INTEGER NOT NULL,
    sum       REAL NOT NULL,
    min       REAL NOT NULL,
    max       REAL NOT NULL,
    first     REAL NOT NULL,
    first_ts  INTEGER NOT NULL,
    last      REAL NOT NULL,
    last_ts   INTEGER NOT NULL,
    increase  REAL NOT NULL,
    sketch    BLOB,
    PRIMARY KEY (series_id, bucket)
) WITHOUT ROWID;

-- level: 0 minute, 1 hour, 2 day.
CREATE TABLE rollup_dirty (
    level      INTEGER NOT NULL,
    bucket     INTEGER NOT NULL,
    series_id  INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    PRIMARY KEY (level, bucket, series_id)
) WITHOUT ROWID;
"#,
    ),
    (
        3,
        "anonymous usage: daily salts, events, per-visitor day flags, daily figures",
        r#"
-- A random salt per UTC day for visitor ids; deleted after 48 hours.
CREATE TABLE usage_salts (
    day        INTEGER PRIMARY KEY,
    salt       BLOB NOT NULL,
    created_at INTEGER NOT NULL
);

-- Anonymous event log (the seed's table name): no address, no visitor id.
-- counted: whether the event counted in public figures.
CREATE TABLE server_usage (
    id        INTEGER PRIMARY KEY,
    server_id TEXT NOT NULL REFERENCES servers(id) ON DELETE CASCADE,
    event     TEXT NOT NULL,
    client    TEXT,
    at        INTEGER NOT NULL,
    counted   INTEGER NOT NULL
);
CREATE INDEX server_usage_by_time ON server_usage(at);
CREATE INDEX server_usage_by_server ON server_usage(server_id);

-- Which once-per-day events a visitor id already counted (bit per event kind).
-- Visitor ids are keyed hashes under the day's salt; rows go with the salt.
CREATE TABLE usage_visitors (
    day       INTEGER NOT NULL,
    server_id TEXT NOT NULL,
    visitor   BLOB NOT NULL,
    flags     INTEGER NOT NULL,
    PRIMARY KEY (day, server_id, visitor)
) WITHOUT ROWID;

CREATE TABLE usage_daily (
    server_id       TEXT NOT NULL REFERENCES servers(id) ON DELETE CASCADE,
    day             INTEGER NOT NULL,
    visitors        INTEGER NOT NULL DEFAULT 0,
    views           INTEGER NOT NULL DEFAULT 0,
    installs        INTEGER NOT NULL DEFAULT 0,
    tests           INTEGER NOT NULL DEFAULT 0,
    copy_config     INTEGER NOT NULL DEFAULT 0,
    repo_click      INTEGER NOT NULL DEFAULT 0,
    raw_views       INTEGER NOT NULL DEFAULT 0,
    raw_installs    INTEGER NOT NULL DEFAULT 0,
    raw_tests       INTEGER NOT NULL DEFAULT 0,
    raw_copy_config INTEGER NOT NULL DEFAULT 0,
    raw_repo_click  INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (server_id, day)
) WITHOUT ROWID;
"#,
    ),
    (
        4,
        "the mark generation each rollup bucket was computed from",
        r#"
-- A pass whose mark was renewed while it computed still stores its (newer) result, so a
-- minute written without pause keeps being updated; a result computed from an older
-- generation never replaces a bucket computed from a newer one.
ALTER TABLE rollups_1m ADD COLUMN generation INTEGER;
ALTER TABLE rollups_1h ADD COLUMN generation INTEGER;
ALTER TABLE server_metrics_daily ADD COLUMN generation INTEGER;
"#,
    ),
    (
        5,
        "raw samples as runs: one row per write, server and minute",
        r#"
-- A write's samples of one server and minute, packed grouped by series (format in
-- run_codec.rs; raw.rs says why). id is the write order that reading resolves
-- overwritten values and observation seqs by. Time leads the index: retention deletes a
-- prefix and rollups read a time range of every series. server_id is not a foreign key:
-- deleting a server deletes its runs explicitly, like its rollups.
CREATE TABLE sample_runs (
    id        INTEGER PRIMARY KEY,
    minute    INTEGER NOT NULL,
    server_id TEXT NOT NULL,
    samples   BLOB NOT NULL
);
CREATE INDEX sample_runs_by_minute ON sample_runs(minute, server_id);
"#,
    ),
    (
        6,
        "the minute-mark log: one row per write and minute instead of a mark per series",
        r#"
-- Each write logs the series it wrote in each minute (a blob of id deltas, format and
-- rules in mark_log.rs); the rollup job moves the log into rollup_dirty once per pass.
-- A write has one generation, so (minute, generation) names its row; keyed by minute, the
-- writer finds a minute's rows when it first meets that minute, and a row costs one
-- B-tree insert, where a rowid table and an index on minute cost two.
CREATE TABLE rollup_log (
    minute     INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    series_ids BLOB NOT NULL,
    PRIMARY KEY (minute, generation)
) WITHOUT ROWID;
"#,
    ),
];

/// Work a migration does beyond its SQL, run after it in the same transaction.
fn after_sql(version: i64, tx: &Transaction<'_>) -> rusqlite::Result<()> {
    if version == 5 {
        super::raw::migrate_rows_into_runs(tx)?;
        tx.execute_batch("DROP TABLE server_metrics")?;
    }
    Ok(())
}

/// The version a fully migrated database has.
pub fn latest_version() -> i64 {
    MIGRATIONS.last().map(|m| m.0).unwrap_or(0)
}

pub fn current_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version     INTEGER PRIMARY KEY,
            description TEXT NOT NULL,
            applied_at  INTEGER NOT NULL
        )",
    )?;
    conn.query_row("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", [], |r| {
        r.get(0)
    })
}

/// Applies every migration newer than the database; returns the versions applied.
pub fn run(conn: &mut Connection, now_ms: i64) -> rusqlite::Result<Vec<i64>> {
    let current = current_version(conn)?;
    let mut applied = Vec::new();
    for (version, description, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        after_sql(*version, &tx)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, description, applied_at) VALUES (?1, ?2, ?3)",
            rusqlite::params![version, description, now_ms],
        )?;
        tx.commit()?;
        applied.push(*version);
    }
    Ok(applied)
}
