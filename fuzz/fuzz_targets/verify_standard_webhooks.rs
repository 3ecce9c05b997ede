//! Standard Webhooks verification (incident.io; `webhook-*` or `svix-*` headers) on arbitrary
//! headers and bodies. Flag bits: 0 the target signs the body itself, 1 which secret, 2 the
//! `svix-` header names. Checks: no panic; accepted only when the signature header carries a
//! real signature of `id.timestamp.body` for a configured secret, with a timestamp within
//! the tolerance, and the other flavour's id (if any) naming the same message; a correct
//! signature is always accepted.
#![no_main]

mod common;

use axum::http::HeaderValue;
use libfuzzer_sys::fuzz_target;
use p0_relay::secret::Secrets;
use p0_relay::verify::{StandardWebhooks, sign_standard_webhooks};

const NOW: i64 = 1_764_288_000;
const SECRETS: [&str; 2] = [
    "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
    "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
];

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let (mut headers, body) = common::split_request(rest);
    let verifier = StandardWebhooks::new(Secrets::from_list(&SECRETS.join(",")), 300).unwrap();
    let prefix = if flags & 4 != 0 { "svix" } else { "webhook" };
    let (id_h, ts_h, sig_h) = (
        format!("{prefix}-id"),
        format!("{prefix}-timestamp"),
        format!("{prefix}-signature"),
    );
    let fuzzed = ["webhook", "svix"].iter().any(|p| {
        ["id", "timestamp", "signature"]
            .iter()
            .any(|n| headers.contains_key(format!("{p}-{n}").as_str()))
    });
    if flags & 1 == 1 {
        let secret = SECRETS[usize::from(flags >> 1 & 1)];
        let id = "msg_2pQ7fuzz";
        let sig = sign_standard_webhooks(secret, id, NOW, body).unwrap();
        headers.insert(id_h.parse::<axum::http::HeaderName>().unwrap(), HeaderValue::from_static(id));
        headers.insert(
            ts_h.parse::<axum::http::HeaderName>().unwrap(),
            HeaderValue::from_str(&NOW.to_string()).unwrap(),
        );
        headers.append(
            sig_h.parse::<axum::http::HeaderName>().unwrap(),
            HeaderValue::from_str(&sig).unwrap(),
        );
    }
    let verdict = verifier.verify(&headers, body, NOW);
    if let Ok(v) = &verdict {
        let sig_name = v.header.clone().unwrap();
        let names = if sig_name.starts_with("svix") { "svix" } else { "webhook" };
        let get = |n: &str| {
            headers
                .get(format!("{names}-{n}").as_str())
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        };
        let (id, ts) = (get("id").unwrap(), get("timestamp").unwrap());
        let other = if names == "svix" { "webhook-id" } else { "svix-id" };
        assert!(
            headers.get_all(other).iter().all(|v| v.as_bytes() == id.as_bytes()),
            "accepted with another message's {other}"
        );
        let at: i64 = ts.trim().parse().expect("accepted with an unparsable timestamp");
        assert!(NOW.abs_diff(at) <= 300, "accepted a stale timestamp {at}");
        let text: Vec<String> = headers
            .get_all(sig_name.as_str())
            .iter()
            .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
            .collect();
        let text = text.join(" ");
        assert!(
            SECRETS.iter().any(|s| {
                let want = sign_standard_webhooks(s, &id, at, body).unwrap();
                text.contains(want.trim_start_matches("v1,"))
            }),
            "accepted without a valid signature: {text}"
        );
    }
    if flags & 1 == 1 && !fuzzed {
        assert!(verdict.is_ok(), "a correct signature was refused: {verdict:?}");
    }
});
