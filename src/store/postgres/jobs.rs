//! Decisions on PostgreSQL: writes through the batch writer; claims under a lease and a claim
//! token, disjoint across relays (`FOR UPDATE SKIP LOCKED`); expired leases returned to
//! pending; replay under the same locks the writes take.

use std::sync::atomic::Ordering;

use async_trait::async_trait;

use super::audit::write_events;
use super::{CHANNEL, OP_TIMEOUT, Pg, PgStore};
use crate::store::StoreError;
use crate::store::api::{Jobs, WriteResults};
use crate::store::audit;
use crate::store::batch::{self, Parts};
use crate::store::model::{Claim, Claimed, Job, Replay, Replayed};
use crate::store::rows::{JOB, candidates};
use crate::store::rules::Candidate;

#[async_trait]
impl Jobs for PgStore {
    async fn write_parts(&self, parts: Parts) -> Result<WriteResults, StoreError> {
        batch::write(&self.writes, parts, |w| w).await
    }

    /// The claimed jobs go out first (their leases are running): what lies ahead is asked
    /// afterwards, by the loop, when the claim was short (`ahead: None`).
    async fn claim_jobs(&self, limit: usize) -> Result<Claimed<Job>, StoreError> {
        let claimed = Claimed::of(self.db.claim_jobs(limit).await?);
        Ok(claimed.ahead_asked_after(limit))
    }

    async fn next_job_due(&self) -> Result<Option<i64>, StoreError> {
        self.db
            .run("next due", OP_TIMEOUT, async |c| {
                let stmt = c
                    .prepare_cached(
                        // In the index's order (`jobs_due`), so it stops at the first job in
                        // turn instead of weighing every pending one.
                        "SELECT next_attempt_at FROM jobs WHERE state = 'pending'
                           AND NOT EXISTS (SELECT 1 FROM jobs e
                               WHERE e.org = jobs.org AND e.request_id = jobs.request_id
                                 AND e.id < jobs.id AND e.state IN ('pending', 'sending'))
                         ORDER BY next_attempt_at, id LIMIT 1",
                    )
                    .await?;
                c.query_opt(&stmt, &[])
                    .await?
                    .map(|r| r.try_get(0))
                    .transpose()
            })
            .await
    }

    /// The jobs in flight at any relay that a pending job of the same request waits on (a
    /// relay looks again only when one of its own ends): the jobs in flight (`jobs_leased`),
    /// each looked up in `jobs_decision`.
    async fn waited_on(&self) -> Result<Vec<i64>, StoreError> {
        self.db
            .run("waited on", OP_TIMEOUT, async |c| {
                let stmt = c
                    .prepare_cached(
                        "SELECT s.id FROM jobs s WHERE s.state = 'sending' AND EXISTS (
                             SELECT 1 FROM jobs p
                             WHERE p.org = s.org AND p.request_id = s.request_id
                               AND p.id > s.id AND p.state = 'pending')",
                    )
                    .await?;
                c.query(&stmt, &[])
                    .await?
                    .iter()
                    .map(|r| r.try_get(0))
                    .collect()
            })
            .await
    }

    /// At start: leases that ran out are returned to pending (claims of live relays stay).
    async fn recover(&self) -> Result<usize, StoreError> {
        self.db.expire_leases(self.db.now()).await
    }

    async fn replay(&self, which: Replay, operator: &str) -> Result<Replayed, StoreError> {
        self.db.replay(which, operator).await
    }
}

impl Pg {
    /// Claims up to `limit` due jobs: each becomes `sending` under a lease with a new claim
    /// token. Leases that expired (a relay killed mid-call) are returned to pending first, at
    /// most once a second.
    async fn claim_jobs(&self, limit: usize) -> Result<Vec<Claim<Job>>, StoreError> {
        let now = self.now();
        let last = self.last_expiry_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 1000 {
            self.last_expiry_ms.store(now, Ordering::Relaxed);
            self.expire_leases(now).await?;
        }
        let sql = format!(
            "UPDATE jobs SET state = 'sending', claim_token = claim_token + 1,
                    lease_until = $3, updated_at = $1
             WHERE id IN (SELECT id FROM jobs
                          WHERE state = 'pending' AND next_attempt_at <= $1
                            AND NOT EXISTS (SELECT 1 FROM jobs e
                                WHERE e.org = jobs.org AND e.request_id = jobs.request_id
                                  AND e.id < jobs.id AND e.state IN ('pending', 'sending'))
                          ORDER BY next_attempt_at, id LIMIT $2
                          FOR UPDATE SKIP LOCKED)
             RETURNING {JOB}, claim_token"
        );
        self.claim("claim", &sql, limit, Job::read).await
    }

    /// Returns jobs whose lease ran out to pending, whichever relay claimed them.
    pub(super) async fn expire_leases(&self, now: i64) -> Result<usize, StoreError> {
        let ids: Vec<i64> = self
            .run("lease expiry", OP_TIMEOUT, async |c| {
                let stmt = c
                    .prepare_cached(
                        "UPDATE jobs SET state = 'pending', lease_until = NULL, updated_at = $1
                         WHERE id IN (SELECT id FROM jobs WHERE state = 'sending' AND lease_until < $1
                                      FOR UPDATE SKIP LOCKED)
                         RETURNING id",
                    )
                    .await?;
                let rows = c.query(&stmt, &[&now]).await?;
                rows.iter().map(|r| r.try_get(0)).collect()
            })
            .await?;
        if !ids.is_empty() {
            tracing::warn!(
                job_ids = ?ids,
                "claims whose lease expired (a relay stopped mid-call) are queued again"
            );
        }
        Ok(ids.len())
    }

    /// Makes dead (or rejected, when named) jobs pending again and announces them: each only
    /// while it is its request's latest decision, and an approve only while its subject has
    /// not ended since it was asked (`Candidate::classify`). The locks the writes take on each
    /// candidate's subject (shared) and request are taken first, in the same order, so an
    /// end or a later decision committing on another relay comes either before the replay,
    /// and is seen, or after it, and sees the job pending again.
    async fn replay(&self, which: Replay, operator: &str) -> Result<Replayed, StoreError> {
        let now = self.now();
        let (which, named) = match which {
            Replay::One(id) => ("j.id = $1 AND j.state IN ('dead', 'rejected')", Some(id)),
            Replay::AllDead => ("j.state = 'dead' AND $1::BIGINT IS NULL", None),
        };
        self.run("replay", OP_TIMEOUT, async |c| {
            let tx = c.transaction().await?;
            lock_as_writes_do(&tx, which, named).await?;
            // Each candidate (read again, now that the locks are held), locked, with the
            // latest job on its request (`jobs_decision`) and its subject's end.
            let sql = candidates(which, "FOR UPDATE OF j");
            let rows = tx.query(&sql, &[&named]).await?;
            let mut replayed = Replayed::default();
            let mut queued = Vec::new();
            for candidate in rows.iter().map(Candidate::read) {
                let candidate = match candidate {
                    Ok(c) => c,
                    Err(e) => return Ok(Err(e)),
                };
                match candidate.classify(&mut replayed) {
                    Ok(true) => queued.push(candidate.id),
                    Ok(false) => {}
                    Err(e) => return Ok(Err(e)),
                }
            }
            if !queued.is_empty() {
                tx.execute(
                    "UPDATE jobs SET state = 'pending', attempts = 0, next_attempt_at = $1,
                            window_start = $1, updated_at = $1, refused = NULL, evidence = NULL,
                            checked_at = NULL
                     WHERE id = ANY($2)",
                    &[&now, &queued],
                )
                .await?;
                tx.execute("SELECT pg_notify($1, '')", &[&CHANNEL]).await?;
            }
            let events: Vec<_> = queued
                .iter()
                .map(|id| audit::replayed(*id, operator))
                .collect();
            let written = write_events(&tx, &events, now).await?;
            tx.commit().await?;
            self.audit.committed(&written);
            Ok(Ok(replayed))
        })
        .await?
    }
}

/// Takes the locks a write takes on the candidates' subjects (shared) and requests, in the
/// same order.
async fn lock_as_writes_do(
    tx: &tokio_postgres::Transaction<'_>,
    which: &str,
    named: Option<i64>,
) -> Result<(), tokio_postgres::Error> {
    let keys = format!(
        "SELECT j.source || '/' || j.subject, j.org || '/' || j.request_id
         FROM jobs j WHERE {which}"
    );
    let rows = tx.query(&keys, &[&named]).await?;
    let subjects: Vec<Option<String>> = rows
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
    let requests: Vec<String> = rows
        .iter()
        .map(|r| r.try_get(1))
        .collect::<Result<_, _>>()?;
    tx.execute(
        "SELECT pg_advisory_xact_lock_shared(7002, k) FROM (
             SELECT DISTINCT hashtext(s) AS k FROM unnest($1::TEXT[]) s
             WHERE s IS NOT NULL ORDER BY 1) x",
        &[&subjects],
    )
    .await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(7001, k) FROM (
             SELECT DISTINCT hashtext(r) AS k FROM unnest($1::TEXT[]) r ORDER BY 1) x",
        &[&requests],
    )
    .await?;
    Ok(())
}
