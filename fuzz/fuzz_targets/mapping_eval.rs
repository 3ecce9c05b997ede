//! The shipped mappings (mappings/*.yaml, loaded by the real loader) evaluated on arbitrary
//! headers and JSON bodies: every rule's conditions, extractions, `/p0` commands and policy.
//! Checks: no panic; `explain` decides as `decide` does; dedup keys stay bounded; approvals
//! carry an expiration within the 12h cap and nothing else does; on GitHub only the listed
//! approver (`octocat`, the sender) ever decides anything.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use p0_relay::domain::{Action, Expiration};
use p0_relay::mapping::{Input, Verdict};
use serde_json::Value;

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
    for (source, mapping) in &common::mappings().mappings {
        let verdict = mapping.decide(input, None);
        let (explained, _trace) = mapping.explain(input, None);
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
                            .as_ref()
                            .expect("approval without expiration");
                        Expiration::parse(e.as_str()).expect("expiration in P0's grammar");
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
