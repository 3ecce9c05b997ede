//! What SREs see: metrics after a known sequence, inbound rate limiting, hot reload of mappings
//! (kept when broken), SIGHUP, and JSON logs.

use std::time::Duration;

use crate::common::*;
use serde_json::json;
use wiremock::matchers::{method, path_regex};
use wiremock::{Mock, ResponseTemplate};

#[tokio::test]
async fn metrics_count_a_known_sequence() {
    let t = spawn().await;
    Mock::given(method("POST"))
        .and(path_regex("req-gone"))
        .respond_with(
            ResponseTemplate::new(400)
                .set_body_json(json!({"error": "Invalid or expired request"})),
        )
        .mount(&t.p0)
        .await;
    t.p0_ok().await;
    // Before anything happens every family is there, at zero.
    let (_, before) = t.get("/metrics").await;
    for line in [
        "p0_relay_webhooks_total{outcome=\"rate_limited\",source=\"opsgenie\"} 0",
        "p0_relay_webhooks_total{outcome=\"invalid\",source=\"unknown\"} 0",
        "p0_relay_decisions_total{action=\"deny\",source=\"pagerduty\"} 0",
        "p0_relay_p0_requests_total{action=\"revoke\",result=\"unauthorized\"} 0",
        "p0_relay_p0_request_duration_seconds_count{action=\"approve\"} 0",
        "p0_relay_webhook_duration_seconds_count{source=\"github\"} 0",
        "p0_relay_delivery_lag_seconds_count 0",
        "p0_relay_queue_depth 0",
        "p0_relay_dead_letters 0",
        "p0_relay_retries_total 0",
        "p0_relay_mapping_reloads_total{result=\"error\"} 0",
        "p0_relay_build_info{version=\"",
    ] {
        assert!(before.contains(line), "missing `{line}` in:\n{before}");
    }

    let sequence = vec![
        Hook::comment("m-1", "/p0 approve req-1 2h"),
        Hook::comment("m-1", "/p0 approve req-1 2h"),
        Hook::comment("m-2", "/p0 deny req-gone"),
        Hook::comment("m-3", "no command"),
        Hook::comment("m-4", "/p0 approve ../x"),
        Hook::github("issue_comment", "m-5", b"{}", "forged"),
        Hook::github("issue_comment", "m-6", b"not json", GITHUB_SECRET_NEW),
        crate::bindings::pd_note("m-7", "PGR0VU2", "/p0 revoke req-789"),
    ];
    for hook in &sequence {
        t.post(hook).await;
    }
    t.post(&Hook {
        source: "nope",
        ..Hook::comment("m-8", "x")
    })
    .await;
    t.wait_for_calls(3).await;
    t.wait_metric("p0_relay_delivery_lag_seconds_count", 2.0)
        .await;
    t.wait_metric(
        "p0_relay_p0_requests_total{action=\"deny\",result=\"rejected\"}",
        1.0,
    )
    .await;
    t.wait_metric("p0_relay_queue_depth", 0.0).await;
    let expect = [
        (
            "p0_relay_webhooks_total{outcome=\"accepted\",source=\"github\"}",
            2.0,
        ),
        (
            "p0_relay_webhooks_total{outcome=\"duplicate\",source=\"github\"}",
            1.0,
        ),
        (
            "p0_relay_webhooks_total{outcome=\"ignored\",source=\"github\"}",
            1.0,
        ),
        (
            "p0_relay_webhooks_total{outcome=\"rejected\",source=\"github\"}",
            1.0,
        ),
        (
            "p0_relay_webhooks_total{outcome=\"unauthorized\",source=\"github\"}",
            1.0,
        ),
        (
            "p0_relay_webhooks_total{outcome=\"invalid\",source=\"github\"}",
            1.0,
        ),
        (
            "p0_relay_webhooks_total{outcome=\"accepted\",source=\"pagerduty\"}",
            1.0,
        ),
        (
            "p0_relay_webhooks_total{outcome=\"invalid\",source=\"unknown\"}",
            1.0,
        ),
        (
            "p0_relay_webhook_duration_seconds_count{source=\"github\"}",
            7.0,
        ),
        (
            "p0_relay_decisions_total{action=\"approve\",source=\"github\"}",
            1.0,
        ),
        (
            "p0_relay_decisions_total{action=\"deny\",source=\"github\"}",
            1.0,
        ),
        (
            "p0_relay_decisions_total{action=\"revoke\",source=\"pagerduty\"}",
            1.0,
        ),
        (
            "p0_relay_p0_requests_total{action=\"approve\",result=\"success\"}",
            1.0,
        ),
        (
            "p0_relay_p0_requests_total{action=\"deny\",result=\"rejected\"}",
            1.0,
        ),
        (
            "p0_relay_p0_requests_total{action=\"revoke\",result=\"success\"}",
            1.0,
        ),
        (
            "p0_relay_p0_request_duration_seconds_count{action=\"deny\"}",
            1.0,
        ),
        ("p0_relay_delivery_lag_seconds_count", 2.0),
        ("p0_relay_queue_depth", 0.0),
        ("p0_relay_dead_letters", 0.0),
        ("p0_relay_retries_total", 0.0),
    ];
    let (_, text) = t.get("/metrics").await;
    for (series, want) in expect {
        let got = metric_value(&text, &format!("{series} "));
        assert_eq!(got, Some(want), "{series}");
    }
    assert!(
        !text.contains("req-1") && !text.contains("octocat"),
        "labels never carry IDs or actors"
    );
    promtool_check(&text);
}

/// `promtool check metrics` must accept the exposition with no warnings. CI installs
/// promtool; elsewhere the test is skipped.
fn promtool_check(text: &str) {
    use std::io::Write;
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            crate::common::skip::skip(&format!("promtool ({e})"));
            return;
        }
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool: {report}"
    );
}

#[tokio::test]
async fn over_the_inbound_limit_the_answer_is_429_with_retry_after() {
    let t = spawn_with(Setup {
        inbound_rate: 1,
        ..Setup::default()
    })
    .await;
    let ping = testdata("github/ping.json");
    // A burst of twice the rate passes, then the limit holds.
    for i in 0..2 {
        assert_eq!(
            t.post(&Hook::github(
                "ping",
                &format!("rl-{i}"),
                &ping,
                GITHUB_SECRET_NEW
            ))
            .await
            .0,
            200
        );
    }
    let hook = Hook::github("ping", "rl-3", &ping, GITHUB_SECRET_NEW);
    let resp = send(&t.http, &t.url(""), &hook).await;
    assert_eq!(resp.status().as_u16(), 429);
    assert_eq!(
        resp.headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let body: serde_json::Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
    assert_eq!(body["status"], "rate_limited");
    // Other sources have limits of their own.
    assert_eq!(
        t.post(&Hook::pagerduty("rl-pd", &testdata("pagerduty/ping.json")))
            .await
            .0,
        200
    );
    assert_eq!(
        t.metric("p0_relay_webhooks_total{outcome=\"rate_limited\",source=\"github\"}")
            .await,
        Some(1.0)
    );
}

fn copy_mappings(to: &std::path::Path) {
    std::fs::create_dir_all(to.join("testdata")).unwrap();
    for entry in std::fs::read_dir(repo().join("mappings")).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    }
}

const CUSTOM: &str = "verify: { scheme: token, secrets: custom-token }\nrules:\n  - { name: take, action: revoke, request_id: { path: $.id }, actions: [revoke] }\n";

#[tokio::test]
async fn a_changed_mapping_is_reloaded_and_a_broken_one_keeps_the_old_set() {
    let mappings = tempfile::tempdir().unwrap();
    copy_mappings(mappings.path());
    let t = spawn_with(Setup {
        mappings_dir: Some(mappings.path().to_owned()),
        top: "sources: all\n".into(),
        ..Setup::default()
    })
    .await;
    t.p0_ok().await;
    let custom = |id: &str| Hook {
        source: "custom",
        headers: vec![("X-Relay-Token".into(), "custom-token".into())],
        body: serde_json::to_vec(&json!({ "id": id })).unwrap(),
    };
    assert_eq!(t.post(&custom("req-a")).await.0, 404);

    std::fs::write(mappings.path().join("custom.yaml"), CUSTOM).unwrap();
    wait_until(|| async { t.post(&custom("req-a")).await.0 == 202 }).await;
    assert_eq!(
        t.metric("p0_relay_mapping_reloads_total{result=\"success\"}")
            .await,
        Some(1.0)
    );

    // Broken: the old set (with `custom`) keeps serving, and the error names file and rule.
    std::fs::write(
        mappings.path().join("custom.yaml"),
        CUSTOM
            .replace("$.id", "\"$.id[\"")
            .replace("take", "take-broken"),
    )
    .unwrap();
    wait_until(|| async {
        t.metric("p0_relay_mapping_reloads_total{result=\"error\"}")
            .await
            == Some(1.0)
    })
    .await;
    let (status, answer) = t.post(&custom("req-b")).await;
    assert_eq!(status, 202, "{answer}");
    let (status, ready) = t.get("/readyz").await;
    assert_eq!(status, 200, "the old set still serves: {ready}");
    assert!(
        ready
            .contains("custom.yaml: rule `take-broken`: request_id: `$.id[` is not valid JSONPath"),
        "{ready}"
    );
    let calls = t.wait_for_calls(2).await;
    let paths: Vec<String> = summarize(&calls).into_iter().map(|c| c.0).collect();
    assert_eq!(
        paths,
        ["req-a", "req-b"].map(|id| format!("/o/{ORG}/permission-requests/{id}/revoke"))
    );
}

async fn wait_until<F, Fut>(mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..100 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("condition not met in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let mappings = dir.path().join("mappings");
    copy_mappings(&mappings);
    let config = write_config(
        dir.path(),
        "http://127.0.0.1:9",
        &Setup {
            mappings_dir: Some(mappings),
            top: "log:\n  format: json\n".into(),
            ..Setup::default()
        },
    );
    let log = dir.path().join("relay.log");
    let relay = BinRelay::start(&config, &test_env(&[]), log.clone(), &[]).await;
    relay
        .post(&Hook::github(
            "ping",
            "j-1",
            &testdata("github/ping.json"),
            GITHUB_SECRET_NEW,
        ))
        .await;
    relay.signal("HUP");
    for _ in 0..100 {
        if std::fs::read_to_string(&log)
            .unwrap()
            .contains("mappings reloaded")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    relay.signal("TERM");
    assert_eq!(relay.wait(), Some(0));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("mappings reloaded"), "{text}");
    let mut saw_webhook = false;
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if v["message"] == "webhook" {
            saw_webhook = true;
            assert_eq!(v["source"], "github");
            assert_eq!(v["outcome"], "ignored");
            assert_eq!(v["delivery"], "j-1");
            assert!(v["duration_us"].is_u64());
        }
    }
    assert!(saw_webhook, "{text}");
}

/// Regression: posts to a source no mapping names were neither limited nor sampled in the log.
#[tokio::test]
async fn a_burst_to_an_unknown_source_is_rate_limited_and_counted_as_unknown() {
    let t = spawn_with(Setup {
        inbound_rate: 5,
        ..Setup::default()
    })
    .await;
    let mut statuses = Vec::new();
    for i in 0..40 {
        let source = if i % 2 == 0 { "nope" } else { "other-nope" };
        let resp = t
            .http
            .post(t.url(&format!("/webhooks/{source}")))
            .body("{}")
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        if status == 429 {
            assert!(resp.headers().contains_key("retry-after"));
        }
        statuses.push(status);
    }
    // Every unknown source shares one budget: twice the rate passes, then the limit holds.
    assert_eq!(
        statuses.iter().filter(|s| **s == 404).count(),
        10,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        30,
        "{statuses:?}"
    );
    assert_eq!(
        t.metric("p0_relay_webhooks_total{outcome=\"rate_limited\",source=\"unknown\"}")
            .await,
        Some(30.0)
    );
    assert_eq!(
        t.metric("p0_relay_webhooks_total{outcome=\"invalid\",source=\"unknown\"}")
            .await,
        Some(10.0)
    );
    // Known sources keep a budget of their own.
    let ping = testdata("github/ping.json");
    let (status, _) = t
        .post(&Hook::github("ping", "u-1", &ping, GITHUB_SECRET_NEW))
        .await;
    assert_eq!(status, 200);
}

/// The log lines about unknown sources in `log`, as JSON objects.
fn unknown_source_lines(log: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "webhook" && v["source"] == "unknown")
        .collect()
}

/// Regression: every post to an unknown source wrote a log line, so a flood of them flooded
/// the log. Now at most one a second is written, saying how many were left out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_to_unknown_sources_are_logged_at_most_once_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "http://127.0.0.1:9",
        &Setup {
            top: "log:\n  format: json\n".into(),
            ..Setup::default()
        },
    );
    let log = dir.path().join("relay.log");
    let relay = BinRelay::start(&config, &test_env(&[]), log.clone(), &[]).await;
    let http = client();
    let post = || async {
        http.post(format!("http://{}/webhooks/nope", relay.addr))
            .body("{}")
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    let started = std::time::Instant::now();
    for _ in 0..50 {
        assert_eq!(post().await, 404);
    }
    let burst = started.elapsed();
    // Posting on until a line reports what it left out.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !unknown_source_lines(&log)
        .iter()
        .any(|v| v["suppressed"].as_u64() > Some(0))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no line said what it left out: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert_eq!(post().await, 404);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    relay.signal("TERM");
    assert_eq!(relay.wait(), Some(0));
    let lines = unknown_source_lines(&log);
    let windows = 2 + started.elapsed().as_secs() as usize;
    assert!(
        lines.len() <= windows,
        "{} lines for 50+ posts in {burst:?} (burst), {:?} in all",
        lines.len(),
        started.elapsed()
    );
}
