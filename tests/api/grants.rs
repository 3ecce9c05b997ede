//! Who may grant, and what, black-box: nobody grants unless an operator named them; alerts
//! grant only when turned on; an approver approves one request they could see; an end revokes
//! only what was approved under its subject; the signed body, not an unsigned header, picks
//! the rule; grants are capped. Each against the real relay and a fake P0.

use crate::common::pg::TestDb;
use crate::common::*;
use serde_json::{Value, json};

fn request(action: &str, id: &str) -> String {
    format!("/o/{ORG}/permission-requests/{id}/{action}")
}

fn paths(calls: &[wiremock::Request]) -> Vec<String> {
    calls.iter().map(|c| c.url.path().to_owned()).collect()
}

/// Posts a sentinel the relay does send (an approver's GitHub command), waits for its call,
/// and returns every P0 call: what came before it was handled by then.
async fn after_sentinel(t: &TestRelay, id: &str) -> Vec<String> {
    let before = t.p0_calls().await.len();
    let (status, ans) = t
        .post(&Hook::comment(
            &format!("sentinel-{id}"),
            &format!("/p0 approve {id} 1h"),
        ))
        .await;
    assert_eq!(status, 202, "{ans}");
    paths(&t.wait_for_calls(before + 1).await)
}

/// A PagerDuty event from the sample `file` as event `id` on incident `incident` titled
/// `title`, occurring now.
fn pd_event(file: &str, id: &str, incident: &str, title: &str) -> Hook {
    let mut v: Value = serde_json::from_slice(&testdata(file)).unwrap();
    v["event"]["id"] = id.into();
    v["event"]["data"]["id"] = incident.into();
    v["event"]["data"]["title"] = title.into();
    Hook::pagerduty(&format!("wh-{id}"), &serde_json::to_vec(&v).unwrap())
}

// --- Nobody grants unless named ---

/// With the shipped defaults (no PAGERDUTY_APPROVERS), a PagerDuty user's note approving
/// their own request is refused, and P0 never hears of it.
#[tokio::test]
async fn by_default_a_pagerduty_note_from_anyone_is_rejected_and_p0_never_called() {
    let t = spawn_with(Setup {
        unset: vec!["PAGERDUTY_APPROVERS"],
        ..Setup::default()
    })
    .await;
    t.p0_ok().await;
    let note = crate::bindings::pd_note("01SELFAPPROVE", "PGR0VU2", "/p0 approve req-mine 12h");
    let (status, ans) = t.post(&note).await;
    assert_eq!(
        (status, ans["status"].as_str()),
        (200, Some("rejected")),
        "{ans}"
    );
    assert_eq!(ans["reason"], "actor `PLH1HKV` is not allowed to act");
    assert!(ans.get("job_ids").is_none(), "nothing stored: {ans}");
    assert_eq!(
        after_sentinel(&t, "req-sentinel").await,
        [request("approve", "req-sentinel")]
    );
}

/// `*` names nobody: it is accepted only behind an on-call check, and `check` and `serve`
/// refuse it otherwise, naming the variable.
#[test]
fn star_without_a_gate_fails_check_and_serve_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "http://127.0.0.1:9", &Setup::default());
    let config = config.to_str().unwrap();
    for var in [
        "PAGERDUTY_APPROVERS",
        "OPSGENIE_APPROVERS",
        "GITHUB_APPROVERS",
    ] {
        let vars = test_env(&[(var, "*")]);
        for command in ["check", "serve"] {
            let (code, out) = run_cli(&[command, "--config", config], &vars);
            assert_eq!(code, Some(1), "{var} {command}: {out}");
            assert!(
                out.contains(&format!(
                    "actor.allow: `*` (anyone) from {var} is accepted only with the rule's on-call check on"
                )),
                "{var} {command}: {out}"
            );
        }
    }
}

/// `check` prints who may grant through each rule, with its gate, freshness and cap, on one
/// line each; a database across the network is verified unless its URL says otherwise, and
/// `check` says so when it does.
#[test]
fn check_prints_the_grant_policy_and_warns_of_an_unverified_database() {
    let (code, out) = run_cli(&["check", "--env-file", "demo.env"], &Default::default());
    assert_eq!(code, Some(0), "{out}");
    for line in [
        "policy: github/comment-command: grants: 1 approver (GITHUB_APPROVERS); gate: off; fresh: 1h, on the signed event time ($.comment.created_at or $.review.submitted_at); cap: 12h",
        "policy: pagerduty/incident-acknowledged: grants: 1 approver (PAGERDUTY_APPROVERS); gate: off; fresh: 1h, on the signed event time ($.event.occurred_at); cap: 12h",
        "policy: opsgenie/alert-acknowledged: grants: 1 approver (OPSGENIE_APPROVERS); gate: off; fresh: none: judged at receipt (whoever holds the token writes the body, times included); cap: 12h",
        "policy: incidentio/incident-status: grants: no actor (INCIDENTIO_GRANTS=on), trusting whoever can declare an incident.io incident or set its P0 request field; gate: off; fresh: at receipt, within the 5m its signed timestamp allows; cap: 12h",
        "policy: alertmanager/alert-lifecycle: grants: no actor (ALERTMANAGER_GRANTS=on), trusting whoever can get an alert carrying p0_request_id to Alertmanager",
        "warning: source `alertmanager`, rule `alert-lifecycle`: approves with no actor (ALERTMANAGER_GRANTS=on): it trusts whoever",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    let mut vars = test_env(&[
        ("PAGERDUTY_APPROVERS", "*"),
        ("PAGERDUTY_ONCALL", "on"),
        ("PAGERDUTY_ONCALL_ESCALATION_POLICIES", "PUS0KTE,PXPGF42"),
        ("PAGERDUTY_API_TOKEN", "t"),
        ("PAGERDUTY_FROM", "relay@acme.example"),
        (
            "P0_RELAY_DB",
            "postgres://relay@db.internal:5432/relay?sslmode=require",
        ),
    ]);
    vars.remove("GITHUB_APPROVERS");
    let (code, out) = run_cli(&["check"], &vars);
    assert_eq!(code, Some(0), "{out}");
    for line in [
        "policy: pagerduty/note-command: grants: gate only: anyone the on-call check passes (PAGERDUTY_APPROVERS); gate: PagerDuty on call for escalation policy PUS0KTE or PXPGF42 at level 1 or lower; fresh: 1h",
        "policy: github/comment-command: grants: nobody: GITHUB_APPROVERS is empty; gate: off",
        "warning: store.path: the PostgreSQL server at postgres://relay@db.internal:5432/relay?sslmode=require is not verified",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    // Without a mode, a database across the network is verified: no warning.
    vars.insert(
        "P0_RELAY_DB".into(),
        "postgres://relay@db.internal:5432/relay".into(),
    );
    let (code, out) = run_cli(&["check"], &vars);
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains("is not verified"), "{out}");
}

/// Alerts name no person: without its switch a firing alert grants nothing, while a resolved
/// alert still ends what was approved under it (here, by a relay that had grants on).
#[tokio::test]
async fn an_alert_grant_without_its_switch_is_rejected_while_its_resolve_still_ends_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("relay.db");
    let setup = |grants: bool| Setup {
        top: "sources: all\n".into(),
        store_path: Some(db.clone()),
        unset: if grants {
            Vec::new()
        } else {
            vec!["ALERTMANAGER_GRANTS"]
        },
        ..Setup::default()
    };
    // A relay with ALERTMANAGER_GRANTS=on approves what a firing alert names.
    let mut on = spawn_with(setup(true)).await;
    on.p0_ok().await;
    let (status, ans) = on
        .post(&Hook::alertmanager(&testdata("alertmanager/firing.json")))
        .await;
    assert_eq!(status, 202, "{ans}");
    on.wait_for_calls(2).await;
    on.stop().await;
    // Without it, the same alerts firing again (a new group) grant nothing...
    let off = spawn_with(setup(false)).await;
    off.p0_ok().await;
    let mut again: Value = serde_json::from_slice(&testdata("alertmanager/firing.json")).unwrap();
    again["groupKey"] = "{}:{alertname=\"Again\"}".into();
    let (status, ans) = off
        .post(&Hook::alertmanager(&serde_json::to_vec(&again).unwrap()))
        .await;
    assert_eq!(
        (status, ans["status"].as_str()),
        (200, Some("rejected")),
        "{ans}"
    );
    assert!(
        ans["reason"].as_str().unwrap().ends_with(
            "grants without an actor are off for this rule (ALERTMANAGER_GRANTS=on turns them on)"
        ),
        "{ans}"
    );
    // ...and the resolution still ends the alert, revoking what it approved.
    let (status, ans) = off
        .post(&Hook::alertmanager(&testdata("alertmanager/resolved.json")))
        .await;
    assert_eq!(status, 202, "{ans}");
    let calls = off.wait_for_calls(1).await;
    assert_eq!(paths(&calls), [request("revoke", "req-am-101")]);
    assert_eq!(
        paths(&off.settle().await),
        [request("revoke", "req-am-101")],
        "the firing alert in the resolved group approves nothing"
    );
}

/// A mapping test case sees only the mapping's defaults and its own `env:`: with approver
/// lists set in the environment of whoever runs it, every shipped case still passes.
#[test]
fn mapping_test_cases_do_not_depend_on_the_environment_that_runs_them() {
    let mut vars = test_env(&[]);
    for (k, v) in [
        ("PAGERDUTY_APPROVERS", "PSOMEONE"),
        ("OPSGENIE_APPROVERS", "someone-else"),
        ("GITHUB_APPROVERS", "nobody-you-know"),
        ("PAGERDUTY_MAX_EVENT_AGE", "1m"),
        ("ALERTMANAGER_GRANTS", "off"),
    ] {
        vars.insert(k.into(), v.into());
    }
    let (code, out) = run_cli(&["test"], &vars);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.trim_end().ends_with(" passed, 0 failed"), "{out}");
}

// --- One visible request per grant ---

/// Anyone with an Events API routing key writes incident titles: an acknowledgement of an
/// incident whose title names two requests approves neither.
#[tokio::test]
async fn an_acknowledged_title_with_two_tags_approves_nothing() {
    let t = spawn().await;
    t.p0_ok().await;
    let ack = pd_event(
        "pagerduty/incident_acknowledged.json",
        "01TWOTAGS",
        "PGR0VU9",
        "[p0:req-a][p0:req-b] disk full",
    );
    let (status, ans) = t.post(&ack).await;
    assert_eq!(
        (status, ans["status"].as_str()),
        (200, Some("rejected")),
        "{ans}"
    );
    assert_eq!(
        ans["reason"],
        "request_id: names 2 requests (req-a, req-b); a grant approves exactly one"
    );
    assert_eq!(
        after_sentinel(&t, "req-after").await,
        [request("approve", "req-after")]
    );
}

/// An approved review approves the `P0-Request:` line of the pull request's body only where
/// the reviewer sees it: one hidden in an HTML comment approves nothing.
#[tokio::test]
async fn a_hidden_p0_request_line_approves_nothing_while_a_visible_one_approves() {
    let t = spawn().await;
    t.p0_ok().await;
    let review = |id: u64, pr_body: &str| {
        let mut v: Value =
            serde_json::from_slice(&testdata("github/pull_request_review_approved.json")).unwrap();
        v["review"]["id"] = id.into();
        v["pull_request"]["body"] = pr_body.into();
        Hook::github(
            "pull_request_review",
            &format!("review-{id}"),
            &serde_json::to_vec(&v).unwrap(),
            GITHUB_SECRET_NEW,
        )
    };
    let hidden = review(
        9001,
        "Rotates the cache nodes.\r\n\r\n<!--\r\nP0-Request: req-hidden\r\n-->\r\n",
    );
    assert!(hidden.body.len() > 20_000, "the real-size review delivery");
    let (status, ans) = t.post(&hidden).await;
    assert_eq!(
        (status, ans["status"].as_str()),
        (200, Some("ignored")),
        "{ans}"
    );
    let visible = review(
        9002,
        "Rotates the cache nodes.\r\n<!-- P0-Request: req-hidden -->\r\nP0-Request: req-seen\r\n",
    );
    let (status, ans) = t.post(&visible).await;
    assert_eq!(status, 202, "{ans}");
    assert_eq!(ans["decisions"][0]["request_id"], "req-seen", "{ans}");
    let calls = t.wait_for_calls(1).await;
    assert_eq!(paths(&calls), [request("approve", "req-seen")]);
    assert_eq!(paths(&t.settle().await), [request("approve", "req-seen")]);
}

// --- Ends revoke only what they bound ---

/// A resolve whose title names a request approved on another incident revokes nothing (the
/// request's access is that incident's to end), and says so; the resolve of the incident it
/// was approved on revokes it.
async fn an_end_revokes_only_what_was_approved_under_it(db: Option<&TestDb>) {
    let t = spawn_with(Setup {
        store_url: db.map(|d| d.url()),
        ..Setup::default()
    })
    .await;
    t.p0_ok().await;
    let tag = "[p0:req-glass] database access";
    let (status, ans) = t
        .post(&pd_event(
            "pagerduty/incident_acknowledged.json",
            "01ACKA",
            "PINCA",
            tag,
        ))
        .await;
    assert_eq!(status, 202, "{ans}");
    t.wait_for_calls(1).await;
    // Someone triggers and resolves another incident naming the same request.
    let (status, ans) = t
        .post(&pd_event(
            "pagerduty/incident_resolved.json",
            "01RESB",
            "PINCB",
            tag,
        ))
        .await;
    assert_eq!(
        (status, ans["status"].as_str()),
        (202, Some("accepted")),
        "{ans}"
    );
    assert!(
        ans["revoked"].as_array().is_none_or(Vec::is_empty),
        "nothing bound to PINCB: {ans}"
    );
    let refused = ans["decisions"][0]["refused"].as_str().unwrap_or_default();
    assert_eq!(
        refused,
        "request req-glass is not granted under subject PINCB: an end revokes only what was approved under it",
        "{ans}"
    );
    let job = ans["decisions"][0]["job_id"].as_i64().unwrap();
    let store = match db {
        Some(d) => d.url(),
        None => t.dir.path().join("relay.db").display().to_string(),
    };
    let mut shown = String::new();
    for _ in 0..200 {
        shown = run_cli(
            &["jobs", "show", &job.to_string(), "--db", &store],
            &test_env(&[]),
        )
        .1;
        if shown
            .lines()
            .next()
            .is_some_and(|l| l.ends_with("(rejected)"))
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(shown.contains(refused), "{shown}");
    // The incident it was approved on ends it.
    let (status, ans) = t
        .post(&pd_event(
            "pagerduty/incident_resolved.json",
            "01RESA",
            "PINCA",
            tag,
        ))
        .await;
    assert_eq!(status, 202, "{ans}");
    t.wait_for_calls(2).await;
    assert_eq!(
        paths(&t.settle().await),
        [
            request("approve", "req-glass"),
            request("revoke", "req-glass")
        ]
    );
}

#[tokio::test]
async fn an_end_revokes_only_what_was_approved_under_its_subject() {
    an_end_revokes_only_what_was_approved_under_it(None).await;
}

#[tokio::test]
async fn an_end_revokes_only_what_was_approved_under_its_subject_on_postgres() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    an_end_revokes_only_what_was_approved_under_it(Some(&db)).await;
}

/// GitHub subjects are bound to the repository's ID: closing the issue after the repository
/// was renamed still revokes what was approved on it.
#[tokio::test]
async fn a_renamed_repositorys_close_still_revokes() {
    let t = spawn().await;
    t.p0_ok().await;
    let (status, ans) = t
        .post(&Hook::comment("before-rename", "/p0 approve req-42 2h"))
        .await;
    assert_eq!(status, 202, "{ans}");
    assert_eq!(ans["subject"], "70112233#42");
    t.wait_for_calls(1).await;
    let mut closed: Value = serde_json::from_slice(&testdata("github/issues_closed.json")).unwrap();
    closed["repository"]["full_name"] = "acme/infrastructure".into();
    closed["repository"]["name"] = "infrastructure".into();
    let (status, ans) = t
        .post(&Hook::github(
            "issues",
            "closed-after-rename",
            &serde_json::to_vec(&closed).unwrap(),
            GITHUB_SECRET_NEW,
        ))
        .await;
    assert_eq!(status, 202, "{ans}");
    assert_eq!(ans["revoked"][0]["request_id"], "req-42", "{ans}");
    t.wait_for_calls(2).await;
    assert_eq!(
        paths(&t.settle().await),
        [request("approve", "req-42"), request("revoke", "req-42")]
    );
}

// --- The body picks the rule ---

/// `X-GitHub-Event` is not signed: a signed commit comment (or review comment) re-posted as
/// `issue_comment` does not match the comment rule, whose body is a comment on an issue.
#[tokio::test]
async fn a_commit_comment_reposted_as_issue_comment_is_ignored() {
    let t = spawn().await;
    t.p0_ok().await;
    let mut v: Value =
        serde_json::from_slice(&github_comment("/p0 approve req-cc 2h", "octocat")).unwrap();
    // A commit comment: the comment names its commit, and no issue is there.
    v.as_object_mut().unwrap().remove("issue");
    v["comment"]["commit_id"] = "6dcb09b5b57875f334f61aebed695e2e4193db5e".into();
    v["comment"]["path"] = Value::Null;
    let body = serde_json::to_vec(&v).unwrap();
    for event in ["issue_comment", "pull_request_review"] {
        let (status, ans) = t
            .post(&Hook::github(
                event,
                &format!("cc-{event}"),
                &body,
                GITHUB_SECRET_NEW,
            ))
            .await;
        assert_eq!(
            (status, ans["status"].as_str()),
            (200, Some("ignored")),
            "{event}: {ans}"
        );
    }
    assert_eq!(
        after_sentinel(&t, "req-after-cc").await,
        [request("approve", "req-after-cc")]
    );
}

// --- Capped ---

/// Without `decisions.max_expiration`, grants are capped at 12 hours: `52w` is clamped, and
/// the answer says so.
#[tokio::test]
async fn a_year_asked_without_a_configured_cap_is_clamped_to_12h() {
    let t = spawn_with(Setup {
        decisions: Some("decisions:\n  default_expiration: 1h".into()),
        ..Setup::default()
    })
    .await;
    t.p0_ok().await;
    let (status, ans) = t
        .post(&Hook::comment("year", "/p0 approve req-year 52w"))
        .await;
    assert_eq!(status, 202, "{ans}");
    assert_eq!(
        (
            ans["decisions"][0]["expiration"].as_str(),
            ans["decisions"][0]["clamped_from"].as_str()
        ),
        (Some("12h"), Some("52w")),
        "{ans}"
    );
    let calls = t.wait_for_calls(1).await;
    assert_eq!(
        summarize(&calls),
        [call(
            "approve",
            "req-year",
            json!({"expirationLength": "12h"})
        )]
    );
}

// --- The same policy on every relay ---

/// An approve another relay stored (an older release, or settings since changed) is sent only
/// if this relay's own approver list lets its actor grant: here it does not, so it is refused.
#[tokio::test]
async fn an_approve_stored_under_another_approver_list_is_refused_by_this_relays() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("relay.db");
    // The first relay lets octocat grant, but cannot reach P0: the approve is dead after one try.
    let mut first = spawn_with(Setup {
        store_path: Some(db.clone()),
        p0_extra: "    max_attempts: 1\n".into(),
        ..Setup::default()
    })
    .await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .respond_with(wiremock::ResponseTemplate::new(503))
        .mount(&first.p0)
        .await;
    let (status, ans) = first
        .post(&Hook::comment(
            "stored-elsewhere",
            "/p0 approve req-list 1h",
        ))
        .await;
    assert_eq!(status, 202, "{ans}");
    first.wait_for_calls(1).await;
    first.stop().await;
    // This relay names only hubot; the operator replays the dead approve to it.
    let second = spawn_with(Setup {
        store_path: Some(db.clone()),
        vars: vec![("GITHUB_APPROVERS", "hubot".into())],
        ..Setup::default()
    })
    .await;
    second.p0_ok().await;
    let store = db.display().to_string();
    let (code, out) = run_cli(&["jobs", "replay", "1", "--db", &store], &test_env(&[]));
    assert_eq!(code, Some(0), "{out}");
    let mut shown = String::new();
    for _ in 0..200 {
        shown = run_cli(&["jobs", "show", "1", "--db", &store], &test_env(&[])).1;
        if shown
            .lines()
            .next()
            .is_some_and(|l| l.ends_with("(rejected)"))
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(
        shown.contains("not_allowed")
            && shown.contains(
                "actor `octocat` may not approve through rule `comment-command` on this relay"
            ),
        "{shown}"
    );
    // A sentinel by hubot, who may grant here, proves the refusal made no call before it.
    let body = github_comment("/p0 approve req-after-list 1h", "hubot");
    let (status, ans) = second
        .post(&Hook::github(
            "issue_comment",
            "by-hubot",
            &body,
            GITHUB_SECRET_NEW,
        ))
        .await;
    assert_eq!(status, 202, "{ans}");
    assert_eq!(
        paths(&second.wait_for_calls(1).await),
        [request("approve", "req-after-list")],
        "the refused approve never reached P0"
    );
}
