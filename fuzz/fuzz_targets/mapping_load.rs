//! A mapping file's text through the real loader (`mapping::from_text`: YAML, `${VAR}`
//! expansion, compilation of every JSONPath, regex and policy), then its own test cases run
//! (`mapping::cases::run`). Checks: no panic, whatever the text; errors name the file.
#![no_main]

use std::collections::HashMap;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use p0_relay::config::env::Env;
use p0_relay::domain::Expiration;
use p0_relay::mapping::{Defaults, cases, from_text};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let vars: HashMap<String, String> = [
        ("GITHUB_WEBHOOK_SECRET", "s"),
        ("PAGERDUTY_WEBHOOK_SECRET", "s"),
        ("OPSGENIE_WEBHOOK_TOKEN", "s"),
        ("GITHUB_APPROVERS", "octocat"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let env = Env::default().overlay(&vars);
    let defaults = Defaults {
        org: "acme".into(),
        expiration: Expiration::parse("1h").unwrap(),
        max_expiration: Some(Expiration::parse("12h").unwrap()),
    };
    let file = Path::new("/fuzz/mappings/custom.yaml");
    match from_text("custom", file, text, &env, &defaults) {
        Ok(mapping) => {
            for case in cases::run(&mapping, &env, &defaults) {
                let _ = case.failure;
            }
        }
        Err(errors) => {
            assert!(!errors.is_empty());
            for e in errors {
                assert!(e.starts_with("/fuzz/mappings/custom.yaml: "), "{e}");
            }
        }
    }
});
