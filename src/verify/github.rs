//! GitHub's `X-Hub-Signature-256: sha256=<hex>` over the raw body, with several secrets for
//! rotation. The legacy SHA-1 `X-Hub-Signature` header is ignored.

use axum::http::HeaderMap;

use super::{VerifyError, first_match, hmac_matches, single_header};
use crate::secret::Secrets;

const HEADER: &str = "x-hub-signature-256";

/// The position of the secret that signed the body.
pub fn verify(secrets: &Secrets, headers: &HeaderMap, body: &[u8]) -> Result<usize, VerifyError> {
    let value = single_header(headers, HEADER)?;
    let hex_sig = value
        .trim()
        .strip_prefix("sha256=")
        .ok_or(VerifyError::Malformed(HEADER.into()))?;
    let sig = hex::decode(hex_sig).map_err(|_| VerifyError::Malformed(HEADER.into()))?;
    if sig.len() != 32 {
        return Err(VerifyError::Malformed(HEADER.into()));
    }
    first_match(secrets, |secret| {
        hmac_matches(secret.expose().as_bytes(), body, &sig)
    })
    .ok_or(VerifyError::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::super::table::{Case, check};
    use super::*;

    const VECTOR: &str = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";

    #[test]
    fn table() {
        let secret = "It's a Secret to Everybody";
        let body = b"Hello, World!";
        let upper = format!("sha256={}", VECTOR[7..].to_uppercase());
        let cases: &[Case] = &[
            (secret, &[VECTOR], body, Ok(())),
            // Rotation: the matching secret may be the older, second one.
            (&format!("newer-secret,{secret}"), &[VECTOR], body, Ok(())),
            (secret, &[&upper], body, Ok(())),
            ("wrong", &[VECTOR], body, Err(VerifyError::Mismatch)),
            (
                secret,
                &[VECTOR],
                b"Hello, World?",
                Err(VerifyError::Mismatch),
            ),
            (
                secret,
                &[&VECTOR.replace("sha256=", "sha1=")],
                body,
                Err(VerifyError::Malformed(HEADER.into())),
            ),
            (
                secret,
                &[&VECTOR[..40]],
                body,
                Err(VerifyError::Malformed(HEADER.into())),
            ),
            (
                secret,
                &[""],
                body,
                Err(VerifyError::Malformed(HEADER.into())),
            ),
            (secret, &[], body, Err(VerifyError::Missing(HEADER.into()))),
            (
                secret,
                &[VECTOR, VECTOR],
                body,
                Err(VerifyError::Repeated(HEADER.into())),
            ),
            ("", &[VECTOR], body, Err(VerifyError::Mismatch)),
        ];
        for (i, (secrets, sigs, body, want)) in cases.iter().enumerate() {
            assert_eq!(
                &check(verify, HEADER, (secrets, sigs, body)),
                want,
                "case {i}"
            );
        }
    }
}
