//! The accept loop: the connections' places (`conns`), a deadline for a request's headers
//! (idle keep-alives included), optional TLS, the peer address and the connection's handle
//! for the handlers, and graceful shutdown of open connections.

pub mod conns;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::metrics::Metrics;
use conns::{Admitted, ConnHandle, Conns};

/// Limits on connections, from `inbound` settings.
#[derive(Clone)]
pub struct ConnLimits {
    pub max_connections: usize,
    /// The most places one peer address may hold; `None` when the peer is a trusted proxy.
    pub per_address: Option<usize>,
    /// From accepting a connection, or from its last answer, to its next request's headers.
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    /// Where refusals and open connections are counted (the webhook port's listener).
    pub metrics: Option<Metrics>,
}

/// Serves `router` on `listener` until `shutdown`; then stops accepting and gives open
/// connections `drain` to finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnLimits,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
    drain: Duration,
) {
    let places = Conns::new(
        limits.max_connections,
        limits.per_address,
        limits.metrics.clone(),
    );
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    let serving = Serving {
        router,
        http,
        tls,
        handshake: limits.header_read_timeout,
        metrics: limits.metrics.clone(),
    };
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Refused at once: the sender learns now, and nothing of its is read.
        let place = match places.admit(peer.ip()) {
            Ok(place) => place,
            Err(refused) => {
                Metrics::count_refusal(limits.metrics.as_ref(), refused.reason());
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let watcher = graceful.watcher();
        tokio::spawn(serving.clone().one(stream, peer, place, watcher));
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open at the shutdown deadline were closed");
    }
}

/// What serving one connection takes.
#[derive(Clone)]
struct Serving {
    router: Router,
    http: hyper::server::conn::http1::Builder,
    tls: Option<TlsAcceptor>,
    /// The deadline for a TLS handshake (the header deadline's).
    handshake: Duration,
    metrics: Option<Metrics>,
}

impl Serving {
    /// Serves one admitted connection until it ends or its place is taken for another (then
    /// it is dropped, so closed); TLS first, when configured.
    async fn one(self, stream: TcpStream, peer: SocketAddr, place: Admitted, watcher: Watcher) {
        let handle = place.handle.clone();
        let service = TowerToHyperService::new(self.router.map_request(
            move |mut req: axum::http::Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
                req.extensions_mut().insert::<ConnHandle>(handle.clone());
                req
            },
        ));
        let (http, metrics) = (&self.http, &self.metrics);
        let served = async {
            let done = match self.tls {
                None => {
                    let conn = http.serve_connection(TokioIo::new(stream), service);
                    watcher.watch(conn).await
                }
                Some(acceptor) => {
                    let handshake = tokio::time::timeout(self.handshake, acceptor.accept(stream));
                    let Ok(Ok(stream)) = handshake.await else {
                        return;
                    };
                    let conn = http.serve_connection(TokioIo::new(stream), service);
                    watcher.watch(conn).await
                }
            };
            count_timeout(metrics, done);
        };
        tokio::select! {
            _ = served => {}
            _ = place.close.cancelled() => {}
        }
        drop(place);
    }
}

/// Connections the system may hold for the relay before it accepts them: room for a wave
/// of connections (the system caps it at `net.core.somaxconn`).
const LISTEN_BACKLOG: u32 = 4096;

/// A listener on `addr`.
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Counts a connection closed because its next request's headers did not come in time.
fn count_timeout(metrics: &Option<Metrics>, done: Result<(), hyper::Error>) {
    if let (Some(m), Err(e)) = (metrics, done)
        && e.is_timeout()
    {
        m.inbound_refusal("header_timeout");
    }
}

/// Raises the limit on open files to what the system allows this process, so that
/// `inbound.max_connections` can be reached (a common default limit is 1024 in all).
pub fn raise_open_files_limit() {
    #[cfg(unix)]
    // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // An unlimited hard limit cannot be the soft one for open files: a million is
        // plenty (the most `max_connections` may ask).
        const ENOUGH: libc::rlim_t = 1 << 20;
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max.min(ENOUGH.max(lim.rlim_cur));
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// A TLS acceptor from PEM certificate-chain and key files.
pub fn tls_acceptor(cert: &std::path::Path, key: &std::path::Path) -> Result<TlsAcceptor, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect())
        .map_err(|e| format!("{}: cannot read certificates: {e}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("{}: cannot read private key: {e}", key.display()))?;
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("TLS configuration: {e}"))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
