//! Micro-benchmarks of the webhook hot path per source: verify the signature over the raw
//! bytes, parse the body once, run the mapping and policy, and compute the dedup key.
//! `cargo bench --bench hot_path`.

use std::collections::HashMap;
use std::path::Path;

use axum::http::{HeaderMap, HeaderValue};
use criterion::{Criterion, criterion_group, criterion_main};
use p0_relay::config::env::Env;
use p0_relay::domain::Expiration;
use p0_relay::mapping::{Defaults, Input, MappingSet, Verdict};
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
    };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings");
    MappingSet::load(&dir, &Env::default().overlay(&vars), &defaults).expect("mappings")
}

fn hot_path(c: &mut Criterion) {
    let set = mappings();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings/testdata");
    let cases = [
        ("github", "github/issue_comment_created.json", "gh"),
        ("pagerduty", "pagerduty/incident_acknowledged.json", "pd"),
        ("opsgenie", "opsgenie/acknowledge.json", "og"),
    ];
    for (source, file, secret) in cases {
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
        let mapping = set.get(source).expect("mapping").clone();
        c.bench_function(&format!("verify+parse+map/{source}"), |b| {
            b.iter(|| {
                mapping.verifier.verify(&headers, &body).expect("verified");
                let value = body::parse(&headers, &body, 64).expect("json");
                let input = Input {
                    headers: &headers,
                    body: &value,
                };
                let key = mapping.dedup_key(input, &body);
                let verdict = mapping.decide(input, Some(std::time::SystemTime::now()));
                assert!(matches!(verdict, Verdict::Decided { .. }));
                (key, verdict)
            })
        });
    }
}

criterion_group!(benches, hot_path);
criterion_main!(benches);
