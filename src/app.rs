//! Wiring: from validated settings to a running relay (listeners, store, worker, reloader),
//! and an orderly stop. Tests start it on port 0 and stop it at will.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, anyhow};
use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::answers::{self, Answerer};
use crate::config::env::Env;
use crate::config::{Settings, audit};
use crate::health::Health;
use crate::mapping::{Defaults, MappingSet};
use crate::metrics::Metrics;
use crate::p0;
use crate::ratelimit::KeyedLimit;
use crate::receiver::{self, Receiver};
use crate::server::{self, ConnLimits};
use crate::store::{self, StoreHandle, Windows, now_ms};
use crate::worker::Worker;

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
}

impl Default for Options {
    fn default() -> Self {
        Options {
            dry_run: false,
            group_commit: true,
            drain: Duration::from_secs(10),
            reload_poll: Duration::from_secs(1),
        }
    }
}

/// A running relay.
pub struct Relay {
    pub addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    done: JoinHandle<()>,
}

impl Relay {
    /// Validates everything, opens the store, binds the listeners and starts serving.
    pub async fn start(settings: Settings, env: Env, opts: Options) -> anyhow::Result<Relay> {
        let mappings = MappingSet::load(&settings.mappings_dir, &env, &settings.defaults)
            .map_err(|errors| anyhow!("invalid mappings:\n  {}", errors.join("\n  ")))?;
        for warning in audit(&settings, &mappings) {
            tracing::warn!("{warning}");
        }
        let client = if opts.dry_run {
            tracing::warn!("dry run: decisions are recorded and logged, P0 is never called");
            None
        } else {
            let token = settings.p0.token.clone().ok_or_else(|| {
                anyhow!(
                    "{}: p0.token is empty: set P0_API_TOKEN (or P0_API_TOKEN_FILE), or run with --dry-run",
                    settings.file.display()
                )
            })?;
            Some(
                p0::Client::new(settings.p0.base_url.clone(), token, settings.p0.timeout)
                    .map_err(|e| anyhow!(e))?,
            )
        };
        let (store, writer) = store::open(
            &settings.store.location,
            Windows {
                dedup: settings.store.dedup_window,
                coalesce: settings.store.coalesce_window,
            },
            settings.store.store_payloads,
            settings.store.claim_lease,
            opts.group_commit,
        )
        .await
        .with_context(|| format!("cannot open the store at {}", settings.store.location))?;

        let metrics = Metrics::new(mappings.mappings.keys().map(String::as_str))?;
        let listener = TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("cannot listen on {}", settings.listen))?;
        let addr = listener.local_addr()?;
        let metrics_listener = match settings.metrics_listen {
            Some(a) => Some(
                TcpListener::bind(a)
                    .await
                    .with_context(|| format!("cannot listen on {a}"))?,
            ),
            None => None,
        };
        let metrics_addr = metrics_listener
            .as_ref()
            .map(|l| l.local_addr())
            .transpose()?;
        let tls = match &settings.inbound.tls {
            Some(t) => Some(server::tls_acceptor(&t.cert, &t.key).map_err(|e| anyhow!(e))?),
            None => None,
        };

        for off in &settings.answers.off {
            tracing::info!("{off}");
        }
        let answer_client =
            answers::Client::new(settings.answers.clone()).map_err(|e| anyhow!(e))?;
        let answer_via = if opts.dry_run {
            Vec::new()
        } else {
            answer_client.enabled()
        };
        let answer_wake = Arc::new(Notify::new());
        let wake = Arc::new(Notify::new());
        store.wake_on_new_work(wake.clone());
        let health = Arc::new(Health::default());
        let receiver = Arc::new(Receiver {
            mappings: Arc::new(ArcSwap::from_pointee(mappings)),
            store: store.clone(),
            metrics: metrics.clone(),
            inbound: settings.inbound.clone(),
            limits: KeyedLimit::per_second(settings.inbound.rate_per_second, 2),
            wake: wake.clone(),
            health: health.clone(),
            store_payloads: settings.store.store_payloads,
        });
        let shutdown = CancellationToken::new();
        let worker = Worker {
            store: store.clone(),
            client,
            pacing: Arc::new(KeyedLimit::per_second(settings.p0.rate_per_second, 1)),
            metrics: metrics.clone(),
            retry: settings.p0.retry.clone(),
            concurrency: settings.p0.concurrency,
            wake,
            health,
            answer_via,
            answer_wake: answer_wake.clone(),
        };
        let answerer = Answerer {
            store: store.clone(),
            client: answer_client,
            pacing: Arc::new(KeyedLimit::per_second(settings.answers.rate_per_second, 1)),
            metrics: metrics.clone(),
            retry: settings.answers.retry.clone(),
            concurrency: settings.answers.concurrency,
            wake: answer_wake,
        };
        let limits = ConnLimits {
            max_connections: settings.inbound.max_connections,
            header_read_timeout: settings.inbound.read_timeout,
            max_header_bytes: settings.inbound.max_header_bytes,
        };
        let main_server = tokio::spawn(server::serve(
            listener,
            receiver::router(receiver.clone(), metrics_listener.is_none()),
            limits.clone(),
            tls,
            shutdown.clone(),
            opts.drain,
        ));
        let metrics_server = metrics_listener.map(|l| {
            tokio::spawn(server::serve(
                l,
                receiver::metrics_router(receiver.clone()),
                limits,
                None,
                shutdown.clone(),
                opts.drain,
            ))
        });
        let worker = tokio::spawn(worker.run(shutdown.clone(), opts.drain));
        let answerer = tokio::spawn(answerer.run(shutdown.clone(), opts.drain));
        let reloader = tokio::spawn(reload_loop(
            receiver.clone(),
            env,
            settings.defaults.clone(),
            opts.reload_poll,
            shutdown.clone(),
        ));
        let pruner = tokio::spawn(prune_loop(
            store.clone(),
            settings.store.dedup_window,
            shutdown.clone(),
        ));
        tracing::info!(%addr, sources = ?receiver.mappings.load().mappings.keys().collect::<Vec<_>>(), "relay listening");

        let done = tokio::spawn(async move {
            let _ = main_server.await;
            if let Some(m) = metrics_server {
                let _ = m.await;
            }
            let _ = worker.await;
            let _ = answerer.await;
            let _ = reloader.await;
            let _ = pruner.await;
            // The writer ends once every handle is gone and the queue is drained.
            drop(receiver);
            drop(store);
            writer.join().await;
            tracing::info!("relay stopped");
        });
        Ok(Relay {
            addr,
            metrics_addr,
            shutdown,
            done,
        })
    }

    /// A token that stops the relay when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until the relay has stopped.
    pub async fn wait(self) {
        let _ = self.done.await;
    }

    /// Stops the relay and waits for it.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.wait().await;
    }
}

/// Compiles the mappings folder again and swaps the new set in whole; on any error the old
/// set stays and every error is logged with its file and rule.
pub fn reload(receiver: &Receiver, env: &Env, defaults: &Defaults) -> Result<(), Vec<String>> {
    let dir = receiver.mappings.load().dir.clone();
    match MappingSet::load(&dir, env, defaults) {
        Ok(set) => {
            receiver
                .metrics
                .add_sources(set.mappings.keys().map(String::as_str));
            let sources: Vec<String> = set.mappings.keys().cloned().collect();
            receiver.mappings.store(Arc::new(set));
            receiver
                .metrics
                .mapping_reloads
                .with_label_values(&["success"])
                .inc();
            receiver.health.set_reload_error(None);
            tracing::info!(?sources, "mappings reloaded");
            Ok(())
        }
        Err(errors) => {
            receiver
                .metrics
                .mapping_reloads
                .with_label_values(&["error"])
                .inc();
            for e in &errors {
                tracing::error!("mapping reload failed, previous mappings kept: {e}");
            }
            receiver.health.set_reload_error(Some(errors.join("; ")));
            Err(errors)
        }
    }
}

type Fingerprint = Vec<(String, u64, Option<SystemTime>)>;

fn fingerprint(dir: &Path) -> Fingerprint {
    let mut out: Fingerprint = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            Some((
                e.file_name().to_string_lossy().into_owned(),
                meta.len(),
                meta.modified().ok(),
            ))
        })
        .collect();
    out.sort();
    out
}

async fn reload_loop(
    receiver: Arc<Receiver>,
    env: Env,
    defaults: Defaults,
    poll: Duration,
    shutdown: CancellationToken,
) {
    let dir = receiver.mappings.load().dir.clone();
    let mut last = fingerprint(&dir);
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let hangup = async {
            match hup.as_mut() {
                Some(s) => s.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hangup = std::future::pending::<Option<()>>();
        let forced = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = hangup => true,
            _ = tokio::time::sleep(poll) => false,
        };
        let now = fingerprint(&dir);
        if forced || now != last {
            last = now;
            let _ = reload(&receiver, &env, &defaults);
        }
    }
}

async fn prune_loop(store: StoreHandle, retention: Duration, shutdown: CancellationToken) {
    loop {
        match store.prune(now_ms() - retention.as_millis() as i64).await {
            Ok(n) if n > 0 => tracing::info!(
                rows = n,
                "pruned finished decisions past the retention window"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "prune failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
        }
    }
}
