//! `relay.yaml`: parsed, expanded from the environment, then validated into `Settings` (two
//! phases: raw values as written, then typed values the rest of the relay can trust).

/// The environment a config is read against (re-exported here, where it is read).
pub use crate::env;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::domain::{Expiration, Id};
use crate::env::Env;
use crate::mapping::{Defaults, Enabled};
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
    pub read_timeout: Duration,
    pub max_connections: usize,
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    listen: Option<String>,
    mappings: Option<String>,
    /// Enabled sources: `all` or a comma-separated list.
    sources: Option<String>,
    #[serde(default)]
    store: RawStore,
    p0: RawP0,
    #[serde(default)]
    decisions: RawDecisions,
    #[serde(default)]
    inbound: RawInbound,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    answers: RawAnswers,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAnswers {
    #[serde(default)]
    github: RawProvider,
    #[serde(default)]
    pagerduty: RawProvider,
    #[serde(default)]
    opsgenie: RawProvider,
    #[serde(default)]
    jsm: RawProvider,
    #[serde(default, deserialize_with = "flexible_num")]
    concurrency: Option<u64>,
    #[serde(default, deserialize_with = "flexible_num")]
    rate_per_second: Option<u64>,
    timeout: Option<String>,
    #[serde(default)]
    retry: RawRetry,
    oncall_cache: Option<String>,
    oncall_recheck_after: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    token: Option<String>,
    api_url: Option<String>,
    /// PagerDuty: the email of a PagerDuty user, sent as `From`.
    from: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStore {
    path: Option<String>,
    dedup_window: Option<String>,
    coalesce_window: Option<String>,
    subject_end_window: Option<String>,
    #[serde(default, deserialize_with = "flexible_bool")]
    store_payloads: bool,
    claim_lease: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawP0 {
    base_url: Option<String>,
    org: String,
    token: Option<String>,
    timeout: Option<String>,
    #[serde(default, deserialize_with = "flexible_num")]
    rate_per_second: Option<u64>,
    #[serde(default, deserialize_with = "flexible_num")]
    concurrency: Option<u64>,
    #[serde(default)]
    retry: RawRetry,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    base_delay: Option<String>,
    max_delay: Option<String>,
    max_age: Option<String>,
    #[serde(default, deserialize_with = "flexible_num")]
    max_attempts: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDecisions {
    default_expiration: Option<String>,
    max_expiration: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawInbound {
    #[serde(default, deserialize_with = "flexible_num")]
    rate_per_second: Option<u64>,
    #[serde(default, deserialize_with = "flexible_num")]
    max_body_bytes: Option<u64>,
    #[serde(default, deserialize_with = "flexible_num")]
    max_header_bytes: Option<u64>,
    read_timeout: Option<String>,
    #[serde(default, deserialize_with = "flexible_num")]
    max_connections: Option<u64>,
    #[serde(default, deserialize_with = "flexible_num")]
    max_json_depth: Option<u64>,
    #[serde(default)]
    networks: std::collections::BTreeMap<String, Vec<String>>,
    client_ip_header: Option<String>,
    tls: Option<RawTls>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: String,
    key: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<String>,
}

/// A number written as a number or, after `${VAR}` expansion, as a string of digits.
fn flexible_num<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| serde::de::Error::custom(format!("`{n}` is not a whole number ≥ 0"))),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => s
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| serde::de::Error::custom(format!("`{s}` is not a whole number ≥ 0"))),
        Some(other) => Err(serde::de::Error::custom(format!(
            "`{other}` is not a whole number"
        ))),
    }
}

fn flexible_bool<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    match Value::deserialize(d)? {
        Value::Bool(b) => Ok(b),
        Value::String(s) if s == "true" => Ok(true),
        Value::String(s) if s == "false" || s.is_empty() => Ok(false),
        other => Err(serde::de::Error::custom(format!(
            "`{other}` is not true or false"
        ))),
    }
}

impl Settings {
    /// Reads, expands and validates `file`. Every problem found is returned, each naming the
    /// file and the key.
    pub fn load(file: &Path, env: &Env) -> Result<Settings, Vec<String>> {
        let text = std::fs::read_to_string(file)
            .map_err(|e| vec![format!("{}: cannot read: {e}", file.display())])?;
        Settings::from_text(file, &text, env)
    }

    /// Validates `text` as if read from `file` (relative paths resolve against its folder).
    pub fn from_text(file: &Path, text: &str, env: &Env) -> Result<Settings, Vec<String>> {
        let at = file.display().to_string();
        let mut tree: Value =
            serde_saphyr::from_str(text).map_err(|e| vec![format!("{at}: not valid YAML: {e}")])?;
        env.expand_tree(&mut tree, "")
            .map_err(|e| vec![format!("{at}: {e}")])?;
        let raw: Raw = serde_path_to_error::deserialize(tree)
            .map_err(|e| vec![format!("{at}: {}: {}", e.path(), e.inner())])?;
        let base = file.parent().unwrap_or(Path::new(".")).to_owned();
        let mut errors = Vec::new();
        let settings = build(raw, &base, &mut errors);
        match settings {
            Some(s) if errors.is_empty() => Ok(Settings {
                file: file.to_owned(),
                ..s
            }),
            _ => Err(errors.into_iter().map(|e| format!("{at}: {e}")).collect()),
        }
    }
}

/// The longest duration any setting takes. Times are kept as milliseconds since 1970 in an
/// `i64`; a cap far below its range keeps every sum and difference of them exact.
const MAX_DURATION: Duration = Duration::from_secs(3650 * 24 * 3600);

fn duration(key: &str, value: Option<&str>, default: &str, errors: &mut Vec<String>) -> Duration {
    let text = value.filter(|v| !v.trim().is_empty()).unwrap_or(default);
    match humantime::parse_duration(text.trim()) {
        Ok(d) if d > MAX_DURATION => {
            errors.push(format!("{key}: must be at most 3650d, not `{text}`"));
            Duration::ZERO
        }
        Ok(d) => d,
        Err(e) => {
            errors.push(format!(
                "{key}: `{text}` is not a duration like 500ms, 10s, 5m, 7d: {e}"
            ));
            Duration::ZERO
        }
    }
}

/// The longest access a grant asks for when `decisions.max_expiration` says nothing.
pub const DEFAULT_MAX_EXPIRATION: &str = "12h";

/// The most calls to P0 in flight `p0.concurrency` may ask for.
pub const MAX_CONCURRENCY: usize = 1024;
/// The most open connections `inbound.max_connections` may ask for.
pub const MAX_CONNECTIONS: usize = 1_000_000;

fn addr(key: &str, text: &str, errors: &mut Vec<String>) -> Option<SocketAddr> {
    match text.trim().parse() {
        Ok(a) => Some(a),
        Err(_) => {
            errors.push(format!(
                "{key}: `{text}` is not an address like 0.0.0.0:8080"
            ));
            None
        }
    }
}

fn build(raw: Raw, base: &Path, errors: &mut Vec<String>) -> Option<Settings> {
    let resolve = |p: &str| {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_owned()
        } else {
            base.join(p)
        }
    };
    let listen = addr(
        "listen",
        raw.listen.as_deref().unwrap_or("0.0.0.0:8080"),
        errors,
    );
    let metrics_listen = match raw.metrics.listen.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(a) => addr("metrics.listen", a, errors),
    };
    let base_url_text = raw.p0.base_url.as_deref().unwrap_or("https://api.p0.app");
    let base_url = match reqwest::Url::parse(base_url_text.trim()) {
        Ok(u)
            if matches!(u.scheme(), "http" | "https")
                && !u.cannot_be_a_base()
                && u.query().is_none() =>
        {
            Some(u)
        }
        _ => {
            errors.push(format!(
                "p0.base_url: `{base_url_text}` is not an http(s) URL without a query"
            ));
            None
        }
    };
    if let Err(e) = Id::parse(&raw.p0.org) {
        errors.push(format!(
            "p0.org: {e} (set P0_ORG_ID to the org you use with `p0 login <org>`)"
        ));
    }
    let token = raw
        .p0
        .token
        .filter(|t| !t.trim().is_empty())
        .map(|t| Secret::new(t.trim()));
    let exp = |key: &str, text: Option<&str>, default: &str, errors: &mut Vec<String>| {
        match Expiration::parse(text.unwrap_or(default)) {
            Ok(e) => Some(e),
            Err(e) => {
                errors.push(format!("{key}: {e}"));
                None
            }
        }
    };
    let default_expiration = exp(
        "decisions.default_expiration",
        raw.decisions.default_expiration.as_deref(),
        "1h",
        errors,
    );
    let sources_text = raw
        .sources
        .as_deref()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or(Enabled::DEFAULT);
    let sources = Enabled::parse(sources_text).unwrap_or_else(|e| {
        errors.push(format!("sources: {e}"));
        Enabled::All
    });
    // Capped by default: a label asking for `52w` gets the cap, not a year.
    let max_expiration = exp(
        "decisions.max_expiration",
        raw.decisions
            .max_expiration
            .as_deref()
            .map(str::trim)
            .filter(|t| !t.is_empty()),
        DEFAULT_MAX_EXPIRATION,
        errors,
    );
    let mut networks = std::collections::BTreeMap::new();
    for (source, nets) in raw.inbound.networks {
        let mut parsed = Vec::new();
        for n in nets {
            let net = n
                .parse::<IpNet>()
                .or_else(|_| n.parse::<std::net::IpAddr>().map(IpNet::from));
            match net {
                Ok(net) => parsed.push(net),
                Err(_) => errors.push(format!(
                    "inbound.networks.{source}: `{n}` is not a CIDR like 10.0.0.0/8"
                )),
            }
        }
        networks.insert(source, parsed);
    }
    let client_ip_header = match raw.inbound.client_ip_header.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(h) => match axum::http::HeaderName::from_bytes(h.as_bytes()) {
            Ok(h) => Some(h),
            Err(_) => {
                errors.push(format!(
                    "inbound.client_ip_header: `{h}` is not a header name"
                ));
                None
            }
        },
    };
    let log_json = match raw.log.format.as_deref().unwrap_or("text") {
        "text" | "" => false,
        "json" => true,
        other => {
            errors.push(format!("log.format: `{other}` is not text or json"));
            false
        }
    };
    let location = match StoreLocation::parse(
        "store.path",
        raw.store
            .path
            .as_deref()
            .filter(|p| !p.trim().is_empty())
            .unwrap_or("data/relay.db"),
        base,
    ) {
        Ok(l) => Some(l),
        Err(e) => {
            errors.push(e);
            None
        }
    };
    let claim_lease = duration(
        "store.claim_lease",
        raw.store.claim_lease.as_deref(),
        "30s",
        errors,
    );
    if claim_lease < Duration::from_secs(1) {
        errors.push("store.claim_lease: must be at least 1s".into());
    }
    let positive = |key: &str, v: Option<u64>, default: u64, errors: &mut Vec<String>| {
        let v = v.unwrap_or(default);
        if v == 0 {
            errors.push(format!("{key}: must be at least 1"));
        }
        usize::try_from(v).unwrap_or(usize::MAX)
    };
    // Semaphores hold these as permits: far below what they can count, and what one process
    // can use.
    let at_most = |key: &str, v: usize, max: usize, errors: &mut Vec<String>| {
        if v > max {
            errors.push(format!("{key}: must be at most {max}, not {v}"));
        }
        v.min(max)
    };
    let answers = answer_settings(&raw.answers, errors);
    let settings = Settings {
        file: PathBuf::new(),
        answers,
        listen: listen?,
        metrics_listen,
        mappings_dir: resolve(raw.mappings.as_deref().unwrap_or("mappings")),
        store: StoreSettings {
            location: location?,
            dedup_window: duration(
                "store.dedup_window",
                raw.store.dedup_window.as_deref(),
                "7d",
                errors,
            ),
            coalesce_window: duration(
                "store.coalesce_window",
                raw.store.coalesce_window.as_deref(),
                "10m",
                errors,
            ),
            subject_end_window: duration(
                "store.subject_end_window",
                raw.store.subject_end_window.as_deref(),
                "90d",
                errors,
            ),
            store_payloads: raw.store.store_payloads,
            claim_lease,
        },
        p0: P0Settings {
            base_url: base_url?,
            org: raw.p0.org.clone(),
            token,
            timeout: duration("p0.timeout", raw.p0.timeout.as_deref(), "10s", errors),
            rate_per_second: u32::try_from(raw.p0.rate_per_second.unwrap_or(20))
                .unwrap_or(u32::MAX),
            concurrency: at_most(
                "p0.concurrency",
                positive("p0.concurrency", raw.p0.concurrency, 16, errors),
                MAX_CONCURRENCY,
                errors,
            ),
            retry: RetrySettings {
                base_delay: duration(
                    "p0.retry.base_delay",
                    raw.p0.retry.base_delay.as_deref(),
                    "1s",
                    errors,
                ),
                max_delay: duration(
                    "p0.retry.max_delay",
                    raw.p0.retry.max_delay.as_deref(),
                    "5m",
                    errors,
                ),
                max_age: duration(
                    "p0.retry.max_age",
                    raw.p0.retry.max_age.as_deref(),
                    "48h",
                    errors,
                ),
                max_attempts: u32::try_from(raw.p0.retry.max_attempts.unwrap_or(0))
                    .unwrap_or(u32::MAX),
            },
        },
        defaults: Defaults {
            org: raw.p0.org,
            expiration: default_expiration?,
            max_expiration,
            sources,
        },
        inbound: InboundSettings {
            rate_per_second: u32::try_from(raw.inbound.rate_per_second.unwrap_or(500))
                .unwrap_or(u32::MAX),
            max_body_bytes: positive(
                "inbound.max_body_bytes",
                raw.inbound.max_body_bytes,
                1 << 20,
                errors,
            ),
            max_header_bytes: positive(
                "inbound.max_header_bytes",
                raw.inbound.max_header_bytes,
                16 * 1024,
                errors,
            ),
            read_timeout: duration(
                "inbound.read_timeout",
                raw.inbound.read_timeout.as_deref(),
                "10s",
                errors,
            ),
            max_connections: at_most(
                "inbound.max_connections",
                positive(
                    "inbound.max_connections",
                    raw.inbound.max_connections,
                    1024,
                    errors,
                ),
                MAX_CONNECTIONS,
                errors,
            ),
            max_json_depth: positive(
                "inbound.max_json_depth",
                raw.inbound.max_json_depth,
                64,
                errors,
            ),
            networks,
            client_ip_header,
            tls: raw.inbound.tls.map(|t| TlsSettings {
                cert: resolve(&t.cert),
                key: resolve(&t.key),
            }),
        },
        log_json,
    };
    if settings.inbound.read_timeout.is_zero() {
        errors.push("inbound.read_timeout: must be more than zero".into());
    }
    if settings.p0.timeout.is_zero() {
        errors.push("p0.timeout: must be more than zero".into());
    }
    Some(settings)
}

fn http_url(key: &str, text: &str, errors: &mut Vec<String>) -> Option<reqwest::Url> {
    match reqwest::Url::parse(text.trim()) {
        Ok(u)
            if matches!(u.scheme(), "http" | "https")
                && !u.cannot_be_a_base()
                && u.query().is_none() =>
        {
            Some(u)
        }
        _ => {
            errors.push(format!(
                "{key}: `{text}` is not an http(s) URL without a query"
            ));
            None
        }
    }
}

fn answer_settings(raw: &RawAnswers, errors: &mut Vec<String>) -> AnswerSettings {
    let mut off = Vec::new();
    let mut provider =
        |name: &str, var: &str, default_url: &str, p: &RawProvider, errors: &mut Vec<String>| {
            let token = p.token.as_deref().map(str::trim).unwrap_or("");
            let url = http_url(
                &format!("answers.{name}.api_url"),
                p.api_url
                    .as_deref()
                    .filter(|u| !u.trim().is_empty())
                    .unwrap_or(default_url),
                errors,
            );
            if token.is_empty() {
                off.push(format!(
                    "answers back through {name} are off: answers.{name}.token ({var}) is not set"
                ));
                return None;
            }
            let from = p
                .from
                .as_deref()
                .map(str::trim)
                .filter(|f| !f.is_empty())
                .map(str::to_owned);
            if name == "pagerduty" && from.as_deref().is_none_or(|f| !f.contains('@')) {
                errors.push(
                "answers.pagerduty.from: PagerDuty needs the email of one of its users as `From` \
                 (set PAGERDUTY_FROM) when answers.pagerduty.token is set"
                    .into(),
            );
            }
            Some(ProviderApi {
                url: url?,
                token: Secret::new(token),
                from,
            })
        };
    let github = provider(
        "github",
        "GITHUB_TOKEN",
        "https://api.github.com",
        &raw.github,
        errors,
    );
    let pagerduty = provider(
        "pagerduty",
        "PAGERDUTY_API_TOKEN",
        "https://api.pagerduty.com",
        &raw.pagerduty,
        errors,
    );
    let opsgenie = provider(
        "opsgenie",
        "OPSGENIE_API_KEY",
        "https://api.opsgenie.com",
        &raw.opsgenie,
        errors,
    );
    let jsm = provider(
        "jsm",
        "JSM_API_KEY",
        "https://api.atlassian.com/jsm/ops/integration",
        &raw.jsm,
        errors,
    );
    let concurrency = match raw.answers_concurrency() {
        0 => {
            errors.push("answers.concurrency: must be more than zero".into());
            1
        }
        n => n,
    };
    AnswerSettings {
        github,
        pagerduty,
        opsgenie,
        jsm,
        concurrency,
        rate_per_second: u32::try_from(raw.rate_per_second.unwrap_or(5)).unwrap_or(u32::MAX),
        timeout: duration("answers.timeout", raw.timeout.as_deref(), "10s", errors),
        oncall_cache: duration(
            "answers.oncall_cache",
            raw.oncall_cache.as_deref(),
            "60s",
            errors,
        ),
        oncall_recheck_after: duration(
            "answers.oncall_recheck_after",
            raw.oncall_recheck_after.as_deref(),
            "15m",
            errors,
        ),
        retry: RetrySettings {
            base_delay: duration(
                "answers.retry.base_delay",
                raw.retry.base_delay.as_deref(),
                "1s",
                errors,
            ),
            max_delay: duration(
                "answers.retry.max_delay",
                raw.retry.max_delay.as_deref(),
                "5m",
                errors,
            ),
            max_age: duration(
                "answers.retry.max_age",
                raw.retry.max_age.as_deref(),
                "6h",
                errors,
            ),
            max_attempts: u32::try_from(raw.retry.max_attempts.unwrap_or(0)).unwrap_or(u32::MAX),
        },
        off,
    }
}

impl RawAnswers {
    fn answers_concurrency(&self) -> usize {
        usize::try_from(self.concurrency.unwrap_or(4)).unwrap_or(usize::MAX)
    }
}

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
                    match via {
                        crate::domain::Via::GitHub => "GITHUB_TOKEN",
                        crate::domain::Via::PagerDuty => "PAGERDUTY_API_TOKEN",
                        crate::domain::Via::Opsgenie => "OPSGENIE_API_KEY",
                        crate::domain::Via::Jsm => "JSM_API_KEY",
                    }
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
/// PostgreSQL store whose server is not verified.
pub fn audit(settings: &Settings, mappings: &crate::mapping::MappingSet) -> Vec<String> {
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
    out
}
