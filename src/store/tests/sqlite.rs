//! SQLite only: the SQL run as the writer thread runs it (`sqlite::Db`): statements compiled
//! once, checkpoints off the writer, claims that skip the sync and restore it.

use super::*;
use crate::store::sqlite::{CHECKPOINT_BACKSTOP, Db, LATEST, SEEN};

/// A store's connection as its writer thread holds it, on `clock`.
fn db(path: &std::path::Path, clock: &Clock) -> Db {
    Db::open(path, WINDOWS, false)
        .unwrap()
        .with_clock(clock.clone())
}

/// SQLite compiles each statement once: the hot statements are not prepared again on every
/// use (their bindings are cleared when they go back to the cache, which expires a statement
/// whose plan depends on bound values unless plans are kept stable).
#[test]
fn sqlite_hot_statements_are_compiled_once() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(0);
    let mut s = db(&dir.path().join("relay.db"), &clock);
    for round in 0..5 {
        let batch: Vec<NewDelivery> = (0..3)
            .map(|i| delivery(&format!("d{round}-{i}"), &[(Action::Approve, "r1")]))
            .collect();
        clock.set(1_000 + round);
        s.write(&batch, &[], &[]).unwrap();
        clock.set(2_000 + round);
        for row in s.claim_jobs(1 + round as usize).unwrap() {
            let job = row.unwrap();
            s.write(&[], &[done(&job, State::Succeeded)], &[]).unwrap();
        }
    }
    for sql in [SEEN, LATEST] {
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
    let clock = Clock::manual(1_000);
    let mut s = db(&path, &clock);
    let before = db_size();
    for i in 0..50 {
        let d = delivery(&format!("d{i}"), &[(Action::Approve, &format!("r{i}"))]);
        s.write(&[d], &[], &[]).unwrap();
    }
    assert_eq!(db_size(), before, "the writer checkpointed by itself");
    let backstop: i64 = s
        .conn
        .query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))
        .unwrap();
    assert_eq!(backstop, CHECKPOINT_BACKSTOP);
    // The store opened as the relay opens it runs its checkpointer.
    let (store, _task) = SqliteStore::open(&path, &settings(&clock)).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while db_size() == before {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint within 10 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // The store stops its checkpointer when it goes.
    drop(store);
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
    let synchronous = |s: &Db| -> i64 {
        s.conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap()
    };
    const FULL: i64 = 2;
    let clock = Clock::manual(1_000);
    let mut s = db(&path, &clock);
    assert_eq!(synchronous(&s), FULL);
    s.write(&[delivery("d1", &[(Action::Approve, "a")])], &[], &[])
        .unwrap();
    clock.set(2_000);
    let job = s.claim_jobs(1).unwrap().remove(0).unwrap();
    assert_eq!(synchronous(&s), FULL, "after a claim");
    drop(s);
    let mut s = db(&path, &clock);
    assert_eq!(s.show(job.id).unwrap().unwrap().job.state, "sending");
    assert_eq!(synchronous(&s), FULL);
    // A claim that fails (a row whose columns this relay cannot read) restores the setting
    // too.
    s.conn
        .execute(
            "UPDATE jobs SET state = 'pending', attempts = 'many' WHERE id = ?1",
            [job.id],
        )
        .unwrap();
    clock.set(3_000);
    assert!(s.claim_jobs(1).is_err());
    assert_eq!(synchronous(&s), FULL, "after a failed claim");
    s.conn
        .execute("UPDATE jobs SET attempts = 0 WHERE id = ?1", [job.id])
        .unwrap();
    let again = s.claim_jobs(1).unwrap();
    assert_eq!(again.len(), 1, "the failed claim left no transaction open");
    assert_eq!(again[0].as_ref().unwrap().claim_token, job.claim_token + 1);
    assert_eq!(synchronous(&s), FULL, "after a claim");
}
