//! PostgreSQL for tests: a fresh database per test on the machine's server (skipped, and
//! listed as skipped, when it does not answer; a failure in CI), and a TCP proxy that can cut
//! the relays off from it and let them back, without touching the server. Shared by the
//! integration suite and the library's store tests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::task::JoinSet;

/// The server the tests use (`P0_RELAY_TEST_PG` overrides), trust auth.
pub fn admin_url() -> String {
    std::env::var("P0_RELAY_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A database of its own for one test, dropped after it.
pub struct TestDb {
    pub name: String,
}

impl TestDb {
    /// A fresh database, or `None` when PostgreSQL is not reachable (the test is skipped;
    /// in CI that is a failure instead).
    pub async fn create() -> Option<TestDb> {
        let (client, conn) =
            match tokio_postgres::connect(&admin_url(), tokio_postgres::NoTls).await {
                Ok(c) => c,
                Err(e) => {
                    super::skip::skip(&format!("PostgreSQL not reachable ({e})"));
                    return None;
                }
            };
        tokio::spawn(conn);
        let name = format!("relay_{:016x}", rand::random::<u64>());
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        Some(TestDb { name })
    }

    /// The URL of this database through `addr` (the server itself, or a proxy).
    pub fn url_via(&self, addr: SocketAddr) -> String {
        format!(
            "postgres://postgres@{}:{}/{}?sslmode=disable",
            addr.ip(),
            addr.port(),
            self.name
        )
    }

    /// The URL of this database on the server.
    pub fn url(&self) -> String {
        let admin = admin_url();
        let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
        format!("{base}/{}?sslmode=disable", self.name)
    }

    /// The server's address.
    pub fn server(&self) -> SocketAddr {
        let admin = admin_url();
        let host = admin
            .split_once('@')
            .and_then(|(_, rest)| rest.split('/').next())
            .unwrap_or("127.0.0.1:5432");
        host.parse()
            .unwrap_or_else(|_| "127.0.0.1:5432".parse().unwrap())
    }

    /// A plain connection to this database, for what a test does behind the relay's back.
    pub async fn raw(&self) -> tokio_postgres::Client {
        let (c, conn) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        c
    }

    pub async fn query_i64(&self, sql: &str) -> i64 {
        self.raw().await.query_one(sql, &[]).await.unwrap().get(0)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (admin, name) = (admin_url(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok((c, conn)) = tokio_postgres::connect(&admin, tokio_postgres::NoTls).await
                {
                    tokio::spawn(conn);
                    let _ = c
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

/// A TCP proxy in front of PostgreSQL. `cut` closes every connection through it and refuses
/// new ones until `restore`.
pub struct Proxy {
    pub addr: SocketAddr,
    down: Arc<AtomicBool>,
    conns: Arc<Mutex<JoinSet<()>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        Self::start_on([127, 0, 0, 1].into(), target).await
    }

    /// A proxy listening on `ip` (an address containers reach, say).
    pub async fn start_on(ip: std::net::IpAddr, target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let down = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(JoinSet::new()));
        let (d, c) = (down.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if d.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                c.lock().await.spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Proxy {
            addr,
            down,
            conns,
            accept,
        }
    }

    /// The database is gone: every connection is closed, new ones are refused.
    pub async fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        self.conns.lock().await.abort_all();
    }

    pub fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}
