//! The embedded store: one SQLite file in WAL mode with `synchronous=FULL`, so a commit has
//! reached the disk before it returns. One thread owns the connection (`writer.rs`): every
//! operation is a closure sent to it, and writes waiting together share one transaction and
//! one sync (group commit). The operations are `Db` methods, a file per concern.

mod answers;
mod audit;
mod checkpoint;
mod ends;
mod inspect;
mod jobs;
mod upkeep;
mod writer;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::Connection;
use tokio::sync::{Notify, mpsc};

use super::api::Leases;
use super::batch;
use super::model::{Clock, Held, Windows};
use super::{Settings, StoreError, StoreTask};
use checkpoint::Checkpointer;
use writer::Task;

pub(crate) use checkpoint::CHECKPOINT_BACKSTOP;
#[cfg(test)]
pub(crate) use jobs::{LATEST, SEEN};

/// Each file moves the schema one version forward; never edit one that has shipped.
const MIGRATIONS: &[&str] = &[
    include_str!("migrations/0001_deliveries_jobs_attempts.sql"),
    include_str!("migrations/0002_claim_tokens.sql"),
    include_str!("migrations/0003_subjects_and_answers.sql"),
    include_str!("migrations/0004_subject_ends_and_gates.sql"),
    include_str!("migrations/0005_checked_at.sql"),
    include_str!("migrations/0006_audit_events.sql"),
];

/// A WAL grown past this (a long read held it in a storm) is cut back to it when it restarts.
const JOURNAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

/// The SQLite store as the relay holds it: a queue to the thread that owns the connection.
pub struct SqliteStore {
    tasks: mpsc::Sender<Task>,
    /// The file, for what reads beside the writer (a seal's events).
    path: std::path::PathBuf,
}

/// The connection and what every operation on it works by. Only the writer thread holds it
/// (and tests of the SQL itself).
pub(crate) struct Db {
    /// Declared before `conn`: stopped first, so the writer's connection is the last to close
    /// (and checkpoints what is left).
    checkpointer: Option<Checkpointer>,
    pub(crate) conn: Connection,
    windows: Windows,
    store_payloads: bool,
    clock: Clock,
    /// Where committed audit events go, once the writer has answered (`committed`).
    audit: super::audit::Sink,
    /// Events committed, for the sink.
    committed: Vec<super::audit::Body>,
    /// The highest audit event ID in the store when it opened or committed since: numbering
    /// never goes back below it, so events removed from the end behind the relay's back
    /// leave a gap that `audit verify` names rather than IDs written again.
    last_event: i64,
}

impl SqliteStore {
    /// Opens (creating it and its folder when missing) and migrates the store at `path`, and
    /// starts the thread that owns it; the store's WAL is checkpointed on a thread of its own.
    /// The task ends once every handle on the store is gone and its queue is drained.
    pub fn open(path: &Path, settings: &Settings) -> Result<(SqliteStore, StoreTask), StoreError> {
        let mut db = Db::open(path, settings.windows, settings.store_payloads)?;
        db.clock = settings.clock.clone();
        db.audit = settings.audit.clone();
        match Checkpointer::start(path) {
            Ok(c) => db.checkpointer = Some(c),
            // The writer's own checkpoints (past a backstop) still keep the WAL bounded.
            Err(e) => tracing::warn!(error = %e, "cannot start the store's checkpoint thread"),
        }
        let (store, thread) = Self::spawn(db, path, settings.group_commit)?;
        Ok((store, StoreTask::Thread(thread)))
    }

    /// Starts the thread that owns `db`. With `group_commit` off every write gets its own
    /// transaction (for comparison in benchmarks).
    fn spawn(
        db: Db,
        path: &Path,
        group_commit: bool,
    ) -> Result<(SqliteStore, std::thread::JoinHandle<()>), StoreError> {
        let (max, queue_len) = batch::sizes(group_commit);
        let (tasks, queue) = mpsc::channel(queue_len);
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer::run(db, queue, max))?;
        let path = path.to_owned();
        Ok((SqliteStore { tasks, path }, thread))
    }

    /// Runs `op` on the writer thread, after the writes queued before it.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        op: impl FnOnce(&mut Db) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        batch::ask(&self.tasks, |reply| {
            Task::Run(Box::new(move |db| {
                let _ = reply.send(op(db));
            }))
        })
        .await
    }
}

/// One relay owns the file: a claim is never taken over, and the relay wakes itself.
#[async_trait]
impl Leases for SqliteStore {
    async fn hold(&self, _claim: Held) {
        std::future::pending().await
    }

    fn wake_on_new_work(&self, _wake: Arc<Notify>) {}
}

impl Db {
    /// Opens (creating it and its folder when missing) and migrates the store at `path`, on
    /// the system clock and with no checkpoint thread.
    pub(crate) fn open(
        path: &Path,
        windows: Windows,
        store_payloads: bool,
    ) -> Result<Db, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Setup(format!("{}: {e}", dir.display())))?;
        }
        let mut db = Db {
            checkpointer: None,
            conn: connect(path)?,
            windows,
            store_payloads,
            clock: Clock::system(),
            audit: super::audit::Sink::default(),
            committed: Vec::new(),
            last_event: 0,
        };
        db.migrate()?;
        db.last_event =
            db.conn
                .query_row("SELECT COALESCE(MAX(id), 0) FROM audit_events", [], |r| {
                    r.get(0)
                })?;
        Ok(db)
    }

    /// Sets the time this store works by (tests hold both stores to the same moments).
    #[cfg(test)]
    pub(crate) fn with_clock(mut self, clock: Clock) -> Db {
        self.clock = clock;
        self
    }

    fn now(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Audit events a transaction committed: handed to the sink once those waiting on it are
    /// answered (`flush_audit`), so logging them holds up no one.
    fn committed(&mut self, written: Vec<super::audit::Body>) {
        self.wrote(&written);
        self.committed.extend(written);
    }

    /// Events just committed: numbering goes on after them.
    fn wrote(&mut self, written: &[super::audit::Body]) {
        let last = written.iter().map(|b| b.id).max().unwrap_or(0);
        self.last_event = self.last_event.max(last);
    }

    pub(super) fn flush_audit(&mut self) {
        if !self.committed.is_empty() {
            let written = std::mem::take(&mut self.committed);
            self.audit.committed(&written);
        }
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let version: i64 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))?;
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(StoreError::Schema(format!(
                "the store file has schema version {version}, newer than this relay knows ({known})"
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(sql)
                .map_err(|e| StoreError::Schema(format!("migration {}: {e}", i + 1)))?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
        }
        Ok(())
    }
}

/// Runs `sql` (cached) with `params` and reads each row it returns with `read`.
fn rows<T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    read: impl Fn(&rusqlite::Row<'_>) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let mut stmt = conn.prepare_cached(sql)?;
    let mut found = stmt.query(params)?;
    let mut out = Vec::new();
    while let Some(r) = found.next()? {
        out.push(read(r)?);
    }
    Ok(out)
}

/// The writer's connection: one thread at a time uses it, so SQLite's own mutexes are off.
fn connect(path: &Path) -> Result<Connection, StoreError> {
    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE
        | rusqlite::OpenFlags::SQLITE_OPEN_CREATE
        | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)?;
    conn.set_prepared_statement_cache_capacity(64);
    // Plans that do not depend on bound values. Without this, a cached statement whose plan
    // the planner judged value-sensitive (an `=` on a bound value outside the index it
    // weighed, a bound `LIMIT`) expires each time its bindings are cleared on return to the
    // cache, and is compiled again on every use.
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "wal_autocheckpoint", CHECKPOINT_BACKSTOP)?;
    conn.pragma_update(None, "journal_size_limit", JOURNAL_SIZE_LIMIT)?;
    Ok(conn)
}
