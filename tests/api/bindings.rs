//! Bindings and answers back, black-box: the real relay on port 0 against a fake P0 and fake
//! GitHub, PagerDuty and Opsgenie APIs. A subject's end revokes what was approved under it;
//! once P0 has answered, the relay answers where it was asked, with exactly the calls the
//! providers' API descriptions (deploy/contracts/) allow.

use std::time::Duration;

use crate::common::*;
use serde_json::{Value, json};
use wiremock::matchers::{method, path, path_regex};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

async fn relay() -> (TestRelay, Providers) {
    let providers = Providers::start().await;
    let relay = spawn_with(Setup {
        vars: answer_vars(),
        top: providers.yaml(),
        ..Setup::default()
    })
    .await;
    (relay, providers)
}

// --- Payloads, in the providers' shapes (from mappings/testdata) ---

pub(crate) fn pd_note(event_id: &str, incident: &str, content: &str) -> Hook {
    let mut v: Value =
        serde_json::from_slice(&testdata("pagerduty/incident_annotated.json")).unwrap();
    v["event"]["id"] = event_id.into();
    v["event"]["data"]["incident"]["id"] = incident.into();
    v["event"]["data"]["content"] = content.into();
    Hook::pagerduty(&format!("wh-{event_id}"), &serde_json::to_vec(&v).unwrap())
}

/// An `incident.resolved` by automation (no agent) whose title names no request.
pub(crate) fn pd_resolved(event_id: &str, incident: &str) -> Hook {
    let mut v: Value =
        serde_json::from_slice(&testdata("pagerduty/incident_resolved.json")).unwrap();
    v["event"]["id"] = event_id.into();
    v["event"]["agent"] = Value::Null;
    v["event"]["data"]["id"] = incident.into();
    v["event"]["data"]["title"] = "Orders DB replica lag above 5 minutes".into();
    Hook::pagerduty(&format!("wh-{event_id}"), &serde_json::to_vec(&v).unwrap())
}

fn gh_issue_closed(number: u64) -> Hook {
    let body = json!({
        "action": "closed",
        "issue": { "number": number, "state": "closed", "updated_at": "2026-11-27T12:00:00Z" },
        "repository": { "id": 70112233, "full_name": "acme/infra" },
        "sender": { "login": "someone-else", "type": "User" }
    });
    Hook::github(
        "issues",
        "close-delivery-1",
        &serde_json::to_vec(&body).unwrap(),
        GITHUB_SECRET_NEW,
    )
}

fn comment_id(hook: &Hook) -> u64 {
    let v: Value = serde_json::from_slice(&hook.body).unwrap();
    v["comment"]["id"].as_u64().unwrap()
}

#[test]
fn the_contract_check_can_fail() {
    let spec = spec("github-feedback.json");
    let mut req = Request {
        url: "http://x/repos/acme/infra/issues/comments/12/reactions"
            .parse()
            .unwrap(),
        method: wiremock::http::Method::POST,
        headers: Default::default(),
        body: br#"{"content":"thumbs-up"}"#.to_vec(),
    };
    assert!(check_contract(&spec, &req).unwrap_err().contains("bearer"));
    req.headers
        .insert("authorization", "Bearer t".parse().unwrap());
    req.headers
        .insert("content-type", "application/json".parse().unwrap());
    assert!(
        check_contract(&spec, &req)
            .unwrap_err()
            .contains("thumbs-up")
    );
    req.body = br#"{"content":"+1"}"#.to_vec();
    check_contract(&spec, &req).unwrap();
    req.url = "http://x/repos/acme/infra/issues/comments/abc/reactions"
        .parse()
        .unwrap();
    assert!(check_contract(&spec, &req).unwrap_err().contains("integer"));
}

// --- The scenarios ---

#[tokio::test]
async fn a_pagerduty_note_approval_is_revoked_when_the_incident_resolves_untagged() {
    let (t, providers) = relay().await;
    t.p0_ok().await;
    let (status, ans) = t
        .post(&pd_note("01NOTE1", "PINC001", "/p0 approve req-321 30m"))
        .await;
    assert_eq!(status, 202, "{ans}");
    assert_eq!(ans["subject"], "PINC001");
    t.wait_for_calls(1).await;
    let notes = t.store.exactly(&providers.pagerduty, 1).await;
    let n = &notes[0];
    assert_eq!(n.url.path(), "/incidents/PINC001/notes");
    assert_eq!(
        header(n, "authorization"),
        format!("Token token={PD_TOKEN}")
    );
    assert_eq!(header(n, "from"), PD_FROM);
    assert_eq!(
        header(n, "accept"),
        "application/vnd.pagerduty+json;version=2"
    );
    assert_eq!(
        body(n),
        json!({"note": {"content": "p0-relay: P0 approved request req-321; access expires in 30m."}})
    );

    // Resolved by automation (no agent), its title naming no request.
    let (status, ans) = t.post(&pd_resolved("01RESOLVE1", "PINC001")).await;
    assert_eq!(status, 202, "{ans}");
    assert_eq!(ans["revoked"][0]["request_id"], "req-321", "{ans}");
    t.wait_for_calls(2).await;
    assert_eq!(
        p0_actions(&t).await,
        vec![
            ("approve".into(), "req-321".into()),
            ("revoke".into(), "req-321".into())
        ]
    );
    assert_eq!(body(&t.p0_calls().await[1]), json!({}));
    let notes = t.store.exactly(&providers.pagerduty, 2).await;
    assert_eq!(notes[1].url.path(), "/incidents/PINC001/notes");
    assert_eq!(
        body(&notes[1]),
        json!({"note": {"content": "p0-relay: P0 revoked request req-321: access granted under PINC001 ends with it."}})
    );
    conforms("pagerduty-feedback.json", &notes);
    t.wait_metric(
        "p0_relay_bound_revocations_total{source=\"pagerduty\"}",
        1.0,
    )
    .await;
    t.wait_metric(
        "p0_relay_answers_total{result=\"sent\",source=\"pagerduty\"}",
        2.0,
    )
    .await;

    // The operator sees the binding and the answers.
    let db = t.dir.path().join("relay.db").display().to_string();
    let vars = test_env(&[]);
    let (code, out) = run_cli(
        &["jobs", "list", "--subject", "PINC001", "--db", &db],
        &vars,
    );
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(
        out.lines().filter(|l| l.contains("PINC001")).count(),
        2,
        "{out}"
    );
    let revoke_job = ans["revoked"][0]["job_id"].to_string();
    let (code, out) = run_cli(&["jobs", "show", &revoke_job, "--db", &db], &vars);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("subject:    PINC001"), "{out}");
    assert!(out.contains("revoked because delivery"), "{out}");
    assert!(out.contains("answers back:"), "{out}");
    assert!(out.contains("pagerduty note     succeeded"), "{out}");
    assert!(!out.contains(PD_TOKEN), "{out}");
    let (_, out) = run_cli(&["jobs", "list", "--subject", "PNOPE", "--db", &db], &vars);
    assert!(!out.contains("req-321"), "{out}");
}

#[tokio::test]
async fn two_approvals_on_one_incident_are_both_revoked_and_others_are_not() {
    let (t, providers) = relay().await;
    t.p0_ok().await;
    for (event, id) in [("01A", "req-1"), ("01B", "req-2")] {
        let (status, ans) = t
            .post(&pd_note(event, "PINC002", &format!("/p0 approve {id} 1h")))
            .await;
        assert_eq!(status, 202, "{ans}");
    }
    let (status, _) = t
        .post(&pd_note("01C", "POTHER1", "/p0 approve req-other 1h"))
        .await;
    assert_eq!(status, 202);
    t.wait_for_calls(3).await;
    let (status, ans) = t.post(&pd_resolved("01END", "PINC002")).await;
    assert_eq!(status, 202, "{ans}");
    let revoked: Vec<&str> = ans["revoked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(revoked, vec!["req-1", "req-2"]);
    t.wait_for_calls(5).await;
    let calls = p0_actions(&t).await;
    assert_eq!(calls.len(), 5, "{calls:?}");
    for id in ["req-1", "req-2"] {
        assert!(calls.contains(&("revoke".into(), id.into())), "{calls:?}");
    }
    assert!(!calls.contains(&("revoke".into(), "req-other".into())));
    // Three approvals and two revocations, each noted on its incident.
    let notes = t.store.exactly(&providers.pagerduty, 5).await;
    conforms("pagerduty-feedback.json", &notes);
    // The same end delivered again revokes nothing more.
    let (status, ans) = t.post(&pd_resolved("01END", "PINC002")).await;
    assert_eq!((status, ans["status"].as_str()), (200, Some("duplicate")));
}

#[tokio::test]
async fn an_opsgenie_note_approval_is_revoked_when_the_alert_closes() {
    let (t, providers) = relay().await;
    t.p0_ok().await;
    let (status, ans) = t
        .post(&Hook::opsgenie(&testdata("opsgenie/addnote.json")))
        .await;
    assert_eq!(status, 202, "{ans}");
    t.wait_for_calls(1).await;
    let alert = "a1b2c3d4-e5f6-47a8-9b0c-1d2e3f4a5b6c-1764238800123";
    let notes = t.store.exactly(&providers.opsgenie, 1).await;
    assert_eq!(notes[0].url.path(), format!("/v2/alerts/{alert}/notes"));
    assert_eq!(notes[0].url.query(), Some("identifierType=id"));
    assert_eq!(
        header(&notes[0], "authorization"),
        format!("GenieKey {OG_KEY}")
    );
    assert_eq!(
        body(&notes[0]),
        json!({"note": "p0-relay: P0 approved request req-987; access expires in 2h.",
               "user": "p0-relay", "source": "p0-relay"})
    );
    // Closed by someone else; the alert's details name no request.
    let mut close: Value = serde_json::from_slice(&testdata("opsgenie/close.json")).unwrap();
    close["alert"]["details"] = json!({});
    close["alert"]["username"] = "someone.else@acme.example".into();
    let (status, ans) = t
        .post(&Hook::opsgenie(&serde_json::to_vec(&close).unwrap()))
        .await;
    assert_eq!(status, 202, "{ans}");
    t.wait_for_calls(2).await;
    assert_eq!(
        p0_actions(&t).await[1],
        ("revoke".to_owned(), "req-987".to_owned())
    );
    let notes = t.store.exactly(&providers.opsgenie, 2).await;
    assert!(
        body(&notes[1])["note"]
            .as_str()
            .unwrap()
            .starts_with("p0-relay: P0 revoked request req-987"),
        "{}",
        body(&notes[1])
    );
    conforms("opsgenie-feedback.json", &notes);
}

#[tokio::test]
async fn a_github_comment_approval_is_revoked_when_the_issue_closes() {
    let (t, providers) = relay().await;
    t.p0_ok().await;
    let hook = Hook::comment("gh-approve-1", "/p0 approve req-123 2h");
    let comment = comment_id(&hook);
    let (status, ans) = t.post(&hook).await;
    assert_eq!(status, 202, "{ans}");
    assert_eq!(
        ans["subject"], "70112233#42",
        "bound to the repository's ID"
    );
    t.wait_for_calls(1).await;
    let calls = t.store.exactly(&providers.github, 1).await;
    let r = &calls[0];
    assert_eq!(
        r.url.path(),
        format!("/repos/acme/infra/issues/comments/{comment}/reactions")
    );
    assert_eq!(body(r), json!({"content": "+1"}));
    assert_eq!(header(r, "authorization"), format!("Bearer {GH_TOKEN}"));
    assert_eq!(header(r, "accept"), "application/vnd.github+json");
    assert_eq!(header(r, "x-github-api-version"), "2022-11-28");
    assert!(header(r, "user-agent").starts_with("p0-relay/"));

    let (status, ans) = t.post(&gh_issue_closed(42)).await;
    assert_eq!(status, 202, "{ans}");
    assert_eq!(ans["revoked"][0]["request_id"], "req-123");
    t.wait_for_calls(2).await;
    assert_eq!(
        p0_actions(&t).await[1],
        ("revoke".to_owned(), "req-123".to_owned())
    );
    let calls = t.store.exactly(&providers.github, 2).await;
    assert_eq!(calls[1].url.path(), "/repos/acme/infra/issues/42/comments");
    assert_eq!(
        body(&calls[1]),
        json!({"body": "p0-relay: P0 revoked request req-123: access granted under acme/infra#\u{200b}42 ends with it."})
    );
    conforms("github-feedback.json", &calls);
}

#[tokio::test]
async fn a_refused_approval_is_answered_with_p0s_reason_and_not_revoked() {
    let (t, providers) = relay().await;
    Mock::given(method("POST"))
        .and(path(format!(
            "/o/{ORG}/permission-requests/req-gone/approve"
        )))
        .respond_with(
            ResponseTemplate::new(400)
                .set_body_json(json!({"error": "Invalid or expired request"})),
        )
        .mount(&t.p0)
        .await;
    t.p0_ok().await;
    let hook = Hook::comment("gh-refused-1", "/p0 approve req-gone 1h");
    let comment = comment_id(&hook);
    let (status, _) = t.post(&hook).await;
    assert_eq!(status, 202);
    t.wait_for_calls(1).await;
    let calls = t.store.exactly(&providers.github, 2).await;
    let reaction = calls
        .iter()
        .find(|c| c.url.path().ends_with("/reactions"))
        .expect("a reaction");
    assert_eq!(
        reaction.url.path(),
        format!("/repos/acme/infra/issues/comments/{comment}/reactions")
    );
    assert_eq!(body(reaction), json!({"content": "-1"}));
    let reply = calls
        .iter()
        .find(|c| c.url.path() == "/repos/acme/infra/issues/42/comments")
        .expect("a comment");
    assert_eq!(
        body(reply),
        json!({"body": "p0-relay: P0 refused to approve request req-gone (HTTP 400): Invalid or expired request"})
    );
    conforms("github-feedback.json", &calls);

    // Closing the issue revokes nothing: P0 never granted it.
    let (status, ans) = t.post(&gh_issue_closed(42)).await;
    assert_eq!(status, 202, "{ans}");
    assert_eq!(ans["revoked"], json!([]), "{ans}");
    assert_eq!(t.settle().await.len(), 1, "no revoke call");
    t.store.exactly(&providers.github, 2).await;
}

#[tokio::test]
async fn a_subject_that_ends_before_its_approval_reached_p0_still_ends_with_no_access() {
    let (t, _providers) = relay().await;
    // P0 is down for the approve's first attempts: the revoke must wait behind it.
    Mock::given(method("POST"))
        .and(path(format!(
            "/o/{ORG}/permission-requests/req-slow/approve"
        )))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(3)
        .mount(&t.p0)
        .await;
    t.p0_ok().await;
    let (status, _) = t
        .post(&pd_note("01SLOW", "PINC003", "/p0 approve req-slow 1h"))
        .await;
    assert_eq!(status, 202);
    let (status, ans) = t.post(&pd_resolved("01SLOWEND", "PINC003")).await;
    assert_eq!(status, 202, "{ans}");
    assert_eq!(ans["revoked"][0]["request_id"], "req-slow");
    t.wait_for_calls(5).await;
    let calls = p0_actions(&t).await;
    let last_approve = calls.iter().rposition(|c| c.0 == "approve").unwrap();
    let revoke = calls.iter().position(|c| c.0 == "revoke").unwrap();
    assert!(last_approve < revoke, "approve, then revoke: {calls:?}");
    assert_eq!(calls.len(), 5, "{calls:?}");
}

#[tokio::test]
async fn a_provider_refusing_an_answer_for_good_is_counted_not_retried() {
    let providers = Providers::start().await;
    let github = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(404).set_body_json(json!({"message": "Not Found"})))
        .mount(&github)
        .await;
    let t = spawn_with(Setup {
        vars: answer_vars(),
        top: answers_yaml(
            &github.uri(),
            &providers.pagerduty.uri(),
            &providers.opsgenie.uri(),
        ),
        ..Setup::default()
    })
    .await;
    t.p0_ok().await;
    let (status, _) = t
        .post(&Hook::comment("gh-404", "/p0 approve req-404 1h"))
        .await;
    assert_eq!(status, 202);
    t.wait_metric(
        "p0_relay_answers_total{result=\"failed\",source=\"github\"}",
        1.0,
    )
    .await;
    t.store.exactly(&github, 1).await;
}

#[tokio::test]
async fn a_rate_limited_answer_waits_for_retry_after_then_is_sent() {
    let providers = Providers::start().await;
    let pagerduty = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(429).insert_header("Retry-After", "1"))
        .up_to_n_times(1)
        .mount(&pagerduty)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({"note": {}})))
        .mount(&pagerduty)
        .await;
    let t = spawn_with(Setup {
        vars: answer_vars(),
        top: answers_yaml(
            &providers.github.uri(),
            &pagerduty.uri(),
            &providers.opsgenie.uri(),
        ),
        ..Setup::default()
    })
    .await;
    t.p0_ok().await;
    let started = std::time::Instant::now();
    let (status, _) = t
        .post(&pd_note("01RL", "PINC004", "/p0 approve req-rl 1h"))
        .await;
    assert_eq!(status, 202);
    t.store.exactly(&pagerduty, 2).await;
    // The retry backoff alone is at most 20 ms here: the second try waited for Retry-After.
    assert!(started.elapsed() >= Duration::from_secs(1));
    t.wait_metric(
        "p0_relay_answers_total{result=\"retried\",source=\"pagerduty\"}",
        1.0,
    )
    .await;
    t.wait_metric(
        "p0_relay_answers_total{result=\"sent\",source=\"pagerduty\"}",
        1.0,
    )
    .await;
}

#[tokio::test]
async fn without_tokens_nothing_is_answered() {
    let providers = Providers::start().await;
    let t = spawn_with(Setup {
        top: providers.yaml(),
        ..Setup::default()
    })
    .await;
    t.p0_ok().await;
    let (status, _) = t
        .post(&Hook::comment("gh-quiet", "/p0 approve req-q 1h"))
        .await;
    assert_eq!(status, 202);
    t.wait_for_calls(1).await;
    t.store.quiet().await;
    assert!(
        providers
            .github
            .received_requests()
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn an_answer_pending_at_a_kill_is_sent_once_after_the_restart() {
    let p0 = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"ok": true})))
        .mount(&p0)
        .await;
    let providers = Providers::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut vars = test_env(&[]);
    for (k, v) in answer_vars() {
        vars.insert(k.into(), v);
    }
    // First life: GitHub cannot be reached, so the answer stays queued after P0's answer.
    let closed = format!("http://127.0.0.1:{}", free_port());
    let setup = Setup {
        top: answers_yaml(
            &closed,
            &providers.pagerduty.uri(),
            &providers.opsgenie.uri(),
        ),
        ..Setup::default()
    };
    let config = write_config(dir.path(), &p0.uri(), &setup);
    let relay = BinRelay::start(&config, &vars, dir.path().join("relay.log"), &[]).await;
    let hook = Hook::comment("gh-kill-1", "/p0 approve req-kill 1h");
    let comment = comment_id(&hook);
    let (status, _) = relay.post(&hook).await;
    assert_eq!(status, 202);
    let metrics = format!("http://{}/metrics", relay.addr);
    for _ in 0..200 {
        if get_text(&metrics)
            .await
            .contains("p0_relay_answers_total{result=\"retried\",source=\"github\"} 1")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(p0.received_requests().await.unwrap().len(), 1);
    relay.signal("KILL");
    relay.wait();

    // Second life: the same store, GitHub reachable.
    let setup = Setup {
        top: providers.yaml(),
        ..Setup::default()
    };
    let config = write_config(dir.path(), &p0.uri(), &setup);
    let relay = BinRelay::start(&config, &vars, dir.path().join("relay2.log"), &[]).await;
    let calls = relay.store.exactly(&providers.github, 1).await;
    assert_eq!(
        calls[0].url.path(),
        format!("/repos/acme/infra/issues/comments/{comment}/reactions")
    );
    assert_eq!(body(&calls[0]), json!({"content": "+1"}));
    assert_eq!(
        p0.received_requests().await.unwrap().len(),
        1,
        "P0 is not called again"
    );
    relay.signal("TERM");
    relay.wait();
    let log = std::fs::read_to_string(dir.path().join("relay.log")).unwrap()
        + &std::fs::read_to_string(dir.path().join("relay2.log")).unwrap();
    for secret in [GH_TOKEN, PD_TOKEN, OG_KEY] {
        assert!(!log.contains(secret), "a token leaked into the log");
    }
}

#[tokio::test]
async fn on_postgresql_a_resolve_revokes_and_answers_too() {
    let Some(db) = crate::common::pg::TestDb::create().await else {
        return;
    };
    let providers = Providers::start().await;
    let t = spawn_with(Setup {
        vars: answer_vars(),
        top: providers.yaml(),
        store_url: Some(db.url()),
        ..Setup::default()
    })
    .await;
    t.p0_ok().await;
    for (event, id) in [("01PGA", "req-pg-1"), ("01PGB", "req-pg-2")] {
        let (status, ans) = t
            .post(&pd_note(event, "PINCPG", &format!("/p0 approve {id} 1h")))
            .await;
        assert_eq!(status, 202, "{ans}");
    }
    t.wait_for_calls(2).await;
    let (status, ans) = t.post(&pd_resolved("01PGEND", "PINCPG")).await;
    assert_eq!(status, 202, "{ans}");
    assert_eq!(ans["revoked"].as_array().map(Vec::len), Some(2), "{ans}");
    t.wait_for_calls(4).await;
    let calls = p0_actions(&t).await;
    for id in ["req-pg-1", "req-pg-2"] {
        assert!(calls.contains(&("revoke".into(), id.into())), "{calls:?}");
    }
    let notes = t.store.exactly(&providers.pagerduty, 4).await;
    conforms("pagerduty-feedback.json", &notes);
}

/// A GitHub that takes `delay` over each reaction.
async fn slow_github(delay: Duration) -> MockServer {
    let github = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path_regex(r"/reactions$"))
        .respond_with(
            ResponseTemplate::new(201)
                .set_body_json(json!({"id": 1, "content": "+1"}))
                .set_delay(delay),
        )
        .mount(&github)
        .await;
    github
}

/// On PostgreSQL an answer back held longer than the claim lease (a slow provider) is not
/// sent twice: the relay sending it renews its claim while the call is under way, as it
/// does for P0 calls, so neither it nor another relay on the database claims it again.
/// (Unrenewed, every attempt is taken over before it ends: the answer is sent again and
/// again and never recorded.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgresql_an_answer_longer_than_the_lease_is_not_sent_twice() {
    let Some(db) = crate::common::pg::TestDb::create().await else {
        return;
    };
    let github = slow_github(Duration::from_millis(1800)).await;
    let elsewhere = MockServer::start().await;
    let mut relays = Vec::new();
    for _ in 0..2 {
        let t = spawn_with(Setup {
            vars: answer_vars(),
            top: answers_yaml(&github.uri(), &elsewhere.uri(), &elsewhere.uri()),
            store_url: Some(db.url()),
            store_extra: "  claim_lease: 1s\n".into(),
            ..Setup::default()
        })
        .await;
        t.p0_ok().await;
        relays.push(t);
    }
    let (status, ans) = relays[0]
        .post(&Hook::comment("slow-answer", "/p0 approve req-slow-answer"))
        .await;
    assert_eq!(status, 202, "{ans}");
    let started = std::time::Instant::now();
    while db
        .query_i64("SELECT COUNT(*) FROM answers WHERE state = 'succeeded'")
        .await
        < 1
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the answer was not recorded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Long enough for a lease that was let go to run out and be claimed again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let reactions = github.received_requests().await.unwrap_or_default();
    assert_eq!(reactions.len(), 1, "one reaction, sent once");
    assert_eq!(
        db.query_i64("SELECT attempts::BIGINT FROM answers").await,
        1,
        "one attempt recorded"
    );
}

#[tokio::test]
async fn an_answer_that_keeps_failing_is_dead_after_its_max_age() {
    let providers = Providers::start().await;
    let opsgenie = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&opsgenie)
        .await;
    let yaml = answers_yaml(
        &providers.github.uri(),
        &providers.pagerduty.uri(),
        &opsgenie.uri(),
    )
    .replace("max_age: 1h", "max_age: 2s");
    let t = spawn_with(Setup {
        vars: answer_vars(),
        top: yaml,
        ..Setup::default()
    })
    .await;
    t.p0_ok().await;
    let (status, _) = t
        .post(&Hook::opsgenie(&testdata("opsgenie/addnote.json")))
        .await;
    assert_eq!(status, 202);
    t.wait_metric(
        "p0_relay_answers_total{result=\"dead\",source=\"opsgenie\"}",
        1.0,
    )
    .await;
    let tries = opsgenie.received_requests().await.unwrap().len();
    assert!(tries >= 2, "retried before giving up: {tries}");
    assert_eq!(
        t.store.received(&opsgenie, tries).await.len(),
        tries,
        "and not after"
    );
}

/// An answer sent while the store cannot take its outcome (a disk gone read-only for a
/// moment) is recorded once the store is back, and not sent again: the answer loop keeps
/// trying the record, as the worker does with a P0 call's outcome.
#[tokio::test]
async fn an_answer_whose_outcome_cannot_be_stored_at_once_is_recorded_after_and_sent_once() {
    let github = slow_github(Duration::from_millis(300)).await;
    let elsewhere = tempfile::tempdir().unwrap();
    let db = elsewhere.path().join("given.db");
    let (given, task) = Watched::open(&db);
    let (refusing, refused) = (given.refusing.clone(), given.refused_answer_records.clone());
    let t = spawn_with(Setup {
        vars: answer_vars(),
        top: answers_yaml(&github.uri(), &github.uri(), &github.uri()),
        store: given.given(task),
        ..Setup::default()
    })
    .await;
    t.p0_ok().await;
    let (status, ans) = t
        .post(&Hook::comment(
            "outage-answer",
            "/p0 approve req-outage-answer",
        ))
        .await;
    assert_eq!(status, 202, "{ans}");
    // The reaction is under way (GitHub takes 300 ms): the store goes away meanwhile.
    let started = std::time::Instant::now();
    while github
        .received_requests()
        .await
        .unwrap_or_default()
        .is_empty()
    {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no reaction sent"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    refusing.store(true, std::sync::atomic::Ordering::SeqCst);
    while refused.load(std::sync::atomic::Ordering::SeqCst) < 1 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no record tried"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    refusing.store(false, std::sync::atomic::Ordering::SeqCst);
    let store = rusqlite::Connection::open(&db).unwrap();
    let started = std::time::Instant::now();
    loop {
        let (state, attempts): (String, i64) = store
            .query_row("SELECT state, attempts FROM answers", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        if state == "succeeded" {
            assert_eq!(attempts, 1);
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the answer was not recorded after the outage: {state}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    t.store.exactly(&github, 1).await;
}

/// The answer loop, like the worker, does not go back to the store after every answer it
/// sends: what finds nothing is its first look and its rests (one per 500 ms without new
/// answers). Each comment's +1 still goes out once its approve is done.
#[tokio::test]
async fn an_answer_sent_does_not_send_the_answer_loop_back_to_the_store() {
    let started = std::time::Instant::now();
    let providers = Providers::start().await;
    let elsewhere = tempfile::tempdir().unwrap();
    let (given, task) = Watched::open(&elsewhere.path().join("given.db"));
    let empty = given.empty_answer_claims.clone();
    let t = spawn_with(Setup {
        vars: answer_vars(),
        top: providers.yaml(),
        store: given.given(task),
        ..Setup::default()
    })
    .await;
    t.p0_ok().await;
    const N: usize = 12;
    let mut comments = Vec::new();
    for i in 0..N {
        let hook = Hook::comment(
            &format!("quiet-answer-{i}"),
            &format!("/p0 approve req-qa-{i}"),
        );
        comments.push(comment_id(&hook));
        let (status, ans) = t.post(&hook).await;
        assert_eq!(status, 202, "{ans}");
        // (Not `received_at_least`: its closing wait would count as rests.)
        for _ in 0..400 {
            let seen = providers
                .github
                .received_requests()
                .await
                .unwrap_or_default();
            if seen.len() > i {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let calls = t.store.exactly(&providers.github, N).await;
    assert_eq!(
        calls
            .iter()
            .map(|r| (r.url.path().to_owned(), body(r)))
            .collect::<Vec<_>>(),
        comments
            .iter()
            .map(|c| (
                format!("/repos/acme/infra/issues/comments/{c}/reactions"),
                json!({"content": "+1"})
            ))
            .collect::<Vec<_>>()
    );
    let rests = started.elapsed().as_millis() as usize / 500;
    let found_nothing = empty.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        found_nothing <= 1 + rests,
        "{found_nothing} answer claims found nothing for {N} answers in {} ms",
        started.elapsed().as_millis()
    );
}

// --- An ended subject stays ended ---

/// An approve that arrives after its incident resolved (a late note, an acknowledge that
/// PagerDuty retried after a 503) grants nothing: it is answered 200 `rejected` with the end,
/// P0 hears nothing, and the refusal is noted on the incident where it was asked.
#[tokio::test]
async fn an_approve_after_its_incident_resolved_is_refused_and_answered_back() {
    let (t, providers) = relay().await;
    t.p0_ok().await;
    let (status, ans) = t.post(&pd_resolved("01END1", "PGR0VU2")).await;
    assert_eq!(status, 202, "{ans}");
    assert_eq!(ans["revoked"], json!([]), "{ans}");

    let (status, late) = t
        .post(&pd_note("01LATE1", "PGR0VU2", "/p0 approve req-late 1h"))
        .await;
    assert_eq!(status, 200, "{late}");
    assert_eq!(late["status"], "rejected", "{late}");
    assert_eq!(late["rule"], "note-command", "{late}");
    assert_eq!(late["subject"], "PGR0VU2", "{late}");
    let reason = late["reason"].as_str().unwrap().to_owned();
    assert!(reason.starts_with("subject PGR0VU2 ended at 20"), "{late}");
    assert!(reason.ends_with('Z'), "{late}");

    // The acknowledge PagerDuty retried after the resolve: refused the same way.
    let mut ack: Value =
        serde_json::from_slice(&testdata("pagerduty/incident_acknowledged.json")).unwrap();
    ack["event"]["id"] = "01ACKRETRY".into();
    let (status, retried) = t
        .post(&Hook::pagerduty(
            "wh-ack-retry",
            &serde_json::to_vec(&ack).unwrap(),
        ))
        .await;
    assert_eq!(status, 200, "{retried}");
    assert_eq!(retried["status"], "rejected", "{retried}");
    assert_eq!(retried["reason"], reason.as_str(), "{retried}");

    // Both refusals are noted on the incident; P0 is never asked.
    let notes = t.store.exactly(&providers.pagerduty, 2).await;
    let mut texts: Vec<String> = notes
        .iter()
        .map(|n| {
            assert_eq!(n.url.path(), "/incidents/PGR0VU2/notes");
            body(n)["note"]["content"].as_str().unwrap().to_owned()
        })
        .collect();
    texts.sort();
    assert_eq!(
        texts,
        vec![
            format!("p0-relay: refused to approve request req-789, and did not ask P0: {reason}."),
            format!("p0-relay: refused to approve request req-late, and did not ask P0: {reason}."),
        ]
    );
    conforms("pagerduty-feedback.json", &notes);
    assert_eq!(t.settle().await.len(), 0, "P0 is never called");
    t.wait_metric("p0_relay_refused_total{source=\"pagerduty\"}", 2.0)
        .await;

    // The operator sees why.
    let db = t.dir.path().join("relay.db").display().to_string();
    let job = late["job_ids"][0].to_string();
    let (code, out) = run_cli(&["jobs", "show", &job, "--db", &db], &test_env(&[]));
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("rejected"), "{out}");
    assert!(out.contains(&reason), "{out}");
}

fn gh_issue(action: &str, number: u64, updated_at: &str) -> Hook {
    let body = json!({
        "action": action,
        "issue": { "number": number, "state": if action == "closed" { "closed" } else { "open" },
                   "updated_at": updated_at },
        "repository": { "id": 70112233, "full_name": "acme/infra" },
        "sender": { "login": "someone-else", "type": "User" }
    });
    Hook::github(
        "issues",
        &format!("{action}-{number}-{updated_at}"),
        &serde_json::to_vec(&body).unwrap(),
        GITHUB_SECRET_NEW,
    )
}

/// A command on a closed issue is refused, with a thumbs-down and a comment saying why;
/// reopening the issue takes commands again.
#[tokio::test]
async fn a_command_on_a_closed_issue_is_refused_until_it_is_reopened() {
    let (t, providers) = relay().await;
    t.p0_ok().await;
    let (status, ans) = t.post(&gh_issue_closed(42)).await;
    assert_eq!(status, 202, "{ans}");

    let hook = Hook::comment("gh-closed-1", "/p0 approve req-closed 1h");
    let comment = comment_id(&hook);
    let (status, ans) = t.post(&hook).await;
    assert_eq!(status, 200, "{ans}");
    assert_eq!(ans["status"], "rejected", "{ans}");
    assert_eq!(ans["subject"], "70112233#42", "{ans}");
    let reason = ans["reason"].as_str().unwrap().to_owned();
    assert!(reason.starts_with("subject 70112233#42 ended at "), "{ans}");
    let calls = t.store.exactly(&providers.github, 2).await;
    let reaction = calls
        .iter()
        .find(|c| c.url.path().ends_with("/reactions"))
        .expect("a reaction");
    assert_eq!(
        reaction.url.path(),
        format!("/repos/acme/infra/issues/comments/{comment}/reactions")
    );
    assert_eq!(body(reaction), json!({"content": "-1"}));
    let reply = calls
        .iter()
        .find(|c| c.url.path() == "/repos/acme/infra/issues/42/comments")
        .expect("a comment");
    assert_eq!(
        body(reply),
        json!({"body": format!(
            "p0-relay: refused to approve request req-closed, and did not ask P0: {}.",
            reason.replace("#", "#\u{200b}")
        )})
    );
    conforms("github-feedback.json", &calls);
    assert_eq!(t.settle().await.len(), 0, "P0 is never called");

    // Reopened: the same command, in a new comment, is taken.
    let (status, ans) = t
        .post(&gh_issue("reopened", 42, "2026-11-28T09:00:00Z"))
        .await;
    assert_eq!(status, 202, "{ans}");
    assert_eq!(ans["reopened"], json!(["70112233#42"]), "{ans}");
    let (status, ans) = t
        .post(&Hook::comment("gh-reopened-1", "/p0 approve req-closed 1h"))
        .await;
    assert_eq!(status, 202, "{ans}");
    assert_eq!(ans["decisions"][0]["subject"], "70112233#42", "{ans}");
    assert_eq!(
        summarize(&t.wait_for_calls(1).await),
        vec![call(
            "approve",
            "req-closed",
            json!({"expirationLength": "1h"})
        )]
    );
}
