//! Inbound limits that protect the relay (per source) and outbound pacing that protects P0
//! (per org). Keys come only from configured sources and orgs, so memory stays bounded.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// A per-key limit of `rate` per second with a burst of twice that; `None` when off.
pub struct KeyedLimit {
    limiter: Option<DefaultKeyedRateLimiter<String>>,
    clock: DefaultClock,
}

impl KeyedLimit {
    /// `rate` 0 turns the limit off.
    pub fn per_second(rate: u32, burst_factor: u32) -> KeyedLimit {
        let limiter = NonZeroU32::new(rate).map(|r| {
            let burst = NonZeroU32::new(rate.saturating_mul(burst_factor)).unwrap_or(r);
            RateLimiter::keyed(Quota::per_second(r).allow_burst(burst))
        });
        KeyedLimit {
            limiter,
            clock: DefaultClock::default(),
        }
    }

    /// `Ok` when `key` may go now; otherwise how long until it may.
    pub fn check(&self, key: &str) -> Result<(), Duration> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        limiter
            .check_key(&key.to_owned())
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Waits until `key` may go.
    pub async fn wait(&self, key: &str) {
        if let Some(limiter) = &self.limiter {
            limiter.until_key_ready(&key.to_owned()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_key() {
        let l = KeyedLimit::per_second(2, 1);
        assert!(l.check("a").is_ok());
        assert!(l.check("a").is_ok());
        let wait = l.check("a").unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        assert!(l.check("b").is_ok());
        let off = KeyedLimit::per_second(0, 2);
        assert!((0..10_000).all(|_| off.check("a").is_ok()));
    }
}
