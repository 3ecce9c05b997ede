//! A decided delivery stored, and the answer the sender gets: every decision with its job
//! and subject, or `duplicate`, `rejected` (every decision refused as it was stored), or
//! `unavailable` (the store cannot take it now: retry).

use axum::http::StatusCode;

use super::Receiver;
use super::answer::{self, Answer};
use crate::mapping::{Element, Verdict, element_key};
use crate::policy::Decision;
use crate::store::{Accepted, JobRef, NewDelivery, StoreError, now_ms};

/// Stores a decided delivery (one unit, or one per `for_each` element) and answers.
pub(super) async fn store(
    r: &Receiver,
    source: &str,
    delivery: String,
    payload: Option<Vec<u8>>,
    decided: Verdict,
) -> Answer {
    let Verdict::Decided {
        rule,
        actor,
        decisions,
        elements,
        binding,
        refused,
    } = decided
    else {
        return Answer::new(StatusCode::OK, "ignored").delivery(delivery);
    };
    let subject = binding.subject.clone();
    let new = NewDelivery {
        source: source.to_owned(),
        dedup_key: delivery.clone(),
        received_at_ms: now_ms(),
        rule: rule.clone(),
        actor,
        payload,
        decisions,
        binding,
        refused,
    };
    let units = split(new, &elements);
    // Each unit's decisions and subject, for the answer (the units go to the store).
    let stored: Vec<StoredUnit> = units.iter().map(StoredUnit::of).collect();
    match r.store.accept_each(units).await {
        Ok(results) => {
            r.health.set_store_error(None);
            let answer = Answered {
                r,
                source,
                rule,
                delivery,
                subject,
            };
            answer.accepted(stored, results)
        }
        Err(e) => unavailable(r, source, &e),
    }
}

/// The answer when a delivery cannot be recorded: 503, so the sender retries.
pub(super) fn unavailable(r: &Receiver, source: &str, e: &StoreError) -> Answer {
    tracing::error!(source, error = %e, "cannot store a delivery");
    r.health.set_store_error(Some(e.to_string()));
    Answer::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable")
        .reason("the relay cannot store decisions right now; retry later".into())
        .retry_after(5)
}

/// The deliveries to store: the webhook whole, or one per `for_each` element, each under its
/// own dedup key (the delivery's key and the element's), so each is deduplicated on its own.
fn split(new: NewDelivery, elements: &[Element]) -> Vec<NewDelivery> {
    if elements.is_empty() {
        return vec![new];
    }
    let mut rest = new.decisions.into_iter();
    elements
        .iter()
        .map(|e| NewDelivery {
            source: new.source.clone(),
            dedup_key: element_key(&new.dedup_key, &e.key),
            received_at_ms: new.received_at_ms,
            rule: new.rule.clone(),
            actor: e.actor.clone(),
            payload: new.payload.clone(),
            decisions: rest.by_ref().take(e.decisions).collect(),
            binding: e.binding.clone(),
            refused: e.refused.clone(),
        })
        .collect()
}

/// One stored unit's part of the answer: its decisions and the subject they are bound to.
struct StoredUnit {
    decisions: Vec<Decision>,
    subject: Option<String>,
    ends: bool,
}

impl StoredUnit {
    fn of(unit: &NewDelivery) -> StoredUnit {
        StoredUnit {
            decisions: unit.decisions.clone(),
            subject: unit.binding.subject.clone(),
            ends: unit.binding.ends_subject,
        }
    }
}

/// What the answer names besides its decisions.
struct Answered<'a> {
    r: &'a Receiver,
    source: &'a str,
    rule: String,
    delivery: String,
    subject: Option<String>,
}

impl Answered<'_> {
    /// The answer once every unit is stored: `duplicate` when all were seen before;
    /// `rejected` when nothing of the delivery will act (every decision refused, no subject
    /// ended); else `accepted` with every decision and its own subject (a duplicate element's
    /// decisions as `coalesced`: no second call is made for them; a refused one's with why).
    fn accepted(self, stored: Vec<StoredUnit>, results: Vec<Accepted>) -> Answer {
        if results
            .iter()
            .all(|a| matches!(a, Accepted::Duplicate { .. }))
        {
            return Answer {
                job_ids: job_ids(results),
                ..Answer::new(StatusCode::OK, "duplicate")
                    .delivery(self.delivery)
                    .reason("this delivery was accepted before".into())
            };
        }
        self.r.wake.notify_one();
        // One subject for the whole answer only when every unit shares it.
        let one_subject = stored
            .iter()
            .all(|s| s.subject == self.subject)
            .then_some(self.subject.clone())
            .flatten();
        self.count_refused(&results);
        if let Some(reason) = all_refused(&stored, &results) {
            return Answer {
                subject: one_subject,
                job_ids: job_ids(results),
                ..Answer::new(StatusCode::OK, "rejected")
                    .rule(self.rule)
                    .delivery(self.delivery)
                    .reason(reason)
            };
        }
        let ends = stored.iter().any(|s| s.ends);
        let mut parts = Parts::default();
        for (unit, result) in stored.into_iter().zip(results) {
            self.add(&mut parts, unit, result);
        }
        let answer = Answer {
            decisions: parts.decisions,
            subject: one_subject,
            reopened: parts.reopened,
            ..Answer::new(StatusCode::ACCEPTED, "accepted")
                .rule(self.rule)
                .delivery(self.delivery)
        };
        answer.revoked(parts.revoked, ends)
    }

    fn count_refused(&self, results: &[Accepted]) {
        for result in results {
            if let Accepted::New { jobs, .. } = result {
                let n = jobs.iter().filter(|j| j.refused.is_some()).count();
                let refused = self.r.metrics.refused.with_label_values(&[self.source]);
                refused.inc_by(n as u64);
            }
        }
    }

    /// One unit's decisions, revocations and reopening, counted and added to the answer.
    fn add(&self, parts: &mut Parts, unit: StoredUnit, result: Accepted) {
        let metrics = &self.r.metrics;
        let refs = match result {
            Accepted::New {
                jobs: refs,
                bound,
                reopened,
                ..
            } => {
                for (d, job) in unit.decisions.iter().zip(&refs) {
                    if job.refused.is_none() {
                        let action = d.action.as_str();
                        metrics
                            .decisions
                            .with_label_values(&[self.source, action])
                            .inc();
                    }
                }
                let n = bound.len() as u64;
                if n > 0 {
                    let revokes = metrics
                        .decisions
                        .with_label_values(&[self.source, "revoke"]);
                    revokes.inc_by(n);
                    metrics
                        .bound_revocations
                        .with_label_values(&[self.source])
                        .inc_by(n);
                }
                parts
                    .revoked
                    .extend(bound.into_iter().map(|b| answer::Revoked {
                        revocation: b,
                        subject: unit.subject.clone(),
                    }));
                if reopened && let Some(s) = &unit.subject {
                    parts.reopened.push(s.clone());
                }
                refs
            }
            Accepted::Duplicate { job_ids } => job_ids
                .into_iter()
                .map(|job_id| JobRef {
                    job_id,
                    coalesced: true,
                    refused: None,
                })
                .collect(),
        };
        for (decision, job) in unit.decisions.into_iter().zip(refs) {
            parts.decisions.push(answer::DecisionAnswer {
                job_id: job.job_id,
                decision,
                coalesced: job.coalesced,
                subject: unit.subject.clone(),
                refused: job.refused,
            });
        }
    }
}

/// What an `accepted` answer lists.
#[derive(Default)]
struct Parts {
    decisions: Vec<answer::DecisionAnswer>,
    revoked: Vec<answer::Revoked>,
    reopened: Vec<String>,
}

/// Why nothing of the delivery will act, when nothing will: every decision refused as it was
/// stored (its subject had ended, its grant was stale, an end named a request it had not
/// bound) and no subject ended (an end acts, whatever it names).
fn all_refused(stored: &[StoredUnit], results: &[Accepted]) -> Option<String> {
    let refusal = results.iter().find_map(|a| match a {
        Accepted::New { jobs, .. } => jobs.iter().find_map(|j| j.refused.clone()),
        Accepted::Duplicate { .. } => None,
    })?;
    let none_act = !stored.iter().any(|s| s.ends)
        && results.iter().all(|a| match a {
            Accepted::New { jobs, bound, .. } => {
                bound.is_empty() && jobs.iter().all(|j| j.refused.is_some())
            }
            Accepted::Duplicate { .. } => true,
        });
    none_act.then_some(refusal)
}

/// Every job the results name.
fn job_ids(results: Vec<Accepted>) -> Vec<i64> {
    results
        .into_iter()
        .flat_map(|a| match a {
            Accepted::New { jobs, .. } => jobs.into_iter().map(|j| j.job_id).collect(),
            Accepted::Duplicate { job_ids } => job_ids,
        })
        .collect()
}
