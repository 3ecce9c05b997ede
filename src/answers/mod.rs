//! Answering back where a decision was asked. The worker composes the answers
//! (`compose::answers`) and the store keeps them as jobs created with P0's final answer; this
//! loop, apart from the P0 worker (its own concurrency and pacing, so an answer never delays
//! a P0 call), claims due answers, sends them (`providers`) and records each outcome, retrying
//! with backoff and honouring the providers' rate limits.

pub mod compose;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::claims::{self, Limits, Work};
use crate::config::RetrySettings;
use crate::metrics::Metrics;
use crate::ratelimit::KeyedLimit;
use crate::retry::retry_at;
use crate::store::audit::{AuditEvent, Kind};
use crate::store::{AnswerJob, AnswerRecord, Settled, State, StoreHandle, Unreadable, now_ms};

use crate::providers::{Providers, Sent};

/// The answer loop: everything it needs.
pub struct Answerer {
    pub store: StoreHandle,
    pub providers: Providers,
    pub pacing: Arc<KeyedLimit>,
    pub metrics: Metrics,
    pub retry: RetrySettings,
    pub concurrency: usize,
    pub wake: Arc<Notify>,
}

#[async_trait]
impl Work for Answerer {
    type Item = AnswerJob;

    fn store(&self) -> &StoreHandle {
        &self.store
    }

    /// Sends `answer`, paced per provider; what came of it. The claim is held (its lease
    /// renewed) until the outcome is recorded, so neither a provider slower than the lease
    /// nor a short outage gets the answer sent twice.
    async fn attempt(&self, answer: &AnswerJob) -> AnswerRecord {
        self.pacing.wait(&answer.via).await;
        let sent = self.providers.answer(answer).await;
        let mut rec = self.next_state(answer, sent);
        rec.audit = answered(answer, &rec);
        rec
    }

    fn recorded(&self, outcome: &AnswerRecord) -> bool {
        outcome.state == State::Pending
    }

    fn panicked(&self, answer: &AnswerJob, why: &str) -> AnswerRecord {
        tracing::error!(
            answer_id = answer.id, job_id = answer.job_id, error = %why,
            "an answer back failed inside the relay (a bug); it is given back"
        );
        let error = format!("the relay failed while answering: {why}");
        let mut rec = self.retry_or_give_up(answer, None, error, None);
        rec.audit = answered(answer, &rec);
        rec
    }

    fn unreadable(&self, row: &Unreadable) -> AnswerRecord {
        let attempts = row.attempts.saturating_add(1);
        let mut rec = Settled::new(row.id, row.claim_token, attempts, State::Dead, now_ms());
        rec.error = Some(row.why.clone());
        rec
    }
}

/// The audit event of an answer back that is finished (`answered`: sent, refused by the
/// provider, or given up), about its decision; none while it is retried.
fn answered(answer: &AnswerJob, rec: &AnswerRecord) -> Vec<AuditEvent> {
    let outcome = match rec.state {
        State::Succeeded => "sent",
        State::Rejected => "refused",
        State::Dead => "dead",
        _ => return Vec::new(),
    };
    let mut e = AuditEvent::new(Kind::Answered, Some(answer.job_id), outcome);
    e.status = rec.status;
    e.reason = rec.error.clone();
    e.detail = Some(format!(
        "{} {} on {}",
        answer.via, answer.kind, answer.target
    ));
    vec![e]
}

impl Answerer {
    /// Runs until `shutdown`, then lets answers in flight finish within `drain`; the rest
    /// stay queued for the next start.
    pub async fn run(self, shutdown: CancellationToken, drain: Duration) {
        let limits = Limits {
            concurrency: self.concurrency,
            claim_batch: 1,
        };
        let wake = self.wake.clone();
        claims::run(Arc::new(self), limits, wake, shutdown, drain).await;
    }

    fn next_state(&self, answer: &AnswerJob, sent: Sent) -> AnswerRecord {
        match sent {
            Sent::Done { status } => {
                self.count(answer, "sent");
                tracing::info!(
                    answer_id = answer.id, job_id = answer.job_id, via = %answer.via,
                    kind = %answer.kind, status, "answered back"
                );
                let mut rec = self.outcome(answer, State::Succeeded, now_ms());
                rec.status = Some(status);
                rec
            }
            Sent::Failed { status, error } => {
                self.count(answer, "failed");
                tracing::error!(
                    answer_id = answer.id, job_id = answer.job_id, via = %answer.via,
                    kind = %answer.kind, status = ?status, error = %error,
                    "the provider refused an answer back for good: check its token's permissions and the mapping's subject"
                );
                let mut rec = self.outcome(answer, State::Rejected, now_ms());
                rec.status = status;
                rec.error = Some(error);
                rec
            }
            Sent::Retry {
                status,
                error,
                retry_after,
            } => self.retry_or_give_up(answer, status, error, retry_after),
        }
    }

    /// An answer that failed for now: pending again after a backoff (not before the
    /// provider's `Retry-After`), or dead past the retry max age.
    fn retry_or_give_up(
        &self,
        answer: &AnswerJob,
        status: Option<u16>,
        error: String,
        retry_after: Option<Duration>,
    ) -> AnswerRecord {
        let now = now_ms();
        let attempts = answer.attempts.saturating_add(1);
        let next = retry_at(
            &self.retry,
            attempts,
            now,
            answer.window_start_ms,
            retry_after,
        );
        let mut rec = match next {
            Some(at) => {
                self.count(answer, "retried");
                tracing::warn!(
                    answer_id = answer.id, via = %answer.via, error = %error,
                    retry_in_ms = at.saturating_sub(now), "answer back failed; retrying"
                );
                let mut rec = self.outcome(answer, State::Pending, now);
                rec.next_attempt_at_ms = at;
                rec
            }
            None => {
                self.count(answer, "dead");
                tracing::error!(
                    answer_id = answer.id, job_id = answer.job_id, via = %answer.via,
                    error = %error, "gave up answering back after the retry max age"
                );
                self.outcome(answer, State::Dead, now)
            }
        };
        rec.status = status;
        rec.error = Some(error);
        rec
    }

    /// The outcome of this attempt at `answer`, in `state`.
    fn outcome(&self, answer: &AnswerJob, state: State, now: i64) -> AnswerRecord {
        let attempts = answer.attempts.saturating_add(1);
        Settled::new(answer.id, answer.claim_token, attempts, state, now)
    }

    fn count(&self, answer: &AnswerJob, result: &str) {
        self.metrics
            .answers
            .with_label_values(&[answer.via.as_str(), result])
            .inc();
    }
}
