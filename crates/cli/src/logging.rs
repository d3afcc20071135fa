//! Log set-up: structured lines on stderr, filtered by `RUST_LOG` (default `info` for
//! the service, `warn` for one-shot commands), as text or JSON.

use std::io::IsTerminal;

use mcp_metrics_server::config::LogFormat;
use tracing_subscriber::EnvFilter;

pub fn init(format: LogFormat, default_level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
