//! What `/readyz` reports: shared flags that the receiver, the worker and the reloader set.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, Default)]
pub struct Health {
    token_rejected: AtomicBool,
    store_error: Mutex<Option<String>>,
    reload_error: Mutex<Option<String>>,
}

impl Health {
    pub fn set_token_rejected(&self, rejected: bool) {
        self.token_rejected.store(rejected, Ordering::Relaxed);
    }

    pub fn set_store_error(&self, error: Option<String>) {
        if let Ok(mut slot) = self.store_error.lock() {
            *slot = error;
        }
    }

    pub fn set_reload_error(&self, error: Option<String>) {
        if let Ok(mut slot) = self.reload_error.lock() {
            *slot = error;
        }
    }

    /// Why the relay is not ready; empty when it is. A failed reload is reported but does not
    /// make the relay unready: the previous mappings still serve.
    pub fn problems(&self) -> (Vec<String>, Option<String>) {
        let mut out = Vec::new();
        if self.token_rejected.load(Ordering::Relaxed) {
            out.push("P0 rejected the API token (401): fix P0_API_TOKEN".to_owned());
        }
        if let Ok(slot) = self.store_error.lock()
            && let Some(e) = slot.as_ref()
        {
            out.push(format!("store not writable: {e}"));
        }
        let reload = self.reload_error.lock().ok().and_then(|s| s.clone());
        (out, reload)
    }
}
