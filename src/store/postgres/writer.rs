//! The PostgreSQL batch writer: every write waiting when a batch starts goes into one call of
//! `p0_relay_write` (one statement, one transaction, one round trip), two batches at most
//! committing at once; each writer gets its own deliveries' results back. While the other
//! batch commits, a batch of attempt outcomes alone waits for more (up to 2 ms).

use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::{Notify, Semaphore, mpsc};

use super::audit::{bodies, events_json};
use super::{OP_TIMEOUT, Pg};
use crate::domain::Expiration;
use crate::store::StoreError;
use crate::store::api::WriteResults;
use crate::store::audit::{AuditEvent, Body};
use crate::store::batch::{Batch, Write};
use crate::store::model::{Accepted, AttemptRecord, BoundRevocation, JobRef, NewDelivery, ms};
use crate::store::rules::{batch_order, in_arrival_order};

/// Batches committing at once per relay (each on its own connection). Two, not more: each
/// batch takes every write waiting when it starts, so fewer concurrent transactions carry
/// more each, and the database spends its CPU on rows rather than on transactions (one relay
/// storm on this 2-core machine: 6.4k accepted/s with three, 8.5k with two, 9.5k with one).
/// The second keeps accepts going while the first waits on a lock or a slow commit.
const WRITERS: usize = 2;

/// How long a batch of attempt outcomes alone waits for more while another batch commits,
/// and for how many. Waiting the whole 2 ms cut the writing transactions of a storm by
/// 40-50 % (BENCHMARKS: a write's cost in the database is mostly fixed, however little it
/// holds). The wait ends when the other batch has committed: waiting longer slowed the calls
/// to P0 (each claim's task waits for its outcome to be recorded).
const OUTCOMES_WAIT: std::time::Duration = std::time::Duration::from_millis(2);
const OUTCOMES_SHARE: usize = 16;

/// Serves `queue` until every sender is gone and it is drained.
pub(super) async fn run(db: Arc<Pg>, mut queue: mpsc::Receiver<Write>, max_batch: usize) {
    let slots = Arc::new(Semaphore::new(WRITERS));
    // Told when a batch's commit has ended (committed or failed): a batch of outcomes waits
    // no longer than that.
    let committed = Arc::new(Notify::new());
    let mut running = tokio::task::JoinSet::new();
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let Some(first) = queue.recv().await else {
            break;
        };
        // Everything waiting now goes into one transaction (group commit).
        let mut size = first.size();
        let mut batch = Batch::default();
        batch.add(first);
        take_waiting(&mut queue, &mut batch, &mut size, max_batch);
        // While another batch commits, a batch of attempt outcomes alone waits a little for
        // more, so that more share a transaction's fixed cost (most batches are these). No
        // webhook's answer waits on outcomes: a write that one waits on (deliveries, events)
        // ends the wait, and what queued behind it joins too. So does the other batch's
        // commit: waiting past it only holds back the claims whose outcomes these are.
        // Made before the slots are counted: it hears every `notify_waiters` from now on,
        // and a batch gives its slot back before it tells, so none ends unheard.
        let other_done = committed.notified();
        tokio::pin!(other_done);
        if slots.available_permits() == 0 {
            let until = tokio::time::Instant::now() + OUTCOMES_WAIT;
            let share = OUTCOMES_SHARE.min(max_batch);
            while batch.deliveries.is_empty() && batch.events.is_empty() && size < share {
                tokio::select! {
                    next = tokio::time::timeout_at(until, queue.recv()) => match next {
                        Ok(Some(w)) => {
                            size += w.size();
                            batch.add(w);
                        }
                        _ => break,
                    },
                    () = &mut other_done => break,
                }
            }
            take_waiting(&mut queue, &mut batch, &mut size, max_batch);
        }
        let db = db.clone();
        let done = committed.clone();
        running.spawn(async move {
            commit(&db, batch).await;
            drop(slot);
            done.notify_waiters();
        });
        while running.try_join_next().is_some() {}
    }
    while running.join_next().await.is_some() {}
}

/// Adds the writes waiting in `queue` to `batch` while it holds fewer than `max`.
fn take_waiting(
    queue: &mut mpsc::Receiver<Write>,
    batch: &mut Batch,
    size: &mut usize,
    max: usize,
) {
    while *size < max {
        match queue.try_recv() {
            Ok(w) => {
                *size += w.size();
                batch.add(w);
            }
            Err(_) => break,
        }
    }
}

/// Commits one batch and answers each of its writers.
async fn commit(db: &Pg, mut batch: Batch) {
    let written = db
        .write(&batch.deliveries, &batch.outcomes, &batch.events)
        .await;
    let (committed, written) = match written {
        Ok((results, written)) => (Ok(results), written),
        Err(e) => (Err(e), Vec::new()),
    };
    batch.answer(committed);
    // Its audit events, once its writers have their answers.
    db.audit.committed(&written);
}

impl Pg {
    /// Commits deliveries and attempt outcomes in one transaction (`Jobs::write`): per
    /// delivery, its result. The transaction opens no savepoint per delivery (each would be
    /// a subtransaction, and past 64 of them every other session's snapshots get slower), so
    /// when the database refuses the batch it is written again in parts: the outcomes
    /// together first (if they fail, nothing is written and the whole batch fails, as when
    /// the database is unreachable), then each delivery alone, in `batch_order`. A delivery
    /// that fails is then left out whole and fails only its sender.
    pub(super) async fn write(
        &self,
        deliveries: &[NewDelivery],
        outcomes: &[AttemptRecord],
        events: &[AuditEvent],
    ) -> Result<(WriteResults, Vec<Body>), StoreError> {
        let now = self.now();
        match self.write_batch(deliveries, outcomes, events, now).await {
            Err(StoreError::Refused(why))
                if deliveries.len() + usize::from(!outcomes.is_empty() || !events.is_empty())
                    > 1 =>
            {
                tracing::warn!(error = %why, "a batch was refused; writing its parts one by one");
                let mut written = Vec::new();
                if !outcomes.is_empty() || !events.is_empty() {
                    written = self.write_batch(&[], outcomes, events, now).await?.1;
                }
                let order = batch_order(deliveries);
                let mut results = Vec::with_capacity(deliveries.len());
                for &i in &order {
                    let one = self
                        .write_batch(std::slice::from_ref(&deliveries[i]), &[], &[], now)
                        .await;
                    results.push(one.and_then(|(mut r, w)| match r.pop() {
                        Some(result) if r.is_empty() => {
                            written.extend(w);
                            result
                        }
                        _ => Err(StoreError::Corrupt(
                            "p0_relay_write answered other than one result".into(),
                        )),
                    }));
                }
                Ok((in_arrival_order(&order, results), written))
            }
            other => other,
        }
    }

    async fn write_batch(
        &self,
        deliveries: &[NewDelivery],
        outcomes: &[AttemptRecord],
        events: &[AuditEvent],
        now: i64,
    ) -> Result<(WriteResults, Vec<Body>), StoreError> {
        let mut batch = Value::Array(deliveries.iter().map(delivery_json).collect());
        let mut recs = Value::Array(outcomes.iter().map(outcome_json).collect());
        let mut events = events_json(events);
        without_nul(&mut batch);
        without_nul(&mut recs);
        without_nul(&mut events);
        let payloads: Vec<Option<&[u8]>> = deliveries
            .iter()
            .map(|d| d.payload.as_deref().filter(|_| self.store_payloads))
            .collect();
        let dedup_since = now.saturating_sub(ms(self.windows.dedup));
        let coalesce_since = now.saturating_sub(ms(self.windows.coalesce));
        let out: Value = self
            .run("write", OP_TIMEOUT, async |c| {
                // One statement is its own transaction: no BEGIN and COMMIT round trips.
                let stmt = c
                    .prepare_cached("SELECT p0_relay_write($1, $2, $3, $4, $5, $6, $7)")
                    .await?;
                let args: [&(dyn tokio_postgres::types::ToSql + Sync); 7] = [
                    &batch,
                    &payloads,
                    &recs,
                    &events,
                    &now,
                    &dedup_since,
                    &coalesce_since,
                ];
                c.query_one(&stmt, &args).await?.try_get(0)
            })
            .await?;
        if let Some(ignored) = out["ignored"].as_array().filter(|a| !a.is_empty()) {
            tracing::warn!(
                job_ids = ?ignored,
                "outcomes ignored: the claim had expired and another relay holds the decision now"
            );
        }
        let results = out["results"].as_array().cloned().unwrap_or_default();
        if results.len() != deliveries.len() {
            return Err(StoreError::Corrupt(format!(
                "p0_relay_write answered {} results for {} deliveries",
                results.len(),
                deliveries.len()
            )));
        }
        let results = results.iter().map(|r| Ok(parse_result(r))).collect();
        Ok((results, bodies(&out["audit"])))
    }
}

/// A delivery as `p0_relay_write` reads it (the same keys the previous release sends, so
/// relays of both share a database during an upgrade).
fn delivery_json(d: &NewDelivery) -> Value {
    json!({
        "source": d.source, "dedup_key": d.dedup_key,
        "received_at": d.received_at_ms, "rule": d.rule, "actor": d.actor,
        "subject": d.binding.subject, "reply": d.reply_json(),
        "ends_subject": d.binding.ends_subject,
        "reopens_subject": d.binding.reopens_subject,
        "gate": d.gate_json(),
        "refused": d.refused,
        "decisions": d.decisions.iter().map(|x| json!({
            "org": x.org.as_str(), "request_id": x.request_id.as_str(),
            "action": x.action.as_str(),
            "expiration": x.expiration.as_ref().map(Expiration::as_str),
        })).collect::<Vec<_>>(),
    })
}

/// An attempt's outcome as `p0_relay_write` reads it.
fn outcome_json(r: &AttemptRecord) -> Value {
    let s = &r.settled;
    json!({
        "job_id": s.id, "claim": s.claim_token, "at": s.at_ms,
        "state": s.state.as_str(), "attempts": s.attempts,
        "next_attempt_at": s.next_attempt_at_ms, "status": s.status,
        "result": r.result, "error": s.error, "duration_ms": r.duration_ms,
        "evidence": r.evidence, "checked_at": r.checked_at_ms,
        "answers": r.answers.iter().map(|a| json!({
            "via": a.via, "kind": a.kind, "target": a.target, "body": a.body,
        })).collect::<Vec<_>>(),
        "audit": events_json(&s.audit),
    })
}

fn parse_result(v: &Value) -> Accepted {
    let ids = |v: &Value| -> Vec<i64> {
        v.as_array()
            .map(|a| a.iter().filter_map(Value::as_i64).collect())
            .unwrap_or_default()
    };
    if let Some(dup) = v.get("dup") {
        return Accepted::Duplicate { job_ids: ids(dup) };
    }
    let jobs = v["jobs"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|pair| {
                    Some(JobRef {
                        job_id: pair.get(0)?.as_i64()?,
                        coalesced: pair.get(1)?.as_bool()?,
                        refused: pair.get(2).and_then(Value::as_str).map(str::to_owned),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let bound = v["bound"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|b| {
                    Some(BoundRevocation {
                        job_id: b.get(0)?.as_i64()?,
                        org: b.get(1)?.as_str()?.to_owned(),
                        request_id: b.get(2)?.as_str()?.to_owned(),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    Accepted::New {
        jobs,
        bound,
        refused: v["refused"].as_str().map(str::to_owned),
        reopened: v["reopened"].as_bool().unwrap_or(false),
    }
}

/// PostgreSQL refuses U+0000 in text and JSONB, so one sender's NUL (in an actor, a subject, a
/// dedup key part, P0's error text) would fail the whole batch it shares with others: it is
/// stored as U+FFFD instead. (An audit event sent as its text holds a NUL escaped, `\u0000`,
/// and keeps it, as on SQLite.)
pub(super) fn without_nul(value: &mut Value) {
    match value {
        Value::String(s) if s.contains('\0') => *s = s.replace('\0', "\u{fffd}"),
        Value::Array(items) => items.iter_mut().for_each(without_nul),
        Value::Object(map) => map.values_mut().for_each(without_nul),
        _ => {}
    }
}

#[cfg(test)]
mod nul {
    #[test]
    fn nul_characters_become_replacement_characters() {
        let mut v = serde_json::json!({"a": ["x\u{0}y", {"b": "\u{0}"}], "c": 1});
        super::without_nul(&mut v);
        assert_eq!(
            v,
            serde_json::json!({"a": ["x\u{fffd}y", {"b": "\u{fffd}"}], "c": 1})
        );
    }
}
