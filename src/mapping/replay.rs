//! Replay protection in a mapping: the dedup key that names a delivery (ordered alternatives,
//! signed content first) and the freshness check on a signed event time. Pure: the clock is a
//! value passed in.

use std::time::{Duration, SystemTime};

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::compile::selectors;
use super::expr::{Input, Selector};
use super::model::{RawDedupAlternative, RawDedupPair, RawFreshness};

/// Longest dedup key stored; longer keys are cut at a character boundary.
const MAX_KEY: usize = 256;

/// One way to name a delivery.
#[derive(Debug)]
pub(super) struct Alternative {
    name: Option<String>,
    parts: Vec<Selector>,
}

/// The compiled `dedup:` section: alternatives tried in order.
#[derive(Debug, Default)]
pub(super) struct Dedup(Vec<Alternative>);

impl Dedup {
    /// Reads `dedup:`: a list of `{name, key}` alternatives, or the older `{key, fallback}`.
    pub(super) fn compile(raw: Option<&Value>) -> Result<Dedup, Vec<String>> {
        let Some(raw) = raw else {
            return Ok(Dedup::default());
        };
        let alternatives: Vec<RawDedupAlternative> = match raw {
            Value::Array(_) => serde_path_to_error::deserialize(raw.clone())
                .map_err(|e| vec![format!("dedup{}: {}", bracket(e.path()), e.inner())])?,
            Value::Object(_) => {
                let pair: RawDedupPair = serde_path_to_error::deserialize(raw.clone())
                    .map_err(|e| vec![format!("dedup.{}: {}", e.path(), e.inner())])?;
                [pair.key, pair.fallback]
                    .into_iter()
                    .filter(|k| !k.is_empty())
                    .map(|key| RawDedupAlternative { name: None, key })
                    .collect()
            }
            _ => {
                return Err(vec![
                    "dedup: a list of alternatives (`- { name: ..., key: [...] }`)".into(),
                ]);
            }
        };
        let mut errors = Vec::new();
        let mut out = Vec::new();
        for (i, alt) in alternatives.into_iter().enumerate() {
            let at = format!("dedup[{i}]");
            if alt.key.is_empty() {
                errors.push(format!("{at}: key: at least one part is needed"));
            }
            if let Some(name) = &alt.name
                && (name.is_empty()
                    || !name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'))
            {
                errors.push(format!(
                    "{at}: name: `{name}` is not letters, digits, - and _"
                ));
            }
            let parts = selectors(&alt.key, &format!("{at}: key"), &mut errors);
            out.push(Alternative {
                name: alt.name,
                parts,
            });
        }
        if errors.is_empty() {
            Ok(Dedup(out))
        } else {
            Err(errors)
        }
    }

    /// Every selector the alternatives read.
    pub(super) fn selectors(&self) -> impl Iterator<Item = &Selector> {
        self.0.iter().flat_map(|a| a.parts.iter())
    }

    /// The delivery's key: the first alternative whose parts all yield a value, its parts
    /// joined with `|` after `name:`; else a digest of the body (the same bytes delivered twice
    /// are the same delivery).
    pub(super) fn key(&self, input: Input<'_>, body: &[u8]) -> String {
        for alt in &self.0 {
            let values: Option<Vec<String>> = alt
                .parts
                .iter()
                .map(|p| p.values(input).into_iter().next().map(|v| v.into_owned()))
                .collect();
            if let Some(values) = values {
                let mut key = match &alt.name {
                    Some(name) => format!("{name}:{}", values.join("|")),
                    None => values.join("|"),
                };
                // A longer key is named by its digest: cutting it could make two deliveries
                // that share a long prefix one.
                if key.len() > MAX_KEY {
                    key = format!("sha256:{}", hex::encode(Sha256::digest(key.as_bytes())));
                }
                return key;
            }
        }
        format!("sha256:{}", hex::encode(Sha256::digest(body)))
    }
}

/// `[0].key` after `dedup`, nothing for the whole value.
fn bracket(path: &serde_path_to_error::Path) -> String {
    match path.to_string() {
        t if t == "." => String::new(),
        t if t.starts_with('[') => t,
        t => format!(".{t}"),
    }
}

/// The compiled `freshness:` section: how old a grant may be, judged on a time the sender
/// cannot choose. Every mapping has one (1 hour unless it says otherwise).
#[derive(Debug)]
pub(super) struct Freshness {
    /// Where the signed body carries the event time; empty: the time of receipt.
    time: Vec<Selector>,
    /// The oldest grant acted on; `None`: the check is off (`max_age: 0`).
    pub(super) max_age: Option<Duration>,
    max_skew: Duration,
}

/// Future event times within this are accepted unless `max_skew` says otherwise.
const DEFAULT_SKEW: Duration = Duration::from_secs(60);
/// How old a grant may be when the mapping does not say.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(3600);

impl Freshness {
    /// Reads `freshness:` (absent: grants judged at receipt, at most an hour old). `signed`
    /// says whether the source's verification covers the body: only then may the event time
    /// be read from it (a token holder writes whatever time it likes).
    pub(super) fn compile(
        raw: Option<&RawFreshness>,
        signed: bool,
    ) -> Result<Freshness, Vec<String>> {
        let Some(raw) = raw else {
            return Ok(Freshness::receipt());
        };
        let mut errors = Vec::new();
        if !raw.time.is_empty() && !signed {
            errors.push(
                "freshness: time: this source's verification signs no body (token, basic or none), so a time in it is the sender's to choose: drop `time` (grants are judged at receipt)"
                    .into(),
            );
        }
        let time = selectors(&raw.time, "freshness: time", &mut errors);
        let mut duration = |field: &str, text: Option<&str>| -> Option<Duration> {
            let text = text.map(str::trim).filter(|t| !t.is_empty())?;
            if text == "0" {
                return Some(Duration::ZERO);
            }
            match humantime::parse_duration(text) {
                Ok(d) => Some(d),
                Err(e) => {
                    errors.push(format!(
                        "freshness: {field}: `{text}` is not a duration like `10m` (or 0 for off): {e}"
                    ));
                    None
                }
            }
        };
        let max_age = duration("max_age", raw.max_age.as_deref()).unwrap_or(DEFAULT_MAX_AGE);
        let max_skew = duration("max_skew", raw.max_skew.as_deref()).unwrap_or(DEFAULT_SKEW);
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Freshness {
            time,
            max_age: (!max_age.is_zero()).then_some(max_age),
            max_skew,
        })
    }

    /// Grants judged at receipt, at most `DEFAULT_MAX_AGE` old: a mapping that says nothing.
    pub(super) fn receipt() -> Freshness {
        Freshness {
            time: Vec::new(),
            max_age: Some(DEFAULT_MAX_AGE),
            max_skew: DEFAULT_SKEW,
        }
    }

    /// Whether grants are judged on a time the body carries (signed), not the receipt.
    pub(super) fn signed(&self) -> bool {
        !self.time.is_empty()
    }

    /// The selectors the event time is read from.
    pub(super) fn selectors(&self) -> impl Iterator<Item = &Selector> {
        self.time.iter()
    }

    /// What the time judged is, in a few words (`check`).
    pub(super) fn judged_on(&self) -> String {
        if self.time.is_empty() {
            "receipt".into()
        } else {
            let wheres: Vec<String> = self.time.iter().map(Selector::describe).collect();
            format!("the signed event time ({})", wheres.join(" or "))
        }
    }

    /// The time an event is judged by: its signed event time, read from the body, or the time
    /// of receipt (`now`) where the body carries none the mapping reads.
    pub(super) fn event_time(
        &self,
        input: Input<'_>,
        now: Option<SystemTime>,
    ) -> Option<SystemTime> {
        if self.time.is_empty() {
            return now;
        }
        self.time
            .iter()
            .find_map(|s| s.values(input).into_iter().next())
            .and_then(|text| parse_rfc3339(&text))
    }

    /// `Err(reason)` when a grant may not act on this event: its time is missing, unreadable,
    /// older than `max_age` or further than `max_skew` in the future, as seen at `now`.
    pub(super) fn check(&self, input: Input<'_>, now: SystemTime) -> Result<(), String> {
        let Some(max_age) = self.max_age else {
            return Ok(());
        };
        if self.time.is_empty() {
            return Ok(());
        }
        let Some((sel, text)) = self.time.iter().find_map(|s| {
            s.values(input)
                .into_iter()
                .next()
                .map(|v| (s.describe(), v.into_owned()))
        }) else {
            let wheres: Vec<String> = self.time.iter().map(Selector::describe).collect();
            return Err(format!(
                "no event time at {}: grants must be under {} old",
                wheres.join(" or "),
                rounded(max_age)
            ));
        };
        let at = parse_rfc3339(&text).ok_or_else(|| {
            format!(
                "event time `{}` at {sel} is not RFC 3339",
                crate::domain::printable(&text)
            )
        })?;
        let shown = crate::domain::printable(&text);
        match now.duration_since(at) {
            Ok(age) if age > max_age => Err(format!(
                "event is {} old ({shown} at {sel}); grants must be under {}",
                rounded(age),
                rounded(max_age)
            )),
            Ok(_) => Ok(()),
            Err(e) if e.duration() > self.max_skew => Err(format!(
                "event time {shown} ({sel}) is {} in the future, more than the {} of clock skew allowed",
                rounded(e.duration()),
                rounded(self.max_skew)
            )),
            Err(_) => Ok(()),
        }
    }
}

fn rounded(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(Duration::from_secs(d.as_secs()))
}

/// An RFC 3339 time: `Z` or a numeric offset, optional fractional seconds.
pub fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let text = text.trim();
    if text.len() < 20 || !text.is_ascii() {
        return None;
    }
    let (local, offset_secs): (&str, i64) = if let Some(l) = text.strip_suffix(['Z', 'z']) {
        (l, 0)
    } else {
        let (l, off) = text.split_at(text.len() - 6);
        let sign = match off.as_bytes()[0] {
            b'+' => 1,
            b'-' => -1,
            _ => return None,
        };
        let (h, m) = off[1..].split_once(':')?;
        if h.len() != 2 || m.len() != 2 {
            return None;
        }
        let (h, m): (i64, i64) = (h.parse().ok()?, m.parse().ok()?);
        if h > 23 || m > 59 {
            return None;
        }
        (l, sign * (h * 3600 + m * 60))
    };
    // humantime reads the local part as UTC (`T` required, at most nanosecond precision).
    if local
        .as_bytes()
        .get(10)
        .is_none_or(|b| !matches!(b, b'T' | b't'))
    {
        return None;
    }
    let utc = humantime::parse_rfc3339_weak(&local.replacen('t', "T", 1)).ok()?;
    let shift = Duration::from_secs(offset_secs.unsigned_abs());
    if offset_secs >= 0 {
        utc.checked_sub(shift)
    } else {
        utc.checked_add(shift)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_with_zones_and_fractions() {
        let base = humantime::parse_rfc3339("2026-11-27T10:15:00Z").unwrap();
        for (text, want) in [
            ("2026-11-27T10:15:00Z", Some(base)),
            ("2026-11-27t10:15:00z", Some(base)),
            (
                "2026-11-27T10:15:00.250Z",
                Some(base + Duration::from_millis(250)),
            ),
            ("2026-11-27T11:15:00+01:00", Some(base)),
            ("2026-11-27T05:45:00-04:30", Some(base)),
            ("2026-11-27 10:15:00Z", None),
            ("2026-11-27T10:15:00", None),
            ("2026-11-27T10:15:00+0100", None),
            ("2026-13-27T10:15:00Z", None),
            ("yesterday", None),
            ("", None),
            ("2026-11-27T10:15:00Zé", None),
        ] {
            assert_eq!(parse_rfc3339(text), want, "{text}");
        }
    }
}
