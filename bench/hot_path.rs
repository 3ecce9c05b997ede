//! Micro-benchmarks of the webhook hot path per source: verify the signature over the raw
//! bytes, parse the body once (whole, or only what the mapping reads), run the mapping and
//! policy, and compute the dedup key. `cargo bench --bench hot_path`.
//!
//! With `HOT_PATH_RUNS=N` it runs each case N times without criterion, for an instruction
//! count: `HOT_PATH_RUNS=1000 valgrind --tool=callgrind target/release/deps/hot_path-*`
//! (`HOT_PATH_PARSE=full|projected` picks one parse, `HOT_PATH_CASE` one payload).

use std::collections::HashMap;
use std::path::Path;

use axum::http::{HeaderMap, HeaderValue};
use criterion::{Criterion, criterion_group};
use p0_relay::config::env::Env;
use p0_relay::domain::Expiration;
use p0_relay::mapping::{Defaults, Enabled, Input, Mapping, MappingSet, Verdict};
use p0_relay::receiver::body;
use p0_relay::verify::sign_hex;

fn mappings() -> MappingSet {
    let vars: HashMap<String, String> = [
        ("GITHUB_WEBHOOK_SECRET", "gh"),
        ("PAGERDUTY_WEBHOOK_SECRET", "pd"),
        ("OPSGENIE_WEBHOOK_TOKEN", "og"),
        ("GITHUB_APPROVERS", "octocat"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let defaults = Defaults {
        org: "bench".into(),
        expiration: Expiration::parse("1h").expect("1h"),
        max_expiration: Expiration::parse("12h").ok(),
        sources: Enabled::parse(Enabled::DEFAULT).expect("default sources"),
    };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings");
    MappingSet::load(&dir, &Env::default().overlay(&vars), &defaults).expect("mappings")
}

/// One webhook to decide: the source, its payload and the headers it arrives with.
struct Case {
    name: &'static str,
    source: &'static str,
    body: Vec<u8>,
    headers: HeaderMap,
}

fn cases() -> Vec<Case> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let list = [
        (
            "github",
            "github",
            "bench/payloads/github_issue_comment_created.json",
            "gh",
        ),
        (
            "github-trimmed",
            "github",
            "mappings/testdata/github/issue_comment_created.json",
            "gh",
        ),
        (
            "pagerduty",
            "pagerduty",
            "bench/payloads/pagerduty_incident_acknowledged.json",
            "pd",
        ),
        (
            "opsgenie",
            "opsgenie",
            "bench/payloads/opsgenie_acknowledge.json",
            "og",
        ),
    ];
    let only = std::env::var("HOT_PATH_CASE").ok();
    list.into_iter()
        .filter(|(name, ..)| only.as_deref().is_none_or(|o| o == *name))
        .map(|(name, source, file, secret)| {
            let body = std::fs::read(root.join(file)).expect("payload");
            let mut headers = HeaderMap::new();
            headers.insert("content-type", HeaderValue::from_static("application/json"));
            let sig = sign_hex(secret, &body);
            match source {
                "github" => {
                    headers.insert("x-github-event", HeaderValue::from_static("issue_comment"));
                    headers.insert("x-github-delivery", HeaderValue::from_static("bench-1"));
                    headers.insert(
                        "x-hub-signature-256",
                        HeaderValue::from_str(&format!("sha256={sig}")).expect("h"),
                    );
                }
                "pagerduty" => {
                    headers.insert("x-webhook-id", HeaderValue::from_static("bench-1"));
                    headers.insert(
                        "x-pagerduty-signature",
                        HeaderValue::from_str(&format!("v1={sig}")).expect("h"),
                    );
                }
                _ => {
                    headers.insert("authorization", HeaderValue::from_static("Bearer og"));
                }
            }
            Case {
                name,
                source,
                body,
                headers,
            }
        })
        .collect()
}

/// One webhook through verification, parsing, mapping and policy, and its dedup key.
fn once(mapping: &Mapping, case: &Case, projected: bool) -> (String, Verdict) {
    mapping
        .verifier
        .verify(&case.headers, &case.body)
        .expect("verified");
    let value = if projected {
        body::parse_projected(&case.headers, &case.body, 64, mapping.projection())
    } else {
        body::parse(&case.headers, &case.body, 64)
    }
    .expect("json");
    let input = Input {
        headers: &case.headers,
        body: &value,
    };
    let key = mapping.dedup_key(input, &case.body);
    let verdict = mapping.decide(input, Some(std::time::SystemTime::now()));
    assert!(matches!(verdict, Verdict::Decided { .. }), "{}", case.name);
    (key, verdict)
}

fn hot_path(c: &mut Criterion) {
    let set = mappings();
    for case in cases() {
        let mapping = set.get(case.source).expect("mapping").clone();
        for (parse, projected) in [("full", false), ("projected", true)] {
            c.bench_function(&format!("verify+parse+map/{}/{parse}", case.name), |b| {
                b.iter(|| once(&mapping, &case, projected))
            });
        }
    }
}

fn main() {
    let Some(runs) = std::env::var("HOT_PATH_RUNS")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
    else {
        benches();
        Criterion::default().configure_from_args().final_summary();
        return;
    };
    let set = mappings();
    let parse = std::env::var("HOT_PATH_PARSE").unwrap_or_else(|_| "projected".into());
    for case in cases() {
        let mapping = set.get(case.source).expect("mapping").clone();
        for _ in 0..runs {
            std::hint::black_box(once(&mapping, &case, parse == "projected"));
        }
    }
}

criterion_group!(benches, hot_path);
