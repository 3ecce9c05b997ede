//! The store's upkeep while the relay runs: probed every second for `/readyz`, its gauges kept
//! current, its planner statistics (PostgreSQL) fresh, what is past its retention pruned, and
//! its audit trail sealed.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::ok_when_done;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::retry::saturating_i64;
use crate::secret::Secret;
use crate::store::audit::{NotSealed, Sealer};
use crate::store::{Prune, StoreHandle, ms, now_ms};
use crate::supervise::Components;

/// Spawns every upkeep loop on `store`. `writing` closes once every part that writes audit
/// events has stopped: the seal loop seals once more after that.
pub(super) fn spawn(
    components: &mut Components,
    store: &StoreHandle,
    health: Arc<Health>,
    metrics: Metrics,
    (retention, sealing): (Retention, Sealing),
    writing: mpsc::Receiver<()>,
    shutdown: &CancellationToken,
) {
    let probe = probe_loop(store.clone(), health, shutdown.clone());
    components.spawn("store-probe", ok_when_done(probe));
    let upkeep = upkeep_loop(store.clone(), shutdown.clone());
    components.spawn("store-upkeep", ok_when_done(upkeep));
    let gauges = gauge_loop(store.clone(), metrics.clone(), shutdown.clone());
    components.spawn("gauges", ok_when_done(gauges));
    let key = sealing.key.clone();
    let seals = seal_loop(store.clone(), sealing, metrics, writing, shutdown.clone());
    components.spawn("sealer", ok_when_done(seals));
    let prune = prune_loop(store.clone(), retention, key, shutdown.clone());
    components.spawn("pruner", ok_when_done(prune));
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

/// The queue's gauges (decisions waiting, dead) and the audit trail's (since the last seal,
/// events no seal covers), kept current every second.
async fn gauge_loop(store: StoreHandle, metrics: Metrics, shutdown: CancellationToken) {
    every(Duration::from_secs(1), shutdown, || async {
        if let Ok(c) = store.counts().await {
            metrics.queue_depth.set(saturating_i64(c.pending));
            metrics.dead_letters.set(saturating_i64(c.dead));
        }
        if let Ok(a) = store.audit_status().await {
            let since = a
                .last_seal
                .map_or(-1, |(at, _)| (now_ms().saturating_sub(at) / 1000).max(0));
            metrics.audit_since_seal.set(since);
            metrics.audit_unsealed.set(a.unsealed());
        }
    })
    .await
}

/// How the audit trail is sealed: how often, with what key.
#[derive(Clone)]
pub(super) struct Sealing {
    pub every: Duration,
    pub key: Option<Secret>,
}

/// Seals the audit trail every `sealing.every`, and once more when the parts that write
/// events have stopped (`writing` closed) at shutdown. Each relay remembers the latest seal
/// it has seen and seals only while that seal is still stored as it was and every later seal
/// follows from it: seals removed or changed behind its back (to have the relays seal a
/// rewritten trail) stop it sealing, which the `P0RelayAuditNotSealed` alert shows.
async fn seal_loop(
    store: StoreHandle,
    sealing: Sealing,
    metrics: Metrics,
    mut writing: mpsc::Receiver<()>,
    shutdown: CancellationToken,
) {
    let mut sealer = Sealer::default();
    let mut seal = async || match sealer.seal(&store, sealing.key.as_ref()).await {
        Ok(Some((id, covers))) => {
            metrics.audit_seals.inc();
            tracing::info!(
                seal = id,
                from = covers.from,
                to = covers.to,
                count = covers.count,
                keyed = sealing.key.is_some(),
                digest = covers.digest.as_deref().unwrap_or(""),
                "audit events sealed"
            );
        }
        Ok(None) => {}
        Err(e) => {
            if let NotSealed::Changed(_) = e {
                metrics.audit_trail_changed.set(1);
            }
            tracing::error!(error = %e, "cannot seal the audit trail")
        }
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(sealing.every) => seal().await,
        }
    }
    while writing.recv().await.is_some() {}
    seal().await;
}

/// What the pruner keeps: finished decisions for the dedup window, subject ends for theirs,
/// audit events for `audit.retention`.
#[derive(Clone, Copy)]
pub(super) struct Retention {
    pub finished: Duration,
    pub ends: Duration,
    pub audit: Duration,
}

async fn prune_loop(
    store: StoreHandle,
    retention: Retention,
    key: Option<Secret>,
    shutdown: CancellationToken,
) {
    every(Duration::from_secs(3600), shutdown, || async {
        let now = now_ms();
        let before = Prune {
            finished_before_ms: now.saturating_sub(ms(retention.finished)),
            ends_before_ms: now.saturating_sub(ms(retention.ends)),
            audit_before_ms: now.saturating_sub(ms(retention.audit)),
            audit_key: key.clone(),
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
