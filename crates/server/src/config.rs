//! Service configuration, layered: built-in defaults → optional TOML file →
//! `MCP_METRICS_*` environment variables → command-line flags (DESIGN.md §4.6).
//!
//! Loading takes the environment as a function so the layering is unit-tested without
//! touching the process environment.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, bail};
use serde::Deserialize;

/// Everything `mcp-metrics serve` can be told.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// `sqlite://PATH` (PostgreSQL comes later).
    pub database: String,
    /// Bearer token of the operator API; the API is off when unset.
    pub admin_token: Option<String>,
    /// 64 hex characters; with SQLite a key file beside the database is used when unset.
    pub master_key: Option<String>,
    /// CIDRs whose `X-Forwarded-For` header is believed.
    pub trusted_proxies: Vec<String>,
    /// `text` or `json` log lines.
    pub log_format: LogFormat,
    pub ingest: IngestConfig,
    pub retention: RetentionConfig,
    pub rollup: RollupConfig,
    pub usage: UsageConfig,
    pub live: LiveConfig,
    pub sqlite: SqliteConfig,
}

impl std::fmt::Debug for Config {
    // Secrets never reach logs, even through a debug print of the configuration.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("database", &self.database)
            .field("admin_token", &self.admin_token.as_ref().map(|_| "<set>"))
            .field("master_key", &self.master_key.as_ref().map(|_| "<set>"))
            .field("trusted_proxies", &self.trusted_proxies)
            .field("log_format", &self.log_format)
            .field("ingest", &self.ingest)
            .field("retention", &self.retention)
            .field("rollup", &self.rollup)
            .field("usage", &self.usage)
            .field("live", &self.live)
            .field("sqlite", &self.sqlite)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    /// Largest JSON request body, in bytes.
    pub max_body_bytes: usize,
    /// Most samples in one request.
    pub max_samples_per_request: usize,
    /// Samples that may wait for the writer; beyond this writes get 503.
    pub queue_capacity_samples: usize,
    /// Most samples committed in one transaction.
    pub max_batch_samples: usize,
    /// Allowed clock distance of a signature's `t`, in seconds.
    pub signature_tolerance_secs: i64,
    /// How long a signature is remembered against replays, in seconds.
    pub replay_window_secs: i64,
    /// How long a body digest is remembered to recognise retries, in seconds.
    pub retry_window_secs: i64,
    /// Samples one server may write a second on this node; beyond it (and its burst)
    /// writes get 429 with `Retry-After`. 0: no limit.
    pub samples_per_second_per_server: u32,
    /// Samples one server may write at once above its rate. A larger request is let
    /// through when the server's allowance is whole, and it then waits until it is paid off.
    pub burst_samples_per_server: u32,
    /// Most series one server may have; samples that would create more are refused
    /// (`too_many_series`) while its existing series go on. 0: no limit.
    pub max_series_per_server: u64,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            max_body_bytes: 1 << 20,
            max_samples_per_request: 10_000,
            queue_capacity_samples: 200_000,
            max_batch_samples: 50_000,
            signature_tolerance_secs: 300,
            replay_window_secs: 600,
            retry_window_secs: 600,
            samples_per_second_per_server: 100_000,
            burst_samples_per_server: 1_000_000,
            max_series_per_server: 10_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// Raw samples are kept this many days; older ones are refused at ingest.
    pub raw_days: i64,
    /// 1-minute rollups.
    pub minute_days: i64,
    /// 1-hour rollups.
    pub hour_days: i64,
    /// 1-day rollups (`server_metrics_daily`); kept forever when unset.
    pub day_days: Option<i64>,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            raw_days: 30,
            minute_days: 30,
            hour_days: 400,
            day_days: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UsageConfig {
    /// Origins allowed to send the usage beacon from a browser (`*` for any).
    pub cors_origins: Vec<String>,
    /// Usage events allowed per truncated client address per minute...
    pub rate_per_minute: u32,
    /// ... with bursts of this many.
    pub burst: u32,
    /// Days the anonymous event log is kept (daily figures are kept forever).
    pub event_days: i64,
    /// Events waiting for the database beyond which the beacon answers 503.
    pub queue_capacity: usize,
}

impl Default for UsageConfig {
    fn default() -> Self {
        UsageConfig {
            cors_origins: Vec::new(),
            rate_per_minute: 120,
            burst: 60,
            event_days: 90,
            queue_capacity: 100_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LiveConfig {
    /// Open SSE and WebSocket streams beyond which new ones get 503.
    pub max_streams: usize,
    /// Open streams one client network (an IPv4 /24 or IPv6 /48, behind trusted
    /// proxies the forwarded client's) may hold; beyond it new ones get 429.
    pub max_streams_per_client: usize,
}

impl Default for LiveConfig {
    fn default() -> Self {
        LiveConfig {
            max_streams: 10_000,
            max_streams_per_client: 100,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RollupConfig {
    /// Seconds between rollup passes: the most a new sample waits to show in its minute.
    pub interval_secs: f64,
    /// Seconds between retention runs.
    pub retention_interval_secs: u64,
}

impl Default for RollupConfig {
    fn default() -> Self {
        RollupConfig {
            interval_secs: 1.0,
            retention_interval_secs: 300,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SqliteConfig {
    /// `full` fsyncs every commit (survives power loss); `normal` survives a crash of
    /// the process but may lose the last commits on power loss.
    pub synchronous: Synchronous,
}

impl Default for SqliteConfig {
    fn default() -> Self {
        SqliteConfig {
            synchronous: Synchronous::Full,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    Full,
    Normal,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8080".parse().expect("valid default address"),
            database: "sqlite://mcp-metrics.db".into(),
            admin_token: None,
            master_key: None,
            trusted_proxies: Vec::new(),
            log_format: LogFormat::Text,
            ingest: IngestConfig::default(),
            retention: RetentionConfig::default(),
            rollup: RollupConfig::default(),
            usage: UsageConfig::default(),
            live: LiveConfig::default(),
            sqlite: SqliteConfig::default(),
        }
    }
}

/// Values given on the command line; they win over everything else.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub database: Option<String>,
}

impl Config {
    /// Builds the configuration from its layers. `file` is the `--config` path (or
    /// `MCP_METRICS_CONFIG`); `env` looks up an environment variable.
    pub fn load(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
        overrides: &Overrides,
    ) -> anyhow::Result<Config> {
        let file = file
            .map(Path::to_path_buf)
            .or_else(|| env("MCP_METRICS_CONFIG").map(Into::into));
        let mut config = match &file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read the configuration file {}", path.display()))?;
                toml::from_str(&text)
                    .with_context(|| format!("the configuration file {} is not valid", path.display()))?
            }
            None => Config::default(),
        };
        if let Some(v) = env("MCP_METRICS_LISTEN") {
            config.listen = v
                .parse()
                .with_context(|| format!("MCP_METRICS_LISTEN={v:?} is not an address like 127.0.0.1:8080"))?;
        }
        if let Some(v) = env("MCP_METRICS_DATABASE") {
            config.database = v;
        }
        if let Some(v) = env("MCP_METRICS_ADMIN_TOKEN").filter(|v| !v.is_empty()) {
            config.admin_token = Some(v);
        }
        if let Some(v) = env("MCP_METRICS_MASTER_KEY").filter(|v| !v.is_empty()) {
            config.master_key = Some(v);
        }
        if let Some(v) = env("MCP_METRICS_TRUSTED_PROXIES") {
            config.trusted_proxies = v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(Into::into)
                .collect();
        }
        if let Some(v) = env("MCP_METRICS_LOG_FORMAT") {
            config.log_format = match v.as_str() {
                "json" => LogFormat::Json,
                "text" => LogFormat::Text,
                _ => bail!("MCP_METRICS_LOG_FORMAT must be text or json, not {v:?}"),
            };
        }
        if let Some(v) = overrides.listen {
            config.listen = v;
        }
        if let Some(v) = &overrides.database {
            config.database = v.clone();
        }
        config.validate()?;
        Ok(config)
    }

    /// Refuses settings the service cannot run on, naming the setting to change.
    pub fn validate(&self) -> anyhow::Result<()> {
        if let Some(token) = &self.admin_token
            && token.len() < 16
        {
            bail!("the admin token must be at least 16 characters; make one with `openssl rand -hex 32`");
        }
        if self.ingest.max_samples_per_request == 0
            || self.ingest.queue_capacity_samples < self.ingest.max_samples_per_request
        {
            bail!("ingest.queue_capacity_samples must be at least ingest.max_samples_per_request");
        }
        let ingest = &self.ingest;
        if ingest.signature_tolerance_secs < 1 || ingest.replay_window_secs < 2 * ingest.signature_tolerance_secs {
            // A signature stays acceptable for 2 × tolerance (t − tol … t + tol): a shorter
            // replay window would let a captured request be replayed once it is forgotten.
            bail!("ingest.replay_window_secs must be at least twice ingest.signature_tolerance_secs");
        }
        if ingest.samples_per_second_per_server > 0
            && (ingest.burst_samples_per_server as usize) < ingest.max_samples_per_request
        {
            bail!(
                "ingest.burst_samples_per_server ({}) must be at least ingest.max_samples_per_request ({}): a larger request passes only from a whole allowance, and a server writing steadily could keep it waiting; or set ingest.samples_per_second_per_server = 0 to turn the limit off",
                ingest.burst_samples_per_server,
                ingest.max_samples_per_request
            );
        }
        if ingest.retry_window_secs < 1 || ingest.max_batch_samples < 1 || ingest.max_body_bytes < 1024 {
            bail!(
                "ingest.retry_window_secs and ingest.max_batch_samples must be positive, ingest.max_body_bytes at least 1024"
            );
        }
        let r = &self.retention;
        // Late samples are accepted for raw_days; their minute, hour and day must still
        // exist to be corrected, so each level lives at least as long as the one below.
        if r.minute_days < r.raw_days || r.hour_days < r.minute_days || r.day_days.is_some_and(|d| d < r.hour_days) {
            bail!(
                "retention must keep minutes at least as long as raw samples, hours at least as long as minutes, \
                 and days at least as long as hours"
            );
        }
        if !(self.rollup.interval_secs >= 0.05 && self.rollup.interval_secs <= 3600.0) {
            bail!("rollup.interval_secs must be between 0.05 and 3600");
        }
        if !(1..=1_000_000).contains(&self.live.max_streams) {
            bail!("live.max_streams must be between 1 and 1000000");
        }
        if !(1..=1_000_000).contains(&self.live.max_streams_per_client) {
            bail!("live.max_streams_per_client must be between 1 and 1000000");
        }
        for cidr in &self.trusted_proxies {
            if mcp_metrics_core::usage::Cidr::parse(cidr).is_none() {
                bail!("trusted proxy {cidr:?} is not an address or CIDR such as 10.0.0.0/8");
            }
        }
        if self.usage.rate_per_minute == 0
            || self.usage.burst == 0
            || self.usage.event_days < 1
            || self.usage.queue_capacity == 0
        {
            bail!("usage.rate_per_minute, usage.burst, usage.event_days and usage.queue_capacity must be positive");
        }
        if self.retention.raw_days < 1 {
            bail!("retention.raw_days must be at least 1");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn defaults() {
        let c = Config::load(None, env(&[]), &Overrides::default()).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.database, "sqlite://mcp-metrics.db");
        assert!(c.admin_token.is_none());
    }

    #[test]
    fn layers_apply_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:9000\"\ndatabase = \"sqlite://file.db\"\n[ingest]\nmax_samples_per_request = 500\n",
        )
        .unwrap();
        let c = Config::load(Some(&file), env(&[]), &Overrides::default()).unwrap();
        assert_eq!((c.listen.port(), c.database.as_str()), (9000, "sqlite://file.db"));
        assert_eq!(c.ingest.max_samples_per_request, 500);

        let e = env(&[
            ("MCP_METRICS_DATABASE", "sqlite://env.db"),
            ("MCP_METRICS_LISTEN", "127.0.0.1:9001"),
        ]);
        let c = Config::load(Some(&file), e, &Overrides::default()).unwrap();
        assert_eq!((c.listen.port(), c.database.as_str()), (9001, "sqlite://env.db"));

        let e = env(&[
            ("MCP_METRICS_DATABASE", "sqlite://env.db"),
            ("MCP_METRICS_CONFIG", file.to_str().unwrap()),
        ]);
        let flags = Overrides {
            listen: None,
            database: Some("sqlite://flag.db".into()),
        };
        let c = Config::load(None, e, &flags).unwrap();
        assert_eq!((c.listen.port(), c.database.as_str()), (9000, "sqlite://flag.db"));
    }

    #[test]
    fn bad_values_are_explained() {
        let err = Config::load(None, env(&[("MCP_METRICS_LISTEN", "nope")]), &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("MCP_METRICS_LISTEN"));
        let err = Config::load(
            None,
            env(&[("MCP_METRICS_ADMIN_TOKEN", "short")]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("admin token"));
    }

    #[test]
    fn a_burst_below_a_full_request_is_refused_unless_the_limit_is_off() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        let limits = "[ingest]\nmax_samples_per_request = 5000\nburst_samples_per_server = 4000\n";
        std::fs::write(&file, limits).unwrap();
        let err = Config::load(Some(&file), env(&[]), &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("burst_samples_per_server (4000)"), "{err}");
        std::fs::write(&file, format!("{limits}samples_per_second_per_server = 0\n")).unwrap();
        assert!(Config::load(Some(&file), env(&[]), &Overrides::default()).is_ok());
    }

    #[test]
    fn debug_hides_secrets() {
        let e = env(&[
            ("MCP_METRICS_ADMIN_TOKEN", "super-secret-admin-token"),
            ("MCP_METRICS_MASTER_KEY", "ab"),
        ]);
        let c = Config::load(None, e, &Overrides::default()).unwrap();
        let text = format!("{c:?}");
        assert!(!text.contains("super-secret-admin-token"));
        assert!(!text.contains("\"ab\""));
    }
}
