//! Secrets never leave the relay: a full run of the real binary at trace level, its metrics
//! and every CLI command are scraped for each configured secret. Also: SIGTERM stops it
//! cleanly, and secrets can come from files.

use std::time::Duration;

use crate::common::*;
use wiremock::matchers::{method, path_regex};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// The key the audit trail's seals are made with.
const AUDIT_KEY: &str = "audit-key-secret-6c6c6c6c";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_appears_in_logs_metrics_or_cli_output() {
    const ANSWER_TOKENS: [(&str, &str); 3] = [
        ("GITHUB_TOKEN", "ghp-secret-answer-7f7f"),
        ("PAGERDUTY_API_TOKEN", "pd-secret-answer-8e8e"),
        ("OPSGENIE_API_KEY", "og-secret-answer-9d9d"),
    ];
    let p0 = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path_regex("req-unauth"))
        .respond_with(
            ResponseTemplate::new(401).set_body_json(serde_json::json!({"error": "Unauthorized"})),
        )
        .mount(&p0)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&p0)
        .await;
    // The providers' APIs for answers back, one fake for all three.
    let providers = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(201))
        .mount(&providers)
        .await;
    let api = providers.uri();
    let answers = format!(
        "answers:\n  github: {{ token: \"${{GITHUB_TOKEN}}\", api_url: \"{api}\" }}\n  \
         pagerduty: {{ token: \"${{PAGERDUTY_API_TOKEN}}\", from: a@b.example, api_url: \"{api}\" }}\n  \
         opsgenie: {{ token: \"${{OPSGENIE_API_KEY}}\", api_url: \"{api}\" }}\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        top: answers,
        ..Setup::default()
    };
    let config = write_config(dir.path(), &p0.uri(), &setup);
    let mut vars = test_env(&[]);
    vars.insert("RUST_LOG".into(), "trace".into());
    for (k, v) in ANSWER_TOKENS {
        vars.insert(k.into(), v.into());
    }
    vars.insert("P0_RELAY_AUDIT_KEY".into(), AUDIT_KEY.into());
    let log = dir.path().join("relay.log");
    let relay = BinRelay::start(&config, &vars, log.clone(), &[]).await;

    let comment = testdata("github/issue_comment_created.json");
    let hooks = vec![
        Hook::github("issue_comment", "s-1", &comment, GITHUB_SECRET_NEW),
        Hook::github("issue_comment", "s-3", &comment, "forged"),
        Hook::pagerduty("s-4", &testdata("pagerduty/incident_annotated.json")),
        Hook::opsgenie(&testdata("opsgenie/acknowledge.json")),
        Hook::opsgenie(&testdata("opsgenie/close.json")).header("Authorization", "Bearer wrong"),
        // Last, so no later success clears the not-ready state it causes.
        Hook::github(
            "issue_comment",
            "s-2",
            &github_comment("/p0 approve req-unauth", "octocat"),
            GITHUB_SECRET_OLD,
        ),
    ];
    for hook in &hooks {
        relay.post(hook).await;
    }
    for _ in 0..200 {
        if p0.received_requests().await.unwrap_or_default().len() >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // Answers back were sent (with their tokens), and traced.
    for _ in 0..200 {
        if providers
            .received_requests()
            .await
            .unwrap_or_default()
            .len()
            >= 2
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        providers
            .received_requests()
            .await
            .unwrap_or_default()
            .len()
            >= 2
    );
    let metrics = get_text(&format!("http://{}/metrics", relay.addr)).await;
    let mut readyz = String::new();
    for _ in 0..200 {
        readyz = get_text(&format!("http://{}/readyz", relay.addr)).await;
        if readyz.contains("P0 rejected") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        readyz.contains("P0 rejected the API token"),
        "{readyz}\n{}",
        std::fs::read_to_string(&log).unwrap()
    );
    relay.signal("TERM");
    assert_eq!(relay.wait(), Some(0), "SIGTERM exits 0");

    let mut outputs = vec![
        ("log".to_owned(), std::fs::read_to_string(&log).unwrap()),
        ("metrics".to_owned(), metrics),
        ("readyz".to_owned(), readyz),
    ];
    let cfg = config.to_str().unwrap();
    let payload = testdata_path("github/issue_comment_created.json");
    for args in [
        vec!["check", "--config", cfg],
        vec!["test", "--config", cfg],
        vec![
            "explain",
            "--config",
            cfg,
            "--source",
            "github",
            "-H",
            "X-GitHub-Event: issue_comment",
            &payload,
        ],
        vec!["jobs", "--config", cfg, "list"],
        vec!["jobs", "--config", cfg, "list", "--json"],
        vec!["jobs", "--config", cfg, "show", "1"],
        vec!["jobs", "--config", cfg, "show", "4"],
        vec!["audit", "--config", cfg],
        vec!["audit", "--config", cfg, "--json"],
        vec!["audit", "--config", cfg, "verify"],
    ] {
        let (code, out) = run_cli(&args, &vars);
        assert_eq!(code, Some(0), "{args:?}: {out}");
        outputs.push((args.join(" "), out));
    }
    let log_text = &outputs[0].1;
    assert!(
        log_text.contains("P0 rejected the relay's API token"),
        "the 401 is logged loudly"
    );
    assert!(log_text.contains("outcome=\"unauthorized\""), "{log_text}");
    // Each audit event is a line of its own, once committed.
    assert!(
        log_text.contains("audit: audit event id=1 ") && log_text.contains("event=\"accepted\""),
        "{log_text}"
    );
    for (what, text) in &outputs {
        for secret in [
            TOKEN,
            GITHUB_SECRET_NEW,
            GITHUB_SECRET_OLD,
            PD_SECRET,
            OG_TOKEN,
            ANSWER_TOKENS[0].1,
            ANSWER_TOKENS[1].1,
            ANSWER_TOKENS[2].1,
            AUDIT_KEY,
        ] {
            assert!(!text.contains(secret), "{what} contains a secret:\n{text}");
        }
    }
}

fn testdata_path(rel: &str) -> String {
    repo()
        .join("mappings/testdata")
        .join(rel)
        .to_string_lossy()
        .into_owned()
}

#[tokio::test]
async fn secrets_can_come_from_files() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gh-secret");
    std::fs::write(&file, "from-a-file\n").unwrap();
    let t = spawn_with(Setup {
        vars: vec![(
            "GITHUB_WEBHOOK_SECRET_FILE",
            file.to_string_lossy().into_owned(),
        )],
        unset: vec!["GITHUB_WEBHOOK_SECRET"],
        ..Setup::default()
    })
    .await;
    let ping = testdata("github/ping.json");
    let (status, _) = t
        .post(&Hook::github("ping", "f-1", &ping, "from-a-file"))
        .await;
    assert_eq!(status, 200);
    let (status, _) = t
        .post(&Hook::github("ping", "f-2", &ping, GITHUB_SECRET_NEW))
        .await;
    assert_eq!(status, 401);

    let env = p0_relay::config::env::Env::default().overlay(
        &[("TOKEN_FILE".to_owned(), file.to_string_lossy().into_owned())]
            .into_iter()
            .collect(),
    );
    assert_eq!(env.expand("${TOKEN}").as_deref(), Ok("from-a-file"));
}

/// A token an HTTP header cannot carry (a line break pasted with it) is refused at start,
/// naming the setting and never the token; before, it was sent as an empty header.
#[test]
fn a_token_a_header_cannot_carry_is_refused_naming_the_setting_not_the_token() {
    use p0_relay::config::{Settings, env::Env};
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        top: "answers:\n  github: { token: \"${GITHUB_TOKEN}\" }\n  \
              pagerduty: { token: \"${PAGERDUTY_API_TOKEN}\", from: \"${PAGERDUTY_FROM}\" }\n"
            .into(),
        ..Setup::default()
    };
    let config = write_config(dir.path(), "http://127.0.0.1:9", &setup);
    let env = Env::default().overlay(&test_env(&[
        ("P0_API_TOKEN", "p0-secret\r\nX-Injected: 1"),
        ("GITHUB_TOKEN", "gh-secret\u{7}"),
        ("PAGERDUTY_API_TOKEN", "pd-secret-é"),
        ("PAGERDUTY_FROM", "on\u{1}call@example.com"),
    ]));
    let errors = Settings::load(&config, &env)
        .expect_err("refused")
        .join("\n");
    for field in [
        "p0.token",
        "answers.github.token",
        "answers.pagerduty.token",
        "answers.pagerduty.from",
    ] {
        assert!(
            errors.contains(&format!(
                "{field}: holds a character an HTTP header cannot carry"
            )),
            "{field}:\n{errors}"
        );
    }
    for token in ["p0-secret", "gh-secret", "pd-secret"] {
        assert!(!errors.contains(token), "{errors}");
    }
}
