//! Subjects on SQLite: an ended subject refuses approves until a delivery reopens it, and its
//! end revokes what is still granted under it, and only that.

use rusqlite::{OptionalExtension, params};

use super::jobs::{Accept, NewJob};
use super::{Db, rows};
use crate::domain::Action;
use crate::policy::Decision;
use crate::store::StoreError;
use crate::store::model::{BoundRevocation, Granted, NewDelivery};
use crate::store::rules::{ended_reason, unbound_reason};

/// The requests still granted under a subject (?1 source, ?2 subject), as (approve's job ID,
/// org, request ID, state): the latest decision on the request is an approve under this
/// subject, pending, sending, succeeded or recorded in a dry run. Refused, failed, denied and
/// revoked ones are left; a decision the store refused as it came (a late approve, an end
/// naming a request it had not bound) decides nothing, so it is never the latest.
/// (PostgreSQL: `p0_relay_still_granted`.)
macro_rules! still_granted {
    () => {
        "SELECT j.id, j.org, j.request_id, j.state FROM jobs j
         WHERE j.source = ?1 AND j.subject = ?2 AND j.action = 'approve'
           AND j.state IN ('pending', 'sending', 'succeeded', 'dry_run') AND j.refused IS NULL
           AND j.id = (SELECT MAX(k.id) FROM jobs k
                       WHERE k.org = j.org AND k.request_id = j.request_id AND k.refused IS NULL)"
    };
}

const STILL_GRANTED: &str = concat!(still_granted!(), " ORDER BY j.id");

/// Whether one request (?3 org, ?4 request ID) is among them.
const GRANTED_UNDER: &str = concat!(
    "SELECT 1 FROM (",
    still_granted!(),
    ") WHERE org = ?3 AND request_id = ?4"
);

/// When a subject ended, if it is ended now (not reopened since).
const ENDED: &str = "SELECT ended_at FROM subject_ends
    WHERE source = ?1 AND subject = ?2 AND reopened_at IS NULL";

/// What a delivery found of its subject: why its decisions are refused (the subject ended and
/// the delivery approves under it), and whether it reopened the subject.
pub(super) struct SubjectState {
    pub refused: Option<String>,
    pub reopened: bool,
}

impl Accept<'_> {
    /// A subject that ended stays ended: a delivery that asks to approve under it is refused
    /// whole (its decisions are stored only to be recorded rejected and answered), unless the
    /// delivery itself reopens it.
    pub(super) fn subject_state(&self, d: &NewDelivery) -> Result<SubjectState, StoreError> {
        let mut state = SubjectState {
            refused: None,
            reopened: false,
        };
        let Some(subject) = &d.binding.subject else {
            return Ok(state);
        };
        if d.binding.reopens_subject {
            state.reopened = self
                .tx
                .prepare_cached(
                    "UPDATE subject_ends SET reopened_at = ?3
                     WHERE source = ?1 AND subject = ?2 AND reopened_at IS NULL",
                )?
                .execute(params![d.source, subject, self.now])?
                > 0;
        } else if !d.binding.ends_subject && d.decisions.iter().any(|x| x.action == Action::Approve)
        {
            let ended: Option<i64> = self
                .tx
                .prepare_cached(ENDED)?
                .query_row(params![d.source, subject], |r| r.get(0))
                .optional()?;
            state.refused = ended.map(|at| ended_reason(subject, at));
        }
        Ok(state)
    }

    /// Why a revoke an end names is refused: its request is not granted under the subject
    /// that ends (an end revokes only what it bound).
    pub(super) fn unbound(
        &self,
        d: &NewDelivery,
        decision: &Decision,
    ) -> Result<Option<String>, StoreError> {
        let request = decision.request_id.as_str();
        let Some(subject) = &d.binding.subject else {
            return Ok(Some(unbound_reason(request, "")));
        };
        let granted: Option<i64> = self
            .tx
            .prepare_cached(GRANTED_UNDER)?
            .query_row(
                params![d.source, subject, decision.org.as_str(), request],
                |r| r.get(0),
            )
            .optional()?;
        Ok(granted.is_none().then(|| unbound_reason(request, subject)))
    }

    /// Ends `subject`: records the end (approves under it are refused from now on) and makes
    /// one revoke per request still granted under it, queued behind its approve.
    pub(super) fn end_subject(
        &self,
        d: &NewDelivery,
        subject: &str,
        delivery_id: i64,
        reply: Option<&str>,
    ) -> Result<Vec<BoundRevocation>, StoreError> {
        self.tx
            .prepare_cached(
                "INSERT INTO subject_ends (source, subject, ended_at, delivery_id)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (source, subject) DO UPDATE
                     SET ended_at = excluded.ended_at, delivery_id = excluded.delivery_id,
                         reopened_at = NULL",
            )?
            .execute(params![d.source, subject, self.now, delivery_id])?;
        let granted = still_granted(self.tx, &d.source, subject)?;
        let mut bound = Vec::with_capacity(granted.len());
        for g in granted {
            let job_id = self.insert_job(NewJob {
                delivery_id,
                source: &d.source,
                org: &g.org,
                request_id: &g.request_id,
                action: Action::Revoke,
                expiration: None,
                subject: Some(subject),
                reply,
                refused: None,
                gate: None,
                ended_by: Some(delivery_id),
            })?;
            bound.push(BoundRevocation {
                job_id,
                org: g.org,
                request_id: g.request_id,
            });
        }
        Ok(bound)
    }
}

fn still_granted(
    conn: &rusqlite::Connection,
    source: &str,
    subject: &str,
) -> Result<Vec<Granted>, StoreError> {
    rows(conn, STILL_GRANTED, params![source, subject], |r| {
        Granted::read(r)
    })
}

impl Db {
    /// The requests still granted under `subject` of `source` (`Inspection::still_granted`).
    pub(crate) fn still_granted(
        &self,
        source: &str,
        subject: &str,
    ) -> Result<Vec<Granted>, StoreError> {
        still_granted(&self.conn, source, subject)
    }
}
