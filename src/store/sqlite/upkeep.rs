//! Keeping the SQLite store healthy: the probe `/readyz` reports, and pruning.

use async_trait::async_trait;

use super::{Db, SqliteStore};
use crate::store::StoreError;
use crate::store::api::Upkeep;
use crate::store::model::Prune;

#[async_trait]
impl Upkeep for SqliteStore {
    async fn probe(&self) -> Result<(), StoreError> {
        self.run(|db| db.probe()).await
    }

    async fn prune(&self, before: Prune) -> Result<usize, StoreError> {
        self.run(move |db| db.prune(before)).await
    }

    async fn upkeep(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

impl Db {
    /// Goes through the writer thread like any request, so a dead or stuck writer fails it
    /// too. The file may have been opened read-only (SQLite falls back to that silently), and
    /// `BEGIN IMMEDIATE` takes the write lock, so this fails while the file is read-only,
    /// gone, or locked by another writer past the busy timeout. It writes nothing, so a full
    /// disk shows only when a real write fails (the receiver flags that at once).
    pub(crate) fn probe(&mut self) -> Result<(), StoreError> {
        if self.conn.is_readonly(rusqlite::MAIN_DB)? {
            return Err(StoreError::Unavailable("the file is read-only".into()));
        }
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.rollback()?;
        Ok(())
    }

    pub(crate) fn prune(&mut self, before: Prune) -> Result<usize, StoreError> {
        let older_than_ms = before.finished_before_ms;
        let now = self.now();
        let tx = self.conn.transaction()?;
        // A finished job that overtook a dead one on its request is kept while that one is:
        // gone, it would let a replay of the dead one undo it.
        let finished = "SELECT id FROM jobs
            WHERE state IN ('succeeded', 'rejected', 'dry_run') AND updated_at < ?1
            AND NOT EXISTS (SELECT 1 FROM jobs d WHERE d.org = jobs.org
                                AND d.request_id = jobs.request_id
                                AND d.id < jobs.id AND d.state = 'dead')";
        for table in ["attempts", "answers"] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE job_id IN ({finished})"),
                [older_than_ms],
            )?;
        }
        let jobs = tx.execute(
            &format!("DELETE FROM jobs WHERE id IN ({finished})"),
            [older_than_ms],
        )?;
        let deliveries = tx.execute(
            "DELETE FROM deliveries WHERE received_at < ?1
             AND NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.delivery_id = deliveries.id)",
            [older_than_ms],
        )?;
        // An end is kept while a job under its subject could still be replayed.
        let ends = tx.execute(
            "DELETE FROM subject_ends WHERE ended_at < ?1
             AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.source = subject_ends.source
                                 AND j.subject = subject_ends.subject
                                 AND j.state IN ('dead', 'rejected'))",
            [before.ends_before_ms],
        )?;
        let (events, written) = super::audit::prune(
            &tx,
            now,
            self.last_event,
            before.audit_before_ms,
            before.audit_key.as_ref(),
        )?;
        tx.commit()?;
        self.committed(written);
        Ok(jobs + deliveries + ends + events)
    }
}
