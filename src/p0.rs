//! The P0 Access Requests API client: one typed call per action, IDs as single percent-encoded
//! path segments, a pooled keep-alive connection, and each answer classified for the worker.

use std::time::Duration;

use reqwest::{Url, header};

use crate::domain::{Action, Id};
use crate::providers::http::{self, Answer, Verdict};
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
        let http = http::build(http::client(timeout).pool_idle_timeout(Duration::from_secs(90)))?;
        Ok(Client { http, base, token })
    }

    /// The URL for one action: `{base}/o/{org}/permission-requests/{id}/{action}`.
    pub fn url(&self, org: &Id, request_id: &Id, action: Action) -> Url {
        request_url(&self.base, org.as_str(), request_id.as_str(), action)
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
        match result {
            Ok(response) => Outcome::from(&Answer::read(response).await),
            Err(e) => Outcome::Transient {
                status: None,
                error: format!("{}: {}", http::unanswered(&e), without_url(&e)),
                retry_after: None,
            },
        }
    }
}

/// Each ID percent-encoded as exactly one path segment (`Id` admits nothing that needs it;
/// this holds whatever it is given).
fn request_url(base: &Url, org: &str, request_id: &str, action: Action) -> Url {
    let segments = ["o", org, "permission-requests", request_id, action.as_str()];
    http::join(base, &segments, &[])
}

fn without_url(e: &reqwest::Error) -> String {
    let mut e = e.to_string();
    if let Some(i) = e.find(" for url (") {
        e.truncate(i);
    }
    e
}

/// P0's answer, read as every service's is (`providers::http`): error bodies are JSON
/// `{"error": "..."}`; a rate limit or an outage is tried again.
impl From<&Answer> for Outcome {
    fn from(a: &Answer) -> Outcome {
        let status = a.status.as_u16();
        match a.verdict() {
            Verdict::Done => Outcome::Success { status },
            Verdict::Unauthorized => Outcome::Unauthorized { error: a.error() },
            // A 403 with a rate limit's headers is GitHub's way; from P0 it is final.
            Verdict::RateLimited if status == 403 => Outcome::Rejected {
                status,
                error: a.error(),
            },
            Verdict::RateLimited | Verdict::Unavailable => Outcome::Transient {
                status: Some(status),
                error: a.error(),
                retry_after: a.retry_after(),
            },
            Verdict::Refused => Outcome::Rejected {
                status,
                error: a.error(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::StatusCode;

    fn classify(status: StatusCode, body: &str, _retry_after: Option<Duration>) -> Outcome {
        Outcome::from(&Answer {
            status,
            headers: header::HeaderMap::new(),
            body: body.into(),
        })
    }

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

    /// Regression: a 403 with rate-limit headers (GitHub's secondary limit) was retried when
    /// P0 sent it; P0's 403 is final. A JSON error without `error` is kept as P0 sent it.
    #[test]
    fn a_403_from_p0_is_final_whatever_its_headers() {
        let mut headers = header::HeaderMap::new();
        headers.insert("retry-after", header::HeaderValue::from_static("30"));
        headers.insert(
            "x-ratelimit-remaining",
            header::HeaderValue::from_static("0"),
        );
        let answer = Answer {
            status: StatusCode::FORBIDDEN,
            headers,
            body: r#"{"detail":"not yours"}"#.into(),
        };
        assert_eq!(
            Outcome::from(&answer),
            Outcome::Rejected {
                status: 403,
                error: crate::domain::printable(r#"{"detail":"not yours"}"#)
            }
        );
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
        // An ID that would reshape the path is never an `Id`; and were one given, it would
        // stay one segment, encoded.
        for bad in ["../admin", "a/b", "a?b", "a#b", "a%2Fb", "a b"] {
            assert!(Id::parse(bad).is_err(), "{bad}");
        }
        let base = Url::parse("http://127.0.0.1:9/api/").unwrap();
        let url = request_url(&base, "acme", "../x/y?z#w%2F", Action::Approve);
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:9/api/o/acme/permission-requests/..%2Fx%2Fy%3Fz%23w%252F/approve"
        );
        assert_eq!(url.path_segments().map(Iterator::count), Some(6));
    }
}
