//! End to end: real payloads from each source, signed as the provider signs them, become the
//! exact P0 calls; what is not for the relay gets its documented answer and no call.

use crate::common::*;
use serde_json::json;

#[tokio::test]
async fn github_comment_command_signed_with_the_older_secret_approves() {
    let t = spawn().await;
    t.p0_ok().await;
    let body = testdata("github/issue_comment_created.json");
    let (status, answer) = t
        .post(&Hook::github(
            "issue_comment",
            "gh-delivery-1",
            &body,
            GITHUB_SECRET_OLD,
        ))
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["status"], "accepted");
    assert_eq!(answer["rule"], "comment-command");
    assert_eq!(
        answer["delivery"],
        "comment:1710001|created|2026-11-27T10:15:00Z"
    );
    let d = &answer["decisions"][0];
    assert_eq!(
        (
            d["action"].as_str(),
            d["request_id"].as_str(),
            d["expiration"].as_str(),
            d["org"].as_str()
        ),
        (Some("approve"), Some("req-123"), Some("2h"), Some(ORG))
    );
    assert!(d["job_id"].as_i64().is_some());
    let calls = t.wait_for_calls(1).await;
    assert_eq!(calls[0].method.as_str(), "POST");
    assert_eq!(
        calls[0]
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    assert_eq!(
        summarize(&calls),
        vec![call(
            "approve",
            "req-123",
            json!({"expirationLength": "2h"})
        )]
    );
    assert_eq!(t.settle().await.len(), 1, "exactly one call");
}

#[tokio::test]
async fn github_approved_review_of_a_pull_request_naming_its_request_approves() {
    let t = spawn().await;
    t.p0_ok().await;
    let body = testdata("github/pull_request_review_approved.json");
    let (status, answer) = t
        .post(&Hook::github(
            "pull_request_review",
            "gh-review-1",
            &body,
            GITHUB_SECRET_NEW,
        ))
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["rule"], "approved-review");
    let calls = t.wait_for_calls(1).await;
    assert_eq!(
        summarize(&calls),
        vec![call(
            "approve",
            "req-456",
            json!({"expirationLength": "1h"})
        )]
    );
}

#[tokio::test]
async fn github_form_encoded_delivery_works() {
    let t = spawn().await;
    t.p0_ok().await;
    let json_body = String::from_utf8(testdata("github/issue_comment_created.json")).unwrap();
    let form = serde_urlencoded::to_string([("payload", json_body)]).unwrap();
    let hook = Hook::github(
        "issue_comment",
        "gh-form-1",
        form.as_bytes(),
        GITHUB_SECRET_NEW,
    )
    .header("Content-Type", "application/x-www-form-urlencoded");
    assert_eq!(
        t.deliver(&[hook]).await,
        vec![call(
            "approve",
            "req-123",
            json!({"expirationLength": "2h"})
        )]
    );
}

#[tokio::test]
async fn pagerduty_note_command_approves() {
    let t = spawn().await;
    t.p0_ok().await;
    let hook = Hook::pagerduty("pd-note-1", &testdata("pagerduty/incident_annotated.json"));
    assert_eq!(
        t.deliver(&[hook]).await,
        vec![call(
            "approve",
            "req-321",
            json!({"expirationLength": "30m"})
        )]
    );
}

#[tokio::test]
async fn pagerduty_acknowledge_then_resolve_approves_then_revokes() {
    let t = spawn().await;
    t.p0_ok().await;
    let hooks = [
        Hook::pagerduty(
            "pd-ack-1",
            &testdata("pagerduty/incident_acknowledged.json"),
        ),
        Hook::pagerduty("pd-res-1", &testdata("pagerduty/incident_resolved.json")),
    ];
    assert_eq!(
        t.deliver(&hooks).await,
        vec![
            call("approve", "req-789", json!({"expirationLength": "1h"})),
            call("revoke", "req-789", json!({})),
        ]
    );
}

#[tokio::test]
async fn opsgenie_acknowledge_then_close_approves_then_revokes() {
    let t = spawn().await;
    t.p0_ok().await;
    // The X-Relay-Token header works as well as a bearer token.
    let mut close =
        Hook::opsgenie(&testdata("opsgenie/close.json")).header("X-Relay-Token", OG_TOKEN);
    close.headers.retain(|(k, _)| k != "Authorization");
    let hooks = [
        Hook::opsgenie(&testdata("opsgenie/acknowledge.json")),
        close,
    ];
    assert_eq!(
        t.deliver(&hooks).await,
        vec![
            call("approve", "req-654", json!({"expirationLength": "1h"})),
            call("revoke", "req-654", json!({})),
        ]
    );
}

#[tokio::test]
async fn opsgenie_note_command_approves() {
    let t = spawn().await;
    t.p0_ok().await;
    let hook = Hook::opsgenie(&testdata("opsgenie/addnote.json"));
    assert_eq!(
        t.deliver(&[hook]).await,
        vec![call(
            "approve",
            "req-987",
            json!({"expirationLength": "2h"})
        )]
    );
}

#[tokio::test]
async fn what_is_not_for_the_relay_gets_its_answer_and_no_call() {
    let t = spawn().await;
    t.p0_ok().await;
    let comment = testdata("github/issue_comment_created.json");
    let cases: Vec<(&str, Hook, u16, &str)> = vec![
        (
            "github ping",
            Hook::github(
                "ping",
                "g-ping",
                &testdata("github/ping.json"),
                GITHUB_SECRET_NEW,
            ),
            200,
            "ignored",
        ),
        (
            "pagerduty ping",
            Hook::pagerduty("pd-ping", &testdata("pagerduty/ping.json")),
            200,
            "ignored",
        ),
        (
            "unmapped event",
            Hook::pagerduty("pd-trig", &testdata("pagerduty/incident_triggered.json")),
            200,
            "ignored",
        ),
        (
            "a stranger's command",
            Hook::github(
                "issue_comment",
                "g-stranger",
                &github_comment("/p0 approve req-123 2h", "mallory"),
                GITHUB_SECRET_NEW,
            ),
            200,
            "rejected",
        ),
        (
            "a path-traversing request ID",
            Hook::github(
                "issue_comment",
                "g-traversal",
                &github_comment("/p0 approve ../../x", "octocat"),
                GITHUB_SECRET_NEW,
            ),
            200,
            "rejected",
        ),
        (
            "malformed JSON, correctly signed",
            Hook::github(
                "issue_comment",
                "g-bad-json",
                b"{\"action\": \"created\",",
                GITHUB_SECRET_NEW,
            ),
            400,
            "invalid",
        ),
        (
            "a bad signature",
            Hook::github("issue_comment", "g-forged", &comment, "not-the-secret"),
            401,
            "unauthorized",
        ),
    ];
    for (what, hook, want_status, want_word) in cases {
        let (status, answer) = t.post(&hook).await;
        assert_eq!(
            (status, answer["status"].as_str()),
            (want_status, Some(want_word)),
            "{what}: {answer}"
        );
        if want_word == "rejected" {
            assert!(
                answer["reason"].as_str().is_some_and(|r| !r.is_empty()),
                "{what}: {answer}"
            );
        }
    }
    let (status, answer) = t
        .post(&Hook {
            source: "gitlab",
            ..Hook::github("push", "x", b"{}", GITHUB_SECRET_NEW)
        })
        .await;
    assert_eq!(status, 404, "{answer}");
    assert!(t.settle().await.is_empty(), "P0 must receive nothing");
}

#[tokio::test]
async fn dry_run_records_decisions_and_calls_nothing() {
    let t = spawn_with(Setup {
        dry_run: true,
        vars: vec![("P0_API_TOKEN", String::new())],
        ..Setup::default()
    })
    .await;
    t.p0_ok().await;
    let body = testdata("github/issue_comment_created.json");
    let (status, answer) = t
        .post(&Hook::github(
            "issue_comment",
            "dry-1",
            &body,
            GITHUB_SECRET_NEW,
        ))
        .await;
    assert_eq!(status, 202, "{answer}");
    assert!(t.settle().await.is_empty());
    // Recorded as a P0 call would have been, and said so.
    let job = answer["decisions"][0]["job_id"].as_i64().unwrap();
    let recorded = wait_for_state(&t.dir.path().join("relay.db"), job, "dry_run").await;
    assert_eq!(
        (
            recorded.job.action.as_str(),
            recorded.job.request_id.as_str()
        ),
        ("approve", "req-123")
    );
    assert_eq!(recorded.attempts[0].result, "dry_run");
    let (_, ready) = t.get("/readyz").await;
    let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
    assert_eq!(ready["p0_token"], "unused", "no token is used: {ready}");
}

#[tokio::test]
async fn without_a_token_serve_refuses_to_start_unless_dry_run() {
    let dir = tempfile::tempdir().unwrap();
    let env = p0_relay::config::env::Env::default().overlay(&test_env(&[("P0_API_TOKEN", "")]));
    let config = write_config(dir.path(), "http://127.0.0.1:9", &Setup::default());
    let settings = p0_relay::config::Settings::load(&config, &env).unwrap();
    let err = p0_relay::app::Relay::start(settings, env, Default::default())
        .await
        .err()
        .expect("refuses to start");
    assert!(err.to_string().contains("P0_API_TOKEN"), "{err}");
}
