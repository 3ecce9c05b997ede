//! Reading the SQLite store: the gauges' counts, `jobs list` and `jobs show`, and what a
//! subject's end would revoke.

use async_trait::async_trait;
use rusqlite::params;

use super::{Db, SqliteStore, rows};
use crate::store::StoreError;
use crate::store::api::Inspection;
use crate::store::model::{
    AnswerRow, AttemptRow, Counts, DeliveryInfo, Granted, JobDetail, JobSummary, ListFilter, State,
};

use crate::store::rows::{ANSWER_ROW, ATTEMPT, DELIVERY, Row, SUMMARY};
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
        let by_state = rows(
            &self.conn,
            "SELECT state, COUNT(*) FROM jobs WHERE state IN ('pending', 'sending', 'dead')
             GROUP BY state",
            [],
            |r| Ok((r.text(0)?, r.int(1)?)),
        )?;
        let mut counts = Counts::default();
        for (state, n) in by_state {
            counts.add(&state, n);
        }
        Ok(counts)
    }

    pub(crate) fn list(&mut self, filter: &ListFilter) -> Result<Vec<JobSummary>, StoreError> {
        let sql = format!(
            "SELECT {SUMMARY} FROM jobs
             WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR source = ?2)
               AND (?4 IS NULL OR subject = ?4)
             ORDER BY id DESC LIMIT ?3"
        );
        let state = filter.state.map(State::as_str);
        let limit = filter.limit_or_default() as i64;
        let params = params![state, filter.source, limit, filter.subject];
        rows(&self.conn, &sql, params, |r| JobSummary::read(r))
    }

    pub(crate) fn show(&mut self, id: i64) -> Result<Option<JobDetail>, StoreError> {
        let sql = format!("SELECT {SUMMARY}, delivery_id, gate, evidence FROM jobs WHERE id = ?1");
        let found = rows(&self.conn, &sql, [id], |r| {
            Ok((
                JobSummary::read(r)?,
                r.int(15)?,
                r.opt_text(16)?,
                r.opt_text(17)?,
            ))
        })?;
        let Some((job, delivery_id, gate, evidence)) = found.into_iter().next() else {
            return Ok(None);
        };
        let delivery = rows(
            &self.conn,
            &format!("SELECT {DELIVERY} FROM deliveries WHERE id = ?1"),
            [delivery_id],
            |r| DeliveryInfo::read(r),
        )?;
        let attempts = format!("SELECT {ATTEMPT} FROM attempts WHERE job_id = ?1 ORDER BY rowid");
        let answers = format!("SELECT {ANSWER_ROW} FROM answers WHERE job_id = ?1 ORDER BY id");
        Ok(Some(JobDetail {
            job,
            gate,
            evidence,
            delivery: delivery
                .into_iter()
                .next()
                .ok_or_else(|| StoreError::Corrupt(format!("job {id}: its delivery is gone")))?,
            attempts: rows(&self.conn, &attempts, [id], |r| AttemptRow::read(r))?,
            answers: rows(&self.conn, &answers, [id], |r| AnswerRow::read(r))?,
        }))
    }
}
