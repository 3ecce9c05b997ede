//! The command line as a user runs it: `check`, `test`, `explain`, and `serve` refusing to
//! start without what it needs, and every command keeping text from outside off the terminal
//! raw. Each runs the real binary with a controlled environment.

use std::path::Path;
use std::process::{Command, Output};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `p0-relay` in the repository with only `vars` in its environment.
fn relay(args: &[&str], vars: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_p0-relay"))
        .current_dir(repo())
        .env_clear()
        .envs(vars.iter().copied())
        .args(args)
        .output()
        .expect("run p0-relay")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn check_passes_on_the_shipped_config_with_its_environment_set() {
    let o = relay(&["check", "--env-file", "demo.env"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("relay.yaml: valid, 7 mapping(s)"),
        "{}",
        text(&o)
    );
}

#[test]
fn check_serves_the_enabled_sources_and_checks_the_syntax_of_the_others() {
    // The three default sources, and none of the other sources' secrets set.
    let vars = [
        ("P0_ORG_ID", "acme"),
        ("GITHUB_WEBHOOK_SECRET", "s1"),
        ("PAGERDUTY_WEBHOOK_SECRET", "s2"),
        ("OPSGENIE_WEBHOOK_TOKEN", "t1"),
    ];
    let o = relay(&["check"], &vars);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("relay.yaml: valid, 3 mapping(s)"), "{out}");
    assert!(
        out.contains(
            "ok: grafana (mappings/grafana.yaml, verified by hmac; not enabled, syntax checked)"
        ),
        "{out}"
    );
    assert!(
        out.contains(
            "ok: alertmanager (mappings/alertmanager.yaml, verified by token or basic; not enabled"
        ),
        "{out}"
    );

    // Enabled, its secret is needed.
    let mut with_grafana = vars.to_vec();
    with_grafana.push(("P0_RELAY_SOURCES", "github,grafana"));
    let o = relay(&["check"], &with_grafana);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("GRAFANA_WEBHOOK_SECRET is not set"),
        "{}",
        text(&o)
    );

    // A syntax error in a file that is not enabled still fails `check`.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("mappings")).unwrap();
    std::fs::write(
        dir.path().join("mappings/custom.yaml"),
        "verify: { scheme: token, secrets: t }\nrules: [ { name: r, action: approve, request_id: { path: $.id } } ]\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("mappings/later.yaml"),
        "verify: { scheme: hmac, header: X-Sig, secrets: \"${LATER_SECRET}\" }\nrules:\n  - { name: r, for_each: { path: \"$.items[*]\" }, action: approve, request_id: { path: \"@.id[\" } }\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("relay.yaml"),
        "p0: { org: acme }\nsources: custom\n",
    )
    .unwrap();
    let config = dir.path().join("relay.yaml");
    let o = relay(&["check", "--config", config.to_str().unwrap()], &[]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains("later.yaml: rule `r`: request_id: `@.id[` is not valid JSONPath"),
        "{out}"
    );
    assert!(
        !out.contains("LATER_SECRET"),
        "an unset variable of a disabled source is fine: {out}"
    );
}

#[test]
fn check_fails_naming_the_variable_when_a_secret_is_unset() {
    let o = relay(
        &["check"],
        &[
            ("P0_ORG_ID", "acme"),
            ("GITHUB_WEBHOOK_SECRET", "s1"),
            ("OPSGENIE_WEBHOOK_TOKEN", "t1"),
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let out = text(&o);
    assert!(out.contains("mappings/pagerduty.yaml"), "{out}");
    assert!(out.contains("PAGERDUTY_WEBHOOK_SECRET is not set"), "{out}");
}

#[test]
fn check_names_the_file_rule_and_field_of_a_bad_mapping() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("mappings")).unwrap();
    std::fs::write(
        dir.path().join("mappings/custom.yaml"),
        "verify: { scheme: token, secrets: t }\nrules:\n  - name: broken\n    when:\n      - path: $.a[\n        equals: x\n    action: approve\n    request_id: { path: $.id, regex: '(' }\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("relay.yaml"),
        "p0: { org: acme }\nsources: all\n",
    )
    .unwrap();
    let config = dir.path().join("relay.yaml");
    let o = relay(&["check", "--config", config.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(1));
    let out = text(&o);
    assert!(
        out.contains("custom.yaml: rule `broken`: when[0]: `$.a[` is not valid JSONPath"),
        "{out}"
    );
    assert!(
        out.contains("custom.yaml: rule `broken`: request_id: `(` is not a valid regex"),
        "{out}"
    );
}

#[test]
fn check_names_the_field_of_a_bad_binding() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("mappings")).unwrap();
    std::fs::write(
        dir.path().join("mappings/custom.yaml"),
        r#"verify: { scheme: token, secrets: t }
answer: { via: slack }
rules:
  - name: ends-without-subject
    when: [ { path: $.done, exists: true } ]
    ends_subject: true
    action: approve
  - name: bad-template
    when: [ { path: $.x, exists: true } ]
    action: approve
    request_id: { path: $.id }
    subject: { template: "{$.repo" }
"#,
    )
    .unwrap();
    std::fs::write(dir.path().join("relay.yaml"), "p0: { org: acme }\n").unwrap();
    let config = dir.path().join("relay.yaml");
    let o = relay(&["check", "--config", config.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(1));
    let out = text(&o);
    for want in [
        "custom.yaml: rule `ends-without-subject`: ends_subject: needs a `subject`",
        "custom.yaml: rule `ends-without-subject`: ends_subject: a rule that ends its subject only revokes",
        "custom.yaml: rule `ends-without-subject`: answer: via: `slack` is not github, pagerduty, opsgenie, jsm or none",
        "custom.yaml: rule `bad-template`: subject: template `{$.repo`: a `{` without its `}`",
    ] {
        assert!(out.contains(want), "missing `{want}` in:\n{out}");
    }
}

#[test]
fn a_source_without_verification_refuses_unless_marked_insecure() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("mappings")).unwrap();
    let rule = "rules:\n  - { name: r, action: approve, request_id: { path: $.id }, actorless: { grants: on, trusts: the test } }\n";
    std::fs::write(dir.path().join("mappings/open.yaml"), rule).unwrap();
    std::fs::write(
        dir.path().join("relay.yaml"),
        "p0: { org: acme }\nsources: all\n",
    )
    .unwrap();
    let config = dir.path().join("relay.yaml");
    let o = relay(&["check", "--config", config.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("open.yaml: verify: missing"),
        "{}",
        text(&o)
    );

    std::fs::write(
        dir.path().join("mappings/open.yaml"),
        format!("verify: {{ scheme: none, insecure: true }}\n{rule}"),
    )
    .unwrap();
    let o = relay(&["check", "--config", config.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("warning: source `open` accepts webhooks without any verification"));
}

#[test]
fn test_runs_every_mapping_case() {
    let o = relay(&["test", "--env-file", "demo.env"], &[]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("ok   github: an approver's comment command approves for the asked duration"),
        "{out}"
    );
    let last = out
        .lines()
        .rfind(|l| l.contains("passed"))
        .unwrap_or_default();
    assert!(last.ends_with(" passed, 0 failed"), "{last}");
    let passed: usize = last.split(' ').next().unwrap().parse().unwrap();
    assert!(passed >= 25, "{last}");
}

#[test]
fn test_reports_a_failing_case_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("mappings")).unwrap();
    std::fs::write(
        dir.path().join("mappings/custom.yaml"),
        r#"
verify: { scheme: token, secrets: t }
rules:
  - { name: r, action: approve, request_id: { path: $.id }, actorless: { grants: on, trusts: the test } }
tests:
  - name: right
    payload: { id: req-1 }
    expect: { decisions: [ { action: approve, request_id: req-1, expiration: 1h } ] }
  - name: wrong
    payload: { id: req-1 }
    expect: ignored
"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("relay.yaml"),
        "p0: { org: acme }\nsources: all\n",
    )
    .unwrap();
    let config = dir.path().join("relay.yaml");
    let o = relay(
        &["test", "--config", config.to_str().unwrap(), "custom"],
        &[],
    );
    assert_eq!(o.status.code(), Some(1));
    let out = text(&o);
    assert!(out.contains("ok   custom: right"), "{out}");
    assert!(out.contains("FAIL custom: wrong: expected ignored, got rule `r` decided [approve req-1 1h in org acme]"), "{out}");
    assert!(out.contains("1 passed, 1 failed"), "{out}");
}

#[test]
fn explain_says_why_each_rule_did_or_did_not_match() {
    let o = relay(
        &[
            "explain",
            "--env-file",
            "demo.env",
            "--source",
            "github",
            "--header",
            "X-GitHub-Event: pull_request_review",
            "mappings/testdata/github/pull_request_review_approved.json",
        ],
        &[],
    );
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("no    rule `comment-command`: condition 1 failed: header x-github-event equals `issue_comment` (saw `pull_request_review`)"), "{out}");
    assert!(
        out.contains("no    rule `review-command`: no /p0 command in $.review.body"),
        "{out}"
    );
    assert!(out.contains("MATCH rule `approved-review`"), "{out}");
    assert!(
        out.contains(
            "decision: rule `approved-review` decided [approve req-456 1h in org demo-org]"
        ),
        "{out}"
    );
    assert!(!out.contains("demo-github-secret"), "{out}");
}

#[test]
fn explain_shows_the_subject_and_what_its_end_would_revoke() {
    let o = relay(
        &[
            "explain",
            "--env-file",
            "demo.env",
            "--source",
            "pagerduty",
            "mappings/testdata/pagerduty/incident_resolved.json",
        ],
        &[("P0_RELAY_DB", "/nonexistent-dir/relay.db")],
    );
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("MATCH rule `incident-resolved`"), "{out}");
    assert!(out.contains("subject:  PGR0VU2"), "{out}");
    assert!(
        out.contains("ends subject: revokes every request approved under `PGR0VU2`"),
        "{out}"
    );
    assert!(out.contains("(no store yet"), "{out}");
    assert!(
        out.contains("answer:   through pagerduty on the subject, once P0 has answered"),
        "{out}"
    );
}

#[test]
fn serve_without_a_token_refuses_to_start_naming_the_setting() {
    let o = relay(
        &["serve", "--env-file", "demo.env"],
        &[("P0_RELAY_DB", "/nonexistent/x.db")],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("P0_API_TOKEN"), "{}", text(&o));
}

#[test]
fn explain_shows_which_header_and_which_secret_verified() {
    let demo = "whsec_ZGVtby1pbmNpZGVudGlvLXNpZ25pbmcta2V5LTAwMDE=";
    let body =
        std::fs::read(repo().join("mappings/testdata/incidentio/incident_live.json")).unwrap();
    let ts = 1764288000;
    let sig = p0_relay::verify::sign_standard_webhooks(demo, "msg_x1", ts, &body).unwrap();
    let args = |at: &str| {
        vec![
            "explain".to_owned(),
            "--env-file".into(),
            "demo.env".into(),
            "--source".into(),
            "incidentio".into(),
            "-H".into(),
            "webhook-id: msg_x1".into(),
            "-H".into(),
            format!("webhook-timestamp: {ts}"),
            "-H".into(),
            format!("webhook-signature: {sig}"),
            "--at".into(),
            at.into(),
            "mappings/testdata/incidentio/incident_live.json".into(),
        ]
    };
    // The demo secret rotated in second place.
    let rotated = format!("whsec_b3RoZXItc2VjcmV0LW9mLTMyLWJ5dGVzLTAwMDAwMDAw,{demo}");
    let vars = [("INCIDENTIO_WEBHOOK_SECRET", rotated.as_str())];
    let run = |at: &str| {
        let a = args(at);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        text(&relay(&a, &vars))
    };
    let out = run(&(ts + 60).to_string());
    assert!(
        out.contains(
            "verified: standard-webhooks, header webhook-signature, secret #2 of the list"
        ),
        "{out}"
    );
    assert!(
        out.contains(
            "decision: rule `incident-status` decided [approve req-inc-301 1h in org demo-org]"
        ),
        "{out}"
    );
    assert!(!out.contains(demo) && !out.contains("b3RoZXIt"), "{out}");
    let out = run(&(ts + 600).to_string());
    assert!(
        out.contains("verified: NO, webhook-timestamp is too far from the relay's clock (replayed or delayed) (standard-webhooks): a live relay answers 401"),
        "{out}"
    );
}

/// Text a sender (or P0, or a mapping file) controls: a title-setting OSC, a screen clear, a
/// carriage return, a backspace, NUL, 8-bit CSI and NEL (C1), a right-to-left override, DEL.
const EVIL: &str =
    "\u{1b}]0;pwned\u{7}\u{1b}[2J\rX\u{8}\u{0}\u{9b}31m\u{85}\u{202e}gnp.exe\u{7f}\u{2066}";

/// Characters that must never reach a terminal raw: every control character but the line
/// break between lines, and the invisible bidirectional and format controls.
fn unsafe_for_terminal(c: char) -> bool {
    (c.is_control() && c != '\n')
        || matches!(c, '\u{61c}' | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}')
        || matches!(c, '\u{2060}'..='\u{206f}' | '\u{feff}' | '\u{fff9}'..='\u{fffb}')
}

/// JSON with every non-ASCII and control character escaped, so it is also YAML a strict parser accepts.
fn ascii_json(v: &serde_json::Value) -> String {
    let mut out = String::new();
    for c in v.to_string().chars() {
        if c.is_ascii() && !c.is_control() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{u:04x}"));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_sender_or_p0_text_reaches_the_terminal_raw() {
    use serde_json::json;
    use wiremock::matchers::method;
    use wiremock::{Mock, MockServer, ResponseTemplate};

    // P0 refuses every call with an error text full of escape sequences.
    let p0 = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({ "error": EVIL })))
        .mount(&p0)
        .await;

    // The shipped mappings, with EVIL the approver of PagerDuty and Opsgenie, and one whose
    // rule, condition and test case names carry EVIL.
    let dir = tempfile::tempdir().unwrap();
    let mappings = dir.path().join("mappings");
    std::fs::create_dir(&mappings).unwrap();
    let evil_yaml = ascii_json(&json!(EVIL));
    for (source, approvers) in [
        ("github", "GITHUB_APPROVERS"),
        ("pagerduty", "PAGERDUTY_APPROVERS"),
        ("opsgenie", "OPSGENIE_APPROVERS"),
    ] {
        let text = std::fs::read_to_string(repo().join(format!("mappings/{source}.yaml")))
            .unwrap()
            .replace(&format!("\"${{{approvers}:-}}\""), &evil_yaml);
        std::fs::write(mappings.join(format!("{source}.yaml")), text).unwrap();
    }
    let evil_mapping = json!({
        "verify": { "scheme": "token", "secrets": "t" },
        "rules": [{
            "name": format!("rule{EVIL}"),
            "when": [{ "path": "$.kind", "equals": EVIL }],
            "action": "approve",
            "request_id": { "path": "$.id" },
            "actorless": { "grants": "on", "trusts": "the test" },
        }],
        "tests": [{
            "name": format!("case{EVIL}"),
            "payload": { "id": "req-1", "kind": EVIL },
            "expect": "ignored",
        }],
    });
    std::fs::write(mappings.join("evil.yaml"), ascii_json(&evil_mapping)).unwrap();
    let config = crate::common::write_config(
        dir.path(),
        &p0.uri(),
        &crate::common::Setup {
            mappings_dir: Some(mappings.clone()),
            ..crate::common::Setup::default()
        },
    );
    let vars = crate::common::test_env(&[]);
    let relay =
        crate::common::BinRelay::start(&config, &vars, dir.path().join("relay.log"), &[]).await;

    // Every field a sender controls that is stored: the dedup key (from the body when no
    // delivery header is sent) and the actor.
    let mut note: serde_json::Value = serde_json::from_slice(&crate::common::testdata(
        "pagerduty/incident_annotated.json",
    ))
    .unwrap();
    note["event"]["id"] = EVIL.into();
    note["event"]["agent"]["id"] = EVIL.into();
    let note = serde_json::to_vec(&note).unwrap();
    let mut hook = crate::common::Hook::pagerduty("unused", &note);
    hook.headers.retain(|(k, _)| k != "X-Webhook-Id");
    let (status, answer) = relay.post(&hook).await;
    assert_eq!(status, 202, "{answer}");

    let mut og: serde_json::Value =
        serde_json::from_slice(&crate::common::testdata("opsgenie/addnote.json")).unwrap();
    og["alert"]["alertId"] = EVIL.into();
    og["alert"]["userId"] = EVIL.into();
    og["alert"]["updatedAt"] = EVIL.into();
    let og = serde_json::to_vec(&og).unwrap();
    let (status, answer) = relay.post(&crate::common::Hook::opsgenie(&og)).await;
    assert_eq!(status, 202, "{answer}");

    let cfg = config.to_str().unwrap();
    let mut rejected = String::new();
    for _ in 0..200 {
        rejected = crate::common::run_cli(&["jobs", "--config", cfg, "list", "--json"], &vars).1;
        if rejected.matches("\"state\":\"rejected\"").count() == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!(
        rejected.matches("\"state\":\"rejected\"").count(),
        2,
        "{rejected}"
    );

    let payload = dir.path().join("payload.json");
    std::fs::write(&payload, &note).unwrap();
    let evil_payload = dir.path().join("evil.json");
    std::fs::write(
        &evil_payload,
        json!({ "id": "req-2", "kind": EVIL }).to_string(),
    )
    .unwrap();
    let other_payload = dir.path().join("other.json");
    std::fs::write(
        &other_payload,
        json!({ "id": "req-2", "kind": "x" }).to_string(),
    )
    .unwrap();
    let (p, e, o) = (
        payload.to_str().unwrap(),
        evil_payload.to_str().unwrap(),
        other_payload.to_str().unwrap(),
    );
    let mut seen = String::new();
    for args in [
        vec!["jobs", "--config", cfg, "list"],
        vec!["jobs", "--config", cfg, "list", "--json"],
        vec!["jobs", "--config", cfg, "show", "1"],
        vec!["jobs", "--config", cfg, "show", "2"],
        vec!["explain", "--config", cfg, "--source", "pagerduty", p],
        vec!["explain", "--config", cfg, "--source", "evil", e],
        vec!["explain", "--config", cfg, "--source", "evil", o],
        vec!["test", "--config", cfg, "evil"],
        vec!["check", "--config", cfg],
    ] {
        let (_, out) = crate::common::run_cli(&args, &vars);
        let raw: Vec<char> = out.chars().filter(|&c| unsafe_for_terminal(c)).collect();
        assert!(raw.is_empty(), "{args:?} printed {raw:?}:\n{out:?}");
        seen.push_str(&out);
    }
    // The text is shown, escaped: nothing was simply dropped.
    for shown in ["pwned", "gnp.exe", "rule", "case"] {
        assert!(seen.contains(shown), "{shown} missing:\n{seen}");
    }
    assert!(seen.contains("\\u{1b}]0;pwned\\u{7}"), "{seen}");
    drop(relay);
}

#[test]
fn check_names_a_postgres_store_without_its_password() {
    let url = "postgres://relay:pw-4f8a1c@db.internal:5432/relay?sslmode=require";
    let o = relay(
        &["check", "--env-file", "demo.env"],
        &[("P0_RELAY_DB", url)],
    );
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains(
            "store: postgres://relay:***@db.internal:5432/relay?sslmode=require (PostgreSQL)"
        ),
        "{out}"
    );
    assert!(!out.contains("pw-4f8a1c"), "{out}");
    // The URL may come from a file (a mounted secret), as every setting may.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("db-url");
    std::fs::write(&file, format!("{url}\n")).unwrap();
    let o = relay(
        &["check", "--env-file", "demo.env"],
        &[("P0_RELAY_DB_FILE", file.to_str().unwrap())],
    );
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("store: postgres://relay:***@db.internal"),
        "{out}"
    );
    assert!(!out.contains("pw-4f8a1c"), "{out}");
}

#[test]
fn a_url_that_is_not_postgres_is_refused_never_taken_for_a_file_name() {
    for url in [
        "mysql://root:pw-4f8a1c@db/relay",
        "sqlite:///var/lib/relay.db",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let o = Command::new(env!("CARGO_BIN_EXE_p0-relay"))
            .current_dir(dir.path())
            .env_clear()
            .env("P0_RELAY_DB", url)
            .args([
                "serve",
                "--dry-run",
                "--config",
                repo().join("relay.yaml").to_str().unwrap(),
                "--env-file",
                repo().join("demo.env").to_str().unwrap(),
            ])
            .output()
            .unwrap();
        let out = text(&o);
        assert_eq!(o.status.code(), Some(1), "{out}");
        assert!(
            out.contains("store.path") && out.contains("not a PostgreSQL"),
            "{out}"
        );
        assert!(!out.contains("pw-4f8a1c"), "{out}");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "nothing created"
        );
    }
}
