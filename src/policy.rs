//! Policy, pure: who may act, which actions a rule may take, how long access may last, and
//! which IDs are acceptable. Turns a mapping's proposals into decisions or one refusal.

use std::collections::BTreeSet;

use serde::Serialize;

use crate::domain::{Action, Expiration, Id, printable};

/// Actors allowed to act through a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowlist {
    /// Any authenticated event acts (`*`, or an approvers variable left unset on purpose).
    Anyone,
    /// Only these; an empty set means nobody.
    Only(BTreeSet<String>),
}

impl Allowlist {
    /// `*` means anyone; otherwise a comma-separated list, where empty means nobody.
    pub fn parse(list: &str) -> Allowlist {
        if list.trim() == "*" {
            return Allowlist::Anyone;
        }
        Allowlist::Only(
            list.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
        )
    }

    pub fn allows(&self, actor: &str) -> bool {
        match self {
            Allowlist::Anyone => true,
            Allowlist::Only(set) => set.contains(actor),
        }
    }
}

/// The limits one rule imposes, compiled from its mapping and the relay's defaults.
#[derive(Debug, Clone)]
pub struct RulePolicy {
    /// `None`: the rule names no actor, so any authenticated event acts.
    pub actors: Option<Allowlist>,
    pub actions: Vec<Action>,
    pub default_expiration: Expiration,
    pub max_expiration: Option<Expiration>,
    pub org: Id,
}

/// What a mapping rule asks for, as extracted from the payload: untrusted text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proposal {
    pub action: String,
    pub request_id: String,
    pub expiration: Option<String>,
}

/// A decision the relay will carry out.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub org: Id,
    pub request_id: Id,
    pub action: Action,
    pub expiration: Option<Expiration>,
    /// The longer expiration that was asked for, when it was clamped to the rule's maximum.
    pub clamped_from: Option<Expiration>,
}

/// Applies `policy` to every proposal: all become decisions, or the first refusal is returned
/// and nothing is decided.
pub fn decide(
    policy: &RulePolicy,
    actor: Option<&str>,
    proposals: &[Proposal],
) -> Result<Vec<Decision>, String> {
    check_actor(policy, actor)?;
    decide_proposals(policy, proposals)
}

/// The decisions of an event that ends its subject: the approver list is not consulted,
/// because ending access is always allowed, and for that reason such an event only revokes:
/// anything else it names is dropped, as is a malformed request ID, so that nothing it names
/// keeps the subject from ending (the end's own revocations are the store's).
pub fn decide_revocations(
    policy: &RulePolicy,
    proposals: &[Proposal],
) -> Result<Vec<Decision>, String> {
    let revocations: Vec<Proposal> = proposals
        .iter()
        .filter(|p| {
            Action::parse(&p.action) == Some(Action::Revoke) && Id::parse(&p.request_id).is_ok()
        })
        .cloned()
        .collect();
    decide_proposals(policy, &revocations)
}

fn check_actor(policy: &RulePolicy, actor: Option<&str>) -> Result<(), String> {
    if let Some(allowlist) = &policy.actors {
        match actor {
            Some(a) if allowlist.allows(a) => {}
            Some(a) => {
                return Err(format!("actor `{}` is not allowed to act", printable(a)));
            }
            None if *allowlist == Allowlist::Anyone => {}
            None => return Err("the event names no actor, and only listed actors may act".into()),
        }
    }
    Ok(())
}

fn decide_proposals(policy: &RulePolicy, proposals: &[Proposal]) -> Result<Vec<Decision>, String> {
    let org = &policy.org;
    let mut decisions: Vec<Decision> = Vec::with_capacity(proposals.len());
    for p in proposals {
        let action = Action::parse(&p.action)
            .ok_or_else(|| format!("unknown action `{}`", printable(&p.action)))?;
        if !policy.actions.contains(&action) {
            return Err(format!("action `{action}` is not allowed by this rule"));
        }
        let request_id = Id::parse(&p.request_id).map_err(|e| format!("request ID {e}"))?;
        let (expiration, clamped_from) = if action == Action::Approve {
            let asked = match &p.expiration {
                Some(text) => Expiration::parse(text)?,
                None => policy.default_expiration.clone(),
            };
            match &policy.max_expiration {
                Some(max) if asked.seconds() > max.seconds() => (Some(max.clone()), Some(asked)),
                _ => (Some(asked), None),
            }
        } else {
            (None, None)
        };
        let decision = Decision {
            org: org.clone(),
            request_id,
            action,
            expiration,
            clamped_from,
        };
        if !decisions.contains(&decision) {
            decisions.push(decision);
        }
    }
    Ok(decisions)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(actors: Option<&str>) -> RulePolicy {
        RulePolicy {
            actors: actors.map(Allowlist::parse),
            actions: vec![Action::Approve, Action::Revoke],
            default_expiration: Expiration::parse("1h").unwrap(),
            max_expiration: Some(Expiration::parse("12h").unwrap()),
            org: Id::parse("acme").unwrap(),
        }
    }

    fn ask(action: &str, id: &str, exp: Option<&str>) -> Proposal {
        Proposal {
            action: action.into(),
            request_id: id.into(),
            expiration: exp.map(Into::into),
        }
    }

    fn one(
        actors: Option<&str>,
        actor: Option<&str>,
        p: Proposal,
    ) -> Result<(Action, Option<String>, Option<String>), String> {
        decide(&policy(actors), actor, &[p]).map(|d| {
            (
                d[0].action,
                d[0].expiration.as_ref().map(ToString::to_string),
                d[0].clamped_from.as_ref().map(ToString::to_string),
            )
        })
    }

    #[test]
    fn table() {
        // Long on purpose: one table of policy cases, each row its own case.
        use Action::*;
        let s = |x: &str| Some(x.to_string());
        type Want = Result<(Action, Option<String>, Option<String>), &'static str>;
        type Case<'a> = (Option<&'a str>, Option<&'a str>, Proposal, Want);
        // A case with no approver list and no actor.
        let anyone = |p: Proposal, want: Want| -> Case<'_> { (None, None, p, want) };
        let cases: Vec<Case<'_>> = vec![
            (
                Some("alice,bob"),
                Some("bob"),
                ask("approve", "r1", Some("2h")),
                Ok((Approve, s("2h"), None)),
            ),
            (
                Some("alice"),
                Some("mallory"),
                ask("approve", "r1", None),
                Err("`mallory` is not allowed"),
            ),
            (
                Some(""),
                Some("alice"),
                ask("approve", "r1", None),
                Err("not allowed"),
            ),
            (
                Some("alice"),
                None,
                ask("approve", "r1", None),
                Err("names no actor"),
            ),
            (
                Some("*"),
                None,
                ask("approve", "r1", None),
                Ok((Approve, s("1h"), None)),
            ),
            (
                None,
                Some("anyone"),
                ask("approve", "r1", None),
                Ok((Approve, s("1h"), None)),
            ),
            anyone(
                ask("approve", "r1", Some("24h")),
                Ok((Approve, s("12h"), s("24h"))),
            ),
            anyone(
                ask("approve", "r1", Some("99999999999d")),
                Ok((Approve, s("12h"), s("99999999999d"))),
            ),
            anyone(
                ask("approve", "r1", Some("0h")),
                Err("not a positive whole number"),
            ),
            anyone(
                ask("approve", "r1", Some("-1h")),
                Err("not a positive whole number"),
            ),
            anyone(
                ask("approve", "r1", Some("1h30m")),
                Err("not a positive whole number"),
            ),
            anyone(ask("revoke", "r1", Some("2h")), Ok((Revoke, None, None))),
            anyone(ask("deny", "r1", None), Err("`deny` is not allowed")),
            anyone(ask("grant", "r1", None), Err("unknown action")),
            anyone(ask("approve", "../../x", None), Err("request ID")),
            anyone(ask("approve", "a%2Fb", None), Err("request ID")),
        ];
        for (i, (actors, actor, p, want)) in cases.into_iter().enumerate() {
            let got = one(actors, actor, p);
            match (&got, &want) {
                (Ok(g), Ok(w)) => assert_eq!(g, w, "case {i}"),
                (Err(g), Err(w)) => assert!(g.contains(w), "case {i}: {g}"),
                _ => panic!("case {i}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn all_or_nothing() {
        let got = decide(
            &policy(None),
            None,
            &[ask("approve", "ok-1", None), ask("approve", "bad/2", None)],
        );
        assert!(got.is_err());
        let twice = decide(
            &policy(None),
            None,
            &[ask("approve", "a", None), ask("approve", "a", None)],
        );
        assert_eq!(twice.map(|d| d.len()), Ok(1));
    }
}
