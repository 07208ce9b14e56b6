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

use payments::{app, config::Config};
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
    pub db_proxy: DbProxy,
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
        Self::start(database, adjust).await
    }

    /// Starts a second instance of the service on this one's database, as a
    /// second replica would run.
    pub async fn spawn_replica(&self) -> Self {
        let name = url::Url::parse(&self.database_url).expect("url").path()[1..].to_owned();
        Self::start((self.database_url.clone(), name), |_| {}).await
    }

    async fn start(
        (database_url, db_name): (String, String),
        adjust: impl FnOnce(&mut HashMap<String, String>),
    ) -> Self {
        let db_proxy = DbProxy::start().await;
        let stand_in = StandIn::spawn().await.expect("start stripe stand-in");
        let mut env = settings(&db_proxy.url_for(&db_name), &stand_in.base_url());
        adjust(&mut env);
        let config = Config::from_source(&env).expect("test config is valid");
        let listeners = app::Listeners::bind(&config).await.expect("bind port 0");
        let (public, webhook, admin) = listeners.local_addrs().expect("local addrs");
        let (shutdown, stopped) = oneshot::channel();
        let server = tokio::spawn(app::serve(config, listeners, async {
            let _stop = stopped.await;
        }));
        let db = PgPool::connect(&database_url)
            .await
            .expect("connect test database");
        let app = Self {
            public: format!("http://{public}"),
            webhook: format!("http://{webhook}"),
            admin: format!("http://{admin}"),
            db,
            database_url,
            stand_in,
            http: reqwest::Client::new(),
            db_proxy,
            shutdown: Some(shutdown),
            server: Some(server),
        };
        app.wait_until_ready().await;
        app
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

    pub async fn admin_post(&self, path: &str) -> Response {
        self.http
            .post(format!("{}{path}", self.admin))
            .bearer_auth(ADMIN_TOKEN)
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
        let url = format!("{}/v1/checkout/sessions/{session_id}", self.public);
        let response = self.http.get(url).send().await.expect("get session");
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
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// Creates an empty database for one test; the service migrates it.
async fn fresh_database() -> (String, String) {
    let name = format!("payments_test_{}", uuid::Uuid::new_v4().simple());
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
