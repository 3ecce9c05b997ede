//! Answers back on PostgreSQL: claimed under a lease and a claim token (with those whose lease
//! ran out), recorded only under the claim they were sent with.

use async_trait::async_trait;

use super::{OP_TIMEOUT, PgStore};
use crate::store::StoreError;
use crate::store::api::Answers;
use crate::store::model::{AnswerJob, AnswerRecord, Claimed, ms};

#[async_trait]
impl Answers for PgStore {
    /// Claims up to `limit` due answers, and up to `limit` answers whose claim lease ran out
    /// (a relay stopped while sending them), each under a new claim token. Two index scans,
    /// one per partial index, rather than one scan of the whole table.
    async fn claim_answers(&self, limit: usize) -> Result<Claimed<AnswerJob>, StoreError> {
        let now = self.db.now();
        let lease_until = now.saturating_add(ms(self.db.lease));
        let asked = limit as i64;
        let rows = self
            .db
            .run("answer claim", OP_TIMEOUT, async |c| {
                let stmt = c
                    .prepare_cached(
                        "UPDATE answers SET state = 'sending', claim_token = claim_token + 1,
                                lease_until = $3, updated_at = $1
                         WHERE id IN (SELECT id FROM answers
                                      WHERE state = 'pending' AND next_attempt_at <= $1
                                      ORDER BY next_attempt_at, id LIMIT $2
                                      FOR UPDATE SKIP LOCKED)
                            OR id IN (SELECT id FROM answers
                                      WHERE state = 'sending' AND lease_until < $1
                                      LIMIT $2 FOR UPDATE SKIP LOCKED)
                         RETURNING id, job_id, via, kind, target, body, attempts, window_start,
                                   claim_token",
                    )
                    .await?;
                c.query(&stmt, &[&now, &asked, &lease_until]).await
            })
            .await?;
        let mut answers = rows
            .iter()
            .map(|r| {
                Ok(AnswerJob {
                    id: r.try_get(0)?,
                    job_id: r.try_get(1)?,
                    via: r.try_get(2)?,
                    kind: r.try_get(3)?,
                    target: r.try_get(4)?,
                    body: r.try_get(5)?,
                    attempts: u32::try_from(r.try_get::<_, i32>(6)?).unwrap_or_default(),
                    window_start_ms: r.try_get(7)?,
                    claim_token: r.try_get(8)?,
                })
            })
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()?;
        answers.sort_by_key(|a| a.id);
        let full = answers.len() >= limit;
        let mut claimed = Claimed::parsed(answers, Ok);
        claimed.ahead = full.then(Default::default);
        Ok(claimed)
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
        self.db
            .run("answer record", OP_TIMEOUT, async |c| {
                let stmt = c
                    .prepare_cached(
                        "UPDATE answers SET state = $2, attempts = $3, next_attempt_at = $4,
                                last_status = $5, last_error = $6, updated_at = $7,
                                lease_until = NULL
                         WHERE id = $1 AND claim_token = $8 AND state = 'sending'",
                    )
                    .await?;
                c.execute(
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
                    ],
                )
                .await
            })
            .await?;
        Ok(())
    }
}
