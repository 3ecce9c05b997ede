//! Authenticity of a webhook, one module per scheme: raw body bytes and headers in, a verdict
//! out. Every comparison is constant-time and happens before the body is parsed.

mod basic;
mod github;
mod hmac_header;
mod pagerduty;
mod standard_webhooks;
mod token;

use std::borrow::Cow;
use std::fmt;

use axum::http::HeaderMap;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::{Choice, ConditionallySelectable};

use crate::secret::{Secret, Secrets};

pub use basic::Basic;
pub use github::verify as verify_github;
pub use hmac_header::{Algorithm, Encoding, HmacHeader, Template};
pub use pagerduty::verify as verify_pagerduty;
pub use standard_webhooks::{StandardWebhooks, sign as sign_standard_webhooks};
pub use token::verify as verify_token;

/// How a source proves a webhook is its own.
#[derive(Clone, Debug)]
pub enum Verifier {
    /// `X-Hub-Signature-256: sha256=<hex>`, any of several secrets.
    GitHub(Secrets),
    /// `X-PagerDuty-Signature: v1=<hex>[,v1=<hex>...]`, any of several secrets.
    PagerDuty(Secrets),
    /// A shared token in `Authorization: Bearer <t>` or `X-Relay-Token: <t>`.
    Token(Secrets),
    /// An HMAC of the body (optionally with a timestamp) in a header, as the mapping describes.
    Hmac(Box<HmacHeader>),
    /// Standard Webhooks (`webhook-*` or `svix-*` headers).
    StandardWebhooks(StandardWebhooks),
    /// HTTP basic authentication.
    Basic(Basic),
    /// Several schemes: the first that verifies wins (a sender configured either way).
    AnyOf(Vec<Verifier>),
    /// No verification: the mapping said, in so many words, that it is insecure.
    Insecure,
}

/// What verified a webhook: the scheme, the header that carried the proof and which configured
/// secret matched (its position, never its value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub scheme: &'static str,
    pub header: Option<String>,
    /// 0-based position in the configured list (newest first).
    pub secret: Option<usize>,
}

impl fmt::Display for Verified {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.scheme)?;
        if let Some(h) = &self.header {
            write!(f, ", header {h}")?;
        }
        if let Some(i) = self.secret {
            write!(f, ", secret #{} of the list", i + 1)?;
        }
        Ok(())
    }
}

/// What verifying a webhook came to.
pub type Checked = Result<Verified, VerifyError>;

/// Why a webhook was refused as unauthenticated. The text never contains a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("missing {0} header")]
    Missing(Cow<'static, str>),
    #[error("{0} header is malformed")]
    Malformed(Cow<'static, str>),
    #[error("{0} header appears more than once")]
    Repeated(Cow<'static, str>),
    #[error("{0} is too far from the relay's clock (replayed or delayed)")]
    Stale(Cow<'static, str>),
    #[error("signature does not match")]
    Mismatch,
    #[error("token does not match")]
    BadToken,
    #[error("user or password does not match")]
    BadCredentials,
}

impl Verifier {
    /// Verifies against the system clock.
    pub fn verify(&self, headers: &HeaderMap, body: &[u8]) -> Result<Verified, VerifyError> {
        self.verify_at(headers, body, unix_now())
    }

    /// Verifies as if the time were `now` (Unix seconds), for schemes that sign a timestamp.
    pub fn verify_at(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now: i64,
    ) -> Result<Verified, VerifyError> {
        let found = |scheme, header: &str, secret| Verified {
            scheme,
            header: Some(header.to_owned()),
            secret: Some(secret),
        };
        match self {
            Verifier::GitHub(secrets) => github::verify(secrets, headers, body)
                .map(|i| found("github", "X-Hub-Signature-256", i)),
            Verifier::PagerDuty(secrets) => pagerduty::verify(secrets, headers, body)
                .map(|i| found("pagerduty", "X-PagerDuty-Signature", i)),
            Verifier::Token(tokens) => {
                token::verify_named(tokens, headers).map(|(header, i)| found("token", header, i))
            }
            Verifier::Hmac(h) => h.verify(headers, body, now),
            Verifier::StandardWebhooks(s) => s.verify(headers, body, now),
            Verifier::Basic(b) => b.verify(headers),
            Verifier::AnyOf(list) => any_of(list, headers, body, now),
            Verifier::Insecure => Ok(Verified {
                scheme: "none",
                header: None,
                secret: None,
            }),
        }
    }

    /// Whether the proof covers the body, so that what the body says (an event time, say) is
    /// the provider's word; a token, a password or nothing leave it the sender's to choose.
    pub fn signs_body(&self) -> bool {
        match self {
            Verifier::GitHub(_)
            | Verifier::PagerDuty(_)
            | Verifier::Hmac(_)
            | Verifier::StandardWebhooks(_) => true,
            Verifier::Token(_) | Verifier::Basic(_) | Verifier::Insecure => false,
            Verifier::AnyOf(list) => list.iter().all(Verifier::signs_body),
        }
    }

    /// How far from the relay's clock a signed timestamp may be, where every scheme that may
    /// verify signs one (then a captured delivery is refused that long after it was sent).
    pub fn signed_time_tolerance(&self) -> Option<std::time::Duration> {
        match self {
            Verifier::Hmac(h) => h.tolerance(),
            Verifier::StandardWebhooks(s) => Some(s.tolerance()),
            Verifier::AnyOf(list) => list
                .iter()
                .map(Verifier::signed_time_tolerance)
                .collect::<Option<Vec<_>>>()
                .and_then(|t| t.into_iter().max()),
            _ => None,
        }
    }

    /// The scheme's name as a mapping file writes it (`token or basic` for several).
    pub fn scheme(&self) -> String {
        match self {
            Verifier::GitHub(_) => "github".into(),
            Verifier::PagerDuty(_) => "pagerduty".into(),
            Verifier::Token(_) => "token".into(),
            Verifier::Hmac(_) => "hmac".into(),
            Verifier::StandardWebhooks(_) => "standard-webhooks".into(),
            Verifier::Basic(_) => "basic".into(),
            Verifier::AnyOf(list) => list
                .iter()
                .map(Verifier::scheme)
                .collect::<Vec<_>>()
                .join(" or "),
            Verifier::Insecure => "none".into(),
        }
    }
}

/// The first scheme that verifies wins. Otherwise the most telling refusal: from a scheme that
/// understood what it was sent (a wrong secret, a stale time), else a malformed header, else
/// the first "missing".
fn any_of(
    list: &[Verifier],
    headers: &HeaderMap,
    body: &[u8],
    now: i64,
) -> Result<Verified, VerifyError> {
    let rank = |e: &VerifyError| match e {
        VerifyError::Missing(_) => 0,
        VerifyError::Malformed(_) | VerifyError::Repeated(_) => 1,
        _ => 2,
    };
    let mut best: Option<VerifyError> = None;
    for v in list {
        match v.verify_at(headers, body, now) {
            Ok(found) => return Ok(found),
            Err(e) => {
                if best.as_ref().is_none_or(|b| rank(&e) > rank(b)) {
                    best = Some(e);
                }
            }
        }
    }
    Err(best.unwrap_or(VerifyError::Missing("authentication".into())))
}

/// The current time in Unix seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The position of the first secret for which `matches` holds. Every secret is tried, without
/// stopping early, so timing does not reveal which one matched.
pub(crate) fn first_match(
    secrets: &Secrets,
    mut matches: impl FnMut(&Secret) -> bool,
) -> Option<usize> {
    let mut found = Choice::from(0);
    let mut index = 0u64;
    for (i, secret) in secrets.iter().enumerate() {
        let hit = Choice::from(u8::from(matches(secret)));
        index.conditional_assign(&(i as u64), hit & !found);
        found |= hit;
    }
    bool::from(found).then_some(index as usize)
}

/// True when `HMAC-SHA256(secret, body)` equals `expected`, compared in constant time.
pub(crate) fn hmac_matches(secret: &[u8], body: &[u8], expected: &[u8]) -> bool {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(expected).is_ok()
}

/// Hex-encoded HMAC-SHA256, for tests and tools that sign payloads.
pub fn sign_hex(secret: &str, body: &[u8]) -> String {
    // HMAC accepts keys of any length, so construction cannot fail.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(mac) => mac,
        Err(_) => return String::new(),
    };
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// The single value of a header that must appear at most once.
pub(crate) fn single_header<'h>(
    headers: &'h HeaderMap,
    name: &'static str,
) -> Result<&'h str, VerifyError> {
    single_header_named(headers, name, Cow::Borrowed(name))
}

/// As `single_header`, for a header named at run time (errors carry `label`).
pub(crate) fn single_header_named<'h>(
    headers: &'h HeaderMap,
    name: impl axum::http::header::AsHeaderName + Copy,
    label: Cow<'static, str>,
) -> Result<&'h str, VerifyError> {
    let mut values = headers.get_all(name).iter();
    let first = values
        .next()
        .ok_or_else(|| VerifyError::Missing(label.clone()))?;
    if values.next().is_some() {
        return Err(VerifyError::Repeated(label));
    }
    first.to_str().map_err(|_| VerifyError::Malformed(label))
}

/// What the tables of the one-header schemes (GitHub, PagerDuty) share.
#[cfg(test)]
pub(crate) mod table {
    use axum::http::{HeaderMap, HeaderValue};

    use super::VerifyError;
    use crate::secret::Secrets;

    /// The secrets, the header's values, the body, and what verifying says.
    pub type Case<'a> = (&'a str, &'a [&'a str], &'a [u8], Result<(), VerifyError>);

    /// A scheme's `verify`.
    pub type Verify = fn(&Secrets, &HeaderMap, &[u8]) -> Result<usize, VerifyError>;

    /// What `verify` says of `body` with `header` given each of `values` in turn.
    pub fn check(
        verify: Verify,
        header: &'static str,
        (secrets, values, body): (&str, &[&str], &[u8]),
    ) -> Result<(), VerifyError> {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(header, HeaderValue::from_str(v).unwrap());
        }
        verify(&Secrets::from_list(secrets), &headers, body).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use base64::Engine;

    fn either() -> Verifier {
        Verifier::AnyOf(vec![
            Verifier::Token(Secrets::from_list("tok")),
            Verifier::Basic(Basic {
                username: Secret::new("am"),
                passwords: Secrets::from_list("tok"),
            }),
        ])
    }

    fn check(auth: Option<&str>) -> Result<Verified, VerifyError> {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert("authorization", HeaderValue::from_str(a).unwrap());
        }
        either().verify_at(&h, b"{}", 0)
    }

    #[test]
    fn any_of_several_schemes() {
        let basic = |u: &str, p: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        };
        assert_eq!(check(Some("Bearer tok")).unwrap().scheme, "token");
        let v = check(Some(&basic("am", "tok"))).unwrap();
        assert_eq!(
            v.to_string(),
            "basic, header Authorization, secret #1 of the list"
        );
        // The refusal that says most: a wrong password, not "malformed" from the token scheme.
        assert_eq!(
            check(Some(&basic("am", "x"))),
            Err(VerifyError::BadCredentials)
        );
        assert_eq!(check(Some("Bearer x")), Err(VerifyError::BadToken));
        assert_eq!(
            check(Some("Digest x")),
            Err(VerifyError::Malformed("authorization".into()))
        );
        assert_eq!(
            check(None),
            Err(VerifyError::Missing(
                "Authorization or X-Relay-Token".into()
            ))
        );
        assert_eq!(either().scheme(), "token or basic");
    }
}
