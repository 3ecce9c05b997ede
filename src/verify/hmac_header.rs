//! The generic `hmac` scheme: an HMAC (SHA-1, SHA-256 or SHA-512) of the raw body, or of a
//! message built from a signed timestamp and the body, carried hex or base64 in a header of the
//! mapping's choosing, optionally after a prefix such as `sha256=`.

use std::borrow::Cow;

use axum::http::{HeaderMap, HeaderName};
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};

use super::{Checked, Verified, VerifyError, first_match, single_header_named};
use crate::secret::Secrets;

/// Signatures looked at in one header, at most (a rotation carries two or three).
const MAX_CANDIDATES: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Sha1,
    Sha256,
    Sha512,
}

impl Algorithm {
    pub fn parse(text: &str) -> Option<Algorithm> {
        match text.to_ascii_lowercase().replace('-', "").as_str() {
            "sha1" => Some(Algorithm::Sha1),
            "sha256" => Some(Algorithm::Sha256),
            "sha512" => Some(Algorithm::Sha512),
            _ => None,
        }
    }

    fn output_len(self) -> usize {
        match self {
            Algorithm::Sha1 => 20,
            Algorithm::Sha256 => 32,
            Algorithm::Sha512 => 64,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Hex,
    Base64,
}

impl Encoding {
    pub fn parse(text: &str) -> Option<Encoding> {
        match text {
            "hex" => Some(Encoding::Hex),
            "base64" => Some(Encoding::Base64),
            _ => None,
        }
    }

    fn decode(self, text: &str) -> Option<Vec<u8>> {
        match self {
            Encoding::Hex => hex::decode(text).ok(),
            Encoding::Base64 => base64::engine::general_purpose::STANDARD
                .decode(text)
                .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(text))
                .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(text))
                .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text))
                .ok(),
        }
    }

    pub fn encode(self, bytes: &[u8]) -> String {
        match self {
            Encoding::Hex => hex::encode(bytes),
            Encoding::Base64 => base64::engine::general_purpose::STANDARD.encode(bytes),
        }
    }
}

/// The signed message: literal text around `{timestamp}` and exactly one `{body}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Timestamp,
    Body,
}

impl Template {
    /// Parses `{timestamp}:{body}` and the like; `{body}` must appear exactly once.
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        let mut literal = String::new();
        while let Some(start) = rest.find('{') {
            literal.push_str(&rest[..start]);
            let after = &rest[start..];
            let (part, len) = if after.starts_with("{body}") {
                (Part::Body, "{body}".len())
            } else if after.starts_with("{timestamp}") {
                (Part::Timestamp, "{timestamp}".len())
            } else {
                return Err(format!(
                    "message `{text}`: only {{timestamp}} and {{body}} may appear in braces"
                ));
            };
            if !literal.is_empty() {
                parts.push(Part::Text(std::mem::take(&mut literal)));
            }
            parts.push(part);
            rest = &after[len..];
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            parts.push(Part::Text(literal));
        }
        if parts.iter().filter(|p| **p == Part::Body).count() != 1 {
            return Err(format!("message `{text}`: needs {{body}} exactly once"));
        }
        Ok(Template { parts })
    }

    pub fn uses_timestamp(&self) -> bool {
        self.parts.contains(&Part::Timestamp)
    }

    fn pieces<'a>(&'a self, timestamp: &'a str, body: &'a [u8]) -> Vec<&'a [u8]> {
        self.parts
            .iter()
            .map(|p| match p {
                Part::Text(t) => t.as_bytes(),
                Part::Timestamp => timestamp.as_bytes(),
                Part::Body => body,
            })
            .collect()
    }
}

/// The compiled `hmac` scheme of one mapping.
#[derive(Debug, Clone)]
pub struct HmacHeader {
    /// Header names tried in order; the first present carries the signature.
    pub headers: Vec<HeaderName>,
    pub algorithm: Algorithm,
    pub encoding: Encoding,
    /// Text before each signature (`sha256=`); empty for none.
    pub prefix: String,
    /// The header holding the signed Unix time, and how far it may be from now (seconds).
    pub timestamp: Option<(HeaderName, i64)>,
    pub message: Template,
    pub secrets: Secrets,
}

impl HmacHeader {
    /// How far the signed timestamp may be from the relay's clock, when one is signed.
    pub fn tolerance(&self) -> Option<std::time::Duration> {
        self.timestamp
            .as_ref()
            .map(|(_, t)| std::time::Duration::from_secs(t.unsigned_abs()))
    }

    pub fn verify(&self, headers: &HeaderMap, body: &[u8], now: i64) -> Checked {
        let Some(name) = self.headers.iter().find(|h| headers.contains_key(*h)) else {
            let names: Vec<&str> = self.headers.iter().map(HeaderName::as_str).collect();
            return Err(VerifyError::Missing(names.join(" or ").into()));
        };
        let label = || -> Cow<'static, str> { Cow::Owned(name.as_str().to_owned()) };
        let mut candidates: Vec<Vec<u8>> = Vec::new();
        // Several header lines are one list; entries are separated by commas or spaces.
        for value in headers.get_all(name) {
            let text = value
                .to_str()
                .map_err(|_| VerifyError::Malformed(label()))?;
            for entry in text.split([',', ' ', '\t']).filter(|e| !e.is_empty()) {
                let Some(sig) = entry.strip_prefix(self.prefix.as_str()) else {
                    continue;
                };
                match self.encoding.decode(sig) {
                    Some(bytes)
                        if bytes.len() == self.algorithm.output_len()
                            && candidates.len() < MAX_CANDIDATES =>
                    {
                        candidates.push(bytes)
                    }
                    _ => {}
                }
            }
        }
        if candidates.is_empty() {
            return Err(VerifyError::Malformed(label()));
        }
        let timestamp = match &self.timestamp {
            None => "",
            Some((ts_header, tolerance)) => {
                let ts_label: Cow<'static, str> = Cow::Owned(ts_header.as_str().to_owned());
                let text = single_header_named(headers, ts_header, ts_label.clone())?.trim();
                let at: i64 = text
                    .parse()
                    .map_err(|_| VerifyError::Malformed(ts_label.clone()))?;
                if now.abs_diff(at) > tolerance.unsigned_abs() {
                    return Err(VerifyError::Stale(ts_label));
                }
                text
            }
        };
        let pieces = self.message.pieces(timestamp, body);
        first_match(&self.secrets, |secret| {
            let key = secret.expose().as_bytes();
            let mut ok = false;
            for sig in &candidates {
                ok |= mac_matches(self.algorithm, key, &pieces, sig);
            }
            ok
        })
        .map(|i| Verified {
            scheme: "hmac",
            header: Some(name.as_str().to_owned()),
            secret: Some(i),
        })
        .ok_or(VerifyError::Mismatch)
    }

    /// The signature a sender would put in the header (prefix included), for tests and tools.
    pub fn sign(&self, secret: &str, timestamp: &str, body: &[u8]) -> String {
        let pieces = self.message.pieces(timestamp, body);
        let mac = mac(self.algorithm, secret.as_bytes(), &pieces);
        format!("{}{}", self.prefix, self.encoding.encode(&mac))
    }
}

/// True when the HMAC of the pieces equals `expected`, compared in constant time.
fn mac_matches(algorithm: Algorithm, key: &[u8], pieces: &[&[u8]], expected: &[u8]) -> bool {
    let tag = mac(algorithm, key, pieces);
    !tag.is_empty() && subtle::ConstantTimeEq::ct_eq(tag.as_slice(), expected).into()
}

fn mac(algorithm: Algorithm, key: &[u8], pieces: &[&[u8]]) -> Vec<u8> {
    match algorithm {
        Algorithm::Sha1 => tag::<Hmac<sha1::Sha1>>(key, pieces),
        Algorithm::Sha256 => tag::<Hmac<sha2::Sha256>>(key, pieces),
        Algorithm::Sha512 => tag::<Hmac<sha2::Sha512>>(key, pieces),
    }
}

/// The tag `M` makes of the pieces (HMAC takes a key of any length).
fn tag<M: Mac + KeyInit>(key: &[u8], pieces: &[&[u8]]) -> Vec<u8> {
    let Ok(mut mac) = <M as KeyInit>::new_from_slice(key) else {
        return Vec::new();
    };
    for p in pieces {
        mac.update(p);
    }
    mac.finalize().into_bytes().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const NOW: i64 = 1_764_239_100;
    const BODY: &[u8] = br#"{"receiver":"p0","status":"firing","alerts":[]}"#;

    fn scheme(
        algorithm: Algorithm,
        encoding: Encoding,
        prefix: &str,
        timestamp: bool,
    ) -> HmacHeader {
        HmacHeader {
            headers: vec![
                HeaderName::from_static("x-signature"),
                HeaderName::from_static("x-old-signature"),
            ],
            algorithm,
            encoding,
            prefix: prefix.into(),
            timestamp: timestamp.then(|| (HeaderName::from_static("x-timestamp"), 300)),
            message: Template::parse(if timestamp {
                "{timestamp}:{body}"
            } else {
                "{body}"
            })
            .unwrap(),
            secrets: Secrets::from_list("new-secret,old-secret"),
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    /// Which secret signed `body` (`x-signature: sig`), or why it does not pass.
    fn secret_of(s: &HmacHeader, sig: &str, body: &[u8]) -> Result<Option<usize>, VerifyError> {
        s.verify(&headers(&[("x-signature", sig)]), body, NOW)
            .map(|v| v.secret)
    }

    #[test]
    fn known_answers() {
        // RFC 4231 test case 2 (SHA-256 and SHA-512), RFC 2202 test case 2 (SHA-1).
        let key = "Jefe";
        let data = b"what do ya want for nothing?";
        for (algorithm, want) in [
            (Algorithm::Sha1, "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79"),
            (
                Algorithm::Sha256,
                "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
            ),
            (
                Algorithm::Sha512,
                "164b7a7bfcf819e2e395fbe73b56e0a387bd64222e831fd610270cd7ea2505549758bf75c05a994a6d034f65f8f0e6fdcaeab1a34d4a6b4b636e070a38bce737",
            ),
        ] {
            let s = HmacHeader {
                secrets: Secrets::from_list(key),
                ..scheme(algorithm, Encoding::Hex, "", false)
            };
            assert_eq!(s.sign(key, "", data), want, "{algorithm:?}");
            let h = headers(&[("x-signature", want)]);
            assert_eq!(s.verify(&h, data, NOW).unwrap().secret, Some(0));
        }
    }

    type Case<'a> = (
        &'a str,
        Vec<(&'a str, String)>,
        &'a [u8],
        Result<Option<usize>, VerifyError>,
    );

    #[test]
    fn hostile_table() {
        // Long on purpose: one table of hostile headers, each row its own case.
        let plain = scheme(Algorithm::Sha256, Encoding::Hex, "sha256=", false);
        let good = plain.sign("new-secret", "", BODY);
        let old = plain.sign("old-secret", "", BODY);
        let guess = plain.sign("guess", "", BODY);
        let mut tampered = BODY.to_vec();
        tampered.push(b' ');
        let sig = |v: &str| vec![("x-signature", v.to_owned())];
        let missing = |h: &str| Err(VerifyError::Missing(h.to_owned().into()));
        let malformed = |h: &str| Err(VerifyError::Malformed(h.to_owned().into()));
        let cases: Vec<Case> = vec![
            ("good", sig(&good), BODY, Ok(Some(0))),
            ("rotated: the older secret", sig(&old), BODY, Ok(Some(1))),
            (
                "older header name",
                vec![("x-old-signature", good.clone())],
                BODY,
                Ok(Some(0)),
            ),
            (
                "upper-case hex",
                sig(&good.to_uppercase().replace("SHA256=", "sha256=")),
                BODY,
                Ok(Some(0)),
            ),
            (
                "wrong secret",
                sig(&guess),
                BODY,
                Err(VerifyError::Mismatch),
            ),
            (
                "tampered body",
                sig(&good),
                &tampered,
                Err(VerifyError::Mismatch),
            ),
            (
                "wrong prefix",
                sig(&good.replace("sha256=", "sha1=")),
                BODY,
                malformed("x-signature"),
            ),
            (
                "no prefix",
                sig(&good["sha256=".len()..]),
                BODY,
                malformed("x-signature"),
            ),
            (
                "truncated",
                sig(&good[..good.len() - 2]),
                BODY,
                malformed("x-signature"),
            ),
            ("empty header", sig(""), BODY, malformed("x-signature")),
            (
                "missing header",
                vec![],
                BODY,
                missing("x-signature or x-old-signature"),
            ),
            (
                "several in one header, one good",
                sig(&format!("{guess},{old}")),
                BODY,
                Ok(Some(1)),
            ),
            (
                "several in one header, space-separated",
                sig(&format!("{guess} {good}")),
                BODY,
                Ok(Some(0)),
            ),
            (
                "several in one header, none good",
                sig(&format!("{guess}, {guess}")),
                BODY,
                Err(VerifyError::Mismatch),
            ),
            (
                "several header lines",
                vec![
                    ("x-signature", guess.clone()),
                    ("x-signature", good.clone()),
                ],
                BODY,
                Ok(Some(0)),
            ),
        ];
        for (name, h, body, want) in cases {
            let pairs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let got = plain.verify(&headers(&pairs), body, NOW).map(|v| v.secret);
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn timestamps_are_signed_and_must_be_fresh() {
        let s = scheme(Algorithm::Sha256, Encoding::Hex, "", true);
        let ts = NOW.to_string();
        let good = s.sign("old-secret", &ts, BODY);
        let check = |sig: &str, ts: &str, now: i64| {
            s.verify(
                &headers(&[("x-signature", sig), ("x-timestamp", ts)]),
                BODY,
                now,
            )
            .map(|v| v.secret)
        };
        assert_eq!(check(&good, &ts, NOW), Ok(Some(1)));
        assert_eq!(check(&good, &ts, NOW + 300), Ok(Some(1)));
        assert_eq!(check(&good, &ts, NOW - 300), Ok(Some(1)));
        let stale = Err(VerifyError::Stale("x-timestamp".into()));
        assert_eq!(check(&good, &ts, NOW + 301), stale);
        assert_eq!(check(&good, &ts, NOW - 301), stale);
        // A fresh timestamp with an old signature: the timestamp is part of the message.
        let later = (NOW + 100).to_string();
        assert_eq!(check(&good, &later, NOW), Err(VerifyError::Mismatch));
        // A signature of the body alone does not pass for the timestamped message.
        assert_eq!(
            check(&s.sign("old-secret", "", BODY), &ts, NOW),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            check(&good, "yesterday", NOW),
            Err(VerifyError::Malformed("x-timestamp".into()))
        );
        assert_eq!(
            secret_of(&s, &good, BODY),
            Err(VerifyError::Missing("x-timestamp".into()))
        );
    }

    #[test]
    fn base64_sha1_and_sha512() {
        for algorithm in [Algorithm::Sha1, Algorithm::Sha512] {
            let s = scheme(algorithm, Encoding::Base64, "v1=", false);
            let good = s.sign("new-secret", "", BODY);
            assert_eq!(secret_of(&s, &good, BODY), Ok(Some(0)));
            assert_eq!(secret_of(&s, &good, b"{}"), Err(VerifyError::Mismatch));
        }
        // A SHA-256-sized signature is not a SHA-512 one.
        let s = scheme(Algorithm::Sha512, Encoding::Hex, "", false);
        let short =
            scheme(Algorithm::Sha256, Encoding::Hex, "", false).sign("new-secret", "", BODY);
        assert_eq!(
            secret_of(&s, &short, BODY),
            Err(VerifyError::Malformed("x-signature".into()))
        );
    }

    #[test]
    fn templates() {
        assert!(
            Template::parse("{timestamp}.{body}")
                .unwrap()
                .uses_timestamp()
        );
        assert!(!Template::parse("{body}").unwrap().uses_timestamp());
        assert!(Template::parse("{timestamp}").is_err());
        assert!(Template::parse("{body}{body}").is_err());
        assert!(Template::parse("{id}.{body}").is_err());
    }
}
