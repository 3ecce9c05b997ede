//! LISTEN for new work: any relay's commit of work wakes every relay on the database.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_postgres::AsyncMessage;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{CHANNEL, CONNECT_TIMEOUT, OP_TIMEOUT, Pg};

impl Pg {
    /// Wakes `wake` whenever any relay commits new work (LISTEN), reconnecting with backoff;
    /// also once after each (re)connection, for anything committed while not listening.
    pub(super) fn spawn_listener(&self, wake: Arc<Notify>) -> tokio::task::JoinHandle<()> {
        let mut config = self.location.connect_config();
        config.connect_timeout(CONNECT_TIMEOUT);
        let tls = self.tls.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let (listened, error) = listen(&config, tls.clone(), &wake).await;
                if listened {
                    backoff = Duration::from_millis(100);
                }
                tracing::warn!(error = %error, retry_in_ms = backoff.as_millis() as u64,
                    "PostgreSQL listener disconnected; reconnecting");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        })
    }
}

/// One listening connection, until it fails: whether LISTEN took, and why it ended.
async fn listen(
    config: &tokio_postgres::Config,
    tls: MakeRustlsConnect,
    wake: &Arc<Notify>,
) -> (bool, String) {
    let (client, mut connection) = match config.connect(tls).await {
        Ok(c) => c,
        Err(e) => return (false, e.to_string()),
    };
    let waker = wake.clone();
    let mut driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(_))) => waker.notify_one(),
                Some(Ok(_)) => {}
                Some(Err(e)) => return e.to_string(),
                None => return "connection closed".to_owned(),
            }
        }
    });
    let sql = format!("LISTEN {CHANNEL}");
    let listened = tokio::select! {
        r = client.batch_execute(&sql) => r,
        _ = tokio::time::sleep(OP_TIMEOUT) => {
            driver.abort();
            return (false, "LISTEN not answered".into());
        }
    };
    if let Err(e) = listened {
        driver.abort();
        return (false, e.to_string());
    }
    wake.notify_one();
    // A connection that silently stopped answering is found by a periodic query.
    let reason = loop {
        tokio::select! {
            r = &mut driver => break r.unwrap_or_else(|e| e.to_string()),
            _ = tokio::time::sleep(Duration::from_secs(10)) => {
                match tokio::time::timeout(OP_TIMEOUT, client.simple_query("SELECT 1")).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => break e.to_string(),
                    Err(_) => break "no answer to a keepalive query".into(),
                }
            }
        }
    };
    driver.abort();
    (true, reason)
}
