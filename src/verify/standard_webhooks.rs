//! Standard Webhooks (incident.io, Svix and others): `webhook-id`, `webhook-timestamp` and
//! `webhook-signature` (or the same under `svix-`), the message `{id}.{timestamp}.{body}`
//! signed with HMAC-SHA256 under the base64 key of a `whsec_` secret, each signature `v1,<b64>`.

use axum::http::HeaderMap;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::{Checked, Verified, VerifyError, first_match, single_header};
use crate::secret::{Secret, Secrets};

const MAX_CANDIDATES: usize = 8;

/// The header names of one flavour: the standard's own, or Svix's.
struct Names {
    id: &'static str,
    timestamp: &'static str,
    signature: &'static str,
}

const STANDARD_NAMES: Names = Names {
    id: "webhook-id",
    timestamp: "webhook-timestamp",
    signature: "webhook-signature",
};
const SVIX_NAMES: Names = Names {
    id: "svix-id",
    timestamp: "svix-timestamp",
    signature: "svix-signature",
};

#[derive(Debug, Clone)]
pub struct StandardWebhooks {
    pub secrets: Secrets,
    /// How far `webhook-timestamp` may be from now, in seconds (the standard says 5 minutes).
    pub tolerance: i64,
}

/// The HMAC key of a secret: without its `whsec_` prefix, base64-decoded.
fn key(secret: &Secret) -> Option<Vec<u8>> {
    let text = secret.expose();
    STANDARD
        .decode(text.strip_prefix("whsec_").unwrap_or(text))
        .ok()
        .filter(|k| !k.is_empty())
}

impl StandardWebhooks {
    /// How far the signed timestamp may be from the relay's clock.
    pub fn tolerance(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.tolerance.unsigned_abs())
    }

    /// Checks that every secret decodes; the error names its position, never its value.
    pub fn new(secrets: Secrets, tolerance: i64) -> Result<StandardWebhooks, String> {
        for (i, s) in secrets.iter().enumerate() {
            if key(s).is_none() {
                return Err(format!(
                    "secret #{} is not a Standard Webhooks secret (`whsec_` and base64)",
                    i + 1
                ));
            }
        }
        Ok(StandardWebhooks { secrets, tolerance })
    }

    pub fn verify(&self, headers: &HeaderMap, body: &[u8], now: i64) -> Checked {
        let names = if headers.contains_key(STANDARD_NAMES.signature) {
            &STANDARD_NAMES
        } else if headers.contains_key(SVIX_NAMES.signature) {
            &SVIX_NAMES
        } else {
            return Err(VerifyError::Missing(STANDARD_NAMES.signature.into()));
        };
        let id = single_header(headers, names.id)?;
        // Both flavours' ids, when present, must name the same message: dedup keys read
        // `webhook-id` first, and one the signature does not cover would make a replay new.
        let other = if names.id == STANDARD_NAMES.id {
            SVIX_NAMES.id
        } else {
            STANDARD_NAMES.id
        };
        if headers
            .get_all(other)
            .iter()
            .any(|v| v.as_bytes() != id.as_bytes())
        {
            return Err(VerifyError::Malformed(other.into()));
        }
        let ts_text = single_header(headers, names.timestamp)?.trim();
        let ts: i64 = ts_text
            .parse()
            .map_err(|_| VerifyError::Malformed(names.timestamp.into()))?;
        if now.abs_diff(ts) > self.tolerance.unsigned_abs() {
            return Err(VerifyError::Stale(names.timestamp.into()));
        }
        let mut candidates: Vec<[u8; 32]> = Vec::new();
        for value in headers.get_all(names.signature) {
            let text = value
                .to_str()
                .map_err(|_| VerifyError::Malformed(names.signature.into()))?;
            for entry in text.split_ascii_whitespace() {
                // Other versions (`v1a` is asymmetric) are not ours to check.
                let Some(b64) = entry.strip_prefix("v1,") else {
                    continue;
                };
                let mut sig = [0u8; 32];
                if STANDARD.decode_slice(b64, &mut sig) == Ok(32)
                    && candidates.len() < MAX_CANDIDATES
                {
                    candidates.push(sig);
                }
            }
        }
        if candidates.is_empty() {
            return Err(VerifyError::Malformed(names.signature.into()));
        }
        let pieces: [&[u8]; 5] = [id.as_bytes(), b".", ts_text.as_bytes(), b".", body];
        first_match(&self.secrets, |secret| {
            let Some(key) = key(secret) else {
                return false;
            };
            let mut ok = false;
            for sig in &candidates {
                let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&key) else {
                    return false;
                };
                for p in pieces {
                    mac.update(p);
                }
                ok |= mac.verify_slice(sig).is_ok();
            }
            ok
        })
        .map(|i| Verified {
            scheme: "standard-webhooks",
            header: Some(names.signature.to_owned()),
            secret: Some(i),
        })
        .ok_or(VerifyError::Mismatch)
    }
}

/// The `webhook-signature` value a sender would send, for tests and tools: `v1,<base64>`.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> Option<String> {
    let key = key(&Secret::new(secret))?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).ok()?;
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    Some(format!(
        "v1,{}",
        STANDARD.encode(mac.finalize().into_bytes())
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderName, HeaderValue};

    // The test vector of PROVIDERS.md (from the Standard Webhooks specification).
    const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    const ID: &str = "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk";
    const TS: i64 = 1649367553;
    const BODY: &[u8] = br#"{"email":"test@example.com","username":"test_user"}"#;
    const SIG: &str = "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=";

    fn headers(prefix: &str, id: &str, ts: &str, sigs: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        let name = |n: &str| HeaderName::from_bytes(format!("{prefix}{n}").as_bytes()).unwrap();
        map.insert(name("id"), HeaderValue::from_str(id).unwrap());
        map.insert(name("timestamp"), HeaderValue::from_str(ts).unwrap());
        for s in sigs {
            map.append(name("signature"), HeaderValue::from_str(s).unwrap());
        }
        map
    }

    fn scheme(secrets: &str) -> StandardWebhooks {
        StandardWebhooks::new(Secrets::from_list(secrets), 300).unwrap()
    }

    #[test]
    fn the_other_flavours_id_must_name_the_same_message() {
        let ts = TS.to_string();
        let mut svix = headers("svix-", ID, &ts, &[SIG]);
        assert!(scheme(SECRET).verify(&svix, BODY, TS).is_ok());
        svix.insert("webhook-id", HeaderValue::from_static(ID));
        assert!(
            scheme(SECRET).verify(&svix, BODY, TS).is_ok(),
            "the same id twice"
        );
        svix.insert("webhook-id", HeaderValue::from_static("msg_replayed"));
        assert_eq!(
            scheme(SECRET).verify(&svix, BODY, TS),
            Err(VerifyError::Malformed("webhook-id".into()))
        );
        let mut standard = headers("webhook-", ID, &ts, &[SIG]);
        standard.append("svix-id", HeaderValue::from_static("msg_other"));
        assert_eq!(
            scheme(SECRET).verify(&standard, BODY, TS),
            Err(VerifyError::Malformed("svix-id".into()))
        );
    }

    #[test]
    fn the_specification_vector_passes_at_its_timestamp() {
        assert_eq!(sign(SECRET, ID, TS, BODY).as_deref(), Some(SIG));
        let h = headers("webhook-", ID, &TS.to_string(), &[SIG]);
        let v = scheme(SECRET).verify(&h, BODY, TS).unwrap();
        assert_eq!(v.header.as_deref(), Some("webhook-signature"));
        assert_eq!(v.secret, Some(0));
        // The same under Svix's header names.
        let h = headers("svix-", ID, &TS.to_string(), &[SIG]);
        assert_eq!(
            scheme(SECRET)
                .verify(&h, BODY, TS)
                .unwrap()
                .header
                .as_deref(),
            Some("svix-signature")
        );
    }

    /// Name, secrets, headers, body, now, the secret position or the refusal.
    type Case<'a> = (
        &'a str,
        &'a str,
        HeaderMap,
        &'a [u8],
        i64,
        Result<Option<usize>, VerifyError>,
    );

    #[test]
    fn hostile_table() {
        // Long on purpose: one table of hostile headers, each row its own case.
        let other = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let guess = sign(other, ID, TS, BODY).unwrap();
        let ts = TS.to_string();
        let mut tampered = BODY.to_vec();
        tampered.push(b' ');
        let both = format!("{other},{SECRET}");
        let cases: Vec<Case> = vec![
            (
                "rotation: the second secret",
                &both,
                headers("webhook-", ID, &ts, &[SIG]),
                BODY,
                TS,
                Ok(Some(1)),
            ),
            (
                "secret without whsec_",
                "C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
                headers("webhook-", ID, &ts, &[SIG]),
                BODY,
                TS,
                Ok(Some(0)),
            ),
            (
                "wrong secret",
                other,
                headers("webhook-", ID, &ts, &[SIG]),
                BODY,
                TS,
                Err(VerifyError::Mismatch),
            ),
            (
                "tampered body",
                SECRET,
                headers("webhook-", ID, &ts, &[SIG]),
                &tampered,
                TS,
                Err(VerifyError::Mismatch),
            ),
            (
                "another id",
                SECRET,
                headers("webhook-", "msg_other", &ts, &[SIG]),
                BODY,
                TS,
                Err(VerifyError::Mismatch),
            ),
            (
                "a fresh timestamp on an old signature",
                SECRET,
                headers("webhook-", ID, &(TS + 60).to_string(), &[SIG]),
                BODY,
                TS + 60,
                Err(VerifyError::Mismatch),
            ),
            (
                "stale: 5 min 1 s later",
                SECRET,
                headers("webhook-", ID, &ts, &[SIG]),
                BODY,
                TS + 301,
                Err(VerifyError::Stale("webhook-timestamp".into())),
            ),
            (
                "from the future",
                SECRET,
                headers("webhook-", ID, &ts, &[SIG]),
                BODY,
                TS - 301,
                Err(VerifyError::Stale("webhook-timestamp".into())),
            ),
            (
                "just within 5 min",
                SECRET,
                headers("webhook-", ID, &ts, &[SIG]),
                BODY,
                TS + 300,
                Ok(Some(0)),
            ),
            (
                "timestamp not a number",
                SECRET,
                headers("webhook-", ID, "soon", &[SIG]),
                BODY,
                TS,
                Err(VerifyError::Malformed("webhook-timestamp".into())),
            ),
            (
                "wrong version prefix",
                SECRET,
                headers("webhook-", ID, &ts, &[&SIG.replace("v1,", "v2,")]),
                BODY,
                TS,
                Err(VerifyError::Malformed("webhook-signature".into())),
            ),
            (
                "no version prefix",
                SECRET,
                headers("webhook-", ID, &ts, &[&SIG[3..]]),
                BODY,
                TS,
                Err(VerifyError::Malformed("webhook-signature".into())),
            ),
            (
                "empty header",
                SECRET,
                headers("webhook-", ID, &ts, &[""]),
                BODY,
                TS,
                Err(VerifyError::Malformed("webhook-signature".into())),
            ),
            (
                "missing header",
                SECRET,
                headers("webhook-", ID, &ts, &[]),
                BODY,
                TS,
                Err(VerifyError::Missing("webhook-signature".into())),
            ),
            (
                "several in one header, one good",
                SECRET,
                headers("webhook-", ID, &ts, &[&format!("v1a,AAAA {guess} {SIG}")]),
                BODY,
                TS,
                Ok(Some(0)),
            ),
            (
                "several in one header, none good",
                SECRET,
                headers("webhook-", ID, &ts, &[&format!("{guess} {guess}")]),
                BODY,
                TS,
                Err(VerifyError::Mismatch),
            ),
        ];
        for (name, secrets, h, body, now, want) in cases {
            let got = scheme(secrets).verify(&h, body, now).map(|v| v.secret);
            assert_eq!(got, want, "{name}");
        }
        let mut no_id = headers("webhook-", ID, &ts, &[SIG]);
        no_id.remove("webhook-id");
        assert_eq!(
            scheme(SECRET).verify(&no_id, BODY, TS).map(|v| v.secret),
            Err(VerifyError::Missing("webhook-id".into()))
        );
    }

    #[test]
    fn a_secret_that_is_not_base64_is_refused_without_being_printed() {
        let err = StandardWebhooks::new(
            Secrets::from_list("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD,whsec_not base64!"),
            300,
        )
        .unwrap_err();
        assert_eq!(
            err,
            "secret #2 is not a Standard Webhooks secret (`whsec_` and base64)"
        );
    }
}
