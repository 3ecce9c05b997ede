//! Answers back on SQLite: claimed in due order under a claim token, recorded only under it.

use async_trait::async_trait;
use rusqlite::params;

use super::audit::insert_events;
use super::jobs::{mark_sending, settle};
use super::{Db, SqliteStore, rows};
use crate::store::StoreError;
use crate::store::api::Answers;
use crate::store::model::{Ahead, AnswerJob, AnswerRecord, Claim, Claimed, token};
use crate::store::rows::ANSWER;

#[async_trait]
impl Answers for SqliteStore {
    async fn claim_answers(&self, limit: usize) -> Result<Claimed<AnswerJob>, StoreError> {
        self.run(move |db| {
            let claimed = Claimed::of(db.claim_answers(limit)?);
            Ok(claimed.with_ahead(limit, || Ahead::from(db.next_answer_due(), Ok(Vec::new()))))
        })
        .await
    }

    async fn next_answer_due(&self) -> Result<Option<i64>, StoreError> {
        self.run(|db| db.next_answer_due()).await
    }

    async fn record_answer(&self, outcome: AnswerRecord) -> Result<(), StoreError> {
        self.run(move |db| db.record_answer(&outcome)).await
    }
}

impl Db {
    /// As `claim_jobs`: read in index order, then marked by ID.
    pub(crate) fn claim_answers(
        &mut self,
        limit: usize,
    ) -> Result<Vec<Claim<AnswerJob>>, StoreError> {
        let now = self.now();
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let sql = format!(
            "SELECT {ANSWER}, claim_token + 1 FROM answers
             WHERE state = 'pending' AND next_attempt_at <= ?1
             ORDER BY next_attempt_at, id LIMIT ?2"
        );
        let mut answers = rows(&tx, &sql, params![now, limit as i64], |r| {
            AnswerJob::read(r).map(Ok)
        })?;
        mark_sending(&tx, "answers", answers.iter().map(token), now)?;
        tx.commit()?;
        answers.sort_by_key(|a| token(a).0);
        Ok(answers)
    }

    /// Records an answer attempt, with its audit events, only under the claim it was made
    /// with.
    pub(crate) fn record_answer(&mut self, rec: &AnswerRecord) -> Result<(), StoreError> {
        let now = self.now();
        let tx = self.conn.transaction()?;
        let applied = settle(
            &tx,
            "UPDATE answers SET state = ?2, attempts = ?3, next_attempt_at = ?4,
                                last_status = ?5, last_error = ?6, updated_at = ?7
             WHERE id = ?1 AND claim_token = ?8 AND state = 'sending'",
            rec,
            &[],
        )?;
        let written = if applied {
            insert_events(&tx, now, self.last_event, &rec.audit)?
        } else {
            Vec::new()
        };
        tx.commit()?;
        self.committed(written);
        Ok(())
    }

    pub(crate) fn next_answer_due(&mut self) -> Result<Option<i64>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT MIN(next_attempt_at) FROM answers WHERE state = 'pending'")?
            .query_row([], |r| r.get(0))?)
    }
}
