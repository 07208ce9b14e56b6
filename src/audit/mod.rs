//! Audit records of security decisions, in an append-only table.
//!
//! Records carry ids and names only: never a secret, a card number or a
//! personal detail. Each record also counts in the metrics, so every
//! decision is both reconstructable and countable.

pub mod chain;
pub mod cli;
pub mod context;
pub mod export;
pub mod rate_limits;

use std::net::IpAddr;

use sqlx::PgExecutor;

pub use context::RequestContext;

use crate::metrics;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    Refused,
    Done,
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Refused => "refused",
            Self::Done => "done",
            Self::Failed => "failed",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Info,
    Warning,
    /// Needs a human now: a canary key was used, say.
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Warning => "warning",
            Self::Critical => "critical",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Record<'a> {
    pub actor: &'a str,
    /// A dotted verb such as `api_key.refused` or `break_glass.issued`.
    pub action: &'static str,
    pub resource: Option<&'a str>,
    pub outcome: Outcome,
    pub severity: Severity,
    pub reason: Option<&'a str>,
    pub source: Option<IpAddr>,
    pub context: Option<&'a RequestContext>,
}

impl<'a> Record<'a> {
    pub fn new(actor: &'a str, action: &'static str, outcome: Outcome) -> Self {
        Self {
            actor,
            action,
            resource: None,
            outcome,
            severity: Severity::Info,
            reason: None,
            source: None,
            context: None,
        }
    }

    /// The request the decision was made in: its ids, the stated purpose and
    /// consent, and the caller's address.
    /// `None` changes nothing, so callers holding an `Option` need no branch.
    pub fn context(mut self, context: impl Into<Option<&'a RequestContext>>) -> Self {
        if let Some(context) = context.into() {
            self.context = Some(context);
            if self.source.is_none() {
                self.source = context.source;
            }
        }
        self
    }

    pub fn resource(mut self, resource: &'a str) -> Self {
        self.resource = Some(resource);
        self
    }

    pub fn reason(mut self, reason: &'a str) -> Self {
        self.reason = Some(reason);
        self
    }

    pub fn severity(mut self, severity: Severity) -> Self {
        self.severity = severity;
        self
    }

    /// `None` keeps whatever source the record already has.
    pub fn source(mut self, source: impl Into<Option<IpAddr>>) -> Self {
        if let Some(source) = source.into() {
            self.source = Some(source);
        }
        self
    }
}

/// Writes the record with `executor`: pass the decision's own transaction so
/// the decision and its record commit together.
pub async fn record(executor: impl PgExecutor<'_>, r: &Record<'_>) -> Result<(), sqlx::Error> {
    if r.severity == Severity::Critical {
        tracing::error!(
            security_event = r.action,
            severity = r.severity.as_str(),
            actor = r.actor,
            reason = r.reason,
            "critical security event"
        );
    }
    record_many(executor, std::slice::from_ref(r)).await
}

fn from_context(r: &Record<'_>, field: fn(&RequestContext) -> Option<String>) -> Option<String> {
    r.context.and_then(field)
}

/// Writes several records in one statement (a webhook batch's decisions).
pub async fn record_many(
    executor: impl PgExecutor<'_>,
    records: &[Record<'_>],
) -> Result<(), sqlx::Error> {
    if records.is_empty() {
        return Ok(());
    }
    for r in records {
        metrics::count_decision(r.action, r.outcome.as_str());
    }
    let column = |f: fn(&Record<'_>) -> Option<String>| records.iter().map(f).collect::<Vec<_>>();
    sqlx::query(
        "INSERT INTO audit_records
             (actor, action, resource, outcome, severity, reason, source_addr,
              request_id, trace_id, purpose, consent_ref)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                              $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[])",
    )
    .bind(column(|r| Some(r.actor.to_owned())))
    .bind(column(|r| Some(r.action.to_owned())))
    .bind(column(|r| r.resource.map(str::to_owned)))
    .bind(column(|r| Some(r.outcome.as_str().to_owned())))
    .bind(column(|r| Some(r.severity.as_str().to_owned())))
    .bind(column(|r| r.reason.map(str::to_owned)))
    .bind(column(|r| r.source.map(|ip| ip.to_string())))
    .bind(column(|r| from_context(r, |c| Some(c.request_id.clone()))))
    .bind(column(|r| from_context(r, |c| Some(c.trace_id.clone()))))
    .bind(column(|r| from_context(r, |c| c.purpose.clone())))
    .bind(column(|r| from_context(r, |c| c.consent_ref.clone())))
    .execute(executor)
    .await?;
    Ok(())
}

/// For refusals, which stand whether or not they are written down: a failed
/// write is logged with the record's fields and counted, never turned into
/// another answer.
pub async fn record_refusal(executor: impl PgExecutor<'_>, r: &Record<'_>) {
    if let Err(err) = record(executor, r).await {
        metrics::count_decision("audit.write_failed", "failed");
        tracing::error!(error = %err, action = r.action, actor = r.actor, "audit record not written");
    }
}
