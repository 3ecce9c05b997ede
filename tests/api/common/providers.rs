//! The fakes the relay calls: P0 (what it received, summarized as path, auth and body) and the
//! providers answers back go to (GitHub, PagerDuty, Opsgenie), each answering as the real one
//! does on success.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wiremock::matchers::{method, path_regex};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

use super::*;

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

/// Waits until `server` has received `n` requests (or a few seconds pass), and returns them
/// all. (Whether more are coming is `TestRelay::received`'s to tell.)
pub async fn received_at_least(server: &MockServer, n: usize) -> Vec<Request> {
    for _ in 0..400 {
        if server.received_requests().await.unwrap_or_default().len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    server.received_requests().await.unwrap_or_default()
}

pub const GH_TOKEN: &str = "ghp-answer-token-0a1b";
pub const PD_TOKEN: &str = "pd-answer-token-2c3d";
pub const PD_FROM: &str = "relay-bot@acme.example";
pub const OG_KEY: &str = "og-answer-key-4e5f";

/// Fake provider APIs, each answering as the real one does on success.
pub struct Providers {
    pub github: MockServer,
    pub pagerduty: MockServer,
    pub opsgenie: MockServer,
}

impl Providers {
    pub async fn start() -> Providers {
        let github = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path_regex(
                r"^/repos/[^/]+/[^/]+/issues/comments/[0-9]+/reactions$",
            ))
            .respond_with(
                ResponseTemplate::new(201).set_body_json(json!({"id": 1, "content": "+1"})),
            )
            .mount(&github)
            .await;
        Mock::given(method("POST"))
            .and(path_regex(r"^/repos/[^/]+/[^/]+/issues/[0-9]+/comments$"))
            .respond_with(ResponseTemplate::new(201).set_body_json(json!({"id": 2})))
            .mount(&github)
            .await;
        let pagerduty = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path_regex(r"^/incidents/[^/]+/notes$"))
            .respond_with(
                ResponseTemplate::new(201).set_body_json(json!({"note": {"id": "PNOTE1"}})),
            )
            .mount(&pagerduty)
            .await;
        let opsgenie = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path_regex(r"^/v2/alerts/[^/]+/notes$"))
            .respond_with(ResponseTemplate::new(202).set_body_json(
                json!({"result": "Request will be processed", "took": 0.2, "requestId": "r-1"}),
            ))
            .mount(&opsgenie)
            .await;
        Providers {
            github,
            pagerduty,
            opsgenie,
        }
    }

    /// The `answers:` section pointing at these fakes (tokens from the environment).
    pub fn yaml(&self) -> String {
        answers_yaml(
            &self.github.uri(),
            &self.pagerduty.uri(),
            &self.opsgenie.uri(),
        )
    }
}

pub fn answers_yaml(github: &str, pagerduty: &str, opsgenie: &str) -> String {
    format!(
        r#"
answers:
  github: {{ token: "${{GITHUB_TOKEN:-}}", api_url: "{github}" }}
  pagerduty: {{ token: "${{PAGERDUTY_API_TOKEN:-}}", from: "${{PAGERDUTY_FROM:-}}", api_url: "{pagerduty}" }}
  opsgenie: {{ token: "${{OPSGENIE_API_KEY:-}}", api_url: "{opsgenie}" }}
  rate_per_second: 0
  retry: {{ base_delay: 20ms, max_delay: 2s, max_age: 1h }}
"#
    )
}

pub fn answer_vars() -> Vec<(&'static str, String)> {
    vec![
        ("GITHUB_TOKEN", GH_TOKEN.into()),
        ("PAGERDUTY_API_TOKEN", PD_TOKEN.into()),
        ("PAGERDUTY_FROM", PD_FROM.into()),
        ("OPSGENIE_API_KEY", OG_KEY.into()),
    ]
}

pub fn body(r: &Request) -> Value {
    serde_json::from_slice(&r.body).unwrap_or(Value::Null)
}

pub fn header<'a>(r: &'a Request, name: &str) -> &'a str {
    r.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// The P0 calls made, as (action, request ID), in order.
pub async fn p0_actions(t: &TestRelay) -> Vec<(String, String)> {
    t.p0_calls()
        .await
        .iter()
        .map(|r| {
            let segs: Vec<&str> = r.url.path().rsplit('/').take(2).collect();
            (segs[0].to_owned(), segs[1].to_owned())
        })
        .collect()
}
