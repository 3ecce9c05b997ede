//! Shared by the fuzz targets: a webhook written as text (`Name: value` lines, a blank line,
//! then the body), the secrets the verifier targets are configured with, and a JSON depth.
#![allow(dead_code)]

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;

/// The secrets every verifier target is configured with (a rotation: newest first).
pub const SECRETS: [&str; 2] = ["fuzz-secret-new", "fuzz-secret-old"];

/// Headers and body of `data`: the lines before the first blank line are headers (lines that
/// are not valid headers are skipped), the rest is the body. No blank line: all body.
pub fn split_request(data: &[u8]) -> (HeaderMap, &[u8]) {
    let mut headers = HeaderMap::new();
    let Some(at) = data.windows(2).position(|w| w == b"\n\n") else {
        return (headers, data);
    };
    for line in data[..at].split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let value = &line[colon + 1..];
        let value = value.strip_prefix(b" ").unwrap_or(value);
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(value),
        ) {
            headers.append(k, v);
        }
    }
    (headers, &data[at + 2..])
}

/// How deeply arrays and objects nest in a parsed document (a scalar is 0).
pub fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// The variables every shipped mapping needs, set to stand-ins (`octocat` approves on GitHub).
pub fn env() -> p0_relay::config::env::Env {
    let vars: std::collections::HashMap<String, String> = [
        ("GITHUB_WEBHOOK_SECRET", "s"),
        ("PAGERDUTY_WEBHOOK_SECRET", "s"),
        ("OPSGENIE_WEBHOOK_TOKEN", "s"),
        ("JSM_WEBHOOK_TOKEN", "s"),
        ("ALERTMANAGER_WEBHOOK_TOKEN", "s"),
        ("GRAFANA_WEBHOOK_SECRET", "s"),
        ("INCIDENTIO_WEBHOOK_SECRET", "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"),
        ("GITHUB_APPROVERS", "octocat"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    p0_relay::config::env::Env::default().overlay(&vars)
}

/// The relay's defaults with every source served.
pub fn defaults() -> p0_relay::mapping::Defaults {
    use p0_relay::domain::Expiration;
    p0_relay::mapping::Defaults {
        org: "acme".into(),
        expiration: Expiration::parse("1h").unwrap(),
        max_expiration: Some(Expiration::parse("12h").unwrap()),
        sources: p0_relay::mapping::Enabled::All,
    }
}

/// Every shipped mapping (`mappings/*.yaml`), loaded once by the real loader.
pub fn mappings() -> &'static p0_relay::mapping::MappingSet {
    static SET: std::sync::OnceLock<p0_relay::mapping::MappingSet> = std::sync::OnceLock::new();
    SET.get_or_init(|| {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../mappings");
        p0_relay::mapping::MappingSet::load(&dir, &env(), &defaults()).unwrap()
    })
}
