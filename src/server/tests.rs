use std::{collections::HashMap, net::SocketAddr, time::Duration};

use axum::{Extension, Json, extract::ConnectInfo, routing::get};
use serde_json::{Value, json};
use tokio::{io::AsyncWriteExt, task::JoinHandle};

use super::{tls::tests::TestPki, *};

struct Running {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

async fn start(app: Router, tls: Option<ListenerTls>, limits: ConnectionLimits) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopping) = watch::channel(false);
    let reloader = tls.as_ref().map(TlsReloader::new);
    let task = tokio::spawn(serve(listener, app, reloader, limits, stopping));
    Running { addr, stop, task }
}

async fn whoami(
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    client: Option<Extension<ClientCertificate>>,
) -> Json<Value> {
    let client = client.map(|Extension(c)| {
        json!({"subject": c.subject, "sha256": c.sha256_fingerprint, "not_after": c.not_after})
    });
    Json(json!({"peer": peer.to_string(), "client": client}))
}

#[tokio::test]
async fn handlers_see_the_peer_and_the_verified_client_certificate() {
    let pki = TestPki::new("whoami");
    let (cert, key) = pki.issue("server", &["127.0.0.1"]);
    let (client_cert, client_key) = pki.issue("ops-alice", &["ops-alice.test"]);
    let src: HashMap<String, String> = [
        ("PAYMENTS_ADMIN_TLS_CERT", &cert),
        ("PAYMENTS_ADMIN_TLS_KEY", &key),
        ("PAYMENTS_ADMIN_TLS_CLIENT_CA", &pki.ca_path()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.display().to_string()))
    .collect();
    let tls = ListenerTls::from_source(&src, "PAYMENTS_ADMIN")
        .unwrap()
        .unwrap();
    assert!(tls.requires_client_certificate());
    let app = Router::new().route("/whoami", get(whoami));
    let server = start(app, Some(tls), ConnectionLimits::default()).await;
    let client_pem = std::fs::read_to_string(&client_cert).unwrap();
    let identity = client_pem.clone() + &std::fs::read_to_string(&client_key).unwrap();
    let http = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca.pem().as_bytes()).unwrap())
        .identity(reqwest::Identity::from_pem(identity.as_bytes()).unwrap())
        .build()
        .unwrap();

    let url = format!("https://{}/whoami", server.addr);
    let body: Value = http.get(url).send().await.unwrap().json().await.unwrap();

    let der = der_of(&client_pem);
    assert_eq!(body["client"]["subject"], "CN=ops-alice");
    assert_eq!(body["client"]["sha256"], hex::encode(Sha256::digest(&der)));
    assert!(
        body["client"]["not_after"]
            .as_str()
            .unwrap()
            .starts_with("4096-01-01")
    );
    assert!(body["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    server.stop.send_replace(true);
    server.task.await.unwrap();
}

/// The DER bytes of a one-certificate PEM file.
fn der_of(pem: &str) -> Vec<u8> {
    use rustls::pki_types::{CertificateDer, pem::PemObject as _};
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

#[tokio::test]
async fn shutdown_lets_the_request_in_flight_finish_and_accepts_no_more() {
    let slow = get(|| async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        "done"
    });
    let app = Router::new().route("/slow", slow);
    let server = start(app, None, ConnectionLimits::default()).await;
    let url = format!("http://{}/slow", server.addr);
    let in_flight = tokio::spawn(reqwest::get(url.clone()));
    tokio::time::sleep(Duration::from_millis(100)).await;

    server.stop.send_replace(true);
    let answer = in_flight.await.unwrap().unwrap();

    assert_eq!(answer.text().await.unwrap(), "done");
    tokio::time::timeout(Duration::from_secs(5), server.task)
        .await
        .expect("drains")
        .unwrap();
    assert!(reqwest::get(url).await.is_err(), "the listener is closed");
}

#[tokio::test]
async fn connections_past_the_cap_wait_for_a_free_slot() {
    let app = Router::new().route("/", get(|| async { "ok" }));
    let limits = ConnectionLimits {
        max_connections: 1,
        ..ConnectionLimits::default()
    };
    let server = start(app, None, limits).await;
    let mut first = TcpStream::connect(server.addr).await.unwrap();
    first
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n")
        .await
        .unwrap();
    let url = format!("http://{}/", server.addr);

    let waiting = tokio::time::timeout(Duration::from_millis(300), reqwest::get(&url)).await;
    assert!(waiting.is_err(), "a second connection is not served");
    drop(first);
    let served = tokio::time::timeout(Duration::from_secs(5), reqwest::get(&url)).await;

    assert_eq!(
        served
            .expect("served once a slot is free")
            .unwrap()
            .status(),
        200
    );
    server.stop.send_replace(true);
    server.task.await.unwrap();
}
