//! What to answer and where, once P0 has answered a decision: pure, values in, answers out.
//! GitHub gets a reaction on the comment that asked (and a comment on a refusal, or when no
//! comment asked); PagerDuty a note on the incident; Opsgenie and JSM a note on the alert.

use serde_json::json;

use crate::domain::{Action, Expiration, Via};
use crate::store::{Job, NewAnswer};

/// The final answer for a decision, as far as the asker needs to know it: P0's, or the
/// relay's own refusal before any call (the decision's subject had ended).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Final<'a> {
    Done,
    Refused {
        status: Option<u16>,
        reason: &'a str,
    },
    NotSent {
        reason: &'a str,
    },
}

/// The answers for `job` after P0's final answer, through the providers in `enabled`. None
/// when the decision has no reply target, its provider is off, or the target is not one the
/// provider's API can name.
pub fn answers(job: &Job, outcome: &Final<'_>, enabled: &[Via]) -> Vec<NewAnswer> {
    let Some(reply) = &job.reply else {
        return Vec::new();
    };
    // A subject becomes a path segment of the provider's URL: never `.`/`..`, never huge.
    let Some(subject) = job
        .subject
        .as_deref()
        .filter(|s| !s.is_empty() && s.len() <= 200 && *s != "." && *s != "..")
    else {
        return Vec::new();
    };
    if !enabled.contains(&reply.via) {
        return Vec::new();
    }
    // Said as its reader knows it: a GitHub issue by its repository's name.
    let text = message(job, reply.on.as_deref().unwrap_or(subject), outcome);
    let via = reply.via.as_str().to_owned();
    match reply.via {
        Via::GitHub => {
            // The subject binds to the repository's ID; the answer goes to the issue by the
            // name its repository had when the decision was asked (`on`).
            let on = reply.on.as_deref().unwrap_or(subject);
            let Some((repo, number)) = github_issue(on) else {
                tracing::warn!(
                    job_id = job.id,
                    "no answer back: where to answer is not owner/repo#number"
                );
                return Vec::new();
            };
            let comment = reply.comment.as_deref().filter(|c| {
                !c.is_empty() && c.len() <= 20 && c.bytes().all(|b| b.is_ascii_digit())
            });
            let mut out = Vec::new();
            let done = *outcome == Final::Done;
            if let Some(comment) = comment.filter(|_| !job.bound) {
                out.push(NewAnswer {
                    via: via.clone(),
                    kind: "reaction".into(),
                    target: json!({ "repo": repo, "number": number, "comment": comment })
                        .to_string(),
                    body: json!({ "content": if done { "+1" } else { "-1" } }).to_string(),
                });
                if done {
                    return out;
                }
            }
            out.push(NewAnswer {
                via,
                kind: "comment".into(),
                target: json!({ "repo": repo, "number": number }).to_string(),
                body: json!({ "body": text }).to_string(),
            });
            out
        }
        Via::PagerDuty => vec![NewAnswer {
            via,
            kind: "note".into(),
            target: json!({ "incident": subject }).to_string(),
            body: json!({ "note": { "content": text } }).to_string(),
        }],
        Via::Opsgenie | Via::Jsm => vec![NewAnswer {
            via,
            kind: "note".into(),
            target: json!({ "alert": subject }).to_string(),
            body: json!({ "note": text, "user": "p0-relay", "source": "p0-relay" }).to_string(),
        }],
    }
}

/// `owner/repo#number` split into the repository and the issue or pull request number;
/// `None` unless both are what GitHub's names can be.
pub fn github_issue(subject: &str) -> Option<(String, u64)> {
    let (repo, number) = subject.rsplit_once('#')?;
    let (owner, name) = repo.split_once('/')?;
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 100
            && s != "."
            && s != ".."
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    };
    if !ok(owner) || !ok(name) {
        return None;
    }
    Some((repo.to_owned(), number.parse().ok()?))
}

/// One short line: the request, what P0 did (and for how long), or why it refused. Nothing
/// secret goes in; text from a sender or from P0 is made safe first.
pub fn message(job: &Job, subject: &str, outcome: &Final<'_>) -> String {
    let id = safe(job.request_id.as_str(), 128);
    match outcome {
        Final::Done => match job.action {
            Action::Approve => match job.expiration.as_ref().map(Expiration::as_str) {
                Some(e) => format!(
                    "p0-relay: P0 approved request {id}; access expires in {}.",
                    safe(e, 16)
                ),
                None => format!("p0-relay: P0 approved request {id}."),
            },
            Action::Deny => format!("p0-relay: P0 denied request {id}."),
            Action::Revoke if job.bound => format!(
                "p0-relay: P0 revoked request {id}: access granted under {} ends with it.",
                safe(subject, 128)
            ),
            Action::Revoke => format!("p0-relay: P0 revoked request {id}."),
        },
        Final::Refused { status, reason } => {
            let code = status.map(|s| format!(" (HTTP {s})")).unwrap_or_default();
            format!(
                "p0-relay: P0 refused to {} request {id}{code}: {}",
                job.action,
                safe(reason, 300)
            )
        }
        Final::NotSent { reason } if job.action == Action::Revoke => format!(
            "p0-relay: did not revoke request {id}, and did not ask P0: {}.",
            safe(reason, 300)
        ),
        Final::NotSent { reason } => format!(
            "p0-relay: refused to {} request {id}, and did not ask P0: {}.",
            job.action,
            safe(reason, 300)
        ),
    }
}

/// Text from outside made safe to post: control characters dropped, mentions, markup and
/// links defused, at most `max` characters.
pub fn safe(text: &str, max: usize) -> String {
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i >= max {
            out.push('…');
            break;
        }
        match c {
            c if c.is_control() => out.push(' '),
            // A zero-width space after `@` and `#` stops mentions and issue links.
            '@' | '#' => {
                out.push(c);
                out.push('\u{200b}');
            }
            '`' => out.push('\''),
            '<' => out.push('‹'),
            '>' => out.push('›'),
            '[' => out.push('('),
            ']' => out.push(')'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Id;

    fn job(action: Action, reply: &str, subject: &str) -> Job {
        Job {
            id: 1,
            source: "github".into(),
            org: Id::parse("acme").unwrap(),
            request_id: Id::parse("req-1").unwrap(),
            action,
            expiration: Some(Expiration::parse("2h").unwrap()),
            attempts: 1,
            accepted_at_ms: 0,
            window_start_ms: 0,
            claim_token: 1,
            subject: Some(subject.into()),
            reply: Some(serde_json::from_str(reply).unwrap()),
            bound: false,
            refused: None,
            gate: Ok(None),
            evidence: None,
            checked_at_ms: None,
            rule: None,
            actor: None,
            delivery: None,
        }
    }

    #[test]
    fn github_reacts_and_comments_on_refusal() {
        let j = job(
            Action::Approve,
            r#"{"via":"github","comment":"1710001"}"#,
            "acme/infra#42",
        );
        let all = [Via::GitHub];
        let done = answers(&j, &Final::Done, &all);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].kind, "reaction");
        assert_eq!(done[0].body, r#"{"content":"+1"}"#);
        let refused = answers(
            &j,
            &Final::Refused {
                status: Some(400),
                reason: "Invalid or expired request @team `x`",
            },
            &all,
        );
        assert_eq!(refused.len(), 2);
        assert_eq!(refused[0].body, r#"{"content":"-1"}"#);
        assert!(refused[1].body.contains("HTTP 400"), "{}", refused[1].body);
        assert!(!refused[1].body.contains("@team"), "{}", refused[1].body);
        assert!(answers(&j, &Final::Done, &[Via::PagerDuty]).is_empty());
    }

    #[test]
    fn a_review_command_or_a_subject_end_is_answered_with_a_comment() {
        let mut j = job(Action::Approve, r#"{"via":"github"}"#, "acme/infra#77");
        let done = answers(&j, &Final::Done, &[Via::GitHub]);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].kind, "comment");
        assert_eq!(done[0].target, r#"{"number":77,"repo":"acme/infra"}"#);
        assert_eq!(
            done[0].body,
            r#"{"body":"p0-relay: P0 approved request req-1; access expires in 2h."}"#
        );
        // A subject bound to the repository's ID is answered on the issue by its name.
        let by_id = job(
            Action::Approve,
            r#"{"via":"github","on":"acme/renamed#77"}"#,
            "70112233#77",
        );
        let done = answers(&by_id, &Final::Done, &[Via::GitHub]);
        assert_eq!(done[0].target, r#"{"number":77,"repo":"acme/renamed"}"#);
        j.action = Action::Revoke;
        j.bound = true;
        j.reply = Some(serde_json::from_str(r#"{"via":"github","comment":"5"}"#).unwrap());
        let done = answers(&j, &Final::Done, &[Via::GitHub]);
        assert_eq!(
            done.iter().map(|a| a.kind.as_str()).collect::<Vec<_>>(),
            vec!["comment"],
            "a revocation by subject end is not a reaction to someone's comment"
        );
    }

    #[test]
    fn subjects_that_are_not_issues_get_no_github_answer() {
        for bad in ["acme#1", "a/b/c#1", "../x#1", "acme/infra#x", "acme/infra"] {
            assert!(github_issue(bad).is_none(), "{bad}");
        }
        assert_eq!(
            github_issue("acme/infra#42"),
            Some(("acme/infra".into(), 42))
        );
    }
}
