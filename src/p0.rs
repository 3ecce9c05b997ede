//! The P0 Access Requests API client: one typed call per action, IDs as single percent-encoded
//! path segments, a pooled keep-alive connection, and each answer classified for the worker.

use std::time::Duration;

use reqwest::{StatusCode, Url, header};

use crate::domain::{Action, Id};
use crate::secret::Secret;

/// What one call to P0 came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx: done.
    Success { status: u16 },
    /// A permanent refusal (400 "Invalid or expired request" and other 4xx): never retried.
    Rejected { status: u16, error: String },
    /// 401: the relay's API key is wrong. Permanent until someone fixes the config.
    Unauthorized { error: String },
    /// 429, 5xx, timeouts, connection errors: worth retrying, after `retry_after` if given.
    Transient {
        status: Option<u16>,
        error: String,
        retry_after: Option<Duration>,
    },
}

impl Outcome {
    /// The metric label: success | rejected | unauthorized | transient.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Success { .. } => "success",
            Outcome::Rejected { .. } => "rejected",
            Outcome::Unauthorized { .. } => "unauthorized",
            Outcome::Transient { .. } => "transient",
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            Outcome::Success { status } | Outcome::Rejected { status, .. } => Some(*status),
            Outcome::Unauthorized { .. } => Some(401),
            Outcome::Transient { status, .. } => *status,
        }
    }
}

/// A client for one P0 deployment.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    token: Secret,
}

impl Client {
    pub fn new(base: Url, token: Secret, timeout: Duration) -> Result<Client, String> {
        // The process may install a provider first; either way one is in place afterwards.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .pool_idle_timeout(Duration::from_secs(90))
            .user_agent(concat!("p0-relay/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Client { http, base, token })
    }

    /// The URL for one action: `{base}/o/{org}/permission-requests/{id}/{action}`.
    pub fn url(&self, org: &Id, request_id: &Id, action: Action) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut segments) = url.path_segments_mut() {
            // `push` percent-encodes each ID as exactly one segment.
            segments
                .pop_if_empty()
                .push("o")
                .push(org.as_str())
                .push("permission-requests")
                .push(request_id.as_str())
                .push(action.as_str());
        }
        url
    }

    /// Sends one decision. `expiration` is required for approve and ignored otherwise.
    pub async fn send(
        &self,
        org: &Id,
        request_id: &Id,
        action: Action,
        expiration: Option<&str>,
    ) -> Outcome {
        let body = match (action, expiration) {
            (Action::Approve, Some(e)) => serde_json::json!({ "expirationLength": e }),
            (Action::Approve, None) => {
                return Outcome::Rejected {
                    status: 0,
                    error: "approve needs an expiration".into(),
                };
            }
            // P0 rejects a literal null body: send an empty object.
            _ => serde_json::json!({}),
        };
        let result = self
            .http
            .post(self.url(org, request_id, action))
            .bearer_auth(self.token.expose())
            .header(header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .send()
            .await;
        let response = match result {
            Ok(r) => r,
            Err(e) => {
                let kind = if e.is_timeout() {
                    "timed out"
                } else if e.is_connect() {
                    "connection failed"
                } else {
                    "request failed"
                };
                return Outcome::Transient {
                    status: None,
                    error: format!("{kind}: {}", without_url(&e)),
                    retry_after: None,
                };
            }
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let text = response.text().await.unwrap_or_default();
        classify(status, &text, retry_after)
    }
}

fn without_url(e: &reqwest::Error) -> String {
    let mut e = e.to_string();
    if let Some(i) = e.find(" for url (") {
        e.truncate(i);
    }
    e
}

/// Classifies P0's answer. Error bodies are JSON `{"error": "..."}`; anything else is kept
/// as (shortened) text.
pub fn classify(status: StatusCode, body: &str, retry_after: Option<Duration>) -> Outcome {
    let code = status.as_u16();
    if status.is_success() {
        return Outcome::Success { status: code };
    }
    let error = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
        .unwrap_or_else(|| {
            let t = body.trim();
            if t.is_empty() {
                status.canonical_reason().unwrap_or("error").to_owned()
            } else {
                crate::domain::printable(t)
            }
        });
    match code {
        401 => Outcome::Unauthorized { error },
        408 | 429 | 500..=599 => Outcome::Transient {
            status: Some(code),
            error,
            retry_after,
        },
        _ => Outcome::Rejected {
            status: code,
            error,
        },
    }
}

/// `Retry-After` as seconds or an HTTP date.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        let cases = [
            (200, "", "success"),
            (204, "", "success"),
            (400, r#"{"error":"Invalid or expired request"}"#, "rejected"),
            (404, "nope", "rejected"),
            (401, r#"{"error":"Unauthorized"}"#, "unauthorized"),
            (429, "", "transient"),
            (408, "", "transient"),
            (500, "", "transient"),
            (503, "<html>", "transient"),
        ];
        for (code, body, want) in cases {
            let got = classify(StatusCode::from_u16(code).unwrap(), body, None);
            assert_eq!(got.label(), want, "{code}");
        }
        assert_eq!(
            classify(
                StatusCode::BAD_REQUEST,
                r#"{"error":"Invalid or expired request"}"#,
                None
            ),
            Outcome::Rejected {
                status: 400,
                error: "Invalid or expired request".into()
            }
        );
    }

    #[test]
    fn retry_after() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn urls_keep_ids_in_one_segment() {
        let c = Client::new(
            Url::parse("http://127.0.0.1:9/api/").unwrap(),
            Secret::new("t"),
            Duration::from_secs(1),
        )
        .unwrap();
        let org = Id::parse("acme").unwrap();
        let id = Id::parse("req-1.a_b").unwrap();
        assert_eq!(
            c.url(&org, &id, Action::Revoke).as_str(),
            "http://127.0.0.1:9/api/o/acme/permission-requests/req-1.a_b/revoke"
        );
    }
}
