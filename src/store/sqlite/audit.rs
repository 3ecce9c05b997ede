//! The audit trail on SQLite: events written in the transaction of the step they record, their
//! IDs one past the last (one writer, so in commit order); read, sealed and verified. A seal
//! reads what it covers on a connection of its own, so the writer is not held up by it.

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, params};

use super::SqliteStore;
use crate::secret::Secret;
use crate::store::StoreError;
use crate::store::api::Audit;
use crate::store::audit::{
    self, About, AuditEvent, AuditRow, AuditStatus, Body, Covers, SealRef, Start, Verification,
    Verifier,
};

/// The last seal: its ID and body.
const LAST_SEAL: &str =
    "SELECT id, body FROM audit_events WHERE event = 'seal' ORDER BY id DESC LIMIT 1";

#[async_trait]
impl Audit for SqliteStore {
    async fn audit_events(&self, after: i64, limit: usize) -> Result<Vec<AuditRow>, StoreError> {
        self.run(move |db| {
            let mut stmt = db.conn.prepare_cached(
                "SELECT id, at, event, body, digest FROM audit_events WHERE id > ?1
                 ORDER BY id LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![after, limit as i64], row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    async fn seal(
        &self,
        key: Option<Secret>,
        over: Option<SealRef>,
    ) -> Result<Option<(i64, Covers)>, StoreError> {
        // What to seal, read beside the writer; then written by it, unless a seal came first.
        let path = self.path.clone();
        let read = tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
            let conn = reader(&path)?;
            let previous = last_seal(&conn)?;
            if previous != over {
                return Ok((previous, None));
            }
            let after = previous.map_or(0, |p| p.to);
            let mut stmt = conn
                .prepare("SELECT id, event, digest FROM audit_events WHERE id > ?1 ORDER BY id")?;
            let rows = stmt
                .query_map([after], |r| {
                    let digest: Vec<u8> = r.get(2)?;
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        digest.try_into().unwrap_or(audit::GENESIS),
                    ))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            let seal = audit::seal(key.as_ref(), previous, &rows).map_err(StoreError::Refused)?;
            Ok((previous, seal))
        });
        let (previous, seal) = read
            .await
            .map_err(|e| StoreError::Unavailable(format!("sealing: {e}")))??;
        let Some(seal) = seal else {
            return Ok(None);
        };
        self.run(move |db| {
            let tx = db.conn.transaction()?;
            if last_seal(&tx)? != previous {
                return Ok(None);
            }
            let now = db.clock.now_ms();
            let written = insert_events(&tx, now, db.last_event, std::slice::from_ref(&seal))?;
            tx.commit()?;
            db.wrote(&written);
            db.audit.committed(&written);
            Ok(written
                .into_iter()
                .next()
                .and_then(|b| Some((b.id, b.covers?))))
        })
        .await
    }

    async fn seal_before(&self, id: i64) -> Result<Option<SealRef>, StoreError> {
        self.run(move |db| {
            let mut stmt = db.conn.prepare(
                "SELECT id, body FROM audit_events WHERE event = 'seal' ORDER BY id DESC",
            )?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                if let Some(seal) = SealRef::read(r.get(0)?, &r.get::<_, String>(1)?)
                    && seal.to < id
                {
                    return Ok(Some(seal));
                }
            }
            Ok(None)
        })
        .await
    }

    async fn verify(&self, key: Option<&Secret>, start: Start) -> Result<Verification, StoreError> {
        let key = key.cloned();
        self.run(move |db| {
            let mut verifier = Verifier::new(key.as_ref(), start);
            let after = match start {
                Start::First => 0,
                Start::After(seal) => seal.to,
            };
            let mut stmt = db.conn.prepare(
                "SELECT id, at, event, body, digest FROM audit_events WHERE id > ?1 ORDER BY id",
            )?;
            let mut rows = stmt.query([after])?;
            while let Some(r) = rows.next()? {
                verifier.push(&row(r)?);
                if verifier.failed() {
                    break;
                }
            }
            Ok(verifier.finish())
        })
        .await
    }

    async fn audit_status(&self) -> Result<AuditStatus, StoreError> {
        self.run(|db| status(&db.conn)).await
    }
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AuditRow> {
    Ok(AuditRow {
        id: r.get(0)?,
        at_ms: r.get(1)?,
        event: r.get(2)?,
        body: r.get(3)?,
        digest: r.get(4)?,
    })
}

/// A read-only connection of its own.
fn reader(path: &std::path::Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

fn last_seal(conn: &Connection) -> Result<Option<SealRef>, StoreError> {
    let found: Option<(i64, String)> = conn
        .prepare_cached(LAST_SEAL)?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    Ok(found.and_then(|(id, body)| SealRef::read(id, &body)))
}

pub(super) fn status(conn: &Connection) -> Result<AuditStatus, StoreError> {
    let last_id: Option<i64> = conn
        .prepare_cached("SELECT MAX(id) FROM audit_events")?
        .query_row([], |r| r.get(0))?;
    let seal: Option<(i64, i64, String)> = conn
        .prepare_cached(
            "SELECT id, at, body FROM audit_events WHERE event = 'seal' ORDER BY id DESC LIMIT 1",
        )?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    Ok(AuditStatus {
        last_id,
        last_seal: seal.and_then(|(id, at, body)| Some((at, SealRef::read(id, &body)?.to))),
    })
}

/// Writes `events` in `tx`, numbered after the last event (and after `after`, the last this
/// relay committed), at `now`; their bodies, for the sink once the transaction has committed.
pub(super) fn insert_events(
    tx: &Connection,
    now: i64,
    after: i64,
    events: &[AuditEvent],
) -> Result<Vec<Body>, StoreError> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let stored: i64 = tx
        .prepare_cached("SELECT COALESCE(MAX(id), 0) FROM audit_events")?
        .query_row([], |r| r.get(0))?;
    if stored < after {
        tracing::error!(
            last_stored = stored,
            last_written = after,
            "audit events were removed from the end of the trail behind the relay's back; \
             numbering goes on after the last it wrote, and `audit verify` names the gap"
        );
    }
    let last = stored.max(after);
    let mut insert = tx.prepare_cached(
        "INSERT INTO audit_events (id, at, event, body, digest) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    let mut written = Vec::with_capacity(events.len());
    for (n, e) in events.iter().enumerate() {
        let id = last + 1 + n as i64;
        let about = match e.job_to_look_up() {
            Some(job) => about_job(tx, job)?,
            None => e.about.clone().unwrap_or_default(),
        };
        let body = e.body(id, now, about);
        let text = body.text();
        let event = e.event.as_str();
        let digest = audit::digest(id, now, event, &text);
        insert.execute(params![id, now, event, text, &digest[..]])?;
        written.push(body);
    }
    Ok(written)
}

/// What a stored job is about (its delivery's rule, actor and key); nothing when it is gone.
fn about_job(tx: &Connection, job: i64) -> Result<About, StoreError> {
    let about = tx
        .prepare_cached(
            "SELECT j.source, d.rule, d.actor, j.action, j.request_id, j.org, j.subject,
                    d.dedup_key
             FROM jobs j LEFT JOIN deliveries d ON d.id = j.delivery_id WHERE j.id = ?1",
        )?
        .query_row([job], |r| {
            Ok(About {
                source: r.get(0)?,
                rule: r.get(1)?,
                actor: r.get(2)?,
                action: r.get(3)?,
                request_id: r.get(4)?,
                org: r.get(5)?,
                subject: r.get(6)?,
                delivery: r.get(7)?,
            })
        })
        .optional()?;
    Ok(about.unwrap_or_default())
}

/// Removes the events before the last seal written before `before_ms` (that seal stands for
/// them from now on), and records a `pruned` event saying so; how many, and that event.
pub(super) fn prune(
    tx: &Connection,
    now: i64,
    after: i64,
    before_ms: i64,
    key: Option<&Secret>,
) -> Result<(usize, Vec<Body>), StoreError> {
    let anchor: Option<(i64, String)> = tx
        .prepare_cached(
            "SELECT id, body FROM audit_events WHERE event = 'seal' AND at < ?1
                 ORDER BY id DESC LIMIT 1",
        )?
        .query_row([before_ms], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let Some(anchor) = anchor.and_then(|(id, body)| SealRef::read(id, &body)) else {
        return Ok((0, Vec::new()));
    };
    let first: Option<i64> = tx
        .prepare_cached("SELECT MIN(id) FROM audit_events")?
        .query_row([], |r| r.get(0))?;
    let Some(first) = first.filter(|f| *f <= anchor.to) else {
        return Ok((0, Vec::new()));
    };
    let removed = tx.execute("DELETE FROM audit_events WHERE id <= ?1", [anchor.to])?;
    let e = audit::pruned(key, &anchor, first, removed as i64);
    let written = insert_events(tx, now, after, &[e])?;
    Ok((removed, written))
}
