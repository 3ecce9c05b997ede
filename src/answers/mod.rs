//! Answering back where a decision was asked. The worker composes the answers
//! (`compose::answers`) and the store keeps them as jobs created with P0's final answer; this
//! loop, apart from the P0 worker (its own concurrency and pacing, so an answer never delays
//! a P0 call), claims due answers, sends them (`client`) and records each outcome, retrying
//! with backoff and honouring the providers' rate limits.

pub mod client;
pub mod compose;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::RetrySettings;
use crate::metrics::Metrics;
use crate::ratelimit::KeyedLimit;
use crate::retry::{Lookout, retry_at, until_recorded};
use crate::store::{AnswerJob, AnswerRecord, State, StoreHandle, now_ms};

pub use client::{Client, Sent};

/// The answer loop: everything it needs.
pub struct Answerer {
    pub store: StoreHandle,
    pub client: Client,
    pub pacing: Arc<KeyedLimit>,
    pub metrics: Metrics,
    pub retry: RetrySettings,
    pub concurrency: usize,
    pub wake: Arc<Notify>,
}

impl Answerer {
    /// Runs until `shutdown`, then lets answers in flight finish within `drain`; the rest
    /// stay queued for the next start.
    pub async fn run(self, shutdown: CancellationToken, drain: Duration) {
        let this = Arc::new(self);
        let permits = Arc::new(Semaphore::new(this.concurrency));
        let mut tasks = JoinSet::new();
        let mut lookout = Lookout::default();
        loop {
            while let Some(done) = tasks.try_join_next() {
                lookout.task_ended(done.unwrap_or(true), None);
            }
            let free = permits.available_permits();
            if lookout.wants_claim() && free > 0 {
                let asked_at = Instant::now();
                match this.store.claim_answers(free).await {
                    Ok(claimed) => {
                        lookout.claimed(free, claimed.items.len(), asked_at);
                        for answer in claimed.items {
                            let Ok(permit) = permits.clone().acquire_owned().await else {
                                break;
                            };
                            let a = this.clone();
                            tasks.spawn(async move {
                                let again = a.execute(answer).await;
                                drop(permit);
                                again
                            });
                        }
                        let beyond = match claimed.beyond {
                            Some(beyond) => beyond,
                            None => this.store.after_answer_claim().await,
                        };
                        lookout.learned(beyond);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot claim answers from the store");
                        lookout.claim_failed(asked_at);
                    }
                }
            }
            let wait = lookout.rest(permits.available_permits(), now_ms(), Instant::now());
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = this.wake.notified() => lookout.woken(),
                Some(done) = tasks.join_next() => lookout.task_ended(done.unwrap_or(true), None),
                _ = tokio::time::sleep(wait) => lookout.woken(),
            }
        }
        let deadline = tokio::time::sleep(drain);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                next = tasks.join_next() => if next.is_none() { break },
                _ = &mut deadline => {
                    tasks.abort_all();
                    break;
                }
            }
        }
    }

    /// Sends `answer` and records what came of it; true when it is pending again (a retry) or
    /// its claim was lost, so the loop looks at the store. The claim is held (its lease
    /// renewed) until the outcome is recorded, and a record the store cannot take (an
    /// outage) is tried again meanwhile, as the worker does: neither a provider slower than
    /// the lease nor a short outage gets the answer sent twice.
    async fn execute(&self, answer: AnswerJob) -> bool {
        let hold = self.store.hold_answer_claim(&answer);
        tokio::pin!(hold);
        let sent = tokio::select! {
            sent = async {
                self.pacing.wait(&answer.via).await;
                self.client.send(&answer).await
            } => sent,
            () = &mut hold => return true,
        };
        let record = self.next_state(&answer, sent);
        let recorded = until_recorded(
            hold,
            || self.store.record_answer(record.clone()),
            |e, wait| {
                tracing::error!(answer_id = answer.id, error = %e,
                    retry_in_ms = wait.as_millis() as u64, "cannot record an answer back");
            },
        )
        .await;
        !recorded || record.state == State::Pending
    }

    fn next_state(&self, answer: &AnswerJob, sent: Sent) -> AnswerRecord {
        let now = now_ms();
        let attempts = answer.attempts.saturating_add(1);
        let mut rec = AnswerRecord {
            id: answer.id,
            claim: answer.claim,
            at_ms: now,
            state: State::Succeeded,
            attempts,
            next_attempt_at_ms: now,
            status: None,
            error: None,
        };
        let count = |result: &str| {
            self.metrics
                .answers
                .with_label_values(&[answer.via.as_str(), result])
                .inc();
        };
        match sent {
            Sent::Done { status } => {
                rec.status = Some(status);
                count("sent");
                tracing::info!(
                    answer_id = answer.id, job_id = answer.job_id, via = %answer.via,
                    kind = %answer.kind, status, "answered back"
                );
            }
            Sent::Failed { status, error } => {
                rec.status = status;
                rec.state = State::Rejected;
                count("failed");
                tracing::error!(
                    answer_id = answer.id, job_id = answer.job_id, via = %answer.via,
                    kind = %answer.kind, status = ?status, error = %error,
                    "the provider refused an answer back for good: check its token's permissions and the mapping's subject"
                );
                rec.error = Some(error);
            }
            Sent::Retry {
                status,
                error,
                retry_after,
            } => {
                rec.status = status;
                let next = retry_at(
                    &self.retry,
                    attempts,
                    now,
                    answer.window_start_ms,
                    retry_after,
                );
                if let Some(at) = next {
                    rec.state = State::Pending;
                    rec.next_attempt_at_ms = at;
                    count("retried");
                    tracing::warn!(
                        answer_id = answer.id, via = %answer.via, error = %error,
                        retry_in_ms = at.saturating_sub(now), "answer back failed; retrying"
                    );
                } else {
                    rec.state = State::Dead;
                    count("dead");
                    tracing::error!(
                        answer_id = answer.id, job_id = answer.job_id, via = %answer.via,
                        error = %error, "gave up answering back after the retry max age"
                    );
                }
                rec.error = Some(error);
            }
        }
        rec
    }
}
