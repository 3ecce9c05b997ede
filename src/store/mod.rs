//! Durable deliveries and decisions behind one interface (`Store`), and the handle the async
//! relay uses, `StoreHandle`: on SQLite a dedicated thread that commits everything waiting in
//! one transaction and one sync (group commit), on PostgreSQL a task that does the same over a
//! connection pool, so durability does not cost throughput.

#[cfg(test)]
mod contract;
pub mod location;
pub mod pg_tls;
pub mod postgres;
pub mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::domain::{Action, Binding};
use crate::policy::Decision;

pub use location::{PgLocation, StoreLocation};
pub use postgres::{Leased, PgStore};
pub use sqlite::SqliteStore;

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

/// A decision claimed for delivery to P0.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: i64,
    pub source: String,
    pub org: String,
    pub request_id: String,
    pub action: Action,
    pub expiration: Option<String>,
    pub attempts: u32,
    pub accepted_at_ms: i64,
    /// When the retry clock started: acceptance, or the last replay.
    pub window_start_ms: i64,
    /// The claim token: a job's outcome is recorded only with the token of its current claim,
    /// so a relay whose claim was taken over cannot overwrite another's outcome.
    pub claim: i64,
    /// What the decision was asked on, where to answer (JSON `domain::Reply`), and whether
    /// it is a revocation made by its subject's end.
    pub subject: Option<String>,
    pub reply: Option<String>,
    pub bound: bool,
    /// Set when the store refused the decision as it was accepted (its subject had ended):
    /// the worker records it rejected with this reason, and never calls P0 for it.
    pub refused: Option<String>,
    /// The on-call check an approve must pass before it is sent (JSON of `domain::Gate`),
    /// and what a check found; a job with evidence passed it (a refusal is final).
    pub gate: Option<String>,
    pub evidence: Option<String>,
    /// When the evidence was found: an approve not sent soon enough after it is checked again.
    pub checked_at_ms: Option<i64>,
    /// The rule and the actor of the delivery that made it: the worker checks an approve
    /// against this relay's own grant policy for that rule (its approver list, its switch,
    /// its on-call check) as well as the check it was stored with.
    pub rule: Option<String>,
    pub actor: Option<String>,
}

/// Why a request an ending event names is not revoked: it was not granted under the subject
/// that ends (an end revokes only what was approved under it). The same from every store.
pub fn unbound_reason(request_id: &str, subject: &str) -> String {
    format!(
        "request {request_id} is not granted under subject {subject}: an end revokes only what was approved under it"
    )
}

/// The reason an approve under an ended subject is refused, the same from every store.
pub fn ended_reason(subject: &str, ended_at_ms: i64) -> String {
    let at = std::time::UNIX_EPOCH
        + Duration::from_millis(u64::try_from(ended_at_ms).unwrap_or_default());
    format!(
        "subject {subject} ended at {}",
        humantime::format_rfc3339_seconds(at)
    )
}

/// The outcome of one attempt, and the state it leaves the job in.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub job_id: i64,
    /// The token of the claim this attempt was made under (`Job::claim`).
    pub claim: i64,
    pub at_ms: i64,
    pub state: State,
    pub attempts: u32,
    pub next_attempt_at_ms: i64,
    pub status: Option<u16>,
    pub result: &'static str,
    pub error: Option<String>,
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
    pub claim: i64,
}

/// The outcome of one answer attempt.
#[derive(Debug, Clone)]
pub struct AnswerRecord {
    pub id: i64,
    pub claim: i64,
    pub at_ms: i64,
    pub state: State,
    pub attempts: u32,
    pub next_attempt_at_ms: i64,
    pub status: Option<u16>,
    pub error: Option<String>,
}

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

#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub state: Option<State>,
    pub source: Option<String>,
    pub subject: Option<String>,
    pub limit: usize,
}

/// What one claim (of P0 jobs or of answers) took, and what the store holds beyond it.
#[derive(Debug)]
pub struct Claimed<T> {
    pub items: Vec<T>,
    /// Asked only when the claim took fewer than it asked for (a full claim means more may
    /// be due now, and `Beyond::default()` stands for "not asked"): on SQLite in the same trip
    /// to the writer; `None` after a short claim on PostgreSQL, where the claimed items go out
    /// first (their leases are running) and the loop asks afterwards
    /// (`StoreHandle::after_claim`, `after_answer_claim`: `followed` before `next_due`).
    pub beyond: Option<Beyond>,
}

/// What the store holds beyond a claim that took every item due.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Beyond {
    /// When the next item falls due.
    pub next_due: Option<i64>,
    /// The jobs in flight that a pending job of the same request waits behind (its turn
    /// comes when that one ends); `None` when that could not be told (any end is then a
    /// reason to look). Answers never wait.
    pub followed: Option<Vec<i64>>,
}

impl Beyond {
    /// From the store's answers; a failed question errs on the side of looking again: the
    /// end of any call in flight then sends the loop back (and the poll at the latest).
    fn from(
        next_due: Result<Option<i64>, StoreError>,
        followed: Result<Vec<i64>, StoreError>,
    ) -> Self {
        match (next_due, followed) {
            (Ok(next_due), Ok(followed)) => Self {
                next_due,
                followed: Some(followed),
            },
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(error = %e, "cannot tell what falls due next; looking again when a call ends");
                Self {
                    next_due: None,
                    followed: None,
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub pending: u64,
    pub dead: u64,
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

/// A job `replay` may queue again, as a store reads it: the latest job on its request, and its
/// subject's end (when it ended, whether it reopened since).
pub(crate) struct Candidate {
    pub id: i64,
    pub action: String,
    pub latest: i64,
    pub latest_action: String,
    pub subject: Option<String>,
    pub created_at: i64,
    pub ended_at: Option<i64>,
    pub reopened: bool,
}

impl Candidate {
    /// Sorts the candidate into `replayed`; true when it is to be queued again. Only a
    /// request's latest decision is; an approve never, while its subject is ended or when it
    /// ended after the approve was asked (a reopened issue's old approval stays old).
    pub(crate) fn sort(&self, replayed: &mut Replayed) -> Result<bool, StoreError> {
        let action = |a: &str| {
            Action::parse(a).ok_or_else(|| {
                StoreError::Invalid(format!("job {}: unknown action `{a}`", self.id))
            })
        };
        if self.id != self.latest {
            replayed.overtaken.push(Overtaken {
                job: self.id,
                action: action(&self.action)?,
                by: self.latest,
                by_action: action(&self.latest_action)?,
            });
            return Ok(false);
        }
        if action(&self.action)? == Action::Approve
            && let (Some(subject), Some(at)) = (&self.subject, self.ended_at)
            && (!self.reopened || at >= self.created_at)
        {
            let mut reason = ended_reason(subject, at);
            if self.reopened {
                reason
                    .push_str(", after this approve was asked (it has reopened since: ask again)");
            }
            replayed.ended.push((self.id, reason));
            return Ok(false);
        }
        replayed.queued.push(self.id);
        Ok(true)
    }
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prune {
    pub finished_before_ms: i64,
    pub ends_before_ms: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("store: {0}")]
    Io(#[from] std::io::Error),
    #[error("store: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// The database cannot be reached now (the receiver answers 503 with `Retry-After`).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Invalid(String),
    #[error("store is shut down")]
    Closed,
}

/// The durable store, as the SQLite writer thread drives it. Each call that writes is one
/// transaction, committed and synced before it returns. `PgStore` offers the same operations,
/// async and safe for many relays at once; `contract.rs` holds both to the same tests.
pub trait Store: Send {
    /// Stores each delivery with its decisions (deduplicating by source and dedup key,
    /// coalescing repeated decisions) and records attempt outcomes, all in one transaction
    /// synced once. A delivery that fails is left out alone; the outer error means nothing
    /// was committed.
    fn write(
        &mut self,
        deliveries: &[NewDelivery],
        records: &[AttemptRecord],
        now_ms: i64,
    ) -> Result<Vec<Result<Accepted, StoreError>>, StoreError>;
    /// Marks up to `limit` due pending jobs as sending and returns them.
    fn claim_due(&mut self, now_ms: i64, limit: usize) -> Result<Vec<Job>, StoreError>;
    /// When the earliest pending job in its turn falls due.
    fn next_due(&mut self) -> Result<Option<i64>, StoreError>;
    /// The jobs in flight (`sending`) that a pending job of the same request waits behind:
    /// its turn comes when that one ends, so the end of that call is a reason to claim again.
    fn followed(&mut self) -> Result<Vec<i64>, StoreError>;
    /// Returns jobs left `sending` by a stop to `pending`; returns how many.
    fn recover(&mut self) -> Result<usize, StoreError>;
    fn counts(&mut self) -> Result<Counts, StoreError>;
    fn list(&mut self, filter: &ListFilter) -> Result<Vec<JobSummary>, StoreError>;
    fn show(&mut self, id: i64) -> Result<Option<JobDetail>, StoreError>;
    /// Makes dead (or rejected, when named) jobs pending again, each only while it is still
    /// the latest decision on its request.
    fn replay(&mut self, which: Replay, now_ms: i64) -> Result<Replayed, StoreError>;
    /// Forgets finished jobs, deliveries and subject ends past their windows (`Prune`).
    fn prune(&mut self, before: Prune) -> Result<usize, StoreError>;
    /// A cheap check, run every second or so, that the store can take a write now; what
    /// `/readyz` reports about the store comes from it.
    fn probe(&mut self) -> Result<(), StoreError>;
    /// Marks up to `limit` due pending answers as sending and returns them.
    fn claim_answers(&mut self, now_ms: i64, limit: usize) -> Result<Vec<AnswerJob>, StoreError>;
    /// Records an answer attempt (only under the claim it was made with).
    fn record_answer(&mut self, rec: &AnswerRecord) -> Result<(), StoreError>;
    /// When the earliest pending answer falls due.
    fn next_answer_due(&mut self) -> Result<Option<i64>, StoreError>;
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// What the writer thread is asked to do: writes, which share one transaction per batch, and
/// other requests, answered after it.
enum Op {
    Accept(NewDelivery, oneshot::Sender<Result<Accepted, StoreError>>),
    Record(AttemptRecord, oneshot::Sender<Result<(), StoreError>>),
    Other(Other),
}

enum Other {
    Claim(usize, oneshot::Sender<Result<Claimed<Job>, StoreError>>),
    NextDue(oneshot::Sender<Result<Option<i64>, StoreError>>),
    Followed(oneshot::Sender<Result<Vec<i64>, StoreError>>),
    NextAnswerDue(oneshot::Sender<Result<Option<i64>, StoreError>>),
    Counts(oneshot::Sender<Result<Counts, StoreError>>),
    Prune(Prune, oneshot::Sender<Result<usize, StoreError>>),
    Probe(oneshot::Sender<Result<(), StoreError>>),
    List(
        ListFilter,
        oneshot::Sender<Result<Vec<JobSummary>, StoreError>>,
    ),
    Show(i64, oneshot::Sender<Result<Option<JobDetail>, StoreError>>),
    Replay(Replay, oneshot::Sender<Result<Replayed, StoreError>>),
    ClaimAnswers(
        usize,
        oneshot::Sender<Result<Claimed<AnswerJob>, StoreError>>,
    ),
    RecordAnswer(Box<AnswerRecord>, oneshot::Sender<Result<(), StoreError>>),
}

/// The async face of a store, the one the receiver, the worker and the command line use:
/// cheap to clone, bounded; a writer thread (SQLite) or a writer task and a pool (PostgreSQL)
/// behind it.
#[derive(Clone)]
pub struct StoreHandle {
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    Sqlite(mpsc::Sender<Op>),
    Postgres(Arc<postgres::Shared>),
}

/// The order a batch's deliveries are written in: arrival order, except that deliveries that
/// end their subjects come after all the others, so an end sees every approve it shares a
/// batch with (both stores, and the PostgreSQL function, keep this order).
pub(crate) fn batch_order(deliveries: &[NewDelivery]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..deliveries.len()).collect();
    order.sort_by_key(|&i| deliveries[i].binding.ends_subject);
    order
}

/// Results made in `order` (from `batch_order`), put back in arrival order.
pub(crate) fn in_arrival_order<R>(order: &[usize], made: Vec<R>) -> Vec<R> {
    let mut placed: Vec<(usize, R)> = order.iter().copied().zip(made).collect();
    placed.sort_by_key(|(i, _)| *i);
    placed.into_iter().map(|(_, r)| r).collect()
}

/// How many waiting operations one transaction may take.
const MAX_BATCH: usize = 1024;

/// What keeps a store's writer running; `join` waits for it to finish once every handle is
/// gone and its queue is drained.
pub enum StoreTask {
    Thread(std::thread::JoinHandle<()>),
    Task(tokio::task::JoinHandle<()>),
}

impl StoreTask {
    pub async fn join(self) {
        match self {
            StoreTask::Thread(t) => {
                let _ = tokio::task::spawn_blocking(move || t.join()).await;
            }
            StoreTask::Task(t) => {
                let _ = t.await;
            }
        }
    }
}

/// Opens the store at `location` for a relay (creating or migrating it), returns decisions
/// left in flight by a stop to pending, and starts its writer.
pub async fn open(
    location: &StoreLocation,
    windows: Windows,
    store_payloads: bool,
    claim_lease: Duration,
    group_commit: bool,
) -> Result<(StoreHandle, StoreTask), StoreError> {
    open_for(
        location,
        windows,
        store_payloads,
        claim_lease,
        group_commit,
        true,
    )
    .await
}

/// Opens the store for inspection (`p0-relay jobs`): nothing in flight is touched, so relays
/// running on the same store go on undisturbed.
pub async fn inspect(
    location: &StoreLocation,
    windows: Windows,
) -> Result<(StoreHandle, StoreTask), StoreError> {
    let lease = Duration::from_secs(30);
    open_for(location, windows, false, lease, true, false).await
}

async fn open_for(
    location: &StoreLocation,
    windows: Windows,
    store_payloads: bool,
    claim_lease: Duration,
    group_commit: bool,
    recover: bool,
) -> Result<(StoreHandle, StoreTask), StoreError> {
    let max = if group_commit { MAX_BATCH } else { 1 };
    match location {
        StoreLocation::Sqlite(path) => {
            let mut store = SqliteStore::open(path, windows, store_payloads)?;
            if let Err(e) = store.checkpoint_in_background(path) {
                // The writer's own checkpoints (past a backstop) still keep the WAL bounded.
                tracing::warn!(error = %e, "cannot start the store's checkpoint thread");
            }
            let resumed = if recover { store.recover()? } else { 0 };
            if resumed > 0 {
                tracing::warn!(
                    resumed,
                    "decisions in flight at the last stop are queued again"
                );
            }
            let (handle, thread) = StoreHandle::spawn(Box::new(store), group_commit)?;
            Ok((handle, StoreTask::Thread(thread)))
        }
        StoreLocation::Postgres(pg) => {
            let store = PgStore::open(pg, windows, store_payloads, claim_lease).await?;
            if recover {
                store.recover(now_ms()).await?;
            }
            let (shared, task) = postgres::Shared::spawn(store, max, MAX_BATCH * 4);
            Ok((
                StoreHandle {
                    backend: Backend::Postgres(Arc::new(shared)),
                },
                StoreTask::Task(task),
            ))
        }
    }
}

impl StoreHandle {
    /// Starts the writer thread. With `group_commit` off every delivery gets its own
    /// transaction (for comparison in benchmarks).
    pub fn spawn(
        store: Box<dyn Store>,
        group_commit: bool,
    ) -> std::io::Result<(StoreHandle, std::thread::JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel(MAX_BATCH * 4);
        let max = if group_commit { MAX_BATCH } else { 1 };
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer(store, rx, max))?;
        Ok((
            StoreHandle {
                backend: Backend::Sqlite(tx),
            },
            thread,
        ))
    }

    async fn call<T>(
        tx: &mpsc::Sender<Op>,
        op: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Op,
    ) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        tx.send(op(reply)).await.map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn write<T>(
        pg: &postgres::Shared,
        op: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> postgres::Write,
    ) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        pg.writes
            .send(op(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// The PostgreSQL store behind this handle, if that is the backend.
    pub fn postgres(&self) -> Option<&PgStore> {
        match &self.backend {
            Backend::Sqlite(_) => None,
            Backend::Postgres(pg) => Some(&pg.store),
        }
    }

    pub async fn accept(&self, d: NewDelivery) -> Result<Accepted, StoreError> {
        match &self.backend {
            Backend::Sqlite(tx) => Self::call(tx, |r| Op::Accept(d, r)).await,
            Backend::Postgres(pg) => Self::write(pg, |r| postgres::Write::Accept(d, r)).await,
        }
    }
    /// Stores several deliveries (the elements of one webhook): all are queued before any
    /// reply is awaited, so they normally share one transaction. The first error is returned;
    /// what was stored before it stays stored, and a retry finds it a duplicate.
    pub async fn accept_each(&self, ds: Vec<NewDelivery>) -> Result<Vec<Accepted>, StoreError> {
        let mut replies = Vec::with_capacity(ds.len());
        for d in ds {
            let (reply, rx) = oneshot::channel();
            let sent = match &self.backend {
                Backend::Sqlite(tx) => tx.send(Op::Accept(d, reply)).await.is_ok(),
                Backend::Postgres(pg) => pg
                    .writes
                    .send(postgres::Write::Accept(d, reply))
                    .await
                    .is_ok(),
            };
            if !sent {
                return Err(StoreError::Closed);
            }
            replies.push(rx);
        }
        let mut out = Vec::with_capacity(replies.len());
        for rx in replies {
            out.push(rx.await.map_err(|_| StoreError::Closed)??);
        }
        Ok(out)
    }
    pub async fn record(&self, rec: AttemptRecord) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sqlite(tx) => Self::call(tx, |r| Op::Record(rec, r)).await,
            Backend::Postgres(pg) => Self::write(pg, |r| postgres::Write::Record(rec, r)).await,
        }
    }
    /// Claims up to `limit` due decisions (`Claimed`: on SQLite with what lies beyond them
    /// when they were fewer).
    pub async fn claim_due(&self, limit: usize) -> Result<Claimed<Job>, StoreError> {
        match &self.backend {
            Backend::Sqlite(tx) => Self::call(tx, |r| Op::Other(Other::Claim(limit, r))).await,
            Backend::Postgres(pg) => {
                let jobs = pg.store.claim_due(now_ms(), limit).await?;
                let beyond = (jobs.len() >= limit).then(Beyond::default);
                Ok(Claimed {
                    items: jobs,
                    beyond,
                })
            }
        }
    }
    /// What lies beyond a claim of decisions that took every one due, when the claim did not
    /// say (PostgreSQL).
    pub async fn after_claim(&self) -> Beyond {
        match &self.backend {
            // `followed` first, then `next_due`: a job that ends between the two is either
            // listed (its end sends the worker back) or already over (its follower is due).
            Backend::Sqlite(tx) => {
                let followed = Self::call(tx, |r| Op::Other(Other::Followed(r))).await;
                let next_due = Self::call(tx, |r| Op::Other(Other::NextDue(r))).await;
                Beyond::from(next_due, followed)
            }
            Backend::Postgres(pg) => {
                let followed = pg.store.followed().await;
                let next_due = pg.store.next_due().await;
                Beyond::from(next_due, followed)
            }
        }
    }
    pub async fn counts(&self) -> Result<Counts, StoreError> {
        match &self.backend {
            Backend::Sqlite(tx) => Self::call(tx, |r| Op::Other(Other::Counts(r))).await,
            Backend::Postgres(pg) => pg.store.counts().await,
        }
    }
    pub async fn prune(&self, before: Prune) -> Result<usize, StoreError> {
        match &self.backend {
            Backend::Sqlite(tx) => Self::call(tx, |r| Op::Other(Other::Prune(before, r))).await,
            Backend::Postgres(pg) => pg.store.prune(before).await,
        }
    }
    pub async fn list(&self, filter: ListFilter) -> Result<Vec<JobSummary>, StoreError> {
        match &self.backend {
            Backend::Sqlite(tx) => Self::call(tx, |r| Op::Other(Other::List(filter, r))).await,
            Backend::Postgres(pg) => pg.store.list(&filter).await,
        }
    }
    pub async fn show(&self, id: i64) -> Result<Option<JobDetail>, StoreError> {
        match &self.backend {
            Backend::Sqlite(tx) => Self::call(tx, |r| Op::Other(Other::Show(id, r))).await,
            Backend::Postgres(pg) => pg.store.show(id).await,
        }
    }
    pub async fn replay(&self, which: Replay) -> Result<Replayed, StoreError> {
        match &self.backend {
            Backend::Sqlite(tx) => Self::call(tx, |r| Op::Other(Other::Replay(which, r))).await,
            Backend::Postgres(pg) => pg.store.replay(which, now_ms()).await,
        }
    }

    /// Claims up to `limit` due answers, as `claim_due` does decisions.
    pub async fn claim_answers(&self, limit: usize) -> Result<Claimed<AnswerJob>, StoreError> {
        match &self.backend {
            Backend::Sqlite(tx) => {
                Self::call(tx, |r| Op::Other(Other::ClaimAnswers(limit, r))).await
            }
            Backend::Postgres(pg) => {
                let answers = pg.store.claim_answers(now_ms(), limit).await?;
                let beyond = (answers.len() >= limit).then(Beyond::default);
                Ok(Claimed {
                    items: answers,
                    beyond,
                })
            }
        }
    }
    /// What lies beyond a claim of answers that took every one due, when the claim did not
    /// say (PostgreSQL).
    pub async fn after_answer_claim(&self) -> Beyond {
        let next_due = match &self.backend {
            Backend::Sqlite(tx) => Self::call(tx, |r| Op::Other(Other::NextAnswerDue(r))).await,
            Backend::Postgres(pg) => pg.store.next_answer_due().await,
        };
        Beyond::from(next_due, Ok(Vec::new()))
    }
    pub async fn record_answer(&self, rec: AnswerRecord) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sqlite(tx) => {
                Self::call(tx, |r| Op::Other(Other::RecordAnswer(Box::new(rec), r))).await
            }
            Backend::Postgres(pg) => pg.store.record_answer(&rec).await,
        }
    }

    /// Wakes `wake` whenever any relay sharing the store commits new work (PostgreSQL's
    /// LISTEN/NOTIFY); on SQLite the relay is alone and wakes itself.
    pub fn wake_on_new_work(&self, wake: Arc<Notify>) {
        if let Backend::Postgres(pg) = &self.backend {
            pg.listen(wake);
        }
    }

    /// Keeps the claim on `job` while its call is under way (renewing its lease); returns only
    /// if the claim is lost, and then the call must be dropped. Never returns on SQLite, where
    /// one relay owns the store.
    pub async fn hold_claim(&self, job: &Job) {
        self.hold(Leased::Job, job.id, job.claim).await;
    }
    /// Keeps the claim on `answer` while it is being sent, as `hold_claim` does for a job.
    pub async fn hold_answer_claim(&self, answer: &AnswerJob) {
        self.hold(Leased::Answer, answer.id, answer.claim).await;
    }
    async fn hold(&self, what: Leased, id: i64, claim: i64) {
        match &self.backend {
            Backend::Sqlite(_) => std::future::pending().await,
            Backend::Postgres(pg) => pg.hold_claim(what, id, claim).await,
        }
    }
    /// Whether the store can take a write now. On SQLite it goes through the writer thread
    /// like any request, so a dead or stuck writer fails it too; on PostgreSQL it asks a pooled
    /// connection for `SELECT 1` within a short deadline.
    pub async fn probe(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sqlite(tx) => Self::call(tx, |r| Op::Other(Other::Probe(r))).await,
            Backend::Postgres(pg) => pg.store.probe().await,
        }
    }

    /// Upkeep between probes: on PostgreSQL, fresh planner statistics for the jobs table
    /// (`PgStore::refresh_statistics`); nothing on SQLite.
    pub async fn upkeep(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(()),
            Backend::Postgres(pg) => pg.store.refresh_statistics(now_ms()).await.map(|_| ()),
        }
    }
}

fn writer(mut store: Box<dyn Store>, mut rx: mpsc::Receiver<Op>, max_batch: usize) {
    let mut deliveries = Vec::new();
    let mut accept_replies = Vec::new();
    let mut records = Vec::new();
    let mut record_replies = Vec::new();
    let mut others = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        // Everything waiting now goes into one transaction and one sync (group commit).
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(op) = next.take() {
            taken += 1;
            match op {
                Op::Accept(d, reply) => {
                    deliveries.push(d);
                    accept_replies.push(reply);
                }
                Op::Record(r, reply) => {
                    records.push(r);
                    record_replies.push(reply);
                }
                Op::Other(other) => others.push(other),
            }
            if taken < max_batch {
                next = rx.try_recv().ok();
            }
        }
        if !deliveries.is_empty() || !records.is_empty() {
            match store.write(&deliveries, &records, now_ms()) {
                Ok(results) => {
                    for (reply, result) in accept_replies.drain(..).zip(results) {
                        let _ = reply.send(result);
                    }
                    for reply in record_replies.drain(..) {
                        let _ = reply.send(Ok(()));
                    }
                }
                Err(e) => {
                    let text = e.to_string();
                    for reply in accept_replies.drain(..) {
                        let _ = reply.send(Err(StoreError::Invalid(text.clone())));
                    }
                    for reply in record_replies.drain(..) {
                        let _ = reply.send(Err(StoreError::Invalid(text.clone())));
                    }
                }
            }
            deliveries.clear();
            records.clear();
        }
        for op in others.drain(..) {
            match op {
                Other::Claim(limit, reply) => {
                    let claimed = store.claim_due(now_ms(), limit).map(|jobs| {
                        let beyond = if jobs.len() >= limit {
                            Beyond::default()
                        } else {
                            let followed = store.followed();
                            Beyond::from(store.next_due(), followed)
                        };
                        Claimed {
                            items: jobs,
                            beyond: Some(beyond),
                        }
                    });
                    let _ = reply.send(claimed);
                }
                Other::NextDue(reply) => {
                    let _ = reply.send(store.next_due());
                }
                Other::Followed(reply) => {
                    let _ = reply.send(store.followed());
                }
                Other::NextAnswerDue(reply) => {
                    let _ = reply.send(store.next_answer_due());
                }
                Other::Counts(reply) => {
                    let _ = reply.send(store.counts());
                }
                Other::Prune(before, reply) => {
                    let _ = reply.send(store.prune(before));
                }
                Other::Probe(reply) => {
                    let _ = reply.send(store.probe());
                }
                Other::List(filter, reply) => {
                    let _ = reply.send(store.list(&filter));
                }
                Other::Show(id, reply) => {
                    let _ = reply.send(store.show(id));
                }
                Other::Replay(which, reply) => {
                    let _ = reply.send(store.replay(which, now_ms()));
                }
                Other::ClaimAnswers(limit, reply) => {
                    let claimed = store.claim_answers(now_ms(), limit).map(|answers| {
                        let beyond = if answers.len() >= limit {
                            Beyond::default()
                        } else {
                            Beyond::from(store.next_answer_due(), Ok(Vec::new()))
                        };
                        Claimed {
                            items: answers,
                            beyond: Some(beyond),
                        }
                    });
                    let _ = reply.send(claimed);
                }
                Other::RecordAnswer(rec, reply) => {
                    let _ = reply.send(store.record_answer(&rec));
                }
            }
        }
    }
}
