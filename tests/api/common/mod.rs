//! Black-box test harness: starts the real relay on port 0 against a fake P0 (wiremock) with a
//! fresh store, and helpers that sign and post webhooks the way each provider does.
#![allow(dead_code)]

pub mod pg;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use p0_relay::app::{Options, Relay};
use p0_relay::config::Settings;
use p0_relay::config::env::Env;
use p0_relay::store::{
    Accepted, AnswerJob, AnswerRecord, AttemptRecord, Counts, Job, JobDetail, JobSummary,
    ListFilter, NewDelivery, Replay, Replayed, SqliteStore, Store, StoreError, StoreHandle,
    StoreTask,
};
use p0_relay::verify::sign_hex;
use serde_json::Value;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

pub const TOKEN: &str = "p0-test-api-key-0123456789";
pub const ORG: &str = "acme";
pub const GITHUB_SECRET_NEW: &str = "gh-secret-new-2f1c";
pub const GITHUB_SECRET_OLD: &str = "gh-secret-old-9a7e";
pub const PD_SECRET: &str = "pd-secret-5d3b";
pub const OG_TOKEN: &str = "og-token-77aa";
pub const AM_TOKEN: &str = "am-token-4c1d";
pub const GRAFANA_SECRET: &str = "gf-secret-93be";
/// `whsec_` and the base64 of `incidentio-test-signing-key-01`.
pub const INCIDENTIO_SECRET: &str = "whsec_aW5jaWRlbnRpby10ZXN0LXNpZ25pbmcta2V5LTAx";
pub const JSM_TOKEN: &str = "jsm-token-5e0f";
/// The PagerDuty user of the samples (`$.event.agent.id`).
pub const PD_APPROVER: &str = "PLH1HKV";
/// The Opsgenie and JSM user of the samples (`$.alert.userId`).
pub const OG_APPROVER: &str = "7c1e4f0a-2b3d-4e5f-8a9b-0c1d2e3f4a5b";

/// An HTTP client for tests (the TLS provider installed first, as the relay does).
pub fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A sample delivery from `mappings/testdata`, its event times (`occurred_at`, `created_at`,
/// `submitted_at`) moved to now, as a delivery sent now carries them: grants must be fresh.
/// The bytes keep their length and every other value.
pub fn testdata(rel: &str) -> Vec<u8> {
    at_now(&testdata_as_captured(rel))
}

/// A sample delivery byte for byte as captured, its times in the past.
pub fn testdata_as_captured(rel: &str) -> Vec<u8> {
    std::fs::read(repo().join("mappings/testdata").join(rel)).expect("testdata file")
}

/// `body` with the values of its `occurred_at`, `created_at` and `submitted_at` members set to
/// the current time, in the same form and length (`2026-11-27T10:20:31.114Z` stays 24 bytes).
pub fn at_now(body: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(body);
    let now = std::time::SystemTime::now();
    let seconds = humantime::format_rfc3339_seconds(now).to_string();
    let millis = humantime::format_rfc3339_millis(now).to_string();
    let re = regex::Regex::new(
        r#""(occurred_at|created_at|submitted_at)":"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3})?Z)""#,
    )
    .expect("regex");
    re.replace_all(&text, |c: &regex::Captures<'_>| {
        let t = if c.get(3).is_some() {
            &millis
        } else {
            &seconds
        };
        format!("\"{}\":\"{t}\"", &c[1])
    })
    .into_owned()
    .into_bytes()
}

/// The variables a test relay sees: nothing from the process environment.
pub fn test_env(extra: &[(&str, &str)]) -> HashMap<String, String> {
    let mut vars: HashMap<String, String> = [
        ("P0_ORG_ID", ORG),
        ("P0_API_TOKEN", TOKEN),
        (
            "GITHUB_WEBHOOK_SECRET",
            &format!("{GITHUB_SECRET_NEW},{GITHUB_SECRET_OLD}") as &str,
        ),
        ("PAGERDUTY_WEBHOOK_SECRET", PD_SECRET),
        ("OPSGENIE_WEBHOOK_TOKEN", OG_TOKEN),
        ("ALERTMANAGER_WEBHOOK_TOKEN", AM_TOKEN),
        ("GRAFANA_WEBHOOK_SECRET", GRAFANA_SECRET),
        ("INCIDENTIO_WEBHOOK_SECRET", INCIDENTIO_SECRET),
        ("JSM_WEBHOOK_TOKEN", JSM_TOKEN),
        // The actors of the samples in mappings/testdata may grant; nobody else.
        ("GITHUB_APPROVERS", "octocat"),
        ("PAGERDUTY_APPROVERS", PD_APPROVER),
        ("OPSGENIE_APPROVERS", OG_APPROVER),
        ("JSM_APPROVERS", OG_APPROVER),
        ("ALERTMANAGER_GRANTS", "on"),
        ("GRAFANA_GRANTS", "on"),
        ("INCIDENTIO_GRANTS", "on"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (k, v) in extra {
        vars.insert(k.to_string(), v.to_string());
    }
    vars
}

pub struct TestRelay {
    pub relay: Option<Relay>,
    pub addr: SocketAddr,
    pub p0: MockServer,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
}

/// Options for `spawn_with`.
#[derive(Default)]
pub struct Setup {
    pub vars: Vec<(&'static str, String)>,
    /// Extra YAML appended to the generated relay.yaml sections.
    pub inbound: String,
    pub p0_extra: String,
    /// Extra top-level YAML.
    pub top: String,
    pub mappings_dir: Option<PathBuf>,
    pub dry_run: bool,
    pub store_path: Option<PathBuf>,
    /// A store URL (`postgres://...`) instead of a file.
    pub store_url: Option<String>,
    /// Extra YAML under `store:`.
    pub store_extra: String,
    /// Webhooks per second per source (0 = off).
    pub inbound_rate: u32,
    /// Variables to leave unset.
    pub unset: Vec<&'static str>,
    /// The relay component that panics as it starts (a test of supervision).
    pub panic_in: Option<&'static str>,
    /// A store handed to the relay in place of the one the settings name.
    pub store: Option<Box<dyn p0_relay::store::Store>>,
    /// The `decisions:` section in place of the default one (1h, capped at 12h).
    pub decisions: Option<String>,
}

pub async fn spawn() -> TestRelay {
    spawn_with(Setup::default()).await
}

pub fn write_config(dir: &Path, p0_url: &str, setup: &Setup) -> PathBuf {
    let mappings = setup
        .mappings_dir
        .clone()
        .unwrap_or_else(|| repo().join("mappings"));
    let store = setup.store_url.clone().unwrap_or_else(|| {
        setup
            .store_path
            .clone()
            .unwrap_or_else(|| dir.join("relay.db"))
            .display()
            .to_string()
    });
    let config = format!(
        r#"
listen: 127.0.0.1:0
mappings: {mappings}
p0:
  base_url: {p0_url}
  org: ${{P0_ORG_ID}}
  token: ${{P0_API_TOKEN:-}}
  timeout: 2s
  rate_per_second: 0
  retry:
    base_delay: 10ms
    max_delay: 50ms
{p0_extra}
{decisions}
store:
  path: "{store}"
{store_extra}
inbound:
  rate_per_second: {inbound_rate}
  read_timeout: 2s
{inbound}
{top}
"#,
        mappings = mappings.display(),
        store = store,
        store_extra = setup.store_extra,
        p0_extra = setup.p0_extra,
        inbound = setup.inbound,
        top = setup.top,
        inbound_rate = setup.inbound_rate,
        decisions = setup
            .decisions
            .as_deref()
            .unwrap_or("decisions:\n  default_expiration: 1h\n  max_expiration: 12h"),
    );
    let path = dir.join("relay.yaml");
    std::fs::write(&path, config).expect("write config");
    path
}

pub async fn spawn_with(setup: Setup) -> TestRelay {
    let p0 = MockServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let extra: Vec<(&str, &str)> = setup.vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut vars = test_env(&extra);
    for name in &setup.unset {
        vars.remove(*name);
    }
    let env = Env::default().overlay(&vars);
    let config = write_config(dir.path(), &p0.uri(), &setup);
    let settings = Settings::load(&config, &env).unwrap_or_else(|e| panic!("config: {e:?}"));
    let opts = Options {
        dry_run: setup.dry_run,
        drain: Duration::from_secs(2),
        reload_poll: Duration::from_millis(100),
        panic_in: setup.panic_in,
        ..Options::default()
    };
    let store = setup.store.map(|given| {
        let (handle, thread) = StoreHandle::spawn(given, true).expect("store writer starts");
        (handle, StoreTask::Thread(thread))
    });
    let relay = Relay::build(settings, env, opts, store)
        .await
        .expect("relay builds")
        .run();
    TestRelay {
        addr: relay.addr,
        relay: Some(relay),
        p0,
        dir,
        http: client(),
    }
}

/// A webhook as a provider sends it.
pub struct Hook {
    pub source: &'static str,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Hook {
    pub fn github(event: &str, delivery: &str, body: &[u8], secret: &str) -> Hook {
        Hook {
            source: "github",
            headers: vec![
                ("X-GitHub-Event".into(), event.into()),
                ("X-GitHub-Delivery".into(), delivery.into()),
                (
                    "X-Hub-Signature-256".into(),
                    format!("sha256={}", sign_hex(secret, body)),
                ),
                ("User-Agent".into(), "GitHub-Hookshot/a1b2c3".into()),
                ("Content-Type".into(), "application/json".into()),
            ],
            body: body.to_vec(),
        }
    }

    pub fn pagerduty(webhook_id: &str, body: &[u8]) -> Hook {
        Hook {
            source: "pagerduty",
            headers: vec![
                ("X-Webhook-Id".into(), webhook_id.into()),
                (
                    "X-PagerDuty-Signature".into(),
                    format!("v1={}", sign_hex(PD_SECRET, body)),
                ),
                ("X-Webhook-Subscription".into(), "PSUB123".into()),
                ("User-Agent".into(), "PagerDuty-Webhook/V3.0".into()),
                ("Content-Type".into(), "application/json".into()),
            ],
            body: body.to_vec(),
        }
    }

    pub fn opsgenie(body: &[u8]) -> Hook {
        Hook {
            source: "opsgenie",
            headers: vec![
                ("Authorization".into(), format!("Bearer {OG_TOKEN}")),
                ("Content-Type".into(), "application/json".into()),
            ],
            body: body.to_vec(),
        }
    }

    /// An Alertmanager group notification with its bearer token.
    pub fn alertmanager(body: &[u8]) -> Hook {
        Hook {
            source: "alertmanager",
            headers: vec![
                ("Authorization".into(), format!("Bearer {AM_TOKEN}")),
                ("Content-Type".into(), "application/json".into()),
                ("User-Agent".into(), "Alertmanager/0.28.1".into()),
            ],
            body: body.to_vec(),
        }
    }

    /// A Grafana Alerting notification signed as the webhook contact point signs it.
    pub fn grafana(body: &[u8]) -> Hook {
        Hook {
            source: "grafana",
            headers: vec![
                (
                    "X-Grafana-Alerting-Signature".into(),
                    sign_hex(GRAFANA_SECRET, body),
                ),
                ("Content-Type".into(), "application/json".into()),
                ("User-Agent".into(), "Grafana".into()),
            ],
            body: body.to_vec(),
        }
    }

    /// An incident.io delivery signed with Standard Webhooks at `timestamp` (Unix seconds).
    pub fn incidentio(id: &str, timestamp: i64, body: &[u8]) -> Hook {
        let sig = p0_relay::verify::sign_standard_webhooks(INCIDENTIO_SECRET, id, timestamp, body)
            .expect("a valid secret");
        Hook {
            source: "incidentio",
            headers: vec![
                ("webhook-id".into(), id.into()),
                ("webhook-timestamp".into(), timestamp.to_string()),
                ("webhook-signature".into(), sig),
                ("Content-Type".into(), "application/json".into()),
            ],
            body: body.to_vec(),
        }
    }

    /// A Jira Service Management alert webhook with its token header.
    pub fn jsm(body: &[u8]) -> Hook {
        Hook {
            source: "jsm",
            headers: vec![
                ("X-Relay-Token".into(), JSM_TOKEN.into()),
                ("Content-Type".into(), "application/json".into()),
            ],
            body: body.to_vec(),
        }
    }

    /// An `issue_comment` by the approver `octocat` with `text` as its body, signed with the
    /// newer GitHub secret. Each delivery ID is a comment of its own (its `comment.id` derives
    /// from it), as on GitHub, where a new delivery of a new comment has a new comment ID.
    pub fn comment(delivery: &str, text: &str) -> Hook {
        let id = delivery.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        }) >> 12;
        Hook::github(
            "issue_comment",
            delivery,
            &github_comment_with_id(text, "octocat", id),
            GITHUB_SECRET_NEW,
        )
    }

    pub fn header(mut self, name: &str, value: &str) -> Hook {
        self.headers.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// Sends `hook` to the relay at `base` (`http://127.0.0.1:8080`) as its provider would.
pub async fn send(http: &reqwest::Client, base: &str, hook: &Hook) -> reqwest::Response {
    let mut req = http.post(format!("{base}/webhooks/{}", hook.source));
    for (k, v) in &hook.headers {
        req = req.header(k, v);
    }
    req.body(hook.body.clone()).send().await.expect("send")
}

/// The body of a GET, as text.
pub async fn get_text(url: &str) -> String {
    client()
        .get(url)
        .send()
        .await
        .expect("get")
        .text()
        .await
        .unwrap_or_default()
}

/// The status and JSON answer of a response.
pub async fn answer(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// A GitHub issue comment payload with the given body and author: a new comment (a comment
/// ID of its own) at every call.
pub fn github_comment(body: &str, login: &str) -> Vec<u8> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    github_comment_with_id(body, login, 1_900_000_000 + n)
}

/// A GitHub issue comment payload with the given body, author and comment ID.
pub fn github_comment_with_id(body: &str, login: &str, id: u64) -> Vec<u8> {
    let mut v: Value =
        serde_json::from_slice(&testdata("github/issue_comment_created.json")).unwrap();
    v["comment"]["id"] = id.into();
    v["comment"]["body"] = body.into();
    v["comment"]["user"]["login"] = login.into();
    v["sender"]["login"] = login.into();
    serde_json::to_vec(&v).unwrap()
}

impl TestRelay {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn post(&self, hook: &Hook) -> (u16, Value) {
        answer(send(&self.http, &self.url(""), hook).await).await
    }

    /// Posts each hook in turn, each answered 202 and delivered before the next, and returns
    /// every call P0 received as `summarize` shows it.
    pub async fn deliver(&self, hooks: &[Hook]) -> Vec<(String, String, Value)> {
        for (i, hook) in hooks.iter().enumerate() {
            let (status, answer) = self.post(hook).await;
            assert_eq!(status, 202, "hook {i}: {answer}");
            self.wait_for_calls(i + 1).await;
        }
        summarize(&self.settle().await)
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let resp = self.http.get(self.url(path)).send().await.expect("get");
        (
            resp.status().as_u16(),
            resp.text().await.unwrap_or_default(),
        )
    }

    /// Mounts a P0 that answers 200 to every call.
    pub async fn p0_ok(&self) {
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({"ok": true})))
            .mount(&self.p0)
            .await;
    }

    pub async fn p0_calls(&self) -> Vec<Request> {
        self.p0.received_requests().await.unwrap_or_default()
    }

    /// Waits until P0 has received `n` calls (or fails after a few seconds).
    pub async fn wait_for_calls(&self, n: usize) -> Vec<Request> {
        wait_for_p0_calls(&self.p0, n).await
    }

    /// Gives the worker time to (not) act, then returns every call P0 received.
    pub async fn settle(&self) -> Vec<Request> {
        tokio::time::sleep(Duration::from_millis(400)).await;
        self.p0_calls().await
    }

    pub async fn metric(&self, line_prefix: &str) -> Option<f64> {
        let (_, text) = self.get("/metrics").await;
        text.lines()
            .find(|l| l.starts_with(line_prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// Waits (up to 5 s) until the series `line_prefix` shows `value`; gauges refresh about
    /// once a second.
    pub async fn wait_metric(&self, line_prefix: &str, value: f64) {
        for _ in 0..100 {
            if self.metric(line_prefix).await == Some(value) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let got = self.metric(line_prefix).await;
        panic!("{line_prefix}: expected {value}, got {got:?}");
    }

    pub async fn stop(&mut self) {
        if let Some(r) = self.relay.take() {
            r.stop().await;
        }
    }
}

/// Waits until the fake P0 has received `n` calls (or fails after a few seconds).
pub async fn wait_for_p0_calls(p0: &MockServer, n: usize) -> Vec<Request> {
    for _ in 0..400 {
        let calls = p0.received_requests().await.unwrap_or_default();
        if calls.len() >= n {
            return calls;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let calls = p0.received_requests().await.unwrap_or_default();
    panic!(
        "expected {n} P0 calls, got {}: {:?}",
        calls.len(),
        summarize(&calls)
    );
}

/// A fake P0 that notes when each call arrives and takes 200 ms over approvals.
pub struct Stamped(pub Arc<Mutex<Vec<Instant>>>);

impl wiremock::Respond for Stamped {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        self.0.lock().unwrap().push(Instant::now());
        let slow = request.url.path().ends_with("/approve");
        ResponseTemplate::new(200)
            .set_body_json(serde_json::json!({"ok": true}))
            .set_delay(Duration::from_millis(if slow { 200 } else { 0 }))
    }
}

/// Posts an approve of `req-{name}` to the relay at `first`, then, while the fake P0 at `p0`
/// takes 200 ms over it, a revoke of the same request to the relay at `second` (the same
/// relay, or another on the same database); both reach P0 in order, the revoke less than
/// 400 ms after the approve (a worker that found it only at its next poll, 500 ms, would be
/// later).
pub async fn approve_then_revoke_promptly(p0: &MockServer, name: &str, first: &str, second: &str) {
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    Mock::given(method("POST"))
        .respond_with(Stamped(arrivals.clone()))
        .mount(p0)
        .await;
    let http = client();
    let request = format!("req-{name}");
    let approve = Hook::comment(&format!("{name}-1"), &format!("/p0 approve {request}"));
    assert_eq!(answer(send(&http, first, &approve).await).await.0, 202);
    wait_for_p0_calls(p0, 1).await;
    let revoke = Hook::comment(&format!("{name}-2"), &format!("/p0 revoke {request}"));
    assert_eq!(answer(send(&http, second, &revoke).await).await.0, 202);
    let calls = wait_for_p0_calls(p0, 2).await;
    assert_eq!(
        summarize(&calls),
        vec![
            call(
                "approve",
                &request,
                serde_json::json!({"expirationLength": "1h"})
            ),
            call("revoke", &request, serde_json::json!({})),
        ]
    );
    let at = arrivals.lock().unwrap().clone();
    let gap = at[1] - at[0];
    assert!(
        gap < Duration::from_millis(400),
        "the revoke reached P0 {} ms after the approve, which took 200 ms",
        gap.as_millis()
    );
}

/// `(path, authorization, body)` of each call, for assertions.
pub fn summarize(calls: &[Request]) -> Vec<(String, String, Value)> {
    calls
        .iter()
        .map(|r| {
            (
                r.url.path().to_owned(),
                r.headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned(),
                serde_json::from_slice(&r.body).unwrap_or(Value::Null),
            )
        })
        .collect()
}

/// The call P0 should have received for one decision.
pub fn call(action: &str, request_id: &str, body: Value) -> (String, String, Value) {
    (
        format!("/o/{ORG}/permission-requests/{request_id}/{action}"),
        format!("Bearer {TOKEN}"),
        body,
    )
}

/// The real binary, started as a separate process (for tests where a process must die or
/// where its whole output is inspected).
pub struct BinRelay {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl BinRelay {
    /// Starts `p0-relay serve` with `config` and `vars`, and waits until it is ready.
    // The child is reaped by `wait` or, failing that, by `Drop`.
    #[allow(clippy::zombie_processes)]
    pub async fn start(
        config: &Path,
        vars: &HashMap<String, String>,
        log: PathBuf,
        extra_args: &[&str],
    ) -> BinRelay {
        let port = free_port();
        let text = std::fs::read_to_string(config).unwrap();
        let text = text.replace("listen: 127.0.0.1:0", &format!("listen: 127.0.0.1:{port}"));
        std::fs::write(config, text).unwrap();
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_p0-relay"))
            .env_clear()
            .envs(vars)
            .arg("serve")
            .arg("--config")
            .arg(config)
            .args(extra_args)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start p0-relay");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let http = client();
        for _ in 0..200 {
            if let Ok(r) = http.get(format!("http://{addr}/readyz")).send().await
                && r.status().is_success()
            {
                return BinRelay { child, addr, log };
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!(
            "relay did not become ready: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    pub fn signal(&self, sig: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }

    pub async fn post(&self, hook: &Hook) -> (u16, Value) {
        answer(send(&client(), &format!("http://{}", self.addr), hook).await).await
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait(mut self) -> Option<i32> {
        for _ in 0..400 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("relay did not exit");
    }
}

impl Drop for BinRelay {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs a `p0-relay` command to completion with only `vars` in its environment.
pub fn run_cli(args: &[&str], vars: &HashMap<String, String>) -> (Option<i32>, String) {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_p0-relay"))
        .current_dir(repo())
        .env_clear()
        .envs(vars)
        .args(args)
        .output()
        .expect("run p0-relay");
    (
        o.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// Waits until `server` has received `n` requests (or a few seconds pass), then a little
/// longer for any extra ones, and returns them all.
pub async fn received_at_least(server: &MockServer, n: usize) -> Vec<Request> {
    for _ in 0..400 {
        if server.received_requests().await.unwrap_or_default().len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.received_requests().await.unwrap_or_default()
}

/// The SQLite store these tests hand the relay: it refuses every write while `refusing` is
/// set (a disk gone read-only, say) and counts the claims that found nothing due.
pub struct Watched {
    inner: SqliteStore,
    pub refusing: Arc<AtomicBool>,
    /// Claims of P0 jobs that found nothing.
    pub empty_claims: Arc<AtomicUsize>,
    /// Claims of answers that found nothing.
    pub empty_answer_claims: Arc<AtomicUsize>,
    /// While set, the questions after a claim (when the next job falls due, which jobs in
    /// flight others wait behind) fail.
    pub failing_questions: Arc<AtomicBool>,
    /// Answer outcomes refused while `refusing` was set.
    pub refused_answer_records: Arc<AtomicUsize>,
}

impl Watched {
    pub fn new(inner: SqliteStore) -> Self {
        Self {
            inner,
            refusing: Arc::default(),
            empty_claims: Arc::default(),
            empty_answer_claims: Arc::default(),
            failing_questions: Arc::default(),
            refused_answer_records: Arc::default(),
        }
    }

    fn check(&self) -> Result<(), StoreError> {
        match self.refusing.load(Ordering::SeqCst) {
            true => Err(StoreError::Unavailable("the disk is read-only".into())),
            false => Ok(()),
        }
    }
}

impl Store for Watched {
    fn write(
        &mut self,
        deliveries: &[NewDelivery],
        records: &[AttemptRecord],
        now_ms: i64,
    ) -> Result<Vec<Result<Accepted, StoreError>>, StoreError> {
        self.check()?;
        self.inner.write(deliveries, records, now_ms)
    }
    fn claim_due(&mut self, now_ms: i64, limit: usize) -> Result<Vec<Job>, StoreError> {
        let jobs = self.inner.claim_due(now_ms, limit)?;
        if jobs.is_empty() {
            self.empty_claims.fetch_add(1, Ordering::SeqCst);
        }
        Ok(jobs)
    }
    fn next_due(&mut self) -> Result<Option<i64>, StoreError> {
        if self.failing_questions.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("next_due fails".into()));
        }
        self.inner.next_due()
    }
    fn followed(&mut self) -> Result<Vec<i64>, StoreError> {
        if self.failing_questions.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("followed fails".into()));
        }
        self.inner.followed()
    }
    fn recover(&mut self) -> Result<usize, StoreError> {
        self.inner.recover()
    }
    fn counts(&mut self) -> Result<Counts, StoreError> {
        self.inner.counts()
    }
    fn list(&mut self, filter: &ListFilter) -> Result<Vec<JobSummary>, StoreError> {
        self.inner.list(filter)
    }
    fn show(&mut self, id: i64) -> Result<Option<JobDetail>, StoreError> {
        self.inner.show(id)
    }
    fn replay(&mut self, which: Replay, now_ms: i64) -> Result<Replayed, StoreError> {
        self.inner.replay(which, now_ms)
    }
    fn prune(&mut self, which: p0_relay::store::Prune) -> Result<usize, StoreError> {
        self.inner.prune(which)
    }
    fn probe(&mut self) -> Result<(), StoreError> {
        self.check()?;
        self.inner.probe()
    }
    fn claim_answers(&mut self, now_ms: i64, limit: usize) -> Result<Vec<AnswerJob>, StoreError> {
        let answers = self.inner.claim_answers(now_ms, limit)?;
        if answers.is_empty() {
            self.empty_answer_claims.fetch_add(1, Ordering::SeqCst);
        }
        Ok(answers)
    }
    fn record_answer(&mut self, rec: &AnswerRecord) -> Result<(), StoreError> {
        if let Err(e) = self.check() {
            self.refused_answer_records.fetch_add(1, Ordering::SeqCst);
            return Err(e);
        }
        self.inner.record_answer(rec)
    }
    fn next_answer_due(&mut self) -> Result<Option<i64>, StoreError> {
        self.inner.next_answer_due()
    }
}

/// Runs a tool that CI installs in `dir`: whether it succeeded and what it printed. Elsewhere,
/// `None` with a notice when it is missing; in CI (`CI` set) a missing tool fails the test.
pub fn ci_tool(cmd: &str, args: &[&str], dir: &Path) -> Option<(bool, String)> {
    match std::process::Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .output()
    {
        Ok(o) => Some((
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        )),
        Err(_) if std::env::var_os("CI").is_none() => {
            eprintln!("{cmd} not installed: skipped (CI runs it)");
            None
        }
        Err(e) => panic!("{cmd} is required in CI: {e}"),
    }
}
