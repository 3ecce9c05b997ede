//! `p0-relay check` (the config and every mapping valid, the grant policy in effect printed)
//! and `p0-relay test` (the test cases written in mapping files).

use std::path::Path;
use std::process::ExitCode;

use super::{fail, load_every};
use crate::env::Env;
use crate::mapping::cases;

pub(super) fn check(config: &Path, env: &Env) -> ExitCode {
    let (settings, mappings) = match load_every(config, env) {
        Ok(x) => x,
        Err(errors) => return fail(&errors),
    };
    for w in crate::config::warnings(&settings, &mappings) {
        say!("warning: {w}");
    }
    let problems = crate::config::problems(&settings, &mappings);
    if !problems.is_empty() {
        return fail(&problems);
    }
    if settings.p0.token.is_none() {
        say!("note: p0.token is empty: `serve` will need --dry-run or P0_API_TOKEN");
    }
    let backend = if settings.store.location.is_postgres() {
        "PostgreSQL"
    } else {
        "SQLite"
    };
    say!("store: {} ({backend})", settings.store.location);
    for (source, m) in &mappings.mappings {
        say!(
            "ok: {source} ({}, verified by {})",
            m.file.display(),
            m.verifier.scheme()
        );
    }
    for (source, m) in &mappings.disabled {
        say!(
            "ok: {source} ({}, verified by {}; not enabled, syntax checked)",
            m.file.display(),
            m.verifier.scheme()
        );
    }
    // The grant policy in effect, one line per rule that may approve: who, through which
    // on-call check and its pinned scope, how fresh, how long.
    for m in mappings.mappings.values() {
        for line in m.policy() {
            say!("policy: {line}");
        }
    }
    say!(
        "{}: valid, {} mapping(s)",
        config.display(),
        mappings.mappings.len()
    );
    ExitCode::SUCCESS
}

pub(super) fn test(config: &Path, env: &Env, names: &[String]) -> ExitCode {
    let (settings, mappings) = match load_every(config, env) {
        Ok(x) => x,
        Err(errors) => return fail(&errors),
    };
    let wanted: Vec<String> = names
        .iter()
        .map(|n| {
            Path::new(n)
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or(n)
                .to_owned()
        })
        .collect();
    for w in &wanted {
        if !mappings.mappings.contains_key(w) && !mappings.disabled.contains_key(w) {
            return fail(&[format!(
                "no mapping named `{w}` in {}",
                settings.mappings_dir.display()
            )]);
        }
    }
    let (mut passed, mut failed) = (0, 0);
    // Sources not enabled are tested too: every case sees only its own `env:`.
    let every = mappings.mappings.iter().chain(mappings.disabled.iter());
    for (source, mapping) in every {
        if !wanted.is_empty() && !wanted.contains(source) {
            continue;
        }
        for result in cases::run(mapping, &settings.defaults) {
            match &result.failure {
                None => {
                    passed += 1;
                    say!("ok   {}: {}", result.source, result.name);
                }
                Some(why) => {
                    failed += 1;
                    say!("FAIL {}: {}: {why}", result.source, result.name);
                }
            }
        }
    }
    say!("{passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
