//! TLS and mTLS on the listeners, certificate reload, and the connection
//! limits that cut off slow or oversized senders.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CertifiedIssuer, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason,
    RevokedCertParams, SerialNumber, date_time_ymd,
};
use reqwest::StatusCode;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::helpers::{ADMIN_TOKEN, TestApp};

/// A folder for one test's PEM files, removed at the end.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let name = format!("payments-tls-{}", uuid::Uuid::new_v4().simple());
        let path = std::env::temp_dir().join(name);
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }

    fn write(&self, file: &str, content: &str) -> PathBuf {
        let path = self.0.join(file);
        std::fs::write(&path, content).expect("write pem");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(err) = std::fs::remove_dir_all(&self.0) {
            eprintln!("remove {}: {err}", self.0.display());
        }
    }
}

/// A test certificate authority.
struct Ca(CertifiedIssuer<'static, KeyPair>);

/// A certificate and its key, as PEM.
struct Issued {
    cert: String,
    key: String,
}

impl Issued {
    /// The client identity reqwest wants: certificate and key in one PEM.
    fn identity(&self) -> reqwest::Identity {
        let pem = format!("{}{}", self.cert, self.key);
        reqwest::Identity::from_pem(pem.as_bytes()).expect("identity")
    }
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("ca key");
        Self(CertifiedIssuer::self_signed(params, key).expect("ca cert"))
    }

    fn pem(&self) -> String {
        self.0.pem()
    }

    fn certificate(&self) -> reqwest::Certificate {
        reqwest::Certificate::from_pem(self.pem().as_bytes()).expect("ca pem")
    }

    /// A server certificate for the loopback address.
    fn server(&self) -> Issued {
        self.issue(&["127.0.0.1", "localhost"], |params| {
            params
                .distinguished_name
                .push(DnType::CommonName, "payments.test");
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        })
    }

    /// A client certificate for an operator, changed by `edit`.
    fn client(&self, name: &str, edit: impl FnOnce(&mut CertificateParams)) -> Issued {
        self.issue(&[], |params| {
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            edit(params);
        })
    }

    fn issue(&self, names: &[&str], edit: impl FnOnce(&mut CertificateParams)) -> Issued {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        edit(&mut params);
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.0).expect("sign");
        Issued {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// A current CRL that revokes `serials`.
    fn crl(&self, serials: &[u64]) -> String {
        let revoked_certs = serials
            .iter()
            .map(|serial| RevokedCertParams {
                serial_number: SerialNumber::from(*serial),
                revocation_time: date_time_ymd(2024, 1, 1),
                reason_code: Some(RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
            .collect();
        let params = CertificateRevocationListParams {
            this_update: date_time_ymd(2024, 1, 1),
            next_update: date_time_ymd(2099, 1, 1),
            crl_number: SerialNumber::from(1),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.0).expect("sign crl");
        crl.pem().expect("crl pem")
    }
}

/// A client that trusts only `trusted` and opens a new connection for
/// every request, so each one shows what a new handshake gets.
fn client(trusted: &Ca, identity: Option<&Issued>) -> reqwest::Client {
    let mut builder = crate::helpers::client_builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(trusted.certificate())
        .pool_max_idle_per_host(0)
        .tls_info(true)
        .timeout(Duration::from_secs(10));
    if let Some(issued) = identity {
        builder = builder.identity(issued.identity());
    }
    builder.build().expect("client")
}

fn set(env: &mut std::collections::HashMap<String, String>, name: &str, path: &Path) {
    env.insert(name.to_owned(), path.display().to_string());
}

fn der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::{CertificateDer, pem::PemObject as _};
    CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("certificate pem")
        .to_vec()
}

fn host_port(url: &str) -> &str {
    url.split("://").nth(1).expect("url with a scheme")
}

#[tokio::test]
async fn the_public_listener_serves_https_with_the_configured_certificate() {
    let dir = TempDir::new();
    let ca = Ca::new("public CA");
    let server = ca.server();
    let cert = dir.write("server.crt", &server.cert);
    let key = dir.write("server.key", &server.key);
    let app = TestApp::spawn_with(|env| {
        set(env, "PAYMENTS_PUBLIC_TLS_CERT", &cert);
        set(env, "PAYMENTS_PUBLIC_TLS_KEY", &key);
    })
    .await;
    assert!(app.public.starts_with("https://"));

    let response = client(&ca, None)
        .get(format!(
            "{}/v1/checkout/sessions/cs_test_missing",
            app.public
        ))
        .send()
        .await
        .expect("https request");

    let tls = response
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .expect("tls info");
    assert_eq!(tls.peer_certificate(), Some(&der(&server.cert)[..]));
    let content_type = &response.headers()["content-type"];
    assert_eq!(content_type, "application/problem+json", "the API answered");
    let plain = format!("http://{}/v1/checkout/sessions/x", host_port(&app.public));
    let refused = reqwest::Client::new().get(plain).send().await;
    assert!(
        refused.is_err(),
        "plain http gets no HTTP answer: {refused:?}"
    );
}

/// The admin listener under mTLS: a CA for clients, a CRL that revokes
/// serial 666, and a harness client with a valid certificate.
struct MtlsAdmin {
    app: TestApp,
    server_ca: Ca,
    client_ca: Ca,
    crl: PathBuf,
    _dir: TempDir,
}

const REVOKED_SERIAL: u64 = 666;

async fn mtls_admin() -> MtlsAdmin {
    let dir = TempDir::new();
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("operators CA");
    let server = server_ca.server();
    let cert = dir.write("admin.crt", &server.cert);
    let key = dir.write("admin.key", &server.key);
    let clients = dir.write("clients-ca.crt", &client_ca.pem());
    let crl = dir.write("clients.crl", &client_ca.crl(&[REVOKED_SERIAL]));
    let operator = client_ca.client("ops-harness", |_| {});
    let http = client(&server_ca, Some(&operator));
    let app = TestApp::spawn_with_client(http, |env| {
        set(env, "PAYMENTS_ADMIN_TLS_CERT", &cert);
        set(env, "PAYMENTS_ADMIN_TLS_KEY", &key);
        set(env, "PAYMENTS_ADMIN_TLS_CLIENT_CA", &clients);
        set(env, "PAYMENTS_ADMIN_TLS_CLIENT_CRL", &crl);
        env.insert("PAYMENTS_TLS_RELOAD_INTERVAL_MS".into(), "100".into());
    })
    .await;
    MtlsAdmin {
        app,
        server_ca,
        client_ca,
        crl,
        _dir: dir,
    }
}

impl MtlsAdmin {
    async fn dead_letters_as(
        &self,
        identity: Option<&Issued>,
    ) -> reqwest::Result<reqwest::Response> {
        client(&self.server_ca, identity)
            .get(format!("{}/v1/dead-letters", self.app.admin))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
    }
}

#[tokio::test]
async fn a_trusted_client_certificate_and_the_token_reach_the_admin_api() {
    let admin = mtls_admin().await;
    let alice = admin.client_ca.client("ops-alice", |_| {});

    let response = admin.dead_letters_as(Some(&alice)).await.expect("served");

    assert_eq!(response.status(), StatusCode::OK);
    let without_token = client(&admin.server_ca, Some(&alice))
        .get(format!("{}/v1/dead-letters", admin.app.admin))
        .send()
        .await
        .expect("served");
    assert_eq!(
        without_token.status(),
        StatusCode::UNAUTHORIZED,
        "a certificate alone is not enough"
    );
}

#[tokio::test]
async fn the_admin_listener_refuses_a_connection_without_a_client_certificate() {
    let admin = mtls_admin().await;

    let refused = admin.dead_letters_as(None).await;

    assert!(refused.is_err(), "{refused:?}");
}

#[tokio::test]
async fn the_admin_listener_refuses_a_certificate_from_another_ca() {
    let admin = mtls_admin().await;
    let stranger = Ca::new("operators CA").client("ops-alice", |_| {});

    let refused = admin.dead_letters_as(Some(&stranger)).await;

    assert!(refused.is_err(), "{refused:?}");
}

#[tokio::test]
async fn the_admin_listener_refuses_an_expired_client_certificate() {
    let admin = mtls_admin().await;
    let expired = admin.client_ca.client("ops-former", |params| {
        params.not_before = date_time_ymd(2020, 1, 1);
        params.not_after = date_time_ymd(2021, 1, 1);
    });

    let refused = admin.dead_letters_as(Some(&expired)).await;

    assert!(refused.is_err(), "{refused:?}");
}

#[tokio::test]
async fn the_admin_listener_refuses_a_revoked_client_certificate() {
    let admin = mtls_admin().await;
    let revoked = admin.client_ca.client("ops-mallory", |params| {
        params.serial_number = Some(SerialNumber::from(REVOKED_SERIAL));
    });
    let not_revoked = admin.client_ca.client("ops-bob", |params| {
        params.serial_number = Some(SerialNumber::from(REVOKED_SERIAL + 1));
    });

    let refused = admin.dead_letters_as(Some(&revoked)).await;

    assert!(refused.is_err(), "{refused:?}");
    let served = admin
        .dead_letters_as(Some(&not_revoked))
        .await
        .expect("served");
    assert_eq!(served.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_certificate_revoked_while_running_is_refused_on_new_connections() {
    let admin = mtls_admin().await;
    let alice = admin.client_ca.client("ops-alice", |params| {
        params.serial_number = Some(SerialNumber::from(4242));
    });
    let served = admin.dead_letters_as(Some(&alice)).await.expect("served");
    assert_eq!(served.status(), StatusCode::OK);

    std::fs::write(&admin.crl, admin.client_ca.crl(&[REVOKED_SERIAL, 4242])).expect("write crl");
    let mut refused = false;
    for _ in 0..100 {
        if admin.dead_letters_as(Some(&alice)).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    assert!(refused, "the new CRL applies without a restart");
}

/// Whether a new connection that trusts only `ca` gets an answer.
async fn handshake_with(ca: &Ca, base: &str) -> bool {
    client(ca, None)
        .get(format!("{base}/"))
        .send()
        .await
        .is_ok()
}

#[tokio::test]
async fn new_certificates_are_served_without_a_restart_and_broken_ones_are_not() {
    let dir = TempDir::new();
    let old_ca = Ca::new("old CA");
    let new_ca = Ca::new("new CA");
    let first = old_ca.server();
    let cert = dir.write("server.crt", &first.cert);
    let key = dir.write("server.key", &first.key);
    let app = TestApp::spawn_with(|env| {
        set(env, "PAYMENTS_PUBLIC_TLS_CERT", &cert);
        set(env, "PAYMENTS_PUBLIC_TLS_KEY", &key);
        env.insert("PAYMENTS_TLS_RELOAD_INTERVAL_MS".into(), "100".into());
    })
    .await;
    assert!(handshake_with(&old_ca, &app.public).await);
    assert!(!handshake_with(&new_ca, &app.public).await);

    let second = new_ca.server();
    dir.write("server.crt", &second.cert);
    dir.write("server.key", &second.key);
    let mut reloaded = false;
    for _ in 0..100 {
        if handshake_with(&new_ca, &app.public).await {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    assert!(reloaded, "a new connection gets the new certificate");
    assert!(!handshake_with(&old_ca, &app.public).await);
    let pem = &second.cert;
    dir.write("server.crt", &pem[..pem.len() / 2]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..3 {
        assert!(
            handshake_with(&new_ca, &app.public).await,
            "a half-written file changes nothing"
        );
    }
}

/// Sends `head`, then one header line every `every` while the connection
/// stays open (at most `lines`), and says how long the server took to
/// close it, or `None` if it never did.
async fn trickle(addr: &str, head: &str, every: Duration, lines: usize) -> Option<Duration> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut read, mut write) = stream.into_split();
    let started = Instant::now();
    let closed = tokio::spawn(async move {
        let mut answer = Vec::new();
        let _reset_counts_as_closed = read.read_to_end(&mut answer).await;
        (started.elapsed(), answer)
    });
    write.write_all(head.as_bytes()).await.expect("send head");
    for _ in 0..lines {
        tokio::time::sleep(every).await;
        if closed.is_finished() || write.write_all(b"X-Slow: 1\r\n").await.is_err() {
            break;
        }
    }
    let (after, answer) = tokio::time::timeout(Duration::from_secs(1), closed)
        .await
        .ok()?
        .expect("reader joins");
    let answer = String::from_utf8_lossy(&answer);
    assert!(!answer.starts_with("HTTP/1.1 2"), "{answer}");
    Some(after)
}

#[tokio::test]
async fn a_client_that_trickles_its_headers_is_disconnected() {
    let app = TestApp::spawn_with(|env| {
        env.insert("PAYMENTS_HEADER_READ_TIMEOUT_MS".into(), "500".into());
    })
    .await;
    let head = "POST /webhooks/stripe HTTP/1.1\r\nHost: payments.test\r\n";

    let closed_after = trickle(
        host_port(&app.webhook),
        head,
        Duration::from_millis(100),
        40,
    )
    .await
    .expect("the server closes the connection");

    assert!(
        closed_after >= Duration::from_millis(450),
        "{closed_after:?}"
    );
    assert!(closed_after < Duration::from_secs(2), "{closed_after:?}");
}

/// Writes `request` (ignoring a connection closed early) and reads what
/// comes back until the server closes, within `within`.
async fn exchange(addr: &str, request: &[u8], within: Duration) -> (String, Duration) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let started = Instant::now();
    let _closed_early_is_an_answer = stream.write_all(request).await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(within, stream.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the server keeps the connection open");
    (
        String::from_utf8_lossy(&answer).into_owned(),
        started.elapsed(),
    )
}

#[tokio::test]
async fn a_body_that_stalls_is_answered_408_and_the_connection_closed() {
    let app = TestApp::spawn_with(|env| {
        env.insert("PAYMENTS_BODY_READ_TIMEOUT_MS".into(), "500".into());
    })
    .await;
    let request = "POST /webhooks/stripe HTTP/1.1\r\nHost: payments.test\r\n\
        Content-Type: application/json\r\nStripe-Signature: t=1,v1=00\r\n\
        Content-Length: 1000\r\n\r\n{\"id\":\"evt_";

    let (answer, after) = exchange(
        host_port(&app.webhook),
        request.as_bytes(),
        Duration::from_secs(3),
    )
    .await;

    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("application/problem+json"), "{answer}");
    assert!(after >= Duration::from_millis(450), "{after:?}");
}

#[tokio::test]
async fn oversized_headers_are_refused() {
    let app = TestApp::spawn().await;
    let big = "a".repeat(64 * 1024);
    let request =
        format!("GET /webhooks/stripe HTTP/1.1\r\nHost: payments.test\r\nX-Big: {big}\r\n\r\n");

    let (answer, _) = exchange(
        host_port(&app.webhook),
        request.as_bytes(),
        Duration::from_secs(3),
    )
    .await;

    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );
}
