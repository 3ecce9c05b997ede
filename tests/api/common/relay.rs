//! The relay in process: started on port 0 with a generated relay.yaml against a fake P0
//! (wiremock) and a fresh store, its environment isolated from the process's; what a test
//! asks of it (post a hook, wait for P0's calls, read a metric, read its store).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use p0_relay::app::{Options, Relay};
use p0_relay::config::Settings;
use p0_relay::config::env::Env;
use p0_relay::store::{JobDetail, StoreHandle, StoreLocation, Windows};
use serde_json::Value;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

use super::*;

/// An HTTP client for tests (the TLS provider installed first, as the relay does).
pub fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    // An idle connection is given up before the relay closes it (the suite's relays wait 2 s
    // for a next request): a request sent on one the relay is closing at that moment would
    // fail, as it would for any HTTP/1.1 client that keeps connections longer than the server.
    reqwest::Client::builder()
        .pool_idle_timeout(Duration::from_secs(1))
        .build()
        .expect("HTTP client")
}

/// The value of the first series in a `/metrics` text whose line starts with `line_prefix`.
pub fn metric_value(text: &str, line_prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The variables a test relay sees: nothing from the process environment.
pub fn test_env(extra: &[(&str, &str)]) -> HashMap<String, String> {
    let mut vars: HashMap<String, String> = [
        ("P0_ORG_ID", ORG),
        ("P0_API_TOKEN", TOKEN),
        (
            "GITHUB_WEBHOOK_SECRET",
            &format!("{GITHUB_SECRET_NEW},{GITHUB_SECRET_OLD}") as &str,
        ),
        ("PAGERDUTY_WEBHOOK_SECRET", PD_SECRET),
        ("OPSGENIE_WEBHOOK_TOKEN", OG_TOKEN),
        ("ALERTMANAGER_WEBHOOK_TOKEN", AM_TOKEN),
        ("GRAFANA_WEBHOOK_SECRET", GRAFANA_SECRET),
        ("INCIDENTIO_WEBHOOK_SECRET", INCIDENTIO_SECRET),
        ("JSM_WEBHOOK_TOKEN", JSM_TOKEN),
        // The actors of the samples in mappings/testdata may grant; nobody else.
        ("GITHUB_APPROVERS", "octocat"),
        ("PAGERDUTY_APPROVERS", PD_APPROVER),
        ("OPSGENIE_APPROVERS", OG_APPROVER),
        ("JSM_APPROVERS", OG_APPROVER),
        ("ALERTMANAGER_GRANTS", "on"),
        ("GRAFANA_GRANTS", "on"),
        ("INCIDENTIO_GRANTS", "on"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (k, v) in extra {
        vars.insert(k.to_string(), v.to_string());
    }
    vars
}

pub struct TestRelay {
    pub relay: Option<Relay>,
    pub addr: SocketAddr,
    pub p0: MockServer,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
    /// The relay's store, read behind its back to tell when it has handled its input.
    pub store: StoreAt,
}

/// Where a relay's store is.
#[derive(Clone, Debug)]
pub enum StoreAt {
    Sqlite(PathBuf),
    Postgres(String),
}

impl StoreAt {
    /// Decisions and answers back in flight, or due within a second (the tests' retries
    /// wait at most 50 ms, so a retry the relay should not make is waited for and seen): the
    /// relay has work it has not finished. A store that cannot be read counts as busy.
    pub async fn busy(&self) -> i64 {
        const BUSY: &str = "SELECT
            (SELECT count(*) FROM jobs WHERE state = 'sending'
                OR (state = 'pending' AND next_attempt_at <= $1))
          + (SELECT count(*) FROM answers WHERE state = 'sending'
                OR (state = 'pending' AND next_attempt_at <= $1))";
        let soon = p0_relay::store::now_ms() + 1_000;
        match self {
            StoreAt::Sqlite(path) => {
                let Ok(db) = rusqlite::Connection::open_with_flags(
                    path,
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                ) else {
                    return 1;
                };
                db.busy_timeout(Duration::from_secs(5)).unwrap();
                db.query_row(&BUSY.replace("$1", "?1"), [soon], |r| r.get(0))
                    .unwrap_or(1)
            }
            StoreAt::Postgres(url) => pg_client(url)
                .await
                .query_one(BUSY, &[&soon])
                .await
                .unwrap()
                .get(0),
        }
    }

    /// How many rows `table` holds.
    pub async fn rows(&self, table: &str) -> i64 {
        self.value(&format!("SELECT count(*) FROM {table}")).await
    }

    /// The one value `sql` selects, read behind the relay's back.
    pub async fn value<T>(&self, sql: &str) -> T
    where
        T: rusqlite::types::FromSql + for<'a> tokio_postgres::types::FromSql<'a>,
    {
        match self {
            StoreAt::Sqlite(path) => rusqlite::Connection::open(path)
                .unwrap()
                .query_row(sql, [], |r| r.get(0))
                .unwrap(),
            StoreAt::Postgres(url) => pg_client(url)
                .await
                .query_one(sql, &[])
                .await
                .unwrap()
                .get(0),
        }
    }

    /// Runs `sql` behind the relay's back.
    pub async fn execute(&self, sql: &str) {
        match self {
            StoreAt::Sqlite(path) => rusqlite::Connection::open(path)
                .unwrap()
                .execute_batch(sql)
                .unwrap(),
            StoreAt::Postgres(url) => pg_client(url).await.batch_execute(sql).await.unwrap(),
        }
    }

    /// Waits until the relay has handled everything it took: its final state recorded, or
    /// a retry scheduled more than a second later. Fails the test if that takes more than
    /// 10 s.
    pub async fn quiet(&self) {
        for _ in 0..500 {
            if self.busy().await == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the relay has not handled its input within 10 s ({self:?})");
    }

    /// What `server` (a fake the relay calls) received, once it has received `n` requests
    /// and the relay has handled all it took.
    pub async fn received(&self, server: &MockServer, n: usize) -> Vec<Request> {
        received_at_least(server, n).await;
        self.quiet().await;
        server.received_requests().await.unwrap_or_default()
    }

    /// What `server` received, exactly `n` requests (failing on more or fewer), once the
    /// relay has handled all it took.
    pub async fn exactly(&self, server: &MockServer, n: usize) -> Vec<Request> {
        let got = self.received(server, n).await;
        assert_eq!(
            got.len(),
            n,
            "expected {n} calls, got {:?}",
            got.iter()
                .map(|r| (
                    r.url.path().to_owned(),
                    String::from_utf8_lossy(&r.body).into_owned()
                ))
                .collect::<Vec<_>>()
        );
        got
    }
}

/// Options for `spawn_with`.
#[derive(Default)]
pub struct Setup {
    pub vars: Vec<(&'static str, String)>,
    /// Extra YAML appended to the generated relay.yaml sections.
    pub inbound: String,
    pub p0_extra: String,
    /// Extra top-level YAML.
    pub top: String,
    pub mappings_dir: Option<PathBuf>,
    pub dry_run: bool,
    pub store_path: Option<PathBuf>,
    /// A store URL (`postgres://...`) instead of a file.
    pub store_url: Option<String>,
    /// Extra YAML under `store:`.
    pub store_extra: String,
    /// Webhooks per second per source (0 = off).
    pub inbound_rate: u32,
    /// Variables to leave unset.
    pub unset: Vec<&'static str>,
    /// The relay component that panics as it starts (a test of supervision).
    pub panic_in: Option<&'static str>,
    /// A store handed to the relay in place of the one the settings name (`Watched::given`).
    pub store: Option<Given>,
    /// The `decisions:` section in place of the default one (1h, capped at 12h).
    pub decisions: Option<String>,
}

pub async fn spawn() -> TestRelay {
    spawn_with(Setup::default()).await
}

pub fn write_config(dir: &Path, p0_url: &str, setup: &Setup) -> PathBuf {
    let mappings = setup
        .mappings_dir
        .clone()
        .unwrap_or_else(|| repo().join("mappings"));
    let store = setup.store_url.clone().unwrap_or_else(|| {
        setup
            .store_path
            .clone()
            .unwrap_or_else(|| dir.join("relay.db"))
            .display()
            .to_string()
    });
    let config = format!(
        r#"
listen: 127.0.0.1:0
mappings: {mappings}
p0:
  base_url: {p0_url}
  org: ${{P0_ORG_ID}}
  token: ${{P0_API_TOKEN:-}}
  timeout: 2s
  rate_per_second: 0
  retry:
    base_delay: 10ms
    max_delay: 50ms
{p0_extra}
{decisions}
store:
  path: "{store}"
{store_extra}
inbound:
  rate_per_second: {inbound_rate}
  read_timeout: 2s
{inbound}
{top}
"#,
        mappings = mappings.display(),
        store = store,
        store_extra = setup.store_extra,
        p0_extra = setup.p0_extra,
        inbound = setup.inbound,
        top = setup.top,
        inbound_rate = setup.inbound_rate,
        decisions = setup
            .decisions
            .as_deref()
            .unwrap_or("decisions:\n  default_expiration: 1h\n  max_expiration: 12h"),
    );
    let path = dir.join("relay.yaml");
    std::fs::write(&path, config).expect("write config");
    path
}

pub async fn spawn_with(setup: Setup) -> TestRelay {
    let p0 = MockServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let extra: Vec<(&str, &str)> = setup.vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut vars = test_env(&extra);
    for name in &setup.unset {
        vars.remove(*name);
    }
    let env = Env::default().overlay(&vars);
    let config = write_config(dir.path(), &p0.uri(), &setup);
    let settings = Settings::load(&config, &env).unwrap_or_else(|e| panic!("config: {e:?}"));
    let opts = Options {
        dry_run: setup.dry_run,
        drain: Duration::from_secs(2),
        reload_poll: Duration::from_millis(100),
        panic_in: setup.panic_in,
        ..Options::default()
    };
    let store = match (&setup.store, &setup.store_url) {
        (Some(given), _) => StoreAt::Sqlite(given.path.clone()),
        (None, Some(url)) => StoreAt::Postgres(url.clone()),
        (None, None) => StoreAt::Sqlite(
            setup
                .store_path
                .clone()
                .unwrap_or_else(|| dir.path().join("relay.db")),
        ),
    };
    let given = setup.store.map(|g| (g.handle, g.task));
    let relay = Relay::build(settings, env, opts, given)
        .await
        .expect("relay builds")
        .run();
    TestRelay {
        addr: relay.addr,
        relay: Some(relay),
        p0,
        dir,
        http: client(),
        store,
    }
}

impl TestRelay {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn post(&self, hook: &Hook) -> (u16, Value) {
        answer(send(&self.http, &self.url(""), hook).await).await
    }

    /// Posts each hook in turn, each answered 202 and delivered before the next, and returns
    /// every call P0 received as `summarize` shows it.
    pub async fn deliver(&self, hooks: &[Hook]) -> Vec<(String, String, Value)> {
        for (i, hook) in hooks.iter().enumerate() {
            let (status, answer) = self.post(hook).await;
            assert_eq!(status, 202, "hook {i}: {answer}");
            self.wait_for_calls(i + 1).await;
        }
        summarize(&self.settle().await)
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let resp = self.http.get(self.url(path)).send().await.expect("get");
        (
            resp.status().as_u16(),
            resp.text().await.unwrap_or_default(),
        )
    }

    /// Mounts a P0 that answers 200 to every call.
    pub async fn p0_ok(&self) {
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({"ok": true})))
            .mount(&self.p0)
            .await;
    }

    pub async fn p0_calls(&self) -> Vec<Request> {
        self.p0.received_requests().await.unwrap_or_default()
    }

    /// Waits until P0 has received `n` calls (or fails after a few seconds).
    pub async fn wait_for_calls(&self, n: usize) -> Vec<Request> {
        wait_for_p0_calls(&self.p0, n).await
    }

    /// Every call P0 received once the relay has handled all it took (`StoreAt::quiet`):
    /// a call it was going to make has been made.
    pub async fn settle(&self) -> Vec<Request> {
        self.store.quiet().await;
        self.p0_calls().await
    }

    pub async fn metric(&self, line_prefix: &str) -> Option<f64> {
        let (_, text) = self.get("/metrics").await;
        metric_value(&text, line_prefix)
    }

    /// Waits (up to 5 s) until the series `line_prefix` shows `value`; gauges refresh about
    /// once a second.
    pub async fn wait_metric(&self, line_prefix: &str, value: f64) {
        for _ in 0..100 {
            if self.metric(line_prefix).await == Some(value) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let got = self.metric(line_prefix).await;
        panic!("{line_prefix}: expected {value}, got {got:?}");
    }

    pub async fn stop(&mut self) {
        if let Some(r) = self.relay.take() {
            r.stop().await;
        }
    }
}

/// A reader of the SQLite store at `db`, as `p0-relay jobs` opens it (nothing in flight is
/// touched).
pub async fn reader(db: &Path) -> StoreHandle {
    let windows = Windows {
        dedup: Duration::from_secs(3600),
        coalesce: Duration::from_secs(600),
    };
    let (store, _task) = p0_relay::store::inspect(&StoreLocation::Sqlite(db.into()), windows)
        .await
        .expect("the store opens");
    store
}

/// Waits (up to 5 s) until `job` in the store at `db` is in `state`; returns its detail.
pub async fn wait_for_state(db: &Path, job: i64, state: &str) -> JobDetail {
    let store = reader(db).await;
    for _ in 0..100 {
        if let Some(d) = store.show(job).await.unwrap()
            && d.job.state == state
        {
            return d;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let now = store.show(job).await.unwrap().map(|d| d.job.state);
    panic!("job {job}: expected state {state}, got {now:?}");
}

/// A connection of the test's own to the database at `url`.
async fn pg_client(url: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c
}
