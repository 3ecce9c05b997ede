//! The worker: claims due decisions from the store, calls P0 with bounded concurrency paced
//! per org, records each outcome, and schedules retries with exponential backoff and jitter.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::answers::compose::{self, Final};
use crate::claims::{self, Limits, Work};
use crate::config::RetrySettings;
use crate::domain::{Action, Expiration, Gate, GateScope, Via};
use crate::health::Health;
use crate::mapping::MappingSet;
use crate::metrics::Metrics;
use crate::oncall::{Checker, Finding, public_refusal};
use crate::p0::{self, Outcome};
use crate::ratelimit::KeyedLimit;
use crate::retry::retry_at;
use crate::store::audit::{About, AuditEvent, Kind};
use crate::store::{AttemptRecord, Job, Settled, State, StoreHandle, Unreadable, now_ms};

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
    /// Runs the on-call checks gated approves must pass before P0 is called.
    pub oncall: Arc<Checker>,
    /// This relay's mappings: an approve is checked against the on-call check its rule has
    /// here as well as the one it was stored with, whichever relay stored it.
    pub mappings: Arc<ArcSwap<MappingSet>>,
    /// How long a passed check holds: an approve not sent within it is checked again.
    pub recheck_after: Duration,
}

/// What an approve's on-call checks came to.
enum Checked {
    /// Nothing to check, or passed (the evidence, and when, to keep with the attempt).
    Pass(Option<(String, i64)>),
    /// Refused or not checkable now: the record that says so.
    Stop(Box<AttemptRecord>),
}

#[async_trait]
impl Work for Worker {
    type Item = Job;

    fn store(&self) -> &StoreHandle {
        &self.store
    }

    async fn attempt(&self, job: &Job) -> AttemptRecord {
        let mut rec = self.decide(job).await;
        rec.settled.audit = audit_of(job, &rec);
        rec
    }

    /// The answers back created with this outcome go out now, not at the next poll.
    fn recorded(&self, outcome: &AttemptRecord) -> bool {
        if !outcome.answers.is_empty() {
            self.answer_wake.notify_one();
        }
        outcome.settled.state == State::Pending
    }

    fn panicked(&self, job: &Job, why: &str) -> AttemptRecord {
        let mut rec = self.again_or_dead(job, None);
        tracing::error!(
            job_id = job.id, error = %why, attempt = rec.settled.attempts,
            state = rec.settled.state.as_str(),
            "a P0 call failed inside the relay (a bug); the decision is given back"
        );
        rec.result = "internal_error";
        rec.settled.error = Some(format!("the relay failed during the call: {why}"));
        rec.settled.audit = audit_of(job, &rec);
        rec
    }

    fn unreadable(&self, row: &Unreadable) -> AttemptRecord {
        let now = now_ms();
        let attempts = row.attempts.saturating_add(1);
        let mut rec = record(row.id, row.claim_token, attempts, State::Dead, now);
        rec.result = "unreadable";
        rec.settled.error = Some(row.why.clone());
        let mut dead = AuditEvent::new(Kind::Dead, Some(row.id), "unreadable");
        dead.reason = Some(row.why.clone());
        rec.settled.audit = vec![dead];
        rec
    }
}

impl Worker {
    /// An attempt that failed for now: pending again after a backoff (not before
    /// `retry_after`), or dead when out of attempts or past the decision's max age.
    fn again_or_dead(&self, job: &Job, retry_after: Option<Duration>) -> AttemptRecord {
        let now = now_ms();
        let attempts = job.attempts.saturating_add(1);
        let next = retry_at(&self.retry, attempts, now, job.window_start_ms, retry_after);
        let (state, at) = match next {
            Some(at) => (State::Pending, at),
            None => (State::Dead, now),
        };
        let mut rec = record(job.id, job.claim_token, attempts, state, now);
        rec.settled.next_attempt_at_ms = at;
        rec
    }
}

/// Attempt number `attempts` at job `id` at `now`, leaving it in `state`, to be filled in.
fn record(id: i64, claim_token: i64, attempts: u32, state: State, now: i64) -> AttemptRecord {
    AttemptRecord {
        settled: Settled::new(id, claim_token, attempts, state, now),
        result: "dry_run",
        duration_ms: 0,
        evidence: None,
        checked_at_ms: None,
        answers: Vec::new(),
    }
}

impl Worker {
    /// Runs until `shutdown`; then lets calls in flight finish within `drain`, leaving the
    /// rest queued for the next start.
    pub async fn run(self, shutdown: CancellationToken, drain: Duration) {
        let limits = Limits {
            concurrency: self.concurrency,
            claim_batch: (self.concurrency / 4).clamp(1, 8),
        };
        let wake = self.wake.clone();
        claims::run(Arc::new(self), limits, wake, shutdown, drain).await;
    }

    /// Decides `job`: refused as stored, refused by a check, or sent to P0 (in a dry run,
    /// recorded only); the outcome to record.
    async fn decide(&self, job: &Job) -> AttemptRecord {
        // Refused as it was stored (its subject had ended): recorded and answered back, and
        // P0 is never asked.
        if let Some(reason) = &job.refused {
            let record = self.refused(job, reason);
            tracing::info!(
                job_id = job.id, action = %job.action, result = record.result,
                reason = %reason, "decision refused; P0 not called"
            );
            return record;
        }
        // A gated approve is checked first, against the check it was stored with and the one
        // its rule has on this relay; a refusal is final, a check that cannot be made now is
        // tried again with backoff until the decision's max age, and never approves on doubt.
        let checked = match self.gates(job).await {
            Checked::Pass(checked) => checked,
            Checked::Stop(record) => return *record,
        };
        self.pacing.wait(job.org.as_str()).await;
        // A fault for the unit tests: the first attempt of `panic-*` requests panics.
        #[cfg(test)]
        if job.request_id.as_str().starts_with("panic-") && job.attempts == 0 {
            panic!("injected panic for {}", job.request_id);
        }
        let started = Instant::now();
        let outcome = self.send(job, started).await;
        let mut record = self.next_state(job, outcome, started);
        if let Some((evidence, at)) = checked {
            record.evidence = Some(evidence);
            record.checked_at_ms = Some(at);
        }
        tracing::info!(
            job_id = job.id, action = %job.action, result = record.result,
            status = ?record.settled.status, attempt = record.settled.attempts,
            state = record.settled.state.as_str(),
            duration_ms = record.duration_ms, "P0 call"
        );
        record
    }

    /// Calls P0 for `job`, counted; `None` in a dry run.
    async fn send(&self, job: &Job, started: Instant) -> Option<Outcome> {
        let action = job.action;
        let expiration = job.expiration.as_ref().map(Expiration::as_str);
        let Some(client) = &self.client else {
            tracing::info!(
                job_id = job.id, action = %action, org = %job.org, request_id = %job.request_id,
                expiration = expiration.unwrap_or(""),
                "dry run: decision recorded, P0 not called"
            );
            return None;
        };
        let o = client
            .send(&job.org, &job.request_id, action, expiration)
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

    /// The checks `job` must pass before it is sent, when it approves: this relay's own grant
    /// policy for its rule (approver list, the switch of a rule with no actor), whichever
    /// relay stored it; then the on-call check it was stored with, and the check its rule has
    /// on this relay (the same person, incident and moment under this relay's pinned scope)
    /// when that differs. An approve stored without a check this relay's rule has is refused.
    /// A check younger than `recheck_after` stands when it covered this relay's scope; an
    /// older one is made again, as of now. Nothing is checked in a dry run but the policy.
    async fn gates(&self, job: &Job) -> Checked {
        if job.action != Action::Approve {
            return Checked::Pass(None);
        }
        let (here, refusal) = self.policy_here(job);
        if let Some(why) = refusal {
            tracing::info!(job_id = job.id, reason = %why, "approve refused by this relay's grant policy; P0 not called");
            let mut rec = self.refused_saying(job, &why, "not an approver");
            rec.result = "not_allowed";
            return Checked::Stop(Box::new(rec));
        }
        let gates = match self.checks_to_pass(job, here) {
            Ok(gates) if gates.is_empty() => return Checked::Pass(None),
            Ok(gates) => gates,
            Err(why) => return self.stop_not_on_call(job, why, "not checked on call: ask again"),
        };
        let now = now_ms();
        let recheck = i64::try_from(self.recheck_after.as_millis()).unwrap_or(i64::MAX);
        // The evidence covers the stored check (and this scope, when it is the same one).
        if job.evidence.is_some()
            && gates.len() == 1
            && job
                .checked_at_ms
                .is_some_and(|at| now.saturating_sub(at) < recheck)
        {
            return Checked::Pass(None);
        }
        if self.client.is_none() {
            tracing::info!(job_id = job.id, "dry run: on-call check not made");
            return Checked::Pass(None);
        }
        self.check(job, &gates, now).await
    }

    /// This relay's grant policy for the job's rule: the pinned scope of its on-call check,
    /// and why the job's actor may not grant through it, if they may not.
    fn policy_here(&self, job: &Job) -> (Option<GateScope>, Option<String>) {
        let mappings = self.mappings.load();
        let found = mappings.get(&job.source).zip(job.rule.as_deref());
        let scope = found.and_then(|(m, r)| m.gate_scope(r).cloned());
        let refusal = found.and_then(|(m, r)| m.grant_refusal(r, job.actor.as_deref()));
        (scope, refusal)
    }

    /// The checks the job must pass: the one it was stored with, and this relay's when that
    /// differs (the same person, incident and moment under this relay's scope); why it cannot
    /// pass, when it was stored without the check this relay's rule has, or with another
    /// provider's.
    fn checks_to_pass(&self, job: &Job, here: Option<GateScope>) -> Result<Vec<Gate>, String> {
        let stored = job
            .gate
            .clone()
            .map_err(|e| format!("the stored on-call check is unreadable: {e}"))?;
        match (stored, here) {
            (None, None) => Ok(Vec::new()),
            (None, Some(_)) => Err(format!(
                "stored without the on-call check that rule `{}` has on this relay (a relay without it took the delivery)",
                job.rule.as_deref().unwrap_or("")
            )),
            (Some(g), None) => Ok(vec![g]),
            (Some(g), Some(scope)) if g.scope() == scope => Ok(vec![g]),
            (Some(g), Some(scope)) => match g.rescoped(&scope) {
                Some(mine) => Ok(vec![g, mine]),
                None => Err(
                    "stored with another provider's on-call check than this relay's rule has"
                        .to_owned(),
                ),
            },
        }
    }

    /// Makes each check; a check made before and too long ago asks about now.
    async fn check(&self, job: &Job, gates: &[Gate], now: i64) -> Checked {
        let again = job.checked_at_ms.is_some();
        let mut evidence = Vec::new();
        for gate in gates {
            let gate = if again {
                gate.judged_at(now)
            } else {
                gate.clone()
            };
            let checked = |e: String| {
                let at = std::time::UNIX_EPOCH
                    + Duration::from_millis(u64::try_from(now_ms()).unwrap_or(0));
                format!("{e}; checked {}", humantime::format_rfc3339_seconds(at))
            };
            match self.oncall.check(&gate).await {
                Finding::OnCall(e) => evidence.push(checked(e)),
                Finding::NotOnCall(e) => {
                    return self.stop_not_on_call(job, checked(e), public_refusal(gate.via()));
                }
                Finding::Unavailable { error, retry_after } => {
                    return Checked::Stop(Box::new(self.check_failed(job, error, retry_after)));
                }
            }
        }
        let evidence = evidence.join("; and ");
        tracing::info!(job_id = job.id, evidence = %evidence, "on-call check passed");
        Checked::Pass(Some((evidence, now_ms())))
    }

    fn stop_not_on_call(&self, job: &Job, evidence: String, public: &str) -> Checked {
        Checked::Stop(Box::new(self.not_on_call(job, evidence, public)))
    }

    /// The record of a decision the store refused as it was accepted: rejected with the
    /// reason, its answers back made as for any refusal.
    fn refused(&self, job: &Job, reason: &str) -> AttemptRecord {
        self.refused_saying(job, reason, reason)
    }

    /// A refusal recorded with `reason` and answered back with `public`.
    fn refused_saying(&self, job: &Job, reason: &str, public: &str) -> AttemptRecord {
        let attempts = job.attempts.saturating_add(1);
        let mut rec = record(job.id, job.claim_token, attempts, State::Rejected, now_ms());
        rec.result = "refused";
        rec.settled.error = Some(reason.to_owned());
        rec.answers = compose::answers(job, &Final::NotSent { reason: public }, &self.answer_via);
        rec
    }

    /// The record of an approve whose actor the provider says was not on call: rejected, its
    /// evidence kept (for `jobs show` and the log), answered back as a refusal in `public`
    /// words that name no policy, schedule or team; P0 is never asked.
    fn not_on_call(&self, job: &Job, evidence: String, public: &str) -> AttemptRecord {
        tracing::info!(job_id = job.id, evidence = %evidence, "on-call check refused the approve; P0 not called");
        let mut rec = self.refused_saying(job, &evidence, public);
        rec.result = "not_on_call";
        rec.checked_at_ms = Some(rec.settled.at_ms);
        rec.evidence = Some(evidence);
        rec
    }

    /// The record of an on-call check that could not be made: pending again after a backoff
    /// (not before the provider's `Retry-After`), or dead past the decision's max age.
    fn check_failed(
        &self,
        job: &Job,
        error: String,
        retry_after: Option<Duration>,
    ) -> AttemptRecord {
        let mut rec = self.again_or_dead(job, retry_after);
        tracing::warn!(
            job_id = job.id, %error, attempt = rec.settled.attempts,
            state = rec.settled.state.as_str(),
            "on-call check failed; P0 not called"
        );
        if rec.settled.state == State::Pending {
            self.metrics.retries.inc();
        }
        rec.result = "check_failed";
        rec.settled.error = Some(format!("on-call check: {error}"));
        // Dead: nothing will send it, so the one who asked is told why.
        if rec.settled.state == State::Dead {
            let reason = "the on-call check could not be made within the decision's max age";
            rec.answers = compose::answers(job, &Final::NotSent { reason }, &self.answer_via);
        }
        rec
    }

    fn next_state(&self, job: &Job, outcome: Option<Outcome>, started: Instant) -> AttemptRecord {
        let took = started.elapsed();
        let now = now_ms();
        let attempts = job.attempts.saturating_add(1);
        // A dry run until P0's answer says otherwise.
        let mut rec = record(job.id, job.claim_token, attempts, State::DryRun, now);
        rec.duration_ms = i64::try_from(took.as_millis()).unwrap_or(i64::MAX);
        let Some(outcome) = outcome else {
            return rec;
        };
        rec.settled.status = outcome.status();
        rec.result = outcome.label();
        match outcome {
            Outcome::Success { .. } => {
                rec.settled.state = State::Succeeded;
                rec.answers = compose::answers(job, &Final::Done, &self.answer_via);
                self.health.token_answer(started, true);
                self.metrics
                    .token_rejected
                    .set(i64::from(self.health.token() == "rejected"));
                let lag = now.saturating_sub(job.accepted_at_ms).max(0) as f64 / 1000.0;
                self.metrics.delivery_lag.observe(lag);
            }
            Outcome::Rejected { status, error } => {
                rec.settled.state = State::Rejected;
                rec.answers = compose::answers(
                    job,
                    &Final::Refused {
                        status: Some(status).filter(|s| *s != 0),
                        reason: &error,
                    },
                    &self.answer_via,
                );
                rec.settled.error = Some(error);
            }
            Outcome::Unauthorized { error } => {
                tracing::error!(
                    job_id = job.id,
                    "P0 rejected the relay's API token (401): check P0_API_TOKEN; the decision is dead-lettered"
                );
                self.health.token_answer(started, false);
                self.metrics
                    .token_rejected
                    .set(i64::from(self.health.token() == "rejected"));
                rec.settled.state = State::Dead;
                rec.settled.error = Some(format!("P0 rejected the API token: {error}"));
            }
            Outcome::Transient {
                error, retry_after, ..
            } => {
                rec.settled.error = Some(error);
                let again = self.again_or_dead(job, retry_after);
                (rec.settled.state, rec.settled.next_attempt_at_ms) =
                    (again.settled.state, again.settled.next_attempt_at_ms);
                if rec.settled.state == State::Pending {
                    self.metrics.retries.inc();
                }
            }
        }
        rec
    }
}

/// The audit events of an attempt at `job` (`store::audit`): the on-call check it made
/// (`checked`), a refusal here (`refused`: not an approver on this relay, not on call; a
/// refusal the store made as it took the decision has its event already), the call to P0
/// (`sent`, or `dry_run`), and `dead` when it gives the decision up.
fn audit_of(job: &Job, rec: &AttemptRecord) -> Vec<AuditEvent> {
    let about = About {
        source: Some(job.source.clone()),
        rule: job.rule.clone(),
        actor: job.actor.clone(),
        action: Some(job.action.as_str().to_owned()),
        request_id: Some(job.request_id.as_str().to_owned()),
        org: Some(job.org.as_str().to_owned()),
        subject: job.subject.clone(),
        delivery: job.delivery.clone(),
    };
    let event = |kind: Kind, outcome: &str| {
        let mut e = AuditEvent::new(kind, Some(job.id), outcome);
        e.about = Some(about.clone());
        e
    };
    let mut out = Vec::new();
    if let Some(evidence) = &rec.evidence {
        let found = match rec.result {
            "not_on_call" => "not_on_call",
            _ => "on_call",
        };
        let mut checked = event(Kind::Checked, found);
        checked.detail = Some(evidence.clone());
        out.push(checked);
    }
    match rec.result {
        "not_on_call" | "not_allowed" => {
            let mut refused = event(Kind::Refused, rec.result);
            refused.reason = match rec.result {
                "not_on_call" => Some("not on call".to_owned()),
                _ => rec.settled.error.clone(),
            };
            out.push(refused);
        }
        // Refused as it was stored (its event says so), or no call made yet.
        "refused" | "check_failed" | "internal_error" | "unreadable" => {}
        result => {
            let mut sent = event(Kind::Sent, result);
            sent.status = rec.settled.status.filter(|s| *s != 0);
            sent.detail = match result {
                "dry_run" => Some("P0 not called (--dry-run)".to_owned()),
                _ => rec.settled.error.clone(),
            };
            out.push(sent);
        }
    }
    if rec.settled.state == State::Dead {
        let mut dead = event(Kind::Dead, rec.result);
        dead.reason = rec.settled.error.clone();
        out.push(dead);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Action;
    use crate::secret::Secret;
    use crate::store::{Settings, SqliteStore, Windows};
    use wiremock::{Mock, MockServer, ResponseTemplate, matchers::method};

    fn retry() -> RetrySettings {
        RetrySettings {
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(50),
            max_age: Duration::from_secs(3600),
            max_attempts: 0,
        }
    }

    /// A worker whole (every field named), calling the P0 at `p0`, answering nowhere.
    fn worker(store: &StoreHandle, p0: &MockServer) -> Worker {
        let metrics = Metrics::new(["github"]).unwrap();
        let answers = crate::config::AnswerSettings {
            github: None,
            pagerduty: None,
            opsgenie: None,
            jsm: None,
            concurrency: 1,
            rate_per_second: 0,
            timeout: Duration::from_secs(2),
            retry: retry(),
            oncall_cache: Duration::from_secs(60),
            oncall_recheck_after: Duration::from_secs(900),
            off: Vec::new(),
        };
        Worker {
            store: store.clone(),
            client: Some(
                p0::Client::new(
                    p0.uri().parse().unwrap(),
                    Secret::new("t"),
                    Duration::from_secs(2),
                )
                .unwrap(),
            ),
            pacing: Arc::new(KeyedLimit::per_second(0, 1)),
            oncall: Arc::new(
                crate::oncall::Checker::new(answers, Duration::from_secs(60), metrics.clone())
                    .unwrap(),
            ),
            metrics,
            retry: retry(),
            concurrency: 2,
            wake: Arc::new(Notify::new()),
            answer_via: Vec::new(),
            answer_wake: Arc::new(Notify::new()),
            health: Arc::new(Health::default()),
            mappings: Arc::new(ArcSwap::from_pointee(MappingSet::default())),
            recheck_after: Duration::from_secs(900),
        }
    }

    /// A store in `dir` holding one delivery of `decisions` (job IDs from 1, in order).
    async fn store_with(dir: &std::path::Path, decisions: &[(Action, &str)]) -> StoreHandle {
        let windows = Windows {
            dedup: Duration::from_secs(3600),
            coalesce: Duration::from_secs(600),
        };
        let (sqlite, _writer) =
            SqliteStore::open(&dir.join("relay.db"), &Settings::new(windows)).unwrap();
        let store = StoreHandle::new(sqlite);
        store
            .accept(crate::store::tests::delivery("d-1", decisions))
            .await
            .unwrap();
        store
    }

    /// Runs `worker` until each job is in the state given (or 5 s pass): the states seen.
    async fn run_until(worker: Worker, store: &StoreHandle, want: &[(i64, &str)]) -> Vec<String> {
        let shutdown = CancellationToken::new();
        let run = tokio::spawn(worker.run(shutdown.clone(), Duration::from_secs(1)));
        let mut states = Vec::new();
        for _ in 0..200 {
            states.clear();
            for (id, _) in want {
                states.push(store.show(*id).await.unwrap().unwrap().job.state);
            }
            if states.iter().zip(want).all(|(s, (_, w))| s == w) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        shutdown.cancel();
        run.await.unwrap();
        states
    }

    /// Regression: a call task that panicked was dropped silently and left its decision
    /// `sending` until the next restart.
    #[tokio::test]
    async fn a_call_that_panics_returns_its_decision_to_pending_and_it_is_sent_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with(dir.path(), &[(Action::Revoke, "panic-1")]).await;
        let p0 = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(200))
            .mount(&p0)
            .await;
        let states = run_until(worker(&store, &p0), &store, &[(1, "succeeded")]).await;
        assert_eq!(states, ["succeeded"]);
        let detail = store.show(1).await.unwrap().unwrap();
        let results: Vec<&str> = detail.attempts.iter().map(|a| a.result.as_str()).collect();
        assert_eq!(results, ["internal_error", "success"]);
        assert_eq!(p0.received_requests().await.unwrap().len(), 1);
    }

    /// Regression: a stored reply or on-call check that could not be read made the whole job
    /// dead, so a revoke was never sent. A revoke is sent; an approve is refused, unsent.
    #[tokio::test]
    async fn a_garbled_reply_or_check_holds_back_no_revoke_and_refuses_an_approve() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with(
            dir.path(),
            &[(Action::Revoke, "r-1"), (Action::Approve, "a-1")],
        )
        .await;
        let garble = rusqlite::Connection::open(dir.path().join("relay.db")).unwrap();
        garble
            .execute("UPDATE jobs SET reply = 'nope', gate = 'nope'", [])
            .unwrap();
        let p0 = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(200))
            .mount(&p0)
            .await;
        let states = run_until(
            worker(&store, &p0),
            &store,
            &[(1, "succeeded"), (2, "rejected")],
        )
        .await;
        assert_eq!(states, ["succeeded", "rejected"]);
        let sent = p0.received_requests().await.unwrap();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].url.path(), "/o/acme/permission-requests/r-1/revoke");
        let refused = store.show(2).await.unwrap().unwrap();
        let error = refused.attempts[0].error.as_deref().unwrap_or_default();
        assert!(
            error.contains("the stored on-call check is unreadable"),
            "{error}"
        );
    }
}
