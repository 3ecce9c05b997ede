//! Reading and parsing a webhook body: a size limit enforced before and while reading, a
//! deadline for slow senders, a nesting-depth limit, and GitHub's form-encoded `payload`.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::Value;

use super::answer::Answer;

/// The raw body bytes, or the answer to give instead.
pub async fn read(
    headers: &HeaderMap,
    body: Body,
    max: usize,
    deadline: Duration,
) -> Result<Bytes, Answer> {
    let too_large = || {
        Answer::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large")
            .reason(format!("body is larger than {max} bytes"))
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    let limited = http_body_util::Limited::new(body, max);
    match tokio::time::timeout(deadline, limited.collect()).await {
        Err(_) => Err(
            Answer::new(StatusCode::REQUEST_TIMEOUT, "invalid").reason(format!(
                "body not received within {}s",
                deadline.as_secs_f64()
            )),
        ),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(_)) => {
            Err(Answer::new(StatusCode::BAD_REQUEST, "invalid")
                .reason("body could not be read".into()))
        }
    }
}

/// The JSON document in `bytes`: the body itself, or the `payload` field of a form body.
pub fn parse(headers: &HeaderMap, bytes: &[u8], max_depth: usize) -> Result<Value, String> {
    // GitHub's form deliveries carry the JSON in `payload`. A JSON body sent with a form
    // content type (curl's default) is still read as JSON.
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/x-www-form-urlencoded")
        })
        && !matches!(
            bytes.iter().find(|b| !b.is_ascii_whitespace()),
            Some(b'{' | b'[')
        );
    let form_payload;
    let json: &[u8] = if is_form {
        form_payload = serde_urlencoded::from_bytes::<Vec<(String, String)>>(bytes)
            .map_err(|_| "form body could not be decoded".to_owned())?
            .into_iter()
            .find(|(k, _)| k == "payload")
            .map(|(_, v)| v)
            .ok_or_else(|| "form body has no `payload` field".to_owned())?;
        form_payload.as_bytes()
    } else {
        bytes
    };
    let depth = nesting_depth(json);
    if depth > max_depth {
        return Err(format!("JSON nests deeper than {max_depth} levels"));
    }
    serde_json::from_slice(json).map_err(|e| format!("body is not JSON: {e}"))
}

/// The deepest nesting of arrays and objects, counted without parsing (strings skipped).
pub fn nesting_depth(json: &[u8]) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in json {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth() {
        assert_eq!(nesting_depth(br#"{"a":[1,{"b":"[[[["}]}"#), 3);
        assert_eq!(nesting_depth(b"1"), 0);
        assert_eq!(nesting_depth(br#"{"a":"\"{"}"#), 1);
    }

    #[test]
    fn form_bodies() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            "application/x-www-form-urlencoded".parse().unwrap(),
        );
        let v = parse(&headers, b"payload=%7B%22a%22%3A1%7D", 64).unwrap();
        assert_eq!(v["a"], 1);
        assert!(
            parse(&headers, b"other=1", 64)
                .unwrap_err()
                .contains("payload")
        );
        // A JSON body sent with curl's default form content type is still JSON.
        assert_eq!(parse(&headers, b" {\"a\":2}", 64).unwrap()["a"], 2);
        assert!(
            parse(&HeaderMap::new(), b"{\"a\":", 64)
                .unwrap_err()
                .contains("not JSON")
        );
        assert!(
            parse(&HeaderMap::new(), "[".repeat(100).as_bytes(), 64)
                .unwrap_err()
                .contains("deeper")
        );
    }
}
