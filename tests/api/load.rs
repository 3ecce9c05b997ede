//! Hostile load on the webhook port, with the shipped defaults and no credentials: 1,500
//! connections that send half of a 1 MiB body and stall (each connecting again as soon as it
//! is closed), from a few addresses and from many, while a real sender posts signed real-size
//! GitHub deliveries at 5 a second from an address of its own, a new connection each, as
//! GitHub does. Every delivery is accepted within 2 s, the probes answer throughout, the
//! relay's resident memory stays within its bound, and the memory is given back after.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpSocket;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::common::*;

/// The bound the defaults are sized for (`inbound.body_budget_bytes` and the rest).
const RSS_BOUND_KIB: u64 = 128 * 1024;
const ATTACKERS: usize = 1500;
/// How long each attacker holds its connection.
const STALL: Duration = Duration::from_secs(6);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_bodies_from_a_few_addresses_starve_no_delivery() {
    let addresses: Vec<IpAddr> = (2..=4).map(|n| IpAddr::from([127, 0, 0, n])).collect();
    let seen = under_attack(&addresses).await;
    // The stalled bodies were turned away, unread, or cut for others.
    assert!(seen.turned_away() > 1000.0, "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_bodies_from_many_addresses_starve_no_delivery() {
    let addresses: Vec<IpAddr> = (1..=150).map(|n| IpAddr::from([127, 0, 1, n])).collect();
    let seen = under_attack(&addresses).await;
    assert!(seen.turned_away() > 1000.0, "{seen:?}");
    // Each address is within its share.
    assert_eq!(seen.refused("address_share"), 0.0, "{seen:?}");
}

/// What the relay's metrics said after the attack.
struct Seen {
    metrics: String,
}

impl std::fmt::Debug for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let refusals: Vec<&str> = self
            .metrics
            .lines()
            .filter(|l| l.starts_with("p0_relay_inbound_refused_total{"))
            .collect();
        write!(f, "{refusals:?}")
    }
}

impl Seen {
    /// Bodies answered 503 unread, or cut for others.
    fn turned_away(&self) -> f64 {
        self.refused("body_budget") + self.refused("cut")
    }

    fn refused(&self, reason: &str) -> f64 {
        let prefix = format!("p0_relay_inbound_refused_total{{reason=\"{reason}\"}} ");
        self.metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }
}

/// One attack at a time: two on the machine's cores at once would measure each other.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn under_attack(attackers: &[IpAddr]) -> Seen {
    let _alone = ONE_AT_A_TIME.lock().await;
    let p0 = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&p0)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &p0.uri(), &Setup::default());
    // The shipped defaults for the webhook port (the suite's config shortens the deadline).
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("  read_timeout: 2s\n", "")).unwrap();
    let relay = BinRelay::start(&config, &test_env(&[]), dir.path().join("relay.log"), &[]).await;
    let pid = relay.child.id();
    let idle_kib = rss_kib(pid);

    let started = Instant::now();
    let stall_until = tokio::time::Instant::now() + STALL;
    let half: Arc<[u8]> = vec![b'a'; 512 * 1024].into();
    let stalled = Arc::new(AtomicUsize::new(0));
    let mut attack = tokio::task::JoinSet::new();
    for i in 0..ATTACKERS {
        let from = attackers[i % attackers.len()];
        let (half, stalled) = (half.clone(), stalled.clone());
        let to = relay.addr;
        attack.spawn(async move {
            let again = async {
                loop {
                    stall(from, to, &half, &stalled).await;
                }
            };
            let _ = tokio::time::timeout_at(stall_until, again).await;
        });
    }

    // The real sender, from an address of its own, and the probes.
    let sender = reqwest::Client::builder()
        .local_address(IpAddr::from([127, 0, 0, 1]))
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let base = format!("http://{}", relay.addr);
    let mut peak_kib = idle_kib;
    let mut slowest = Duration::ZERO;
    let mut i = 0;
    let mut next = tokio::time::Instant::now() + Duration::from_millis(300);
    while next < stall_until {
        tokio::time::sleep_until(next).await;
        next += Duration::from_millis(200);
        i += 1;
        let hook = Hook::comment(&format!("load-{i}"), &format!("/p0 revoke req-load-{i}"));
        let asked = Instant::now();
        let (status, answer) = answer(send(&sender, &base, &hook).await).await;
        let took = asked.elapsed();
        assert_eq!(status, 202, "delivery {i}: {answer}");
        assert!(took < Duration::from_secs(2), "delivery {i} took {took:?}");
        slowest = slowest.max(took);
        for probe in ["/healthz", "/readyz"] {
            let asked = Instant::now();
            let status = sender
                .get(format!("{base}{probe}"))
                .send()
                .await
                .map(|r| r.status().as_u16());
            assert_eq!(status.ok(), Some(200), "{probe} during the attack");
            assert!(asked.elapsed() < Duration::from_secs(2), "{probe} was slow");
        }
        peak_kib = peak_kib.max(rss_kib(pid));
    }
    assert!(i >= 25, "only {i} deliveries were sent");
    while attack.join_next().await.is_some() {}
    let stalled = stalled.load(Ordering::Relaxed);
    assert!(stalled >= ATTACKERS, "only {stalled} attacks were made");
    peak_kib = peak_kib.max(rss_kib(pid));
    assert!(
        peak_kib < RSS_BOUND_KIB,
        "resident memory peaked at {peak_kib} KiB (idle {idle_kib} KiB)"
    );
    // Given back after: within a few seconds the relay is back near its idle size.
    let mut after = rss_kib(pid);
    for _ in 0..100 {
        if after < idle_kib + 8 * 1024 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = rss_kib(pid);
    }
    assert!(
        after < idle_kib + 8 * 1024,
        "resident memory stayed at {after} KiB after the attack (idle {idle_kib} KiB, peak {peak_kib} KiB)"
    );
    eprintln!(
        "{i} deliveries, slowest {slowest:?}; {stalled} stalled bodies sent; RSS idle {idle_kib} KiB, peak {peak_kib} KiB, after {after} KiB; {:?}",
        started.elapsed()
    );
    let metrics = get_text(&format!("{base}/metrics")).await;
    Seen { metrics }
}

/// One attack: from `from`, headers announcing 1 MiB, half of it, then nothing until the
/// relay closes the connection (counted in `stalled` once the headers are sent).
async fn stall(from: IpAddr, to: SocketAddr, half: &[u8], stalled: &AtomicUsize) {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::new(from, 0)).expect("bind");
    let Ok(mut stream) = socket.connect(to).await else {
        // Refused while the backlog was full: try again shortly.
        tokio::time::sleep(Duration::from_millis(50)).await;
        return;
    };
    let head = "POST /webhooks/github HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\nX-GitHub-Event: issue_comment\r\nContent-Length: 1048576\r\n\r\n";
    if stream.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    stalled.fetch_add(1, Ordering::Relaxed);
    let _ = stream.write_all(half).await;
    // Holds the connection until the relay closes it.
    let mut buf = [0u8; 1024];
    while let Ok(n) = tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await {
        if n == 0 {
            break;
        }
    }
    // A second before connecting again: 1,500 connections held as well as the relay allows.
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// The process's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}
