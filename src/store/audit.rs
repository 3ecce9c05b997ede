//! The audit trail both stores keep: an event for each step of a decision's life, written in
//! the transaction that makes the step, numbered in commit order without gaps, and sealed so
//! that an edit shows. Here: what an event holds (`AuditEvent`, stored as a `Body`), its
//! digest, the events a stored delivery makes, a seal's arithmetic, and the `Verifier` that
//! `p0-relay audit verify` runs over a store's rows.
//!
//! A row is (id, at, event, body, digest): `body` is the event as one JSON object (its ID and
//! time in it), `digest` is SHA-256 over the ID (8 bytes, big-endian), `at` (the same), the
//! event's name, a zero byte and the body. A seal covers the events after the previous seal's
//! (`covers.from..=covers.to`): its `digest` is SHA-256 (HMAC-SHA256 with
//! `P0_RELAY_AUDIT_KEY`) over the previous seal's digest (32 zero bytes for the first) and
//! each covered event's digest, in ID order. A seal is itself an event: the next seal covers it.

use std::collections::VecDeque;
use std::time::{Duration, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::StoreError;
use super::model::{Accepted, NewDelivery};
use crate::secret::Secret;

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A decision stored (`outcome`: `queued`, or `coalesced` into `job_id`).
    Accepted,
    /// A grant refused, with the reason: when stored (stale, its subject ended, an end naming
    /// what it had not bound), when received (not an approver, no actor, policy), when sent
    /// (not an approver on this relay, not on call).
    Refused,
    /// An approve's on-call check made (`outcome`: `on_call`, `not_on_call`; `detail`: the
    /// evidence).
    Checked,
    /// A call to P0 (`outcome`: `success`, `rejected`, `unauthorized`, `transient`, or
    /// `dry_run` when none was made), with P0's status and text.
    Sent,
    /// A decision given up (`outcome`: the last attempt's; `reason`).
    Dead,
    /// An answer back at the provider finished (`outcome`: `sent`, `refused`, `dead`).
    Answered,
    /// A revoke made by a subject's end.
    Revoked,
    /// A decision queued again by an operator (`operator`: the OS user).
    Replayed,
    /// Events past `audit.retention` removed (`covers`).
    Pruned,
    /// A seal over the events since the previous one (`covers`).
    Seal,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Accepted => "accepted",
            Kind::Refused => "refused",
            Kind::Checked => "checked",
            Kind::Sent => "sent",
            Kind::Dead => "dead",
            Kind::Answered => "answered",
            Kind::Revoked => "revoked",
            Kind::Replayed => "replayed",
            Kind::Pruned => "pruned",
            Kind::Seal => "seal",
        }
    }
}

/// The decision an event is about, as the delivery asked it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct About {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub source: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rule: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub actor: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub action: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub request_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub org: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub subject: Option<String>,
    /// The delivery's dedup key (what the sender's delivery is known by).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub delivery: Option<String>,
}

/// The events a seal or a prune covers: IDs `from..=to`, `count` of them; a seal also names
/// the seal before it and holds its digest (hex), keyed or not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Covers {
    pub from: i64,
    pub to: i64,
    pub count: i64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub previous: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub digest: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub keyed: Option<bool>,
}

/// One step to record; its ID and time are the store's, given as it commits. (Serialized as
/// PostgreSQL's `p0_relay_audit` reads it: the body but its ID and time.)
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AuditEvent {
    pub event: Kind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_id: Option<i64>,
    /// The decision; `None`: read from the stored job `job_id` (and its delivery).
    #[serde(flatten)]
    pub about: Option<About>,
    pub outcome: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub covers: Option<Covers>,
}

impl AuditEvent {
    pub fn new(event: Kind, job_id: Option<i64>, outcome: &str) -> AuditEvent {
        AuditEvent {
            event,
            job_id,
            about: None,
            outcome: outcome.to_owned(),
            reason: None,
            status: None,
            detail: None,
            operator: None,
            covers: None,
        }
    }

    /// The stored job whose fields complete this event, which does not say what it is about;
    /// each store looks them up as it writes the event. `None`: it is written as it is.
    pub fn job_to_look_up(&self) -> Option<i64> {
        self.job_id.filter(|_| self.about.is_none())
    }

    /// As stored: with its ID, its time and what it is about.
    pub fn body(&self, id: i64, at_ms: i64, about: About) -> Body {
        Body {
            id,
            time: time(at_ms),
            event: self.event,
            job_id: self.job_id,
            about,
            outcome: self.outcome.clone(),
            reason: self.reason.clone(),
            status: self.status,
            detail: self.detail.clone(),
            operator: self.operator.clone(),
            covers: self.covers.clone(),
        }
    }
}

/// An event as stored and exported: one JSON object; a field that does not apply to it is
/// left out. README "Audit trail" documents each field.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Flat")]
pub struct Body {
    pub id: i64,
    pub time: String,
    pub event: Kind,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub job_id: Option<i64>,
    #[serde(flatten)]
    pub about: About,
    pub outcome: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub operator: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub covers: Option<Covers>,
}

/// A body as read: every field at one level, so that reading one needs no buffering (as a
/// flattened `About` would).
#[derive(Deserialize)]
struct Flat {
    id: i64,
    time: String,
    event: Kind,
    #[serde(default)]
    job_id: Option<i64>,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    rule: Option<String>,
    #[serde(default)]
    actor: Option<String>,
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    request_id: Option<String>,
    #[serde(default)]
    org: Option<String>,
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    delivery: Option<String>,
    outcome: String,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    status: Option<u16>,
    #[serde(default)]
    detail: Option<String>,
    #[serde(default)]
    operator: Option<String>,
    #[serde(default)]
    covers: Option<Covers>,
}

impl From<Flat> for Body {
    fn from(f: Flat) -> Body {
        Body {
            id: f.id,
            time: f.time,
            event: f.event,
            job_id: f.job_id,
            about: About {
                source: f.source,
                rule: f.rule,
                actor: f.actor,
                action: f.action,
                request_id: f.request_id,
                org: f.org,
                subject: f.subject,
                delivery: f.delivery,
            },
            outcome: f.outcome,
            reason: f.reason,
            status: f.status,
            detail: f.detail,
            operator: f.operator,
            covers: f.covers,
        }
    }
}

impl Body {
    /// The JSON text stored (and sealed).
    pub fn text(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Logs the event as one structured line (`target: audit`), once it is committed.
    pub fn log(&self) {
        let a = &self.about;
        tracing::info!(
            target: "audit",
            id = self.id, time = %self.time, event = self.event.as_str(), job_id = self.job_id,
            source = a.source.as_deref(), rule = a.rule.as_deref(), actor = a.actor.as_deref(),
            action = a.action.as_deref(), request_id = a.request_id.as_deref(),
            org = a.org.as_deref(), subject = a.subject.as_deref(),
            delivery = a.delivery.as_deref(), outcome = %self.outcome,
            reason = self.reason.as_deref(), status = self.status,
            detail = self.detail.as_deref(), operator = self.operator.as_deref(),
            covers = self.covers.as_ref().map(|c| format!("{}..={}", c.from, c.to)),
            digest = self.covers.as_ref().and_then(|c| c.digest.as_deref()),
            "audit event"
        );
    }
}

/// A stored row, as `audit` reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRow {
    pub id: i64,
    pub at_ms: i64,
    pub event: String,
    pub body: String,
    pub digest: Vec<u8>,
}

/// What is done with the events a transaction committed, once it has: by default each is
/// logged (`Body::log`); the relay also counts them.
#[derive(Clone)]
pub struct Sink(std::sync::Arc<Committed>);

/// What a sink does with the bodies of one commit.
type Committed = dyn Fn(&[Body]) + Send + Sync;

impl Sink {
    pub fn new(f: impl Fn(&[Body]) + Send + Sync + 'static) -> Sink {
        Sink(std::sync::Arc::new(f))
    }

    pub fn committed(&self, bodies: &[Body]) {
        if !bodies.is_empty() {
            (self.0)(bodies)
        }
    }
}

impl Default for Sink {
    fn default() -> Sink {
        Sink::new(|bodies| bodies.iter().for_each(Body::log))
    }
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sink")
    }
}

/// The last event and the last seal, for the gauges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditStatus {
    pub last_id: Option<i64>,
    /// When the last seal was written, and the last event it covers.
    pub last_seal: Option<(i64, i64)>,
}

impl AuditStatus {
    /// Events not yet covered by a seal (the last seal is itself one; it is covered by the
    /// next, and counted here neither way).
    pub fn unsealed(&self) -> i64 {
        match (self.last_id, self.last_seal) {
            (None, _) => 0,
            (Some(last), None) => last,
            (Some(last), Some((_, to))) => (last - to - 1).max(0),
        }
    }
}

/// RFC 3339 in UTC to the millisecond, as every event's `time` is written (PostgreSQL's
/// `p0_relay_audit_text` writes the same).
pub fn time(at_ms: i64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(u64::try_from(at_ms).unwrap_or(0));
    humantime::format_rfc3339_millis(at).to_string()
}

/// A row's digest (see the module's documentation).
pub fn digest(id: i64, at_ms: i64, event: &str, body: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(id.to_be_bytes());
    h.update(at_ms.to_be_bytes());
    h.update(event.as_bytes());
    h.update([0]);
    h.update(body.as_bytes());
    h.finalize().into()
}

/// The digest chained from before the first seal.
pub const GENESIS: [u8; 32] = [0; 32];

/// A seal's digest over the previous seal's and the covered events' digests.
pub fn seal_digest<'a>(
    key: Option<&Secret>,
    previous: &[u8; 32],
    digests: impl IntoIterator<Item = &'a [u8; 32]>,
) -> [u8; 32] {
    match key {
        Some(key) => {
            let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key.expose().as_bytes()) else {
                return GENESIS;
            };
            mac.update(previous);
            digests.into_iter().for_each(|d| mac.update(d));
            mac.finalize().into_bytes().into()
        }
        None => {
            let mut h = Sha256::new();
            h.update(previous);
            digests.into_iter().for_each(|d| h.update(d));
            h.finalize().into()
        }
    }
}

/// The tag a `pruned` event carries (hex), when a key is set: HMAC-SHA256 over the seal that
/// stands for the removed events (its digest) and what was removed, so that only a relay
/// holding the key can record a removal `verify` accepts.
pub fn prune_tag(key: &Secret, anchor: &SealRef, from: i64, to: i64, count: i64) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key.expose().as_bytes()) else {
        return String::new();
    };
    mac.update(b"p0-relay pruned\0");
    mac.update(&anchor.digest);
    for n in [anchor.id, from, to, count] {
        mac.update(&n.to_be_bytes());
    }
    hex::encode(mac.finalize().into_bytes())
}

/// The `pruned` event for events `from..=anchor.to` removed (`count` of them) behind `anchor`.
pub fn pruned(key: Option<&Secret>, anchor: &SealRef, from: i64, count: i64) -> AuditEvent {
    let mut e = AuditEvent::new(Kind::Pruned, None, "pruned");
    e.reason = Some("past audit.retention".into());
    e.covers = Some(Covers {
        from,
        to: anchor.to,
        count,
        previous: Some(anchor.id),
        digest: key.map(|k| prune_tag(k, anchor, from, anchor.to, count)),
        keyed: Some(key.is_some()),
    });
    e
}

/// The events storing `d` made, `accepted` (what `Accepted::New` says of each decision, in
/// order) then its end's `revoked`: a duplicate makes none. (PostgreSQL makes the same in
/// `p0_relay_write`; the contract tests hold the two to it.)
pub fn accepted(d: &NewDelivery, accepted: &Accepted) -> Vec<AuditEvent> {
    let Accepted::New { jobs, bound, .. } = accepted else {
        return Vec::new();
    };
    let about = |action: &str, org: &str, request_id: &str| About {
        source: Some(d.source.clone()),
        rule: Some(d.rule.clone()),
        actor: d.actor.clone(),
        action: Some(action.to_owned()),
        request_id: Some(request_id.to_owned()),
        org: Some(org.to_owned()),
        subject: d.binding.subject.clone(),
        delivery: Some(d.dedup_key.clone()),
    };
    let decided = d.decisions.iter().zip(jobs).map(|(decision, job)| {
        let (kind, outcome) = match (&job.refused, job.coalesced) {
            (Some(_), _) => (Kind::Refused, "refused"),
            (None, true) => (Kind::Accepted, "coalesced"),
            (None, false) => (Kind::Accepted, "queued"),
        };
        let mut e = AuditEvent::new(kind, Some(job.job_id), outcome);
        e.about = Some(about(
            decision.action.as_str(),
            decision.org.as_str(),
            decision.request_id.as_str(),
        ));
        e.reason = job.refused.clone();
        e
    });
    let revoked = bound.iter().map(|b| {
        let mut e = AuditEvent::new(Kind::Revoked, Some(b.job_id), "queued");
        e.about = Some(about("revoke", &b.org, &b.request_id));
        e.reason = Some("its subject ended".to_owned());
        e
    });
    decided.chain(revoked).collect()
}

/// The most `refused` events one refused delivery makes (one per request it asked).
const MOST_REFUSED: usize = 16;

/// The `refused` events of a delivery refused as it was received (nothing of it is stored):
/// one per request it asked (at most `MOST_REFUSED`), or one when it asked none it could
/// name. Text from the payload is cut to 256 characters.
pub fn refused_on_receipt(
    d: &Received<'_>,
    reason: &str,
    asked: &[crate::policy::Proposal],
) -> Vec<AuditEvent> {
    let cut = |t: &str| t.chars().take(256).collect::<String>();
    let event = |action: Option<&str>, request_id: Option<&str>| {
        let mut e = AuditEvent::new(Kind::Refused, None, "refused");
        e.about = Some(About {
            source: Some(d.source.to_owned()),
            rule: Some(d.rule.to_owned()),
            actor: d.actor.map(cut),
            action: action.map(cut),
            request_id: request_id.map(cut),
            org: None,
            subject: None,
            delivery: Some(cut(d.delivery)),
        });
        e.reason = Some(reason.to_owned());
        e
    };
    match asked {
        [] => vec![event(None, None)],
        _ => asked
            .iter()
            .take(MOST_REFUSED)
            .map(|p| event(Some(&p.action), Some(&p.request_id)))
            .collect(),
    }
}

/// A delivery as received: its source, the rule that matched, its actor and dedup key.
pub struct Received<'a> {
    pub source: &'a str,
    pub rule: &'a str,
    pub actor: Option<&'a str>,
    pub delivery: &'a str,
}

/// The event of a decision an operator queued again (`jobs replay`).
pub fn replayed(job_id: i64, operator: &str) -> AuditEvent {
    let mut e = AuditEvent::new(Kind::Replayed, Some(job_id), "queued");
    e.operator = Some(operator.to_owned());
    e
}

/// The previous seal, as a store reads it: its ID, the last event it covers, its digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SealRef {
    pub id: i64,
    /// The events it covers, `from..=to`, after the seal `previous`.
    pub from: i64,
    pub to: i64,
    pub previous: Option<i64>,
    pub digest: [u8; 32],
}

impl SealRef {
    /// From a stored seal's body; `None` when it is not one.
    pub fn read(id: i64, body: &str) -> Option<SealRef> {
        let covers = serde_json::from_str::<Body>(body).ok()?.covers?;
        SealRef::of(id, &covers)
    }

    /// The seal `id` that covers `covers`.
    pub fn of(id: i64, covers: &Covers) -> Option<SealRef> {
        Some(SealRef {
            id,
            from: covers.from,
            to: covers.to,
            previous: covers.previous,
            digest: unhex(covers.digest.as_deref()?)?,
        })
    }
}

fn unhex(text: &str) -> Option<[u8; 32]> {
    hex::decode(text).ok()?.try_into().ok()
}

/// The seal over `rows` (ID, event, digest: every row after `previous`'s last, in order), or
/// `None` when they hold no event but seals. An error when a row is missing (removed before
/// it was sealed): sealing over it would hide that.
pub fn seal(
    key: Option<&Secret>,
    previous: Option<SealRef>,
    rows: &[(i64, String, [u8; 32])],
) -> Result<Option<AuditEvent>, String> {
    let from = previous.map_or(1, |p| p.to + 1);
    if !rows
        .iter()
        .any(|(_, event, _)| event != Kind::Seal.as_str())
    {
        return Ok(None);
    }
    for (n, (id, _, _)) in rows.iter().enumerate() {
        let want = from + n as i64;
        if *id != want {
            return Err(format!(
                "audit events {want}..{} are missing: removed before they were sealed; not sealing",
                id - 1
            ));
        }
    }
    let to = from + rows.len() as i64 - 1;
    let prior = previous.map_or(GENESIS, |p| p.digest);
    let digest = seal_digest(key, &prior, rows.iter().map(|(_, _, d)| d));
    let mut e = AuditEvent::new(Kind::Seal, None, "sealed");
    e.covers = Some(Covers {
        from,
        to,
        count: rows.len() as i64,
        previous: previous.map(|p| p.id),
        digest: Some(hex::encode(digest)),
        keyed: Some(key.is_some()),
    });
    Ok(Some(e))
}

/// What `audit verify` found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verification {
    pub events: u64,
    pub seals: u64,
    /// The last event a verified seal covers.
    pub sealed_through: Option<i64>,
    /// Events after it, not sealed yet (seals themselves not counted).
    pub unsealed: u64,
    /// Where verification began: the first event, or a seal standing for what came before
    /// (pruned, or before `--since`).
    pub from: Option<i64>,
    /// The first problem: an event changed, removed or inserted, a seal that does not match.
    pub problem: Option<String>,
}

/// Where a verification starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// At the store's first event: events before it must have been pruned (a `pruned` event
    /// says so) behind a seal that stands for them.
    First,
    /// After this seal (`--since`): it stands for everything before.
    After(SealRef),
}

/// A relay's sealing: it remembers the latest seal it has seen, and seals only while that
/// seal is still stored as it was and every later seal follows from it (by what each covers
/// and the seal it names; their digests are `audit verify`'s to check). Seals removed or
/// changed behind its back (so that the relays would seal a rewritten trail) stop it.
#[derive(Default)]
pub struct Sealer {
    known: Option<SealRef>,
}

/// Why a relay did not seal.
#[derive(Debug)]
pub enum NotSealed {
    /// The store could not be asked or written.
    Store(StoreError),
    /// The trail was changed behind the relays: this relay seals no more until restarted.
    Changed(String),
}

impl std::fmt::Display for NotSealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotSealed::Store(e) => write!(f, "{e}"),
            NotSealed::Changed(why) => write!(
                f,
                "{why}: the trail was changed behind the relays; not sealing until it is looked into (p0-relay audit verify; a restarted relay trusts the store's latest seal)"
            ),
        }
    }
}

impl Sealer {
    /// One seal over the events since the last; `None` when there was nothing to seal.
    pub async fn seal(
        &mut self,
        store: &super::StoreHandle,
        key: Option<&Secret>,
    ) -> Result<Option<(i64, Covers)>, NotSealed> {
        let latest = store
            .seal_before(i64::MAX)
            .await
            .map_err(NotSealed::Store)?;
        if let Some(known) = self.known {
            let still = store
                .seal_before(known.to + 1)
                .await
                .map_err(NotSealed::Store)?;
            if still != Some(known) {
                return Err(NotSealed::Changed(format!(
                    "seal {} (over events up to {}) is no longer in the store as it was written",
                    known.id, known.to
                )));
            }
            // From the latest back to the one known, each seal names the one before it.
            let mut at = latest;
            while let Some(seal) = at.filter(|s| s.id > known.id) {
                let before = store
                    .seal_before(seal.from)
                    .await
                    .map_err(NotSealed::Store)?;
                if before.map(|b| b.id) != seal.previous
                    || before.is_none_or(|b| b.to + 1 != seal.from)
                {
                    return Err(NotSealed::Changed(format!(
                        "seal {} does not follow the seal before it",
                        seal.id
                    )));
                }
                at = before;
            }
            if at != Some(known) {
                return Err(NotSealed::Changed(format!(
                    "the seals after seal {} do not lead back to it",
                    known.id
                )));
            }
        }
        // Over the latest as checked: a seal that came meanwhile is checked at the next turn.
        let sealed = store
            .seal(key.cloned(), latest)
            .await
            .map_err(NotSealed::Store)?;
        self.known = match &sealed {
            Some((id, covers)) => SealRef::of(*id, covers),
            None => latest.or(self.known),
        };
        Ok(sealed)
    }
}

/// Checks a store's rows, fed in ID order: each row's digest, the IDs without gaps, each
/// seal's digest over what it covers. Keeps only the digests not yet covered by a seal.
pub struct Verifier<'k> {
    key: Option<&'k Secret>,
    start: Start,
    first: Option<i64>,
    next: Option<i64>,
    pending: VecDeque<(i64, bool, [u8; 32])>,
    previous: Option<SealRef>,
    /// The seal that stands for events removed before the first one read.
    stands_for: Option<SealRef>,
    /// The last `pruned` event read: its ID and what it covers.
    pruned: Option<(i64, Covers)>,
    found: Verification,
}

impl<'k> Verifier<'k> {
    pub fn new(key: Option<&'k Secret>, start: Start) -> Verifier<'k> {
        Verifier {
            key,
            start,
            first: None,
            next: None,
            pending: VecDeque::new(),
            previous: match start {
                Start::First => None,
                Start::After(seal) => Some(seal),
            },
            stands_for: None,
            pruned: None,
            found: Verification::default(),
        }
    }

    /// Whether a problem was found (the rest need not be read).
    pub fn failed(&self) -> bool {
        self.found.problem.is_some()
    }

    /// Checks the next row.
    pub fn push(&mut self, row: &AuditRow) {
        if let Err(problem) = self.check(row) {
            self.found.problem.get_or_insert(problem);
        }
    }

    fn check(&mut self, row: &AuditRow) -> Result<(), String> {
        let id = row.id;
        match self.next {
            Some(next) if id != next => return Err(removed(next, id - 1)),
            None => {
                self.first = Some(id);
                self.found.from = Some(id);
            }
            _ => {}
        }
        self.next = Some(id + 1);
        self.found.events += 1;
        if body_id(&row.body) != Some(id) {
            return Err(format!(
                "event {id} is not the event written with that ID (its body says {}): an event was inserted or removed before it, or it was renumbered",
                body_id(&row.body).map_or("nothing".into(), |n| n.to_string())
            ));
        }
        let digest = digest(id, row.at_ms, &row.event, &row.body);
        if digest[..] != row.digest[..] {
            return Err(format!(
                "event {id} was changed after it was written: its bytes no longer match its digest"
            ));
        }
        let seal = row.event == Kind::Seal.as_str();
        self.pending.push_back((id, seal, digest));
        let body = match row.event.as_str() {
            "seal" | "pruned" => serde_json::from_str::<Body>(&row.body)
                .map_err(|e| format!("event {id}: its body is not an event: {e}"))?,
            _ => return Ok(()),
        };
        let covers = body
            .covers
            .ok_or_else(|| format!("event {id}: a {} without what it covers", row.event))?;
        if !seal {
            // The one that records the removal of what is missing before the first event.
            if self.first.is_some_and(|first| covers.to == first - 1) {
                self.pruned = Some((id, covers));
            }
            return Ok(());
        }
        self.found.seals += 1;
        self.seal(id, &covers)
    }

    /// A seal read at `id`: the one standing for pruned events, or one to recompute.
    fn seal(&mut self, id: i64, covers: &Covers) -> Result<(), String> {
        let stored = covers
            .digest
            .as_deref()
            .and_then(unhex)
            .ok_or_else(|| format!("seal {id} holds no digest"))?;
        let first = self.first.unwrap_or(id);
        if self.start == Start::First && self.previous.is_none() && first > 1 {
            // Events before the first one here are gone: this seal must stand for them.
            if covers.to != first - 1 {
                return Err(removed(1, first - 1));
            }
            self.previous = SealRef::of(id, covers);
            self.stands_for = self.previous;
            return Ok(());
        }
        if let Start::After(anchor) = self.start
            && anchor.id == id
        {
            return Ok(());
        }
        let from = self.previous.map_or(1, |p| p.to + 1);
        let previous_id = self.previous.map(|p| p.id);
        if covers.from != from || covers.previous != previous_id || covers.to < from {
            return Err(format!(
                "seal {id} does not follow the seal before it ({}): it covers {}..={} after seal {}, where {from}..= after seal {} was due (a seal was removed, inserted or changed)",
                previous_id.map_or("none".into(), |p| p.to_string()),
                covers.from,
                covers.to,
                covers.previous.map_or("none".into(), |p| p.to_string()),
                previous_id.map_or("none".into(), |p| p.to_string()),
            ));
        }
        let keyed = covers.keyed.unwrap_or(false);
        let key = match (keyed, self.key) {
            (true, None) => {
                return Err(format!(
                    "seal {id} is keyed: set P0_RELAY_AUDIT_KEY to verify it"
                ));
            }
            (false, Some(_)) => {
                return Err(format!(
                    "seal {id} is not keyed though a key was given: seals rewritten without the key"
                ));
            }
            (_, key) => key,
        };
        let mut covered = Vec::with_capacity(self.pending.len());
        while let Some(&(n, _, d)) = self.pending.front() {
            if n > covers.to {
                break;
            }
            covered.push(d);
            self.pending.pop_front();
        }
        if covered.len() as i64 != covers.to - covers.from + 1
            || covers.count != covered.len() as i64
        {
            return Err(format!(
                "seal {id} covers {}..={} ({} events), which are not all here",
                covers.from, covers.to, covers.count
            ));
        }
        let prior = self.previous.map_or(GENESIS, |p| p.digest);
        if seal_digest(key, &prior, &covered) != stored {
            return Err(format!(
                "seal {id} does not match events {}..={}: they (or the seal) were rewritten after they were sealed",
                covers.from, covers.to
            ));
        }
        self.previous = SealRef::of(id, covers);
        self.found.sealed_through = Some(covers.to);
        Ok(())
    }

    /// The verdict, once every row was fed.
    pub fn finish(mut self) -> Verification {
        if self.found.problem.is_none()
            && self.start == Start::First
            && let Some(first) = self.first.filter(|f| *f > 1)
        {
            self.found.problem = match (self.stands_for, &self.pruned) {
                (None, _) => Some(removed(1, first - 1)),
                (Some(anchor), Some((id, covers))) if covers.to == first - 1 => {
                    self.pruned_by_a_relay(*id, &anchor, covers).err()
                }
                _ => Some(format!(
                    "events 1..={} were removed, and no `pruned` event records it",
                    first - 1
                )),
            };
        }
        self.found.unsealed = self.pending.iter().filter(|(_, seal, _)| !seal).count() as u64;
        self.found
    }
}

impl Verifier<'_> {
    /// Whether the `pruned` event `id` is one a relay wrote for the removal behind `anchor`:
    /// with a key, its tag proves it (one written with database access alone has none).
    fn pruned_by_a_relay(&self, id: i64, anchor: &SealRef, covers: &Covers) -> Result<(), String> {
        if covers.previous != Some(anchor.id) {
            return Err(format!(
                "pruned event {id} names seal {} where seal {} stands for the events removed",
                covers.previous.map_or("none".into(), |p| p.to_string()),
                anchor.id
            ));
        }
        let Some(key) = self.key else {
            return Ok(());
        };
        let tag = prune_tag(key, anchor, covers.from, covers.to, covers.count);
        match covers.digest.as_deref() {
            Some(found)
                if subtle::ConstantTimeEq::ct_eq(found.as_bytes(), tag.as_bytes()).into() =>
            {
                Ok(())
            }
            _ => Err(format!(
                "pruned event {id} was not written by a relay holding the key: events {}..={} were removed without it",
                covers.from, covers.to
            )),
        }
    }
}

fn removed(from: i64, to: i64) -> String {
    match from == to {
        true => format!("event {from} was removed"),
        false => format!("events {from}..={to} were removed"),
    }
}

/// The ID a stored body opens with (`{"id":N`, as both stores write it; a space after the
/// colon is allowed): read without parsing the rest.
fn body_id(body: &str) -> Option<i64> {
    let rest = body.strip_prefix("{\"id\":")?.trim_start();
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}
