//! Compiles a parsed mapping file into a `Mapping`: `${VAR}` expansion, every JSONPath, regex,
//! template and policy checked once, errors naming the file, rule and field.

use std::path::Path;

use axum::http::HeaderName;
use jsonpath_rust::parser::parse_json_path;
use regex::Regex;
use serde_json::Value;

use super::expr::{self, Condition, Extract, From, Part, Selector, Test};
use super::model::{
    RawAnswer, RawCondition, RawExtract, RawFlag, RawMapping, RawOncall, RawRule, RawSelector,
};
use super::*;

/// Compiles a parsed mapping file, expanding `${VAR}` references (outside `tests`) from `env`.
pub fn compile(
    source: &str,
    file: &Path,
    tree: Value,
    env: &Env,
    defaults: &Defaults,
) -> Result<Mapping, Vec<String>> {
    let at = file.display().to_string();
    let raw = expand(&at, &tree, env)?;
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let failed = |what: &str, errs: Vec<String>, errors: &mut Vec<String>| {
        errors.extend(errs.into_iter().map(|e| format!("{at}: {what}{e}")));
    };
    let verifier = verify::compile(raw.verify.as_ref(), source, &mut warnings)
        .map_err(|e| failed("verify: ", vec![e], &mut errors))
        .ok();
    let dedup = replay::Dedup::compile(raw.dedup.as_ref()).unwrap_or_else(|errs| {
        failed("", errs, &mut errors);
        replay::Dedup::default()
    });
    let signed = verifier.as_ref().is_some_and(Verifier::signs_body);
    let freshness =
        replay::Freshness::compile(raw.freshness.as_ref(), signed).unwrap_or_else(|errs| {
            failed("", errs, &mut errors);
            replay::Freshness::receipt()
        });
    let truncated = raw.truncated.as_ref().and_then(|t| {
        selector(t)
            .map_err(|e| failed("truncated: ", vec![e], &mut errors))
            .ok()
    });
    let context = |i: usize| RuleContext {
        raw: &raw,
        written: tree
            .get("rules")
            .and_then(Value::as_array)
            .and_then(|w| w.get(i)),
        defaults,
        source,
    };
    let (rules, rule_errors) = rules(&raw, context, &mut warnings);
    failed("", rule_errors, &mut errors);
    failed("", freshness_holds_checks(&freshness, &rules), &mut errors);
    match verifier {
        Some(verifier) if errors.is_empty() => {
            let mut mapping = Mapping {
                source: source.to_owned(),
                file: file.to_owned(),
                verifier,
                dedup,
                freshness,
                truncated,
                rules,
                projection: projection::Projection::full(),
                tree,
                warnings,
            };
            mapping.projection = projection::Projection::of(&mapping);
            Ok(mapping)
        }
        _ => Err(errors),
    }
}

/// The file's `${VAR}` references expanded (every one that cannot be, named), outside
/// `tests`, and the file read as a mapping.
fn expand(at: &str, tree: &Value, env: &Env) -> Result<RawMapping, Vec<String>> {
    let mut expanded = tree.clone();
    let Value::Object(map) = &mut expanded else {
        return Err(vec![format!(
            "{at}: a mapping file is a YAML mapping (verify, dedup, rules, tests)"
        )]);
    };
    let tests = map.remove("tests");
    env.expand_at(at, &mut expanded)?;
    if let (Value::Object(map), Some(tests)) = (&mut expanded, tests) {
        map.insert("tests".into(), tests);
    }
    crate::env::deserialize_at(at, expanded)
}

/// Every rule compiled, and the problems found, each naming its rule.
fn rules<'a>(
    raw: &'a RawMapping,
    context: impl Fn(usize) -> RuleContext<'a>,
    warnings: &mut Vec<String>,
) -> (Vec<Rule>, Vec<String>) {
    let mut errors = Vec::new();
    let mut rules = Vec::new();
    let mut names = BTreeSet::new();
    if raw.rules.is_empty() {
        errors.push("rules: at least one rule is needed".into());
    }
    for (i, r) in raw.rules.iter().enumerate() {
        let label = if r.name.trim().is_empty() {
            format!("rules[{i}]")
        } else {
            format!("rule `{}`", r.name)
        };
        if !names.insert(r.name.clone()) {
            errors.push(format!("{label}: duplicate rule name"));
            continue;
        }
        match compile_rule(r, &context(i), warnings) {
            Ok(rule) => rules.push(rule),
            Err(errs) => errors.extend(errs.into_iter().map(|e| format!("{label}: {e}"))),
        }
    }
    (rules, errors)
}

/// A rule with an on-call check needs freshness on: the check judges a moment, and a
/// replayed event's moment is old.
fn freshness_holds_checks(freshness: &replay::Freshness, rules: &[Rule]) -> Vec<String> {
    if freshness.max_age.is_some() {
        return Vec::new();
    }
    rules
        .iter()
        .filter(|r| r.oncall.is_some())
        .map(|rule| format!(
            "freshness: max_age: 0 turns freshness off, which rule `{}` may not: an on-call check judges a moment, and a replayed event's moment is old",
            rule.name
        ))
        .collect()
}

/// What a rule is compiled against: its file, the rule as written (before `${VAR}`
/// expansion, so errors name the variable an operator sets), and the relay's defaults.
struct RuleContext<'a> {
    raw: &'a RawMapping,
    written: Option<&'a Value>,
    defaults: &'a Defaults,
    source: &'a str,
}

impl RuleContext<'_> {
    /// The variables the rule's field at `pointer` (`/actor/allow`) is read from, joined
    /// with `, ` (empty when it names none).
    fn names(&self, pointer: &str) -> String {
        self.written
            .and_then(|w| w.pointer(pointer))
            .and_then(Value::as_str)
            .map(Env::references)
            .unwrap_or_default()
            .join(", ")
    }

    /// As `names`, written ` (A, B)` after a field's name; empty when it names none.
    fn vars(&self, pointer: &str) -> String {
        match self.names(pointer) {
            n if n.is_empty() => n,
            n => format!(" ({n})"),
        }
    }
}

/// When a rule's events end or reopen their subject, compiled with what follows from it.
struct Lifecycle {
    ends: Flag,
    reopens: Flag,
    /// Every event of the rule ends its subject: it only revokes.
    always_ends: bool,
    /// Some events of the rule may end their subject.
    may_end: bool,
    always_reopens: bool,
}

fn compile_rule(
    r: &RawRule,
    cx: &RuleContext<'_>,
    warnings: &mut Vec<String>,
) -> Result<Rule, Vec<String>> {
    let mut errors = Vec::new();
    if r.name.trim().is_empty() {
        errors.push("name: empty".to_owned());
    }
    // `@` paths read the element of a `for_each` rule, and only such rules have one.
    let el = r.for_each.is_some();
    let for_each = for_each(r, &mut errors);
    let when = conditions(&r.when, el, &mut errors);
    let life = lifecycle(r, cx.raw, el, &mut errors);
    let produce = produce(r, el, &life, &mut errors);
    check_ending(r, cx.raw, &life, &mut errors);
    let subject = optional(
        r.subject.as_ref().or(cx.raw.subject.as_ref()),
        "subject",
        el,
        &mut errors,
    );
    let answer = match r.answer.as_ref().or(cx.raw.answer.as_ref()).map(answer) {
        None | Some(Ok(None)) => None,
        Some(Ok(Some(a))) => Some(a),
        Some(Err(e)) => {
            errors.push(format!("answer: {e}"));
            None
        }
    };
    let actions = actions(r, &life, &mut errors);
    let (who, oncall) = grants(r, cx, &life, &actions, warnings, &mut errors);
    let (default_expiration, max_expiration) = expirations(r, cx.defaults, &mut errors);
    let org = r
        .org
        .as_ref()
        .or(cx.raw.org.as_ref())
        .unwrap_or(&cx.defaults.org);
    let org = crate::domain::Id::parse(org)
        .map_err(|e| errors.push(format!("org: {e}")))
        .ok();
    match (produce, org) {
        (Some(produce), Some(org)) if errors.is_empty() => Ok(Rule {
            name: r.name.clone(),
            for_each,
            when,
            produce,
            actor: who.actor,
            policy: RulePolicy {
                actors: who.allow,
                actions,
                default_expiration,
                max_expiration,
                org,
            },
            subject,
            ends_subject: life.ends,
            reopens_subject: life.reopens,
            answer,
            oncall,
            actorless: who.actorless,
            grants: who.line,
            open: who.open,
        }),
        _ => Err(errors),
    }
}

/// Who may grant through the rule (`who_grants`), and the on-call check its approves pass.
/// Ending access is always allowed, and so is reopening a subject (it grants nothing by
/// itself): approver lists are not applied to either. A rule that cannot approve may still
/// have its list (who may deny or revoke through it); one that can must say who.
fn grants(
    r: &RawRule,
    cx: &RuleContext<'_>,
    life: &Lifecycle,
    actions: &[Action],
    warnings: &mut Vec<String>,
    errors: &mut Vec<String>,
) -> (WhoGrants, Option<Oncall>) {
    let el = r.for_each.is_some();
    let exempt = life.always_ends
        || (life.always_reopens
            && r.command.is_none()
            && r.action.is_none()
            && r.request_id.is_none());
    let may_grant = !exempt && actions.contains(&Action::Approve);
    let oncall = r.oncall.as_ref().and_then(|o| {
        oncall(o, el, cx, r.actor.is_some())
            .map_err(|e| errors.push(format!("oncall: {e}")))
            .ok()
            .flatten()
    });
    let grants = Grants {
        exempt,
        may_grant,
        oncall: oncall.as_ref(),
    };
    (who_grants(r, cx, el, grants, warnings, errors), oncall)
}

/// What decides who may grant through a rule: whether it only ends or reopens (`exempt`),
/// whether its actions include approve, and its on-call check.
struct Grants<'a> {
    exempt: bool,
    may_grant: bool,
    oncall: Option<&'a Oncall>,
}

fn for_each(r: &RawRule, errors: &mut Vec<String>) -> Option<ForEach> {
    let f = r.for_each.as_ref()?;
    let path = match selector(&RawSelector {
        path: Some(f.path.clone()),
        header: None,
    }) {
        Ok(p) => Some(p),
        Err(e) => {
            errors.push(format!("for_each.path: {e}"));
            None
        }
    };
    let mut key = Vec::new();
    for (i, k) in f.key.iter().enumerate() {
        match selector_in(k, true) {
            Ok(k) => key.push(k),
            Err(e) => errors.push(format!("for_each.key[{i}]: {e}")),
        }
    }
    path.map(|path| ForEach { path, key })
}

fn conditions(raw: &[RawCondition], el: bool, errors: &mut Vec<String>) -> Vec<Condition> {
    let mut when = Vec::new();
    for (i, c) in raw.iter().enumerate() {
        match condition(c, el) {
            Ok(c) => when.push(c),
            Err(e) => errors.push(format!("when[{i}]: {e}")),
        }
    }
    when
}

fn lifecycle(r: &RawRule, raw: &RawMapping, el: bool, errors: &mut Vec<String>) -> Lifecycle {
    let flag = |raw: &RawFlag, field: &str, errors: &mut Vec<String>| match raw {
        RawFlag::Always(false) => Flag::Never,
        RawFlag::Always(true) => Flag::Always,
        RawFlag::When(c) => match condition(c, el) {
            Ok(c) => Flag::When(c),
            Err(e) => {
                errors.push(format!("{field}: {e}"));
                Flag::Never
            }
        },
    };
    let ends = flag(&r.ends_subject, "ends_subject", errors);
    let reopens = flag(&r.reopens_subject, "reopens_subject", errors);
    // A rule that always ends its subject only revokes; one that ends it under a condition
    // also grants (an alert firing approves, the same alert resolved ends).
    let always_ends = matches!(ends, Flag::Always);
    let may_end = !matches!(r.ends_subject, RawFlag::Always(false));
    // A rule that always reopens its subject may decide nothing (GitHub's `reopened`).
    let always_reopens = matches!(reopens, Flag::Always);
    let may_reopen = !matches!(r.reopens_subject, RawFlag::Always(false));
    if always_ends && always_reopens {
        errors.push("reopens_subject: a rule that always ends its subject cannot reopen it".into());
    }
    if may_reopen && r.subject.is_none() && raw.subject.is_none() {
        errors.push("reopens_subject: needs a `subject` (here or for the whole file)".into());
    }
    Lifecycle {
        ends,
        reopens,
        always_ends,
        may_end,
        always_reopens,
    }
}

/// What the rule makes of an event: `/p0` commands, extracted fields, or (an end or a
/// reopening) nothing of its own.
fn produce(r: &RawRule, el: bool, life: &Lifecycle, errors: &mut Vec<String>) -> Option<Produce> {
    match (&r.command, &r.action, &r.request_id) {
        (Some(cmd), None, None) => match selector_in(cmd, el) {
            Ok(s) => Some(Produce::Command(s)),
            Err(e) => {
                errors.push(format!("command: {e}"));
                None
            }
        },
        (None, Some(a), Some(id)) => {
            let action = extract(a, el).map_err(|e| format!("action: {e}"));
            let request_id = extract(id, el).map_err(|e| format!("request_id: {e}"));
            let expiration = r
                .expiration
                .as_ref()
                .map(|x| extract(x, el))
                .transpose()
                .map_err(|e| format!("expiration: {e}"));
            if let Ok(Extract {
                from: From::Constant(c),
                ..
            }) = &action
                && Action::parse(c).is_none()
            {
                errors.push(format!("action: `{c}` is not approve, deny or revoke"));
            }
            match (action, request_id, expiration) {
                (Ok(action), Ok(request_id), Ok(expiration)) => {
                    Some(Produce::Fields(Box::new(Fields {
                        action,
                        request_id,
                        expiration,
                    })))
                }
                (a, i, e) => {
                    errors.extend(a.err());
                    errors.extend(i.err());
                    errors.extend(e.err());
                    None
                }
            }
        }
        (Some(_), _, _) => {
            errors.push(
                "`command` decides action and request ID itself: drop `action` / `request_id`"
                    .into(),
            );
            None
        }
        (None, None, None) if life.always_ends || life.always_reopens => Some(Produce::Nothing),
        (None, None, Some(id)) if life.always_ends => match extract(id, el) {
            Ok(request_id) => Some(Produce::Fields(Box::new(Fields {
                action: Extract::constant("revoke"),
                request_id,
                expiration: None,
            }))),
            Err(e) => {
                errors.push(format!("request_id: {e}"));
                None
            }
        },
        _ => {
            errors.push("needs either `command`, or both `action` and `request_id`".into());
            None
        }
    }
}

/// A rule that may end its subject only revokes, and needs a subject to end.
fn check_ending(r: &RawRule, raw: &RawMapping, life: &Lifecycle, errors: &mut Vec<String>) {
    if !life.may_end {
        return;
    }
    if r.command.is_some() {
        errors
            .push("ends_subject: a rule that ends its subject only revokes; drop `command`".into());
    }
    if let Some(a) = &r.action
        && life.always_ends
        && !matches!(a, RawExtract::Constant(c) if Action::parse(c) == Some(Action::Revoke))
    {
        errors.push(
            "ends_subject: a rule that ends its subject only revokes: `action: revoke` or none"
                .into(),
        );
    }
    if r.subject.is_none() && raw.subject.is_none() {
        errors.push("ends_subject: needs a `subject` (here or for the whole file)".into());
    }
}

fn optional(
    raw: Option<&RawExtract>,
    field: &str,
    el: bool,
    errors: &mut Vec<String>,
) -> Option<Extract> {
    extracted(field, &raw.cloned(), el)
        .map_err(|e| errors.push(e))
        .ok()
        .flatten()
}

fn actions(r: &RawRule, life: &Lifecycle, errors: &mut Vec<String>) -> Vec<Action> {
    match &r.actions {
        None if life.always_ends => vec![Action::Revoke],
        Some(list)
            if life.may_end
                && !list
                    .iter()
                    .any(|a| Action::parse(a) == Some(Action::Revoke)) =>
        {
            errors.push(
                "actions: a rule that ends its subject must allow `revoke` (the end's own)".into(),
            );
            Vec::new()
        }
        None => Action::ALL.to_vec(),
        Some(list) => {
            let mut out = Vec::new();
            for a in list {
                match Action::parse(a) {
                    Some(a) => out.push(a),
                    None => errors.push(format!("actions: `{a}` is not approve, deny or revoke")),
                }
            }
            out
        }
    }
}

/// Who may grant through a rule, compiled: the actor's selector, the approver list, the
/// switch of a rule with no actor, the one line `check` prints, and whether anyone may grant
/// through it at all.
struct WhoGrants {
    actor: Option<Selector>,
    allow: Option<Allowlist>,
    actorless: Option<Actorless>,
    line: Option<String>,
    open: bool,
}

/// Nobody grants unless named: an unset approver list is nobody, `*` only behind an on-call
/// check, and a rule that may approve names its actor or says, in `actorless`, that it has
/// none (then it approves only when the operator turns that on).
fn who_grants(
    r: &RawRule,
    cx: &RuleContext<'_>,
    el: bool,
    grants: Grants<'_>,
    warnings: &mut Vec<String>,
    errors: &mut Vec<String>,
) -> WhoGrants {
    let actor = r.actor.as_ref().and_then(|a| {
        let path = RawSelector {
            path: a.path.clone(),
            header: a.header.clone(),
        };
        selector_in(&path, el)
            .map_err(|e| errors.push(format!("actor: {e}")))
            .ok()
    });
    let mut who = WhoGrants {
        actor,
        allow: None,
        actorless: None,
        line: None,
        open: false,
    };
    let at = format!("source `{}`, rule `{}`", cx.source, r.name);
    if let Some(a) = &r.actorless {
        if r.actor.is_some() {
            errors.push("actorless: the rule names its `actor`: drop one of the two".into());
        }
        actorless(a, cx, grants.may_grant, &at, &mut who, warnings, errors);
        return who;
    }
    if grants.exempt {
        return who;
    }
    if r.actor.is_none() {
        if grants.may_grant {
            errors.push(
                "actor: a rule that may approve names who approves (`actor`), or says that its events name nobody (`actorless`)"
                    .into(),
            );
        }
        return who;
    }
    let allow = r
        .actor
        .as_ref()
        .and_then(|a| a.allow.as_deref())
        .map_or(Allowlist::Only(Default::default()), Allowlist::parse);
    if grants.may_grant {
        who.open = allow != Allowlist::Only(Default::default());
        who.line = Some(approvers(&allow, cx, grants.oncall, &at, warnings, errors));
    }
    // A rule that cannot approve keeps the list of who may deny or revoke through it: the
    // safe direction, `*` welcome.
    who.allow = Some(allow);
    who
}

/// A rule whose events name no actor: it approves only when its switch is on.
fn actorless(
    a: &model::RawActorless,
    cx: &RuleContext<'_>,
    may_grant: bool,
    at: &str,
    who: &mut WhoGrants,
    warnings: &mut Vec<String>,
    errors: &mut Vec<String>,
) {
    let on = match a.grants.as_deref().map(str::trim) {
        Some("on" | "true") => true,
        None | Some("off" | "false" | "") => false,
        Some(other) => {
            errors.push(format!("actorless.grants: `{other}` is not on or off"));
            false
        }
    };
    let switch = match cx.names("/actorless/grants") {
        s if s.is_empty() => "actorless.grants".to_owned(),
        s => s,
    };
    if may_grant && on {
        warnings.push(format!(
            "{at}: approves with no actor ({switch}=on): it trusts {}",
            a.trusts.trim()
        ));
    }
    who.open = may_grant && on;
    who.line = may_grant.then(|| {
        if on {
            format!("no actor ({switch}=on), trusting {}", a.trusts.trim())
        } else {
            format!("nobody: no actor, and {switch} is not on")
        }
    });
    who.actorless = Some(Actorless { on, switch });
}

/// The line `check` prints of who may approve through a rule's approver list; `*` is an
/// error without the rule's on-call check, an empty list a warning.
fn approvers(
    allow: &Allowlist,
    cx: &RuleContext<'_>,
    oncall: Option<&Oncall>,
    at: &str,
    warnings: &mut Vec<String>,
    errors: &mut Vec<String>,
) -> String {
    let names = cx.names("/actor/allow");
    let vars = cx.vars("/actor/allow");
    match allow {
        Allowlist::Anyone if oncall.is_none() => {
            let from = if names.is_empty() {
                String::new()
            } else {
                format!(" from {names}")
            };
            errors.push(format!(
                "actor.allow: `*` (anyone){from} is accepted only with the rule's on-call check on: name the approvers, or turn the check on"
            ));
            String::new()
        }
        Allowlist::Anyone => format!("gate only: anyone the on-call check passes{vars}"),
        Allowlist::Only(set) if set.is_empty() => {
            warnings.push(format!(
                "{at}: nobody may approve: the approver list{vars} is empty"
            ));
            if names.is_empty() {
                "nobody: the approver list is empty".to_owned()
            } else {
                format!("nobody: {names} is empty")
            }
        }
        Allowlist::Only(set) => format!(
            "{} approver{}{vars}",
            set.len(),
            if set.len() == 1 { "" } else { "s" }
        ),
    }
}

fn expirations(
    r: &RawRule,
    defaults: &Defaults,
    errors: &mut Vec<String>,
) -> (Expiration, Option<Expiration>) {
    let mut parse = |field: &str, text: &Option<String>| {
        text.as_deref().and_then(|t| match Expiration::parse(t) {
            Ok(e) => Some(e),
            Err(e) => {
                errors.push(format!("{field}: {e}"));
                None
            }
        })
    };
    let default = parse("default_expiration", &r.default_expiration)
        .unwrap_or_else(|| defaults.expiration.clone());
    let max =
        parse("max_expiration", &r.max_expiration).or_else(|| defaults.max_expiration.clone());
    (default, max)
}

/// Compiles a rule's `oncall`; `None` when it is turned off. What the check trusts is
/// pinned here, from the operator's settings; the payload names only the incident and who.
fn oncall(
    raw: &RawOncall,
    el: bool,
    cx: &RuleContext<'_>,
    has_actor: bool,
) -> Result<Option<Oncall>, String> {
    let enabled = match raw.enabled.as_deref().map(str::trim) {
        None => true,
        Some("on" | "true") => true,
        Some("off" | "false" | "") => false,
        Some(other) => return Err(format!("enabled: `{other}` is not on or off")),
    };
    if raw.at.is_some() {
        return Err(
            "at: the moment judged is the mapping's signed event time (`freshness.time`), or the receipt where the source signs none; a rule cannot pick another: drop `at`"
                .into(),
        );
    }
    let check = Check {
        raw,
        el,
        cx,
        enabled,
    };
    let compiled = match raw.check.as_str() {
        "pagerduty" => check.pagerduty()?,
        name @ ("opsgenie" | "jsm") => check.opsgenie(name)?,
        "github" => check.github()?,
        other => {
            return Err(format!(
                "check: `{other}` is not pagerduty, opsgenie, jsm or github"
            ));
        }
    };
    if !has_actor {
        return Err("needs the rule's `actor`: the one whose on-call is checked".into());
    }
    Ok(enabled.then_some(compiled))
}

/// One rule's `oncall`, being compiled.
struct Check<'a> {
    raw: &'a RawOncall,
    el: bool,
    cx: &'a RuleContext<'a>,
    enabled: bool,
}

impl Check<'_> {
    /// A comma-separated list of the operator's pins.
    fn list(text: &Option<String>) -> Vec<String> {
        text.as_deref()
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }

    fn extract(&self, field: &str, x: &Option<RawExtract>) -> Result<Option<Extract>, String> {
        extracted(field, x, self.el)
    }

    /// Refuses any field given that `check` does not use (`uses`).
    fn only(&self, check: &str, uses: &[&str]) -> Result<(), String> {
        let given = given!(self.raw; escalation_policy, escalation_policies, incident, max_level,
            schedules, org, owner, teams);
        match given
            .iter()
            .find(|(f, present)| *present && !uses.contains(f))
        {
            Some((field, _)) => Err(format!("{field}: not used by the `{check}` check")),
            None => Ok(()),
        }
    }

    fn pagerduty(&self) -> Result<Oncall, String> {
        let raw = self.raw;
        let uses = [
            "escalation_policy",
            "escalation_policies",
            "incident",
            "max_level",
            "schedules",
        ];
        self.only("pagerduty", &uses)?;
        let escalation_policy = self.extract("escalation_policy", &raw.escalation_policy)?;
        let incident = self.extract("incident", &raw.incident)?;
        if escalation_policy.is_none() && incident.is_none() {
            return Err(
                "the pagerduty check needs `escalation_policy` or `incident` (whose escalation policy is fetched)"
                    .into(),
            );
        }
        let escalation_policies = Self::list(&raw.escalation_policies);
        let schedules = Self::list(&raw.schedules);
        if self.enabled && escalation_policies.is_empty() && schedules.is_empty() {
            return Err(format!(
                "the pagerduty check needs pinned `escalation_policies`{} or `schedules`{}: without them any policy an incident is moved onto would count",
                self.cx.vars("/oncall/escalation_policies"),
                self.cx.vars("/oncall/schedules")
            ));
        }
        let max_level = match raw.max_level.as_deref().map(str::trim) {
            None | Some("") => 1,
            Some(t) => match t.parse::<u32>() {
                Ok(n) if n >= 1 => n,
                _ => return Err(format!("max_level: `{t}` is not a level (1 or more)")),
            },
        };
        Ok(Oncall::PagerDuty {
            escalation_policy,
            incident,
            scope: GateScope::PagerDuty {
                escalation_policies,
                max_level,
                schedules,
            },
        })
    }

    fn opsgenie(&self, check: &str) -> Result<Oncall, String> {
        let raw = self.raw;
        self.only(check, &["schedules"])?;
        let schedules = Self::list(&raw.schedules);
        if self.enabled && schedules.is_empty() {
            return Err(format!(
                "the {check} check needs `schedules`{}",
                self.cx.vars("/oncall/schedules")
            ));
        }
        Ok(Oncall::Opsgenie {
            scope: GateScope::Opsgenie {
                jsm: check == "jsm",
                schedules,
            },
        })
    }

    fn github(&self) -> Result<Oncall, String> {
        let raw = self.raw;
        self.only("github", &["org", "owner", "teams"])?;
        let org = match &raw.org {
            None => String::new(),
            Some(RawExtract::Constant(c)) => c.trim().to_owned(),
            Some(RawExtract::Spec(_)) => {
                return Err(
                    "org: the organization is pinned by name (`${GITHUB_ONCALL_ORG}`), never read from the payload; `owner` says where the payload names the repository's owner"
                        .into(),
                );
            }
        };
        let owner = raw
            .owner
            .as_ref()
            .ok_or("the github check needs `owner`: where the payload names the repository's owner (`$.repository.owner.login`)")
            .and_then(|o| selector_in(o, self.el).map_err(|_| "owner: not a valid selector"))
            .map_err(str::to_owned)?;
        let teams = Self::list(&raw.teams);
        if self.enabled && org.is_empty() {
            return Err(format!(
                "the github check needs a pinned `org`{}: the organization whose teams count",
                self.cx.vars("/oncall/org")
            ));
        }
        if self.enabled && teams.is_empty() {
            return Err(format!(
                "the github check needs `teams`{}",
                self.cx.vars("/oncall/teams")
            ));
        }
        Ok(Oncall::GitHub {
            owner,
            scope: GateScope::GitHub { org, teams },
        })
    }
}

/// An optional field compiled; an error names the field.
fn extracted(field: &str, x: &Option<RawExtract>, el: bool) -> Result<Option<Extract>, String> {
    x.as_ref()
        .map(|x| extract(x, el))
        .transpose()
        .map_err(|e| format!("{field}: {e}"))
}

pub(super) fn selector(raw: &RawSelector) -> Result<Selector, String> {
    selector_in(raw, false)
}

/// Each of a list of selectors (`field[i]`), compiled; each one that does not compile is an
/// error in `errors`, naming it.
pub(super) fn selectors(
    raw: &[RawSelector],
    field: &str,
    errors: &mut Vec<String>,
) -> Vec<Selector> {
    raw.iter()
        .enumerate()
        .filter_map(|(i, s)| {
            selector(s)
                .map_err(|e| errors.push(format!("{field}[{i}]: {e}")))
                .ok()
        })
        .collect()
}

/// A selector; `@` paths (relative to a `for_each` element) only where `element` says so.
pub(super) fn selector_in(raw: &RawSelector, element: bool) -> Result<Selector, String> {
    match (&raw.path, &raw.header) {
        (Some(p), None) if p.starts_with('@') => {
            if !element {
                return Err(format!(
                    "`{p}` reads a `for_each` element, and this rule has no `for_each`"
                ));
            }
            let query = parse_json_path(&format!("${}", &p[1..]))
                .map_err(|e| format!("`{p}` is not valid JSONPath: {e}"))?;
            Ok(Selector::Element {
                text: p.clone(),
                query,
            })
        }
        (Some(p), None) => {
            let query =
                parse_json_path(p).map_err(|e| format!("`{p}` is not valid JSONPath: {e}"))?;
            Ok(Selector::Path {
                text: p.clone(),
                query,
            })
        }
        (None, Some(h)) => HeaderName::from_bytes(h.as_bytes())
            .map(Selector::Header)
            .map_err(|_| format!("`{h}` is not a valid header name")),
        (Some(_), Some(_)) => Err("give `path` or `header`, not both".into()),
        (None, None) => Err("needs `path` or `header`".into()),
    }
}

/// Compiles a template: literal text and `{...}` placeholders, each holding
/// `|`-separated alternatives (a JSONPath, or `header:Name`).
fn template(text: &str) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        if open > 0 {
            parts.push(Part::Text(rest[..open].to_owned()));
        }
        let after = &rest[open + 1..];
        let close = after
            .find('}')
            .ok_or_else(|| format!("template `{text}`: a `{{` without its `}}`"))?;
        let mut alternatives = Vec::new();
        for alt in after[..close].split('|').map(str::trim) {
            let raw = match alt.strip_prefix("header:") {
                Some(h) => RawSelector {
                    path: None,
                    header: Some(h.trim().to_owned()),
                },
                None => RawSelector {
                    path: Some(alt.to_owned()),
                    header: None,
                },
            };
            alternatives.push(selector(&raw).map_err(|e| format!("template `{text}`: {e}"))?);
        }
        parts.push(Part::Value(alternatives));
        rest = &after[close + 1..];
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest.to_owned()));
    }
    if !parts.iter().any(|p| matches!(p, Part::Value(_))) {
        return Err(format!(
            "template `{text}` has no `{{$.path}}` placeholder (a constant needs no template)"
        ));
    }
    Ok(parts)
}

/// Compiles `answer:`; `via: none` answers nothing.
fn answer(raw: &RawAnswer) -> Result<Option<Answer>, String> {
    if raw.via == "none" {
        return Ok(None);
    }
    let via = Via::parse(&raw.via).ok_or_else(|| {
        format!(
            "via: `{}` is not github, pagerduty, opsgenie, jsm or none",
            raw.via
        )
    })?;
    let comment = extracted("comment", &raw.comment, false)?;
    if comment.is_some() && via != Via::GitHub {
        return Err("comment: only GitHub answers on a comment".into());
    }
    let on = extracted("on", &raw.on, false)?;
    Ok(Some(Answer { via, on, comment }))
}

fn regex(text: &str) -> Result<Regex, String> {
    regex::RegexBuilder::new(text)
        .size_limit(1 << 20)
        .build()
        .map_err(|e| format!("`{text}` is not a valid regex: {e}"))
}

fn condition(c: &RawCondition, el: bool) -> Result<Condition, String> {
    let test_fields = c.path.is_some()
        || c.header.is_some()
        || c.equals.is_some()
        || c.one_of.is_some()
        || c.matches.is_some()
        || c.exists.is_some()
        || c.markdown;
    match (&c.not, &c.any) {
        (Some(_), Some(_)) => return Err("`not` and `any` are two conditions: nest one".into()),
        (Some(_), None) if test_fields => {
            return Err("`not` stands alone: put the condition inside it".into());
        }
        (None, Some(_)) if test_fields => {
            return Err("`any` stands alone: put the conditions inside it".into());
        }
        (Some(inner), None) => return Ok(Condition::Not(Box::new(condition(inner, el)?))),
        (None, Some(all)) if all.is_empty() => {
            return Err("`any` needs at least one condition".into());
        }
        (None, Some(all)) => {
            return all
                .iter()
                .enumerate()
                .map(|(i, c)| condition(c, el).map_err(|e| format!("any[{i}]: {e}")))
                .collect::<Result<_, _>>()
                .map(Condition::Any);
        }
        (None, None) => {}
    }
    let selector = selector_in(
        &RawSelector {
            path: c.path.clone(),
            header: c.header.clone(),
        },
        el,
    )?;
    let mut tests = Vec::new();
    if let Some(v) = &c.equals {
        tests.push(Test::Equals(expr::scalar_text(v)));
    }
    if let Some(vs) = &c.one_of {
        tests.push(Test::OneOf(vs.iter().map(expr::scalar_text).collect()));
    }
    if let Some(re) = &c.matches {
        tests.push(Test::Matches(regex(re)?));
    }
    if let Some(e) = c.exists {
        tests.push(Test::Exists(e));
    }
    if tests.len() != 1 {
        return Err("needs exactly one of `equals`, `one_of`, `matches`, `exists`".into());
    }
    Ok(Condition::Test {
        selector,
        test: tests.remove(0),
        markdown: c.markdown,
    })
}

fn extract(raw: &RawExtract, el: bool) -> Result<Extract, String> {
    match raw {
        RawExtract::Constant(c) => Ok(Extract::constant(c)),
        RawExtract::Spec(s) => {
            let from = match (&s.path, &s.header, &s.template) {
                (None, None, Some(t)) => From::Template(template(t)?),
                (_, _, Some(_)) => {
                    return Err("give one of `path`, `header` or `template`".into());
                }
                (None, None, None) => match &s.default {
                    Some(d) => From::Constant(d.clone()),
                    None => return Err("needs `path`, `header` or `default`".into()),
                },
                _ => From::Select(selector_in(
                    &RawSelector {
                        path: s.path.clone(),
                        header: s.header.clone(),
                    },
                    el,
                )?),
            };
            let regex = match &s.regex {
                Some(r) => {
                    let re = regex(r)?;
                    if re.captures_len() > 2 {
                        return Err(format!("regex `{r}`: use at most one capture group"));
                    }
                    Some(re)
                }
                None => None,
            };
            Ok(Extract {
                from,
                regex,
                map: s.map.clone(),
                default: s.default.clone(),
                markdown: s.markdown,
            })
        }
    }
}
