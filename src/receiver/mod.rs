//! The receiver: the axum router and the webhook handler. It verifies, maps, stores and
//! answers the sender; it never calls P0 (the worker does, from the store).

mod answer;
pub mod body;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
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
use crate::mapping::{Element, Input, Mapping, MappingSet, Verdict, element_key};
use crate::metrics::{Metrics, UNKNOWN_SOURCE};
use crate::policy::Decision;
use crate::ratelimit::KeyedLimit;
use crate::store::{Accepted, JobRef, NewDelivery, StoreHandle, now_ms};
use answer::Answer;

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
}

/// The relay's HTTP interface; `/metrics` is left off when it has a listener of its own.
pub fn router(receiver: Arc<Receiver>, with_metrics: bool) -> Router {
    let mut router = Router::new()
        .route("/webhooks/{source}", post(webhook))
        .route(
            "/healthz",
            get(|| async { Answer::new(StatusCode::OK, "ok").into_response() }),
        )
        .route("/readyz", get(readyz));
    if with_metrics {
        router = router.route("/metrics", get(metrics));
    }
    router.with_state(receiver)
}

/// A router serving `/metrics` alone, for a separate listener.
pub fn metrics_router(receiver: Arc<Receiver>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(receiver)
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
    let body = serde_json::json!({
        "ready": problems.is_empty(),
        "problems": problems,
        "sources": sources,
        "last_reload_error": reload_error,
    });
    (status, axum::Json(body)).into_response()
}

async fn webhook(
    State(r): State<Arc<Receiver>>,
    Path(source): Path<String>,
    request: Request,
) -> Response {
    // In a task of its own: a sender that hangs up cannot cancel a delivery half-way, between
    // its commit and its count in the metrics and the log.
    match tokio::spawn(process(r, source, request)).await {
        Ok(response) => response,
        Err(_) => Answer::new(StatusCode::INTERNAL_SERVER_ERROR, "unavailable")
            .reason("internal error".into())
            .into_response(),
    }
}

async fn process(r: Arc<Receiver>, source: String, request: Request) -> Response {
    let started = Instant::now();
    let mappings = r.mappings.load_full();
    let (label, answer) = match mappings.get(&source) {
        None => (
            UNKNOWN_SOURCE,
            Answer::new(StatusCode::NOT_FOUND, "unknown_source")
                .reason(format!(
                    "no mapping for source `{}`",
                    crate::domain::printable(&source)
                ))
                .outcome("invalid"),
        ),
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
    tracing::info!(
        source = label,
        delivery = answer.delivery.as_deref().unwrap_or(""),
        outcome,
        status = answer.status.as_u16(),
        rule = answer.rule.as_deref().unwrap_or(""),
        job_ids = ?answer.job_ids_all(),
        reason = answer.reason.as_deref().unwrap_or(""),
        duration_us = started.elapsed().as_micros() as u64,
        "webhook"
    );
    answer.into_response()
}

/// The address to judge the sender by: the peer, or the last address of the trusted proxy
/// header when one is configured.
fn client_ip(
    inbound: &InboundSettings,
    headers: &HeaderMap,
    peer: Option<IpAddr>,
) -> Option<IpAddr> {
    match &inbound.client_ip_header {
        None => peer,
        Some(name) => headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|s| s.trim().parse().ok())
            .next_back(),
    }
}

async fn handle(r: &Receiver, mapping: &Mapping, peer: Option<IpAddr>, request: Request) -> Answer {
    let source = mapping.source.as_str();
    let (parts, body) = request.into_parts();
    if let Some(nets) = r.inbound.networks.get(source) {
        let allowed = client_ip(&r.inbound, &parts.headers, peer)
            .is_some_and(|ip| nets.iter().any(|n| n.contains(&ip)));
        if !allowed {
            return Answer::new(StatusCode::FORBIDDEN, "unauthorized")
                .reason("sender address is not allowed for this source".into());
        }
    }
    if let Err(wait) = r.limits.check(source) {
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        return Answer::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited")
            .reason(format!(
                "more than the configured webhooks per second for `{source}`"
            ))
            .retry_after(secs);
    }
    let bytes = match body::read(
        &parts.headers,
        body,
        r.inbound.max_body_bytes,
        r.inbound.read_timeout,
    )
    .await
    {
        Ok(b) => b,
        Err(answer) => return answer,
    };
    if let Err(e) = mapping.verifier.verify(&parts.headers, &bytes) {
        return Answer::new(StatusCode::UNAUTHORIZED, "unauthorized").reason(e.to_string());
    }
    let value = match body::parse_projected(
        &parts.headers,
        &bytes,
        r.inbound.max_json_depth,
        mapping.projection(),
    ) {
        Ok(v) => v,
        Err(reason) => return Answer::new(StatusCode::BAD_REQUEST, "invalid").reason(reason),
    };
    let input = Input {
        headers: &parts.headers,
        body: &value,
    };
    let delivery = mapping.dedup_key(input, &bytes);
    match mapping.decide(input, Some(std::time::SystemTime::now())) {
        Verdict::Ignored => Answer::new(StatusCode::OK, "ignored")
            .reason("no rule matched".into())
            .delivery(delivery),
        Verdict::Rejected { rule, reason } => Answer::new(StatusCode::OK, "rejected")
            .rule(rule)
            .reason(reason)
            .delivery(delivery),
        Verdict::Decided {
            rule,
            actor,
            decisions,
            elements,
        } => {
            let new = NewDelivery {
                source: source.to_owned(),
                dedup_key: delivery.clone(),
                received_at_ms: now_ms(),
                rule: rule.clone(),
                actor,
                payload: r.store_payloads.then(|| bytes.to_vec()),
                decisions,
            };
            let units = split(new, &elements);
            // Each unit's decisions, for the answer (the units themselves go to the store).
            let shares: Vec<Vec<Decision>> = units.iter().map(|u| u.decisions.clone()).collect();
            match r.store.accept_each(units).await {
                Ok(results) => {
                    r.health.set_store_error(None);
                    accepted(r, source, rule, delivery, shares, results)
                }
                Err(e) => {
                    tracing::error!(source, error = %e, "cannot store a delivery");
                    r.health.set_store_error(Some(e.to_string()));
                    Answer::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable")
                        .reason("the relay cannot store decisions right now; retry later".into())
                        .retry_after(5)
                }
            }
        }
    }
}

/// The deliveries to store: the webhook whole, or one per `for_each` element, each under its
/// own dedup key (the delivery's key and the element's), so each is deduplicated on its own.
fn split(new: NewDelivery, elements: &[Element]) -> Vec<NewDelivery> {
    if elements.is_empty() {
        return vec![new];
    }
    let mut rest = new.decisions.into_iter();
    elements
        .iter()
        .map(|e| NewDelivery {
            source: new.source.clone(),
            dedup_key: element_key(&new.dedup_key, &e.key),
            received_at_ms: new.received_at_ms,
            rule: new.rule.clone(),
            actor: e.actor.clone(),
            payload: new.payload.clone(),
            decisions: rest.by_ref().take(e.decisions).collect(),
        })
        .collect()
}

/// The answer once every unit is stored: `duplicate` when all were seen before, else
/// `accepted` with every decision (a duplicate element's decisions as `coalesced`: no second
/// call is made for them).
fn accepted(
    r: &Receiver,
    source: &str,
    rule: String,
    delivery: String,
    shares: Vec<Vec<Decision>>,
    results: Vec<Accepted>,
) -> Answer {
    if results
        .iter()
        .all(|a| matches!(a, Accepted::Duplicate { .. }))
    {
        let job_ids = results
            .into_iter()
            .flat_map(|a| match a {
                Accepted::Duplicate { job_ids } => job_ids,
                Accepted::New { .. } => Vec::new(),
            })
            .collect();
        return Answer::new(StatusCode::OK, "duplicate")
            .delivery(delivery)
            .reason("this delivery was accepted before".into())
            .job_ids(job_ids);
    }
    r.wake.notify_one();
    let mut decisions = Vec::new();
    let mut jobs = Vec::new();
    for (share, result) in shares.into_iter().zip(results) {
        match result {
            Accepted::New { jobs: refs } => {
                for d in &share {
                    r.metrics
                        .decisions
                        .with_label_values(&[source, d.action.as_str()])
                        .inc();
                }
                jobs.extend(refs);
            }
            Accepted::Duplicate { job_ids } => {
                jobs.extend(job_ids.into_iter().map(|job_id| JobRef {
                    job_id,
                    coalesced: true,
                }))
            }
        }
        decisions.extend(share);
    }
    Answer::new(StatusCode::ACCEPTED, "accepted")
        .rule(rule)
        .delivery(delivery)
        .decisions(&decisions, &jobs)
}
