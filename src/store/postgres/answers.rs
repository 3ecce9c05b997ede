//! Answers back on PostgreSQL: claimed under a lease and a claim token (with those whose lease
//! ran out), recorded only under the claim they were sent with.

use async_trait::async_trait;
use serde_json::Value;

use super::audit::bodies;
use super::writer::without_nul;
use super::{OP_TIMEOUT, PgStore};
use crate::store::StoreError;
use crate::store::api::Answers;
use crate::store::model::{AnswerJob, AnswerRecord, Claimed};
use crate::store::rows::ANSWER;

#[async_trait]
impl Answers for PgStore {
    /// Claims up to `limit` answers, due ones and ones whose claim lease ran out (a relay
    /// stopped while sending them) together, in the order they fell due, each under a new
    /// claim token. Two index scans, one per partial index, rather than one scan of the whole
    /// table; rows a scan locked that the limit leaves out are let go as the statement ends.
    async fn claim_answers(&self, limit: usize) -> Result<Claimed<AnswerJob>, StoreError> {
        let sql = format!(
            "WITH due AS (SELECT id, next_attempt_at FROM answers
                          WHERE state = 'pending' AND next_attempt_at <= $1
                          ORDER BY next_attempt_at, id LIMIT $2
                          FOR UPDATE SKIP LOCKED),
                  lapsed AS (SELECT id, next_attempt_at FROM answers
                             WHERE state = 'sending' AND lease_until < $1
                             LIMIT $2 FOR UPDATE SKIP LOCKED),
                  chosen AS (SELECT id FROM (SELECT * FROM due UNION ALL SELECT * FROM lapsed) c
                             ORDER BY next_attempt_at, id LIMIT $2)
             UPDATE answers SET state = 'sending', claim_token = claim_token + 1,
                    lease_until = $3, updated_at = $1
             WHERE id IN (SELECT id FROM chosen)
             RETURNING {ANSWER}, claim_token"
        );
        let read = |r: &tokio_postgres::Row| AnswerJob::read(r).map(Ok);
        let answers = self.db.claim("answer claim", &sql, limit, read).await?;
        Ok(Claimed::of(answers).ahead_asked_after(limit))
    }

    async fn next_answer_due(&self) -> Result<Option<i64>, StoreError> {
        self.db
            .run("next answer due", OP_TIMEOUT, async |c| {
                let stmt = c
                    .prepare_cached(
                        "SELECT MIN(next_attempt_at) FROM answers WHERE state = 'pending'",
                    )
                    .await?;
                c.query_one(&stmt, &[]).await?.try_get(0)
            })
            .await
    }

    async fn record_answer(&self, rec: AnswerRecord) -> Result<(), StoreError> {
        let status = rec.status.map(i32::from);
        let attempts = i32::try_from(rec.attempts).unwrap_or(i32::MAX);
        let state = rec.state.as_str();
        let now = self.db.now();
        let mut events = super::audit::events_json(&rec.audit);
        without_nul(&mut events);
        // One statement: the update, and its events when it applied (`p0_relay_audit` last).
        let written: Value = self
            .db
            .run("answer record", OP_TIMEOUT, async |c| {
                let stmt = c
                    .prepare_cached(
                        "WITH done AS (
                             UPDATE answers SET state = $2, attempts = $3, next_attempt_at = $4,
                                    last_status = $5, last_error = $6, updated_at = $7,
                                    lease_until = NULL
                             WHERE id = $1 AND claim_token = $8 AND state = 'sending'
                             RETURNING id)
                         SELECT CASE WHEN EXISTS (SELECT 1 FROM done)
                                     THEN p0_relay_audit($9, $10) ELSE '[]'::JSONB END",
                    )
                    .await?;
                c.query_one(
                    &stmt,
                    &[
                        &rec.id,
                        &state,
                        &attempts,
                        &rec.next_attempt_at_ms,
                        &status,
                        &rec.error,
                        &rec.at_ms,
                        &rec.claim_token,
                        &events,
                        &now,
                    ],
                )
                .await?
                .try_get(0)
            })
            .await?;
        self.db.audit.committed(&bodies(&written));
        Ok(())
    }
}
