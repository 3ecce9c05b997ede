//! Property tests (the fuzzing that runs on stable Rust): signature-header parsers, the
//! command grammar and mapping evaluation over arbitrary input never panic, and never accept
//! what they should not. `PROPTEST_CASES=100000 cargo test --test properties` runs longer.

use std::sync::OnceLock;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use p0_relay::config::env::Env;
use p0_relay::domain::Expiration;
use p0_relay::mapping::command;
use p0_relay::mapping::{Defaults, Input, MappingSet, Verdict};
use p0_relay::secret::Secrets;
use p0_relay::verify::{sign_hex, verify_github, verify_pagerduty, verify_token};
use proptest::prelude::*;
use serde_json::Value;

fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        "[a-zA-Z0-9 /:\\[\\]._-]{0,40}".prop_map(Value::String),
        commandish().prop_map(Value::String),
        Just(Value::String("incident.acknowledged".into())),
        Just(Value::String("[p0:req-1] db".into())),
        Just(Value::String("Acknowledge".into())),
        Just(Value::String("created".into())),
        Just(Value::String("approved".into())),
    ];
    leaf.prop_recursive(5, 64, 6, |inner| {
        let keys = prop_oneof![
            Just("action".to_owned()),
            Just("event".to_owned()),
            Just("event_type".to_owned()),
            Just("data".to_owned()),
            Just("title".to_owned()),
            Just("content".to_owned()),
            Just("agent".to_owned()),
            Just("id".to_owned()),
            Just("alert".to_owned()),
            Just("details".to_owned()),
            Just("p0_request_id".to_owned()),
            Just("note".to_owned()),
            Just("comment".to_owned()),
            Just("body".to_owned()),
            Just("sender".to_owned()),
            Just("login".to_owned()),
            Just("review".to_owned()),
            Just("state".to_owned()),
            Just("pull_request".to_owned()),
            "[a-z]{1,6}",
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(keys, inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Text shaped like commands, near misses included.
fn commandish() -> impl Strategy<Value = String> {
    let word = prop_oneof![
        Just("/p0".to_owned()),
        Just("/P0".to_owned()),
        Just("approve".to_owned()),
        Just("DENY".to_owned()),
        Just("revoke".to_owned()),
        Just("2h".to_owned()),
        Just("0h".to_owned()),
        Just("99999999999999999999d".to_owned()),
        Just("../x".to_owned()),
        Just("req-1".to_owned()),
        Just("P0-Request:".to_owned()),
        "[ -~]{0,12}",
        "[0-9]{1,3}\\PC",
        "\\PC{0,4}",
    ];
    let sep = prop_oneof![Just(" "), Just("  "), Just("\n"), Just("\r\n"), Just("\t")];
    prop::collection::vec((word, sep), 0..10)
        .prop_map(|parts| parts.into_iter().map(|(w, s)| format!("{w}{s}")).collect())
}

fn mappings() -> &'static MappingSet {
    static SET: OnceLock<MappingSet> = OnceLock::new();
    SET.get_or_init(|| {
        let vars = [
            ("GITHUB_WEBHOOK_SECRET", "s"),
            ("PAGERDUTY_WEBHOOK_SECRET", "s"),
            ("OPSGENIE_WEBHOOK_TOKEN", "s"),
            ("GITHUB_APPROVERS", "octocat,req-1"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let defaults = Defaults {
            org: "acme".into(),
            expiration: Expiration::parse("1h").unwrap(),
            max_expiration: Some(Expiration::parse("12h").unwrap()),
        };
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings");
        MappingSet::load(&dir, &Env::default().overlay(&vars), &defaults).expect("shipped mappings")
    })
}

fn header_map(pairs: &[(&'static str, String)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        if let Ok(v) = HeaderValue::from_str(v) {
            h.append(HeaderName::from_static(k), v);
        }
    }
    h
}

proptest! {
    #[test]
    fn github_signatures_accept_only_the_real_one(body in prop::collection::vec(any::<u8>(), 0..256), sig in "[ -~]{0,80}") {
        let secrets = Secrets::from_list("k1,k2");
        let headers = header_map(&[("x-hub-signature-256", sig.clone())]);
        if verify_github(&secrets, &headers, &body).is_ok() {
            let hex = sig.trim().trim_start_matches("sha256=").to_ascii_lowercase();
            prop_assert!(hex == sign_hex("k1", &body) || hex == sign_hex("k2", &body));
        }
        let real = header_map(&[("x-hub-signature-256", format!("sha256={}", sign_hex("k2", &body)))]);
        prop_assert!(verify_github(&secrets, &real, &body).is_ok());
    }

    #[test]
    fn pagerduty_signatures_accept_only_the_real_one(body in prop::collection::vec(any::<u8>(), 0..256), sig in "[ -~]{0,150}") {
        let secrets = Secrets::from_list("pd");
        let headers = header_map(&[("x-pagerduty-signature", sig.clone())]);
        if verify_pagerduty(&secrets, &headers, &body).is_ok() {
            let real = sign_hex("pd", &body);
            prop_assert!(sig.split(',').any(|e| e.trim().strip_prefix("v1=").is_some_and(|h| h.eq_ignore_ascii_case(&real))));
        }
    }

    #[test]
    fn tokens_accept_only_the_configured_one(auth in "[ -~]{0,40}", relay in "[ -~]{0,40}") {
        let tokens = Secrets::from_list("tok-1");
        let headers = header_map(&[("authorization", auth.clone()), ("x-relay-token", relay.clone())]);
        if verify_token(&tokens, &headers).is_ok() {
            prop_assert!(relay.trim() == "tok-1");
        }
    }

    #[test]
    fn the_command_grammar_never_panics(text in commandish()) {
        if let Ok(cmds) = command::parse(&text) {
            prop_assert!(cmds.len() <= text.lines().count());
            for c in cmds {
                prop_assert!(!c.request_id.is_empty() && !c.request_id.contains(char::is_whitespace));
            }
        }
    }

    #[test]
    fn mappings_never_panic_and_decide_only_valid_decisions(body in json(), event in prop_oneof![
        Just("issue_comment"), Just("pull_request_review"), Just("ping"), Just("push")
    ]) {
        let headers = header_map(&[("x-github-event", event.to_owned())]);
        for mapping in mappings().mappings.values() {
            let input = Input { headers: &headers, body: &body };
            let _ = mapping.dedup_key(input, b"raw");
            if let Verdict::Decided { decisions, .. } = mapping.decide(input, Some(std::time::SystemTime::now())) {
                prop_assert!(!decisions.is_empty());
                for d in decisions {
                    prop_assert!(p0_relay::domain::Id::parse(d.request_id.as_str()).is_ok());
                    if let Some(e) = &d.expiration {
                        let e = Expiration::parse(e).unwrap();
                        prop_assert!(e.seconds() <= 12 * 3600);
                    }
                }
            }
        }
    }
}

proptest! {
    #[test]
    fn real_payloads_with_arbitrary_text_decide_only_valid_decisions(text in commandish(), login in prop_oneof![Just("octocat"), Just("mallory")]) {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings/testdata");
        let read = |p: &str| -> Value { serde_json::from_slice(&std::fs::read(root.join(p)).unwrap()).unwrap() };
        let mut gh = read("github/issue_comment_created.json");
        gh["comment"]["body"] = text.clone().into();
        gh["sender"]["login"] = login.into();
        let mut pd = read("pagerduty/incident_acknowledged.json");
        pd["event"]["data"]["title"] = format!("[p0:{text}]").into();
        let mut og = read("opsgenie/addnote.json");
        og["alert"]["note"] = text.clone().into();
        let headers = header_map(&[("x-github-event", "issue_comment".to_owned())]);
        for (source, body) in [("github", &gh), ("pagerduty", &pd), ("opsgenie", &og)] {
            let verdict = mappings().get(source).unwrap().decide(Input { headers: &headers, body }, None);
            if let Verdict::Decided { decisions, .. } = verdict {
                for d in decisions {
                    prop_assert!(text.contains(d.request_id.as_str()));
                    if source == "github" {
                        prop_assert_eq!(login, "octocat");
                    }
                }
            }
        }
    }
}
