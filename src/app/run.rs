//! `Built::run`: every part started under supervision (the listeners, the worker, the answer
//! loop, the mappings' reloader, the store's upkeep and its writer), and the relay handed
//! back to be waited on or stopped.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::upkeep;
use super::{Built, Relay, ok_when_done};
use crate::receiver::{self, reload};
use crate::server::{self, ConnLimits};
use crate::store::StoreTask;
use crate::supervise::Components;

impl Built {
    /// Starts every part under supervision and serves.
    pub fn run(self) -> Relay {
        let shutdown = CancellationToken::new();
        let mut components = Components::new(self.opts.panic_in);
        let (addr, metrics_addr) = (self.addr, self.metrics_addr);
        let receiver = self.receiver.clone();
        self.start(&mut components, &shutdown);
        tracing::info!(%addr, sources = ?receiver.mappings.load().mappings.keys().collect::<Vec<_>>(), "relay listening");
        let health = receiver.health.clone();
        drop(receiver);
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

    /// Spawns every part; each stops when `shutdown` is cancelled.
    fn start(self, components: &mut Components, shutdown: &CancellationToken) {
        let (drain, receiver) = (self.opts.drain, self.receiver);
        let own_metrics = self.metrics_listener.is_none();
        let router = receiver::router(receiver.clone(), own_metrics);
        let limits = self.limits;
        // Each part that writes audit events holds a sender: the last seal waits for them.
        let (writing, written) = mpsc::channel::<()>(1);
        let main = server::serve(
            self.listener,
            router,
            limits.clone(),
            self.tls,
            shutdown.clone(),
            drain,
        );
        components.spawn("server", ok_when_done(holding(writing.clone(), main)));
        if let Some(l) = self.metrics_listener {
            let router = receiver::metrics_router(receiver.clone());
            // Its own places, for probes and scrapes: not counted with the senders'.
            let limits = ConnLimits {
                per_address: None,
                metrics: None,
                ..limits
            };
            let metrics = server::serve(l, router, limits, None, shutdown.clone(), drain);
            components.spawn("metrics-server", ok_when_done(metrics));
        }
        let worker = self.worker.run(shutdown.clone(), drain);
        components.spawn("worker", ok_when_done(holding(writing.clone(), worker)));
        let answers = self.answerer.run(shutdown.clone(), drain);
        components.spawn("answerer", ok_when_done(holding(writing, answers)));
        let poll = self.opts.reload_poll;
        let (env, defaults) = (self.env, self.defaults);
        let reloads = reload::watch(receiver.clone(), env, defaults, poll, shutdown.clone());
        components.spawn("reloader", ok_when_done(reloads));
        let health = Arc::clone(&receiver.health);
        let metrics = receiver.metrics.clone();
        let store = self.store;
        let storms = crate::memory::watch_storms(receiver.budget.clone(), shutdown.clone());
        components.spawn("memory", ok_when_done(storms));
        upkeep::spawn(
            components,
            &store,
            health,
            metrics,
            (self.retention, self.sealing),
            written,
            shutdown,
        );
        // The writer ends once every handle is gone (every component above has ended) and
        // its queue is drained.
        drop(store);
        match self.writer {
            StoreTask::Thread(thread) => components.watch_thread("store-writer", thread),
            StoreTask::Task(task) => components.spawn("store-writer", async move {
                task.await.map_err(|e| format!("ended abnormally: {e}"))
            }),
        }
    }
}

/// `part`, holding `sender` until it ends.
async fn holding(sender: mpsc::Sender<()>, part: impl std::future::Future<Output = ()>) {
    part.await;
    drop(sender);
}
