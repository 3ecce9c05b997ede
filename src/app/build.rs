//! `Relay::build`: every part of a relay made from its settings, in order: the mappings and
//! the grant policy checked, the P0 client, the store opened, the listeners bound, then the
//! receiver, the worker and the answer loop around them. Nothing runs yet.

use std::sync::Arc;

use anyhow::{Context, anyhow};
use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::Notify;

use super::upkeep::{Retention, Sealing};
use super::{Built, Options, Relay};
use crate::answers::Answerer;
use crate::config::{InboundSettings, Settings, problems, warnings};
use crate::env::Env;
use crate::health::Health;
use crate::mapping::MappingSet;
use crate::metrics::Metrics;
use crate::oncall::Checker;
use crate::p0;
use crate::providers::Providers;
use crate::ratelimit::KeyedLimit;
use crate::receiver::{Budget, Receiver};
use crate::server::{self, ConnLimits};
use crate::store::{self, StoreHandle, StoreTask};
use crate::worker::Worker;

/// The listeners, bound.
struct Listeners {
    main: TcpListener,
    metrics: Option<TcpListener>,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Relay {
    /// Validates everything and builds every part around `store` without starting any: a
    /// test may hand in a store of its own (any `Store`, with its writer's task); `None`
    /// opens the one the settings name, once the rest has been validated.
    pub async fn build(
        settings: Settings,
        env: Env,
        opts: Options,
        store: Option<(StoreHandle, StoreTask)>,
    ) -> anyhow::Result<Built> {
        let mappings = checked_mappings(&settings, &env)?;
        let client = p0_client(&settings, &opts)?;
        let metrics = Metrics::new(mappings.mappings.keys().map(String::as_str))?;
        let (store, writer) = match store {
            Some(given) => given,
            None => open_store(&settings, &opts, &metrics).await?,
        };
        let listeners = bind(&settings).await?;
        let health = Arc::new(Health::new(opts.dry_run));
        let mappings = Arc::new(ArcSwap::from_pointee(mappings));
        let wake = Arc::new(Notify::new());
        store.wake_on_new_work(wake.clone());
        let receiver = Arc::new(Receiver {
            mappings: mappings.clone(),
            store: store.clone(),
            metrics: metrics.clone(),
            inbound: settings.inbound.clone(),
            limits: KeyedLimit::per_second(settings.inbound.rate_per_second, 2),
            wake: wake.clone(),
            health: health.clone(),
            store_payloads: settings.store.store_payloads,
            budget: body_budget(&settings.inbound, &metrics),
        });
        let answerer = answerer(&settings, &store, &metrics)?;
        let parts = Parts {
            settings: &settings,
            store: &store,
            metrics: &metrics,
        };
        let worker = parts.worker(client, &opts, wake, health, mappings, &answerer)?;
        Ok(Built {
            addr: listeners.main.local_addr()?,
            metrics_addr: listeners
                .metrics
                .as_ref()
                .map(|l| l.local_addr())
                .transpose()?,
            listener: listeners.main,
            metrics_listener: listeners.metrics,
            tls: listeners.tls,
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
                audit: settings.audit.retention,
            },
            sealing: Sealing {
                every: settings.audit.seal_interval,
                key: settings.audit.key.clone(),
            },
            limits: conn_limits(&settings.inbound, &metrics),
            opts,
        })
    }
}

/// What bodies not yet verified may hold together, and one sender's share of it.
fn body_budget(inbound: &InboundSettings, metrics: &Metrics) -> Arc<Budget> {
    Budget::new(
        inbound.body_budget_bytes,
        inbound.max_connections_per_address,
        Some(metrics.clone()),
    )
}

/// The webhook port's connection places and header deadlines.
fn conn_limits(inbound: &InboundSettings, metrics: &Metrics) -> ConnLimits {
    ConnLimits {
        max_connections: inbound.max_connections,
        // Behind a trusted proxy every connection comes from the proxy: the share applies to
        // the address it names, as bodies are read (`Budget`).
        per_address: match inbound.client_ip_header {
            None => Some(inbound.max_connections_per_address),
            Some(_) => None,
        },
        header_read_timeout: inbound.idle_timeout,
        max_header_bytes: inbound.max_header_bytes,
        metrics: Some(metrics.clone()),
    }
}

/// The mappings, loaded; refused when the grant policy they make with the settings would not
/// be safe to run (`config::problems`), warned about at every start (`config::warnings`).
fn checked_mappings(settings: &Settings, env: &Env) -> anyhow::Result<MappingSet> {
    let mappings = MappingSet::load(&settings.mappings_dir, env, &settings.defaults)
        .map_err(|errors| anyhow!("invalid mappings:\n  {}", errors.join("\n  ")))?;
    for warning in warnings(settings, &mappings) {
        tracing::warn!("{warning}");
    }
    let problems = problems(settings, &mappings);
    if !problems.is_empty() {
        return Err(anyhow!(
            "the relay would not be safe to run:\n  {}",
            problems.join("\n  ")
        ));
    }
    Ok(mappings)
}

/// P0's client; none in a dry run, and none without a token is an error.
fn p0_client(settings: &Settings, opts: &Options) -> anyhow::Result<Option<p0::Client>> {
    if opts.dry_run {
        tracing::warn!("dry run: decisions are recorded and logged, P0 is never called");
        return Ok(None);
    }
    let token = settings.p0.token.clone().ok_or_else(|| {
        anyhow!(
            "{}: p0.token is empty: set P0_API_TOKEN (or P0_API_TOKEN_FILE), or run with --dry-run",
            settings.file.display()
        )
    })?;
    let client = p0::Client::new(settings.p0.base_url.clone(), token, settings.p0.timeout)
        .map_err(|e| anyhow!(e))?;
    Ok(Some(client))
}

/// The store the settings name, opened (created or migrated), what a stop left in flight
/// queued again; each audit event it commits logged and counted.
async fn open_store(
    settings: &Settings,
    opts: &Options,
    metrics: &Metrics,
) -> anyhow::Result<(StoreHandle, StoreTask)> {
    let counted = metrics.audit_events.clone();
    let audit = store::audit::Sink::new(move |bodies| {
        for b in bodies {
            b.log();
            counted.with_label_values(&[b.event.as_str()]).inc();
        }
    });
    let store_settings = store::Settings {
        store_payloads: settings.store.store_payloads,
        claim_lease: settings.store.claim_lease,
        group_commit: opts.group_commit,
        audit,
        ..store::Settings::new(settings.store.windows())
    };
    store::open(&settings.store.location, &store_settings)
        .await
        .with_context(|| format!("cannot open the store at {}", settings.store.location))
}

/// The webhook listener (with its TLS), and the metrics listener when it has its own.
async fn bind(settings: &Settings) -> anyhow::Result<Listeners> {
    let main = server::listen(settings.listen)
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    let metrics = match settings.metrics_listen {
        Some(a) => Some(server::listen(a).with_context(|| format!("cannot listen on {a}"))?),
        None => None,
    };
    let tls = match &settings.inbound.tls {
        Some(t) => Some(server::tls_acceptor(&t.cert, &t.key).map_err(|e| anyhow!(e))?),
        None => None,
    };
    Ok(Listeners { main, metrics, tls })
}

/// The answer loop, through the providers whose token is set.
fn answerer(
    settings: &Settings,
    store: &StoreHandle,
    metrics: &Metrics,
) -> anyhow::Result<Answerer> {
    for off in &settings.answers.off {
        tracing::info!("{off}");
    }
    Ok(Answerer {
        store: store.clone(),
        providers: Providers::new(settings.answers.clone()).map_err(|e| anyhow!(e))?,
        pacing: Arc::new(KeyedLimit::per_second(settings.answers.rate_per_second, 1)),
        metrics: metrics.clone(),
        retry: settings.answers.retry.clone(),
        concurrency: settings.answers.concurrency,
        wake: Arc::new(Notify::new()),
    })
}

/// What the worker is built from.
struct Parts<'a> {
    settings: &'a Settings,
    store: &'a StoreHandle,
    metrics: &'a Metrics,
}

impl Parts<'_> {
    /// The worker: P0 calls paced per org, on-call checks before gated approves, answers back
    /// (none in a dry run) woken as outcomes bring them.
    fn worker(
        &self,
        client: Option<p0::Client>,
        opts: &Options,
        wake: Arc<Notify>,
        health: Arc<Health>,
        mappings: Arc<ArcSwap<MappingSet>>,
        answerer: &Answerer,
    ) -> anyhow::Result<Worker> {
        let settings = self.settings;
        let answers = &settings.answers;
        let oncall = Checker::new(answers.clone(), answers.oncall_cache, self.metrics.clone())
            .map_err(|e| anyhow!(e))?;
        Ok(Worker {
            store: self.store.clone(),
            client,
            pacing: Arc::new(KeyedLimit::per_second(settings.p0.rate_per_second, 1)),
            metrics: self.metrics.clone(),
            retry: settings.p0.retry.clone(),
            concurrency: settings.p0.concurrency,
            wake,
            health,
            answer_via: match opts.dry_run {
                true => Vec::new(),
                false => answerer.providers.enabled(),
            },
            answer_wake: answerer.wake.clone(),
            oncall: Arc::new(oncall),
            mappings,
            recheck_after: answers.oncall_recheck_after,
        })
    }
}
