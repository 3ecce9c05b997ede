//! The answers the receiver gives senders: a status and a small JSON body saying what
//! happened, plus the outcome label it counts under.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::policy::Decision;
use crate::store::BoundRevocation;

#[serde_with::skip_serializing_none]
#[derive(Debug, Serialize)]
pub struct DecisionAnswer {
    pub job_id: i64,
    #[serde(flatten)]
    pub decision: Decision,
    pub coalesced: bool,
    /// The subject this decision is bound to (each alert of a group has its own).
    pub subject: Option<String>,
    /// Why the store refused it (its subject had ended): it is answered back, never sent.
    pub refused: Option<String>,
}

/// A revocation a subject's end made, and that subject.
#[serde_with::skip_serializing_none]
#[derive(Debug, Serialize)]
pub struct Revoked {
    #[serde(flatten)]
    pub revocation: BoundRevocation,
    pub subject: Option<String>,
}

#[serde_with::skip_serializing_none]
#[derive(Debug, Serialize)]
pub struct Answer {
    #[serde(skip)]
    pub status: StatusCode,
    #[serde(skip)]
    pub(crate) outcome: Option<&'static str>,
    #[serde(skip)]
    pub(crate) retry_after: Option<u64>,
    #[serde(rename = "status")]
    pub word: &'static str,
    pub reason: Option<String>,
    pub rule: Option<String>,
    pub delivery: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub decisions: Vec<DecisionAnswer>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub job_ids: Vec<i64>,
    /// What the decisions were asked on, when they share one subject.
    pub subject: Option<String>,
    /// The revocations the end of the subject made (`ends_subject` rules).
    pub revoked: Option<Vec<Revoked>>,
    /// The subjects this delivery reopened after their end (`reopens_subject` rules).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reopened: Vec<String>,
}

/// Setters of optional fields: `answer.reason(r)` sets `reason` to `Some(r)`.
macro_rules! optional {
    ($($(#[$doc:meta])* $field:ident: $t:ty,)*) => {
        $(
            $(#[$doc])*
            pub fn $field(mut self, value: $t) -> Answer {
                self.$field = Some(value);
                self
            }
        )*
    };
}

impl Answer {
    pub fn new(status: StatusCode, word: &'static str) -> Answer {
        Answer {
            status,
            outcome: None,
            retry_after: None,
            word,
            reason: None,
            rule: None,
            delivery: None,
            decisions: Vec::new(),
            job_ids: Vec::new(),
            subject: None,
            revoked: None,
            reopened: Vec::new(),
        }
    }

    optional! {
        reason: String,
        rule: String,
        delivery: String,
        retry_after: u64,
        /// Counts the answer under `outcome` rather than its status word.
        outcome: &'static str,
    }

    /// The revocations a subject end made; an empty list is shown only when a subject ended
    /// with nothing to revoke and nothing else was decided.
    pub fn revoked(mut self, bound: Vec<Revoked>, ended: bool) -> Answer {
        if !bound.is_empty() || (ended && self.decisions.is_empty()) {
            self.revoked = Some(bound);
        }
        self
    }

    /// The `webhooks_total` outcome label.
    pub fn outcome_label(&self) -> &'static str {
        self.outcome.unwrap_or(self.word)
    }

    /// Every job ID the answer names, for the log line.
    pub fn job_ids_all(&self) -> Vec<i64> {
        let bound = self.revoked.iter().flatten().map(|b| b.revocation.job_id);
        if self.decisions.is_empty() {
            self.job_ids.iter().copied().chain(bound).collect()
        } else {
            self.decisions
                .iter()
                .map(|d| d.job_id)
                .chain(bound)
                .collect()
        }
    }
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        let status = self.status;
        let retry_after = self.retry_after;
        let mut response = (status, Json(&self)).into_response();
        if let Some(secs) = retry_after
            && let Ok(v) = HeaderValue::from_str(&secs.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        response
    }
}
