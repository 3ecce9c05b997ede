//! When a claim loop goes back to the store: after what it learned from its last claim, and
//! what happened since (new work, a task's end, the rest running out).

use std::time::{Duration, Instant};

use crate::retry::millis_until;
use crate::store::Ahead;

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
pub struct ClaimSchedule {
    look: bool,
    failed: bool,
    /// When the loop last looked at the store (a claim, or a failed one), on the monotonic
    /// clock: a wall clock set back must not put the poll off.
    looked_at: Instant,
    next_due: Option<i64>,
    /// `Ahead::waited_on` of the last claim that took every item due.
    waited_on: Option<Vec<i64>>,
}

impl Default for ClaimSchedule {
    fn default() -> Self {
        Self {
            look: true,
            failed: false,
            looked_at: Instant::now(),
            next_due: None,
            waited_on: Some(Vec::new()),
        }
    }
}

impl ClaimSchedule {
    /// Whether to claim now (given free permits).
    pub fn wants_claim(&self) -> bool {
        self.look
    }

    /// After a claim asked at `at` for `asked` items took `took`; what lies ahead of it comes
    /// with `ahead_is`.
    pub fn claimed(&mut self, asked: usize, took: usize, at: Instant) {
        self.look = took >= asked;
        self.failed = false;
        self.looked_at = at;
        self.next_due = None;
        self.waited_on = Some(Vec::new());
    }

    /// What lies ahead of the last claim.
    pub fn ahead_is(&mut self, ahead: Ahead) {
        self.next_due = ahead.next_due;
        self.waited_on = ahead.waited_on;
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
        let waited_on = |id: i64| self.waited_on.as_ref().is_none_or(|f| f.contains(&id));
        self.look |= again || job.is_some_and(waited_on);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ahead(next_due: Option<i64>, waited_on: &[i64]) -> Ahead {
        Ahead {
            next_due,
            waited_on: Some(waited_on.to_vec()),
        }
    }

    #[test]
    fn a_claim_loop_goes_back_to_the_store_only_when_something_may_be_due() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut l = ClaimSchedule::default();
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
        l.ahead_is(ahead(Some(1_200), &[7]));
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
        l.ahead_is(ahead(None, &[]));
        l.task_ended(true, Some(9));
        assert!(l.wants_claim(), "a task that left its item pending");
        l.claimed(4, 0, t0);
        l.ahead_is(Ahead {
            next_due: None,
            waited_on: None,
        });
        l.task_ended(false, Some(10));
        assert!(l.wants_claim(), "not known what waits: any job's end");
        l.claimed(4, 0, t0);
        l.ahead_is(ahead(None, &[]));
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
        l.ahead_is(ahead(Some(100_000), &[]));
        assert_eq!(l.rest(4, 0, t0), IDLE_POLL, "at most IDLE_POLL");
    }

    /// Tasks ending every 100 ms, none of them a reason to look, do not put the poll off: it
    /// comes 500 ms after the last look (work only a poll finds, such as a replay by another
    /// process, is at most that late). The wall clock plays no part in it.
    #[test]
    fn the_poll_counts_from_the_last_look_not_from_the_last_turn() {
        let t0 = Instant::now();
        let mut l = ClaimSchedule::default();
        l.claimed(4, 2, t0);
        l.ahead_is(ahead(None, &[]));
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
}
