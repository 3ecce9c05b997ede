//! PagerDuty: its auth (`Token token=`, its media type, the `From` user), where an answer goes
//! (a note on the incident), and its check (the actor on call, at a pinned level or lower, for
//! a pinned escalation policy or schedule, at the moment judged).

use std::time::SystemTime;

use reqwest::header::{self, HeaderMap, HeaderValue};

use super::secret;
use serde_json::Value;

use super::Place;
use crate::config::ProviderApi;
use crate::domain::{Gate, Via, printable};
use crate::oncall::{Checker, Fetched, Finding, at_time, failure, rfc3339};

/// How long a PagerDuty on-call window asked for spans: every check of the same user and
/// policy within it shares one answer.
const WINDOW_MS: i64 = 10 * 60 * 1000;
/// PagerDuty's page size, and the most pages read of one answer: a user's on-calls for one
/// policy in ten minutes fit in one; past the bound the check is refused, not guessed.
const PAGE: usize = 100;
const MAX_PAGES: usize = 10;

/// What every call to PagerDuty carries (its API asks for a JSON `Content-Type` on reads
/// too).
pub fn headers(api: &ProviderApi) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        header::AUTHORIZATION,
        secret(&format!("Token token={}", api.token.expose())),
    );
    let accept = "application/vnd.pagerduty+json;version=2";
    h.insert(header::ACCEPT, HeaderValue::from_static(accept));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(from) = api
        .from
        .as_deref()
        .and_then(|f| HeaderValue::from_str(f).ok())
    {
        h.insert(header::FROM, from);
    }
    h
}

/// `incidents/{incident}/notes`.
pub fn answer_place(kind: &str, text: impl Fn(&str) -> Option<String>) -> Option<Place> {
    (kind == "note").then_some(())?;
    let segments = vec!["incidents".into(), text("incident")?, "notes".into()];
    Some((segments, Vec::new()))
}

/// One of the user's on-calls: (escalation level, schedule, start, end).
#[derive(Debug, Clone)]
pub struct OnCall {
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

/// Whether the actor is on call, at a pinned level or lower, for the incident's escalation
/// policy (one the operator pinned) or a pinned schedule, at the moment judged.
pub async fn check(checker: &Checker, api: &ProviderApi, gate: &Gate) -> Finding {
    let Gate::PagerDuty {
        user,
        escalation_policy,
        incident,
        at_ms,
        escalation_policies,
        max_level,
        schedules,
    } = gate
    else {
        return failure("not a PagerDuty check".into());
    };
    // A check stored before levels were pinned asks for level 1, as its scope says.
    let max_level = max_level.unwrap_or(1);
    // Only the operator's pins make a policy count: without them, any policy an incident
    // is moved onto would (a check stored before pins were required has none).
    if escalation_policies.is_empty() && schedules.is_empty() {
        return Finding::NotOnCall(
            "not on call: the check pins no escalation policy and no schedule".into(),
        );
    }
    let policy = match incident_policy(checker, api, escalation_policy, incident).await {
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
    let fetched = checker
        .cached(key, || {
            oncalls(checker, api, user, &policy, schedules, from)
        })
        .await;
    let oncalls = match fetched {
        Ok(Fetched::OnCalls(list)) => list,
        Ok(_) => Vec::new(),
        Err(f) => return f,
    };
    let judged = Judged {
        user,
        policy: &policy,
        schedules,
        at_ms: *at_ms,
        max_level,
    };
    judged.finding(&oncalls)
}

/// What a check asks of the user's on-calls.
struct Judged<'a> {
    user: &'a str,
    policy: &'a str,
    schedules: &'a [String],
    at_ms: i64,
    max_level: u32,
}

impl Judged<'_> {
    /// Whether an on-call covers the moment judged (an end or start given unreadably counts
    /// for nothing) and, with pinned schedules, is through one of them.
    fn covers(&self, o: &OnCall) -> bool {
        let at = at_time(self.at_ms);
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
        let schedules = self.schedules;
        let through =
            schedules.is_empty() || o.schedule.as_ref().is_some_and(|s| schedules.contains(s));
        started && running && through
    }

    /// The finding from the user's on-calls: the lowest level covering the moment judged,
    /// at the pinned level or lower.
    fn finding(&self, oncalls: &[OnCall]) -> Finding {
        let who = format!("{} at {}", printable(self.user), rfc3339(self.at_ms));
        let policy = printable(self.policy);
        let covering = oncalls.iter().filter(|o| self.covers(o));
        let Some(best) = covering.min_by_key(|o| o.level) else {
            let through = if self.schedules.is_empty() {
                String::new()
            } else {
                format!(" through schedule {}", self.schedules.join(" or "))
            };
            let unreadable = oncalls.iter().any(|o| {
                matches!(
                    (o.start, o.end),
                    (Bound::Unreadable, _) | (_, Bound::Unreadable)
                )
            });
            let note = match unreadable {
                true => {
                    " (an on-call whose start or end PagerDuty gave unreadably counts for nothing)"
                }
                false => "",
            };
            return Finding::NotOnCall(format!(
                "not on call: {who} is not on call for escalation policy {policy}{through}{note}"
            ));
        };
        let max = self.max_level;
        if best.level > max {
            return Finding::NotOnCall(format!(
                "not on call at level {max} or lower: {who} is on call for escalation policy {policy} only at level {}",
                best.level
            ));
        }
        let through = best
            .schedule
            .as_deref()
            .map(|s| format!(" (schedule {})", printable(s)))
            .unwrap_or_default();
        Finding::OnCall(format!(
            "on call: escalation policy {policy} level {}{through}, {} (PagerDuty, for {who})",
            best.level,
            span(best.start.time(), best.end.time())
        ))
    }
}

/// The incident's escalation policy: the event's, or fetched from the incident.
async fn incident_policy(
    checker: &Checker,
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
    let fetched = checker
        .cached(key, || async {
            match checker
                .get(Via::PagerDuty, api, &["incidents", incident], &[])
                .await?
            {
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
async fn oncalls(
    checker: &Checker,
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
        let Some(v) = checker
            .get(Via::PagerDuty, api, &["oncalls"], &query)
            .await?
        else {
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
    fn spans() {
        let t = |s: &str| crate::mapping::parse_rfc3339(s);
        assert_eq!(
            span(t("2026-11-28T03:47:00Z"), t("2026-11-28T15:47:00Z")),
            "03:47-15:47 UTC on 2026-11-28"
        );
        assert_eq!(
            span(t("2026-11-28T03:47:00-05:00"), t("2026-11-29T03:47:00Z")),
            "2026-11-28T08:47:00Z to 2026-11-29T03:47:00Z"
        );
    }
}
