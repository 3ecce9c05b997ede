//! Compiles a mapping file's `verify` section into a `Verifier`: one scheme, or a list of
//! schemes of which any may verify (a sender that can be set up either way).

use axum::http::HeaderName;
use serde_json::Value;

use super::model::RawVerify;
use crate::secret::{Secret, Secrets};
use crate::verify::{Algorithm, Basic, Encoding, HmacHeader, StandardWebhooks, Template, Verifier};

const SCHEMES: &str = "github, pagerduty, token, hmac, standard-webhooks, basic or none";

/// The default window for signed timestamps: the Standard Webhooks figure.
const DEFAULT_TOLERANCE: &str = "5m";

pub(super) fn compile(
    raw: Option<&Value>,
    source: &str,
    warnings: &mut Vec<String>,
) -> Result<Verifier, String> {
    let Some(raw) = raw else {
        return Err(
            "missing; a source without verification must say `verify: { scheme: none, insecure: true }`"
                .into(),
        );
    };
    match raw {
        Value::Array(items) => {
            if items.is_empty() {
                return Err("an empty list: name at least one scheme".into());
            }
            let mut list = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let v = parse(item).map_err(|e| format!("[{i}]: {e}"))?;
                if v.scheme == "none" {
                    return Err(format!(
                        "[{i}]: `none` cannot be one of several schemes: it would let anything in"
                    ));
                }
                list.push(one(&v, source, warnings).map_err(|e| format!("[{i}]: {e}"))?);
            }
            Ok(if list.len() == 1 {
                list.remove(0)
            } else {
                Verifier::AnyOf(list)
            })
        }
        other => one(&parse(other)?, source, warnings),
    }
}

fn parse(value: &Value) -> Result<RawVerify, String> {
    serde_path_to_error::deserialize(value.clone()).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            e.inner().to_string()
        } else {
            format!("{path}: {}", e.inner())
        }
    })
}

fn one(v: &RawVerify, source: &str, warnings: &mut Vec<String>) -> Result<Verifier, String> {
    let scheme = v.scheme.as_str();
    let secrets = || {
        let list = Secrets::from_list(v.secrets.as_deref().unwrap_or(""));
        if list.is_empty() {
            Err(format!(
                "scheme `{scheme}` needs `secrets`, and they are empty"
            ))
        } else {
            Ok(list)
        }
    };
    // Options that belong to other schemes are mistakes worth naming.
    let given = given!(v; header, algorithm, encoding, prefix, timestamp_header, message,
        tolerance, username);
    let allowed: &[&str] = match scheme {
        "hmac" => &[
            "header",
            "algorithm",
            "encoding",
            "prefix",
            "timestamp_header",
            "message",
            "tolerance",
        ],
        "standard-webhooks" => &["tolerance"],
        "basic" => &["username"],
        _ => &[],
    };
    if let Some((name, _)) = given
        .iter()
        .find(|(name, set)| *set && !allowed.contains(name))
    {
        return Err(format!("`{name}` does not apply to scheme `{scheme}`"));
    }
    match scheme {
        "github" => Ok(Verifier::GitHub(secrets()?)),
        "pagerduty" => Ok(Verifier::PagerDuty(secrets()?)),
        "token" => Ok(Verifier::Token(secrets()?)),
        "hmac" => Ok(Verifier::Hmac(Box::new(hmac(v, secrets()?)?))),
        "standard-webhooks" => Ok(Verifier::StandardWebhooks(StandardWebhooks::new(
            secrets()?,
            tolerance(v.tolerance.as_deref())?,
        )?)),
        "basic" => {
            let username = v
                .username
                .as_deref()
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .ok_or("scheme `basic` needs `username`, and it is empty")?;
            if username.contains(':') {
                return Err("username: a basic-auth user name cannot contain `:`".into());
            }
            Ok(Verifier::Basic(Basic {
                username: Secret::new(username),
                passwords: secrets()?,
            }))
        }
        "none" if v.insecure => {
            warnings.push(format!(
                "source `{source}` accepts webhooks without any verification (insecure: true)"
            ));
            Ok(Verifier::Insecure)
        }
        "none" => Err("scheme `none` must also say `insecure: true`".into()),
        other => Err(format!("unknown scheme `{other}` ({SCHEMES})")),
    }
}

fn tolerance(text: Option<&str>) -> Result<i64, String> {
    let text = text
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .unwrap_or(DEFAULT_TOLERANCE);
    let d = humantime::parse_duration(text)
        .map_err(|e| format!("tolerance: `{text}` is not a duration like 30s or 5m: {e}"))?;
    if d.is_zero() || d.as_secs() > 24 * 3600 {
        return Err(format!(
            "tolerance: `{text}` must be more than zero and at most 24h"
        ));
    }
    Ok(d.as_secs() as i64)
}

fn header_name(field: &str, text: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(text.trim().as_bytes())
        .map_err(|_| format!("{field}: `{text}` is not a valid header name"))
}

fn hmac(v: &RawVerify, secrets: Secrets) -> Result<HmacHeader, String> {
    let names = v.header.as_ref().map(|h| h.to_vec()).unwrap_or_default();
    if names.is_empty() {
        return Err("scheme `hmac` needs `header`: the header that carries the signature".into());
    }
    let headers = names
        .iter()
        .map(|n| header_name("header", n))
        .collect::<Result<Vec<_>, _>>()?;
    let algorithm = match v.algorithm.as_deref() {
        None => Algorithm::Sha256,
        Some(a) => Algorithm::parse(a)
            .ok_or_else(|| format!("algorithm: `{a}` is not sha1, sha256 or sha512"))?,
    };
    let encoding = match v.encoding.as_deref() {
        None => Encoding::Hex,
        Some(e) => {
            Encoding::parse(e).ok_or_else(|| format!("encoding: `{e}` is not hex or base64"))?
        }
    };
    let timestamp_header = v
        .timestamp_header
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| header_name("timestamp_header", t))
        .transpose()?;
    let default_message = if timestamp_header.is_some() {
        "{timestamp}:{body}"
    } else {
        "{body}"
    };
    let message = Template::parse(
        v.message
            .as_deref()
            .filter(|m| !m.is_empty())
            .unwrap_or(default_message),
    )
    .map_err(|e| format!("message: {e}"))?;
    match (&timestamp_header, message.uses_timestamp()) {
        (Some(_), false) => {
            return Err(
                "message: with a `timestamp_header` the message must sign {timestamp}, or a replay could carry any time"
                    .into(),
            );
        }
        (None, true) => {
            return Err("message: {timestamp} needs a `timestamp_header`".into());
        }
        _ => {}
    }
    let timestamp = match timestamp_header {
        Some(h) => Some((h, tolerance(v.tolerance.as_deref())?)),
        None if v.tolerance.is_some() => {
            return Err("tolerance: applies only with a `timestamp_header`".into());
        }
        None => None,
    };
    Ok(HmacHeader {
        headers,
        algorithm,
        encoding,
        prefix: v.prefix.clone().unwrap_or_default(),
        timestamp,
        message,
        secrets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(v: Value) -> String {
        compile(Some(&v), "s", &mut Vec::new()).unwrap_err()
    }

    #[test]
    fn every_scheme_compiles_and_mistakes_are_named() {
        // Long on purpose: one table of schemes and their mistakes, each row its own case.
        let ok = |v: Value| compile(Some(&v), "s", &mut Vec::new()).unwrap().scheme();
        assert_eq!(
            ok(json!({ "scheme": "hmac", "header": "X-Sig", "secrets": "a,b" })),
            "hmac"
        );
        assert_eq!(
            ok(json!({ "scheme": "standard-webhooks", "secrets": "whsec_c2VjcmV0" })),
            "standard-webhooks"
        );
        assert_eq!(
            ok(json!([
                { "scheme": "token", "secrets": "t" },
                { "scheme": "basic", "username": "u", "secrets": "t" }
            ])),
            "token or basic"
        );
        for (raw, want) in [
            (
                json!({ "scheme": "hmac", "secrets": "a" }),
                "scheme `hmac` needs `header`",
            ),
            (
                json!({ "scheme": "hmac", "header": "X", "algorithm": "md5", "secrets": "a" }),
                "algorithm: `md5` is not sha1, sha256 or sha512",
            ),
            (
                json!({ "scheme": "hmac", "header": "X", "encoding": "b32", "secrets": "a" }),
                "encoding: `b32` is not hex or base64",
            ),
            (
                json!({ "scheme": "hmac", "header": "bad header", "secrets": "a" }),
                "header: `bad header` is not a valid header name",
            ),
            (
                json!({ "scheme": "hmac", "header": "X", "timestamp_header": "X-T", "message": "{body}", "secrets": "a" }),
                "the message must sign {timestamp}",
            ),
            (
                json!({ "scheme": "hmac", "header": "X", "message": "{timestamp}.{body}", "secrets": "a" }),
                "{timestamp} needs a `timestamp_header`",
            ),
            (
                json!({ "scheme": "hmac", "header": "X", "tolerance": "5m", "secrets": "a" }),
                "tolerance: applies only with a `timestamp_header`",
            ),
            (
                json!({ "scheme": "hmac", "header": "X", "timestamp_header": "X-T", "tolerance": "0s", "secrets": "a" }),
                "must be more than zero",
            ),
            (
                json!({ "scheme": "hmac", "header": "X", "secrets": "" }),
                "scheme `hmac` needs `secrets`, and they are empty",
            ),
            (
                json!({ "scheme": "github", "header": "X", "secrets": "a" }),
                "`header` does not apply to scheme `github`",
            ),
            (
                json!({ "scheme": "basic", "secrets": "a" }),
                "scheme `basic` needs `username`",
            ),
            (
                json!({ "scheme": "standard-webhooks", "secrets": "whsec_c2VjcmV0,hunter2!" }),
                "secret #2 is not a Standard Webhooks secret",
            ),
            (
                json!([{ "scheme": "none", "insecure": true }]),
                "[0]: `none` cannot be one of several schemes",
            ),
            (json!([]), "an empty list"),
            (
                json!({ "scheme": "hmac", "header": "X", "secret": "a" }),
                "unknown field `secret`",
            ),
            (json!({ "scheme": "rot13" }), "unknown scheme `rot13`"),
        ] {
            let e = err(raw.clone());
            assert!(e.contains(want), "{raw}: {e}");
            assert!(!e.contains("hunter2"), "a secret in an error: {e}");
        }
    }
}
