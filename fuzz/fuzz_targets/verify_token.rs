//! Shared-token verification (`Authorization: Bearer`, `X-Relay-Token`) on arbitrary headers.
//! The first byte decides whether the target presents a configured token itself. Checks: no
//! panic, accepted only when the presented token is a configured one, a configured token
//! alone is always accepted.
#![no_main]

mod common;

use axum::http::HeaderValue;
use libfuzzer_sys::fuzz_target;
use p0_relay::secret::Secrets;
use p0_relay::verify::verify_token;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let (mut headers, _) = common::split_request(rest);
    let tokens = Secrets::from_list(&common::SECRETS.join(","));
    let fuzzed = headers.contains_key("authorization") || headers.contains_key("x-relay-token");
    if flags & 1 == 1 {
        let token = common::SECRETS[usize::from(flags >> 1 & 1)];
        let (name, value) = if flags & 4 == 0 {
            ("authorization", format!("Bearer {token}"))
        } else {
            ("x-relay-token", token.to_owned())
        };
        headers.append(name, HeaderValue::from_str(&value).unwrap());
    }
    let verdict = verify_token(&tokens, &headers);
    if verdict.is_ok() {
        let presented = match headers.get("x-relay-token") {
            Some(v) => v.to_str().unwrap().trim().to_owned(),
            None => {
                let v = headers
                    .get("authorization")
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .trim();
                v.split_once(' ').unwrap().1.trim().to_owned()
            }
        };
        assert!(
            common::SECRETS.contains(&presented.as_str()),
            "accepted a token that is not configured"
        );
    }
    if flags & 1 == 1 && !fuzzed {
        assert_eq!(verdict, Ok(()), "a configured token was refused");
    }
});
