//! Property tests (the fuzzing that runs on stable Rust): signature-header parsers, the
//! command grammar and mapping evaluation over arbitrary input never panic, and never accept
//! what they should not. `PROPTEST_CASES=100000 cargo test --test api properties` runs
//! longer.

use std::sync::OnceLock;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use p0_relay::config::env::Env;
use p0_relay::domain::Expiration;
use p0_relay::mapping::command;
use p0_relay::mapping::{Defaults, Input, MappingSet, Verdict};
use p0_relay::secret::Secrets;
use p0_relay::verify::{
    Algorithm, Encoding, HmacHeader, StandardWebhooks, Template, sign_hex, sign_standard_webhooks,
    verify_github, verify_pagerduty, verify_token,
};
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
            ("ALERTMANAGER_WEBHOOK_TOKEN", "s"),
            ("GRAFANA_WEBHOOK_SECRET", "s"),
            ("INCIDENTIO_WEBHOOK_SECRET", "whsec_c2VjcmV0"),
            ("JSM_WEBHOOK_TOKEN", "s"),
            ("GITHUB_APPROVERS", "octocat,req-1"),
            ("PAGERDUTY_APPROVERS", "*"),
            ("OPSGENIE_APPROVERS", "*"),
            ("JSM_APPROVERS", "*"),
            ("ALERTMANAGER_GRANTS", "on"),
            ("GRAFANA_GRANTS", "on"),
            ("INCIDENTIO_GRANTS", "on"),
            // Every on-call check on: what it reads must be projected too.
            ("PAGERDUTY_ONCALL", "on"),
            ("PAGERDUTY_ONCALL_ESCALATION_POLICIES", "PUS0KTE"),
            ("PAGERDUTY_ONCALL_MAX_LEVEL", "2"),
            ("OPSGENIE_ONCALL", "on"),
            ("OPSGENIE_ONCALL_SCHEDULES", "primary"),
            ("JSM_ONCALL", "on"),
            ("JSM_ONCALL_SCHEDULES", "primary"),
            ("GITHUB_ONCALL", "on"),
            ("GITHUB_ONCALL_ORG", "acme"),
            ("GITHUB_ONCALL_TEAMS", "sre"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let defaults = Defaults {
            org: "acme".into(),
            expiration: Expiration::parse("1h").unwrap(),
            max_expiration: Some(Expiration::parse("12h").unwrap()),
            sources: p0_relay::mapping::Enabled::All,
        };
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings");
        MappingSet::load(&dir, &Env::default().overlay(&vars), &defaults).expect("shipped mappings")
    })
}

/// Signatures that are nearly `real`: one character changed (at `at`, to another of the same
/// alphabet), the last one cut, half of it, an empty one. None of them may verify.
fn near_misses(real: &str, at: prop::sample::Index) -> Vec<String> {
    let chars: Vec<char> = real.chars().collect();
    let mut changed = chars.clone();
    if !chars.is_empty() {
        let i = at.index(chars.len());
        changed[i] = match chars[i] {
            '0' => '1',
            'a' => 'b',
            'A' => 'B',
            '=' => '=',
            c if c.is_ascii_digit() => '0',
            c if c.is_ascii_lowercase() => 'a',
            c if c.is_ascii_uppercase() => 'A',
            _ => 'x',
        };
        if changed == chars {
            // A padding `=` cannot change alone: change the character before it.
            let j = i.saturating_sub(1);
            changed[j] = if chars[j] == 'A' { 'B' } else { 'A' };
        }
    }
    vec![
        changed.into_iter().collect(),
        chars[..chars.len().saturating_sub(1)].iter().collect(),
        chars[..chars.len() / 2].iter().collect(),
        String::new(),
    ]
}

/// `body` with one byte changed (at `at`), or one byte more when it is empty.
fn body_changed(body: &[u8], at: prop::sample::Index) -> Vec<u8> {
    let mut other = body.to_vec();
    match other.is_empty() {
        true => other.push(b'x'),
        false => {
            let i = at.index(other.len());
            other[i] ^= 0x01;
        }
    }
    other
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
    fn github_signatures_accept_only_the_real_one(body in prop::collection::vec(any::<u8>(), 0..256), sig in "[ -~]{0,80}", at in any::<prop::sample::Index>()) {
        let secrets = Secrets::from_list("k1,k2");
        let headers = header_map(&[("x-hub-signature-256", sig.clone())]);
        if verify_github(&secrets, &headers, &body).is_ok() {
            let hex = sig.trim().trim_start_matches("sha256=").to_ascii_lowercase();
            prop_assert!(hex == sign_hex("k1", &body) || hex == sign_hex("k2", &body));
        }
        let real = header_map(&[("x-hub-signature-256", format!("sha256={}", sign_hex("k2", &body)))]);
        prop_assert!(verify_github(&secrets, &real, &body).is_ok());
        // Near the real one is not the real one.
        let mut misses: Vec<HeaderMap> = near_misses(&sign_hex("k2", &body), at)
            .into_iter()
            .map(|m| header_map(&[("x-hub-signature-256", format!("sha256={m}"))]))
            .collect();
        misses.push(header_map(&[("x-hub-signature-256", format!("sha256={}", sign_hex("k3", &body)))]));
        misses.push(header_map(&[("x-hub-signature-256", format!("sha1={}", sign_hex("k2", &body)))]));
        misses.push(header_map(&[("x-hub-signature", format!("sha256={}", sign_hex("k2", &body)))]));
        for miss in &misses {
            prop_assert!(verify_github(&secrets, miss, &body).is_err(), "{:?}", miss);
        }
        prop_assert!(verify_github(&secrets, &real, &body_changed(&body, at)).is_err());
    }

    #[test]
    fn pagerduty_signatures_accept_only_the_real_one(body in prop::collection::vec(any::<u8>(), 0..256), sig in "[ -~]{0,150}", at in any::<prop::sample::Index>()) {
        let secrets = Secrets::from_list("pd");
        let headers = header_map(&[("x-pagerduty-signature", sig.clone())]);
        if verify_pagerduty(&secrets, &headers, &body).is_ok() {
            let real = sign_hex("pd", &body);
            prop_assert!(sig.split(',').any(|e| e.trim().strip_prefix("v1=").is_some_and(|h| h.eq_ignore_ascii_case(&real))));
        }
        let real = sign_hex("pd", &body);
        let good = header_map(&[("x-pagerduty-signature", format!("v1={real}"))]);
        prop_assert!(verify_pagerduty(&secrets, &good, &body).is_ok());
        let mut misses: Vec<HeaderMap> = near_misses(&real, at)
            .into_iter()
            .map(|m| header_map(&[("x-pagerduty-signature", format!("v1={m}"))]))
            .collect();
        misses.push(header_map(&[("x-pagerduty-signature", format!("v1={}", sign_hex("other", &body)))]));
        misses.push(header_map(&[("x-pagerduty-signature", format!("v2={real}"))]));
        misses.push(header_map(&[("x-pagerduty-signature-2", format!("v1={real}"))]));
        for miss in &misses {
            prop_assert!(verify_pagerduty(&secrets, miss, &body).is_err(), "{:?}", miss);
        }
        prop_assert!(verify_pagerduty(&secrets, &good, &body_changed(&body, at)).is_err());
    }

    #[test]
    fn tokens_accept_only_the_configured_one(auth in "[ -~]{0,40}", relay in "[ -~]{0,40}", at in any::<prop::sample::Index>()) {
        let tokens = Secrets::from_list("tok-1");
        let headers = header_map(&[("authorization", auth.clone()), ("x-relay-token", relay.clone())]);
        if verify_token(&tokens, &headers).is_ok() {
            prop_assert!(relay.trim() == "tok-1");
        }
        prop_assert!(verify_token(&tokens, &header_map(&[("x-relay-token", "tok-1".into())])).is_ok());
        let mut misses: Vec<HeaderMap> = near_misses("tok-1", at)
            .into_iter()
            .map(|m| header_map(&[("x-relay-token", m)]))
            .collect();
        misses.push(header_map(&[("x-relay-token", "tok-2".into())]));
        misses.push(header_map(&[("x-relay-token", "tok-1x".into())]));
        misses.push(header_map(&[("x-other-token", "tok-1".into())]));
        for miss in &misses {
            prop_assert!(verify_token(&tokens, miss).is_err(), "{:?}", miss);
        }
    }

    #[test]
    fn generic_hmac_accepts_only_a_real_signature(body in prop::collection::vec(any::<u8>(), 0..256), sig in "[ -~]{0,120}", ts in "[ -~]{0,12}", at in any::<prop::sample::Index>()) {
        let scheme = HmacHeader {
            headers: vec![HeaderName::from_static("x-sig")],
            algorithm: Algorithm::Sha256,
            encoding: Encoding::Hex,
            prefix: "sha256=".into(),
            timestamp: Some((HeaderName::from_static("x-ts"), 300)),
            message: Template::parse("{timestamp}:{body}").unwrap(),
            secrets: Secrets::from_list("k1,k2"),
        };
        let now = 1_764_288_000i64;
        let headers = header_map(&[("x-sig", sig.clone()), ("x-ts", ts.clone())]);
        if scheme.verify(&headers, &body, now).is_ok() {
            let real = |k: &str| scheme.sign(k, ts.trim(), &body);
            prop_assert!(sig.contains(&real("k1")[7..]) || sig.contains(&real("k2")[7..]));
        }
        let good = header_map(&[("x-sig", scheme.sign("k2", &now.to_string(), &body)), ("x-ts", now.to_string())]);
        prop_assert_eq!(scheme.verify(&good, &body, now).map(|v| v.secret), Ok(Some(1)));
        let real = scheme.sign("k2", &now.to_string(), &body);
        let mut misses: Vec<HeaderMap> = near_misses(&real["sha256=".len()..], at)
            .into_iter()
            .map(|m| header_map(&[("x-sig", format!("sha256={m}")), ("x-ts", now.to_string())]))
            .collect();
        misses.push(header_map(&[("x-sig", scheme.sign("k3", &now.to_string(), &body)), ("x-ts", now.to_string())]));
        misses.push(header_map(&[("x-sig", real.clone()), ("x-ts", (now - 1).to_string())]));
        misses.push(header_map(&[("x-other", real.clone()), ("x-ts", now.to_string())]));
        for miss in &misses {
            prop_assert!(scheme.verify(miss, &body, now).is_err(), "{:?}", miss);
        }
        prop_assert!(scheme.verify(&good, &body_changed(&body, at), now).is_err());
    }

    #[test]
    fn standard_webhooks_accept_only_a_real_signature(body in prop::collection::vec(any::<u8>(), 0..256), sig in "[ -~]{0,120}", id in "[a-zA-Z0-9_]{0,20}", at in any::<prop::sample::Index>()) {
        let secret = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
        let scheme = StandardWebhooks::new(Secrets::from_list(secret), 300).unwrap();
        let now = 1_764_288_000i64;
        let headers = header_map(&[("webhook-id", id.clone()), ("webhook-timestamp", now.to_string()), ("webhook-signature", sig.clone())]);
        if scheme.verify(&headers, &body, now).is_ok() {
            let real = sign_standard_webhooks(secret, &id, now, &body).unwrap();
            prop_assert!(sig.split_whitespace().any(|s| s == real));
        }
        let real = sign_standard_webhooks(secret, &id, now, &body).unwrap();
        let with = |sig: String, ts: i64, id: &str| header_map(&[("webhook-id", id.to_owned()), ("webhook-timestamp", ts.to_string()), ("webhook-signature", sig)]);
        prop_assert!(scheme.verify(&with(real.clone(), now, &id), &body, now).is_ok());
        let mut misses: Vec<HeaderMap> = near_misses(&real["v1,".len()..], at)
            .into_iter()
            .map(|m| with(format!("v1,{m}"), now, &id))
            .collect();
        let other = sign_standard_webhooks("whsec_b3RoZXItc2VjcmV0LW9mLWFub3RoZXI=", &id, now, &body).unwrap();
        misses.push(with(other, now, &id));
        misses.push(with(real.clone(), now - 1, &id));
        misses.push(with(real.clone(), now, &format!("{id}x")));
        misses.push(with(real.replacen("v1,", "v1a,", 1), now, &id));
        for miss in &misses {
            prop_assert!(scheme.verify(miss, &body, now).is_err(), "{:?}", miss);
        }
        prop_assert!(scheme.verify(&with(real, now, &id), &body_changed(&body, at), now).is_err());
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

/// Documents shaped like every shipped mapping's payloads: the member names their paths read,
/// and values their conditions test.
fn payloadish() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        "[a-zA-Z0-9 /:\\[\\]._-]{0,20}".prop_map(Value::String),
        commandish().prop_map(Value::String),
        prop_oneof![
            Just("created"),
            Just("submitted"),
            Just("approved"),
            Just("incident.acknowledged"),
            Just("[p0:req-1] db"),
            Just("Acknowledge"),
            Just("AddNote"),
            Just("firing"),
            Just("resolved"),
            Just("octocat"),
            Just("req-1"),
            Just("2026-11-27T10:15:00Z"),
            Just("2026-11-27T09:00:00Z"),
            Just("P0 request"),
        ]
        .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(6, 96, 6, |inner| {
        let keys = prop_oneof![
            prop_oneof![
                Just("action"),
                Just("comment"),
                Just("review"),
                Just("issue"),
                Just("pull_request"),
                Just("repository"),
                Just("sender"),
                Just("login"),
                Just("body"),
                Just("id"),
                Just("number"),
                Just("state"),
                Just("created_at"),
                Just("updated_at"),
                Just("submitted_at"),
                Just("event"),
                Just("event_type"),
                Just("occurred_at"),
                Just("data"),
                Just("title"),
                Just("content"),
                Just("agent"),
                Just("alert"),
                Just("alertId"),
                Just("updatedAt"),
                Just("username"),
                Just("note"),
                Just("details"),
                Just("p0_request_id"),
                Just("alerts"),
                Just("status"),
                Just("fingerprint"),
                Just("startsAt"),
                Just("endsAt"),
                Just("annotations"),
                Just("groupKey"),
                Just("incident"),
                Just("incident_status"),
                Just("category"),
                Just("custom_field_entries"),
                Just("custom_field"),
                Just("name"),
            ]
            .prop_map(str::to_owned),
            "[a-z]{1,6}",
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(keys, inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Every shipped payload in `mappings/testdata`.
fn shipped_payloads() -> &'static Vec<Value> {
    static DOCS: OnceLock<Vec<Value>> = OnceLock::new();
    DOCS.get_or_init(|| {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings/testdata");
        let mut files: Vec<_> = std::fs::read_dir(&root)
            .unwrap()
            .map(|d| d.unwrap().path())
            .filter(|d| d.is_dir())
            .flat_map(|d| std::fs::read_dir(d).unwrap())
            .map(|f| f.unwrap().path())
            .collect();
        files.sort();
        files
            .iter()
            .map(|f| serde_json::from_slice(&std::fs::read(f).unwrap()).unwrap())
            .collect()
    })
}

/// Replaces (or removes) the value at a walk through `doc`, each step choosing a member or
/// element by position.
fn mutate(doc: &mut Value, walk: &[usize], with: Option<Value>) {
    let Some((step, rest)) = walk.split_first() else {
        if let Some(v) = with {
            *doc = v;
        }
        return;
    };
    match doc {
        Value::Object(m) if !m.is_empty() => {
            let key = m.keys().nth(step % m.len()).unwrap().clone();
            match (rest.is_empty(), with) {
                (true, None) => drop(m.remove(&key)),
                (_, with) => mutate(m.get_mut(&key).unwrap(), rest, with),
            }
        }
        Value::Array(a) if !a.is_empty() => {
            let n = step % a.len();
            match (rest.is_empty(), with) {
                (true, None) => drop(a.remove(n)),
                (_, with) => mutate(&mut a[n], rest, with),
            }
        }
        other => {
            if let Some(v) = with {
                *other = v;
            }
        }
    }
}

/// Every shipped mapping decides the same, and names the delivery the same, on the document it
/// projects as on the whole one; and both parses accept the same documents.
fn projected_agrees(doc: &Value, headers: &HeaderMap) -> Result<(), TestCaseError> {
    let bytes = serde_json::to_vec(doc).unwrap();
    let full: Value = serde_json::from_slice(&bytes).unwrap();
    let now = humantime::parse_rfc3339("2026-11-27T10:20:00Z").unwrap();
    for (source, mapping) in &mappings().mappings {
        let projected = mapping.projection().parse(&bytes, 64).unwrap();
        let (f, p) = (
            Input {
                headers,
                body: &full,
            },
            Input {
                headers,
                body: &projected,
            },
        );
        prop_assert_eq!(
            mapping.decide(p, Some(now)),
            mapping.decide(f, Some(now)),
            "{}",
            source
        );
        prop_assert_eq!(
            mapping.decide(p, None),
            mapping.decide(f, None),
            "{}",
            source
        );
        prop_assert_eq!(
            mapping.dedup_key(p, &bytes),
            mapping.dedup_key(f, &bytes),
            "{}",
            source
        );
    }
    Ok(())
}

fn event_headers() -> impl Strategy<Value = HeaderMap> {
    (
        prop_oneof![
            Just("issue_comment"),
            Just("pull_request_review"),
            Just("ping"),
            Just("push")
        ],
        prop::option::of("[a-z0-9-]{1,12}"),
    )
        .prop_map(|(event, id)| {
            let mut pairs = vec![("x-github-event", event.to_owned())];
            if let Some(id) = id {
                pairs.push(("x-github-delivery", id.clone()));
                pairs.push(("x-webhook-id", id));
            }
            header_map(&pairs)
        })
}

proptest! {
    #[test]
    fn projected_and_full_evaluation_agree_on_arbitrary_documents(doc in payloadish(), headers in event_headers()) {
        projected_agrees(&doc, &headers)?;
    }

    #[test]
    fn projected_and_full_evaluation_agree_on_altered_real_payloads(
        which in any::<prop::sample::Index>(),
        walk in prop::collection::vec(any::<usize>(), 1..5),
        with in prop::option::of(payloadish()),
        headers in event_headers(),
    ) {
        let docs = shipped_payloads();
        let mut doc = docs[which.index(docs.len())].clone();
        mutate(&mut doc, &walk, with);
        projected_agrees(&doc, &headers)?;
    }

    #[test]
    fn projected_and_full_parses_accept_the_same_bodies(
        doc in payloadish(),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
        depth in 1usize..8,
    ) {
        let mut bytes = serde_json::to_vec(&doc).unwrap();
        let n = at.index(bytes.len());
        bytes[n] = byte;
        let full = serde_json::from_slice::<Value>(&bytes).ok();
        for mapping in mappings().mappings.values() {
            let projected = mapping.projection().parse(&bytes, 64);
            prop_assert_eq!(projected.is_ok(), full.is_some(), "{}", String::from_utf8_lossy(&bytes));
            let whole = p0_relay::mapping::projection::Projection::full().parse(&bytes, 64).ok();
            prop_assert_eq!(&whole, &full);
            // The depth limit holds wherever the nesting is, read or skipped.
            let deep = full.as_ref().is_some_and(|v| nesting(v) > depth);
            let limited = mapping.projection().parse(&bytes, depth);
            prop_assert_eq!(limited.is_ok(), full.is_some() && !deep);
        }
    }
}

fn nesting(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(nesting).max().unwrap_or(0),
        Value::Object(m) => 1 + m.values().map(nesting).max().unwrap_or(0),
        _ => 0,
    }
}
