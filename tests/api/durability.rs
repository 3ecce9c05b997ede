//! Nothing lost, nothing twice: retries, an unreachable P0, a kill -9 between accepting and
//! forwarding, duplicate deliveries and decisions, final rejections, dead letters and replay.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::json;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

fn ids(calls: &[wiremock::Request]) -> BTreeMap<String, usize> {
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

#[tokio::test]
async fn five_503s_then_200_make_exactly_one_successful_call() {
    let t = spawn().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503).insert_header("Retry-After", "0"))
        .up_to_n_times(5)
        .with_priority(1)
        .mount(&t.p0)
        .await;
    t.p0_ok().await;
    let (status, _) = t.post(&Hook::comment("r-1", "/p0 approve req-1 2h")).await;
    assert_eq!(status, 202);
    let calls = t.wait_for_calls(6).await;
    assert_eq!(
        t.settle().await.len(),
        6,
        "five failures and one success, nothing more"
    );
    assert!(
        summarize(&calls)
            .iter()
            .all(|c| *c == call("approve", "req-1", json!({"expirationLength": "2h"})))
    );
    t.wait_metric(
        "p0_relay_p0_requests_total{action=\"approve\",result=\"success\"}",
        1.0,
    )
    .await;
    t.wait_metric("p0_relay_queue_depth", 0.0).await;
    let m = |l: &'static str| {
        let t = &t;
        async move { t.metric(l).await }
    };
    assert_eq!(
        m("p0_relay_p0_requests_total{action=\"approve\",result=\"transient\"}").await,
        Some(5.0)
    );
    assert_eq!(
        m("p0_relay_p0_requests_total{action=\"approve\",result=\"success\"}").await,
        Some(1.0)
    );
    assert_eq!(m("p0_relay_retries_total").await, Some(5.0));
    assert_eq!(m("p0_relay_queue_depth").await, Some(0.0));
}

#[tokio::test]
async fn webhooks_accepted_while_p0_is_unreachable_all_arrive_once_it_is_back() {
    // Nothing listens on this port until P0 "comes back".
    let port = free_port();
    let setup = Setup {
        p0_extra: "  concurrency: 8\n".into(),
        ..Setup::default()
    };
    let p0_url = format!("http://127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &p0_url, &setup);
    let env = p0_relay::config::env::Env::default().overlay(&test_env(&[]));
    let settings = p0_relay::config::Settings::load(&config, &env).unwrap();
    let relay = p0_relay::app::Relay::start(settings, env, Default::default())
        .await
        .unwrap();
    let http = client();
    for i in 0..50 {
        let hook = Hook::comment(&format!("down-{i}"), &format!("/p0 approve req-{i} 1h"));
        let resp = send(&http, &format!("http://{}", relay.addr), &hook).await;
        assert_eq!(resp.status().as_u16(), 202);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let p0 = MockServer::builder().listener(listener).start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&p0)
        .await;
    let store = StoreAt::Sqlite(dir.path().join("relay.db"));
    let counts = ids(&store.received(&p0, 50).await);
    assert_eq!(counts.len(), 50, "every decision arrived: {counts:?}");
    assert!(counts.values().all(|&n| n == 1), "none twice: {counts:?}");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_every_accepted_decision_reaches_p0_once_except_those_in_flight() {
    // P0 "A" holds every call for 30 s, so calls in flight at the kill never complete.
    let slow = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(30)))
        .mount(&slow)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        p0_extra: "  concurrency: 2\n".into(),
        ..Setup::default()
    };
    let config = write_config(dir.path(), &slow.uri(), &setup);
    let vars = test_env(&[]);
    let log = dir.path().join("relay.log");
    let relay = BinRelay::start(&config, &vars, log.clone(), &[]).await;
    for i in 0..20 {
        let (status, answer) = relay
            .post(&Hook::comment(
                &format!("k-{i}"),
                &format!("/p0 revoke req-{i}"),
            ))
            .await;
        assert_eq!(status, 202, "{answer}");
    }
    relay.signal("KILL");
    relay.wait();
    let in_flight = ids(&slow.received_requests().await.unwrap_or_default());
    assert!(
        in_flight.len() <= 2,
        "at most `concurrency` calls were in flight: {in_flight:?}"
    );

    // Restarted on the same store against a P0 "B" that answers at once.
    let fast = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&fast)
        .await;
    let config = write_config(dir.path(), &fast.uri(), &setup);
    let relay = BinRelay::start(&config, &vars, log.clone(), &[]).await;
    let counts = ids(&relay.store.received(&fast, 20).await);
    assert_eq!(
        counts.len(),
        20,
        "every accepted decision reached P0: {counts:?}"
    );
    assert!(
        counts.values().all(|&n| n == 1),
        "none twice after the restart: {counts:?}"
    );
    relay.signal("TERM");
    assert_eq!(relay.wait(), Some(0));
}

#[tokio::test]
async fn the_same_delivery_twice_and_the_same_decision_twice_each_make_one_call() {
    let t = spawn().await;
    t.p0_ok().await;
    let hook = Hook::comment("dup-1", "/p0 approve req-1 2h");
    let (s1, a1) = t.post(&hook).await;
    let (s2, a2) = t.post(&hook).await;
    assert_eq!((s1, s2), (202, 200));
    assert_eq!(a2["status"], "duplicate");
    assert_eq!(a2["job_ids"], json!([a1["decisions"][0]["job_id"]]));
    // Another delivery carrying the same decision is coalesced onto the first job.
    let (s3, a3) = t
        .post(&Hook::comment("dup-2", "/p0 approve req-1 2h"))
        .await;
    assert_eq!(s3, 202, "{a3}");
    assert_eq!(a3["decisions"][0]["coalesced"], true);
    assert_eq!(a3["decisions"][0]["job_id"], a1["decisions"][0]["job_id"]);
    t.wait_for_calls(1).await;
    assert_eq!(t.settle().await.len(), 1);
    assert_eq!(
        t.metric("p0_relay_webhooks_total{outcome=\"duplicate\",source=\"github\"}")
            .await,
        Some(1.0)
    );
}

#[tokio::test]
async fn approve_revoke_approve_is_three_calls() {
    let t = spawn().await;
    t.p0_ok().await;
    for (i, cmd) in [
        "/p0 approve req-1 1h",
        "/p0 revoke req-1",
        "/p0 approve req-1 1h",
    ]
    .iter()
    .enumerate()
    {
        assert_eq!(
            t.post(&Hook::comment(&format!("arb-{i}"), cmd)).await.0,
            202
        );
        t.wait_for_calls(i + 1).await;
    }
    let calls = t.settle().await;
    let paths: Vec<String> = summarize(&calls).into_iter().map(|c| c.0).collect();
    assert_eq!(
        paths,
        ["approve", "revoke", "approve"].map(|a| format!("/o/{ORG}/permission-requests/req-1/{a}"))
    );
}

#[tokio::test]
async fn a_400_from_p0_is_final_and_visible_in_jobs_show() {
    let t = spawn().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(400)
                .set_body_json(json!({"error": "Invalid or expired request"})),
        )
        .mount(&t.p0)
        .await;
    let (status, answer) = t.post(&Hook::comment("bad-1", "/p0 deny req-gone")).await;
    assert_eq!(status, 202);
    let job = answer["decisions"][0]["job_id"].as_i64().unwrap();
    t.wait_for_calls(1).await;
    assert_eq!(t.settle().await.len(), 1, "never retried");
    let db = t.dir.path().join("relay.db");
    wait_for_state(&db, job, "rejected").await;
    let (code, out) = run_cli(
        &[
            "jobs",
            "--db",
            db.to_str().unwrap(),
            "show",
            &job.to_string(),
        ],
        &Default::default(),
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("job {job}: deny req-gone in org {ORG} (rejected)")),
        "{out}"
    );
    assert!(
        out.contains("last error: Invalid or expired request"),
        "{out}"
    );
    assert!(out.contains("rejected     status 400"), "{out}");
    let (_, list) = run_cli(
        &[
            "jobs",
            "--db",
            db.to_str().unwrap(),
            "list",
            "--state",
            "rejected",
        ],
        &Default::default(),
    );
    assert!(list.contains("req-gone"), "{list}");
}

/// An approve P0 refused, then a revoke of the same request: replaying the approve would undo
/// the revoke, so `jobs replay` leaves it, says why, and fails; P0 hears nothing more.
#[tokio::test]
async fn jobs_replay_refuses_a_decision_a_later_one_has_overtaken() {
    let t = spawn().await;
    Mock::given(method("POST"))
        .and(wiremock::matchers::path_regex(r"/approve$"))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({"error": "expired"})))
        .with_priority(1)
        .mount(&t.p0)
        .await;
    t.p0_ok().await;
    let approve = Hook::comment("overtaken-1", "/p0 approve req-overtaken 2h");
    let revoke = Hook::comment("overtaken-2", "/p0 revoke req-overtaken");
    let calls = t.deliver(&[approve, revoke]).await;
    assert_eq!(
        calls,
        vec![
            call(
                "approve",
                "req-overtaken",
                json!({"expirationLength": "2h"})
            ),
            call("revoke", "req-overtaken", json!({})),
        ]
    );
    let db = t.dir.path().join("relay.db");
    wait_for_state(&db, 1, "rejected").await;
    wait_for_state(&db, 2, "succeeded").await;
    let (code, out) = run_cli(
        &["jobs", "--db", db.to_str().unwrap(), "replay", "1"],
        &Default::default(),
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(
            "job 1 (approve) not replayed: job 2, a later revoke of the same request, would be undone by it"
        ),
        "{out}"
    );
    assert_eq!(t.settle().await.len(), 2, "nothing more reaches P0");
    wait_for_state(&db, 1, "rejected").await;
}

#[tokio::test]
async fn a_dead_letter_is_delivered_by_jobs_replay() {
    let t = spawn_with(Setup {
        p0_extra: "  concurrency: 4\n".into(),
        ..Setup::default()
    })
    .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(401).set_body_json(json!({"error": "Unauthorized"})))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&t.p0)
        .await;
    t.p0_ok().await;
    let (_, answer) = t
        .post(&Hook::comment("dead-1", "/p0 approve req-7 3h"))
        .await;
    let job = answer["decisions"][0]["job_id"].as_i64().unwrap();
    t.wait_for_calls(1).await;
    assert_eq!(t.settle().await.len(), 1, "a 401 is not retried");
    t.wait_metric("p0_relay_dead_letters", 1.0).await;
    t.wait_metric("p0_relay_p0_token_rejected", 1.0).await;
    // Still ready: deliveries are stored durably. The body says what P0 said of the token.
    let (status, ready) = t.get("/readyz").await;
    assert_eq!(status, 200, "{ready}");
    let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
    assert_eq!(ready["p0_token"], "rejected", "{ready}");
    assert!(
        ready["warnings"][0]
            .as_str()
            .unwrap()
            .starts_with("P0 rejected the API token (401)"),
        "{ready}"
    );

    let db = t.dir.path().join("relay.db");
    let (code, out) = run_cli(
        &[
            "jobs",
            "--db",
            db.to_str().unwrap(),
            "replay",
            &job.to_string(),
        ],
        &Default::default(),
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(&format!("queued again: [{job}]")), "{out}");
    let calls = t.wait_for_calls(2).await;
    assert_eq!(
        summarize(&calls)[1],
        call("approve", "req-7", json!({"expirationLength": "3h"}))
    );
    assert_eq!(
        t.get("/readyz").await.0,
        200,
        "a success shows the token works again"
    );
    let detail = wait_for_state(&db, job, "succeeded").await;
    assert_eq!(detail.attempts.len(), 2);
}

#[tokio::test]
async fn transient_failures_past_the_attempt_limit_are_dead_lettered() {
    let t = spawn_with(Setup {
        p0_extra: "    max_attempts: 3\n".into(),
        ..Setup::default()
    })
    .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500))
        .mount(&t.p0)
        .await;
    let (_, answer) = t.post(&Hook::comment("lim-1", "/p0 approve req-8")).await;
    let job = answer["decisions"][0]["job_id"].as_i64().unwrap();
    t.wait_for_calls(3).await;
    assert_eq!(t.settle().await.len(), 3);
    wait_for_state(&t.dir.path().join("relay.db"), job, "dead").await;
}

#[tokio::test]
async fn a_stop_lets_calls_in_flight_finish() {
    let mut t = spawn().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_millis(600)))
        .mount(&t.p0)
        .await;
    let (_, answer) = t.post(&Hook::comment("stop-1", "/p0 revoke req-9")).await;
    let job = answer["decisions"][0]["job_id"].as_i64().unwrap();
    t.wait_for_calls(1).await;
    t.stop().await;
    let detail = reader(&t.dir.path().join("relay.db"))
        .await
        .show(job)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        detail.job.state, "succeeded",
        "the call in flight was finished and recorded"
    );
}

/// Another process holds the store's write lock (a `jobs` command gone astray, a backup tool):
/// the real relay cannot commit, so it answers 503 with `Retry-After` and `/readyz` says why;
/// once the lock is gone the same delivery is accepted.
#[tokio::test]
async fn a_store_that_cannot_write_answers_503_and_readyz_says_why() {
    let t = spawn().await;
    t.p0_ok().await;
    let db = t.dir.path().join("relay.db");
    let lock = rusqlite::Connection::open(&db).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let hook = Hook::comment("s-1", "/p0 approve req-1");
    let resp = send(&t.http, &t.url(""), &hook).await;
    assert_eq!(resp.status().as_u16(), 503);
    assert_eq!(
        resp.headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("5")
    );
    let (_, body) = answer(resp).await;
    assert_eq!(body["status"], "unavailable", "{body}");
    let (status, ready) = t.get("/readyz").await;
    assert_eq!(status, 503, "{ready}");
    assert!(
        ready.contains("store not writable") && ready.contains("database is locked"),
        "{ready}"
    );
    assert!(t.p0_calls().await.is_empty());

    lock.execute_batch("ROLLBACK").unwrap();
    let (status, body) = t.post(&hook).await;
    assert_eq!(
        status, 202,
        "nothing was stored by the refused attempt: {body}"
    );
    assert_eq!(body["decisions"][0]["job_id"], 1, "{body}");
    t.wait_for_calls(1).await;
}

/// Regression: P0 answering 503 three times and then 429 with `Retry-After:
/// 18446744073709551615` overflowed `age + delay` and panicked the call's task, which left the
/// decision `sending` for good.
#[tokio::test]
async fn an_absurd_retry_after_is_capped_at_max_delay() {
    let t = spawn().await;
    // Slow 503s age the decision past a second, as real retries would.
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503).set_delay(Duration::from_millis(400)))
        .up_to_n_times(3)
        .with_priority(1)
        .mount(&t.p0)
        .await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(429).insert_header("Retry-After", "18446744073709551615"),
        )
        .up_to_n_times(1)
        .with_priority(2)
        .mount(&t.p0)
        .await;
    t.p0_ok().await;
    let (_, answer) = t.post(&Hook::comment("ra-1", "/p0 revoke req-ra")).await;
    let job = answer["decisions"][0]["job_id"].as_i64().unwrap();
    let calls = t.wait_for_calls(5).await;
    assert_eq!(
        summarize(&calls)[4],
        call("revoke", "req-ra", json!({})),
        "retried after max_delay (50 ms), not never"
    );
    let detail = wait_for_state(&t.dir.path().join("relay.db"), job, "succeeded").await;
    let statuses: Vec<Option<u16>> = detail.attempts.iter().map(|a| a.status).collect();
    assert_eq!(
        statuses,
        [Some(503), Some(503), Some(503), Some(429), Some(200)]
    );
}

/// Waits (up to 20 s) until `/readyz` (ready all along) tells the token is `state`, and
/// returns its body.
async fn wait_token(t: &TestRelay, state: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (got, body) = t.get("/readyz").await;
        assert_eq!(got, 200, "a token is never a reason to be unready: {body}");
        if body.contains(&format!("\"p0_token\":\"{state}\"")) {
            return body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "token never {state}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (up to 20 s) until `/readyz` answers `status`, and returns its body.
async fn wait_ready_status(t: &TestRelay, status: u16) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (got, body) = t.get("/readyz").await;
        if got == status {
            return body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "readyz stayed {got}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Regression: the store flag of `/readyz` was set by a failed accept and cleared only by a
/// later successful one, which a not-ready relay never gets. Now a probe sets and clears it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_store_both_ways_without_traffic() {
    let t = spawn().await;
    t.p0_ok().await;
    assert_eq!(t.get("/readyz").await.0, 200);
    let db = t.dir.path().join("relay.db");
    // Another writer holds the store's write lock: the relay cannot commit.
    let other = rusqlite::Connection::open(&db).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let (status, answer) = t.post(&Hook::comment("lock-1", "/p0 revoke req-l")).await;
    assert_eq!(status, 503, "{answer}");
    let body = wait_ready_status(&t, 503).await;
    assert!(body.contains("store not writable"), "{body}");
    other.execute_batch("ROLLBACK").unwrap();
    // Ready again by itself, with no webhook to prove it.
    wait_ready_status(&t, 200).await;

    // The probe alone notices a store that cannot write, with nothing posted.
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let body = wait_ready_status(&t, 503).await;
    assert!(body.contains("store not writable"), "{body}");
    other.execute_batch("ROLLBACK").unwrap();
    wait_ready_status(&t, 200).await;
    assert_eq!(
        t.post(&Hook::comment("lock-2", "/p0 revoke req-l")).await.0,
        202
    );
}

/// Regression: a worker, reloader, pruner or server that panicked was invisible; the relay
/// went on answering 202 with nothing delivering. Now the relay stops with the failure, and
/// `serve` turns it into a non-zero exit.
#[tokio::test]
async fn a_part_of_the_relay_that_panics_stops_it_with_a_failure() {
    for name in ["server", "worker", "reloader", "store-probe", "pruner"] {
        let mut t = spawn_with(Setup {
            panic_in: Some(name),
            ..Setup::default()
        })
        .await;
        let relay = t.relay.take().unwrap();
        let failure = tokio::time::timeout(Duration::from_secs(10), relay.wait())
            .await
            .expect("the relay stops by itself")
            .expect_err("a failure");
        assert_eq!(failure.component, name);
        assert_eq!(
            failure.reason,
            format!("panicked: injected fault in `{name}`")
        );
    }
}

/// Regression: `serve` kept running, and exited 0 when stopped, after a part of it had
/// panicked. Debug builds (the test suite's) take `P0_RELAY_TEST_PANIC_IN` to fail a part on
/// purpose.
#[test]
fn serve_exits_non_zero_when_a_part_of_the_relay_fails() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "http://127.0.0.1:9", &Setup::default());
    let vars = test_env(&[("P0_RELAY_TEST_PANIC_IN", "worker")]);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_p0-relay"))
        .env_clear()
        .envs(&vars)
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("serve went on running after a part of it failed");
        }
        std::thread::sleep(Duration::from_millis(25));
    };
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(
        text.contains("the relay stopped because `worker` panicked: injected fault in `worker`"),
        "{text}"
    );
}

/// What clears the token flag of a relay that balancers have taken out of rotation: work it
/// already holds. A retry of an earlier decision that P0 now answers 200 makes it ready again,
/// with no webhook posted after the 401.
#[tokio::test]
async fn a_rejected_token_is_cleared_by_the_next_success_from_stored_work() {
    use wiremock::matchers::path_regex;
    let t = spawn().await;
    Mock::given(method("POST"))
        .and(path_regex("req-tok-x"))
        .respond_with(ResponseTemplate::new(401).set_body_json(json!({"error": "Unauthorized"})))
        .mount(&t.p0)
        .await;
    Mock::given(method("POST"))
        .and(path_regex("req-tok-y"))
        .respond_with(ResponseTemplate::new(500).set_delay(Duration::from_millis(150)))
        .up_to_n_times(8)
        .with_priority(1)
        .mount(&t.p0)
        .await;
    t.p0_ok().await;
    assert_eq!(
        t.post(&Hook::comment("tok-y", "/p0 revoke req-tok-y"))
            .await
            .0,
        202
    );
    assert_eq!(
        t.post(&Hook::comment("tok-x", "/p0 revoke req-tok-x"))
            .await
            .0,
        202
    );
    t.wait_metric("p0_relay_p0_token_rejected", 1.0).await;
    assert!(
        wait_token(&t, "rejected")
            .await
            .contains("P0 rejected the API token")
    );
    // Nothing more is posted: the retries of req-tok-y are the proof.
    wait_token(&t, "accepted").await;
    t.wait_metric("p0_relay_p0_token_rejected", 0.0).await;
    let calls = summarize(&t.p0_calls().await);
    assert_eq!(
        calls.last(),
        Some(&call("revoke", "req-tok-y", json!({}))),
        "{calls:?}"
    );
}

/// The relay is built around a store handed to it (`Relay::build`): the one the settings name
/// is never opened, a store refusing writes is answered 503 and makes no call, and once it
/// takes writes again the same delivery is accepted and reaches P0.
#[tokio::test]
async fn a_store_handed_to_the_relay_is_the_one_it_uses() {
    let elsewhere = tempfile::tempdir().unwrap();
    let (given, task) = Watched::open(&elsewhere.path().join("given.db"));
    let refusing = given.refusing.clone();
    refusing.store(true, Ordering::SeqCst);
    let t = spawn_with(Setup {
        store: given.given(task),
        ..Setup::default()
    })
    .await;
    t.p0_ok().await;
    let hook = Hook::comment("given-1", "/p0 approve req-given");
    let (status, body) = t.post(&hook).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (503, Some("unavailable"))
    );
    assert!(t.p0_calls().await.is_empty());

    refusing.store(false, Ordering::SeqCst);
    let (status, body) = t.post(&hook).await;
    assert_eq!(status, 202, "{body}");
    t.wait_for_calls(1).await;
    let given = reader(&elsewhere.path().join("given.db")).await;
    assert_eq!(
        given.show(1).await.unwrap().unwrap().job.request_id,
        "req-given"
    );
    assert!(
        !t.dir.path().join("relay.db").exists(),
        "the store the settings name was never opened"
    );
}

/// At a moderate rate every call used to send the worker back to the store, and that claim
/// found nothing: a store transaction per webhook for nothing. A call that ends its decision
/// no longer does: what finds nothing now is the worker's first look and its rests (one per
/// 500 ms without new work).
#[tokio::test]
async fn a_call_that_ends_its_decision_does_not_send_the_worker_back_to_the_store() {
    let started = Instant::now();
    let elsewhere = tempfile::tempdir().unwrap();
    let db = elsewhere.path().join("given.db");
    let (given, task) = Watched::open(&db);
    let empty_claims = given.empty_claims.clone();
    let t = spawn_with(Setup {
        store: given.given(task),
        ..Setup::default()
    })
    .await;
    t.p0_ok().await;
    const N: usize = 20;
    for i in 0..N {
        let hook = Hook::comment(&format!("quiet-{i}"), &format!("/p0 approve req-quiet-{i}"));
        let (status, body) = t.post(&hook).await;
        assert_eq!(status, 202, "{body}");
        t.wait_for_calls(i + 1).await;
    }
    let reader = reader(&db).await;
    for _ in 0..400 {
        if reader.show(N as i64).await.unwrap().unwrap().job.state == "succeeded" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let rests = started.elapsed().as_millis() as usize / 500;
    let empty = empty_claims.load(Ordering::SeqCst);
    assert!(
        empty <= 1 + rests,
        "{empty} claims found nothing for {N} webhooks in {} ms",
        started.elapsed().as_millis()
    );
    assert_eq!(
        summarize(&t.p0_calls().await),
        (0..N)
            .map(|i| call(
                "approve",
                &format!("req-quiet-{i}"),
                json!({"expirationLength": "1h"})
            ))
            .collect::<Vec<_>>()
    );
}

/// A revoke that arrives while its request's approve is being sent waits its turn; the end of
/// the approve's call sends the worker back for it at once, not at its next rest (500 ms).
#[tokio::test]
async fn a_decision_waiting_its_turn_goes_as_soon_as_the_one_before_it_ends() {
    let t = spawn().await;
    approve_then_revoke_promptly(&t.p0, "turn", &t.url(""), &t.url("")).await;
}

/// The questions a short claim asks afterwards (when the next job falls due, which jobs in
/// flight others wait behind) failing never costs the jobs it claimed: they are sent, and
/// the worker, not knowing what waits, looks again when any call ends (a revoke behind its
/// approve follows it at once, not at the next poll).
#[tokio::test]
async fn a_failing_question_after_a_claim_does_not_give_up_the_claimed_jobs() {
    let elsewhere = tempfile::tempdir().unwrap();
    let (given, task) = Watched::open(&elsewhere.path().join("given.db"));
    given.failing_questions.store(true, Ordering::SeqCst);
    let t = spawn_with(Setup {
        store: given.given(task),
        ..Setup::default()
    })
    .await;
    approve_then_revoke_promptly(&t.p0, "ask", &t.url(""), &t.url("")).await;
}
