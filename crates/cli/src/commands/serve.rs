//! `mcp-metrics serve`: binds the listener, installs signal handlers and runs the
//! service until SIGTERM or Ctrl-C, then drains queued writes.

use anyhow::Context;
use mcp_metrics_server::RunOptions;
use mcp_metrics_server::config::Overrides;

use crate::cli::ServeArgs;

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = super::load_config(
        &args.db,
        Overrides {
            listen: args.listen,
            database: None,
        },
    )?;
    crate::logging::init(config.log_format, "info");
    let listener = tokio::net::TcpListener::bind(config.listen).await.with_context(|| {
        format!(
            "cannot listen on {}: is another process using it? Choose another with --listen",
            config.listen
        )
    })?;
    mcp_metrics_server::run(
        config,
        listener,
        shutdown_signal(),
        RunOptions {
            demo: args.demo,
            ..RunOptions::default()
        },
    )
    .await
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!("shutdown requested");
}
