//! When a failed call is tried again: exponential backoff with full jitter, the sender's
//! `Retry-After` honoured up to a cap, and the retry window; and an outcome's record tried
//! again while its claim holds. Shared by P0 calls, answers and on-call checks.

use std::pin::Pin;
use std::time::Duration;

use crate::config::RetrySettings;

/// Stores an outcome that must not be lost while its claim holds: `record` is tried again
/// after each failure (a database outage), 200 ms doubling to 2 s, until it succeeds (true)
/// or `held` ends because the claim was lost (false; whoever holds it now sends the item
/// again). `failed` is told each error and the wait before the next try.
pub async fn until_recorded<E, F: Future<Output = Result<(), E>>>(
    mut held: Pin<&mut impl Future<Output = ()>>,
    mut record: impl FnMut() -> F,
    failed: impl Fn(&E, Duration),
) -> bool {
    let mut wait = Duration::from_millis(200);
    loop {
        let result = tokio::select! {
            r = record() => r,
            () = held.as_mut() => return false,
        };
        let Err(e) = result else {
            return true;
        };
        failed(&e, wait);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            () = held.as_mut() => return false,
        }
        wait = (wait * 2).min(Duration::from_secs(2));
    }
}

/// Exponential backoff with full jitter: a random delay up to `base × 2^(attempt-1)`, capped
/// at `max_delay`; never sooner than P0's `Retry-After`, which is itself capped at `max_delay`
/// (it comes from the network, so it may say anything).
pub fn backoff(retry: &RetrySettings, attempt: u32, retry_after: Option<Duration>) -> Duration {
    let exp = 2u32.saturating_pow(attempt.saturating_sub(1).min(30));
    let ceiling = retry.base_delay.saturating_mul(exp).min(retry.max_delay);
    let ceiling_ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    let jittered = Duration::from_millis(rand::random_range(0..=ceiling_ms));
    jittered.max(retry_after.unwrap_or(Duration::ZERO).min(retry.max_delay))
}

/// When attempt `attempts` (just failed) should be followed by another, or `None` when the
/// decision is out of attempts or would be retried past `max_age` from `window_start_ms`.
pub fn retry_at(
    retry: &RetrySettings,
    attempts: u32,
    now_ms: i64,
    window_start_ms: i64,
    retry_after: Option<Duration>,
) -> Option<i64> {
    if retry.max_attempts > 0 && attempts >= retry.max_attempts {
        return None;
    }
    let delay = backoff(retry, attempts, retry_after);
    let age = millis_until(now_ms, window_start_ms);
    if age.saturating_add(delay) > retry.max_age {
        return None;
    }
    Some(now_ms.saturating_add(saturating_i64(delay.as_millis())))
}

/// The time from `from_ms` until `to_ms`; zero when that is past.
pub(crate) fn millis_until(to_ms: i64, from_ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(to_ms.saturating_sub(from_ms)).unwrap_or(0))
}

pub(crate) fn saturating_i64(n: impl TryInto<i64>) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded_and_honours_retry_after() {
        let r = RetrySettings {
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(300),
            max_age: Duration::from_secs(3600),
            max_attempts: 0,
        };
        for attempt in 1..40 {
            let d = backoff(&r, attempt, None);
            let ceiling = Duration::from_secs(1u64 << (attempt - 1).min(20)).min(r.max_delay);
            assert!(d <= ceiling, "attempt {attempt}: {d:?}");
        }
        assert!(backoff(&r, 1, Some(Duration::from_secs(7))) >= Duration::from_secs(7));
        assert_eq!(
            backoff(&r, 1, Some(Duration::from_secs(u64::MAX))),
            r.max_delay,
            "Retry-After is capped at max_delay"
        );
    }

    #[test]
    fn retry_times_never_overflow() {
        let r = RetrySettings {
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(300),
            max_age: Duration::from_secs(3600),
            max_attempts: 0,
        };
        let huge = Some(Duration::from_secs(u64::MAX));
        let now = 1_700_000_000_000;
        let at = retry_at(&r, 4, now, now - 2_000, huge).unwrap();
        assert_eq!(at, now + 300_000);
        assert_eq!(
            retry_at(&r, 4, now, now - 3_500_000, huge),
            None,
            "past max_age"
        );
        for (now, start) in [(i64::MAX, i64::MIN), (i64::MIN, i64::MAX), (0, 0)] {
            let _ = retry_at(&r, u32::MAX, now, start, huge);
        }
        let limited = RetrySettings {
            max_attempts: 3,
            ..r.clone()
        };
        assert_eq!(retry_at(&limited, 3, now, now, None), None);
        assert!(retry_at(&limited, 2, now, now, None).is_some());
    }
}
