//! An ended subject stays ended, black-box, on real-shaped deliveries: incident.io's whole path
//! (live approves, closed revokes, a late live is refused), alert groups whose alerts each
//! have their own subject, cut groups counted, and `jobs replay` refusing an approve whose
//! subject ended.

use crate::common::*;
use p0_relay::verify::unix_now;
use serde_json::{Value, json};
use wiremock::matchers::{method, path_regex};
use wiremock::{Mock, ResponseTemplate};

async fn spawn_all() -> TestRelay {
    let t = spawn_with(Setup {
        top: "sources: all\n".into(),
        ..Setup::default()
    })
    .await;
    t.p0_ok().await;
    t
}

const INCIDENT: &str = "01JDQ6K3W7E2M1V4B8R0T5YF9C";

#[tokio::test]
async fn incidentio_live_approves_closed_revokes_and_a_late_live_is_refused() {
    let t = spawn_all().await;
    let now = unix_now();
    let live = testdata("incidentio/incident_live.json");
    let (status, ans) = t.post(&Hook::incidentio("msg_live_1", now, &live)).await;
    assert_eq!(status, 202, "{ans}");
    assert_eq!(ans["subject"], INCIDENT, "{ans}");
    assert_eq!(ans["decisions"][0]["request_id"], "req-inc-301", "{ans}");
    assert_eq!(ans["decisions"][0]["subject"], INCIDENT, "{ans}");
    assert_eq!(
        summarize(&t.wait_for_calls(1).await),
        vec![call(
            "approve",
            "req-inc-301",
            json!({"expirationLength": "1h"})
        )]
    );

    // Closed, by the status-change event: the request is revoked.
    let closed = testdata("incidentio/incident_status_updated_closed.json");
    let (status, ans) = t
        .post(&Hook::incidentio("msg_closed_1", now, &closed))
        .await;
    assert_eq!(status, 202, "{ans}");
    assert_eq!(ans["rule"], "incident-status-updated", "{ans}");
    assert_eq!(ans["decisions"][0]["action"], "revoke", "{ans}");
    assert_eq!(ans["decisions"][0]["request_id"], "req-inc-301", "{ans}");
    assert_eq!(ans["decisions"][0]["subject"], INCIDENT, "{ans}");
    t.wait_for_calls(2).await;

    // A live update incident.io sent before the close and retried after it (a new message
    // ID, as a retry after a timeout of ours may carry): refused, nothing reaches P0.
    let (status, ans) = t.post(&Hook::incidentio("msg_live_late", now, &live)).await;
    assert_eq!(status, 200, "{ans}");
    assert_eq!(ans["status"], "rejected", "{ans}");
    let reason = ans["reason"].as_str().unwrap();
    assert!(
        reason.starts_with(&format!("subject {INCIDENT} ended at ")),
        "{ans}"
    );
    assert_eq!(
        summarize(&t.settle().await),
        vec![
            call("approve", "req-inc-301", json!({"expirationLength": "1h"})),
            call("revoke", "req-inc-301", json!({})),
        ]
    );
    t.wait_metric("p0_relay_refused_total{source=\"incidentio\"}", 1.0)
        .await;
}

/// A group's alerts each have their own subject, named on each decision; a resolved alert
/// ends only its own; the same alert firing again reopens it.
#[tokio::test]
async fn each_alert_in_a_group_is_its_own_subject() {
    let t = spawn_all().await;
    let firing: Value = serde_json::from_slice(&testdata("alertmanager/firing.json")).unwrap();
    let (status, ans) = t
        .post(&Hook::alertmanager(&serde_json::to_vec(&firing).unwrap()))
        .await;
    assert_eq!(status, 202, "{ans}");
    assert!(ans.get("subject").is_none(), "no one subject: {ans}");
    let fingerprints: Vec<&str> = firing["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| {
            a["labels"]["p0_request_id"].is_string()
                || a["annotations"]["p0_request_id"].is_string()
        })
        .map(|a| a["fingerprint"].as_str().unwrap())
        .collect();
    let subjects: Vec<&str> = ans["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["subject"].as_str().unwrap())
        .collect();
    assert_eq!(subjects, fingerprints, "{ans}");
    t.wait_for_calls(2).await;

    let resolved: Value = serde_json::from_slice(&testdata("alertmanager/resolved.json")).unwrap();
    let (status, ans) = t
        .post(&Hook::alertmanager(&serde_json::to_vec(&resolved).unwrap()))
        .await;
    assert_eq!(status, 202, "{ans}");
    let ended = resolved["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["status"] == "resolved")
        .unwrap();
    let fingerprint = ended["fingerprint"].as_str().unwrap();
    let revoke = ans["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["action"] == "revoke")
        .unwrap();
    assert_eq!(revoke["subject"], fingerprint, "{ans}");

    // It fires again (a new startsAt): its fingerprint reopens and its request is approved.
    let mut again = firing.clone();
    let alerts = again["alerts"].as_array_mut().unwrap();
    alerts.retain(|a| a["fingerprint"] == fingerprint);
    alerts[0]["startsAt"] = "2026-11-28T03:00:00Z".into();
    let (status, ans) = t
        .post(&Hook::alertmanager(&serde_json::to_vec(&again).unwrap()))
        .await;
    assert_eq!(status, 202, "{ans}");
    assert_eq!(ans["reopened"], json!([fingerprint]), "{ans}");
    assert_eq!(ans["decisions"][0]["action"], "approve", "{ans}");
    assert_eq!(ans["decisions"][0]["subject"], fingerprint, "{ans}");
}

/// Alerts cut from a group are counted, since one that resolved cannot be revoked by it.
#[tokio::test]
async fn alerts_cut_from_a_group_are_counted() {
    let t = spawn_all().await;
    let cut = testdata("alertmanager/truncated.json");
    let n = serde_json::from_slice::<Value>(&cut).unwrap()["truncatedAlerts"]
        .as_u64()
        .unwrap();
    assert!(n > 0);
    let (status, ans) = t.post(&Hook::alertmanager(&cut)).await;
    assert_eq!(status, 202, "{ans}");
    t.wait_metric(
        "p0_relay_truncated_alerts_total{source=\"alertmanager\"}",
        n as f64,
    )
    .await;
    let (status, _) = t
        .post(&Hook::grafana(&testdata("grafana/firing.json")))
        .await;
    assert_eq!(status, 202);
    assert_eq!(
        t.metric("p0_relay_truncated_alerts_total{source=\"grafana\"}")
            .await
            .unwrap_or(0.0),
        0.0,
        "a whole group counts nothing"
    );
}

/// An approve P0 refused the token for is dead; its incident resolves (nothing was granted, so
/// nothing is revoked); replaying it then would grant access under an ended incident: refused,
/// with the reason, and P0 hears nothing more.
#[tokio::test]
async fn jobs_replay_refuses_an_approve_whose_subject_ended() {
    let t = spawn().await;
    Mock::given(method("POST"))
        .and(path_regex(r"/approve$"))
        .respond_with(ResponseTemplate::new(401).set_body_json(json!({"error": "Unauthorized"})))
        .mount(&t.p0)
        .await;
    t.p0_ok().await;
    let mut ack: Value =
        serde_json::from_slice(&testdata("pagerduty/incident_acknowledged.json")).unwrap();
    ack["event"]["id"] = "01REPLAYACK".into();
    let (status, ans) = t
        .post(&Hook::pagerduty(
            "wh-rp-ack",
            &serde_json::to_vec(&ack).unwrap(),
        ))
        .await;
    assert_eq!(status, 202, "{ans}");
    let approve = ans["decisions"][0]["job_id"].as_i64().unwrap();
    t.wait_for_calls(1).await;
    let db = t.dir.path().join("relay.db");
    wait_for_state(&db, approve, "dead").await;

    let mut resolved: Value =
        serde_json::from_slice(&testdata("pagerduty/incident_resolved.json")).unwrap();
    resolved["event"]["id"] = "01REPLAYRES".into();
    // Its title no longer names the request: the end alone decides.
    resolved["event"]["data"]["title"] = "Orders DB replica lag above 5 minutes".into();
    let (status, ans) = t
        .post(&Hook::pagerduty(
            "wh-rp-res",
            &serde_json::to_vec(&resolved).unwrap(),
        ))
        .await;
    assert_eq!(status, 202, "{ans}");

    let (code, out) = run_cli(
        &[
            "jobs",
            "--db",
            db.to_str().unwrap(),
            "replay",
            &approve.to_string(),
        ],
        &Default::default(),
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!(
            "job {approve} (approve) not replayed: subject PGR0VU2 ended at "
        )),
        "{out}"
    );
    let (code, out) = run_cli(
        &["jobs", "--db", db.to_str().unwrap(), "replay", "--dead"],
        &Default::default(),
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("not replayed: subject PGR0VU2 ended at "),
        "{out}"
    );
    let calls = summarize(&t.settle().await);
    assert!(
        calls.iter().filter(|c| c.0.ends_with("/approve")).count() == 1,
        "the approve is not sent again: {calls:?}"
    );
    wait_for_state(&db, approve, "dead").await;
}
