//! The test harness: a real callbridge on a loopback port, on a fresh SQLite file or a fresh
//! PostgreSQL database, with wiremock standing in for Exotel and for the tenant's webhook
//! receiver. `both_backends!` turns one async test into a SQLite and a PostgreSQL variant.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use base64::Engine;
use callbridge::{AppState, Application, config::Config, tenants};
use sea_orm::{ConnectionTrait, Database};
use serde_json::Value;
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;
use wiremock::{Mock, MockServer, ResponseTemplate, matchers};

/// Which database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Generate `mod name { sqlite(), postgres() }` for each `async fn name(Backend)`.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$name($crate::helpers::Backend::Sqlite).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    super::$name($crate::helpers::Backend::Postgres).await
                }
            }
        )*
    };
}

/// The PostgreSQL server the suite uses (a database per test is created on it).
pub fn pg_admin_url() -> String {
    std::env::var("CALLBRIDGE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

static PG_CLEANED: OnceCell<()> = OnceCell::const_new();

/// A fresh PostgreSQL database; leftovers from earlier runs are dropped on first use.
pub async fn fresh_pg_database() -> String {
    let admin_url = pg_admin_url();
    let admin = Database::connect(&admin_url)
        .await
        .expect("PostgreSQL must be running for the test suite (see README)");
    PG_CLEANED
        .get_or_init(|| async {
            let rows = admin
                .query_all_raw(sea_orm::Statement::from_string(
                    sea_orm::DbBackend::Postgres,
                    "SELECT datname FROM pg_database WHERE datname LIKE 'cbt\\_%' \
                     AND (SELECT count(*) FROM pg_stat_activity a WHERE a.datname = pg_database.datname) = 0",
                ))
                .await
                .unwrap_or_default();
            for r in rows {
                if let Ok(name) = r.try_get::<String>("", "datname") {
                    let _ = admin
                        .execute_unprepared(&format!("DROP DATABASE IF EXISTS \"{name}\""))
                        .await;
                }
            }
        })
        .await;
    let name = format!("cbt_{}", uuid::Uuid::new_v4().simple());
    admin
        .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
        .await
        .expect("create test database");
    let mut url = url::Url::parse(&admin_url).expect("admin url");
    url.set_path(&format!("/{name}"));
    url.to_string()
}

/// A running app plus its fakes.
pub struct TestApp {
    pub addr: SocketAddr,
    pub base: String,
    pub state: AppState,
    pub http: reqwest::Client,
    pub exotel: MockServer,
    pub receiver: MockServer,
    pub config: Config,
    pub backend: Backend,
    /// Connectors beyond the configured ones (a fake CRM), kept across restarts.
    pub connectors: Vec<Arc<dyn callbridge_connector::Connector>>,
    shutdown: CancellationToken,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _dir: tempfile::TempDir,
}

/// A test tenant with its secrets.
#[derive(Debug, Clone)]
pub struct TestTenant {
    pub id: String,
    pub api_key: String,
    pub webhook_secret: Option<String>,
    pub created: tenants::CreatedTenant,
}

/// A config for tests: fixed master key, worker and reconciler off unless a test turns them on
/// (tests drain the queue with `jobs::run_due` so nothing depends on timing), zero backoff.
#[allow(clippy::field_reassign_with_default)] // reads as a list of test overrides
pub async fn test_config(backend: Backend, dir: &std::path::Path) -> Config {
    let database_url = match backend {
        Backend::Sqlite => format!("sqlite://{}?mode=rwc", dir.join("cb.db").display()),
        Backend::Postgres => fresh_pg_database().await,
    };
    Config {
        database_url,
        bind: "127.0.0.1:0".parse().unwrap(),
        master_key: Some(
            base64::engine::general_purpose::STANDARD
                .encode([42u8; 32])
                .into(),
        ),
        db_max_connections: 4,
        worker_enabled: false,
        reconcile_enabled: false,
        job_backoff_base_secs: 0,
        job_backoff_max_secs: 0,
        job_max_attempts: 5,
        webhook_timeout_secs: 5,
        job_lease_secs: 30,
        exotel_timeout_secs: 3,
        ..Config::default()
    }
}

impl TestApp {
    /// Spawn with the default test config.
    pub async fn spawn(backend: Backend) -> Self {
        Self::spawn_with(backend, |_| {}).await
    }

    /// Spawn with a config tweak.
    pub async fn spawn_with(backend: Backend, tweak: impl FnOnce(&mut Config)) -> Self {
        Self::spawn_with_connectors(backend, tweak, Vec::new()).await
    }

    /// Spawn with a config tweak and extra connectors (a fake CRM).
    pub async fn spawn_with_connectors(
        backend: Backend,
        tweak: impl FnOnce(&mut Config),
        connectors: Vec<Arc<dyn callbridge_connector::Connector>>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(backend, dir.path()).await;
        tweak(&mut config);
        let exotel = MockServer::start().await;
        let receiver = MockServer::start().await;
        Self::start(backend, config, exotel, receiver, dir, connectors).await
    }

    async fn start(
        backend: Backend,
        config: Config,
        exotel: MockServer,
        receiver: MockServer,
        dir: tempfile::TempDir,
        connectors: Vec<Arc<dyn callbridge_connector::Connector>>,
    ) -> Self {
        let app = Application::build_with(config.clone(), None, connectors.clone())
            .await
            .expect("app builds");
        let addr = app.local_addr().unwrap();
        let state = app.state();
        let shutdown = app.shutdown_token();
        let server = tokio::spawn(app.run(false));
        let mut config = config;
        config.public_url = Some(format!("http://{addr}"));
        Self {
            addr,
            base: format!("http://{addr}"),
            state,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
            exotel,
            receiver,
            config,
            backend,
            connectors,
            shutdown,
            server: Some(server),
            _dir: dir,
        }
    }

    /// Stop the server (as a restart or crash would) and start a new one on the same database,
    /// with the same fakes.
    pub async fn restart(mut self, tweak: impl FnOnce(&mut Config)) -> Self {
        self.stop().await;
        let mut config = self.config.clone();
        config.public_url = None;
        config.bind = "127.0.0.1:0".parse().unwrap();
        tweak(&mut config);
        let TestApp {
            exotel,
            receiver,
            _dir,
            backend,
            connectors,
            ..
        } = self;
        Self::start(backend, config, exotel, receiver, _dir, connectors).await
    }

    /// Stop serving and wait for the background tasks.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(h) = self.server.take() {
            let _ = tokio::time::timeout(Duration::from_secs(20), h).await;
        }
    }

    /// Create a tenant whose Exotel base is the fake; with a webhook pointing at the receiver.
    pub async fn tenant(&self, webhook: bool) -> TestTenant {
        let created = tenants::create(
            &self.state.db,
            &self.state.sealer,
            &self.state.public_base,
            "IN",
            tenants::NewTenant {
                name: "Acme".into(),
                exotel_sid: "acme1".into(),
                exotel_api_key: "key123".into(),
                exotel_api_token: "token456".into(),
                exotel_api_base: Some(self.exotel.uri()),
                caller_id: Some("+918047112233".into()),
                webhook_url: webhook.then(|| format!("{}/hook", self.receiver.uri())),
                default_region: None,
            },
        )
        .await
        .expect("tenant created");
        TestTenant {
            id: created.tenant_id.clone(),
            api_key: created.api_key.clone(),
            webhook_secret: created.webhook_secret.clone(),
            created,
        }
    }

    /// Make the fake Exotel accept connects, answering with `sid`.
    pub async fn exotel_accepts(&self, sid: &str) {
        Mock::given(matchers::method("POST"))
            .and(matchers::path_regex(r"^/v1/Accounts/[^/]+/Calls/connect\.json$"))
            .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
                "Call": {"Sid": sid, "ParentCallSid": null, "DateCreated": "2026-11-26 10:00:00",
                         "DateUpdated": "2026-11-26 10:00:00", "AccountSid": "acme1",
                         "To": "09812345678", "From": "09876543210", "PhoneNumberSid": "08047112233",
                         "Status": "in-progress", "StartTime": "2026-11-26 10:00:00", "EndTime": null,
                         "Duration": null, "Price": null, "Direction": "outbound-api",
                         "AnsweredBy": null, "ForwardedFrom": null, "CallerName": null,
                         "Uri": format!("/v1/Accounts/acme1/Calls/{sid}.json"), "RecordingUrl": null}
            })))
            .mount(&self.exotel)
            .await;
    }

    /// Make the receiver answer `status` to every delivery.
    pub async fn receiver_answers(&self, status: u16) {
        Mock::given(matchers::method("POST"))
            .and(matchers::path("/hook"))
            .respond_with(ResponseTemplate::new(status))
            .mount(&self.receiver)
            .await;
    }

    /// POST a JSON body to the API with a bearer key.
    pub async fn post_call(&self, key: &str, body: Value) -> reqwest::Response {
        self.http
            .post(format!("{}/api/v1/calls", self.base))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// GET an API path with a bearer key.
    pub async fn get(&self, key: &str, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
    }

    /// The form fields of every `Calls/connect` the fake Exotel received, in order.
    pub async fn connect_requests(&self) -> Vec<Vec<(String, String)>> {
        self.exotel
            .received_requests()
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r.url.path().ends_with("/Calls/connect.json"))
            .map(|r| url::form_urlencoded::parse(&r.body).into_owned().collect())
            .collect()
    }

    /// The StatusCallback URL handed to Exotel in the latest connect.
    pub async fn last_status_callback(&self) -> String {
        let reqs = self.connect_requests().await;
        let form = reqs.last().expect("a connect was sent");
        form.iter()
            .find(|(k, _)| k == "StatusCallback")
            .map(|(_, v)| v.clone())
            .expect("StatusCallback sent")
    }

    /// Place a call through the API and return (call id, StatusCallback URL).
    pub async fn place_call(&self, t: &TestTenant, to: &str) -> (String, String) {
        let r = self
            .post_call(
                &t.api_key,
                serde_json::json!({"from": "+919876543210", "to": to}),
            )
            .await;
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
        let body: Value = r.json().await.unwrap();
        let id = body["id"].as_str().unwrap().to_owned();
        (id, self.last_status_callback().await)
    }

    /// POST a callback body with a content type.
    pub async fn callback(
        &self,
        url: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        self.http
            .post(url)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap()
    }

    /// Run every due job now; returns how many ran.
    pub async fn drain_jobs(&self) -> usize {
        callbridge::jobs::run_due(&self.state).await.unwrap()
    }

    /// The deliveries the receiver got, as (headers, JSON body).
    pub async fn deliveries(&self) -> Vec<(wiremock::http::HeaderMap, Value)> {
        self.receiver
            .received_requests()
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r.url.path() == "/hook")
            .map(|r| {
                (
                    r.headers.clone(),
                    serde_json::from_slice(&r.body).unwrap_or(Value::Null),
                )
            })
            .collect()
    }

    /// Count rows in a table (whole database).
    pub async fn count(&self, table: &str) -> i64 {
        let row = self
            .state
            .db
            .query_one_raw(sea_orm::Statement::from_string(
                self.state.db.get_database_backend(),
                format!("SELECT COUNT(*) AS n FROM {table}"),
            ))
            .await
            .unwrap()
            .unwrap();
        row.try_get("", "n").unwrap()
    }
}

/// The terminal callback from Exotel's masking guide, for `sid`.
pub fn guide_callback(sid: &str) -> Value {
    serde_json::json!({
      "CallSid": sid,
      "EventType": "terminal",
      "DateCreated": "2019-04-08 03:17:59",
      "DateUpdated": "2019-04-08 03:18:35",
      "Status": "completed",
      "To": "+91886799XXXX",
      "From": "+91941374XXXX",
      "PhoneNumberSid": "0113083XXXX",
      "StartTime": "2019-04-08 03:17:59",
      "EndTime": "2019-04-08 03:18:36",
      "Direction": "outbound-api",
      "RecordingUrl": "https://s3-ap-southeast-1.amazonaws.com/exotelrecordings/acme1/xxdewfcwsdw.mp3",
      "ConversationDuration": 32,
      "Legs": [
        {"OnCallDuration": 41, "Status": "completed"},
        {"OnCallDuration": 32, "Status": "completed"}
      ]
    })
}

/// A fake Exotel `Calls/connect` answer with a fresh `Call.Sid` (`{prefix}{n}`) per request, so
/// several calls of one tenant get distinct sids (Exotel never reuses one).
pub struct SequentialSid {
    prefix: String,
    next: std::sync::atomic::AtomicUsize,
}

impl wiremock::Respond for SequentialSid {
    fn respond(&self, _req: &wiremock::Request) -> ResponseTemplate {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let sid = format!("{}{n:04}", self.prefix);
        ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "Call": {"Sid": sid, "Status": "in-progress", "AccountSid": "acme1",
                     "Uri": format!("/v1/Accounts/acme1/Calls/{sid}.json")}
        }))
    }
}

/// A placed call as the tests need it.
#[derive(Debug, Clone)]
pub struct PlacedCall {
    /// Our call id.
    pub id: String,
    /// The StatusCallback URL handed to Exotel.
    pub url: String,
    /// Exotel's CallSid.
    pub sid: String,
}

/// The `(name, value)` pairs and `Content-Type` of a multipart/form-data body.
pub fn multipart(fields: &[(&str, &str)]) -> (String, String) {
    let boundary = "----callbridgeTestBoundary7MA4YWxkTrZu0gW";
    let mut body = String::new();
    for (k, v) in fields {
        body.push_str(&format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n"
        ));
    }
    body.push_str(&format!("--{boundary}--\r\n"));
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// Verify a Standard Webhooks signature independently of the app's signer: HMAC-SHA256 over
/// `"{id}.{timestamp}.{body}"`, keyed with the base64-decoded part after `whsec_`.
pub fn standard_webhooks_valid(
    secret: &str,
    id: &str,
    timestamp: &str,
    body: &[u8],
    sig_header: &str,
) -> bool {
    use hmac::{Hmac, Mac};
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.strip_prefix("whsec_").expect("whsec_ secret"))
        .expect("secret is base64");
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    // The header may carry several space-separated signatures.
    sig_header
        .split(' ')
        .any(|s| s.strip_prefix("v1,") == Some(expected.as_str()))
}

/// Poll `check` every 50 ms until it holds or `limit` passes; returns whether it held.
pub async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl TestApp {
    /// Create a tenant like [`TestApp::tenant`], adjusted by `tweak` (no caller id, another
    /// webhook URL …).
    pub async fn tenant_with(&self, tweak: impl FnOnce(&mut tenants::NewTenant)) -> TestTenant {
        let mut new = tenants::NewTenant {
            name: "Acme".into(),
            exotel_sid: "acme1".into(),
            exotel_api_key: "key123".into(),
            exotel_api_token: "token456".into(),
            exotel_api_base: Some(self.exotel.uri()),
            caller_id: Some("+918047112233".into()),
            webhook_url: Some(format!("{}/hook", self.receiver.uri())),
            default_region: None,
        };
        tweak(&mut new);
        let created = tenants::create(
            &self.state.db,
            &self.state.sealer,
            &self.state.public_base,
            "IN",
            new,
        )
        .await
        .expect("tenant created");
        TestTenant {
            id: created.tenant_id.clone(),
            api_key: created.api_key.clone(),
            webhook_secret: created.webhook_secret.clone(),
            created,
        }
    }

    /// Make the fake Exotel accept every connect with a fresh sid `{prefix}0000`, `{prefix}0001` ….
    pub async fn exotel_accepts_many(&self, prefix: &str) {
        Mock::given(matchers::method("POST"))
            .and(matchers::path_regex(
                r"^/v1/Accounts/[^/]+/Calls/connect\.json$",
            ))
            .respond_with(SequentialSid {
                prefix: prefix.to_owned(),
                next: std::sync::atomic::AtomicUsize::new(0),
            })
            .mount(&self.exotel)
            .await;
    }

    /// Make the fake Exotel refuse connects with `status` and a JSON RestException.
    pub async fn exotel_refuses(&self, status: u16, message: &str) {
        Mock::given(matchers::method("POST"))
            .and(matchers::path_regex(
                r"^/v1/Accounts/[^/]+/Calls/connect\.json$",
            ))
            .respond_with(
                ResponseTemplate::new(status).set_body_json(serde_json::json!({
                    "RestException": {"Status": status, "Message": message}
                })),
            )
            .mount(&self.exotel)
            .await;
    }

    /// Place a call from the agent `+919876543210` to `to`; returns id, callback URL and sid.
    pub async fn place(&self, t: &TestTenant, to: &str) -> PlacedCall {
        let r = self
            .post_call(
                &t.api_key,
                serde_json::json!({"from": "+919876543210", "to": to}),
            )
            .await;
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
        let body: Value = r.json().await.unwrap();
        let id = body["id"].as_str().unwrap().to_owned();
        let sid = body["exotel_call_sid"].as_str().unwrap().to_owned();
        let url = self
            .connect_requests()
            .await
            .into_iter()
            .filter_map(|form| {
                let mine = form.iter().any(|(k, v)| k == "CustomField" && *v == id);
                mine.then(|| {
                    form.iter()
                        .find(|(k, _)| k == "StatusCallback")
                        .map(|(_, v)| v.clone())
                })
                .flatten()
            })
            .next()
            .expect("the connect for this call");
        PlacedCall { id, url, sid }
    }

    /// GET a call's API view.
    pub async fn view(&self, t: &TestTenant, id: &str) -> Value {
        let r = self.get(&t.api_key, &format!("/api/v1/calls/{id}")).await;
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }

    /// Rows of a raw query (`?` placeholders) as JSON objects.
    pub async fn rows(&self, sql: &str, values: Vec<sea_orm::Value>) -> Vec<Value> {
        use sea_orm::FromQueryResult;
        let backend = self.state.db.get_database_backend();
        sea_orm::JsonValue::find_by_statement(callbridge::db::stmt(backend, sql, values))
            .all(&self.state.db)
            .await
            .unwrap()
    }

    /// A single integer (`SELECT COUNT(*) AS n …`) from a raw query (`?` placeholders).
    pub async fn scalar(&self, sql: &str, values: Vec<sea_orm::Value>) -> i64 {
        let backend = self.state.db.get_database_backend();
        self.state
            .db
            .query_one_raw(callbridge::db::stmt(backend, sql, values))
            .await
            .unwrap()
            .expect("one row")
            .try_get("", "n")
            .unwrap()
    }

    /// Run a raw statement (`?` placeholders); returns rows affected.
    pub async fn exec(&self, sql: &str, values: Vec<sea_orm::Value>) -> u64 {
        let backend = self.state.db.get_database_backend();
        self.state
            .db
            .execute_raw(callbridge::db::stmt(backend, sql, values))
            .await
            .unwrap()
            .rows_affected()
    }

    /// The whole `calls` row of a call, for before/after comparisons.
    pub async fn call_row(&self, id: &str) -> Value {
        self.rows("SELECT * FROM calls WHERE id = ?", vec![id.into()])
            .await
            .pop()
            .expect("call row")
    }

    /// POST the guide's terminal JSON callback (completed, both legs answered) for `c`.
    pub async fn finish(&self, c: &PlacedCall) -> reqwest::Response {
        self.callback(
            &c.url,
            "application/json",
            guide_callback(&c.sid).to_string(),
        )
        .await
    }

    /// Add an agent of `tenant_id` on `phone`, mapped to `crm_user` (`connector:user id`).
    pub async fn add_agent(
        &self,
        tenant_id: &str,
        phone: &str,
        name: Option<&str>,
        crm_user: &str,
    ) -> callbridge::entities::agent::Model {
        tenants::add_agent(
            &self.state.db,
            tenants::NewAgent {
                tenant_id: tenant_id.to_owned(),
                phone: phone.to_owned(),
                name: name.map(str::to_owned),
                crm_users: vec![crm_user.to_owned()],
            },
        )
        .await
        .expect("add agent")
    }

    /// The call's place on the reconciler's schedule: `(due_at, attempts)`, `None` when off it.
    pub async fn schedule(&self, id: &str) -> Option<(i64, i64)> {
        self.rows(
            "SELECT due_at, attempts FROM call_reconcile WHERE call_id = ?",
            vec![id.into()],
        )
        .await
        .pop()
        .map(|r| {
            (
                r["due_at"].as_i64().expect("due_at"),
                r["attempts"].as_i64().expect("attempts"),
            )
        })
    }

    /// Every job row, oldest first.
    pub async fn jobs(&self) -> Vec<Value> {
        self.rows("SELECT * FROM jobs ORDER BY id", vec![]).await
    }

    /// Every request the receiver got on `/hook`, raw.
    pub async fn raw_deliveries(&self) -> Vec<wiremock::Request> {
        self.receiver
            .received_requests()
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r.url.path() == "/hook")
            .collect()
    }

    /// Every request the fake Exotel got for call details.
    pub async fn details_requests(&self) -> Vec<wiremock::Request> {
        self.exotel
            .received_requests()
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r.method.as_str() == "GET" && r.url.path().contains("/Calls/"))
            .collect()
    }
}
