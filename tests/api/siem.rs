//! SIEM export: a real rsyslog (Debian's, started here on a loopback port
//! with a generated config) over TCP and over TLS with a client certificate;
//! a receiver killed mid-stream; a Splunk HEC stand-in that is busy at
//! first; and the service's own wiring, from a refused request to the
//! receiver's file.
//!
//! rsyslog must be installed: `scripts/ensure-rsyslog` does it.

use std::{
    collections::{BTreeSet, HashMap},
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, StatusCode, header::AUTHORIZATION},
    routing::post,
};
use payments::{
    audit::{
        chain,
        export::{
            self, ExportSettings, LAG_RECORDS, LAG_SECONDS, Sink, Target, format::ExportRecord,
        },
    },
    metrics,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use serde_json::Value;
use sqlx::{Connection, Executor, PgConnection, PgPool};
use tokio::{sync::watch, task::JoinHandle};

use crate::helpers::TestApp;

/// Records of every kind of content: IPv4 and IPv6 sources, and a reason
/// with each character the formats must escape.
const INSERT_RECORDS: &str = r#"
    INSERT INTO audit_records (actor, action, resource, outcome, severity, reason,
                               source_addr, request_id, trace_id, purpose, consent_ref)
    SELECT 'client:shop-' || i,
           (ARRAY['webhook.accepted', 'checkout.created', 'admin_access.refused'])[1 + i % 3],
           'checkout_session:cs_test_' || i,
           (ARRAY['allowed', 'done', 'refused', 'failed'])[1 + i % 4],
           (ARRAY['info', 'warning', 'critical'])[1 + i % 3],
           'reason ' || i || E' a=b | c\\d "q" ]\nsecond line',
           CASE WHEN i % 2 = 0 THEN '192.0.2.' || (i % 250) ELSE '2001:db8::' || to_hex(i) END,
           'req-' || i, md5(i::text), 'purpose-' || i, 'consent-' || i
    FROM generate_series($1::int, $2::int) AS i"#;

const RECORD_COLUMNS: &str = "chain_seq, occurred_at, actor, action, resource, outcome, \
     severity, reason, source_addr, request_id, trace_id, purpose, consent_ref, hash";

#[tokio::test]
async fn records_reach_rsyslog_over_tcp_complete_in_order_and_once_with_two_exporters() {
    let db = database().await;
    add_records(&db, 1, 200).await;
    seal_all(&db).await;
    let rsyslog = Rsyslog::start(None).await;
    let sink = syslog_sink("syslog-tcp", &rsyslog, None);

    // Two replicas: the advisory lock lets one of them export.
    let first = Exporter::spawn(&db, sink.clone(), 64);
    let second = Exporter::spawn(&db, sink, 64);
    let received = rsyslog.wait_for("200 records", |r| r.len() >= 200).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let received_after = rsyslog.received();
    first.stop().await;
    second.stop().await;

    assert_eq!(received_after.len(), received.len(), "a record came twice");
    let seqs: Vec<i64> = received.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
    assert_complete(&db, &received).await;
}

#[tokio::test]
async fn records_reach_rsyslog_over_tls_with_a_client_certificate() {
    let db = database().await;
    add_records(&db, 1, 200).await;
    seal_all(&db).await;
    let rsyslog = Rsyslog::start(Some(Pki::new())).await;
    let sink = syslog_sink("syslog-tls", &rsyslog, Some(("localhost", true)));

    let exporter = Exporter::spawn(&db, sink, 50);
    let received = rsyslog.wait_for("200 records", |r| r.len() >= 200).await;
    exporter.stop().await;

    let seqs: Vec<i64> = received.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
    assert_complete(&db, &received).await;
}

#[tokio::test]
async fn the_exporter_does_not_talk_to_a_receiver_whose_certificate_it_cannot_verify() {
    let db = database().await;
    add_records(&db, 1, 5).await;
    seal_all(&db).await;
    let rsyslog = Rsyslog::start(Some(Pki::new())).await;
    // The receiver's certificate names 127.0.0.1 and localhost, not this.
    let sink = syslog_sink("syslog-wrong-name", &rsyslog, Some(("siem.example", true)));
    let name = sink.name.clone();

    let exporter = Exporter::spawn(&db, sink, 50);
    let error = wait_for_error(&db, &name).await;
    exporter.stop().await;

    assert!(error.contains("TLS handshake"), "{error}");
    assert!(rsyslog.received().is_empty());
}

#[tokio::test]
async fn every_record_arrives_after_the_receiver_is_killed_mid_stream_and_lag_shows_the_outage() {
    let db = database().await;
    let mut rsyslog = Rsyslog::start(None).await;
    let mut sink = syslog_sink("syslog-outage", &rsyslog, None);
    // Fewer records than the kill loses: the time window must cover them.
    if let Target::Syslog(target) = &mut sink.target {
        target.rewind.records = 100;
    }
    let name = sink.name.clone();
    let exporter = Exporter::spawn(&db, sink, 50);
    let producer = tokio::spawn(produce(db.clone(), 2000, 50));

    // Frozen, rsyslog reads nothing: the exporter's next writes succeed
    // into the socket buffers and the cursor moves past them. SIGKILL then
    // loses all of that, as a crashed receiver loses what it had not yet
    // processed; only the rewind brings those records back.
    rsyslog.wait_for("300 records", |r| r.len() >= 300).await;
    rsyslog.freeze();
    let arrived = distinct(&rsyslog.received()).last().copied().unwrap_or(0);
    let written = wait_for_cursor(&db, &name, arrived + 200).await;
    rsyslog.kill();
    let before_restart = distinct(&rsyslog.received());
    add_records(&db, 2001, 2100).await;
    seal_all(&db).await;
    wait_until("lag to show while the receiver is down", || {
        metrics::gauge(LAG_RECORDS, &name).is_some_and(|lag| lag > 0.0)
    })
    .await;
    assert!(metrics::gauge(LAG_SECONDS, &name).is_some_and(|lag| lag > 0.0));
    let error = wait_for_error(&db, &name).await;
    assert!(error.contains("syslog"), "{error}");
    rsyslog.spawn().await;
    producer.await.expect("producer");
    let received = rsyslog
        .wait_for("every record", |r| distinct(r).len() >= 2100)
        .await;
    wait_until("lag to return to zero", || {
        metrics::gauge(LAG_RECORDS, &name) == Some(0.0)
            && metrics::gauge(LAG_SECONDS, &name) == Some(0.0)
    })
    .await;
    exporter.stop().await;

    assert!(
        before_restart.last().is_some_and(|&last| last < written),
        "nothing was lost in flight, so the rewind was not tested"
    );
    assert_eq!(distinct(&received), (1..=2100).collect::<BTreeSet<_>>());
    let firsts = first_occurrences(&received);
    assert!(firsts.windows(2).all(|w| w[0] < w[1]), "out of order");
    assert_eq!(cursor_error(&db, &name).await, None);
    assert_complete(&db, &received).await;
}

#[tokio::test]
async fn hec_gets_every_record_in_order_after_the_collector_was_busy() {
    let db = database().await;
    add_records(&db, 1, 300).await;
    seal_all(&db).await;
    let collector = HecStandIn::start(3).await;
    let sink = hec_sink("hec", &collector.url);
    let name = sink.name.clone();

    let exporter = Exporter::spawn(&db, sink, 100);
    wait_until("300 HEC events", || collector.events().len() >= 300).await;
    wait_until("the cursor to catch up", || {
        metrics::gauge(LAG_RECORDS, &name) == Some(0.0)
    })
    .await;
    exporter.stop().await;

    let events = collector.events();
    let seqs: Vec<i64> = events
        .iter()
        .map(|e| e["event"]["event"]["sequence"].as_i64().expect("sequence"))
        .collect();
    assert_eq!(seqs, (1..=300).collect::<Vec<_>>());
    assert!(collector.posts() >= 3 + 3, "the busy answers were retried");
    assert_eq!(collector.unauthorized(), 0);
    let first = &events[0];
    assert_eq!(first["sourcetype"], "payments:audit");
    assert!(first["time"].as_f64().is_some_and(|t| t > 1.0e9));
    assert_eq!(first["event"]["event"]["kind"], "event");
    assert_eq!(first["event"]["user"]["name"], "client:shop-1");
    assert_eq!(cursor_error(&db, &name).await, None);
}

#[tokio::test]
async fn the_service_exports_its_own_records_and_reports_the_sink() {
    let rsyslog = Rsyslog::start(None).await;
    let addr = rsyslog.addr();
    let app = TestApp::spawn_with(|env| {
        for (name, value) in [
            ("PAYMENTS_AUDIT_SINKS", "syslog"),
            ("PAYMENTS_AUDIT_SYSLOG_ADDR", addr.as_str()),
            ("PAYMENTS_AUDIT_SYSLOG_TLS", "false"),
            ("PAYMENTS_AUDIT_POLL_MS", "20"),
            ("PAYMENTS_AUDIT_BACKOFF_BASE_MS", "10"),
            ("PAYMENTS_AUDIT_BACKOFF_MAX_MS", "200"),
        ] {
            env.insert(name.to_owned(), value.to_owned());
        }
    })
    .await;

    let refused = app
        .http
        .get(format!("{}/v1/dead-letters", app.admin))
        .send()
        .await
        .expect("send");
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    let received = rsyslog
        .wait_for("the refusal's record", |r| {
            r.iter().any(|x| x.msg.contains("act=admin_access.refused"))
        })
        .await;
    assert_complete(&app.db, &received).await;
    let metrics = app
        .admin_get("/metrics")
        .await
        .text()
        .await
        .expect("metrics");
    assert!(
        metrics.contains("payments_audit_export_lag_records{sink=\"syslog\"}"),
        "{metrics}"
    );
    let status = app.cli(&["audit", "export-status", "--json"]);
    let stderr = String::from_utf8_lossy(&status.stderr);
    assert!(status.status.success(), "{stderr}");
    let sinks: Value = serde_json::from_slice(&status.stdout).expect("status is JSON");
    let seq = received.last().expect("a record").seq;
    assert_eq!(sinks[0]["sink"], "syslog");
    assert_eq!(sinks[0]["exporting"], true);
    assert!(sinks[0]["last_seq"].as_i64().is_some_and(|s| s >= seq));
    app.stop().await;
}

// --- the database -------------------------------------------------------

/// A migrated database of its own, named like the harness's so that
/// scripts/test drops it after the run.
async fn database() -> PgPool {
    let server = std::env::var("PAYMENTS_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let run = std::env::var("PAYMENTS_TEST_RUN").unwrap_or_else(|_| "adhoc".to_owned());
    let name = format!("payments_test_{run}_{}", uuid::Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(&server)
        .await
        .expect("connect to Postgres (run scripts/ensure-postgres)");
    admin
        .execute(format!(r#"CREATE DATABASE "{name}""#).as_str())
        .await
        .expect("create test database");
    let mut url = url::Url::parse(&server).expect("database url");
    url.set_path(&name);
    let pool = PgPool::connect(url.as_str()).await.expect("connect");
    payments::db::migrate(&pool).await.expect("migrate");
    pool
}

async fn add_records(db: &PgPool, first: i32, last: i32) {
    sqlx::query(INSERT_RECORDS)
        .bind(first)
        .bind(last)
        .execute(db)
        .await
        .expect("insert audit records");
}

/// Seals every record with the chainer, as the service does.
async fn seal_all(db: &PgPool) {
    for _ in 0..1000 {
        chain::seal_pending(db).await.expect("seal");
        let unsealed: i64 =
            sqlx::query_scalar("SELECT count(*) FROM audit_records WHERE chain_seq IS NULL")
                .fetch_one(db)
                .await
                .expect("count unsealed");
        if unsealed == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("audit records were not sealed");
}

/// Adds and seals `total` records, `step` at a time, as traffic would.
async fn produce(db: PgPool, total: i32, step: i32) {
    let mut next = 1;
    while next <= total {
        let last = (next + step - 1).min(total);
        add_records(&db, next, last).await;
        seal_all(&db).await;
        next = last + 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn records(db: &PgPool) -> HashMap<i64, ExportRecord> {
    let sql = format!("SELECT {RECORD_COLUMNS} FROM audit_records WHERE chain_seq IS NOT NULL");
    let rows: Vec<ExportRecord> = sqlx::query_as(&sql)
        .fetch_all(db)
        .await
        .expect("read records");
    rows.into_iter().map(|r| (r.chain_seq, r)).collect()
}

async fn cursor_error(db: &PgPool, sink: &str) -> Option<String> {
    sqlx::query_scalar("SELECT last_error FROM audit_export_cursors WHERE sink = $1")
        .bind(sink)
        .fetch_optional(db)
        .await
        .expect("read cursor")
        .flatten()
}

async fn wait_for_error(db: &PgPool, sink: &str) -> String {
    for _ in 0..400 {
        if let Some(error) = cursor_error(db, sink).await {
            return error;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no error recorded on the cursor of {sink}");
}

/// Waits until the cursor of `sink` reaches `at_least`, and returns it.
async fn wait_for_cursor(db: &PgPool, sink: &str, at_least: i64) -> i64 {
    for _ in 0..400 {
        let cursor: Option<i64> =
            sqlx::query_scalar("SELECT last_seq FROM audit_export_cursors WHERE sink = $1")
                .bind(sink)
                .fetch_optional(db)
                .await
                .expect("read cursor");
        if let Some(cursor) = cursor.filter(|c| *c >= at_least) {
            return cursor;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the cursor of {sink} did not reach {at_least}");
}

async fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// --- exporters ----------------------------------------------------------

/// An exporter task, as one replica runs it.
struct Exporter {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Exporter {
    fn spawn(db: &PgPool, sink: Sink, batch: i64) -> Self {
        let settings = ExportSettings {
            batch,
            poll: Duration::from_millis(20),
            backoff_base: Duration::from_millis(10),
            backoff_max: Duration::from_millis(200),
            timeout: Duration::from_secs(2),
        };
        let (stop, stopping) = watch::channel(false);
        let task = tokio::spawn(export::run_sink(db.clone(), sink, settings, stopping));
        Self { stop, task }
    }

    async fn stop(self) {
        self.stop.send_replace(true);
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("exporter stops in time")
            .expect("exporter task ends cleanly");
    }
}

/// The metrics are process-wide: each test's sink has a name of its own.
fn unique(name: &str) -> String {
    format!("{name}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

fn sink_from(settings: &[(&str, &str)], name: &str) -> Sink {
    let env: HashMap<String, String> = settings
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let config = export::from_source(&env).expect("export settings are valid");
    let mut sink = config.sinks.into_iter().next().expect("one sink");
    sink.name = unique(name);
    sink
}

/// `tls`: the name to verify, and whether to present the client certificate.
fn syslog_sink(name: &str, rsyslog: &Rsyslog, tls: Option<(&str, bool)>) -> Sink {
    let addr = rsyslog.addr();
    let files = |file: &str| rsyslog.dir.join(file).display().to_string();
    let (ca, cert, key) = (files("ca.pem"), files("client.pem"), files("client.key"));
    let mut settings = vec![
        ("PAYMENTS_AUDIT_SINKS", "syslog"),
        ("PAYMENTS_AUDIT_SYSLOG_ADDR", addr.as_str()),
    ];
    match tls {
        None => settings.push(("PAYMENTS_AUDIT_SYSLOG_TLS", "false")),
        Some((server_name, client_cert)) => {
            settings.push(("PAYMENTS_AUDIT_SYSLOG_CA", ca.as_str()));
            settings.push(("PAYMENTS_AUDIT_SYSLOG_SERVER_NAME", server_name));
            if client_cert {
                settings.push(("PAYMENTS_AUDIT_SYSLOG_CLIENT_CERT", cert.as_str()));
                settings.push(("PAYMENTS_AUDIT_SYSLOG_CLIENT_KEY", key.as_str()));
            }
        }
    }
    sink_from(&settings, name)
}

const HEC_TOKEN: &str = "hec-test-token-8d1f0c";

fn hec_sink(name: &str, url: &str) -> Sink {
    sink_from(
        &[
            ("PAYMENTS_AUDIT_SINKS", "hec"),
            ("PAYMENTS_AUDIT_HEC_URL", url),
            ("PAYMENTS_AUDIT_HEC_TOKEN", HEC_TOKEN),
        ],
        name,
    )
}

// --- what arrived -------------------------------------------------------

/// One line of the receiver's file: the fields rsyslog parsed out of the
/// RFC 5424 message.
#[derive(Clone, Debug)]
struct Received {
    seq: i64,
    pri: String,
    host: String,
    app: String,
    msgid: String,
    sd: String,
    msg: String,
}

/// A killed rsyslog may leave half a line: such lines are skipped.
fn parse_line(line: &str) -> Option<Received> {
    let json: Value = serde_json::from_str(line).ok()?;
    let field = |name: &str| json[name].as_str().map(str::to_owned);
    let sd = field("sd")?;
    let seq = sd.split("seq=\"").nth(1)?.split('"').next()?.parse().ok()?;
    Some(Received {
        seq,
        pri: field("pri")?,
        host: field("host")?,
        app: field("app")?,
        msgid: field("msgid")?,
        sd,
        msg: field("msg")?,
    })
}

fn distinct(received: &[Received]) -> BTreeSet<i64> {
    received.iter().map(|r| r.seq).collect()
}

/// The sequence numbers in the order they first arrived.
fn first_occurrences(received: &[Received]) -> Vec<i64> {
    let mut seen = BTreeSet::new();
    received
        .iter()
        .filter(|r| seen.insert(r.seq))
        .map(|r| r.seq)
        .collect()
}

/// Every received message carries every field of its record, exactly.
async fn assert_complete(db: &PgPool, received: &[Received]) {
    let records = records(db).await;
    for message in received {
        let record = &records[&message.seq];
        assert_message(message, record);
    }
}

fn assert_message(message: &Received, record: &ExportRecord) {
    let hash = hex::encode(&record.hash);
    let (syslog_severity, score) = match record.severity.as_str() {
        "critical" => (2, "10"),
        "warning" => (4, "6"),
        _ => (6, "3"),
    };
    assert_eq!(message.pri, (10 * 8 + syslog_severity).to_string());
    assert_eq!(message.host, export::format::hostname());
    assert_eq!(
        (message.app.as_str(), message.msgid.as_str()),
        ("payments", "AUDIT")
    );
    let sd = format!("[audit@32473 seq=\"{}\" hash=\"{hash}\"]", record.chain_seq);
    assert_eq!(message.sd, sd);

    let (header, fields) = parse_cef(&message.msg);
    assert_eq!(header[0], "CEF:0");
    assert_eq!(&header[1..3], ["payments", "payments"]);
    assert_eq!(header[4], record.action);
    assert_eq!(header[6], score);
    let expect = |key: &str, value: &str| {
        assert_eq!(
            fields.get(key).map(String::as_str),
            Some(value),
            "{key} in {}",
            message.msg
        );
    };
    expect("rt", &record.occurred_at.timestamp_millis().to_string());
    expect("act", &record.action);
    expect("outcome", &record.outcome);
    expect("suser", &record.actor);
    expect("externalId", &record.chain_seq.to_string());
    expect("cs6", &hash);
    let optional = [
        ("cs1", &record.request_id),
        ("cs2", &record.trace_id),
        ("cs3", &record.purpose),
        ("cs4", &record.consent_ref),
        ("cs5", &record.resource),
        ("reason", &record.reason),
    ];
    for (key, value) in optional {
        assert_eq!(fields.get(key), value.as_ref(), "{key} in {}", message.msg);
    }
    match record.source_addr.as_deref() {
        Some(ip) if ip.contains(':') => expect("c6a2", ip),
        Some(ip) => expect("src", ip),
        None => assert!(!fields.contains_key("src")),
    }
}

/// The seven header fields and the extension's key-value pairs, unescaped.
fn parse_cef(message: &str) -> (Vec<String>, HashMap<String, String>) {
    let chars: Vec<char> = message.chars().collect();
    let mut header = Vec::new();
    let mut field = String::new();
    let mut i = 0;
    while i < chars.len() && header.len() < 7 {
        match chars[i] {
            '\\' if i + 1 < chars.len() => {
                field.push(chars[i + 1]);
                i += 1;
            }
            '|' => header.push(std::mem::take(&mut field)),
            c => field.push(c),
        }
        i += 1;
    }
    (header, parse_extension(&chars[i..]))
}

fn parse_extension(chars: &[char]) -> HashMap<String, String> {
    // An unescaped `=` ends a key, which starts after the last space.
    let mut keys = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '\\' => i += 1,
            '=' => {
                let start = chars[..i]
                    .iter()
                    .rposition(|c| *c == ' ')
                    .map_or(0, |p| p + 1);
                keys.push((start, i));
            }
            _ => {}
        }
        i += 1;
    }
    let mut fields = HashMap::new();
    for (n, &(start, equals)) in keys.iter().enumerate() {
        let end = keys.get(n + 1).map_or(chars.len(), |&(next, _)| next - 1);
        let key: String = chars[start..equals].iter().collect();
        fields.insert(key, unescape(&chars[equals + 1..end]));
    }
    fields
}

fn unescape(chars: &[char]) -> String {
    let mut out = String::new();
    let mut iter = chars.iter();
    while let Some(&c) = iter.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match iter.next() {
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some(&other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

// --- rsyslog ------------------------------------------------------------

/// Debian's rsyslogd, run in the foreground on a loopback port with a
/// config of its own: one imtcp listener (TLS with a required client
/// certificate when given a PKI), RFC 5424 parsed, each message's fields
/// written as a JSON line. No other input or output, no system files.
struct Rsyslog {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Rsyslog {
    async fn start(pki: Option<Pki>) -> Self {
        let dir =
            std::env::temp_dir().join(format!("payments-siem-{}", uuid::Uuid::new_v4().simple()));
        fs::create_dir_all(&dir).expect("create rsyslog dir");
        let port = free_port();
        let tls = pki.map(|pki| pki.write(&dir));
        fs::write(dir.join("rsyslog.conf"), config(&dir, port, tls.is_some()))
            .expect("write rsyslog config");
        let mut rsyslog = Self {
            dir,
            port,
            child: None,
        };
        rsyslog.spawn().await;
        rsyslog
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts rsyslogd (again) on the same port and waits until it listens.
    async fn spawn(&mut self) {
        let pidfile = self.dir.join("rsyslogd.pid");
        // A killed rsyslogd leaves its pid file behind.
        if pidfile.exists() {
            fs::remove_file(&pidfile).expect("remove stale pid file");
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("rsyslogd.out"))
            .expect("open rsyslogd output");
        let child = Command::new(rsyslogd())
            .arg("-n")
            .arg("-C")
            .arg("-f")
            .arg(self.dir.join("rsyslog.conf"))
            .arg("-i")
            .arg(&pidfile)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .expect("start rsyslogd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(self.addr()).await.is_err() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("rsyslogd exited with {status}: {}", self.diagnostics());
            }
            assert!(
                Instant::now() < deadline,
                "rsyslogd did not listen: {}",
                self.diagnostics()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// SIGSTOP: the process stays, its sockets accept and buffer, it reads nothing.
    fn freeze(&self) {
        let pid = self.child.as_ref().expect("rsyslogd runs").id();
        let status = Command::new("kill")
            .args(["-STOP", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -STOP {pid}: {status}");
    }

    /// SIGKILL, so nothing is flushed or drained.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill rsyslogd");
            child.wait().expect("reap rsyslogd");
        }
    }

    fn received(&self) -> Vec<Received> {
        let text = fs::read_to_string(self.dir.join("received.jsonl")).unwrap_or_default();
        text.lines().filter_map(parse_line).collect()
    }

    async fn wait_for(&self, what: &str, done: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let received = self.received();
            if done(&received) {
                return received;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {} lines, {} distinct; {}",
                received.len(),
                distinct(&received).len(),
                self.diagnostics()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// rsyslogd's own messages, for a failure message.
    fn diagnostics(&self) -> String {
        let read = |file: &str| fs::read_to_string(self.dir.join(file)).unwrap_or_default();
        let text = format!("{}{}", read("rsyslogd.out"), read("internal.log"));
        let tail: Vec<&str> = text.lines().rev().take(10).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        self.kill();
        if let Err(err) = fs::remove_dir_all(&self.dir) {
            eprintln!("remove {}: {err}", self.dir.display());
        }
    }
}

fn rsyslogd() -> PathBuf {
    ["/usr/sbin/rsyslogd", "/sbin/rsyslogd", "/usr/bin/rsyslogd"]
        .map(PathBuf::from)
        .into_iter()
        .find(|path| path.exists())
        .expect("rsyslogd is not installed: run scripts/ensure-rsyslog")
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

fn config(dir: &Path, port: u16, tls: bool) -> String {
    let dir = dir.display();
    let (global_tls, module_tls) = if tls {
        (
            format!(
                r#"defaultNetstreamDriverCAFile="{dir}/ca.pem"
       defaultNetstreamDriverCertFile="{dir}/server.pem"
       defaultNetstreamDriverKeyFile="{dir}/server.key""#
            ),
            r#"streamDriver.name="ossl" streamDriver.mode="1" streamDriver.authMode="x509/certvalid""#,
        )
    } else {
        (String::new(), "")
    };
    format!(
        r#"global(workDirectory="{dir}" processInternalMessages="on" maxMessageSize="64k"
       {global_tls})
module(load="imtcp" {module_tls})
template(name="fields" type="list" option.jsonf="on") {{
  property(outname="pri" name="pri" format="jsonf")
  property(outname="host" name="hostname" format="jsonf")
  property(outname="app" name="app-name" format="jsonf")
  property(outname="msgid" name="msgid" format="jsonf")
  property(outname="sd" name="structured-data" format="jsonf")
  property(outname="msg" name="msg" format="jsonf")
}}
ruleset(name="audit") {{
  action(type="omfile" file="{dir}/received.jsonl" template="fields")
}}
input(type="imtcp" address="127.0.0.1" port="{port}" ruleset="audit")
*.* action(type="omfile" file="{dir}/internal.log")
"#
    )
}

/// A CA, a server certificate for loopback, and a client certificate.
struct Pki {
    ca: String,
    server: (String, String),
    client: (String, String),
}

impl Pki {
    fn new() -> Self {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "siem test ca");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca =
            CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("ca");
        let issue = |names: &[&str], usage: ExtendedKeyUsagePurpose, cn: &str| {
            let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
            let mut params = CertificateParams::new(names).expect("params");
            params.distinguished_name.push(DnType::CommonName, cn);
            params.extended_key_usages = vec![usage];
            let key = KeyPair::generate().expect("key");
            let cert = params.signed_by(&key, &ca).expect("sign");
            (cert.pem(), key.serialize_pem())
        };
        Self {
            server: issue(
                &["127.0.0.1", "localhost"],
                ExtendedKeyUsagePurpose::ServerAuth,
                "rsyslog.test",
            ),
            client: issue(&[], ExtendedKeyUsagePurpose::ClientAuth, "payments"),
            ca: ca.pem(),
        }
    }

    fn write(self, dir: &Path) -> Self {
        for (file, content) in [
            ("ca.pem", &self.ca),
            ("server.pem", &self.server.0),
            ("server.key", &self.server.1),
            ("client.pem", &self.client.0),
            ("client.key", &self.client.1),
        ] {
            fs::write(dir.join(file), content).expect("write pem");
        }
        self
    }
}

// --- a Splunk HEC stand-in ----------------------------------------------

/// Answers 503 (Splunk's "server is busy") to the first `busy` POSTs, then
/// stores each event of a batch. Checks the token on every request.
struct HecStandIn {
    url: String,
    state: Collector,
    server: JoinHandle<()>,
}

#[derive(Clone, Default)]
struct Collector {
    busy: usize,
    posts: Arc<AtomicUsize>,
    unauthorized: Arc<AtomicUsize>,
    events: Arc<Mutex<Vec<Value>>>,
}

impl HecStandIn {
    async fn start(busy: usize) -> Self {
        let state = Collector {
            busy,
            ..Collector::default()
        };
        let app = Router::new()
            .route("/services/collector/event", post(collect))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind HEC stand-in");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            if let Err(err) = axum::serve(listener, app).await {
                eprintln!("HEC stand-in stopped: {err}");
            }
        });
        Self {
            url: format!("http://{addr}/services/collector/event"),
            state,
            server,
        }
    }

    fn events(&self) -> Vec<Value> {
        self.state.events.lock().expect("events").clone()
    }

    fn posts(&self) -> usize {
        self.state.posts.load(Ordering::SeqCst)
    }

    fn unauthorized(&self) -> usize {
        self.state.unauthorized.load(Ordering::SeqCst)
    }
}

impl Drop for HecStandIn {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn collect(
    State(state): State<Collector>,
    headers: HeaderMap,
    body: String,
) -> (StatusCode, &'static str) {
    let expected = format!("Splunk {HEC_TOKEN}");
    if headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
        state.unauthorized.fetch_add(1, Ordering::SeqCst);
        return (
            StatusCode::UNAUTHORIZED,
            r#"{"text":"Invalid token","code":4}"#,
        );
    }
    if state.posts.fetch_add(1, Ordering::SeqCst) < state.busy {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"text":"Server is busy","code":9}"#,
        );
    }
    let parsed: Result<Vec<Value>, _> = body.lines().map(serde_json::from_str).collect();
    let Ok(events) = parsed else {
        return (
            StatusCode::BAD_REQUEST,
            r#"{"text":"Invalid data format","code":6}"#,
        );
    };
    state.events.lock().expect("events").extend(events);
    (StatusCode::OK, r#"{"text":"Success","code":0}"#)
}
