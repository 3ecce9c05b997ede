//! Webhooks as each provider sends them: the secrets the test relay knows, the captured
//! samples (their event times moved to now), signing, and posting.

use p0_relay::verify::sign_hex;
use serde_json::Value;

use super::*;

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
