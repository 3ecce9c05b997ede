//! One claim loop for P0 calls (`worker`) and answers back (`answers`): claim what is due,
//! run each item with bounded concurrency while its claim is held, record its outcome (tried
//! again through a store outage while the claim holds), give back an item whose task
//! panicked, and on shutdown let what is in flight finish within the drain. What differs
//! between the two is a `Work`.

pub mod schedule;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::{Notify, Semaphore};
use tokio::task::{self, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::retry::until_recorded;
use crate::store::{Claimable, Held, Leased, StoreHandle, Unreadable, now_ms};
pub use schedule::{ClaimSchedule, IDLE_POLL};

/// What a claim loop works through: what is done with each item (how the store claims and
/// records it is the item's, `Claimable`).
#[async_trait]
pub trait Work: Send + Sync + 'static {
    /// A claimed item (a decision, an answer).
    type Item: Claimable;

    fn store(&self) -> &StoreHandle;
    /// Runs the item; what came of it.
    async fn attempt(&self, item: &Self::Item) -> Outcome<Self>;
    /// After `outcome` was recorded: whether its item may fall due again.
    fn recorded(&self, outcome: &Outcome<Self>) -> bool;
    /// The outcome of an item whose task panicked (a bug in the relay, not an answer from
    /// the provider): pending again after a backoff, or dead when out of time, like a
    /// transient failure.
    fn panicked(&self, item: &Self::Item, why: &str) -> Outcome<Self>;
    /// The outcome of a claimed row that cannot be read: dead, saying why.
    fn unreadable(&self, row: &Unreadable) -> Outcome<Self>;
    /// Called once a turn (the worker keeps its gauges current).
    async fn turn(&self) {}
}

/// What running an item of `W` comes to.
pub type Outcome<W> = <<W as Work>::Item as Claimable>::Outcome;

/// How a claim loop runs.
pub struct Limits {
    /// Items in flight at once.
    pub concurrency: usize,
    /// With items in flight, a claim waits until this many permits are free (at most
    /// `GATHER`): under load claims go in batches rather than one per ended item.
    pub claim_batch: usize,
}

/// The longest free permits wait for more to gather before the loop claims anyway.
const GATHER: Duration = Duration::from_millis(5);

/// A running loop's state.
struct Turns<W: Work> {
    work: Arc<W>,
    permits: Arc<Semaphore>,
    tasks: JoinSet<bool>,
    /// The item each task carries, so a task that panics can give it back.
    in_flight: HashMap<task::Id, W::Item>,
    schedule: ClaimSchedule,
}

/// Runs `work` until `shutdown`; then lets items in flight finish within `drain`, leaving
/// the rest queued for the next start (those cut off stay claimed and are resumed then).
pub async fn run<W: Work>(
    work: Arc<W>,
    limits: Limits,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
    drain: Duration,
) {
    let mut t = Turns {
        work,
        permits: Arc::new(Semaphore::new(limits.concurrency)),
        tasks: JoinSet::new(),
        in_flight: HashMap::new(),
        schedule: ClaimSchedule::default(),
    };
    let mut last_claim = Instant::now();
    loop {
        while let Some(done) = t.tasks.try_join_next_with_id() {
            t.finished(done).await;
        }
        // Under load, claims go in batches: with items in flight, the loop waits until
        // `claim_batch` permits are free rather than asking the store after each item, but
        // never longer than GATHER (items held by pacing or a slow provider must not keep
        // free permits idle).
        let available = t.permits.available_permits();
        let gathering = t.schedule.wants_claim()
            && !t.tasks.is_empty()
            && available < limits.claim_batch
            && last_claim.elapsed() < GATHER;
        if t.schedule.wants_claim() && available > 0 && !gathering {
            last_claim = Instant::now();
            t.claim(available, last_claim).await;
        }
        t.work.turn().await;
        let wait = if gathering && available > 0 {
            GATHER
        } else {
            let free = t.permits.available_permits();
            t.schedule.rest(free, now_ms(), Instant::now())
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = wake.notified() => t.schedule.woken(),
            Some(done) = t.tasks.join_next_with_id() => t.finished(done).await,
            _ = tokio::time::sleep(wait) => t.schedule.woken(),
        }
    }
    t.drain(drain).await;
}

impl<W: Work> Turns<W> {
    /// Claims up to `free` items and starts each; learns what lies ahead.
    async fn claim(&mut self, free: usize, at: Instant) {
        let claimed = match W::Item::claim(self.work.store(), free).await {
            Ok(claimed) => claimed,
            Err(e) => {
                tracing::error!(error = %e, "cannot claim {} from the store", <W::Item as Claimable>::NAME);
                self.schedule.claim_failed(at);
                return;
            }
        };
        let took = claimed.items.len() + claimed.unreadable.len();
        self.schedule.claimed(free, took, at);
        for row in &claimed.unreadable {
            tracing::error!(id = row.id, why = %row.why, "a claimed {} row cannot be read; recorded dead", <W::Item as Claimable>::NAME);
            if let Err(e) = W::Item::record(self.work.store(), self.work.unreadable(row)).await {
                tracing::error!(id = row.id, error = %e, "cannot record an unreadable row dead");
            }
        }
        for item in claimed.items {
            let Ok(permit) = self.permits.clone().acquire_owned().await else {
                break;
            };
            let work = self.work.clone();
            let carried = item.clone();
            let handle = self.tasks.spawn(async move {
                let again = execute(&*work, item).await;
                drop(permit);
                again
            });
            self.in_flight.insert(handle.id(), carried);
        }
        // Asked after the items started when the claim did not say (their leases are
        // running).
        let ahead = match claimed.ahead {
            Some(ahead) => ahead,
            None => W::Item::ahead(self.work.store()).await,
        };
        self.schedule.ahead_is(ahead);
    }

    /// Accounts for a task that ended. One that panicked gives its item back; one cancelled
    /// at the shutdown deadline leaves it claimed, to be resumed at the next start.
    async fn finished(&mut self, done: Result<(task::Id, bool), task::JoinError>) {
        let (id, again, failure) = match done {
            Ok((id, again)) => (id, again, None),
            Err(e) => (e.id(), false, Some(e)),
        };
        let item = self.in_flight.remove(&id);
        let job = item.as_ref().and_then(Claimable::job);
        let again = match (failure, item) {
            (Some(failure), Some(item)) if failure.is_panic() => {
                let why = crate::supervise::panic_message(failure.into_panic());
                let outcome = self.work.panicked(&item, &why);
                if let Err(e) = W::Item::record(self.work.store(), outcome).await {
                    let (job_id, answer_id) = ids(item.held());
                    tracing::error!(job_id, answer_id, error = %e,
                        "cannot record the outcome of {} whose task failed", <W::Item as Claimable>::NAME);
                }
                true
            }
            (Some(_), _) => false,
            (None, _) => again,
        };
        self.schedule.task_ended(again, job);
    }

    /// Waits for the items in flight, up to `drain`.
    async fn drain(mut self, drain: Duration) {
        let deadline = tokio::time::sleep(drain);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                next = self.tasks.join_next_with_id() => match next {
                    None => break,
                    Some(done) => self.finished(done).await,
                },
                _ = &mut deadline => {
                    tracing::warn!(in_flight = self.tasks.len(),
                        "shutdown deadline reached; unfinished {} stay queued", <W::Item as Claimable>::NAME);
                    self.tasks.abort_all();
                    break;
                }
            }
        }
    }
}

/// Runs `item` and records its outcome; true when it may fall due again (a retry is
/// scheduled, or the claim was lost), so the loop looks at the store. The claim is held (its
/// lease renewed) while the item runs and until its outcome is recorded; if it is lost,
/// another relay owns the item now and this relay lets go (on SQLite the claim is never
/// lost). A store that cannot write now (a database outage) gets the outcome later, with
/// backoff, for as long as the claim holds; after that the item is run again by whichever
/// relay claims it next (and after a stop, at the next start).
async fn execute<W: Work>(work: &W, item: W::Item) -> bool {
    let held = item.held();
    let hold = work.store().hold(held);
    tokio::pin!(hold);
    let outcome = tokio::select! {
        outcome = work.attempt(&item) => outcome,
        () = &mut hold => return true,
    };
    let recorded = until_recorded(
        hold,
        || W::Item::record(work.store(), outcome.clone()),
        |e, wait| {
            let (job_id, answer_id) = ids(held);
            tracing::error!(job_id, answer_id, error = %e, retry_in_ms = wait.as_millis() as u64,
                "cannot record the outcome of {}", <W::Item as Claimable>::NAME);
        },
    )
    .await;
    !recorded || work.recorded(&outcome)
}

/// A claim's ID as the rest of the relay names it in logs.
fn ids(held: Held) -> (Option<i64>, Option<i64>) {
    match held.what {
        Leased::Job => (Some(held.id), None),
        Leased::Answer => (None, Some(held.id)),
    }
}
