//! The command line as a user runs it: `check`, `test`, `explain`, and `serve` refusing to
//! start without what it needs. Each runs the real binary with a controlled environment.

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
        text(&o).contains("relay.yaml: valid, 3 mapping(s)"),
        "{}",
        text(&o)
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
    std::fs::write(dir.path().join("relay.yaml"), "p0: { org: acme }\n").unwrap();
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
    let rule = "rules:\n  - { name: r, action: approve, request_id: { path: $.id } }\n";
    std::fs::write(dir.path().join("mappings/open.yaml"), rule).unwrap();
    std::fs::write(dir.path().join("relay.yaml"), "p0: { org: acme }\n").unwrap();
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
  - { name: r, action: approve, request_id: { path: $.id } }
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
    std::fs::write(dir.path().join("relay.yaml"), "p0: { org: acme }\n").unwrap();
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
