//! Keeping the PostgreSQL store healthy: the probe `/readyz` reports, pruning by one relay at
//! a time, and the jobs table's planner statistics kept fresh.

use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::Object;

use super::schema::{PRUNE_LOCK, STATISTICS_LOCK};
use super::{Pg, PgStore, unavailable};
use crate::store::StoreError;
use crate::store::api::Upkeep;
use crate::store::model::Prune;

const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a relay looks at whether the jobs table's statistics need refreshing.
const STATISTICS_EVERY_MS: i64 = 5_000;

#[async_trait]
impl Upkeep for PgStore {
    /// A cheap "can I reach the database" check: `SELECT 1` on a pooled connection.
    async fn probe(&self) -> Result<(), StoreError> {
        let get = tokio::time::timeout(PROBE_TIMEOUT, self.db.client())
            .await
            .map_err(|_| unavailable("unreachable", "no connection within 2s"))??;
        match tokio::time::timeout(PROBE_TIMEOUT, get.simple_query("SELECT 1")).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => {
                drop(Object::take(get));
                Err(unavailable("unreachable", e))
            }
            Err(_) => {
                drop(Object::take(get));
                Err(unavailable("unreachable", "no answer within 2s"))
            }
        }
    }

    async fn prune(&self, before: Prune) -> Result<usize, StoreError> {
        self.db.prune(before).await
    }

    async fn upkeep(&self) -> Result<(), StoreError> {
        self.db.refresh_statistics().await.map(drop)
    }
}

impl Pg {
    /// Forgets finished jobs, deliveries and subject ends past their windows (`Prune`). One
    /// relay at a time: the others find the lock taken and skip this round.
    async fn prune(&self, before: Prune) -> Result<usize, StoreError> {
        let older_than_ms = before.finished_before_ms;
        self.run("prune", Duration::from_secs(300), async |c| {
            let tx = c.transaction().await?;
            if !first(&tx, PRUNE_LOCK).await? {
                return Ok(0);
            }
            // A finished job that overtook a dead one on its request is kept while that one
            // is: gone, it would let a replay of the dead one undo it.
            let finished = "SELECT id FROM jobs WHERE state IN ('succeeded', 'rejected', 'dry_run')
                            AND updated_at < $1
                            AND NOT EXISTS (SELECT 1 FROM jobs d WHERE d.org = jobs.org
                                AND d.request_id = jobs.request_id AND d.id < jobs.id
                                AND d.state = 'dead')";
            for table in ["attempts", "answers"] {
                tx.execute(
                    &format!("DELETE FROM {table} WHERE job_id IN ({finished})"),
                    &[&older_than_ms],
                )
                .await?;
            }
            let jobs = tx
                .execute(
                    &format!("DELETE FROM jobs WHERE id IN ({finished})"),
                    &[&older_than_ms],
                )
                .await?;
            let deliveries = tx
                .execute(
                    "DELETE FROM deliveries d WHERE received_at < $1
                     AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.delivery_id = d.id)",
                    &[&older_than_ms],
                )
                .await?;
            tx.execute(
                "DELETE FROM dedup WHERE received_at < $1",
                &[&older_than_ms],
            )
            .await?;
            // An end is kept while a job under its subject could still be replayed.
            let ends = tx
                .execute(
                    "DELETE FROM subject_ends e WHERE ended_at < $1
                     AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.source = e.source
                                         AND j.subject = e.subject
                                         AND j.state IN ('dead', 'rejected'))",
                    &[&before.ends_before_ms],
                )
                .await?;
            let (events, written) = self
                .prune_audit(&tx, before.audit_before_ms, before.audit_key.as_ref())
                .await?;
            tx.commit().await?;
            self.audit.committed(&written);
            Ok(usize::try_from(jobs + deliveries + ends + events).unwrap_or(usize::MAX))
        })
        .await
    }

    /// Keeps the planner's statistics of the jobs table current (one relay at a time, at most
    /// every 5 s, only once more than 1,000 rows and a tenth of it have changed). The table
    /// is a queue that grows and churns within seconds, far faster than autovacuum's minute:
    /// plans made from statistics of a nearly empty table (a scan of every row ever claimed)
    /// would otherwise stay. Whether it refreshed them.
    pub(crate) async fn refresh_statistics(&self) -> Result<bool, StoreError> {
        let now = self.now();
        let last = self.last_statistics_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) < STATISTICS_EVERY_MS {
            return Ok(false);
        }
        self.last_statistics_ms.store(now, Ordering::Relaxed);
        self.run("statistics", Duration::from_secs(30), async |c| {
            let tx = c.transaction().await?;
            let due = first(&tx, STATISTICS_LOCK).await?
                && tx
                    .query_one(
                        "SELECT COALESCE(n_mod_since_analyze > 1000
                                 AND n_mod_since_analyze * 10 > n_live_tup, false)
                         FROM pg_stat_user_tables WHERE relid = 'jobs'::regclass",
                        &[],
                    )
                    .await?
                    .try_get::<_, bool>(0)?;
            if due {
                // SKIP_LOCKED: never wait on (and so cancel) an autovacuum of the table.
                tx.batch_execute("ANALYZE (SKIP_LOCKED) jobs").await?;
            }
            tx.commit().await?;
            Ok(due)
        })
        .await
    }
}

/// Whether this relay takes `lock` for the transaction: the first to ask does, the others
/// skip this round.
pub(super) async fn first(
    tx: &tokio_postgres::Transaction<'_>,
    lock: i64,
) -> Result<bool, tokio_postgres::Error> {
    tx.query_one("SELECT pg_try_advisory_xact_lock($1)", &[&lock])
        .await?
        .try_get(0)
}
