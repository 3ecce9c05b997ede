//! Opsgenie, and Jira Service Management's Opsgenie API: its auth (`GenieKey`), where an answer
//! goes (a note on the alert), and its check (the actor, by user ID, among a pinned schedule's
//! on-call participants at the moment judged).

use reqwest::header::{self, HeaderMap};

use super::secret;

use super::Place;
use crate::config::ProviderApi;
use crate::domain::{Gate, Via, printable};
use crate::oncall::{Checker, Fetched, Finding, failure, rfc3339};

/// What every call to Opsgenie (or JSM) carries.
pub fn headers(api: &ProviderApi) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        header::AUTHORIZATION,
        secret(&format!("GenieKey {}", api.token.expose())),
    );
    h
}

/// `v2/alerts/{alert}/notes?identifierType=id`.
pub fn answer_place(kind: &str, text: impl Fn(&str) -> Option<String>) -> Option<Place> {
    (kind == "note").then_some(())?;
    let segments = vec!["v2".into(), "alerts".into(), text("alert")?, "notes".into()];
    Some((segments, vec![("identifierType", "id".into())]))
}

/// Whether the actor (by user ID) is among a gate's schedules' on-call participants at the
/// moment judged (asked to the second: a storm within it shares one answer).
pub async fn check(checker: &Checker, api: &ProviderApi, via: Via, gate: &Gate) -> Finding {
    let Gate::Opsgenie {
        user,
        schedules,
        at_ms,
        ..
    } = gate
    else {
        return failure("not an Opsgenie check".into());
    };
    let date = rfc3339(*at_ms);
    let name = if via == Via::Jsm { "JSM" } else { "Opsgenie" };
    let mut missing = Vec::new();
    for schedule in schedules {
        match participants(checker, api, via, schedule, &date).await {
            // User IDs, not names: a name is free text an admin (or a token holder writing
            // the webhook body) can make match anyone's.
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

/// The user IDs among `schedule`'s on-call participants at `date`, cached.
async fn participants(
    checker: &Checker,
    api: &ProviderApi,
    via: Via,
    schedule: &str,
    date: &str,
) -> Result<Fetched, Finding> {
    let key = format!("og-oncalls\n{via}\n{schedule}\n{date}");
    checker
        .cached(key, || async {
            let kind = if looks_like_id(schedule) {
                "id"
            } else {
                "name"
            };
            let query = [
                ("scheduleIdentifierType", kind.to_owned()),
                ("flat", "false".to_owned()),
                ("date", date.to_owned()),
            ];
            let path = ["v2", "schedules", schedule, "on-calls"];
            match checker.get(via, api, &path, &query).await? {
                None => Ok(Fetched::Missing),
                Some(v) => {
                    let mut ids = Vec::new();
                    users(&v["data"]["onCallParticipants"], &mut ids, 0);
                    Ok(Fetched::Participants(ids))
                }
            }
        })
        .await
}

/// An Opsgenie schedule ID is a UUID; anything else is taken as its name.
fn looks_like_id(s: &str) -> bool {
    s.len() == 36 && s.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}

/// The IDs of the users among Opsgenie's on-call participants (`type: user`), through the
/// escalations and teams that nest them (a few levels at most).
fn users(participants: &serde_json::Value, out: &mut Vec<String>, depth: usize) {
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

#[cfg(test)]
mod tests {
    #[test]
    fn schedule_ids_are_uuids() {
        assert!(!super::looks_like_id(
            "d875alp4-9b4e-4219-alp3-0c26936d18de"
        ));
        assert!(super::looks_like_id("d8750fa4-9b4e-4219-a0f3-0c26936d18de"));
    }
}
