//! Faults a test injects into the relay's store: `Watched` wraps the store handed to the relay
//! and refuses writes (a disk gone read-only, say), fails the questions asked after a claim,
//! and counts the claims that found nothing. (Cutting PostgreSQL off is `pg::Proxy`.)

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use async_trait::async_trait;
use p0_relay::secret::Secret;
use p0_relay::store::audit::{AuditRow, AuditStatus, Covers, SealRef, Start, Verification};
use p0_relay::store::{
    Ahead, AnswerJob, AnswerRecord, Answers, Audit, Claimed, Counts, Granted, Held, Inspection,
    Job, JobDetail, JobSummary, Jobs, Leases, ListFilter, Parts, Prune, Replay, Replayed, Settings,
    SqliteStore, StoreError, StoreHandle, StoreTask, Upkeep, Windows, WriteResults,
};
use tokio::sync::Notify;

/// A SQLite store at `path` as these tests open one: an hour's dedup, ten minutes' coalescing.
pub fn sqlite_store(path: &Path) -> (SqliteStore, StoreTask) {
    let windows = Windows {
        dedup: std::time::Duration::from_secs(3600),
        coalesce: std::time::Duration::from_secs(600),
    };
    SqliteStore::open(path, &Settings::new(windows)).expect("the store opens")
}

/// The store these tests hand the relay, around another: it refuses every write while
/// `refusing` is set and counts the claims that found nothing due.
#[derive(Clone)]
pub struct Watched {
    inner: StoreHandle,
    path: PathBuf,
    pub refusing: Arc<AtomicBool>,
    /// Claims of P0 jobs that found nothing.
    pub empty_claims: Arc<AtomicUsize>,
    /// Claims of answers that found nothing.
    pub empty_answer_claims: Arc<AtomicUsize>,
    /// While set, the questions after a claim (when the next job falls due, which jobs in
    /// flight others wait on) fail.
    pub failing_questions: Arc<AtomicBool>,
    /// Answer outcomes refused while `refusing` was set.
    pub refused_answer_records: Arc<AtomicUsize>,
}

/// A store handed to the relay (`Setup::store`), and where it is.
pub struct Given {
    pub handle: StoreHandle,
    pub task: StoreTask,
    pub path: PathBuf,
}

impl Watched {
    fn new(inner: SqliteStore, path: &Path) -> Self {
        Self {
            inner: StoreHandle::new(inner),
            path: path.to_owned(),
            refusing: Arc::default(),
            empty_claims: Arc::default(),
            empty_answer_claims: Arc::default(),
            failing_questions: Arc::default(),
            refused_answer_records: Arc::default(),
        }
    }

    /// The store at `path`, watched, and its writer: what `Setup::store` takes.
    pub fn open(path: &Path) -> (Watched, StoreTask) {
        let (inner, task) = sqlite_store(path);
        (Watched::new(inner, path), task)
    }

    /// Handed to the relay (`Setup::store`); the flags stay shared with this one.
    pub fn given(&self, task: StoreTask) -> Option<Given> {
        Some(Given {
            handle: StoreHandle::new(self.clone()),
            task,
            path: self.path.clone(),
        })
    }

    fn check(&self) -> Result<(), StoreError> {
        match self.refusing.load(Ordering::SeqCst) {
            true => Err(StoreError::Unavailable("the disk is read-only".into())),
            false => Ok(()),
        }
    }

    fn question(&self, what: &str) -> Result<(), StoreError> {
        match self.failing_questions.load(Ordering::SeqCst) {
            true => Err(StoreError::Unavailable(format!("{what} fails"))),
            false => Ok(()),
        }
    }
}

#[async_trait]
impl Jobs for Watched {
    /// Every write (`write`, `record_events`) comes through here.
    async fn write_parts(&self, parts: Parts) -> Result<WriteResults, StoreError> {
        self.check()?;
        self.inner.write_parts(parts).await
    }
    async fn claim_jobs(&self, limit: usize) -> Result<Claimed<Job>, StoreError> {
        let mut claimed = self.inner.claim_jobs(limit).await?;
        if claimed.items.is_empty() {
            self.empty_claims.fetch_add(1, Ordering::SeqCst);
        }
        if claimed.items.len() < limit {
            // What lies ahead of a short claim, asked through the questions that may fail.
            let waited_on = self.waited_on().await;
            claimed.ahead = Some(Ahead::from(self.next_job_due().await, waited_on));
        }
        Ok(claimed)
    }
    async fn next_job_due(&self) -> Result<Option<i64>, StoreError> {
        self.question("next_due")?;
        self.inner.next_job_due().await
    }
    async fn waited_on(&self) -> Result<Vec<i64>, StoreError> {
        self.question("waited_on")?;
        self.inner.waited_on().await
    }
    async fn recover(&self) -> Result<usize, StoreError> {
        self.inner.recover().await
    }
    async fn replay(&self, which: Replay, operator: &str) -> Result<Replayed, StoreError> {
        self.inner.replay(which, operator).await
    }
}

#[async_trait]
impl Answers for Watched {
    async fn claim_answers(&self, limit: usize) -> Result<Claimed<AnswerJob>, StoreError> {
        let claimed = self.inner.claim_answers(limit).await?;
        if claimed.items.is_empty() {
            self.empty_answer_claims.fetch_add(1, Ordering::SeqCst);
        }
        Ok(claimed)
    }
    async fn next_answer_due(&self) -> Result<Option<i64>, StoreError> {
        self.inner.next_answer_due().await
    }
    async fn record_answer(&self, outcome: AnswerRecord) -> Result<(), StoreError> {
        if let Err(e) = self.check() {
            self.refused_answer_records.fetch_add(1, Ordering::SeqCst);
            return Err(e);
        }
        self.inner.record_answer(outcome).await
    }
}

#[async_trait]
impl Leases for Watched {
    async fn hold(&self, claim: Held) {
        self.inner.hold(claim).await
    }
    fn wake_on_new_work(&self, wake: Arc<Notify>) {
        self.inner.wake_on_new_work(wake)
    }
}

#[async_trait]
impl Inspection for Watched {
    async fn counts(&self) -> Result<Counts, StoreError> {
        self.inner.counts().await
    }
    async fn list(&self, filter: ListFilter) -> Result<Vec<JobSummary>, StoreError> {
        self.inner.list(filter).await
    }
    async fn show(&self, id: i64) -> Result<Option<JobDetail>, StoreError> {
        self.inner.show(id).await
    }
    async fn still_granted(&self, source: &str, subject: &str) -> Result<Vec<Granted>, StoreError> {
        self.inner.still_granted(source, subject).await
    }
}

#[async_trait]
impl Upkeep for Watched {
    async fn probe(&self) -> Result<(), StoreError> {
        self.check()?;
        self.inner.probe().await
    }
    async fn prune(&self, before: Prune) -> Result<usize, StoreError> {
        self.inner.prune(before).await
    }
    async fn upkeep(&self) -> Result<(), StoreError> {
        self.inner.upkeep().await
    }
}

#[async_trait]
impl Audit for Watched {
    async fn audit_events(&self, after: i64, limit: usize) -> Result<Vec<AuditRow>, StoreError> {
        self.inner.audit_events(after, limit).await
    }
    async fn seal(
        &self,
        key: Option<Secret>,
        over: Option<SealRef>,
    ) -> Result<Option<(i64, Covers)>, StoreError> {
        self.inner.seal(key, over).await
    }
    async fn seal_before(&self, id: i64) -> Result<Option<SealRef>, StoreError> {
        self.inner.seal_before(id).await
    }
    async fn verify(&self, key: Option<&Secret>, start: Start) -> Result<Verification, StoreError> {
        self.inner.verify(key, start).await
    }
    async fn audit_status(&self) -> Result<AuditStatus, StoreError> {
        self.inner.audit_status().await
    }
}
