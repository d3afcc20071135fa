//! The per-server write allowance (DESIGN.md §4.1: 429 with `Retry-After`).
//!
//! One author's exporter gone wild should not take the shared writer from everyone
//! else, so each server may write `ingest.samples_per_second_per_server` samples a
//! second on a node, with bursts of `ingest.burst_samples_per_server`. A request is
//! charged its samples before it is validated or queued; one over the allowance is
//! refused whole and told when the allowance will hold it, so a sender's retry succeeds.
//! What is not stored (a retry acknowledged without storing, a replay, a full queue, a
//! failed commit) is given back, so neither retries nor a captured request replayed by
//! someone else use up a server's allowance.
//!
//! The allowance is GCRA (the generic cell rate algorithm): per server one number, the
//! moment its allowance will be whole again. A request costs `samples / rate` seconds of
//! it and may push that moment at most a burst's worth past now. A request larger than a
//! burst (an OTLP export that maps to many samples) is let through when the allowance is
//! whole, and the server then waits until it is paid off. `governor`, which the usage
//! beacon uses, cannot give charges back, hence this small one. Entries are made only
//! after a key was checked, so only registered servers have one; the map needs no pruning.

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::IngestConfig;

/// Admits or refuses writes by their server's recent volume.
pub struct WriteRateLimit {
    /// Samples a second; `None` when the limit is off (`samples_per_second_per_server = 0`).
    rate: Option<NonZeroU64>,
    /// How far past now a server's allowance may be spent, in ns: a burst's cost.
    burst_ns: u64,
    started: Instant,
    /// Per server: when its allowance is whole again, in ns since `started`.
    whole_at: Mutex<HashMap<String, u64>>,
}

impl WriteRateLimit {
    pub fn new(config: &IngestConfig) -> Self {
        let rate = NonZeroU64::new(config.samples_per_second_per_server.into());
        let mut limit = WriteRateLimit {
            rate,
            burst_ns: 0,
            started: Instant::now(),
            whole_at: Mutex::new(HashMap::new()),
        };
        limit.burst_ns = limit.cost_ns(config.burst_samples_per_server as usize);
        limit
    }

    /// What `samples` cost of the allowance, in ns.
    fn cost_ns(&self, samples: usize) -> u64 {
        self.rate.map_or(0, |rate| {
            let ns = samples as u128 * 1_000_000_000 / u128::from(rate.get());
            ns.min(u128::from(u64::MAX)) as u64
        })
    }

    fn now_ns(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }

    /// Charges `samples` to the server. `Err` holds how long until the allowance would
    /// hold them.
    pub fn admit(&self, server_id: &str, samples: usize) -> Result<(), Duration> {
        if self.rate.is_none() || samples == 0 {
            return Ok(());
        }
        let cost = self.cost_ns(samples);
        let now = self.now_ns();
        let mut whole_at = self.whole_at.lock().unwrap_or_else(|p| p.into_inner());
        let from = whole_at.get(server_id).map_or(now, |&t| t.max(now));
        let next = from.saturating_add(cost);
        if next - now <= self.burst_ns || from == now {
            match whole_at.get_mut(server_id) {
                Some(t) => *t = next,
                None => {
                    whole_at.insert(server_id.to_owned(), next);
                }
            }
            return Ok(());
        }
        // Within a burst: until enough has come back; larger: until the allowance is whole.
        let wait = if cost <= self.burst_ns {
            next - self.burst_ns - now
        } else {
            from - now
        };
        Err(Duration::from_nanos(wait))
    }

    /// Gives back what `samples` were charged: they were not stored.
    pub fn refund(&self, server_id: &str, samples: usize) {
        let cost = self.cost_ns(samples);
        if cost == 0 {
            return;
        }
        let mut whole_at = self.whole_at.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = whole_at.get_mut(server_id) {
            *t = t.saturating_sub(cost);
        }
    }
}

/// Whole seconds for `Retry-After`: rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(rate: u32, burst: u32) -> WriteRateLimit {
        WriteRateLimit::new(&IngestConfig {
            samples_per_second_per_server: rate,
            burst_samples_per_server: burst,
            ..IngestConfig::default()
        })
    }

    #[test]
    fn a_burst_passes_then_the_server_waits_and_others_do_not() {
        let limit = limit(10, 100);
        assert_eq!(limit.admit("a", 60), Ok(()));
        assert_eq!(limit.admit("a", 40), Ok(()));
        let wait = limit.admit("a", 5).unwrap_err();
        // Five samples at ten a second: about half a second from an empty allowance.
        assert!(
            wait > Duration::from_millis(300) && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        assert_eq!(retry_after_secs(wait), 1);
        assert_eq!(limit.admit("b", 100), Ok(()), "another server has its own allowance");
        assert_eq!(limit.admit("a", 0), Ok(()), "an empty write costs nothing");
    }

    #[test]
    fn what_was_not_stored_is_given_back() {
        let limit = limit(1, 100);
        assert_eq!(limit.admit("a", 100), Ok(()));
        assert!(limit.admit("a", 30).is_err());
        limit.refund("a", 40);
        assert_eq!(limit.admit("a", 30), Ok(()), "40 came back");
        assert!(limit.admit("a", 11).is_err(), "but not more");
        limit.refund("unknown", 10);
    }

    #[test]
    fn a_request_larger_than_a_burst_needs_a_whole_allowance_then_is_paid_off() {
        let limit = limit(100, 100);
        assert_eq!(limit.admit("a", 1), Ok(()));
        let wait = limit.admit("a", 500).unwrap_err();
        assert!(wait <= Duration::from_millis(10), "until whole again: {wait:?}");
        std::thread::sleep(wait + Duration::from_millis(1));
        assert_eq!(limit.admit("a", 500), Ok(()), "from a whole allowance");
        let wait = limit.admit("a", 1).unwrap_err();
        // 500 samples at 100 a second, less the burst of 100: about four seconds.
        assert!(
            wait > Duration::from_millis(3_900) && wait <= Duration::from_millis(4_010),
            "{wait:?}"
        );
    }

    #[test]
    fn zero_turns_the_limit_off() {
        let limit = limit(0, 0);
        for _ in 0..100 {
            assert_eq!(limit.admit("a", 1_000_000), Ok(()));
        }
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1_001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(7)), 7);
    }
}
