//! Every alerting source end to end: real-shaped payloads with their real authentication, the
//! exact P0 calls and answers; group notifications that decide per alert; enabled sources; and
//! a source added by a mapping file alone.

use crate::common::*;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use p0_relay::app::{Options, Relay};
use p0_relay::config::Settings;
use p0_relay::config::env::Env;
use p0_relay::verify::{sign_hex, unix_now};
use serde_json::{Value, json};

async fn spawn_all() -> TestRelay {
    let t = spawn_with(Setup {
        top: "sources: all\n".into(),
        ..Setup::default()
    })
    .await;
    t.p0_ok().await;
    t
}

fn sorted(mut calls: Vec<(String, String, Value)>) -> Vec<(String, String, Value)> {
    calls.sort_by(|a, b| a.0.cmp(&b.0));
    calls
}

/// `(request_id, action, expiration, coalesced)` of each decision in an answer.
fn decided(answer: &Value) -> Vec<(String, String, String, bool)> {
    answer["decisions"]
        .as_array()
        .map(|ds| {
            ds.iter()
                .map(|d| {
                    (
                        d["request_id"].as_str().unwrap_or("").to_owned(),
                        d["action"].as_str().unwrap_or("").to_owned(),
                        d["expiration"].as_str().unwrap_or("").to_owned(),
                        d["coalesced"].as_bool().unwrap_or(false),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn d(id: &str, action: &str, exp: &str, coalesced: bool) -> (String, String, String, bool) {
    (id.into(), action.into(), exp.into(), coalesced)
}

#[tokio::test]
async fn alertmanager_decides_per_alert_and_deduplicates_per_alert() {
    let t = spawn_all().await;
    let firing = testdata("alertmanager/firing.json");

    // Three alerts in one group: two carry a request, the third is skipped.
    let (status, answer) = t.post(&Hook::alertmanager(&firing)).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["rule"], "alert-lifecycle");
    assert_eq!(
        decided(&answer),
        [
            d("req-am-101", "approve", "2h", false),
            d("req-am-102", "approve", "1h", false)
        ]
    );
    t.wait_for_calls(2).await;
    assert_eq!(
        sorted(summarize(&t.settle().await)),
        [
            call("approve", "req-am-101", json!({ "expirationLength": "2h" })),
            call("approve", "req-am-102", json!({ "expirationLength": "1h" })),
        ]
    );

    // Alertmanager sends the same group again (repeat_interval, a retry): nothing new.
    let (status, answer) = t.post(&Hook::alertmanager(&firing)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["status"], "duplicate");
    assert_eq!(answer["job_ids"], json!([1, 2]));

    // One alert resolves while the other still fires: only the resolved one is new.
    let (status, answer) = t
        .post(&Hook::alertmanager(&testdata("alertmanager/resolved.json")))
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(
        decided(&answer),
        [
            d("req-am-101", "revoke", "", false),
            d("req-am-102", "approve", "1h", true)
        ]
    );
    let calls = t.wait_for_calls(3).await;
    assert_eq!(
        summarize(&t.settle().await)[2..],
        [call("revoke", "req-am-101", json!({}))]
    );
    assert_eq!(calls.len(), 3);
    assert_eq!(
        t.metric("p0_relay_decisions_total{action=\"approve\",source=\"alertmanager\"}")
            .await,
        Some(2.0)
    );
}

/// The request IDs a subject end revoked, from an answer.
fn revoked(answer: &Value) -> Vec<String> {
    answer["revoked"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .map(|r| r["request_id"].as_str().unwrap_or("").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn a_resolved_alert_ends_only_its_own_access_even_when_it_names_no_request() {
    let t = spawn_all().await;
    let mut group: Value = serde_json::from_slice(&testdata("alertmanager/firing.json")).unwrap();
    let (status, answer) = t
        .post(&Hook::alertmanager(&serde_json::to_vec(&group).unwrap()))
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(
        decided(&answer),
        [
            d("req-am-101", "approve", "2h", false),
            d("req-am-102", "approve", "1h", false)
        ]
    );
    t.wait_for_calls(2).await;

    // The first alert resolves; Alertmanager's resolved notification carries the alert's
    // current labels and annotations, which here no longer name the request.
    let alert = &mut group["alerts"][0];
    alert["status"] = "resolved".into();
    alert["endsAt"] = "2026-11-28T00:06:07.512Z".into();
    alert["labels"]
        .as_object_mut()
        .unwrap()
        .remove("p0_request_id");
    alert["annotations"]
        .as_object_mut()
        .unwrap()
        .remove("p0_expiration");
    let (status, answer) = t
        .post(&Hook::alertmanager(&serde_json::to_vec(&group).unwrap()))
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(revoked(&answer), ["req-am-101"]);
    // The alert still firing keeps its access (its approve is coalesced, not sent again).
    assert_eq!(decided(&answer), [d("req-am-102", "approve", "1h", true)]);
    t.wait_for_calls(3).await;
    let calls = summarize(&t.settle().await);
    assert_eq!(calls.len(), 3, "{calls:?}");
    assert_eq!(calls[2], call("revoke", "req-am-101", json!({})));
    assert_eq!(
        t.metric("p0_relay_bound_revocations_total{source=\"alertmanager\"}")
            .await,
        Some(1.0)
    );
}

#[tokio::test]
async fn an_incidentio_incident_canceled_after_its_field_was_cleared_still_revokes() {
    let t = spawn_all().await;
    let now = unix_now();
    let live = Hook::incidentio(
        "msg_end_live",
        now,
        &testdata("incidentio/incident_live.json"),
    );
    let (status, answer) = t.post(&live).await;
    assert_eq!(status, 202, "{answer}");
    t.wait_for_calls(1).await;
    let mut canceled: Value =
        serde_json::from_slice(&testdata("incidentio/incident_closed.json")).unwrap();
    let incident = &mut canceled["public_incident.incident_updated_v2"];
    incident["incident_status"]["category"] = "canceled".into();
    incident["custom_field_entries"] = json!([]);
    let (status, answer) = t
        .post(&Hook::incidentio(
            "msg_end_canceled",
            now,
            &serde_json::to_vec(&canceled).unwrap(),
        ))
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(decided(&answer), []);
    assert_eq!(revoked(&answer), ["req-inc-301"]);
    assert_eq!(answer["subject"], "01JDQ6K3W7E2M1V4B8R0T5YF9C");
    t.wait_for_calls(2).await;
    assert_eq!(
        summarize(&t.settle().await)[1..],
        [call("revoke", "req-inc-301", json!({}))]
    );
}

#[tokio::test]
async fn alertmanager_basic_auth_and_a_bad_element_refusing_the_group() {
    let t = spawn_all().await;
    let firing = testdata("alertmanager/firing.json");
    let basic = |user: &str, pw: &str| format!("Basic {}", STANDARD.encode(format!("{user}:{pw}")));
    let (status, answer) = t
        .post(
            &Hook::alertmanager(&firing).header("Authorization", &basic("alertmanager", AM_TOKEN)),
        )
        .await;
    assert_eq!(status, 202, "{answer}");
    let (status, answer) = t
        .post(&Hook::alertmanager(&firing).header("Authorization", &basic("alertmanager", "guess")))
        .await;
    assert_eq!(
        (status, answer["status"].clone()),
        (401, json!("unauthorized"))
    );

    // One alert with a request ID that could reshape P0's URL: the whole group is refused.
    let mut group: Value = serde_json::from_slice(&firing).unwrap();
    group["groupKey"] = "{}:{alertname=\"Other\"}".into();
    group["alerts"][1]["annotations"]["p0_request_id"] = "../../admin".into();
    let (status, answer) = t
        .post(&Hook::alertmanager(&serde_json::to_vec(&group).unwrap()))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["status"], "rejected");
    assert!(
        answer["reason"]
            .as_str()
            .unwrap()
            .starts_with("element 2 of $.alerts[*]: request ID"),
        "{answer}"
    );
    t.wait_for_calls(2).await;
    assert_eq!(
        t.settle().await.len(),
        2,
        "only the first group's two approvals"
    );
}

#[tokio::test]
async fn grafana_signed_alerts_approve_and_resolve_revokes() {
    let t = spawn_all().await;
    let firing = testdata("grafana/firing.json");
    let (status, answer) = t.post(&Hook::grafana(&firing)).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(decided(&answer), [d("req-gf-201", "approve", "30m", false)]);
    // Older Grafana names the header X-Grafana-Alert-Signature.
    let resolved = testdata("grafana/resolved.json");
    let old_header = Hook {
        headers: vec![
            (
                "X-Grafana-Alert-Signature".into(),
                sign_hex(GRAFANA_SECRET, &resolved),
            ),
            ("Content-Type".into(), "application/json".into()),
        ],
        ..Hook::grafana(&resolved)
    };
    let (status, answer) = t.post(&old_header).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(decided(&answer), [d("req-gf-201", "revoke", "", false)]);
    t.wait_for_calls(2).await;
    assert_eq!(
        sorted(summarize(&t.settle().await)),
        [
            call(
                "approve",
                "req-gf-201",
                json!({ "expirationLength": "30m" })
            ),
            call("revoke", "req-gf-201", json!({})),
        ]
    );
}

#[tokio::test]
async fn incidentio_live_approves_closed_revokes_and_a_redelivery_is_a_duplicate() {
    let t = spawn_all().await;
    let now = unix_now();
    let live = Hook::incidentio(
        "msg_2pQ7live",
        now,
        &testdata("incidentio/incident_live.json"),
    );
    let (status, answer) = t.post(&live).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["delivery"], "msg_2pQ7live");
    assert_eq!(decided(&answer), [d("req-inc-301", "approve", "1h", false)]);
    let (status, answer) = t.post(&live).await;
    assert_eq!(
        (status, answer["status"].clone()),
        (200, json!("duplicate"))
    );

    // The triage-only incident is ignored; the closed one revokes. Svix's header names work.
    let triage = Hook::incidentio(
        "msg_2pQ7triage",
        now,
        &testdata("incidentio/incident_created_triage.json"),
    );
    assert_eq!(t.post(&triage).await.1["status"], "ignored");
    let closed = Hook::incidentio(
        "msg_2pQ7closed",
        now,
        &testdata("incidentio/incident_closed.json"),
    );
    let svix = Hook {
        headers: closed
            .headers
            .iter()
            .map(|(k, v)| (k.replace("webhook-", "svix-"), v.clone()))
            .collect(),
        ..closed
    };
    let (status, answer) = t.post(&svix).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(decided(&answer), [d("req-inc-301", "revoke", "", false)]);
    t.wait_for_calls(2).await;
    assert_eq!(
        sorted(summarize(&t.settle().await)),
        [
            call(
                "approve",
                "req-inc-301",
                json!({ "expirationLength": "1h" })
            ),
            call("revoke", "req-inc-301", json!({})),
        ]
    );
}

#[tokio::test]
async fn jsm_alerts_act_like_opsgenie_ones() {
    let t = spawn_all().await;
    let calls = t
        .deliver(&[
            Hook::jsm(&testdata("jsm/acknowledge.json")),
            Hook::jsm(&testdata("jsm/close.json")),
        ])
        .await;
    assert_eq!(
        calls,
        [
            call(
                "approve",
                "req-jsm-654",
                json!({ "expirationLength": "1h" })
            ),
            call("revoke", "req-jsm-654", json!({})),
        ]
    );
    let (status, _) = t
        .post(&Hook::jsm(&testdata("jsm/addnote.json")).header("X-Relay-Token", OG_TOKEN))
        .await;
    assert_eq!(status, 401, "the Opsgenie token is not JSM's");
}

#[tokio::test]
async fn hostile_input_to_every_generic_scheme_is_refused_and_never_reaches_p0() {
    let t = spawn_all().await;
    let gf = testdata("grafana/firing.json");
    let mut tampered = gf.clone();
    tampered.extend_from_slice(b" ");
    let good_gf = sign_hex(GRAFANA_SECRET, &gf);
    let inc = testdata("incidentio/incident_live.json");
    let now = unix_now();
    let fresh = Hook::incidentio("msg_h1", now, &inc);
    let sig = fresh.headers[2].1.clone();
    let am = testdata("alertmanager/firing.json");
    let cases: Vec<(&str, Hook)> = vec![
        (
            "grafana: wrong secret",
            Hook::grafana(&gf).header("X-Grafana-Alerting-Signature", &sign_hex("guess", &gf)),
        ),
        (
            "grafana: tampered body",
            Hook {
                body: tampered,
                ..Hook::grafana(&gf)
            },
        ),
        (
            "grafana: a prefix it does not use",
            Hook::grafana(&gf).header("X-Grafana-Alerting-Signature", &format!("sha256={good_gf}")),
        ),
        (
            "grafana: empty header",
            Hook::grafana(&gf).header("X-Grafana-Alerting-Signature", ""),
        ),
        (
            "grafana: several signatures, none good",
            Hook::grafana(&gf).header(
                "X-Grafana-Alerting-Signature",
                &format!("{}, {}", sign_hex("a", &gf), sign_hex("b", &gf)),
            ),
        ),
        (
            "grafana: no header",
            Hook {
                headers: vec![],
                ..Hook::grafana(&gf)
            },
        ),
        (
            "incidentio: stale timestamp",
            Hook::incidentio("msg_h2", now - 600, &inc),
        ),
        (
            "incidentio: future timestamp",
            Hook::incidentio("msg_h3", now + 600, &inc),
        ),
        (
            "incidentio: fresh timestamp on an old signature",
            Hook::incidentio("msg_h4", now - 600, &inc)
                .header("webhook-timestamp", &now.to_string()),
        ),
        (
            "incidentio: another id",
            with_header(&fresh, "webhook-id", "msg_other"),
        ),
        (
            // The dedup key reads `webhook-id` first: an unsigned one beside a delivery signed
            // under Svix's names would let a captured delivery be replayed as new.
            "incidentio: signed under svix- names, with another, unsigned webhook-id",
            Hook {
                source: fresh.source,
                headers: fresh
                    .headers
                    .iter()
                    .map(|(k, v)| (k.replace("webhook-", "svix-"), v.clone()))
                    .collect(),
                body: fresh.body.clone(),
            }
            .header("webhook-id", "msg_replayed_as_new"),
        ),
        (
            "incidentio: wrong version prefix",
            with_header(&fresh, "webhook-signature", &sig.replace("v1,", "v2,")),
        ),
        (
            "incidentio: empty header",
            with_header(&fresh, "webhook-signature", ""),
        ),
        (
            "incidentio: several signatures, none good",
            with_header(
                &fresh,
                "webhook-signature",
                &format!(
                    "v1,{} v1,{}",
                    STANDARD.encode([1u8; 32]),
                    STANDARD.encode([2u8; 32])
                ),
            ),
        ),
        (
            "incidentio: tampered body",
            Hook {
                body: testdata("incidentio/incident_closed.json"),
                ..Hook::incidentio("msg_h5", now, &inc)
            },
        ),
        (
            "alertmanager: wrong token",
            Hook::alertmanager(&am).header("Authorization", "Bearer guess"),
        ),
        (
            "alertmanager: empty header",
            Hook::alertmanager(&am).header("Authorization", ""),
        ),
        (
            "alertmanager: no header",
            Hook {
                headers: vec![],
                ..Hook::alertmanager(&am)
            },
        ),
        (
            "jsm: wrong token",
            Hook::jsm(&testdata("jsm/acknowledge.json")).header("X-Relay-Token", "guess"),
        ),
    ];
    for (name, hook) in &cases {
        let (status, answer) = t.post(hook).await;
        assert_eq!(status, 401, "{name}: {answer}");
        assert_eq!(answer["status"], "unauthorized", "{name}");
    }
    let (status, answer) = t.post(&fresh).await;
    assert_eq!(status, 202, "the genuine delivery still passes: {answer}");
    t.wait_for_calls(1).await;
    assert_eq!(
        t.settle().await.len(),
        1,
        "only the genuine delivery reached P0"
    );
    assert_eq!(
        t.metric("p0_relay_webhooks_total{outcome=\"unauthorized\",source=\"incidentio\"}")
            .await,
        Some(9.0)
    );
}

fn with_header(hook: &Hook, name: &str, value: &str) -> Hook {
    Hook {
        source: hook.source,
        headers: hook.headers.clone(),
        body: hook.body.clone(),
    }
    .header(name, value)
}

#[tokio::test]
async fn only_enabled_sources_are_served() {
    // Without a `sources` setting: github, pagerduty and opsgenie.
    let t = spawn().await;
    let (status, answer) = t
        .post(&Hook::grafana(&testdata("grafana/firing.json")))
        .await;
    assert_eq!(
        (status, answer["status"].clone()),
        (404, json!("unknown_source"))
    );
    let (_, ready) = t.get("/readyz").await;
    let ready: Value = serde_json::from_str(&ready).unwrap();
    assert_eq!(ready["sources"], json!(["github", "opsgenie", "pagerduty"]));
    assert_eq!(
        t.metric("p0_relay_webhooks_total{outcome=\"invalid\",source=\"unknown\"}")
            .await,
        Some(1.0)
    );

    let t = spawn_with(Setup {
        top: "sources: \"grafana, github\"\n".into(),
        ..Setup::default()
    })
    .await;
    let (_, ready) = t.get("/readyz").await;
    let ready: Value = serde_json::from_str(&ready).unwrap();
    assert_eq!(ready["sources"], json!(["github", "grafana"]));
    assert_eq!(
        t.post(&Hook::opsgenie(&testdata("opsgenie/create.json")))
            .await
            .0,
        404
    );
}

/// Starts a relay with `top` in its config and `unset` left out of the environment.
async fn start_error(top: &str, unset: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        top: top.into(),
        ..Setup::default()
    };
    let config = write_config(dir.path(), "http://127.0.0.1:9", &setup);
    let mut vars = test_env(&[]);
    for name in unset {
        vars.remove(*name);
    }
    let env = Env::default().overlay(&vars);
    let settings = match Settings::load(&config, &env) {
        Ok(s) => s,
        Err(e) => return e.join("\n"),
    };
    match Relay::start(settings, env, Options::default()).await {
        Ok(relay) => {
            relay.stop().await;
            String::new()
        }
        Err(e) => format!("{e:#}"),
    }
}

#[tokio::test]
async fn an_enabled_source_needs_its_secret_and_a_disabled_one_does_not() {
    let err = start_error("sources: github,grafana\n", &["GRAFANA_WEBHOOK_SECRET"]).await;
    assert!(
        err.contains(
            "grafana.yaml: verify.secrets: environment variable GRAFANA_WEBHOOK_SECRET is not set"
        ),
        "{err}"
    );
    assert_eq!(
        start_error("", &["GRAFANA_WEBHOOK_SECRET", "INCIDENTIO_WEBHOOK_SECRET"]).await,
        ""
    );
    let err = start_error("sources: github,datadog\n", &[]).await;
    assert!(
        err.contains("sources: `datadog` is enabled, but there is no"),
        "{err}"
    );
    assert!(err.contains("datadog.yaml"), "{err}");
}

/// A sender the relay has never heard of: a new mapping file with a generic scheme (HMAC-SHA512,
/// base64, a `v1=` prefix, a signed timestamp) and a `for_each`, in a fresh mappings folder, and
/// no code change.
#[tokio::test]
async fn a_new_mapping_file_with_a_generic_scheme_gets_decisions() {
    let mappings = tempfile::tempdir().unwrap();
    std::fs::write(
        mappings.path().join("statusboard.yaml"),
        r#"
verify:
  scheme: hmac
  header: X-Statusboard-Signature
  algorithm: sha512
  encoding: base64
  prefix: "v1="
  timestamp_header: X-Statusboard-Timestamp
  message: "{timestamp}.{body}"
  tolerance: 2m
  secrets: "${STATUSBOARD_SECRET}"
dedup:
  key: [ { path: $.event_id } ]
rules:
  - name: grants
    for_each:
      path: $.grants[*]
      key: [ { path: "@.id" } ]
    when:
      - path: $.type
        equals: grants.changed
    action: { path: "@.state", map: { open: approve, closed: revoke } }
    request_id: { path: "@.request" }
    expiration: { path: "@.for", default: 1h }
    actorless:
      grants: "${STATUSBOARD_GRANTS:-off}"
      trusts: whoever can open a grant on Statusboard
"#,
    )
    .unwrap();
    let t = spawn_with(Setup {
        mappings_dir: Some(mappings.path().to_owned()),
        top: "sources: statusboard\n".into(),
        vars: vec![
            ("STATUSBOARD_SECRET", "older-key,sb-key-2026".into()),
            ("STATUSBOARD_GRANTS", "on".into()),
        ],
        ..Setup::default()
    })
    .await;
    t.p0_ok().await;
    let body = serde_json::to_vec(&json!({
        "event_id": "evt_81",
        "type": "grants.changed",
        "grants": [
            { "id": "g1", "state": "open", "request": "req-sb-1", "for": "15m" },
            { "id": "g2", "state": "closed", "request": "req-sb-2" },
            { "id": "g3", "state": "open", "request": "req-sb-3" }
        ]
    }))
    .unwrap();
    let ts = unix_now().to_string();
    // Signed here independently of the relay's code, as the sender would.
    let mut mac = Hmac::<sha2::Sha512>::new_from_slice(b"sb-key-2026").unwrap();
    mac.update(format!("{ts}.").as_bytes());
    mac.update(&body);
    let sig = format!("v1={}", STANDARD.encode(mac.finalize().into_bytes()));
    let hook = Hook {
        source: "statusboard",
        headers: vec![
            ("X-Statusboard-Signature".into(), format!("v1=AAAA {sig}")),
            ("X-Statusboard-Timestamp".into(), ts.clone()),
            ("Content-Type".into(), "application/json".into()),
        ],
        body: body.clone(),
    };
    let (status, answer) = t.post(&hook).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(
        decided(&answer),
        [
            d("req-sb-1", "approve", "15m", false),
            d("req-sb-2", "revoke", "", false),
            d("req-sb-3", "approve", "1h", false)
        ]
    );
    t.wait_for_calls(3).await;
    assert_eq!(
        sorted(summarize(&t.settle().await)),
        [
            call("approve", "req-sb-1", json!({ "expirationLength": "15m" })),
            call("revoke", "req-sb-2", json!({})),
            call("approve", "req-sb-3", json!({ "expirationLength": "1h" })),
        ]
    );
    // The same bytes with another timestamp: the signature no longer holds.
    let later = (unix_now() + 30).to_string();
    let (status, answer) = t
        .post(&with_header(&hook, "X-Statusboard-Timestamp", &later))
        .await;
    assert_eq!(status, 401, "{answer}");
}
