//! Group commit, the part both stores share: the writes of many writers gathered into one
//! batch (their deliveries in order, their outcomes), and each writer answered with its own
//! deliveries' results, or the error that left the whole batch out.

use tokio::sync::{mpsc, oneshot};

use super::StoreError;
use super::api::WriteResults;
use super::audit::AuditEvent;
use super::model::{AttemptRecord, NewDelivery};

/// How many deliveries and outcomes one batch may take.
pub(crate) const MAX_BATCH: usize = 1024;

/// The batch size for `group_commit` (off: each write alone, for comparison in benchmarks),
/// and the writer queue's length.
pub(crate) fn sizes(group_commit: bool) -> (usize, usize) {
    (if group_commit { MAX_BATCH } else { 1 }, MAX_BATCH * 4)
}

/// Where one writer waits for its results.
pub(crate) type Reply = oneshot::Sender<Result<WriteResults, StoreError>>;

/// One writer's deliveries, outcomes and audit events of their own, and where its results go.
pub(crate) struct Write {
    pub deliveries: Vec<NewDelivery>,
    pub outcomes: Vec<AttemptRecord>,
    pub events: Vec<AuditEvent>,
    pub reply: Reply,
}

impl Write {
    /// How much of a batch it takes.
    pub fn size(&self) -> usize {
        (self.deliveries.len() + self.outcomes.len() + self.events.len()).max(1)
    }
}

/// The writes gathered for one transaction, and who waits on which of them.
#[derive(Default)]
pub(crate) struct Batch {
    pub deliveries: Vec<NewDelivery>,
    pub outcomes: Vec<AttemptRecord>,
    pub events: Vec<AuditEvent>,
    /// Each writer's reply, and how many of the deliveries are its.
    waiting: Vec<(Reply, usize)>,
}

impl Batch {
    pub fn add(&mut self, w: Write) {
        self.waiting.push((w.reply, w.deliveries.len()));
        self.deliveries.extend(w.deliveries);
        self.outcomes.extend(w.outcomes);
        self.events.extend(w.events);
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Answers every writer from what committing the batch came to, and empties it.
    pub fn answer(&mut self, committed: Result<WriteResults, StoreError>) {
        self.deliveries.clear();
        self.outcomes.clear();
        self.events.clear();
        match committed {
            Ok(results) => {
                let mut results = results.into_iter();
                for (reply, n) in self.waiting.drain(..) {
                    let _ = reply.send(Ok(results.by_ref().take(n).collect()));
                }
            }
            Err(e) => {
                for (reply, _) in self.waiting.drain(..) {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Sends what `make` builds (given where to reply) to a writer's `queue`, and waits for the
/// answer; a writer that is gone is `Closed`.
pub(crate) async fn ask<M, T>(
    queue: &mpsc::Sender<M>,
    make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> M,
) -> Result<T, StoreError> {
    let (reply, answer) = oneshot::channel();
    queue
        .send(make(reply))
        .await
        .map_err(|_| StoreError::Closed)?;
    answer.await.map_err(|_| StoreError::Closed)?
}

/// What one writer hands a writer's queue.
#[derive(Default)]
pub struct Parts {
    pub deliveries: Vec<NewDelivery>,
    pub outcomes: Vec<AttemptRecord>,
    pub events: Vec<AuditEvent>,
}

/// A write sent to a writer's `queue`, and its results.
pub(crate) async fn write<M>(
    queue: &mpsc::Sender<M>,
    parts: Parts,
    wrap: impl FnOnce(Write) -> M,
) -> Result<WriteResults, StoreError> {
    ask(queue, |reply| {
        wrap(Write {
            deliveries: parts.deliveries,
            outcomes: parts.outcomes,
            events: parts.events,
            reply,
        })
    })
    .await
}
