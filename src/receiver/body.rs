//! Reading and parsing a webhook body: a size limit enforced before and while reading, a
//! deadline for slow senders, a nesting-depth limit, and GitHub's form-encoded `payload`.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::Value;

use super::answer::Answer;
use super::budget::{Budget, Lease, Short};
use crate::config::InboundSettings;
use crate::mapping::projection::{ParseError, Projection};
use crate::metrics::Metrics;

/// How a body must arrive: its size, and its pace (`inbound.body_timeout` plus a second for
/// each `body_min_rate` bytes arrived, within `read_timeout` in any case).
pub struct Pace {
    pub max: usize,
    pub read_timeout: Duration,
    pub body_timeout: Duration,
    pub min_rate: usize,
}

impl Pace {
    pub fn of(inbound: &InboundSettings) -> Pace {
        Pace {
            max: inbound.max_body_bytes,
            read_timeout: inbound.read_timeout,
            body_timeout: inbound.body_timeout,
            min_rate: inbound.body_min_rate,
        }
    }

    /// The answer to a body that did not keep its pace.
    fn too_slow(&self) -> Answer {
        Answer::new(StatusCode::REQUEST_TIMEOUT, "invalid").reason(format!(
            "body not received in time (it may take {}s, a second more for each {} bytes that arrive, {}s at most)",
            self.body_timeout.as_secs_f64(),
            self.min_rate,
            self.read_timeout.as_secs_f64(),
        ))
    }

    /// How long a body that has `arrived` bytes so far may have taken.
    fn allowed(&self, arrived: usize) -> Duration {
        let earned = Duration::from_secs_f64(arrived as f64 / self.min_rate.max(1) as f64);
        (self.body_timeout + earned).min(self.read_timeout)
    }
}

/// The answer to a body that finds no room in the budget, counted.
fn no_room(short: Short, metrics: &Metrics) -> Answer {
    let answer = match short {
        Short::AddressShare => {
            metrics.inbound_refusal("address_share");
            Answer::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited")
                .reason("this address already has its share of deliveries being received".into())
        }
        Short::Exhausted => {
            metrics.inbound_refusal("body_budget");
            Answer::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable")
                .reason("too many deliveries are being received; try again".into())
        }
    };
    answer.retry_after(1)
}

/// The raw body bytes, assembled once (in a buffer of the declared size), with the budget
/// share they hold until they are verified; or the answer to give instead.
pub async fn read(
    headers: &HeaderMap,
    mut body: Body,
    pace: &Pace,
    budget: &Arc<Budget>,
    address: IpAddr,
    metrics: &Metrics,
) -> Result<(Bytes, Lease), Answer> {
    let max = pace.max;
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
    let mut reserved = declared.map_or(0, |n| n as usize);
    let short = |short| no_room(short, metrics);
    let mut lease = budget.take(address, reserved).map_err(short)?;
    let mut buf: Vec<u8> = Vec::with_capacity(reserved);
    let started = Instant::now();
    loop {
        let deadline = started + pace.allowed(buf.len());
        let frame = tokio::select! {
            biased;
            _ = lease.cut() => {
                return Err(Answer::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable")
                    .reason("body cut off to make room for deliveries that arrive in time".into())
                    .retry_after(1));
            }
            frame = tokio::time::timeout_at(deadline.into(), body.frame()) => frame,
        };
        let data = match frame {
            Err(_) => {
                metrics.inbound_refusal("slow_body");
                return Err(pace.too_slow());
            }
            Ok(None) => break,
            Ok(Some(Err(_))) => {
                return Err(Answer::new(StatusCode::BAD_REQUEST, "invalid")
                    .reason("body could not be read".into()));
            }
            Ok(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue,
            },
        };
        let len = buf.len() + data.len();
        if len > max {
            return Err(too_large());
        }
        // Charged by what the buffer holds (it grows by doubling), not what it uses.
        if len > buf.capacity() {
            buf.reserve(data.len());
        }
        if buf.capacity() > reserved {
            lease.grow(buf.capacity() - reserved).map_err(short)?;
            reserved = buf.capacity();
        }
        buf.extend_from_slice(&data);
    }
    Ok((Bytes::from(buf), lease))
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
