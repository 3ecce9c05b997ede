//! Group commit against one commit per webhook: the same relay, store on disk, driven over
//! HTTP by concurrent senders for a fixed time each, in one run. `cargo bench --bench
//! group_commit` prints webhooks accepted per second for both and their ratio.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use p0_relay::app::{Options, Relay};
use p0_relay::config::Settings;
use p0_relay::config::env::Env;
use p0_relay::verify::sign_hex;

const SECRET: &str = "bench-secret";
const SENDERS: usize = 64;
const SECONDS: u64 = 8;

fn env() -> Env {
    let vars: HashMap<String, String> = [
        ("P0_ORG_ID", "bench"),
        ("GITHUB_WEBHOOK_SECRET", SECRET),
        ("PAGERDUTY_WEBHOOK_SECRET", "x"),
        ("OPSGENIE_WEBHOOK_TOKEN", "x"),
        ("GITHUB_APPROVERS", "octocat"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    Env::default().overlay(&vars)
}

async fn run(group_commit: bool, dir: &std::path::Path) -> f64 {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let db = dir.join(if group_commit {
        "group.db"
    } else {
        "single.db"
    });
    let config = dir.join("relay.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:0\nmappings: {}\np0: {{ org: bench, rate_per_second: 0 }}\nstore: {{ path: {} }}\ninbound: {{ rate_per_second: 0 }}\n",
            root.join("mappings").display(),
            db.display()
        ),
    )
    .expect("config");
    let settings = Settings::load(&config, &env()).expect("settings");
    let opts = Options {
        dry_run: true,
        group_commit,
        ..Options::default()
    };
    let relay = Relay::start(settings, env(), opts).await.expect("relay");
    let url = format!("http://{}/webhooks/github", relay.addr);
    let template =
        std::fs::read_to_string(root.join("mappings/testdata/github/issue_comment_created.json"))
            .expect("payload");
    let counter = Arc::new(AtomicU64::new(0));
    let accepted = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(SECONDS);
    let mut tasks = Vec::new();
    for _ in 0..SENDERS {
        let (url, template, counter, accepted) = (
            url.clone(),
            template.clone(),
            counter.clone(),
            accepted.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            while Instant::now() < deadline {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let body = template.replace("req-123 2h", &format!("req-{n} 2h"));
                let sig = format!("sha256={}", sign_hex(SECRET, body.as_bytes()));
                let resp = http
                    .post(&url)
                    .header("X-GitHub-Event", "issue_comment")
                    .header("X-GitHub-Delivery", format!("bench-{n}"))
                    .header("X-Hub-Signature-256", sig)
                    .body(body)
                    .send()
                    .await;
                if resp.is_ok_and(|r| r.status().as_u16() == 202) {
                    accepted.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    relay.stop().await;
    accepted.load(Ordering::Relaxed) as f64 / SECONDS as f64
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let (single, group) = runtime.block_on(async {
        let single = run(false, dir.path()).await;
        let group = run(true, dir.path()).await;
        (single, group)
    });
    println!("store on disk: {}", dir.path().display());
    println!("| store commits | webhooks accepted/s ({SENDERS} senders, {SECONDS} s) |");
    println!("|---|---|");
    println!("| one per webhook | {single:.0} |");
    println!("| group commit | {group:.0} |");
    println!(
        "group commit / one per webhook = {:.2}x",
        group / single.max(1.0)
    );
}
