//! Mapping files, one per source: how its webhooks are verified and deduplicated, and the
//! ordered rules that turn a payload into decisions. Compiled once at load; evaluation is pure.
//! `load` reads the folder, `compile` turns a file into a `Mapping` (every JSONPath, regex and
//! policy checked once), `evaluate` runs one on a webhook; `expr` is the language of
//! selectors, conditions and extractions the three share.

/// Which fields of a raw section were given, by name: `given!(raw; a, b)` is
/// `[("a", raw.a.is_some()), ("b", raw.b.is_some())]` (for naming those that do not apply).
macro_rules! given {
    ($raw:expr; $($field:ident),+ $(,)?) => {
        [$((stringify!($field), $raw.$field.is_some())),+]
    };
}

pub mod cases;
pub mod command;
mod compile;
mod evaluate;
mod expr;
mod load;
pub mod model;
pub mod projection;
mod replay;
mod verify;

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::domain::printable;
use crate::domain::{Action, Binding, Expiration, Gate, GateScope, Reply, Via};
use crate::env::Env;
use crate::policy::{self, Allowlist, Decision, Proposal, RulePolicy};
use crate::verify::Verifier;

pub use compile::compile;
pub use expr::Input;
use expr::{Condition, Extract, Scope, Selector};
pub use load::{MappingSet, from_text};
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
    /// A rule matched, but what it asked for is invalid or refused by policy: why, whose (the
    /// actor, when the rule names one) and what was asked (as the payload had it, untrusted),
    /// for the answer and the audit trail.
    Rejected {
        rule: String,
        reason: String,
        actor: Option<String>,
        asked: Vec<Proposal>,
    },
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
        /// Why the approves among `decisions` are refused although the rule allowed them (the
        /// event is older than its source's grants may be): they are stored only to be
        /// recorded refused and answered back, never sent. Each element carries its own.
        refused: Option<String>,
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
    /// Why the element's approves are refused (see `Verdict::Decided`).
    pub refused: Option<String>,
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
    freshness: replay::Freshness,
    /// Where a delivery says how many elements its sender left out (`truncated`).
    truncated: Option<Selector>,
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
    ends_subject: Flag,
    reopens_subject: Flag,
    answer: Option<Answer>,
    oncall: Option<Oncall>,
    /// The rule approves with no actor (`actorless`): whether it may, and whose word it
    /// trusts then.
    actorless: Option<Actorless>,
    /// Who may grant through this rule, in one line for `check` (`None`: it grants nothing).
    grants: Option<String>,
    /// Someone may grant through it: an approver list that names anyone, or grants with no
    /// actor switched on.
    open: bool,
}

/// A rule's `actorless`: approves with no person behind them.
#[derive(Debug)]
struct Actorless {
    /// Off unless the operator turned it on: such approves are refused, ends still end.
    on: bool,
    /// The switch, as the operator sets it (`ALERTMANAGER_GRANTS`), for messages.
    switch: String,
}

/// A compiled `oncall`: what the worker checks before it sends an approve of this rule. The
/// scope (`GateScope`) comes from the operator; the payload only says which incident and who.
/// Compiled once per rule, never copied per request, so its variants' sizes do not matter.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
enum Oncall {
    PagerDuty {
        escalation_policy: Option<Extract>,
        incident: Option<Extract>,
        scope: GateScope,
    },
    Opsgenie {
        scope: GateScope,
    },
    GitHub {
        /// Where the payload names the repository's owner, which must be the pinned org.
        owner: Selector,
        scope: GateScope,
    },
}

impl Oncall {
    fn scope(&self) -> &GateScope {
        match self {
            Oncall::PagerDuty { scope, .. }
            | Oncall::Opsgenie { scope }
            | Oncall::GitHub { scope, .. } => scope,
        }
    }
}

/// When a rule's event ends (or reopens) its subject: compiled `ends_subject` and
/// `reopens_subject`.
#[derive(Debug)]
enum Flag {
    Never,
    Always,
    /// When this holds for the event or the `for_each` element: an alert group mixes firing
    /// alerts with resolved ones, and only the resolved ones end their subjects.
    When(Condition),
}

impl Flag {
    fn holds(&self, scope: Scope<'_>) -> bool {
        match self {
            Flag::Never => false,
            Flag::Always => true,
            Flag::When(c) => c.holds(scope),
        }
    }

    fn condition(&self) -> Option<&Condition> {
        match self {
            Flag::When(c) => Some(c),
            Flag::Never | Flag::Always => None,
        }
    }
}

/// Where a rule answers back (compiled `answer:`).
#[derive(Debug)]
struct Answer {
    via: Via,
    /// Where to answer when that is not the subject (GitHub: `owner/repo#number`).
    on: Option<Extract>,
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
    Rejected(Refusal),
    Decided {
        actor: Option<String>,
        decisions: Vec<Decision>,
        binding: Binding,
        /// What `explain` says about the decisions and the binding.
        detail: String,
    },
}

/// Why a rule refused what it was asked: the reason, the line for `explain`, the actor and
/// what was asked.
struct Refusal {
    reason: String,
    line: String,
    actor: Option<String>,
    asked: Vec<Proposal>,
}

impl Refusal {
    fn verdict(self, rule: &Rule) -> Verdict {
        Verdict::Rejected {
            rule: rule.name.clone(),
            reason: self.reason,
            actor: self.actor,
            asked: self.asked,
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderMap, HeaderValue};
    use serde_json::json;
    use std::path::Path;
    use std::time::SystemTime;

    fn defaults() -> Defaults {
        Defaults {
            org: "acme".into(),
            expiration: Expiration::parse("1h").unwrap(),
            max_expiration: Some(Expiration::parse("12h").unwrap()),
            sources: Enabled::All,
        }
    }

    /// Rules that name no actor are given `actorless` grants here: these tests are about
    /// conditions and extraction, not about who may grant.
    fn mapping(mut rules: Value) -> Mapping {
        for rule in rules.as_array_mut().into_iter().flatten() {
            if rule.get("actor").is_none() {
                rule["actorless"] = json!({ "grants": "on", "trusts": "the tests" });
            }
        }
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

    /// The errors compiling `tree` makes, joined; each of `fragments` must be among them.
    fn errors_naming(tree: Value, fragments: &[&str]) -> String {
        let all = mapping_of(tree).unwrap_err().join("\n");
        for fragment in fragments {
            assert!(all.contains(fragment), "missing {fragment:?} in:\n{all}");
        }
        all
    }

    /// The mapping file `s.yaml` of source `s`, compiled.
    fn mapping_of(tree: Value) -> Result<Mapping, Vec<String>> {
        compile("s", Path::new("s.yaml"), tree, &Env::default(), &defaults())
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
        // Long on purpose: one mapping file and the events it judges, read top to bottom.
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
        // Long on purpose: one mapping file and the events it judges, read top to bottom.
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
        let m = mapping_of(tree).unwrap();
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
        // A firing element by someone not on the list refuses what the group grants...
        let decide = |body: &Value| {
            m.decide(
                Input {
                    headers: &headers,
                    body,
                },
                None,
            )
        };
        let firing = json!({ "fp": "a", "status": "firing", "action": "approve", "req": "r-1", "by": "mallory" });
        assert!(matches!(
            decide(&json!({ "alerts": [firing.clone()] })),
            Verdict::Rejected { .. }
        ));
        // ...but not the ends beside it: a refused delivery is never sent again.
        let resolved = json!({ "fp": "b", "status": "resolved", "by": "bot" });
        let Verdict::Decided {
            elements,
            decisions,
            ..
        } = decide(&json!({ "alerts": [firing, resolved] }))
        else {
            panic!("the resolved alert's end was lost");
        };
        assert_eq!(elements.len(), 1);
        assert_eq!(
            (
                elements[0].binding.subject.as_deref(),
                elements[0].binding.ends_subject
            ),
            (Some("b"), true)
        );
        assert!(decisions.is_empty());
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
                { "name": "i", "ends_subject": { "path": "$.s", "equals": "done" }, "command": { "path": "$.x" } },
                { "name": "j", "ends_subject": { "path": "$.s", "equals": "done" }, "subject": { "path": "$.s" },
                  "action": "approve", "request_id": { "path": "$.id" }, "actions": ["approve"] }
            ]
        });
        errors_naming(
            tree,
            &[
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
                "s.yaml: rule `j`: actions: a rule that ends its subject must allow `revoke`",
            ],
        );
    }

    #[test]
    fn oncall_errors_name_rule_and_field() {
        let rule = |name: &str, oncall: Value| json!({ "name": name, "command": { "path": "$.x" }, "actor": { "path": "$.by", "allow": "*" }, "oncall": oncall });
        let tree = json!({
            "verify": { "scheme": "token", "secrets": "t" },
            "rules": [
                rule("a", json!({ "check": "github", "teams": "sre", "owner": { "path": "$.o" } })),
                rule("b", json!({ "check": "github", "org": "acme", "owner": { "path": "$.o" } })),
                rule("c", json!({ "check": "opsgenie", "enabled": "on" })),
                rule("d", json!({ "check": "pagerduty", "escalation_policies": "P1" })),
                rule("e", json!({ "check": "pagerduty", "incident": { "path": "$.i" }, "escalation_policies": "P1", "max_level": "0" })),
                rule("f", json!({ "check": "pagerduty", "incident": { "path": "$.i" }, "teams": "x" })),
                rule("g", json!({ "check": "pagerduty", "incident": { "path": "$.i" }, "enabled": "maybe" })),
                rule("h", json!({ "check": "teleport" })),
                { "name": "i", "command": { "path": "$.x" }, "actorless": { "grants": "on", "trusts": "t" },
                  "oncall": { "check": "github", "org": "acme", "owner": { "path": "$.o" }, "teams": "sre" } },
                rule("j", json!({ "check": "opsgenie", "enabled": "off" })),
                rule("k", json!({ "check": "pagerduty", "incident": { "path": "$.i" } })),
                rule("l", json!({ "check": "github", "org": { "path": "$.repository.owner.login" }, "owner": { "path": "$.o" }, "teams": "sre" })),
                rule("m", json!({ "check": "github", "org": "acme", "teams": "sre" })),
                rule("n", json!({ "check": "opsgenie", "schedules": "s", "at": { "path": "$.at" } }))
            ]
        });
        let all = errors_naming(
            tree,
            &[
                "s.yaml: rule `a`: oncall: the github check needs a pinned `org`",
                "s.yaml: rule `b`: oncall: the github check needs `teams`",
                "s.yaml: rule `c`: oncall: the opsgenie check needs `schedules`",
                "s.yaml: rule `d`: oncall: the pagerduty check needs `escalation_policy` or `incident`",
                "s.yaml: rule `e`: oncall: max_level: `0` is not a level",
                "s.yaml: rule `f`: oncall: teams: not used by the `pagerduty` check",
                "s.yaml: rule `g`: oncall: enabled: `maybe` is not on or off",
                "s.yaml: rule `h`: oncall: check: `teleport` is not pagerduty, opsgenie, jsm or github",
                "s.yaml: rule `i`: oncall: needs the rule's `actor`",
                "s.yaml: rule `k`: oncall: the pagerduty check needs pinned `escalation_policies` or `schedules`",
                "s.yaml: rule `l`: oncall: org: the organization is pinned by name",
                "s.yaml: rule `m`: oncall: the github check needs `owner`",
                "s.yaml: rule `n`: oncall: at: the moment judged is the mapping's signed event time",
            ],
        );
        assert!(
            all.contains("rule `j`: actor.allow: `*` (anyone) is accepted only with the rule's on-call check on"),
            "a check turned off is no check, so `*` is refused:\n{all}"
        );
    }

    #[test]
    fn nobody_grants_unless_named() {
        // Long on purpose: one mapping file and the events it judges, read top to bottom.
        let errors = |rules: Value| {
            let tree = json!({ "verify": { "scheme": "github", "secrets": "t" }, "rules": rules });
            mapping_of(tree).err().unwrap_or_default().join("\n")
        };
        // A rule that may approve names its actor, or says it has none.
        let all =
            errors(json!([{ "name": "a", "action": "approve", "request_id": { "path": "$.id" } }]));
        assert!(
            all.contains("rule `a`: actor: a rule that may approve names who approves"),
            "{all}"
        );
        // One that only revokes or denies needs neither, and keeps its list when it has one.
        let all = errors(
            json!([{ "name": "b", "action": "deny", "request_id": { "path": "$.id" }, "actions": ["deny"] }]),
        );
        assert_eq!(all, "");
        let tree = json!({ "verify": { "scheme": "github", "secrets": "t" }, "rules": [
            { "name": "d", "command": { "path": "$.x" }, "actor": { "path": "$.by", "allow": "secops" },
              "actions": ["deny", "revoke"] } ] });
        let deny_only = mapping_of(tree).unwrap();
        let headers = HeaderMap::new();
        let by = |who: &str| {
            cases::describe(&deny_only.decide(
                Input {
                    headers: &headers,
                    body: &json!({ "x": "/p0 deny r-1", "by": who }),
                },
                None,
            ))
        };
        assert!(
            by("secops").contains("decided [deny r-1"),
            "{}",
            by("secops")
        );
        assert!(
            by("mallory").contains("`mallory` is not allowed"),
            "{}",
            by("mallory")
        );
        // Both at once is a contradiction.
        let all = errors(
            json!([{ "name": "c", "command": { "path": "$.x" }, "actor": { "path": "$.by" },
                                  "actorless": { "grants": "on", "trusts": "t" } }]),
        );
        assert!(
            all.contains("actorless: the rule names its `actor`"),
            "{all}"
        );
        // An unset approver list is nobody; a missing actor refuses the grant, listed or not.
        let m = |allow: &str| {
            let tree = json!({ "verify": { "scheme": "github", "secrets": "t" },
                "rules": [ { "name": "r", "command": { "path": "$.x" }, "actor": { "path": "$.by", "allow": allow } } ] });
            mapping_of(tree).unwrap()
        };
        let headers = HeaderMap::new();
        let say = |m: &Mapping, body: Value| {
            cases::describe(&m.decide(
                Input {
                    headers: &headers,
                    body: &body,
                },
                None,
            ))
        };
        let grant = json!({ "x": "/p0 approve r-1", "by": "alice" });
        assert!(say(&m(""), grant.clone()).contains("`alice` is not allowed"));
        assert!(say(&m("alice"), grant).contains("decided [approve r-1"));
        for nobody in [
            json!({ "x": "/p0 approve r-1" }),
            json!({ "x": "/p0 approve r-1", "by": "" }),
            json!({ "x": "/p0 approve r-1", "by": null }),
        ] {
            assert!(
                say(&m("alice"), nobody.clone()).contains("no actor"),
                "{nobody}"
            );
        }
        // Grants with no actor are off unless turned on; an end still ends.
        let actorless = |grants: &str| {
            let tree = json!({ "verify": { "scheme": "token", "secrets": "t" },
                "rules": [ { "name": "r", "for_each": { "path": "$.alerts[*]" },
                             "subject": { "path": "@.fp" },
                             "ends_subject": { "path": "@.status", "equals": "resolved" },
                             "action": { "path": "@.status", "map": { "firing": "approve", "resolved": "revoke" } },
                             "request_id": { "path": "@.req" }, "actions": ["approve", "revoke"],
                             "actorless": { "grants": grants, "trusts": "whoever posts alerts" } } ] });
            mapping_of(tree).unwrap()
        };
        let firing = json!({ "alerts": [ { "fp": "a", "status": "firing", "req": "r-1" } ] });
        assert!(say(&actorless("on"), firing.clone()).contains("decided [approve r-1"));
        assert!(say(&actorless("off"), firing).contains("grants without an actor are off"));
        let both = json!({ "alerts": [ { "fp": "a", "status": "firing", "req": "r-1" }, { "fp": "b", "status": "resolved" } ] });
        let said = say(&actorless(""), both);
        assert!(said.contains("ending subject(s) `b`"), "{said}");
        assert!(said.contains("decided []"), "{said}");
        assert_eq!(
            actorless("on").warnings,
            [
                "source `s`, rule `r`: approves with no actor (actorless.grants=on): it trusts whoever posts alerts"
            ]
        );
    }

    #[test]
    fn oncall_gates_grants_as_of_the_moment_judged() {
        // Long on purpose: one mapping file and the events it judges, read top to bottom.
        let tree = |scheme: &str, freshness: Value| {
            json!({
                "verify": { "scheme": scheme, "secrets": "t" },
                "subject": { "path": "$.alert" },
                "freshness": freshness,
                "rules": [
                    { "name": "r", "action": { "path": "$.action" }, "request_id": { "path": "$.req" },
                      "actor": { "path": "$.by", "allow": "*" },
                      "oncall": { "check": "opsgenie", "schedules": "primary, secondary" } }
                ]
            })
        };
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        let headers = HeaderMap::new();
        let gate = |m: &Mapping, body: Value| match m.decide(
            Input {
                headers: &headers,
                body: &body,
            },
            Some(now),
        ) {
            Verdict::Decided { binding, .. } => Ok(binding.gate.map(|g| *g)),
            Verdict::Rejected { reason, .. } => Err(reason),
            Verdict::Ignored => Err("ignored".into()),
        };
        // A token holder writes the whole body: its times count for nothing, the receipt does.
        let token = mapping_of(tree("token", json!({ "max_age": "1h" }))).unwrap();
        let g = gate(
            &token,
            json!({ "alert": "a", "action": "approve", "req": "r-1", "by": "U1", "at": "2025-11-27T10:25:00Z" }),
        );
        assert!(
            matches!(&g, Ok(Some(crate::domain::Gate::Opsgenie { at_ms: 1_800_000_000_000, user, schedules, jsm: false })) if user == "U1" && schedules.len() == 2),
            "{g:?}"
        );
        // Nor may such a source name a time to judge by.
        let err = mapping_of(tree("token", json!({ "time": [ { "path": "$.at" } ] })))
            .unwrap_err()
            .join("\n");
        assert!(
            err.contains("freshness: time: this source's verification signs no body"),
            "{err}"
        );
        // A signed body's event time is the moment judged (and must be fresh).
        let signed = mapping_of(tree("github", json!({ "time": [ { "path": "$.at" } ] }))).unwrap();
        let g = gate(
            &signed,
            json!({ "alert": "a", "action": "approve", "req": "r-1", "by": "U1", "at": "2027-01-15T07:59:00.456Z" }),
        );
        assert!(
            matches!(
                g,
                Ok(Some(crate::domain::Gate::Opsgenie {
                    at_ms: 1_799_999_940_456,
                    ..
                }))
            ),
            "{g:?}"
        );
        // Ending access is never checked.
        for action in ["revoke", "deny"] {
            let g = gate(
                &token,
                json!({ "alert": "a", "action": action, "req": "r-1", "by": "U1" }),
            );
            assert_eq!(g, Ok(None), "{action}");
        }
        // No freshness for a gated rule: its moment could be any old one a replay carries.
        let err = mapping_of(tree(
            "github",
            json!({ "time": [ { "path": "$.at" } ], "max_age": "0" }),
        ))
        .unwrap_err()
        .join("\n");
        assert!(
            err.contains("freshness: max_age: 0 turns freshness off, which rule `r` may not"),
            "{err}"
        );
    }

    #[test]
    fn dedup_keys() {
        let tree = json!({
            "verify": { "scheme": "token", "secrets": "t" },
            "dedup": { "key": [ { "header": "X-Id" } ], "fallback": [ { "path": "$.a" }, { "path": "$.b" } ] },
            "rules": [ { "name": "r", "command": { "path": "$.x" }, "actor": { "path": "$.by", "allow": "a" } } ]
        });
        let m = mapping_of(tree).unwrap();
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
            "rules": [ { "name": "r", "command": { "path": "$.x" }, "actor": { "path": "$.by", "allow": "a" } } ]
        });
        let m = mapping_of(tree).unwrap();
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
            "rules": [ { "name": "r", "command": { "path": "$.x" }, "actor": { "path": "$.by", "allow": "a" } } ]
        });
        let all = mapping_of(tree).unwrap_err().join("\n");
        assert!(
            all.contains("s.yaml: dedup[2].kye: unknown field `kye`"),
            "{all}"
        );
        let tree = json!({
            "verify": { "scheme": "token", "secrets": "t" },
            "dedup": [ { "name": "a b", "key": [ { "path": "$[" } ] }, { "key": [] } ],
            "freshness": { "time": [ { "header": "bad header" } ], "max_age": "soon" },
            "rules": [ { "name": "r", "command": { "path": "$.x" }, "actor": { "path": "$.by", "allow": "a" } } ]
        });
        let all = mapping_of(tree).unwrap_err().join("\n");
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
    fn freshness_refuses_old_and_future_grants_only() {
        // Long on purpose: one mapping file and the events it judges, read top to bottom.
        let tree = |max_age: &str| {
            json!({
                "verify": { "scheme": "github", "secrets": "t" },
                "freshness": { "time": [ { "path": "$.created_at" }, { "path": "$.submitted_at" } ],
                               "max_age": max_age },
                "rules": [ { "name": "r", "command": { "path": "$.x" }, "actor": { "path": "$.by", "allow": "a" } } ]
            })
        };
        let m = mapping_of(tree("10m")).unwrap();
        let now = parse_rfc3339("2026-11-27T10:15:00Z").unwrap();
        let headers = HeaderMap::new();
        let verdict = |m: &Mapping, body: Value, now: Option<SystemTime>| {
            cases::describe(&m.decide(
                Input {
                    headers: &headers,
                    body: &body,
                },
                now,
            ))
        };
        let cmd = "/p0 approve r-1";
        let decided = "rule `r` decided [approve r-1 1h in org acme]";
        let refused = |why: &str| {
            format!("{decided}; its approves refused (stored only to be answered back): {why}")
        };
        for (body, want) in [
            (
                json!({ "x": cmd, "by": "a", "created_at": "2026-11-27T10:06:00Z" }),
                decided.to_owned(),
            ),
            (
                json!({ "x": cmd, "by": "a", "submitted_at": "2026-11-27T10:15:59+00:00" }),
                decided.to_owned(),
            ),
            (
                json!({ "x": cmd, "by": "a", "created_at": "2026-11-27T10:04:59Z" }),
                refused(
                    "event is 10m 1s old (2026-11-27T10:04:59Z at $.created_at); grants must be under 10m",
                ),
            ),
            (
                json!({ "x": cmd, "by": "a", "created_at": "2026-11-27T10:17:00Z" }),
                refused(
                    "event time 2026-11-27T10:17:00Z ($.created_at) is 2m in the future, more than the 1m of clock skew allowed",
                ),
            ),
            (
                json!({ "x": cmd, "by": "a" }),
                refused(
                    "no event time at $.created_at or $.submitted_at: grants must be under 10m old",
                ),
            ),
            (
                json!({ "x": cmd, "by": "a", "created_at": 1764238500 }),
                refused("event time `1764238500` at $.created_at is not RFC 3339"),
            ),
            // Ending access is never refused for age.
            (
                json!({ "x": "/p0 revoke r-1", "by": "a", "created_at": "2020-01-01T00:00:00Z" }),
                "rule `r` decided [revoke r-1 in org acme]".into(),
            ),
            // What no rule matches stays ignored.
            (
                json!({ "created_at": "2020-01-01T00:00:00Z" }),
                "ignored".into(),
            ),
        ] {
            assert_eq!(verdict(&m, body.clone(), Some(now)), want, "{body}");
        }
        // Without a clock (test cases that name no `now`) the check is skipped.
        assert_eq!(
            verdict(
                &m,
                json!({ "x": cmd, "by": "a", "created_at": "2020-01-01T00:00:00Z" }),
                None
            ),
            decided
        );
        // An empty max_age is the default hour; `0` turns the check off.
        let hour = mapping_of(tree("")).unwrap();
        assert_eq!(
            hour.max_event_age(),
            Some(std::time::Duration::from_secs(3600))
        );
        let off = mapping_of(tree("0")).unwrap();
        assert_eq!(off.max_event_age(), None);
        assert_eq!(
            verdict(
                &off,
                json!({ "x": cmd, "by": "a", "created_at": "2020-01-01T00:00:00Z" }),
                Some(now)
            ),
            decided
        );
        assert_eq!(m.max_event_age(), Some(std::time::Duration::from_secs(600)));
    }
}
