//! PagerDuty v3's `X-PagerDuty-Signature: v1=<hex>[,v1=<hex>...]` over the raw body: accepted
//! when any `v1=` entry matches any configured secret; entries with other prefixes are ignored.

use axum::http::HeaderMap;

use super::{VerifyError, first_match, hmac_matches};
use crate::secret::Secrets;

const HEADER: &str = "x-pagerduty-signature";

/// The position of the secret that signed the body.
pub fn verify(secrets: &Secrets, headers: &HeaderMap, body: &[u8]) -> Result<usize, VerifyError> {
    let mut seen_header = false;
    let mut candidates: Vec<[u8; 32]> = Vec::new();
    // Several header lines are one comma-separated list (RFC 9110, section 5.3).
    for value in headers.get_all(HEADER) {
        seen_header = true;
        let text = value
            .to_str()
            .map_err(|_| VerifyError::Malformed(HEADER.into()))?;
        for entry in text.split(',').map(str::trim) {
            let Some(hex_sig) = entry.strip_prefix("v1=") else {
                continue;
            };
            let mut sig = [0u8; 32];
            if hex::decode_to_slice(hex_sig, &mut sig).is_ok() && candidates.len() < 8 {
                candidates.push(sig);
            }
        }
    }
    if !seen_header {
        return Err(VerifyError::Missing(HEADER.into()));
    }
    if candidates.is_empty() {
        return Err(VerifyError::Malformed(HEADER.into()));
    }
    first_match(secrets, |secret| {
        let mut ok = false;
        for sig in &candidates {
            ok |= hmac_matches(secret.expose().as_bytes(), body, sig);
        }
        ok
    })
    .ok_or(VerifyError::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::super::table::{Case, check};
    use super::*;

    const BODY: &[u8] = br#"{"event":{"id":"01DEMO","event_type":"pagey.ping"}}"#;
    const SIG1: &str = "v1=dc956f6631b283d911730c1bcca3d43832c5801df7f1e97982084f09d858877f";
    const SIG2: &str = "v1=4091c333f98d590a85bc8d21efdf02fa4516ff4b8a2791e9c732068ce0cf707d";

    #[test]
    fn table() {
        let both = format!("{SIG1},{SIG2}");
        let upper = SIG2.to_uppercase().replace("V1=", "v1=");
        let cases: &[Case] = &[
            ("pd-secret-1", &[&both], BODY, Ok(())),
            ("pd-secret-2", &[&both], BODY, Ok(())),
            ("pd-secret-2", &[SIG2], BODY, Ok(())),
            ("rotated-in,pd-secret-1", &[SIG1], BODY, Ok(())),
            ("pd-secret-2", &[&upper], BODY, Ok(())),
            ("pd-secret-2", &[SIG1, SIG2], BODY, Ok(())),
            ("pd-secret-2", &[&format!("v0=abc, {SIG2}")], BODY, Ok(())),
            ("pd-secret-3", &[&both], BODY, Err(VerifyError::Mismatch)),
            ("pd-secret-1", &[SIG2], BODY, Err(VerifyError::Mismatch)),
            ("pd-secret-1", &[&both], b"{}", Err(VerifyError::Mismatch)),
            (
                "pd-secret-1",
                &[&SIG1.replace("v1=", "v2=")],
                BODY,
                Err(VerifyError::Malformed(HEADER.into())),
            ),
            (
                "pd-secret-1",
                &[&SIG1[..30]],
                BODY,
                Err(VerifyError::Malformed(HEADER.into())),
            ),
            (
                "pd-secret-1",
                &[""],
                BODY,
                Err(VerifyError::Malformed(HEADER.into())),
            ),
            (
                "pd-secret-1",
                &[],
                BODY,
                Err(VerifyError::Missing(HEADER.into())),
            ),
        ];
        for (i, (secrets, header, body, want)) in cases.iter().enumerate() {
            assert_eq!(
                &check(verify, HEADER, (secrets, header, body)),
                want,
                "case {i}"
            );
        }
    }
}
