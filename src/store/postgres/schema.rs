//! The PostgreSQL schema: migrations, one `.sql` file each and append-only, and the PL/pgSQL
//! functions, each in one file with its current body. Whenever migrations run, the functions
//! are applied again (`CREATE OR REPLACE`) in the same transaction, and at a start that finds
//! one of them missing: a function added needs no new schema version (relays of the previous
//! release keep starting on the database), a changed one needs a migration (it may hold only
//! a comment saying what changed), so that relays that do not know the change refuse to run.

use std::time::Duration;

use super::Pg;
use crate::store::StoreError;

/// Each file moves the schema one version forward; never edit one that has shipped.
pub(crate) const MIGRATIONS: &[&str] = &[
    include_str!("migrations/0001_deliveries_jobs_attempts.sql"),
    include_str!("migrations/0002_subjects_and_answers.sql"),
    include_str!("migrations/0003_batch_writes.sql"),
    include_str!("migrations/0004_set_based_writes.sql"),
    include_str!("migrations/0005_end_locks.sql"),
    include_str!("migrations/0006_subject_ends_and_gates.sql"),
    include_str!("migrations/0007_unbound_and_checked_at.sql"),
    include_str!("migrations/0008_audit_events.sql"),
    include_str!("migrations/0009_outcome_events_gathered.sql"),
    include_str!("migrations/0010_audit_events_as_text.sql"),
];

macro_rules! functions {
    ($($name:literal),* $(,)?) => {
        /// The functions by name, in an order in which each comes after those it calls
        /// (PL/pgSQL would accept any order; a plain SQL function is checked as it is made).
        pub(crate) const FUNCTIONS: &[(&str, &str)] =
            &[$(($name, include_str!(concat!("functions/", $name, ".sql")))),*];
    };
}
functions!(
    "p0_relay_ended_reason",
    "p0_relay_unbound_reason",
    "p0_relay_still_granted",
    "p0_relay_write_each_locked",
    "p0_relay_write_each",
    "p0_relay_write_distinct",
    "p0_relay_event_texts",
    "p0_relay_audit_text",
    "p0_relay_audit",
    "p0_relay_write",
);

/// Advisory lock keys (one 64-bit space; coalescing uses the separate two-key space).
pub(super) const MIGRATE_LOCK: i64 = 0x7030_7265_6c61_7901;
pub(super) const PRUNE_LOCK: i64 = 0x7030_7265_6c61_7902;
pub(super) const STATISTICS_LOCK: i64 = 0x7030_7265_6c61_7903;
pub(super) const SEAL_LOCK: i64 = 0x7030_7265_6c61_7904;

impl Pg {
    /// Brings the schema to this relay's version under an advisory lock: ten relays starting
    /// together, one migrates and the others wait and find it done. A database newer than
    /// this relay is refused.
    pub(super) async fn migrate(&self) -> Result<(), StoreError> {
        let known = MIGRATIONS.len() as i32;
        let version = self
            .run("migration", Duration::from_secs(60), async |c| {
                let tx = c.transaction().await?;
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])
                    .await?;
                tx.batch_execute(
                    "CREATE TABLE IF NOT EXISTS p0_relay_schema (
                         version    INTEGER PRIMARY KEY,
                         applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
                )
                .await?;
                let version: i32 = tx
                    .query_one("SELECT COALESCE(MAX(version), 0) FROM p0_relay_schema", &[])
                    .await?
                    .try_get(0)?;
                if version > known {
                    return Ok(version);
                }
                if version == known {
                    let names: Vec<&str> = FUNCTIONS.iter().map(|(name, _)| *name).collect();
                    let complete: bool = tx
                        .query_one(
                            "SELECT bool_and(EXISTS (SELECT 1 FROM pg_proc p
                                                     WHERE p.proname = n
                                                       AND p.pronamespace = current_schema()::regnamespace))
                             FROM unnest($1::TEXT[]) n",
                            &[&names],
                        )
                        .await?
                        .try_get(0)?;
                    if complete {
                        return Ok(version);
                    }
                }
                for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
                    tx.batch_execute(sql).await?;
                    tx.execute(
                        "INSERT INTO p0_relay_schema (version) VALUES ($1)",
                        &[&(i as i32 + 1)],
                    )
                    .await?;
                }
                for (_, sql) in FUNCTIONS {
                    tx.batch_execute(sql).await?;
                }
                tx.commit().await?;
                Ok(version)
            })
            .await
            .map_err(|e| match e {
                StoreError::Refused(why) => StoreError::Schema(format!("migration: {why}")),
                other => other,
            })?;
        if version > known {
            return Err(StoreError::Schema(format!(
                "the database has schema version {version}, newer than this relay knows ({known})"
            )));
        }
        Ok(())
    }
}
