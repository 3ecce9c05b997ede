//! The shared store: PostgreSQL, for any number of relays on one database. A batch of
//! deliveries and attempt outcomes is one transaction and one round trip (the function
//! `p0_relay_write`, in `functions/`, deduplicates, coalesces and records on the server).
//! Claims take rows with `FOR UPDATE SKIP LOCKED` under a lease and a claim token; new work
//! is announced with NOTIFY on commit. A file per concern; the SQL of the schema in `.sql`
//! files (`schema.rs`).

mod answers;
mod audit;
mod inspect;
mod jobs;
mod leases;
mod listen;
mod schema;
pub mod tls;
mod upkeep;
mod writer;

use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio::sync::mpsc;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::error::chain;
use super::location::PgLocation;
use super::model::{Claim, Claimable, Clock, Windows, ms, token};
use super::{Settings, StoreError, StoreTask};

/// The channel new work is announced on.
pub const CHANNEL: &str = "p0_relay_jobs";

/// Connections per relay: batch writers, the worker's claims and renewals, gauges, probes.
const POOL_SIZE: usize = 10;
/// The longest any one operation may take before the database counts as unreachable.
const OP_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A PostgreSQL store as the relay holds it: the database and the queue to its batch writer.
pub struct PgStore {
    db: Arc<Pg>,
    writes: mpsc::Sender<super::batch::Write>,
    /// The LISTEN connection's task, stopped with the store.
    listener: std::sync::Mutex<Option<tokio::task::AbortHandle>>,
}

/// The connection pool and the settings every relay on the database must share.
pub(crate) struct Pg {
    pool: Pool,
    location: PgLocation,
    tls: MakeRustlsConnect,
    windows: Windows,
    store_payloads: bool,
    lease: Duration,
    clock: Clock,
    /// Where committed audit events go.
    audit: super::audit::Sink,
    last_expiry_ms: AtomicI64,
    last_statistics_ms: AtomicI64,
}

impl PgStore {
    /// Connects (lazily, through the pool), migrates the schema under an advisory lock (so
    /// any number of relays may start at once), and starts the batch writer; its task ends
    /// once every handle on the store is gone and its queue is drained.
    pub async fn open(
        location: &PgLocation,
        settings: &Settings,
    ) -> Result<(PgStore, StoreTask), StoreError> {
        let tls = tls::connector(&location.verify).map_err(StoreError::Setup)?;
        let db = Arc::new(Pg {
            pool: pool(location, tls.clone())?,
            location: location.clone(),
            tls,
            windows: settings.windows,
            store_payloads: settings.store_payloads,
            lease: settings.claim_lease,
            clock: settings.clock.clone(),
            audit: settings.audit.clone(),
            last_expiry_ms: AtomicI64::new(i64::MIN),
            last_statistics_ms: AtomicI64::new(i64::MIN),
        });
        db.migrate().await?;
        let (max, queue_len) = super::batch::sizes(settings.group_commit);
        let (writes, queue) = mpsc::channel(queue_len);
        let task = tokio::spawn(writer::run(db.clone(), queue, max));
        let store = PgStore {
            db,
            writes,
            listener: std::sync::Mutex::new(None),
        };
        Ok((store, StoreTask::Task(task)))
    }

    pub fn location(&self) -> &PgLocation {
        &self.db.location
    }

    pub fn lease(&self) -> Duration {
        self.db.lease
    }

    /// A pooled connection, for tests that look at the session itself.
    #[cfg(test)]
    pub(crate) async fn client(&self) -> Result<Object, StoreError> {
        self.db.client().await
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        if let Ok(mut slot) = self.listener.lock()
            && let Some(h) = slot.take()
        {
            h.abort();
        }
    }
}

/// The pool, with a session setting every connection carries.
fn pool(location: &PgLocation, tls: MakeRustlsConnect) -> Result<Pool, StoreError> {
    let mut config = location.connect_config();
    config.connect_timeout(CONNECT_TIMEOUT);
    if config.get_application_name().is_none() {
        config.application_name("p0-relay");
    }
    // A relay cut off mid-transaction must not hold its locks (delivery keys, coalescing
    // locks) until the server notices the dead connection: it gives them up after this.
    const SESSION: &str = "-c idle_in_transaction_session_timeout=15s";
    let options = match config.get_options() {
        Some(o) => format!("{o} {SESSION}"),
        None => SESSION.to_owned(),
    };
    config.options(options);
    let manager = Manager::from_config(
        config,
        tls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(POOL_SIZE)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(OP_TIMEOUT))
        .create_timeout(Some(CONNECT_TIMEOUT))
        .recycle_timeout(Some(CONNECT_TIMEOUT))
        .build()
        .map_err(|e| StoreError::Setup(format!("PostgreSQL pool: {e}")))
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("PostgreSQL {what}: {e}"))
}

impl Pg {
    fn now(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Runs a claim (`sql`: $1 now, $2 how many, $3 until when the lease runs) and reads
    /// what it took, in ID order.
    async fn claim<T: Claimable>(
        &self,
        what: &str,
        sql: &str,
        limit: usize,
        read: impl Fn(&tokio_postgres::Row) -> Result<Claim<T>, StoreError>,
    ) -> Result<Vec<Claim<T>>, StoreError> {
        let now = self.now();
        let lease_until = now.saturating_add(ms(self.lease));
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .run(what, OP_TIMEOUT, async |c| {
                let stmt = c.prepare_cached(sql).await?;
                c.query(&stmt, &[&now, &limit, &lease_until]).await
            })
            .await?;
        let mut claimed = rows.iter().map(read).collect::<Result<Vec<_>, _>>()?;
        claimed.sort_by_key(|c| token(c).0);
        Ok(claimed)
    }

    async fn client(&self) -> Result<Object, StoreError> {
        self.pool
            .get()
            .await
            .map_err(|e| unavailable("unreachable", chain(&e)))
    }

    /// Runs `work` on a pooled connection within `limit`. A connection that failed or timed
    /// out is closed rather than returned to the pool with a statement still running on it;
    /// an error the server answered refuses this input only.
    async fn run<T>(
        &self,
        what: &str,
        limit: Duration,
        work: impl AsyncFnOnce(&mut Object) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, StoreError> {
        let mut client = self.client().await?;
        match tokio::time::timeout(limit, work(&mut client)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => match StoreError::from(e) {
                StoreError::Unavailable(why) => {
                    drop(Object::take(client));
                    Err(unavailable(what, why))
                }
                other => Err(other),
            },
            Err(_) => {
                drop(Object::take(client));
                Err(unavailable(
                    what,
                    format!("no answer within {}s", limit.as_secs_f64()),
                ))
            }
        }
    }
}
