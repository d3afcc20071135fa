//! The per-server write rate limit (DESIGN.md §4.1: 429 with `Retry-After`).
//!
//! One author's exporter gone wild should not take the shared writer from everyone
//! else, so each server may write `ingest.samples_per_second_per_server` samples a
//! second on a node, with bursts of `ingest.burst_samples_per_server`. A request is
//! charged its samples before anything of it is validated or queued; one over the
//! allowance is refused whole and told when the allowance will hold it, so a sender's
//! retry succeeds. A GCRA limiter (the `governor` crate) keeps one small entry per
//! server; entries are made only after the key was checked, so only registered servers
//! ever have one and the map needs no pruning.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::IngestConfig;

/// Admits or refuses writes by their server's recent volume.
pub struct WriteRateLimit {
    /// `None` when the limit is off (`samples_per_second_per_server = 0`).
    limiter: Option<DefaultKeyedRateLimiter<String>>,
    clock: DefaultClock,
}

impl WriteRateLimit {
    pub fn new(config: &IngestConfig) -> Self {
        let limiter = NonZeroU32::new(config.samples_per_second_per_server).map(|rate| {
            let burst = NonZeroU32::new(config.burst_samples_per_server).unwrap_or(rate);
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        WriteRateLimit {
            limiter,
            clock: DefaultClock::default(),
        }
    }

    /// Charges `samples` to the server. `Err` holds how long until the allowance would
    /// hold them (at least a second, as `Retry-After` counts whole seconds; `None` when it
    /// never will: more samples than a burst, which configuration validation rules out
    /// for a request within `max_samples_per_request`).
    pub fn admit(&self, server_id: &String, samples: usize) -> Result<(), Option<Duration>> {
        let (Some(limiter), Some(n)) = (&self.limiter, NonZeroU32::new(samples.min(u32::MAX as usize) as u32)) else {
            return Ok(());
        };
        match limiter.check_key_n(server_id, n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(Some(not_until.wait_time_from(self.clock.now()))),
            Err(_insufficient_capacity) => Err(None),
        }
    }
}

/// Whole seconds for `Retry-After`: rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0).max(u64::from(wait.is_zero()))
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
        let (a, b) = ("a".to_owned(), "b".to_owned());
        assert_eq!(limit.admit(&a, 60), Ok(()));
        assert_eq!(limit.admit(&a, 40), Ok(()));
        let wait = limit.admit(&a, 5).unwrap_err().expect("five fit a burst");
        // Five samples at ten a second: about half a second from an empty allowance.
        assert!(
            wait > Duration::from_millis(300) && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        assert_eq!(retry_after_secs(wait), 1);
        assert_eq!(limit.admit(&b, 100), Ok(()), "another server has its own allowance");
        assert_eq!(limit.admit(&a, 0), Ok(()), "an empty write costs nothing");
        assert_eq!(limit.admit(&b, 101), Err(None), "more than a burst never fits");
    }

    #[test]
    fn zero_turns_the_limit_off() {
        let limit = limit(0, 0);
        let a = "a".to_owned();
        for _ in 0..100 {
            assert_eq!(limit.admit(&a, 1_000_000), Ok(()));
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
