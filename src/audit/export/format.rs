//! The wire formats of exported records.
//!
//! - syslog: RFC 5424 with facility authpriv (10), the record's `chain_seq`
//!   and hash in structured data `[audit@32473 seq="…" hash="…"]`, and a CEF
//!   message; framed by octet counting (RFC 6587) for TCP and TLS.
//! - JSON: one ECS document per record, for standard output (one a line) and,
//!   wrapped in the HEC envelope, for Splunk.
//!
//! Every format carries `chain_seq`, so a receiver drops duplicates without
//! parsing the rest. Nothing is dropped from a record: absent fields are left
//! out, control characters are escaped or replaced by spaces.

use std::{net::IpAddr, sync::OnceLock};

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value, json};

/// The columns [`ExportRecord`] is read from.
pub(crate) const COLUMNS: &str = "chain_seq, occurred_at, actor, action, resource, outcome, \
     severity, reason, source_addr, request_id, trace_id, purpose, consent_ref, hash";

/// A sealed audit record, as exported.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct ExportRecord {
    pub chain_seq: i64,
    pub occurred_at: DateTime<Utc>,
    pub actor: String,
    pub action: String,
    pub resource: Option<String>,
    pub outcome: String,
    pub severity: String,
    pub reason: Option<String>,
    pub source_addr: Option<String>,
    pub request_id: Option<String>,
    pub trace_id: Option<String>,
    pub purpose: Option<String>,
    pub consent_ref: Option<String>,
    pub hash: Vec<u8>,
}

/// authpriv: security and authorization messages, which syslog daemons
/// conventionally keep in a file only administrators can read.
const FACILITY_AUTHPRIV: u8 = 10;
/// The example private enterprise number of RFC 5612, for the SD-ID.
const SD_ID: &str = "audit@32473";
const APP_NAME: &str = "payments";
const MSG_ID: &str = "AUDIT";
const ECS_VERSION: &str = "8.11.0";
pub const HEC_SOURCETYPE: &str = "payments:audit";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Level {
    Info,
    Warning,
    Critical,
}

impl Level {
    fn of(record: &ExportRecord) -> Self {
        match record.severity.as_str() {
            "critical" => Self::Critical,
            "warning" => Self::Warning,
            _ => Self::Info,
        }
    }

    /// RFC 5424 severity: informational, warning, critical.
    fn syslog(self) -> u8 {
        match self {
            Self::Info => 6,
            Self::Warning => 4,
            Self::Critical => 2,
        }
    }

    /// CEF and ECS severity, 0 to 10.
    fn score(self) -> u8 {
        match self {
            Self::Info => 3,
            Self::Warning => 6,
            Self::Critical => 10,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Warning => "warning",
            Self::Critical => "critical",
        }
    }
}

/// This host's name for the syslog header and `host.name`: `HOSTNAME` (the
/// pod name under Kubernetes), else the kernel's, else `-`.
pub fn hostname() -> &'static str {
    static NAME: OnceLock<String> = OnceLock::new();
    NAME.get_or_init(|| {
        let raw = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
            .unwrap_or_default();
        let name: String = raw
            .trim()
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(255)
            .collect();
        if name.is_empty() {
            "-".to_owned()
        } else {
            name
        }
    })
}

/// Appends one octet-counted syslog frame: `LEN SP MSG`.
pub fn syslog_frame(record: &ExportRecord, host: &str, out: &mut Vec<u8>) {
    let message = syslog_message(record, host);
    out.extend_from_slice(message.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(message.as_bytes());
}

/// `<PRI>1 TIMESTAMP HOSTNAME payments - AUDIT [audit@32473 …] CEF:0|…`
pub fn syslog_message(record: &ExportRecord, host: &str) -> String {
    let pri = FACILITY_AUTHPRIV * 8 + Level::of(record).syslog();
    format!(
        "<{pri}>1 {} {host} {APP_NAME} - {MSG_ID} [{SD_ID} seq=\"{}\" hash=\"{}\"] {}",
        timestamp(record),
        record.chain_seq,
        sd_param(&hex::encode(&record.hash)),
        cef(record)
    )
}

fn timestamp(record: &ExportRecord) -> String {
    record
        .occurred_at
        .to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// `CEF:0|payments|payments|VERSION|action|name|severity|extension`
pub fn cef(record: &ExportRecord) -> String {
    let header = [
        "payments",
        "payments",
        env!("CARGO_PKG_VERSION"),
        &record.action,
        &human_name(&record.action),
        &Level::of(record).score().to_string(),
    ]
    .map(cef_header)
    .join("|");
    let extension = cef_extension(record)
        .iter()
        .map(|(key, value)| format!("{key}={}", cef_value(value)))
        .collect::<Vec<_>>()
        .join(" ");
    format!("CEF:0|{header}|{extension}")
}

fn cef_extension(record: &ExportRecord) -> Vec<(&'static str, String)> {
    let mut fields = vec![
        ("rt", record.occurred_at.timestamp_millis().to_string()),
        ("act", record.action.clone()),
        ("outcome", record.outcome.clone()),
        ("suser", record.actor.clone()),
    ];
    match record.source_addr.as_deref().map(source) {
        Some(Source::V4(ip)) => fields.push(("src", ip)),
        Some(Source::V6(ip)) => {
            fields.push(("c6a2Label", "Source IPv6 Address".to_owned()));
            fields.push(("c6a2", ip));
        }
        Some(Source::Other(text)) => fields.push(("shost", text)),
        None => {}
    }
    fields.push(("externalId", record.chain_seq.to_string()));
    let custom = [
        ("cs1", "requestId", &record.request_id),
        ("cs2", "traceId", &record.trace_id),
        ("cs3", "purpose", &record.purpose),
        ("cs4", "consentRef", &record.consent_ref),
        ("cs5", "resource", &record.resource),
    ];
    for (key, label, value) in custom {
        if let Some(value) = value {
            fields.push((label_key(key), label.to_owned()));
            fields.push((key, value.clone()));
        }
    }
    fields.push(("cs6Label", "chainHash".to_owned()));
    fields.push(("cs6", hex::encode(&record.hash)));
    if let Some(reason) = &record.reason {
        fields.push(("reason", reason.clone()));
    }
    fields
}

fn label_key(key: &str) -> &'static str {
    match key {
        "cs1" => "cs1Label",
        "cs2" => "cs2Label",
        "cs3" => "cs3Label",
        "cs4" => "cs4Label",
        _ => "cs5Label",
    }
}

enum Source {
    V4(String),
    V6(String),
    Other(String),
}

/// CEF's `src` holds IPv4 only; IPv6 goes in `c6a2`.
fn source(raw: &str) -> Source {
    match raw.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => Source::V4(ip.to_string()),
        Ok(IpAddr::V6(ip)) => match ip.to_ipv4_mapped() {
            Some(v4) => Source::V4(v4.to_string()),
            None => Source::V6(ip.to_string()),
        },
        Err(_) => Source::Other(raw.to_owned()),
    }
}

/// `admin_access.refused` → `Admin access refused`.
fn human_name(action: &str) -> String {
    let words = action.replace(['.', '_'], " ");
    let mut chars = words.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// CEF header fields: `\` and `|` escaped; no line breaks allowed.
fn cef_header(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '|' => out.push_str("\\|"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// CEF extension values: `\` and `=` escaped, line breaks as `\n` and `\r`.
fn cef_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '=' => out.push_str("\\="),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// RFC 5424 PARAM-VALUE: `"`, `\` and `]` escaped.
fn sd_param(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The record as an ECS document.
pub fn ecs(record: &ExportRecord, host: &str) -> Value {
    let level = Level::of(record);
    let mut event = json!({
        "kind": "event",
        "category": [category(&record.action)],
        "type": [event_type(&record.action, &record.outcome)],
        "action": record.action,
        "outcome": ecs_outcome(&record.outcome),
        "severity": level.score(),
        "sequence": record.chain_seq,
        "hash": hex::encode(&record.hash),
        "dataset": "payments.audit",
        "provider": "payments",
    });
    insert(&mut event, "reason", &record.reason);
    let mut labels = Map::new();
    labels.insert("outcome".into(), record.outcome.clone().into());
    for (key, value) in [
        ("purpose", &record.purpose),
        ("consent_ref", &record.consent_ref),
        ("resource", &record.resource),
    ] {
        if let Some(value) = value {
            labels.insert(key.into(), value.clone().into());
        }
    }
    let mut doc = json!({
        "@timestamp": timestamp(record),
        "ecs": {"version": ECS_VERSION},
        "event": event,
        "log": {"level": level.name()},
        "user": {"name": record.actor},
        "labels": labels,
        "service": {"name": "payments", "version": env!("CARGO_PKG_VERSION")},
        "host": {"name": host},
    });
    if let Some(raw) = &record.source_addr {
        let key = if raw.parse::<IpAddr>().is_ok() {
            "ip"
        } else {
            "address"
        };
        doc["source"] = json!({ key: raw });
    }
    if let Some(trace) = &record.trace_id {
        doc["trace"] = json!({"id": trace});
    }
    if let Some(request) = &record.request_id {
        doc["http"] = json!({"request": {"id": request}});
    }
    doc
}

fn insert(object: &mut Value, key: &str, value: &Option<String>) {
    if let (Some(map), Some(value)) = (object.as_object_mut(), value) {
        map.insert(key.to_owned(), value.clone().into());
    }
}

/// The Splunk HEC envelope around the ECS document.
pub fn hec_event(record: &ExportRecord, host: &str) -> Value {
    let millis = record.occurred_at.timestamp_millis();
    json!({
        "time": millis as f64 / 1000.0,
        "host": host,
        "source": "payments",
        "sourcetype": HEC_SOURCETYPE,
        "event": ecs(record, host),
    })
}

fn ecs_outcome(outcome: &str) -> &'static str {
    match outcome {
        "allowed" | "done" => "success",
        "refused" | "failed" => "failure",
        _ => "unknown",
    }
}

/// ECS `event.category`, from the object the action names.
fn category(action: &str) -> &'static str {
    let (object, verb) = action.split_once('.').unwrap_or((action, ""));
    match (object, verb) {
        (_, "refused") if object == "public_api" || object.ends_with("_access") => "authentication",
        ("api_key", "canary_used") | ("break_glass", "used") | ("browser_token", _) => {
            "authentication"
        }
        ("api_key" | "admin_token" | "operator_token" | "break_glass" | "client", _) => "iam",
        ("webhook_source" | "cors_origin" | "rate_limit", _) => "network",
        ("keys" | "kek" | "config", _) => "configuration",
        _ => "api",
    }
}

/// ECS `event.type`, from the outcome and, for completed actions, the verb.
fn event_type(action: &str, outcome: &str) -> &'static str {
    let verb = action.rsplit('.').next().unwrap_or_default();
    match outcome {
        "allowed" => "allowed",
        "refused" => "denied",
        "failed" => "error",
        _ if verb.ends_with("created") || verb == "issued" => "creation",
        _ if matches!(verb, "revoked" | "discarded" | "deleted") => "deletion",
        _ => "change",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> ExportRecord {
        ExportRecord {
            chain_seq: 42,
            occurred_at: "2026-12-04T17:25:00.123456Z".parse().unwrap(),
            actor: "operator:ana".into(),
            action: "admin_access.refused".into(),
            resource: Some("dead_letter:7".into()),
            outcome: "refused".into(),
            severity: "warning".into(),
            reason: Some("token a=b | c\\d\nnext".into()),
            source_addr: Some("203.0.113.9".into()),
            request_id: Some("req-1".into()),
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
            purpose: Some("support".into()),
            consent_ref: Some("consent-9".into()),
            hash: vec![0xab; 32],
        }
    }

    #[test]
    fn syslog_messages_are_rfc5424_with_the_sequence_in_structured_data() {
        let message = syslog_message(&record(), "pod-1");
        let hash = "ab".repeat(32);
        let head = format!(
            "<84>1 2026-12-04T17:25:00.123456Z pod-1 payments - AUDIT \
             [audit@32473 seq=\"42\" hash=\"{hash}\"] CEF:0|payments|payments|"
        );
        assert!(message.starts_with(&head), "{message}");
        assert!(!message.contains('\n'));
    }

    #[test]
    fn frames_are_octet_counted() {
        let mut out = Vec::new();
        syslog_frame(&record(), "pod-1", &mut out);
        let text = String::from_utf8(out).unwrap();
        let (length, message) = text.split_once(' ').unwrap();
        assert_eq!(length.parse::<usize>().unwrap(), message.len());
    }

    #[test]
    fn cef_carries_every_field_escaped() {
        let cef = cef(&record());
        let version = env!("CARGO_PKG_VERSION");
        assert!(cef.starts_with(&format!(
            "CEF:0|payments|payments|{version}|admin_access.refused|Admin access refused|6|"
        )));
        for part in [
            "rt=1796405100123",
            "act=admin_access.refused",
            "outcome=refused",
            "suser=operator:ana",
            "src=203.0.113.9",
            "externalId=42",
            "cs1Label=requestId cs1=req-1",
            "cs2Label=traceId cs2=4bf92f3577b34da6a3ce929d0e0e4736",
            "cs3Label=purpose cs3=support",
            "cs4Label=consentRef cs4=consent-9",
            "cs5Label=resource cs5=dead_letter:7",
            "reason=token a\\=b | c\\\\d\\nnext",
        ] {
            assert!(cef.contains(part), "{part} missing from {cef}");
        }
    }

    #[test]
    fn cef_header_fields_escape_pipes_and_ipv6_sources_use_c6a2() {
        let mut r = record();
        r.action = "odd|action".into();
        r.source_addr = Some("2001:db8::1".into());
        let cef = cef(&r);
        assert!(cef.contains("|odd\\|action|Odd\\|action|6|"), "{cef}");
        assert!(cef.contains("c6a2Label=Source IPv6 Address c6a2=2001:db8::1"));
        assert!(!cef.contains("src="));
    }

    #[test]
    fn absent_fields_are_left_out() {
        let mut r = record();
        r.reason = None;
        r.source_addr = None;
        r.purpose = None;
        let cef = cef(&r);
        assert!(!cef.contains("reason=") && !cef.contains("src=") && !cef.contains("cs3"));
        let doc = ecs(&r, "h");
        assert!(doc.get("source").is_none());
        assert!(doc["event"].get("reason").is_none());
        assert!(doc["labels"].get("purpose").is_none());
    }

    #[test]
    fn structured_data_values_are_escaped() {
        assert_eq!(sd_param(r#"a"b\c]d"#), r#"a\"b\\c\]d"#);
    }

    #[test]
    fn json_lines_use_ecs_field_names() {
        let doc = ecs(&record(), "pod-1");
        let line = serde_json::to_string(&doc).unwrap();
        assert!(!line.contains('\n'));
        assert_eq!(doc["@timestamp"], "2026-12-04T17:25:00.123456Z");
        assert_eq!(doc["ecs"]["version"], ECS_VERSION);
        assert_eq!(doc["event"]["kind"], "event");
        assert_eq!(doc["event"]["category"], json!(["authentication"]));
        assert_eq!(doc["event"]["type"], json!(["denied"]));
        assert_eq!(doc["event"]["action"], "admin_access.refused");
        assert_eq!(doc["event"]["outcome"], "failure");
        assert_eq!(doc["event"]["severity"], 6);
        assert_eq!(doc["event"]["sequence"], 42);
        assert_eq!(doc["event"]["reason"], "token a=b | c\\d\nnext");
        assert_eq!(doc["event"]["hash"], "ab".repeat(32));
        assert_eq!(doc["log"]["level"], "warning");
        assert_eq!(doc["user"]["name"], "operator:ana");
        assert_eq!(doc["source"]["ip"], "203.0.113.9");
        assert_eq!(doc["trace"]["id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(doc["http"]["request"]["id"], "req-1");
        assert_eq!(doc["labels"]["purpose"], "support");
        assert_eq!(doc["labels"]["consent_ref"], "consent-9");
        assert_eq!(doc["labels"]["resource"], "dead_letter:7");
        assert_eq!(doc["labels"]["outcome"], "refused");
        assert_eq!(doc["host"]["name"], "pod-1");
    }

    #[test]
    fn hec_wraps_the_ecs_document() {
        let event = hec_event(&record(), "pod-1");
        assert_eq!(event["time"], json!(1796405100.123));
        assert_eq!(event["sourcetype"], "payments:audit");
        assert_eq!(event["event"]["event"]["sequence"], 42);
    }

    #[test]
    fn categories_and_types_follow_the_action() {
        assert_eq!(category("api_key.created"), "iam");
        assert_eq!(event_type("api_key.created", "done"), "creation");
        assert_eq!(category("api_key.canary_used"), "authentication");
        assert_eq!(category("webhook_source.refused"), "network");
        assert_eq!(category("checkout.created"), "api");
        assert_eq!(event_type("break_glass.revoked", "done"), "deletion");
        assert_eq!(event_type("webhook.accepted", "allowed"), "allowed");
        assert_eq!(event_type("event.processed", "done"), "change");
        assert_eq!(ecs_outcome("done"), "success");
        assert_eq!(ecs_outcome("failed"), "failure");
    }

    #[test]
    fn severities_map_to_syslog_and_cef() {
        let mut r = record();
        r.severity = "critical".into();
        assert!(syslog_message(&r, "h").starts_with("<82>1 "));
        assert!(cef(&r).contains("|Admin access refused|10|"));
        r.severity = "info".into();
        assert!(syslog_message(&r, "h").starts_with("<86>1 "));
    }
}
