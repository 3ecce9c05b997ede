//! Mappings reloaded while the relay runs: the folder compiled again when it changes (or on
//! SIGHUP) and swapped in whole, or kept as it was when any file is wrong.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::Receiver;
use crate::env::Env;
use crate::mapping::{Defaults, MappingSet};

impl Receiver {
    /// Compiles the mappings folder again and swaps the new set in whole; on any error the
    /// old set stays and every error is logged with its file and rule.
    pub fn reload(&self, env: &Env, defaults: &Defaults) -> Result<(), Vec<String>> {
        let dir = self.mappings.load().dir.clone();
        match MappingSet::load(&dir, env, defaults) {
            Ok(set) => {
                self.metrics
                    .add_sources(set.mappings.keys().map(String::as_str));
                let sources: Vec<String> = set.mappings.keys().cloned().collect();
                self.mappings.store(Arc::new(set));
                self.metrics
                    .mapping_reloads
                    .with_label_values(&["success"])
                    .inc();
                self.health.set_reload_error(None);
                tracing::info!(?sources, "mappings reloaded");
                Ok(())
            }
            Err(errors) => {
                self.metrics
                    .mapping_reloads
                    .with_label_values(&["error"])
                    .inc();
                for e in &errors {
                    tracing::error!("mapping reload failed, previous mappings kept: {e}");
                }
                self.health.set_reload_error(Some(errors.join("; ")));
                Err(errors)
            }
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

/// Reloads the mappings when their folder changes (polled every `poll`) or on SIGHUP, until
/// `shutdown`.
pub async fn watch(
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
            let _ = receiver.reload(&env, &defaults);
        }
    }
}
