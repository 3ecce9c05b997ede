//! Reading and parsing a webhook body: a size limit enforced before and while reading, a
//! deadline for slow senders, a nesting-depth limit, and GitHub's form-encoded `payload`.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::Value;

use super::answer::Answer;
use crate::mapping::projection::{ParseError, Projection};

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

/// The JSON document in `bytes`, whole: the body itself, or the `payload` field of a form body.
pub fn parse(headers: &HeaderMap, bytes: &[u8], max_depth: usize) -> Result<Value, String> {
    parse_projected(headers, bytes, max_depth, &Projection::full())
}

/// As `parse`, building only what `projection` keeps (a mapping's `projection()`): the whole
/// document is still checked, in the same single pass that enforces `max_depth`.
pub fn parse_projected(
    headers: &HeaderMap,
    bytes: &[u8],
    max_depth: usize,
    projection: &Projection,
) -> Result<Value, String> {
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
    projection.parse(json, max_depth).map_err(|e| match e {
        ParseError::TooDeep => format!("JSON nests deeper than {max_depth} levels"),
        ParseError::Invalid(e) => format!("body is not JSON: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
        // Brackets inside strings are not nesting.
        assert!(parse(&HeaderMap::new(), br#"{"a":[1,{"b":"[[[["}]}"#, 3).is_ok());
        assert!(parse(&HeaderMap::new(), br#"{"a":[1,{"b":[[]]}]}"#, 3).is_err());
        // A form body is projected like a JSON one.
        let projection = Projection::nothing();
        assert_eq!(
            parse_projected(&headers, b"payload=%7B%22a%22%3A1%7D", 64, &projection).unwrap(),
            serde_json::json!({})
        );
    }
}
