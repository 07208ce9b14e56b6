//! Test harness: the real service on port 0, its own database per test, the
//! Stripe stand-in on loopback, and a proxy in front of Postgres that a test
//! can cut to simulate an outage.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use payments::{
    app,
    config::Config,
    crypto::{Keyring, PayloadContext},
};
use reqwest::{Response, StatusCode};
use serde_json::{Value, json};
use sqlx::{Connection, Executor, PgConnection, PgPool};
use stripe_stand_in::{EventOverrides, StandIn};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

pub const SECRET_CURRENT: &str = "whsec_test_current_0123456789";
pub const SECRET_NEXT: &str = "whsec_test_next_9876543210";
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef";

/// The server that holds the per-test databases.
fn maintenance_url() -> String {
    std::env::var("PAYMENTS_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

pub struct TestApp {
    pub public: String,
    pub webhook: String,
    pub admin: String,
    pub db: PgPool,
    pub database_url: String,
    pub stand_in: StandIn,
    pub http: reqwest::Client,
    /// The API key of the client `shop-backend`, created at start.
    pub api_key: String,
    pub db_proxy: DbProxy,
    /// The service's keys, over `db`: tests seal and open stored payloads
    /// with them, as the service does.
    pub keyring: Keyring,
    /// `PAYMENTS_KEK_FILE` of this instance, for the CLI.
    pub kek_file: String,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    /// Starts the service with the default test settings, changed by `adjust`.
    pub async fn spawn_with(adjust: impl FnOnce(&mut HashMap<String, String>)) -> Self {
        let database = fresh_database().await;
        Self::start(
            database,
            client_builder().build().expect("http client"),
            adjust,
        )
        .await
    }

    /// Like [`spawn_with`](Self::spawn_with), with `http` as the client of
    /// the harness and the test: one that trusts a test CA, or presents a
    /// client certificate. A listener given `*_TLS_CERT` is addressed as https.
    pub async fn spawn_with_client(
        http: reqwest::Client,
        adjust: impl FnOnce(&mut HashMap<String, String>),
    ) -> Self {
        let database = fresh_database().await;
        Self::start(database, http, adjust).await
    }

    /// Starts a second instance of the service on this one's database, as a
    /// second replica would run.
    pub async fn spawn_replica(&self) -> Self {
        self.spawn_replica_with(|_| {}).await
    }

    /// Like [`spawn_replica`](Self::spawn_replica), with settings changed by
    /// `adjust` (another key file, as after a key rotation).
    pub async fn spawn_replica_with(
        &self,
        adjust: impl FnOnce(&mut HashMap<String, String>),
    ) -> Self {
        let name = url::Url::parse(&self.database_url).expect("url").path()[1..].to_owned();
        let mut replica =
            Self::start((self.database_url.clone(), name), self.http.clone(), adjust).await;
        // One database, one set of API clients.
        replica.api_key = self.api_key.clone();
        replica
    }

    async fn start(
        (database_url, db_name): (String, String),
        http: reqwest::Client,
        adjust: impl FnOnce(&mut HashMap<String, String>),
    ) -> Self {
        log_to_file();
        let db_proxy = DbProxy::start().await;
        let stand_in = StandIn::spawn().await.expect("start stripe stand-in");
        let mut env = settings(&db_proxy.url_for(&db_name), &stand_in.base_url());
        adjust(&mut env);
        let config = Config::from_source(&env).expect("test config is valid");
        let keks = config.keyring.clone();
        let listeners = app::Listeners::bind(&config).await.expect("bind port 0");
        let (public, webhook, admin) = listeners.local_addrs().expect("local addrs");
        let (shutdown, stopped) = oneshot::channel();
        let server = tokio::spawn(app::serve(config, listeners, async {
            let _stop = stopped.await;
        }));
        let db = PgPool::connect(&database_url)
            .await
            .expect("connect test database");
        let keyring = Keyring::new(&keks, db.clone());
        let mut app = Self {
            public: format!("{}://{public}", scheme(&env, "PUBLIC")),
            webhook: format!("{}://{webhook}", scheme(&env, "WEBHOOK")),
            admin: format!("{}://{admin}", scheme(&env, "ADMIN")),
            db,
            database_url,
            stand_in,
            http,
            api_key: String::new(),
            db_proxy,
            keyring,
            kek_file: env["PAYMENTS_KEK_FILE"].clone(),
            shutdown: Some(shutdown),
            server: Some(server),
        };
        app.wait_until_ready().await;
        let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM api_clients)")
            .fetch_one(&app.db)
            .await
            .expect("look for API clients");
        if !exists {
            app.api_key = app.new_api_client("shop-backend").await;
        }
        app
    }

    /// Creates an API client and returns its key.
    pub async fn new_api_client(&self, name: &str) -> String {
        payments::auth::api_keys::create(&self.db, name, false, "test:harness")
            .await
            .expect("create API client")
    }

    /// A GET on the public listener as the shop backend.
    pub async fn public_get(&self, path: &str) -> Response {
        self.http
            .get(format!("{}{path}", self.public))
            .bearer_auth(&self.api_key)
            .send()
            .await
            .expect("public get")
    }

    /// `serve` runs migrations before it answers; wait for that.
    async fn wait_until_ready(&self) {
        for _ in 0..200 {
            let probe = self.http.get(format!("{}/readyz", self.admin)).send().await;
            if probe.is_ok_and(|r| r.status() == StatusCode::OK) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("service did not become ready");
    }

    /// Stops the service the way a SIGTERM would and waits for it to drain.
    pub async fn stop(mut self) {
        if let Some(stop) = self.shutdown.take() {
            stop.send(()).expect("server still running");
        }
        if let Some(server) = self.server.take() {
            let result = tokio::time::timeout(Duration::from_secs(30), server).await;
            result
                .expect("drains in time")
                .expect("task joins")
                .expect("serve returns Ok");
        }
    }

    pub async fn create_session(&self, key: Option<&str>, body: &Value) -> Response {
        let mut request = self
            .http
            .post(format!("{}/v1/checkout/sessions", self.public))
            .bearer_auth(&self.api_key)
            .json(body);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        request.send().await.expect("send create")
    }

    /// Creates a session and returns its Stripe id.
    pub async fn new_session(&self) -> String {
        let key = uuid::Uuid::new_v4().to_string();
        let response = self.create_session(Some(&key), &session_body()).await;
        assert_eq!(response.status(), StatusCode::CREATED);
        let body: Value = response.json().await.expect("json");
        body["id"].as_str().expect("id").to_owned()
    }

    /// Posts raw bytes to the webhook with the given Stripe-Signature header.
    pub async fn deliver(&self, body: &[u8], signature: Option<&str>) -> Response {
        let mut request = self
            .http
            .post(format!("{}/webhooks/stripe", self.webhook))
            .header("content-type", "application/json")
            .body(body.to_vec());
        if let Some(signature) = signature {
            request = request.header("Stripe-Signature", signature);
        }
        request.send().await.expect("send webhook")
    }

    /// Delivers bytes signed now with the current secret, as Stripe would.
    pub async fn deliver_signed(&self, body: &[u8]) -> Response {
        let header = sign_now(SECRET_CURRENT, body);
        self.deliver(body, Some(&header)).await
    }

    pub async fn admin_get(&self, path: &str) -> Response {
        self.http
            .get(format!("{}{path}", self.admin))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("admin get")
    }

    /// Runs the `payments` command against this app's database. A replay
    /// that does not say why is given a reason, as operators must give one.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        let mut args: Vec<&str> = args.to_vec();
        let is_replay = args.starts_with(&["dlq", "replay"]);
        if is_replay && !args.contains(&"--dry-run") && !args.contains(&"--reason") {
            args.extend(["--reason", "test: replay"]);
        }
        std::process::Command::new(env!("CARGO_BIN_EXE_payments"))
            .args(&args)
            .env_clear()
            .env("DATABASE_URL", &self.database_url)
            .env("PAYMENTS_KEK_FILE", &self.kek_file)
            .env("RUST_LOG", "error")
            .output()
            .expect("run payments cli")
    }

    /// A POST on the admin listener as the bootstrap operator, with a reason.
    pub async fn admin_post(&self, path: &str) -> Response {
        self.http
            .post(format!("{}{path}", self.admin))
            .bearer_auth(ADMIN_TOKEN)
            .header("payments-reason", "test: operator action")
            .send()
            .await
            .expect("admin post")
    }

    /// Polls the admin API until the worker has finished with the event.
    pub async fn settled_event(&self, event_id: &str) -> Value {
        for _ in 0..400 {
            let response = self.admin_get(&format!("/v1/events/{event_id}")).await;
            if response.status() == StatusCode::OK {
                let event: Value = response.json().await.expect("json");
                if event["status"] != "pending" {
                    return event;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("event {event_id} was not processed in time");
    }

    pub async fn session_status(&self, session_id: &str) -> String {
        let response = self
            .public_get(&format!("/v1/checkout/sessions/{session_id}"))
            .await;
        assert_eq!(response.status(), StatusCode::OK);
        let body: Value = response.json().await.expect("json");
        body["status"].as_str().expect("status").to_owned()
    }

    pub async fn count(&self, table: &str) -> i64 {
        let sql = format!("SELECT count(*) FROM {table}");
        sqlx::query_scalar(&sql)
            .fetch_one(&self.db)
            .await
            .expect("count rows")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(server) = &self.server {
            server.abort();
        }
    }
}

/// `https` for a listener that has a TLS certificate, else `http`.
fn scheme(env: &HashMap<String, String>, listener: &str) -> &'static str {
    if env.contains_key(&format!("PAYMENTS_{listener}_TLS_CERT")) {
        "https"
    } else {
        "http"
    }
}

/// The harness's HTTP client: every request states the purpose `checkout`,
/// as the public API requires. Tests that build their own client start here.
pub fn client_builder() -> reqwest::ClientBuilder {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        "payments-purpose",
        reqwest::header::HeaderValue::from_static("checkout"),
    );
    reqwest::Client::builder().default_headers(headers)
}

/// Sends the services' logs, at debug level, to `PAYMENTS_TEST_LOG` when
/// set, so that scripts/scan-for-leaks can search them after the suite.
fn log_to_file() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        let Ok(path) = std::env::var("PAYMENTS_TEST_LOG") else {
            return;
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .expect("open the test log");
        let filter = tracing_subscriber::EnvFilter::new(
            "debug,sqlx=info,hyper=info,h2=info,rustls=info,hyper_util=info",
        );
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::sync::Mutex::new(file))
            .init();
    });
}

fn settings(database_url: &str, stripe_base: &str) -> HashMap<String, String> {
    [
        ("DATABASE_URL", database_url),
        ("STRIPE_SECRET_KEY", "sk_test_payments_suite"),
        ("STRIPE_API_BASE", stripe_base),
        ("PAYMENTS_STRIPE_ALLOWED_HOSTS", "127.0.0.1"),
        (
            "STRIPE_WEBHOOK_SECRETS",
            &format!("{SECRET_CURRENT},{SECRET_NEXT}"),
        ),
        ("PAYMENTS_PUBLIC_ADDR", "127.0.0.1:0"),
        ("PAYMENTS_WEBHOOK_ADDR", "127.0.0.1:0"),
        ("PAYMENTS_ADMIN_ADDR", "127.0.0.1:0"),
        ("PAYMENTS_ADMIN_TOKEN", ADMIN_TOKEN),
        // Retries come quickly in tests, so out-of-order events settle fast.
        ("PAYMENTS_WORKER_BACKOFF_BASE_MS", "20"),
        ("PAYMENTS_WORKER_BACKOFF_MAX_SECS", "1"),
        ("PAYMENTS_WORKER_MAX_ATTEMPTS", "12"),
        ("PAYMENTS_KEK_FILE", test_kek_file()),
        // The test bodies send shoppers back to https://shop.example/….
        ("PAYMENTS_REDIRECT_HOSTS", "shop.example"),
        // Tests deliver webhooks from loopback; production keeps Stripe's list.
        ("PAYMENTS_WEBHOOK_ALLOWED_SOURCES", "127.0.0.1/32,::1/128"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// This process's key file: one random key, written once.
fn test_kek_file() -> &'static str {
    static FILE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    FILE.get_or_init(|| kek_file(&[("test-1", rand::random())]))
}

/// Writes a key file (the first key active) into this process's temp
/// directory and returns its path.
pub fn kek_file(keys: &[(&str, [u8; 32])]) -> String {
    use base64::{Engine, engine::general_purpose::STANDARD};
    let dir = std::env::temp_dir().join(format!("payments-test-keks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create key file directory");
    let path = dir.join(format!("{}.txt", uuid::Uuid::new_v4().simple()));
    let lines: String = keys
        .iter()
        .map(|(id, key)| format!("{id}:{}\n", STANDARD.encode(key)))
        .collect();
    std::fs::write(&path, lines).expect("write key file");
    path.display().to_string()
}

/// Whether `needle` occurs in `haystack`: stored ciphertext must not carry
/// the plaintext it protects.
pub fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

impl TestApp {
    /// Quarantines bytes as a malformed delivery, encrypted through the
    /// library as the ingress does (for entries an older parser refused).
    pub async fn quarantine(&self, reason: &str, detail: &str, bytes: &[u8]) -> i64 {
        use payments::dead_letters::store;
        let mut tx = self.db.begin().await.expect("begin");
        let id = store::next_id(&mut tx).await.expect("draw dead letter id");
        let sealed = self
            .keyring
            .seal(PayloadContext::DeadLetter(id), bytes)
            .await
            .expect("seal payload");
        store::insert_malformed(&mut tx, id, reason, detail, &sealed)
            .await
            .expect("insert dead letter");
        tx.commit().await.expect("commit");
        id
    }

    /// The stored payload of an event, decrypted.
    pub async fn stored_event_payload(&self, event_id: &str) -> Vec<u8> {
        let (sealed, key_id): (Vec<u8>, uuid::Uuid) =
            sqlx::query_as("SELECT payload, payload_key_id FROM webhook_events WHERE id = $1")
                .bind(event_id)
                .fetch_one(&self.db)
                .await
                .expect("stored payload");
        self.keyring
            .open(PayloadContext::Event(event_id), key_id, &sealed)
            .await
            .expect("payload decrypts")
    }
}

/// Creates an empty database for one test; the service migrates it.
async fn fresh_database() -> (String, String) {
    // scripts/test names its run, so it cleans up only its own databases.
    let run = std::env::var("PAYMENTS_TEST_RUN").unwrap_or_else(|_| "adhoc".to_owned());
    let name = format!("payments_test_{run}_{}", uuid::Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(&maintenance_url())
        .await
        .expect("connect to Postgres (run scripts/ensure-postgres)");
    admin
        .execute(format!(r#"CREATE DATABASE "{name}""#).as_str())
        .await
        .expect("create test database");
    let mut url = url::Url::parse(&maintenance_url()).expect("valid test database url");
    url.set_path(&name);
    (url.to_string(), name)
}

pub fn session_body() -> Value {
    json!({
        "line_items": [{"price": "price_1Pgc5mB7WZ01zgkWc0yW5u3X", "quantity": 2}],
        "success_url": "https://shop.example/thanks",
        "cancel_url": "https://shop.example/cart",
        "client_reference_id": "order-1042",
        "metadata": {"order": "1042"}
    })
}

pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

pub fn sign_now(secret: &str, body: &[u8]) -> String {
    stripe_stand_in::sign_payload(secret, now(), body)
}

/// A fixture event from ../shared/fixtures/stripe-events, by type.
pub fn fixture(event_type: &str) -> Value {
    let dir = std::env::var("PAYMENTS_FIXTURES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/stripe-events")
        });
    let path = dir.join(format!("{event_type}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("read fixture {}: {e}", path.display()));
    serde_json::from_str(&text).expect("fixture is JSON")
}

pub const FIXTURE_TYPES: &[&str] = &[
    "checkout.session.completed",
    "checkout.session.expired",
    "checkout.session.async_payment_succeeded",
    "checkout.session.async_payment_failed",
    "payment_intent.succeeded",
    "payment_intent.payment_failed",
    "charge.refunded",
    "charge.dispute.created",
];

/// A fixture event about `session_id`, with a fresh event id.
pub fn session_event(event_type: &str, session_id: &str) -> (String, Vec<u8>) {
    let event_id = format!("evt_test_{}", uuid::Uuid::new_v4().simple());
    let overrides = EventOverrides {
        event_id: Some(event_id.clone()),
        object_id: Some(session_id.to_owned()),
        created: Some(now()),
        ..Default::default()
    };
    let bytes =
        stripe_stand_in::event_from_fixture(&fixture(event_type), &overrides).expect("build event");
    // Each session pays through its own PaymentIntent, as at Stripe.
    let mut event: Value = serde_json::from_slice(&bytes).expect("event is JSON");
    let payment_intent = format!("pi_{}", uuid::Uuid::new_v4().simple());
    event["data"]["object"]["payment_intent"] = payment_intent.into();
    (
        event_id,
        serde_json::to_vec(&event).expect("serialize event"),
    )
}

/// The `payments_ref` the service sent to Stripe for a session it created.
pub async fn reference_of(app: &TestApp, session_id: &str) -> String {
    sqlx::query_scalar("SELECT reference FROM checkout_sessions WHERE id = $1")
        .bind(session_id)
        .fetch_one(&app.db)
        .await
        .expect("session has a reference")
}

/// A fixture event with fresh ids, changed by `edit`, as bytes to sign.
pub fn event(event_type: &str, created: i64, edit: impl FnOnce(&mut Value)) -> (String, Vec<u8>) {
    event_from(event_type, event_type, created, edit)
}

/// Like [`event`], for a type that has no fixture of its own (such as
/// `charge.dispute.closed`, built from `charge.dispute.created`).
pub fn event_from(
    fixture_type: &str,
    event_type: &str,
    created: i64,
    edit: impl FnOnce(&mut Value),
) -> (String, Vec<u8>) {
    let mut event = fixture(fixture_type);
    event["type"] = event_type.into();
    let event_id = format!("evt_test_{}", uuid::Uuid::new_v4().simple());
    event["id"] = event_id.clone().into();
    event["created"] = created.into();
    edit(&mut event["data"]["object"]);
    (
        event_id,
        serde_json::to_vec(&event).expect("serialize event"),
    )
}

pub async fn assert_problem(response: Response, status: StatusCode, problem: &str) -> Value {
    assert_eq!(response.status(), status);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(content_type, "application/problem+json");
    let body: Value = response.json().await.expect("problem body is JSON");
    assert_eq!(body["type"], format!("/problems/{problem}"), "{body}");
    assert_eq!(body["status"], status.as_u16());
    assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()));
    body
}

/// A TCP proxy in front of Postgres. `cut` drops every connection and
/// refuses new ones, as a network partition or a database crash would;
/// `restore` lets connections through again.
pub struct DbProxy {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
    connections: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl DbProxy {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let open = Arc::new(AtomicBool::new(true));
        let connections = Arc::new(std::sync::Mutex::new(Vec::new()));
        let accept = tokio::spawn(forward(listener, open.clone(), connections.clone()));
        Self {
            addr,
            open,
            connections,
            accept,
        }
    }

    fn url_for(&self, database: &str) -> String {
        let mut url = url::Url::parse(&maintenance_url()).expect("valid url");
        url.set_port(Some(self.addr.port())).expect("set port");
        url.set_host(Some("127.0.0.1")).expect("set host");
        url.set_path(database);
        url.to_string()
    }

    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for connection in self.connections.lock().expect("proxy lock").drain(..) {
            connection.abort();
        }
    }

    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for DbProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn forward(
    listener: TcpListener,
    open: Arc<AtomicBool>,
    connections: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
) {
    let upstream = upstream_addr();
    while let Ok((mut client, _)) = listener.accept().await {
        if !open.load(Ordering::SeqCst) {
            continue; // dropping the socket refuses the connection
        }
        let pipe = tokio::spawn(async move {
            if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                let _copied = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            }
        });
        connections.lock().expect("proxy lock").push(pipe);
    }
}

fn upstream_addr() -> SocketAddr {
    let url = url::Url::parse(&maintenance_url()).expect("valid url");
    let host = url.host_str().unwrap_or("127.0.0.1");
    let port = url.port().unwrap_or(5432);
    format!("{host}:{port}")
        .parse()
        .expect("test Postgres is addressed by IP")
}
