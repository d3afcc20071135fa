//! One module per command. Commands that work on the database directly (migrate,
//! servers, keys) load the same layered configuration as `serve`.

mod admin;
mod aggregate;
mod bench;
mod copy;
mod push;
mod serve;

use mcp_metrics_server::config::{Config, Overrides};

use crate::cli::{Cli, Command, DatabaseArgs};

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve::run(args).await,
        Command::Migrate(db) => admin::migrate(db).await,
        Command::Servers(cmd) => admin::servers(cmd).await,
        Command::Keys(cmd) => admin::keys(cmd).await,
        Command::Aggregate(args) => aggregate::run(args).await,
        Command::Push(args) => push::run(args).await,
        Command::Bench(args) => bench::run(args).await,
        Command::Copy(args) => copy::run(args).await,
    }
}

/// The layered configuration with `--database`/`--config` applied.
pub fn load_config(db: &DatabaseArgs, overrides: Overrides) -> anyhow::Result<Config> {
    let overrides = Overrides {
        database: db.database.clone().or(overrides.database),
        ..overrides
    };
    Config::load(db.config.as_deref(), |k| std::env::var(k).ok(), &overrides)
}
