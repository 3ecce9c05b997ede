//! Reading the PostgreSQL store: the gauges' counts, `jobs list` and `jobs show`, and what a
//! subject's end would revoke (`p0_relay_still_granted`, the function the writes use).

use async_trait::async_trait;

use super::{OP_TIMEOUT, PgStore};
use crate::store::StoreError;
use crate::store::api::Inspection;
use crate::store::model::{
    AnswerRow, AttemptRow, Counts, DeliveryInfo, Granted, JobDetail, JobSummary, ListFilter, State,
};

const SUMMARY: &str = "id, source, org, request_id, action, expiration, state, attempts,
    created_at, updated_at, next_attempt_at, last_status, last_error, subject, ended_by";

type Row = tokio_postgres::Row;
type PgResult<T> = Result<T, tokio_postgres::Error>;

#[async_trait]
impl Inspection for PgStore {
    async fn counts(&self) -> Result<Counts, StoreError> {
        let rows = self
            .db
            .run("counts", OP_TIMEOUT, async |c| {
                let stmt = c
                    .prepare_cached(
                        "SELECT state, COUNT(*) FROM jobs
                         WHERE state IN ('pending', 'sending', 'dead') GROUP BY state",
                    )
                    .await?;
                c.query(&stmt, &[]).await
            })
            .await?;
        let mut counts = Counts::default();
        for r in rows {
            let (state, n): (String, i64) = (r.try_get(0)?, r.try_get(1)?);
            counts.add(&state, n);
        }
        Ok(counts)
    }

    async fn list(&self, filter: ListFilter) -> Result<Vec<JobSummary>, StoreError> {
        let state = filter.state.map(State::as_str);
        let limit = filter.limit_or_default() as i64;
        let sql = format!(
            "SELECT {SUMMARY} FROM jobs
             WHERE ($1::TEXT IS NULL OR state = $1) AND ($2::TEXT IS NULL OR source = $2)
               AND ($4::TEXT IS NULL OR subject = $4)
             ORDER BY id DESC LIMIT $3"
        );
        let rows = self
            .db
            .run("list", OP_TIMEOUT, async |c| {
                c.query(&sql, &[&state, &filter.source, &limit, &filter.subject])
                    .await
            })
            .await?;
        Ok(rows.iter().map(summary).collect::<Result<_, _>>()?)
    }

    async fn show(&self, id: i64) -> Result<Option<JobDetail>, StoreError> {
        let sql = format!("SELECT {SUMMARY}, delivery_id, gate, evidence FROM jobs WHERE id = $1");
        self.db
            .run("show", OP_TIMEOUT, async |c| {
                let Some(row) = c.query_opt(&sql, &[&id]).await? else {
                    return Ok(None);
                };
                let delivery_id: i64 = row.try_get(15)?;
                let d = c
                    .query_one(
                        "SELECT id, source, dedup_key, received_at, rule, actor FROM deliveries
                         WHERE id = $1",
                        &[&delivery_id],
                    )
                    .await?;
                let attempts = c
                    .query(
                        "SELECT at, status, result, error, duration_ms FROM attempts
                         WHERE job_id = $1 ORDER BY id",
                        &[&id],
                    )
                    .await?;
                let answers = c
                    .query(
                        "SELECT id, via, kind, body, state, attempts, updated_at, last_status,
                                last_error
                         FROM answers WHERE job_id = $1 ORDER BY id",
                        &[&id],
                    )
                    .await?;
                Ok(Some(JobDetail {
                    job: summary(&row)?,
                    gate: row.try_get(16)?,
                    evidence: row.try_get(17)?,
                    delivery: delivery(&d)?,
                    attempts: attempts.iter().map(attempt).collect::<PgResult<_>>()?,
                    answers: answers.iter().map(answer).collect::<PgResult<_>>()?,
                }))
            })
            .await
    }

    async fn still_granted(&self, source: &str, subject: &str) -> Result<Vec<Granted>, StoreError> {
        let rows = self
            .db
            .run("still granted", OP_TIMEOUT, async |c| {
                c.query(
                    "SELECT id, org, request_id, state
                     FROM p0_relay_still_granted($1, $2) ORDER BY id",
                    &[&source, &subject],
                )
                .await
            })
            .await?;
        let granted = rows.iter().map(|r| {
            Ok(Granted {
                job_id: r.try_get(0)?,
                org: r.try_get(1)?,
                request_id: r.try_get(2)?,
                state: r.try_get(3)?,
            })
        });
        Ok(granted.collect::<PgResult<_>>()?)
    }
}

/// A status code as stored (an integer column), as an HTTP status.
fn status(r: &Row, i: usize) -> PgResult<Option<u16>> {
    Ok(r.try_get::<_, Option<i32>>(i)?
        .map(|s| u16::try_from(s.clamp(0, 999)).unwrap_or_default()))
}

fn count(r: &Row, i: usize) -> PgResult<u32> {
    Ok(u32::try_from(r.try_get::<_, i32>(i)?).unwrap_or_default())
}

fn summary(r: &Row) -> PgResult<JobSummary> {
    Ok(JobSummary {
        id: r.try_get(0)?,
        source: r.try_get(1)?,
        org: r.try_get(2)?,
        request_id: r.try_get(3)?,
        action: r.try_get(4)?,
        expiration: r.try_get(5)?,
        state: r.try_get(6)?,
        attempts: count(r, 7)?,
        created_at_ms: r.try_get(8)?,
        updated_at_ms: r.try_get(9)?,
        next_attempt_at_ms: r.try_get(10)?,
        last_status: status(r, 11)?,
        last_error: r.try_get(12)?,
        subject: r.try_get(13)?,
        ended_by: r.try_get(14)?,
    })
}

fn delivery(d: &Row) -> PgResult<DeliveryInfo> {
    Ok(DeliveryInfo {
        id: d.try_get(0)?,
        source: d.try_get(1)?,
        dedup_key: d.try_get(2)?,
        received_at_ms: d.try_get(3)?,
        rule: d.try_get(4)?,
        actor: d.try_get(5)?,
    })
}

fn attempt(r: &Row) -> PgResult<AttemptRow> {
    Ok(AttemptRow {
        at_ms: r.try_get(0)?,
        status: status(r, 1)?,
        result: r.try_get(2)?,
        error: r.try_get(3)?,
        duration_ms: r.try_get(4)?,
    })
}

fn answer(r: &Row) -> PgResult<AnswerRow> {
    Ok(AnswerRow {
        id: r.try_get(0)?,
        via: r.try_get(1)?,
        kind: r.try_get(2)?,
        body: r.try_get(3)?,
        state: r.try_get(4)?,
        attempts: count(r, 5)?,
        updated_at_ms: r.try_get(6)?,
        last_status: status(r, 7)?,
        last_error: r.try_get(8)?,
    })
}
