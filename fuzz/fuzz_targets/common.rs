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
