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
                let via = match r.oncall.as_ref()?.scope() {
                    GateScope::PagerDuty { .. } => Via::PagerDuty,
                    GateScope::Opsgenie { jsm: false, .. } => Via::Opsgenie,
                    GateScope::Opsgenie { jsm: true, .. } => Via::Jsm,
                    GateScope::GitHub { .. } => Via::GitHub,
                };
                Some((r.name.as_str(), via))
            })
            .collect()
    }

    /// The pinned scope of `rule`'s on-call check on this relay, when it has one that is on:
    /// the worker checks every approve of the rule against it, whichever relay stored it.
    pub fn gate_scope(&self, rule: &str) -> Option<&GateScope> {
        self.rules
            .iter()
            .find(|r| r.name == rule)
            .and_then(|r| r.oncall.as_ref())
            .map(Oncall::scope)
    }

    /// Why `rule` of this relay's mapping does not let `actor` grant, when it does not: the
    /// worker asks before it sends an approve another relay (or an older release, or this
    /// one before a change of settings) stored, so every relay applies its own list.
    pub fn grant_refusal(&self, rule: &str, actor: Option<&str>) -> Option<String> {
        let rule = self.rules.iter().find(|r| r.name == rule)?;
        if let Some(off) = &rule.actorless {
            return (!off.on).then(|| {
                format!(
                    "grants without an actor are off for rule `{}` on this relay ({}=on turns them on)",
                    rule.name, off.switch
                )
            });
        }
        let allow = rule.policy.actors.as_ref()?;
        match actor.filter(|a| !a.trim().is_empty()) {
            Some(a) if allow.allows(a) => None,
            Some(a) => Some(format!(
                "actor `{}` may not approve through rule `{}` on this relay",
                printable(a),
                rule.name
            )),
            None => Some(format!(
                "no actor, and rule `{}` on this relay grants only to named ones",
                rule.name
            )),
        }
    }

    /// Whether someone may grant through this mapping, and its grants are judged at receipt
    /// though its verification signs the body and no time: a delivery captured once could be
    /// replayed to grant again once the store has forgotten it (after the dedup window).
    pub fn replayable_grants(&self) -> bool {
        self.rules.iter().any(|r| r.open)
            && self.freshness.max_age.is_some()
            && !self.freshness.signed()
            && self.verifier.signs_body()
            && self.verifier.signed_time_tolerance().is_none()
    }

    /// The oldest grant the mapping acts on (`freshness.max_age`); `None` when that check is
    /// off.
    pub fn max_event_age(&self) -> Option<std::time::Duration> {
        self.freshness.max_age
    }

    /// The oldest grant the mapping acts on when it judges a time the provider signed: a
    /// replay of a delivery the store forgot would carry that time. (Judged at receipt, every
    /// delivery is as fresh as it arrives; what stops a replay there is the token.)
    pub fn signed_max_age(&self) -> Option<std::time::Duration> {
        self.freshness.max_age.filter(|_| self.freshness.signed())
    }

    /// The effective grant policy of every rule that may approve, one line each: who may
    /// grant, through which on-call check and its pinned scope, how fresh, how long.
    pub fn policy(&self) -> Vec<String> {
        self.rules
            .iter()
            .filter_map(|r| {
                let who = r.grants.as_ref()?;
                let gate = r
                    .oncall
                    .as_ref()
                    .map_or("off".to_owned(), |o| o.scope().describe());
                let fresh = self.freshness_words();
                let cap = r
                    .policy
                    .max_expiration
                    .as_ref()
                    .map_or("none".to_owned(), ToString::to_string);
                Some(format!(
                    "{}/{}: grants: {who}; gate: {gate}; fresh: {fresh}; cap: {cap}",
                    self.source, r.name
                ))
            })
            .collect()
    }

    /// How fresh a grant must be, in a few words: the age and the time judged, or why there
    /// is no age to judge.
    fn freshness_words(&self) -> String {
        let Some(age) = self.freshness.max_age else {
            return "off (max_age 0)".to_owned();
        };
        if self.freshness.signed() {
            return format!(
                "{}, on {}",
                humantime::format_duration(age),
                self.freshness.judged_on()
            );
        }
        match self.verifier.signed_time_tolerance() {
            Some(t) => format!(
                "at receipt, within the {} its signed timestamp allows",
                humantime::format_duration(t)
            ),
            None if self.verifier.signs_body() => "none: judged at receipt, and its signature covers no time, so a delivery replayed after store.dedup_window grants again".to_owned(),
            None => "none: judged at receipt (whoever holds the token writes the body, times included)".to_owned(),
        }
    }

    /// Why a grant may not act on this event: it is older (or further in the future) than the
    /// mapping's `freshness` allows. A captured delivery replayed after `max_age` is refused,
    /// whatever its dedup key.
    fn stale(&self, input: Input<'_>, now: Option<SystemTime>) -> Option<String> {
        now.and_then(|now| self.freshness.check(input, now).err())
    }

    fn run(
        &self,
        input: Input<'_>,
        now: Option<SystemTime>,
        trace: Option<&mut Vec<RuleTrace>>,
    ) -> Verdict {
        let mut trace = Trace(trace);
        let event = Event {
            input,
            now,
            // The moment an on-call check judges: the signed event time, or the receipt.
            judged: self.freshness.event_time(input, now),
        };
        for rule in &self.rules {
            let verdict = match &rule.for_each {
                None => self.whole(rule, &event, &mut trace),
                Some(each) => self.each(rule, each, &event, &mut trace),
            };
            if let Some(verdict) = verdict {
                return verdict;
            }
        }
        Verdict::Ignored
    }

    /// `rule` on the whole webhook; `None` when it does not match.
    fn whole(&self, rule: &Rule, event: &Event<'_>, trace: &mut Trace<'_>) -> Option<Verdict> {
        match apply(rule, event.input.into(), event.judged) {
            Applied::NoMatch(why) => {
                trace.note(rule, false, why);
                None
            }
            Applied::Rejected(refusal) => {
                trace.note(rule, true, refusal.line.clone());
                Some(refusal.verdict(rule))
            }
            Applied::Decided {
                actor,
                decisions,
                binding,
                detail,
            } => {
                // Ending a subject, revoking and denying take access away, and a reopening
                // grants nothing: only approves must be fresh. A stale one is stored refused,
                // to be answered back, and never sent.
                let refused = (!binding.ends_subject && grants(&decisions))
                    .then(|| self.stale(event.input, event.now))
                    .flatten();
                let detail = match &refused {
                    Some(reason) => format!("{detail}; refused: {reason}"),
                    None => detail,
                };
                trace.note(rule, true, detail);
                Some(Verdict::Decided {
                    rule: rule.name.clone(),
                    actor,
                    decisions,
                    elements: Vec::new(),
                    binding,
                    refused,
                })
            }
        }
    }

    /// A `for_each` rule, on each element; `None` when no element decides.
    fn each(
        &self,
        rule: &Rule,
        each: &ForEach,
        event: &Event<'_>,
        trace: &mut Trace<'_>,
    ) -> Option<Verdict> {
        let nodes = each.path.nodes(event.input.into());
        let Elements {
            mut decided,
            refused,
            skipped,
        } = Elements::of(rule, each, &nodes, event, trace);
        if decided.is_empty() && refused.is_none() {
            let why = if nodes.is_empty() {
                format!("for_each {} yielded nothing", each.path.describe())
            } else {
                format!("no element decided ({})", skipped.join("; "))
            };
            trace.note(rule, false, why);
            return None;
        }
        // A refused element refuses the elements that grant; the elements that end their
        // subjects still end them, since an end refused here is never sent again (alert
        // groups mix firing alerts with resolved ones).
        if let Some(refusal) = refused {
            decided.retain(|(e, _)| e.binding.ends_subject);
            if decided.is_empty() {
                trace.note(rule, true, refusal.reason.clone());
                return Some(refusal.verdict(rule));
            }
            let still = format!(
                "{}; the elements that end their subjects still do",
                refusal.reason
            );
            trace.note(rule, true, still);
        }
        Some(self.elements_decided(rule, decided, nodes.len(), event, trace))
    }

    /// The verdict of the elements that decided: a stale event's granting elements are
    /// stored refused, to be answered back.
    fn elements_decided(
        &self,
        rule: &Rule,
        decided: Vec<(Element, Vec<Decision>)>,
        of: usize,
        event: &Event<'_>,
        trace: &mut Trace<'_>,
    ) -> Verdict {
        let stale = self.stale(event.input, event.now);
        let mut elements = Vec::with_capacity(decided.len());
        let mut decisions = Vec::new();
        for (mut e, mut ds) in decided {
            if !e.binding.ends_subject && grants(&ds) {
                e.refused.clone_from(&stale);
            }
            elements.push(e);
            decisions.append(&mut ds);
        }
        let refusal = match (&stale, elements.iter().any(|e| e.refused.is_some())) {
            (Some(why), true) => format!("; those that grant refused: {why}"),
            _ => String::new(),
        };
        let line = format!(
            "{} decision(s) from {} of {of} element(s){refusal}",
            decisions.len(),
            elements.len(),
        );
        trace.note(rule, true, line);
        Verdict::Decided {
            rule: rule.name.clone(),
            actor: elements[0].actor.clone(),
            binding: elements[0].binding.clone(),
            refused: elements[0].refused.clone(),
            decisions,
            elements,
        }
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

/// The webhook a mapping decides, the clock its freshness is judged by, and the moment an
/// on-call check judges.
struct Event<'a> {
    input: Input<'a>,
    now: Option<SystemTime>,
    judged: Option<SystemTime>,
}

/// Why each rule tried did or did not decide, for `explain` (nothing is kept otherwise).
struct Trace<'a>(Option<&'a mut Vec<RuleTrace>>);

impl Trace<'_> {
    fn note(&mut self, rule: &Rule, matched: bool, detail: String) {
        if let Some(t) = self.0.as_deref_mut() {
            t.push(RuleTrace {
                rule: rule.name.clone(),
                matched,
                detail,
            });
        }
    }
}

/// What a `for_each` rule made of each element: the elements that decided with their
/// decisions, the first refusal (why, whose, what it asked), and why the others did not match.
struct Elements {
    decided: Vec<(Element, Vec<Decision>)>,
    refused: Option<Refusal>,
    skipped: Vec<String>,
}

impl Elements {
    fn of(
        rule: &Rule,
        each: &ForEach,
        nodes: &[&Value],
        event: &Event<'_>,
        trace: &mut Trace<'_>,
    ) -> Elements {
        let mut out = Elements {
            decided: Vec::new(),
            refused: None,
            skipped: Vec::new(),
        };
        for (i, node) in nodes.iter().enumerate() {
            let scope = Scope {
                input: event.input,
                element: Some(node),
            };
            match apply(rule, scope, event.judged) {
                Applied::NoMatch(why) => out.skipped.push(format!("element {}: {why}", i + 1)),
                Applied::Rejected(refusal) => {
                    trace.note(rule, true, format!("element {}: {}", i + 1, refusal.line));
                    out.refused.get_or_insert_with(|| Refusal {
                        reason: format!(
                            "element {} of {}: {}",
                            i + 1,
                            each.path.describe(),
                            refusal.reason
                        ),
                        ..refusal
                    });
                }
                Applied::Decided {
                    actor,
                    decisions,
                    binding,
                    ..
                } => out.decided.push((
                    Element {
                        key: each.key(scope),
                        actor,
                        decisions: decisions.len(),
                        binding,
                        refused: None,
                    },
                    decisions,
                )),
            }
        }
        out
    }
}

/// The longest subject a decision may be bound to, in bytes.
const MAX_SUBJECT: usize = 256;

/// Runs one rule's conditions, extraction and policy on one scope; `judged` (the signed
/// event time, or the receipt) is the moment an on-call check judges.
fn apply(rule: &Rule, scope: Scope<'_>, judged: Option<SystemTime>) -> Applied {
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
    let actor = rule
        .actor
        .as_ref()
        .and_then(|sel| sel.values_in(scope).into_iter().next())
        .map(|a| a.into_owned())
        .filter(|a| !a.trim().is_empty());
    let refused = |reason: String, line: String, asked: &[Proposal]| {
        Applied::Rejected(Refusal {
            reason,
            line,
            actor: actor.clone(),
            asked: asked.to_vec(),
        })
    };
    let proposals = match proposals(rule, scope, ends) {
        Ok(p) => p,
        Err(NoProposal::NoMatch(why)) => return Applied::NoMatch(why),
        Err(NoProposal::Rejected(reason)) => return refused(reason.clone(), reason, &[]),
    };
    let granting = !ends && grants_any(&proposals);
    if granting && let Some(reason) = who_may_not_grant(rule, actor.as_deref(), &proposals) {
        return refused(reason.clone(), reason, &proposals);
    }
    let binding = match binding(
        rule,
        scope,
        (ends, reopens),
        granting,
        actor.as_deref(),
        judged,
    ) {
        Ok(b) => b,
        Err(reason) => return refused(reason.clone(), reason, &proposals),
    };
    // Ending access is always allowed: approver lists gate grants, not revocations.
    let decided = if ends {
        policy::decide_revocations(&rule.policy, &proposals)
    } else {
        policy::decide(&rule.policy, actor.as_deref(), &proposals)
    };
    match decided {
        Ok(decisions) => {
            let detail = detail(&decisions, &binding);
            Applied::Decided {
                actor,
                decisions,
                binding,
                detail,
            }
        }
        Err(reason) => {
            let line = format!("refused: {reason}");
            refused(reason, line, &proposals)
        }
    }
}

/// What a decision is bound to in one scope: its subject, where to answer, whether it ends
/// or reopens the subject, and the on-call check a grant must pass (ending access never is
/// checked); why not, when the subject or the check cannot be read.
fn binding(
    rule: &Rule,
    scope: Scope<'_>,
    (ends, reopens): (bool, bool),
    granting: bool,
    actor: Option<&str>,
    judged: Option<SystemTime>,
) -> Result<Binding, String> {
    let subject = subject(rule, scope, ends, reopens)?;
    let reply = match (&rule.answer, &subject) {
        (Some(a), Some(_)) => Some(Reply {
            via: a.via,
            on: a.on.as_ref().and_then(|x| x.first(scope).ok()),
            comment: a.comment.as_ref().and_then(|c| c.first(scope).ok()),
        }),
        _ => None,
    };
    let gate = match (&rule.oncall, actor) {
        (Some(o), Some(user)) if granting => Some(Box::new(
            gate(o, user, scope, judged).map_err(|why| format!("oncall: {why}"))?,
        )),
        _ => None,
    };
    Ok(Binding {
        subject,
        reply,
        ends_subject: ends,
        reopens_subject: reopens,
        gate,
    })
}

/// Why a rule proposes nothing for a scope.
enum NoProposal {
    /// No command: the rule does not match.
    NoMatch(String),
    /// A refusal, with the reason.
    Rejected(String),
}

/// What a rule proposes for one scope: its `/p0` commands, its extracted fields, or nothing
/// (an end or a reopening of its own).
fn proposals(rule: &Rule, scope: Scope<'_>, ends: bool) -> Result<Vec<Proposal>, NoProposal> {
    match &rule.produce {
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
                        return Err(NoProposal::Rejected(format!(
                            "malformed /p0 command: {reason}"
                        )));
                    }
                }
            }
            if proposals.is_empty() {
                return Err(NoProposal::NoMatch(format!(
                    "no /p0 command in {}",
                    sel.describe()
                )));
            }
            Ok(proposals)
        }
        Produce::Nothing => Ok(Vec::new()),
        Produce::Fields(f) => {
            match fields(scope, &f.action, &f.request_id, f.expiration.as_ref()) {
                // A request ID that someone other than the approver wrote (a title, a label,
                // a pull request's body) is approved only alone: one acknowledgement, one
                // request, the one its answer names.
                Ok(p) if grants_any(&p) && p.len() > 1 => {
                    let ids: Vec<String> = p.iter().map(|x| printable(&x.request_id)).collect();
                    Err(NoProposal::Rejected(format!(
                        "request_id: names {} requests ({}); a grant approves exactly one",
                        ids.len(),
                        ids.join(", ")
                    )))
                }
                Ok(p) => Ok(p),
                // An ending event may name a request too; when it names none, only the end's
                // own revocations are made.
                Err(_) if ends => Ok(Vec::new()),
                Err(reason) => Err(NoProposal::Rejected(reason)),
            }
        }
    }
}

/// Why this event may not grant through `rule`, if it may not: its actor is missing, or the
/// rule has none and its grants are off. (The approver list is `policy::decide`'s.)
fn who_may_not_grant(rule: &Rule, actor: Option<&str>, proposals: &[Proposal]) -> Option<String> {
    if let Some(off) = &rule.actorless {
        return (!off.on).then(|| {
            format!(
                "grants without an actor are off for this rule ({}=on turns them on)",
                off.switch
            )
        });
    }
    match (&rule.actor, actor) {
        (Some(sel), None) => Some(format!(
            "no actor: the event names nobody at {} to approve {}",
            sel.describe(),
            proposals
                .iter()
                .filter(|p| p.action.trim().eq_ignore_ascii_case("approve"))
                .map(|p| printable(&p.request_id))
                .collect::<Vec<_>>()
                .join(", ")
        )),
        _ => None,
    }
}

/// The subject a rule binds its decisions to in this scope.
fn subject(
    rule: &Rule,
    scope: Scope<'_>,
    ends: bool,
    reopens: bool,
) -> Result<Option<String>, String> {
    match rule.subject.as_ref().map(|s| s.first(scope)) {
        None => Ok(None),
        // Subjects name incidents, alerts and issues; a longer one is not one of those, and
        // could not be stored in the index that finds what an end revokes.
        Some(Ok(s)) if s.len() > MAX_SUBJECT => {
            Err(format!("subject: longer than {MAX_SUBJECT} bytes"))
        }
        Some(Ok(s)) => Ok(Some(s)),
        // A grant of a rule whose subject can end must be bound to it, or no end revokes it.
        Some(Err(why))
            if ends
                || reopens
                || !matches!(rule.ends_subject, Flag::Never)
                || !matches!(rule.reopens_subject, Flag::Never) =>
        {
            Err(format!("subject: {why}"))
        }
        Some(Err(_)) => Ok(None),
    }
}

/// What `explain` says about a rule's decisions and their binding.
fn detail(decisions: &[Decision], binding: &Binding) -> String {
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
        detail.push_str("; reopens the subject if it ended: approves under it are taken again");
    }
    if let Some(g) = &binding.gate {
        detail.push_str(&format!(
            "; approves are sent only once the worker has checked: {}",
            g.describe()
        ));
    }
    detail
}

/// Whether any proposal asks to approve.
fn grants_any(proposals: &[Proposal]) -> bool {
    proposals
        .iter()
        .any(|p| p.action.trim().eq_ignore_ascii_case("approve"))
}

/// Whether any decision approves.
fn grants(decisions: &[Decision]) -> bool {
    decisions.iter().any(|d| d.action == Action::Approve)
}

/// The on-call check of one event: who, about which incident, as of the moment judged, in
/// the scope the operator pinned.
fn gate(
    o: &Oncall,
    user: &str,
    scope: Scope<'_>,
    judged: Option<SystemTime>,
) -> Result<Gate, String> {
    let at_ms = judged.map_or(0, |t| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    });
    if user.len() > 256 {
        return Err("the actor is longer than 256 bytes".into());
    }
    Ok(match o {
        Oncall::PagerDuty {
            escalation_policy,
            incident,
            scope: pinned,
        } => {
            let escalation_policy = escalation_policy.as_ref().and_then(|e| e.first(scope).ok());
            let incident = incident.as_ref().and_then(|e| e.first(scope).ok());
            if escalation_policy.is_none() && incident.is_none() {
                return Err("no escalation policy and no incident in the event".into());
            }
            let unchecked = Gate::PagerDuty {
                user: user.to_owned(),
                escalation_policy,
                incident,
                escalation_policies: Vec::new(),
                max_level: None,
                schedules: Vec::new(),
                at_ms,
            };
            unchecked.rescoped(pinned).unwrap_or(unchecked)
        }
        Oncall::Opsgenie { scope: pinned } => {
            let unchecked = Gate::Opsgenie {
                jsm: false,
                user: user.to_owned(),
                schedules: Vec::new(),
                at_ms,
            };
            unchecked.rescoped(pinned).unwrap_or(unchecked)
        }
        Oncall::GitHub {
            owner,
            scope: pinned,
        } => {
            let GateScope::GitHub { org, teams } = pinned else {
                return Err("not a GitHub scope".into());
            };
            // Teams are the pinned organization's: a delivery from a repository of another
            // owner (a hook or App covering several) is not judged by them.
            let found = owner.values_in(scope).into_iter().next();
            match found {
                Some(o) if o.eq_ignore_ascii_case(org) => {}
                Some(o) => {
                    return Err(format!(
                        "the repository belongs to `{}`, not to the organization whose teams this check asks",
                        printable(&o)
                    ));
                }
                None => {
                    return Err(format!("no repository owner at {}", owner.describe()));
                }
            }
            Gate::GitHub {
                user: user.to_owned(),
                org: org.clone(),
                teams: teams.clone(),
            }
        }
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
