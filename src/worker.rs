//! The worker: claims due decisions from the store, calls P0 with bounded concurrency paced
//! per org, records each outcome, and schedules retries with exponential backoff and jitter.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::answers::compose::{self, Final};
use crate::config::RetrySettings;
use crate::domain::{Id, Via};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::p0::{self, Outcome};
use crate::ratelimit::KeyedLimit;
use crate::store::{AttemptRecord, Job, State, StoreHandle, now_ms};

/// Everything the worker needs; `client: None` is a dry run that calls nothing.
pub struct Worker {
    pub store: StoreHandle,
    pub client: Option<p0::Client>,
    pub pacing: Arc<KeyedLimit>,
    pub metrics: Metrics,
    pub retry: RetrySettings,
    pub concurrency: usize,
    pub wake: Arc<Notify>,
    pub health: Arc<Health>,
    /// Providers answers back go through (their token is set); empty, none.
    pub answer_via: Vec<Via>,
    /// Wakes the answer loop when an outcome brought answers.
    pub answer_wake: Arc<Notify>,
}

/// How long the worker idles before looking at the store again (jobs replayed by
/// `p0-relay jobs replay` from another process are found this way).
const IDLE_POLL: Duration = Duration::from_millis(500);

impl Worker {
    /// Runs until `shutdown`; then lets calls in flight finish within `drain`, leaving the
    /// rest queued for the next start.
    pub async fn run(self, shutdown: CancellationToken, drain: Duration) {
        let this = Arc::new(self);
        let permits = Arc::new(Semaphore::new(this.concurrency));
        let mut tasks = JoinSet::new();
        // (Not `Instant::now() - 60 s`: that underflows on a machine up for less than a minute.)
        let mut last_gauges: Option<Instant> = None;
        loop {
            while tasks.try_join_next().is_some() {}
            let free = permits.available_permits();
            let mut claimed_all = false;
            if free > 0 {
                match this.store.claim_due(free).await {
                    Ok(jobs) => {
                        claimed_all = jobs.len() == free;
                        for job in jobs {
                            let Ok(permit) = permits.clone().acquire_owned().await else {
                                break;
                            };
                            let w = this.clone();
                            tasks.spawn(async move {
                                w.execute(job).await;
                                drop(permit);
                                w.wake.notify_one();
                            });
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "cannot claim decisions from the store"),
                }
            }
            if last_gauges.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                if let Ok(c) = this.store.counts().await {
                    this.metrics.queue_depth.set(c.pending as i64);
                    this.metrics.dead_letters.set(c.dead as i64);
                }
                last_gauges = Some(Instant::now());
            }
            let wait = if claimed_all {
                Duration::ZERO
            } else {
                match this.store.next_due().await {
                    Ok(Some(due)) => {
                        Duration::from_millis((due - now_ms()).max(0) as u64).min(IDLE_POLL)
                    }
                    _ => IDLE_POLL,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = this.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
        let deadline = tokio::time::sleep(drain);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                next = tasks.join_next() => if next.is_none() { break },
                _ = &mut deadline => {
                    tracing::warn!(in_flight = tasks.len(), "shutdown deadline reached; unfinished calls stay queued");
                    tasks.abort_all();
                    break;
                }
            }
        }
    }

    async fn execute(&self, job: Job) {
        // The claim is held (its lease renewed) while the call is under way; if it is lost,
        // another relay owns the decision now and this call is dropped.
        let record = tokio::select! {
            record = self.attempt(&job) => record,
            () = self.store.hold_claim(&job) => return,
        };
        let answers = !record.answers.is_empty();
        if let Err(e) = self.store.record(record).await {
            // The job stays `sending` and is retried after the next start (or, on a shared
            // store, once its lease runs out).
            tracing::error!(job_id = job.id, error = %e, "cannot record the outcome of a P0 call");
        } else if answers {
            self.answer_wake.notify_one();
        }
    }

    async fn attempt(&self, job: &Job) -> AttemptRecord {
        self.pacing.wait(&job.org).await;
        let started = Instant::now();
        let action = job.action;
        let outcome = match (
            &self.client,
            Id::parse(&job.org),
            Id::parse(&job.request_id),
        ) {
            (None, _, _) => {
                tracing::info!(
                    job_id = job.id, action = %action, org = %job.org, request_id = %job.request_id,
                    expiration = job.expiration.as_deref().unwrap_or(""),
                    "dry run: decision recorded, P0 not called"
                );
                None
            }
            (Some(client), Ok(org), Ok(id)) => {
                let o = client
                    .send(&org, &id, action, job.expiration.as_deref())
                    .await;
                let secs = started.elapsed().as_secs_f64();
                self.metrics
                    .p0_requests
                    .with_label_values(&[action.as_str(), o.label()])
                    .inc();
                self.metrics
                    .p0_request_duration
                    .with_label_values(&[action.as_str()])
                    .observe(secs);
                Some(o)
            }
            (Some(_), _, _) => Some(Outcome::Rejected {
                status: 0,
                error: "stored IDs are not valid".into(),
            }),
        };
        let record = self.next_state(job, outcome, started.elapsed());
        tracing::info!(
            job_id = job.id, action = %action, result = record.result, status = ?record.status,
            attempt = record.attempts, state = record.state.as_str(),
            duration_ms = record.duration_ms, "P0 call"
        );
        record
    }

    fn next_state(&self, job: &Job, outcome: Option<Outcome>, took: Duration) -> AttemptRecord {
        let now = now_ms();
        let attempts = job.attempts.saturating_add(1);
        let mut rec = AttemptRecord {
            job_id: job.id,
            claim: job.claim,
            at_ms: now,
            state: State::DryRun,
            attempts,
            next_attempt_at_ms: now,
            status: None,
            result: "dry_run",
            error: None,
            duration_ms: took.as_millis() as i64,
            answers: Vec::new(),
        };
        let Some(outcome) = outcome else {
            return rec;
        };
        rec.status = outcome.status();
        rec.result = outcome.label();
        match outcome {
            Outcome::Success { .. } => {
                rec.state = State::Succeeded;
                rec.answers = compose::answers(job, &Final::Done, &self.answer_via);
                self.health.set_token_rejected(false);
                let lag = (now - job.accepted_at_ms).max(0) as f64 / 1000.0;
                self.metrics.delivery_lag.observe(lag);
            }
            Outcome::Rejected { status, error } => {
                rec.state = State::Rejected;
                rec.answers = compose::answers(
                    job,
                    &Final::Refused {
                        status: Some(status).filter(|s| *s != 0),
                        reason: &error,
                    },
                    &self.answer_via,
                );
                rec.error = Some(error);
            }
            Outcome::Unauthorized { error } => {
                tracing::error!(
                    job_id = job.id,
                    "P0 rejected the relay's API token (401): check P0_API_TOKEN; the decision is dead-lettered"
                );
                self.health.set_token_rejected(true);
                rec.state = State::Dead;
                rec.error = Some(format!("P0 rejected the API token: {error}"));
            }
            Outcome::Transient {
                error, retry_after, ..
            } => {
                rec.error = Some(error);
                let delay = backoff(&self.retry, attempts, retry_after);
                let age = Duration::from_millis((now - job.window_start_ms).max(0) as u64);
                let out_of_attempts =
                    self.retry.max_attempts > 0 && attempts >= self.retry.max_attempts;
                if out_of_attempts || age + delay > self.retry.max_age {
                    rec.state = State::Dead;
                } else {
                    rec.state = State::Pending;
                    rec.next_attempt_at_ms = now + delay.as_millis() as i64;
                    self.metrics.retries.inc();
                }
            }
        }
        rec
    }
}

/// Exponential backoff with full jitter: a random delay up to `base × 2^(attempt-1)`, capped
/// at `max_delay`; never sooner than P0's `Retry-After`.
pub fn backoff(retry: &RetrySettings, attempt: u32, retry_after: Option<Duration>) -> Duration {
    let exp = 2u32.saturating_pow(attempt.saturating_sub(1).min(30));
    let ceiling = retry.base_delay.saturating_mul(exp).min(retry.max_delay);
    let jittered = Duration::from_millis(rand::random_range(0..=ceiling.as_millis() as u64));
    jittered.max(retry_after.unwrap_or(Duration::ZERO))
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
    }
}
