//! The rules every store keeps the same way, written once here: the order a batch is written
//! in, what a replay may queue again, and the words of a refusal. (Dedup, coalescing, subject
//! ends and what is still granted under a subject are SQL: `sqlite/jobs.rs` in Rust, and the
//! PL/pgSQL functions in `postgres/functions/` for one round trip a batch; the contract tests
//! in `store/tests/` hold the two to the same results.)

use std::time::Duration;

use super::StoreError;
use super::model::{NewDelivery, Overtaken, Replayed};
pub(crate) use super::rows::Candidate;
use crate::domain::Action;

/// The order a batch's deliveries are written in: arrival order, except that deliveries that
/// end their subjects come after all the others, so an end sees every approve it shares a
/// batch with (both stores, and the PostgreSQL function, keep this order).
pub(crate) fn batch_order(deliveries: &[NewDelivery]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..deliveries.len()).collect();
    order.sort_by_key(|&i| deliveries[i].binding.ends_subject);
    order
}

/// Results made in `order` (from `batch_order`), put back in arrival order.
pub(crate) fn in_arrival_order<R>(order: &[usize], made: Vec<R>) -> Vec<R> {
    let mut placed: Vec<(usize, R)> = order.iter().copied().zip(made).collect();
    placed.sort_by_key(|(i, _)| *i);
    placed.into_iter().map(|(_, r)| r).collect()
}

/// Why a request an ending event names is not revoked: it was not granted under the subject
/// that ends (an end revokes only what was approved under it). The same from every store
/// (PostgreSQL: `p0_relay_unbound_reason`).
pub fn unbound_reason(request_id: &str, subject: &str) -> String {
    format!(
        "request {request_id} is not granted under subject {subject}: an end revokes only what was approved under it"
    )
}

/// The reason an approve under an ended subject is refused, the same from every store
/// (PostgreSQL: `p0_relay_ended_reason`).
pub fn ended_reason(subject: &str, ended_at_ms: i64) -> String {
    let at = std::time::UNIX_EPOCH
        + Duration::from_millis(u64::try_from(ended_at_ms).unwrap_or_default());
    format!(
        "subject {subject} ended at {}",
        humantime::format_rfc3339_seconds(at)
    )
}

impl Candidate {
    /// Puts the candidate in its place in `replayed`; true when it is to be queued again. Only
    /// a request's latest decision is; an approve never, while its subject is ended or when it
    /// ended after the approve was asked (a reopened issue's old approval stays old).
    pub(crate) fn classify(&self, replayed: &mut Replayed) -> Result<bool, StoreError> {
        let action = |a: &str| {
            Action::parse(a).ok_or_else(|| {
                StoreError::Corrupt(format!("job {}: unknown action `{a}`", self.id))
            })
        };
        if self.id != self.latest {
            replayed.overtaken.push(Overtaken {
                job: self.id,
                action: action(&self.action)?,
                by: self.latest,
                by_action: action(&self.latest_action)?,
            });
            return Ok(false);
        }
        if action(&self.action)? == Action::Approve
            && let (Some(subject), Some(at)) = (&self.subject, self.ended_at)
            && (!self.reopened || at >= self.created_at)
        {
            let mut reason = ended_reason(subject, at);
            if self.reopened {
                reason
                    .push_str(", after this approve was asked (it has reopened since: ask again)");
            }
            replayed.ended.push((self.id, reason));
            return Ok(false);
        }
        replayed.queued.push(self.id);
        Ok(true)
    }
}
