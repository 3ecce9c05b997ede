//! The providers the relay answers back to and asks who is on call: a module each (`github`,
//! `pagerduty`, `opsgenie` for Opsgenie and JSM) holding its auth, where its answers go and
//! its on-call check; what they share (the HTTP client, reading an answer) in `http`, which
//! P0's client uses too.

pub mod github;
pub mod http;
pub mod opsgenie;
pub mod pagerduty;

use reqwest::{Method, Url, header};
use serde_json::Value;

use crate::config::{AnswerSettings, ProviderApi};
use crate::domain::Via;
use crate::store::AnswerJob;
use http::{Answer, Verdict};

/// Where on a provider's API an answer goes: its path segments (each percent-encoded as
/// one) and its query.
pub type Place = (Vec<String>, Vec<(&'static str, String)>);

/// What one answer attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sent {
    /// 2xx.
    Done { status: u16 },
    /// Rate limited, 5xx, timeout, connection error: try again, not before `retry_after`.
    Retry {
        status: Option<u16>,
        error: String,
        retry_after: Option<std::time::Duration>,
    },
    /// Refused for good (401, 403 that is not a rate limit, 404, 422, other 4xx), or a
    /// stored answer that cannot be sent.
    Failed { status: Option<u16>, error: String },
}

impl From<&Answer> for Sent {
    fn from(a: &Answer) -> Sent {
        let status = Some(a.status.as_u16());
        match a.verdict() {
            Verdict::Done => Sent::Done {
                status: a.status.as_u16(),
            },
            Verdict::RateLimited => Sent::Retry {
                status,
                error: format!("rate limited: {}", a.error()),
                retry_after: a.retry_after(),
            },
            Verdict::Unavailable => Sent::Retry {
                status,
                error: a.error(),
                retry_after: a.retry_after(),
            },
            Verdict::Unauthorized | Verdict::Refused => Sent::Failed {
                status,
                error: a.error(),
            },
        }
    }
}

/// The providers whose token is set, over one HTTP client.
#[derive(Clone)]
pub struct Providers {
    http: reqwest::Client,
    settings: AnswerSettings,
}

impl Providers {
    pub fn new(settings: AnswerSettings) -> Result<Providers, String> {
        let http = http::build(http::client(settings.timeout))?;
        Ok(Providers { http, settings })
    }

    /// The providers answers go through (their token is set).
    pub fn enabled(&self) -> Vec<Via> {
        Via::ALL
            .into_iter()
            .filter(|v| self.settings.api(*v).is_some())
            .collect()
    }

    pub fn api(&self, via: Via) -> Option<&ProviderApi> {
        self.settings.api(via)
    }

    /// Calls `via`'s API with its auth; what came back, or why nothing did.
    pub async fn call(
        &self,
        via: Via,
        api: &ProviderApi,
        method: Method,
        url: Url,
        body: Option<String>,
    ) -> Result<Answer, &'static str> {
        let mut headers = match via {
            Via::GitHub => github::headers(api),
            Via::PagerDuty => pagerduty::headers(api),
            Via::Opsgenie | Via::Jsm => opsgenie::headers(api),
        };
        let req = self.http.request(method, url);
        let req = match body {
            Some(b) => {
                let json = header::HeaderValue::from_static("application/json");
                headers.insert(header::CONTENT_TYPE, json);
                req.body(b)
            }
            None => req,
        };
        match req.headers(headers).send().await {
            Ok(response) => Ok(Answer::read(response).await),
            Err(e) => Err(http::unanswered(&e)),
        }
    }

    /// Sends one stored answer.
    pub async fn answer(&self, answer: &AnswerJob) -> Sent {
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
        let Some(url) = answer_url(api, via, &answer.kind, &target) else {
            return failed(format!(
                "stored target does not name a {via} {}",
                answer.kind
            ));
        };
        let body = Some(answer.body.clone());
        match self.call(via, api, Method::POST, url, body).await {
            Ok(a) => Sent::from(&a),
            Err(why) => Sent::Retry {
                status: None,
                error: why.into(),
                retry_after: None,
            },
        }
    }
}

/// A header value carrying a token: marked sensitive, so no debug output shows it. Config
/// refuses a token that is not a valid header value (`Builder::sendable`), so the empty value
/// here is never sent.
fn secret(value: &str) -> header::HeaderValue {
    let mut v = header::HeaderValue::from_str(value)
        .unwrap_or_else(|_| header::HeaderValue::from_static(""));
    v.set_sensitive(true);
    v
}

/// The URL for one answer: the provider's base URL and the target's IDs, each as exactly one
/// percent-encoded path segment.
fn answer_url(api: &ProviderApi, via: Via, kind: &str, target: &Value) -> Option<Url> {
    let text = |key: &str| -> Option<String> {
        match target.get(key)? {
            Value::String(s) if !s.is_empty() => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    };
    let (segments, query) = match via {
        Via::GitHub => github::answer_place(kind, text)?,
        Via::PagerDuty => pagerduty::answer_place(kind, text)?,
        Via::Opsgenie | Via::Jsm => opsgenie::answer_place(kind, text)?,
    };
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    Some(http::join(&api.url, &segments, &query))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use reqwest::StatusCode;

    fn classify(status: StatusCode, headers: &header::HeaderMap, body: &str) -> Sent {
        Sent::from(&Answer {
            status,
            headers: headers.clone(),
            body: body.into(),
        })
    }

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
                retry_after: Some(std::time::Duration::from_secs(7)),
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
        let u = answer_url(&api, Via::GitHub, "reaction", &t).unwrap();
        assert_eq!(
            u.as_str(),
            "https://ghe.example/api/v3/repos/acme/infra/issues/comments/7/reactions"
        );
        let t = serde_json::json!({"incident": "../admin?x=1"});
        let u = answer_url(&api, Via::PagerDuty, "note", &t).unwrap();
        assert_eq!(
            u.as_str(),
            "https://ghe.example/api/v3/incidents/..%2Fadmin%3Fx=1/notes"
        );
        let t = serde_json::json!({"alert": "a-1"});
        let u = answer_url(&api, Via::Opsgenie, "note", &t).unwrap();
        assert_eq!(
            u.as_str(),
            "https://ghe.example/api/v3/v2/alerts/a-1/notes?identifierType=id"
        );
    }
}
