//! Several relay processes on one PostgreSQL database, seen from outside: the same delivery
//! posted to three relays at once, a storm over three relays with one killed by SIGKILL, and
//! the database cut off and back. Skipped with a notice without PostgreSQL at 127.0.0.1:5432
//! (a failure when CI=true).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::common::pg::{Proxy, TestDb};
use crate::common::*;
use serde_json::Value;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

/// A GitHub comment command with its own comment ID and delivery ID (so that it is a new
/// delivery whichever of the two the mapping keys on).
fn command(n: u64, text: &str) -> Hook {
    let mut v: Value = serde_json::from_slice(&github_comment(text, "octocat")).unwrap();
    v["comment"]["id"] = (5_000_000 + n).into();
    let body = serde_json::to_vec(&v).unwrap();
    Hook::github(
        "issue_comment",
        &format!("72d3162e-cc78-11e3-81ab-{n:012}"),
        &body,
        GITHUB_SECRET_NEW,
    )
}

/// Request ID → how many calls P0 received for it.
fn per_request(calls: &[wiremock::Request]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for c in calls {
        let id = c
            .url
            .path_segments()
            .and_then(|s| s.rev().nth(1))
            .unwrap_or("")
            .to_owned();
        *counts.entry(id).or_insert(0) += 1;
    }
    counts
}

struct Fleet {
    relays: Vec<BinRelay>,
    _dirs: Vec<tempfile::TempDir>,
}

/// `n` relay processes on the database at `url`, calling the fake P0 at `p0`.
async fn fleet(n: usize, url: &str, p0: &str) -> Fleet {
    fleet_with(n, url, p0, &[], "3s").await
}

async fn fleet_with(n: usize, url: &str, p0: &str, vars: &[(&str, &str)], lease: &str) -> Fleet {
    let mut relays = Vec::new();
    let mut dirs = Vec::new();
    for _ in 0..n {
        let dir = tempfile::tempdir().unwrap();
        let setup = Setup {
            store_url: Some(url.to_owned()),
            store_extra: format!("  claim_lease: {lease}\n"),
            p0_extra: "  concurrency: 4\n".into(),
            ..Setup::default()
        };
        let config = write_config(dir.path(), p0, &setup);
        let log = dir.path().join("relay.log");
        relays.push(BinRelay::start(&config, &test_env(vars), log, &[]).await);
        dirs.push(dir);
    }
    Fleet {
        relays,
        _dirs: dirs,
    }
}

async fn p0_ok(delay: Duration) -> MockServer {
    let p0 = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(serde_json::json!({"ok": true}))
                .set_delay(delay),
        )
        .mount(&p0)
        .await;
    p0
}

/// Waits (up to `limit`) until P0 has been called for every request in `wanted`.
async fn wait_for_requests(p0: &MockServer, wanted: &[String], limit: Duration) {
    let started = Instant::now();
    loop {
        let seen = per_request(&p0.received_requests().await.unwrap_or_default());
        let missing: Vec<&String> = wanted.iter().filter(|r| !seen.contains_key(*r)).collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            started.elapsed() < limit,
            "acknowledged but never sent to P0: {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_delivery_posted_to_three_relays_at_once_is_accepted_once_and_sent_once() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let p0 = p0_ok(Duration::ZERO).await;
    let fleet = fleet(3, &db.url(), &p0.uri()).await;
    let r = &fleet.relays;
    let rounds = 5;
    for n in 0..rounds {
        let hook = command(n, &format!("/p0 approve req-{n} 2h"));
        let (a, b, c) = tokio::join!(r[0].post(&hook), r[1].post(&hook), r[2].post(&hook));
        let answers = [a, b, c];
        let accepted: Vec<&Value> = answers
            .iter()
            .filter(|(s, _)| *s == 202)
            .map(|(_, a)| a)
            .collect();
        let duplicates: Vec<&Value> = answers
            .iter()
            .filter(|(s, a)| *s == 200 && a["status"] == "duplicate")
            .map(|(_, a)| a)
            .collect();
        assert_eq!(
            (accepted.len(), duplicates.len()),
            (1, 2),
            "round {n}: {answers:?}"
        );
        let job = &accepted[0]["decisions"][0]["job_id"];
        for d in duplicates {
            assert_eq!(
                d["job_ids"],
                serde_json::json!([job]),
                "the duplicate names the original job"
            );
        }
    }
    let wanted: Vec<String> = (0..rounds).map(|n| format!("req-{n}")).collect();
    wait_for_requests(&p0, &wanted, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let calls = p0.received_requests().await.unwrap_or_default();
    assert_eq!(
        summarize(&calls).len(),
        rounds as usize,
        "one call per decision: {:?}",
        per_request(&calls)
    );
    for c in summarize(&calls) {
        assert!(c.0.ends_with("/approve"), "{c:?}");
        assert_eq!(c.2, serde_json::json!({"expirationLength": "2h"}));
    }
    // Each stops cleanly on SIGTERM.
    for relay in fleet.relays {
        relay.signal("TERM");
        assert_eq!(relay.wait(), Some(0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_over_three_relays_with_one_killed_loses_nothing_acknowledged() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    // P0 takes a moment per call, so the killed relay has calls in flight.
    let p0 = p0_ok(Duration::from_millis(40)).await;
    let fleet = fleet(3, &db.url(), &p0.uri()).await;
    let bases: Vec<String> = fleet
        .relays
        .iter()
        .map(|r| format!("http://{}", r.addr))
        .collect();
    let total: u64 = 240;
    let kill_at = total / 3;
    let http = client();
    let mut acknowledged = Vec::new();
    let mut killed = false;
    // Eight senders at a time, round robin over the relays, as a load balancer would.
    for chunk in (0..total).collect::<Vec<_>>().chunks(8) {
        if !killed && chunk[0] >= kill_at {
            fleet.relays[1].signal("KILL");
            killed = true;
        }
        let posts = chunk.iter().map(|&n| {
            let http = http.clone();
            let base = bases[(n % 3) as usize].clone();
            async move {
                let hook = command(n, &format!("/p0 revoke storm-{n}"));
                let req = http.post(format!("{base}/webhooks/github"));
                let req = hook.headers.iter().fold(req, |r, (k, v)| r.header(k, v));
                let status = match req.body(hook.body.clone()).send().await {
                    Ok(resp) => resp.status().as_u16(),
                    Err(_) => 0,
                };
                (n, status)
            }
        });
        for (n, status) in futures_join_all(posts).await {
            if status == 202 {
                acknowledged.push(format!("storm-{n}"));
            } else {
                assert!(
                    killed && n % 3 == 1,
                    "only the killed relay fails to answer: {n} got {status}"
                );
            }
        }
    }
    assert!(acknowledged.len() >= (total as usize) * 2 / 3);
    // The killed relay's claims come back after their lease (3 s) and are sent by the others.
    wait_for_requests(&p0, &acknowledged, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let counts = per_request(&p0.received_requests().await.unwrap_or_default());
    let twice: Vec<(&String, &usize)> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.len() <= 4 && twice.iter().all(|(_, n)| **n == 2),
        "only calls in flight at the kill (at most the relay's 4) may be sent again: {twice:?}"
    );
    let started = Instant::now();
    while db
        .query_i64("SELECT COUNT(*) FROM jobs WHERE state <> 'succeeded'")
        .await
        > 0
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "every decision finishes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `join_all` without another dependency: runs the futures concurrently in tasks.
async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_database_cut_off_nothing_is_acknowledged_and_accepts_resume_by_themselves() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let proxy = Proxy::start(db.server()).await;
    let p0 = p0_ok(Duration::ZERO).await;
    // A password in the URL (the server trusts local connections and ignores it) must not
    // show in any log line, even at debug level and through connection errors.
    let password = "pw-outage-7c1e";
    let url = db
        .url_via(proxy.addr)
        .replace("postgres@", &format!("postgres:{password}@"));
    let fleet = fleet_with(2, &url, &p0.uri(), &[("RUST_LOG", "debug")], "3s").await;
    let r = &fleet.relays;
    let mut acknowledged = Vec::new();
    let mut n = 0;
    for relay in r {
        let (status, answer) = relay
            .post(&command(n, &format!("/p0 revoke out-{n}")))
            .await;
        assert_eq!(status, 202, "{answer}");
        acknowledged.push(format!("out-{n}"));
        n += 1;
    }

    // A stream of webhooks runs through the cut and the return: whatever was answered 202
    // must reach P0, whatever else is 503.
    let stream_bases: Vec<String> = r.iter().map(|x| format!("http://{}", x.addr)).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stream = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let http = client();
            let (mut acked, mut statuses) = (Vec::new(), BTreeMap::new());
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let hook = command(10_000 + i, &format!("/p0 revoke stream-{i}"));
                let base = &stream_bases[(i % 2) as usize];
                let (status, _) = answer(send(&http, base, &hook).await).await;
                *statuses.entry(status).or_insert(0) += 1;
                if status == 202 {
                    acked.push(format!("stream-{i}"));
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (acked, statuses)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.cut().await;
    let http = client();
    for i in 0..6 {
        let relay = &r[i % 2];
        let hook = command(n, &format!("/p0 revoke out-{n}"));
        let resp = send(&http, &format!("http://{}", relay.addr), &hook).await;
        let retry_after = resp
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap_or("").to_owned());
        let (status, answer) = answer(resp).await;
        assert_eq!(status, 503, "no 202 while the database is gone: {answer}");
        assert!(
            retry_after.is_some_and(|s| s.parse::<u64>().is_ok_and(|s| s > 0)),
            "503 says when to retry"
        );
        n += 1;
    }
    for relay in r {
        let (status, body) = get_status(&format!("http://{}/readyz", relay.addr)).await;
        assert_eq!(status, 503, "{body}");
    }

    proxy.restore();
    // Each relay accepts again by itself within seconds (its pool reconnects).
    for relay in r {
        let started = Instant::now();
        loop {
            let hook = command(n, &format!("/p0 revoke out-{n}"));
            let (status, answer) = relay.post(&hook).await;
            if status == 202 {
                acknowledged.push(format!("out-{n}"));
                n += 1;
                break;
            }
            assert_eq!(status, 503, "{answer}");
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "accepts did not resume: {answer}"
            );
            n += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (streamed, statuses) = stream.await.unwrap();
    assert!(
        statuses.keys().all(|s| *s == 202 || *s == 503),
        "{statuses:?}"
    );
    assert!(statuses.get(&503).is_some_and(|n| *n > 0), "{statuses:?}");
    acknowledged.extend(streamed);
    for relay in r {
        let (status, answer) = relay
            .post(&command(n, &format!("/p0 revoke out-{n}")))
            .await;
        assert_eq!(status, 202, "{answer}");
        acknowledged.push(format!("out-{n}"));
        n += 1;
        let (status, body) = get_status(&format!("http://{}/readyz", relay.addr)).await;
        assert_eq!(status, 200, "ready again: {body}");
    }
    // Nothing acknowledged was lost, before, during or after the outage.
    wait_for_requests(&p0, &acknowledged, Duration::from_secs(15)).await;
    for relay in r {
        let log = std::fs::read_to_string(&relay.log).unwrap();
        assert!(log.contains("store unavailable"), "the outage is logged");
        assert!(!log.contains(password), "the password leaked into the log");
        let metrics = get_status(&format!("http://{}/metrics", relay.addr))
            .await
            .1;
        assert!(!metrics.contains(password));
    }
}

async fn get_status(url: &str) -> (u16, String) {
    let resp = client().get(url).send().await.expect("get");
    (
        resp.status().as_u16(),
        resp.text().await.unwrap_or_default(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_list_show_and_replay_work_against_the_database_url() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let p0 = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(400)
                .set_body_json(serde_json::json!({"error": "Invalid or expired request"})),
        )
        .up_to_n_times(1)
        .mount(&p0)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({"ok": true})))
        .mount(&p0)
        .await;
    let fleet = fleet(1, &db.url(), &p0.uri()).await;
    let (status, answer) = fleet.relays[0].post(&command(1, "/p0 deny req-cli")).await;
    assert_eq!(status, 202, "{answer}");
    let job = answer["decisions"][0]["job_id"]
        .as_i64()
        .unwrap()
        .to_string();
    let url = db.url();
    let vars = std::collections::HashMap::new();
    let mut out = String::new();
    for _ in 0..100 {
        out = run_cli(
            &["jobs", "list", "--db", &url, "--state", "rejected"],
            &vars,
        )
        .1;
        if out.contains("req-cli") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        out.contains("rejected") && out.contains("400 Invalid or expired request"),
        "{out}"
    );
    let (code, out) = run_cli(&["jobs", "show", &job, "--db", &url], &vars);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("job {job}: deny req-cli in org acme (rejected)")),
        "{out}"
    );
    assert!(out.contains("rejected     status 400"), "{out}");
    let (code, out) = run_cli(&["jobs", "replay", &job, "--db", &url], &vars);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(&format!("queued again: [{job}]")), "{out}");
    // The running relay is woken by the replay and sends it again.
    wait_for_requests(&p0, &["req-cli".to_owned()], Duration::from_secs(5)).await;
    let started = Instant::now();
    while p0.received_requests().await.unwrap_or_default().len() < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "replayed call not sent"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The password never shows; a bad URL is an error naming the option.
    let (code, out) = run_cli(&["jobs", "list", "--db", "mysql://root:pw-9@db/x"], &vars);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("--db") && !out.contains("pw-9"), "{out}");
}

/// A revoke posted to one relay while another relay's call approving the same request is
/// under way waits its turn, and goes as soon as that call ends: the relay sending the
/// approve learns, when the revoke's notice wakes it, that a decision waits behind its call,
/// and looks again when the call ends (neither relay waits for its next poll, 500 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_posted_to_another_relay_goes_as_soon_as_the_one_before_it_ends() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let p0 = MockServer::start().await;
    let fleet = fleet(2, &db.url(), &p0.uri()).await;
    let [a, b] = [0, 1].map(|i| format!("http://{}", fleet.relays[i].addr));
    approve_then_revoke_promptly(&p0, "elsewhere", &a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_longer_than_the_lease_is_not_sent_twice() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    // P0 takes 1.8 s; the lease is 1 s. The relay that claimed the decision renews its lease
    // while the call is under way, so the other relay never takes it over.
    let p0 = p0_ok(Duration::from_millis(1800)).await;
    let fleet = fleet_with(2, &db.url(), &p0.uri(), &[], "1s").await;
    let (status, answer) = fleet.relays[0].post(&command(7, "/p0 revoke slow-1")).await;
    assert_eq!(status, 202, "{answer}");
    let started = Instant::now();
    while db
        .query_i64("SELECT COUNT(*) FROM jobs WHERE state = 'succeeded'")
        .await
        < 1
    {
        assert!(started.elapsed() < Duration::from_secs(10), "not delivered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let calls = p0.received_requests().await.unwrap_or_default();
    assert_eq!(calls.len(), 1, "one call: {:?}", per_request(&calls));
    assert_eq!(
        db.query_i64("SELECT COUNT(*) FROM attempts").await,
        1,
        "one attempt recorded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_that_cannot_be_recorded_in_an_outage_is_recorded_after_it_not_sent_again() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let proxy = Proxy::start(db.server()).await;
    let p0 = p0_ok(Duration::from_millis(1500)).await;
    let fleet = fleet_with(1, &db.url_via(proxy.addr), &p0.uri(), &[], "30s").await;
    let (status, answer) = fleet.relays[0]
        .post(&command(9, "/p0 revoke in-flight-1"))
        .await;
    assert_eq!(status, 202, "{answer}");
    // The call is under way; the database goes away before its answer comes back.
    let started = Instant::now();
    while p0.received_requests().await.unwrap_or_default().is_empty() {
        assert!(started.elapsed() < Duration::from_secs(5), "no call");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.cut().await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    proxy.restore();
    // Recorded once the database is back, well within the lease: not sent a second time.
    let started = Instant::now();
    while db
        .query_i64("SELECT COUNT(*) FROM jobs WHERE state = 'succeeded'")
        .await
        < 1
    {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "outcome not recorded after the outage"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(p0.received_requests().await.unwrap_or_default().len(), 1);
    assert_eq!(db.query_i64("SELECT COUNT(*) FROM attempts").await, 1);
}
