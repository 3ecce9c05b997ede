//! Giving the memory a storm took back to the system once it has passed. The allocator
//! keeps memory its threads freed for their next allocations; after a storm of bodies that
//! is memory nobody needs. When the body budget has been busy and is quiet again
//! (`watch_storms`), each runtime thread hands its free memory back the next time it is idle
//! (`on_thread_park`, which costs one atomic load when there is nothing to do).

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::receiver::Budget;

/// Bumped when memory should be given back; each thread remembers the last it acted on.
static WANTED: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static DONE: Cell<u64> = const { Cell::new(0) };
}

/// Asks every runtime thread to give its free memory back when next idle, and does so for
/// the calling thread now.
pub fn give_back() {
    WANTED.fetch_add(1, Ordering::Relaxed);
    on_thread_park();
}

/// The runtime's `on_thread_park` hook.
pub fn on_thread_park() {
    let wanted = WANTED.load(Ordering::Relaxed);
    DONE.with(|done| {
        if done.get() != wanted {
            done.set(wanted);
            // SAFETY: mi_collect only returns free memory of the calling thread and of the
            // allocator's shared arenas; it may be called at any time. Where mimalloc is not
            // the global allocator (the library's tests) it has nothing to give back.
            unsafe { libmimalloc_sys::mi_collect(true) };
        }
    });
}

/// How often the budget is looked at.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// Gives memory back after each storm: when at least an eighth of the body budget was held
/// and no more than a sixteenth is now.
pub async fn watch_storms(budget: Arc<Budget>, shutdown: CancellationToken) {
    let mut stormy = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(WATCH_EVERY) => {}
        }
        stormy |= budget.peak_since() >= budget.total() / 8;
        if stormy && budget.in_use() <= budget.total() / 16 {
            stormy = false;
            give_back();
        }
    }
}
