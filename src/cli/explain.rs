//! `p0-relay explain`: the decision for a payload, why each rule did or did not match, and for
//! each subject it binds (each alert of a group its own) where the answer goes, what its end
//! would revoke and which on-call check an approve passes through.

use std::path::Path;
use std::process::ExitCode;

use axum::http::{HeaderMap, HeaderName, HeaderValue};

use super::{block_on, fail, load};
use crate::config::Settings;
use crate::domain::{Binding, printable};
use crate::env::Env;
use crate::mapping::{Input, Mapping, MappingSet, Verdict, cases, element_key};
use crate::store::{self, StoreLocation};

pub(super) fn explain(
    config: &Path,
    env: &Env,
    source: &str,
    headers: &[String],
    at: Option<i64>,
    payload: &Path,
) -> ExitCode {
    let (settings, mappings) = match load(config, env) {
        Ok(x) => x,
        Err(errors) => return fail(&errors),
    };
    let read = mapping_for(&mappings, source).and_then(|mapping| {
        let headers = header_map(headers)?;
        let (text, body) = read_payload(payload)?;
        Ok((mapping, headers, text, body))
    });
    let (mapping, headers, text, body) = match read {
        Ok(x) => x,
        Err(e) => return fail(&[e]),
    };
    let input = Input {
        headers: &headers,
        body: &body,
    };
    let (verdict, trace) = mapping.explain(input, Some(std::time::SystemTime::now()));
    say!("source:   {source} ({})", mapping.file.display());
    let now = at.unwrap_or_else(crate::verify::unix_now);
    match mapping.verifier.verify_at(&headers, &text, now) {
        Ok(v) => say!("verified: {v}"),
        // The refusal names headers from the mapping file, never the request's values.
        Err(e) => say!(
            "verified: NO, {e} ({}): a live relay answers 401",
            mapping.verifier.scheme()
        ),
    }
    let delivery = mapping.dedup_key(input, &text);
    say!("delivery: {}", delivery);
    for t in &trace {
        let mark = if t.matched { "MATCH" } else { "no   " };
        say!("  {mark} rule `{}`: {}", t.rule, t.detail);
    }
    say!("decision: {}", cases::describe(&verdict));
    let Verdict::Decided {
        elements, binding, ..
    } = &verdict
    else {
        return ExitCode::SUCCESS;
    };
    let bound = Bound {
        settings: &settings,
        source,
    };
    if elements.is_empty() {
        bound.print(binding, "");
    }
    for e in elements {
        say!(
            "  element {} ({} decision(s)), stored as delivery {}",
            e.key,
            e.decisions,
            element_key(&delivery, &e.key)
        );
        bound.print(&e.binding, "    ");
    }
    ExitCode::SUCCESS
}

/// The mapping of `source`, or why there is none to explain with.
fn mapping_for<'a>(mappings: &'a MappingSet, source: &str) -> Result<&'a Mapping, String> {
    if let Some(mapping) = mappings.get(source) {
        return Ok(mapping);
    }
    let file_here = ["yaml", "yml"]
        .iter()
        .any(|ext| mappings.dir.join(format!("{source}.{ext}")).is_file());
    if file_here {
        return Err(format!(
            "source `{source}` is not enabled: add it to P0_RELAY_SOURCES (relay.yaml `sources`)"
        ));
    }
    let known: Vec<&String> = mappings.mappings.keys().collect();
    Err(format!(
        "no mapping for source `{source}` (known: {known:?})"
    ))
}

/// The `--header` arguments (`Name: value`) as headers.
fn header_map(headers: &[String]) -> Result<HeaderMap, String> {
    let mut map = HeaderMap::new();
    for h in headers {
        let Some((k, v)) = h.split_once(':') else {
            return Err(format!("--header `{h}`: write it as `Name: value`"));
        };
        match (
            HeaderName::from_bytes(k.trim().as_bytes()),
            HeaderValue::from_str(v.trim()),
        ) {
            (Ok(k), Ok(v)) => {
                map.append(k, v);
            }
            _ => return Err(format!("--header `{h}`: not a valid header")),
        }
    }
    Ok(map)
}

/// The payload's bytes and its JSON.
fn read_payload(payload: &Path) -> Result<(Vec<u8>, serde_json::Value), String> {
    let text = std::fs::read(payload).map_err(|e| format!("{}: {e}", payload.display()))?;
    let body = serde_json::from_slice(&text)
        .map_err(|e| format!("{}: not JSON: {e}", payload.display()))?;
    Ok((text, body))
}

/// What a decision is bound to, said for one delivery or one element of it.
struct Bound<'a> {
    settings: &'a Settings,
    source: &'a str,
}

impl Bound<'_> {
    fn print(&self, binding: &Binding, indent: &str) {
        match &binding.subject {
            Some(s) => say!("{indent}subject:  {}", printable(s)),
            None => say!("{indent}subject:  none (a later subject end cannot revoke these)"),
        }
        if let Some(reply) = &binding.reply {
            let on = match &reply.comment {
                Some(c) => format!(", reacting on comment {}", printable(c)),
                None => String::new(),
            };
            say!(
                "{indent}answer:   through {} on the subject{on}, once P0 has answered",
                reply.via
            );
        }
        if let (Some(subject), true) = (&binding.subject, binding.ends_subject) {
            say!(
                "{indent}ends subject: revokes every request approved under `{}` (source {}) and not yet revoked",
                printable(subject),
                self.source
            );
            for line in would_revoke(self.settings, self.source, subject) {
                say!("{indent}  {line}");
            }
        }
        if let Some(gate) = &binding.gate {
            let asked = match self.settings.answers.api(gate.via()) {
                Some(api) => format!("asks {}", api.url),
                None => format!("has no {} API token: `serve` refuses to start", gate.via()),
            };
            say!(
                "{indent}on call:  the worker checks before P0 is called ({asked}): {}",
                gate.describe()
            );
        }
    }
}

/// What ending `subject` would revoke now, as the store (if there is one yet) sees it: the
/// store's own rule (`Inspection::still_granted`), the one its end applies.
fn would_revoke(settings: &Settings, source: &str, subject: &str) -> Vec<String> {
    let location = &settings.store.location;
    if let StoreLocation::Sqlite(path) = location
        && !path.exists()
    {
        return vec!["(no store yet: nothing approved under it)".into()];
    }
    let asked = block_on(async {
        let (store, writer) = store::inspect(location, settings.store.windows()).await?;
        let granted = store.still_granted(source, subject).await;
        drop(store);
        writer.join().await;
        granted
    });
    let granted = match asked {
        Ok(Ok(granted)) => granted,
        Ok(Err(e)) => return vec![format!("(cannot read the store: {e})")],
        Err(e) => return vec![format!("({e})")],
    };
    if granted.is_empty() {
        return vec!["(nothing approved under it is still granted)".into()];
    }
    granted
        .iter()
        .map(|g| {
            format!(
                "would revoke {} in org {} (approved by job {}, {})",
                g.request_id, g.org, g.job_id, g.state
            )
        })
        .collect()
}
