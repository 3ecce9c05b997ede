//! Claims held across relays: a lease renewed while its call is under way (a call longer than
//! the lease is not taken over and sent again), given up when it cannot be; and the wake-up
//! when another relay commits new work.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::Notify;

use super::{OP_TIMEOUT, Pg, PgStore};
use crate::store::StoreError;
use crate::store::api::Leases;
use crate::store::model::{Held, Leased, ms};

#[async_trait]
impl Leases for PgStore {
    /// Returns only when the claim is lost (taken over, or not renewable for as long as the
    /// lease lasts), after which its call must be dropped.
    async fn hold(&self, claim: Held) {
        let lease = self.db.lease;
        let margin = lease / 6;
        let mut deadline = Instant::now() + lease - margin;
        // Logged as the rest of the relay names them.
        let job_id = (claim.what == Leased::Job).then_some(claim.id);
        let answer_id = (claim.what == Leased::Answer).then_some(claim.id);
        loop {
            tokio::time::sleep(lease / 3).await;
            match self.db.renew(claim).await {
                Ok(true) => deadline = Instant::now() + lease - margin,
                Ok(false) => {
                    tracing::warn!(
                        job_id,
                        answer_id,
                        "claim taken over by another relay; this relay drops its call"
                    );
                    return;
                }
                Err(e) if Instant::now() >= deadline => {
                    tracing::warn!(job_id, answer_id, error = %e,
                        "claim lease could not be renewed before it ran out; this relay drops its call");
                    return;
                }
                Err(e) => {
                    tracing::warn!(job_id, answer_id, error = %e, "cannot renew a claim lease")
                }
            }
        }
    }

    fn wake_on_new_work(&self, wake: Arc<Notify>) {
        let handle = self.db.spawn_listener(wake);
        if let Ok(mut slot) = self.listener.lock()
            && let Some(old) = slot.replace(handle.abort_handle())
        {
            old.abort();
        }
    }
}

impl Pg {
    /// Extends the lease on a claim; `false` when the claim is no longer this one.
    pub(crate) async fn renew(&self, claim: Held) -> Result<bool, StoreError> {
        let until = self.now().saturating_add(ms(self.lease));
        let limit = (self.lease / 3).clamp(Duration::from_millis(200), OP_TIMEOUT);
        let sql = match claim.what {
            Leased::Job => {
                "UPDATE jobs SET lease_until = $3
                 WHERE id = $1 AND claim_token = $2 AND state = 'sending'"
            }
            Leased::Answer => {
                "UPDATE answers SET lease_until = $3
                 WHERE id = $1 AND claim_token = $2 AND state = 'sending'"
            }
        };
        let n = self
            .run("lease renewal", limit, async |c| {
                let stmt = c.prepare_cached(sql).await?;
                c.execute(&stmt, &[&claim.id, &claim.claim_token, &until])
                    .await
            })
            .await?;
        Ok(n == 1)
    }
}

#[cfg(test)]
impl PgStore {
    /// Extends the lease on a claim now; `false` when the claim is no longer this one.
    pub(crate) async fn renew(&self, claim: Held) -> Result<bool, StoreError> {
        self.db.renew(claim).await
    }
}
