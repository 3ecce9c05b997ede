//! The store's interface, one trait per concern, which both backends implement (`sqlite/`,
//! `postgres/`, a file per concern) and `Store` gathers: a new operation is a method here and
//! one implementation in each backend. Time comes from the store's `Clock`. Each step a write
//! makes is also an audit event in the same transaction (`audit`).

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::Notify;

use super::StoreError;
use super::audit::{AuditEvent, AuditRow, AuditStatus, Covers, SealRef, Start, Verification};
use super::batch::Parts;
use super::model::{
    Accepted, AnswerJob, AnswerRecord, AttemptRecord, Claimed, Counts, Granted, Held, Job,
    JobDetail, JobSummary, ListFilter, NewDelivery, Prune, Replay, Replayed,
};
use crate::secret::Secret;

/// Per delivery, what storing it did, or why it alone was left out.
pub type WriteResults = Vec<Result<Accepted, StoreError>>;

/// Decisions: stored with the deliveries that carry them (deduplicated, coalesced, refused
/// under an ended subject, revoked by a subject's end), claimed for P0, their outcomes
/// recorded.
#[async_trait]
pub trait Jobs: Send + Sync {
    /// Stores each delivery with its decisions and records attempt outcomes (with the
    /// answers back they create), in one transaction synced once; writes waiting at the same
    /// moment share it (group commit). A delivery that fails is left out whole and fails
    /// alone; the outer error means nothing was committed.
    async fn write(
        &self,
        deliveries: Vec<NewDelivery>,
        outcomes: Vec<AttemptRecord>,
    ) -> Result<WriteResults, StoreError> {
        let parts = Parts {
            deliveries,
            outcomes,
            events: Vec::new(),
        };
        self.write_parts(parts).await
    }
    /// Hands one writer's parts to the backend's batch writer (`write`, `record_events`).
    async fn write_parts(&self, parts: Parts) -> Result<WriteResults, StoreError>;
    /// Marks up to `limit` due pending jobs, each in its request's turn, as sending under a
    /// new claim token, and returns them (`Claimed`: with what lies ahead when they were
    /// fewer, where the backend can tell in the same trip).
    async fn claim_jobs(&self, limit: usize) -> Result<Claimed<Job>, StoreError>;
    /// When the earliest pending job in its turn falls due.
    async fn next_job_due(&self) -> Result<Option<i64>, StoreError>;
    /// The jobs in flight that a pending job of the same request waits on: its turn comes
    /// when that one ends, so the end of that call is a reason to claim again.
    async fn waited_on(&self) -> Result<Vec<i64>, StoreError>;
    /// At start: returns what a stop left in flight to pending (on PostgreSQL only claims
    /// whose lease ran out: other relays' calls go on); how many.
    async fn recover(&self) -> Result<usize, StoreError>;
    /// Makes dead (or rejected, when named) jobs pending again, each only while it is still
    /// the latest decision on its request and, for an approve, while its subject has not
    /// ended since it was asked (`rules::Candidate`); each one `replayed` by `operator`.
    async fn replay(&self, which: Replay, operator: &str) -> Result<Replayed, StoreError>;
}

/// Answers back to the provider a decision came from, claimed and recorded as jobs are.
#[async_trait]
pub trait Answers: Send + Sync {
    /// Marks up to `limit` due pending answers as sending and returns them.
    async fn claim_answers(&self, limit: usize) -> Result<Claimed<AnswerJob>, StoreError>;
    /// When the earliest pending answer falls due.
    async fn next_answer_due(&self) -> Result<Option<i64>, StoreError>;
    /// Records an answer attempt, only under the claim it was made with.
    async fn record_answer(&self, outcome: AnswerRecord) -> Result<(), StoreError>;
}

/// Claims held while their calls are under way, and news of work committed elsewhere: what
/// lets many relays share one store.
#[async_trait]
pub trait Leases: Send + Sync {
    /// Keeps `claim` while its call is under way (renewing its lease); returns only if the
    /// claim is lost, and then the call must be dropped. Never returns where one relay owns
    /// the store.
    async fn hold(&self, claim: Held);
    /// Wakes `wake` whenever any relay sharing the store commits new work; a relay alone on
    /// its store wakes itself.
    fn wake_on_new_work(&self, wake: Arc<Notify>);
}

/// What `p0-relay jobs`, the gauges and `explain` read.
#[async_trait]
pub trait Inspection: Send + Sync {
    async fn counts(&self) -> Result<Counts, StoreError>;
    async fn list(&self, filter: ListFilter) -> Result<Vec<JobSummary>, StoreError>;
    async fn show(&self, id: i64) -> Result<Option<JobDetail>, StoreError>;
    /// The requests still granted under `subject` of `source`, which its end would revoke:
    /// each request whose latest decision (refused ones decide nothing) is an approve under
    /// it, pending, sending, succeeded or recorded in a dry run.
    async fn still_granted(&self, source: &str, subject: &str) -> Result<Vec<Granted>, StoreError>;
}

/// Keeping the store healthy and small.
#[async_trait]
pub trait Upkeep: Send + Sync {
    /// A cheap check, run every second or so, that the store can take a write now; what
    /// `/readyz` reports about the store comes from it.
    async fn probe(&self) -> Result<(), StoreError>;
    /// Forgets finished jobs, deliveries and subject ends past their windows (`Prune`);
    /// how many rows.
    async fn prune(&self, before: Prune) -> Result<usize, StoreError>;
    /// Upkeep between probes (PostgreSQL: the jobs table's planner statistics kept fresh).
    async fn upkeep(&self) -> Result<(), StoreError>;
}

/// The audit trail (`store::audit`): events are written with the steps they record (by
/// `write`, `record_answer`, `replay`, `prune`); these record the rest, read, seal and verify.
#[async_trait]
pub trait Audit: Jobs {
    /// Records events that belong to no stored decision (a delivery refused as it was
    /// received), in a transaction of their own (shared with other writes waiting).
    async fn record_events(&self, events: Vec<AuditEvent>) -> Result<(), StoreError> {
        let parts = Parts {
            events,
            ..Parts::default()
        };
        self.write_parts(parts).await.map(drop)
    }
    /// Up to `limit` events after ID `after`, in ID order: every one committed before them
    /// is among them or before (IDs are handed out in commit order).
    async fn audit_events(&self, after: i64, limit: usize) -> Result<Vec<AuditRow>, StoreError>;
    /// Seals the events since the last seal, which must be `over` (one relay at a time:
    /// `None` when another is sealing, the last seal is not `over`, or there is nothing to
    /// seal); the seal's ID and what it covers.
    async fn seal(
        &self,
        key: Option<Secret>,
        over: Option<SealRef>,
    ) -> Result<Option<(i64, Covers)>, StoreError>;
    /// The last seal covering events before `id` (where `audit verify --since` starts).
    async fn seal_before(&self, id: i64) -> Result<Option<SealRef>, StoreError>;
    /// Feeds every row from `start` to `verify`, in ID order, until it has found a problem.
    async fn verify(&self, key: Option<&Secret>, start: Start) -> Result<Verification, StoreError>;
    /// The last event and seal (for the gauges).
    async fn audit_status(&self) -> Result<AuditStatus, StoreError>;
}

/// A durable store: every concern, behind one object the relay shares.
pub trait Store: Jobs + Answers + Leases + Inspection + Upkeep + Audit {}

impl<T: Jobs + Answers + Leases + Inspection + Upkeep + Audit> Store for T {}
