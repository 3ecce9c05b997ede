//! `X-PagerDuty-Signature` verification (several `v1=` entries, several header lines) on
//! arbitrary headers and bodies. The first byte decides whether the target adds a correct
//! signature itself. Checks: no panic, accepted only with a real HMAC of a configured secret
//! in some `v1=` entry, a correct signature alone is always accepted.
#![no_main]

mod common;

use axum::http::HeaderValue;
use libfuzzer_sys::fuzz_target;
use p0_relay::secret::Secrets;
use p0_relay::verify::{sign_hex, verify_pagerduty};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let (mut headers, body) = common::split_request(rest);
    let secrets = Secrets::from_list(&common::SECRETS.join(","));
    let fuzzed_sig = headers.contains_key("x-pagerduty-signature");
    if flags & 1 == 1 {
        let secret = common::SECRETS[usize::from(flags >> 1 & 1)];
        let value = format!("v1={}", sign_hex(secret, body));
        headers.append(
            "x-pagerduty-signature",
            HeaderValue::from_str(&value).unwrap(),
        );
    }
    let verdict = verify_pagerduty(&secrets, &headers, body);
    if verdict.is_ok() {
        let good: Vec<String> = common::SECRETS
            .iter()
            .map(|s| format!("v1={}", sign_hex(s, body)))
            .collect();
        let found = headers.get_all("x-pagerduty-signature").iter().any(|v| {
            String::from_utf8_lossy(v.as_bytes())
                .split(',')
                .any(|e| good.iter().any(|g| e.trim().eq_ignore_ascii_case(g)))
        });
        assert!(found, "accepted without a valid signature");
    }
    if flags & 1 == 1 && !fuzzed_sig {
        assert!(verdict.is_ok(), "a correct signature was refused: {verdict:?}");
    }
});
