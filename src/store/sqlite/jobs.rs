//! Decisions on SQLite: a batch of deliveries stored (dedup, coalescing, refusals, subject
//! ends in `ends.rs`) with the outcomes recorded beside them; claims in each request's turn;
//! recovery and replay. The same rules PostgreSQL keeps in `postgres/functions/`.

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, ToSql, params, params_from_iter};

use super::audit::insert_events;
use super::writer::Task;
use super::{Db, SqliteStore, rows};
use crate::domain::{Action, Expiration};
use crate::policy::Decision;
use crate::store::api::{Jobs, WriteResults};
use crate::store::audit::{self, AuditEvent, Body};
use crate::store::batch::{self, Parts};
use crate::store::model::{
    Accepted, Ahead, AttemptRecord, Claim, Claimed, Job, JobRef, NewDelivery, Replay, Replayed,
    Settled, token,
};
use crate::store::rows::{JOB, Latest, candidates};
use crate::store::rules::{Candidate, batch_order, in_arrival_order};
use crate::store::{StoreError, ms};

/// The delivery seen before under the same dedup key, within the window.
pub(crate) const SEEN: &str = "SELECT job_ids FROM deliveries
    WHERE source = ?1 AND dedup_key = ?2 AND received_at >= ?3 ORDER BY id LIMIT 1";

/// The latest decision stored on a request (one stored refused decides nothing).
pub(crate) const LATEST: &str = "SELECT id, action, state, created_at, source, subject,
    refused IS NOT NULL, gate FROM jobs WHERE org = ?1 AND request_id = ?2 AND refused IS NULL
    ORDER BY id DESC LIMIT 1";

/// Pending jobs that no earlier decision on the same request is still waiting for: a
/// request's decisions reach P0 in the order they were stored (approve, then the revoke its
/// subject's end made).
const IN_TURN: &str = "state = 'pending'
    AND NOT EXISTS (SELECT 1 FROM jobs e WHERE e.org = jobs.org AND e.request_id = jobs.request_id
                    AND e.id < jobs.id AND e.state IN ('pending', 'sending'))";

#[async_trait]
impl Jobs for SqliteStore {
    async fn write_parts(&self, parts: Parts) -> Result<WriteResults, StoreError> {
        batch::write(&self.tasks, parts, Task::Write).await
    }

    async fn claim_jobs(&self, limit: usize) -> Result<Claimed<Job>, StoreError> {
        self.run(move |db| {
            let claimed = Claimed::of(db.claim_jobs(limit)?);
            // What lies ahead, in the same trip (`waited_on` first: see `Ahead`).
            Ok(claimed.with_ahead(limit, || {
                let waited_on = db.waited_on();
                Ahead::from(db.next_job_due(), waited_on)
            }))
        })
        .await
    }

    async fn next_job_due(&self) -> Result<Option<i64>, StoreError> {
        self.run(|db| db.next_job_due()).await
    }

    async fn waited_on(&self) -> Result<Vec<i64>, StoreError> {
        self.run(|db| db.waited_on()).await
    }

    async fn recover(&self) -> Result<usize, StoreError> {
        self.run(|db| db.recover()).await
    }

    async fn replay(&self, which: Replay, operator: &str) -> Result<Replayed, StoreError> {
        let operator = operator.to_owned();
        self.run(move |db| db.replay(which, &operator)).await
    }
}

impl Db {
    /// Stores each delivery with its decisions and records `outcomes`, with the audit events
    /// of both and `events`, in one transaction (`Jobs::write`). A delivery that fails is
    /// left out whole: the batch is written again with a savepoint per delivery.
    pub(crate) fn write(
        &mut self,
        deliveries: &[NewDelivery],
        outcomes: &[AttemptRecord],
        events: &[AuditEvent],
    ) -> Result<WriteResults, StoreError> {
        let now = self.now();
        let settings = (self.windows, self.store_payloads);
        let mut tx = self.conn.transaction()?;
        let order = batch_order(deliveries);
        let made = order
            .iter()
            .map(|&i| Accept::new(&tx, settings, now).accept(&deliveries[i]))
            .collect();
        let mut results = in_arrival_order(&order, made);
        if results.iter().any(Result::is_err) {
            // Rare (a constraint or I/O error): start over with a savepoint per delivery, so
            // the failing one is left out whole and the others are kept.
            drop(tx);
            tx = self.conn.transaction()?;
            let mut made = Vec::with_capacity(deliveries.len());
            for &i in &order {
                let sp = tx.savepoint()?;
                let result = Accept::new(&sp, settings, now).accept(&deliveries[i]);
                if result.is_ok() {
                    sp.commit()?;
                }
                made.push(result);
            }
            results = in_arrival_order(&order, made);
        }
        let written = finish(
            &tx,
            now,
            self.last_event,
            deliveries,
            &results,
            outcomes,
            events,
        )?;
        tx.commit()?;
        self.committed(written);
        Ok(results)
    }

    /// Marks up to `limit` due jobs in their turn as sending under a new claim token. A
    /// claim need not reach the disk: after a crash, `recover` returns claimed jobs to
    /// pending anyway, so this commit skips the sync that every other write pays.
    pub(crate) fn claim_jobs(&mut self, limit: usize) -> Result<Vec<Claim<Job>>, StoreError> {
        self.conn
            .prepare_cached("PRAGMA synchronous = NORMAL")?
            .execute([])?;
        let result = self.claim_unsynced(limit);
        self.conn
            .prepare_cached("PRAGMA synchronous = FULL")?
            .execute([])?;
        result
    }

    fn claim_unsynced(&mut self, limit: usize) -> Result<Vec<Claim<Job>>, StoreError> {
        // Read in the due index's order, then marked one by one by ID. (One
        // `UPDATE … WHERE id IN (SELECT …) RETURNING …` makes and drops three temporary tables
        // on every claim: at moderate rates, where each claim takes one or two jobs, that was
        // the largest part of the writer's time.) IMMEDIATE takes the write lock first, so no
        // other connection (`p0-relay jobs`) writes between the read and the marks.
        let now = self.now();
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let sql = format!(
            "SELECT {JOB}, claim_token + 1 FROM jobs WHERE {IN_TURN} AND next_attempt_at <= ?1
             ORDER BY next_attempt_at, id LIMIT ?2"
        );
        let mut claimed = rows(&tx, &sql, params![now, limit as i64], |r| Job::read(r))?;
        mark_sending(&tx, "jobs", claimed.iter().map(token), now)?;
        tx.commit()?;
        claimed.sort_by_key(|c| token(c).0);
        Ok(claimed)
    }

    pub(crate) fn next_job_due(&mut self) -> Result<Option<i64>, StoreError> {
        Ok(self
            .conn
            .prepare_cached(&format!(
                "SELECT MIN(next_attempt_at) FROM jobs WHERE {IN_TURN}"
            ))?
            .query_row([], |r| r.get(0))?)
    }

    pub(crate) fn waited_on(&mut self) -> Result<Vec<i64>, StoreError> {
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

    /// One relay owns the file: anything in flight at open was left by a stop.
    pub(crate) fn recover(&mut self) -> Result<usize, StoreError> {
        self.conn.execute(
            "UPDATE answers SET state = 'pending' WHERE state = 'sending'",
            [],
        )?;
        Ok(self.conn.execute(
            "UPDATE jobs SET state = 'pending' WHERE state = 'sending'",
            [],
        )?)
    }

    pub(crate) fn replay(&mut self, which: Replay, operator: &str) -> Result<Replayed, StoreError> {
        let now = self.now();
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
        let sql = candidates(which, "");
        let candidates = rows(&tx, &sql, params![named], |r| Candidate::read(r))?;
        let mut replayed = Replayed::default();
        for c in candidates {
            if c.classify(&mut replayed)? {
                tx.prepare_cached(
                    "UPDATE jobs SET state = 'pending', attempts = 0, next_attempt_at = ?1,
                            window_start = ?1, updated_at = ?1, refused = NULL, evidence = NULL,
                            checked_at = NULL
                     WHERE id = ?2",
                )?
                .execute(params![now, c.id])?;
            }
        }
        let events: Vec<AuditEvent> = replayed
            .queued
            .iter()
            .map(|id| audit::replayed(*id, operator))
            .collect();
        let written = insert_events(&tx, now, self.last_event, &events)?;
        tx.commit()?;
        self.committed(written);
        Ok(replayed)
    }
}

/// Marks the rows a claim read from `table` (`jobs` or `answers`) as being sent, each under
/// its new claim token: (ID, token) pairs, the token one past the one stored.
pub(super) fn mark_sending(
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

/// A job to store, in the delivery that makes it.
pub(super) struct NewJob<'a> {
    pub delivery_id: i64,
    pub source: &'a str,
    pub org: &'a str,
    pub request_id: &'a str,
    pub action: Action,
    pub expiration: Option<&'a str>,
    pub subject: Option<&'a str>,
    pub reply: Option<&'a str>,
    pub refused: Option<&'a str>,
    pub gate: Option<&'a str>,
    /// The delivery whose subject end made this revoke.
    pub ended_by: Option<i64>,
}

/// One delivery being stored, in the transaction of its batch.
pub(super) struct Accept<'t> {
    pub(super) tx: &'t Connection,
    windows: crate::store::Windows,
    store_payloads: bool,
    pub(super) now: i64,
}

impl<'t> Accept<'t> {
    fn new(
        tx: &'t Connection,
        (windows, store_payloads): (crate::store::Windows, bool),
        now: i64,
    ) -> Self {
        Accept {
            tx,
            windows,
            store_payloads,
            now,
        }
    }

    /// Stores `d`: a duplicate within the dedup window stores nothing; otherwise the
    /// delivery, a job per decision (or the one it coalesces into), and its subject's end.
    fn accept(&self, d: &NewDelivery) -> Result<Accepted, StoreError> {
        if let Some(job_ids) = self.seen(d)? {
            return Ok(Accepted::Duplicate { job_ids });
        }
        let delivery_id = self.insert_delivery(d)?;
        let subject = self.subject_state(d)?;
        let reply = d.reply_json();
        let jobs = d
            .decisions
            .iter()
            .map(|decision| self.decide(d, decision, delivery_id, &subject.refused, &reply))
            .collect::<Result<Vec<_>, _>>()?;
        let bound = match (&d.binding.subject, d.binding.ends_subject) {
            (Some(subject), true) => self.end_subject(d, subject, delivery_id, reply.as_deref())?,
            _ => Vec::new(),
        };
        let ids: Vec<String> = jobs
            .iter()
            .map(|j| j.job_id)
            .chain(bound.iter().map(|b| b.job_id))
            .map(|id| id.to_string())
            .collect();
        self.tx
            .prepare_cached("UPDATE deliveries SET job_ids = ?1 WHERE id = ?2")?
            .execute(params![ids.join(","), delivery_id])?;
        Ok(Accepted::New {
            jobs,
            bound,
            refused: subject.refused,
            reopened: subject.reopened,
        })
    }

    /// The jobs of the same delivery stored within the dedup window, if it was.
    fn seen(&self, d: &NewDelivery) -> Result<Option<Vec<i64>>, StoreError> {
        let since = self.now - ms(self.windows.dedup);
        let seen: Option<String> = self
            .tx
            .prepare_cached(SEEN)?
            .query_row(params![d.source, d.dedup_key, since], |r| r.get(0))
            .optional()?;
        Ok(seen.map(|ids| ids.split(',').filter_map(|s| s.parse().ok()).collect()))
    }

    fn insert_delivery(&self, d: &NewDelivery) -> Result<i64, StoreError> {
        let payload = d.payload.as_deref().filter(|_| self.store_payloads);
        self.tx
            .prepare_cached(
                "INSERT INTO deliveries (source, dedup_key, received_at, rule, actor, payload)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute((
                &d.source,
                &d.dedup_key,
                d.received_at_ms,
                &d.rule,
                &d.actor,
                payload,
            ))?;
        Ok(self.tx.last_insert_rowid())
    }

    /// Stores one decision: refused (its subject ended, its approve is stale, an end named a
    /// request it had not bound), coalesced into the request's latest, or a new job.
    fn decide(
        &self,
        d: &NewDelivery,
        decision: &Decision,
        delivery_id: i64,
        ended: &Option<String>,
        reply: &Option<String>,
    ) -> Result<JobRef, StoreError> {
        let refused = match (ended, decision.action) {
            (Some(ended), _) => Some(ended.clone()),
            (None, Action::Approve) => d.refused.clone(),
            (None, Action::Revoke) if d.binding.ends_subject => self.unbound(d, decision)?,
            (None, _) => None,
        };
        // A gated approve coalesces only into one with the same on-call check.
        let gate = (decision.action == Action::Approve)
            .then(|| d.gate_json())
            .flatten();
        if refused.is_none()
            && let Some(id) = self.coalesces_into(d, decision, &gate)?
        {
            return Ok(JobRef {
                job_id: id,
                coalesced: true,
                refused: None,
            });
        }
        let job_id = self.insert_job(NewJob {
            delivery_id,
            source: &d.source,
            org: decision.org.as_str(),
            request_id: decision.request_id.as_str(),
            action: decision.action,
            expiration: decision.expiration.as_ref().map(Expiration::as_str),
            subject: d.binding.subject.as_deref(),
            reply: reply.as_deref(),
            refused: refused.as_deref(),
            gate: gate.as_deref(),
            ended_by: None,
        })?;
        Ok(JobRef {
            job_id,
            coalesced: false,
            refused,
        })
    }

    /// Stores a pending job; its ID.
    pub(super) fn insert_job(&self, job: NewJob<'_>) -> Result<i64, StoreError> {
        self.tx
            .prepare_cached(
                "INSERT INTO jobs (delivery_id, source, org, request_id, action, expiration, state,
                                   next_attempt_at, window_start, created_at, updated_at, subject,
                                   reply, refused, gate, ended_by)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending', ?7, ?7, ?7, ?7, ?8, ?9, ?10, ?11, ?12)",
            )?
            .execute(params![
                job.delivery_id,
                job.source,
                job.org,
                job.request_id,
                job.action.as_str(),
                job.expiration,
                self.now,
                job.subject,
                job.reply,
                job.refused,
                job.gate,
                job.ended_by
            ])?;
        Ok(self.tx.last_insert_rowid())
    }

    /// The job this decision coalesces into: the request's latest decision, the same action
    /// still pending or done within the coalescing window, asked on the same subject (one
    /// bound to another incident is a job of its own, so that subject's end cannot take this
    /// one's access), not refused, with the same on-call check. Approve → revoke → approve is
    /// three calls.
    fn coalesces_into(
        &self,
        d: &NewDelivery,
        decision: &Decision,
        gate: &Option<String>,
    ) -> Result<Option<i64>, StoreError> {
        let since = self.now - ms(self.windows.coalesce);
        let latest = rows(
            self.tx,
            LATEST,
            params![decision.org.as_str(), decision.request_id.as_str()],
            |r| Latest::read(r),
        )?
        .pop();
        Ok(latest
            .filter(|l| {
                l.action == decision.action.as_str()
                    && l.created_at >= since
                    && l.subject == d.binding.subject
                    && (l.subject.is_none() || l.source == d.source)
                    && !l.refused
                    && l.gate == *gate
                    && matches!(
                        l.state.as_str(),
                        "pending" | "sending" | "succeeded" | "dry_run"
                    )
            })
            .map(|l| l.id))
    }
}

/// After a batch's deliveries: records its outcomes, then writes the audit events of the
/// deliveries stored (in arrival order), of the outcomes recorded and `events`; their bodies.
fn finish(
    tx: &Connection,
    now: i64,
    after: i64,
    deliveries: &[NewDelivery],
    results: &WriteResults,
    outcomes: &[AttemptRecord],
    events: &[AuditEvent],
) -> Result<Vec<Body>, StoreError> {
    let recorded = record_all(tx, outcomes)?;
    let mut all: Vec<AuditEvent> = deliveries
        .iter()
        .zip(results)
        .filter_map(|(d, r)| Some(audit::accepted(d, r.as_ref().ok()?)))
        .flatten()
        .collect();
    all.extend(
        recorded
            .into_iter()
            .flat_map(|rec| rec.settled.audit.iter().cloned()),
    );
    all.extend(events.iter().cloned());
    insert_events(tx, now, after, &all)
}

/// Records each attempt's outcome, only under the claim it was made with, with its attempt
/// row and the answers back it creates; those recorded.
fn record_all<'r>(
    tx: &Connection,
    outcomes: &'r [AttemptRecord],
) -> Result<Vec<&'r AttemptRecord>, StoreError> {
    let mut recorded = Vec::with_capacity(outcomes.len());
    for rec in outcomes {
        let applied = settle(
            tx,
            "UPDATE jobs SET state = ?2, attempts = ?3, next_attempt_at = ?4, last_status = ?5,
                             last_error = ?6, updated_at = ?7, evidence = COALESCE(?9, evidence),
                             checked_at = COALESCE(?10, checked_at)
             WHERE id = ?1 AND claim_token = ?8 AND state = 'sending'",
            &rec.settled,
            &[&rec.evidence, &rec.checked_at_ms],
        )?;
        let s = &rec.settled;
        if !applied {
            tracing::warn!(
                job_id = s.id,
                "outcome ignored: the job is no longer held by that claim"
            );
            continue;
        }
        tx.prepare_cached(
            "INSERT INTO attempts (job_id, at, status, result, error, duration_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute((
            s.id,
            s.at_ms,
            s.status,
            rec.result,
            &s.error,
            rec.duration_ms,
        ))?;
        for a in &rec.answers {
            tx.prepare_cached(
                "INSERT INTO answers (job_id, via, kind, target, body, state, next_attempt_at,
                                      window_start, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6, ?6, ?6, ?6)",
            )?
            .execute(params![s.id, a.via, a.kind, a.target, a.body, s.at_ms])?;
        }
        recorded.push(rec);
    }
    Ok(recorded)
}

/// Records what an attempt settled on its row, only under the claim it was made with:
/// `update` sets `?2`..`?7` (state, attempts, next attempt, last status, last error, time) on
/// row `?1` held by claim `?8`, and `more` from `?9`; whether it applied.
pub(super) fn settle(
    tx: &Connection,
    update: &str,
    s: &Settled,
    more: &[&dyn ToSql],
) -> Result<bool, StoreError> {
    let settled: [&dyn ToSql; 8] = [
        &s.id,
        &s.state.as_str(),
        &s.attempts,
        &s.next_attempt_at_ms,
        &s.status,
        &s.error,
        &s.at_ms,
        &s.claim_token,
    ];
    let params = params_from_iter(settled.iter().chain(more));
    Ok(tx.prepare_cached(update)?.execute(params)? > 0)
}
