//! `relay.yaml`: parsed, expanded from the environment, then validated into `Settings` (two
//! phases: raw values as written, `raw`, then typed values the rest of the relay can trust,
//! `build`); and what a valid config may still get wrong (`problems`, `warnings`).

/// The environment a config is read against (re-exported here, where it is read).
pub use crate::env;

mod build;
mod raw;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde_json::Value;

use crate::env::Env;
use crate::mapping::Defaults;
use crate::secret::Secret;
use crate::store::StoreLocation;

/// Validated settings. Relative paths are resolved against the config file's folder.
#[derive(Debug, Clone)]
pub struct Settings {
    pub file: PathBuf,
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    pub mappings_dir: PathBuf,
    pub store: StoreSettings,
    pub p0: P0Settings,
    pub defaults: Defaults,
    pub inbound: InboundSettings,
    pub answers: AnswerSettings,
    pub log_json: bool,
    pub audit: AuditSettings,
}

/// The audit trail (`audit:`): how long its events are kept (apart from the jobs they
/// describe), how often they are sealed, and the key seals are made with.
#[derive(Debug, Clone)]
pub struct AuditSettings {
    pub retention: Duration,
    pub seal_interval: Duration,
    /// `P0_RELAY_AUDIT_KEY`: seals are HMAC-SHA256 with it; unset, plain SHA-256.
    pub key: Option<Secret>,
}

impl AuditSettings {
    /// `audit:` as `P0_RELAY_AUDIT_SEAL_INTERVAL` and `P0_RELAY_AUDIT_KEY` (or its `_FILE`)
    /// leave it, for commands that read no config (`audit --db`).
    pub fn from_env(env: &Env) -> Result<AuditSettings, Vec<String>> {
        let mut raw = raw::RawAudit::default();
        fill_audit(&mut raw, env)?;
        let mut reader = build::Reader::new(Path::new("."));
        let audit = reader.audit(&raw);
        match reader.errors.is_empty() {
            true => Ok(audit),
            false => Err(reader.errors),
        }
    }
}

/// `audit.seal_interval` and `audit.key`, when the config leaves them unset, from the
/// environment.
fn fill_audit(raw: &mut raw::RawAudit, env: &Env) -> Result<(), Vec<String>> {
    let var = |name: &str| env.get(name).map_err(|e| vec![e]);
    if raw.seal_interval.is_none() {
        raw.seal_interval = var("P0_RELAY_AUDIT_SEAL_INTERVAL")?;
    }
    if raw.key.is_none() {
        raw.key = var("P0_RELAY_AUDIT_KEY")?;
    }
    Ok(())
}

/// Answering back where a decision was asked (`answers:`): one API per provider, each on
/// only when its token is set.
#[derive(Debug, Clone)]
pub struct AnswerSettings {
    pub github: Option<ProviderApi>,
    pub pagerduty: Option<ProviderApi>,
    pub opsgenie: Option<ProviderApi>,
    pub jsm: Option<ProviderApi>,
    /// Answers in flight at once (apart from P0 calls).
    pub concurrency: usize,
    /// Answers per second per provider; 0 means unpaced.
    pub rate_per_second: u32,
    pub timeout: Duration,
    pub retry: RetrySettings,
    /// How long an on-call check's answer is reused (`answers.oncall_cache`).
    pub oncall_cache: Duration,
    /// How long a passed on-call check holds: a gated approve not sent to P0 within it (P0
    /// slow or down, retries) is checked again before it is (`answers.oncall_recheck_after`).
    pub oncall_recheck_after: Duration,
    /// Why a provider answers nothing (its token unset), said once at start.
    pub off: Vec<String>,
}

/// One provider's API: where, and the credential (and PagerDuty's `From` user).
#[derive(Debug, Clone)]
pub struct ProviderApi {
    pub url: reqwest::Url,
    pub token: Secret,
    pub from: Option<String>,
}

impl AnswerSettings {
    pub fn api(&self, via: crate::domain::Via) -> Option<&ProviderApi> {
        use crate::domain::Via;
        match via {
            Via::GitHub => self.github.as_ref(),
            Via::PagerDuty => self.pagerduty.as_ref(),
            Via::Opsgenie => self.opsgenie.as_ref(),
            Via::Jsm => self.jsm.as_ref(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct StoreSettings {
    /// A SQLite file or a PostgreSQL database (`store.path`, `P0_RELAY_DB`).
    pub location: StoreLocation,
    pub dedup_window: Duration,
    pub coalesce_window: Duration,
    /// How long a subject's end is remembered: approves under it are refused this long after
    /// it ended (and for as long as a job under it could be replayed).
    pub subject_end_window: Duration,
    pub store_payloads: bool,
    /// How long a relay's claim on a decision lasts without renewal (PostgreSQL).
    pub claim_lease: Duration,
}

impl StoreSettings {
    /// The windows that decide what counts as the same delivery or decision.
    pub fn windows(&self) -> crate::store::Windows {
        crate::store::Windows {
            dedup: self.dedup_window,
            coalesce: self.coalesce_window,
        }
    }
}

#[derive(Debug, Clone)]
pub struct P0Settings {
    pub base_url: reqwest::Url,
    pub org: String,
    /// `None` only when the config leaves it empty; `serve` then needs `--dry-run`.
    pub token: Option<Secret>,
    pub timeout: Duration,
    /// Calls per second per org; 0 means unpaced.
    pub rate_per_second: u32,
    pub concurrency: usize,
    pub retry: RetrySettings,
}

#[derive(Debug, Clone)]
pub struct RetrySettings {
    pub base_delay: Duration,
    pub max_delay: Duration,
    pub max_age: Duration,
    /// 0 means only `max_age` ends retrying.
    pub max_attempts: u32,
}

#[derive(Debug, Clone)]
pub struct InboundSettings {
    /// Webhooks per second per source; 0 turns the limit off.
    pub rate_per_second: u32,
    pub max_body_bytes: usize,
    pub max_header_bytes: usize,
    /// The deadline for a request's body as a whole, and (with `idle_timeout`) for its headers.
    pub read_timeout: Duration,
    pub max_connections: usize,
    /// The most connections one client address may hold (not applied to the peer behind a
    /// trusted proxy, `client_ip_header`), and the most bodies it may have in the budget.
    pub max_connections_per_address: usize,
    /// How long a connection may wait for its next request's headers (a new one, or a
    /// keep-alive between requests); at most `read_timeout`.
    pub idle_timeout: Duration,
    /// A body must arrive within this, plus a second for each `body_min_rate` bytes that
    /// have arrived, and within `read_timeout` in any case.
    pub body_timeout: Duration,
    pub body_min_rate: usize,
    /// Bytes all bodies not yet verified may hold together.
    pub body_budget_bytes: usize,
    pub max_json_depth: usize,
    /// Per source, the networks allowed to send; a source not listed is open to all.
    pub networks: std::collections::BTreeMap<String, Vec<IpNet>>,
    /// The header whose last address is the client's, when a proxy sits in front.
    pub client_ip_header: Option<axum::http::HeaderName>,
    pub tls: Option<TlsSettings>,
}

#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Settings {
    /// Reads, expands and validates `file`. Every problem found is returned, each naming the
    /// file and the key.
    pub fn load(file: &Path, env: &Env) -> Result<Settings, Vec<String>> {
        let text = read(file)?;
        Settings::from_text(file, &text, env)
    }

    /// Validates `text` as if read from `file` (relative paths resolve against its folder).
    pub fn from_text(file: &Path, text: &str, env: &Env) -> Result<Settings, Vec<String>> {
        let at = file.display().to_string();
        let mut raw: raw::Raw = expanded(&at, text, env, |t| t)?;
        fill_audit(&mut raw.audit, env).map_err(|e| at_file(&at, e))?;
        let base = file.parent().unwrap_or(Path::new("."));
        let mut reader = build::Reader::new(base);
        let settings = reader.settings(raw);
        match settings {
            Some(s) if reader.errors.is_empty() => Ok(Settings {
                file: file.to_owned(),
                ..s
            }),
            _ => Err(reader
                .errors
                .into_iter()
                .map(|e| format!("{at}: {e}"))
                .collect()),
        }
    }

    /// Only the `store:` section of `file`, expanded and validated: all that reading the
    /// store takes (`p0-relay jobs`), so variables of other sections may be unset.
    pub fn load_store(file: &Path, env: &Env) -> Result<StoreSettings, Vec<String>> {
        let at = file.display().to_string();
        let text = read(file)?;
        let section = |tree: Value| section(tree, "store");
        let raw: raw::RawStore = expanded(&format!("{at}: store"), &text, env, section)?;
        let base = file.parent().unwrap_or(Path::new("."));
        let mut reader = build::Reader::new(base);
        let store = reader.store(&raw);
        match store {
            Some(s) if reader.errors.is_empty() => Ok(s),
            _ => Err(reader
                .errors
                .into_iter()
                .map(|e| format!("{at}: {e}"))
                .collect()),
        }
    }
}

impl Settings {
    /// The `store:` and `audit:` sections of `file` (`p0-relay audit`), as `load_store`.
    pub fn load_audit(
        file: &Path,
        env: &Env,
    ) -> Result<(StoreSettings, AuditSettings), Vec<String>> {
        let at = file.display().to_string();
        let store = Settings::load_store(file, env)?;
        let text = read(file)?;
        let section = |tree: Value| section(tree, "audit");
        let mut raw: raw::RawAudit = expanded(&format!("{at}: audit"), &text, env, section)?;
        fill_audit(&mut raw, env).map_err(|e| at_file(&at, e))?;
        let mut reader = build::Reader::new(file.parent().unwrap_or(Path::new(".")));
        let audit = reader.audit(&raw);
        match reader.errors.is_empty() {
            true => Ok((store, audit)),
            false => Err(at_file(&at, reader.errors)),
        }
    }
}

/// The section `name` of a config's tree; an empty one when it is absent.
fn section(mut tree: Value, name: &str) -> Value {
    match tree.get_mut(name).map(Value::take) {
        None | Some(Value::Null) => Value::Object(Default::default()),
        Some(v) => v,
    }
}

fn at_file(at: &str, errors: Vec<String>) -> Vec<String> {
    errors.into_iter().map(|e| format!("{at}: {e}")).collect()
}

fn read(file: &Path) -> Result<String, Vec<String>> {
    std::fs::read_to_string(file).map_err(|e| vec![format!("{}: cannot read: {e}", file.display())])
}

/// `text` parsed as YAML, the part `pick` takes of it expanded from `env` (every variable
/// that is unset named at once) and read as `T`.
fn expanded<T: serde::de::DeserializeOwned>(
    at: &str,
    text: &str,
    env: &Env,
    pick: impl FnOnce(Value) -> Value,
) -> Result<T, Vec<String>> {
    let tree: Value =
        serde_saphyr::from_str(text).map_err(|e| vec![format!("{at}: not valid YAML: {e}")])?;
    let mut tree = pick(tree);
    env.expand_at(at, &mut tree)?;
    crate::env::deserialize_at(at, tree)
}

/// The longest access a grant asks for when `decisions.max_expiration` says nothing.
pub const DEFAULT_MAX_EXPIRATION: &str = "12h";

/// The most calls to P0 in flight `p0.concurrency` may ask for.
pub const MAX_CONCURRENCY: usize = 1024;
/// `inbound.body_budget_bytes` unless set: with the connections' own buffers and the rest of
/// the relay, the process stays within 128 MiB resident however many senders hold bodies.
pub const DEFAULT_BODY_BUDGET: u64 = 32 << 20;
/// The most open connections `inbound.max_connections` may ask for.
pub const MAX_CONNECTIONS: usize = 1_000_000;

/// What stops the relay from starting (and `check` from passing) though every file is valid:
/// an on-call check that is on but could not be made (its provider's API token is unset),
/// and a source whose grants could be replayed fresh after the store forgot them (the dedup
/// window no longer than its freshness window).
pub fn problems(settings: &Settings, mappings: &crate::mapping::MappingSet) -> Vec<String> {
    let mut out = Vec::new();
    let window = settings.store.dedup_window;
    for m in mappings.mappings.values() {
        for (rule, via) in m.oncall_checks() {
            if settings.answers.api(via).is_none() {
                out.push(format!(
                    "{}: rule `{rule}`: oncall: the {via} check needs answers.{via}.token ({})",
                    m.file.display(),
                    via.token_var()
                ));
            }
        }
        if let Some(age) = m.signed_max_age().filter(|age| *age >= window) {
            out.push(format!(
                "store.dedup_window {} must be longer than source `{}`'s freshness max_age {} ({}): a delivery replayed between the two would be forgotten and still fresh",
                humantime::format_duration(window),
                m.source,
                humantime::format_duration(age),
                m.file.display()
            ));
        }
    }
    out
}

/// Warnings an operator should see at every start: insecure sources, empty approver lists,
/// grants with no actor, freshness turned off, a plaintext P0 URL that leaves the machine, a
/// PostgreSQL store whose server is not verified, audit seals made without a key.
pub fn warnings(settings: &Settings, mappings: &crate::mapping::MappingSet) -> Vec<String> {
    let mut out: Vec<String> = mappings.warnings().cloned().collect();
    for m in mappings.mappings.values() {
        if m.replayable_grants() {
            out.push(format!(
                "source `{}`: its grants are judged at receipt and its signature covers no time: a delivery replayed after store.dedup_window grants again; have the sender sign a timestamp (for Grafana, GRAFANA_WEBHOOK_TIMESTAMP_HEADER) or leave its grants off",
                m.source
            ));
        }
        if m.max_event_age().is_none() {
            out.push(format!(
                "source `{}`: freshness is off (max_age 0): a grant replayed after store.dedup_window is accepted again",
                m.source
            ));
        }
    }
    if let StoreLocation::Postgres(pg) = &settings.store.location
        && pg.unverified_remote()
    {
        out.push(format!(
            "store.path: the PostgreSQL server at {pg} is not verified (its URL's sslmode): anyone on the path could stand in for the database; use sslmode=verify-full (sslrootcert=/path/ca.pem)"
        ));
    }
    let url = &settings.p0.base_url;
    let loopback = match url.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    if url.scheme() == "http" && !loopback {
        out.push(format!(
            "p0.base_url `{url}` is plaintext http: the P0 API key would cross the network unencrypted"
        ));
    }
    if settings.audit.key.is_none() {
        out.push(
            "audit.key (P0_RELAY_AUDIT_KEY) is not set: the audit trail's seals are plain SHA-256, which anyone who can write to the store can make again; set a key (e.g. `openssl rand -hex 32`) to make an edit provable"
                .into(),
        );
    }
    out
}
