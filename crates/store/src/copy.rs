//! Moving a SQLite database to PostgreSQL, for a service that outgrows one node.
//!
//! Every table is copied with its ids, so series ids cached anywhere, event paging
//! positions and sealed credentials stay valid, and the fetch API answers the same on
//! both. Raw samples, by far the largest table, go in ts-ordered chunks by binary COPY,
//! each committed together with a checkpoint in the destination's `meta`: an interrupted
//! copy run again continues after the last committed chunk. The other tables are
//! re-read and inserted with `ON CONFLICT DO NOTHING`, which makes a second run a no-op.
//!
//! The destination must be empty or hold an earlier copy of the same source: merging two
//! services' data would mix up their series ids.

use std::path::Path;
use std::pin::pin;
use std::sync::{Arc, Mutex};

use rusqlite::types::Value;
use rusqlite::{Connection, OpenFlags};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};

use crate::postgres::{PostgresStore, pg_err};
use crate::{StoreError, StoreOptions, StoreResult};

/// Where a copy is, for a progress bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyProgress {
    pub table: &'static str,
    pub done: u64,
    pub total: u64,
}

/// What a copy did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyReport {
    /// Rows read from the source, per table (for samples: rows copied by this run).
    pub tables: Vec<(&'static str, u64)>,
    /// Raw samples that an earlier, interrupted run had copied already.
    pub samples_resumed: u64,
    /// Rows each table gained in the destination, in the order of `tables`. The small
    /// tables are re-read on every run, so this, not `tables`, tells whether a rerun
    /// found anything the destination lacked.
    pub new_rows: Vec<(&'static str, u64)>,
}

/// Meta keys of the destination that belong to the copy itself.
const SOURCE_KEY: &str = "copy_source";
const CHECKPOINT_KEY: &str = "copy_samples_after";
/// Raw samples per committed chunk.
const SAMPLE_CHUNK: usize = 50_000;
/// Rows per chunk of the other tables.
const ROW_CHUNK: usize = 5_000;

#[derive(Debug, Clone, Copy)]
enum Col {
    I16,
    I64,
    OptI64,
    F64,
    Text,
    OptText,
    Bytes,
    OptBytes,
    Bool,
}

impl Col {
    fn pg_type(self) -> Type {
        match self {
            Col::I16 => Type::INT2,
            Col::I64 | Col::OptI64 => Type::INT8,
            Col::F64 => Type::FLOAT8,
            Col::Text | Col::OptText => Type::TEXT,
            Col::Bytes | Col::OptBytes => Type::BYTEA,
            Col::Bool => Type::BOOL,
        }
    }
}

struct Table {
    name: &'static str,
    columns: &'static [(&'static str, Col)],
    /// Primary key columns, for keyset paging of the source.
    key: &'static [&'static str],
    /// An identity column whose sequence must move past the copied ids.
    identity: Option<&'static str>,
}

const STATS: [(&str, Col); 12] = [
    ("series_id", Col::I64),
    ("bucket", Col::I64),
    ("count", Col::I64),
    ("sum", Col::F64),
    ("min", Col::F64),
    ("max", Col::F64),
    ("first", Col::F64),
    ("first_ts", Col::I64),
    ("last", Col::F64),
    ("last_ts", Col::I64),
    ("increase", Col::F64),
    ("sketch", Col::OptBytes),
];

/// In an order that satisfies the foreign keys.
const TABLES: &[Table] = &[
    Table {
        name: "servers",
        columns: &[
            ("id", Col::Text),
            ("registry_name", Col::OptText),
            ("name", Col::OptText),
            ("description", Col::OptText),
            ("repository_url", Col::OptText),
            ("remote_url", Col::OptText),
            ("owner", Col::OptText),
            ("created_at", Col::I64),
            ("updated_at", Col::I64),
        ],
        key: &["id"],
        identity: None,
    },
    Table {
        name: "credentials",
        columns: &[
            ("key_id", Col::Text),
            ("server_id", Col::Text),
            ("api_key_hash", Col::Bytes),
            ("sealed_secret", Col::Bytes),
            ("created_at", Col::I64),
            ("revoked_at", Col::OptI64),
            ("last_used_at", Col::OptI64),
        ],
        key: &["key_id"],
        identity: None,
    },
    Table {
        name: "series",
        columns: &[
            ("id", Col::I64),
            ("server_id", Col::Text),
            ("name", Col::Text),
            ("tags", Col::Text),
            ("kind", Col::I16),
            ("created_at", Col::I64),
        ],
        key: &["id"],
        identity: Some("id"),
    },
    Table {
        name: "server_events",
        columns: &[
            ("id", Col::I64),
            ("server_id", Col::Text),
            ("kind", Col::Text),
            ("title", Col::Text),
            ("detail", Col::OptText),
            ("at", Col::I64),
            ("source", Col::Text),
        ],
        key: &["id"],
        identity: Some("id"),
    },
    Table {
        name: "seen_signatures",
        columns: &[("signature", Col::Bytes), ("expires_at", Col::I64)],
        key: &["signature"],
        identity: None,
    },
    Table {
        name: "request_digests",
        columns: &[("key_id", Col::Text), ("digest", Col::Bytes), ("expires_at", Col::I64)],
        key: &["key_id", "digest"],
        identity: None,
    },
    Table {
        name: "rollups_1m",
        columns: &STATS,
        key: &["series_id", "bucket"],
        identity: None,
    },
    Table {
        name: "rollups_1h",
        columns: &STATS,
        key: &["series_id", "bucket"],
        identity: None,
    },
    Table {
        name: "server_metrics_daily",
        columns: &STATS,
        key: &["series_id", "bucket"],
        identity: None,
    },
    Table {
        name: "rollup_dirty",
        columns: &[
            ("level", Col::I16),
            ("bucket", Col::I64),
            ("series_id", Col::I64),
            ("generation", Col::I64),
        ],
        key: &["level", "bucket", "series_id"],
        identity: None,
    },
    Table {
        name: "usage_salts",
        columns: &[("day", Col::I64), ("salt", Col::Bytes), ("created_at", Col::I64)],
        key: &["day"],
        identity: None,
    },
    Table {
        name: "server_usage",
        columns: &[
            ("id", Col::I64),
            ("server_id", Col::Text),
            ("event", Col::Text),
            ("client", Col::OptText),
            ("at", Col::I64),
            ("counted", Col::Bool),
        ],
        key: &["id"],
        identity: Some("id"),
    },
    Table {
        name: "usage_visitors",
        columns: &[
            ("day", Col::I64),
            ("server_id", Col::Text),
            ("visitor", Col::Bytes),
            ("flags", Col::I64),
        ],
        key: &["day", "server_id", "visitor"],
        identity: None,
    },
    Table {
        name: "usage_daily",
        columns: &[
            ("server_id", Col::Text),
            ("day", Col::I64),
            ("visitors", Col::I64),
            ("views", Col::I64),
            ("installs", Col::I64),
            ("tests", Col::I64),
            ("copy_config", Col::I64),
            ("repo_click", Col::I64),
            ("raw_views", Col::I64),
            ("raw_installs", Col::I64),
            ("raw_tests", Col::I64),
            ("raw_copy_config", Col::I64),
            ("raw_repo_click", Col::I64),
        ],
        key: &["server_id", "day"],
        identity: None,
    },
    Table {
        name: "meta",
        columns: &[("key", Col::Text), ("value", Col::Text)],
        key: &["key"],
        identity: None,
    },
];

type Boxed = Box<dyn ToSql + Sync + Send>;

fn convert(table: &str, column: &str, col: Col, v: Value) -> StoreResult<Boxed> {
    Ok(match (col, v) {
        (Col::I16, Value::Integer(n)) => Box::new(n as i16),
        (Col::I64, Value::Integer(n)) => Box::new(n),
        (Col::OptI64, Value::Integer(n)) => Box::new(Some(n)),
        (Col::OptI64, Value::Null) => Box::new(None::<i64>),
        (Col::F64, Value::Real(f)) => Box::new(f),
        (Col::F64, Value::Integer(n)) => Box::new(n as f64),
        (Col::Text, Value::Text(s)) => Box::new(s),
        (Col::OptText, Value::Text(s)) => Box::new(Some(s)),
        (Col::OptText, Value::Null) => Box::new(None::<String>),
        (Col::Bytes, Value::Blob(b)) => Box::new(b),
        (Col::OptBytes, Value::Blob(b)) => Box::new(Some(b)),
        (Col::OptBytes, Value::Null) => Box::new(None::<Vec<u8>>),
        (Col::Bool, Value::Integer(n)) => Box::new(n != 0),
        (col, v) => {
            return Err(StoreError::Invalid(format!(
                "cannot copy {table}.{column}: {v:?} is not a {col:?}"
            )));
        }
    })
}

fn sqlite_err(e: rusqlite::Error) -> StoreError {
    StoreError::Database(format!("reading the SQLite source: {e}"))
}

/// The source, read on the blocking pool so the copy never stalls other tasks.
#[derive(Clone)]
struct Source(Arc<Mutex<Connection>>);

impl Source {
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> StoreResult<T> {
        let conn = self.0.clone();
        tokio::task::spawn_blocking(move || f(&conn.lock().unwrap_or_else(|p| p.into_inner())))
            .await
            .map_err(|e| StoreError::Database(format!("copy task failed: {e}")))?
            .map_err(sqlite_err)
    }

    async fn count(&self, table: &'static str) -> StoreResult<u64> {
        self.run(move |c| c.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get::<_, i64>(0)))
            .await
            .map(|n| n as u64)
    }
}

/// Copies the SQLite database at `sqlite_path` into the PostgreSQL database at `pg_url`
/// (migrating it first), reporting progress table by table.
pub async fn sqlite_to_postgres(
    sqlite_path: &Path,
    pg_url: &str,
    mut progress: impl FnMut(CopyProgress),
) -> StoreResult<CopyReport> {
    let canonical = sqlite_path
        .canonicalize()
        .map_err(|e| StoreError::Invalid(format!("cannot open {}: {e}", sqlite_path.display())))?;
    let conn = Connection::open_with_flags(&canonical, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| StoreError::Invalid(format!("cannot open {}: {e}", canonical.display())))?;
    let source = Source(Arc::new(Mutex::new(conn)));
    let version: i64 = source
        .run(|c| {
            c.query_row("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", [], |r| {
                r.get(0)
            })
        })
        .await
        .map_err(|_| StoreError::Invalid(format!("{} is not an mcp-metrics database", canonical.display())))?;
    if version != crate::sqlite::latest_version() {
        return Err(StoreError::Invalid(format!(
            "{} has schema version {version}, this build copies version {}: run `mcp-metrics migrate` on it first",
            canonical.display(),
            crate::sqlite::latest_version()
        )));
    }
    let source_id = format!("sqlite:{}", canonical.display());

    let store = PostgresStore::open(pg_url, &StoreOptions::default()).await?;
    let mut client = store.client().await?;
    claim_destination(&client, &source_id).await?;

    let mut report = CopyReport::default();
    for table in TABLES {
        let (rows, new) = copy_table(&source, &mut client, table, &mut progress).await?;
        report.tables.push((table.name, rows));
        report.new_rows.push((table.name, new));
    }
    let (logged, new) = copy_logged_marks(&source, &client, &mut progress).await?;
    report.tables.push(("rollup_log", logged));
    report.new_rows.push(("rollup_log", new));
    let (copied, resumed) = copy_samples(&source, &store, &mut client, &mut progress).await?;
    report.tables.push(("server_metrics", copied));
    report.new_rows.push(("server_metrics", copied));
    report.samples_resumed = resumed;
    advance_sequences(&source, &client).await?;
    Ok(report)
}

/// Records `source_id` as the destination's source, refusing a destination that holds
/// anything else.
async fn claim_destination(client: &crate::postgres::PoolClient, source_id: &str) -> StoreResult<()> {
    let recorded: Option<String> = client
        .query_opt("SELECT value FROM meta WHERE key = $1", &[&SOURCE_KEY])
        .await
        .map_err(pg_err)?
        .map(|r| r.get(0));
    match recorded {
        Some(r) if r == source_id => Ok(()),
        Some(r) => Err(StoreError::Invalid(format!(
            "the PostgreSQL database holds a copy of {r}, not of {source_id}; copy into an empty database"
        ))),
        None => {
            let used: bool = client
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM servers) OR EXISTS (SELECT 1 FROM series)
                         OR EXISTS (SELECT 1 FROM server_metrics) OR EXISTS (SELECT 1 FROM server_events)
                         OR EXISTS (SELECT 1 FROM meta)",
                    &[],
                )
                .await
                .map_err(pg_err)?
                .get(0);
            if used {
                return Err(StoreError::Invalid(
                    "the PostgreSQL database already has data that did not come from a copy of this SQLite \
                     database; copy into an empty database"
                        .into(),
                ));
            }
            client
                .execute(
                    "INSERT INTO meta (key, value) VALUES ($1, $2)",
                    &[&SOURCE_KEY, &source_id],
                )
                .await
                .map_err(pg_err)?;
            Ok(())
        }
    }
}

async fn copy_table(
    source: &Source,
    client: &mut crate::postgres::PoolClient,
    table: &'static Table,
    progress: &mut impl FnMut(CopyProgress),
) -> StoreResult<(u64, u64)> {
    let total = source.count(table.name).await?;
    let columns: Vec<&str> = table.columns.iter().map(|c| c.0).collect();
    let list = columns.join(", ");
    let types: Vec<Type> = table.columns.iter().map(|c| c.1.pg_type()).collect();
    let key_positions: Vec<usize> = table
        .key
        .iter()
        .map(|k| columns.iter().position(|c| c == k).unwrap_or(0))
        .collect();
    let key_list = table.key.join(", ");
    let placeholders: Vec<String> = (1..=table.key.len()).map(|i| format!("?{i}")).collect();
    let first_sql = format!(
        "SELECT {list} FROM {} ORDER BY {key_list} LIMIT {ROW_CHUNK}",
        table.name
    );
    let next_sql = format!(
        "SELECT {list} FROM {} WHERE ({key_list}) > ({}) ORDER BY {key_list} LIMIT {ROW_CHUNK}",
        table.name,
        placeholders.join(", ")
    );
    // The meta rows that only make sense in the source.
    let skip_meta = |row: &[Value]| {
        table.name == "meta"
            && matches!(&row[0], Value::Text(k) if k == "rollup_generation" || k == SOURCE_KEY || k == CHECKPOINT_KEY)
    };

    let (mut done, mut inserted) = (0u64, 0u64);
    let mut after: Option<Vec<Value>> = None;
    progress(CopyProgress {
        table: table.name,
        done,
        total,
    });
    loop {
        let (sql, params) = match &after {
            None => (first_sql.clone(), Vec::new()),
            Some(k) => (next_sql.clone(), k.clone()),
        };
        let width = columns.len();
        let rows: Vec<Vec<Value>> = source
            .run(move |c| {
                let mut stmt = c.prepare_cached(&sql)?;
                let rows = stmt.query_map(rusqlite::params_from_iter(params), |r| {
                    (0..width)
                        .map(|i| r.get::<_, Value>(i))
                        .collect::<rusqlite::Result<Vec<_>>>()
                })?;
                rows.collect()
            })
            .await?;
        let Some(last) = rows.last() else { break };
        after = Some(key_positions.iter().map(|&i| last[i].clone()).collect());
        let n = rows.len();

        let tx = client.transaction().await.map_err(pg_err)?;
        tx.batch_execute(&format!(
            "CREATE TEMP TABLE copy_stage (LIKE {} INCLUDING DEFAULTS) ON COMMIT DROP",
            table.name
        ))
        .await
        .map_err(pg_err)?;
        let sink = tx
            .copy_in(&format!("COPY copy_stage ({list}) FROM STDIN BINARY"))
            .await
            .map_err(pg_err)?;
        let mut writer = pin!(BinaryCopyInWriter::new(sink, &types));
        for row in rows {
            if skip_meta(&row) {
                continue;
            }
            let values = row
                .into_iter()
                .zip(table.columns)
                .map(|(v, (name, col))| convert(table.name, name, *col, v))
                .collect::<StoreResult<Vec<Boxed>>>()?;
            let refs: Vec<&(dyn ToSql + Sync)> = values.iter().map(|b| b.as_ref() as &(dyn ToSql + Sync)).collect();
            writer.as_mut().write(&refs).await.map_err(pg_err)?;
        }
        writer.finish().await.map_err(pg_err)?;
        inserted += tx
            .execute(
                &format!(
                    "INSERT INTO {name} ({list}) SELECT {list} FROM copy_stage ON CONFLICT DO NOTHING",
                    name = table.name
                ),
                &[],
            )
            .await
            .map_err(pg_err)?;
        tx.commit().await.map_err(pg_err)?;
        done += n as u64;
        progress(CopyProgress {
            table: table.name,
            done,
            total,
        });
        if n < ROW_CHUNK {
            break;
        }
    }
    Ok((done, inserted))
}

fn parse_checkpoint(text: &str) -> Option<(i64, i64, i64)> {
    let mut parts = text.split(',').map(|p| p.trim().parse::<i64>());
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(Ok(a)), Some(Ok(b)), Some(Ok(c)), None) => Some((a, b, c)),
        _ => None,
    }
}

/// Makes the minute marks the source's log holds (writes the rollup job has not settled
/// yet, see `sqlite::mark_log`) marks of the destination, so its rollup job recomputes
/// those minutes. Returns the pairs read and the marks this run added or raised.
async fn copy_logged_marks(
    source: &Source,
    client: &crate::postgres::PoolClient,
    progress: &mut impl FnMut(CopyProgress),
) -> StoreResult<(u64, u64)> {
    let mut marks: Vec<(i64, i64, i64)> = source
        .run(crate::sqlite::mark_log::pending)
        .await?
        .into_iter()
        .map(|((minute, series), generation)| (minute, series, generation))
        .collect();
    marks.sort_unstable();
    let total = marks.len() as u64;
    let mut changed = 0;
    for (done, chunk) in marks.chunks(ROW_CHUNK).enumerate() {
        progress(CopyProgress {
            table: "rollup_log",
            done: (done * ROW_CHUNK) as u64,
            total,
        });
        let column = |pick: fn(&(i64, i64, i64)) -> i64| chunk.iter().map(pick).collect::<Vec<i64>>();
        let (minutes, series, generations) = (column(|m| m.0), column(|m| m.1), column(|m| m.2));
        // A mark the destination holds at this generation or later stays as it is, so a
        // second run changes nothing.
        changed += client
            .execute(
                "INSERT INTO rollup_dirty (level, bucket, series_id, generation)
                 SELECT 0, * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[])
                 ON CONFLICT (level, bucket, series_id) DO UPDATE SET
                   generation = EXCLUDED.generation, min_ts = NULL, xids = NULL
                 WHERE rollup_dirty.generation < EXCLUDED.generation",
                &[&minutes, &series, &generations],
            )
            .await
            .map_err(pg_err)?;
    }
    progress(CopyProgress {
        table: "rollup_log",
        done: total,
        total,
    });
    Ok((total, changed))
}

/// Copies raw samples after the checkpoint in (ts, series_id, seq) order; returns the
/// rows copied now and those an earlier run had copied.
async fn copy_samples(
    source: &Source,
    store: &PostgresStore,
    client: &mut crate::postgres::PoolClient,
    progress: &mut impl FnMut(CopyProgress),
) -> StoreResult<(u64, u64)> {
    const TABLE: &str = "server_metrics";
    let total = source.run(crate::sqlite::raw::count).await?;
    let mut after = client
        .query_opt("SELECT value FROM meta WHERE key = $1", &[&CHECKPOINT_KEY])
        .await
        .map_err(pg_err)?
        .and_then(|r| parse_checkpoint(r.get(0)));
    let resumed = match after {
        Some((ts, id, seq)) => {
            source
                .run(move |c| crate::sqlite::raw::count_through(c, (ts, id, seq)))
                .await?
        }
        None => 0,
    };
    let mut done = resumed;
    progress(CopyProgress {
        table: TABLE,
        done,
        total,
    });
    loop {
        let from = after.unwrap_or((i64::MIN, i64::MIN, i64::MIN));
        let rows = source
            .run(move |c| crate::sqlite::raw::page_after(c, from, SAMPLE_CHUNK))
            .await?;
        let Some((ts, id, seq)) = rows.last().map(|r| (r.timestamp, r.series_id, r.seq)) else {
            break;
        };
        let n = rows.len();
        let mut days: Vec<i64> = rows.iter().map(|r| r.timestamp.div_euclid(86_400_000)).collect();
        days.dedup();
        store.ensure_days(days).await?;

        let tx = client.transaction().await.map_err(pg_err)?;
        let sink = tx
            .copy_in("COPY server_metrics (ts, series_id, seq, value) FROM STDIN BINARY")
            .await
            .map_err(pg_err)?;
        let mut writer = pin!(BinaryCopyInWriter::new(
            sink,
            &[Type::INT8, Type::INT8, Type::INT4, Type::FLOAT8]
        ));
        for r in rows {
            let seq = r.seq as i32;
            writer
                .as_mut()
                .write(&[&r.timestamp, &r.series_id, &seq, &r.value])
                .await
                .map_err(pg_err)?;
        }
        writer.finish().await.map_err(pg_err)?;
        // The checkpoint commits with the chunk: a rerun never copies a row twice.
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            &[&CHECKPOINT_KEY, &format!("{ts},{id},{seq}")],
        )
        .await
        .map_err(pg_err)?;
        tx.commit().await.map_err(pg_err)?;
        after = Some((ts, id, seq));
        done += n as u64;
        progress(CopyProgress {
            table: TABLE,
            done,
            total,
        });
        if n < SAMPLE_CHUNK {
            break;
        }
    }
    Ok((done - resumed, resumed))
}

/// Moves identity sequences past every copied id (and past ids SQLite handed out and
/// deleted since, so none is ever reused), and the mark generation sequence past every
/// generation the source used.
async fn advance_sequences(source: &Source, client: &crate::postgres::PoolClient) -> StoreResult<()> {
    for table in TABLES {
        let Some(column) = table.identity else { continue };
        let name = table.name;
        let used: i64 = source
            .run(move |c| {
                let max: i64 = c.query_row(&format!("SELECT COALESCE(MAX({column}), 0) FROM {name}"), [], |r| {
                    r.get(0)
                })?;
                // AUTOINCREMENT tables remember their highest id ever; others do not exist there.
                let seq: Option<i64> = c
                    .query_row("SELECT seq FROM sqlite_sequence WHERE name = ?1", [name], |r| r.get(0))
                    .ok();
                Ok(max.max(seq.unwrap_or(0)))
            })
            .await?;
        client
            .execute(
                &format!(
                    "SELECT setval(pg_get_serial_sequence('{name}', '{column}'), m, m > 0)
                     FROM (SELECT GREATEST($1::bigint, (SELECT COALESCE(MAX({column}), 0) FROM {name}), 1) AS m) AS x"
                ),
                &[&used],
            )
            .await
            .map_err(pg_err)?;
    }
    let generation: i64 = source
        .run(|c| {
            let marks: i64 = c.query_row("SELECT COALESCE(MAX(generation), 0) FROM rollup_dirty", [], |r| {
                r.get(0)
            })?;
            let counter: Option<String> = c
                .query_row("SELECT value FROM meta WHERE key = 'rollup_generation'", [], |r| {
                    r.get(0)
                })
                .ok();
            Ok(marks.max(counter.and_then(|v| v.parse().ok()).unwrap_or(0)))
        })
        .await?;
    client
        .execute(
            "SELECT setval('rollup_generation', GREATEST($1::bigint, (SELECT last_value FROM rollup_generation), 1))",
            &[&generation],
        )
        .await
        .map_err(pg_err)?;
    Ok(())
}
