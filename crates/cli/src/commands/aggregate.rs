//! `mcp-metrics aggregate`: recomputes rollups on the database directly (no running
//! service needed, though one may run beside it) and applies retention, with progress.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use mcp_metrics_core::time::{now_ms, parse_time_param};
use mcp_metrics_server::config::Overrides;
use mcp_metrics_server::rollup;

use crate::cli::AggregateArgs;

pub async fn run(args: AggregateArgs) -> anyhow::Result<()> {
    let config = super::load_config(&args.db, Overrides::default())?;
    crate::logging::init(config.log_format, "warn");
    let store = mcp_metrics_server::open_store(&config).await?;
    let parse = |v: &Option<String>, what: &str| -> anyhow::Result<Option<i64>> {
        v.as_deref()
            .map(|t| parse_time_param(t).with_context(|| format!("--{what} {t:?} is not unix ms or RFC 3339")))
            .transpose()
    };
    let (from, to) = (parse(&args.from, "from")?, parse(&args.to, "to")?);
    let started = Instant::now();
    let marked = match (from, to) {
        (None, None) => 0,
        (from, to) => {
            let (from, to) = (from.unwrap_or(0), to.unwrap_or_else(|| now_ms() + 1));
            if from >= to {
                bail!("--from must be before --to");
            }
            store.mark_range_dirty(from, to).await?
        }
    };
    let backlog: u64 = store.dirty_backlog().await?.iter().sum();
    let bar = ProgressBar::new(backlog.max(1));
    bar.set_style(
        ProgressStyle::with_template("{spinner} rollups [{bar:40}] {msg} ({elapsed})").expect("valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    let report = rollup::run_until_idle(&store, &config.retention, 100, |done, left| {
        bar.set_length(done.buckets() + left);
        bar.set_position(done.buckets());
        bar.set_message(format!(
            "{} buckets, {} samples folded, {left} waiting",
            done.buckets(),
            done.samples_folded
        ));
    })
    .await?;
    bar.finish_and_clear();
    let deleted = rollup::apply_retention(&store, &config.retention).await?;
    println!(
        "Marked {marked} minutes; recomputed {} minute, {} hour and {} day buckets from {} samples in {:.1} s.",
        report.minutes,
        report.hours,
        report.days,
        report.samples_folded,
        started.elapsed().as_secs_f64()
    );
    if report.skipped_past_retention > 0 {
        println!(
            "Left {} buckets unchanged: their inputs are past retention.",
            report.skipped_past_retention
        );
    }
    println!(
        "Retention deleted {} raw samples, {} minute, {} hour and {} day buckets.",
        deleted.raw, deleted.minute, deleted.hour, deleted.day
    );
    Ok(())
}
