//! HTTP basic authentication (Alertmanager's `basic_auth`) on arbitrary headers. Flag bits:
//! 0 the target adds a correct `Authorization` header, 1 which password. Checks: no panic;
//! accepted only for the configured user with a configured password; a correct header is
//! always accepted.
#![no_main]

mod common;

use axum::http::HeaderValue;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use libfuzzer_sys::fuzz_target;
use p0_relay::secret::{Secret, Secrets};
use p0_relay::verify::Basic;

const USER: &str = "alertmanager";

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let (mut headers, _) = common::split_request(rest);
    let verifier = Basic {
        username: Secret::new(USER),
        passwords: Secrets::from_list(&common::SECRETS.join(",")),
    };
    let fuzzed = headers.contains_key("authorization");
    if flags & 1 == 1 {
        let pw = common::SECRETS[usize::from(flags >> 1 & 1)];
        let value = format!("Basic {}", STANDARD.encode(format!("{USER}:{pw}")));
        headers.append("authorization", HeaderValue::from_str(&value).unwrap());
    }
    let verdict = verifier.verify(&headers);
    if verdict.is_ok() {
        let value = headers.get("authorization").unwrap().to_str().unwrap();
        let (_, encoded) = value.trim().split_once(' ').unwrap();
        let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).unwrap()).unwrap();
        let (user, pw) = decoded.split_once(':').unwrap();
        assert_eq!(user, USER);
        assert!(common::SECRETS.contains(&pw), "accepted password {pw:?}");
    }
    if flags & 1 == 1 && !fuzzed {
        assert!(verdict.is_ok(), "a correct header was refused: {verdict:?}");
    }
});
