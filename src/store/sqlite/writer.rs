//! The thread that owns the SQLite connection. It takes everything waiting at once: the
//! writes go into one transaction and one sync (group commit), each writer getting its own
//! deliveries' results back; then every other operation runs, in the order it came. The audit
//! events each committed go to the sink after its callers are answered.

use tokio::sync::mpsc;

use super::Db;
use crate::store::batch::{Batch, Write};

/// What the writer thread is asked to do.
pub(super) enum Task {
    /// Deliveries and outcomes to commit, in a transaction shared with the other writes
    /// waiting.
    Write(Write),
    /// Any other operation: it answers through a channel of its own.
    Run(Box<dyn FnOnce(&mut Db) + Send>),
}

/// Serves `queue` until every sender is gone and it is drained.
pub(super) fn run(mut db: Db, mut queue: mpsc::Receiver<Task>, max_batch: usize) {
    let mut batch = Batch::default();
    let mut others = Vec::new();
    while let Some(first) = queue.blocking_recv() {
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(task) = next.take() {
            match task {
                Task::Write(w) => {
                    taken += w.size();
                    batch.add(w);
                }
                Task::Run(op) => {
                    taken += 1;
                    others.push(op);
                }
            }
            if taken < max_batch {
                next = queue.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            let committed = db.write(&batch.deliveries, &batch.outcomes, &batch.events);
            batch.answer(committed);
            db.flush_audit();
        }
        for op in others.drain(..) {
            op(&mut db);
            db.flush_audit();
        }
    }
}
