//! Replays: a captured signed delivery posted again with a fresh unsigned header is a
//! `duplicate` for the whole dedup window and makes no P0 call; with a maximum event age set,
//! stale (or future-dated) signed events are refused with the reason and store nothing.

use std::time::{Duration, SystemTime};

use crate::common::*;
use serde_json::{Value, json};

/// `t` as RFC 3339 (seconds, UTC).
fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The shipped comment payload as comment `id` by `octocat`, saying `text`, written at `at`.
fn comment_at(id: u64, text: &str, at: SystemTime) -> Vec<u8> {
    let mut v: Value =
        serde_json::from_slice(&github_comment_with_id(text, "octocat", id)).unwrap();
    v["comment"]["created_at"] = rfc3339(at).into();
    v["comment"]["updated_at"] = rfc3339(at).into();
    serde_json::to_vec(&v).unwrap()
}

fn paths(calls: &[wiremock::Request]) -> Vec<String> {
    calls.iter().map(|c| c.url.path().to_owned()).collect()
}

fn request(action: &str, id: &str) -> String {
    format!("/o/{ORG}/permission-requests/{id}/{action}")
}

/// The attack: an approval is captured, access is revoked, and the captured approval is posted
/// again with a new `X-GitHub-Delivery` to grant the access once more. Coalescing cannot stop
/// it (the latest decision is a revoke), so only a key from the signed comment does.
#[tokio::test]
async fn a_github_comment_replayed_with_a_fresh_delivery_header_is_a_duplicate() {
    let t = spawn().await;
    t.p0_ok().await;
    let approve = comment_at(501, "/p0 approve req-1 2h", SystemTime::now());
    let revoke = comment_at(502, "/p0 revoke req-1", SystemTime::now());
    let (s1, a1) = t
        .post(&Hook::github(
            "issue_comment",
            "gh-1",
            &approve,
            GITHUB_SECRET_NEW,
        ))
        .await;
    assert_eq!(s1, 202, "{a1}");
    let job = a1["decisions"][0]["job_id"].clone();
    t.wait_for_calls(1).await;
    let (s2, a2) = t
        .post(&Hook::github(
            "issue_comment",
            "gh-2",
            &revoke,
            GITHUB_SECRET_NEW,
        ))
        .await;
    assert_eq!(s2, 202, "{a2}");
    t.wait_for_calls(2).await;

    for (i, secret) in [GITHUB_SECRET_NEW, GITHUB_SECRET_OLD].iter().enumerate() {
        let replay = Hook::github("issue_comment", &format!("gh-fresh-{i}"), &approve, secret);
        let (status, answer) = t.post(&replay).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["status"], "duplicate", "{answer}");
        assert_eq!(answer["job_ids"], json!([job]), "{answer}");
        assert_eq!(
            answer["delivery"],
            "comment:501|created|".to_owned() + &rfc3339_of(&approve)
        );
    }
    // A new comment with the same words is a new command, not a replay.
    let again = comment_at(503, "/p0 approve req-1 2h", SystemTime::now());
    let (s3, a3) = t
        .post(&Hook::github(
            "issue_comment",
            "gh-3",
            &again,
            GITHUB_SECRET_NEW,
        ))
        .await;
    assert_eq!(s3, 202, "{a3}");
    t.wait_for_calls(3).await;
    assert_eq!(
        paths(&t.settle().await),
        [
            request("approve", "req-1"),
            request("revoke", "req-1"),
            request("approve", "req-1")
        ]
    );
    assert_eq!(
        t.metric("p0_relay_webhooks_total{outcome=\"duplicate\",source=\"github\"}")
            .await,
        Some(2.0)
    );
}

fn rfc3339_of(body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body).unwrap();
    v["comment"]["updated_at"].as_str().unwrap().to_owned()
}

/// The same attack on PagerDuty: an acknowledgement replayed with a new `X-Webhook-Id` after
/// the incident was resolved.
#[tokio::test]
async fn a_pagerduty_event_replayed_with_a_fresh_webhook_id_is_a_duplicate() {
    let t = spawn().await;
    t.p0_ok().await;
    let ack = testdata("pagerduty/incident_acknowledged.json");
    let (s1, a1) = t.post(&Hook::pagerduty("wh-1", &ack)).await;
    assert_eq!(s1, 202, "{a1}");
    assert_eq!(a1["delivery"], "event:01DEN7N8Q3X5KXKD0V4B2C6Z1A");
    let job = a1["decisions"][0]["job_id"].clone();
    t.wait_for_calls(1).await;
    let resolved = testdata("pagerduty/incident_resolved.json");
    assert_eq!(t.post(&Hook::pagerduty("wh-2", &resolved)).await.0, 202);
    t.wait_for_calls(2).await;

    let (status, answer) = t.post(&Hook::pagerduty("wh-fresh", &ack)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["status"], "duplicate", "{answer}");
    assert_eq!(answer["job_ids"], json!([job]), "{answer}");
    // Without the header at all, the signed event ID still names it.
    let bare = Hook::pagerduty("x", &ack);
    let bare = Hook {
        headers: bare
            .headers
            .into_iter()
            .filter(|(k, _)| !k.eq_ignore_ascii_case("x-webhook-id"))
            .collect(),
        ..bare
    };
    let (status, answer) = t.post(&bare).await;
    assert_eq!(
        (status, &answer["status"]),
        (200, &json!("duplicate")),
        "{answer}"
    );
    assert_eq!(
        paths(&t.settle().await),
        [request("approve", "req-789"), request("revoke", "req-789")]
    );
}

/// With `GITHUB_MAX_EVENT_AGE` set, a comment older than that (or dated too far ahead) is
/// answered 200 `rejected` with the reason, and nothing is stored: the next fresh comment gets
/// the first job ID.
#[tokio::test]
async fn with_a_max_event_age_stale_github_comments_are_refused_and_store_nothing() {
    let t = spawn_with(Setup {
        vars: vec![("GITHUB_MAX_EVENT_AGE", "10m".into())],
        ..Setup::default()
    })
    .await;
    t.p0_ok().await;
    let now = SystemTime::now();
    for (i, (at, reason)) in [
        (
            now - Duration::from_secs(3600),
            "old, more than the 10m allowed",
        ),
        (now + Duration::from_secs(3600), "in the future"),
    ]
    .into_iter()
    .enumerate()
    {
        let body = comment_at(600 + i as u64, "/p0 approve req-1 2h", at);
        let (status, answer) = t
            .post(&Hook::github(
                "issue_comment",
                &format!("old-{i}"),
                &body,
                GITHUB_SECRET_NEW,
            ))
            .await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["status"], "rejected", "{answer}");
        assert_eq!(answer["rule"], "comment-command");
        let text = answer["reason"].as_str().unwrap_or_default();
        assert!(
            text.starts_with("freshness: event time ")
                && text.contains("($.comment.created_at)")
                && text.contains(reason),
            "{answer}"
        );
    }
    let fresh = comment_at(610, "/p0 approve req-1 2h", now - Duration::from_secs(5));
    let (status, answer) = t
        .post(&Hook::github(
            "issue_comment",
            "fresh",
            &fresh,
            GITHUB_SECRET_NEW,
        ))
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(
        answer["decisions"][0]["job_id"], 1,
        "nothing stored before: {answer}"
    );
    t.wait_for_calls(1).await;
    assert_eq!(paths(&t.settle().await), [request("approve", "req-1")]);
    assert_eq!(
        t.metric("p0_relay_webhooks_total{outcome=\"rejected\",source=\"github\"}")
            .await,
        Some(2.0)
    );
}

/// The same for PagerDuty's `$.event.occurred_at` with `PAGERDUTY_MAX_EVENT_AGE`; a 200 (not a
/// 4xx), so PagerDuty does not count it towards disabling the subscription.
#[tokio::test]
async fn with_a_max_event_age_stale_pagerduty_events_are_refused_with_200() {
    let t = spawn_with(Setup {
        vars: vec![("PAGERDUTY_MAX_EVENT_AGE", "5m".into())],
        ..Setup::default()
    })
    .await;
    t.p0_ok().await;
    let mut ack: Value =
        serde_json::from_slice(&testdata("pagerduty/incident_acknowledged.json")).unwrap();
    ack["event"]["occurred_at"] = "2026-01-01T00:00:00.000Z".into();
    let (status, answer) = t
        .post(&Hook::pagerduty(
            "pd-old",
            &serde_json::to_vec(&ack).unwrap(),
        ))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["status"], "rejected", "{answer}");
    assert!(
        answer["reason"].as_str().unwrap_or_default().starts_with(
            "freshness: event time 2026-01-01T00:00:00.000Z ($.event.occurred_at) is "
        ),
        "{answer}"
    );
    // The same event, signed again with a current time (a new event), acts.
    ack["event"]["id"] = "01FRESH".into();
    ack["event"]["occurred_at"] = rfc3339(SystemTime::now()).into();
    let (status, answer) = t
        .post(&Hook::pagerduty(
            "pd-new",
            &serde_json::to_vec(&ack).unwrap(),
        ))
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["decisions"][0]["job_id"], 1, "{answer}");
    t.wait_for_calls(1).await;
    assert_eq!(paths(&t.settle().await), [request("approve", "req-789")]);
}

/// `check` names a bad age with its file and field, and warns when the age outlives the dedup
/// window (a replay in between would be accepted again).
#[test]
fn check_names_a_bad_max_event_age_and_warns_when_it_outlives_the_dedup_window() {
    let run = |age: &str| {
        let mut vars = test_env(&[]);
        vars.insert("GITHUB_MAX_EVENT_AGE".into(), age.into());
        run_cli(&["check"], &vars)
    };
    let (code, out) = run("ten minutes");
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("mappings/github.yaml: freshness: max_age: `ten minutes` is not a duration"),
        "{out}"
    );
    let (code, out) = run("30d");
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(
            "source `github`: freshness max_age 30days is longer than store.dedup_window 7days"
        ),
        "{out}"
    );
    let (code, out) = run("10m");
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains("freshness"), "{out}");
}
