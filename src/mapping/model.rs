//! The mapping file format as written: plain serde types, validated and compiled elsewhere.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMapping {
    /// One scheme (`RawVerify`), or a list of them of which any may verify.
    pub verify: Option<Value>,
    /// A list of `RawDedupAlternative`s, or the older `{key, fallback}` form (`RawDedupPair`);
    /// read by `compile`, which names the field in its errors.
    pub dedup: Option<Value>,
    pub freshness: Option<RawFreshness>,
    /// The P0 org for every rule of this source, unless a rule names its own.
    pub org: Option<String>,
    /// The subject of every rule of this source (what a decision is asked on), unless a rule
    /// names its own.
    pub subject: Option<RawExtract>,
    /// Where every rule of this source answers back, unless a rule names its own.
    pub answer: Option<RawAnswer>,
    /// How many elements the sender left out of a delivery (Alertmanager's and Grafana's
    /// `truncatedAlerts`): counted and logged, since what was cut cannot be acted on.
    pub truncated: Option<RawSelector>,
    #[serde(default)]
    pub rules: Vec<RawRule>,
    #[serde(default)]
    pub tests: Vec<RawCase>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVerify {
    /// `github`, `pagerduty`, `token`, `hmac`, `standard-webhooks`, `basic` or `none`.
    pub scheme: String,
    /// Comma-separated secrets, tokens or passwords, newest first.
    pub secrets: Option<String>,
    /// Must be `true` for `scheme: none`.
    #[serde(default)]
    pub insecure: bool,
    /// `hmac`: the header carrying the signature, or several names tried in order.
    pub header: Option<OneOrMany>,
    /// `hmac`: sha1, sha256 (default) or sha512.
    pub algorithm: Option<String>,
    /// `hmac`: hex (default) or base64.
    pub encoding: Option<String>,
    /// `hmac`: text before each signature, such as `sha256=`.
    pub prefix: Option<String>,
    /// `hmac`: the header holding the signed Unix time; empty for none.
    pub timestamp_header: Option<String>,
    /// `hmac`: the signed message, such as `{timestamp}:{body}` (default `{body}`, or
    /// `{timestamp}:{body}` with a timestamp header).
    pub message: Option<String>,
    /// `hmac` with a timestamp, `standard-webhooks`: how far the signed time may be from now.
    pub tolerance: Option<String>,
    /// `basic`: the user name.
    pub username: Option<String>,
}

/// One value or a list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// One way to name a delivery: the first alternative whose parts are all present is used.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDedupAlternative {
    /// Written before the parts (`comment:...`), so keys of different alternatives never meet.
    pub name: Option<String>,
    pub key: Vec<RawSelector>,
}

/// The older form: `key`, then `fallback` when a part of `key` is missing.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDedupPair {
    pub key: Vec<RawSelector>,
    #[serde(default)]
    pub fallback: Vec<RawSelector>,
}

/// Refuse deliveries whose signed event time is too old (or too far in the future).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFreshness {
    /// Where the signed body carries the event time (RFC 3339): the first selector that
    /// yields a value. Absent: the time of receipt (a source that signs no time, or signs it
    /// in a header its verification already bounds).
    #[serde(default)]
    pub time: Vec<RawSelector>,
    /// The oldest grant acted on, as a duration (`10m`); empty or absent: 1h; `0` turns the
    /// check off (refused for a rule with an on-call check).
    pub max_age: Option<String>,
    /// How far in the future an event time may be (clock skew); default `1m`.
    pub max_skew: Option<String>,
}

/// Where a value comes from: a JSONPath into the body or a header name.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSelector {
    pub path: Option<String>,
    pub header: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCondition {
    pub path: Option<String>,
    pub header: Option<String>,
    pub equals: Option<Value>,
    pub one_of: Option<Vec<Value>>,
    pub matches: Option<String>,
    pub exists: Option<bool>,
    /// As for an extraction: the value is GitHub Markdown, tested as its reader sees it.
    #[serde(default)]
    pub markdown: bool,
    pub not: Option<Box<RawCondition>>,
    /// Holds when any of these holds.
    pub any: Option<Vec<RawCondition>>,
}

/// A rule's `ends_subject` or `reopens_subject`: always, never, or when a condition holds
/// for the event (or the `for_each` element).
#[derive(Debug, Clone, Deserialize)]
#[serde(
    untagged,
    expecting = "`true`, `false`, or a condition (`path` with `equals`, `one_of`, `matches` or `exists`)"
)]
pub enum RawFlag {
    Always(bool),
    When(Box<RawCondition>),
}

impl Default for RawFlag {
    fn default() -> Self {
        RawFlag::Always(false)
    }
}

/// A value to extract: a constant string, or a selector refined by a regex capture, a value
/// map and a default.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawExtract {
    Constant(String),
    Spec(RawExtractSpec),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawExtractSpec {
    pub path: Option<String>,
    pub header: Option<String>,
    /// Text with `{$.json.path}` / `{header:Name}` placeholders, each the first value its
    /// selector yields; `{$.a|$.b}` takes the first alternative that yields one.
    pub template: Option<String>,
    pub regex: Option<String>,
    pub map: Option<BTreeMap<String, String>>,
    pub default: Option<String>,
    /// The value is GitHub Markdown: what its reader cannot see rendered (HTML comments) is
    /// dropped before the regex runs.
    #[serde(default)]
    pub markdown: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawActor {
    pub path: Option<String>,
    pub header: Option<String>,
    /// Comma-separated actors allowed to act; empty means nobody, `*` means anyone.
    pub allow: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub name: String,
    /// Decide once per element of a list (`$.alerts[*]`); `@` paths read the element.
    pub for_each: Option<RawForEach>,
    #[serde(default)]
    pub when: Vec<RawCondition>,
    /// Text holding `/p0 <verb> <id> [<duration>]` lines.
    pub command: Option<RawSelector>,
    pub action: Option<RawExtract>,
    pub request_id: Option<RawExtract>,
    pub expiration: Option<RawExtract>,
    pub default_expiration: Option<String>,
    pub max_expiration: Option<String>,
    pub actor: Option<RawActor>,
    pub actions: Option<Vec<String>>,
    pub org: Option<String>,
    /// What the decisions are asked on (an incident, an alert, `owner/repo#number`).
    pub subject: Option<RawExtract>,
    /// The event ends its subject: every request approved under it is revoked. `true`, or a
    /// condition for a rule whose events (or `for_each` elements) only sometimes end it.
    #[serde(default)]
    pub ends_subject: RawFlag,
    /// The event reopens its subject after an end (a GitHub issue reopened, an alert firing
    /// again): approves under it are taken again. `true`, or a condition.
    #[serde(default)]
    pub reopens_subject: RawFlag,
    /// Where the relay answers once P0 has answered.
    pub answer: Option<RawAnswer>,
    /// An approve is sent only if its actor is on call (checked by the worker, before P0).
    pub oncall: Option<RawOncall>,
    /// For a rule that may approve but whose events name no person (an alert): whether it
    /// grants at all, and whose word that trusts. Without it, a rule that may approve must
    /// name its `actor`.
    pub actorless: Option<RawActorless>,
}

/// A rule that approves with no actor: off unless the operator turns it on.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawActorless {
    /// `on` or `off` (empty is off): the shipped mappings read `ALERTMANAGER_GRANTS` and the
    /// like, so nothing is approved without a person unless the operator says so.
    #[serde(default, deserialize_with = "on_off")]
    pub grants: Option<String>,
    /// Whose word such a grant trusts, in a few words: every start says it when grants are on.
    pub trusts: String,
}

/// A rule's `oncall`: which provider says who is on call, and what to check there.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOncall {
    /// `pagerduty`, `opsgenie`, `jsm` or `github`.
    pub check: String,
    /// `on` or `off` (`true`, `false`; empty is off); absent, on. The shipped mappings take
    /// it from the environment, so each check is off unless configured.
    #[serde(default, deserialize_with = "on_off")]
    pub enabled: Option<String>,
    /// PagerDuty: the incident's escalation policy, when the event carries it.
    pub escalation_policy: Option<RawExtract>,
    /// PagerDuty: the incident, fetched for its escalation policy when the event lacks it.
    pub incident: Option<RawExtract>,
    /// PagerDuty: the escalation policies that count (comma-separated IDs); the incident's
    /// must be one of them. This or `schedules` must pin the check.
    pub escalation_policies: Option<String>,
    /// PagerDuty: the highest escalation level that counts (empty: 1).
    pub max_level: Option<String>,
    /// PagerDuty: only on-calls through these schedules count (comma-separated IDs).
    /// Opsgenie / JSM: the schedules whose on-call participants may approve (required).
    pub schedules: Option<String>,
    /// GitHub: the organization whose teams are asked, pinned by name (a constant, never a
    /// payload path).
    pub org: Option<RawExtract>,
    /// GitHub: where the payload names the repository's owner; a delivery from another owner
    /// than `org` is refused.
    pub owner: Option<RawSelector>,
    /// GitHub: the teams whose active members may approve (comma-separated slugs).
    pub teams: Option<String>,
    /// No longer read: the time judged is the mapping's signed event time
    /// (`freshness.time`), or the time of receipt. Kept to name the field in its error.
    pub at: Option<RawSelector>,
}

/// Where to answer back: a provider's API and, for GitHub, the comment to react to. The
/// issue, incident or alert answered on is the rule's subject.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAnswer {
    /// `github`, `pagerduty`, `opsgenie` or `jsm`; `none` answers nothing.
    pub via: String,
    /// GitHub: the comment the command was written in (a reaction goes on it).
    pub comment: Option<RawExtract>,
    /// Where to answer when that is not the subject: GitHub's `owner/repo#number` by its
    /// current name, when the subject is bound to the repository's ID.
    pub on: Option<RawExtract>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawForEach {
    /// A JSONPath into the body naming the elements.
    pub path: String,
    /// Parts naming an element within its delivery, for deduplication (`@.fingerprint`);
    /// default: a digest of the element.
    #[serde(default)]
    pub key: Vec<RawSelector>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCase {
    pub name: String,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    pub payload: Option<Value>,
    /// A file under `mappings/testdata/`.
    pub payload_file: Option<String>,
    /// The clock for `freshness` (RFC 3339); without it the case does not check freshness.
    pub now: Option<String>,
    /// The dedup key the delivery must get.
    pub dedup: Option<String>,
    pub expect: RawExpect,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawExpect {
    /// `ignored` or `rejected`.
    Word(String),
    Spec(RawExpectSpec),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawExpectSpec {
    pub decisions: Option<Vec<RawExpectDecision>>,
    /// The subject the decisions are bound to (`none` for no subject).
    pub subject: Option<String>,
    /// Whether the event ends its subject (revoking what was approved under it).
    pub ends_subject: Option<bool>,
    /// Every subject the delivery ends, in element order (`for_each` rules end some).
    pub ends_subjects: Option<Vec<String>>,
    /// Whether the event reopens its subject.
    pub reopens_subject: Option<bool>,
    /// A fragment of the on-call check its approves must pass (`explain`'s words), or `none`.
    pub oncall: Option<String>,
    /// A fragment the rejection reason must contain.
    pub rejected: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawExpectDecision {
    pub action: String,
    pub request_id: String,
    pub expiration: Option<String>,
    pub org: Option<String>,
}

/// A switch as text: `on`/`off` written as such, or as YAML's booleans (`on` unquoted is one
/// to some YAML readers).
fn on_off<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(if b { "on" } else { "off" }.to_owned()),
        Some(Value::String(s)) => Some(s),
        Some(other) => {
            return Err(serde::de::Error::custom(format!(
                "`{other}` is not on or off"
            )));
        }
    })
}
