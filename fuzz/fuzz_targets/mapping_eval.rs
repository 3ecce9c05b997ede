//! The shipped mappings (mappings/*.yaml, loaded by the real loader) evaluated on arbitrary
//! headers and JSON bodies: every rule's conditions, extractions, `/p0` commands and policy.
//! Checks: no panic; `explain` decides as `decide` does; dedup keys stay bounded; approvals
//! carry an expiration within the 12h cap and nothing else does; on GitHub only the listed
//! approver (`octocat`, the sender) ever decides anything.
#![no_main]

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use p0_relay::config::env::Env;
use p0_relay::domain::{Action, Expiration};
use p0_relay::mapping::{Defaults, Input, MappingSet, Verdict};
use serde_json::Value;

fn mappings() -> &'static MappingSet {
    static SET: OnceLock<MappingSet> = OnceLock::new();
    SET.get_or_init(|| {
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
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../mappings");
        MappingSet::load(&dir, &env, &defaults).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let (headers, bytes) = common::split_request(data);
    let Ok(body) = serde_json::from_slice::<Value>(bytes) else {
        return;
    };
    if common::depth(&body) > 64 {
        return; // the relay refuses these before any mapping sees them
    }
    let input = Input {
        headers: &headers,
        body: &body,
    };
    for (source, mapping) in &mappings().mappings {
        let verdict = mapping.decide(input);
        let (explained, _trace) = mapping.explain(input);
        assert_eq!(verdict, explained, "{source}: explain differs from decide");
        let key = mapping.dedup_key(input, bytes);
        assert!(
            key.len() <= 256 || key.starts_with("sha256:"),
            "{source}: {key}"
        );
        if let Verdict::Decided {
            actor, decisions, ..
        } = &verdict
        {
            for d in decisions {
                match d.action {
                    Action::Approve => {
                        let e = d
                            .expiration
                            .as_deref()
                            .expect("approval without expiration");
                        let e = Expiration::parse(e).expect("expiration in P0's grammar");
                        assert!(e.seconds() <= 12 * 3600, "{source}: {e} exceeds the cap");
                    }
                    _ => assert!(d.expiration.is_none()),
                }
            }
            if source == "github" {
                assert_eq!(actor.as_deref(), Some("octocat"));
                assert_eq!(
                    body["sender"]["login"], "octocat",
                    "decided for another sender"
                );
            }
        }
    }
});
