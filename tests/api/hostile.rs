//! The trust boundary under attack: forged, malformed, oversized, slow and out-of-bounds input.
//! Every case gets its exact answer and P0 receives nothing.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::common::*;
use p0_relay::verify::sign_hex;
use serde_json::json;

fn pd_title(title: &str) -> Vec<u8> {
    let mut v: serde_json::Value =
        serde_json::from_slice(&testdata("pagerduty/incident_acknowledged.json")).unwrap();
    v["event"]["data"]["title"] = title.into();
    serde_json::to_vec(&v).unwrap()
}

fn comment(body: &str) -> Vec<u8> {
    github_comment(body, "octocat")
}

fn gh(body: &[u8]) -> Hook {
    Hook::github("issue_comment", "d-1", body, GITHUB_SECRET_NEW)
}

#[tokio::test]
async fn hostile_input_gets_its_answer_and_never_reaches_p0() {
    let t = spawn().await;
    t.p0_ok().await;
    let body = testdata("github/issue_comment_created.json");
    let good_sig = format!("sha256={}", sign_hex(GITHUB_SECRET_NEW, &body));
    let mut tampered = body.clone();
    tampered.extend_from_slice(b" ");
    let nested = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    let big = vec![b' '; 2 * 1024 * 1024];
    let pd = testdata("pagerduty/incident_acknowledged.json");
    let og = testdata("opsgenie/acknowledge.json");

    let mut dup = gh(&body);
    dup.headers
        .push(("X-Hub-Signature-256".into(), good_sig.clone()));
    let mut no_sig = gh(&body);
    no_sig.headers.retain(|(k, _)| k != "X-Hub-Signature-256");
    let mut og_none = Hook::opsgenie(&og);
    og_none.headers.retain(|(k, _)| k != "Authorization");

    let cases: Vec<(&str, Hook, u16, &str)> = vec![
        // Forged signatures.
        (
            "wrong secret",
            Hook::github("issue_comment", "d", &body, "guess"),
            401,
            "unauthorized",
        ),
        (
            "wrong prefix",
            gh(&body).header("X-Hub-Signature-256", &good_sig.replace("sha256=", "sha1=")),
            401,
            "unauthorized",
        ),
        (
            "truncated",
            gh(&body).header("X-Hub-Signature-256", &good_sig[..good_sig.len() - 2]),
            401,
            "unauthorized",
        ),
        (
            "tampered body",
            gh(&body)
                .header("X-Hub-Signature-256", &good_sig)
                .tap(|h| h.body = tampered.clone()),
            401,
            "unauthorized",
        ),
        (
            "empty header",
            gh(&body).header("X-Hub-Signature-256", ""),
            401,
            "unauthorized",
        ),
        ("duplicate headers", dup, 401, "unauthorized"),
        ("missing header", no_sig, 401, "unauthorized"),
        (
            "pagerduty wrong secret",
            Hook::pagerduty("p", &pd).header(
                "X-PagerDuty-Signature",
                &format!("v1={}", sign_hex("guess", &pd)),
            ),
            401,
            "unauthorized",
        ),
        (
            "pagerduty other scheme only",
            Hook::pagerduty("p", &pd).header(
                "X-PagerDuty-Signature",
                &format!("v0={}", sign_hex(PD_SECRET, &pd)),
            ),
            401,
            "unauthorized",
        ),
        (
            "opsgenie wrong token",
            Hook::opsgenie(&og).header("Authorization", "Bearer guess"),
            401,
            "unauthorized",
        ),
        (
            "opsgenie basic auth",
            Hook::opsgenie(&og).header("Authorization", &format!("Basic {OG_TOKEN}")),
            401,
            "unauthorized",
        ),
        ("opsgenie no token", og_none, 401, "unauthorized"),
        // A real sender, but not allowed.
        (
            "stranger",
            Hook::github(
                "issue_comment",
                "d",
                &github_comment("/p0 approve req-1 1h", "mallory"),
                GITHUB_SECRET_NEW,
            ),
            200,
            "rejected",
        ),
        // Request IDs that could reshape the URL or are not IDs.
        ("slash", gh(&comment("/p0 approve a/b")), 200, "rejected"),
        (
            "dot-dot",
            gh(&comment("/p0 approve ../../x")),
            200,
            "rejected",
        ),
        (
            "encoded slash",
            gh(&comment("/p0 approve a%2Fb")),
            200,
            "rejected",
        ),
        (
            "whitespace",
            Hook::pagerduty("p", &pd_title("[p0:req 1] db")),
            200,
            "rejected",
        ),
        (
            "tab",
            Hook::pagerduty("p", &pd_title("[p0:req\t1] db")),
            200,
            "rejected",
        ),
        (
            "unicode",
            gh(&comment("/p0 approve réq-1")),
            200,
            "rejected",
        ),
        (
            "500 chars",
            gh(&comment(&format!("/p0 approve {}", "a".repeat(500)))),
            200,
            "rejected",
        ),
        (
            "query",
            gh(&comment("/p0 approve req?x=1")),
            200,
            "rejected",
        ),
        // Expirations outside the grammar.
        ("0h", gh(&comment("/p0 approve req-1 0h")), 200, "rejected"),
        (
            "-1h",
            gh(&comment("/p0 approve req-1 -1h")),
            200,
            "rejected",
        ),
        (
            "1h30m",
            gh(&comment("/p0 approve req-1 1h30m")),
            200,
            "rejected",
        ),
        (
            "1.5h",
            gh(&comment("/p0 approve req-1 1.5h")),
            200,
            "rejected",
        ),
        // Regression: a multi-byte unit once panicked the duration parser.
        (
            "multi-byte unit",
            gh(&comment("/p0 approve req-1 2é")),
            200,
            "rejected",
        ),
        // Bodies that are not what they claim.
        ("not JSON, signed", gh(b"hello"), 400, "invalid"),
        (
            "truncated JSON, signed",
            gh(&body[..body.len() / 2]),
            400,
            "invalid",
        ),
        (
            "deeply nested, signed",
            gh(nested.as_bytes()),
            400,
            "invalid",
        ),
        (
            "form without payload, signed",
            gh(b"other=1").header("Content-Type", "application/x-www-form-urlencoded"),
            400,
            "invalid",
        ),
        ("2 MiB body", gh(&big), 413, "too_large"),
        (
            "unknown source",
            Hook {
                source: "jenkins",
                ..gh(&body)
            },
            404,
            "unknown_source",
        ),
    ];
    for (what, hook, status, word) in cases {
        let (got_status, answer) = t.post(&hook).await;
        assert_eq!(
            (got_status, answer["status"].as_str()),
            (status, Some(word)),
            "{what}: {answer}"
        );
    }
    assert!(t.settle().await.is_empty(), "P0 must receive nothing");
    // Nothing was stored either: a replay of every case leaves no job behind.
    assert_eq!(
        t.metric("p0_relay_decisions_total{action=\"approve\",source=\"github\"}")
            .await,
        Some(0.0)
    );
    for table in ["deliveries", "jobs", "answers"] {
        assert_eq!(t.store.rows(table).await, 0, "{table}");
    }
}

#[tokio::test]
async fn an_absurd_expiration_is_clamped_to_the_cap_and_the_answer_says_so() {
    let t = spawn().await;
    t.p0_ok().await;
    let (status, answer) = t
        .post(&gh(&comment("/p0 approve req-1 99999999999d")))
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["decisions"][0]["expiration"], "12h");
    assert_eq!(answer["decisions"][0]["clamped_from"], "99999999999d");
    let calls = t.wait_for_calls(1).await;
    assert_eq!(
        summarize(&calls),
        vec![call("approve", "req-1", json!({"expirationLength": "12h"}))]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_oversized_body_is_refused_before_it_is_read() {
    let t = spawn().await;
    let mut s = raw(
        t.addr,
        5,
        "POST /webhooks/github HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\nContent-Length: 5000000\r\n\r\n",
    );
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
}

#[tokio::test]
async fn a_slow_client_is_cut_off_while_other_deliveries_are_answered() {
    let t = spawn_with(Setup {
        inbound: "  max_connections: 64\n".into(),
        ..Setup::default()
    })
    .await;
    t.p0_ok().await;
    let addr = t.addr;
    // One byte of headers every 200 ms: never finishes within the 2 s deadline.
    let slow = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let started = Instant::now();
        let request = b"POST /webhooks/github HTTP/1.1\r\nHost: relay\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
        for &b in request.iter() {
            if s.write_all(&[b]).is_err() {
                return started.elapsed();
            }
            let mut buf = [0u8; 64];
            match s.read(&mut buf) {
                Ok(0) => return started.elapsed(),
                Ok(_) => return started.elapsed(),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => return started.elapsed(),
            }
            std::thread::sleep(Duration::from_millis(150));
        }
        panic!("the slow client was never cut off");
    });
    // Meanwhile, ordinary deliveries are answered at once.
    for i in 0..5 {
        let started = Instant::now();
        let (status, answer) = t
            .post(&Hook::github(
                "ping",
                &format!("p-{i}"),
                &testdata("github/ping.json"),
                GITHUB_SECRET_NEW,
            ))
            .await;
        assert_eq!(status, 200, "{answer}");
        assert!(started.elapsed() < Duration::from_millis(500));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let cut_after = tokio::task::spawn_blocking(move || slow.join().unwrap())
        .await
        .unwrap();
    assert!(
        cut_after >= Duration::from_millis(1500) && cut_after < Duration::from_secs(6),
        "cut off after {cut_after:?}, deadline is 2s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_is_answered_408() {
    let t = spawn().await;
    let mut s = raw(
        t.addr,
        6,
        "POST /webhooks/github HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
    );
    let started = Instant::now();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert!(started.elapsed() < Duration::from_secs(4));
}

#[tokio::test]
async fn sender_networks_are_enforced_with_a_trusted_proxy_header() {
    let t = spawn_with(Setup {
        inbound: "  networks:\n    github: [203.0.113.0/24]\n    pagerduty: [10.0.0.0/8]\n  client_ip_header: X-Forwarded-For\n".into(),
        ..Setup::default()
    })
    .await;
    let ping = testdata("github/ping.json");
    let allowed = Hook::github("ping", "n-1", &ping, GITHUB_SECRET_NEW)
        .header("X-Forwarded-For", "198.51.100.9, 203.0.113.7");
    let (status, answer) = t.post(&allowed).await;
    assert_eq!(
        (status, answer["status"].as_str()),
        (200, Some("ignored")),
        "{answer}"
    );
    let spoofed = Hook::github("ping", "n-2", &ping, GITHUB_SECRET_NEW)
        .header("X-Forwarded-For", "203.0.113.7, 198.51.100.9");
    let (status, answer) = t.post(&spoofed).await;
    assert_eq!(
        (status, answer["status"].as_str()),
        (403, Some("unauthorized")),
        "{answer}"
    );
    let absent = Hook::github("ping", "n-3", &ping, GITHUB_SECRET_NEW);
    assert_eq!(t.post(&absent).await.0, 403);
    // Opsgenie is not listed, so it is open to every network.
    let og = Hook::opsgenie(&testdata("opsgenie/create.json"));
    assert_eq!(t.post(&og).await.0, 200);
}

trait Tap: Sized {
    fn tap(self, f: impl FnOnce(&mut Self)) -> Self;
}

impl Tap for Hook {
    fn tap(mut self, f: impl FnOnce(&mut Self)) -> Self {
        f(&mut self);
        self
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_are_refused() {
    let t = spawn().await;
    let mut s = TcpStream::connect(t.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let padding = "a".repeat(40 * 1024);
    // The relay may answer and close before all of this is written: a failed write is fine.
    let _ = write!(
        s,
        "POST /webhooks/github HTTP/1.1\r\nHost: relay\r\nX-Padding: {padding}\r\nContent-Length: 2\r\n\r\n{{}}"
    );
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap_or(0);
    let head = String::from_utf8_lossy(&buf[..n]);
    // Either the 431 arrives, or the reset that closed the connection overtook it; what must
    // never come is an answer to the request itself.
    assert!(n == 0 || head.starts_with("HTTP/1.1 431"), "{head}");
    // The relay goes on serving.
    assert_eq!(t.get("/healthz").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_beyond_the_cap_takes_the_place_of_the_oldest_idle_one() {
    let t = spawn_with(Setup {
        inbound: "  max_connections: 2\n".into(),
        ..Setup::default()
    })
    .await;
    // Two idle connections take both places.
    let mut idle: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(t.addr).unwrap())
        .collect();
    // Past the grace a new connection has before it may be closed for another.
    tokio::time::sleep(p0_relay::server::conns::GRACE + Duration::from_millis(50)).await;
    let (status, _) = tokio::time::timeout(Duration::from_secs(2), t.get("/healthz"))
        .await
        .expect("served at once");
    assert_eq!(status, 200);
    // The oldest was closed to make room (the second may have been too, for the probe's own
    // second connection).
    idle[0]
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut buf = [0u8; 16];
    assert!(
        closed(idle[0].read(&mut buf)),
        "the oldest idle connection was closed"
    );
    // The client may open a connection of its own for this: with both places held it closes
    // an idle one past its grace (when none is, it is itself refused), possibly the client's
    // own pooled one as it is reused. So it waits out the grace and tries again.
    let mut read = Err(String::from("not tried"));
    for _ in 0..5 {
        tokio::time::sleep(p0_relay::server::conns::GRACE).await;
        read = match t.http.get(t.url("/metrics")).send().await {
            Ok(r) => r.text().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if read.is_ok() {
            break;
        }
    }
    let answer = read.unwrap_or_else(|e| panic!("metrics unreadable after 5 tries: {e}"));
    let evicted = metric_value(
        &answer,
        "p0_relay_inbound_refused_total{reason=\"evicted\"}",
    );
    assert!(evicted >= Some(1.0), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holds_at_most_its_share_of_the_connections() {
    let t = spawn_with(Setup {
        inbound: "  max_connections: 8\n  max_connections_per_address: 2\n".into(),
        ..Setup::default()
    })
    .await;
    let mut mine: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(t.addr).unwrap())
        .collect();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(std::net::SocketAddr::from(([127, 0, 0, 9], 0)))
        .unwrap();
    let other = socket.connect(t.addr).await.unwrap().into_std().unwrap();
    other.set_nonblocking(false).unwrap();
    tokio::time::sleep(p0_relay::server::conns::GRACE + Duration::from_millis(50)).await;
    // A third from the same address takes the place of that address's oldest idle one.
    let mut third = TcpStream::connect(t.addr).unwrap();
    third
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    let _ = third.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    mine[0]
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut buf = [0u8; 16];
    assert!(closed(mine[0].read(&mut buf)));
    // Another address's connection was left alone.
    other
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut other = other;
    let left = other.read(&mut buf);
    assert!(
        matches!(&left, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut),
        "{left:?}"
    );
    drop(mine);
    let closed = t
        .metric("p0_relay_inbound_refused_total{reason=\"evicted\"}")
        .await;
    assert!(closed >= Some(1.0), "{closed:?}");
}

/// Regression: entries of the proxy header that did not parse were skipped, so a client could
/// append `203.0.113.9:4711` behind a spoofed allowed address and be judged by the spoofed one.
#[tokio::test]
async fn the_last_entry_of_the_proxy_header_decides_and_an_unparsable_one_is_refused() {
    let t = spawn_with(Setup {
        inbound: "  networks:\n    github: [127.0.0.2, \"2001:db8::1\"]\n  client_ip_header: X-Forwarded-For\n".into(),
        ..Setup::default()
    })
    .await;
    let ping = testdata("github/ping.json");
    let post = |xff: Vec<&'static str>| {
        let mut hook = Hook::github("ping", "ip-1", &ping, GITHUB_SECRET_NEW);
        for value in xff {
            hook.headers.push(("X-Forwarded-For".into(), value.into()));
        }
        let t = &t;
        async move { t.post(&hook).await }
    };
    for refused in [
        vec!["127.0.0.2, 203.0.113.9:4711"],
        vec!["127.0.0.2, 203.0.113.9"],
        vec!["127.0.0.2, not-an-address"],
        vec!["127.0.0.2, "],
        vec!["127.0.0.2:4711, [2001:db8::2]:443"],
        vec!["127.0.0.2", "203.0.113.9"],
        vec!["127.0.0.2:99999"],
    ] {
        let (status, answer) = post(refused.clone()).await;
        assert_eq!(
            (status, answer["status"].as_str()),
            (403, Some("unauthorized")),
            "{refused:?}: {answer}"
        );
    }
    for allowed in [
        vec!["127.0.0.2"],
        vec!["203.0.113.9, 127.0.0.2"],
        vec!["203.0.113.9:4711, 127.0.0.2:4711"],
        vec![" 198.51.100.1 ,127.0.0.2 "],
        vec!["2001:db8::1"],
        vec!["[2001:db8::1]:443"],
        vec!["203.0.113.9", "10.0.0.1, 127.0.0.2"],
    ] {
        let (status, answer) = post(allowed.clone()).await;
        assert_eq!(
            (status, answer["status"].as_str()),
            (200, Some("ignored")),
            "{allowed:?}: {answer}"
        );
    }
}

/// Regression: `Semaphore::new` panicked on a huge `p0.concurrency` or
/// `inbound.max_connections` (inside a task, unseen), and durations too long for the store's
/// millisecond clock overflowed its arithmetic.
#[test]
fn absurd_numbers_and_durations_in_relay_yaml_are_refused_naming_the_setting() {
    use p0_relay::config::{Settings, env::Env};
    let dir = tempfile::tempdir().unwrap();
    let env = Env::default().overlay(&test_env(&[]));
    let config = write_config(
        dir.path(),
        "http://127.0.0.1:9",
        &Setup {
            p0_extra: "    max_age: 1000000000y\n  concurrency: 18446744073709551615\n".into(),
            inbound: "  max_connections: 18446744073709551615\n  body_budget_bytes: 4096\n  body_timeout: 0s\n  body_min_rate: 0\n".into(),
            ..Setup::default()
        },
    );
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("store:\n", "store:\n  dedup_window: 1000000000y\n")
        .replace("timeout: 2s", "timeout: 0s");
    std::fs::write(&config, text).unwrap();
    let errors = Settings::load(&config, &env)
        .expect_err("refused")
        .join("\n");
    let at = config.display().to_string();
    for setting in [
        "p0.concurrency: must be at most 1024",
        "inbound.max_connections: must be at most 1000000",
        "store.dedup_window: must be at most 3650d",
        "p0.retry.max_age: must be at most 3650d",
        "p0.timeout: must be more than zero",
        "inbound.body_budget_bytes: must be at least inbound.max_body_bytes (1048576), not 4096",
        "inbound.body_timeout: must be more than zero",
        "inbound.body_min_rate: must be at least 1",
    ] {
        assert!(
            errors.contains(&format!("{at}: {setting}")),
            "{setting}:\n{errors}"
        );
    }
}

/// Regression: holding a connection until its answer is written made answers chunked; a
/// sender gets its answer with its length, as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_comes_with_its_length() {
    let t = spawn().await;
    let mut s = raw(
        t.addr,
        5,
        "POST /webhooks/github HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}",
    );
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    let head = answer.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 401"), "{answer}");
    assert!(head.contains("\r\ncontent-length: "), "{answer}");
    assert!(!head.contains("transfer-encoding"), "{answer}");
}

/// A connection to `addr` that has sent `request` as written, and waits `secs` at most for
/// each read.
fn raw(addr: std::net::SocketAddr, secs: u64, request: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(secs))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    s
}

/// A read from a socket the relay closed: its end (or a reset), not the read timeout.
fn closed(read: std::io::Result<usize>) -> bool {
    match read {
        Ok(n) => n == 0,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}
