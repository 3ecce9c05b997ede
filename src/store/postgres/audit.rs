//! The audit trail on PostgreSQL: events written by `p0_relay_audit_text` (through
//! `p0_relay_write` or `p0_relay_audit`) in the transaction of the step they record (IDs in
//! commit order across relays, from `audit_head`); read, sealed (one relay at a time) and
//! verified.

use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};

use super::schema::SEAL_LOCK;
use super::upkeep::first;
use super::{OP_TIMEOUT, Pg, PgStore};
use crate::secret::Secret;
use crate::store::StoreError;
use crate::store::api::Audit;
use crate::store::audit::{
    self, AuditEvent, AuditRow, AuditStatus, Body, Covers, SealRef, Start, Verification, Verifier,
};

/// The longest a verification may read for.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(3600);

#[async_trait]
impl Audit for PgStore {
    async fn audit_events(&self, after: i64, limit: usize) -> Result<Vec<AuditRow>, StoreError> {
        let limit = limit as i64;
        let rows = self
            .db
            .run("audit events", OP_TIMEOUT, async |c| {
                let stmt = c
                    .prepare_cached(
                        "SELECT id, at, event, body, digest FROM audit_events WHERE id > $1
                         ORDER BY id LIMIT $2",
                    )
                    .await?;
                c.query(&stmt, &[&after, &limit]).await
            })
            .await?;
        rows.iter().map(|r| Ok(row(r)?)).collect()
    }

    async fn seal(
        &self,
        key: Option<Secret>,
        over: Option<SealRef>,
    ) -> Result<Option<(i64, Covers)>, StoreError> {
        let sealed = self
            .db
            .run("seal", Duration::from_secs(60), async |c| {
                let tx = c.transaction().await?;
                if !first(&tx, SEAL_LOCK).await? {
                    return Ok(Ok(None));
                }
                let previous = last_seal(&tx).await?;
                if previous != over {
                    return Ok(Ok(None));
                }
                let after = previous.map_or(0, |p| p.to);
                let rows = tx
                    .query(
                        "SELECT id, event, digest FROM audit_events WHERE id > $1 ORDER BY id",
                        &[&after],
                    )
                    .await?;
                let mut covered = Vec::with_capacity(rows.len());
                for r in &rows {
                    let digest: Vec<u8> = r.try_get(2)?;
                    covered.push((
                        r.try_get(0)?,
                        r.try_get(1)?,
                        digest.try_into().unwrap_or(audit::GENESIS),
                    ));
                }
                let seal = match audit::seal(key.as_ref(), previous, &covered) {
                    Ok(Some(seal)) => seal,
                    Ok(None) => return Ok(Ok(None)),
                    Err(why) => return Ok(Err(StoreError::Refused(why))),
                };
                let now = self.db.now();
                let written = write_events(&tx, std::slice::from_ref(&seal), now).await?;
                tx.commit().await?;
                Ok(Ok(Some(written)))
            })
            .await??;
        let Some(written) = sealed else {
            return Ok(None);
        };
        self.db.audit.committed(&written);
        Ok(written
            .into_iter()
            .next()
            .and_then(|b| Some((b.id, b.covers?))))
    }

    async fn seal_before(&self, id: i64) -> Result<Option<SealRef>, StoreError> {
        // The last seal covering only events before `id`: the last seal written before it, or
        // the first one after it, which covers no more than what committed before it read
        // (at most one seal after `id` can: the next covers that one).
        let rows = self
            .db
            .run("seal before", OP_TIMEOUT, async |c| {
                c.query(
                    "(SELECT id, body FROM audit_events WHERE event = 'seal' AND id >= $1
                      ORDER BY id LIMIT 1)
                     UNION ALL
                     (SELECT id, body FROM audit_events WHERE event = 'seal' AND id < $1
                      ORDER BY id DESC LIMIT 1)",
                    &[&id],
                )
                .await
            })
            .await?;
        let mut found = None;
        for r in &rows {
            if let Some(seal) = SealRef::read(r.try_get(0)?, &r.try_get::<_, String>(1)?)
                && seal.to < id
                && found.is_none_or(|f: SealRef| f.id < seal.id)
            {
                found = Some(seal);
            }
        }
        Ok(found)
    }

    async fn verify(&self, key: Option<&Secret>, start: Start) -> Result<Verification, StoreError> {
        let after = match start {
            Start::First => 0,
            Start::After(seal) => seal.to,
        };
        let found = self
            .db
            .run("audit verify", VERIFY_TIMEOUT, async |c| {
                let mut verifier = Verifier::new(key, start);
                let stmt = c
                    .prepare_cached(
                        "SELECT id, at, event, body, digest FROM audit_events WHERE id > $1
                         ORDER BY id LIMIT 10000",
                    )
                    .await?;
                let mut after = after;
                loop {
                    let rows = c.query(&stmt, &[&after]).await?;
                    for r in &rows {
                        let row = row(r)?;
                        after = row.id;
                        verifier.push(&row);
                        if verifier.failed() {
                            return Ok(verifier.finish());
                        }
                    }
                    if rows.len() < 10_000 {
                        return Ok(verifier.finish());
                    }
                }
            })
            .await?;
        Ok(found)
    }

    async fn audit_status(&self) -> Result<AuditStatus, StoreError> {
        let (last_id, seal) = self
            .db
            .run("audit status", OP_TIMEOUT, async |c| {
                let last: Option<i64> = c
                    .query_one("SELECT MAX(id) FROM audit_events", &[])
                    .await?
                    .try_get(0)?;
                let seal = c
                    .query_opt(
                        "SELECT id, at, body FROM audit_events WHERE event = 'seal'
                         ORDER BY id DESC LIMIT 1",
                        &[],
                    )
                    .await?;
                let seal = match seal {
                    Some(r) => Some((
                        r.try_get::<_, i64>(0)?,
                        r.try_get::<_, i64>(1)?,
                        r.try_get::<_, String>(2)?,
                    )),
                    None => None,
                };
                Ok((last, seal))
            })
            .await?;
        Ok(AuditStatus {
            last_id,
            last_seal: seal.and_then(|(id, at, body)| Some((at, SealRef::read(id, &body)?.to))),
        })
    }
}

fn row(r: &tokio_postgres::Row) -> Result<AuditRow, tokio_postgres::Error> {
    Ok(AuditRow {
        id: r.try_get(0)?,
        at_ms: r.try_get(1)?,
        event: r.try_get(2)?,
        body: r.try_get(3)?,
        digest: r.try_get(4)?,
    })
}

async fn last_seal(
    tx: &tokio_postgres::Transaction<'_>,
) -> Result<Option<SealRef>, tokio_postgres::Error> {
    let found = tx
        .query_opt(
            "SELECT id, body FROM audit_events WHERE event = 'seal' ORDER BY id DESC LIMIT 1",
            &[],
        )
        .await?;
    Ok(match found {
        Some(r) => SealRef::read(r.try_get(0)?, &r.try_get::<_, String>(1)?),
        None => None,
    })
}

/// Writes `events` in `tx` (`p0_relay_audit`; call it last, it holds the ID lock until
/// the commit); their bodies, for the sink once committed.
pub(super) async fn write_events(
    tx: &tokio_postgres::Transaction<'_>,
    events: &[AuditEvent],
    now: i64,
) -> Result<Vec<Body>, tokio_postgres::Error> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let events = events_json(events);
    let written: Value = tx
        .query_one("SELECT p0_relay_audit($1, $2)", &[&events, &now])
        .await?
        .try_get(0)?;
    Ok(bodies(&written))
}

/// Events as `p0_relay_event_texts` takes them. One that needs nothing looked up
/// (`AuditEvent::job_to_look_up`) goes as `[name, its body's text after the ID and time]`,
/// written as the relay writes a body (`Body::text`), so it is stored with the same bytes as
/// on SQLite; one about a stored job goes as its JSON, completed from the job there.
pub(super) fn events_json(events: &[AuditEvent]) -> Value {
    Value::Array(
        events
            .iter()
            .map(|e| {
                if e.job_to_look_up().is_none() {
                    let text = serde_json::to_string(e).unwrap_or_default();
                    json!([e.event.as_str(), text.get(1..).unwrap_or_default()])
                } else {
                    serde_json::to_value(e).unwrap_or(Value::Null)
                }
            })
            .collect(),
    )
}

/// The bodies `p0_relay_audit` answered (JSON texts), read back for the sink.
pub(super) fn bodies(written: &Value) -> Vec<Body> {
    written
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .filter_map(|t| serde_json::from_str(t).ok())
                .collect()
        })
        .unwrap_or_default()
}

impl Pg {
    /// Removes the events before the last seal written before `before_ms` (that seal stands
    /// for them from now on), and records a `pruned` event saying so, in `tx`; how many.
    pub(super) async fn prune_audit(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        before_ms: i64,
        key: Option<&Secret>,
    ) -> Result<(u64, Vec<Body>), tokio_postgres::Error> {
        let anchor = tx
            .query_opt(
                "SELECT id, body FROM audit_events WHERE event = 'seal' AND at < $1
                 ORDER BY id DESC LIMIT 1",
                &[&before_ms],
            )
            .await?;
        let anchor = match anchor {
            Some(r) => SealRef::read(r.try_get(0)?, &r.try_get::<_, String>(1)?),
            None => None,
        };
        let Some(anchor) = anchor else {
            return Ok((0, Vec::new()));
        };
        let first: Option<i64> = tx
            .query_one("SELECT MIN(id) FROM audit_events", &[])
            .await?
            .try_get(0)?;
        let Some(first) = first.filter(|f| *f <= anchor.to) else {
            return Ok((0, Vec::new()));
        };
        let removed = tx
            .execute("DELETE FROM audit_events WHERE id <= $1", &[&anchor.to])
            .await?;
        let e = audit::pruned(key, &anchor, first, removed as i64);
        let written = write_events(tx, &[e], self.now()).await?;
        Ok((removed, written))
    }
}
