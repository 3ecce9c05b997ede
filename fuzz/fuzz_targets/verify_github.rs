//! `X-Hub-Signature-256` verification on arbitrary headers and bodies. The first byte decides
//! whether the target signs the body itself (so the accepting path is reached too). Checks:
//! it never panics, accepts only when the header carries a real HMAC of a configured secret,
//! and always accepts one correctly signed header.
#![no_main]

mod common;

use axum::http::HeaderValue;
use libfuzzer_sys::fuzz_target;
use p0_relay::secret::Secrets;
use p0_relay::verify::{sign_hex, verify_github};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let (mut headers, body) = common::split_request(rest);
    let secrets = Secrets::from_list(&common::SECRETS.join(","));
    let fuzzed_sig = headers.contains_key("x-hub-signature-256");
    if flags & 1 == 1 {
        let secret = common::SECRETS[usize::from(flags >> 1 & 1)];
        let value = format!("sha256={}", sign_hex(secret, body));
        headers.append(
            "x-hub-signature-256",
            HeaderValue::from_str(&value).unwrap(),
        );
    }
    let verdict = verify_github(&secrets, &headers, body);
    if verdict.is_ok() {
        let header = headers.get("x-hub-signature-256").unwrap().as_bytes();
        let header = String::from_utf8_lossy(header).to_ascii_lowercase();
        assert!(
            common::SECRETS
                .iter()
                .any(|s| header.contains(&sign_hex(s, body))),
            "accepted without a valid signature: {header}"
        );
    }
    if flags & 1 == 1 && !fuzzed_sig {
        assert!(verdict.is_ok(), "a correct signature was refused: {verdict:?}");
    }
});
