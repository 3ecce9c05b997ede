//! The store contract: one set of tests run against SQLite and PostgreSQL alike, and the
//! PostgreSQL-only tests of what several relays on one database must hold (dedup and
//! coalescing across stores, disjoint claims, leases and claim tokens, migrations under a
//! lock, pruning by one at a time, wake-ups). PostgreSQL tests skip with a notice when
//! 127.0.0.1:5432 does not answer, and fail instead when CI=true.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::domain::Id;

/// The server the PostgreSQL tests use (`P0_RELAY_TEST_PG` overrides), trust auth.
fn admin_url() -> String {
    std::env::var("P0_RELAY_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A database of its own for one test, dropped after it.
pub(crate) struct TestDb {
    name: String,
    pub url: String,
}

impl TestDb {
    /// A fresh database, or `None` with a printed reason when PostgreSQL is not reachable;
    /// with CI=true that is a failure instead.
    pub async fn create() -> Option<TestDb> {
        let admin = admin_url();
        let (client, conn) = match tokio_postgres::connect(&admin, tokio_postgres::NoTls).await {
            Ok(c) => c,
            Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
                eprintln!("PostgreSQL not reachable ({e}): skipped (CI runs it)");
                return None;
            }
            Err(e) => panic!("PostgreSQL is required in CI: {e}"),
        };
        tokio::spawn(conn);
        let name = format!("relay_{:016x}", rand::random::<u64>());
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
        Some(TestDb {
            url: format!("{base}/{name}?sslmode=disable"),
            name,
        })
    }

    pub fn location(&self) -> PgLocation {
        match StoreLocation::parse("test", &self.url, std::path::Path::new(".")) {
            Ok(StoreLocation::Postgres(p)) => *p,
            other => panic!("{other:?}"),
        }
    }

    /// A plain connection to this database, for what the test does behind the store's back.
    pub async fn raw(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (admin, name) = (admin_url(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok((c, conn)) = tokio_postgres::connect(&admin, tokio_postgres::NoTls).await
                {
                    tokio::spawn(conn);
                    let _ = c
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

const WINDOWS: Windows = Windows {
    dedup: Duration::from_secs(3600),
    coalesce: Duration::from_secs(600),
};
const LEASE: Duration = Duration::from_secs(30);

/// A store under test, with explicit time.
#[allow(clippy::large_enum_variant)]
enum Backend {
    Sqlite(tempfile::TempDir, SqliteStore),
    Pg(TestDb, PgStore),
}

async fn sqlite() -> Option<Backend> {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(&dir.path().join("nested/relay.db"), WINDOWS, false).unwrap();
    Some(Backend::Sqlite(dir, s))
}

async fn pg() -> Option<Backend> {
    let db = TestDb::create().await?;
    let s = PgStore::open(&db.location(), WINDOWS, false, LEASE)
        .await
        .unwrap();
    Some(Backend::Pg(db, s))
}

impl Backend {
    async fn write(
        &mut self,
        d: &[NewDelivery],
        r: &[AttemptRecord],
        now: i64,
    ) -> Result<Vec<Result<Accepted, StoreError>>, StoreError> {
        match self {
            Backend::Sqlite(_, s) => s.write(d, r, now),
            Backend::Pg(_, s) => s.write(d, r, now).await,
        }
    }
    async fn accept(&mut self, d: NewDelivery, now: i64) -> Accepted {
        self.write(&[d], &[], now).await.unwrap().remove(0).unwrap()
    }
    async fn claim_due(&mut self, now: i64, limit: usize) -> Vec<Job> {
        match self {
            Backend::Sqlite(_, s) => s.claim_due(now, limit).unwrap(),
            Backend::Pg(_, s) => s.claim_due(now, limit).await.unwrap(),
        }
    }
    async fn next_due(&mut self) -> Option<i64> {
        match self {
            Backend::Sqlite(_, s) => s.next_due().unwrap(),
            Backend::Pg(_, s) => s.next_due().await.unwrap(),
        }
    }
    async fn followed(&mut self) -> Vec<i64> {
        match self {
            Backend::Sqlite(_, s) => s.followed().unwrap(),
            Backend::Pg(_, s) => s.followed().await.unwrap(),
        }
    }
    /// Claims whose lease ran out by `now` back to pending (on SQLite, every claim: one
    /// relay owns the file, so any claim found at start is from a stop).
    async fn recover(&mut self, now: i64) -> usize {
        match self {
            Backend::Sqlite(_, s) => s.recover().unwrap(),
            Backend::Pg(_, s) => s.recover(now).await.unwrap(),
        }
    }
    async fn counts(&mut self) -> Counts {
        match self {
            Backend::Sqlite(_, s) => s.counts().unwrap(),
            Backend::Pg(_, s) => s.counts().await.unwrap(),
        }
    }
    async fn list(&mut self, f: &ListFilter) -> Vec<JobSummary> {
        match self {
            Backend::Sqlite(_, s) => s.list(f).unwrap(),
            Backend::Pg(_, s) => s.list(f).await.unwrap(),
        }
    }
    async fn show(&mut self, id: i64) -> Option<JobDetail> {
        match self {
            Backend::Sqlite(_, s) => s.show(id).unwrap(),
            Backend::Pg(_, s) => s.show(id).await.unwrap(),
        }
    }
    async fn replay(&mut self, which: Replay, now: i64) -> Replayed {
        match self {
            Backend::Sqlite(_, s) => s.replay(which, now).unwrap(),
            Backend::Pg(_, s) => s.replay(which, now).await.unwrap(),
        }
    }
    /// Prunes finished jobs and subject ends older than `before`.
    async fn prune(&mut self, before: i64) -> usize {
        self.prune_with(Prune {
            finished_before_ms: before,
            ends_before_ms: before,
        })
        .await
    }
    async fn prune_with(&mut self, p: Prune) -> usize {
        match self {
            Backend::Sqlite(_, s) => s.prune(p).unwrap(),
            Backend::Pg(_, s) => s.prune(p).await.unwrap(),
        }
    }
    /// From now on, storing a decision for request `boom` fails inside the database.
    async fn break_request_boom(&mut self, broken: bool) {
        match self {
            Backend::Sqlite(_, s) => s
                .conn
                .execute_batch(if broken {
                    "CREATE TEMP TRIGGER boom BEFORE INSERT ON jobs WHEN NEW.request_id = 'boom'
                     BEGIN SELECT RAISE(ABORT, 'disk says no'); END;"
                } else {
                    "DROP TRIGGER boom"
                })
                .unwrap(),
            Backend::Pg(db, _) => db
                .raw()
                .await
                .batch_execute(if broken {
                    "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$
                     BEGIN IF NEW.request_id = 'boom' THEN RAISE EXCEPTION 'disk says no'; END IF;
                     RETURN NEW; END $$;
                     CREATE TRIGGER boom BEFORE INSERT ON jobs FOR EACH ROW EXECUTE FUNCTION boom();"
                } else {
                    "DROP TRIGGER boom ON jobs"
                })
                .await
                .unwrap(),
        }
    }
    /// Marks the store as written by a newer relay, then opens it again.
    async fn reopen_after_a_newer_relay(self) -> Result<(), StoreError> {
        match self {
            Backend::Sqlite(dir, s) => {
                s.conn.pragma_update(None, "user_version", 99).unwrap();
                drop(s);
                SqliteStore::open(&dir.path().join("nested/relay.db"), WINDOWS, false).map(drop)
            }
            Backend::Pg(db, s) => {
                db.raw()
                    .await
                    .batch_execute("INSERT INTO p0_relay_schema (version) VALUES (99)")
                    .await
                    .unwrap();
                drop(s);
                PgStore::open(&db.location(), WINDOWS, false, LEASE)
                    .await
                    .map(drop)
            }
        }
    }
}

fn delivery(key: &str, decisions: &[(Action, &str)]) -> NewDelivery {
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
                expiration: (*action == Action::Approve)
                    .then(|| crate::domain::Expiration::parse("1h").unwrap()),
                clamped_from: None,
            })
            .collect(),
        binding: crate::domain::Binding::default(),
        refused: None,
    }
}

fn done(job: &Job, state: State) -> AttemptRecord {
    AttemptRecord {
        job_id: job.id,
        claim: job.claim,
        at_ms: 2_000,
        state,
        attempts: 1,
        next_attempt_at_ms: 2_000,
        status: Some(200),
        result: "success",
        error: None,
        duration_ms: 1,
        answers: Vec::new(),
        evidence: None,
        checked_at_ms: None,
    }
}

fn jobs(a: &Accepted) -> Vec<(i64, bool)> {
    match a {
        Accepted::New { jobs, .. } => jobs.iter().map(|j| (j.job_id, j.coalesced)).collect(),
        Accepted::Duplicate { job_ids } => job_ids.iter().map(|&id| (id, true)).collect(),
    }
}

fn claimed(all: &[Job], id: i64) -> &Job {
    all.iter().find(|j| j.id == id).unwrap()
}

/// Runs a contract test against both backends.
macro_rules! contract {
    ($name:ident) => {
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                if let Some(b) = super::sqlite().await {
                    super::$name(b).await
                }
            }
            #[tokio::test]
            async fn postgres() {
                if let Some(b) = super::pg().await {
                    super::$name(b).await
                }
            }
        }
    };
}

contract!(dedup_coalescing_and_the_latest_action_rule);
async fn dedup_coalescing_and_the_latest_action_rule(mut s: Backend) {
    let now = 1_000;
    let r = s
        .write(
            &[
                delivery("d1", &[(Action::Approve, "r1"), (Action::Deny, "r2")]),
                delivery("d1", &[(Action::Approve, "r1")]),
                delivery("d2", &[(Action::Approve, "r1")]),
            ],
            &[],
            now,
        )
        .await
        .unwrap();
    let r: Vec<Accepted> = r.into_iter().map(Result::unwrap).collect();
    assert_eq!(jobs(&r[0]), vec![(1, false), (2, false)]);
    assert_eq!(
        r[1],
        Accepted::Duplicate {
            job_ids: vec![1, 2]
        }
    );
    assert_eq!(
        jobs(&r[2]),
        vec![(1, true)],
        "same decision again: coalesced"
    );
    // Once revoked, approving again is a new job, not the old approve.
    let r = s
        .accept(delivery("d3", &[(Action::Revoke, "r1")]), now)
        .await;
    assert_eq!(jobs(&r), vec![(3, false)]);
    let r = s
        .accept(delivery("d4", &[(Action::Approve, "r1")]), now)
        .await;
    assert_eq!(jobs(&r), vec![(4, false)]);
    // A rejected decision does not absorb a later identical one.
    let all = s.claim_due(now, 10).await;
    s.write(&[], &[done(claimed(&all, 2), State::Rejected)], now)
        .await
        .unwrap();
    let r = s.accept(delivery("d5", &[(Action::Deny, "r2")]), now).await;
    assert_eq!(jobs(&r), vec![(5, false)]);
    // Outside the coalescing window, the same decision is sent again.
    let later = now + 601_000;
    let r = s
        .accept(delivery("d6", &[(Action::Approve, "r1")]), later)
        .await;
    assert_eq!(jobs(&r), vec![(6, false)]);
    // Outside the dedup window, the same delivery is new again.
    let much_later = now + 3_601_000;
    let mut again = delivery("d1", &[(Action::Deny, "r9")]);
    again.received_at_ms = much_later;
    let r = s.accept(again, much_later).await;
    assert!(matches!(r, Accepted::New { .. }), "{r:?}");
}

contract!(a_failing_delivery_is_left_out_whole_and_the_rest_kept);
async fn a_failing_delivery_is_left_out_whole_and_the_rest_kept(mut s: Backend) {
    s.break_request_boom(true).await;
    let r = s
        .write(
            &[
                delivery("ok-1", &[(Action::Approve, "a")]),
                delivery("bad", &[(Action::Approve, "b"), (Action::Approve, "boom")]),
                delivery("ok-2", &[(Action::Revoke, "c")]),
            ],
            &[],
            1_000,
        )
        .await
        .unwrap();
    assert!(r[0].is_ok() && r[2].is_ok(), "{r:?}");
    assert!(
        r[1].as_ref()
            .unwrap_err()
            .to_string()
            .contains("disk says no")
    );
    let listed: Vec<String> = s
        .list(&ListFilter::default())
        .await
        .into_iter()
        .map(|j| j.request_id)
        .collect();
    assert_eq!(
        listed,
        vec!["c", "a"],
        "nothing of the failed delivery was kept"
    );
    // Its dedup key was not taken either: the sender's retry is accepted.
    s.break_request_boom(false).await;
    let retry = s
        .accept(delivery("bad", &[(Action::Approve, "b")]), 1_000)
        .await;
    assert!(matches!(retry, Accepted::New { .. }));
}

contract!(a_batch_of_distinct_deliveries_dedups_and_coalesces_against_earlier_ones);
/// Batches whose deliveries and requests are all distinct (PostgreSQL writes them set-based,
/// the others one by one) give the same answers: duplicates name the jobs first made, a
/// decision already pending is coalesced, a delivery without decisions is stored with none.
async fn a_batch_of_distinct_deliveries_dedups_and_coalesces_against_earlier_ones(mut s: Backend) {
    let first = s
        .write(
            &[
                delivery("a", &[(Action::Approve, "r1"), (Action::Deny, "r2")]),
                delivery("b", &[(Action::Approve, "r3")]),
            ],
            &[],
            1_000,
        )
        .await
        .unwrap();
    let first: Vec<Accepted> = first.into_iter().map(Result::unwrap).collect();
    assert_eq!(jobs(&first[0]), vec![(1, false), (2, false)]);
    assert_eq!(jobs(&first[1]), vec![(3, false)]);
    let second = s
        .write(
            &[
                delivery("c", &[(Action::Approve, "r1")]),
                delivery("a", &[(Action::Approve, "r9")]),
                delivery("d", &[(Action::Revoke, "r3"), (Action::Approve, "r4")]),
                delivery("e", &[]),
            ],
            &[],
            1_500,
        )
        .await
        .unwrap();
    let second: Vec<Accepted> = second.into_iter().map(Result::unwrap).collect();
    assert_eq!(
        jobs(&second[0]),
        vec![(1, true)],
        "pending approve: coalesced"
    );
    assert_eq!(
        second[1],
        Accepted::Duplicate {
            job_ids: vec![1, 2]
        }
    );
    assert_eq!(jobs(&second[2]), vec![(4, false), (5, false)]);
    assert_eq!(jobs(&second[3]), vec![]);
    assert_eq!(
        s.accept(delivery("e", &[(Action::Approve, "r5")]), 1_600)
            .await,
        Accepted::Duplicate { job_ids: vec![] }
    );
    let claimed = s.claim_due(2_000, 10).await;
    assert_eq!(
        claimed
            .iter()
            .map(|j| (j.id, j.request_id.as_str(), j.action))
            .collect::<Vec<_>>(),
        vec![
            (1, "r1", Action::Approve),
            (2, "r2", Action::Deny),
            (3, "r3", Action::Approve),
            (5, "r4", Action::Approve),
        ],
        "r3's revoke waits for its approve"
    );
}

contract!(a_replay_never_undoes_a_later_decision);
async fn a_replay_never_undoes_a_later_decision(mut s: Backend) {
    // r1: an approve that died, then a revoke that went through. r2: an approve that died.
    s.accept(delivery("d1", &[(Action::Approve, "r1")]), 1_000)
        .await;
    s.accept(delivery("d2", &[(Action::Approve, "r2")]), 1_000)
        .await;
    let first = s.claim_due(1_000, 10).await;
    let dead: Vec<AttemptRecord> = first.iter().map(|j| done(j, State::Dead)).collect();
    s.write(&[], &dead, 2_000).await.unwrap();
    s.accept(delivery("d3", &[(Action::Revoke, "r1")]), 2_000)
        .await;
    let revoke = s.claim_due(2_000, 10).await;
    assert_eq!(revoke.len(), 1);
    s.write(&[], &[done(&revoke[0], State::Succeeded)], 2_000)
        .await
        .unwrap();
    let (approve_r1, approve_r2, revoke_r1) = (first[0].id, first[1].id, revoke[0].id);
    // Named: r1's approve is left, with the revoke that overtook it.
    assert_eq!(
        s.replay(Replay::One(approve_r1), 3_000).await,
        Replayed {
            queued: vec![],
            overtaken: vec![overtaken(approve_r1, revoke_r1)],
            ended: vec![],
        }
    );
    // All dead: r2's approve goes, r1's stays.
    assert_eq!(
        s.replay(Replay::AllDead, 3_000).await,
        Replayed {
            queued: vec![approve_r2],
            overtaken: vec![overtaken(approve_r1, revoke_r1)],
            ended: vec![],
        }
    );
    let left = s.show(approve_r1).await.unwrap();
    assert_eq!(left.job.state.as_str(), "dead");
    // Pruning keeps the revoke while the approve it overtook is dead, so a later replay still
    // cannot undo it.
    s.prune(1_000_000).await;
    assert!(s.show(revoke_r1).await.is_some(), "the revoke is kept");
    assert_eq!(
        s.replay(Replay::One(approve_r1), 1_000_000).await.overtaken,
        vec![overtaken(approve_r1, revoke_r1)]
    );
    let again = s.claim_due(3_000, 10).await;
    assert_eq!(
        again.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![approve_r2]
    );
}

contract!(claims_recovery_replay_and_prune);
async fn claims_recovery_replay_and_prune(mut s: Backend) {
    s.accept(
        delivery("d1", &[(Action::Approve, "a"), (Action::Deny, "b")]),
        1_000,
    )
    .await;
    assert_eq!(s.next_due().await, Some(1_000));
    let first = s.claim_due(1_000, 1).await;
    assert_eq!(first.iter().map(|j| j.id).collect::<Vec<_>>(), vec![1]);
    assert_eq!(first[0].action, Action::Approve);
    assert_eq!(first[0].expiration.as_deref(), Some("1h"));
    assert_eq!(
        s.claim_due(1_000, 10).await.len(),
        1,
        "only the unclaimed one is left"
    );
    assert!(s.claim_due(1_000, 10).await.is_empty());
    assert_eq!(
        s.counts().await,
        Counts {
            pending: 2,
            dead: 0
        }
    );
    // A stop while both were in flight: once their claims have run out, both are pending.
    let after_lease = 1_000 + LEASE.as_millis() as i64 + 1;
    assert_eq!(s.recover(after_lease).await, 2);
    let all = s.claim_due(after_lease, 10).await;
    assert_eq!(all.len(), 2);
    s.write(
        &[],
        &[
            done(claimed(&all, 1), State::Succeeded),
            done(claimed(&all, 2), State::Dead),
        ],
        2_000,
    )
    .await
    .unwrap();
    assert_eq!(
        s.counts().await,
        Counts {
            pending: 0,
            dead: 1
        }
    );
    assert_eq!(
        s.replay(Replay::One(1), 3_000).await,
        Replayed::default(),
        "succeeded is not replayable"
    );
    assert_eq!(s.replay(Replay::AllDead, 3_000).await.queued, vec![2]);
    let detail = s.show(2).await.unwrap();
    assert_eq!(
        (detail.job.state.as_str(), detail.job.attempts),
        ("pending", 0)
    );
    assert_eq!(detail.attempts.len(), 1, "history is kept across a replay");
    assert_eq!(detail.delivery.dedup_key, "d1");
    // Prune forgets finished jobs; the pending one and its delivery stay.
    assert_eq!(s.prune(10_000).await, 1);
    assert!(s.show(1).await.is_none());
    assert!(s.show(2).await.is_some());
}

contract!(a_short_claim_tells_what_falls_due_next_and_what_waits_its_turn);
/// What the worker learns after a claim that took every job due in its turn: when the next
/// one falls due, and which jobs in flight another of their request waits behind (the end of
/// one of those sends the worker back to the store; another call's end does not).
async fn a_short_claim_tells_what_falls_due_next_and_what_waits_its_turn(mut s: Backend) {
    assert!(s.followed().await.is_empty(), "an empty store");
    s.accept(delivery("d1", &[(Action::Approve, "a")]), 1_000)
        .await;
    s.accept(delivery("d2", &[(Action::Revoke, "a")]), 1_100)
        .await;
    s.accept(delivery("d3", &[(Action::Approve, "b")]), 1_100)
        .await;
    s.accept(delivery("d4", &[(Action::Approve, "c")]), 5_000)
        .await;
    assert!(
        s.followed().await.is_empty(),
        "a's revoke waits for its approve, but that is not in flight"
    );
    let first = s.claim_due(1_200, 10).await;
    assert_eq!(first.iter().map(|j| j.id).collect::<Vec<_>>(), vec![1, 3]);
    assert_eq!(
        s.followed().await,
        vec![1],
        "a's revoke waits for its approve in flight; nothing waits for b's"
    );
    assert_eq!(s.next_due().await, Some(5_000), "c, in its turn");
    s.write(&[], &[done(claimed(&first, 1), State::Succeeded)], 2_000)
        .await
        .unwrap();
    assert!(s.followed().await.is_empty(), "a's approve is done");
    let second = s.claim_due(2_000, 10).await;
    assert_eq!(second.iter().map(|j| j.id).collect::<Vec<_>>(), vec![2]);
    assert!(
        s.followed().await.is_empty(),
        "a's revoke is in flight; nothing waits behind it"
    );
    // A follower counts whether or not it is due yet: another decision on b, accepted later,
    // with b's approve still in flight.
    s.accept(delivery("d5", &[(Action::Revoke, "b")]), 9_000)
        .await;
    assert_eq!(s.followed().await, vec![3]);
}

contract!(an_outcome_counts_only_from_the_current_claim);
async fn an_outcome_counts_only_from_the_current_claim(mut s: Backend) {
    s.accept(delivery("d1", &[(Action::Approve, "a")]), 1_000)
        .await;
    let old = s.claim_due(1_000, 1).await.remove(0);
    // The claim runs out (on SQLite: the relay stopped), and the job is claimed again.
    let later = 1_000 + LEASE.as_millis() as i64 + 1;
    assert_eq!(s.recover(later).await, 1);
    let new = s.claim_due(later, 1).await.remove(0);
    assert_eq!(new.id, old.id);
    assert_ne!(new.claim, old.claim, "a new claim has a new token");
    // The late outcome of the old claim is ignored...
    s.write(&[], &[done(&old, State::Dead)], later)
        .await
        .unwrap();
    let d = s.show(old.id).await.unwrap();
    assert_eq!(d.job.state, "sending");
    assert!(d.attempts.is_empty());
    // ...the current claim's is recorded.
    s.write(&[], &[done(&new, State::Succeeded)], later)
        .await
        .unwrap();
    let d = s.show(old.id).await.unwrap();
    assert_eq!((d.job.state.as_str(), d.attempts.len()), ("succeeded", 1));
    // A second record from the same claim changes nothing either.
    s.write(&[], &[done(&new, State::Dead)], later)
        .await
        .unwrap();
    assert_eq!(s.show(old.id).await.unwrap().job.state, "succeeded");
}

contract!(a_newer_schema_is_refused);
async fn a_newer_schema_is_refused(s: Backend) {
    let err = s.reopen_after_a_newer_relay().await.err().unwrap();
    assert!(err.to_string().contains("schema version 99"), "{err}");
}

// PostgreSQL only: several relays (stores) on one database.

async fn two_stores() -> Option<(TestDb, PgStore, PgStore)> {
    let db = TestDb::create().await?;
    let a = PgStore::open(&db.location(), WINDOWS, false, LEASE)
        .await
        .unwrap();
    let b = PgStore::open(&db.location(), WINDOWS, false, LEASE)
        .await
        .unwrap();
    Some((db, a, b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_delivery_at_two_relays_at_once_is_accepted_once() {
    let Some((_db, a, b)) = two_stores().await else {
        return;
    };
    for i in 0..30 {
        let key = format!("d{i}");
        let req = format!("r{i}");
        let d = delivery(&key, &[(Action::Approve, &req)]);
        let (ra, rb) = tokio::join!(
            a.write(std::slice::from_ref(&d), &[], 1_000),
            b.write(std::slice::from_ref(&d), &[], 1_000)
        );
        let (ra, rb) = (
            ra.unwrap().remove(0).unwrap(),
            rb.unwrap().remove(0).unwrap(),
        );
        let (new, dup) = match (&ra, &rb) {
            (Accepted::New { jobs, .. }, Accepted::Duplicate { job_ids }) => (jobs, job_ids),
            (Accepted::Duplicate { job_ids }, Accepted::New { jobs, .. }) => (jobs, job_ids),
            _ => panic!("{i}: {ra:?} / {rb:?}"),
        };
        assert_eq!(
            new.iter().map(|j| j.job_id).collect::<Vec<_>>(),
            *dup,
            "the duplicate names the original job ids"
        );
    }
    assert_eq!(a.counts().await.unwrap().pending, 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_decision_at_two_relays_at_once_is_one_job() {
    let Some((_db, a, b)) = two_stores().await else {
        return;
    };
    for i in 0..30 {
        let req = format!("r{i}");
        let da = [delivery(&format!("a{i}"), &[(Action::Approve, &req)])];
        let db = [delivery(&format!("b{i}"), &[(Action::Approve, &req)])];
        let (ra, rb) = tokio::join!(a.write(&da, &[], 1_000), b.write(&db, &[], 1_000));
        let mut both = jobs(&ra.unwrap().remove(0).unwrap());
        both.extend(jobs(&rb.unwrap().remove(0).unwrap()));
        both.sort_by_key(|(_, coalesced)| *coalesced);
        assert_eq!(both.len(), 2);
        assert_eq!(both[0].0, both[1].0, "{i}: one job");
        assert_eq!((both[0].1, both[1].1), (false, true), "{i}");
    }
    assert_eq!(a.counts().await.unwrap().pending, 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_that_cross_in_opposite_orders_do_not_deadlock() {
    let Some((_db, a, b)) = two_stores().await else {
        return;
    };
    let batch: Vec<NewDelivery> = (0..40)
        .map(|i| delivery(&format!("k{i}"), &[(Action::Approve, &format!("r{i}"))]))
        .collect();
    let mut reversed = batch.clone();
    reversed.reverse();
    let (ra, rb) = tokio::join!(a.write(&batch, &[], 1_000), b.write(&reversed, &[], 1_000));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    let news = ra
        .iter()
        .chain(rb.iter())
        .filter(|r| matches!(r, Ok(Accepted::New { .. })))
        .count();
    assert!(ra.iter().chain(rb.iter()).all(Result::is_ok));
    assert_eq!(news, 40, "each delivery accepted once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_by_two_relays_never_overlap() {
    let Some((_db, a, b)) = two_stores().await else {
        return;
    };
    let batch: Vec<NewDelivery> = (0..60)
        .map(|i| delivery(&format!("k{i}"), &[(Action::Approve, &format!("r{i}"))]))
        .collect();
    a.write(&batch, &[], 1_000).await.unwrap();
    let (mut seen_a, mut seen_b) = (Vec::new(), Vec::new());
    loop {
        let (ja, jb) = tokio::join!(a.claim_due(1_000, 7), b.claim_due(1_000, 7));
        let (ja, jb) = (ja.unwrap(), jb.unwrap());
        if ja.is_empty() && jb.is_empty() {
            break;
        }
        seen_a.extend(ja.iter().map(|j| j.id));
        seen_b.extend(jb.iter().map(|j| j.id));
    }
    let mut all: Vec<i64> = seen_a.iter().chain(seen_b.iter()).copied().collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 60);
    assert_eq!(seen_a.len() + seen_b.len(), 60, "no job claimed twice");
}

/// Renewed just before it ran out, a lease is not taken over by another relay; not renewed,
/// it runs out, the other relay claims what it held (`take`: that relay's claim at a time,
/// giving IDs and claim tokens), and the first can no longer renew it.
async fn renewal_keeps_a_claim(
    (a, b): (&PgStore, &PgStore),
    what: Leased,
    (id, claim): (i64, i64),
    at: i64,
    take: impl AsyncFn(&PgStore, i64) -> Vec<(i64, i64)>,
) {
    let lease = LEASE.as_millis() as i64;
    assert!(a.renew(what, id, claim, at + lease - 1).await.unwrap());
    assert!(take(b, at + lease + 1).await.is_empty());
    let late = at + 2 * lease + 1;
    let taken = take(b, late).await;
    assert_eq!(taken.iter().map(|t| t.0).collect::<Vec<_>>(), vec![id]);
    assert!(!a.renew(what, id, claim, late).await.unwrap());
    assert!(b.renew(what, taken[0].0, taken[0].1, late).await.unwrap());
}

#[tokio::test]
async fn a_renewed_lease_is_not_taken_over_and_a_lost_one_cannot_be_renewed() {
    let Some((_db, a, b)) = two_stores().await else {
        return;
    };
    a.write(&[delivery("d", &[(Action::Approve, "r")])], &[], 1_000)
        .await
        .unwrap();
    let job = a.claim_due(1_000, 1).await.unwrap().remove(0);
    let take = async |s: &PgStore, at: i64| {
        s.expire_leases(at).await.unwrap();
        let jobs = s.claim_due(at, 10).await.unwrap();
        jobs.iter().map(|j| (j.id, j.claim)).collect()
    };
    renewal_keeps_a_claim((&a, &b), Leased::Job, (job.id, job.claim), 1_000, take).await;
}

#[tokio::test]
async fn a_renewed_answer_lease_is_not_taken_over_and_a_lost_one_cannot_be_renewed() {
    let Some((_db, a, b)) = two_stores().await else {
        return;
    };
    a.write(&[delivery("d", &[(Action::Approve, "r")])], &[], 1_000)
        .await
        .unwrap();
    let job = a.claim_due(1_000, 1).await.unwrap().remove(0);
    let mut rec = done(&job, State::Succeeded);
    rec.answers = vec![NewAnswer {
        via: "pagerduty".into(),
        kind: "note".into(),
        target: r#"{"incident":"P1"}"#.into(),
        body: r#"{"note":{"content":"done"}}"#.into(),
    }];
    a.write(&[], &[rec], 2_000).await.unwrap();
    let answer = a.claim_answers(2_000, 1).await.unwrap().remove(0);
    let take = async |s: &PgStore, at: i64| {
        let answers = s.claim_answers(at, 10).await.unwrap();
        answers.iter().map(|a| (a.id, a.claim)).collect()
    };
    let held = (answer.id, answer.claim);
    renewal_keeps_a_claim((&a, &b), Leased::Answer, held, 2_000, take).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_and_an_approve_under_another_subject_at_once_come_out_in_some_order() {
    let Some((db, a, b)) = two_stores().await else {
        return;
    };
    let raw = db.raw().await;
    for i in 0..100 {
        let (req, s1, s2) = (format!("r{i}"), format!("S{i}"), format!("T{i}"));
        let approve = on_subject(&format!("a{i}"), &[(Action::Approve, &req)], &s1, false);
        a.write(&[approve], &[], 1_000).await.unwrap();
        let end = [on_subject(&format!("e{i}"), &[], &s1, true)];
        let other = [on_subject(
            &format!("o{i}"),
            &[(Action::Approve, &req)],
            &s2,
            false,
        )];
        let (ra, rb) = tokio::join!(a.write(&end, &[], 1_000), b.write(&other, &[], 1_000));
        let (_ra, _rb) = (ra.unwrap(), rb.unwrap());
        let order: Vec<String> = raw
            .query(
                "SELECT action || ' ' || subject FROM jobs WHERE request_id = $1 ORDER BY id",
                &[&req],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let first = format!("approve {s1}");
        assert!(
            order
                == [
                    first.clone(),
                    format!("revoke {s1}"),
                    format!("approve {s2}")
                ]
                || order == [first, format!("approve {s2}")],
            "round {i}: {order:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_relays_opening_a_fresh_database_at_once_migrate_it_once() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let loc = db.location();
    let opens = (0..10).map(|_| {
        let loc = loc.clone();
        tokio::spawn(async move { PgStore::open(&loc, WINDOWS, false, LEASE).await })
    });
    let mut stores = Vec::new();
    for o in opens {
        stores.push(o.await.unwrap().unwrap());
    }
    let rows = db
        .raw()
        .await
        .query("SELECT version FROM p0_relay_schema", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), MIGRATIONS_PG_LEN);
    // And every one of them works.
    for (i, s) in stores.iter().enumerate() {
        s.write(
            &[delivery(&format!("k{i}"), &[(Action::Deny, "r")])],
            &[],
            1_000,
        )
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    }
}

const MIGRATIONS_PG_LEN: usize = 7;

/// A database left at the schema before the last (by relays of the previous release), with
/// work in it, is migrated by a relay of this one at start, and that work goes on: here an
/// approve taken before is revoked by its subject's end after.
#[tokio::test]
async fn a_database_at_the_previous_schema_is_migrated_and_its_work_goes_on() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let previous = super::postgres::MIGRATIONS.len() - 1;
    {
        let mut raw = db.raw().await;
        let tx = raw.transaction().await.unwrap();
        tx.batch_execute(
            "CREATE TABLE p0_relay_schema (
                 version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
        )
        .await
        .unwrap();
        for (i, sql) in super::postgres::MIGRATIONS[..previous].iter().enumerate() {
            tx.batch_execute(sql).await.unwrap();
            tx.execute(
                "INSERT INTO p0_relay_schema (version) VALUES ($1)",
                &[&(i as i32 + 1)],
            )
            .await
            .unwrap();
        }
        tx.commit().await.unwrap();
    }
    // A relay of the previous release: an approve under P1, and an end of P0 (which sends its
    // session through `p0_relay_write_each` before the upgrade).
    let raw = db.raw().await;
    let write = async |key: &str, subject: &str, ends: bool, decisions: serde_json::Value| {
        let batch = serde_json::json!([{
            "source": "pagerduty", "dedup_key": key, "received_at": 1000, "rule": "r",
            "actor": null, "subject": subject, "reply": null, "ends_subject": ends,
            "decisions": decisions
        }]);
        let out: String = raw
            .query_one(
                "SELECT p0_relay_write($1::TEXT::JSONB, '{}'::BYTEA[], '[]'::JSONB, 1000, 0, 0)::TEXT",
                &[&batch.to_string()],
            )
            .await
            .unwrap()
            .get(0);
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    let approve = serde_json::json!([{"org": "acme", "request_id": "r1", "action": "approve",
                                      "expiration": "1h"}]);
    write("before", "P1", false, approve).await;
    write("other", "P0", true, serde_json::json!([])).await;
    // A relay of this release starts and migrates the database.
    let s = PgStore::open(&db.location(), WINDOWS, false, LEASE)
        .await
        .unwrap();
    let versions: i32 = raw
        .query_one("SELECT MAX(version) FROM p0_relay_schema", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(versions as usize, MIGRATIONS_PG_LEN);
    // The old relay's session still writes; its end of P1 revokes the approve taken before.
    let ended = write("after", "P1", true, serde_json::json!([])).await;
    let bound = &ended["results"][0]["bound"];
    assert_eq!(bound[0][2], "r1", "{ended}");
    // And the new relay works on the same data.
    let jobs = s.claim_due(2_000, 10).await.unwrap();
    assert_eq!(
        jobs.iter()
            .map(|j| (j.request_id.as_str(), j.action.as_str()))
            .collect::<Vec<_>>(),
        vec![("r1", "approve")]
    );
}

#[tokio::test]
async fn pruning_is_done_by_one_relay_at_a_time() {
    let Some((db, a, _b)) = two_stores().await else {
        return;
    };
    a.write(&[delivery("d", &[(Action::Approve, "r")])], &[], 1_000)
        .await
        .unwrap();
    let job = a.claim_due(1_000, 1).await.unwrap().remove(0);
    a.write(&[], &[done(&job, State::Succeeded)], 2_000)
        .await
        .unwrap();
    // Another relay is pruning (holds the lock): this one skips its round.
    let other = db.raw().await;
    other
        .execute("SELECT pg_advisory_lock($1)", &[&0x7030_7265_6c61_7902_i64])
        .await
        .unwrap();
    assert_eq!(
        a.prune(Prune {
            finished_before_ms: 10_000,
            ends_before_ms: 10_000
        })
        .await
        .unwrap(),
        0
    );
    assert!(a.show(job.id).await.unwrap().is_some());
    other
        .execute(
            "SELECT pg_advisory_unlock($1)",
            &[&0x7030_7265_6c61_7902_i64],
        )
        .await
        .unwrap();
    assert_eq!(
        a.prune(Prune {
            finished_before_ms: 10_000,
            ends_before_ms: 10_000
        })
        .await
        .unwrap(),
        2,
        "the job and its delivery"
    );
    assert!(a.show(job.id).await.unwrap().is_none());
}

#[tokio::test]
async fn a_relay_is_woken_when_another_commits_new_work() {
    let Some((_db, a, b)) = two_stores().await else {
        return;
    };
    let wake = Arc::new(tokio::sync::Notify::new());
    let listener = a.spawn_listener(wake.clone());
    // The first wake-up comes when the listener is connected.
    tokio::time::timeout(Duration::from_secs(5), wake.notified())
        .await
        .expect("listening");
    b.write(&[delivery("d", &[(Action::Approve, "r")])], &[], 1_000)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), wake.notified())
        .await
        .expect("woken by the other relay's commit");
    listener.abort();
}

#[tokio::test]
async fn an_unreachable_database_is_unavailable_not_a_hang() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let loc = match StoreLocation::parse(
        "test",
        &format!("postgres://postgres@127.0.0.1:{port}/relay"),
        std::path::Path::new("."),
    ) {
        Ok(StoreLocation::Postgres(p)) => *p,
        other => panic!("{other:?}"),
    };
    let started = std::time::Instant::now();
    let err = PgStore::open(&loc, WINDOWS, false, LEASE)
        .await
        .err()
        .unwrap();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn tls_as_libpq_require_encrypts_and_verify_full_checks_the_certificate() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let raw = db.raw().await;
    let ssl: String = raw.query_one("SHOW ssl", &[]).await.unwrap().get(0);
    if ssl != "on" {
        eprintln!("the server has no TLS (ssl = {ssl}): skipped");
        return;
    }
    let with_mode = |mode: &str| {
        let url = db
            .url
            .replace("sslmode=disable", &format!("sslmode={mode}"));
        match StoreLocation::parse("test", &url, std::path::Path::new(".")) {
            Ok(StoreLocation::Postgres(p)) => *p,
            other => panic!("{other:?}"),
        }
    };
    // `require`: encrypted, the (self-signed) certificate not checked, as libpq does.
    let s = PgStore::open(&with_mode("require"), WINDOWS, false, LEASE)
        .await
        .unwrap();
    s.probe().await.unwrap();
    let c = s.client().await.unwrap();
    let encrypted: bool = c
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(encrypted, "the connection is TLS");
    // `verify-full`: a certificate the system does not trust is refused.
    let err = PgStore::open(&with_mode("verify-full"), WINDOWS, false, LEASE)
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("certificate"), "{err}");
}

// Subjects, subject ends and answers back.

impl Backend {
    async fn claim_answers(&mut self, now: i64, limit: usize) -> Vec<AnswerJob> {
        match self {
            Backend::Sqlite(_, s) => s.claim_answers(now, limit).unwrap(),
            Backend::Pg(_, s) => s.claim_answers(now, limit).await.unwrap(),
        }
    }
    async fn record_answer(&mut self, rec: &AnswerRecord) {
        match self {
            Backend::Sqlite(_, s) => s.record_answer(rec).unwrap(),
            Backend::Pg(_, s) => s.record_answer(rec).await.unwrap(),
        }
    }
}

/// A delivery on `subject` (ending it when `ends`).
fn on_subject(key: &str, decisions: &[(Action, &str)], subject: &str, ends: bool) -> NewDelivery {
    let mut d = delivery(key, decisions);
    d.binding = crate::domain::Binding {
        subject: Some(subject.into()),
        reply: Some(crate::domain::Reply {
            via: crate::domain::Via::PagerDuty,
            on: None,
            comment: None,
        }),
        ends_subject: ends,
        reopens_subject: false,
        gate: None,
    };
    d
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

contract!(a_subject_end_revokes_what_was_granted_under_it_in_order);
async fn a_subject_end_revokes_what_was_granted_under_it_in_order(mut s: Backend) {
    for (key, id, subject) in [
        ("d1", "a", "P1"),
        ("d2", "b", "P1"),
        ("d3", "c", "P1"),
        ("d4", "x", "P2"),
    ] {
        s.accept(
            on_subject(key, &[(Action::Approve, id)], subject, false),
            1_000,
        )
        .await;
    }
    let all = s.claim_due(1_000, 10).await;
    assert_eq!(all.len(), 4);
    assert_eq!(all[0].subject.as_deref(), Some("P1"));
    assert_eq!(
        all[0].reply.as_deref(),
        Some(r#"{"via":"pagerduty"}"#),
        "the reply target is stored with the decision"
    );
    // a: P0 approved; b: P0 refused; c: still on its way to P0.
    let mut refused = done(claimed(&all, 2), State::Rejected);
    refused.status = Some(400);
    s.write(
        &[],
        &[done(claimed(&all, 1), State::Succeeded), refused],
        2_000,
    )
    .await
    .unwrap();
    let end = s.accept(on_subject("d5", &[], "P1", true), 3_000).await;
    let revoked = bound(&end);
    assert_eq!(
        revoked.iter().map(|(r, _)| r.as_str()).collect::<Vec<_>>(),
        vec!["a", "c"],
        "the refused request is not revoked; the one still in flight is"
    );
    let detail = s.show(revoked[0].1).await.unwrap();
    assert_eq!(
        (detail.job.action.as_str(), detail.job.subject.as_deref()),
        ("revoke", Some("P1"))
    );
    assert!(detail.job.ended_by.is_some());
    // The revoke of `c` waits for its approve; the revoke of `a` goes now.
    let next = s.claim_due(3_000, 10).await;
    assert_eq!(
        next.iter()
            .map(|j| (j.request_id.as_str(), j.action, j.bound))
            .collect::<Vec<_>>(),
        vec![("a", Action::Revoke, true)]
    );
    assert_eq!(s.next_due().await, None, "nothing else can go yet");
    s.write(&[], &[done(claimed(&all, 3), State::Succeeded)], 4_000)
        .await
        .unwrap();
    let next = s.claim_due(4_000, 10).await;
    assert_eq!(
        next.iter()
            .map(|j| (j.request_id.as_str(), j.action))
            .collect::<Vec<_>>(),
        vec![("c", Action::Revoke)]
    );
    // Ending it again revokes nothing more; the other subject is untouched.
    let again = s.accept(on_subject("d6", &[], "P1", true), 5_000).await;
    assert!(bound(&again).is_empty());
    let p2 = s
        .list(&ListFilter {
            subject: Some("P2".into()),
            ..ListFilter::default()
        })
        .await;
    assert_eq!(
        p2.iter().map(|j| j.request_id.as_str()).collect::<Vec<_>>(),
        vec!["x"]
    );
}

contract!(answers_are_created_with_the_final_outcome_and_claimed_once);
async fn answers_are_created_with_the_final_outcome_and_claimed_once(mut s: Backend) {
    s.accept(
        on_subject("d1", &[(Action::Approve, "a")], "P1", false),
        1_000,
    )
    .await;
    let job = s.claim_due(1_000, 1).await.remove(0);
    let mut rec = done(&job, State::Succeeded);
    rec.answers = vec![NewAnswer {
        via: "pagerduty".into(),
        kind: "note".into(),
        target: r#"{"incident":"P1"}"#.into(),
        body: r#"{"note":{"content":"done"}}"#.into(),
    }];
    s.write(&[], &[rec], 2_000).await.unwrap();
    let claimed = s.claim_answers(2_000, 10).await;
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].job_id, job.id);
    let a = &claimed[0];
    assert_eq!(
        (a.via.as_str(), a.kind.as_str(), a.target.as_str()),
        ("pagerduty", "note", r#"{"incident":"P1"}"#)
    );
    assert_eq!(a.body, r#"{"note":{"content":"done"}}"#);
    assert_eq!((a.attempts, a.window_start_ms), (0, 2_000));
    assert!(s.claim_answers(2_000, 10).await.is_empty(), "claimed once");
    // A stop while it was in flight: it is sent again after the start.
    assert_eq!(s.recover(2_000 + LEASE.as_millis() as i64 + 1).await, 0);
    let again = s
        .claim_answers(2_000 + LEASE.as_millis() as i64 + 1, 10)
        .await;
    assert_eq!(again.len(), 1);
    assert_ne!(again[0].claim, claimed[0].claim);
    let rec = |a: &AnswerJob, state| AnswerRecord {
        id: a.id,
        claim: a.claim,
        at_ms: 40_000,
        state,
        attempts: 1,
        next_attempt_at_ms: 40_000,
        status: Some(201),
        error: None,
    };
    // The stale claim's outcome is ignored; the current one's is kept.
    s.record_answer(&rec(&claimed[0], State::Dead)).await;
    s.record_answer(&rec(&again[0], State::Succeeded)).await;
    let d = s.show(job.id).await.unwrap();
    assert_eq!(d.answers.len(), 1);
    assert_eq!(
        (d.answers[0].state.as_str(), d.answers[0].last_status),
        ("succeeded", Some(201))
    );
    // Pruning the finished decision takes its answers with it.
    assert_eq!(s.prune(100_000).await, 2);
    assert!(s.show(job.id).await.is_none());
}

/// A decision still committing holds its subject's lock shared: decisions on the same
/// subject from other relays do not wait for it, and the subject's end does (so the end sees
/// the approve and revokes it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_share_their_subjects_lock_and_only_an_end_waits_for_them() {
    let Some((db, a, b)) = two_stores().await else {
        return;
    };
    let mut holder = db.raw().await;
    let in_flight = holder.transaction().await.unwrap();
    in_flight
        .execute(
            "SELECT pg_advisory_xact_lock_shared(7002, hashtext('github/PBUSY'))",
            &[],
        )
        .await
        .unwrap();
    let approve = on_subject("busy-1", &[(Action::Approve, "r-1")], "PBUSY", false);
    let quick = tokio::time::timeout(Duration::from_secs(5), a.write(&[approve], &[], 1_000))
        .await
        .expect("a decision on a busy subject does not wait for the others on it")
        .unwrap();
    assert!(matches!(quick[0], Ok(Accepted::New { .. })));

    let end = tokio::spawn(async move {
        let end = on_subject("busy-end", &[], "PBUSY", true);
        b.write(&[end], &[], 2_000).await
    });
    let watcher = db.raw().await;
    let waiting = async {
        loop {
            let row = watcher
                .query_one(
                    "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database
                     WHERE l.locktype = 'advisory' AND NOT l.granted
                       AND d.datname = current_database() AND l.classid = 7002",
                    &[],
                )
                .await
                .unwrap();
            if row.get::<_, i64>(0) == 1 {
                break;
            }
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the end waits for the decision still committing");
    assert!(!end.is_finished());
    in_flight.rollback().await.unwrap();
    let ended = end.await.unwrap().unwrap().remove(0).unwrap();
    assert_eq!(
        bound(&ended).into_iter().map(|b| b.0).collect::<Vec<_>>(),
        ["r-1"]
    );
}

contract!(an_end_sees_the_approve_it_shares_a_batch_with);
/// An approve and the end of its subject committed in one batch (they arrived within one
/// group commit, the approve first): the end revokes it, whatever their dedup keys.
async fn an_end_sees_the_approve_it_shares_a_batch_with(mut s: Backend) {
    let r = s
        .write(
            &[
                on_subject("z-approve", &[(Action::Approve, "late")], "P9", false),
                on_subject("a-end", &[], "P9", true),
            ],
            &[],
            1_000,
        )
        .await
        .unwrap();
    let end = r[1].as_ref().unwrap();
    assert_eq!(
        bound(end).into_iter().map(|b| b.0).collect::<Vec<_>>(),
        ["late"]
    );
}

contract!(an_end_that_arrived_first_still_sees_the_approve_in_its_batch);
/// The same, the end arriving first: within one batch, ends are written after every other
/// delivery (`batch_order`) on both stores.
async fn an_end_that_arrived_first_still_sees_the_approve_in_its_batch(mut s: Backend) {
    let r = s
        .write(
            &[
                on_subject("end-first", &[], "P8", true),
                on_subject("approve-second", &[(Action::Approve, "r-8")], "P8", false),
            ],
            &[],
            1_000,
        )
        .await
        .unwrap();
    let end = r[0].as_ref().unwrap();
    assert_eq!(
        bound(end).into_iter().map(|b| b.0).collect::<Vec<_>>(),
        ["r-8"]
    );
}

contract!(a_decision_on_another_subject_is_not_coalesced_into_this_ones);
/// Two alerts name the same request: each approve is a job bound to its alert, so the first
/// alert's end does not take the access the second one still justifies.
async fn a_decision_on_another_subject_is_not_coalesced_into_this_ones(mut s: Backend) {
    let first = s
        .accept(
            on_subject("f1", &[(Action::Approve, "shared")], "F1", false),
            1_000,
        )
        .await;
    let second = s
        .accept(
            on_subject("f2", &[(Action::Approve, "shared")], "F2", false),
            1_001,
        )
        .await;
    assert!(!jobs(&second)[0].1, "not coalesced across subjects");
    assert_ne!(jobs(&first)[0].0, jobs(&second)[0].0);
    let end_f1 = s.accept(on_subject("f1-end", &[], "F1", true), 2_000).await;
    assert!(
        bound(&end_f1).is_empty(),
        "F2 still justifies the request: F1's end leaves it"
    );
    let end_f2 = s.accept(on_subject("f2-end", &[], "F2", true), 3_000).await;
    assert_eq!(
        bound(&end_f2).into_iter().map(|b| b.0).collect::<Vec<_>>(),
        ["shared"]
    );
    // The same subject still coalesces.
    let again = s
        .accept(
            on_subject("f3", &[(Action::Approve, "other")], "F3", false),
            4_000,
        )
        .await;
    let same = s
        .accept(
            on_subject("f3-again", &[(Action::Approve, "other")], "F3", false),
            4_001,
        )
        .await;
    assert_eq!(jobs(&same), vec![(jobs(&again)[0].0, true)]);
}

/// SQLite compiles each statement once: the hot statements are not prepared again on every
/// use (their bindings are cleared when they go back to the cache, which expires a statement
/// whose plan depends on bound values unless plans are kept stable).
#[test]
fn sqlite_hot_statements_are_compiled_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = SqliteStore::open(&dir.path().join("relay.db"), WINDOWS, false).unwrap();
    for round in 0..5 {
        let batch: Vec<NewDelivery> = (0..3)
            .map(|i| delivery(&format!("d{round}-{i}"), &[(Action::Approve, "r1")]))
            .collect();
        s.write(&batch, &[], 1_000 + round).unwrap();
        for job in s.claim_due(2_000 + round, 1 + round as usize).unwrap() {
            s.write(&[], &[done(&job, State::Succeeded)], 2_000)
                .unwrap();
        }
    }
    for sql in [sqlite::SEEN, sqlite::LATEST] {
        let stmt = s.conn.prepare_cached(sql).unwrap();
        assert_eq!(
            stmt.get_status(rusqlite::StatementStatus::RePrepare),
            0,
            "compiled again: {sql}"
        );
    }
}

/// WAL pages reach the database file from the checkpointer's thread. The writer alone (which
/// checkpoints by itself only past the backstop) leaves them in the WAL.
#[test]
fn sqlite_checkpoints_are_made_off_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.db");
    let db_size = || std::fs::metadata(&path).unwrap().len();
    let mut s = SqliteStore::open(&path, WINDOWS, false).unwrap();
    let before = db_size();
    for i in 0..50 {
        let d = delivery(&format!("d{i}"), &[(Action::Approve, &format!("r{i}"))]);
        s.write(&[d], &[], 1_000).unwrap();
    }
    assert_eq!(db_size(), before, "the writer checkpointed by itself");
    let backstop: i64 = s
        .conn
        .query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))
        .unwrap();
    assert_eq!(backstop, sqlite::CHECKPOINT_BACKSTOP);
    s.checkpoint_in_background(&path).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while db_size() == before {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint within 10 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // The store stops its checkpointer when it goes.
    drop(s);
}

/// A claim commits without waiting for the disk, and every other write must still wait: the
/// setting is back to FULL after each claim, even one that fails (which leaves no transaction
/// open behind it), and what a claim marks is committed (a relay that stops and starts again
/// finds the job claimed, for `recover` to return).
#[test]
fn sqlite_claims_restore_the_full_sync() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.db");
    let synchronous = |s: &SqliteStore| -> i64 {
        s.conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap()
    };
    const FULL: i64 = 2;
    let mut s = SqliteStore::open(&path, WINDOWS, false).unwrap();
    assert_eq!(synchronous(&s), FULL);
    s.write(&[delivery("d1", &[(Action::Approve, "a")])], &[], 1_000)
        .unwrap();
    let job = s.claim_due(2_000, 1).unwrap().remove(0);
    assert_eq!(synchronous(&s), FULL, "after a claim");
    drop(s);
    let mut s = SqliteStore::open(&path, WINDOWS, false).unwrap();
    assert_eq!(s.show(job.id).unwrap().unwrap().job.state, "sending");
    assert_eq!(synchronous(&s), FULL);
    // A claim that fails (a row this relay cannot read) restores the setting too.
    s.conn
        .execute(
            "UPDATE jobs SET state = 'pending', action = 'grant' WHERE id = ?1",
            [job.id],
        )
        .unwrap();
    assert!(s.claim_due(3_000, 1).is_err());
    assert_eq!(synchronous(&s), FULL, "after a failed claim");
    s.conn
        .execute("UPDATE jobs SET action = 'approve' WHERE id = ?1", [job.id])
        .unwrap();
    let again = s.claim_due(3_000, 1).unwrap();
    assert_eq!(again.len(), 1, "the failed claim left no transaction open");
    assert_eq!(again[0].claim, job.claim + 1);
    assert_eq!(synchronous(&s), FULL, "after a claim");
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

fn refusal(a: &Accepted) -> Option<&str> {
    match a {
        Accepted::New { refused, .. } => refused.as_deref(),
        Accepted::Duplicate { .. } => panic!("duplicate"),
    }
}

fn reopened(a: &Accepted) -> bool {
    match a {
        Accepted::New { reopened, .. } => *reopened,
        Accepted::Duplicate { .. } => panic!("duplicate"),
    }
}

/// A delivery on `subject` that reopens it.
fn reopening(key: &str, decisions: &[(Action, &str)], subject: &str) -> NewDelivery {
    let mut d = on_subject(key, decisions, subject, false);
    d.binding.reopens_subject = true;
    d
}

contract!(an_ended_subject_refuses_approves_until_it_reopens);
/// After its end, a subject's approves are stored refused (never coalesced into a live job,
/// never revoked by a later end), its denies and revokes with them; a reopening takes them
/// again. The reason is the same on both stores.
async fn an_ended_subject_refuses_approves_until_it_reopens(mut s: Backend) {
    s.accept(on_subject("e1", &[], "P1", true), 1_000).await;
    let want = ended_reason("P1", 1_000);
    assert_eq!(want, "subject P1 ended at 1970-01-01T00:00:01Z");
    let late = s
        .accept(
            on_subject(
                "e2",
                &[(Action::Approve, "r1"), (Action::Revoke, "r2")],
                "P1",
                false,
            ),
            2_000,
        )
        .await;
    assert_eq!(refusal(&late), Some(want.as_str()));
    let ids: Vec<i64> = jobs(&late).iter().map(|j| j.0).collect();
    assert_eq!(ids.len(), 2);
    // Stored to be answered back, each with the reason; not coalesced with each other or
    // anything after.
    let claimed = s.claim_due(2_000, 10).await;
    assert_eq!(
        claimed
            .iter()
            .map(|j| (j.id, j.refused.as_deref()))
            .collect::<Vec<_>>(),
        vec![(ids[0], Some(want.as_str())), (ids[1], Some(want.as_str()))]
    );
    s.write(
        &[],
        &claimed
            .iter()
            .map(|j| done(j, State::Rejected))
            .collect::<Vec<_>>(),
        2_100,
    )
    .await
    .unwrap();
    // Another subject is untouched.
    let other = s
        .accept(
            on_subject("e3", &[(Action::Approve, "r1")], "P2", false),
            2_200,
        )
        .await;
    assert_eq!(refusal(&other), None);
    // Ending it again: the refused approve is not revoked (it never reached P0).
    let again = s.accept(on_subject("e4", &[], "P1", true), 3_000).await;
    assert!(bound(&again).is_empty());
    // A reopening: approves are taken again, and a later end revokes them.
    let back = s.accept(reopening("e5", &[], "P1"), 4_000).await;
    assert!(reopened(&back));
    assert_eq!(refusal(&back), None);
    let taken = s
        .accept(
            on_subject("e6", &[(Action::Approve, "r3")], "P1", false),
            5_000,
        )
        .await;
    assert_eq!(refusal(&taken), None);
    let end = s.accept(on_subject("e7", &[], "P1", true), 6_000).await;
    assert_eq!(
        bound(&end).into_iter().map(|b| b.0).collect::<Vec<_>>(),
        ["r3"]
    );
    // A reopening that carries its own approve is taken at once; one on a subject that never
    // ended reopens nothing.
    let both = s
        .accept(reopening("e8", &[(Action::Approve, "r4")], "P1"), 7_000)
        .await;
    assert!(reopened(&both));
    assert_eq!(refusal(&both), None);
    let never = s.accept(reopening("e9", &[], "P3"), 7_000).await;
    assert!(!reopened(&never));
}

contract!(replay_refuses_an_approve_whose_subject_ended_after_it);
/// A dead approve, then its subject's end (nothing granted, so nothing revoked): replaying
/// the approve is refused with the reason, alone or with every dead letter; after a reopening
/// it still is (it was asked before the end: ask again).
async fn replay_refuses_an_approve_whose_subject_ended_after_it(mut s: Backend) {
    s.accept(
        on_subject("d1", &[(Action::Approve, "r1")], "P1", false),
        1_000,
    )
    .await;
    s.accept(
        on_subject("d2", &[(Action::Approve, "r2")], "P2", false),
        1_000,
    )
    .await;
    let first = s.claim_due(1_000, 10).await;
    let dead: Vec<AttemptRecord> = first.iter().map(|j| done(j, State::Dead)).collect();
    s.write(&[], &dead, 2_000).await.unwrap();
    let end = s.accept(on_subject("d3", &[], "P1", true), 3_000).await;
    assert!(bound(&end).is_empty(), "a dead approve granted nothing");
    let (r1, r2) = (first[0].id, first[1].id);
    let reason = ended_reason("P1", 3_000);
    assert_eq!(
        s.replay(Replay::One(r1), 4_000).await,
        Replayed {
            queued: vec![],
            overtaken: vec![],
            ended: vec![(r1, reason.clone())],
        }
    );
    assert_eq!(
        s.replay(Replay::AllDead, 4_000).await,
        Replayed {
            queued: vec![r2],
            overtaken: vec![],
            ended: vec![(r1, reason.clone())],
        }
    );
    s.accept(reopening("d4", &[], "P1"), 5_000).await;
    let after = s.replay(Replay::One(r1), 6_000).await;
    assert_eq!(after.queued, Vec::<i64>::new());
    assert_eq!(after.ended.len(), 1);
    assert!(after.ended[0].1.starts_with(&reason), "{:?}", after.ended);
    assert!(
        after.ended[0].1.contains("reopened since"),
        "{:?}",
        after.ended
    );
    let again = s.claim_due(6_000, 10).await;
    assert_eq!(again.iter().map(|j| j.id).collect::<Vec<_>>(), vec![r2]);
}

contract!(ends_are_pruned_only_when_nothing_could_be_replayed_under_them);
/// Subject ends older than their window go, unless a dead approve under the subject could
/// still be replayed: then the end stays to refuse it.
async fn ends_are_pruned_only_when_nothing_could_be_replayed_under_them(mut s: Backend) {
    s.accept(
        on_subject("p1", &[(Action::Approve, "r1")], "P1", false),
        1_000,
    )
    .await;
    let job = s.claim_due(1_000, 1).await.remove(0);
    s.write(&[], &[done(&job, State::Dead)], 1_100)
        .await
        .unwrap();
    s.accept(on_subject("p2", &[], "P1", true), 2_000).await;
    s.accept(on_subject("p3", &[], "P2", true), 2_000).await;
    s.prune_with(Prune {
        finished_before_ms: 0,
        ends_before_ms: 10_000,
    })
    .await;
    // P2's end is gone: an approve under it is taken again.
    let p2 = s
        .accept(
            on_subject("p4", &[(Action::Approve, "r2")], "P2", false),
            11_000,
        )
        .await;
    assert_eq!(refusal(&p2), None);
    // P1's stays while its dead approve could be replayed.
    let p1 = s
        .accept(
            on_subject("p5", &[(Action::Approve, "r3")], "P1", false),
            11_000,
        )
        .await;
    assert_eq!(refusal(&p1), Some(ended_reason("P1", 2_000).as_str()));
    assert_eq!(s.replay(Replay::One(job.id), 12_000).await.ended.len(), 1);
}

/// A delivery whose approves must pass `gate` (a PagerDuty check of `user`).
fn gated(key: &str, decisions: &[(Action, &str)], user: &str) -> NewDelivery {
    let mut d = on_subject(key, decisions, "P1", false);
    d.binding.gate = Some(Box::new(crate::domain::Gate::PagerDuty {
        user: user.into(),
        escalation_policy: Some("PEP1".into()),
        incident: None,
        escalation_policies: vec!["PEP1".into()],
        max_level: Some(2),
        schedules: Vec::new(),
        at_ms: 1_000,
    }));
    d
}

contract!(an_on_call_check_is_stored_with_its_approve_and_its_evidence_recorded);
/// A gated approve carries its check to the worker (a revoke beside it carries none); it
/// coalesces only with an approve under the same check, alone or in a batch; the evidence a
/// record brings stays through later records without any, and a replay clears it, so the
/// decision is checked again.
async fn an_on_call_check_is_stored_with_its_approve_and_its_evidence_recorded(mut s: Backend) {
    let first = s
        .accept(
            gated(
                "g1",
                &[(Action::Approve, "r1"), (Action::Revoke, "r9")],
                "PU1",
            ),
            1_000,
        )
        .await;
    // Another check of the same request is a decision of its own; the same check coalesces,
    // one at a time and within a batch.
    let other = s
        .accept(gated("g2", &[(Action::Approve, "r1")], "PU2"), 1_001)
        .await;
    assert!(!jobs(&other)[0].1, "a different check is not coalesced");
    let batch = s
        .write(
            &[
                gated("g3", &[(Action::Approve, "r1")], "PU2"),
                gated("g4", &[(Action::Approve, "r2")], "PU1"),
                gated("g5", &[(Action::Approve, "r2")], "PU1"),
            ],
            &[],
            1_002,
        )
        .await
        .unwrap();
    let batch: Vec<Accepted> = batch.into_iter().map(Result::unwrap).collect();
    assert_eq!(jobs(&batch[0]), vec![(jobs(&other)[0].0, true)]);
    assert!(!jobs(&batch[1])[0].1);
    assert_eq!(jobs(&batch[2]), vec![(jobs(&batch[1])[0].0, true)]);

    let (approve, revoke) = (jobs(&first)[0].0, jobs(&first)[1].0);
    let due = s.claim_due(2_000, 10).await;
    let job = claimed(&due, approve).clone();
    let gate: crate::domain::Gate = serde_json::from_str(job.gate.as_deref().unwrap()).unwrap();
    assert!(
        matches!(&gate, crate::domain::Gate::PagerDuty { user, max_level: Some(2), .. } if user == "PU1")
    );
    assert_eq!(job.evidence, None, "not checked yet");
    assert_eq!(
        claimed(&due, revoke).gate,
        None,
        "ending access is never gated"
    );

    // Checked and sent, P0 failing: retried with the evidence, which no later record erases.
    // (On r2, whose latest decision it stays: r1's first approve was overtaken by PU2's.)
    let approve = jobs(&batch[1])[0].0;
    let job = claimed(&due, approve).clone();
    let mut rec = done(&job, State::Pending);
    rec.evidence = Some("on call: escalation policy PEP1 level 1".into());
    s.write(&[], &[rec], 2_000).await.unwrap();
    let detail = s.show(approve).await.unwrap();
    assert_eq!(
        detail.evidence.as_deref(),
        Some("on call: escalation policy PEP1 level 1")
    );
    assert!(detail.gate.is_some());
    let again = s.claim_due(3_000, 10).await;
    let job = claimed(&again, approve).clone();
    assert_eq!(
        job.evidence.as_deref(),
        Some("on call: escalation policy PEP1 level 1")
    );
    s.write(&[], &[done(&job, State::Dead)], 3_000)
        .await
        .unwrap();
    assert!(s.show(approve).await.unwrap().evidence.is_some());

    // Replayed, it is checked again.
    let replayed = s.replay(Replay::One(approve), 4_000).await;
    assert_eq!(replayed.queued, vec![approve]);
    let detail = s.show(approve).await.unwrap();
    assert_eq!((detail.evidence, detail.gate.is_some()), (None, true));
}
