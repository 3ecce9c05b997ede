//! The receiver: the axum router and the webhook handler. It verifies, maps, stores and
//! answers the sender; it never calls P0 (the worker does, from the store).

mod accept;
mod answer;
pub mod body;
pub mod budget;
pub mod reload;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Instant;

use arc_swap::ArcSwap;
use axum::Router;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::sync::Notify;

use crate::config::InboundSettings;
use crate::health::Health;
use crate::mapping::{Input, Mapping, MappingSet, Verdict};
use crate::metrics::{Metrics, UNKNOWN_SOURCE};
use crate::ratelimit::KeyedLimit;
use crate::server::conns::ConnHandle;
use crate::store::audit::{self, Received};
use crate::store::{StoreHandle, now_ms};
use answer::Answer;
pub use budget::Budget;

/// What the handlers share.
pub struct Receiver {
    pub mappings: Arc<ArcSwap<MappingSet>>,
    pub store: StoreHandle,
    pub metrics: Metrics,
    pub inbound: InboundSettings,
    pub limits: KeyedLimit,
    pub wake: Arc<Notify>,
    pub health: Arc<Health>,
    pub store_payloads: bool,
    /// What bodies not yet verified may hold together.
    pub budget: Arc<Budget>,
}

/// The relay's HTTP interface; `/metrics` is left off when it has a listener of its own.
pub fn router(receiver: Arc<Receiver>, with_metrics: bool) -> Router {
    let mut router = Router::new()
        .route("/webhooks/{source}", post(webhook))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz));
    if with_metrics {
        router = router.route("/metrics", get(metrics));
    }
    router.with_state(receiver)
}

/// The router of the separate metrics listener: `/metrics`, and `/healthz` and `/readyz` as
/// on the main listener, so that probes need no place among the senders' connections.
pub fn metrics_router(receiver: Arc<Receiver>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(receiver)
}

async fn healthz() -> Response {
    Answer::new(StatusCode::OK, "ok").into_response()
}

async fn metrics(State(r): State<Arc<Receiver>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        r.metrics.render(),
    )
        .into_response()
}

async fn readyz(State(r): State<Arc<Receiver>>) -> Response {
    let (mut problems, reload_error) = r.health.problems();
    let sources: Vec<String> = r.mappings.load().mappings.keys().cloned().collect();
    if sources.is_empty() {
        problems.push("no mappings loaded".into());
    }
    let status = if problems.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let token = r.health.token();
    let body = serde_json::json!({
        "ready": problems.is_empty(),
        "problems": problems,
        "sources": sources,
        "last_reload_error": reload_error,
        // Shown, not a reason to be unready: deliveries are still stored durably.
        "p0_token": token,
        "warnings": if token == "rejected" {
            vec!["P0 rejected the API token (401): fix P0_API_TOKEN, then replay the dead-lettered decisions (p0-relay jobs replay --dead)"]
        } else {
            Vec::new()
        },
    });
    (status, axum::Json(body)).into_response()
}

async fn webhook(
    State(r): State<Arc<Receiver>>,
    Path(source): Path<String>,
    request: Request,
) -> Response {
    // The connection is not closed for another while this request is answered (once it
    // has arrived whole), until its answer is written.
    let in_progress = request
        .extensions()
        .get::<ConnHandle>()
        .map(ConnHandle::request);
    // In a task of its own: a sender that hangs up cannot cancel a delivery half-way, between
    // its commit and its count in the metrics and the log.
    let response = match tokio::spawn(process(r, source, request)).await {
        Ok(response) => response,
        Err(_) => Answer::new(StatusCode::INTERNAL_SERVER_ERROR, "unavailable")
            .reason("internal error".into())
            .into_response(),
    };
    response.map(|body| {
        axum::body::Body::new(Answered {
            body,
            _in_progress: in_progress,
        })
    })
}

/// An answer's body, holding its request in progress on its connection until written.
struct Answered {
    body: axum::body::Body,
    _in_progress: Option<crate::server::conns::Request>,
}

impl axum::body::HttpBody for Answered {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

async fn process(r: Arc<Receiver>, source: String, request: Request) -> Response {
    let started = Instant::now();
    let mappings = r.mappings.load_full();
    let known = mappings.get(&source);
    let (label, answer) = match known {
        // Every unknown source shares one limit, so guessing names buys no extra budget.
        None => match rate_limited(&r.limits, UNKNOWN_LIMIT_KEY) {
            Some(limited) => (
                UNKNOWN_SOURCE,
                limited.reason(
                    "more than the configured webhooks per second to unknown sources".into(),
                ),
            ),
            None => (
                UNKNOWN_SOURCE,
                Answer::new(StatusCode::NOT_FOUND, "unknown_source")
                    .reason(format!(
                        "no mapping for source `{}`",
                        crate::domain::printable(&source)
                    ))
                    .outcome("invalid"),
            ),
        },
        Some(mapping) => {
            let peer = request
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map(|ConnectInfo(a)| a.ip());
            (
                mapping.source.as_str(),
                handle(&r, mapping, peer, request).await,
            )
        }
    };
    let outcome = answer.outcome_label();
    r.metrics
        .webhooks
        .with_label_values(&[label, outcome])
        .inc();
    r.metrics
        .webhook_duration
        .with_label_values(&[label])
        .observe(started.elapsed().as_secs_f64());
    // Anyone can post to any name: lines about unknown sources are sampled so that a flood
    // cannot flood the log as well.
    let suppressed = if known.is_none() {
        match UNKNOWN_LOG.admit(now_ms()) {
            Some(suppressed) => suppressed,
            None => return answer.into_response(),
        }
    } else {
        0
    };
    tracing::info!(
        source = label,
        delivery = answer.delivery.as_deref().unwrap_or(""),
        outcome,
        status = answer.status.as_u16(),
        rule = answer.rule.as_deref().unwrap_or(""),
        job_ids = ?answer.job_ids_all(),
        reason = answer.reason.as_deref().unwrap_or(""),
        duration_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        suppressed,
        "webhook"
    );
    answer.into_response()
}

/// The limiter key all unknown sources share (a mapping file name cannot contain `/`).
const UNKNOWN_LIMIT_KEY: &str = "/unknown";

/// The 429 answer when `key` is over its limit.
fn rate_limited(limits: &KeyedLimit, key: &str) -> Option<Answer> {
    let wait = limits.check(key).err()?;
    let secs = wait
        .as_secs()
        .saturating_add(u64::from(wait.subsec_nanos() > 0))
        .max(1);
    Some(Answer::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited").retry_after(secs))
}

/// Lets at most one log line a second through and counts the rest.
struct LogSampler {
    next_ms: AtomicI64,
    suppressed: AtomicU64,
}

static UNKNOWN_LOG: LogSampler = LogSampler::new();

impl LogSampler {
    const fn new() -> LogSampler {
        LogSampler {
            next_ms: AtomicI64::new(i64::MIN),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(lines left out since the last one)` when a line may be written now.
    fn admit(&self, now_ms: i64) -> Option<u64> {
        let next = self.next_ms.load(Ordering::Relaxed);
        if now_ms >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now_ms.saturating_add(1000),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// The address to judge the sender by: the peer, or the last entry of the trusted proxy
/// header when one is configured (the proxy appends the address it saw, so only the last entry
/// is the proxy's word; everything before it came from the client). `None`, and so a refusal,
/// when that last entry is not an address.
fn client_ip(
    inbound: &InboundSettings,
    headers: &HeaderMap,
    peer: Option<IpAddr>,
) -> Option<IpAddr> {
    match &inbound.client_ip_header {
        None => peer,
        Some(name) => {
            let last = headers.get_all(name).iter().next_back()?;
            let entry = last.to_str().ok()?.rsplit(',').next()?;
            parse_forwarded_ip(entry.trim())
        }
    }
}

/// One address as proxies write it: `ip`, `ip:port` or `[v6]:port`.
fn parse_forwarded_ip(entry: &str) -> Option<IpAddr> {
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|a| a.ip()))
}

async fn handle(r: &Receiver, mapping: &Mapping, peer: Option<IpAddr>, request: Request) -> Answer {
    let source = mapping.source.as_str();
    let (parts, body) = request.into_parts();
    let client = client_ip(&r.inbound, &parts.headers, peer);
    if let Some(refused) = refusal(r, source, client) {
        return refused;
    }
    let pace = body::Pace::of(&r.inbound);
    // The sender its share of the budget is judged by; with a proxy header that names no
    // address, all such share one.
    let address = client.unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let read = body::read(&parts.headers, body, &pace, &r.budget, address, &r.metrics).await;
    let (bytes, lease) = match read {
        Ok(b) => b,
        Err(answer) => return answer,
    };
    // Whole: its connection is not closed for another until it is answered (unless it was
    // chosen already, when the answer could not be written anyway).
    if parts
        .extensions
        .get::<ConnHandle>()
        .is_some_and(|c| !c.complete())
    {
        return Answer::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable")
            .reason("the connection was closed for another".into())
            .retry_after(1);
    }
    let verified = mapping.verifier.verify(&parts.headers, &bytes);
    drop(lease);
    if let Err(e) = verified {
        return Answer::new(StatusCode::UNAUTHORIZED, "unauthorized").reason(e.to_string());
    }
    let depth = r.inbound.max_json_depth;
    let value = match body::parse_projected(&parts.headers, &bytes, depth, mapping.projection()) {
        Ok(v) => v,
        Err(reason) => return Answer::new(StatusCode::BAD_REQUEST, "invalid").reason(reason),
    };
    let input = Input {
        headers: &parts.headers,
        body: &value,
    };
    let delivery = mapping.dedup_key(input, &bytes);
    if let Some(cut) = mapping.truncated(input).filter(|n| *n > 0) {
        note_truncated(r, source, &delivery, cut);
    }
    match mapping.decide(input, Some(std::time::SystemTime::now())) {
        Verdict::Ignored => Answer::new(StatusCode::OK, "ignored")
            .reason("no rule matched".into())
            .delivery(delivery),
        Verdict::Rejected {
            rule,
            reason,
            actor,
            asked,
        } => {
            let received = Received {
                source,
                rule: &rule,
                actor: actor.as_deref(),
                delivery: &delivery,
            };
            let events = audit::refused_on_receipt(&received, &reason, &asked);
            // Recorded before it is answered, as a decision is.
            if let Err(e) = r.store.record_events(events).await {
                return accept::unavailable(r, source, &e);
            }
            Answer::new(StatusCode::OK, "rejected")
                .rule(rule)
                .reason(reason)
                .delivery(delivery)
        }
        decided @ Verdict::Decided { .. } => {
            let payload = r.store_payloads.then(|| bytes.to_vec());
            accept::store(r, source, delivery, payload, decided).await
        }
    }
}

/// The answer to a sender that may not deliver to `source` now: its address is not among
/// the source's networks (when it has some), or it is over its rate.
fn refusal(r: &Receiver, source: &str, client: Option<IpAddr>) -> Option<Answer> {
    if let Some(nets) = r.inbound.networks.get(source) {
        let allowed = client.is_some_and(|ip| nets.iter().any(|n| n.contains(&ip)));
        if !allowed {
            return Some(
                Answer::new(StatusCode::FORBIDDEN, "unauthorized")
                    .reason("sender address is not allowed for this source".into()),
            );
        }
    }
    rate_limited(&r.limits, source).map(|limited| {
        limited.reason(format!(
            "more than the configured webhooks per second for `{source}`"
        ))
    })
}

/// A sender left `cut` elements out of a delivery (Alertmanager's and Grafana's
/// `truncatedAlerts`): an alert resolved among them cannot be revoked by this delivery, only by
/// a later one or by the decision's own expiry. Counted always; logged at most once a second.
fn note_truncated(r: &Receiver, source: &str, delivery: &str, cut: u64) {
    r.metrics.truncated.with_label_values(&[source]).inc_by(cut);
    if let Some(suppressed) = TRUNCATED_LOG.admit(now_ms()) {
        tracing::warn!(
            source,
            delivery,
            truncated = cut,
            suppressed,
            "the sender left alerts out of this delivery: any of them that resolved is not revoked by it (raise the sender's max_alerts)"
        );
    }
}

static TRUNCATED_LOG: LogSampler = LogSampler::new();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_sampler_lets_one_line_a_second_through_and_counts_the_rest() {
        let s = LogSampler::new();
        assert_eq!(s.admit(10_000), Some(0));
        assert_eq!(s.admit(10_001), None);
        assert_eq!(s.admit(10_999), None);
        assert_eq!(s.admit(11_000), Some(2));
        assert_eq!(s.admit(11_500), None);
        // No overflow at the end of time.
        assert_eq!(s.admit(i64::MAX), Some(1));
    }

    #[test]
    fn forwarded_addresses_in_the_forms_proxies_write() {
        let cases = [
            ("127.0.0.2", Some("127.0.0.2")),
            ("127.0.0.2:4711", Some("127.0.0.2")),
            ("2001:db8::1", Some("2001:db8::1")),
            ("[2001:db8::1]:443", Some("2001:db8::1")),
            ("[2001:db8::1]", None),
            ("127.0.0.2:99999", None),
            ("unknown", None),
            ("", None),
        ];
        for (text, want) in cases {
            let want: Option<IpAddr> = want.map(|w| w.parse().unwrap());
            assert_eq!(parse_forwarded_ip(text), want, "{text}");
        }
    }
}
