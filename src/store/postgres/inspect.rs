//! Reading the PostgreSQL store: the gauges' counts, `jobs list` and `jobs show`, and what a
//! subject's end would revoke (`p0_relay_still_granted`, the function the writes use).

use async_trait::async_trait;

use super::{OP_TIMEOUT, PgStore};
use crate::store::StoreError;
use crate::store::api::Inspection;
use crate::store::model::{
    AnswerRow, AttemptRow, Counts, DeliveryInfo, Granted, JobDetail, JobSummary, ListFilter, State,
};

use crate::store::rows::{ANSWER_ROW, ATTEMPT, DELIVERY, Row, SUMMARY};

#[async_trait]
impl Inspection for PgStore {
    async fn counts(&self) -> Result<Counts, StoreError> {
        let rows = self
            .read(
                "counts",
                "SELECT state, COUNT(*) FROM jobs
                 WHERE state IN ('pending', 'sending', 'dead') GROUP BY state",
                &[],
            )
            .await?;
        let mut counts = Counts::default();
        for r in &rows {
            counts.add(&r.text(0)?, r.int(1)?);
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
        let params: [&Param; 4] = [&state, &filter.source, &limit, &filter.subject];
        let rows = self.read("list", &sql, &params).await?;
        rows.iter().map(JobSummary::read).collect()
    }

    async fn show(&self, id: i64) -> Result<Option<JobDetail>, StoreError> {
        let sql = format!("SELECT {SUMMARY}, delivery_id, gate, evidence FROM jobs WHERE id = $1");
        let Some(row) = self.read("show", &sql, &[&id]).await?.into_iter().next() else {
            return Ok(None);
        };
        let delivery_id = row.int(15)?;
        let delivery = format!("SELECT {DELIVERY} FROM deliveries WHERE id = $1");
        let delivery = self.read("show", &delivery, &[&delivery_id]).await?;
        let attempts = format!("SELECT {ATTEMPT} FROM attempts WHERE job_id = $1 ORDER BY id");
        let answers = format!("SELECT {ANSWER_ROW} FROM answers WHERE job_id = $1 ORDER BY id");
        Ok(Some(JobDetail {
            job: JobSummary::read(&row)?,
            gate: row.opt_text(16)?,
            evidence: row.opt_text(17)?,
            delivery: DeliveryInfo::read(
                delivery.first().ok_or_else(|| {
                    StoreError::Corrupt(format!("job {id}: its delivery is gone"))
                })?,
            )?,
            attempts: (self.read("show", &attempts, &[&id]).await?)
                .iter()
                .map(AttemptRow::read)
                .collect::<Result<_, _>>()?,
            answers: (self.read("show", &answers, &[&id]).await?)
                .iter()
                .map(AnswerRow::read)
                .collect::<Result<_, _>>()?,
        }))
    }

    async fn still_granted(&self, source: &str, subject: &str) -> Result<Vec<Granted>, StoreError> {
        let sql = "SELECT id, org, request_id, state FROM p0_relay_still_granted($1, $2)
                   ORDER BY id";
        let (source, subject) = (source.to_owned(), subject.to_owned());
        let rows = self
            .read("still granted", sql, &[&source, &subject])
            .await?;
        rows.iter().map(Granted::read).collect()
    }
}

type Param = dyn tokio_postgres::types::ToSql + Sync;

impl PgStore {
    /// The rows `sql` returns, read on a pooled connection.
    async fn read(
        &self,
        what: &str,
        sql: &str,
        params: &[&Param],
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        self.db
            .run(what, OP_TIMEOUT, async |c| {
                let stmt = c.prepare_cached(sql).await?;
                c.query(&stmt, params).await
            })
            .await
    }
}
