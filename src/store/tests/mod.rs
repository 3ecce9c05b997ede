//! The store contract: one set of tests run through the `Store` interface against SQLite and
//! PostgreSQL alike, each at explicit moments (a manual `Clock`), by concern (`contract`); the
//! PostgreSQL tests of what several relays on one database must hold (`postgres`); and
//! SQLite's own (`sqlite`). PostgreSQL tests skip, listed after the run's
//! summary, when 127.0.0.1:5432 does not answer, and fail instead in CI.

mod audit_trail;
mod contract;
#[path = "../../../tests/api/common/pg.rs"]
mod pg;
mod postgres;
#[path = "../../../tests/api/common/skip.rs"]
mod skip;
mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::domain::{Action, Binding, Expiration, Id, Reply, Via};
use crate::policy::Decision;
use pg::TestDb;

const WINDOWS: Windows = Windows {
    dedup: Duration::from_secs(3600),
    coalesce: Duration::from_secs(600),
};
const LEASE: Duration = Duration::from_secs(30);

/// A store's settings for these tests, on `clock`.
fn settings(clock: &Clock) -> Settings {
    Settings {
        claim_lease: LEASE,
        clock: clock.clone(),
        ..Settings::new(WINDOWS)
    }
}

/// The PostgreSQL location of a test database.
fn location(db: &TestDb) -> PgLocation {
    match StoreLocation::parse("test", &db.url(), std::path::Path::new(".")) {
        Ok(StoreLocation::Postgres(p)) => *p,
        other => panic!("{:?}", other.map(|l| l.to_string())),
    }
}

/// A store under test, through the interface the relay uses, with explicit time: each call
/// sets the store's clock to the moment it names.
struct Backend {
    store: StoreHandle,
    clock: Clock,
    kind: Kind,
}

enum Kind {
    Sqlite(tempfile::TempDir),
    Pg(TestDb),
}

async fn sqlite() -> Option<Backend> {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(0);
    let (s, _task) =
        SqliteStore::open(&dir.path().join("nested/relay.db"), &settings(&clock)).unwrap();
    Some(Backend {
        store: StoreHandle::new(s),
        clock,
        kind: Kind::Sqlite(dir),
    })
}

async fn pg() -> Option<Backend> {
    let db = TestDb::create().await?;
    let clock = Clock::manual(0);
    let (s, _task) = PgStore::open(&location(&db), &settings(&clock))
        .await
        .unwrap();
    Some(Backend {
        store: StoreHandle::new(s),
        clock,
        kind: Kind::Pg(db),
    })
}

impl Backend {
    async fn write(
        &mut self,
        d: &[NewDelivery],
        r: &[AttemptRecord],
        now: i64,
    ) -> Result<Vec<Result<Accepted, StoreError>>, StoreError> {
        self.clock.set(now);
        self.store.write(d.to_vec(), r.to_vec()).await
    }
    async fn accept(&mut self, d: NewDelivery, now: i64) -> Accepted {
        self.write(&[d], &[], now).await.unwrap().remove(0).unwrap()
    }
    /// An approve of `request` under `subject` (delivery `key`), accepted at `now`.
    async fn approve_on(&mut self, key: &str, request: &str, subject: &str, now: i64) -> Accepted {
        self.accept(
            on_subject(key, &[(Action::Approve, request)], subject, false),
            now,
        )
        .await
    }
    async fn claim_due(&mut self, now: i64, limit: usize) -> Vec<Job> {
        self.claim(now, limit).await.items
    }
    async fn claim(&mut self, now: i64, limit: usize) -> Claimed<Job> {
        self.clock.set(now);
        self.store.claim_jobs(limit).await.unwrap()
    }
    async fn next_due(&mut self) -> Option<i64> {
        self.store.next_job_due().await.unwrap()
    }
    async fn waited_on(&mut self) -> Vec<i64> {
        self.store.waited_on().await.unwrap()
    }
    /// Claims whose lease ran out by `now` back to pending (on SQLite, every claim: one
    /// relay owns the file, so any claim found at start is from a stop).
    async fn recover(&mut self, now: i64) -> usize {
        self.clock.set(now);
        self.store.recover().await.unwrap()
    }
    async fn counts(&mut self) -> Counts {
        self.store.counts().await.unwrap()
    }
    async fn list(&mut self, f: &ListFilter) -> Vec<JobSummary> {
        self.store.list(f.clone()).await.unwrap()
    }
    async fn show(&mut self, id: i64) -> Option<JobDetail> {
        self.store.show(id).await.unwrap()
    }
    async fn still_granted(&mut self, source: &str, subject: &str) -> Vec<Granted> {
        self.store.still_granted(source, subject).await.unwrap()
    }
    async fn replay(&mut self, which: Replay, now: i64) -> Replayed {
        self.clock.set(now);
        self.store.replay(which, "tester").await.unwrap()
    }
    /// Prunes finished jobs and subject ends older than `before`.
    async fn prune(&mut self, before: i64) -> usize {
        self.prune_with(Prune {
            audit_before_ms: 0,
            audit_key: None,
            finished_before_ms: before,
            ends_before_ms: before,
        })
        .await
    }
    async fn prune_with(&mut self, p: Prune) -> usize {
        self.store.prune(p).await.unwrap()
    }
    async fn claim_answers(&mut self, now: i64, limit: usize) -> Vec<AnswerJob> {
        self.clock.set(now);
        self.store.claim_answers(limit).await.unwrap().items
    }
    async fn record_answer(&mut self, rec: &AnswerRecord) {
        self.store.record_answer(rec.clone()).await.unwrap()
    }
    /// The audit trail's rows, in ID order.
    async fn audit_rows(&self) -> Vec<audit::AuditRow> {
        self.store.audit_events(0, 10_000).await.unwrap()
    }
    /// The audit trail's events, read back.
    async fn events(&self) -> Vec<audit::Body> {
        let rows = self.audit_rows().await;
        rows.iter()
            .map(|r| serde_json::from_str(&r.body).unwrap())
            .collect()
    }
    async fn seal(&mut self, key: Option<&crate::secret::Secret>, now: i64) -> Option<i64> {
        self.clock.set(now);
        let over = self.store.seal_before(i64::MAX).await.unwrap();
        self.store
            .seal(key.cloned(), over)
            .await
            .unwrap()
            .map(|(id, _)| id)
    }
    async fn verify(&self, key: Option<&crate::secret::Secret>) -> audit::Verification {
        self.store.verify(key, audit::Start::First).await.unwrap()
    }
    /// Runs `sql` on a connection of the test's own, behind the store's back.
    async fn behind_its_back(&self, sql: &str) {
        match &self.kind {
            Kind::Sqlite(dir) => rusqlite::Connection::open(dir.path().join("nested/relay.db"))
                .unwrap()
                .execute_batch(sql)
                .unwrap(),
            Kind::Pg(db) => db.raw().await.batch_execute(sql).await.unwrap(),
        }
    }
    /// From now on, storing a decision for request `boom` fails inside the database.
    async fn break_request_boom(&mut self, broken: bool) {
        let sql = match (&self.kind, broken) {
            (Kind::Sqlite(_), true) => {
                "CREATE TRIGGER boom BEFORE INSERT ON jobs WHEN NEW.request_id = 'boom'
                 BEGIN SELECT RAISE(ABORT, 'disk says no'); END;"
            }
            (Kind::Sqlite(_), false) => "DROP TRIGGER boom",
            (Kind::Pg(_), true) => {
                "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN IF NEW.request_id = 'boom' THEN RAISE EXCEPTION 'disk says no'; END IF;
                 RETURN NEW; END $$;
                 CREATE TRIGGER boom BEFORE INSERT ON jobs FOR EACH ROW EXECUTE FUNCTION boom();"
            }
            (Kind::Pg(_), false) => "DROP TRIGGER boom ON jobs",
        };
        self.behind_its_back(sql).await;
    }
    /// Marks the store as written by a newer relay, then opens it again.
    async fn reopen_after_a_newer_relay(self) -> Result<(), StoreError> {
        let clock = Clock::manual(0);
        match &self.kind {
            Kind::Sqlite(dir) => {
                self.behind_its_back("PRAGMA user_version = 99").await;
                let path = dir.path().join("nested/relay.db");
                SqliteStore::open(&path, &settings(&clock)).map(drop)
            }
            Kind::Pg(db) => {
                self.behind_its_back("INSERT INTO p0_relay_schema (version) VALUES (99)")
                    .await;
                PgStore::open(&location(db), &settings(&clock))
                    .await
                    .map(drop)
            }
        }
    }
}

/// A delivery of `decisions` on request IDs of org `acme` (approves for an hour).
pub(crate) fn delivery(key: &str, decisions: &[(Action, &str)]) -> NewDelivery {
    NewDelivery {
        source: "github".into(),
        dedup_key: key.into(),
        received_at_ms: 1_000,
        rule: "r".into(),
        actor: Some("octocat".into()),
        payload: None,
        decisions: decisions
            .iter()
            .map(|(action, id)| Decision {
                org: Id::parse("acme").unwrap(),
                request_id: Id::parse(id).unwrap(),
                action: *action,
                expiration: (*action == Action::Approve).then(|| Expiration::parse("1h").unwrap()),
                clamped_from: None,
            })
            .collect(),
        binding: Binding::default(),
        refused: None,
    }
}

/// A delivery on `subject` (ending it when `ends`).
fn on_subject(key: &str, decisions: &[(Action, &str)], subject: &str, ends: bool) -> NewDelivery {
    let mut d = delivery(key, decisions);
    d.binding = Binding {
        subject: Some(subject.into()),
        reply: Some(Reply {
            via: Via::PagerDuty,
            on: None,
            comment: None,
        }),
        ends_subject: ends,
        reopens_subject: false,
        gate: None,
    };
    d
}

fn done(job: &Job, state: State) -> AttemptRecord {
    let mut settled = Settled::new(job.id, job.claim_token, 1, state, 2_000);
    settled.status = Some(200);
    AttemptRecord {
        settled,
        result: "success",
        duration_ms: 1,
        answers: Vec::new(),
        evidence: None,
        checked_at_ms: None,
    }
}

/// `rec` with a note on PagerDuty incident P1 to answer back.
fn with_a_note(mut rec: AttemptRecord) -> AttemptRecord {
    rec.answers = vec![NewAnswer {
        via: "pagerduty".into(),
        kind: "note".into(),
        target: r#"{"incident":"P1"}"#.into(),
        body: r#"{"note":{"content":"done"}}"#.into(),
    }];
    rec
}

fn jobs(a: &Accepted) -> Vec<(i64, bool)> {
    match a {
        Accepted::New { jobs, .. } => jobs.iter().map(|j| (j.job_id, j.coalesced)).collect(),
        Accepted::Duplicate { job_ids } => job_ids.iter().map(|&id| (id, true)).collect(),
    }
}

fn bound(a: &Accepted) -> Vec<(String, i64)> {
    match a {
        Accepted::New { bound, .. } => bound
            .iter()
            .map(|b| (b.request_id.clone(), b.job_id))
            .collect(),
        Accepted::Duplicate { .. } => panic!("duplicate"),
    }
}

fn claimed(all: &[Job], id: i64) -> &Job {
    all.iter().find(|j| j.id == id).unwrap()
}

/// An approve `job` that the revoke `by` overtook.
fn overtaken(job: i64, by: i64) -> Overtaken {
    Overtaken {
        job,
        action: Action::Approve,
        by,
        by_action: Action::Revoke,
    }
}

/// Runs a contract test against both backends.
macro_rules! on_both_stores {
    ($name:ident) => {
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                if let Some(b) = super::super::sqlite().await {
                    super::$name(b).await
                }
            }
            #[tokio::test]
            async fn postgres() {
                if let Some(b) = super::super::pg().await {
                    super::$name(b).await
                }
            }
        }
    };
}
use on_both_stores;
