//! A shared token for sources that cannot sign (Opsgenie): `Authorization: Bearer <token>` or
//! `X-Relay-Token: <token>`, compared in constant time through fixed-length digests.

use axum::http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{VerifyError, first_match, single_header};
use crate::secret::Secrets;

const AUTHORIZATION: &str = "authorization";
const RELAY_TOKEN: &str = "x-relay-token";

pub fn verify(tokens: &Secrets, headers: &HeaderMap) -> Result<(), VerifyError> {
    verify_named(tokens, headers).map(|_| ())
}

/// The header that carried the token and the position of the token it matched.
pub fn verify_named(
    tokens: &Secrets,
    headers: &HeaderMap,
) -> Result<(&'static str, usize), VerifyError> {
    let (header, presented) = if headers.contains_key(RELAY_TOKEN) {
        ("X-Relay-Token", single_header(headers, RELAY_TOKEN)?.trim())
    } else if headers.contains_key(AUTHORIZATION) {
        let value = single_header(headers, AUTHORIZATION)?.trim();
        let (scheme, rest) = value
            .split_once(' ')
            .ok_or(VerifyError::Malformed(AUTHORIZATION.into()))?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(VerifyError::Malformed(AUTHORIZATION.into()));
        }
        ("Authorization", rest.trim())
    } else {
        return Err(VerifyError::Missing(
            "Authorization or X-Relay-Token".into(),
        ));
    };
    if presented.is_empty() {
        return Err(VerifyError::BadToken);
    }
    // Digests make the comparison independent of both lengths.
    let got = Sha256::digest(presented.as_bytes());
    first_match(tokens, |token| {
        let want = Sha256::digest(token.expose().as_bytes());
        bool::from(got.as_slice().ct_eq(want.as_slice()))
    })
    .map(|i| (header, i))
    .ok_or(VerifyError::BadToken)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderName, HeaderValue};

    fn check(tokens: &str, headers: &[(&str, &str)]) -> Result<(), VerifyError> {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        verify(&Secrets::from_list(tokens), &map)
    }

    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], Result<(), VerifyError>);

    #[test]
    fn table() {
        let cases: &[Case] = &[
            ("tok", &[("authorization", "Bearer tok")], Ok(())),
            ("tok", &[("authorization", "bearer  tok ")], Ok(())),
            ("tok", &[("x-relay-token", "tok")], Ok(())),
            ("new,tok", &[("x-relay-token", "tok")], Ok(())),
            (
                "tok",
                &[("x-relay-token", "tok2")],
                Err(VerifyError::BadToken),
            ),
            ("tok", &[("x-relay-token", "")], Err(VerifyError::BadToken)),
            (
                "tok",
                &[("authorization", "Basic tok")],
                Err(VerifyError::Malformed(AUTHORIZATION.into())),
            ),
            (
                "tok",
                &[("authorization", "tok")],
                Err(VerifyError::Malformed(AUTHORIZATION.into())),
            ),
            (
                "tok",
                &[("x-relay-token", "tok"), ("x-relay-token", "tok")],
                Err(VerifyError::Repeated(RELAY_TOKEN.into())),
            ),
            (
                "tok",
                &[],
                Err(VerifyError::Missing(
                    "Authorization or X-Relay-Token".into(),
                )),
            ),
            ("", &[("x-relay-token", "tok")], Err(VerifyError::BadToken)),
        ];
        for (i, (tokens, headers, want)) in cases.iter().enumerate() {
            assert_eq!(&check(tokens, headers), want, "case {i}");
        }
    }
}
