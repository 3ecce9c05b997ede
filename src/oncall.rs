//! On-call checks: asks the provider a gated approve names (`providers::pagerduty`,
//! `opsgenie`, `github`) whether its actor was on call (or in a team) at the moment judged,
//! within the scope the operator pinned, with answers cached briefly and concurrent asks for
//! the same answer made once. Run by the worker, never by the receiver.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reqwest::Method;
use serde_json::Value;
use tokio::sync::OnceCell;

use crate::config::{AnswerSettings, ProviderApi};
use crate::domain::{Gate, Via};
use crate::metrics::Metrics;
use crate::providers::http::{self, Verdict};
use crate::providers::{Providers, github, opsgenie, pagerduty};

/// What a check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// The actor may approve: the evidence, in one line.
    OnCall(String),
    /// A definite no (not on call, not a member, no such incident or schedule): refused. The
    /// evidence names policies, schedules and teams; the asker is told only `public`.
    NotOnCall(String),
    /// The check could not be made now (rate limited, 5xx, timeout, a rejected token): try
    /// again later, not before `retry_after`.
    Unavailable {
        error: String,
        retry_after: Option<Duration>,
    },
}

/// Checks gates against the providers whose API token is set (the `answers:` settings).
pub struct Checker {
    providers: Providers,
    ttl: Duration,
    cache: Mutex<HashMap<String, Entry>>,
    metrics: Metrics,
}

struct Entry {
    made: Instant,
    cell: Arc<OnceCell<Fetched>>,
}

/// A provider's answer, as cached.
#[derive(Debug, Clone)]
pub enum Fetched {
    /// PagerDuty on-calls: (escalation level, schedule, start, end) of each.
    OnCalls(Vec<pagerduty::OnCall>),
    /// An incident's escalation policy.
    Policy(String),
    /// The user IDs among a schedule's on-call participants at a time.
    Participants(Vec<String>),
    /// A GitHub team membership's state.
    Membership(String),
    /// The provider answered 404: no such incident, schedule or membership.
    Missing,
}

/// The public words of a refusal: what the asker reads where they asked (an issue or an
/// incident others may read), without policy, schedule or team names.
pub fn public_refusal(via: Via) -> &'static str {
    match via {
        Via::PagerDuty => "not on call for this incident",
        Via::Opsgenie | Via::Jsm => "not on call for this alert",
        Via::GitHub => "not an approver",
    }
}

/// Entries kept before expired ones are swept.
const SWEEP_AT: usize = 4096;

impl Checker {
    pub fn new(apis: AnswerSettings, ttl: Duration, metrics: Metrics) -> Result<Checker, String> {
        Ok(Checker {
            providers: Providers::new(apis)?,
            ttl,
            cache: Mutex::new(HashMap::new()),
            metrics,
        })
    }

    pub async fn check(&self, gate: &Gate) -> Finding {
        let via = gate.via();
        let started = Instant::now();
        let finding = match self.providers.api(via) {
            None => Finding::Unavailable {
                error: format!(
                    "no {via} API token is set for on-call checks ({})",
                    via.token_var()
                ),
                retry_after: None,
            },
            Some(api) => match gate {
                Gate::PagerDuty { .. } => pagerduty::check(self, api, gate).await,
                Gate::Opsgenie { .. } => opsgenie::check(self, api, via, gate).await,
                Gate::GitHub { .. } => github::check(self, api, gate).await,
            },
        };
        let result = match &finding {
            Finding::OnCall(_) => "on_call",
            Finding::NotOnCall(_) => "not_on_call",
            Finding::Unavailable { .. } => "failed",
        };
        self.metrics
            .oncall_checks
            .with_label_values(&[via.as_str(), result])
            .inc();
        self.metrics
            .oncall_check_duration
            .with_label_values(&[via.as_str()])
            .observe(started.elapsed().as_secs_f64());
        finding
    }

    /// The cached answer for `key`, or `fetch`'s; concurrent asks for one key wait for one
    /// fetch. A failed fetch is not cached.
    pub(crate) async fn cached<F, Fut>(&self, key: String, fetch: F) -> Result<Fetched, Finding>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Fetched, Finding>>,
    {
        let cell = {
            let mut cache = match self.cache.lock() {
                Ok(c) => c,
                Err(poisoned) => poisoned.into_inner(),
            };
            if cache.len() >= SWEEP_AT {
                let ttl = self.ttl;
                cache.retain(|_, e| e.made.elapsed() < ttl);
            }
            let fresh = cache
                .get(&key)
                .filter(|e| e.made.elapsed() < self.ttl)
                .map(|e| e.cell.clone());
            match fresh {
                Some(cell) => cell,
                None => {
                    let cell = Arc::new(OnceCell::new());
                    cache.insert(
                        key,
                        Entry {
                            made: Instant::now(),
                            cell: cell.clone(),
                        },
                    );
                    cell
                }
            }
        };
        cell.get_or_try_init(fetch).await.cloned()
    }

    /// GETs `path` (and `query`) from `via`'s API: `Some(body)` on 2xx, `None` on 404, the
    /// reason to try later otherwise.
    pub(crate) async fn get(
        &self,
        via: Via,
        api: &ProviderApi,
        path: &[&str],
        query: &[(&str, String)],
    ) -> Result<Option<Value>, Finding> {
        let url = http::join(&api.url, path, query);
        let answer = match self.providers.call(via, api, Method::GET, url, None).await {
            Ok(a) => a,
            Err(why) => return Err(failure(why.into())),
        };
        let error = || format!("{via}: {}", answer.error());
        match answer.verdict() {
            Verdict::Done => serde_json::from_str(&answer.body).map(Some).map_err(|_| {
                failure(format!(
                    "{via} answered {} with a body that is not JSON",
                    answer.status
                ))
            }),
            Verdict::Refused if answer.status.as_u16() == 404 => Ok(None),
            Verdict::RateLimited => Err(Finding::Unavailable {
                error: format!("{via}: rate limited: {}", answer.error()),
                retry_after: answer.retry_after(),
            }),
            Verdict::Unavailable => Err(Finding::Unavailable {
                error: error(),
                retry_after: answer.retry_after(),
            }),
            Verdict::Unauthorized | Verdict::Refused => {
                tracing::error!(provider = %via, error = %error(),
                    "an on-call check was refused by the provider: check {}", via.token_var());
                Err(failure(error()))
            }
        }
    }
}

pub(crate) fn failure(error: String) -> Finding {
    Finding::Unavailable {
        error,
        retry_after: None,
    }
}

pub(crate) fn at_time(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

pub(crate) fn rfc3339(ms: i64) -> String {
    humantime::format_rfc3339_seconds(at_time(ms)).to_string()
}
