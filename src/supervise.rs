//! Supervision of the relay's long-running parts (servers, worker, reloader, pruner, store
//! probe, store writer thread) as named components: the first to end unexpectedly or panic is
//! logged, makes the relay not ready, and stops the rest, so the process exits non-zero.

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use tokio::task::{Id, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::health::Health;

/// Why the relay stopped on its own.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{component}` {reason}")]
pub struct Failure {
    pub component: String,
    pub reason: String,
}

/// The named components of one relay.
pub struct Components {
    set: JoinSet<Result<(), String>>,
    names: HashMap<Id, &'static str>,
    /// For tests: the component of this name panics as it starts.
    panic_in: Option<&'static str>,
}

/// How often a watched thread is checked for having ended.
const THREAD_POLL: Duration = Duration::from_millis(100);

impl Components {
    pub fn new(panic_in: Option<&'static str>) -> Components {
        Components {
            set: JoinSet::new(),
            names: HashMap::new(),
            panic_in,
        }
    }

    /// Runs `task` as the component `name`. It is meant to run until the relay stops: ending
    /// before that, with an error, or by a panic is a failure.
    pub fn spawn<F>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = Result<(), String>> + Send + 'static,
    {
        let inject = self.panic_in == Some(name);
        let handle = self.set.spawn(async move {
            if inject {
                panic!("injected fault in `{name}`");
            }
            task.await
        });
        self.names.insert(handle.id(), name);
    }

    /// Watches a thread as the component `name`: it ends when the thread ends, and a panic
    /// of the thread is a failure. (Polled rather than joined, so no runtime thread blocks
    /// on it and stopping never waits for the watch.)
    pub fn watch_thread(&mut self, name: &'static str, thread: std::thread::JoinHandle<()>) {
        self.spawn(name, async move {
            while !thread.is_finished() {
                tokio::time::sleep(THREAD_POLL).await;
            }
            thread
                .join()
                .map_err(|p| format!("panicked: {}", panic_message(p)))
        });
    }

    /// Waits until every component has ended. The first failure is logged, marks the relay
    /// stopping in `health` (so `/readyz` fails while it drains) and cancels `shutdown`,
    /// which stops the rest; it is returned once all have ended.
    pub async fn run(
        mut self,
        shutdown: CancellationToken,
        health: &Health,
    ) -> Result<(), Failure> {
        let mut first: Option<Failure> = None;
        while let Some(done) = self.set.join_next_with_id().await {
            let (id, outcome) = match done {
                Ok((id, result)) => (id, result),
                Err(e) if e.is_panic() => (
                    e.id(),
                    Err(format!("panicked: {}", panic_message(e.into_panic()))),
                ),
                Err(e) => (e.id(), Err("was cancelled".to_owned())),
            };
            let name = self.names.remove(&id).unwrap_or("unnamed");
            let reason = match outcome {
                Err(reason) => reason,
                Ok(()) if shutdown.is_cancelled() => continue,
                Ok(()) => "ended while the relay was running".to_owned(),
            };
            tracing::error!(component = name, %reason, "a part of the relay failed; stopping");
            if first.is_none() {
                health.set_stopped(format!("`{name}` {reason}"));
                first = Some(Failure {
                    component: name.to_owned(),
                    reason,
                });
            }
            shutdown.cancel();
        }
        first.map_or(Ok(()), Err)
    }
}

/// The message a panic carried, when it is text.
pub fn panic_message(payload: Box<dyn Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(s) => (*s).to_owned(),
            Err(_) => "(no message)".to_owned(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn runs_until(shutdown: CancellationToken) -> Result<(), String> {
        shutdown.cancelled().await;
        Ok(())
    }

    /// Components with a server that runs until `shutdown`.
    fn serving() -> (CancellationToken, Health, Components) {
        let shutdown = CancellationToken::new();
        let mut c = Components::new(None);
        c.spawn("server", runs_until(shutdown.clone()));
        (shutdown, Health::default(), c)
    }

    fn ready(health: &Health) -> bool {
        health.problems().0.is_empty()
    }

    #[tokio::test]
    async fn a_panic_stops_every_component_and_is_reported() {
        let (shutdown, health, mut c) = serving();
        c.spawn("worker", async { panic!("boom") });
        let failure = c.run(shutdown.clone(), &health).await.unwrap_err();
        assert_eq!(
            failure,
            Failure {
                component: "worker".into(),
                reason: "panicked: boom".into()
            }
        );
        assert!(shutdown.is_cancelled(), "the rest were told to stop");
        assert!(!ready(&health));
        assert!(health.problems().0[0].contains("`worker` panicked: boom"));
    }

    #[tokio::test]
    async fn a_component_that_ends_early_is_a_failure_and_the_first_one_is_kept() {
        let shutdown = CancellationToken::new();
        let health = Health::default();
        let mut c = Components::new(None);
        c.spawn("reloader", async { Ok(()) });
        let s = shutdown.clone();
        c.spawn("pruner", async move {
            s.cancelled().await;
            Err("could not stop cleanly".to_owned())
        });
        let failure = c.run(shutdown, &health).await.unwrap_err();
        assert_eq!(failure.component, "reloader");
        assert_eq!(failure.reason, "ended while the relay was running");
    }

    #[tokio::test]
    async fn the_death_of_a_watched_thread_is_noticed() {
        let (shutdown, health, mut c) = serving();
        let thread = std::thread::spawn(|| panic!("disk on fire"));
        c.watch_thread("store-writer", thread);
        let failure = c.run(shutdown, &health).await.unwrap_err();
        assert_eq!(failure.component, "store-writer");
        assert_eq!(failure.reason, "panicked: disk on fire");
        assert!(!ready(&health));
    }

    #[tokio::test]
    async fn an_ordinary_stop_is_no_failure() {
        let (shutdown, health, mut c) = serving();
        c.spawn("worker", runs_until(shutdown.clone()));
        let thread = std::thread::spawn(|| ());
        c.watch_thread("store-writer", thread);
        shutdown.cancel();
        assert_eq!(c.run(shutdown, &health).await, Ok(()));
        assert!(ready(&health));
    }
}
