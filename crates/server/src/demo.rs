//! `serve --demo`: a handful of demo MCP servers fed with realistic traffic through the
//! real signed HTTP endpoint, so a new user sees data flow at once (DESIGN.md §7).
//!
//! Each demo server has its own latency profile (log-normal, with a heavy tail for some),
//! a daily rhythm, occasional error bursts, per-tool latency histograms, cumulative
//! request/error/tool-call counters and an active-session gauge.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use mcp_metrics_core::model::ServerFields;
use mcp_metrics_core::signature::sign;
use mcp_metrics_core::time::now_ms;
use mcp_metrics_store::StoreError;
use serde_json::{Value, json};

use crate::keyring::{self, IssuedCredential};
use crate::state::AppState;

/// A small deterministic PRNG (SplitMix64): the demo needs plausible noise, not secrecy.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(f64::MIN_POSITIVE);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// Log-normal with the given median and shape.
    pub fn log_normal(&mut self, median: f64, sigma: f64) -> f64 {
        median * (sigma * self.normal()).exp()
    }
}

struct Profile {
    id: &'static str,
    name: &'static str,
    description: &'static str,
    tools: &'static [&'static str],
    median_ms: f64,
    sigma: f64,
    requests_per_sec: f64,
    error_rate: f64,
}

const PROFILES: &[Profile] = &[
    Profile {
        id: "acme-search",
        name: "Acme Search",
        description: "Web search and page fetching for agents.",
        tools: &["search", "fetch_page"],
        median_ms: 45.0,
        sigma: 0.45,
        requests_per_sec: 18.0,
        error_rate: 0.004,
    },
    Profile {
        id: "github-tools",
        name: "GitHub Tools",
        description: "Issues, pull requests and files from GitHub repositories.",
        tools: &["list_issues", "create_pull_request", "get_file"],
        median_ms: 140.0,
        sigma: 0.6,
        requests_per_sec: 9.0,
        error_rate: 0.01,
    },
    Profile {
        id: "postgres-explorer",
        name: "Postgres Explorer",
        description: "Read-only SQL over PostgreSQL databases.",
        tools: &["query", "describe_table", "list_tables"],
        median_ms: 22.0,
        sigma: 0.5,
        requests_per_sec: 12.0,
        error_rate: 0.006,
    },
    Profile {
        id: "weather-now",
        name: "Weather Now",
        description: "Forecasts and severe-weather alerts.",
        tools: &["forecast", "alerts"],
        median_ms: 310.0,
        sigma: 0.35,
        requests_per_sec: 4.0,
        error_rate: 0.03,
    },
    Profile {
        id: "docs-rag",
        name: "Docs RAG",
        description: "Retrieval-augmented answers over product documentation.",
        tools: &["retrieve", "answer"],
        median_ms: 780.0,
        sigma: 0.8,
        requests_per_sec: 3.0,
        error_rate: 0.012,
    },
];

struct DemoServer {
    profile: &'static Profile,
    credential: IssuedCredential,
    requests_total: f64,
    errors_total: f64,
    tool_calls: BTreeMap<&'static str, f64>,
    sessions: f64,
}

/// Registers the demo servers (idempotently) and gives each a fresh credential,
/// revoking the ones earlier demo runs issued.
async fn prepare(state: &AppState) -> anyhow::Result<Vec<DemoServer>> {
    let mut servers = Vec::new();
    for profile in PROFILES {
        let fields = ServerFields {
            registry_name: Some(format!("io.github.mcp-metrics-demo/{}", profile.id)),
            name: Some(profile.name.into()),
            description: Some(profile.description.into()),
            repository_url: Some(format!("https://github.com/mcp-metrics-demo/{}", profile.id)),
            remote_url: None,
            owner: Some("mcp-metrics demo".into()),
        };
        match state.store.create_server(profile.id, &fields, now_ms()).await {
            Ok(_) | Err(StoreError::Conflict) => {}
            Err(e) => return Err(e).context("cannot register the demo servers"),
        }
        for old in state.store.list_credentials(Some(profile.id)).await? {
            if old.revoked_at.is_none() {
                state.store.revoke_credential(profile.id, &old.key_id, now_ms()).await?;
            }
        }
        let credential = keyring::issue_credential(state.store.as_ref(), &state.master_key, profile.id).await?;
        servers.push(DemoServer {
            profile,
            credential,
            requests_total: 0.0,
            errors_total: 0.0,
            tool_calls: profile.tools.iter().map(|t| (*t, 0.0)).collect(),
            sessions: 3.0,
        });
    }
    Ok(servers)
}

/// `seconds` of traffic for one server ending at `now`, as a JSON batch. Counters
/// advance by the whole span; latency is sampled (at most 60 observations per batch),
/// so a backfill of a day stays small.
fn tick(server: &mut DemoServer, rng: &mut Rng, now: i64, seconds: f64) -> Value {
    let p = server.profile;
    let hour = (now / 3_600_000 % 24) as f64;
    let daily = 1.0 + 0.5 * ((hour - 15.0) / 24.0 * std::f64::consts::TAU).cos();
    let burst = rng.uniform() < 0.01;
    let rate = (p.requests_per_sec * daily * (0.8 + 0.4 * rng.uniform())).max(0.0);
    let total = (rate * seconds).round();
    let count = (total as usize).min(60);
    let span_ms = (seconds * 1000.0) as i64;
    let mut metrics = Vec::with_capacity(count + p.tools.len() + 3);
    let mut errors = 0.0;
    for i in 0..count {
        let tool = p.tools[rng.next_u64() as usize % p.tools.len()];
        let mut latency = rng.log_normal(p.median_ms, p.sigma);
        if burst {
            latency *= 3.0;
        }
        let ts = now - span_ms + (i as i64 * span_ms / count.max(1) as i64);
        metrics.push(json!({"name":"response_time","type":"histogram","value":(latency * 10.0).round() / 10.0,"timestamp":ts,"tags":{"tool":tool}}));
        *server.tool_calls.get_mut(tool).expect("known tool") += total / count as f64;
        if rng.uniform() < if burst { p.error_rate * 10.0 } else { p.error_rate } {
            errors += total / count as f64;
        }
    }
    errors = errors.round();
    server.requests_total += total;
    server.errors_total += errors;
    server.sessions = (server.sessions + rng.normal()).clamp(0.0, 40.0 * daily);
    metrics.push(json!({"name":"requests","type":"counter","value":server.requests_total,"timestamp":now}));
    metrics.push(json!({"name":"errors","type":"counter","value":server.errors_total,"timestamp":now}));
    for (tool, total) in &server.tool_calls {
        metrics.push(json!({"name":"tool_calls","type":"counter","value":total,"timestamp":now,"tags":{"tool":tool}}));
    }
    metrics.push(json!({"name":"active_sessions","type":"gauge","value":server.sessions.round(),"timestamp":now}));
    json!({ "server_id": p.id, "metrics": metrics })
}

/// Feeds the demo servers until the task is dropped.
pub async fn run(state: AppState, base_url: String) -> anyhow::Result<()> {
    let mut servers = prepare(&state).await?;
    tracing::info!(servers = servers.len(), url = %base_url, "demo traffic started");
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
    let url = format!("{base_url}/api/v1/metrics");
    let mut rng = Rng::new(now_ms() as u64);
    // A day of history first (one batch per 5 minutes), so every chart has data at once;
    // only for demo servers without data, so restarting the demo does not double it.
    let mut fresh = Vec::new();
    for server in &servers {
        fresh.push(state.store.series_of_server(server.profile.id, None).await?.is_empty());
    }
    let now = now_ms();
    for step in (1..=288).rev() {
        let at = now - step * 300_000;
        for (server, _) in servers.iter_mut().zip(&fresh).filter(|(_, fresh)| **fresh) {
            let body = tick(server, &mut rng, at, 300.0).to_string();
            send(&client, &url, &server.credential, body).await;
        }
    }
    tracing::info!("demo backfilled the last 24 hours");
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let now = now_ms();
        for server in &mut servers {
            let body = tick(server, &mut rng, now, 1.0).to_string();
            send(&client, &url, &server.credential, body).await;
        }
    }
}

/// Signs and posts one batch; failures are logged, the demo goes on.
async fn send(client: &reqwest::Client, url: &str, credential: &IssuedCredential, body: String) {
    let signature = sign(credential.signing_secret.as_bytes(), now_ms() / 1000, body.as_bytes());
    let sent = client
        .post(url)
        .header("content-type", "application/json")
        .header("x-api-key", &credential.api_key)
        .header("x-signature", signature)
        .body(body)
        .send()
        .await;
    match sent {
        Ok(r) if r.status().is_success() => {}
        Ok(r) => tracing::warn!(server = %credential.server_id, status = %r.status(), "demo batch refused"),
        Err(e) => tracing::warn!(server = %credential.server_id, error = %e, "demo batch not sent"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_deterministic_and_uniform_enough() {
        let mut a = Rng::new(1);
        let mut b = Rng::new(1);
        assert_eq!(a.next_u64(), b.next_u64());
        let mean: f64 = (0..10_000).map(|_| a.uniform()).sum::<f64>() / 10_000.0;
        assert!((mean - 0.5).abs() < 0.02, "{mean}");
        let mut medians: Vec<f64> = (0..10_001).map(|_| a.log_normal(100.0, 0.5)).collect();
        medians.sort_by(f64::total_cmp);
        assert!((medians[5000] - 100.0).abs() < 5.0, "{}", medians[5000]);
    }
}
