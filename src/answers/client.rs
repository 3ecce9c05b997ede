//! The providers' APIs for answering back: one call per stored answer, every path segment
//! from a stored target percent-encoded as one segment, and each answer classified
//! (sent, retry later, or refused for good).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::{StatusCode, Url, header};
use serde_json::Value;

use crate::config::{AnswerSettings, ProviderApi};
use crate::domain::Via;
use crate::store::AnswerJob;

/// What one answer attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sent {
    /// 2xx.
    Done { status: u16 },
    /// Rate limited, 5xx, timeout, connection error: try again, not before `retry_after`.
    Retry {
        status: Option<u16>,
        error: String,
        retry_after: Option<Duration>,
    },
    /// Refused for good (401, 403 that is not a rate limit, 404, 422, other 4xx), or a
    /// stored answer that cannot be sent.
    Failed { status: Option<u16>, error: String },
}

/// A client for every provider whose token is set.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    settings: AnswerSettings,
}

impl Client {
    pub fn new(settings: AnswerSettings) -> Result<Client, String> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("p0-relay/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Client { http, settings })
    }

    /// The providers answers go through (their token is set).
    pub fn enabled(&self) -> Vec<Via> {
        Via::ALL
            .into_iter()
            .filter(|v| self.settings.api(*v).is_some())
            .collect()
    }

    /// Sends one stored answer.
    pub async fn send(&self, answer: &AnswerJob) -> Sent {
        let failed = |error: String| Sent::Failed {
            status: None,
            error,
        };
        let Some(via) = Via::parse(&answer.via) else {
            return failed(format!("unknown provider `{}`", answer.via));
        };
        let Some(api) = self.settings.api(via) else {
            return failed(format!("answers through {via} are off (no token)"));
        };
        let Ok(target) = serde_json::from_str::<Value>(&answer.target) else {
            return failed("stored target is not JSON".into());
        };
        let Some(url) = url(api, via, &answer.kind, &target) else {
            return failed(format!(
                "stored target does not name a {via} {}",
                answer.kind
            ));
        };
        let req = self
            .http
            .post(url)
            .header(header::CONTENT_TYPE, "application/json")
            .body(answer.body.clone());
        let req = match via {
            Via::GitHub => req
                .bearer_auth(api.token.expose())
                .header(header::ACCEPT, "application/vnd.github+json")
                .header("X-GitHub-Api-Version", "2022-11-28"),
            Via::PagerDuty => req
                .header(
                    header::AUTHORIZATION,
                    format!("Token token={}", api.token.expose()),
                )
                .header(header::ACCEPT, "application/vnd.pagerduty+json;version=2")
                .header(header::FROM, api.from.as_deref().unwrap_or("")),
            Via::Opsgenie | Via::Jsm => req.header(
                header::AUTHORIZATION,
                format!("GenieKey {}", api.token.expose()),
            ),
        };
        let response = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                let kind = if e.is_timeout() {
                    "timed out"
                } else if e.is_connect() {
                    "connection failed"
                } else {
                    "request failed"
                };
                return Sent::Retry {
                    status: None,
                    error: kind.into(),
                    retry_after: None,
                };
            }
        };
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap_or_default();
        classify(status, &headers, &text)
    }
}

/// The URL for one answer: the provider's base URL and the target's IDs, each as exactly one
/// percent-encoded path segment.
fn url(api: &ProviderApi, via: Via, kind: &str, target: &Value) -> Option<Url> {
    let text = |key: &str| -> Option<String> {
        match target.get(key)? {
            Value::String(s) if !s.is_empty() => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    };
    let mut segments: Vec<String> = Vec::new();
    match (via, kind) {
        (Via::GitHub, "reaction" | "comment") => {
            let repo = text("repo")?;
            let (owner, name) = repo.split_once('/')?;
            segments.extend(["repos".into(), owner.into(), name.into(), "issues".into()]);
            if kind == "reaction" {
                segments.extend(["comments".into(), text("comment")?, "reactions".into()]);
            } else {
                segments.extend([text("number")?, "comments".into()]);
            }
        }
        (Via::PagerDuty, "note") => {
            segments.extend(["incidents".into(), text("incident")?, "notes".into()]);
        }
        (Via::Opsgenie | Via::Jsm, "note") => {
            segments.extend(["v2".into(), "alerts".into(), text("alert")?, "notes".into()]);
        }
        _ => return None,
    }
    let mut url = api.url.clone();
    {
        let mut path = url.path_segments_mut().ok()?;
        path.pop_if_empty();
        for s in &segments {
            path.push(s);
        }
    }
    if matches!(via, Via::Opsgenie | Via::Jsm) {
        url.set_query(Some("identifierType=id"));
    }
    Some(url)
}

/// Classifies a provider's answer. GitHub signals rate limits with 403 or 429 and
/// `Retry-After` or `x-ratelimit-remaining: 0` + `x-ratelimit-reset`; PagerDuty with 429.
pub fn classify(status: StatusCode, headers: &header::HeaderMap, body: &str) -> Sent {
    let code = status.as_u16();
    if status.is_success() {
        return Sent::Done { status: code };
    }
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let retry_after = get("retry-after").and_then(crate::p0::parse_retry_after);
    let reset = get("x-ratelimit-reset")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|at| {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            Duration::from_secs(at.saturating_sub(now))
        });
    let exhausted = get("x-ratelimit-remaining").is_some_and(|v| v.trim() == "0");
    let error = error_text(status, body);
    let rate_limited = code == 429 || (code == 403 && (retry_after.is_some() || exhausted));
    if rate_limited {
        return Sent::Retry {
            status: Some(code),
            error: format!("rate limited: {error}"),
            retry_after: retry_after.or(reset),
        };
    }
    match code {
        408 | 500..=599 => Sent::Retry {
            status: Some(code),
            error,
            retry_after,
        },
        _ => Sent::Failed {
            status: Some(code),
            error,
        },
    }
}

/// The provider's own words for an error (`message`, `error.message`, `error`), shortened.
fn error_text(status: StatusCode, body: &str) -> String {
    let v: Option<Value> = serde_json::from_str(body).ok();
    let found = v.as_ref().and_then(|v| {
        v.get("message")
            .and_then(Value::as_str)
            .or_else(|| v.pointer("/error/message").and_then(Value::as_str))
            .or_else(|| v.get("error").and_then(Value::as_str))
            .map(str::to_owned)
    });
    match found {
        Some(m) => crate::domain::printable(&m),
        None => status.canonical_reason().unwrap_or("error").to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn github_rate_limits_are_retried_and_other_refusals_are_final() {
        let mut h = header::HeaderMap::new();
        let forbidden = StatusCode::FORBIDDEN;
        assert!(matches!(
            classify(forbidden, &h, r#"{"message":"Resource not accessible"}"#),
            Sent::Failed {
                status: Some(403),
                ..
            }
        ));
        h.insert("x-ratelimit-remaining", HeaderValue::from_static("0"));
        h.insert("x-ratelimit-reset", HeaderValue::from_static("1"));
        assert!(matches!(
            classify(forbidden, &h, ""),
            Sent::Retry {
                status: Some(403),
                ..
            }
        ));
        let mut h = header::HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("7"));
        assert_eq!(
            classify(StatusCode::TOO_MANY_REQUESTS, &h, ""),
            Sent::Retry {
                status: Some(429),
                error: "rate limited: Too Many Requests".into(),
                retry_after: Some(Duration::from_secs(7)),
            }
        );
        for code in [401, 404, 422] {
            let s = StatusCode::from_u16(code).unwrap();
            assert!(matches!(
                classify(s, &header::HeaderMap::new(), ""),
                Sent::Failed { .. }
            ));
        }
        assert!(matches!(
            classify(StatusCode::BAD_GATEWAY, &header::HeaderMap::new(), ""),
            Sent::Retry { .. }
        ));
    }

    #[test]
    fn targets_stay_single_segments() {
        let api = ProviderApi {
            url: Url::parse("https://ghe.example/api/v3").unwrap(),
            token: crate::secret::Secret::new("t"),
            from: None,
        };
        let t = serde_json::json!({"repo": "acme/infra", "number": 42, "comment": "7"});
        let u = url(&api, Via::GitHub, "reaction", &t).unwrap();
        assert_eq!(
            u.as_str(),
            "https://ghe.example/api/v3/repos/acme/infra/issues/comments/7/reactions"
        );
        let t = serde_json::json!({"incident": "../admin?x=1"});
        let u = url(&api, Via::PagerDuty, "note", &t).unwrap();
        assert_eq!(
            u.as_str(),
            "https://ghe.example/api/v3/incidents/..%2Fadmin%3Fx=1/notes"
        );
        let t = serde_json::json!({"alert": "a-1"});
        let u = url(&api, Via::Opsgenie, "note", &t).unwrap();
        assert_eq!(
            u.as_str(),
            "https://ghe.example/api/v3/v2/alerts/a-1/notes?identifierType=id"
        );
    }
}
