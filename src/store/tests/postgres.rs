//! PostgreSQL only: several relays (stores) on one database. Dedup and coalescing across
//! stores, disjoint claims, leases and claim tokens, locks taken in one order, migrations under
//! a lock (and from the previous release's schema), pruning by one at a time, wake-ups,
//! unreachable databases and TLS.

use super::*;

/// One relay's store on the test database, with explicit time as the old interface had it:
/// each call sets the relay's clock to the moment it names.
struct Relay {
    store: PgStore,
    clock: Clock,
}

impl Relay {
    async fn open(location: &PgLocation) -> Result<Relay, StoreError> {
        let clock = Clock::manual(0);
        let (store, _task) = PgStore::open(location, &settings(&clock)).await?;
        Ok(Relay { store, clock })
    }
    async fn write(
        &self,
        d: &[NewDelivery],
        r: &[AttemptRecord],
        now: i64,
    ) -> Result<WriteResults, StoreError> {
        self.clock.set(now);
        self.store.write(d.to_vec(), r.to_vec()).await
    }
    async fn claim_due(&self, now: i64, limit: usize) -> Result<Vec<Job>, StoreError> {
        self.clock.set(now);
        Ok(self.store.claim_jobs(limit).await?.items)
    }
    async fn claim_answers(&self, now: i64, limit: usize) -> Result<Vec<AnswerJob>, StoreError> {
        self.clock.set(now);
        Ok(self.store.claim_answers(limit).await?.items)
    }
    /// Returns the claims whose lease ran out by `now` to pending.
    async fn expire_leases(&self, now: i64) -> Result<usize, StoreError> {
        self.clock.set(now);
        self.store.recover().await
    }
    async fn renew(
        &self,
        what: Leased,
        id: i64,
        claim_token: i64,
        now: i64,
    ) -> Result<bool, StoreError> {
        self.clock.set(now);
        let held = Held {
            what,
            id,
            claim_token,
        };
        self.store.renew(held).await
    }
}

impl std::ops::Deref for Relay {
    type Target = PgStore;

    fn deref(&self) -> &PgStore {
        &self.store
    }
}

// PostgreSQL only: several relays (stores) on one database.

async fn two_stores() -> Option<(TestDb, Relay, Relay)> {
    let db = TestDb::create().await?;
    let a = Relay::open(&location(&db)).await.unwrap();
    let b = Relay::open(&location(&db)).await.unwrap();
    Some((db, a, b))
}

/// `da` written at relay `a` and `db` at `b` at the same moment: what each said of it.
async fn at_once(a: &Relay, b: &Relay, da: NewDelivery, db: NewDelivery) -> (Accepted, Accepted) {
    let (da, db) = ([da], [db]);
    let (ra, rb) = tokio::join!(a.write(&da, &[], 1_000), b.write(&db, &[], 1_000));
    (
        ra.unwrap().remove(0).unwrap(),
        rb.unwrap().remove(0).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_delivery_at_two_relays_at_once_is_accepted_once() {
    let Some((_db, a, b)) = two_stores().await else {
        return;
    };
    for i in 0..30 {
        let d = delivery(&format!("d{i}"), &[(Action::Approve, &format!("r{i}"))]);
        let (ra, rb) = at_once(&a, &b, d.clone(), d).await;
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
        let da = delivery(&format!("a{i}"), &[(Action::Approve, &req)]);
        let db = delivery(&format!("b{i}"), &[(Action::Approve, &req)]);
        let (ra, rb) = at_once(&a, &b, da, db).await;
        let mut both = jobs(&ra);
        both.extend(jobs(&rb));
        both.sort_by_key(|(_, coalesced)| *coalesced);
        assert_eq!(both.len(), 2);
        assert_eq!(both[0].0, both[1].0, "{i}: one job");
        assert_eq!((both[0].1, both[1].1), (false, true), "{i}");
    }
    assert_eq!(a.counts().await.unwrap().pending, 30);
}

/// `n` deliveries, each approving a request of its own (`k0` approves `r0`, and so on).
fn approves(n: usize) -> Vec<NewDelivery> {
    (0..n)
        .map(|i| delivery(&format!("k{i}"), &[(Action::Approve, &format!("r{i}"))]))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_that_cross_in_opposite_orders_do_not_deadlock() {
    let Some((_db, a, b)) = two_stores().await else {
        return;
    };
    let batch = approves(40);
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
    let batch = approves(60);
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

/// Two relays, the first holding the claim on an approve.
async fn two_stores_and_a_claim() -> Option<(TestDb, Relay, Relay, Job)> {
    let (db, a, b) = two_stores().await?;
    a.write(&[delivery("d", &[(Action::Approve, "r")])], &[], 1_000)
        .await
        .unwrap();
    let job = a.claim_due(1_000, 1).await.unwrap().remove(0);
    Some((db, a, b, job))
}

/// Renewed just before it ran out, a lease is not taken over by another relay; not renewed,
/// it runs out, the other relay claims what it held (`take`: that relay's claim at a time,
/// giving IDs and claim tokens), and the first can no longer renew it.
async fn renewal_keeps_a_claim(
    (a, b): (&Relay, &Relay),
    what: Leased,
    (id, claim): (i64, i64),
    at: i64,
    take: impl AsyncFn(&Relay, i64) -> Vec<(i64, i64)>,
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
    let Some((_db, a, b, job)) = two_stores_and_a_claim().await else {
        return;
    };
    let take = async |s: &Relay, at: i64| {
        s.expire_leases(at).await.unwrap();
        let jobs = s.claim_due(at, 10).await.unwrap();
        jobs.iter().map(|j| (j.id, j.claim_token)).collect()
    };
    renewal_keeps_a_claim(
        (&a, &b),
        Leased::Job,
        (job.id, job.claim_token),
        1_000,
        take,
    )
    .await;
}

#[tokio::test]
async fn a_renewed_answer_lease_is_not_taken_over_and_a_lost_one_cannot_be_renewed() {
    let Some((_db, a, b, job)) = two_stores_and_a_claim().await else {
        return;
    };
    a.write(&[], &[with_a_note(done(&job, State::Succeeded))], 2_000)
        .await
        .unwrap();
    let answer = a.claim_answers(2_000, 1).await.unwrap().remove(0);
    let take = async |s: &Relay, at: i64| {
        let answers = s.claim_answers(at, 10).await.unwrap();
        answers.iter().map(|a| (a.id, a.claim_token)).collect()
    };
    let held = (answer.id, answer.claim_token);
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
    let loc = location(&db);
    let opens = (0..10).map(|_| {
        let loc = loc.clone();
        tokio::spawn(async move { Relay::open(&loc).await })
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

const MIGRATIONS_PG_LEN: usize = 10;

/// A database left by relays of the previous release (schema 7, its functions), with work in
/// it, is migrated by a relay of this one at start, and that work goes on: here an approve
/// taken before is revoked by its subject's end after, written by the previous release's
/// call, which now keeps the audit trail too.
#[tokio::test]
async fn a_database_at_the_previous_schema_is_migrated_and_its_work_goes_on() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    db.raw()
        .await
        .batch_execute(include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/postgres_schema_v7.sql"
        )))
        .await
        .unwrap();
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
    let s = Relay::open(&location(&db)).await.unwrap();
    let added: bool = raw
        .query_one(
            "SELECT to_regproc('p0_relay_still_granted') IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(added);
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
    let revoked: i64 = raw
        .query_one(
            "SELECT count(*) FROM audit_events WHERE event = 'revoked'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(revoked, 1, "the old call's end is in the audit trail");
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
    const PRUNE_LOCK: i64 = 0x7030_7265_6c61_7902;
    let other = db.raw().await;
    let prune = || {
        a.prune(Prune {
            audit_before_ms: 0,
            audit_key: None,
            finished_before_ms: 10_000,
            ends_before_ms: 10_000,
        })
    };
    let lock = "SELECT pg_advisory_lock($1)";
    other.execute(lock, &[&PRUNE_LOCK]).await.unwrap();
    assert_eq!(prune().await.unwrap(), 0);
    assert!(a.show(job.id).await.unwrap().is_some());
    let unlock = "SELECT pg_advisory_unlock($1)";
    other.execute(unlock, &[&PRUNE_LOCK]).await.unwrap();
    assert_eq!(prune().await.unwrap(), 2, "the job and its delivery");
    assert!(a.show(job.id).await.unwrap().is_none());
}

#[tokio::test]
async fn a_relay_is_woken_when_another_commits_new_work() {
    let Some((_db, a, b)) = two_stores().await else {
        return;
    };
    let wake = Arc::new(tokio::sync::Notify::new());
    a.wake_on_new_work(wake.clone());
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
    let err = Relay::open(&loc).await.err().unwrap();
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
        super::skip::skip(&format!("a PostgreSQL server with TLS (ssl = {ssl})"));
        return;
    }
    let with_mode = |mode: &str| {
        let url = db
            .url()
            .replace("sslmode=disable", &format!("sslmode={mode}"));
        match StoreLocation::parse("test", &url, std::path::Path::new(".")) {
            Ok(StoreLocation::Postgres(p)) => *p,
            other => panic!("{other:?}"),
        }
    };
    // `require`: encrypted, the (self-signed) certificate not checked, as libpq does.
    let s = Relay::open(&with_mode("require")).await.unwrap();
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
    let err = Relay::open(&with_mode("verify-full")).await.err().unwrap();
    assert!(err.to_string().contains("certificate"), "{err}");
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

/// What the server answers about a statement refuses it (so a batch is written again in parts
/// and the delivery that caused it fails alone); a connection the server closes makes the
/// database unavailable.
#[tokio::test]
async fn a_cancelled_statement_refuses_and_a_closed_connection_is_unavailable() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let client = db.raw().await;
    let timed_out = client
        .batch_execute("SET statement_timeout = 10; SELECT pg_sleep(1)")
        .await
        .unwrap_err();
    assert_eq!(timed_out.code().map(|c| c.code()), Some("57014"));
    let refused = StoreError::from(timed_out);
    assert!(matches!(refused, StoreError::Refused(_)), "{refused:?}");

    let killed = client
        .batch_execute("SELECT pg_terminate_backend(pg_backend_pid())")
        .await
        .unwrap_err();
    let gone = StoreError::from(killed);
    assert!(matches!(gone, StoreError::Unavailable(_)), "{gone:?}");
}
