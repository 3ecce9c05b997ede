//! Wiring: from validated settings to a running relay (listeners, store, worker, reloader),
//! and an orderly stop. Tests start it on port 0 and stop it at will.

use std::future::Future;
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

use crate::answers::Answerer;
use crate::config::{Settings, audit};
use crate::env::Env;
use crate::health::Health;
use crate::mapping::{Defaults, MappingSet};
use crate::metrics::Metrics;
use crate::p0;
use crate::ratelimit::KeyedLimit;
use crate::receiver::{self, Receiver};
use crate::retry::saturating_i64;
use crate::server::{self, ConnLimits};
use crate::store::{self, Prune, StoreHandle, StoreTask, ms, now_ms};
use crate::supervise::{Components, Failure};
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
    /// How long finished decisions, and subject ends, are kept.
    retention: Retention,
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

    /// Validates everything and builds every part around `store` without starting any: a
    /// test may hand in a store of its own (`StoreHandle::spawn` over any `Store`); `None`
    /// opens the one the settings name, once the rest has been validated.
    pub async fn build(
        settings: Settings,
        env: Env,
        opts: Options,
        store: Option<(StoreHandle, StoreTask)>,
    ) -> anyhow::Result<Built> {
        let mappings = MappingSet::load(&settings.mappings_dir, &env, &settings.defaults)
            .map_err(|errors| anyhow!("invalid mappings:\n  {}", errors.join("\n  ")))?;
        for warning in audit(&settings, &mappings) {
            tracing::warn!("{warning}");
        }
        let problems = crate::config::problems(&settings, &mappings);
        if !problems.is_empty() {
            return Err(anyhow!(
                "the relay would not be safe to run:\n  {}",
                problems.join("\n  ")
            ));
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
        let (store, writer) = match store {
            Some(given) => given,
            None => store::open(
                &settings.store.location,
                &store::Settings {
                    store_payloads: settings.store.store_payloads,
                    claim_lease: settings.store.claim_lease,
                    group_commit: opts.group_commit,
                    ..store::Settings::new(settings.store.windows())
                },
            )
            .await
            .with_context(|| format!("cannot open the store at {}", settings.store.location))?,
        };

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
            crate::providers::Providers::new(settings.answers.clone()).map_err(|e| anyhow!(e))?;
        let answer_via = if opts.dry_run {
            Vec::new()
        } else {
            answer_client.enabled()
        };
        let answer_wake = Arc::new(Notify::new());
        let wake = Arc::new(Notify::new());
        store.wake_on_new_work(wake.clone());
        let health = Arc::new(Health::new(opts.dry_run));
        let mappings = Arc::new(ArcSwap::from_pointee(mappings));
        let receiver = Arc::new(Receiver {
            mappings: mappings.clone(),
            store: store.clone(),
            metrics: metrics.clone(),
            inbound: settings.inbound.clone(),
            limits: KeyedLimit::per_second(settings.inbound.rate_per_second, 2),
            wake: wake.clone(),
            health: health.clone(),
            store_payloads: settings.store.store_payloads,
        });
        let oncall = Arc::new(
            crate::oncall::Checker::new(
                settings.answers.clone(),
                settings.answers.oncall_cache,
                metrics.clone(),
            )
            .map_err(|e| anyhow!(e))?,
        );
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
            oncall,
            mappings,
            recheck_after: settings.answers.oncall_recheck_after,
        };
        let answerer = Answerer {
            store: store.clone(),
            providers: answer_client,
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
        Ok(Built {
            addr,
            metrics_addr,
            listener,
            metrics_listener,
            tls,
            receiver,
            worker,
            answerer,
            store,
            writer,
            env,
            defaults: settings.defaults.clone(),
            retention: Retention {
                finished: settings.store.dedup_window,
                ends: settings.store.subject_end_window,
            },
            limits,
            opts,
        })
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

impl Built {
    /// Starts every part under supervision and serves.
    pub fn run(self) -> Relay {
        let Built {
            addr,
            metrics_addr,
            listener,
            metrics_listener,
            tls,
            receiver,
            worker,
            answerer,
            store,
            writer,
            env,
            defaults,
            retention,
            limits,
            opts,
        } = self;
        let shutdown = CancellationToken::new();
        let mut components = Components::new(opts.panic_in);
        let main_server = server::serve(
            listener,
            receiver::router(receiver.clone(), metrics_listener.is_none()),
            limits.clone(),
            tls,
            shutdown.clone(),
            opts.drain,
        );
        components.spawn("server", ok_when_done(main_server));
        if let Some(l) = metrics_listener {
            let metrics_server = server::serve(
                l,
                receiver::metrics_router(receiver.clone()),
                limits,
                None,
                shutdown.clone(),
                opts.drain,
            );
            components.spawn("metrics-server", ok_when_done(metrics_server));
        }
        components.spawn(
            "worker",
            ok_when_done(worker.run(shutdown.clone(), opts.drain)),
        );
        components.spawn(
            "answerer",
            ok_when_done(answerer.run(shutdown.clone(), opts.drain)),
        );
        components.spawn(
            "reloader",
            ok_when_done(reload_loop(
                receiver.clone(),
                env,
                defaults,
                opts.reload_poll,
                shutdown.clone(),
            )),
        );
        components.spawn(
            "store-probe",
            ok_when_done(probe_loop(
                store.clone(),
                receiver.health.clone(),
                shutdown.clone(),
            )),
        );
        components.spawn(
            "store-upkeep",
            ok_when_done(upkeep_loop(store.clone(), shutdown.clone())),
        );
        components.spawn(
            "gauges",
            ok_when_done(gauge_loop(
                store.clone(),
                receiver.metrics.clone(),
                shutdown.clone(),
            )),
        );
        components.spawn(
            "pruner",
            ok_when_done(prune_loop(store.clone(), retention, shutdown.clone())),
        );
        // The writer thread ends once every handle is gone (every component above has ended)
        // and its queue is drained.
        match writer {
            StoreTask::Thread(thread) => components.watch_thread("store-writer", thread),
            StoreTask::Task(task) => components.spawn("store-writer", async move {
                task.await.map_err(|e| format!("ended abnormally: {e}"))
            }),
        }
        tracing::info!(%addr, sources = ?receiver.mappings.load().mappings.keys().collect::<Vec<_>>(), "relay listening");

        let health = receiver.health.clone();
        drop(receiver);
        drop(store);
        let stopping = shutdown.clone();
        let done = tokio::spawn(async move {
            let result = components.run(stopping, &health).await;
            match &result {
                Ok(()) => tracing::info!("relay stopped"),
                Err(failure) => tracing::error!(%failure, "relay stopped after a failure"),
            }
            result
        });
        Relay {
            addr,
            metrics_addr,
            shutdown,
            done,
        }
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

/// How often the store is probed for `/readyz`.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How long a probe may wait for the store before the store counts as not answering.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Keeps the store flag of `/readyz` true to the present: set when a probe fails or does not
/// come back in time, cleared by the next probe that succeeds (the receiver also sets it when
/// an accept fails, so readiness drops at once rather than at the next probe).
async fn probe_loop(store: StoreHandle, health: Arc<Health>, shutdown: CancellationToken) {
    let mut failing = false;
    loop {
        let probe = store.probe();
        tokio::pin!(probe);
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = &mut probe => r.map_err(|e| e.to_string()),
            _ = tokio::time::sleep(PROBE_TIMEOUT) => {
                health.set_store_error(Some(format!(
                    "the store has not answered for {} s", PROBE_TIMEOUT.as_secs()
                )));
                // Wait for this probe rather than queue more behind it.
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = &mut probe => r.map_err(|e| e.to_string()),
                }
            }
        };
        match result {
            Ok(()) => {
                if failing {
                    tracing::info!("the store takes writes again: ready");
                }
                failing = false;
                health.set_store_error(None);
            }
            Err(e) => {
                if !failing {
                    tracing::error!(error = %e, "the store cannot take writes: not ready");
                }
                failing = true;
                health.set_store_error(Some(e));
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(PROBE_EVERY) => {}
        }
    }
}

/// Runs `turn` now and then every `period` until `shutdown`.
async fn every<F: Future<Output = ()>>(
    period: Duration,
    shutdown: CancellationToken,
    mut turn: impl FnMut() -> F,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            () = turn() => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
    }
}

/// The store's upkeep every few seconds (PostgreSQL: the jobs table's planner statistics).
async fn upkeep_loop(store: StoreHandle, shutdown: CancellationToken) {
    every(Duration::from_secs(5), shutdown, || async {
        if let Err(e) = store.upkeep().await {
            tracing::warn!(error = %e, "store upkeep failed");
        }
    })
    .await
}

/// The queue's gauges (decisions waiting, dead), kept current every second.
async fn gauge_loop(store: StoreHandle, metrics: Metrics, shutdown: CancellationToken) {
    every(Duration::from_secs(1), shutdown, || async {
        if let Ok(c) = store.counts().await {
            metrics.queue_depth.set(saturating_i64(c.pending));
            metrics.dead_letters.set(saturating_i64(c.dead));
        }
    })
    .await
}

/// What the pruner keeps: finished decisions for the dedup window, subject ends for theirs.
#[derive(Clone, Copy)]
struct Retention {
    finished: Duration,
    ends: Duration,
}

async fn prune_loop(store: StoreHandle, retention: Retention, shutdown: CancellationToken) {
    every(Duration::from_secs(3600), shutdown, || async {
        let now = now_ms();
        let before = Prune {
            finished_before_ms: now.saturating_sub(ms(retention.finished)),
            ends_before_ms: now.saturating_sub(ms(retention.ends)),
        };
        match store.prune(before).await {
            Ok(n) if n > 0 => tracing::info!(
                rows = n,
                "pruned finished decisions and subject ends past their retention windows"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "prune failed"),
        }
    })
    .await
}
