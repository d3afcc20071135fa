//! The command-line interface (DESIGN.md §4.6). Every flag's help says what it is for;
//! `mcp-metrics --help` and `mcp-metrics COMMAND --help` are the reference.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "mcp-metrics",
    version,
    about = "Self-hosted real-time metrics for directories of MCP servers.",
    long_about = "Self-hosted real-time metrics for directories of MCP servers.\n\n\
        Server authors push signed metrics; the service stores them durably and serves them \
        back. Start with `mcp-metrics serve --demo`, then open http://127.0.0.1:8080/api/v1/servers.",
    after_help = "Configuration is layered: defaults, then the TOML file (--config or MCP_METRICS_CONFIG), \
        then MCP_METRICS_* environment variables, then flags."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Clone, Default)]
pub struct DatabaseArgs {
    /// Database URL, e.g. sqlite://mcp-metrics.db [env: MCP_METRICS_DATABASE]
    #[arg(long)]
    pub database: Option<String>,
    /// TOML configuration file [env: MCP_METRICS_CONFIG]
    #[arg(long)]
    pub config: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the HTTP service.
    Serve(ServeArgs),
    /// Apply database migrations and report the schema version.
    Migrate(DatabaseArgs),
    /// Register, list and remove MCP servers.
    #[command(subcommand)]
    Servers(ServersCommand),
    /// Issue, list and revoke author credentials.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Recompute rollups (dirty buckets, or every minute in --from..--to) and apply retention.
    Aggregate(AggregateArgs),
    /// Sign and send metric samples to a running service.
    Push(PushArgs),
    /// Load-test a running service with pre-built signed batches.
    Bench(BenchArgs),
    /// Copy a SQLite database into PostgreSQL, to move the service to several nodes.
    #[command(
        long_about = "Copy a SQLite database into PostgreSQL, to move the service to several nodes.\n\n\
        Everything is copied with its ids: servers, credentials (API key hashes and sealed signing \
        secrets), series, raw samples, minute/hour/day rollups and pending rollup marks, events, \
        usage figures and salts, and replay-protection records. The SQLite file is only read.\n\n\
        The copy is resumable: raw samples go in time-ordered chunks, each committed with a checkpoint \
        in the destination, and the other tables are inserted idempotently. If it stops (network, \
        Ctrl-C), run the same command again: it continues after the last committed chunk. A run \
        after a complete copy adds nothing.\n\n\
        The destination must be an empty database (the schema is created) or a previous copy of \
        the same SQLite file; anything else is refused, since merging two services' data would \
        mix up their ids.\n\n\
        Stop the service before copying: rows written after the copy began may be left out, even by a \
        rerun.",
        after_help = "Signing secrets stay sealed with the SQLite service's master key, which lives in \
        <database file>.master-key (unless MCP_METRICS_MASTER_KEY was set). Every PostgreSQL node needs \
        that key as MCP_METRICS_MASTER_KEY; the command prints where it is when done.\n\n\
        Example:\n  mcp-metrics copy --from sqlite://mcp-metrics.db --to postgres://mcp@db.internal/metrics"
    )]
    Copy(CopyArgs),
}

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on [env: MCP_METRICS_LISTEN] [default: 127.0.0.1:8080]
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    #[command(flatten)]
    pub db: DatabaseArgs,
    /// Register demo servers and feed them live signed traffic.
    #[arg(long)]
    pub demo: bool,
}

#[derive(Subcommand)]
pub enum ServersCommand {
    /// Register a server.
    Add(ServerAddArgs),
    /// List registered servers.
    List {
        #[command(flatten)]
        db: DatabaseArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove a server with its credentials, samples and events.
    Remove {
        /// Server id.
        id: String,
        #[command(flatten)]
        db: DatabaseArgs,
    },
}

#[derive(Args)]
pub struct ServerAddArgs {
    /// Server id: [a-z0-9][a-z0-9._-]{0,63}
    pub id: String,
    /// Display name.
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long)]
    pub description: Option<String>,
    /// Official MCP Registry name, e.g. io.github.owner/name
    #[arg(long)]
    pub registry_name: Option<String>,
    #[arg(long)]
    pub repository_url: Option<String>,
    /// Streamable-HTTP endpoint that may be probed.
    #[arg(long)]
    pub remote_url: Option<String>,
    #[arg(long)]
    pub owner: Option<String>,
    #[command(flatten)]
    pub db: DatabaseArgs,
}

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Issue a credential for a server; its secrets are printed once.
    Issue {
        /// Server id.
        #[arg(long)]
        server: String,
        /// Print JSON (for scripts).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// List credentials (never their secrets).
    List {
        /// Only this server's credentials.
        #[arg(long)]
        server: Option<String>,
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// Revoke a credential.
    Revoke {
        #[arg(long)]
        server: String,
        /// The key_id to revoke.
        key_id: String,
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// Re-seal every signing secret under a new master key.
    RotateMaster {
        /// The new key as 64 hex characters; generated when omitted.
        #[arg(long, env = "MCP_METRICS_NEW_MASTER_KEY", hide_env_values = true)]
        new_key: Option<String>,
        #[command(flatten)]
        db: DatabaseArgs,
    },
}

#[derive(Args)]
pub struct AggregateArgs {
    /// Recompute every minute with raw samples from this time (unix ms or RFC 3339).
    #[arg(long)]
    pub from: Option<String>,
    /// ... up to this time (exclusive); defaults to now when --from is given.
    #[arg(long)]
    pub to: Option<String>,
    #[command(flatten)]
    pub db: DatabaseArgs,
}

#[derive(Args)]
pub struct CopyArgs {
    /// The SQLite database to copy: sqlite://PATH or a plain path.
    #[arg(long, value_name = "SQLITE")]
    pub from: String,
    /// The PostgreSQL database to copy into: postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE.
    /// It must exist; it must be empty or hold an earlier copy of the same file.
    #[arg(long, value_name = "POSTGRES_URL")]
    pub to: String,
}

#[derive(Args)]
pub struct PushArgs {
    /// Server id the samples belong to.
    #[arg(long)]
    pub server: String,
    /// API key of that server.
    #[arg(long, env = "MCP_METRICS_API_KEY", hide_env_values = true)]
    pub key: String,
    /// Signing secret of that key.
    #[arg(long, env = "MCP_METRICS_SIGNING_SECRET", hide_env_values = true)]
    pub secret: String,
    /// Base URL of the service.
    #[arg(long, env = "MCP_METRICS_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Metric type of every sample: gauge, counter or histogram.
    #[arg(long = "type", default_value = "gauge")]
    pub kind: String,
    /// Timestamp of every sample (unix ms or RFC 3339); now when omitted.
    #[arg(long)]
    pub timestamp: Option<String>,
    /// Samples as name=value[,tag=value]..., e.g. response_time=120,tool=search
    #[arg(required = true)]
    pub samples: Vec<String>,
}

#[derive(Args)]
pub struct BenchArgs {
    /// Base URL of the service under test.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Admin token, used to create a fresh benchmark server and credential.
    #[arg(long, env = "MCP_METRICS_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Send the influx or prom-write bodies to another system's write endpoint instead,
    /// for a side-by-side comparison on the same payloads: a full URL such as
    /// VictoriaMetrics' http://127.0.0.1:8428/api/v1/write (remote-write) or
    /// http://127.0.0.1:8428/write?precision=ms (line protocol). No server or key is
    /// created; a 204 counts as stored.
    #[arg(long, value_name = "URL")]
    pub foreign_url: Option<String>,
    /// Authorization header value sent with --foreign-url, e.g. "Basic dXNlcjpwYXNz".
    #[arg(long, value_name = "VALUE")]
    pub foreign_authorization: Option<String>,
    /// Samples per request.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Concurrent connections.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Total samples to send (rounded up to whole requests).
    #[arg(long, default_value_t = 1_000_000)]
    pub samples: usize,
    /// Distinct series the samples spread over.
    #[arg(long, default_value_t = 100)]
    pub series: usize,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// What to send: signed metric batches, or usage beacons from many simulated
    /// visitors (each from its own network via X-Forwarded-For: start the service
    /// with MCP_METRICS_TRUSTED_PROXIES=127.0.0.1/32).
    #[arg(long, value_enum, default_value = "metrics")]
    pub mode: BenchMode,
    /// Usage mode: total beacons to send.
    #[arg(long, default_value_t = 200_000)]
    pub events: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchMode {
    /// Signed JSON batches to /api/v1/metrics.
    Metrics,
    /// InfluxDB line protocol to /api/v1/write.
    Influx,
    /// Prometheus remote-write to /api/v1/prom/write.
    PromWrite,
    /// OTLP/HTTP protobuf (gauge points) to /otlp/v1/metrics.
    Otlp,
    /// OTLP/HTTP protobuf delta histograms to /otlp/v1/metrics: one point per series,
    /// its observations (--batch in all) stored as histogram samples.
    OtlpHistogram,
    /// Usage beacons to /api/v1/usage.
    Usage,
}
