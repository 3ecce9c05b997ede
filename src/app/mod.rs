//! Wiring: from validated settings to a running relay (`build`: the store, the listeners, the
//! receiver, the worker and the answer loop), every part started under supervision (`run`,
//! with the store's upkeep in `upkeep`), and an orderly stop. Tests start it on port 0 and
//! stop it at will.

mod build;
mod run;
mod upkeep;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::answers::Answerer;
use crate::config::Settings;
use crate::env::Env;
use crate::mapping::Defaults;
use crate::receiver::Receiver;
use crate::server::ConnLimits;
use crate::store::{StoreHandle, StoreTask};
use crate::supervise::Failure;
use crate::worker::Worker;
use upkeep::{Retention, Sealing};

/// How the relay runs, beyond its settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// Record and log decisions; call nothing upstream.
    pub dry_run: bool,
    /// One transaction for all deliveries waiting at once (off only to measure its worth).
    pub group_commit: bool,
    /// How long a stop waits for connections and P0 calls in flight.
    pub drain: Duration,
    /// How often the mappings folder is checked for changes.
    pub reload_poll: Duration,
    /// For tests of supervision: the component of this name panics as it starts.
    #[doc(hidden)]
    pub panic_in: Option<&'static str>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            dry_run: false,
            group_commit: true,
            drain: Duration::from_secs(10),
            reload_poll: Duration::from_secs(1),
            panic_in: None,
        }
    }
}

/// Every part of a relay, built and bound to its addresses, nothing running yet
/// (`Relay::build`); `run` starts it.
pub struct Built {
    pub addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    receiver: Arc<Receiver>,
    worker: Worker,
    answerer: Answerer,
    store: StoreHandle,
    writer: StoreTask,
    env: Env,
    defaults: Defaults,
    /// How long finished decisions, subject ends and audit events are kept.
    retention: Retention,
    /// How often the audit trail is sealed, and with what key.
    sealing: Sealing,
    limits: ConnLimits,
    opts: Options,
}

/// A running relay.
pub struct Relay {
    pub addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    done: JoinHandle<Result<(), Failure>>,
}

/// A component that has no error of its own to report.
async fn ok_when_done(task: impl Future<Output = ()>) -> Result<(), String> {
    task.await;
    Ok(())
}

impl Relay {
    /// Validates everything, opens the store, binds the listeners and starts serving.
    pub async fn start(settings: Settings, env: Env, opts: Options) -> anyhow::Result<Relay> {
        Ok(Relay::build(settings, env, opts, None).await?.run())
    }

    /// A token that stops the relay when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until the relay has stopped: `Err` when it stopped because a part of it failed
    /// (the process should then exit non-zero).
    pub async fn wait(self) -> Result<(), Failure> {
        match self.done.await {
            Ok(result) => result,
            Err(e) => Err(Failure {
                component: "supervisor".into(),
                reason: format!("ended abnormally: {e}"),
            }),
        }
    }

    /// Stops the relay and waits for it; a failure on the way is logged.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.wait().await;
    }
}
