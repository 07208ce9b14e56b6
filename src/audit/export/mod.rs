//! Export of sealed audit records to a SIEM, at least once and in
//! `chain_seq` order, to each configured sink: syslog (RFC 5424 carrying CEF,
//! over TCP or TLS), a Splunk HTTP Event Collector, and JSON lines on
//! standard output.
//!
//! The audit table is the outbox. Each sink has a cursor row in
//! `audit_export_cursors`; its exporter reads the sealed records past the
//! cursor, sends them, and moves the cursor. A SIEM outage never touches the
//! request path: records wait in the table while the exporter backs off.
//! Receivers drop duplicates by `chain_seq`, which every format carries.

mod exporter;
pub mod format;
mod hec;
mod status;
mod stdout;
mod syslog;

use std::{net::IpAddr, path::PathBuf, time::Duration};

use sqlx::PgPool;
use tokio::{sync::watch, task::JoinHandle};

use crate::config::{ConfigError, Secret, Source, malformed, number, required, value};

pub use exporter::run_sink;
pub use status::{LAG_RECORDS, LAG_SECONDS, SinkStatus, export_status};
pub use syslog::SyslogTls;

/// Every setting of the exporters.
#[derive(Clone, Debug)]
pub struct ExportConfig {
    /// Empty when `PAYMENTS_AUDIT_SINKS` is unset: no exporter runs, and
    /// records still accumulate and are sealed.
    pub sinks: Vec<Sink>,
    pub settings: ExportSettings,
}

/// How every exporter paces itself.
#[derive(Clone, Debug)]
pub struct ExportSettings {
    /// Records read and sent at a time.
    pub batch: i64,
    /// How often an exporter that has caught up looks for new records.
    pub poll: Duration,
    /// First pause after a failure; doubles, with jitter, up to `backoff_max`.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Upper bound on one connect, handshake, write or HTTP request.
    pub timeout: Duration,
}

/// One destination. `name` keys its cursor row and its metrics, so two
/// sinks never share either.
#[derive(Clone, Debug)]
pub struct Sink {
    pub name: String,
    pub target: Target,
}

#[derive(Clone, Debug)]
pub enum Target {
    Stdout,
    Syslog(SyslogTarget),
    Hec(HecTarget),
}

#[derive(Clone, Debug)]
pub struct SyslogTarget {
    pub host: String,
    pub port: u16,
    /// `None` is plain TCP.
    pub tls: Option<SyslogTls>,
    pub rewind: Rewind,
}

/// What a new syslog connection sends again first. TCP syslog has no
/// acknowledgement, so records written into a connection that then broke
/// may never have reached the receiver: a new connection starts from
/// whichever is further back of the last `records` before the cursor and
/// the first record written in the `window` before the failure.
#[derive(Clone, Copy, Debug)]
pub struct Rewind {
    pub records: i64,
    pub window: Duration,
}

#[derive(Clone, Debug)]
pub struct HecTarget {
    pub url: url::Url,
    pub token: Secret,
    /// Extra CA to trust besides the public roots (a private Splunk).
    pub ca: Option<PathBuf>,
}

const SINK_NAMES: [&str; 3] = ["stdout", "syslog", "hec"];

/// Reads the `PAYMENTS_AUDIT_*` settings. Settings of a sink that is not
/// listed in `PAYMENTS_AUDIT_SINKS` are refused rather than ignored.
pub fn from_source(src: &dyn Source) -> Result<ExportConfig, ConfigError> {
    let names = sink_names(src)?;
    let mut sinks = Vec::new();
    for name in &names {
        let target = match name.as_str() {
            "stdout" => Target::Stdout,
            "syslog" => Target::Syslog(syslog_target(src)?),
            _ => Target::Hec(hec_target(src)?),
        };
        sinks.push(Sink {
            name: name.clone(),
            target,
        });
    }
    for (sink, prefix) in [
        ("syslog", "PAYMENTS_AUDIT_SYSLOG_"),
        ("hec", "PAYMENTS_AUDIT_HEC_"),
    ] {
        if !names.iter().any(|n| n == sink) {
            refuse_unused(src, sink, prefix)?;
        }
    }
    Ok(ExportConfig {
        sinks,
        settings: settings(src)?,
    })
}

/// One exporter task per configured sink.
pub fn spawn(
    pool: &PgPool,
    config: &ExportConfig,
    stopping: &watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    config
        .sinks
        .iter()
        .map(|sink| {
            let run = run_sink(
                pool.clone(),
                sink.clone(),
                config.settings.clone(),
                stopping.clone(),
            );
            tokio::spawn(run)
        })
        .collect()
}

fn sink_names(src: &dyn Source) -> Result<Vec<String>, ConfigError> {
    const NAME: &str = "PAYMENTS_AUDIT_SINKS";
    let Some(raw) = value(src, NAME)? else {
        return Ok(Vec::new());
    };
    let mut names: Vec<String> = Vec::new();
    for item in raw.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let item = item.to_ascii_lowercase();
        if !SINK_NAMES.contains(&item.as_str()) {
            let reason = format!("unknown sink {item:?}; the sinks are stdout, syslog and hec");
            return Err(malformed(NAME, reason));
        }
        if names.contains(&item) {
            return Err(malformed(NAME, format!("{item} is listed twice")));
        }
        names.push(item);
    }
    Ok(names)
}

const SYSLOG_SETTINGS: [&str; 8] = [
    "ADDR",
    "TLS",
    "CA",
    "SERVER_NAME",
    "CLIENT_CERT",
    "CLIENT_KEY",
    "REWIND_RECORDS",
    "REWIND_SECS",
];
const HEC_SETTINGS: [&str; 3] = ["URL", "TOKEN", "CA"];

fn refuse_unused(src: &dyn Source, sink: &str, prefix: &str) -> Result<(), ConfigError> {
    let suffixes: &[&str] = if sink == "syslog" {
        &SYSLOG_SETTINGS
    } else {
        &HEC_SETTINGS
    };
    for suffix in suffixes {
        let name = format!("{prefix}{suffix}");
        if value(src, &name)?.is_some() {
            let reason = format!("set, but {sink} is not in PAYMENTS_AUDIT_SINKS");
            return Err(malformed(&name, reason));
        }
    }
    Ok(())
}

fn settings(src: &dyn Source) -> Result<ExportSettings, ConfigError> {
    let batch = number(src, "PAYMENTS_AUDIT_BATCH", 200, 1..=5000)?;
    let poll_ms = number(src, "PAYMENTS_AUDIT_POLL_MS", 1000, 10..=60_000)?;
    let base_ms = number(src, "PAYMENTS_AUDIT_BACKOFF_BASE_MS", 500, 1..=60_000)?;
    let max_ms = number(src, "PAYMENTS_AUDIT_BACKOFF_MAX_MS", 30_000, 1..=600_000)?;
    if max_ms < base_ms {
        let reason = "must be at least PAYMENTS_AUDIT_BACKOFF_BASE_MS";
        return Err(malformed("PAYMENTS_AUDIT_BACKOFF_MAX_MS", reason));
    }
    let timeout_ms = number(src, "PAYMENTS_AUDIT_TIMEOUT_MS", 10_000, 100..=120_000)?;
    Ok(ExportSettings {
        batch: i64::try_from(batch).unwrap_or(200),
        poll: Duration::from_millis(poll_ms),
        backoff_base: Duration::from_millis(base_ms),
        backoff_max: Duration::from_millis(max_ms),
        timeout: Duration::from_millis(timeout_ms),
    })
}

fn syslog_target(src: &dyn Source) -> Result<SyslogTarget, ConfigError> {
    const ADDR: &str = "PAYMENTS_AUDIT_SYSLOG_ADDR";
    let (host, port) = host_port(ADDR, &required(src, ADDR)?)?;
    let tls = match flag(src, "PAYMENTS_AUDIT_SYSLOG_TLS", true)? {
        true => Some(SyslogTls::from_source(src, &host)?),
        false => {
            syslog::refuse_tls_files(src)?;
            None
        }
    };
    let records = number(
        src,
        "PAYMENTS_AUDIT_SYSLOG_REWIND_RECORDS",
        1000,
        0..=1_000_000,
    )?;
    let secs = number(src, "PAYMENTS_AUDIT_SYSLOG_REWIND_SECS", 30, 0..=3600)?;
    Ok(SyslogTarget {
        host,
        port,
        tls,
        rewind: Rewind {
            records: i64::try_from(records).unwrap_or(1000),
            window: Duration::from_secs(secs),
        },
    })
}

/// `host:port`, `[v6]:port`; the host may be a name.
fn host_port(name: &str, raw: &str) -> Result<(String, u16), ConfigError> {
    let bad = || malformed(name, "expected HOST:PORT, such as siem.example:6514");
    let (host, port) = raw.rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port.parse().map_err(|_| bad())?;
    let plausible = host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_'));
    if host.is_empty() || port == 0 || !plausible {
        return Err(bad());
    }
    Ok((host.to_owned(), port))
}

fn flag(src: &dyn Source, name: &str, default: bool) -> Result<bool, ConfigError> {
    match value(src, name)?.map(|v| v.to_ascii_lowercase()).as_deref() {
        None => Ok(default),
        Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(_) => Err(malformed(name, "expected true or false")),
    }
}

fn hec_target(src: &dyn Source) -> Result<HecTarget, ConfigError> {
    const URL: &str = "PAYMENTS_AUDIT_HEC_URL";
    let url = url::Url::parse(&required(src, URL)?).map_err(|e| malformed(URL, e.to_string()))?;
    let loopback = match url.host() {
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => return Err(malformed(URL, "expected an https URL with a host")),
    };
    match url.scheme() {
        "https" => {}
        "http" if loopback => {}
        "http" => {
            return Err(malformed(
                URL,
                "plain http is only allowed to a loopback address",
            ));
        }
        _ => return Err(malformed(URL, "expected an https URL")),
    }
    if !url.username().is_empty() || url.password().is_some() || url.query().is_some() {
        let reason = "credentials belong in PAYMENTS_AUDIT_HEC_TOKEN, not in the URL";
        return Err(malformed(URL, reason));
    }
    let token = Secret::new(required(src, "PAYMENTS_AUDIT_HEC_TOKEN")?);
    let ca = value(src, "PAYMENTS_AUDIT_HEC_CA")?.map(PathBuf::from);
    let target = HecTarget { url, token, ca };
    hec::check(&target)?;
    Ok(target)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn refused(pairs: &[(&str, &str)]) -> String {
        match from_source(&env(pairs)) {
            Ok(_) => panic!("accepted {pairs:?}"),
            Err(err) => err.to_string(),
        }
    }

    #[test]
    fn no_sinks_by_default() {
        let config = from_source(&env(&[])).unwrap();
        assert!(config.sinks.is_empty());
        assert_eq!(config.settings.batch, 200);
        assert_eq!(config.settings.backoff_max, Duration::from_secs(30));
    }

    #[test]
    fn sinks_are_named_from_a_fixed_list_once_each() {
        let error = refused(&[("PAYMENTS_AUDIT_SINKS", "stdout,kafka")]);
        assert!(error.contains("PAYMENTS_AUDIT_SINKS") && error.contains("kafka"));
        let error = refused(&[("PAYMENTS_AUDIT_SINKS", "stdout, stdout")]);
        assert!(error.contains("twice"));
        let config = from_source(&env(&[("PAYMENTS_AUDIT_SINKS", " STDOUT ")])).unwrap();
        assert_eq!(config.sinks[0].name, "stdout");
    }

    #[test]
    fn syslog_needs_an_address_and_a_ca_unless_tls_is_turned_off() {
        let error = refused(&[("PAYMENTS_AUDIT_SINKS", "syslog")]);
        assert!(error.contains("PAYMENTS_AUDIT_SYSLOG_ADDR"));
        let error = refused(&[
            ("PAYMENTS_AUDIT_SINKS", "syslog"),
            ("PAYMENTS_AUDIT_SYSLOG_ADDR", "siem.example:6514"),
        ]);
        assert!(error.contains("PAYMENTS_AUDIT_SYSLOG_CA"), "{error}");
        let config = from_source(&env(&[
            ("PAYMENTS_AUDIT_SINKS", "syslog"),
            ("PAYMENTS_AUDIT_SYSLOG_ADDR", "[::1]:514"),
            ("PAYMENTS_AUDIT_SYSLOG_TLS", "false"),
        ]))
        .unwrap();
        let Target::Syslog(target) = &config.sinks[0].target else {
            panic!("not syslog");
        };
        assert_eq!((target.host.as_str(), target.port), ("::1", 514));
        assert_eq!(target.rewind.records, 1000);
    }

    #[test]
    fn plain_tcp_refuses_tls_files() {
        let error = refused(&[
            ("PAYMENTS_AUDIT_SINKS", "syslog"),
            ("PAYMENTS_AUDIT_SYSLOG_ADDR", "127.0.0.1:514"),
            ("PAYMENTS_AUDIT_SYSLOG_TLS", "false"),
            ("PAYMENTS_AUDIT_SYSLOG_CA", "/etc/ca.pem"),
        ]);
        assert!(error.contains("PAYMENTS_AUDIT_SYSLOG_CA"), "{error}");
    }

    #[test]
    fn settings_of_an_unlisted_sink_are_refused() {
        let error = refused(&[("PAYMENTS_AUDIT_SYSLOG_ADDR", "127.0.0.1:514")]);
        assert!(
            error.contains("syslog is not in PAYMENTS_AUDIT_SINKS"),
            "{error}"
        );
    }

    #[test]
    fn hec_takes_https_or_loopback_http_and_a_token() {
        let hec = |url: &str| {
            from_source(&env(&[
                ("PAYMENTS_AUDIT_SINKS", "hec"),
                ("PAYMENTS_AUDIT_HEC_URL", url),
                ("PAYMENTS_AUDIT_HEC_TOKEN", "0f3a-token"),
            ]))
        };
        assert!(hec("https://splunk.example:8088/services/collector/event").is_ok());
        assert!(hec("http://127.0.0.1:8088/services/collector/event").is_ok());
        let error = hec("http://splunk.example:8088/").unwrap_err().to_string();
        assert!(error.contains("loopback"), "{error}");
        let error = hec("https://splunk.example/?token=x")
            .unwrap_err()
            .to_string();
        assert!(error.contains("PAYMENTS_AUDIT_HEC_TOKEN"), "{error}");
        let error = refused(&[
            ("PAYMENTS_AUDIT_SINKS", "hec"),
            ("PAYMENTS_AUDIT_HEC_URL", "https://splunk.example/"),
        ]);
        assert!(error.contains("PAYMENTS_AUDIT_HEC_TOKEN"));
    }

    #[test]
    fn the_hec_token_never_shows_in_debug_output() {
        let config = from_source(&env(&[
            ("PAYMENTS_AUDIT_SINKS", "hec"),
            ("PAYMENTS_AUDIT_HEC_URL", "https://splunk.example/"),
            ("PAYMENTS_AUDIT_HEC_TOKEN", "very-secret-hec-token"),
        ]))
        .unwrap();
        assert!(!format!("{config:?}").contains("very-secret-hec-token"));
    }
}
