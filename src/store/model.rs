//! The store's vocabulary: what is written (deliveries, outcomes, answers), what is claimed
//! (jobs, answers), what is read back (summaries, details), and the clock and windows a store
//! works by. Shared by both backends and everything that uses them.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use serde::Serialize;

use async_trait::async_trait;

use super::audit::AuditEvent;
use super::{StoreError, StoreHandle};
use crate::domain::{Action, Binding, Expiration, Gate, Id, Reply};
use crate::policy::Decision;

/// A decision's life: `pending` → `sending` → `succeeded` | `rejected` | `dead` (or `dry_run`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Pending,
    Sending,
    Succeeded,
    Rejected,
    Dead,
    DryRun,
}

impl State {
    pub const ALL: [State; 6] = [
        State::Pending,
        State::Sending,
        State::Succeeded,
        State::Rejected,
        State::Dead,
        State::DryRun,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Sending => "sending",
            State::Succeeded => "succeeded",
            State::Rejected => "rejected",
            State::Dead => "dead",
            State::DryRun => "dry_run",
        }
    }

    pub fn parse(text: &str) -> Option<State> {
        State::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

/// A verified, mapped delivery and the decisions it carries, to be stored as one unit.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub source: String,
    pub dedup_key: String,
    pub received_at_ms: i64,
    pub rule: String,
    pub actor: Option<String>,
    pub payload: Option<Vec<u8>>,
    pub decisions: Vec<Decision>,
    /// The subject the decisions are bound to, where to answer, and whether this delivery
    /// ends the subject (then every request approved under it is revoked, in the same
    /// transaction).
    pub binding: Binding,
    /// Why its approves are refused though the rule allowed them (the event was stale): they
    /// are stored only to be recorded refused and answered back.
    pub refused: Option<String>,
}

impl NewDelivery {
    /// The on-call check its approves carry, as stored (JSON), if any.
    pub fn gate_json(&self) -> Option<String> {
        self.binding
            .gate
            .as_ref()
            .and_then(|g| serde_json::to_string(g).ok())
    }

    /// The reply target as stored with each job (JSON), if any.
    pub fn reply_json(&self) -> Option<String> {
        self.binding
            .reply
            .as_ref()
            .and_then(|r| serde_json::to_string(r).ok())
    }
}

/// What storing a delivery did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// Stored; one job per decision (an existing one when the decision was coalesced), and
    /// the revocations its subject end made.
    New {
        jobs: Vec<JobRef>,
        bound: Vec<BoundRevocation>,
        /// Why the delivery's decisions were refused (`subject ... ended at ...`: it asks to
        /// approve under a subject that has ended): each is stored as a job that the worker
        /// records as rejected, and answers back, without calling P0.
        refused: Option<String>,
        /// The delivery reopened its subject, which had ended.
        reopened: bool,
    },
    /// The same delivery was stored before: nothing new was stored.
    Duplicate { job_ids: Vec<i64> },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobRef {
    pub job_id: i64,
    /// The same decision was already pending or done: no second call will be made.
    pub coalesced: bool,
    /// Why the decision was stored refused (its subject had ended, the grant was stale, or an
    /// end named a request it had not bound): recorded and answered back, never sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

/// A revocation made because its subject ended: the request approved under it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BoundRevocation {
    pub job_id: i64,
    pub org: String,
    pub request_id: String,
}

/// A decision claimed for delivery to P0, read back as the values it was stored as: the
/// worker handles domain values only (a row that cannot be read so is `Unreadable`).
#[derive(Debug, Clone)]
pub struct Job {
    pub id: i64,
    pub source: String,
    pub org: Id,
    pub request_id: Id,
    pub action: Action,
    pub expiration: Option<Expiration>,
    pub attempts: u32,
    pub accepted_at_ms: i64,
    /// When the retry clock started: acceptance, or the last replay.
    pub window_start_ms: i64,
    /// The claim this job is held under: its outcome is recorded only with this token, so a
    /// relay whose claim was taken over cannot overwrite another's outcome.
    pub claim_token: i64,
    /// What the decision was asked on, where to answer, and whether it is a revocation made
    /// by its subject's end.
    pub subject: Option<String>,
    pub reply: Option<Reply>,
    pub bound: bool,
    /// Set when the store refused the decision as it was accepted (its subject had ended, the
    /// grant was stale, an end named a request it had not bound): the worker records it
    /// rejected with this reason, and never calls P0 for it.
    pub refused: Option<String>,
    /// The on-call check an approve must pass before it is sent, and what a check found and
    /// when; a job with recent evidence passed it (a refusal is final). An approve's stored
    /// check that cannot be read is `Err` (why): the approve is refused, never sent unchecked.
    pub gate: Result<Option<Gate>, String>,
    pub evidence: Option<String>,
    pub checked_at_ms: Option<i64>,
    /// The rule and the actor of the delivery that made it: the worker checks an approve
    /// against this relay's own grant policy for that rule (its approver list, its switch,
    /// its on-call check) as well as the check it was stored with.
    pub rule: Option<String>,
    pub actor: Option<String>,
    /// The dedup key of that delivery (for the audit trail).
    pub delivery: Option<String>,
}

/// A claimed row that cannot be read as a decision (a value the relay would never have stored:
/// the row was changed behind its back). The worker records it dead, naming what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable {
    pub id: i64,
    pub claim_token: i64,
    pub attempts: u32,
    pub why: String,
}

/// A claimed row: the item, or why it cannot be read.
pub type Claim<T> = Result<T, Unreadable>;

/// A claimed row the claim loop runs (`claims`): the claim it is held under, and how the
/// store claims it and records what came of it.
#[async_trait]
pub trait Claimable: Clone + Send + Sync + 'static {
    /// What running it came to, as the store records it.
    type Outcome: Clone + Send + Sync + 'static;
    /// What it is, for the log ("decisions", "answers").
    const NAME: &'static str;
    fn held(&self) -> Held;
    /// The P0 job it is, if it is one (a job others of its request may wait on).
    fn job(&self) -> Option<i64>;
    async fn claim(store: &StoreHandle, limit: usize) -> Result<Claimed<Self>, StoreError>;
    /// What lies ahead of a short claim that did not say.
    async fn ahead(store: &StoreHandle) -> Ahead;
    async fn record(store: &StoreHandle, outcome: Self::Outcome) -> Result<(), StoreError>;
}

#[async_trait]
impl Claimable for Job {
    type Outcome = AttemptRecord;
    const NAME: &'static str = "decisions";

    fn held(&self) -> Held {
        Held {
            what: Leased::Job,
            id: self.id,
            claim_token: self.claim_token,
        }
    }

    fn job(&self) -> Option<i64> {
        Some(self.id)
    }

    async fn claim(store: &StoreHandle, limit: usize) -> Result<Claimed<Job>, StoreError> {
        store.claim_jobs(limit).await
    }

    async fn ahead(store: &StoreHandle) -> Ahead {
        store.jobs_ahead().await
    }

    async fn record(store: &StoreHandle, outcome: AttemptRecord) -> Result<(), StoreError> {
        store.record(outcome).await
    }
}

#[async_trait]
impl Claimable for AnswerJob {
    type Outcome = AnswerRecord;
    const NAME: &'static str = "answers";

    fn held(&self) -> Held {
        Held {
            what: Leased::Answer,
            id: self.id,
            claim_token: self.claim_token,
        }
    }

    /// Answers never hold up a P0 job.
    fn job(&self) -> Option<i64> {
        None
    }

    async fn claim(store: &StoreHandle, limit: usize) -> Result<Claimed<AnswerJob>, StoreError> {
        store.claim_answers(limit).await
    }

    async fn ahead(store: &StoreHandle) -> Ahead {
        store.answers_ahead().await
    }

    async fn record(store: &StoreHandle, outcome: AnswerRecord) -> Result<(), StoreError> {
        store.record_answer(outcome).await
    }
}

/// The (ID, claim token) a claimed row is marked with, readable or not.
pub(crate) fn token<T: Claimable>(row: &Claim<T>) -> (i64, i64) {
    match row {
        Ok(item) => {
            let held = item.held();
            (held.id, held.claim_token)
        }
        Err(u) => (u.id, u.claim_token),
    }
}

/// A claim held while its call is under way: on a job (a P0 call) or an answer back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    pub what: Leased,
    pub id: i64,
    pub claim_token: i64,
}

/// What a claim lease is held on. Each is renewed while its call is under way, so a call
/// longer than the lease is not taken over and sent again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leased {
    Job,
    Answer,
}

/// A request still granted under a subject: its end would revoke it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Granted {
    /// The approve that granted it.
    pub job_id: i64,
    pub org: String,
    pub request_id: String,
    pub state: String,
}

/// What one attempt at a claimed item (a P0 call, an answer back) leaves: the state it puts
/// the item in and when it falls due again, what the far side said, and the audit events it
/// makes. Recorded only under the claim it was made with.
#[derive(Debug, Clone)]
pub struct Settled {
    /// The item (the job, the answer).
    pub id: i64,
    /// The token of the claim this attempt was made under (`Job::claim_token`).
    pub claim_token: i64,
    pub at_ms: i64,
    pub state: State,
    pub attempts: u32,
    pub next_attempt_at_ms: i64,
    pub status: Option<u16>,
    pub error: Option<String>,
    /// The audit events this attempt makes, written with it (none when its claim was lost).
    pub audit: Vec<AuditEvent>,
}

impl Settled {
    /// Attempt number `attempts` at item `id` at `now`, leaving it in `state`, to be filled in.
    pub fn new(id: i64, claim_token: i64, attempts: u32, state: State, now: i64) -> Settled {
        Settled {
            id,
            claim_token,
            at_ms: now,
            state,
            attempts,
            next_attempt_at_ms: now,
            status: None,
            error: None,
            audit: Vec::new(),
        }
    }
}

/// The outcome of one attempt at a P0 call, and the state it leaves the job in.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    /// The job (`settled.id`): its state, P0's status and error, the audit events.
    pub settled: Settled,
    pub result: &'static str,
    pub duration_ms: i64,
    /// What the decision's on-call check found, when this attempt ran it (kept on the job),
    /// and when.
    pub evidence: Option<String>,
    pub checked_at_ms: Option<i64>,
    /// Answers back to create with this outcome (P0's final answer), in the same transaction.
    pub answers: Vec<NewAnswer>,
}

/// One call answering back at a provider, as the worker composes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAnswer {
    /// `github`, `pagerduty`, `opsgenie`, `jsm`.
    pub via: String,
    /// `reaction`, `comment` or `note`.
    pub kind: String,
    /// Where (JSON: repository, number, comment; or the incident or alert ID).
    pub target: String,
    /// The JSON body to send.
    pub body: String,
}

/// An answer claimed for sending.
#[derive(Debug, Clone)]
pub struct AnswerJob {
    pub id: i64,
    pub job_id: i64,
    pub via: String,
    pub kind: String,
    pub target: String,
    pub body: String,
    pub attempts: u32,
    /// When its retry clock started (its creation).
    pub window_start_ms: i64,
    pub claim_token: i64,
}

/// The outcome of one answer attempt: what every attempt records, nothing more.
pub type AnswerRecord = Settled;

/// An answer as `jobs show` lists it under its decision.
#[derive(Debug, Clone, Serialize)]
pub struct AnswerRow {
    pub id: i64,
    pub via: String,
    pub kind: String,
    pub body: String,
    pub state: String,
    pub attempts: u32,
    pub updated_at_ms: i64,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct JobSummary {
    pub id: i64,
    pub source: String,
    pub org: String,
    pub request_id: String,
    pub action: String,
    pub expiration: Option<String>,
    pub state: String,
    pub attempts: u32,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub next_attempt_at_ms: i64,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub subject: Option<String>,
    /// The delivery whose subject end made this revocation.
    pub ended_by: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeliveryInfo {
    pub id: i64,
    pub source: String,
    pub dedup_key: String,
    pub received_at_ms: i64,
    pub rule: String,
    pub actor: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AttemptRow {
    pub at_ms: i64,
    pub status: Option<u16>,
    pub result: String,
    pub error: Option<String>,
    pub duration_ms: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct JobDetail {
    pub job: JobSummary,
    /// The on-call check the decision must pass (JSON of `domain::Gate`), and what it found.
    pub gate: Option<String>,
    pub evidence: Option<String>,
    pub delivery: DeliveryInfo,
    pub attempts: Vec<AttemptRow>,
    pub answers: Vec<AnswerRow>,
}

/// Which jobs `list` returns, newest first.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub state: Option<State>,
    pub source: Option<String>,
    pub subject: Option<String>,
    /// How many at most; 0 stands for 100.
    pub limit: usize,
}

impl ListFilter {
    pub(crate) fn limit_or_default(&self) -> usize {
        if self.limit == 0 { 100 } else { self.limit }
    }
}

/// What one claim (of P0 jobs or of answers) took, and what lies ahead of it in the store.
#[derive(Debug)]
pub struct Claimed<T> {
    pub items: Vec<T>,
    /// Claimed rows that cannot be read (`Unreadable`): recorded dead by whoever claimed them.
    pub unreadable: Vec<Unreadable>,
    /// What lies ahead, asked only when the claim took fewer than it asked for (a full claim
    /// means more may be due now, and `Ahead::default()` stands for "not asked"): on SQLite
    /// in the same trip to the writer; `None` after a short claim on PostgreSQL, where the
    /// claimed items go out first (their leases are running) and the loop asks afterwards
    /// (`Store::ahead`, `Store::answers_ahead`: `waited_on` before `next_due`).
    pub ahead: Option<Ahead>,
}

impl<T> Claimed<T> {
    /// The claimed rows, the unreadable ones apart; nothing yet known of what lies ahead.
    pub(crate) fn of(rows: Vec<Claim<T>>) -> Claimed<T> {
        let mut claimed = Claimed {
            items: Vec::with_capacity(rows.len()),
            unreadable: Vec::new(),
            ahead: None,
        };
        for row in rows {
            match row {
                Ok(item) => claimed.items.push(item),
                Err(u) => claimed.unreadable.push(u),
            }
        }
        claimed
    }

    fn full(&self, limit: usize) -> bool {
        self.items.len() + self.unreadable.len() >= limit
    }

    /// With what lies ahead asked now (`ahead`) when the claim took fewer than `limit`.
    pub(crate) fn with_ahead(mut self, limit: usize, ahead: impl FnOnce() -> Ahead) -> Self {
        self.ahead = Some(match self.full(limit) {
            true => Ahead::default(),
            false => ahead(),
        });
        self
    }

    /// With what lies ahead left to be asked after the items went out, when the claim took
    /// fewer than `limit`.
    pub(crate) fn ahead_asked_after(mut self, limit: usize) -> Self {
        self.ahead = self.full(limit).then(Ahead::default);
        self
    }
}

/// What lies ahead of a claim that took every item due.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ahead {
    /// When the next item falls due.
    pub next_due: Option<i64>,
    /// The jobs in flight that a pending job of the same request waits on (its turn comes
    /// when that one ends); `None` when that could not be told (any end is then a reason to
    /// look). Answers never wait.
    pub waited_on: Option<Vec<i64>>,
}

impl Ahead {
    /// From the store's answers; a failed question errs on the side of looking again: the
    /// end of any call in flight then sends the loop back (and the poll at the latest).
    pub fn from(
        next_due: Result<Option<i64>, StoreError>,
        waited_on: Result<Vec<i64>, StoreError>,
    ) -> Self {
        match (next_due, waited_on) {
            (Ok(next_due), Ok(waited_on)) => Self {
                next_due,
                waited_on: Some(waited_on),
            },
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(error = %e, "cannot tell what falls due next; looking again when a call ends");
                Self {
                    next_due: None,
                    waited_on: None,
                }
            }
        }
    }
}

/// Jobs waiting (pending or being sent) and dead, for the gauges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub pending: u64,
    pub dead: u64,
}

impl Counts {
    /// Adds `n` jobs in `state` (a count by state, as both stores read it).
    pub(crate) fn add(&mut self, state: &str, n: i64) {
        let n = u64::try_from(n).unwrap_or_default();
        match state {
            "dead" => self.dead += n,
            _ => self.pending += n,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Replay {
    One(i64),
    AllDead,
}

/// What a replay did: the jobs queued again; those left where they were because a later
/// decision on their request has overtaken them (sent now, an old approve would undo the
/// revoke after it, one a subject's end made, say); and approves left because their subject
/// has ended since they were asked, or is ended now (each with the reason).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replayed {
    pub queued: Vec<i64>,
    pub overtaken: Vec<Overtaken>,
    pub ended: Vec<(i64, String)>,
}

/// A job a replay left because a later decision on its request overtook it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overtaken {
    pub job: i64,
    pub action: Action,
    /// The latest job on the request, and its action.
    pub by: i64,
    pub by_action: Action,
}

/// Windows that decide what counts as the same delivery or the same decision.
#[derive(Debug, Clone, Copy)]
pub struct Windows {
    pub dedup: Duration,
    pub coalesce: Duration,
}

/// What pruning forgets: finished jobs and deliveries older than `finished_before_ms`, and
/// subject ends older than `ends_before_ms` (approves under such a subject are taken again)
/// once no dead or rejected job under the subject remains that a replay could send.
#[derive(Debug, Clone)]
pub struct Prune {
    pub finished_before_ms: i64,
    pub ends_before_ms: i64,
    /// Audit events before the last seal written before this are removed (`audit.retention`),
    /// and a `pruned` event says so.
    pub audit_before_ms: i64,
    /// `audit.key`: the `pruned` event carries a tag made with it, so that one written
    /// without the key cannot stand for events removed.
    pub audit_key: Option<crate::secret::Secret>,
}

/// The time a store works by: the system's, or one a test sets (`Clock::manual`), so the
/// contract tests hold both stores to the same explicit moments.
#[derive(Clone, Debug, Default)]
pub struct Clock(Option<Arc<AtomicI64>>);

impl Clock {
    pub fn system() -> Clock {
        Clock(None)
    }

    /// A clock at `ms` that moves only when set.
    pub fn manual(ms: i64) -> Clock {
        Clock(Some(Arc::new(AtomicI64::new(ms))))
    }

    pub fn set(&self, ms: i64) {
        if let Some(at) = &self.0 {
            at.store(ms, Ordering::SeqCst);
        }
    }

    pub fn now_ms(&self) -> i64 {
        match &self.0 {
            Some(at) => at.load(Ordering::SeqCst),
            None => now_ms(),
        }
    }
}

/// Milliseconds since 1970 on the system clock.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A duration in milliseconds, saturating.
pub fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
