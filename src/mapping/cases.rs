//! Test cases written inside mapping files: a payload, headers and the expected verdict, run by
//! `p0-relay test` and by the test suite. Configuration is code and gets its own tests.
//! A case checks `freshness` only when it names its own clock (`now`), so cases never depend
//! on the day they run; and it sees only the mapping's own defaults and its `env:`, never the
//! environment of whoever runs it, so cases never depend on the machine either.

use std::collections::HashMap;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;

use super::model::{RawCase, RawExpect, RawExpectDecision};
use super::{Defaults, Input, Mapping, Verdict, compile};
use crate::env::Env;

/// The result of one case.
#[derive(Debug, Clone)]
pub struct CaseResult {
    pub source: String,
    pub name: String,
    /// `None` when the case passed; otherwise what went wrong.
    pub failure: Option<String>,
}

/// Runs every case of `mapping`. Each recompiles the mapping under its own `env` alone (the
/// file's `${VAR:-default}`s, stand-ins for variables it requires, and the case's values),
/// so a case means the same wherever it runs. To see how this deployment's settings decide
/// a payload, `explain` it instead.
pub fn run(mapping: &Mapping, defaults: &Defaults) -> Vec<CaseResult> {
    let cases: Vec<RawCase> = match mapping.tree.get("tests") {
        None => Vec::new(),
        Some(tests) => match serde_path_to_error::deserialize(tests.clone()) {
            Ok(c) => c,
            Err(e) => {
                return vec![CaseResult {
                    source: mapping.source.clone(),
                    name: "(tests)".into(),
                    failure: Some(format!("tests{}: {}", e.path(), e.inner())),
                }];
            }
        },
    };
    cases
        .iter()
        .map(|case| CaseResult {
            source: mapping.source.clone(),
            name: case.name.clone(),
            failure: run_case(mapping, case, defaults).err(),
        })
        .collect()
}

fn run_case(mapping: &Mapping, case: &RawCase, defaults: &Defaults) -> Result<(), String> {
    let vars: HashMap<String, String> = case.env.clone().into_iter().collect();
    let env = Env::default().with_stand_ins().overlay(&vars);
    let m = &compile(
        &mapping.source,
        &mapping.file,
        mapping.tree.clone(),
        &env,
        defaults,
    )
    .map_err(|e| e.join("; "))?;
    // The body as sent (the file's bytes, or the inline payload as JSON) and as parsed.
    let (raw, payload): (Vec<u8>, Value) = match (&case.payload, &case.payload_file) {
        (Some(p), None) => (serde_json::to_vec(p).unwrap_or_default(), p.clone()),
        (None, Some(f)) => {
            let dir = mapping.file.parent().unwrap_or(std::path::Path::new("."));
            let path = dir.join("testdata").join(f);
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let value = serde_json::from_str(&text)
                .map_err(|e| format!("{}: not JSON: {e}", path.display()))?;
            (text.into_bytes(), value)
        }
        _ => return Err("give exactly one of `payload` and `payload_file`".into()),
    };
    let mut headers = HeaderMap::new();
    for (k, v) in &case.headers {
        let name =
            HeaderName::from_bytes(k.as_bytes()).map_err(|_| format!("bad header name `{k}`"))?;
        let value = HeaderValue::from_str(v).map_err(|_| format!("bad value for header `{k}`"))?;
        headers.append(name, value);
    }
    let now = match &case.now {
        None => None,
        Some(t) => Some(
            super::parse_rfc3339(t).ok_or_else(|| format!("now: `{t}` is not an RFC 3339 time"))?,
        ),
    };
    let input = Input {
        headers: &headers,
        body: &payload,
    };
    if let Some(want) = &case.dedup {
        let got = m.dedup_key(input, &raw);
        if &got != want {
            return Err(format!("expected dedup key `{want}`, got `{got}`"));
        }
    }
    let verdict = m.decide(input, now);
    check(&case.expect, &verdict, &defaults.org)
}

fn check(expect: &RawExpect, verdict: &Verdict, default_org: &str) -> Result<(), String> {
    let got = describe(verdict);
    match expect {
        RawExpect::Word(w) if w == "ignored" => match verdict {
            Verdict::Ignored => Ok(()),
            _ => Err(format!("expected ignored, got {got}")),
        },
        RawExpect::Word(w) if w == "rejected" => match refusal(verdict) {
            Some(_) => Ok(()),
            None => Err(format!("expected rejected, got {got}")),
        },
        RawExpect::Word(w) => Err(format!(
            "expect: `{w}` is not ignored, rejected, {{decisions: [...]}} or {{rejected: \"...\"}}"
        )),
        RawExpect::Spec(spec) => match (&spec.decisions, &spec.rejected) {
            (Some(want), None) => {
                let Verdict::Decided { decisions, .. } = verdict else {
                    return Err(format!("expected decisions, got {got}"));
                };
                // Decisions that are stored only to be refused are a rejection to the sender.
                if refusal(verdict).is_some() {
                    return Err(format!("expected decisions, got {got}"));
                }
                check_binding(spec, verdict, &got)?;
                let have: Vec<RawExpectDecision> = decisions
                    .iter()
                    .map(|d| RawExpectDecision {
                        action: d.action.as_str().into(),
                        request_id: d.request_id.to_string(),
                        expiration: d.expiration.as_ref().map(ToString::to_string),
                        org: Some(d.org.to_string()),
                    })
                    .collect();
                let want: Vec<RawExpectDecision> = want
                    .iter()
                    .map(|w| RawExpectDecision {
                        org: Some(w.org.clone().unwrap_or_else(|| default_org.to_owned())),
                        ..w.clone()
                    })
                    .collect();
                if have == want {
                    Ok(())
                } else {
                    Err(format!("expected {}, got {got}", list(&want)))
                }
            }
            (None, Some(fragment)) => match refusal(verdict) {
                Some(reason) if reason.contains(fragment.as_str()) => Ok(()),
                _ => Err(format!(
                    "expected rejected containing `{fragment}`, got {got}"
                )),
            },
            _ => Err("expect: give `decisions` or `rejected`".into()),
        },
    }
}

/// What a case expects of the decided verdict's binding: its subject, whether it ends or
/// reopens, its on-call check, and which subjects its elements end.
fn check_binding(
    spec: &super::model::RawExpectSpec,
    verdict: &Verdict,
    got: &str,
) -> Result<(), String> {
    let Verdict::Decided {
        binding, elements, ..
    } = verdict
    else {
        return Ok(());
    };
    if let Some(want) = &spec.subject {
        let have = binding.subject.as_deref().unwrap_or("none");
        if have != want {
            return Err(format!("expected subject `{want}`, got {got}"));
        }
    }
    if let Some(want) = spec.ends_subject
        && want != binding.ends_subject
    {
        return Err(format!("expected ends_subject: {want}, got {got}"));
    }
    if let Some(want) = spec.reopens_subject
        && want != binding.reopens_subject
    {
        return Err(format!("expected reopens_subject: {want}, got {got}"));
    }
    if let Some(want) = &spec.oncall {
        let have = binding.gate.as_ref().map(|g| g.describe());
        let ok = match (want.as_str(), &have) {
            ("none", None) => true,
            (_, Some(have)) => have.contains(want.as_str()),
            _ => false,
        };
        if !ok {
            return Err(format!(
                "expected oncall `{want}`, got {}",
                have.as_deref().unwrap_or("none")
            ));
        }
    }
    if let Some(want) = &spec.ends_subjects {
        let bindings: Vec<&crate::domain::Binding> = if elements.is_empty() {
            vec![binding]
        } else {
            elements.iter().map(|e| &e.binding).collect()
        };
        let have: Vec<&str> = bindings
            .iter()
            .filter(|b| b.ends_subject)
            .filter_map(|b| b.subject.as_deref())
            .collect();
        if &have != want {
            return Err(format!("expected ends_subjects {want:?}, got {have:?}"));
        }
    }
    Ok(())
}

/// Why the sender is answered `rejected`: the rule refused, or the grants it decided are
/// refused (stored only to be answered back: a stale event).
fn refusal(verdict: &Verdict) -> Option<&str> {
    match verdict {
        Verdict::Rejected { reason, .. } => Some(reason),
        Verdict::Decided {
            refused, elements, ..
        } => refused
            .as_deref()
            .or_else(|| elements.iter().find_map(|e| e.refused.as_deref())),
        Verdict::Ignored => None,
    }
}

fn list(ds: &[RawExpectDecision]) -> String {
    let items: Vec<String> = ds
        .iter()
        .map(|d| match &d.expiration {
            Some(e) => format!("{} {} {e}", d.action, d.request_id),
            None => format!("{} {}", d.action, d.request_id),
        })
        .collect();
    format!("[{}]", items.join(", "))
}

/// A verdict in one short line.
pub fn describe(verdict: &Verdict) -> String {
    match verdict {
        Verdict::Ignored => "ignored".into(),
        Verdict::Rejected { rule, reason, .. } => format!("rejected by rule `{rule}`: {reason}"),
        Verdict::Decided {
            rule,
            decisions,
            binding,
            elements,
            refused,
            ..
        } => {
            let items: Vec<String> = decisions
                .iter()
                .map(|d| {
                    let mut s = format!("{} {}", d.action, d.request_id);
                    if let Some(e) = &d.expiration {
                        s.push(' ');
                        s.push_str(e.as_str());
                    }
                    if let Some(c) = &d.clamped_from {
                        s.push_str(&format!(" (clamped from {c})"));
                    }
                    s.push_str(&format!(" in org {}", d.org));
                    s
                })
                .collect();
            let mut out = format!("rule `{rule}` decided [{}]", items.join(", "));
            if let Some(why) = refused
                .as_deref()
                .or_else(|| elements.iter().find_map(|e| e.refused.as_deref()))
            {
                out.push_str(&format!(
                    "; its approves refused (stored only to be answered back): {why}"
                ));
            }
            if !elements.is_empty() {
                let ending: Vec<String> = elements
                    .iter()
                    .filter(|e| e.binding.ends_subject)
                    .filter_map(|e| e.binding.subject.as_deref())
                    .map(|s| format!("`{}`", crate::domain::printable(s)))
                    .collect();
                if !ending.is_empty() {
                    out.push_str(&format!(
                        ", ending subject(s) {} (revokes every request approved under each)",
                        ending.join(", ")
                    ));
                }
                return out;
            }
            if let Some(s) = &binding.subject {
                out.push_str(&format!(" on subject `{}`", crate::domain::printable(s)));
            }
            if binding.ends_subject {
                out.push_str(", ending it (revokes every request approved under it)");
            }
            if binding.reopens_subject {
                out.push_str(", reopening it");
            }
            if let Some(g) = &binding.gate {
                out.push_str(&format!(", approves checked first: {}", g.describe()));
            }
            out
        }
    }
}
