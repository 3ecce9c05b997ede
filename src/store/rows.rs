//! Reading what either database returns, once: `Row` gives a row's columns the same way from
//! SQLite and PostgreSQL, and each stored value is read from the same column list in both
//! (`JOB`, `SUMMARY`, ...). A claimed job's values are parsed here, as it is read: the worker
//! handles domain values only, and a row it cannot read is `Unreadable`.

use super::StoreError;
use super::model::{
    AnswerJob, AnswerRow, AttemptRow, DeliveryInfo, Granted, Job, JobSummary, Unreadable,
};
use crate::domain::{Action, Expiration, Gate, Id, Reply, printable};

/// A row's columns by index, from either database.
pub(crate) trait Row {
    fn int(&self, i: usize) -> Result<i64, StoreError>;
    fn opt_int(&self, i: usize) -> Result<Option<i64>, StoreError>;
    fn text(&self, i: usize) -> Result<String, StoreError>;
    fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError>;
    fn flag(&self, i: usize) -> Result<bool, StoreError>;

    /// A count (attempts), never negative.
    fn count(&self, i: usize) -> Result<u32, StoreError> {
        Ok(u32::try_from(self.int(i)?.max(0)).unwrap_or(u32::MAX))
    }

    /// An HTTP status as stored.
    fn status(&self, i: usize) -> Result<Option<u16>, StoreError> {
        Ok(self
            .opt_int(i)?
            .map(|s| u16::try_from(s.clamp(0, 999)).unwrap_or_default()))
    }
}

impl Row for rusqlite::Row<'_> {
    fn int(&self, i: usize) -> Result<i64, StoreError> {
        Ok(self.get(i)?)
    }
    fn opt_int(&self, i: usize) -> Result<Option<i64>, StoreError> {
        Ok(self.get(i)?)
    }
    fn text(&self, i: usize) -> Result<String, StoreError> {
        Ok(self.get(i)?)
    }
    fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError> {
        Ok(self.get(i)?)
    }
    fn flag(&self, i: usize) -> Result<bool, StoreError> {
        Ok(self.get(i)?)
    }
}

impl Row for tokio_postgres::Row {
    /// BIGINT, or INTEGER (counts and statuses are stored as INTEGER).
    fn int(&self, i: usize) -> Result<i64, StoreError> {
        Ok(self.opt_int(i)?.unwrap_or_default())
    }
    fn opt_int(&self, i: usize) -> Result<Option<i64>, StoreError> {
        let narrow = self
            .columns()
            .get(i)
            .is_some_and(|c| *c.type_() == tokio_postgres::types::Type::INT4);
        Ok(match narrow {
            true => self.try_get::<_, Option<i32>>(i)?.map(i64::from),
            false => self.try_get(i)?,
        })
    }
    fn text(&self, i: usize) -> Result<String, StoreError> {
        Ok(self.try_get(i)?)
    }
    fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError> {
        Ok(self.try_get(i)?)
    }
    fn flag(&self, i: usize) -> Result<bool, StoreError> {
        Ok(self.try_get(i)?)
    }
}

/// A claimed job's columns (its claim token last: SQLite reads the one it is about to mark,
/// PostgreSQL returns the one it marked).
pub(crate) const JOB: &str = "id, source, org, request_id, action, expiration, attempts,
    created_at, window_start, subject, reply, ended_by IS NOT NULL, refused, gate, evidence,
    checked_at, (SELECT d.rule FROM deliveries d WHERE d.id = jobs.delivery_id),
    (SELECT d.actor FROM deliveries d WHERE d.id = jobs.delivery_id),
    (SELECT d.dedup_key FROM deliveries d WHERE d.id = jobs.delivery_id)";

impl Job {
    /// A claimed job (`JOB`, then its claim token), its values parsed; `Unreadable` when what
    /// its call to P0 needs (org, request ID, action, an approve's expiration) is not a value
    /// the relay writes (the row was changed behind its back). What only an approve needs
    /// never holds back a revoke or a deny: an unreadable reply is no answer back, an
    /// unreadable on-call check refuses an approve (`gate`) and is nothing to the others.
    pub(crate) fn read(r: &impl Row) -> Result<Result<Job, Unreadable>, StoreError> {
        let (id, attempts, claim_token) = (r.int(0)?, r.count(6)?, r.int(19)?);
        let unreadable = |why: String| Unreadable {
            id,
            claim_token,
            attempts,
            why: format!("stored decision unreadable: {why}"),
        };
        let called = (|| -> Result<_, String> {
            let action = r.text(4).map_err(|e| e.to_string())?;
            let action = Action::parse(&action)
                .ok_or_else(|| format!("unknown action `{}`", printable(&action)))?;
            let expiration = parsed(r.opt_text(5), "expiration", Expiration::parse);
            Ok((
                Id::parse(&r.text(2).map_err(|e| e.to_string())?)
                    .map_err(|e| format!("org: {e}"))?,
                Id::parse(&r.text(3).map_err(|e| e.to_string())?)
                    .map_err(|e| format!("request ID: {e}"))?,
                action,
                match action {
                    Action::Approve => expiration?,
                    _ => expiration.ok().flatten(),
                },
            ))
        })();
        let (org, request_id, action, expiration) = match called {
            Ok(called) => called,
            Err(why) => return Ok(Err(unreadable(why))),
        };
        let reply = parsed(r.opt_text(10), "reply", |t| {
            serde_json::from_str::<Reply>(t)
        })
        .unwrap_or_else(|why| {
            tracing::warn!(job_id = id, error = %why, "stored reply unreadable: no answer back");
            None
        });
        let gate = match action {
            Action::Approve => parsed(r.opt_text(13), "on-call check", |t| {
                serde_json::from_str::<Gate>(t)
            }),
            _ => Ok(None),
        };
        Ok(Ok(Job {
            id,
            source: r.text(1)?,
            org,
            request_id,
            action,
            expiration,
            attempts,
            accepted_at_ms: r.int(7)?,
            window_start_ms: r.int(8)?,
            claim_token,
            subject: r.opt_text(9)?,
            reply,
            bound: r.flag(11)?,
            refused: r.opt_text(12)?,
            gate,
            evidence: r.opt_text(14)?,
            checked_at_ms: r.opt_int(15)?,
            rule: r.opt_text(16)?,
            actor: r.opt_text(17)?,
            delivery: r.opt_text(18)?,
        }))
    }
}

/// An optional stored text parsed as `what`; a failure says which value.
fn parsed<T, E: std::fmt::Display>(
    text: Result<Option<String>, StoreError>,
    what: &str,
    parse: impl Fn(&str) -> Result<T, E>,
) -> Result<Option<T>, String> {
    let text = text.map_err(|e| format!("{what}: {e}"))?;
    text.as_deref()
        .map(parse)
        .transpose()
        .map_err(|e| format!("{what}: {e}"))
}

/// A claimed answer's columns (its claim token last, as for jobs).
pub(crate) const ANSWER: &str = "id, job_id, via, kind, target, body, attempts, window_start";

impl AnswerJob {
    pub(crate) fn read(r: &impl Row) -> Result<AnswerJob, StoreError> {
        Ok(AnswerJob {
            id: r.int(0)?,
            job_id: r.int(1)?,
            via: r.text(2)?,
            kind: r.text(3)?,
            target: r.text(4)?,
            body: r.text(5)?,
            attempts: r.count(6)?,
            window_start_ms: r.int(7)?,
            claim_token: r.int(8)?,
        })
    }
}

/// A job as `jobs list` shows it.
pub(crate) const SUMMARY: &str = "id, source, org, request_id, action, expiration, state,
    attempts, created_at, updated_at, next_attempt_at, last_status, last_error, subject,
    ended_by";

impl JobSummary {
    pub(crate) fn read(r: &impl Row) -> Result<JobSummary, StoreError> {
        Ok(JobSummary {
            id: r.int(0)?,
            source: r.text(1)?,
            org: r.text(2)?,
            request_id: r.text(3)?,
            action: r.text(4)?,
            expiration: r.opt_text(5)?,
            state: r.text(6)?,
            attempts: r.count(7)?,
            created_at_ms: r.int(8)?,
            updated_at_ms: r.int(9)?,
            next_attempt_at_ms: r.int(10)?,
            last_status: r.status(11)?,
            last_error: r.opt_text(12)?,
            subject: r.opt_text(13)?,
            ended_by: r.opt_int(14)?,
        })
    }
}

pub(crate) const DELIVERY: &str = "id, source, dedup_key, received_at, rule, actor";

impl DeliveryInfo {
    pub(crate) fn read(r: &impl Row) -> Result<DeliveryInfo, StoreError> {
        Ok(DeliveryInfo {
            id: r.int(0)?,
            source: r.text(1)?,
            dedup_key: r.text(2)?,
            received_at_ms: r.int(3)?,
            rule: r.text(4)?,
            actor: r.opt_text(5)?,
        })
    }
}

pub(crate) const ATTEMPT: &str = "at, status, result, error, duration_ms";

impl AttemptRow {
    pub(crate) fn read(r: &impl Row) -> Result<AttemptRow, StoreError> {
        Ok(AttemptRow {
            at_ms: r.int(0)?,
            status: r.status(1)?,
            result: r.text(2)?,
            error: r.opt_text(3)?,
            duration_ms: r.int(4)?,
        })
    }
}

pub(crate) const ANSWER_ROW: &str =
    "id, via, kind, body, state, attempts, updated_at, last_status, last_error";

impl AnswerRow {
    pub(crate) fn read(r: &impl Row) -> Result<AnswerRow, StoreError> {
        Ok(AnswerRow {
            id: r.int(0)?,
            via: r.text(1)?,
            kind: r.text(2)?,
            body: r.text(3)?,
            state: r.text(4)?,
            attempts: r.count(5)?,
            updated_at_ms: r.int(6)?,
            last_status: r.status(7)?,
            last_error: r.opt_text(8)?,
        })
    }
}

impl Granted {
    /// (approve's job ID, org, request ID, state).
    pub(crate) fn read(r: &impl Row) -> Result<Granted, StoreError> {
        Ok(Granted {
            job_id: r.int(0)?,
            org: r.text(1)?,
            request_id: r.text(2)?,
            state: r.text(3)?,
        })
    }
}

/// The replay candidates `which` names (`j`), each with the latest job on its request (`l`,
/// `jobs_decision`) and its subject's end (`e`), in ID order, `lock` after.
pub(crate) fn candidates(which: &str, lock: &str) -> String {
    format!(
        "SELECT j.id, j.action, l.id, l.action, j.subject, j.created_at, e.ended_at,
                e.reopened_at IS NOT NULL
         FROM jobs j
         JOIN jobs l ON l.id = (SELECT MAX(k.id) FROM jobs k
                                WHERE k.org = j.org AND k.request_id = j.request_id)
         LEFT JOIN subject_ends e ON e.source = j.source AND e.subject = j.subject
         WHERE {which} ORDER BY j.id {lock}"
    )
}

/// A job `replay` may queue again, as `candidates` reads it: the latest job on its request,
/// and its subject's end (when it ended, whether it reopened since). `Candidate::classify`
/// (in `rules`) decides what becomes of it.
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
    pub(crate) fn read(r: &impl Row) -> Result<Candidate, StoreError> {
        Ok(Candidate {
            id: r.int(0)?,
            action: r.text(1)?,
            latest: r.int(2)?,
            latest_action: r.text(3)?,
            subject: r.opt_text(4)?,
            created_at: r.int(5)?,
            ended_at: r.opt_int(6)?,
            reopened: r.flag(7)?,
        })
    }
}

/// The latest decision stored on a request (SQLite's `LATEST`; PostgreSQL reads the same in
/// its write functions): what a new decision may coalesce into.
pub(crate) struct Latest {
    pub id: i64,
    pub action: String,
    pub state: String,
    pub created_at: i64,
    pub source: String,
    pub subject: Option<String>,
    pub refused: bool,
    pub gate: Option<String>,
}

impl Latest {
    pub(crate) fn read(r: &impl Row) -> Result<Latest, StoreError> {
        Ok(Latest {
            id: r.int(0)?,
            action: r.text(1)?,
            state: r.text(2)?,
            created_at: r.int(3)?,
            source: r.text(4)?,
            subject: r.opt_text(5)?,
            refused: r.flag(6)?,
            gate: r.opt_text(7)?,
        })
    }
}
