//! Audit records of security decisions, in an append-only table.
//!
//! Records carry ids and names only: never a secret, a card number or a
//! personal detail. Each record also counts in the metrics, so every
//! decision is both reconstructable and countable.

use std::net::IpAddr;

use sqlx::PgExecutor;

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
        }
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

    pub fn source(mut self, source: IpAddr) -> Self {
        self.source = Some(source);
        self
    }
}

/// Writes the record with `executor`: pass the decision's own transaction so
/// the decision and its record commit together.
pub async fn record(executor: impl PgExecutor<'_>, r: &Record<'_>) -> Result<(), sqlx::Error> {
    metrics::count_decision(r.action, r.outcome.as_str());
    if r.severity == Severity::Critical {
        tracing::error!(
            security_event = r.action,
            severity = r.severity.as_str(),
            actor = r.actor,
            reason = r.reason,
            "critical security event"
        );
    }
    sqlx::query(
        "INSERT INTO audit_records (actor, action, resource, outcome, severity, reason, source_addr)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(r.actor)
    .bind(r.action)
    .bind(r.resource)
    .bind(r.outcome.as_str())
    .bind(r.severity.as_str())
    .bind(r.reason)
    .bind(r.source.map(|ip| ip.to_string()))
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
