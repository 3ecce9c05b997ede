//! HTTP basic authentication (`Authorization: Basic base64(user:password)`), for senders that
//! offer it (Alertmanager's `basic_auth`, Grafana): the user and the passwords come from the
//! environment; several passwords for rotation; compared in constant time through digests.

use axum::http::HeaderMap;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{Verified, VerifyError, first_match, single_header};
use crate::secret::{Secret, Secrets};

const AUTHORIZATION: &str = "authorization";

#[derive(Debug, Clone)]
pub struct Basic {
    pub username: Secret,
    pub passwords: Secrets,
}

impl Basic {
    pub fn verify(&self, headers: &HeaderMap) -> Result<Verified, VerifyError> {
        let malformed = || VerifyError::Malformed("Authorization".into());
        let value = single_header(headers, AUTHORIZATION).map_err(|e| match e {
            VerifyError::Missing(_) => VerifyError::Missing("Authorization".into()),
            other => other,
        })?;
        let (scheme, rest) = value.trim().split_once(' ').ok_or_else(malformed)?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return Err(malformed());
        }
        let decoded = STANDARD.decode(rest.trim()).map_err(|_| malformed())?;
        let text = String::from_utf8(decoded).map_err(|_| malformed())?;
        let (user, password) = text.split_once(':').ok_or_else(malformed)?;
        // Digests make each comparison independent of both lengths.
        let user_ok = Sha256::digest(user.as_bytes())
            .as_slice()
            .ct_eq(Sha256::digest(self.username.expose().as_bytes()).as_slice());
        let got = Sha256::digest(password.as_bytes());
        let index = first_match(&self.passwords, |p| {
            bool::from(
                got.as_slice()
                    .ct_eq(Sha256::digest(p.expose().as_bytes()).as_slice()),
            )
        });
        match index {
            Some(i) if bool::from(user_ok) && !password.is_empty() => Ok(Verified {
                scheme: "basic",
                header: Some("Authorization".into()),
                secret: Some(i),
            }),
            _ => Err(VerifyError::BadCredentials),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn check(passwords: &str, values: &[&str]) -> Result<Option<usize>, VerifyError> {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        }
        Basic {
            username: Secret::new("alertmanager"),
            passwords: Secrets::from_list(passwords),
        }
        .verify(&h)
        .map(|v| v.secret)
    }

    fn basic(user: &str, password: &str) -> String {
        format!("Basic {}", STANDARD.encode(format!("{user}:{password}")))
    }

    /// Name, configured passwords, `Authorization` values, the secret position or the refusal.
    type Case<'a> = (
        &'a str,
        &'a str,
        Vec<&'a str>,
        Result<Option<usize>, VerifyError>,
    );

    #[test]
    fn hostile_table() {
        let good = basic("alertmanager", "pw-old");
        let (mallory, empty, colon) = (
            basic("mallory", "pw-old"),
            basic("alertmanager", ""),
            basic("alertmanager", "pw:old"),
        );
        let no_colon = format!("Basic {}", STANDARD.encode("pw-old"));
        let malformed = Err(VerifyError::Malformed("Authorization".into()));
        let cases: Vec<Case> = vec![
            ("good", "pw-old", vec![&good], Ok(Some(0))),
            (
                "rotation: the older password",
                "pw-new,pw-old",
                vec![&good],
                Ok(Some(1)),
            ),
            (
                "wrong password",
                "pw-new",
                vec![&good],
                Err(VerifyError::BadCredentials),
            ),
            (
                "wrong user",
                "pw-old",
                vec![&mallory],
                Err(VerifyError::BadCredentials),
            ),
            (
                "empty password",
                "pw-old",
                vec![&empty],
                Err(VerifyError::BadCredentials),
            ),
            ("password with a colon", "pw:old", vec![&colon], Ok(Some(0))),
            (
                "bearer instead",
                "pw-old",
                vec!["Bearer pw-old"],
                malformed.clone(),
            ),
            ("not base64", "pw-old", vec!["Basic !!!"], malformed.clone()),
            ("no colon", "pw-old", vec![&no_colon], malformed.clone()),
            ("empty header", "pw-old", vec![""], malformed.clone()),
            (
                "two headers",
                "pw-old",
                vec![&good, &good],
                Err(VerifyError::Repeated("authorization".into())),
            ),
            (
                "missing",
                "pw-old",
                vec![],
                Err(VerifyError::Missing("Authorization".into())),
            ),
        ];
        for (name, passwords, values, want) in cases {
            assert_eq!(check(passwords, &values), want, "{name}");
        }
    }
}
