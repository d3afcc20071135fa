//! The per-server write allowance (DESIGN.md §4.1: 429 with `Retry-After`).
//!
//! One author's exporter gone wild should not take the shared writer from everyone
//! else, so each server may write `ingest.samples_per_second_per_server` samples a
//! second on a node, with bursts of `ingest.burst_samples_per_server`. A request is
//! charged its samples before it is validated or queued; one over the allowance is
//! refused whole and told when the allowance will hold it, so a sender's retry succeeds.
//! A request the writer does not store (a retry acknowledged without storing, a replay,
//! a full queue, a failed commit) is given back once it is answered, so retries, and a
//! captured request replayed by someone else, do not use up a server's allowance over
//! time. Samples refused one by one (invalid, or past the series limit) stay charged:
//! the request was taken in.
//!
//! The allowance is GCRA (the generic cell rate algorithm): per server one number, the
//! moment its allowance will be whole again. A request costs `samples / rate` seconds of
//! it and may push that moment at most a burst's worth past now. A request larger than a
//! burst (an OTLP export that maps to many samples) is let through when the allowance is
//! whole, and the server then waits until it is paid off (a server that keeps writing
//! small requests meanwhile can keep such a request waiting: keep the burst above the
//! largest request, as the defaults do). `governor`, which the usage
//! beacon uses, cannot give charges back, hence this small one. Entries are made only
//! after a key was checked, so only registered servers have one, and a deleted server's
//! goes with it; the map needs no other pruning.

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
        WriteRateLimit {
            rate,
            burst_ns: cost_ns(rate, config.burst_samples_per_server as usize),
            started: Instant::now(),
            whole_at: Mutex::new(HashMap::new()),
        }
    }

    fn cost_ns(&self, samples: usize) -> u64 {
        cost_ns(self.rate, samples)
    }

    /// Forgets a deleted server's allowance: one registered again under its id starts whole.
    pub fn forget(&self, server_id: &str) {
        self.whole_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(server_id);
    }

    fn now_ns(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }

    /// Charges `samples` to the server. `Err` holds how long until the allowance would
    /// hold them.
    pub fn admit(&self, server_id: &str, samples: usize) -> Result<Charge, Duration> {
        if self.rate.is_none() || samples == 0 {
            return Ok(Charge::default());
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
            return Ok(Charge { until: next });
        }
        // Within a burst: until enough has come back; larger: until the allowance is whole.
        let wait = if cost <= self.burst_ns {
            next - self.burst_ns - now
        } else {
            from - now
        };
        Err(Duration::from_nanos(wait))
    }

    /// Gives back what `samples` of a charge cost: they were not stored. Only what the
    /// charge still holds comes back: once the allowance has recovered past it, later
    /// requests spend the allowance, and giving more back would let them spend it twice.
    pub fn refund(&self, server_id: &str, charge: Charge, samples: usize) {
        let back = self.cost_ns(samples).min(charge.until.saturating_sub(self.now_ns()));
        if back == 0 {
            return;
        }
        let mut whole_at = self.whole_at.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = whole_at.get_mut(server_id) {
            *t = t.saturating_sub(back);
        }
    }
}

/// What a request was charged, for [`WriteRateLimit::refund`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Charge {
    /// When the allowance will have recovered from this charge (ns since start); nothing
    /// of it is left to give back after that.
    until: u64,
}

/// What `samples` cost of an allowance of `rate` samples a second, in ns (0 without a
/// rate). Rounded up: no write is free, however high the rate.
fn cost_ns(rate: Option<NonZeroU64>, samples: usize) -> u64 {
    rate.map_or(0, |rate| {
        let ns = (samples as u128 * 1_000_000_000).div_ceil(u128::from(rate.get()));
        ns.min(u128::from(u64::MAX)) as u64
    })
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
        assert!(limit.admit("a", 60).is_ok());
        assert!(limit.admit("a", 40).is_ok());
        let wait = limit.admit("a", 5).unwrap_err();
        // Five samples at ten a second: about half a second from an empty allowance.
        assert!(
            wait > Duration::from_millis(300) && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        assert_eq!(retry_after_secs(wait), 1);
        assert!(limit.admit("b", 100).is_ok(), "another server has its own allowance");
        assert!(limit.admit("a", 0).is_ok(), "an empty write costs nothing");
    }

    #[test]
    fn what_was_not_stored_is_given_back() {
        let limit = limit(1, 100);
        let charge = limit.admit("a", 100).unwrap();
        assert!(limit.admit("a", 30).is_err());
        limit.refund("a", charge, 40);
        assert!(limit.admit("a", 30).is_ok(), "40 came back");
        assert!(limit.admit("a", 11).is_err(), "but not more");
        limit.refund("unknown", charge, 10);
    }

    #[test]
    fn a_charge_the_allowance_has_recovered_from_gives_nothing_back() {
        // 100 a second with bursts of 100: a charge of 50 is recovered from in 0.5 s.
        let limit = limit(100, 100);
        let early = limit.admit("a", 50).unwrap();
        std::thread::sleep(Duration::from_millis(600));
        assert!(limit.admit("a", 100).is_ok(), "a whole burst");
        // Giving the early 50 back now would let 40 more through at once.
        limit.refund("a", early, 50);
        assert!(
            limit.admit("a", 40).is_err(),
            "the late refund did not add to the burst"
        );
    }

    #[test]
    fn no_write_is_free() {
        let limit = limit(u32::MAX, 1);
        assert_eq!(limit.cost_ns(1), 1, "rounded up, not down to nothing");
        assert_eq!(limit.cost_ns(5), 2);
    }

    #[test]
    fn a_request_larger_than_a_burst_needs_a_whole_allowance_then_is_paid_off() {
        let limit = limit(100, 100);
        assert!(limit.admit("a", 1).is_ok());
        let wait = limit.admit("a", 500).unwrap_err();
        assert!(wait <= Duration::from_millis(10), "until whole again: {wait:?}");
        std::thread::sleep(wait + Duration::from_millis(1));
        assert!(limit.admit("a", 500).is_ok(), "from a whole allowance");
        let wait = limit.admit("a", 1).unwrap_err();
        // 500 samples at 100 a second, less the burst of 100: about four seconds.
        assert!(
            wait > Duration::from_millis(3_900) && wait <= Duration::from_millis(4_010),
            "{wait:?}"
        );
    }

    #[test]
    fn a_forgotten_server_starts_whole() {
        let limit = limit(1, 10);
        assert!(limit.admit("a", 10).is_ok());
        assert!(limit.admit("a", 1).is_err());
        limit.forget("a");
        assert!(limit.admit("a", 10).is_ok());
    }

    #[test]
    fn zero_turns_the_limit_off() {
        let limit = limit(0, 0);
        for _ in 0..100 {
            assert!(limit.admit("a", 1_000_000).is_ok());
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
