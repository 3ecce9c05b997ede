//! Every metric the relay exports, defined in one place. Labels take values from small fixed
//! sets only, and every known series starts at zero so dashboards never see a gap.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::domain::{Action, Via};
use crate::store::audit::Kind;

/// Audit events, each a series of `audit_events_total`.
const AUDIT_EVENTS: [Kind; 10] = [
    Kind::Accepted,
    Kind::Refused,
    Kind::Checked,
    Kind::Sent,
    Kind::Dead,
    Kind::Answered,
    Kind::Revoked,
    Kind::Replayed,
    Kind::Pruned,
    Kind::Seal,
];

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

/// Why the webhook port turned a connection or a body away early (`inbound_refused_total`):
/// `address_share` (its sender held its share already), `full` (every place busy with a
/// delivery), `evicted` (an idle or unfinished connection closed to make room), `cut` (a body
/// being read cut to make room in the budget: 503), `body_budget` (no room for its body among
/// the unverified ones: 503), `slow_body` (its body too slow: 408), `header_timeout` (no
/// complete request within the deadline, idle keep-alives included).
pub const INBOUND_REFUSALS: [&str; 7] = [
    "address_share",
    "full",
    "evicted",
    "cut",
    "body_budget",
    "slow_body",
    "header_timeout",
];

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
    pub audit_events: IntCounterVec,
    pub audit_seals: IntCounter,
    pub audit_since_seal: IntGauge,
    pub audit_unsealed: IntGauge,
    pub audit_trail_changed: IntGauge,
    pub inbound_refused: IntCounterVec,
    pub connections_open: IntGauge,
    pub body_budget: IntGauge,
    pub body_budget_in_use: IntGauge,
}

/// Bucket bounds (seconds) of the histograms.
const WEBHOOK_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
const P0_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const LAG_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 1800.0, 3600.0, 21600.0,
];
const ONCALL_BUCKETS: &[f64] = &[0.0005, 0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Makes each family and registers it, in the `p0_relay` namespace.
struct Families(Registry);

impl Families {
    fn opts(name: &str, help: &str) -> Opts {
        Opts::new(name, help).namespace("p0_relay")
    }

    fn add<T: prometheus::core::Collector + Clone + 'static>(
        &self,
        family: T,
    ) -> Result<T, prometheus::Error> {
        self.0.register(Box::new(family.clone()))?;
        Ok(family)
    }

    fn counters(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntCounterVec, prometheus::Error> {
        self.add(IntCounterVec::new(Self::opts(name, help), labels)?)
    }

    fn counter(&self, name: &str, help: &str) -> Result<IntCounter, prometheus::Error> {
        self.add(IntCounter::with_opts(Self::opts(name, help))?)
    }

    fn gauge(&self, name: &str, help: &str) -> Result<IntGauge, prometheus::Error> {
        self.add(IntGauge::with_opts(Self::opts(name, help))?)
    }

    fn histograms(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
        buckets: &[f64],
    ) -> Result<HistogramVec, prometheus::Error> {
        let opts = HistogramOpts::from(Self::opts(name, help)).buckets(buckets.to_vec());
        self.add(HistogramVec::new(opts, labels)?)
    }

    fn histogram(
        &self,
        name: &str,
        help: &str,
        buckets: &[f64],
    ) -> Result<Histogram, prometheus::Error> {
        let opts = HistogramOpts::from(Self::opts(name, help)).buckets(buckets.to_vec());
        self.add(Histogram::with_opts(opts)?)
    }

    /// `build_info{version}`, always 1.
    fn build_info(&self) -> Result<(), prometheus::Error> {
        let info = self.add(IntGaugeVec::new(
            Self::opts("build_info", "The running build."),
            &["version"],
        )?)?;
        info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        Ok(())
    }
}

impl Metrics {
    /// Registers every family; `sources` are the mapped sources, for zeroed series.
    pub fn new<'a>(
        sources: impl IntoIterator<Item = &'a str>,
    ) -> Result<Metrics, prometheus::Error> {
        // Long on purpose: the table of every family the relay exports, one stanza each.
        let f = Families(Registry::new());
        let metrics = Metrics {
            webhooks: f.counters(
                "webhooks_total",
                "Webhooks received, by source and the answer given.",
                &["source", "outcome"],
            )?,
            webhook_duration: f.histograms(
                "webhook_duration_seconds",
                "Time from receipt to answer.",
                &["source"],
                WEBHOOK_BUCKETS,
            )?,
            decisions: f.counters(
                "decisions_total",
                "Decisions accepted, by source and action.",
                &["source", "action"],
            )?,
            p0_requests: f.counters(
                "p0_requests_total",
                "Calls to P0, by action and result.",
                &["action", "result"],
            )?,
            p0_request_duration: f.histograms(
                "p0_request_duration_seconds",
                "Duration of calls to P0.",
                &["action"],
                P0_BUCKETS,
            )?,
            delivery_lag: f.histogram(
                "delivery_lag_seconds",
                "Time from a webhook's acceptance to P0's success.",
                LAG_BUCKETS,
            )?,
            queue_depth: f.gauge("queue_depth", "Decisions waiting to reach P0.")?,
            dead_letters: f.gauge(
                "dead_letters",
                "Decisions that gave up on P0 and wait for a replay.",
            )?,
            retries: f.counter(
                "retries_total",
                "Calls to P0 scheduled again after a transient failure.",
            )?,
            mapping_reloads: f.counters(
                "mapping_reloads_total",
                "Mapping reloads, by result.",
                &["result"],
            )?,
            answers: f.counters(
                "answers_total",
                "Answers back to the provider where a decision was asked, by provider and result.",
                &["source", "result"],
            )?,
            bound_revocations: f.counters(
                "bound_revocations_total",
                "Revocations made because the subject a request was approved under ended.",
                &["source"],
            )?,
            refused: f.counters(
                "refused_total",
                "Decisions refused as they were stored (their subject had ended), by source.",
                &["source"],
            )?,
            truncated: f.counters(
                "truncated_alerts_total",
                "Alerts a sender left out of its deliveries (truncatedAlerts): their ends cannot be acted on.",
                &["source"],
            )?,
            token_rejected: f.gauge(
                "p0_token_rejected",
                "1 while P0's latest answer rejected the API token (401), else 0.",
            )?,
            oncall_checks: f.counters(
                "oncall_checks_total",
                "On-call checks of gated approves, by provider and result (on_call, not_on_call, failed).",
                &["provider", "result"],
            )?,
            oncall_check_duration: f.histograms(
                "oncall_check_duration_seconds",
                "Duration of on-call checks, cached answers included.",
                &["provider"],
                ONCALL_BUCKETS,
            )?,
            audit_events: f.counters(
                "audit_events_total",
                "Audit events this relay wrote, by event.",
                &["event"],
            )?,
            audit_seals: f.counter(
                "audit_seals_total",
                "Seals this relay wrote over the audit trail.",
            )?,
            audit_since_seal: f.gauge(
                "audit_seconds_since_seal",
                "Seconds since the store's last seal (by any relay); -1 before the first.",
            )?,
            audit_unsealed: f.gauge(
                "audit_unsealed_events",
                "Audit events in the store that no seal covers yet.",
            )?,
            audit_trail_changed: f.gauge(
                "audit_trail_changed",
                "1 once this relay found seals removed or changed behind it (it seals no more until restarted).",
            )?,
            inbound_refused: f.counters(
                "inbound_refused_total",
                "Connections and bodies the webhook port turned away or closed early, by reason.",
                &["reason"],
            )?,
            connections_open: f.gauge(
                "connections_open",
                "Connections open on the webhook port.",
            )?,
            body_budget: f.gauge(
                "body_budget_bytes",
                "Bytes that bodies not yet verified may hold together (inbound.body_budget_bytes).",
            )?,
            body_budget_in_use: f.gauge(
                "body_budget_in_use_bytes",
                "Bytes of the body budget held by bodies being read or verified.",
            )?,
            registry: f.0.clone(),
        };
        f.build_info()?;
        metrics.zero_known_series();
        metrics.add_sources(sources.into_iter().chain([UNKNOWN_SOURCE]));
        Ok(metrics)
    }

    /// Every series whose labels are known in advance, at zero.
    fn zero_known_series(&self) {
        for via in Via::ALL {
            for result in ["on_call", "not_on_call", "failed"] {
                self.oncall_checks
                    .with_label_values(&[via.as_str(), result]);
            }
            self.oncall_check_duration
                .with_label_values(&[via.as_str()]);
            for result in ANSWER_RESULTS {
                self.answers.with_label_values(&[via.as_str(), result]);
            }
        }
        for action in Action::ALL {
            for result in RESULTS {
                self.p0_requests
                    .with_label_values(&[action.as_str(), result]);
            }
            self.p0_request_duration
                .with_label_values(&[action.as_str()]);
        }
        for result in ["success", "error"] {
            self.mapping_reloads.with_label_values(&[result]);
        }
        for event in AUDIT_EVENTS {
            self.audit_events.with_label_values(&[event.as_str()]);
        }
        self.audit_since_seal.set(-1);
        for reason in INBOUND_REFUSALS {
            self.inbound_refused.with_label_values(&[reason]);
        }
    }

    /// Counts a connection or body turned away for `reason` (one of `INBOUND_REFUSALS`).
    pub fn inbound_refusal(&self, reason: &'static str) {
        self.inbound_refused.with_label_values(&[reason]).inc();
    }

    /// As `inbound_refusal`, where there may be no metrics (a part built without them, as in
    /// its own tests, counts nothing).
    pub fn count_refusal(metrics: Option<&Metrics>, reason: &'static str) {
        if let Some(m) = metrics {
            m.inbound_refusal(reason);
        }
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
