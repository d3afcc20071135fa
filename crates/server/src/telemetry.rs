//! The service's own metrics, exposed at `GET /metrics` in the Prometheus text format
//! (DESIGN.md §4.5).
//!
//! A small fixed set of atomics: recording on the ingest path is a few relaxed atomic
//! adds, and the exposition is written by hand, so no metrics framework sits in the hot
//! path or the dependency tree.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use mcp_metrics_core::codes::Code;

const LATENCY_BOUNDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
const SIZE_BOUNDS: &[f64] = &[
    1.0, 10.0, 100.0, 1_000.0, 5_000.0, 10_000.0, 25_000.0, 50_000.0, 100_000.0,
];

/// A cumulative histogram with fixed bucket bounds.
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum in micro-units so it can be an integer atomic.
    sum_micros: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: f64) {
        if let Some(i) = self.bounds.iter().position(|b| value <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((value * 1e6).max(0.0) as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        let sep = if labels.is_empty() { "" } else { "," };
        for (bound, bucket) in self.bounds.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(
            out,
            "{name}_sum{braces} {}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{braces} {count}");
    }
}

/// All metrics of one service instance.
pub struct Telemetry {
    pub samples_accepted: AtomicU64,
    pub duplicate_requests: AtomicU64,
    samples_rejected: Vec<AtomicU64>,
    requests_rejected: Vec<AtomicU64>,
    pub commit_duration: Histogram,
    pub commit_batch_samples: Histogram,
    pub commit_batch_requests: Histogram,
    pub commit_failures: AtomicU64,
    pub queue_capacity_samples: AtomicU64,
    pub queue_samples: AtomicU64,
    pub series_cached: AtomicU64,
    pub rollup_duration: Histogram,
    pub rollup_samples_folded: AtomicU64,
    pub rollup_buckets_written: AtomicU64,
    pub rollup_backlog: AtomicU64,
    /// 1 while this node holds the cluster-wide lock of the rollup and retention job.
    pub rollup_leader: AtomicU64,
    /// Live messages relayed from and to other nodes sharing the database.
    pub cluster_messages_received: AtomicU64,
    pub cluster_messages_sent: AtomicU64,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    /// (route, method, status) → count, and route → latency.
    http_requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    http_latency: Mutex<BTreeMap<String, std::sync::Arc<Histogram>>>,
    /// Per-sample rejections by server and code since start, for the author dashboard.
    rejected_by_server: Mutex<std::collections::HashMap<String, BTreeMap<&'static str, u64>>>,
    /// Writes refused by each server's write allowance since start, for its dashboard.
    rate_limited_by_server: Mutex<std::collections::HashMap<String, u64>>,
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry {
            samples_accepted: AtomicU64::new(0),
            duplicate_requests: AtomicU64::new(0),
            samples_rejected: Code::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
            requests_rejected: Code::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
            commit_duration: Histogram::new(LATENCY_BOUNDS),
            commit_batch_samples: Histogram::new(SIZE_BOUNDS),
            commit_batch_requests: Histogram::new(SIZE_BOUNDS),
            commit_failures: AtomicU64::new(0),
            queue_capacity_samples: AtomicU64::new(0),
            queue_samples: AtomicU64::new(0),
            series_cached: AtomicU64::new(0),
            rollup_duration: Histogram::new(LATENCY_BOUNDS),
            rollup_samples_folded: AtomicU64::new(0),
            rollup_buckets_written: AtomicU64::new(0),
            rollup_backlog: AtomicU64::new(0),
            rollup_leader: AtomicU64::new(0),
            cluster_messages_received: AtomicU64::new(0),
            cluster_messages_sent: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
            http_requests: Mutex::new(BTreeMap::new()),
            http_latency: Mutex::new(BTreeMap::new()),
            rejected_by_server: Mutex::new(std::collections::HashMap::new()),
            rate_limited_by_server: Mutex::new(std::collections::HashMap::new()),
        }
    }
}

impl Telemetry {
    /// Counts a stored request's refused samples by code, in the service's counts and in
    /// its server's; the server's map is locked once per request, not once per sample.
    pub fn samples_rejected(&self, server_id: &str, codes: impl IntoIterator<Item = Code>) {
        let mut codes = codes.into_iter().peekable();
        if codes.peek().is_none() {
            return;
        }
        let mut map = self.rejected_by_server.lock().expect("telemetry lock");
        if !map.contains_key(server_id) {
            map.insert(server_id.to_owned(), BTreeMap::new());
        }
        let of_server = map.get_mut(server_id).expect("inserted above");
        for code in codes {
            self.samples_rejected[code as usize].fetch_add(1, Ordering::Relaxed);
            *of_server.entry(code.as_str()).or_default() += 1;
        }
    }

    /// Rejected samples of one server by code, since the service started.
    pub fn rejected_of(&self, server_id: &str) -> Vec<(&'static str, u64)> {
        let map = self.rejected_by_server.lock().expect("telemetry lock");
        map.get(server_id)
            .map(|m| m.iter().map(|(k, v)| (*k, *v)).collect())
            .unwrap_or_default()
    }

    /// A write of this server refused by its write allowance (429).
    pub fn write_rate_limited(&self, server_id: &str) {
        let mut map = self.rate_limited_by_server.lock().expect("telemetry lock");
        match map.get_mut(server_id) {
            Some(n) => *n += 1,
            None => {
                map.insert(server_id.to_owned(), 1);
            }
        }
    }

    /// Forgets a deleted server's counts: one registered again under its id starts at none.
    pub fn forget_server(&self, server_id: &str) {
        self.rejected_by_server
            .lock()
            .expect("telemetry lock")
            .remove(server_id);
        self.rate_limited_by_server
            .lock()
            .expect("telemetry lock")
            .remove(server_id);
    }

    /// Writes of one server refused by its write allowance, since the service started.
    pub fn rate_limited_of(&self, server_id: &str) -> u64 {
        let map = self.rate_limited_by_server.lock().expect("telemetry lock");
        map.get(server_id).copied().unwrap_or(0)
    }

    pub fn request_rejected(&self, code: Code) {
        self.requests_rejected[code as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn rollup_pass(&self, elapsed: Duration, report: &crate::rollup::PassReport) {
        self.rollup_duration.observe(elapsed.as_secs_f64());
        self.rollup_samples_folded
            .fetch_add(report.samples_folded, Ordering::Relaxed);
        self.rollup_buckets_written
            .fetch_add(report.buckets(), Ordering::Relaxed);
    }

    pub fn http_request(&self, route: &str, method: &str, status: u16, elapsed: Duration) {
        *self
            .http_requests
            .lock()
            .expect("telemetry lock")
            .entry((route.to_owned(), method.to_owned(), status))
            .or_default() += 1;
        let histogram = self
            .http_latency
            .lock()
            .expect("telemetry lock")
            .entry(route.to_owned())
            .or_insert_with(|| std::sync::Arc::new(Histogram::new(LATENCY_BOUNDS)))
            .clone();
        histogram.observe(elapsed.as_secs_f64());
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP mcp_metrics_ingest_samples_accepted_total Samples committed to the database."
        );
        let _ = writeln!(out, "# TYPE mcp_metrics_ingest_samples_accepted_total counter");
        let _ = writeln!(
            out,
            "mcp_metrics_ingest_samples_accepted_total {}",
            load(&self.samples_accepted)
        );
        let _ = writeln!(
            out,
            "# HELP mcp_metrics_ingest_samples_rejected_total Samples refused, by code."
        );
        let _ = writeln!(out, "# TYPE mcp_metrics_ingest_samples_rejected_total counter");
        for code in Code::ALL {
            let n = load(&self.samples_rejected[code as usize]);
            if n > 0 {
                let _ = writeln!(out, "mcp_metrics_ingest_samples_rejected_total{{code=\"{code}\"}} {n}");
            }
        }
        let _ = writeln!(
            out,
            "# HELP mcp_metrics_ingest_requests_rejected_total Whole ingest requests refused, by code."
        );
        let _ = writeln!(out, "# TYPE mcp_metrics_ingest_requests_rejected_total counter");
        for code in Code::ALL {
            let n = load(&self.requests_rejected[code as usize]);
            if n > 0 {
                let _ = writeln!(out, "mcp_metrics_ingest_requests_rejected_total{{code=\"{code}\"}} {n}");
            }
        }
        let _ = writeln!(
            out,
            "# HELP mcp_metrics_ingest_duplicate_requests_total Retried requests acknowledged without storing again."
        );
        let _ = writeln!(out, "# TYPE mcp_metrics_ingest_duplicate_requests_total counter");
        let _ = writeln!(
            out,
            "mcp_metrics_ingest_duplicate_requests_total {}",
            load(&self.duplicate_requests)
        );
        let _ = writeln!(
            out,
            "# HELP mcp_metrics_ingest_queue_samples Samples waiting for the writer."
        );
        let _ = writeln!(out, "# TYPE mcp_metrics_ingest_queue_samples gauge");
        let _ = writeln!(out, "mcp_metrics_ingest_queue_samples {}", load(&self.queue_samples));
        let _ = writeln!(
            out,
            "# HELP mcp_metrics_ingest_queue_capacity_samples Queue size beyond which writes get 503."
        );
        let _ = writeln!(out, "# TYPE mcp_metrics_ingest_queue_capacity_samples gauge");
        let _ = writeln!(
            out,
            "mcp_metrics_ingest_queue_capacity_samples {}",
            load(&self.queue_capacity_samples)
        );
        let _ = writeln!(out, "# HELP mcp_metrics_series_cached Series ids held in memory.");
        let _ = writeln!(out, "# TYPE mcp_metrics_series_cached gauge");
        let _ = writeln!(out, "mcp_metrics_series_cached {}", load(&self.series_cached));
        let _ = writeln!(
            out,
            "# HELP mcp_metrics_rollup_samples_folded_total Raw samples folded into minute rollups."
        );
        let _ = writeln!(out, "# TYPE mcp_metrics_rollup_samples_folded_total counter");
        let _ = writeln!(
            out,
            "mcp_metrics_rollup_samples_folded_total {}",
            load(&self.rollup_samples_folded)
        );
        let _ = writeln!(
            out,
            "# HELP mcp_metrics_rollup_buckets_written_total Rollup buckets recomputed (minute, hour, day)."
        );
        let _ = writeln!(out, "# TYPE mcp_metrics_rollup_buckets_written_total counter");
        let _ = writeln!(
            out,
            "mcp_metrics_rollup_buckets_written_total {}",
            load(&self.rollup_buckets_written)
        );
        let _ = writeln!(
            out,
            "# HELP mcp_metrics_rollup_backlog Dirty buckets waiting for the rollup job."
        );
        let _ = writeln!(out, "# TYPE mcp_metrics_rollup_backlog gauge");
        let _ = writeln!(out, "mcp_metrics_rollup_backlog {}", load(&self.rollup_backlog));
        let _ = writeln!(
            out,
            "# HELP mcp_metrics_rollup_leader 1 while this node runs the rollup and retention job (one node of a cluster at a time)."
        );
        let _ = writeln!(out, "# TYPE mcp_metrics_rollup_leader gauge");
        let _ = writeln!(out, "mcp_metrics_rollup_leader {}", load(&self.rollup_leader));
        let _ = writeln!(
            out,
            "# HELP mcp_metrics_cluster_messages_total Live messages relayed through the database between nodes."
        );
        let _ = writeln!(out, "# TYPE mcp_metrics_cluster_messages_total counter");
        let _ = writeln!(
            out,
            "mcp_metrics_cluster_messages_total{{direction=\"sent\"}} {}",
            load(&self.cluster_messages_sent)
        );
        let _ = writeln!(
            out,
            "mcp_metrics_cluster_messages_total{{direction=\"received\"}} {}",
            load(&self.cluster_messages_received)
        );
        let _ = writeln!(
            out,
            "# HELP mcp_metrics_rollup_pass_duration_seconds Time of one rollup pass."
        );
        let _ = writeln!(out, "# TYPE mcp_metrics_rollup_pass_duration_seconds histogram");
        self.rollup_duration
            .render(&mut out, "mcp_metrics_rollup_pass_duration_seconds", "");
        let (hits, misses) = (load(&self.cache_hits), load(&self.cache_misses));
        let _ = writeln!(
            out,
            "# HELP mcp_metrics_cache_requests_total Metric-read cache lookups by result."
        );
        let _ = writeln!(out, "# TYPE mcp_metrics_cache_requests_total counter");
        let _ = writeln!(out, "mcp_metrics_cache_requests_total{{result=\"hit\"}} {hits}");
        let _ = writeln!(out, "mcp_metrics_cache_requests_total{{result=\"miss\"}} {misses}");
        let _ = writeln!(
            out,
            "# HELP mcp_metrics_cache_hit_ratio Hits over lookups of the metric-read cache since start."
        );
        let _ = writeln!(out, "# TYPE mcp_metrics_cache_hit_ratio gauge");
        let ratio = if hits + misses == 0 {
            0.0
        } else {
            hits as f64 / (hits + misses) as f64
        };
        let _ = writeln!(out, "mcp_metrics_cache_hit_ratio {ratio}");
        let _ = writeln!(
            out,
            "# HELP mcp_metrics_commit_failures_total Group commits the database refused."
        );
        let _ = writeln!(out, "# TYPE mcp_metrics_commit_failures_total counter");
        let _ = writeln!(out, "mcp_metrics_commit_failures_total {}", load(&self.commit_failures));
        let _ = writeln!(
            out,
            "# HELP mcp_metrics_commit_duration_seconds Time to commit one group of requests."
        );
        let _ = writeln!(out, "# TYPE mcp_metrics_commit_duration_seconds histogram");
        self.commit_duration
            .render(&mut out, "mcp_metrics_commit_duration_seconds", "");
        let _ = writeln!(out, "# HELP mcp_metrics_commit_batch_samples Samples per group commit.");
        let _ = writeln!(out, "# TYPE mcp_metrics_commit_batch_samples histogram");
        self.commit_batch_samples
            .render(&mut out, "mcp_metrics_commit_batch_samples", "");
        let _ = writeln!(
            out,
            "# HELP mcp_metrics_commit_batch_requests Requests per group commit."
        );
        let _ = writeln!(out, "# TYPE mcp_metrics_commit_batch_requests histogram");
        self.commit_batch_requests
            .render(&mut out, "mcp_metrics_commit_batch_requests", "");
        let _ = writeln!(
            out,
            "# HELP mcp_metrics_http_requests_total HTTP requests by route, method and status."
        );
        let _ = writeln!(out, "# TYPE mcp_metrics_http_requests_total counter");
        for ((route, method, status), n) in self.http_requests.lock().expect("telemetry lock").iter() {
            let _ = writeln!(
                out,
                "mcp_metrics_http_requests_total{{route=\"{route}\",method=\"{method}\",status=\"{status}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP mcp_metrics_http_request_duration_seconds HTTP request latency by route."
        );
        let _ = writeln!(out, "# TYPE mcp_metrics_http_request_duration_seconds histogram");
        for (route, histogram) in self.http_latency.lock().expect("telemetry lock").iter() {
            histogram.render(
                &mut out,
                "mcp_metrics_http_request_duration_seconds",
                &format!("route=\"{route}\""),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        let t = Telemetry::default();
        t.samples_accepted.fetch_add(5, Ordering::Relaxed);
        t.samples_rejected("s1", [Code::TooOld, Code::TooOld, Code::InvalidName]);
        assert_eq!(t.rejected_of("s1"), vec![("invalid_name", 1), ("too_old", 2)]);
        t.request_rejected(Code::InvalidSignature);
        t.commit_duration.observe(0.003);
        t.http_request("/api/v1/metrics", "POST", 200, Duration::from_millis(2));
        let text = t.render();
        assert!(text.contains("mcp_metrics_ingest_samples_accepted_total 5\n"));
        assert!(text.contains("mcp_metrics_ingest_samples_rejected_total{code=\"too_old\"} 2\n"));
        assert!(text.contains("mcp_metrics_ingest_requests_rejected_total{code=\"invalid_signature\"} 1\n"));
        assert!(text.contains("mcp_metrics_commit_duration_seconds_bucket{le=\"0.0025\"} 0\n"));
        assert!(text.contains("mcp_metrics_commit_duration_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(text.contains("mcp_metrics_commit_duration_seconds_count 1\n"));
        assert!(
            text.contains(
                "mcp_metrics_http_requests_total{route=\"/api/v1/metrics\",method=\"POST\",status=\"200\"} 1\n"
            )
        );
        assert!(
            text.contains(
                "mcp_metrics_http_request_duration_seconds_bucket{route=\"/api/v1/metrics\",le=\"+Inf\"} 1\n"
            )
        );
    }
}
