//! On-call checks: asks PagerDuty, Opsgenie / JSM or GitHub whether the actor of a gated
//! approve was on call (or in a team) at the moment judged, within the scope the operator
//! pinned, with answers cached briefly and concurrent asks for the same answer made once.
//! Run by the worker, never by the receiver.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reqwest::{Url, header};
use serde_json::Value;
use tokio::sync::OnceCell;

use crate::answers::client::{Sent, classify};
use crate::config::{AnswerSettings, ProviderApi};
use crate::domain::{Gate, Via, printable};
use crate::metrics::Metrics;

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
    http: reqwest::Client,
    apis: AnswerSettings,
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
enum Fetched {
    /// PagerDuty on-calls: (escalation level, schedule, start, end) of each.
    OnCalls(Vec<OnCall>),
    /// An incident's escalation policy.
    Policy(String),
    /// The user IDs among a schedule's on-call participants at a time.
    Participants(Vec<String>),
    /// A GitHub team membership's state.
    Membership(String),
    /// The provider answered 404: no such incident, schedule or membership.
    Missing,
}

#[derive(Debug, Clone)]
struct OnCall {
    level: u32,
    schedule: Option<String>,
    start: Bound,
    end: Bound,
}

/// One end of an on-call: PagerDuty leaves both `null` for an on-call that is not scheduled
/// (a user named on the escalation policy itself); a time it cannot read counts for nothing.
#[derive(Debug, Clone, Copy)]
enum Bound {
    Open,
    At(SystemTime),
    Unreadable,
}

impl Bound {
    fn read(value: &Value) -> Bound {
        match value {
            Value::Null => Bound::Open,
            Value::String(s) => {
                crate::mapping::parse_rfc3339(s).map_or(Bound::Unreadable, Bound::At)
            }
            _ => Bound::Unreadable,
        }
    }

    fn time(self) -> Option<SystemTime> {
        match self {
            Bound::At(t) => Some(t),
            Bound::Open | Bound::Unreadable => None,
        }
    }
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

/// How long a PagerDuty on-call window asked for spans: every check of the same user and
/// policy within it shares one answer.
const WINDOW_MS: i64 = 10 * 60 * 1000;
/// PagerDuty's page size, and the most pages read of one answer: a user's on-calls for one
/// policy in ten minutes fit in one; past the bound the check is refused, not guessed.
const PAGE: usize = 100;
const MAX_PAGES: usize = 10;
/// Entries kept before expired ones are swept.
const SWEEP_AT: usize = 4096;

impl Checker {
    pub fn new(apis: AnswerSettings, ttl: Duration, metrics: Metrics) -> Result<Checker, String> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(apis.timeout)
            .connect_timeout(apis.timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("p0-relay/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Checker {
            http,
            apis,
            ttl,
            cache: Mutex::new(HashMap::new()),
            metrics,
        })
    }

    pub async fn check(&self, gate: &Gate) -> Finding {
        let via = gate.via();
        let started = Instant::now();
        let finding = match self.apis.api(via) {
            None => Finding::Unavailable {
                error: format!(
                    "no {via} API token is set for on-call checks ({})",
                    token_var(via)
                ),
                retry_after: None,
            },
            Some(api) => match gate {
                Gate::PagerDuty { .. } => self.pagerduty(api, gate).await,
                Gate::Opsgenie { .. } => self.opsgenie(api, via, gate).await,
                Gate::GitHub { .. } => self.github(api, gate).await,
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

    async fn pagerduty(&self, api: &ProviderApi, gate: &Gate) -> Finding {
        let Gate::PagerDuty {
            user,
            escalation_policy,
            incident,
            escalation_policies,
            max_level,
            schedules,
            at_ms,
        } = gate
        else {
            return failure("not a PagerDuty check".into());
        };
        // Only the operator's pins make a policy count: without them, any policy an incident
        // is moved onto would (a check stored before pins were required has none).
        if escalation_policies.is_empty() && schedules.is_empty() {
            return Finding::NotOnCall(
                "not on call: the check pins no escalation policy and no schedule".into(),
            );
        }
        let policy = match self.incident_policy(api, escalation_policy, incident).await {
            Ok(p) => p,
            Err(f) => return f,
        };
        if !escalation_policies.is_empty() && !escalation_policies.contains(&policy) {
            return Finding::NotOnCall(format!(
                "not on call: escalation policy {} of the incident is not one the check trusts ({})",
                printable(&policy),
                escalation_policies.join(", ")
            ));
        }
        let from = at_ms.div_euclid(WINDOW_MS) * WINDOW_MS;
        let key = format!(
            "pd-oncalls\n{user}\n{policy}\n{}\n{from}",
            schedules.join(",")
        );
        let fetched = self
            .cached(key, || {
                self.pagerduty_oncalls(api, user, &policy, schedules, from)
            })
            .await;
        let oncalls = match fetched {
            Ok(Fetched::OnCalls(list)) => list,
            Ok(_) => Vec::new(),
            Err(f) => return f,
        };
        let at = at_time(*at_ms);
        let covers = |o: &&OnCall| {
            let started = match o.start {
                Bound::Open => true,
                Bound::At(s) => s <= at,
                Bound::Unreadable => false,
            };
            let running = match o.end {
                Bound::Open => true,
                Bound::At(e) => at < e,
                Bound::Unreadable => false,
            };
            started && running
        };
        let now: Vec<&OnCall> = oncalls
            .iter()
            .filter(covers)
            .filter(|o| {
                schedules.is_empty() || o.schedule.as_ref().is_some_and(|s| schedules.contains(s))
            })
            .collect();
        let who = format!("{} at {}", printable(user), rfc3339(*at_ms));
        let Some(best) = now.iter().min_by_key(|o| o.level) else {
            let through = if schedules.is_empty() {
                String::new()
            } else {
                format!(" through schedule {}", schedules.join(" or "))
            };
            let unreadable = oncalls.iter().any(|o| {
                matches!(
                    (o.start, o.end),
                    (Bound::Unreadable, _) | (_, Bound::Unreadable)
                )
            });
            return Finding::NotOnCall(format!(
                "not on call: {who} is not on call for escalation policy {}{through}{}",
                printable(&policy),
                if unreadable {
                    " (an on-call whose start or end PagerDuty gave unreadably counts for nothing)"
                } else {
                    ""
                }
            ));
        };
        let max = max_level.unwrap_or(1);
        if best.level > max {
            return Finding::NotOnCall(format!(
                "not on call at level {max} or lower: {who} is on call for escalation policy {} only at level {}",
                printable(&policy),
                best.level
            ));
        }
        let through = best
            .schedule
            .as_deref()
            .map(|s| format!(" (schedule {})", printable(s)))
            .unwrap_or_default();
        Finding::OnCall(format!(
            "on call: escalation policy {} level {}{through}, {} (PagerDuty, for {who})",
            printable(&policy),
            best.level,
            span(best.start.time(), best.end.time())
        ))
    }

    /// The incident's escalation policy: the event's, or fetched from the incident.
    async fn incident_policy(
        &self,
        api: &ProviderApi,
        escalation_policy: &Option<String>,
        incident: &Option<String>,
    ) -> Result<String, Finding> {
        let incident = match (escalation_policy, incident) {
            (Some(p), _) => return Ok(p.clone()),
            (None, Some(incident)) => incident,
            (None, None) => {
                return Err(Finding::NotOnCall("no escalation policy to check".into()));
            }
        };
        let key = format!("pd-incident\n{incident}");
        let fetched = self
            .cached(key, || async {
                let url = join(&api.url, &["incidents", incident], &[]);
                match self.get(Via::PagerDuty, api, url).await? {
                    None => Ok(Fetched::Missing),
                    Some(v) => v["incident"]["escalation_policy"]["id"]
                        .as_str()
                        .map(|p| Fetched::Policy(p.to_owned()))
                        .ok_or_else(|| failure("the incident names no escalation policy".into())),
                }
            })
            .await;
        match fetched {
            Ok(Fetched::Policy(p)) => Ok(p),
            Ok(_) => Err(Finding::NotOnCall(format!(
                "not on call: PagerDuty has no incident {}",
                printable(incident)
            ))),
            Err(f) => Err(f),
        }
    }

    /// The user's on-calls for `policy` in the window from `from`, every page of them (up to
    /// `MAX_PAGES`; more is refused rather than read in part).
    async fn pagerduty_oncalls(
        &self,
        api: &ProviderApi,
        user: &str,
        policy: &str,
        schedules: &[String],
        from: i64,
    ) -> Result<Fetched, Finding> {
        let (since, until) = (rfc3339(from), rfc3339(from + WINDOW_MS));
        let mut found = Vec::new();
        for page in 0..MAX_PAGES {
            let mut query = vec![
                ("user_ids[]", user.to_owned()),
                ("escalation_policy_ids[]", policy.to_owned()),
                ("since", since.clone()),
                ("until", until.clone()),
                ("limit", PAGE.to_string()),
                ("offset", (page * PAGE).to_string()),
            ];
            query.extend(schedules.iter().map(|s| ("schedule_ids[]", s.clone())));
            let url = join(&api.url, &["oncalls"], &query);
            let Some(v) = self.get(Via::PagerDuty, api, url).await? else {
                return Ok(Fetched::Missing);
            };
            let list = v["oncalls"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default();
            found.extend(
                list.iter()
                    .filter(|o| o["user"]["id"].as_str() == Some(user))
                    .filter(|o| o["escalation_policy"]["id"].as_str() == Some(policy))
                    .map(|o| OnCall {
                        level: o["escalation_level"]
                            .as_u64()
                            .and_then(|l| u32::try_from(l).ok())
                            .unwrap_or(u32::MAX),
                        schedule: o["schedule"]["id"].as_str().map(str::to_owned),
                        start: Bound::read(&o["start"]),
                        end: Bound::read(&o["end"]),
                    }),
            );
            if v["more"].as_bool() != Some(true) || list.is_empty() {
                return Ok(Fetched::OnCalls(found));
            }
        }
        Err(Finding::NotOnCall(format!(
            "not on call: PagerDuty listed more than {} on-calls of one user and policy in ten minutes",
            PAGE * MAX_PAGES
        )))
    }

    async fn opsgenie(&self, api: &ProviderApi, via: Via, gate: &Gate) -> Finding {
        let Gate::Opsgenie {
            user,
            schedules,
            at_ms,
            ..
        } = gate
        else {
            return failure("not an Opsgenie check".into());
        };
        // Asked about the moment judged itself (to the second: a storm within it shares one
        // answer).
        let date = rfc3339(*at_ms);
        let name = if via == Via::Jsm { "JSM" } else { "Opsgenie" };
        let mut missing = Vec::new();
        for schedule in schedules {
            let key = format!("og-oncalls\n{via}\n{schedule}\n{date}");
            let fetched = self
                .cached(key, || async {
                    let kind = if looks_like_id(schedule) {
                        "id"
                    } else {
                        "name"
                    };
                    let url = join(
                        &api.url,
                        &["v2", "schedules", schedule, "on-calls"],
                        &[
                            ("scheduleIdentifierType", kind.to_owned()),
                            ("flat", "false".to_owned()),
                            ("date", date.clone()),
                        ],
                    );
                    match self.get(via, api, url).await? {
                        None => Ok(Fetched::Missing),
                        Some(v) => {
                            let mut ids = Vec::new();
                            users(&v["data"]["onCallParticipants"], &mut ids, 0);
                            Ok(Fetched::Participants(ids))
                        }
                    }
                })
                .await;
            match fetched {
                // User IDs, not names: a name is free text an admin (or a token holder
                // writing the webhook body) can make match anyone's.
                Ok(Fetched::Participants(ids))
                    if ids.iter().any(|id| id.eq_ignore_ascii_case(user)) =>
                {
                    return Finding::OnCall(format!(
                        "on call: schedule {} at {date} ({name}, for user {})",
                        printable(schedule),
                        printable(user)
                    ));
                }
                Ok(Fetched::Missing) => missing.push(schedule.as_str()),
                Ok(_) => {}
                Err(f) => return f,
            }
        }
        let mut why = format!(
            "not on call: user {} is not an on-call participant of schedule {} at {date}",
            printable(user),
            schedules.join(" or ")
        );
        if !missing.is_empty() {
            why.push_str(&format!(" ({name} has no schedule {})", missing.join(", ")));
        }
        Finding::NotOnCall(why)
    }

    async fn github(&self, api: &ProviderApi, gate: &Gate) -> Finding {
        let Gate::GitHub { user, org, teams } = gate else {
            return failure("not a GitHub check".into());
        };
        let mut seen = Vec::new();
        for team in teams {
            let key = format!("gh-team\n{org}\n{team}\n{user}");
            let fetched = self
                .cached(key, || async {
                    let url = join(
                        &api.url,
                        &["orgs", org, "teams", team, "memberships", user],
                        &[],
                    );
                    match self.get(Via::GitHub, api, url).await? {
                        None => Ok(Fetched::Missing),
                        Some(v) => Ok(Fetched::Membership(
                            v["state"].as_str().unwrap_or("unknown").to_owned(),
                        )),
                    }
                })
                .await;
            let name = format!("{}/{}", printable(org), printable(team));
            match fetched {
                Ok(Fetched::Membership(state)) if state == "active" => {
                    return Finding::OnCall(format!(
                        "member: {} is an active member of {name} (GitHub)",
                        printable(user)
                    ));
                }
                Ok(Fetched::Membership(state)) => {
                    seen.push(format!("{name}: membership {}", printable(&state)));
                }
                Ok(_) => seen.push(format!("{name}: not a member")),
                Err(f) => return f,
            }
        }
        Finding::NotOnCall(format!(
            "not a member: {} is not an active member of {} ({})",
            printable(user),
            teams
                .iter()
                .map(|t| format!("{org}/{t}"))
                .collect::<Vec<_>>()
                .join(" or "),
            seen.join("; ")
        ))
    }

    /// The cached answer for `key`, or `fetch`'s; concurrent asks for one key wait for one
    /// fetch. A failed fetch is not cached.
    async fn cached<F, Fut>(&self, key: String, fetch: F) -> Result<Fetched, Finding>
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

    /// GETs `url`: `Some(body)` on 2xx, `None` on 404, the reason to try later otherwise.
    async fn get(&self, via: Via, api: &ProviderApi, url: Url) -> Result<Option<Value>, Finding> {
        let req = self.http.get(url);
        let req = match via {
            Via::GitHub => req
                .bearer_auth(api.token.expose())
                .header(header::ACCEPT, "application/vnd.github+json")
                .header("X-GitHub-Api-Version", "2022-11-28"),
            Via::PagerDuty => req
                .header(
                    header::AUTHORIZATION,
                    format!("Token token={}", api.token.expose()),
                )
                .header(header::ACCEPT, "application/vnd.pagerduty+json;version=2")
                .header(header::CONTENT_TYPE, "application/json"),
            Via::Opsgenie | Via::Jsm => req.header(
                header::AUTHORIZATION,
                format!("GenieKey {}", api.token.expose()),
            ),
        };
        let response = req.send().await.map_err(|e| {
            failure(
                if e.is_timeout() {
                    "timed out"
                } else if e.is_connect() {
                    "connection failed"
                } else {
                    "request failed"
                }
                .into(),
            )
        })?;
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap_or_default();
        match classify(status, &headers, &text) {
            Sent::Done { .. } => serde_json::from_str(&text).map(Some).map_err(|_| {
                failure(format!(
                    "{via} answered {status} with a body that is not JSON"
                ))
            }),
            Sent::Failed {
                status: Some(404), ..
            } => Ok(None),
            Sent::Retry {
                error, retry_after, ..
            } => Err(Finding::Unavailable {
                error: format!("{via}: {error}"),
                retry_after,
            }),
            Sent::Failed { error, .. } => {
                tracing::error!(provider = %via, %error,
                    "an on-call check was refused by the provider: check {}", token_var(via));
                Err(failure(format!("{via}: {error}")))
            }
        }
    }
}

fn failure(error: String) -> Finding {
    Finding::Unavailable {
        error,
        retry_after: None,
    }
}

fn token_var(via: Via) -> &'static str {
    match via {
        Via::GitHub => "GITHUB_TOKEN",
        Via::PagerDuty => "PAGERDUTY_API_TOKEN",
        Via::Opsgenie => "OPSGENIE_API_KEY",
        Via::Jsm => "JSM_API_KEY",
    }
}

/// `base` with each segment percent-encoded as one path segment, and the query.
fn join(base: &Url, segments: &[&str], query: &[(&str, String)]) -> Url {
    let mut url = base.clone();
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty();
        for s in segments {
            path.push(s);
        }
    }
    if !query.is_empty() {
        url.query_pairs_mut()
            .extend_pairs(query.iter().map(|(k, v)| (*k, v.as_str())));
    }
    url
}

/// An Opsgenie schedule ID is a UUID; anything else is taken as its name.
fn looks_like_id(s: &str) -> bool {
    s.len() == 36 && s.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}

fn at_time(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

fn rfc3339(ms: i64) -> String {
    humantime::format_rfc3339_seconds(at_time(ms)).to_string()
}

/// The IDs of the users among Opsgenie's on-call participants (`type: user`), through the
/// escalations and teams that nest them (a few levels at most).
fn users(participants: &Value, out: &mut Vec<String>, depth: usize) {
    let Some(list) = participants.as_array() else {
        return;
    };
    for p in list {
        if p["type"].as_str() == Some("user")
            && let Some(id) = p["id"].as_str()
        {
            out.push(id.to_owned());
        }
        if depth < 4 {
            users(&p["onCallParticipants"], out, depth + 1);
        }
    }
}

/// An on-call's span: `03:47-15:47 UTC on 2026-11-28` within a day, else both ends in full.
fn span(start: Option<SystemTime>, end: Option<SystemTime>) -> String {
    let full = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    match (start, end) {
        (Some(s), Some(e)) => {
            let (s, e) = (full(s), full(e));
            if s[..10] == e[..10] {
                format!("{}-{} UTC on {}", &s[11..16], &e[11..16], &s[..10])
            } else {
                format!("{s} to {e}")
            }
        }
        (Some(s), None) => format!("since {}", full(s)),
        (None, Some(e)) => format!("until {}", full(e)),
        (None, None) => "with no end".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_and_urls() {
        let t = |s: &str| crate::mapping::parse_rfc3339(s);
        assert_eq!(
            span(t("2026-11-28T03:47:00Z"), t("2026-11-28T15:47:00Z")),
            "03:47-15:47 UTC on 2026-11-28"
        );
        assert_eq!(
            span(t("2026-11-28T03:47:00-05:00"), t("2026-11-29T03:47:00Z")),
            "2026-11-28T08:47:00Z to 2026-11-29T03:47:00Z"
        );
        let base = Url::parse("https://api.example.com/base/").unwrap();
        assert_eq!(
            join(
                &base,
                &["orgs", "a/b", "teams"],
                &[("user_ids[]", "P1".into())]
            )
            .as_str(),
            "https://api.example.com/base/orgs/a%2Fb/teams?user_ids%5B%5D=P1"
        );
        assert!(!looks_like_id("d875alp4-9b4e-4219-alp3-0c26936d18de"));
        assert!(looks_like_id("d8750fa4-9b4e-4219-a0f3-0c26936d18de"));
    }
}
