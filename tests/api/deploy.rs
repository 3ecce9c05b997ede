//! The files that run the relay elsewhere stay valid: the compose file, the alerting rules,
//! the dashboard (every metric it charts exists), the mock P0's copy of the contract, and the
//! Dockerfile's health check, run as Docker runs it against a real relay.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::*;
use wiremock::matchers::any;
use wiremock::{Mock, MockServer, ResponseTemplate};

/// Runs a tool that CI installs, which must succeed; elsewhere, skips when it is missing.
fn tool(cmd: &str, args: &[&str]) -> Option<String> {
    let (ok, text) = ci_tool(cmd, args, &repo())?;
    assert!(ok, "{cmd} {args:?} failed:\n{text}");
    Some(text)
}

#[test]
fn compose_file_is_valid() {
    if let Some(out) = tool("docker-compose", &["config"]) {
        for service in [
            "postgres:",
            "relay-1:",
            "relay-2:",
            "lb:",
            "mock-p0:",
            "prometheus:",
            "grafana:",
        ] {
            assert!(out.contains(service), "{out}");
        }
    }
}

#[test]
fn alerting_rules_are_valid() {
    if let Some(out) = tool("promtool", &["check", "rules", "deploy/alerts.yml"]) {
        assert!(out.contains("SUCCESS: 10 rules found"), "{out}");
    }
}

#[tokio::test]
async fn every_metric_the_dashboard_and_alerts_use_is_exported() {
    let t = spawn().await;
    let (_, exposition) = t.get("/metrics").await;
    let dashboard =
        std::fs::read_to_string(repo().join("deploy/grafana/dashboards/p0-relay.json")).unwrap();
    let alerts = std::fs::read_to_string(repo().join("deploy/alerts.yml")).unwrap();
    let mut checked = 0;
    for text in [&dashboard, &alerts] {
        for (i, _) in text.match_indices("p0_relay_") {
            let name: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(
                exposition.contains(&format!("\n{name}")),
                "`{name}` is not exported"
            );
            checked += 1;
        }
    }
    assert!(checked >= 15, "{checked}");
}

#[test]
fn the_mock_p0_serves_the_shared_contract() {
    let copy: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo().join("deploy/mock-p0/openapi.json")).unwrap())
            .unwrap();
    for action in ["approve", "deny", "revoke"] {
        let path = format!("/o/{{orgId}}/permission-requests/{{requestId}}/{action}");
        assert!(copy["paths"][&path]["post"].is_object(), "{path}");
    }
    let shared = repo().join("../shared/contracts/p0-access-requests.openapi.json");
    if let Ok(bytes) = std::fs::read(&shared) {
        let original: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            copy, original,
            "deploy/mock-p0/openapi.json drifted from the shared contract"
        );
    }
}

/// The Dockerfile's HEALTHCHECK command as Docker runs it: the exec form as written, the
/// shell form through `/bin/sh -c` (dash on the Debian runtime image).
fn healthcheck_command() -> Vec<String> {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let text = text.replace("\\\n", " ");
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("HEALTHCHECK"))
        .expect("the Dockerfile has a HEALTHCHECK");
    let (_, command) = line.split_once(" CMD ").expect("HEALTHCHECK ... CMD ...");
    let command = command.trim();
    if command.starts_with('[') {
        serde_json::from_str(command).expect("exec form is a JSON array")
    } else {
        vec!["/bin/sh".into(), "-c".into(), command.into()]
    }
}

/// Runs the health check as in the container: in the folder holding `relay.yaml` (the image's
/// WORKDIR), with the container's environment and the binary on `PATH`.
fn run_healthcheck(workdir: &Path, vars: &HashMap<String, String>) -> (Option<i32>, String) {
    let argv = healthcheck_command();
    let bin = Path::new(env!("CARGO_BIN_EXE_p0-relay")).parent().unwrap();
    let o = Command::new(&argv[0])
        .args(&argv[1..])
        .current_dir(workdir)
        .env_clear()
        .envs(vars)
        .env(
            "PATH",
            format!("{}:/usr/local/bin:/usr/bin:/bin", bin.display()),
        )
        .output()
        .expect("run the health check");
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.code(), out)
}

/// Starts `p0-relay serve` with `workdir/relay.yaml`, logging to `workdir/relay.log`.
fn serve(workdir: &Path, vars: &HashMap<String, String>) -> Child {
    let log = std::fs::File::create(workdir.join("relay.log")).unwrap();
    Command::new(env!("CARGO_BIN_EXE_p0-relay"))
        .current_dir(workdir)
        .env_clear()
        .envs(vars)
        .args(["serve", "--config", "relay.yaml"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start p0-relay")
}

/// Runs the health check until it exits with `code` (about 5 s at most), and returns its
/// output.
async fn healthcheck_until(code: i32, workdir: &Path, vars: &HashMap<String, String>) -> String {
    let mut last = (None, String::new());
    for _ in 0..100 {
        last = run_healthcheck(workdir, vars);
        if last.0 == Some(code) {
            return last.1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "health check never exited {code}; last: {last:?}\nrelay log:\n{}",
        std::fs::read_to_string(workdir.join("relay.log")).unwrap_or_default()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_container_health_check_follows_readiness() {
    // P0 refuses the token on every call (and any probe of it).
    let p0 = MockServer::start().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(401).set_body_json(serde_json::json!({"error": "no"})))
        .mount(&p0)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // As in the image: the relay listens on every address, the check finds it on loopback.
    let config = write_config(dir.path(), &p0.uri(), &Setup::default());
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("listen: 127.0.0.1:0", &format!("listen: 0.0.0.0:{port}")),
    )
    .unwrap();
    let vars = test_env(&[]);
    let mut relay = serve(dir.path(), &vars);

    let out = healthcheck_until(0, dir.path(), &vars).await;
    assert!(
        out.contains(&format!("ready: http://127.0.0.1:{port}/readyz")),
        "{out}"
    );

    // P0 rejects the token: the relay still accepts durably, so it stays ready (a load
    // balancer must not turn every replica away); the check says so and warns.
    let hook = Hook::comment("health-1", "/p0 approve req-1 1h");
    let (status, _) =
        answer(send(&client(), &format!("http://127.0.0.1:{port}"), &hook).await).await;
    assert_eq!(status, 202);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let out = loop {
        let (code, out) = run_healthcheck(dir.path(), &vars);
        assert_eq!(code, Some(0), "{out}");
        if out.contains("warning") {
            break out;
        }
        assert!(std::time::Instant::now() < deadline, "never warned: {out}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(out.starts_with("ready: "), "{out}");
    assert!(out.contains("P0 rejected the API token (401)"), "{out}");
    assert_eq!(out.trim_end().lines().count(), 1, "one line: {out}");

    // Down.
    relay.kill().unwrap();
    relay.wait().unwrap();
    let (code, out) = run_healthcheck(dir.path(), &vars);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("cannot connect"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_check_speaks_tls_when_the_relay_does() {
    let cert = rcgen::generate_simple_self_signed(vec!["relay.example.com".to_owned()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), cert.signing_key.serialize_pem()).unwrap();
    let port = free_port();
    let config = write_config(
        dir.path(),
        "http://127.0.0.1:9",
        &Setup {
            inbound: "  tls: { cert: cert.pem, key: key.pem }\n".into(),
            ..Setup::default()
        },
    );
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("listen: 127.0.0.1:0", &format!("listen: 127.0.0.1:{port}")),
    )
    .unwrap();
    let vars = test_env(&[]);
    let mut relay = serve(dir.path(), &vars);
    let out = healthcheck_until(0, dir.path(), &vars).await;
    assert!(
        out.contains(&format!("ready: https://127.0.0.1:{port}/readyz")),
        "{out}"
    );

    // A URL given explicitly is verified: this certificate is trusted by nobody.
    let (code, out) = run_cli(
        &[
            "health",
            "--url",
            &format!("https://127.0.0.1:{port}/readyz"),
        ],
        &vars,
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(out.starts_with("not ready: "), "{out}");
    relay.kill().unwrap();
    relay.wait().unwrap();
}

/// `deploy/post-samples.sh` against a real relay serving every source with `demo.env`: every
/// sample is accepted, so a newcomer sees each source go through.
#[tokio::test]
async fn the_sample_script_gets_every_source_accepted() {
    for cmd in ["curl", "openssl"] {
        if std::process::Command::new(cmd)
            .arg("--version")
            .output()
            .is_err()
        {
            crate::common::skip::skip(cmd);
            return;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "http://127.0.0.1:9",
        &Setup {
            top: "sources: all\n".into(),
            ..Setup::default()
        },
    );
    let demo = std::fs::read_to_string(repo().join("demo.env")).unwrap();
    let mut vars: std::collections::HashMap<String, String> = demo
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    vars.insert("P0_ORG_ID".into(), ORG.into());
    let relay = BinRelay::start(&config, &vars, dir.path().join("relay.log"), &["--dry-run"]).await;
    let out = std::process::Command::new("sh")
        .arg(repo().join("deploy/post-samples.sh"))
        .arg(format!("http://{}", relay.addr))
        .output()
        .expect("run the script");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sources = [
        "github",
        "pagerduty",
        "opsgenie",
        "jsm",
        "alertmanager",
        "grafana",
        "incidentio",
    ];
    for source in sources {
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(source))
            .unwrap_or_else(|| panic!("no line for {source}:\n{text}"));
        assert!(
            line.contains(" 202 ") && line.contains(r#""status":"accepted""#),
            "{line}"
        );
    }
    relay.signal("TERM");
    assert_eq!(relay.wait(), Some(0));
}

#[test]
fn the_provider_contracts_are_copies_of_the_shared_excerpts() {
    for (name, path, verb) in [
        (
            "github-feedback.json",
            "/repos/{owner}/{repo}/issues/comments/{comment_id}/reactions",
            "post",
        ),
        ("pagerduty-feedback.json", "/incidents/{id}/notes", "post"),
        (
            "opsgenie-feedback.json",
            "/v2/alerts/{identifier}/notes",
            "post",
        ),
        ("pagerduty-oncall.json", "/oncalls", "get"),
        ("pagerduty-oncall.json", "/incidents/{id}", "get"),
        (
            "opsgenie-oncall.json",
            "/v2/schedules/{identifier}/on-calls",
            "get",
        ),
        (
            "github-teams.json",
            "/orgs/{org}/teams/{team_slug}/memberships/{username}",
            "get",
        ),
    ] {
        let copy: serde_json::Value = serde_json::from_slice(
            &std::fs::read(repo().join("deploy/contracts").join(name)).unwrap(),
        )
        .unwrap();
        assert!(
            copy["paths"][path][verb].is_object(),
            "{name}: {verb} {path}"
        );
        let shared = repo().join("../shared/contracts").join(name);
        if let Ok(bytes) = std::fs::read(&shared) {
            let original: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(
                copy, original,
                "deploy/contracts/{name} drifted from shared/"
            );
        }
    }
}
