//! The relay's vocabulary, parsed once at the edge: actions, org and request IDs that are safe
//! as a URL path segment, and expiration lengths in P0's grammar.

use std::fmt;

use serde::{Deserialize, Serialize};

/// What the relay asks P0 to do with a permission request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Approve,
    Deny,
    Revoke,
}

impl Action {
    pub const ALL: [Action; 3] = [Action::Approve, Action::Deny, Action::Revoke];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Approve => "approve",
            Action::Deny => "deny",
            Action::Revoke => "revoke",
        }
    }

    /// Parses an action name, ignoring case (`Approve`, `APPROVE`).
    pub fn parse(text: &str) -> Option<Action> {
        Action::ALL
            .into_iter()
            .find(|a| a.as_str().eq_ignore_ascii_case(text.trim()))
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An org or permission-request ID: `^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$`. Text from a webhook
/// becomes an `Id` only through `parse`, so nothing it contains can reshape a URL.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct Id(String);

impl Id {
    pub fn parse(text: &str) -> Result<Id, String> {
        let bytes = text.as_bytes();
        let ok = !bytes.is_empty()
            && bytes.len() <= 128
            && bytes[0].is_ascii_alphanumeric()
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if ok {
            Ok(Id(text.to_owned()))
        } else {
            Err(format!(
                "`{}` is not a valid ID (1-128 of A-Z a-z 0-9 _ . -, starting with a letter or digit)",
                printable(text)
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An expiration length in P0's grammar: a positive integer and one unit of `s m h d w`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expiration {
    text: String,
    seconds: u64,
}

impl Expiration {
    pub fn parse(text: &str) -> Result<Expiration, String> {
        let bad = || {
            format!(
                "expiration `{}` is not a positive whole number followed by one of s m h d w (e.g. 30m, 2h, 7d)",
                printable(text)
            )
        };
        let text = text.trim();
        let Some(unit) = text.chars().last() else {
            return Err(bad());
        };
        let digits = &text[..text.len() - unit.len_utf8()];
        let unit_seconds: u64 = match unit {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 604_800,
            _ => return Err(bad()),
        };
        if digits.is_empty()
            || digits.starts_with('0')
            || !digits.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(bad());
        }
        // Saturate rather than overflow: an absurd length is simply longer than any cap.
        let count: u64 = digits.parse().unwrap_or(u64::MAX);
        Ok(Expiration {
            text: text.to_owned(),
            seconds: count.saturating_mul(unit_seconds),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn seconds(&self) -> u64 {
        self.seconds
    }
}

/// Written as P0 reads it (`"2h"`), in answers and logs.
impl Serialize for Expiration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl fmt::Display for Expiration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A provider API the relay answers back through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    GitHub,
    PagerDuty,
    Opsgenie,
    Jsm,
}

impl Via {
    pub const ALL: [Via; 4] = [Via::GitHub, Via::PagerDuty, Via::Opsgenie, Via::Jsm];

    /// The variable its API token is read from.
    pub fn token_var(self) -> &'static str {
        match self {
            Via::GitHub => "GITHUB_TOKEN",
            Via::PagerDuty => "PAGERDUTY_API_TOKEN",
            Via::Opsgenie => "OPSGENIE_API_KEY",
            Via::Jsm => "JSM_API_KEY",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Via::GitHub => "github",
            Via::PagerDuty => "pagerduty",
            Via::Opsgenie => "opsgenie",
            Via::Jsm => "jsm",
        }
    }

    pub fn parse(text: &str) -> Option<Via> {
        Via::ALL.into_iter().find(|v| v.as_str() == text)
    }
}

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a decision is answered back: the provider, and for GitHub the comment that asked.
/// The issue, incident or alert answered on is the decision's subject.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub via: Via,
    /// Where to answer when that is not the subject itself: a GitHub issue by the current
    /// name of its repository (`owner/repo#number`), while the subject is bound to the
    /// repository's ID, which a rename or transfer does not change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

/// What a decision is bound to: its subject, where to answer, and whether the event that
/// made it ends the subject (revoking every request approved under it, and refusing every
/// approve after it) or reopens one that ended (approves are taken again).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Binding {
    pub subject: Option<String>,
    pub reply: Option<Reply>,
    pub ends_subject: bool,
    pub reopens_subject: bool,
    /// The on-call check an approve must pass before it is sent (a rule's `oncall`).
    pub gate: Option<Box<Gate>>,
}

/// An on-call check, as the mapping made it from one event: who to check, about what, as of
/// when, and the scope the operator pinned (`GateScope`). Stored with each approve it gates
/// and run by the worker before P0 is called.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "check", rename_all = "lowercase")]
pub enum Gate {
    /// The PagerDuty user is on call for the incident's escalation policy (fetched from the
    /// incident when the event does not carry it), which must be one of the pinned
    /// `escalation_policies` when any are pinned, at a level up to `max_level`, and, when
    /// `schedules` are pinned, through one of them.
    PagerDuty {
        user: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        escalation_policy: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        incident: Option<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        escalation_policies: Vec<String>,
        /// Absent only in checks stored before levels were pinned: judged as level 1.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_level: Option<u32>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        schedules: Vec<String>,
        at_ms: i64,
    },
    /// The Opsgenie (or JSM, through its Opsgenie-compatible API) user, by ID, is an on-call
    /// participant of one of `schedules` at the time judged (the receipt of the event).
    Opsgenie {
        #[serde(default)]
        jsm: bool,
        user: String,
        schedules: Vec<String>,
        at_ms: i64,
    },
    /// The GitHub user is an active member of one of `teams` of the pinned `org`.
    GitHub {
        user: String,
        org: String,
        teams: Vec<String>,
    },
}

/// What the operator pins of an on-call check: never read from a payload. A relay checks a
/// stored approve against its own rule's scope as well as the scope it was stored with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GateScope {
    PagerDuty {
        escalation_policies: Vec<String>,
        max_level: u32,
        schedules: Vec<String>,
    },
    Opsgenie {
        jsm: bool,
        schedules: Vec<String>,
    },
    GitHub {
        org: String,
        teams: Vec<String>,
    },
}

impl GateScope {
    /// The pinned scope in a few words, for `check`'s policy lines.
    pub fn describe(&self) -> String {
        match self {
            GateScope::PagerDuty {
                escalation_policies,
                max_level,
                schedules,
            } => {
                let mut out = String::from("PagerDuty on call");
                if !escalation_policies.is_empty() {
                    out.push_str(&format!(
                        " for escalation policy {}",
                        escalation_policies.join(" or ")
                    ));
                }
                out.push_str(&format!(" at level {max_level} or lower"));
                if !schedules.is_empty() {
                    out.push_str(&format!(" through schedule {}", schedules.join(" or ")));
                }
                out
            }
            GateScope::Opsgenie { jsm, schedules } => format!(
                "{} on call (by user ID) in schedule {}",
                if *jsm { "JSM" } else { "Opsgenie" },
                schedules.join(" or ")
            ),
            GateScope::GitHub { org, teams } => format!(
                "GitHub organization {org}, an active member of team {} (members of child teams count)",
                teams.join(" or ")
            ),
        }
    }
}

impl Gate {
    /// The provider asked: a metric label and the answer settings to use.
    pub fn via(&self) -> Via {
        match self {
            Gate::PagerDuty { .. } => Via::PagerDuty,
            Gate::Opsgenie { jsm: false, .. } => Via::Opsgenie,
            Gate::Opsgenie { jsm: true, .. } => Via::Jsm,
            Gate::GitHub { .. } => Via::GitHub,
        }
    }

    /// The scope this check was made with.
    pub fn scope(&self) -> GateScope {
        match self {
            Gate::PagerDuty {
                escalation_policies,
                max_level,
                schedules,
                ..
            } => GateScope::PagerDuty {
                escalation_policies: escalation_policies.clone(),
                max_level: max_level.unwrap_or(1),
                schedules: schedules.clone(),
            },
            Gate::Opsgenie { jsm, schedules, .. } => GateScope::Opsgenie {
                jsm: *jsm,
                schedules: schedules.clone(),
            },
            Gate::GitHub { org, teams, .. } => GateScope::GitHub {
                org: org.clone(),
                teams: teams.clone(),
            },
        }
    }

    /// The same check (the same person, incident and time) under another pinned scope;
    /// `None` when the scope is of another provider's check.
    pub fn rescoped(&self, scope: &GateScope) -> Option<Gate> {
        Some(match (self, scope) {
            (
                Gate::PagerDuty {
                    user,
                    escalation_policy,
                    incident,
                    at_ms,
                    ..
                },
                GateScope::PagerDuty {
                    escalation_policies,
                    max_level,
                    schedules,
                },
            ) => Gate::PagerDuty {
                user: user.clone(),
                escalation_policy: escalation_policy.clone(),
                incident: incident.clone(),
                escalation_policies: escalation_policies.clone(),
                max_level: Some(*max_level),
                schedules: schedules.clone(),
                at_ms: *at_ms,
            },
            (Gate::Opsgenie { user, at_ms, .. }, GateScope::Opsgenie { jsm, schedules }) => {
                Gate::Opsgenie {
                    jsm: *jsm,
                    user: user.clone(),
                    schedules: schedules.clone(),
                    at_ms: *at_ms,
                }
            }
            (Gate::GitHub { user, .. }, GateScope::GitHub { org, teams }) => Gate::GitHub {
                user: user.clone(),
                org: org.clone(),
                teams: teams.clone(),
            },
            _ => return None,
        })
    }

    /// The same check, judging the moment `at_ms` (a check made again, long after the
    /// event, asks whether the person is on call now). Team membership is always now.
    pub fn judged_at(&self, at_ms: i64) -> Gate {
        let mut gate = self.clone();
        match &mut gate {
            Gate::PagerDuty { at_ms: at, .. } | Gate::Opsgenie { at_ms: at, .. } => *at = at_ms,
            Gate::GitHub { .. } => {}
        }
        gate
    }

    /// What would be checked, in one line (`explain`, `test`).
    pub fn describe(&self) -> String {
        match self {
            Gate::PagerDuty {
                user,
                escalation_policy,
                incident,
                escalation_policies,
                max_level,
                schedules,
                at_ms,
            } => {
                let mut out = format!("PagerDuty: {} on call for ", printable(user));
                match (escalation_policy, incident) {
                    (Some(ep), _) => out.push_str(&format!("escalation policy {}", printable(ep))),
                    (None, Some(i)) => out.push_str(&format!(
                        "the escalation policy of incident {}",
                        printable(i)
                    )),
                    (None, None) => out.push_str("an escalation policy"),
                }
                if !escalation_policies.is_empty() {
                    out.push_str(&format!(" (one of {})", escalation_policies.join(", ")));
                }
                out.push_str(&format!(" at level {} or lower", max_level.unwrap_or(1)));
                if !schedules.is_empty() {
                    out.push_str(&format!(" through schedule {}", schedules.join(" or ")));
                }
                out.push_str(&format!(", as of {}", at_text(*at_ms)));
                out
            }
            Gate::Opsgenie {
                jsm,
                user,
                schedules,
                at_ms,
            } => format!(
                "{}: user {} on call in schedule {}, as of {}",
                if *jsm { "JSM" } else { "Opsgenie" },
                printable(user),
                schedules.join(" or "),
                at_text(*at_ms)
            ),
            Gate::GitHub { user, org, teams } => format!(
                "GitHub: {} an active member of {}",
                printable(user),
                org_teams(org, teams)
            ),
        }
    }
}

/// An event time in Unix milliseconds, as RFC 3339 to the second.
fn at_text(ms: i64) -> String {
    let t =
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Shortens untrusted text for a message: at most 64 characters, control characters escaped.
pub fn printable(text: &str) -> String {
    let mut out: String = text.chars().take(64).flat_map(char::escape_debug).collect();
    if text.chars().count() > 64 {
        out.push('…');
    }
    out
}

/// A GitHub organization's teams as a check names them: `acme/sre or acme/oncall`.
pub fn org_teams(org: &str, teams: &[String]) -> String {
    teams
        .iter()
        .map(|t| format!("{org}/{t}"))
        .collect::<Vec<_>>()
        .join(" or ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for ok in ["abc", "req-123", "A.b_c-9", &"a".repeat(128)] {
            assert!(Id::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "../../x",
            "a/b",
            "a%2Fb",
            ".a",
            "-a",
            "a b",
            "é",
            " a",
            "a\n",
            &"a".repeat(129),
        ] {
            assert!(Id::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn expirations() {
        for (text, secs) in [
            ("30m", 1800),
            ("2h", 7200),
            ("7d", 604_800),
            ("1w", 604_800),
            ("45s", 45),
        ] {
            assert_eq!(
                Expiration::parse(text).map(|e| e.seconds()),
                Ok(secs),
                "{text}"
            );
        }
        // Regression: a multi-byte last character once split the text inside a character.
        for bad in [
            "0h",
            "-1h",
            "1h30m",
            "h",
            "2",
            "2H",
            "02h",
            "1.5h",
            "",
            "2 h",
            "2é",
            "é",
            "2h\u{301}",
        ] {
            assert!(Expiration::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            Expiration::parse("99999999999999999999999d").map(|e| e.seconds()),
            Ok(u64::MAX)
        );
    }

    #[test]
    fn actions_ignore_case() {
        assert_eq!(Action::parse("APPROVE"), Some(Action::Approve));
        assert_eq!(Action::parse("Revoke"), Some(Action::Revoke));
        assert_eq!(Action::parse("grant"), None);
    }
}
