//! Durable deliveries and decisions behind one interface (`Store`, in `api.rs`), implemented
//! by SQLite (`sqlite/`: one file, a thread that commits everything waiting in one
//! transaction and one sync) and PostgreSQL (`postgres/`: any number of relays on one
//! database, a batch one round trip). `StoreHandle` is the relay's shared handle on either.

pub mod api;
pub mod audit;
mod batch;
mod error;
pub mod location;
pub mod model;
pub mod postgres;
mod rows;
pub(crate) mod rules;
pub mod sqlite;
#[cfg(test)]
pub(crate) mod tests;

use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

pub use api::{Answers, Audit, Inspection, Jobs, Leases, Store, Upkeep, WriteResults};
pub use batch::Parts;
pub use error::StoreError;
pub use location::{PgLocation, StoreLocation};
pub use model::*;
pub use postgres::PgStore;
pub use rules::{ended_reason, unbound_reason};
pub use sqlite::SqliteStore;

/// How a store is opened: the windows that decide what is the same, what it keeps, how long
/// a claim's lease lasts (PostgreSQL), whether writes share transactions, and its clock.
#[derive(Clone, Debug)]
pub struct Settings {
    pub windows: Windows,
    pub store_payloads: bool,
    pub claim_lease: Duration,
    /// Off, every write gets its own transaction (for comparison in benchmarks).
    pub group_commit: bool,
    pub clock: Clock,
    /// What is done with audit events once committed.
    pub audit: audit::Sink,
}

impl Settings {
    pub fn new(windows: Windows) -> Settings {
        Settings {
            windows,
            store_payloads: false,
            claim_lease: Duration::from_secs(30),
            group_commit: true,
            clock: Clock::system(),
            audit: audit::Sink::default(),
        }
    }
}

/// The relay's handle on its store: cheap to clone, shared by the receiver, the worker, the
/// answers and the command line.
#[derive(Clone)]
pub struct StoreHandle(Arc<dyn Store>);

impl Deref for StoreHandle {
    type Target = dyn Store;

    fn deref(&self) -> &(dyn Store + 'static) {
        &*self.0
    }
}

impl StoreHandle {
    pub fn new(store: impl Store + 'static) -> StoreHandle {
        StoreHandle(Arc::new(store))
    }

    /// Stores one delivery.
    pub async fn accept(&self, d: NewDelivery) -> Result<Accepted, StoreError> {
        let mut results = self.write(vec![d], Vec::new()).await?;
        results.pop().unwrap_or(Err(StoreError::Closed))
    }

    /// Stores several deliveries (the elements of one webhook) in one write. The first error
    /// is returned; the others are stored, and a retry finds them duplicates.
    pub async fn accept_each(&self, ds: Vec<NewDelivery>) -> Result<Vec<Accepted>, StoreError> {
        self.write(ds, Vec::new()).await?.into_iter().collect()
    }

    /// Records one attempt's outcome.
    pub async fn record(&self, outcome: AttemptRecord) -> Result<(), StoreError> {
        self.write(Vec::new(), vec![outcome]).await.map(drop)
    }

    /// What lies ahead of a claim of jobs that took every one due, when the claim did not
    /// say. `waited_on` first, then `next_job_due`: a job that ends between the two is either
    /// listed (its end sends the worker back) or already over (its follower is due).
    pub async fn jobs_ahead(&self) -> Ahead {
        let waited_on = self.waited_on().await;
        Ahead::from(self.next_job_due().await, waited_on)
    }

    /// What lies ahead of a claim of answers that took every one due.
    pub async fn answers_ahead(&self) -> Ahead {
        Ahead::from(self.next_answer_due().await, Ok(Vec::new()))
    }
}

/// What keeps a store's writer running; `join` waits for it to finish once every handle is
/// gone and its queue is drained.
pub enum StoreTask {
    Thread(std::thread::JoinHandle<()>),
    Task(tokio::task::JoinHandle<()>),
}

impl StoreTask {
    pub async fn join(self) {
        match self {
            StoreTask::Thread(t) => {
                let _ = tokio::task::spawn_blocking(move || t.join()).await;
            }
            StoreTask::Task(t) => {
                let _ = t.await;
            }
        }
    }
}

/// Opens the store at `location` for a relay (creating or migrating it), returns decisions
/// left in flight by a stop to pending, and starts its writer.
pub async fn open(
    location: &StoreLocation,
    settings: &Settings,
) -> Result<(StoreHandle, StoreTask), StoreError> {
    let (store, task) = open_at(location, settings).await?;
    let resumed = store.recover().await?;
    if resumed > 0 {
        tracing::warn!(
            resumed,
            "decisions in flight at the last stop are queued again"
        );
    }
    Ok((store, task))
}

/// Opens the store for inspection (`p0-relay jobs`): nothing in flight is touched, so relays
/// running on the same store go on undisturbed.
pub async fn inspect(
    location: &StoreLocation,
    windows: Windows,
) -> Result<(StoreHandle, StoreTask), StoreError> {
    open_at(location, &Settings::new(windows)).await
}

async fn open_at(
    location: &StoreLocation,
    settings: &Settings,
) -> Result<(StoreHandle, StoreTask), StoreError> {
    match location {
        StoreLocation::Sqlite(path) => {
            let (store, task) = SqliteStore::open(path, settings)?;
            Ok((StoreHandle::new(store), task))
        }
        StoreLocation::Postgres(pg) => {
            let (store, task) = PgStore::open(pg, settings).await?;
            Ok((StoreHandle::new(store), task))
        }
    }
}
