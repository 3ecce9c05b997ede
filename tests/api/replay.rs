//! Replays and freshness: a captured signed delivery posted again with a fresh unsigned header
//! is a `duplicate` for the whole dedup window and makes no P0 call; after it, the grant is
//! too old (an hour by default, judged on the provider's signed time): refused, recorded and
//! answered back, never sent. Ending access is never refused for age.

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

/// A PagerDuty acknowledgement as event `event_id`, occurring at `at`.
fn ack_at(event_id: &str, at: SystemTime) -> Vec<u8> {
    let mut v: Value =
        serde_json::from_slice(&testdata("pagerduty/incident_acknowledged.json")).unwrap();
    v["event"]["id"] = event_id.into();
    v["event"]["occurred_at"] = humantime::format_rfc3339_millis(at).to_string().into();
    serde_json::to_vec(&v).unwrap()
}

/// A relay answering back through `providers`, on SQLite or on `db`, with `vars` and `store`
/// (extra YAML under `store:`).
async fn answering(
    providers: &crate::common::Providers,
    db: Option<&crate::common::pg::TestDb>,
    vars: &[(&'static str, &str)],
    store: &str,
) -> (TestRelay, String) {
    let mut all = crate::common::answer_vars();
    all.extend(vars.iter().map(|(k, v)| (*k, v.to_string())));
    let t = spawn_with(Setup {
        vars: all,
        top: providers.yaml(),
        store_url: db.map(|d| d.url()),
        store_extra: store.into(),
        ..Setup::default()
    })
    .await;
    let at = match db {
        Some(d) => d.url(),
        None => t.dir.path().join("relay.db").display().to_string(),
    };
    (t, at)
}

/// By default grants are refused once an hour old, judged on the time the provider signed: a
/// correctly signed comment and acknowledgement two hours old are answered 200 `rejected`,
/// stored only to be recorded refused and answered back where they were asked, and never
/// sent; fresh ones are approved.
async fn stale_grants_are_refused_and_answered(db: Option<&crate::common::pg::TestDb>) {
    use crate::common::body;
    let providers = crate::common::Providers::start().await;
    let (t, store) = answering(&providers, db, &[], "").await;
    t.p0_ok().await;
    let two_hours_ago = SystemTime::now() - Duration::from_secs(2 * 3600);
    let old = comment_at(700, "/p0 approve req-1 2h", two_hours_ago);
    let (status, answer) = t
        .post(&Hook::github(
            "issue_comment",
            "old",
            &old,
            GITHUB_SECRET_NEW,
        ))
        .await;
    assert_eq!(
        (status, answer["status"].as_str()),
        (200, Some("rejected")),
        "{answer}"
    );
    // Its age is judged to the second when it arrives: two hours, or a second more on a
    // loaded machine.
    let reason = |age: &str| {
        format!(
            "event is {age} old ({} at $.comment.created_at); grants must be under 1h",
            rfc3339(two_hours_ago)
        )
    };
    let said = answer["reason"].as_str().unwrap_or_default();
    assert!(said == reason("2h") || said == reason("2h 1s"), "{answer}");
    let reason = said.to_owned();
    assert_eq!(
        answer["job_ids"],
        json!([1]),
        "stored to be answered back: {answer}"
    );
    let (status, answer) = t
        .post(&Hook::pagerduty(
            "pd-old",
            &ack_at("01OLDACK", two_hours_ago),
        ))
        .await;
    assert_eq!(
        (status, answer["status"].as_str()),
        (200, Some("rejected")),
        "{answer}"
    );
    assert!(
        answer["reason"]
            .as_str()
            .unwrap()
            .starts_with("event is 2h"),
        "{answer}"
    );
    // Each refusal is answered where it was asked: a -1 and a comment on GitHub, a note on
    // the incident.
    let mut github = t.store.exactly(&providers.github, 2).await;
    // The two answers go out side by side: the reaction first here, whichever came first.
    github.sort_by_key(|r| !r.url.path().ends_with("/reactions"));
    assert_eq!(
        github[0].url.path(),
        "/repos/acme/infra/issues/comments/700/reactions"
    );
    assert_eq!(body(&github[0]), json!({"content": "-1"}));
    assert_eq!(
        body(&github[1]),
        json!({"body": format!("p0-relay: refused to approve request req-1, and did not ask P0: {reason}.")})
    );
    let notes = t.store.exactly(&providers.pagerduty, 1).await;
    assert!(
        body(&notes[0])["note"]["content"]
            .as_str()
            .unwrap()
            .starts_with(
                "p0-relay: refused to approve request req-789, and did not ask P0: event is 2h old"
            ),
        "{:?}",
        body(&notes[0])
    );
    let (_, shown) = run_cli(&["jobs", "show", "1", "--db", &store], &test_env(&[]));
    assert!(
        shown.contains("(rejected)") && shown.contains(&reason),
        "{shown}"
    );
    // Fresh, the same grants act.
    let now = SystemTime::now();
    let fresh = comment_at(701, "/p0 approve req-1 2h", now);
    let (status, answer) = t
        .post(&Hook::github(
            "issue_comment",
            "fresh",
            &fresh,
            GITHUB_SECRET_NEW,
        ))
        .await;
    assert_eq!(status, 202, "{answer}");
    let (status, answer) = t
        .post(&Hook::pagerduty("pd-new", &ack_at("01NEWACK", now)))
        .await;
    assert_eq!(status, 202, "{answer}");
    t.wait_for_calls(2).await;
    assert_eq!(
        paths(&t.settle().await),
        [request("approve", "req-1"), request("approve", "req-789")],
        "only the fresh grants reach P0"
    );
}

#[tokio::test]
async fn grants_two_hours_old_are_refused_by_default_and_answered_back() {
    stale_grants_are_refused_and_answered(None).await;
}

#[tokio::test]
async fn grants_two_hours_old_are_refused_by_default_and_answered_back_on_postgres() {
    let Some(db) = crate::common::pg::TestDb::create().await else {
        return;
    };
    stale_grants_are_refused_and_answered(Some(&db)).await;
}

/// Once the store has forgotten a delivery (after its dedup window), a replay of it is new to
/// the store, but no longer fresh: refused as stale, never sent again. The dedup window is
/// always longer than the freshness window, so no delivery is both forgotten and fresh.
async fn a_replay_after_the_dedup_window_is_refused_as_stale(
    db: Option<&crate::common::pg::TestDb>,
) {
    let providers = crate::common::Providers::start().await;
    let (t, _) = answering(
        &providers,
        db,
        &[
            ("GITHUB_MAX_EVENT_AGE", "2s"),
            ("PAGERDUTY_MAX_EVENT_AGE", "2s"),
        ],
        "  dedup_window: 3s\n",
    )
    .await;
    t.p0_ok().await;
    let written = SystemTime::now();
    let comment = comment_at(710, "/p0 approve req-7 2h", written);
    let hook = Hook::github("issue_comment", "first", &comment, GITHUB_SECRET_NEW);
    let (status, answer) = t.post(&hook).await;
    assert_eq!(status, 202, "{answer}");
    t.wait_for_calls(1).await;
    let (status, answer) = t.post(&hook.header("X-GitHub-Delivery", "again")).await;
    assert_eq!(
        answer["status"], "duplicate",
        "within the window: {status} {answer}"
    );
    // Past the dedup window (the clock's condition, not a guess at how long a step takes).
    while SystemTime::now() < written + Duration::from_millis(3100) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let replay = Hook::github("issue_comment", "day-8", &comment, GITHUB_SECRET_NEW);
    let (status, answer) = t.post(&replay).await;
    assert_eq!(
        (status, answer["status"].as_str()),
        (200, Some("rejected")),
        "{answer}"
    );
    assert!(
        answer["reason"]
            .as_str()
            .unwrap()
            .contains("grants must be under 2s"),
        "{answer}"
    );
    // The refusal is recorded and answered; its answer back is the sentinel that it was
    // handled, and P0 still saw one call.
    t.store.exactly(&providers.github, 3).await;
    assert_eq!(paths(&t.settle().await), [request("approve", "req-7")]);
}

#[tokio::test]
async fn a_replay_after_the_dedup_window_is_refused_as_stale_not_granted() {
    a_replay_after_the_dedup_window_is_refused_as_stale(None).await;
}

#[tokio::test]
async fn a_replay_after_the_dedup_window_is_refused_as_stale_not_granted_on_postgres() {
    let Some(db) = crate::common::pg::TestDb::create().await else {
        return;
    };
    a_replay_after_the_dedup_window_is_refused_as_stale(Some(&db)).await;
}

/// Ending access is never refused for age: a resolve two days late (PagerDuty retries for
/// up to 48 hours) still revokes what was approved on its incident.
#[tokio::test]
async fn a_stale_resolve_still_revokes() {
    let t = spawn().await;
    t.p0_ok().await;
    let (status, answer) = t
        .post(&Hook::pagerduty(
            "pd-ack",
            &ack_at("01ACKFRESH", SystemTime::now()),
        ))
        .await;
    assert_eq!(status, 202, "{answer}");
    t.wait_for_calls(1).await;
    let mut resolved: Value =
        serde_json::from_slice(&testdata_as_captured("pagerduty/incident_resolved.json")).unwrap();
    resolved["event"]["occurred_at"] =
        humantime::format_rfc3339_millis(SystemTime::now() - Duration::from_secs(2 * 86_400))
            .to_string()
            .into();
    let (status, answer) = t
        .post(&Hook::pagerduty(
            "pd-res",
            &serde_json::to_vec(&resolved).unwrap(),
        ))
        .await;
    assert_eq!(status, 202, "{answer}");
    t.wait_for_calls(2).await;
    assert_eq!(
        paths(&t.settle().await),
        [request("approve", "req-789"), request("revoke", "req-789")]
    );
}

/// `check` names a bad age with its file and field, refuses a dedup window that is not longer
/// than a freshness window, and warns when freshness is off; a gated rule may not turn it off.
#[test]
fn check_refuses_a_dedup_window_no_longer_than_the_freshness_window() {
    let run = |extra: &[(&str, &str)]| {
        let mut vars = test_env(extra);
        vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        run_cli(&["check"], &vars)
    };
    let (code, out) = run(&[("GITHUB_MAX_EVENT_AGE", "ten minutes")]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("mappings/github.yaml: freshness: max_age: `ten minutes` is not a duration"),
        "{out}"
    );
    for age in ["7d", "30d"] {
        let (code, out) = run(&[("GITHUB_MAX_EVENT_AGE", age)]);
        assert_eq!(code, Some(1), "{out}");
        assert!(
            out.contains(
                "store.dedup_window 7days must be longer than source `github`'s freshness max_age"
            ),
            "{out}"
        );
    }
    let (code, out) = run(&[("GITHUB_MAX_EVENT_AGE", "0")]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("warning: source `github`: freshness is off (max_age 0)"),
        "{out}"
    );
    assert!(out.contains("policy: github/comment-command: grants: 1 approver (GITHUB_APPROVERS); gate: off; fresh: off (max_age 0); cap: 12h"), "{out}");
    let (code, out) = run(&[
        ("PAGERDUTY_MAX_EVENT_AGE", "0"),
        ("PAGERDUTY_ONCALL", "on"),
        ("PAGERDUTY_ONCALL_ESCALATION_POLICIES", "PUS0KTE"),
    ]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("pagerduty.yaml: freshness: max_age: 0 turns freshness off, which rule `note-command` may not"),
        "{out}"
    );
    let (code, out) = run(&[("GITHUB_MAX_EVENT_AGE", "10m")]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(
            "fresh: 10m, on the signed event time ($.comment.created_at or $.review.submitted_at)"
        ),
        "{out}"
    );
}
