//! Runs a compiled mapping on one webhook: each rule's conditions, extraction and policy, per
//! `for_each` element where it has one, and the verdict with its trace for `explain`. Pure.

use std::time::SystemTime;

use super::expr::{Extract, Scope};
use super::*;

impl Mapping {
    /// The decision for one verified webhook. `now` is the clock the mapping's `freshness`
    /// check judges the event time by; `None` skips that check (test cases without `now`).
    pub fn decide(&self, input: Input<'_>, now: Option<SystemTime>) -> Verdict {
        self.run(input, now, None)
    }

    /// The decision and, for every rule tried, why it did or did not match.
    pub fn explain(&self, input: Input<'_>, now: Option<SystemTime>) -> (Verdict, Vec<RuleTrace>) {
        let mut trace = Vec::new();
        let verdict = self.run(input, now, Some(&mut trace));
        (verdict, trace)
    }

    /// Each rule's on-call check that is on: the rule, and the provider it asks.
    pub fn oncall_checks(&self) -> Vec<(&str, Via)> {
        self.rules
            .iter()
            .filter_map(|r| {
                let via = match r.oncall.as_ref()? {
                    Oncall::PagerDuty { .. } => Via::PagerDuty,
                    Oncall::Opsgenie { jsm: false, .. } => Via::Opsgenie,
                    Oncall::Opsgenie { jsm: true, .. } => Via::Jsm,
                    Oncall::GitHub { .. } => Via::GitHub,
                };
                Some((r.name.as_str(), via))
            })
            .collect()
    }

    /// The oldest event the mapping acts on (`freshness.max_age`), when it checks freshness.
    pub fn max_event_age(&self) -> Option<std::time::Duration> {
        self.freshness.as_ref().map(|f| f.max_age)
    }

    /// Why a matched rule may not act on this event: it is older (or further in the future)
    /// than the mapping's `freshness` allows. A captured delivery replayed after `max_age` is
    /// refused, whatever its dedup key.
    fn stale(&self, input: Input<'_>, now: Option<SystemTime>) -> Option<String> {
        match (&self.freshness, now) {
            (Some(fresh), Some(now)) => fresh.check(input, now).err(),
            _ => None,
        }
    }

    fn run(
        &self,
        input: Input<'_>,
        now: Option<SystemTime>,
        mut trace: Option<&mut Vec<RuleTrace>>,
    ) -> Verdict {
        let mut note = |rule: &Rule, matched: bool, detail: String| {
            if let Some(t) = trace.as_deref_mut() {
                t.push(RuleTrace {
                    rule: rule.name.clone(),
                    matched,
                    detail,
                });
            }
        };
        for rule in &self.rules {
            let Some(each) = &rule.for_each else {
                let applied = apply(rule, input.into(), now);
                // Ending a subject only takes access away, and reopening one decides nothing
                // by itself: an old or replayed such event is still honoured (and GitHub's
                // close and reopen events carry no comment time).
                let grants_nothing = rule.ends_subject.holds(input.into())
                    || matches!(
                        &applied,
                        Applied::Decided { decisions, binding, .. }
                            if decisions.is_empty() && binding.reopens_subject
                    );
                if !matches!(applied, Applied::NoMatch(_))
                    && !grants_nothing
                    && let Some(reason) = self.stale(input, now)
                {
                    note(rule, true, reason.clone());
                    return Verdict::Rejected {
                        rule: rule.name.clone(),
                        reason,
                    };
                }
                match applied {
                    Applied::NoMatch(why) => note(rule, false, why),
                    Applied::Rejected(reason, line) => {
                        note(rule, true, line);
                        return Verdict::Rejected {
                            rule: rule.name.clone(),
                            reason,
                        };
                    }
                    Applied::Decided {
                        actor,
                        decisions,
                        binding,
                        detail,
                    } => {
                        note(rule, true, detail);
                        return Verdict::Decided {
                            rule: rule.name.clone(),
                            actor,
                            decisions,
                            elements: Vec::new(),
                            binding,
                        };
                    }
                }
                continue;
            };
            let nodes = each.path.nodes(input.into());
            // Each deciding element with its own decisions; the first refusal, if any.
            let mut decided: Vec<(Element, Vec<Decision>)> = Vec::new();
            let mut refused: Option<String> = None;
            let mut skipped = Vec::new();
            for (i, node) in nodes.iter().enumerate() {
                let scope = Scope {
                    input,
                    element: Some(node),
                };
                match apply(rule, scope, now) {
                    Applied::NoMatch(why) => skipped.push(format!("element {}: {why}", i + 1)),
                    Applied::Rejected(reason, line) => {
                        note(rule, true, format!("element {}: {line}", i + 1));
                        refused.get_or_insert_with(|| {
                            format!("element {} of {}: {reason}", i + 1, each.path.describe())
                        });
                    }
                    Applied::Decided {
                        actor,
                        decisions: ds,
                        binding,
                        ..
                    } => decided.push((
                        Element {
                            key: each.key(scope),
                            actor,
                            decisions: ds.len(),
                            binding,
                        },
                        ds,
                    )),
                }
            }
            if decided.is_empty() && refused.is_none() {
                let why = if nodes.is_empty() {
                    format!("for_each {} yielded nothing", each.path.describe())
                } else {
                    format!("no element decided ({})", skipped.join("; "))
                };
                note(rule, false, why);
                continue;
            }
            // A refused element refuses the elements that grant, and so does a stale event;
            // the elements that end their subjects still end them, since an end refused here
            // is never sent again (alert groups mix firing alerts with resolved ones).
            let grants = decided.iter().any(|(e, _)| !e.binding.ends_subject);
            let refusal = match refused {
                Some(reason) => Some(reason),
                None if grants => self.stale(input, now),
                None => None,
            };
            if let Some(reason) = refusal {
                decided.retain(|(e, _)| e.binding.ends_subject);
                if decided.is_empty() {
                    note(rule, true, reason.clone());
                    return Verdict::Rejected {
                        rule: rule.name.clone(),
                        reason,
                    };
                }
                note(
                    rule,
                    true,
                    format!("{reason}; the elements that end their subjects still do"),
                );
            }
            let mut elements = Vec::with_capacity(decided.len());
            let mut decisions = Vec::new();
            for (e, mut ds) in decided {
                elements.push(e);
                decisions.append(&mut ds);
            }
            note(
                rule,
                true,
                format!(
                    "{} decision(s) from {} of {} element(s)",
                    decisions.len(),
                    elements.len(),
                    nodes.len()
                ),
            );
            return Verdict::Decided {
                rule: rule.name.clone(),
                actor: elements[0].actor.clone(),
                binding: elements[0].binding.clone(),
                decisions,
                elements,
            };
        }
        Verdict::Ignored
    }

    /// What of a body this mapping reads: parse bodies with it (`Projection::parse`) to build
    /// only that; evaluation on the result is the same as on the whole document.
    pub fn projection(&self) -> &projection::Projection {
        &self.projection
    }

    /// The delivery's dedup key: the first `dedup` alternative whose parts are all present
    /// (`name:` then the parts joined with `|`), else a digest of the body (the same bytes
    /// delivered twice are the same delivery).
    pub fn dedup_key(&self, input: Input<'_>, body: &[u8]) -> String {
        self.dedup.key(input, body)
    }

    /// How many elements the sender says it left out of this delivery (`truncated`), when
    /// it says so and the number is above zero.
    pub fn truncated(&self, input: Input<'_>) -> Option<u64> {
        let values = self.truncated.as_ref()?.values_in(input.into());
        let n = values.first()?.parse::<u64>().ok()?;
        (n > 0).then_some(n)
    }
}

/// The longest subject a decision may be bound to, in bytes.
const MAX_SUBJECT: usize = 256;

/// Runs one rule's conditions, extraction and policy on one scope; `now` (the time of
/// receipt) is when an on-call check judges an event that carries no time of its own.
fn apply(rule: &Rule, scope: Scope<'_>, now: Option<SystemTime>) -> Applied {
    let ends = rule.ends_subject.holds(scope);
    // An event that both ends and reopens (conditions that overlap) ends: the safe reading.
    let reopens = !ends && rule.reopens_subject.holds(scope);
    for (i, cond) in rule.when.iter().enumerate() {
        if !cond.holds(scope) {
            return Applied::NoMatch(format!(
                "condition {} failed: {} (saw {})",
                i + 1,
                cond.describe(),
                cond.seen(scope)
            ));
        }
    }
    let proposals = match &rule.produce {
        Produce::Command(sel) => {
            let mut proposals = Vec::new();
            for text in sel.values_in(scope) {
                match command::parse(&text) {
                    Ok(cmds) => proposals.extend(cmds.into_iter().map(|c| Proposal {
                        action: c.action.as_str().to_owned(),
                        request_id: c.request_id,
                        expiration: c.duration,
                    })),
                    Err(reason) => {
                        let reason = format!("malformed /p0 command: {reason}");
                        return Applied::Rejected(reason.clone(), reason);
                    }
                }
            }
            if proposals.is_empty() {
                return Applied::NoMatch(format!("no /p0 command in {}", sel.describe()));
            }
            proposals
        }
        Produce::Nothing => Vec::new(),
        Produce::Fields(f) => {
            match fields(scope, &f.action, &f.request_id, f.expiration.as_ref()) {
                Ok(p) => p,
                // An ending event may name a request too; when it names none, only the end's
                // own revocations are made.
                Err(_) if ends => Vec::new(),
                Err(reason) => return Applied::Rejected(reason.clone(), reason),
            }
        }
    };
    let actor = rule
        .actor
        .as_ref()
        .and_then(|sel| sel.values_in(scope).into_iter().next())
        .map(|a| a.into_owned());
    let subject = match rule.subject.as_ref().map(|s| s.first(scope)) {
        None => None,
        // Subjects name incidents, alerts and issues; a longer one is not one of those, and
        // could not be stored in the index that finds what an end revokes.
        Some(Ok(s)) if s.len() > MAX_SUBJECT => {
            let reason = format!("subject: longer than {MAX_SUBJECT} bytes");
            return Applied::Rejected(reason.clone(), reason);
        }
        Some(Ok(s)) => Some(s),
        // A grant of a rule whose subject can end must be bound to it, or no end revokes it.
        Some(Err(why))
            if ends
                || reopens
                || !matches!(rule.ends_subject, Flag::Never)
                || !matches!(rule.reopens_subject, Flag::Never) =>
        {
            let reason = format!("subject: {why}");
            return Applied::Rejected(reason.clone(), reason);
        }
        Some(Err(_)) => None,
    };
    let reply = match (&rule.answer, &subject) {
        (Some(a), Some(_)) => Some(Reply {
            via: a.via,
            comment: a.comment.as_ref().and_then(|c| c.first(scope).ok()),
        }),
        _ => None,
    };
    // Only a grant is checked against who is on call; ending access never is.
    let gate = match (&rule.oncall, &actor) {
        (Some(o), Some(user)) if !ends && grants(&proposals) => match gate(o, user, scope, now) {
            Ok(g) => Some(Box::new(g)),
            Err(why) => {
                let reason = format!("oncall: {why}");
                return Applied::Rejected(reason.clone(), reason);
            }
        },
        _ => None,
    };
    let binding = Binding {
        subject,
        reply,
        ends_subject: ends,
        reopens_subject: reopens,
        gate,
    };
    // Ending access is always allowed: approver lists gate grants, not revocations.
    let decided = if ends {
        policy::decide_revocations(&rule.policy, &proposals)
    } else {
        policy::decide(&rule.policy, actor.as_deref(), &proposals)
    };
    match decided {
        Ok(decisions) => {
            let mut detail = format!("{} decision(s)", decisions.len());
            match &binding.subject {
                Some(s) => detail.push_str(&format!("; subject `{}`", printable(s))),
                None => detail.push_str("; no subject"),
            }
            if binding.ends_subject {
                detail.push_str(
                    "; ends the subject: every request approved under it and not yet revoked is revoked, and later approves under it are refused",
                );
            }
            if binding.reopens_subject {
                detail.push_str(
                    "; reopens the subject if it ended: approves under it are taken again",
                );
            }
            if let Some(g) = &binding.gate {
                detail.push_str(&format!(
                    "; approves are sent only once the worker has checked: {}",
                    g.describe()
                ));
            }
            Applied::Decided {
                actor,
                decisions,
                binding,
                detail,
            }
        }
        Err(reason) => {
            let line = format!("refused: {reason}");
            Applied::Rejected(reason, line)
        }
    }
}

/// Whether any proposal asks to approve.
fn grants(proposals: &[Proposal]) -> bool {
    proposals
        .iter()
        .any(|p| p.action.trim().eq_ignore_ascii_case("approve"))
}

/// The on-call check of one event: its values extracted, as of the event's time.
fn gate(o: &Oncall, user: &str, scope: Scope<'_>, now: Option<SystemTime>) -> Result<Gate, String> {
    let at_ms = |at: &Option<Selector>| -> Result<i64, String> {
        let ms = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        };
        let Some(sel) = at else {
            return Ok(now.map_or(0, ms));
        };
        let Some(text) = sel.values_in(scope).into_iter().next() else {
            return Ok(now.map_or(0, ms));
        };
        if let Ok(n) = text.parse::<i64>() {
            // A Unix time, its unit read from its size (Opsgenie's `updatedAt` is nanoseconds,
            // its `createdAt` milliseconds): seconds until 5138, then ms, µs and ns.
            return Ok(if n < 100_000_000_000 {
                n.saturating_mul(1000)
            } else if n < 100_000_000_000_000 {
                n
            } else if n < 100_000_000_000_000_000 {
                n / 1000
            } else {
                n / 1_000_000
            });
        }
        super::replay::parse_rfc3339(&text).map(ms).ok_or_else(|| {
            format!(
                "at: `{}` ({}) is not RFC 3339 or a Unix time",
                printable(&text),
                sel.describe()
            )
        })
    };
    if user.is_empty() || user.len() > 256 {
        return Err("the actor is empty or longer than 256 bytes".into());
    }
    Ok(match o {
        Oncall::PagerDuty {
            escalation_policy,
            incident,
            max_level,
            schedules,
            at,
        } => {
            let escalation_policy = escalation_policy.as_ref().and_then(|e| e.first(scope).ok());
            let incident = incident.as_ref().and_then(|e| e.first(scope).ok());
            if escalation_policy.is_none() && incident.is_none() {
                return Err("no escalation policy and no incident in the event".into());
            }
            Gate::PagerDuty {
                user: user.to_owned(),
                escalation_policy,
                incident,
                max_level: *max_level,
                schedules: schedules.clone(),
                at_ms: at_ms(at)?,
            }
        }
        Oncall::Opsgenie { jsm, schedules, at } => Gate::Opsgenie {
            jsm: *jsm,
            user: user.to_owned(),
            schedules: schedules.clone(),
            at_ms: at_ms(at)?,
        },
        Oncall::GitHub { org, teams } => Gate::GitHub {
            user: user.to_owned(),
            org: org.first(scope).map_err(|e| format!("org: {e}"))?,
            teams: teams.clone(),
        },
    })
}

fn fields(
    input: Scope<'_>,
    action: &Extract,
    request_id: &Extract,
    expiration: Option<&Extract>,
) -> Result<Vec<Proposal>, String> {
    let action = action.first(input).map_err(|e| format!("action: {e}"))?;
    let ids = request_id
        .all(input)
        .map_err(|e| format!("request_id: {e}"))?;
    let expiration = expiration
        .map(|e| e.first(input))
        .transpose()
        .map_err(|e| format!("expiration: {e}"))?;
    Ok(ids
        .into_iter()
        .map(|request_id| Proposal {
            action: action.clone(),
            request_id,
            expiration: expiration.clone(),
        })
        .collect())
}
