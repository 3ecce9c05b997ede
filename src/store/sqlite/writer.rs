//! The thread that owns the SQLite connection. It takes everything waiting at once: the
//! writes go into one transaction and one sync (group commit), each writer getting its own
//! deliveries' results back; then every other operation runs, in the order it came.

use tokio::sync::{mpsc, oneshot};

use super::Db;
use crate::store::StoreError;
use crate::store::api::WriteResults;
use crate::store::model::{AttemptRecord, NewDelivery};

/// How many deliveries and outcomes one transaction may take.
pub(super) const MAX_BATCH: usize = 1024;

/// What the writer thread is asked to do.
pub(super) enum Task {
    /// Deliveries and outcomes to commit, in a transaction shared with the other writes
    /// waiting.
    Write {
        deliveries: Vec<NewDelivery>,
        outcomes: Vec<AttemptRecord>,
        reply: oneshot::Sender<Result<WriteResults, StoreError>>,
    },
    /// Any other operation: it answers through a channel of its own.
    Run(Box<dyn FnOnce(&mut Db) + Send>),
}

impl Task {
    fn size(&self) -> usize {
        match self {
            Task::Write {
                deliveries,
                outcomes,
                ..
            } => (deliveries.len() + outcomes.len()).max(1),
            Task::Run(_) => 1,
        }
    }
}

/// Serves `queue` until every sender is gone and it is drained.
pub(super) fn run(mut db: Db, mut queue: mpsc::Receiver<Task>, max_batch: usize) {
    let mut writes = Writes::default();
    let mut others = Vec::new();
    while let Some(first) = queue.blocking_recv() {
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(task) = next.take() {
            taken += task.size();
            match task {
                Task::Write {
                    deliveries,
                    outcomes,
                    reply,
                } => writes.add(deliveries, outcomes, reply),
                Task::Run(op) => others.push(op),
            }
            if taken < max_batch {
                next = queue.try_recv().ok();
            }
        }
        writes.commit(&mut db);
        for op in others.drain(..) {
            op(&mut db);
        }
    }
}

/// The writes gathered for one transaction, and who is waiting on which of them.
#[derive(Default)]
struct Writes {
    deliveries: Vec<NewDelivery>,
    outcomes: Vec<AttemptRecord>,
    /// Each writer's reply, and how many of the deliveries are its.
    waiting: Vec<(oneshot::Sender<Result<WriteResults, StoreError>>, usize)>,
}

impl Writes {
    fn add(
        &mut self,
        deliveries: Vec<NewDelivery>,
        outcomes: Vec<AttemptRecord>,
        reply: oneshot::Sender<Result<WriteResults, StoreError>>,
    ) {
        self.waiting.push((reply, deliveries.len()));
        self.deliveries.extend(deliveries);
        self.outcomes.extend(outcomes);
    }

    /// Commits what was gathered and answers every writer: its deliveries' results, or the
    /// error that left the whole transaction out.
    fn commit(&mut self, db: &mut Db) {
        if self.waiting.is_empty() {
            return;
        }
        let written = db.write(&self.deliveries, &self.outcomes);
        self.deliveries.clear();
        self.outcomes.clear();
        match written {
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
