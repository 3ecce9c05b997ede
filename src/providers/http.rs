//! HTTP to the services the relay calls (P0, the providers, its own readiness): one client
//! setup, and one reading of what came back: done, unauthorized, rate limited, unavailable
//! for now, or refused, with the service's own words for an error.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::{StatusCode, Url, header};
use serde_json::Value;

use crate::domain::printable;

/// A client builder with what every call shares: rustls, `timeout` for a whole call (and at
/// most 5 s to connect), and the relay's user agent.
pub fn client(timeout: Duration) -> reqwest::ClientBuilder {
    // The process may install a provider first; either way one is in place afterwards.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .user_agent(concat!("p0-relay/", env!("CARGO_PKG_VERSION")))
}

/// The client built, or why not.
pub fn build(builder: reqwest::ClientBuilder) -> Result<reqwest::Client, String> {
    builder
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

/// Why a call got no answer, in words that name no URL.
pub fn unanswered(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "no answer in time"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    }
}

/// What came back from a call.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: header::HeaderMap,
    pub body: String,
}

/// What an answer means for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// 2xx.
    Done,
    /// 401: the relay's token is wrong.
    Unauthorized,
    /// 429, or a 403 that says it is a rate limit (`Retry-After`, or GitHub's
    /// `x-ratelimit-remaining: 0`): try again, not before `retry_after`.
    RateLimited,
    /// 408, 5xx: try again.
    Unavailable,
    /// Any other refusal: final.
    Refused,
}

impl Answer {
    pub async fn read(response: reqwest::Response) -> Answer {
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.text().await.unwrap_or_default();
        Answer {
            status,
            headers,
            body,
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn verdict(&self) -> Verdict {
        let code = self.status.as_u16();
        let exhausted = self
            .header("x-ratelimit-remaining")
            .is_some_and(|v| v.trim() == "0");
        match code {
            _ if self.status.is_success() => Verdict::Done,
            401 => Verdict::Unauthorized,
            429 => Verdict::RateLimited,
            403 if exhausted || self.header("retry-after").is_some() => Verdict::RateLimited,
            408 | 500..=599 => Verdict::Unavailable,
            _ => Verdict::Refused,
        }
    }

    /// When to try again: `Retry-After` (seconds or an HTTP date), or when GitHub's rate
    /// limit resets (`x-ratelimit-reset`), for a rate limit only.
    pub fn retry_after(&self) -> Option<Duration> {
        let after = self.header("retry-after").and_then(parse_retry_after);
        let reset = || {
            let at = self
                .header("x-ratelimit-reset")?
                .trim()
                .parse::<u64>()
                .ok()?;
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            Some(Duration::from_secs(at.saturating_sub(now)))
        };
        match self.verdict() {
            Verdict::RateLimited => after.or_else(reset),
            _ => after,
        }
    }

    /// The service's own words for an error (`error`, `message`, `error.message`), else its
    /// text, or the status's reason when it sent none; made printable and short.
    pub fn error(&self) -> String {
        let v: Option<Value> = serde_json::from_str(&self.body).ok();
        let found = v.as_ref().and_then(|v| {
            v.get("error")
                .and_then(Value::as_str)
                .or_else(|| v.get("message").and_then(Value::as_str))
                .or_else(|| v.pointer("/error/message").and_then(Value::as_str))
        });
        let text = self.body.trim();
        match found {
            Some(m) => printable(m),
            None if !text.is_empty() => printable(text),
            None => self.status.canonical_reason().unwrap_or("error").to_owned(),
        }
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
        when.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// `base` with each segment percent-encoded as exactly one path segment, and the query.
pub fn join(base: &Url, segments: &[&str], query: &[(&str, String)]) -> Url {
    let mut url = base.clone();
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty();
        for s in segments {
            path.push(s);
        }
    }
    if !query.is_empty() {
        url.query_pairs_mut()
            .extend_pairs(query.iter().map(|(k, v)| (*k, v.as_str())));
    }
    url
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn answer(code: u16, headers: &[(&'static str, &'static str)], body: &str) -> Answer {
        let mut h = header::HeaderMap::new();
        for (k, v) in headers {
            h.insert(*k, HeaderValue::from_static(v));
        }
        Answer {
            status: StatusCode::from_u16(code).unwrap(),
            headers: h,
            body: body.into(),
        }
    }

    #[test]
    fn verdicts_and_the_words_of_an_error() {
        let cases = [
            (200, &[][..], Verdict::Done),
            (401, &[], Verdict::Unauthorized),
            (429, &[], Verdict::RateLimited),
            (403, &[], Verdict::Refused),
            (403, &[("x-ratelimit-remaining", "0")], Verdict::RateLimited),
            (403, &[("retry-after", "3")], Verdict::RateLimited),
            (408, &[], Verdict::Unavailable),
            (503, &[], Verdict::Unavailable),
            (404, &[], Verdict::Refused),
        ];
        for (code, headers, want) in cases {
            assert_eq!(
                answer(code, headers, "").verdict(),
                want,
                "{code} {headers:?}"
            );
        }
        let err = |body: &str| answer(400, &[], body).error();
        assert_eq!(
            err(r#"{"error":"Invalid or expired request"}"#),
            "Invalid or expired request"
        );
        assert_eq!(err(r#"{"message":"Not Found"}"#), "Not Found");
        assert_eq!(err(r#"{"error":{"message":"bad"}}"#), "bad");
        assert_eq!(err("upstream \n down"), "upstream \\n down");
        assert_eq!(err(""), "Bad Request");
        assert_eq!(err("{}"), "{}");
    }

    #[test]
    fn retry_after() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
        let reset = answer(
            403,
            &[("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", "1")],
            "",
        );
        assert_eq!(reset.retry_after(), Some(Duration::ZERO));
    }

    #[test]
    fn segments_stay_single() {
        let base = Url::parse("https://api.example.com/base/").unwrap();
        assert_eq!(
            join(
                &base,
                &["orgs", "a/b", "teams"],
                &[("user_ids[]", "P1".into())]
            )
            .as_str(),
            "https://api.example.com/base/orgs/a%2Fb/teams?user_ids%5B%5D=P1"
        );
    }
}
