//! Mapping files, one per source: how its webhooks are verified and deduplicated, and the
//! ordered rules that turn a payload into decisions. Compiled once at load; evaluation is pure.

pub mod cases;
pub mod command;
mod eval;
pub mod model;
pub mod projection;
mod replay;
mod verify;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use axum::http::HeaderName;
use jsonpath_rust::parser::parse_json_path;
use regex::Regex;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::domain::printable;
use crate::domain::{Action, Binding, Expiration, Reply, Via};
use crate::env::Env;
use crate::policy::{self, Allowlist, Decision, Proposal, RulePolicy};
use crate::verify::Verifier;

pub use eval::Input;
use eval::{Condition, Extract, From, Part, Scope, Selector, Test};
use model::{RawAnswer, RawCondition, RawEnds, RawExtract, RawMapping, RawRule, RawSelector};
pub use replay::parse_rfc3339;

/// Relay-wide values a mapping falls back on.
#[derive(Debug, Clone)]
pub struct Defaults {
    pub org: String,
    pub expiration: Expiration,
    pub max_expiration: Option<Expiration>,
    /// The sources served; the other mapping files are only checked.
    pub sources: Enabled,
}

/// Which mapping files the relay serves (`sources`, `P0_RELAY_SOURCES`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enabled {
    /// Every mapping file in the folder.
    All,
    Only(BTreeSet<String>),
}

impl Enabled {
    /// Without a setting: the three sources the relay started with.
    pub const DEFAULT: &'static str = "github,pagerduty,opsgenie";

    /// `all`, or a comma-separated list of source names.
    pub fn parse(text: &str) -> Result<Enabled, String> {
        if text.trim().eq_ignore_ascii_case("all") {
            return Ok(Enabled::All);
        }
        let mut set = BTreeSet::new();
        for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if !is_source_name(name) {
                return Err(format!(
                    "`{}` is not a source name (lower-case letters, digits, - and _)",
                    crate::domain::printable(name)
                ));
            }
            set.insert(name.to_owned());
        }
        if set.is_empty() {
            return Err("names no source: list some (github,pagerduty) or say `all`".into());
        }
        Ok(Enabled::Only(set))
    }

    pub fn includes(&self, source: &str) -> bool {
        match self {
            Enabled::All => true,
            Enabled::Only(set) => set.contains(source),
        }
    }
}

fn is_source_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// What a mapping makes of one webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No rule matched.
    Ignored,
    /// A rule matched, but what it asked for is invalid or refused by policy.
    Rejected { rule: String, reason: String },
    /// A rule matched and produced decisions.
    Decided {
        rule: String,
        /// The actor (of the first element, for a `for_each` rule).
        actor: Option<String>,
        decisions: Vec<Decision>,
        /// For a `for_each` rule, the elements that decided, in order: each owns the next
        /// `decisions` of the list and is stored and deduplicated as a delivery of its own.
        /// Empty for other rules.
        elements: Vec<Element>,
        /// The subject, where to answer, and whether the event ends the subject (for a
        /// `for_each` rule, the first element's; each element carries its own).
        binding: Binding,
    },
}

/// One element of a `for_each` rule that produced decisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    /// Names the element within its delivery (see `element_key`).
    pub key: String,
    pub actor: Option<String>,
    /// How many of the verdict's decisions are this element's.
    pub decisions: usize,
    /// The element's subject (an alert's fingerprint), where to answer, and whether it ends.
    pub binding: Binding,
}

/// The dedup key of one element: the delivery's key and the element's, joined; a digest when
/// that would be longer than a stored key may be.
pub fn element_key(delivery: &str, element: &str) -> String {
    let key = format!("{delivery}#{element}");
    if key.len() <= 256 {
        key
    } else {
        format!("sha256:{}", hex::encode(Sha256::digest(key.as_bytes())))
    }
}

/// Why one rule did or did not decide, for `explain`.
#[derive(Debug, Clone, Serialize)]
pub struct RuleTrace {
    pub rule: String,
    pub matched: bool,
    pub detail: String,
}

/// One source's compiled mapping.
#[derive(Debug)]
pub struct Mapping {
    pub source: String,
    pub file: PathBuf,
    pub verifier: Verifier,
    dedup: replay::Dedup,
    freshness: Option<replay::Freshness>,
    rules: Vec<Rule>,
    /// What of a body the mapping reads (`projection`), computed when it loads.
    projection: projection::Projection,
    /// The file as parsed, before expansion: test cases recompile it under their own env.
    pub(crate) tree: Value,
    /// Things an operator should hear about at every start.
    pub warnings: Vec<String>,
}

#[derive(Debug)]
struct Rule {
    name: String,
    for_each: Option<ForEach>,
    when: Vec<Condition>,
    produce: Produce,
    actor: Option<Selector>,
    policy: RulePolicy,
    subject: Option<Extract>,
    ends_subject: Ends,
    answer: Option<Answer>,
}

/// When a rule's event ends its subject (compiled `ends_subject`).
#[derive(Debug)]
enum Ends {
    Never,
    Always,
    /// When this holds for the event or the `for_each` element: an alert group mixes firing
    /// alerts with resolved ones, and only the resolved ones end their subjects.
    When(Condition),
}

impl Ends {
    fn holds(&self, scope: Scope<'_>) -> bool {
        match self {
            Ends::Never => false,
            Ends::Always => true,
            Ends::When(c) => c.holds(scope),
        }
    }

    fn condition(&self) -> Option<&Condition> {
        match self {
            Ends::When(c) => Some(c),
            Ends::Never | Ends::Always => None,
        }
    }
}

/// Where a rule answers back (compiled `answer:`).
#[derive(Debug)]
struct Answer {
    via: Via,
    comment: Option<Extract>,
}

/// A rule's `for_each`: the elements, and the parts that name one.
#[derive(Debug)]
struct ForEach {
    path: Selector,
    key: Vec<Selector>,
}

impl ForEach {
    /// The element's key: its `key` parts joined, or a digest of the element when a part is
    /// missing or none are configured.
    fn key(&self, scope: Scope<'_>) -> String {
        let parts: Option<Vec<String>> = self
            .key
            .iter()
            .map(|p| {
                p.values_in(scope)
                    .into_iter()
                    .next()
                    .map(|v| v.into_owned())
            })
            .collect();
        match parts {
            Some(parts) if !parts.is_empty() => parts.join("|"),
            _ => {
                let text = scope.element.map(Value::to_string).unwrap_or_default();
                format!("sha256:{}", hex::encode(Sha256::digest(text.as_bytes())))
            }
        }
    }
}

/// What one rule made of one scope (the webhook, or one element of it).
enum Applied {
    NoMatch(String),
    /// The reason, and the line for `explain`.
    Rejected(String, String),
    Decided {
        actor: Option<String>,
        decisions: Vec<Decision>,
        binding: Binding,
        /// What `explain` says about the decisions and the binding.
        detail: String,
    },
}

#[derive(Debug)]
enum Produce {
    Command(Selector),
    Fields(Box<Fields>),
    /// A subject end naming no request: only the revocations the end makes.
    Nothing,
}

#[derive(Debug)]
struct Fields {
    action: Extract,
    request_id: Extract,
    expiration: Option<Extract>,
}

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
                let applied = apply(rule, input.into());
                // Ending a subject only takes access away: an old or replayed ending event is
                // still honoured (and GitHub's close events carry no comment time).
                if !matches!(applied, Applied::NoMatch(_))
                    && !rule.ends_subject.holds(input.into())
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
            let mut elements = Vec::new();
            let mut decisions = Vec::new();
            let mut skipped = Vec::new();
            let mut every_ends = true;
            for (i, node) in nodes.iter().enumerate() {
                let scope = Scope {
                    input,
                    element: Some(node),
                };
                match apply(rule, scope) {
                    Applied::NoMatch(why) => skipped.push(format!("element {}: {why}", i + 1)),
                    Applied::Rejected(reason, line) => {
                        note(rule, true, format!("element {}: {line}", i + 1));
                        return Verdict::Rejected {
                            rule: rule.name.clone(),
                            reason: format!(
                                "element {} of {}: {reason}",
                                i + 1,
                                each.path.describe()
                            ),
                        };
                    }
                    Applied::Decided {
                        actor,
                        decisions: mut ds,
                        binding,
                        ..
                    } => {
                        every_ends &= binding.ends_subject;
                        elements.push(Element {
                            key: each.key(scope),
                            actor,
                            decisions: ds.len(),
                            binding,
                        });
                        decisions.append(&mut ds);
                    }
                }
            }
            if elements.is_empty() {
                let why = if nodes.is_empty() {
                    format!("for_each {} yielded nothing", each.path.describe())
                } else {
                    format!("no element decided ({})", skipped.join("; "))
                };
                note(rule, false, why);
                continue;
            }
            if !every_ends && let Some(reason) = self.stale(input, now) {
                note(rule, true, reason.clone());
                return Verdict::Rejected {
                    rule: rule.name.clone(),
                    reason,
                };
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
}

/// Runs one rule's conditions, extraction and policy on one scope.
fn apply(rule: &Rule, scope: Scope<'_>) -> Applied {
    let ends = rule.ends_subject.holds(scope);
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
    // A malformed request named by an ending event must not keep the subject from ending: it
    // is dropped, and the end's own revocations go ahead. An ending event only revokes.
    let proposals = if ends {
        proposals
            .into_iter()
            .filter(|p| {
                Action::parse(&p.action) == Some(Action::Revoke)
                    && crate::domain::Id::parse(&p.request_id).is_ok()
            })
            .collect()
    } else {
        proposals
    };
    let subject = match rule.subject.as_ref().map(|s| s.first(scope)) {
        None => None,
        Some(Ok(s)) => Some(s),
        Some(Err(why)) if ends => {
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
    let binding = Binding {
        subject,
        reply,
        ends_subject: ends,
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
                    "; ends the subject: every request approved under it and not yet revoked is revoked",
                );
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

/// Every source's mapping, loaded from one folder.
#[derive(Debug, Default)]
pub struct MappingSet {
    pub dir: PathBuf,
    /// The enabled sources: served at `/webhooks/<source>`.
    pub mappings: BTreeMap<String, Arc<Mapping>>,
    /// Mapping files of sources not enabled, compiled only by `load_every` (for `check` and
    /// `test`), with stand-ins for the variables they reference that are unset. Never served.
    pub disabled: BTreeMap<String, Arc<Mapping>>,
}

impl MappingSet {
    /// Loads and compiles the mapping file of every enabled source (`defaults.sources`) in
    /// `dir`. All errors are returned, each naming its file, rule and field; an enabled
    /// source without a file is one.
    pub fn load(dir: &Path, env: &Env, defaults: &Defaults) -> Result<MappingSet, Vec<String>> {
        Self::load_with(dir, env, defaults, false)
    }

    /// As `load`, and also compiles the files of sources that are not enabled, for `check`
    /// and `test`: their syntax must hold even though their secrets need not be set.
    pub fn load_every(
        dir: &Path,
        env: &Env,
        defaults: &Defaults,
    ) -> Result<MappingSet, Vec<String>> {
        Self::load_with(dir, env, defaults, true)
    }

    fn load_with(
        dir: &Path,
        env: &Env,
        defaults: &Defaults,
        every: bool,
    ) -> Result<MappingSet, Vec<String>> {
        let entries = std::fs::read_dir(dir).map_err(|e| {
            vec![format!(
                "{}: cannot read mappings folder: {e}",
                dir.display()
            )]
        })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
            })
            .collect();
        files.sort();
        let stand_in = env.with_stand_ins();
        let mut errors = Vec::new();
        let mut seen = BTreeSet::new();
        let mut mappings = BTreeMap::new();
        let mut disabled = BTreeMap::new();
        for file in files {
            let source = file
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_owned();
            if !is_source_name(&source) {
                errors.push(format!(
                    "{}: a source name (the file stem) is lower-case letters, digits, - and _",
                    file.display()
                ));
                continue;
            }
            if !seen.insert(source.clone()) {
                errors.push(format!(
                    "{}: source `{source}` is defined twice (one of .yaml and .yml)",
                    file.display()
                ));
                continue;
            }
            let enabled = defaults.sources.includes(&source);
            if !enabled && !every {
                continue;
            }
            let env = if enabled { env } else { &stand_in };
            match load_file(&file, &source, env, defaults) {
                Ok(m) if enabled => {
                    mappings.insert(source, Arc::new(m));
                }
                Ok(m) => {
                    disabled.insert(source, Arc::new(m));
                }
                Err(mut errs) => errors.append(&mut errs),
            }
        }
        if let Enabled::Only(names) = &defaults.sources {
            for name in names.iter().filter(|n| !seen.contains(*n)) {
                errors.push(format!(
                    "sources: `{name}` is enabled, but there is no {}",
                    dir.join(format!("{name}.yaml")).display()
                ));
            }
        }
        if mappings.is_empty() && errors.is_empty() {
            errors.push(format!("{}: no mapping files (*.yaml)", dir.display()));
        }
        if errors.is_empty() {
            Ok(MappingSet {
                dir: dir.to_owned(),
                mappings,
                disabled,
            })
        } else {
            Err(errors)
        }
    }

    pub fn get(&self, source: &str) -> Option<&Arc<Mapping>> {
        self.mappings.get(source)
    }

    pub fn warnings(&self) -> impl Iterator<Item = &String> {
        self.mappings.values().flat_map(|m| m.warnings.iter())
    }
}

fn load_file(
    file: &Path,
    source: &str,
    env: &Env,
    defaults: &Defaults,
) -> Result<Mapping, Vec<String>> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| vec![format!("{}: cannot read: {e}", file.display())])?;
    from_text(source, file, &text, env, defaults)
}

/// Parses and compiles a mapping file's text as if read from `file`.
pub fn from_text(
    source: &str,
    file: &Path,
    text: &str,
    env: &Env,
    defaults: &Defaults,
) -> Result<Mapping, Vec<String>> {
    let tree: Value = serde_saphyr::from_str(text)
        .map_err(|e| vec![format!("{}: not valid YAML: {e}", file.display())])?;
    compile(source, file, tree, env, defaults)
}

/// Compiles a parsed mapping file, expanding `${VAR}` references (outside `tests`) from `env`.
pub fn compile(
    source: &str,
    file: &Path,
    tree: Value,
    env: &Env,
    defaults: &Defaults,
) -> Result<Mapping, Vec<String>> {
    let at = file.display().to_string();
    let mut expanded = tree.clone();
    if let Value::Object(map) = &mut expanded {
        let tests = map.remove("tests");
        env.expand_tree(&mut expanded, "")
            .map_err(|e| vec![format!("{at}: {e}")])?;
        if let (Value::Object(map), Some(tests)) = (&mut expanded, tests) {
            map.insert("tests".into(), tests);
        }
    } else {
        return Err(vec![format!(
            "{at}: a mapping file is a YAML mapping (verify, dedup, rules, tests)"
        )]);
    }
    let raw: RawMapping = serde_path_to_error::deserialize(expanded)
        .map_err(|e| vec![format!("{at}: {}: {}", e.path(), e.inner())])?;

    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let verifier = match verify::compile(raw.verify.as_ref(), source, &mut warnings) {
        Ok(v) => Some(v),
        Err(e) => {
            errors.push(format!("{at}: verify: {e}"));
            None
        }
    };
    let dedup = replay::Dedup::compile(raw.dedup.as_ref()).unwrap_or_else(|errs| {
        errors.extend(errs.into_iter().map(|e| format!("{at}: {e}")));
        replay::Dedup::default()
    });
    let freshness = replay::Freshness::compile(raw.freshness.as_ref()).unwrap_or_else(|errs| {
        errors.extend(errs.into_iter().map(|e| format!("{at}: {e}")));
        None
    });
    let mut rules = Vec::new();
    let mut names = BTreeSet::new();
    if raw.rules.is_empty() {
        errors.push(format!("{at}: rules: at least one rule is needed"));
    }
    for (i, r) in raw.rules.iter().enumerate() {
        let label = if r.name.trim().is_empty() {
            format!("rules[{i}]")
        } else {
            format!("rule `{}`", r.name)
        };
        if !names.insert(r.name.clone()) {
            errors.push(format!("{at}: {label}: duplicate rule name"));
            continue;
        }
        match compile_rule(r, &raw, defaults, source, &mut warnings) {
            Ok(rule) => rules.push(rule),
            Err(errs) => errors.extend(errs.into_iter().map(|e| format!("{at}: {label}: {e}"))),
        }
    }
    match verifier {
        Some(verifier) if errors.is_empty() => {
            let mut mapping = Mapping {
                source: source.to_owned(),
                file: file.to_owned(),
                verifier,
                dedup,
                freshness,
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

fn compile_rule(
    r: &RawRule,
    raw: &RawMapping,
    defaults: &Defaults,
    source: &str,
    warnings: &mut Vec<String>,
) -> Result<Rule, Vec<String>> {
    let mut errors = Vec::new();
    if r.name.trim().is_empty() {
        errors.push("name: empty".to_owned());
    }
    // `@` paths read the element of a `for_each` rule, and only such rules have one.
    let el = r.for_each.is_some();
    let for_each = r.for_each.as_ref().and_then(|f| {
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
    });
    let mut when = Vec::new();
    for (i, c) in r.when.iter().enumerate() {
        match condition(c, el) {
            Ok(c) => when.push(c),
            Err(e) => errors.push(format!("when[{i}]: {e}")),
        }
    }
    let ends = match &r.ends_subject {
        RawEnds::Always(false) => Ends::Never,
        RawEnds::Always(true) => Ends::Always,
        RawEnds::When(c) => match condition(c, el) {
            Ok(c) => Ends::When(c),
            Err(e) => {
                errors.push(format!("ends_subject: {e}"));
                Ends::Never
            }
        },
    };
    // A rule that always ends its subject only revokes; one that ends it under a condition
    // also grants (an alert firing approves, the same alert resolved ends).
    let always_ends = matches!(ends, Ends::Always);
    let may_end = !matches!(r.ends_subject, RawEnds::Always(false));
    let produce = match (&r.command, &r.action, &r.request_id) {
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
        (None, None, None) if always_ends => Some(Produce::Nothing),
        (None, None, Some(id)) if always_ends => match extract(id, el) {
            Ok(request_id) => Some(Produce::Fields(Box::new(Fields {
                action: Extract {
                    from: From::Constant("revoke".into()),
                    regex: None,
                    map: None,
                    default: None,
                },
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
    };
    if may_end {
        if r.command.is_some() {
            errors.push(
                "ends_subject: a rule that ends its subject only revokes; drop `command`".into(),
            );
        }
        if let Some(a) = &r.action
            && always_ends
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
    let subject = match r
        .subject
        .as_ref()
        .or(raw.subject.as_ref())
        .map(|x| extract(x, el))
    {
        None => None,
        Some(Ok(e)) => Some(e),
        Some(Err(e)) => {
            errors.push(format!("subject: {e}"));
            None
        }
    };
    let answer = match r.answer.as_ref().or(raw.answer.as_ref()).map(answer) {
        None | Some(Ok(None)) => None,
        Some(Ok(Some(a))) => Some(a),
        Some(Err(e)) => {
            errors.push(format!("answer: {e}"));
            None
        }
    };
    let (actor, actors) = match &r.actor {
        None => (None, None),
        Some(a) => {
            let sel = selector_in(
                &RawSelector {
                    path: a.path.clone(),
                    header: a.header.clone(),
                },
                el,
            );
            let allow = a.allow.as_deref().map(Allowlist::parse);
            match &allow {
                // Ending access is always allowed: approver lists gate grants only.
                _ if always_ends => {}
                Some(Allowlist::Anyone) | None => warnings.push(format!(
                    "source `{source}`, rule `{}`: any authenticated actor may act (no approvers set)",
                    r.name
                )),
                Some(Allowlist::Only(set)) if set.is_empty() => warnings.push(format!(
                    "source `{source}`, rule `{}`: the approver list is empty, so nobody may act",
                    r.name
                )),
                _ => {}
            }
            match sel {
                Ok(s) if always_ends => (Some(s), None),
                Ok(s) => (Some(s), Some(allow.unwrap_or(Allowlist::Anyone))),
                Err(e) => {
                    errors.push(format!("actor: {e}"));
                    (None, None)
                }
            }
        }
    };
    let actions = match &r.actions {
        None if always_ends => vec![Action::Revoke],
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
    };
    let parse_exp = |field: &str, text: &Option<String>, errors: &mut Vec<String>| {
        text.as_deref().and_then(|t| match Expiration::parse(t) {
            Ok(e) => Some(e),
            Err(e) => {
                errors.push(format!("{field}: {e}"));
                None
            }
        })
    };
    let default_expiration = parse_exp("default_expiration", &r.default_expiration, &mut errors)
        .unwrap_or_else(|| defaults.expiration.clone());
    let max_expiration = parse_exp("max_expiration", &r.max_expiration, &mut errors)
        .or_else(|| defaults.max_expiration.clone());
    let org = r
        .org
        .clone()
        .or_else(|| raw.org.clone())
        .unwrap_or_else(|| defaults.org.clone());
    if let Err(e) = crate::domain::Id::parse(&org) {
        errors.push(format!("org: {e}"));
    }
    match produce {
        Some(produce) if errors.is_empty() => Ok(Rule {
            name: r.name.clone(),
            for_each,
            when,
            produce,
            actor,
            policy: RulePolicy {
                actors,
                actions,
                default_expiration,
                max_expiration,
                org,
            },
            subject,
            ends_subject: ends,
            answer,
        }),
        _ => Err(errors),
    }
}

fn selector(raw: &RawSelector) -> Result<Selector, String> {
    selector_in(raw, false)
}

/// A selector; `@` paths (relative to a `for_each` element) only where `element` says so.
fn selector_in(raw: &RawSelector, element: bool) -> Result<Selector, String> {
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
    let comment = raw
        .comment
        .as_ref()
        .map(|x| extract(x, false))
        .transpose()
        .map_err(|e| format!("comment: {e}"))?;
    if comment.is_some() && via != Via::GitHub {
        return Err("comment: only GitHub answers on a comment".into());
    }
    Ok(Some(Answer { via, comment }))
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
        || c.exists.is_some();
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
        tests.push(Test::Equals(eval::scalar_text(v)));
    }
    if let Some(vs) = &c.one_of {
        tests.push(Test::OneOf(vs.iter().map(eval::scalar_text).collect()));
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
    })
}

fn extract(raw: &RawExtract, el: bool) -> Result<Extract, String> {
    match raw {
        RawExtract::Constant(c) => Ok(Extract {
            from: From::Constant(c.clone()),
            regex: None,
            map: None,
            default: None,
        }),
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
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderMap, HeaderValue};
    use serde_json::json;

    fn defaults() -> Defaults {
        Defaults {
            org: "acme".into(),
            expiration: Expiration::parse("1h").unwrap(),
            max_expiration: Some(Expiration::parse("12h").unwrap()),
            sources: Enabled::All,
        }
    }

    fn mapping(rules: Value) -> Mapping {
        let tree = json!({ "verify": { "scheme": "token", "secrets": "t" }, "rules": rules });
        compile(
            "src",
            Path::new("src.yaml"),
            tree,
            &Env::default(),
            &defaults(),
        )
        .unwrap()
    }

    /// Runs `payload` (with header `x-kind: kind`) through `rules` and describes the verdict.
    fn check(rules: &Value, kind: &str, payload: Value) -> String {
        let m = mapping(rules.clone());
        let mut headers = HeaderMap::new();
        headers.insert("x-kind", HeaderValue::from_str(kind).unwrap());
        cases::describe(&m.decide(
            Input {
                headers: &headers,
                body: &payload,
            },
            None,
        ))
    }

    #[test]
    fn conditions_extraction_and_rule_order() {
        let rules = json!([
            { "name": "by-header", "when": [ { "header": "X-Kind", "equals": "cmd" } ],
              "command": { "path": "$.text" } },
            { "name": "numbers", "when": [ { "path": "$.n", "equals": 5 } ],
              "action": "deny", "request_id": { "path": "$.id" } },
            { "name": "one-of", "when": [ { "path": "$.kind", "one_of": ["ack", "res"] },
                                           { "not": { "path": "$.skip", "exists": true } } ],
              "action": { "path": "$.kind", "map": { "ack": "approve", "res": "revoke" } },
              "request_id": { "path": "$.title", "regex": "\\[p0:([^\\]]+)\\]" },
              "expiration": { "path": "$.for", "default": "2h" } },
            { "name": "many", "when": [ { "path": "$.ids", "exists": true } ],
              "action": "revoke", "request_id": { "path": "$.ids[*]" } },
            { "name": "regex", "when": [ { "path": "$.body", "matches": "(?i)^grant" } ],
              "action": "approve", "request_id": { "path": "$.body", "regex": "(?i)grant (\\S+)" } }
        ]);
        let cases: &[(&str, Value, &str)] = &[
            (
                "cmd",
                json!({ "text": "/p0 approve r-1 2h" }),
                "rule `by-header` decided [approve r-1 2h in org acme]",
            ),
            ("cmd", json!({ "text": "no command" }), "ignored"),
            (
                "x",
                json!({ "n": 5, "id": "r-2" }),
                "rule `numbers` decided [deny r-2 in org acme]",
            ),
            (
                "x",
                json!({ "n": "5", "id": "r-2" }),
                "rule `numbers` decided [deny r-2 in org acme]",
            ),
            ("x", json!({ "n": 6, "id": "r-2" }), "ignored"),
            (
                "x",
                json!({ "kind": "ack", "title": "[p0:r-3] db" }),
                "rule `one-of` decided [approve r-3 2h in org acme]",
            ),
            (
                "x",
                json!({ "kind": "ack", "title": "[p0:r-3] db", "for": "30m" }),
                "rule `one-of` decided [approve r-3 30m in org acme]",
            ),
            (
                "x",
                json!({ "kind": "res", "title": "[p0:r-3] [p0:r-4]" }),
                "rule `one-of` decided [revoke r-3 in org acme, revoke r-4 in org acme]",
            ),
            (
                "x",
                json!({ "kind": "ack", "title": "[p0:r-3]", "skip": true }),
                "ignored",
            ),
            (
                "x",
                json!({ "kind": "ack", "title": "no tag" }),
                "rejected by rule `one-of`: request_id: /\\[p0:([^\\]]+)\\]/ did not match `no tag`",
            ),
            (
                "x",
                json!({ "ids": ["a", "b", "a"] }),
                "rule `many` decided [revoke a in org acme, revoke b in org acme]",
            ),
            (
                "x",
                json!({ "ids": [] }),
                "rejected by rule `many`: request_id: $.ids[*] yielded nothing",
            ),
            (
                "x",
                json!({ "body": "GRANT r-9 please" }),
                "rule `regex` decided [approve r-9 1h in org acme]",
            ),
            ("x", json!({ "body": null }), "ignored"),
            ("x", json!([1, 2, 3]), "ignored"),
            ("x", json!("just a string"), "ignored"),
        ];
        for (kind, payload, want) in cases {
            assert_eq!(&check(&rules, kind, payload.clone()), want, "{payload}");
        }
    }

    #[test]
    fn for_each_decides_per_element() {
        let rules = json!([
            { "name": "alerts",
              "for_each": { "path": "$.alerts[*]", "key": [ { "path": "@.fp" }, { "path": "@.status" } ] },
              "when": [ { "path": "@.status", "one_of": ["firing", "resolved"] },
                        { "path": "@.labels.req", "exists": true },
                        { "path": "$.kind", "equals": "group" } ],
              "action": { "path": "@.status", "map": { "firing": "approve", "resolved": "revoke" } },
              "request_id": { "path": "@.labels.req" },
              "expiration": { "path": "@.labels.for", "default": "1h" } }
        ]);
        let group = |alerts: Value| json!({ "kind": "group", "alerts": alerts });
        let cases: &[(Value, &str)] = &[
            (
                group(json!([
                    { "fp": "a", "status": "firing", "labels": { "req": "r-1", "for": "2h" } },
                    { "fp": "b", "status": "firing", "labels": {} },
                    { "fp": "c", "status": "resolved", "labels": { "req": "r-2" } }
                ])),
                "rule `alerts` decided [approve r-1 2h in org acme, revoke r-2 in org acme]",
            ),
            (
                group(json!([{ "fp": "b", "status": "firing", "labels": {} }])),
                "ignored",
            ),
            (group(json!([])), "ignored"),
            (
                json!({ "kind": "other", "alerts": [ { "status": "firing", "labels": { "req": "r-1" } } ] }),
                "ignored",
            ),
            (
                group(json!([
                    { "fp": "a", "status": "firing", "labels": { "req": "r-1" } },
                    { "fp": "c", "status": "firing", "labels": { "req": "r 2" } }
                ])),
                "rejected by rule `alerts`: element 2 of $.alerts[*]: request ID `r 2`",
            ),
        ];
        for (payload, want) in cases {
            let got = check(&rules, "x", payload.clone());
            assert!(got.starts_with(want), "{payload}: {got}");
        }
        // Each deciding element: its key, actor and share of the decisions.
        let m = mapping(rules);
        let headers = HeaderMap::new();
        let body = group(json!([
            { "fp": "a", "status": "firing", "labels": { "req": "r-1" } },
            { "status": "resolved", "labels": { "req": "r-2" } }
        ]));
        let Verdict::Decided { elements, .. } = m.decide(
            Input {
                headers: &headers,
                body: &body,
            },
            None,
        ) else {
            panic!("no decision");
        };
        assert_eq!(elements.len(), 2);
        assert_eq!(
            (elements[0].key.as_str(), elements[0].decisions),
            ("a|firing", 1)
        );
        assert!(
            elements[1].key.starts_with("sha256:"),
            "no fingerprint: a digest of the element"
        );
        assert_eq!(element_key("grp", "a|firing"), "grp#a|firing");
        assert!(element_key(&"g".repeat(300), "a").starts_with("sha256:"));
    }

    #[test]
    fn an_element_ends_its_subject_when_the_condition_holds_and_then_only_revokes() {
        // Approvers gate the firing alert's grant, not the resolved alert's end; an ending
        // element that maps to something other than revoke decides nothing for it.
        let tree = json!({
            "verify": { "scheme": "token", "secrets": "t" },
            "rules": [ {
                "name": "alerts",
                "for_each": { "path": "$.alerts[*]", "key": [ { "path": "@.fp" } ] },
                "subject": { "path": "@.fp" },
                "ends_subject": { "path": "@.status", "equals": "resolved" },
                "when": [ { "any": [
                    { "path": "@.req", "exists": true },
                    { "path": "@.status", "equals": "resolved" }
                ] } ],
                "action": { "path": "@.action" },
                "request_id": { "path": "@.req" },
                "actor": { "path": "@.by", "allow": "alice" }
            } ]
        });
        let m = compile("s", Path::new("s.yaml"), tree, &Env::default(), &defaults()).unwrap();
        let headers = HeaderMap::new();
        let body = json!({ "alerts": [
            { "fp": "a", "status": "firing", "action": "approve", "req": "r-1", "by": "alice" },
            { "fp": "b", "status": "resolved", "action": "revoke", "req": "r-2", "by": "bot" },
            { "fp": "c", "status": "resolved", "by": "bot" },
            { "fp": "d", "status": "resolved", "action": "approve", "req": "r-4" },
            { "fp": "e", "status": "firing", "by": "alice" }
        ] });
        let Verdict::Decided {
            elements,
            decisions,
            ..
        } = m.decide(
            Input {
                headers: &headers,
                body: &body,
            },
            None,
        )
        else {
            panic!("no decision");
        };
        let got: Vec<(&str, bool, usize)> = elements
            .iter()
            .map(|e| {
                (
                    e.binding.subject.as_deref().unwrap_or(""),
                    e.binding.ends_subject,
                    e.decisions,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("a", false, 1),
                ("b", true, 1),
                ("c", true, 0),
                ("d", true, 0)
            ]
        );
        let actions: Vec<(Action, &str)> = decisions
            .iter()
            .map(|d| (d.action, d.request_id.as_str()))
            .collect();
        assert_eq!(actions, [(Action::Approve, "r-1"), (Action::Revoke, "r-2")]);
        // A firing element by someone not on the list still refuses the group.
        let body = json!({ "alerts": [
            { "fp": "a", "status": "firing", "action": "approve", "req": "r-1", "by": "mallory" }
        ] });
        assert!(matches!(
            m.decide(
                Input {
                    headers: &headers,
                    body: &body,
                },
                None,
            ),
            Verdict::Rejected { .. }
        ));
    }

    #[test]
    fn compile_errors_name_rule_and_field() {
        let tree = json!({
            "verify": { "scheme": "token", "secrets": "t" },
            "rules": [
                { "name": "a", "action": "grant", "request_id": { "path": "$.id" } },
                { "name": "a", "command": { "path": "$.x" } },
                { "name": "b", "when": [ { "path": "$.x" } ], "command": { "header": "bad header" } },
                { "name": "c", "action": "approve" },
                { "name": "d", "command": { "path": "$.x" }, "max_expiration": "forever" },
                { "name": "e", "action": "approve", "request_id": { "path": "@.id" } },
                { "name": "f", "for_each": { "path": "$.a[" }, "action": "approve", "request_id": { "path": "@.id" } },
                { "name": "g", "when": [ { "any": [] }, { "any": [ { "path": "$.x", "exists": true } ], "path": "$.y" } ],
                  "action": "approve", "request_id": { "path": "$.id" } },
                { "name": "h", "ends_subject": { "path": "$.s" }, "subject": { "path": "$.s" },
                  "action": "approve", "request_id": { "path": "$.id" } },
                { "name": "i", "ends_subject": { "path": "$.s", "equals": "done" }, "command": { "path": "$.x" } }
            ]
        });
        let errors =
            compile("s", Path::new("s.yaml"), tree, &Env::default(), &defaults()).unwrap_err();
        let all = errors.join("\n");
        for fragment in [
            "s.yaml: rule `a`: action: `grant` is not approve, deny or revoke",
            "s.yaml: rule `a`: duplicate rule name",
            "s.yaml: rule `b`: when[0]: needs exactly one of",
            "s.yaml: rule `b`: command: `bad header` is not a valid header name",
            "s.yaml: rule `c`: needs either `command`, or both `action` and `request_id`",
            "s.yaml: rule `d`: max_expiration: expiration `forever`",
            "s.yaml: rule `e`: request_id: `@.id` reads a `for_each` element, and this rule has no `for_each`",
            "s.yaml: rule `f`: for_each.path: `$.a[` is not valid JSONPath",
            "s.yaml: rule `g`: when[0]: `any` needs at least one condition",
            "s.yaml: rule `g`: when[1]: `any` stands alone",
            "s.yaml: rule `h`: ends_subject: needs exactly one of",
            "s.yaml: rule `i`: ends_subject: a rule that ends its subject only revokes; drop `command`",
            "s.yaml: rule `i`: ends_subject: needs a `subject`",
        ] {
            assert!(all.contains(fragment), "missing {fragment:?} in:\n{all}");
        }
    }

    #[test]
    fn dedup_keys() {
        let tree = json!({
            "verify": { "scheme": "token", "secrets": "t" },
            "dedup": { "key": [ { "header": "X-Id" } ], "fallback": [ { "path": "$.a" }, { "path": "$.b" } ] },
            "rules": [ { "name": "r", "command": { "path": "$.x" } } ]
        });
        let m = compile("s", Path::new("s.yaml"), tree, &Env::default(), &defaults()).unwrap();
        let mut headers = HeaderMap::new();
        let body = json!({ "a": "x", "b": 1764239100456000123u64 });
        let key = |h: &HeaderMap, b: &Value| {
            m.dedup_key(
                Input {
                    headers: h,
                    body: b,
                },
                b"raw",
            )
        };
        assert_eq!(key(&headers, &body), "x|1764239100456000123");
        assert!(key(&headers, &json!({ "a": "x" })).starts_with("sha256:"));
        headers.insert("x-id", HeaderValue::from_static("abc"));
        assert_eq!(key(&headers, &body), "abc");
    }

    #[test]
    fn dedup_alternatives_signed_content_first() {
        let tree = json!({
            "verify": { "scheme": "token", "secrets": "t" },
            "dedup": [
                { "name": "comment", "key": [ { "path": "$.comment.id" }, { "path": "$.action" } ] },
                { "key": [ { "header": "X-Id" } ] }
            ],
            "rules": [ { "name": "r", "command": { "path": "$.x" } } ]
        });
        let m = compile("s", Path::new("s.yaml"), tree, &Env::default(), &defaults()).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("x-id", HeaderValue::from_static("fresh-header"));
        let key = |b: &Value| {
            m.dedup_key(
                Input {
                    headers: &headers,
                    body: b,
                },
                b"raw",
            )
        };
        assert_eq!(
            key(&json!({ "comment": { "id": 17 }, "action": "created" })),
            "comment:17|created"
        );
        assert_eq!(key(&json!({ "zen": "ping" })), "fresh-header");
    }

    #[test]
    fn dedup_and_freshness_errors_name_file_and_field() {
        let tree = json!({
            "verify": { "scheme": "token", "secrets": "t" },
            "dedup": [ { "name": "a b", "key": [ { "path": "$[" } ] }, { "key": [] }, { "kye": [] } ],
            "freshness": { "time": [ { "header": "bad header" } ], "max_age": "soon" },
            "rules": [ { "name": "r", "command": { "path": "$.x" } } ]
        });
        let all = compile("s", Path::new("s.yaml"), tree, &Env::default(), &defaults())
            .unwrap_err()
            .join("\n");
        assert!(
            all.contains("s.yaml: dedup[2].kye: unknown field `kye`"),
            "{all}"
        );
        let tree = json!({
            "verify": { "scheme": "token", "secrets": "t" },
            "dedup": [ { "name": "a b", "key": [ { "path": "$[" } ] }, { "key": [] } ],
            "freshness": { "time": [ { "header": "bad header" } ], "max_age": "soon" },
            "rules": [ { "name": "r", "command": { "path": "$.x" } } ]
        });
        let all = compile("s", Path::new("s.yaml"), tree, &Env::default(), &defaults())
            .unwrap_err()
            .join("\n");
        for fragment in [
            "s.yaml: dedup[0]: name: `a b` is not letters",
            "s.yaml: dedup[0]: key[0]: `$[` is not valid JSONPath",
            "s.yaml: dedup[1]: key: at least one part is needed",
            "s.yaml: freshness: time[0]: `bad header` is not a valid header name",
            "s.yaml: freshness: max_age: `soon` is not a duration",
        ] {
            assert!(all.contains(fragment), "missing {fragment:?} in:\n{all}");
        }
    }

    #[test]
    fn freshness_refuses_old_and_future_events_and_is_off_without_max_age() {
        let tree = |max_age: &str| {
            json!({
                "verify": { "scheme": "token", "secrets": "t" },
                "freshness": { "time": [ { "path": "$.created_at" }, { "path": "$.submitted_at" } ],
                               "max_age": max_age },
                "rules": [ { "name": "r", "command": { "path": "$.x" } } ]
            })
        };
        let m = compile(
            "s",
            Path::new("s.yaml"),
            tree("10m"),
            &Env::default(),
            &defaults(),
        )
        .unwrap();
        let now = parse_rfc3339("2026-11-27T10:15:00Z").unwrap();
        let headers = HeaderMap::new();
        let verdict = |body: Value, now: Option<SystemTime>| {
            cases::describe(&m.decide(
                Input {
                    headers: &headers,
                    body: &body,
                },
                now,
            ))
        };
        let cmd = "/p0 deny r-1";
        let decided = "rule `r` decided [deny r-1 in org acme]";
        for (body, want) in [
            (json!({ "x": cmd, "created_at": "2026-11-27T10:06:00Z" }), decided.to_owned()),
            (json!({ "x": cmd, "submitted_at": "2026-11-27T10:15:59+00:00" }), decided.to_owned()),
            (
                json!({ "x": cmd, "created_at": "2026-11-27T10:04:59Z" }),
                "rejected by rule `r`: freshness: event time 2026-11-27T10:04:59Z ($.created_at) is 10m 1s old, more than the 10m allowed".into(),
            ),
            (
                json!({ "x": cmd, "created_at": "2026-11-27T10:17:00Z" }),
                "rejected by rule `r`: freshness: event time 2026-11-27T10:17:00Z ($.created_at) is 2m in the future, more than the 1m of clock skew allowed".into(),
            ),
            (
                json!({ "x": cmd }),
                "rejected by rule `r`: freshness: no event time at $.created_at or $.submitted_at".into(),
            ),
            (
                json!({ "x": cmd, "created_at": 1764238500 }),
                "rejected by rule `r`: freshness: event time `1764238500` at $.created_at is not RFC 3339".into(),
            ),
            // Freshness guards actions only: what no rule matches stays ignored.
            (json!({ "created_at": "2020-01-01T00:00:00Z" }), "ignored".into()),
        ] {
            assert_eq!(verdict(body.clone(), Some(now)), want, "{body}");
        }
        // Without a clock (test cases that name no `now`) the check is skipped.
        assert_eq!(
            verdict(
                json!({ "x": cmd, "created_at": "2020-01-01T00:00:00Z" }),
                None
            ),
            decided
        );
        // An empty max_age (`${GITHUB_MAX_EVENT_AGE:-}` unset) turns it off.
        let off = compile(
            "s",
            Path::new("s.yaml"),
            tree(""),
            &Env::default(),
            &defaults(),
        )
        .unwrap();
        assert_eq!(off.max_event_age(), None);
        assert_eq!(m.max_event_age(), Some(std::time::Duration::from_secs(600)));
    }
}
