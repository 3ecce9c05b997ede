//! What `/readyz` reports: shared flags that the store probe, the receiver, the worker, the
//! reloader and the supervisor set. Each says what is true now and clears by itself when it
//! stops being true.

use std::sync::Mutex;
use std::time::Instant;

#[derive(Debug, Default)]
pub struct Health {
    /// A dry run: no token is used, so there is nothing P0 could say of one.
    dry_run: bool,
    token: Mutex<TokenState>,
    store_error: Mutex<Option<String>>,
    reload_error: Mutex<Option<String>>,
    stopped: Mutex<Option<String>>,
}

/// P0's latest word on the token, and when the call that said it started.
#[derive(Debug, Default)]
struct TokenState {
    rejected: bool,
    said_by_call_started: Option<Instant>,
}

impl Health {
    /// The health of a relay that calls P0 (`dry_run` false) or never does.
    pub fn new(dry_run: bool) -> Health {
        Health {
            dry_run,
            ..Health::default()
        }
    }

    /// P0's answer to a call that started at `started`: a 401 (`accepted: false`) marks the
    /// token rejected, any success clears that. An answer to a call that started before the
    /// one that last spoke is older news and ignored, so a slow success cannot hide a newer
    /// 401, nor a slow 401 a newer success.
    pub fn token_answer(&self, started: Instant, accepted: bool) {
        if let Ok(mut t) = self.token.lock()
            && t.said_by_call_started.is_none_or(|last| started >= last)
        {
            t.rejected = !accepted;
            t.said_by_call_started = Some(started);
        }
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

    /// A long-running part of the relay has ended unexpectedly: the relay is stopping and is
    /// not ready for the rest of its life.
    pub fn set_stopped(&self, why: String) {
        if let Ok(mut slot) = self.stopped.lock()
            && slot.is_none()
        {
            *slot = Some(why);
        }
    }

    /// What P0 last said of the API token: `rejected` (a 401), `accepted`, or `unknown`
    /// before any call; `unused` in a dry run.
    pub fn token(&self) -> &'static str {
        if self.dry_run {
            return "unused";
        }
        match self.token.lock() {
            Ok(t) if t.rejected => "rejected",
            Ok(t) if t.said_by_call_started.is_some() => "accepted",
            _ => "unknown",
        }
    }

    /// Why the relay is not ready; empty when it is. Only what stops it from accepting
    /// deliveries durably counts. A failed reload is reported but does not make the relay
    /// unready (the previous mappings still serve), and neither does a token P0 rejected:
    /// deliveries are still stored durably (their decisions dead-lettered by the 401, to be
    /// replayed once the token is fixed), while a load balancer that turned every replica
    /// away would lose what senders do not retry.
    pub fn problems(&self) -> (Vec<String>, Option<String>) {
        let mut out = Vec::new();
        if let Ok(slot) = self.stopped.lock()
            && let Some(why) = slot.as_ref()
        {
            out.push(format!("stopping: {why}"));
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn token_rejected(h: &Health) -> bool {
        h.token() == "rejected"
    }

    #[test]
    fn the_token_flag_follows_the_newest_call_not_the_last_answer() {
        let h = Health::default();
        assert_eq!(h.token(), "unknown");
        let t0 = Instant::now();
        let (t1, t2) = (t0 + Duration::from_millis(1), t0 + Duration::from_millis(2));
        h.token_answer(t1, false);
        assert!(token_rejected(&h));
        assert!(
            h.problems().0.is_empty(),
            "a rejected token does not make the relay unready"
        );
        // A success from a call sent before the 401 says nothing about the token now.
        h.token_answer(t0, true);
        assert!(token_rejected(&h));
        h.token_answer(t2, true);
        assert!(!token_rejected(&h));
        // Nor does a late 401 from an older call undo a newer success.
        h.token_answer(t1, false);
        assert!(!token_rejected(&h));
    }
}
