//! The embedded store: one SQLite file in WAL mode with `synchronous=FULL`, so a commit has
//! reached the disk before it returns. Schema migrations are embedded and applied at open.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

use super::{
    Accepted, AnswerJob, AnswerRecord, AnswerRow, AttemptRecord, AttemptRow, BoundRevocation,
    Candidate, Counts, DeliveryInfo, Job, JobDetail, JobRef, JobSummary, ListFilter, NewDelivery,
    Prune, Replay, Replayed, State, Store, StoreError, Windows,
};
use crate::domain::{Action, Expiration};

/// Each entry moves the schema one version forward; never edit one that has shipped.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE deliveries (
    id          INTEGER PRIMARY KEY,
    source      TEXT NOT NULL,
    dedup_key   TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    rule        TEXT NOT NULL,
    actor       TEXT,
    job_ids     TEXT NOT NULL DEFAULT '',
    payload     BLOB
);
CREATE INDEX deliveries_dedup ON deliveries (source, dedup_key, received_at);
CREATE TABLE jobs (
    id              INTEGER PRIMARY KEY,
    delivery_id     INTEGER NOT NULL REFERENCES deliveries (id),
    source          TEXT NOT NULL,
    org             TEXT NOT NULL,
    request_id      TEXT NOT NULL,
    action          TEXT NOT NULL,
    expiration      TEXT,
    state           TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    window_start    INTEGER NOT NULL,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    last_status     INTEGER,
    last_error      TEXT
);
CREATE INDEX jobs_due ON jobs (state, next_attempt_at);
CREATE INDEX jobs_decision ON jobs (org, request_id, id);
CREATE TABLE attempts (
    job_id      INTEGER NOT NULL REFERENCES jobs (id),
    at          INTEGER NOT NULL,
    status      INTEGER,
    result      TEXT NOT NULL,
    error       TEXT,
    duration_ms INTEGER NOT NULL
);
CREATE INDEX attempts_job ON attempts (job_id);
"#,
    r#"
ALTER TABLE jobs ADD COLUMN claim_token INTEGER NOT NULL DEFAULT 0;
"#,
    r#"
ALTER TABLE jobs ADD COLUMN subject TEXT;
ALTER TABLE jobs ADD COLUMN reply TEXT;
ALTER TABLE jobs ADD COLUMN ended_by INTEGER;
CREATE INDEX jobs_subject ON jobs (source, subject, id);
CREATE TABLE answers (
    id              INTEGER PRIMARY KEY,
    job_id          INTEGER NOT NULL REFERENCES jobs (id),
    via             TEXT NOT NULL,
    kind            TEXT NOT NULL,
    target          TEXT NOT NULL,
    body            TEXT NOT NULL,
    state           TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    window_start    INTEGER NOT NULL,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    last_status     INTEGER,
    last_error      TEXT,
    claim_token     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX answers_due ON answers (state, next_attempt_at);
CREATE INDEX answers_job ON answers (job_id);
"#,
    r#"
-- Subjects that ended (an incident resolved, an alert closed, an issue closed): approves
-- under one are refused until it reopens, and a replay never sends an approve asked before
-- its subject's latest end. `refused` is why the store refused a job as it was accepted.
-- `gate` is the on-call check an approve must pass before it is sent (JSON), `evidence` what
-- the check found.
CREATE TABLE subject_ends (
    source      TEXT NOT NULL,
    subject     TEXT NOT NULL,
    ended_at    INTEGER NOT NULL,
    delivery_id INTEGER NOT NULL,
    reopened_at INTEGER,
    PRIMARY KEY (source, subject)
) WITHOUT ROWID;
CREATE INDEX subject_ends_at ON subject_ends (ended_at);
ALTER TABLE jobs ADD COLUMN refused TEXT;
ALTER TABLE jobs ADD COLUMN gate TEXT;
ALTER TABLE jobs ADD COLUMN evidence TEXT;
"#,
    r#"
-- When a gated approve's on-call check passed: an approve not sent within
-- `answers.oncall_recheck_after` of it is checked again.
ALTER TABLE jobs ADD COLUMN checked_at INTEGER;
"#,
];

/// Pending jobs that no earlier decision on the same request is still waiting for: a
/// request's decisions reach P0 in the order they were stored (approve, then the revoke its
/// subject's end made).
const IN_TURN: &str = "state = 'pending'
    AND NOT EXISTS (SELECT 1 FROM jobs e WHERE e.org = jobs.org AND e.request_id = jobs.request_id
                    AND e.id < jobs.id AND e.state IN ('pending', 'sending'))";

pub struct SqliteStore {
    /// Declared before `conn`: stopped first, so the writer's connection is the last to close
    /// (and checkpoints what is left).
    checkpointer: Option<Checkpointer>,
    pub(super) conn: Connection,
    windows: Windows,
    store_payloads: bool,
}

impl SqliteStore {
    /// Opens (creating it and its folder when missing) and migrates the store at `path`.
    pub fn open(
        path: &Path,
        windows: Windows,
        store_payloads: bool,
    ) -> Result<SqliteStore, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        // One connection, used by one thread at a time: SQLite's own mutexes are not needed.
        let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE
            | rusqlite::OpenFlags::SQLITE_OPEN_CREATE
            | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags)?;
        conn.set_prepared_statement_cache_capacity(64);
        // Plans that do not depend on bound values. Without this, a cached statement whose
        // plan the planner judged value-sensitive (an `=` on a bound value outside the index
        // it weighed, a bound `LIMIT`) expires each time its bindings are cleared on return
        // to the cache, and is compiled again on every use.
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
            true,
        )?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.pragma_update(None, "wal_autocheckpoint", CHECKPOINT_BACKSTOP)?;
        conn.pragma_update(None, "journal_size_limit", JOURNAL_SIZE_LIMIT)?;
        let mut store = SqliteStore {
            checkpointer: None,
            conn,
            windows,
            store_payloads,
        };
        store.migrate()?;
        Ok(store)
    }

    /// Starts checkpointing this store's WAL on a thread of its own (see `Checkpointer`);
    /// it stops when the store is dropped.
    pub fn checkpoint_in_background(&mut self, path: &Path) -> Result<(), StoreError> {
        self.checkpointer = Some(Checkpointer::start(path)?);
        Ok(())
    }

    fn write_isolated(
        &mut self,
        deliveries: &[NewDelivery],
        records: &[AttemptRecord],
        now_ms: i64,
    ) -> Result<Vec<Result<Accepted, StoreError>>, StoreError> {
        let (windows, store_payloads) = (self.windows, self.store_payloads);
        let mut tx = self.conn.transaction()?;
        let order = super::batch_order(deliveries);
        let mut results = Vec::with_capacity(deliveries.len());
        for &i in &order {
            let sp = tx.savepoint()?;
            let result = accept_one(&sp, &deliveries[i], now_ms, windows, store_payloads);
            if result.is_ok() {
                sp.commit()?;
            }
            results.push(result);
        }
        record_all(&tx, records)?;
        tx.commit()?;
        Ok(super::in_arrival_order(&order, results))
    }

    fn claim_unsynced(&mut self, now_ms: i64, limit: usize) -> Result<Vec<Job>, StoreError> {
        // Read in the due index's order, then marked one by one by ID. (One
        // `UPDATE … WHERE id IN (SELECT …) RETURNING …` makes and drops three temporary tables
        // on every claim: at moderate rates, where each claim takes one or two jobs, that was
        // the largest part of the writer's time.) IMMEDIATE takes the write lock first, so no
        // other connection (`p0-relay jobs`) writes between the read and the marks.
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut jobs = Vec::new();
        {
            let mut due = tx.prepare_cached(&format!(
                "SELECT id, source, org, request_id, action, expiration, attempts, created_at, window_start,
                        claim_token, subject, reply, ended_by IS NOT NULL, refused, gate, evidence,
                        checked_at,
                        (SELECT d.rule FROM deliveries d WHERE d.id = jobs.delivery_id),
                        (SELECT d.actor FROM deliveries d WHERE d.id = jobs.delivery_id)
                 FROM jobs WHERE {IN_TURN} AND next_attempt_at <= ?1
                 ORDER BY next_attempt_at, id LIMIT ?2"
            ))?;
            let rows = due.query_map(params![now_ms, limit as i64], |r| {
                let action: String = r.get(4)?;
                let token: i64 = r.get(9)?;
                Ok((
                    action,
                    Job {
                        id: r.get(0)?,
                        source: r.get(1)?,
                        org: r.get(2)?,
                        request_id: r.get(3)?,
                        action: Action::Approve,
                        expiration: r.get(5)?,
                        attempts: r.get(6)?,
                        accepted_at_ms: r.get(7)?,
                        window_start_ms: r.get(8)?,
                        claim: token + 1,
                        subject: r.get(10)?,
                        reply: r.get(11)?,
                        bound: r.get(12)?,
                        refused: r.get(13)?,
                        gate: r.get(14)?,
                        evidence: r.get(15)?,
                        checked_at_ms: r.get(16)?,
                        rule: r.get(17)?,
                        actor: r.get(18)?,
                    },
                ))
            })?;
            for row in rows {
                let (action, mut job) = row?;
                job.action = Action::parse(&action).ok_or_else(|| {
                    StoreError::Invalid(format!("job {}: unknown action `{action}`", job.id))
                })?;
                jobs.push(job);
            }
            mark_sending(&tx, "jobs", jobs.iter().map(|j| (j.id, j.claim)), now_ms)?;
        }
        tx.commit()?;
        jobs.sort_by_key(|j| j.id);
        Ok(jobs)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let version: i64 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))?;
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(StoreError::Invalid(format!(
                "the store file has schema version {version}, newer than this relay knows ({known})"
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
        }
        Ok(())
    }
}

/// Marks the rows a claim read from `table` (`jobs` or `answers`) as being sent, each under
/// its new claim token: (ID, token) pairs, the token one past the one read.
fn mark_sending(
    tx: &Connection,
    table: &str,
    claimed: impl Iterator<Item = (i64, i64)>,
    now_ms: i64,
) -> Result<(), StoreError> {
    let mut mark = tx.prepare_cached(&format!(
        "UPDATE {table} SET state = 'sending', updated_at = ?2, claim_token = ?3 WHERE id = ?1"
    ))?;
    for (id, token) in claimed {
        mark.execute(params![id, now_ms, token])?;
    }
    Ok(())
}

/// A WAL grown past this (a long read held it in a storm) is cut back to it when it restarts.
const JOURNAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

/// How often the checkpointer copies committed pages from the WAL into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

/// WAL pages past which the writer checkpoints by itself (16 MiB): only when no checkpointer
/// runs (a store opened without one, as in tests) or it cannot catch up (a storm: every
/// checkpoint it finishes, the writer has added more).
pub(super) const CHECKPOINT_BACKSTOP: i64 = 4_096;

/// Copies committed pages from the WAL into the database file on a thread of its own, with a
/// connection of its own. SQLite otherwise checkpoints on the committing connection: the
/// writer stopped for milliseconds several times a second, and every delivery waiting on it
/// waited too. A passive checkpoint never blocks the writer, nor waits for it.
struct Checkpointer {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    fn start(path: &Path) -> Result<Checkpointer, StoreError> {
        let flags =
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags)?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("wal-checkpoint".into())
            .spawn(move || {
                let mut failing = false;
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(CHECKPOINT_EVERY)
                {
                    match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                        Ok(()) => failing = false,
                        Err(e) if !failing => {
                            failing = true;
                            tracing::warn!(
                                error = %e,
                                "cannot checkpoint the store's WAL; the writer does past {CHECKPOINT_BACKSTOP} pages"
                            );
                        }
                        Err(_) => {}
                    }
                }
            })?;
        Ok(Checkpointer {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The delivery seen before under the same dedup key, within the window.
pub(super) const SEEN: &str = "SELECT job_ids FROM deliveries
    WHERE source = ?1 AND dedup_key = ?2 AND received_at >= ?3 ORDER BY id LIMIT 1";

/// The latest decision stored on a request (one stored refused decides nothing).
pub(super) const LATEST: &str = "SELECT id, action, state, created_at, source, subject,
    refused IS NOT NULL, gate FROM jobs WHERE org = ?1 AND request_id = ?2 AND refused IS NULL
    ORDER BY id DESC LIMIT 1";

/// When a subject ended, if it is ended now (not reopened since).
const ENDED: &str = "SELECT ended_at FROM subject_ends
    WHERE source = ?1 AND subject = ?2 AND reopened_at IS NULL";

fn accept_one(
    tx: &Connection,
    d: &NewDelivery,
    now_ms: i64,
    windows: Windows,
    store_payloads: bool,
) -> Result<Accepted, StoreError> {
    let dedup_since = now_ms - windows.dedup.as_millis() as i64;
    let seen: Option<String> = tx
        .prepare_cached(SEEN)?
        .query_row(params![d.source, d.dedup_key, dedup_since], |r| r.get(0))
        .optional()?;
    if let Some(ids) = seen {
        return Ok(Accepted::Duplicate {
            job_ids: ids.split(',').filter_map(|s| s.parse().ok()).collect(),
        });
    }
    tx.prepare_cached(
        "INSERT INTO deliveries (source, dedup_key, received_at, rule, actor, payload)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        d.source,
        d.dedup_key,
        d.received_at_ms,
        d.rule,
        d.actor,
        if store_payloads {
            d.payload.as_deref()
        } else {
            None
        }
    ])?;
    let delivery_id = tx.last_insert_rowid();
    let coalesce_since = now_ms - windows.coalesce.as_millis() as i64;
    let reply = d.reply_json();
    // A subject that ended stays ended: a delivery that asks to approve under it is refused
    // whole (its decisions are stored only to be recorded rejected and answered), unless the
    // delivery itself reopens it.
    let mut reopened = false;
    let mut refused = None;
    if let Some(subject) = &d.binding.subject {
        if d.binding.reopens_subject {
            reopened = tx
                .prepare_cached(
                    "UPDATE subject_ends SET reopened_at = ?3
                     WHERE source = ?1 AND subject = ?2 AND reopened_at IS NULL",
                )?
                .execute(params![d.source, subject, now_ms])?
                > 0;
        } else if !d.binding.ends_subject && d.decisions.iter().any(|x| x.action == Action::Approve)
        {
            let ended: Option<i64> = tx
                .prepare_cached(ENDED)?
                .query_row(params![d.source, subject], |r| r.get(0))
                .optional()?;
            refused = ended.map(|at| super::ended_reason(subject, at));
        }
    }
    let mut jobs = Vec::with_capacity(d.decisions.len());
    for decision in &d.decisions {
        // Why this decision is stored refused: its subject ended, its approve is stale, or
        // (an end naming a request) it was never granted under the subject that ends.
        let refused = match (&refused, decision.action) {
            (Some(ended), _) => Some(ended.clone()),
            (None, Action::Approve) => d.refused.clone(),
            (None, Action::Revoke) if d.binding.ends_subject => unbound(tx, d, decision)?,
            (None, _) => None,
        };
        // The latest job for this request decides: the same action still pending or done
        // recently is not sent again, but approve → revoke → approve is three calls.
        type Latest = (
            i64,
            String,
            String,
            i64,
            String,
            Option<String>,
            bool,
            Option<String>,
        );
        let latest: Option<Latest> = if refused.is_some() {
            None
        } else {
            tx.prepare_cached(LATEST)?
                .query_row(
                    params![decision.org.as_str(), decision.request_id.as_str()],
                    |r| {
                        Ok((
                            r.get(0)?,
                            r.get(1)?,
                            r.get(2)?,
                            r.get(3)?,
                            r.get(4)?,
                            r.get(5)?,
                            r.get(6)?,
                            r.get(7)?,
                        ))
                    },
                )
                .optional()?
        };
        // Only a decision asked on the same subject coalesces: one bound to another incident
        // or alert is a job of its own, so that subject's end cannot take this one's access.
        // A refused one never stands for a decision that will be sent.
        // A gated approve coalesces only into one with the same on-call check.
        let gate = (decision.action == Action::Approve)
            .then(|| d.gate_json())
            .flatten();
        if let Some((id, action, state, created, source, subject, was_refused, was_gate)) = latest
            && action == decision.action.as_str()
            && created >= coalesce_since
            && subject == d.binding.subject
            && (subject.is_none() || source == d.source)
            && !was_refused
            && was_gate == gate
            && matches!(
                state.as_str(),
                "pending" | "sending" | "succeeded" | "dry_run"
            )
        {
            jobs.push(JobRef {
                job_id: id,
                coalesced: true,
                refused: None,
            });
            continue;
        }
        tx.prepare_cached(
            "INSERT INTO jobs (delivery_id, source, org, request_id, action, expiration, state,
                               next_attempt_at, window_start, created_at, updated_at, subject, reply,
                               refused, gate)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending', ?7, ?7, ?7, ?7, ?8, ?9, ?10, ?11)",
        )?
        .execute(params![
            delivery_id,
            d.source,
            decision.org.as_str(),
            decision.request_id.as_str(),
            decision.action.as_str(),
            decision.expiration.as_ref().map(Expiration::as_str),
            now_ms,
            d.binding.subject,
            reply,
            refused,
            gate
        ])?;
        jobs.push(JobRef {
            job_id: tx.last_insert_rowid(),
            coalesced: false,
            refused,
        });
    }
    let bound = match (&d.binding.subject, d.binding.ends_subject) {
        (Some(subject), true) => {
            end_subject(tx, d, subject, delivery_id, reply.as_deref(), now_ms)?
        }
        _ => Vec::new(),
    };
    let ids: Vec<String> = jobs
        .iter()
        .map(|j| j.job_id)
        .chain(bound.iter().map(|b| b.job_id))
        .map(|id| id.to_string())
        .collect();
    tx.prepare_cached("UPDATE deliveries SET job_ids = ?1 WHERE id = ?2")?
        .execute(params![ids.join(","), delivery_id])?;
    Ok(Accepted::New {
        jobs,
        bound,
        refused,
        reopened,
    })
}

/// Requests approved under a subject that are still granted (or on their way to P0): the
/// latest decision on the request is an approve under this subject, pending, sending,
/// succeeded or recorded in a dry run. Refused, failed, denied and revoked ones are left. A
/// decision the store refused as it came (a late approve, an end naming a request it had not
/// bound) decides nothing, so it is never the latest.
const STILL_GRANTED: &str = "SELECT j.org, j.request_id FROM jobs j
     WHERE j.source = ?1 AND j.subject = ?2 AND j.action = 'approve'
       AND j.state IN ('pending', 'sending', 'succeeded', 'dry_run') AND j.refused IS NULL
       AND j.id = (SELECT MAX(k.id) FROM jobs k
                   WHERE k.org = j.org AND k.request_id = j.request_id AND k.refused IS NULL)
     ORDER BY j.id";

/// Whether a request named by an end is granted under the subject that ends: its latest
/// decision is an approve under it, not refused and not failed (`STILL_GRANTED`, for one
/// request). `Some(reason)` when it is not: an end revokes only what it bound.
const GRANTED_UNDER: &str = "SELECT 1 FROM jobs j
     WHERE j.org = ?1 AND j.request_id = ?2 AND j.source = ?3 AND j.subject = ?4
       AND j.action = 'approve' AND j.state IN ('pending', 'sending', 'succeeded', 'dry_run')
       AND j.refused IS NULL
       AND j.id = (SELECT MAX(k.id) FROM jobs k
                   WHERE k.org = j.org AND k.request_id = j.request_id AND k.refused IS NULL)";

fn unbound(
    tx: &Connection,
    d: &NewDelivery,
    decision: &crate::policy::Decision,
) -> Result<Option<String>, StoreError> {
    let Some(subject) = &d.binding.subject else {
        return Ok(Some(super::unbound_reason(
            decision.request_id.as_str(),
            "",
        )));
    };
    let granted: Option<i64> = tx
        .prepare_cached(GRANTED_UNDER)?
        .query_row(
            params![
                decision.org.as_str(),
                decision.request_id.as_str(),
                d.source,
                subject
            ],
            |r| r.get(0),
        )
        .optional()?;
    Ok(granted
        .is_none()
        .then(|| super::unbound_reason(decision.request_id.as_str(), subject)))
}

/// Ends `subject`: records the end (approves under it are refused from now on) and makes one
/// revoke per request still granted under it, queued behind its approve.
fn end_subject(
    tx: &Connection,
    d: &NewDelivery,
    subject: &str,
    delivery_id: i64,
    reply: Option<&str>,
    now_ms: i64,
) -> Result<Vec<BoundRevocation>, StoreError> {
    tx.prepare_cached(
        "INSERT INTO subject_ends (source, subject, ended_at, delivery_id) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (source, subject) DO UPDATE
             SET ended_at = excluded.ended_at, delivery_id = excluded.delivery_id, reopened_at = NULL",
    )?
    .execute(params![d.source, subject, now_ms, delivery_id])?;
    let granted: Vec<(String, String)> = tx
        .prepare_cached(STILL_GRANTED)?
        .query_map(params![d.source, subject], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let mut bound = Vec::with_capacity(granted.len());
    for (org, request_id) in granted {
        tx.prepare_cached(
            "INSERT INTO jobs (delivery_id, source, org, request_id, action, state, next_attempt_at,
                               window_start, created_at, updated_at, subject, reply, ended_by)
             VALUES (?1, ?2, ?3, ?4, 'revoke', 'pending', ?5, ?5, ?5, ?5, ?6, ?7, ?1)",
        )?
        .execute(params![
            delivery_id,
            d.source,
            org,
            request_id,
            now_ms,
            subject,
            reply
        ])?;
        bound.push(BoundRevocation {
            job_id: tx.last_insert_rowid(),
            org,
            request_id,
        });
    }
    Ok(bound)
}

fn record_all(tx: &Connection, records: &[AttemptRecord]) -> Result<(), StoreError> {
    for rec in records {
        // Only the current claim may record an outcome.
        let changed = tx
            .prepare_cached(
                "UPDATE jobs SET state = ?2, attempts = ?3, next_attempt_at = ?4, last_status = ?5,
                             last_error = ?6, updated_at = ?7, evidence = COALESCE(?9, evidence),
                             checked_at = COALESCE(?10, checked_at)
                 WHERE id = ?1 AND claim_token = ?8 AND state = 'sending'",
            )?
            .execute(params![
                rec.job_id,
                rec.state.as_str(),
                rec.attempts,
                rec.next_attempt_at_ms,
                rec.status,
                rec.error,
                rec.at_ms,
                rec.claim,
                rec.evidence,
                rec.checked_at_ms
            ])?;
        if changed == 0 {
            tracing::warn!(
                job_id = rec.job_id,
                "outcome ignored: the job is no longer held by that claim"
            );
            continue;
        }
        tx.prepare_cached(
            "INSERT INTO attempts (job_id, at, status, result, error, duration_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![
            rec.job_id,
            rec.at_ms,
            rec.status,
            rec.result,
            rec.error,
            rec.duration_ms
        ])?;
        for a in &rec.answers {
            tx.prepare_cached(
                "INSERT INTO answers (job_id, via, kind, target, body, state, next_attempt_at,
                                      window_start, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6, ?6, ?6, ?6)",
            )?
            .execute(params![
                rec.job_id, a.via, a.kind, a.target, a.body, rec.at_ms
            ])?;
        }
    }
    Ok(())
}

const SUMMARY_COLUMNS: &str = "id, source, org, request_id, action, expiration, state, attempts,
    created_at, updated_at, next_attempt_at, last_status, last_error, subject, ended_by";

fn summary(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobSummary> {
    Ok(JobSummary {
        id: r.get(0)?,
        source: r.get(1)?,
        org: r.get(2)?,
        request_id: r.get(3)?,
        action: r.get(4)?,
        expiration: r.get(5)?,
        state: r.get(6)?,
        attempts: r.get(7)?,
        created_at_ms: r.get(8)?,
        updated_at_ms: r.get(9)?,
        next_attempt_at_ms: r.get(10)?,
        last_status: r.get(11)?,
        last_error: r.get(12)?,
        subject: r.get(13)?,
        ended_by: r.get(14)?,
    })
}

impl Store for SqliteStore {
    fn write(
        &mut self,
        deliveries: &[NewDelivery],
        records: &[AttemptRecord],
        now_ms: i64,
    ) -> Result<Vec<Result<Accepted, StoreError>>, StoreError> {
        let (windows, store_payloads) = (self.windows, self.store_payloads);
        let tx = self.conn.transaction()?;
        let order = super::batch_order(deliveries);
        let made = order
            .iter()
            .map(|&i| accept_one(&tx, &deliveries[i], now_ms, windows, store_payloads))
            .collect();
        let results = super::in_arrival_order(&order, made);
        if results.iter().any(Result::is_err) {
            // Rare (a constraint or I/O error): start over with a savepoint per delivery, so
            // the failing one is left out whole and the others are kept.
            drop(tx);
            return self.write_isolated(deliveries, records, now_ms);
        }
        record_all(&tx, records)?;
        tx.commit()?;
        Ok(results)
    }

    fn claim_due(&mut self, now_ms: i64, limit: usize) -> Result<Vec<Job>, StoreError> {
        // A claim need not reach the disk: after a crash, `recover` returns claimed jobs to
        // pending anyway, so this commit skips the sync that every other write pays.
        self.conn
            .prepare_cached("PRAGMA synchronous = NORMAL")?
            .execute([])?;
        let result = self.claim_unsynced(now_ms, limit);
        self.conn
            .prepare_cached("PRAGMA synchronous = FULL")?
            .execute([])?;
        result
    }

    fn followed(&mut self) -> Result<Vec<i64>, StoreError> {
        // The jobs in flight (`jobs_due` by state), each looked up in `jobs_decision`: the cost
        // grows with calls in flight (at most the worker's concurrency), not with the queue.
        let mut stmt = self.conn.prepare_cached(
            "SELECT s.id FROM jobs s WHERE s.state = 'sending' AND EXISTS (
                 SELECT 1 FROM jobs p WHERE p.org = s.org AND p.request_id = s.request_id
                    AND p.id > s.id AND p.state = 'pending')",
        )?;
        let ids = stmt.query_map([], |r| r.get(0))?;
        Ok(ids.collect::<Result<_, _>>()?)
    }

    fn next_due(&mut self) -> Result<Option<i64>, StoreError> {
        Ok(self
            .conn
            .prepare_cached(&format!(
                "SELECT MIN(next_attempt_at) FROM jobs WHERE {IN_TURN}"
            ))?
            .query_row([], |r| r.get(0))?)
    }

    fn recover(&mut self) -> Result<usize, StoreError> {
        self.conn.execute(
            "UPDATE answers SET state = 'pending' WHERE state = 'sending'",
            [],
        )?;
        Ok(self.conn.execute(
            "UPDATE jobs SET state = 'pending' WHERE state = 'sending'",
            [],
        )?)
    }

    fn counts(&mut self) -> Result<Counts, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT state, COUNT(*) FROM jobs WHERE state IN ('pending', 'sending', 'dead') GROUP BY state",
        )?;
        let mut counts = Counts::default();
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        for row in rows {
            let (state, n) = row?;
            match state.as_str() {
                "dead" => counts.dead += n as u64,
                _ => counts.pending += n as u64,
            }
        }
        Ok(counts)
    }

    fn list(&mut self, filter: &ListFilter) -> Result<Vec<JobSummary>, StoreError> {
        let sql = format!(
            "SELECT {SUMMARY_COLUMNS} FROM jobs
             WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR source = ?2)
               AND (?4 IS NULL OR subject = ?4)
             ORDER BY id DESC LIMIT ?3"
        );
        let mut stmt = self.conn.prepare(&sql)?;
        let limit = if filter.limit == 0 { 100 } else { filter.limit } as i64;
        let rows = stmt.query_map(
            params![
                filter.state.map(State::as_str),
                filter.source,
                limit,
                filter.subject
            ],
            summary,
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn show(&mut self, id: i64) -> Result<Option<JobDetail>, StoreError> {
        let sql = format!(
            "SELECT {SUMMARY_COLUMNS}, delivery_id, gate, evidence FROM jobs WHERE id = ?1"
        );
        type Found = (JobSummary, i64, Option<String>, Option<String>);
        let found: Option<Found> = self
            .conn
            .query_row(&sql, [id], |r| {
                Ok((summary(r)?, r.get(15)?, r.get(16)?, r.get(17)?))
            })
            .optional()?;
        let Some((job, delivery_id, gate, evidence)) = found else {
            return Ok(None);
        };
        let delivery = self.conn.query_row(
            "SELECT id, source, dedup_key, received_at, rule, actor FROM deliveries WHERE id = ?1",
            [delivery_id],
            |r| {
                Ok(DeliveryInfo {
                    id: r.get(0)?,
                    source: r.get(1)?,
                    dedup_key: r.get(2)?,
                    received_at_ms: r.get(3)?,
                    rule: r.get(4)?,
                    actor: r.get(5)?,
                })
            },
        )?;
        let mut stmt = self.conn.prepare(
            "SELECT at, status, result, error, duration_ms FROM attempts WHERE job_id = ?1 ORDER BY rowid",
        )?;
        let attempts = stmt
            .query_map([id], |r| {
                Ok(AttemptRow {
                    at_ms: r.get(0)?,
                    status: r.get(1)?,
                    result: r.get(2)?,
                    error: r.get(3)?,
                    duration_ms: r.get(4)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        let mut stmt = self.conn.prepare(
            "SELECT id, via, kind, body, state, attempts, updated_at, last_status, last_error
             FROM answers WHERE job_id = ?1 ORDER BY id",
        )?;
        let answers = stmt
            .query_map([id], |r| {
                Ok(AnswerRow {
                    id: r.get(0)?,
                    via: r.get(1)?,
                    kind: r.get(2)?,
                    body: r.get(3)?,
                    state: r.get(4)?,
                    attempts: r.get(5)?,
                    updated_at_ms: r.get(6)?,
                    last_status: r.get(7)?,
                    last_error: r.get(8)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(Some(JobDetail {
            job,
            gate,
            evidence,
            delivery,
            attempts,
            answers,
        }))
    }

    fn replay(&mut self, which: Replay, now_ms: i64) -> Result<Replayed, StoreError> {
        // Immediate: it reads, then writes; a deferred transaction would fail at once (busy
        // snapshot) if a running relay committed between the two. The write lock also keeps
        // out an end (or a later decision) committing between the read and the write.
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let (which, named) = match which {
            Replay::One(id) => ("j.id = ?1 AND j.state IN ('dead', 'rejected')", Some(id)),
            Replay::AllDead => ("j.state = 'dead' AND ?1 IS NULL", None),
        };
        // Each candidate with the latest job on its request (`jobs_decision`) and its
        // subject's end, if it has one.
        let candidates: Vec<Candidate> = tx
            .prepare(&format!(
                "SELECT j.id, j.action, l.id, l.action, j.subject, j.created_at, e.ended_at,
                        e.reopened_at IS NOT NULL
                 FROM jobs j
                 JOIN jobs l ON l.id = (SELECT MAX(k.id) FROM jobs k
                                        WHERE k.org = j.org AND k.request_id = j.request_id)
                 LEFT JOIN subject_ends e ON e.source = j.source AND e.subject = j.subject
                 WHERE {which} ORDER BY j.id"
            ))?
            .query_map(params![named], |r| {
                Ok(Candidate {
                    id: r.get(0)?,
                    action: r.get(1)?,
                    latest: r.get(2)?,
                    latest_action: r.get(3)?,
                    subject: r.get(4)?,
                    created_at: r.get(5)?,
                    ended_at: r.get(6)?,
                    reopened: r.get(7)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        let mut replayed = Replayed::default();
        for c in candidates {
            if c.sort(&mut replayed)? {
                tx.prepare_cached(
                    "UPDATE jobs SET state = 'pending', attempts = 0, next_attempt_at = ?1,
                                     window_start = ?1, updated_at = ?1, refused = NULL, evidence = NULL,
                                         checked_at = NULL WHERE id = ?2",
                )?
                .execute(params![now_ms, c.id])?;
            }
        }
        tx.commit()?;
        Ok(replayed)
    }

    fn probe(&mut self) -> Result<(), StoreError> {
        // The file may have been opened read-only (SQLite falls back to that silently), and
        // `BEGIN IMMEDIATE` takes the write lock, so this fails while the file is read-only,
        // gone, or locked by another writer past the busy timeout. It writes nothing, so a
        // full disk shows only when a real write fails (the receiver flags that at once).
        if self.conn.is_readonly(rusqlite::MAIN_DB)? {
            return Err(StoreError::Invalid("store: the file is read-only".into()));
        }
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.rollback()?;
        Ok(())
    }

    fn prune(&mut self, before: Prune) -> Result<usize, StoreError> {
        let older_than_ms = before.finished_before_ms;
        let tx = self.conn.transaction()?;
        // A finished job that overtook a dead one on its request is kept while that one is:
        // gone, it would let a replay of the dead one undo it.
        let finished = "SELECT id FROM jobs WHERE state IN ('succeeded', 'rejected', 'dry_run') AND updated_at < ?1
            AND NOT EXISTS (SELECT 1 FROM jobs d WHERE d.org = jobs.org AND d.request_id = jobs.request_id
                                AND d.id < jobs.id AND d.state = 'dead')";
        tx.execute(
            &format!("DELETE FROM attempts WHERE job_id IN ({finished})"),
            [older_than_ms],
        )?;
        tx.execute(
            &format!("DELETE FROM answers WHERE job_id IN ({finished})"),
            [older_than_ms],
        )?;
        let jobs = tx.execute(
            &format!("DELETE FROM jobs WHERE id IN ({finished})"),
            [older_than_ms],
        )?;
        let deliveries = tx.execute(
            "DELETE FROM deliveries WHERE received_at < ?1
             AND NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.delivery_id = deliveries.id)",
            [older_than_ms],
        )?;
        // An end is kept while a job under its subject could still be replayed.
        let ends = tx.execute(
            "DELETE FROM subject_ends WHERE ended_at < ?1
             AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.source = subject_ends.source
                                 AND j.subject = subject_ends.subject
                                 AND j.state IN ('dead', 'rejected'))",
            [before.ends_before_ms],
        )?;
        tx.commit()?;
        Ok(jobs + deliveries + ends)
    }

    fn claim_answers(&mut self, now_ms: i64, limit: usize) -> Result<Vec<AnswerJob>, StoreError> {
        // As `claim_unsynced`: read in index order, then marked by ID.
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut answers = Vec::new();
        {
            let mut due = tx.prepare_cached(
                "SELECT id, job_id, via, kind, target, body, attempts, window_start, claim_token
                 FROM answers WHERE state = 'pending' AND next_attempt_at <= ?1
                 ORDER BY next_attempt_at, id LIMIT ?2",
            )?;
            let rows = due.query_map(params![now_ms, limit as i64], |r| {
                let token: i64 = r.get(8)?;
                Ok(AnswerJob {
                    id: r.get(0)?,
                    job_id: r.get(1)?,
                    via: r.get(2)?,
                    kind: r.get(3)?,
                    target: r.get(4)?,
                    body: r.get(5)?,
                    attempts: r.get(6)?,
                    window_start_ms: r.get(7)?,
                    claim: token + 1,
                })
            })?;
            for row in rows {
                answers.push(row?);
            }
            mark_sending(
                &tx,
                "answers",
                answers.iter().map(|a| (a.id, a.claim)),
                now_ms,
            )?;
        }
        tx.commit()?;
        answers.sort_by_key(|a| a.id);
        Ok(answers)
    }

    fn record_answer(&mut self, rec: &AnswerRecord) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "UPDATE answers SET state = ?2, attempts = ?3, next_attempt_at = ?4, last_status = ?5,
                                    last_error = ?6, updated_at = ?7
                 WHERE id = ?1 AND claim_token = ?8 AND state = 'sending'",
            )?
            .execute(params![
                rec.id,
                rec.state.as_str(),
                rec.attempts,
                rec.next_attempt_at_ms,
                rec.status,
                rec.error,
                rec.at_ms,
                rec.claim
            ])?;
        Ok(())
    }

    fn next_answer_due(&mut self) -> Result<Option<i64>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT MIN(next_attempt_at) FROM answers WHERE state = 'pending'")?
            .query_row([], |r| r.get(0))?)
    }
}
