//! The mcp-metrics service: HTTP API, ingest pipeline and background tasks.
//!
//! [`run`] starts the whole service on a listener the caller has bound and stops it when
//! the `shutdown` future completes, so tests start it on port 0 with a fresh database
//! and talk to it over real HTTP, exactly as the binary does.

pub mod cache;
pub mod charts;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod http;
pub mod ingest;
pub mod key_cache;
pub mod keyring;
pub mod live;
pub mod rollup;
pub mod state;
pub mod telemetry;
pub mod usage;
pub mod web;

use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use mcp_metrics_core::time::now_ms;
use mcp_metrics_store::{Store, StoreOptions};
use tokio::net::TcpListener;

use cache::ReadCache;
use config::{Config, Synchronous};
use ingest::series_cache::SeriesCache;
use state::{AppState, Shared};
use telemetry::Telemetry;

/// How long in-flight requests may take to finish after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Optional behaviour of [`run`].
#[derive(Clone, Default)]
pub struct RunOptions {
    /// Register demo servers and feed them traffic.
    pub demo: bool,
    /// The clock of usage days and salts; the system clock when `None` (tests move it).
    pub clock: Option<Arc<dyn clock::Clock>>,
}

/// Installs the TLS crypto provider the HTTP client uses (ring). Idempotent.
/// ring builds far faster than aws-lc and is only needed for `https://` pushes; its
/// lack of post-quantum key exchange is what the deprecation note is about.
#[allow(deprecated)]
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Opens the database named in the configuration, running migrations.
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    let options = StoreOptions {
        durable_fsync: config.sqlite.synchronous == Synchronous::Full,
        ..Default::default()
    };
    mcp_metrics_store::open(&config.database, &options)
        .await
        .with_context(|| format!("cannot open the database {}", config.database))
}

/// Runs the service until `shutdown` completes, then stops accepting connections,
/// finishes in-flight requests, commits queued writes and returns.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    options: RunOptions,
) -> anyhow::Result<()> {
    install_crypto_provider();
    // `Config::load` validates too; this covers a config built in code (embedders, the
    // integration tests), so nothing runs on settings the service would refuse.
    config.validate()?;
    let store = open_store(&config).await?;
    let master_key = keyring::load_master_key(config.master_key.as_deref(), &config.database, store.as_ref()).await?;
    let telemetry = Arc::new(Telemetry::default());
    let series = SeriesCache::default();
    let known = store.all_series().await.context("cannot load the series index")?;
    series.insert_all(&known);
    telemetry
        .series_cached
        .store(known.len() as u64, std::sync::atomic::Ordering::Relaxed);

    let (queue, writer) = ingest::writer::start(store.clone(), telemetry.clone(), &config.ingest);
    let live = Arc::new(live::LiveHub::new(
        config.live.max_streams,
        config.live.max_streams_per_client,
    ));
    let clock: Arc<dyn clock::Clock> = options.clock.clone().unwrap_or_else(|| Arc::new(clock::SystemClock));
    let (usage, usage_writer) = usage::UsageService::start(
        store.clone(),
        clock.clone(),
        &config.usage,
        &config.trusted_proxies,
        live.clone(),
    );
    let write_rate = ingest::rate_limit::WriteRateLimit::new(&config.ingest);
    let state = AppState::new(Shared {
        store: store.clone(),
        config,
        master_key,
        queue,
        series,
        telemetry: telemetry.clone(),
        cache: ReadCache::new(10_000),
        usage,
        clock,
        live: live.clone(),
        known_servers: moka::sync::Cache::builder()
            .max_capacity(100_000)
            .time_to_live(Duration::from_secs(30))
            .build(),
        credentials: key_cache::KeyCache::new(10_000, key_cache::CREDENTIAL_TTL),
        otlp_exports: Default::default(),
        write_rate,
    });

    let address = listener.local_addr()?;
    let mut background = cluster::start(state.clone())
        .await
        .context("cannot listen for other nodes' messages on the database")?;
    background.push(tokio::spawn(housekeeping(store.clone())));
    let job_state = state.clone();
    background.push(tokio::spawn(rollup::run_job(
        store.clone(),
        state.config.retention.clone(),
        Duration::from_secs_f64(state.config.rollup.interval_secs),
        Duration::from_secs(state.config.rollup.retention_interval_secs),
        telemetry,
        move |changes| {
            for (server, names) in changes {
                job_state.cache.invalidate_server(server);
                let data = serde_json::json!({ "names": names });
                job_state
                    .live
                    .publish(server, live::LiveMessage { kind: "metric", data });
            }
        },
    )));
    if options.demo {
        let host = if address.ip().is_unspecified() {
            "127.0.0.1".to_string()
        } else {
            address.ip().to_string()
        };
        let base = if address.is_ipv6() && host != "127.0.0.1" {
            format!("http://[{host}]:{}", address.port())
        } else {
            format!("http://{host}:{}", address.port())
        };
        let demo_state = state.clone();
        background.push(tokio::spawn(async move {
            if let Err(e) = demo::run(demo_state, base).await {
                tracing::error!(error = format!("{e:#}"), "demo traffic stopped");
            }
        }));
    }

    tracing::info!(%address, database = store.backend(), "mcp-metrics is listening");
    let app = http::router(state);
    // One shutdown signal feeds both the graceful stop and its deadline: a client that
    // keeps a connection open must not keep the process (and the queued writes) hostage.
    let (signal, signalled) = tokio::sync::watch::channel(false);
    let live_at_stop = live.clone();
    tokio::spawn(async move {
        shutdown.await;
        live_at_stop.close();
        let _ = signal.send(true);
    });
    let mut graceful = signalled.clone();
    let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
    let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
        let _ = graceful.wait_for(|stop| *stop).await;
    });
    let mut deadline = signalled;
    tokio::select! {
        served = serve.into_future() => served.context("the HTTP server failed")?,
        _ = async move {
            let _ = deadline.wait_for(|stop| *stop).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => tracing::warn!(seconds = SHUTDOWN_GRACE.as_secs(), "connections still open at the shutdown deadline; stopping anyway"),
    }
    for task in &background {
        task.abort();
    }
    tracing::info!("no more requests; committing queued writes");
    writer.drain_and_stop().await;
    usage_writer.drain_and_stop().await;
    tracing::info!("stopped");
    Ok(())
}

/// Periodic upkeep that needs no coordination: forgetting expired replay and retry
/// guards.
async fn housekeeping(store: Arc<dyn Store>) {
    let mut ticker = tokio::time::interval(Duration::from_secs(60));
    loop {
        ticker.tick().await;
        match store.purge_request_guards(now_ms()).await {
            Ok(n) if n > 0 => tracing::debug!(purged = n, "expired request guards removed"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not purge request guards"),
        }
    }
}
