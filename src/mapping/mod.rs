//! Mapping files, one per source: how its webhooks are verified and deduplicated, and the
//! ordered rules that turn a payload into decisions. Compiled once at load; evaluation is pure.
//! `load` reads the folder, `compile` turns a file into a `Mapping` (every JSONPath, regex and
//! policy checked once), `evaluate` runs one on a webhook; `expr` is the language of
//! selectors, conditions and extractions the three share.

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
use crate::domain::{Action, Binding, Expiration, Gate, Reply, Via};
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
}

/// A compiled `oncall`: what the worker checks before it sends an approve of this rule.
/// Compiled once per rule, never copied per request, so its variants' sizes do not matter.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
enum Oncall {
    PagerDuty {
        escalation_policy: Option<Extract>,
        incident: Option<Extract>,
        max_level: Option<u32>,
        schedules: Vec<String>,
        at: Option<Selector>,
    },
    Opsgenie {
        jsm: bool,
        schedules: Vec<String>,
        at: Option<Selector>,
    },
    GitHub {
        org: Extract,
        teams: Vec<String>,
    },
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
            "s.yaml: rule `j`: actions: a rule that ends its subject must allow `revoke`",
        ] {
            assert!(all.contains(fragment), "missing {fragment:?} in:\n{all}");
        }
    }

    #[test]
    fn oncall_errors_name_rule_and_field() {
        let rule = |name: &str, oncall: Value| json!({ "name": name, "command": { "path": "$.x" }, "actor": { "path": "$.by" }, "oncall": oncall });
        let tree = json!({
            "verify": { "scheme": "token", "secrets": "t" },
            "rules": [
                rule("a", json!({ "check": "github", "teams": "sre" })),
                rule("b", json!({ "check": "github", "org": { "path": "$.o" } })),
                rule("c", json!({ "check": "opsgenie", "enabled": "on" })),
                rule("d", json!({ "check": "pagerduty" })),
                rule("e", json!({ "check": "pagerduty", "incident": { "path": "$.i" }, "max_level": "0" })),
                rule("f", json!({ "check": "pagerduty", "incident": { "path": "$.i" }, "teams": "x" })),
                rule("g", json!({ "check": "pagerduty", "incident": { "path": "$.i" }, "enabled": "maybe" })),
                rule("h", json!({ "check": "teleport" })),
                { "name": "i", "command": { "path": "$.x" }, "oncall": { "check": "github", "org": { "path": "$.o" }, "teams": "sre" } },
                rule("j", json!({ "check": "opsgenie", "enabled": "off" }))
            ]
        });
        let errors =
            compile("s", Path::new("s.yaml"), tree, &Env::default(), &defaults()).unwrap_err();
        let all = errors.join("\n");
        for fragment in [
            "s.yaml: rule `a`: oncall: the github check needs `org`",
            "s.yaml: rule `b`: oncall: the github check needs `teams`",
            "s.yaml: rule `c`: oncall: the opsgenie check needs `schedules`",
            "s.yaml: rule `d`: oncall: the pagerduty check needs `escalation_policy` or `incident`",
            "s.yaml: rule `e`: oncall: max_level: `0` is not a level",
            "s.yaml: rule `f`: oncall: teams: not used by the `pagerduty` check",
            "s.yaml: rule `g`: oncall: enabled: `maybe` is not on or off",
            "s.yaml: rule `h`: oncall: check: `teleport` is not pagerduty, opsgenie, jsm or github",
            "s.yaml: rule `i`: oncall: needs the rule's `actor`",
        ] {
            assert!(all.contains(fragment), "missing {fragment:?} in:\n{all}");
        }
        assert!(
            !all.contains("rule `j`"),
            "a check turned off needs nothing:\n{all}"
        );
    }

    #[test]
    fn oncall_gates_grants_as_of_the_event() {
        let tree = json!({
            "verify": { "scheme": "token", "secrets": "t" },
            "subject": { "path": "$.alert" },
            "rules": [
                { "name": "r", "action": { "path": "$.action" }, "request_id": { "path": "$.req" },
                  "actor": { "path": "$.by" },
                  "oncall": { "check": "opsgenie", "schedules": "primary, secondary", "at": { "path": "$.at" } } }
            ]
        });
        let m = compile("s", Path::new("s.yaml"), tree, &Env::default(), &defaults()).unwrap();
        let headers = HeaderMap::new();
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        let gate = |body: Value| match m.decide(
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
        let at = |at: Value| match gate(
            json!({ "alert": "a", "action": "approve", "req": "r-1", "by": "Jane@acme.example", "at": at }),
        ) {
            Ok(Some(crate::domain::Gate::Opsgenie {
                at_ms,
                user,
                schedules,
                jsm,
            })) => {
                assert_eq!(
                    (user.as_str(), schedules.len(), jsm),
                    ("Jane@acme.example", 2, false)
                );
                Ok(at_ms)
            }
            other => Err(format!("{other:?}")),
        };
        // Opsgenie's updatedAt is nanoseconds, createdAt milliseconds; seconds and RFC 3339 too.
        for (t, ms) in [
            (json!(1764239100456000123u64), 1_764_239_100_456),
            (json!(1764239100456u64), 1_764_239_100_456),
            (json!(1764239100456000u64), 1_764_239_100_456),
            (json!(1764239100), 1_764_239_100_000),
            (json!("2025-11-27T10:25:00.456Z"), 1_764_239_100_456),
        ] {
            assert_eq!(at(t.clone()), Ok(ms), "{t}");
        }
        // Without a time the receipt's counts; a time that is neither refuses the grant.
        let none =
            gate(json!({ "alert": "a", "action": "approve", "req": "r-1", "by": "j" })).unwrap();
        assert!(matches!(
            none,
            Some(crate::domain::Gate::Opsgenie {
                at_ms: 1_800_000_000_000,
                ..
            })
        ));
        let bad = gate(
            json!({ "alert": "a", "action": "approve", "req": "r-1", "by": "j", "at": "yesterday" }),
        );
        assert!(
            bad.unwrap_err()
                .contains("at: `yesterday` ($.at) is not RFC 3339 or a Unix time")
        );
        // Ending access is never checked.
        for action in ["revoke", "deny"] {
            let g = gate(
                json!({ "alert": "a", "action": action, "req": "r-1", "by": "j", "at": "yesterday" }),
            );
            assert_eq!(g, Ok(None), "{action}");
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
