//! `mcp-metrics copy`: moves a SQLite service's data into PostgreSQL, for an operator
//! who outgrows one node. The copying itself is `mcp_metrics_store::copy` (resumable,
//! idempotent, ids kept); this command adds what the operator needs around it: checks
//! that name what to fix, a progress bar per table, a summary, and where the master key
//! is, without which the copied signing secrets cannot be opened on the new nodes.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use mcp_metrics_core::secrets::MasterKey;
use mcp_metrics_server::config::LogFormat;
use mcp_metrics_server::keyring;
use mcp_metrics_store::copy::{CopyProgress, CopyReport};
use mcp_metrics_store::{StoreError, StoreOptions};

use crate::cli::CopyArgs;

/// The meta key under which the service records which master key sealed the secrets.
const FINGERPRINT_META_KEY: &str = "master_key_fingerprint";

pub async fn run(args: CopyArgs) -> anyhow::Result<()> {
    crate::logging::init(LogFormat::Text, "warn");
    if mcp_metrics_store::is_postgres_url(&args.from) {
        bail!("--from must be the SQLite database to copy (sqlite://PATH or a path), not a PostgreSQL URL");
    }
    if !mcp_metrics_store::is_postgres_url(&args.to) {
        bail!(
            "--to must be a postgres:// or postgresql:// URL, e.g. postgres://mcp@db.internal/metrics (got {})",
            redact(&args.to)
        );
    }
    let path = mcp_metrics_store::sqlite::path_from_url(&args.from).context("--from names no SQLite database")?;
    if !path.is_file() {
        bail!(
            "the SQLite database {} does not exist: --from must name the file the service ran with \
             (its `database` setting, e.g. sqlite://mcp-metrics.db)",
            path.display()
        );
    }
    let to = redact(&args.to);

    // Opened here, before any work, so an unreachable or misnamed destination is reported
    // as such; the store also creates the schema. Kept for the key check at the end.
    let destination = mcp_metrics_store::open(&args.to, &StoreOptions::default())
        .await
        .with_context(|| {
            format!(
                "cannot open the PostgreSQL database {to}: check that the server is running and reachable, \
                 that the user, password and database name are right, and that the database exists \
                 (create it with `createdb`)"
            )
        })?;

    let started = Instant::now();
    let mut bars = Bars::new();
    let result = mcp_metrics_store::copy::sqlite_to_postgres(&path, &args.to, |p| bars.update(p)).await;
    bars.finish();
    let report = result.map_err(|e| {
        let context = match e {
            // Refusals name their cause already: wrong source, schema too old, a
            // destination with other data.
            StoreError::Invalid(_) => format!("cannot copy {} into {to}", path.display()),
            _ => format!(
                "the copy of {} into {to} stopped; every chunk committed so far stays: fix the cause and run \
                 the same command again to continue after the last one",
                path.display()
            ),
        };
        anyhow::Error::new(e).context(context)
    })?;
    print_summary(&path, &to, &report, started.elapsed());

    let recorded = destination
        .meta_get(FINGERPRINT_META_KEY)
        .await
        .context("the copy is complete, but reading the master key fingerprint back failed")?;
    print_master_key(&args.from, &to, recorded.as_deref());
    Ok(())
}

/// One bar per table, each left on screen as it stands when its table is done (or the
/// copy fails), so the operator sees how far every table got.
struct Bars {
    multi: MultiProgress,
    current: Option<(&'static str, ProgressBar)>,
}

impl Bars {
    fn new() -> Bars {
        Bars {
            multi: MultiProgress::new(),
            current: None,
        }
    }

    fn update(&mut self, p: CopyProgress) {
        if self.current.as_ref().is_none_or(|(table, _)| *table != p.table) {
            self.finish();
            let bar = self.multi.add(ProgressBar::new(p.total));
            bar.set_style(
                ProgressStyle::with_template("{prefix:>22} [{bar:40}] {human_pos}/{human_len} rows ({elapsed})")
                    .expect("valid template"),
            );
            bar.set_prefix(p.table);
            // Sample chunks take seconds each; the ticker shows the copy is alive meanwhile.
            bar.enable_steady_tick(Duration::from_millis(120));
            self.current = Some((p.table, bar));
        }
        if let Some((_, bar)) = &self.current {
            // Rows the service wrote after the count can make `done` pass `total`.
            bar.set_length(p.total.max(p.done));
            bar.set_position(p.done);
        }
    }

    fn finish(&mut self) {
        if let Some((_, bar)) = self.current.take() {
            bar.abandon();
        }
    }
}

fn print_summary(path: &Path, to: &str, report: &CopyReport, took: Duration) {
    println!("Copied {} into {to} in {:.1} s.\n", path.display(), took.as_secs_f64());
    println!("{:<22} {:>14} {:>14}", "TABLE", "IN SOURCE", "NEW");
    let mut new_total = 0;
    for (i, &(table, read)) in report.tables.iter().enumerate() {
        let new = report.new_rows.get(i).map_or(0, |n| n.1);
        // Raw samples are read only after the checkpoint; the rows before it are the source's too.
        let in_source = if table == "server_metrics" {
            read + report.samples_resumed
        } else {
            read
        };
        new_total += new;
        println!("{table:<22} {in_source:>14} {new:>14}");
    }
    println!();
    if new_total == 0 {
        println!("Nothing new was copied: the destination already held every row of the source.");
    } else {
        println!("{new_total} new rows.");
        if report.samples_resumed > 0 {
            println!(
                "Continued after the {} raw samples an earlier run had copied.",
                report.samples_resumed
            );
        }
    }
}

/// Tells the operator which master key the PostgreSQL nodes need: the signing secrets
/// were copied sealed, and only that key opens them.
fn print_master_key(from: &str, to: &str, recorded: Option<&str>) {
    println!();
    let Some(file) = keyring::key_file_for(from) else {
        println!("Start every PostgreSQL node with the SQLite service's MCP_METRICS_MASTER_KEY.");
        return;
    };
    let shown = shell_quote(&file.display().to_string());
    if !file.exists() {
        println!(
            "There is no master key file at {shown}, so the SQLite service took its key from \
             MCP_METRICS_MASTER_KEY: start every PostgreSQL node with that same key."
        );
        return;
    }
    let file_key = std::fs::read_to_string(&file)
        .ok()
        .and_then(|text| MasterKey::from_hex(&text).ok());
    match (file_key, recorded) {
        (Some(key), Some(recorded)) if key.fingerprint() != recorded => {
            println!(
                "warning: the key in {shown} is not the one the signing secrets were sealed with (fingerprint \
                 {recorded}): the SQLite service must have run with MCP_METRICS_MASTER_KEY. Start every \
                 PostgreSQL node with that key."
            );
        }
        (None, _) => {
            println!(
                "warning: {shown} is not a valid master key file. Start every PostgreSQL node with the \
                 master key the SQLite service used, as MCP_METRICS_MASTER_KEY."
            );
        }
        (Some(_), _) => {
            println!("The signing secrets are sealed with the master key in {shown}.");
            println!("Every PostgreSQL node needs it as MCP_METRICS_MASTER_KEY (keep it secret), e.g.:");
            println!("  MCP_METRICS_MASTER_KEY=$(cat {shown}) mcp-metrics serve --database {to}");
        }
    }
}

/// `url` with its password, if any, replaced: the summary may end up in logs or tickets.
fn redact(url: &str) -> String {
    // A password may also come as a query parameter.
    let url = &match url.find("password=") {
        Some(at) => {
            let end = url[at..].find('&').map_or(url.len(), |i| at + i);
            format!("{}password=***{}", &url[..at], &url[end..])
        }
        None => url.to_owned(),
    };
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let authority_end = url[start..].find(['/', '?']).map_or(url.len(), |i| start + i);
    let authority = &url[start..authority_end];
    match authority.rfind('@') {
        Some(at) => match authority[..at].find(':') {
            Some(colon) => format!("{}{}:***{}", &url[..start], &authority[..colon], &url[start + at..]),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// `text` as one shell word, so the printed command can be pasted as is.
fn shell_quote(text: &str) -> String {
    if !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+:@%,=".contains(&b))
    {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::{redact, shell_quote};

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            redact("postgres://h/db?sslmode=disable"),
            "postgres://h/db?sslmode=disable"
        );
        assert_eq!(redact("postgresql://u:p@ss@h/db"), "postgresql://u:***@h/db");
        assert_eq!(
            redact("postgres://u@h/db?password=secret&sslmode=disable"),
            "postgres://u@h/db?password=***&sslmode=disable"
        );
    }

    #[test]
    fn paths_are_quoted_for_the_shell() {
        assert_eq!(shell_quote("/var/lib/m.db.master-key"), "/var/lib/m.db.master-key");
        assert_eq!(shell_quote("/a b/it's"), r"'/a b/it'\''s'");
    }
}
