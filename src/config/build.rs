//! From `relay.yaml` as written (`raw`) to `Settings` the relay can trust, one section at a
//! time; every problem is kept (naming its key) rather than stopping at the first.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

use super::raw::{Raw, RawAnswers, RawAudit, RawInbound, RawP0, RawProvider, RawRetry, RawStore};
use super::{
    AnswerSettings, AuditSettings, DEFAULT_BODY_BUDGET, DEFAULT_MAX_EXPIRATION, InboundSettings,
    MAX_CONCURRENCY, MAX_CONNECTIONS, P0Settings, ProviderApi, RetrySettings, Settings,
    StoreSettings, TlsSettings,
};
use crate::domain::{Expiration, Id, Via};
use crate::mapping::{Defaults, Enabled};
use crate::secret::Secret;
use crate::store::StoreLocation;

/// The longest duration any setting takes. Times are kept as milliseconds since 1970 in an
/// `i64`; a cap far below its range keeps every sum and difference of them exact.
const MAX_DURATION: Duration = Duration::from_secs(3650 * 24 * 3600);

/// Reads settings, keeping every problem; relative paths resolve against `base`.
pub(super) struct Reader<'a> {
    base: &'a Path,
    pub errors: Vec<String>,
}

impl<'a> Reader<'a> {
    pub fn new(base: &'a Path) -> Self {
        Reader {
            base,
            errors: Vec::new(),
        }
    }

    /// Every section; `None` when one could not be read at all (its problems are kept).
    pub fn settings(&mut self, raw: Raw) -> Option<Settings> {
        let listen = self.addr("listen", raw.listen.as_deref().unwrap_or("0.0.0.0:8080"));
        let metrics_listen = match raw.metrics.listen.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(a) => self.addr("metrics.listen", a),
        };
        let log_json = match raw.log.format.as_deref().unwrap_or("text") {
            "text" | "" => false,
            "json" => true,
            other => {
                self.errors
                    .push(format!("log.format: `{other}` is not text or json"));
                false
            }
        };
        let answers = self.answers(&raw.answers);
        let defaults = self.defaults(&raw);
        let p0 = self.p0(&raw.p0);
        let store = self.store(&raw.store);
        let inbound = self.inbound(raw.inbound);
        let audit = self.audit(&raw.audit);
        Some(Settings {
            file: PathBuf::new(),
            answers,
            listen: listen?,
            metrics_listen,
            mappings_dir: self.path(raw.mappings.as_deref().unwrap_or("mappings")),
            store: store?,
            p0: p0?,
            defaults: defaults?,
            inbound,
            log_json,
            audit,
        })
    }

    /// `audit:`: how long events are kept, how often they are sealed, and the seals' key.
    pub fn audit(&mut self, raw: &RawAudit) -> AuditSettings {
        let retention = self.duration("audit.retention", raw.retention.as_deref(), "400d");
        if retention < Duration::from_secs(86_400) {
            self.errors
                .push("audit.retention: must be at least 1d".into());
        }
        let seal_interval =
            self.duration("audit.seal_interval", raw.seal_interval.as_deref(), "1m");
        if seal_interval < Duration::from_millis(100) || seal_interval > Duration::from_secs(86_400)
        {
            self.errors
                .push("audit.seal_interval: must be between 100ms and 1d".into());
        }
        let key = raw.key.as_deref().map(str::trim).filter(|k| !k.is_empty());
        if key.is_some_and(|k| k.len() < 16) {
            self.errors.push(
                "audit.key (P0_RELAY_AUDIT_KEY): must be at least 16 characters (e.g. `openssl rand -hex 32`)"
                    .into(),
            );
        }
        AuditSettings {
            retention,
            seal_interval,
            key: key.map(Secret::new),
        }
    }

    /// `p0:`: where P0 is, the org and token, pacing, concurrency and retries.
    fn p0(&mut self, raw: &RawP0) -> Option<P0Settings> {
        let base_url = self.url(
            "p0.base_url",
            raw.base_url.as_deref().unwrap_or("https://api.p0.app"),
        );
        if let Err(e) = Id::parse(&raw.org) {
            self.errors.push(format!(
                "p0.org: {e} (set P0_ORG_ID to the org you use with `p0 login <org>`)"
            ));
        }
        let concurrency = self.positive("p0.concurrency", raw.concurrency, 16);
        let timeout = self.duration("p0.timeout", raw.timeout.as_deref(), "10s");
        if timeout.is_zero() {
            self.errors
                .push("p0.timeout: must be more than zero".into());
        }
        Some(P0Settings {
            base_url: base_url?,
            org: raw.org.clone(),
            token: raw
                .token
                .as_deref()
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .filter(|t| self.sendable("p0.token", t))
                .map(Secret::new),
            timeout,
            rate_per_second: rate(raw.rate_per_second, 20),
            concurrency: self.at_most("p0.concurrency", concurrency, MAX_CONCURRENCY),
            retry: self.retry("p0.retry", &raw.retry, "48h"),
        })
    }

    /// `decisions:` and `sources:`: what a decision gets when its mapping says nothing.
    fn defaults(&mut self, raw: &Raw) -> Option<Defaults> {
        let default_expiration = self.expiration(
            "decisions.default_expiration",
            raw.decisions.default_expiration.as_deref(),
            "1h",
        );
        // Capped by default: a label asking for `52w` gets the cap, not a year.
        let max = raw.decisions.max_expiration.as_deref().map(str::trim);
        let max_expiration = self.expiration(
            "decisions.max_expiration",
            max.filter(|t| !t.is_empty()),
            DEFAULT_MAX_EXPIRATION,
        );
        let sources_text = raw
            .sources
            .as_deref()
            .filter(|s| !s.trim().is_empty())
            .unwrap_or(Enabled::DEFAULT);
        let sources = Enabled::parse(sources_text).unwrap_or_else(|e| {
            self.errors.push(format!("sources: {e}"));
            Enabled::All
        });
        Some(Defaults {
            org: raw.p0.org.clone(),
            expiration: default_expiration?,
            max_expiration,
            sources,
        })
    }

    /// `store:`: where decisions are kept, and for how long what counts as the same.
    pub fn store(&mut self, raw: &RawStore) -> Option<StoreSettings> {
        let path = raw.path.as_deref().filter(|p| !p.trim().is_empty());
        let location =
            StoreLocation::parse("store.path", path.unwrap_or("data/relay.db"), self.base)
                .map_err(|e| self.errors.push(e))
                .ok();
        let claim_lease = self.duration("store.claim_lease", raw.claim_lease.as_deref(), "30s");
        if claim_lease < Duration::from_secs(1) {
            self.errors
                .push("store.claim_lease: must be at least 1s".into());
        }
        Some(StoreSettings {
            location: location?,
            dedup_window: self.duration("store.dedup_window", raw.dedup_window.as_deref(), "7d"),
            coalesce_window: self.duration(
                "store.coalesce_window",
                raw.coalesce_window.as_deref(),
                "10m",
            ),
            subject_end_window: self.duration(
                "store.subject_end_window",
                raw.subject_end_window.as_deref(),
                "90d",
            ),
            store_payloads: raw.store_payloads,
            claim_lease,
        })
    }

    /// `inbound:`: what the webhook port takes, from whom, and how fast.
    fn inbound(&mut self, mut raw: RawInbound) -> InboundSettings {
        let mut networks = std::collections::BTreeMap::new();
        for (source, nets) in std::mem::take(&mut raw.networks) {
            let parsed = nets
                .iter()
                .filter_map(|n| self.network(&source, n))
                .collect();
            networks.insert(source, parsed);
        }
        let client_ip_header = match raw.client_ip_header.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(h) => axum::http::HeaderName::from_bytes(h.as_bytes())
                .map_err(|_| {
                    self.errors.push(format!(
                        "inbound.client_ip_header: `{h}` is not a header name"
                    ))
                })
                .ok(),
        };
        let read_timeout =
            self.duration("inbound.read_timeout", raw.read_timeout.as_deref(), "10s");
        if read_timeout.is_zero() {
            self.errors
                .push("inbound.read_timeout: must be more than zero".into());
        }
        let max_connections = self.positive("inbound.max_connections", raw.max_connections, 1024);
        let max_body_bytes = self.positive("inbound.max_body_bytes", raw.max_body_bytes, 1 << 20);
        let slow = self.slow_senders(
            raw.idle_timeout.as_deref(),
            raw.body_timeout.as_deref(),
            raw.body_min_rate,
            read_timeout,
        );
        let (per_address, budget) = self.shares(&raw, max_connections, max_body_bytes);
        InboundSettings {
            rate_per_second: rate(raw.rate_per_second, 500),
            max_body_bytes,
            max_connections_per_address: per_address.min(max_connections),
            idle_timeout: slow.0,
            body_timeout: slow.1,
            body_min_rate: slow.2,
            body_budget_bytes: budget,
            max_header_bytes: self.positive(
                "inbound.max_header_bytes",
                raw.max_header_bytes,
                16 * 1024,
            ),
            read_timeout,
            max_connections: self.at_most(
                "inbound.max_connections",
                max_connections,
                MAX_CONNECTIONS,
            ),
            max_json_depth: self.positive("inbound.max_json_depth", raw.max_json_depth, 64),
            networks,
            client_ip_header,
            tls: raw.tls.map(|t| TlsSettings {
                cert: self.path(&t.cert),
                key: self.path(&t.key),
            }),
        }
    }

    /// `inbound.max_connections_per_address` and `body_budget_bytes`: what one sender may
    /// hold of the connection places, and what all bodies not yet verified may hold.
    fn shares(
        &mut self,
        raw: &RawInbound,
        max_connections: usize,
        max_body_bytes: usize,
    ) -> (usize, usize) {
        let per_address = self.positive(
            "inbound.max_connections_per_address",
            raw.max_connections_per_address,
            (max_connections as u64 / 4).max(1),
        );
        if per_address > max_connections {
            self.errors.push(format!(
                "inbound.max_connections_per_address: must be at most inbound.max_connections ({max_connections}), not {per_address}"
            ));
        }
        let budget = self.positive(
            "inbound.body_budget_bytes",
            raw.body_budget_bytes,
            DEFAULT_BODY_BUDGET,
        );
        if budget < max_body_bytes {
            self.errors.push(format!(
                "inbound.body_budget_bytes: must be at least inbound.max_body_bytes ({max_body_bytes}), not {budget}"
            ));
        }
        (per_address, budget)
    }

    /// `inbound.idle_timeout`, `body_timeout` and `body_min_rate`: how long a sender may take.
    fn slow_senders(
        &mut self,
        idle: Option<&str>,
        body: Option<&str>,
        rate: Option<u64>,
        read_timeout: Duration,
    ) -> (Duration, Duration, usize) {
        let idle = self.duration("inbound.idle_timeout", idle, "5s");
        let body = self.duration("inbound.body_timeout", body, "2s");
        for (key, d) in [
            ("inbound.idle_timeout", idle),
            ("inbound.body_timeout", body),
        ] {
            if d.is_zero() {
                self.errors.push(format!("{key}: must be more than zero"));
            }
        }
        let rate = self.positive("inbound.body_min_rate", rate, 16 * 1024);
        (idle.min(read_timeout), body.min(read_timeout), rate)
    }

    fn network(&mut self, source: &str, n: &str) -> Option<IpNet> {
        let net = n
            .parse::<IpNet>()
            .or_else(|_| n.parse::<std::net::IpAddr>().map(IpNet::from));
        net.map_err(|_| {
            self.errors.push(format!(
                "inbound.networks.{source}: `{n}` is not a CIDR like 10.0.0.0/8"
            ))
        })
        .ok()
    }

    /// `answers:`: a provider's API for each whose token is set, and how answers are paced
    /// and retried.
    fn answers(&mut self, raw: &RawAnswers) -> AnswerSettings {
        let mut off = Vec::new();
        let mut provider = |via: Via, default_url: &str, p: &RawProvider| {
            self.provider(via, default_url, p, &mut off)
        };
        let github = provider(Via::GitHub, "https://api.github.com", &raw.github);
        let pagerduty = provider(Via::PagerDuty, "https://api.pagerduty.com", &raw.pagerduty);
        let opsgenie = provider(Via::Opsgenie, "https://api.opsgenie.com", &raw.opsgenie);
        let jsm_url = "https://api.atlassian.com/jsm/ops/integration";
        let jsm = provider(Via::Jsm, jsm_url, &raw.jsm);
        let concurrency = usize::try_from(raw.concurrency.unwrap_or(4)).unwrap_or(usize::MAX);
        if concurrency == 0 {
            self.errors
                .push("answers.concurrency: must be more than zero".into());
        }
        AnswerSettings {
            github,
            pagerduty,
            opsgenie,
            jsm,
            concurrency: concurrency.max(1),
            rate_per_second: rate(raw.rate_per_second, 5),
            timeout: self.duration("answers.timeout", raw.timeout.as_deref(), "10s"),
            oncall_cache: self.duration("answers.oncall_cache", raw.oncall_cache.as_deref(), "60s"),
            oncall_recheck_after: self.duration(
                "answers.oncall_recheck_after",
                raw.oncall_recheck_after.as_deref(),
                "15m",
            ),
            retry: self.retry("answers.retry", &raw.retry, "6h"),
            off,
        }
    }

    /// One provider's API, `None` (and a line in `off`) when its token is not set.
    fn provider(
        &mut self,
        via: Via,
        default_url: &str,
        p: &RawProvider,
        off: &mut Vec<String>,
    ) -> Option<ProviderApi> {
        let name = via.as_str();
        let token = p.token.as_deref().map(str::trim).unwrap_or("");
        let url_text = p.api_url.as_deref().filter(|u| !u.trim().is_empty());
        let url = self.url(
            &format!("answers.{name}.api_url"),
            url_text.unwrap_or(default_url),
        );
        if token.is_empty() {
            off.push(format!(
                "answers back through {name} are off: answers.{name}.token ({}) is not set",
                via.token_var()
            ));
            return None;
        }
        let from = p
            .from
            .as_deref()
            .map(str::trim)
            .filter(|f| !f.is_empty())
            .map(str::to_owned);
        if via == Via::PagerDuty && from.as_deref().is_none_or(|f| !f.contains('@')) {
            self.errors.push(
                "answers.pagerduty.from: PagerDuty needs the email of one of its users as `From` \
                 (set PAGERDUTY_FROM) when answers.pagerduty.token is set"
                    .into(),
            );
        }
        if !self.sendable(&format!("answers.{name}.token"), token)
            | !from
                .as_deref()
                .is_none_or(|f| self.sendable("answers.pagerduty.from", f))
        {
            return None;
        }
        Some(ProviderApi {
            url: url?,
            token: Secret::new(token),
            from,
        })
    }

    /// Whether `value` can be sent in an HTTP header (visible ASCII, spaces and tabs); an
    /// error naming `field` when it cannot, which never shows the value (it may be a token).
    fn sendable(&mut self, field: &str, value: &str) -> bool {
        let ok = value
            .bytes()
            .all(|b| b == b'\t' || (b' '..=b'~').contains(&b));
        if !ok {
            self.errors.push(format!(
                "{field}: holds a character an HTTP header cannot carry (a line break, a \
                 control or non-ASCII character)"
            ));
        }
        ok
    }

    /// `{prefix}.base_delay`, `max_delay`, `max_age` (by default `max_age`), `max_attempts`.
    fn retry(&mut self, prefix: &str, raw: &RawRetry, max_age: &str) -> RetrySettings {
        let mut d = |key: &str, value: &Option<String>, default: &str| {
            self.duration(&format!("{prefix}.{key}"), value.as_deref(), default)
        };
        RetrySettings {
            base_delay: d("base_delay", &raw.base_delay, "1s"),
            max_delay: d("max_delay", &raw.max_delay, "5m"),
            max_age: d("max_age", &raw.max_age, max_age),
            max_attempts: u32::try_from(raw.max_attempts.unwrap_or(0)).unwrap_or(u32::MAX),
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.base.join(p)
        }
    }

    fn duration(&mut self, key: &str, value: Option<&str>, default: &str) -> Duration {
        let text = value.filter(|v| !v.trim().is_empty()).unwrap_or(default);
        match humantime::parse_duration(text.trim()) {
            Ok(d) if d > MAX_DURATION => {
                self.errors
                    .push(format!("{key}: must be at most 3650d, not `{text}`"));
                Duration::ZERO
            }
            Ok(d) => d,
            Err(e) => {
                self.errors.push(format!(
                    "{key}: `{text}` is not a duration like 500ms, 10s, 5m, 7d: {e}"
                ));
                Duration::ZERO
            }
        }
    }

    fn expiration(&mut self, key: &str, text: Option<&str>, default: &str) -> Option<Expiration> {
        Expiration::parse(text.unwrap_or(default))
            .map_err(|e| self.errors.push(format!("{key}: {e}")))
            .ok()
    }

    fn positive(&mut self, key: &str, v: Option<u64>, default: u64) -> usize {
        let v = v.unwrap_or(default);
        if v == 0 {
            self.errors.push(format!("{key}: must be at least 1"));
        }
        usize::try_from(v).unwrap_or(usize::MAX)
    }

    /// Semaphores hold these as permits: far below what they can count, and what one
    /// process can use.
    fn at_most(&mut self, key: &str, v: usize, max: usize) -> usize {
        if v > max {
            self.errors
                .push(format!("{key}: must be at most {max}, not {v}"));
        }
        v.min(max)
    }

    fn addr(&mut self, key: &str, text: &str) -> Option<SocketAddr> {
        text.trim()
            .parse()
            .map_err(|_| {
                self.errors.push(format!(
                    "{key}: `{text}` is not an address like 0.0.0.0:8080"
                ))
            })
            .ok()
    }

    fn url(&mut self, key: &str, text: &str) -> Option<reqwest::Url> {
        match reqwest::Url::parse(text.trim()) {
            Ok(u)
                if matches!(u.scheme(), "http" | "https")
                    && !u.cannot_be_a_base()
                    && u.query().is_none() =>
            {
                Some(u)
            }
            _ => {
                self.errors.push(format!(
                    "{key}: `{text}` is not an http(s) URL without a query"
                ));
                None
            }
        }
    }
}

/// Calls per second (0: unpaced).
fn rate(v: Option<u64>, default: u64) -> u32 {
    u32::try_from(v.unwrap_or(default)).unwrap_or(u32::MAX)
}
