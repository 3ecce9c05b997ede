//! When a failed call is tried again: exponential backoff with full jitter, the sender's
//! `Retry-After` honoured up to a cap, and the retry window; how long a claim loop rests
//! between looks; and an outcome's record tried again while its claim holds. Shared by P0
//! calls and answers.

use std::pin::Pin;
use std::time::{Duration, Instant};

use crate::config::RetrySettings;
use crate::store::Beyond;

/// The longest a claim loop (the worker's, the answer loop's) rests without looking at the
/// store again (decisions replayed by `p0-relay jobs replay` from another process are found
/// this way).
pub const IDLE_POLL: Duration = Duration::from_millis(500);

/// When a claim loop (the worker's, the answer loop's) goes back to the store. It claims when
/// the store may hold due items it has not claimed: at the start; when woken (new work, here
/// or at another relay); when its rest runs out (the next item's due time, and at the latest
/// `IDLE_POLL` after its last look, however often tasks end meanwhile); after a claim that
/// took all it asked for; when a task leaves its item pending again (or ends unseen: a lost
/// claim, a panic); when a job ends that another of its request waits behind. After a
/// failed claim it tries again at the next of these, and at the latest after `IDLE_POLL`.
/// Not after every task: at moderate rates that claim found nothing, a store round trip per
/// item.
#[derive(Debug)]
pub struct Lookout {
    look: bool,
    failed: bool,
    /// When the loop last looked at the store (a claim, or a failed one), on the monotonic
    /// clock: a wall clock set back must not put the poll off.
    looked_at: Instant,
    next_due: Option<i64>,
    /// `Beyond::followed` of the last claim that took every item due.
    followed: Option<Vec<i64>>,
}

impl Default for Lookout {
    fn default() -> Self {
        Self {
            look: true,
            failed: false,
            looked_at: Instant::now(),
            next_due: None,
            followed: Some(Vec::new()),
        }
    }
}

impl Lookout {
    /// Whether to claim now (given free permits).
    pub fn wants_claim(&self) -> bool {
        self.look
    }

    /// After a claim asked at `at` for `asked` items took `took`; what lies beyond it comes
    /// with `learned`.
    pub fn claimed(&mut self, asked: usize, took: usize, at: Instant) {
        self.look = took >= asked;
        self.failed = false;
        self.looked_at = at;
        self.next_due = None;
        self.followed = Some(Vec::new());
    }

    /// What lies beyond the last claim.
    pub fn learned(&mut self, beyond: Beyond) {
        self.next_due = beyond.next_due;
        self.followed = beyond.followed;
    }

    /// After a claim asked at `at` failed.
    pub fn claim_failed(&mut self, at: Instant) {
        self.look = true;
        self.failed = true;
        self.looked_at = at;
    }

    /// Woken by new work, or the rest ran out.
    pub fn woken(&mut self) {
        self.look = true;
    }

    /// A task ended; `again` when its item is pending again (or its fate is unknown); `job`
    /// the P0 job it carried, if any.
    pub fn task_ended(&mut self, again: bool, job: Option<i64>) {
        let followed = |id: i64| self.followed.as_ref().is_none_or(|f| f.contains(&id));
        self.look |= again || job.is_some_and(followed);
    }

    /// How long to rest with `free` permits free, at `now_ms` (wall clock, as due times are)
    /// and `now`: not at all when more may be due now; after a failed claim, or with `look`
    /// set and every permit busy (a task's end ends the rest), `IDLE_POLL`; otherwise until
    /// the next item falls due, and at the latest `IDLE_POLL` after the last look.
    pub fn rest(&self, free: usize, now_ms: i64, now: Instant) -> Duration {
        if self.failed || (self.look && free == 0) {
            IDLE_POLL
        } else if self.look {
            Duration::ZERO
        } else {
            let poll = IDLE_POLL.saturating_sub(now.saturating_duration_since(self.looked_at));
            self.next_due
                .map_or(poll, |due| millis_until(due, now_ms).min(poll))
        }
    }
}

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

    fn beyond(next_due: Option<i64>, followed: &[i64]) -> Beyond {
        Beyond {
            next_due,
            followed: Some(followed.to_vec()),
        }
    }

    #[test]
    fn a_claim_loop_goes_back_to_the_store_only_when_something_may_be_due() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut l = Lookout::default();
        assert!(l.wants_claim(), "at the start");
        assert_eq!(l.rest(4, 0, t0), Duration::ZERO);
        l.claimed(4, 4, t0);
        assert!(l.wants_claim(), "a full claim: more may be due");
        assert_eq!(
            l.rest(0, 0, t0),
            IDLE_POLL,
            "every permit busy: until a task ends"
        );
        l.claimed(4, 1, t0);
        l.learned(beyond(Some(1_200), &[7]));
        assert!(!l.wants_claim(), "took everything due");
        assert_eq!(l.rest(3, 1_000, t0), ms(200));
        assert_eq!(l.rest(3, 1_300, t0), Duration::ZERO, "overdue");
        l.task_ended(false, Some(8));
        assert!(!l.wants_claim(), "a job that nothing waits behind ended");
        l.task_ended(false, None);
        assert!(!l.wants_claim(), "an answer ended");
        l.task_ended(false, Some(7));
        assert!(l.wants_claim(), "a job ended that another waits behind");
        l.claimed(4, 0, t0);
        l.learned(beyond(None, &[]));
        l.task_ended(true, Some(9));
        assert!(l.wants_claim(), "a task that left its item pending");
        l.claimed(4, 0, t0);
        l.learned(Beyond {
            next_due: None,
            followed: None,
        });
        l.task_ended(false, Some(10));
        assert!(l.wants_claim(), "not known what waits: any job's end");
        l.claimed(4, 0, t0);
        l.learned(beyond(None, &[]));
        assert_eq!(l.rest(4, 0, t0), IDLE_POLL, "nothing due: the poll");
        l.woken();
        assert!(l.wants_claim());
        l.claim_failed(t0);
        assert_eq!(
            l.rest(4, 0, t0),
            IDLE_POLL,
            "a failing store is not asked at once"
        );
        assert!(l.wants_claim());
        l.claimed(4, 0, t0);
        l.learned(beyond(Some(100_000), &[]));
        assert_eq!(l.rest(4, 0, t0), IDLE_POLL, "at most IDLE_POLL");
    }

    /// Tasks ending every 100 ms, none of them a reason to look, do not put the poll off: it
    /// comes 500 ms after the last look (work only a poll finds, such as a replay by another
    /// process, is at most that late). The wall clock plays no part in it.
    #[test]
    fn the_poll_counts_from_the_last_look_not_from_the_last_turn() {
        let t0 = Instant::now();
        let mut l = Lookout::default();
        l.claimed(4, 2, t0);
        l.learned(beyond(None, &[]));
        for step in 1..5 {
            l.task_ended(false, Some(step));
            assert!(!l.wants_claim());
            let since = Duration::from_millis(100 * step as u64);
            assert_eq!(l.rest(4, i64::MIN, t0 + since), IDLE_POLL - since);
        }
        assert_eq!(
            l.rest(4, 0, t0 + Duration::from_millis(600)),
            Duration::ZERO,
            "the poll is due"
        );
    }

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
