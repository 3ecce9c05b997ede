//! The mapping-described `hmac` scheme (`verify::HmacHeader`, as Grafana's contact point signs)
//! on arbitrary headers and bodies. Flag bits: 0 the target signs the body itself, 1 which
//! secret, 2 a signed timestamp (`{timestamp}:{body}`), 3 base64 instead of hex, 4 a
//! `sha256=` prefix. Checks: no panic; accepted only when a header entry is a real signature
//! of a configured secret (with the timestamp header's value when one is signed); a correct
//! signature is always accepted.
#![no_main]

mod common;

use axum::http::{HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use p0_relay::secret::Secrets;
use p0_relay::verify::{Algorithm, Encoding, HmacHeader, Template};

const NOW: i64 = 1_764_288_000;
const SIGNATURE: &str = "x-grafana-alerting-signature";
const TIMESTAMP: &str = "x-grafana-alerting-timestamp";

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let (mut headers, body) = common::split_request(rest);
    let timed = flags & 4 != 0;
    let verifier = HmacHeader {
        headers: vec![
            HeaderName::from_static(SIGNATURE),
            HeaderName::from_static("x-grafana-alert-signature"),
        ],
        algorithm: Algorithm::parse("sha256").unwrap(),
        encoding: Encoding::parse(if flags & 8 != 0 { "base64" } else { "hex" }).unwrap(),
        prefix: if flags & 16 != 0 { "sha256=".into() } else { String::new() },
        timestamp: timed.then(|| (HeaderName::from_static(TIMESTAMP), 300)),
        message: Template::parse(if timed { "{timestamp}:{body}" } else { "{body}" }).unwrap(),
        secrets: Secrets::from_list(&common::SECRETS.join(",")),
    };
    let fuzzed = headers.contains_key(SIGNATURE)
        || headers.contains_key("x-grafana-alert-signature")
        || (timed && headers.contains_key(TIMESTAMP));
    if flags & 1 == 1 {
        let secret = common::SECRETS[usize::from(flags >> 1 & 1)];
        let ts = NOW.to_string();
        if timed && !headers.contains_key(TIMESTAMP) {
            headers.insert(TIMESTAMP, HeaderValue::from_str(&ts).unwrap());
        }
        let value = verifier.sign(secret, if timed { &ts } else { "" }, body);
        headers.append(SIGNATURE, HeaderValue::from_str(&value).unwrap());
    }
    let verdict = verifier.verify(&headers, body, NOW);
    if let Ok(v) = &verdict {
        let name = v.header.clone().unwrap();
        let ts = headers
            .get(TIMESTAMP)
            .and_then(|t| t.to_str().ok())
            .map(str::trim)
            .unwrap_or("");
        let text: Vec<String> = headers
            .get_all(name.as_str())
            .iter()
            .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
            .collect();
        let text = text.join(",");
        let signed = |s: &str| verifier.sign(s, if timed { ts } else { "" }, body);
        assert!(
            common::SECRETS.iter().any(|s| {
                let want = signed(s);
                text.contains(&want) || text.to_ascii_lowercase().contains(&want.to_ascii_lowercase()) && flags & 8 == 0
            }),
            "accepted without a valid signature: {text}"
        );
    }
    if flags & 1 == 1 && !fuzzed {
        assert!(verdict.is_ok(), "a correct signature was refused: {verdict:?}");
    }
});
