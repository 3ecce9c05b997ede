//! The audit trail, black-box: what a user of `p0-relay audit` sees of a running relay's store
//! (SQLite and PostgreSQL): a refusal on receipt with its reason, `--since` and `--follow` as
//! a log shipper runs them, one gap-free ordered stream from two relays on one database, and
//! `audit verify` on an untouched store, after an edit and after a removal (and without the
//! key its seals were made with); the metrics that watch the seals.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::pg::TestDb;
use crate::common::*;
use serde_json::Value;

const KEY: &str = "an audit key of at least 16";

/// Where `t`'s store is, as `--db` takes it.
fn db_of(t: &TestRelay) -> String {
    match &t.store {
        StoreAt::Sqlite(path) => path.display().to_string(),
        StoreAt::Postgres(url) => url.clone(),
    }
}

/// `p0-relay audit --json --db DB ARGS...`: its exit code and the events it printed.
fn trail(db: &str, args: &[&str], vars: &[(&str, &str)]) -> (Option<i32>, Vec<Value>, String) {
    let mut all = vec!["audit", "--json", "--db", db];
    all.extend(args);
    let (code, out) = run_cli(&all, &test_env(vars));
    let events = out
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    (code, events, out)
}

fn events(db: &str) -> Vec<Value> {
    let (code, events, out) = trail(db, &[], &[]);
    assert_eq!(code, Some(0), "{out}");
    events
}

/// (event, outcome, request) of each event.
fn steps(events: &[Value]) -> Vec<(String, String, String)> {
    let s = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    events
        .iter()
        .map(|e| (s(&e["event"]), s(&e["outcome"]), s(&e["request_id"])))
        .collect()
}

fn step(event: &str, outcome: &str, request: &str) -> (String, String, String) {
    (event.into(), outcome.into(), request.into())
}

/// A relay on SQLite, or on `db`, with `vars`.
async fn relay(db: Option<&TestDb>, vars: &[(&'static str, &str)]) -> TestRelay {
    let t = spawn_with(Setup {
        store_url: db.map(|d| d.url()),
        vars: vars.iter().map(|(k, v)| (*k, v.to_string())).collect(),
        ..Setup::default()
    })
    .await;
    t.p0_ok().await;
    t
}

/// A stranger's `/p0 approve` is answered `rejected` and recorded as `refused`, with the
/// reason, who asked and what; nothing else is stored and P0 is not called.
async fn a_strangers_comment_is_refused_in_the_trail(db: Option<&TestDb>) {
    let t = relay(db, &[]).await;
    let hook = Hook::github(
        "issue_comment",
        "stranger-1",
        &github_comment("/p0 approve req-123 2h", "mallory"),
        GITHUB_SECRET_NEW,
    );
    let (status, answer) = t.post(&hook).await;
    assert_eq!((status, answer["status"].as_str()), (200, Some("rejected")));
    let trail = events(&db_of(&t));
    assert_eq!(trail.len(), 1, "{trail:?}");
    let e = &trail[0];
    for (field, want) in [
        ("event", "refused"),
        ("outcome", "refused"),
        ("source", "github"),
        ("rule", "comment-command"),
        ("actor", "mallory"),
        ("action", "approve"),
        ("request_id", "req-123"),
    ] {
        assert_eq!(e[field], want, "{field}: {e}");
    }
    assert_eq!(e["id"], 1);
    assert_eq!(e["reason"], answer["reason"], "{e}");
    assert_eq!(e["delivery"], answer["delivery"], "{e}");
    assert!(e.get("job_id").is_none(), "nothing stored: {e}");
    assert_eq!(t.store.rows("jobs").await, 0);
    assert!(t.settle().await.is_empty(), "P0 is not called");
}

#[tokio::test]
async fn a_strangers_comment_is_refused_with_its_reason() {
    a_strangers_comment_is_refused_in_the_trail(None).await;
}

#[tokio::test]
async fn a_strangers_comment_is_refused_with_its_reason_on_postgres() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    a_strangers_comment_is_refused_in_the_trail(Some(&db)).await;
}

/// `p0-relay audit --follow --json ARGS...` running: each line it prints, with when.
struct Follower {
    child: std::process::Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<(Instant, String)>,
}

impl Follower {
    fn start(db: &str, args: &[&str]) -> Follower {
        let mut child = Command::new(env!("CARGO_BIN_EXE_p0-relay"))
            .current_dir(repo())
            .env_clear()
            .envs(test_env(&[]))
            .args(["audit", "--follow", "--json", "--db", db])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start audit --follow");
        let out = child.stdout.take().expect("stdout");
        let (send, lines) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if send.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        Follower { child, lines }
    }

    /// The next `n` lines, each with when it came; fails after `within` without them.
    async fn next(&mut self, n: usize, within: Duration) -> Vec<(Instant, Value)> {
        let deadline = tokio::time::Instant::now() + within;
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let line = tokio::time::timeout_at(deadline, self.lines.recv()).await;
            let Ok(Some((at, line))) = line else {
                panic!("line {} of {n} not printed in {within:?}", i + 1);
            };
            out.push((at, serde_json::from_str(&line).expect("a JSON line")));
        }
        out
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A shipper's view: `--since` gives exactly the events after the ID it names, and
/// `--follow` prints an event committed after it started within a second.
async fn since_and_follow(db: Option<&TestDb>) {
    let t = relay(db, &[]).await;
    let (status, _) = t
        .post(&Hook::comment("first", "/p0 approve req-1 2h"))
        .await;
    assert_eq!(status, 202);
    t.wait_for_calls(1).await;
    t.store.quiet().await;
    let at = db_of(&t);
    assert_eq!(
        steps(&events(&at)),
        [
            step("accepted", "queued", "req-1"),
            step("sent", "success", "req-1")
        ]
    );
    let (code, newer, out) = trail(&at, &["--since", "1"], &[]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(
        newer.iter().map(|e| e["id"].as_i64()).collect::<Vec<_>>(),
        [Some(2)]
    );
    let (_, none, _) = trail(&at, &["--since", "2"], &[]);
    assert!(none.is_empty(), "{none:?}");
    // `--until` a time: the events written up to it.
    let (code, before, out) = trail(&at, &["--until", "2001-01-01T00:00:00Z"], &[]);
    assert_eq!((code, before.len()), (Some(0), 0), "{out}");
    let (code, upto, out) = trail(&at, &["--until", "2999-01-01T00:00:00Z"], &[]);
    assert_eq!((code, upto.len()), (Some(0), 2), "{out}");

    // Started after the first event: printing the second shows it is reading.
    let mut follower = Follower::start(&at, &["--since", "1"]);
    let (_, second) = &follower.next(1, Duration::from_secs(10)).await[0];
    assert_eq!(second["id"], 2);
    let (status, _) = t
        .post(&Hook::comment("second", "/p0 approve req-2 2h"))
        .await;
    let answered = Instant::now();
    assert_eq!(status, 202);
    let lines = follower.next(2, Duration::from_secs(10)).await;
    let (printed, accepted) = &lines[0];
    assert_eq!(
        (accepted["id"].as_i64(), accepted["event"].as_str()),
        (Some(3), Some("accepted"))
    );
    assert!(
        printed.saturating_duration_since(answered) < Duration::from_secs(1),
        "printed {:?} after the sender's answer",
        printed.saturating_duration_since(answered)
    );
    assert_eq!(lines[1].1["event"], "sent");
}

#[tokio::test]
async fn since_gives_exactly_the_newer_events_and_follow_prints_new_ones_within_a_second() {
    since_and_follow(None).await;
}

#[tokio::test]
async fn since_gives_exactly_the_newer_events_and_follow_prints_new_ones_within_a_second_on_postgres()
 {
    let Some(db) = TestDb::create().await else {
        return;
    };
    since_and_follow(Some(&db)).await;
}

/// Two relays writing to one database at once make one stream: IDs from 1 without a gap, in
/// commit order, so a follower reading while they write prints every event once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_on_one_postgres_give_one_gap_free_ordered_stream() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let a = relay(Some(&db), &[]).await;
    let b = relay(Some(&db), &[]).await;
    let mut follower = Follower::start(&db.url(), &[]);
    let mut posts = tokio::task::JoinSet::new();
    for i in 0..40 {
        let t = if i % 2 == 0 { &a } else { &b };
        let (http, base) = (t.http.clone(), t.url(""));
        let hook = Hook::comment(&format!("storm-{i}"), &format!("/p0 approve req-{i} 1h"));
        posts.spawn(async move { send(&http, &base, &hook).await.status().as_u16() });
    }
    let statuses = posts.join_all().await;
    assert!(statuses.iter().all(|s| *s == 202), "{statuses:?}");
    // Every decision accepted and sent (by either relay): 80 events.
    let lines = follower.next(80, Duration::from_secs(30)).await;
    a.store.quiet().await;
    let stored = events(&db.url());
    assert_eq!(stored.len(), 80);
    let ids: Vec<i64> = stored.iter().filter_map(|e| e["id"].as_i64()).collect();
    assert_eq!(ids, (1..=80).collect::<Vec<_>>(), "no gaps");
    let followed: Vec<&Value> = lines.iter().map(|(_, v)| v).collect();
    assert_eq!(
        followed,
        stored.iter().collect::<Vec<_>>(),
        "read as stored"
    );
    let mut per_request: HashMap<String, Vec<String>> = HashMap::new();
    for e in &stored {
        per_request
            .entry(e["request_id"].as_str().unwrap_or_default().into())
            .or_default()
            .push(e["event"].as_str().unwrap_or_default().into());
    }
    assert_eq!(per_request.len(), 40);
    assert!(
        per_request.values().all(|v| v == &["accepted", "sent"]),
        "{per_request:?}"
    );
}

/// `audit verify` passes on a relay's untouched store (sealed, with a key, every second and
/// at its stop), fails without the key, names an event edited or removed behind the store's
/// back, and passes again once the edit is undone; the metrics count events and seals.
async fn verify_names_what_changed(db: Option<&TestDb>) {
    let mut t = relay(
        db,
        &[
            ("P0_RELAY_AUDIT_KEY", KEY),
            ("P0_RELAY_AUDIT_SEAL_INTERVAL", "200ms"),
        ],
    )
    .await;
    for i in 0..3 {
        let (status, _) = t
            .post(&Hook::comment(
                &format!("v-{i}"),
                &format!("/p0 approve req-{i} 1h"),
            ))
            .await;
        assert_eq!(status, 202);
    }
    t.wait_for_calls(3).await;
    t.store.quiet().await;
    t.wait_metric("p0_relay_audit_events_total{event=\"accepted\"}", 3.0)
        .await;
    t.wait_metric("p0_relay_audit_events_total{event=\"sent\"}", 3.0)
        .await;
    metric_until(&t, "p0_relay_audit_seals_total", |n| n >= 1.0).await;
    // The gauges, once a second: a seal covers every event, and is recent.
    metric_until(&t, "p0_relay_audit_seconds_since_seal", |s| {
        (0.0..5.0).contains(&s)
    })
    .await;
    metric_until(&t, "p0_relay_audit_unsealed_events", |n| n == 0.0).await;
    t.stop().await;
    let at = db_of(&t);
    let verify = |vars: &[(&str, &str)]| {
        let (code, out) = run_cli(&["audit", "verify", "--db", &at], &test_env(vars));
        (code, out)
    };
    let keyed = [("P0_RELAY_AUDIT_KEY", KEY)];
    let (code, out) = verify(&keyed);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.starts_with("verified ")
            && out.contains(" events from 1 (")
            && out.contains(" keyed seals), sealed through ")
            && out.trim_end().ends_with("; 0 not sealed yet"),
        "{out}"
    );
    let (code, out) = verify(&[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("is keyed: set P0_RELAY_AUDIT_KEY"), "{out}");
    // An event edited, then put back.
    let original = raw_body(&t, 1).await;
    behind_its_back(
        &t,
        "UPDATE audit_events SET body = replace(body, 'octocat', 'mallory') WHERE id = 1",
    )
    .await;
    let (code, out) = verify(&keyed);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("event 1 was changed after it was written"),
        "{out}"
    );
    let restore = format!(
        "UPDATE audit_events SET body = '{}' WHERE id = 1",
        original.replace('\'', "''")
    );
    behind_its_back(&t, &restore).await;
    assert_eq!(verify(&keyed).0, Some(0));
    // An event removed.
    behind_its_back(&t, "DELETE FROM audit_events WHERE id = 3").await;
    let (code, out) = verify(&keyed);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("event 3 was removed"), "{out}");
}

/// Waits (up to 5 s) until the series `name` holds a value `ok` takes.
async fn metric_until(t: &TestRelay, name: &str, ok: impl Fn(f64) -> bool) {
    for _ in 0..200 {
        if t.metric(name).await.is_some_and(&ok) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{name}: {:?}", t.metric(name).await);
}

/// Event `id`'s stored body.
async fn raw_body(t: &TestRelay, id: i64) -> String {
    let sql = format!("SELECT body FROM audit_events WHERE id = {id}");
    t.store.value(&sql).await
}

async fn behind_its_back(t: &TestRelay, sql: &str) {
    t.store.execute(sql).await
}

#[tokio::test]
async fn verify_passes_untouched_and_names_an_edited_or_removed_event() {
    verify_names_what_changed(None).await;
}

#[tokio::test]
async fn verify_passes_untouched_and_names_an_edited_or_removed_event_on_postgres() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    verify_names_what_changed(Some(&db)).await;
}
