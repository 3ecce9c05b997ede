//! `relay.yaml` as written, after `${VAR}` expansion: every key optional where a default
//! exists, numbers and booleans accepted as strings (what an expanded variable gives), and
//! unknown keys refused.

use serde::{Deserialize, Deserializer};
use serde_json::Value;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Raw {
    pub listen: Option<String>,
    pub mappings: Option<String>,
    /// Enabled sources: `all` or a comma-separated list.
    pub sources: Option<String>,
    #[serde(default)]
    pub store: RawStore,
    pub p0: RawP0,
    #[serde(default)]
    pub decisions: RawDecisions,
    #[serde(default)]
    pub inbound: RawInbound,
    #[serde(default)]
    pub metrics: RawMetrics,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub answers: RawAnswers,
    #[serde(default)]
    pub audit: RawAudit,
}

/// `audit:`; an unset `seal_interval` or `key` is read from `P0_RELAY_AUDIT_SEAL_INTERVAL`
/// and `P0_RELAY_AUDIT_KEY` (`Settings::from_text`).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAudit {
    pub retention: Option<String>,
    pub seal_interval: Option<String>,
    pub key: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAnswers {
    #[serde(default)]
    pub github: RawProvider,
    #[serde(default)]
    pub pagerduty: RawProvider,
    #[serde(default)]
    pub opsgenie: RawProvider,
    #[serde(default)]
    pub jsm: RawProvider,
    #[serde(default, deserialize_with = "flexible_num")]
    pub concurrency: Option<u64>,
    #[serde(default, deserialize_with = "flexible_num")]
    pub rate_per_second: Option<u64>,
    pub timeout: Option<String>,
    #[serde(default)]
    pub retry: RawRetry,
    pub oncall_cache: Option<String>,
    pub oncall_recheck_after: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProvider {
    pub token: Option<String>,
    pub api_url: Option<String>,
    /// PagerDuty: the email of a PagerDuty user, sent as `From`.
    pub from: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStore {
    pub path: Option<String>,
    pub dedup_window: Option<String>,
    pub coalesce_window: Option<String>,
    pub subject_end_window: Option<String>,
    #[serde(default, deserialize_with = "flexible_bool")]
    pub store_payloads: bool,
    pub claim_lease: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawP0 {
    pub base_url: Option<String>,
    pub org: String,
    pub token: Option<String>,
    pub timeout: Option<String>,
    #[serde(default, deserialize_with = "flexible_num")]
    pub rate_per_second: Option<u64>,
    #[serde(default, deserialize_with = "flexible_num")]
    pub concurrency: Option<u64>,
    #[serde(default)]
    pub retry: RawRetry,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRetry {
    pub base_delay: Option<String>,
    pub max_delay: Option<String>,
    pub max_age: Option<String>,
    #[serde(default, deserialize_with = "flexible_num")]
    pub max_attempts: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDecisions {
    pub default_expiration: Option<String>,
    pub max_expiration: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawInbound {
    #[serde(default, deserialize_with = "flexible_num")]
    pub rate_per_second: Option<u64>,
    #[serde(default, deserialize_with = "flexible_num")]
    pub max_body_bytes: Option<u64>,
    #[serde(default, deserialize_with = "flexible_num")]
    pub max_header_bytes: Option<u64>,
    pub read_timeout: Option<String>,
    #[serde(default, deserialize_with = "flexible_num")]
    pub max_connections: Option<u64>,
    #[serde(default, deserialize_with = "flexible_num")]
    pub max_connections_per_address: Option<u64>,
    pub idle_timeout: Option<String>,
    pub body_timeout: Option<String>,
    #[serde(default, deserialize_with = "flexible_num")]
    pub body_min_rate: Option<u64>,
    #[serde(default, deserialize_with = "flexible_num")]
    pub body_budget_bytes: Option<u64>,
    #[serde(default, deserialize_with = "flexible_num")]
    pub max_json_depth: Option<u64>,
    #[serde(default)]
    pub networks: std::collections::BTreeMap<String, Vec<String>>,
    pub client_ip_header: Option<String>,
    pub tls: Option<RawTls>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub cert: String,
    pub key: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    pub listen: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub format: Option<String>,
}

/// A number written as a number or, after `${VAR}` expansion, as a string of digits.
pub(super) fn flexible_num<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
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

pub(super) fn flexible_bool<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    match Value::deserialize(d)? {
        Value::Bool(b) => Ok(b),
        Value::String(s) if s == "true" => Ok(true),
        Value::String(s) if s == "false" || s.is_empty() => Ok(false),
        other => Err(serde::de::Error::custom(format!(
            "`{other}` is not true or false"
        ))),
    }
}
