//! Every metric the relay exports, defined in one place. Labels take values from small fixed
//! sets only, and every known series starts at zero so dashboards never see a gap.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::domain::{Action, Via};

/// Webhook outcomes, as answered to the sender.
pub const OUTCOMES: [&str; 9] = [
    "accepted",
    "ignored",
    "rejected",
    "duplicate",
    "unauthorized",
    "invalid",
    "too_large",
    "rate_limited",
    "unavailable",
];

/// P0 call results.
pub const RESULTS: [&str; 4] = ["success", "rejected", "unauthorized", "transient"];

/// Results of answers back: sent (2xx), retried (a transient failure, tried again), failed
/// (refused for good: 401, 403, 404, 422 and other 4xx), dead (gave up after the max age).
pub const ANSWER_RESULTS: [&str; 4] = ["sent", "retried", "failed", "dead"];

/// The label for requests to a source no mapping names.
pub const UNKNOWN_SOURCE: &str = "unknown";

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub webhooks: IntCounterVec,
    pub webhook_duration: HistogramVec,
    pub decisions: IntCounterVec,
    pub p0_requests: IntCounterVec,
    pub p0_request_duration: HistogramVec,
    pub delivery_lag: Histogram,
    pub queue_depth: IntGauge,
    pub dead_letters: IntGauge,
    pub retries: IntCounter,
    pub mapping_reloads: IntCounterVec,
    pub answers: IntCounterVec,
    pub bound_revocations: IntCounterVec,
    pub refused: IntCounterVec,
    pub truncated: IntCounterVec,
    pub token_rejected: IntGauge,
    pub oncall_checks: IntCounterVec,
    pub oncall_check_duration: HistogramVec,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace("p0_relay")
}

impl Metrics {
    /// Registers every family; `sources` are the mapped sources, for zeroed series.
    pub fn new<'a>(
        sources: impl IntoIterator<Item = &'a str>,
    ) -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let webhooks = IntCounterVec::new(
            opts(
                "webhooks_total",
                "Webhooks received, by source and the answer given.",
            ),
            &["source", "outcome"],
        )?;
        let webhook_duration = HistogramVec::new(
            HistogramOpts::from(opts(
                "webhook_duration_seconds",
                "Time from receipt to answer.",
            ))
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            &["source"],
        )?;
        let decisions = IntCounterVec::new(
            opts(
                "decisions_total",
                "Decisions accepted, by source and action.",
            ),
            &["source", "action"],
        )?;
        let p0_requests = IntCounterVec::new(
            opts("p0_requests_total", "Calls to P0, by action and result."),
            &["action", "result"],
        )?;
        let p0_request_duration = HistogramVec::new(
            HistogramOpts::from(opts(
                "p0_request_duration_seconds",
                "Duration of calls to P0.",
            ))
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["action"],
        )?;
        let delivery_lag = Histogram::with_opts(
            HistogramOpts::from(opts(
                "delivery_lag_seconds",
                "Time from a webhook's acceptance to P0's success.",
            ))
            .buckets(vec![
                0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 1800.0, 3600.0, 21600.0,
            ]),
        )?;
        let queue_depth =
            IntGauge::with_opts(opts("queue_depth", "Decisions waiting to reach P0."))?;
        let dead_letters = IntGauge::with_opts(opts(
            "dead_letters",
            "Decisions that gave up on P0 and wait for a replay.",
        ))?;
        let retries = IntCounter::with_opts(opts(
            "retries_total",
            "Calls to P0 scheduled again after a transient failure.",
        ))?;
        let mapping_reloads = IntCounterVec::new(
            opts("mapping_reloads_total", "Mapping reloads, by result."),
            &["result"],
        )?;
        let answers = IntCounterVec::new(
            opts(
                "answers_total",
                "Answers back to the provider where a decision was asked, by provider and result.",
            ),
            &["source", "result"],
        )?;
        let bound_revocations = IntCounterVec::new(
            opts(
                "bound_revocations_total",
                "Revocations made because the subject a request was approved under ended.",
            ),
            &["source"],
        )?;
        let refused = IntCounterVec::new(
            opts(
                "refused_total",
                "Decisions refused as they were stored (their subject had ended), by source.",
            ),
            &["source"],
        )?;
        let truncated = IntCounterVec::new(
            opts(
                "truncated_alerts_total",
                "Alerts a sender left out of its deliveries (truncatedAlerts): their ends cannot be acted on.",
            ),
            &["source"],
        )?;
        let token_rejected = IntGauge::with_opts(opts(
            "p0_token_rejected",
            "1 while P0's latest answer rejected the API token (401), else 0.",
        ))?;
        let oncall_checks = IntCounterVec::new(
            opts(
                "oncall_checks_total",
                "On-call checks of gated approves, by provider and result (on_call, not_on_call, failed).",
            ),
            &["provider", "result"],
        )?;
        let oncall_check_duration = HistogramVec::new(
            HistogramOpts::new(
                "oncall_check_duration_seconds",
                "Duration of on-call checks, cached answers included.",
            )
            .namespace("p0_relay")
            .buckets(vec![
                0.0005, 0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["provider"],
        )?;
        let build_info = IntGaugeVec::new(opts("build_info", "The running build."), &["version"])?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        registry.register(Box::new(webhooks.clone()))?;
        registry.register(Box::new(webhook_duration.clone()))?;
        registry.register(Box::new(decisions.clone()))?;
        registry.register(Box::new(p0_requests.clone()))?;
        registry.register(Box::new(p0_request_duration.clone()))?;
        registry.register(Box::new(delivery_lag.clone()))?;
        registry.register(Box::new(queue_depth.clone()))?;
        registry.register(Box::new(dead_letters.clone()))?;
        registry.register(Box::new(retries.clone()))?;
        registry.register(Box::new(mapping_reloads.clone()))?;
        registry.register(Box::new(answers.clone()))?;
        registry.register(Box::new(bound_revocations.clone()))?;
        registry.register(Box::new(refused.clone()))?;
        registry.register(Box::new(truncated.clone()))?;
        registry.register(Box::new(token_rejected.clone()))?;
        registry.register(Box::new(oncall_checks.clone()))?;
        registry.register(Box::new(oncall_check_duration.clone()))?;
        registry.register(Box::new(build_info))?;
        for via in Via::ALL {
            for result in ["on_call", "not_on_call", "failed"] {
                oncall_checks.with_label_values(&[via.as_str(), result]);
            }
            oncall_check_duration.with_label_values(&[via.as_str()]);
        }
        for via in Via::ALL {
            for result in ANSWER_RESULTS {
                answers.with_label_values(&[via.as_str(), result]);
            }
        }

        for action in Action::ALL {
            for result in RESULTS {
                p0_requests.with_label_values(&[action.as_str(), result]);
            }
            p0_request_duration.with_label_values(&[action.as_str()]);
        }
        for result in ["success", "error"] {
            mapping_reloads.with_label_values(&[result]);
        }
        let metrics = Metrics {
            registry,
            webhooks,
            webhook_duration,
            decisions,
            p0_requests,
            p0_request_duration,
            delivery_lag,
            queue_depth,
            dead_letters,
            retries,
            mapping_reloads,
            answers,
            bound_revocations,
            refused,
            truncated,
            token_rejected,
            oncall_checks,
            oncall_check_duration,
        };
        metrics.add_sources(sources.into_iter().chain([UNKNOWN_SOURCE]));
        Ok(metrics)
    }

    /// Zeroes the series of newly mapped sources.
    pub fn add_sources<'a>(&self, sources: impl IntoIterator<Item = &'a str>) {
        for source in sources {
            for outcome in OUTCOMES {
                self.webhooks.with_label_values(&[source, outcome]);
            }
            self.webhook_duration.with_label_values(&[source]);
            if source != UNKNOWN_SOURCE {
                for action in Action::ALL {
                    self.decisions.with_label_values(&[source, action.as_str()]);
                }
                self.bound_revocations.with_label_values(&[source]);
                self.refused.with_label_values(&[source]);
                self.truncated.with_label_values(&[source]);
            }
        }
    }

    /// The Prometheus text exposition of every family.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .is_err()
        {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}
