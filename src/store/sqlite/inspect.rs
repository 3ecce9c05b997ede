//! Reading the SQLite store: the gauges' counts, `jobs list` and `jobs show`, and what a
//! subject's end would revoke.

use async_trait::async_trait;
use rusqlite::{OptionalExtension, params};

use super::{Db, SqliteStore};
use crate::store::StoreError;
use crate::store::api::Inspection;
use crate::store::model::{
    AnswerRow, AttemptRow, Counts, DeliveryInfo, Granted, JobDetail, JobSummary, ListFilter, State,
};

const SUMMARY_COLUMNS: &str = "id, source, org, request_id, action, expiration, state, attempts,
    created_at, updated_at, next_attempt_at, last_status, last_error, subject, ended_by";

#[async_trait]
impl Inspection for SqliteStore {
    async fn counts(&self) -> Result<Counts, StoreError> {
        self.run(|db| db.counts()).await
    }

    async fn list(&self, filter: ListFilter) -> Result<Vec<JobSummary>, StoreError> {
        self.run(move |db| db.list(&filter)).await
    }

    async fn show(&self, id: i64) -> Result<Option<JobDetail>, StoreError> {
        self.run(move |db| db.show(id)).await
    }

    async fn still_granted(&self, source: &str, subject: &str) -> Result<Vec<Granted>, StoreError> {
        let (source, subject) = (source.to_owned(), subject.to_owned());
        self.run(move |db| db.still_granted(&source, &subject))
            .await
    }
}

impl Db {
    pub(crate) fn counts(&mut self) -> Result<Counts, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT state, COUNT(*) FROM jobs WHERE state IN ('pending', 'sending', 'dead')
             GROUP BY state",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        let mut counts = Counts::default();
        for row in rows {
            let (state, n) = row?;
            counts.add(&state, n);
        }
        Ok(counts)
    }

    pub(crate) fn list(&mut self, filter: &ListFilter) -> Result<Vec<JobSummary>, StoreError> {
        let sql = format!(
            "SELECT {SUMMARY_COLUMNS} FROM jobs
             WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR source = ?2)
               AND (?4 IS NULL OR subject = ?4)
             ORDER BY id DESC LIMIT ?3"
        );
        let mut stmt = self.conn.prepare(&sql)?;
        let rows = stmt.query_map(
            params![
                filter.state.map(State::as_str),
                filter.source,
                filter.limit_or_default() as i64,
                filter.subject
            ],
            summary,
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub(crate) fn show(&mut self, id: i64) -> Result<Option<JobDetail>, StoreError> {
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
        Ok(Some(JobDetail {
            job,
            gate,
            evidence,
            delivery: self.delivery(delivery_id)?,
            attempts: self.attempts(id)?,
            answers: self.answers(id)?,
        }))
    }

    fn delivery(&self, id: i64) -> Result<DeliveryInfo, StoreError> {
        Ok(self.conn.query_row(
            "SELECT id, source, dedup_key, received_at, rule, actor FROM deliveries WHERE id = ?1",
            [id],
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
        )?)
    }

    fn attempts(&self, job: i64) -> Result<Vec<AttemptRow>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT at, status, result, error, duration_ms FROM attempts WHERE job_id = ?1
             ORDER BY rowid",
        )?;
        let rows = stmt.query_map([job], |r| {
            Ok(AttemptRow {
                at_ms: r.get(0)?,
                status: r.get(1)?,
                result: r.get(2)?,
                error: r.get(3)?,
                duration_ms: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn answers(&self, job: i64) -> Result<Vec<AnswerRow>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, via, kind, body, state, attempts, updated_at, last_status, last_error
             FROM answers WHERE job_id = ?1 ORDER BY id",
        )?;
        let rows = stmt.query_map([job], |r| {
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
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

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
