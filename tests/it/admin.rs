//! The admin console over HTTP: login, sessions, CSRF, tenant isolation and every page's
//! reads and writes, with a cookie-keeping client that does not follow redirects (so each
//! redirect is asserted).

use reqwest::{StatusCode, header};
use sea_orm::ConnectionTrait;
use serde_json::json;
use wiremock::{Mock, ResponseTemplate, matchers};

use crate::{both_backends, helpers::*};

pub const PASSWORD: &str = "correct horse battery staple";

/// A browser-like client: keeps cookies, does not follow redirects.
pub struct Browser {
    pub http: reqwest::Client,
    pub base: String,
}

impl Browser {
    pub fn new(app: &TestApp) -> Self {
        Self {
            http: reqwest::Client::builder()
                .cookie_store(true)
                .redirect(reqwest::redirect::Policy::none())
                .timeout(std::time::Duration::from_secs(20))
                .build()
                .unwrap(),
            base: app.base.clone(),
        }
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap()
    }

    /// GET a page that must answer 200; its HTML.
    pub async fn page(&self, path: &str) -> String {
        let r = self.get(path).await;
        assert_eq!(r.status(), StatusCode::OK, "GET {path}");
        r.text().await.unwrap()
    }

    /// POST a form as is (no CSRF token added).
    pub async fn post_raw(&self, path: &str, fields: &[(&str, &str)]) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.base))
            .form(fields)
            .send()
            .await
            .unwrap()
    }

    /// POST a form with the session's CSRF token (read from the home page).
    pub async fn post(&self, path: &str, fields: &[(&str, &str)]) -> reqwest::Response {
        let token = csrf_of(&self.page("/admin").await);
        let mut all: Vec<(&str, &str)> = fields.to_vec();
        all.push(("csrf_token", &token));
        self.post_raw(path, &all).await
    }

    /// Sign in; returns the login POST's response.
    pub async fn login(&self, email: &str, password: &str) -> reqwest::Response {
        let html = self.page("/admin/login").await;
        let token = csrf_of(&html);
        self.post_raw(
            "/admin/login",
            &[
                ("email", email),
                ("password", password),
                ("csrf_token", &token),
                ("next", "/admin"),
            ],
        )
        .await
    }
}

/// The first CSRF token in a page.
pub fn csrf_of(html: &str) -> String {
    let marker = "name=\"csrf_token\" value=\"";
    let start = html.find(marker).expect("a csrf_token field") + marker.len();
    let end = start + html[start..].find('"').unwrap();
    html[start..end].to_owned()
}

pub fn location(r: &reqwest::Response) -> String {
    r.headers()
        .get(header::LOCATION)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// An app, a tenant, its admin, and a signed-in browser.
pub async fn signed_in(app: &TestApp, webhook: bool, email: &str) -> (TestTenant, Browser) {
    let t = app.tenant(webhook).await;
    callbridge::admin::users::create(&app.state.db, &t.id, email, PASSWORD)
        .await
        .unwrap();
    let b = Browser::new(app);
    let r = b.login(email, PASSWORD).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    (t, b)
}

async fn scalar(app: &TestApp, sql: &str) -> Option<String> {
    let row = app
        .state
        .db
        .query_one_raw(sea_orm::Statement::from_string(
            app.state.db.get_database_backend(),
            sql.to_owned(),
        ))
        .await
        .unwrap()?;
    row.try_get_by_index::<Option<String>>(0).unwrap()
}

async fn scalar_i64(app: &TestApp, sql: &str) -> i64 {
    let row = app
        .state
        .db
        .query_one_raw(sea_orm::Statement::from_string(
            app.state.db.get_database_backend(),
            sql.to_owned(),
        ))
        .await
        .unwrap()
        .unwrap();
    row.try_get_by_index::<i64>(0)
        .or_else(|_| row.try_get_by_index::<i32>(0).map(i64::from))
        .unwrap()
}

both_backends!(
    login_succeeds_only_with_the_right_password,
    repeated_failures_are_throttled,
    pages_require_a_session,
    logout_ends_the_session,
    writes_without_the_csrf_token_are_refused,
    settings_round_trip_keeps_the_token_sealed,
    webhook_secrets_are_shown_once,
    test_connection_reports_success_and_exotel_errors,
    calls_list_filters,
    timeline_shows_requests_callbacks_and_every_attempt,
    dead_letters_can_be_retried_and_discarded,
    admins_only_see_their_own_tenant,
    agents_can_be_added_edited_and_removed,
    the_cli_creates_admins_with_a_password_from_stdin,
);

async fn login_succeeds_only_with_the_right_password(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let t = app.tenant(false).await;
    callbridge::admin::users::create(&app.state.db, &t.id, "Ops@Acme.example", PASSWORD)
        .await
        .unwrap();
    let stored = scalar(&app, "SELECT password_hash FROM admin_users")
        .await
        .unwrap();
    assert!(stored.starts_with("$argon2id$"), "{stored}");
    assert!(!stored.contains(PASSWORD));

    let b = Browser::new(&app);
    for (email, pw) in [
        ("ops@acme.example", "wrong password!!"),
        ("nobody@acme.example", PASSWORD),
    ] {
        let r = b.login(email, pw).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert!(r.text().await.unwrap().contains("Wrong email or password."));
    }
    assert_eq!(app.count("admin_sessions").await, 0);
    assert_eq!(
        location(&b.get("/admin").await),
        "/admin/login?next=%2Fadmin"
    );

    // Emails are matched case-insensitively; the cookie is HttpOnly, SameSite=Lax, not Secure
    // over http.
    let r = b.login("OPS@acme.example", PASSWORD).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&r), "/admin");
    let cookie = r
        .headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .find(|c| c.starts_with("cb_admin="))
        .expect("session cookie");
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax"),
        "{cookie}"
    );
    assert!(!cookie.contains("Secure"), "{cookie}");
    let token = cookie
        .split(';')
        .next()
        .unwrap()
        .trim_start_matches("cb_admin=");
    assert!(token.len() >= 43, "256-bit session id");
    let stored = scalar(&app, "SELECT id FROM admin_sessions").await.unwrap();
    assert_ne!(stored, token, "only the hash is stored");
    assert!(b.page("/admin").await.contains("Acme"));
    assert!(
        scalar(
            &app,
            "SELECT email FROM admin_users WHERE last_login_at IS NOT NULL"
        )
        .await
        .is_some()
    );

    // A login POST without the login form's token writes nothing.
    let fresh = Browser::new(&app);
    let r = fresh
        .post_raw(
            "/admin/login",
            &[("email", "ops@acme.example"), ("password", PASSWORD)],
        )
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(app.count("admin_sessions").await, 1);

    // Over https the cookie is Secure.
    let https = TestApp::spawn_with(backend, |c| {
        c.public_url = Some("https://cb.example".into());
    })
    .await;
    let t = https.tenant(false).await;
    callbridge::admin::users::create(&https.state.db, &t.id, "a@b.example", PASSWORD)
        .await
        .unwrap();
    let r = Browser::new(&https).login("a@b.example", PASSWORD).await;
    let secure = r
        .headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .find(|c| c.starts_with("cb_admin="))
        .unwrap();
    assert!(secure.contains("Secure"), "{secure}");
}

async fn repeated_failures_are_throttled(backend: Backend) {
    let app = TestApp::spawn_with(backend, |c| c.admin_login_max_failures = 3).await;
    let t = app.tenant(false).await;
    callbridge::admin::users::create(&app.state.db, &t.id, "ops@acme.example", PASSWORD)
        .await
        .unwrap();
    let b = Browser::new(&app);
    for _ in 0..3 {
        let r = b.login("ops@acme.example", "not the password").await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }
    // Locked for the window, even with the right password.
    let r = b.login("ops@acme.example", PASSWORD).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(r.text().await.unwrap().contains("Too many failed sign-ins"));
    assert_eq!(app.count("admin_sessions").await, 0);
    // Another email from the same client is not locked yet (the IP allows 4× as many).
    callbridge::admin::users::create(&app.state.db, &t.id, "two@acme.example", PASSWORD)
        .await
        .unwrap();
    assert_eq!(
        b.login("two@acme.example", PASSWORD).await.status(),
        StatusCode::SEE_OTHER
    );
}

async fn pages_require_a_session(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let t = app.tenant(false).await;
    let b = Browser::new(&app);
    for path in [
        "/admin",
        "/admin/settings",
        "/admin/calls?status=busy",
        "/admin/calls/call_x",
        "/admin/dead-letters",
        "/admin/agents",
    ] {
        let r = b.get(path).await;
        assert_eq!(r.status(), StatusCode::SEE_OTHER, "{path}");
        assert!(
            location(&r).starts_with("/admin/login?next=%2Fadmin"),
            "{path}"
        );
    }
    // A POST without a session redirects and writes nothing.
    let r = b
        .post_raw(
            "/admin/agents",
            &[("phone", "+919876543210"), ("csrf_token", "x")],
        )
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&r), "/admin/login");
    assert_eq!(app.count("agents").await, 0);
    // A forged cookie is no session.
    let r = app
        .http
        .get(format!("{}/admin", app.base))
        .header(
            header::COOKIE,
            "cb_admin=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        )
        .send()
        .await
        .unwrap();
    assert!(
        r.url().path().starts_with("/admin/login"),
        "followed to the login page"
    );
    let _ = t;
}

async fn logout_ends_the_session(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (_t, b) = signed_in(&app, false, "ops@acme.example").await;
    // Keep a copy of the cookie, as an attacker who stole it would.
    let stolen = {
        let r = Browser::new(&app);
        let resp = r.login("ops@acme.example", PASSWORD).await;
        resp.headers()
            .get_all(header::SET_COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .find(|c| c.starts_with("cb_admin="))
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_owned()
    };
    let with_stolen = |path: &str| {
        app.http
            .get(format!("{}{path}", app.base))
            .header(header::COOKIE, stolen.clone())
            .send()
    };
    assert_eq!(with_stolen("/admin").await.unwrap().url().path(), "/admin");
    assert_eq!(app.count("admin_sessions").await, 2);

    let r = b.post("/admin/logout", &[]).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert!(location(&r).starts_with("/admin/login"));
    assert_eq!(app.count("admin_sessions").await, 1);
    assert_eq!(b.get("/admin").await.status(), StatusCode::SEE_OTHER);

    // Logging the stolen session out (with its own CSRF token) ends it server-side too.
    let html = with_stolen("/admin").await.unwrap().text().await.unwrap();
    let r = app
        .http
        .post(format!("{}/admin/logout", app.base))
        .header(header::COOKIE, stolen.clone())
        .form(&[("csrf_token", csrf_of(&html))])
        .send()
        .await
        .unwrap();
    assert!(r.url().path().starts_with("/admin/login"));
    assert_eq!(app.count("admin_sessions").await, 0);
    assert!(
        with_stolen("/admin")
            .await
            .unwrap()
            .url()
            .path()
            .starts_with("/admin/login")
    );
}

async fn writes_without_the_csrf_token_are_refused(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (t, b) = signed_in(&app, false, "ops@acme.example").await;
    let fields = [
        ("name", "Renamed"),
        ("exotel_sid", "acme1"),
        ("exotel_api_key", "key123"),
        ("api_base", "sg"),
        ("default_region", "IN"),
    ];
    let r = b.post_raw("/admin/settings", &fields).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("did not come from this site")
    );
    let mut wrong = fields.to_vec();
    wrong.push(("csrf_token", "not-the-token-not-the-token-not-the-token-xx"));
    assert_eq!(
        b.post_raw("/admin/settings", &wrong).await.status(),
        StatusCode::FORBIDDEN
    );
    let r = b
        .post_raw("/admin/agents", &[("phone", "+919876543210")])
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        b.post_raw("/admin/logout", &[]).await.status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        b.post_raw("/admin/settings/rotate-webhook-secret", &[])
            .await
            .status(),
        StatusCode::FORBIDDEN
    );
    let name = scalar(
        &app,
        &format!("SELECT name FROM tenants WHERE id = '{}'", t.id),
    )
    .await;
    assert_eq!(name.as_deref(), Some("Acme"));
    assert_eq!(app.count("agents").await, 0);
    assert_eq!(app.count("admin_sessions").await, 1, "still signed in");

    // The header works as well as the field.
    let token = csrf_of(&b.page("/admin").await);
    let r = b
        .http
        .post(format!("{}/admin/agents", b.base))
        .header("x-csrf-token", token)
        .form(&[("phone", "+919876543210")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(app.count("agents").await, 1);
}

async fn settings_round_trip_keeps_the_token_sealed(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (t, b) = signed_in(&app, false, "ops@acme.example").await;
    let html = b.page("/admin/settings").await;
    assert!(html.contains("••••n456"), "last four of token456");
    assert!(!html.contains("token456"));

    let r = b
        .post(
            "/admin/settings",
            &[
                ("name", "Acme India"),
                ("exotel_sid", "acme2"),
                ("exotel_api_key", "key789"),
                ("exotel_api_token", "brand-new-token-9876"),
                ("api_base", "in"),
                ("caller_id", "080 4711 2299"),
                ("record", "on"),
                ("time_limit", "3600"),
                ("time_out", "45"),
                ("wait_url", "https://cdn.example/wait-v2.wav"),
                ("default_region", "in"),
                ("webhook_url", ""),
            ],
        )
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&r), "/admin/settings?notice=saved");
    let html = b.page("/admin/settings?notice=saved").await;
    assert!(html.contains("Settings saved."));
    assert!(html.contains("••••9876"));
    assert!(!html.contains("brand-new-token"));
    assert!(html.contains("+918047112299"));
    assert!(html.contains("value=\"in\" selected"));

    let sealed = scalar(
        &app,
        &format!(
            "SELECT exotel_api_token_sealed FROM tenants WHERE id = '{}'",
            t.id
        ),
    )
    .await
    .unwrap();
    assert!(!sealed.contains("brand-new-token"), "sealed at rest");
    assert_eq!(
        app.state.sealer.open(&sealed).unwrap(),
        "brand-new-token-9876"
    );
    let base = scalar(&app, "SELECT exotel_api_base FROM tenants")
        .await
        .unwrap();
    assert_eq!(base, "https://api.in.exotel.com");
    assert_eq!(
        scalar_i64(&app, "SELECT time_limit FROM tenants").await,
        3600
    );

    // A blank token keeps the stored one; an invalid form writes nothing and says why.
    let keep = [
        ("name", "Acme India"),
        ("exotel_sid", "acme2"),
        ("exotel_api_key", "key789"),
        ("exotel_api_token", ""),
        ("api_base", "custom"),
        ("api_base_custom", "http://127.0.0.1:9/exotel"),
        ("default_region", "IN"),
    ];
    assert_eq!(
        b.post("/admin/settings", &keep).await.status(),
        StatusCode::SEE_OTHER
    );
    let sealed2 = scalar(&app, "SELECT exotel_api_token_sealed FROM tenants")
        .await
        .unwrap();
    assert_eq!(
        app.state.sealer.open(&sealed2).unwrap(),
        "brand-new-token-9876"
    );
    assert_eq!(
        scalar(&app, "SELECT time_limit FROM tenants").await,
        None,
        "cleared TimeLimit"
    );
    let bad = [
        ("name", "Broken"),
        ("exotel_sid", "acme 3"),
        ("exotel_api_key", "key789"),
        ("exotel_api_token", "another-token"),
        ("api_base", "sg"),
        ("time_out", "999"),
        ("default_region", "IN"),
        ("caller_id", "12"),
    ];
    let r = b.post("/admin/settings", &bad).await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let html = r.text().await.unwrap();
    assert!(html.contains("Nothing was saved"));
    assert!(html.contains("Account SID must be a non-empty value without spaces"));
    assert!(html.contains("TimeOut must be a whole number"));
    assert!(
        !html.contains("another-token"),
        "a typed token is not echoed"
    );
    assert_eq!(
        scalar(&app, "SELECT name FROM tenants").await.as_deref(),
        Some("Acme India")
    );
}

async fn webhook_secrets_are_shown_once(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (_t, b) = signed_in(&app, false, "ops@acme.example").await;
    let html = b.page("/admin/settings").await;
    assert!(!html.contains("Rotate webhook secret"), "no webhook yet");
    let fields = [
        ("name", "Acme"),
        ("exotel_sid", "acme1"),
        ("exotel_api_key", "key123"),
        ("api_base", "sg"),
        ("default_region", "IN"),
        ("webhook_url", "https://crm.example/hook"),
    ];
    let r = b.post("/admin/settings", &fields).await;
    assert_eq!(r.status(), StatusCode::OK);
    let html = r.text().await.unwrap();
    let secret = between(&html, "id=\"new-webhook-secret\">", "<");
    assert!(secret.starts_with("whsec_"), "{secret}");
    let sealed = scalar(&app, "SELECT webhook_secret_sealed FROM tenants")
        .await
        .unwrap();
    assert_eq!(app.state.sealer.open(&sealed).unwrap(), secret);

    let html = b.page("/admin/settings").await;
    assert!(!html.contains(&secret), "shown once");
    assert!(html.contains(&format!("••••{}", &secret[secret.len() - 4..])));

    let r = b.post("/admin/settings/rotate-webhook-secret", &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    let rotated = between(&r.text().await.unwrap(), "id=\"new-webhook-secret\">", "<");
    assert_ne!(rotated, secret);
    let sealed = scalar(&app, "SELECT webhook_secret_sealed FROM tenants")
        .await
        .unwrap();
    assert_eq!(app.state.sealer.open(&sealed).unwrap(), rotated);
}

fn between(html: &str, start: &str, end: &str) -> String {
    let s = html
        .find(start)
        .unwrap_or_else(|| panic!("{start} in page"))
        + start.len();
    let e = s + html[s..].find(end).unwrap();
    html[s..e].trim().to_owned()
}

async fn test_connection_reports_success_and_exotel_errors(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (_t, b) = signed_in(&app, false, "ops@acme.example").await;
    Mock::given(matchers::method("GET"))
        .and(matchers::path("/v1/Accounts/acme1/Calls.json"))
        .and(matchers::query_param("PageSize", "1"))
        // key123:token456
        .and(matchers::header(
            "authorization",
            "Basic a2V5MTIzOnRva2VuNDU2",
        ))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"Metadata": {}, "Calls": []})),
        )
        .expect(1)
        .mount(&app.exotel)
        .await;
    let r = b.post("/admin/settings/test-connection", &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    let html = r.text().await.unwrap();
    assert!(html.contains("Connected."), "{html}");
    app.exotel.verify().await;

    app.exotel.reset().await;
    Mock::given(matchers::method("GET"))
        .and(matchers::path("/v1/Accounts/acme1/Calls.json"))
        .respond_with(ResponseTemplate::new(401).set_body_json(json!({
            "RestException": {"Status": 401, "Message": "Authentication is required to view this page."}
        })))
        .mount(&app.exotel)
        .await;
    let html = b
        .post("/admin/settings/test-connection", &[])
        .await
        .text()
        .await
        .unwrap();
    assert!(html.contains("Failed."));
    assert!(
        html.contains("Exotel answered HTTP 401: Authentication is required to view this page.")
    );
    assert!(!html.contains("token456"));
}

/// Make the fake Exotel refuse connects to `to` with a 400 and a message.
async fn exotel_refuses(app: &TestApp, to: &str, message: &str) {
    let encoded: String = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("To", to)
        .finish();
    Mock::given(matchers::method("POST"))
        .and(matchers::path_regex(r"/Calls/connect\.json$"))
        .and(matchers::body_string_contains(encoded))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({
            "RestException": {"Status": 400, "Message": message}
        })))
        .with_priority(1)
        .mount(&app.exotel)
        .await;
}

fn today_in_ist(days: i64) -> String {
    let offset = chrono::FixedOffset::east_opt(5 * 3600 + 1800).unwrap();
    (chrono::Utc::now().with_timezone(&offset).date_naive() + chrono::Duration::days(days))
        .format("%Y-%m-%d")
        .to_string()
}

async fn calls_list_filters(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (t, b) = signed_in(&app, false, "ops@acme.example").await;
    app.exotel_accepts("sidA").await;
    exotel_refuses(&app, "+919800000003", "To is not a valid number").await;
    let (done, url) = app.place_call(&t, "+919800000001").await;
    app.callback(&url, "application/json", guide_callback("sidA").to_string())
        .await;
    // Exotel gives every call its own sid.
    app.exotel.reset().await;
    app.exotel_accepts("sidB").await;
    exotel_refuses(&app, "+919800000003", "To is not a valid number").await;
    let (open, _) = app.place_call(&t, "+919800000002").await;
    let r = app
        .post_call(
            &t.api_key,
            json!({"from": "+919876543210", "to": "+919800000003"}),
        )
        .await;
    assert_eq!(r.status(), 502);
    let failed: String = r.json::<serde_json::Value>().await.unwrap()["call_id"]
        .as_str()
        .unwrap()
        .to_owned();

    let html = b.page("/admin/calls").await;
    for id in [&done, &open, &failed] {
        assert!(html.contains(id.as_str()), "{id} listed");
    }
    // Newest first.
    assert!(html.find(failed.as_str()) < html.find(done.as_str()));

    let html = b.page("/admin/calls?status=completed").await;
    assert!(
        html.contains(done.as_str())
            && !html.contains(open.as_str())
            && !html.contains(failed.as_str())
    );
    let html = b.page("/admin/calls?status=failed").await;
    assert!(html.contains(failed.as_str()) && !html.contains(done.as_str()));
    let html = b.page("/admin/calls?number=98000%2000002").await;
    assert!(html.contains(open.as_str()) && !html.contains(done.as_str()));
    let html = b.page("/admin/calls?number=%2B919800000001").await;
    assert!(html.contains(done.as_str()) && !html.contains(open.as_str()));
    let html = b.page("/admin/calls?direction=inbound").await;
    assert!(html.contains("No calls match."));
    let html = b
        .page(&format!(
            "/admin/calls?from={}&to={}",
            today_in_ist(0),
            today_in_ist(0)
        ))
        .await;
    assert!(html.contains(done.as_str()) && html.contains(open.as_str()));
    let html = b
        .page(&format!("/admin/calls?from={}", today_in_ist(1)))
        .await;
    assert!(html.contains("No calls match."));
    let html = b
        .page(&format!("/admin/calls?to={}", today_in_ist(-1)))
        .await;
    assert!(html.contains("No calls match."));
    let html = b.page("/admin/calls?from=26-11-2026").await;
    assert!(html.contains("From date must be a date like 2026-11-26"));
    let html = b.page("/admin/calls?status=bogus").await;
    assert!(html.contains("Unknown status"));
}

async fn timeline_shows_requests_callbacks_and_every_attempt(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (t, b) = signed_in(&app, true, "ops@acme.example").await;
    app.exotel_accepts("sidT1").await;
    app.receiver_answers(500).await;
    let (id, url) = app.place_call(&t, "+919812345678").await;
    let html = b.page(&format!("/admin/calls/{id}")).await;
    assert!(html.contains("Exotel accepted it: CallSid <span class=\"mono\">sidT1</span>"));
    assert!(html.contains("No final callback yet."));

    assert_eq!(
        app.callback(
            &url,
            "application/json",
            guide_callback("sidT1").to_string()
        )
        .await
        .status(),
        200
    );
    // Five attempts (the test config's max), zero backoff: the job dies.
    assert_eq!(app.drain_jobs().await, 5);
    let html = b.page(&format!("/admin/calls/{id}")).await;
    assert!(
        html.contains("Exotel&#x27;s StatusCallback") || html.contains("Exotel's StatusCallback"),
        "source shown"
    );
    assert!(
        html.contains("&#34;CallSid&#34;: &#34;sidT1&#34;"),
        "pretty payload, escaped"
    );
    assert!(
        html.contains("exotelrecordings/acme1/xxdewfcwsdw.mp3"),
        "recording link"
    );
    assert!(html.contains("<td data-label=\"Party\">agent</td>"));
    assert!(
        html.contains("41 s") && html.contains("32 s"),
        "leg durations"
    );
    assert!(html.contains("5 of 5 attempts"));
    assert_eq!(
        html.matches("<td data-label=\"HTTP\" class=\"num\">500</td>")
            .count(),
        5
    );
    assert!(html.contains("gave up after 5 attempts"));
    assert!(html.contains("<span class=\"pill dead\">dead</span>"));
    for n in 1..=5 {
        assert!(html.contains(&format!(
            "<td data-label=\"Attempt\" class=\"num\">{n}</td>"
        )));
    }

    // A call Exotel refused shows Exotel's message.
    exotel_refuses(&app, "+919800000009", "Call to DND number blocked").await;
    let r = app
        .post_call(
            &t.api_key,
            json!({"from": "+919876543210", "to": "+919800000009"}),
        )
        .await;
    let failed = r.json::<serde_json::Value>().await.unwrap()["call_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let html = b.page(&format!("/admin/calls/{failed}")).await;
    assert!(html.contains("Call to DND number blocked"));
    assert!(html.contains("Nothing to deliver until the call ends."));
    assert_eq!(
        b.get("/admin/calls/call_doesnotexist").await.status(),
        StatusCode::NOT_FOUND
    );
}

async fn dead_letters_can_be_retried_and_discarded(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (t, b) = signed_in(&app, true, "ops@acme.example").await;
    app.exotel_accepts("sidD1").await;
    app.receiver_answers(500).await;
    let (first, url1) = app.place_call(&t, "+919800000011").await;
    app.callback(
        &url1,
        "application/json",
        guide_callback("sidD1").to_string(),
    )
    .await;
    app.exotel.reset().await;
    app.exotel_accepts("sidD2").await;
    let (_second, url2) = app.place_call(&t, "+919800000012").await;
    app.callback(
        &url2,
        "application/json",
        guide_callback("sidD2").to_string(),
    )
    .await;
    app.drain_jobs().await;
    assert_eq!(
        scalar_i64(&app, "SELECT COUNT(*) FROM jobs WHERE state = 'dead'").await,
        2
    );

    let html = b.page("/admin/dead-letters").await;
    assert!(html.contains("gave up after 5 attempts"));
    assert!(html.contains(first.as_str()));
    let home = b.page("/admin").await;
    assert!(
        home.contains("<strong style=\"font-size:1.6rem\">2</strong>"),
        "dashboard count"
    );
    let job1 = scalar_i64(
        &app,
        &format!("SELECT id FROM jobs WHERE call_id = '{first}'"),
    )
    .await;
    let job2 = scalar_i64(
        &app,
        &format!("SELECT id FROM jobs WHERE call_id <> '{first}'"),
    )
    .await;

    // Without the token: refused, unchanged.
    let r = b
        .post_raw(&format!("/admin/dead-letters/{job1}/retry"), &[])
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        scalar_i64(&app, "SELECT COUNT(*) FROM jobs WHERE state = 'dead'").await,
        2
    );

    app.receiver.reset().await;
    app.receiver_answers(200).await;
    let r = b
        .post(&format!("/admin/dead-letters/{job1}/retry"), &[])
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&r), "/admin/dead-letters?notice=retried");
    let (state, max): (String, i64) = {
        let s = scalar(&app, &format!("SELECT state FROM jobs WHERE id = {job1}"))
            .await
            .unwrap();
        (
            s,
            scalar_i64(
                &app,
                &format!("SELECT max_attempts FROM jobs WHERE id = {job1}"),
            )
            .await,
        )
    };
    assert_eq!(state, "queued");
    assert_eq!(max, 10, "a fresh round of attempts");
    assert_eq!(app.drain_jobs().await, 1);
    assert_eq!(
        scalar(&app, &format!("SELECT state FROM jobs WHERE id = {job1}"))
            .await
            .as_deref(),
        Some("done")
    );
    let html = b.page(&format!("/admin/calls/{first}")).await;
    assert!(html.contains("<td data-label=\"Attempt\" class=\"num\">6</td>"));
    assert!(html.contains("<td data-label=\"HTTP\" class=\"num\">200</td>"));

    let r = b
        .post(&format!("/admin/dead-letters/{job2}/discard"), &[])
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        scalar(&app, &format!("SELECT state FROM jobs WHERE id = {job2}"))
            .await
            .as_deref(),
        Some("discarded")
    );
    assert!(
        b.page("/admin/dead-letters")
            .await
            .contains("No dead letters.")
    );
    // Neither is dead any more: both actions answer 404.
    for action in ["retry", "discard"] {
        let r = b
            .post(&format!("/admin/dead-letters/{job2}/{action}"), &[])
            .await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
    }
    assert_eq!(app.drain_jobs().await, 0, "discarded jobs are not run");
}

async fn admins_only_see_their_own_tenant(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (a, _admin_a) = signed_in(&app, true, "a@acme.example").await;
    let (_b_tenant, admin_b) = signed_in(&app, false, "b@other.example").await;
    app.exotel_accepts("sidI1").await;
    app.receiver_answers(500).await;
    let (call_a, url) = app.place_call(&a, "+919812345678").await;
    app.callback(
        &url,
        "application/json",
        guide_callback("sidI1").to_string(),
    )
    .await;
    app.drain_jobs().await;
    let job_a = scalar_i64(&app, "SELECT id FROM jobs").await;
    let agent_a = app
        .add_agent(&a.id, "+919876543210", Some("Asha"), "pipedrive:7")
        .await;

    assert_eq!(
        admin_b
            .get(&format!("/admin/calls/{call_a}"))
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
    assert!(!admin_b.page("/admin/calls").await.contains(call_a.as_str()));
    assert!(
        admin_b
            .page("/admin/dead-letters")
            .await
            .contains("No dead letters.")
    );
    assert!(!admin_b.page("/admin/agents").await.contains("Asha"));
    assert_eq!(
        admin_b
            .post(&format!("/admin/dead-letters/{job_a}/retry"), &[])
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        admin_b
            .get(&format!("/admin/agents/{}", agent_a.id))
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        admin_b
            .post(
                &format!("/admin/agents/{}", agent_a.id),
                &[("phone", "+919999999999")]
            )
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        admin_b
            .post(&format!("/admin/agents/{}/delete", agent_a.id), &[])
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(app.count("agents").await, 1);
    assert_eq!(app.count("agent_crm_users").await, 1);
    assert_eq!(
        scalar(&app, "SELECT state FROM jobs").await.as_deref(),
        Some("dead")
    );
    // B's home counts nothing of A's.
    let home = admin_b.page("/admin").await;
    assert!(home.contains("No calls yet today."));
}

async fn agents_can_be_added_edited_and_removed(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (_t, b) = signed_in(&app, false, "ops@acme.example").await;
    let r = b
        .post(
            "/admin/agents",
            &[
                ("name", "Asha"),
                ("phone", "098765 43210"),
                ("crm_users", "pipedrive:42\nzoho:9001"),
            ],
        )
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let html = b.page("/admin/agents?notice=added").await;
    assert!(html.contains("Agent saved."));
    assert!(html.contains("+919876543210"));
    assert!(html.contains("<code>pipedrive:42</code>") && html.contains("<code>zoho:9001</code>"));

    let r = b.post("/admin/agents", &[("phone", "12")]).await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.text().await.unwrap().contains("Phone:"));
    let r = b
        .post(
            "/admin/agents",
            &[("phone", "+919811111111"), ("crm_users", "nocolon")],
        )
        .await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(app.count("agents").await, 1);

    let id = scalar(&app, "SELECT id FROM agents").await.unwrap();
    let edit = b.page(&format!("/admin/agents/{id}")).await;
    assert!(edit.contains("pipedrive:42\nzoho:9001"));
    let r = b
        .post(
            &format!("/admin/agents/{id}"),
            &[
                ("name", "Asha K"),
                ("phone", "+91 98765 00000"),
                ("crm_users", "pipedrive:43"),
            ],
        )
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let html = b.page("/admin/agents").await;
    assert!(html.contains("Asha K") && html.contains("+919876500000"));
    assert!(html.contains("pipedrive:43") && !html.contains("zoho:9001"));
    assert_eq!(app.count("agent_crm_users").await, 1);

    let r = b.post(&format!("/admin/agents/{id}/delete"), &[]).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert!(b.page("/admin/agents").await.contains("No agents yet."));
    assert_eq!(app.count("agents").await, 0);
    assert_eq!(app.count("agent_crm_users").await, 0);
    assert_eq!(
        b.post(&format!("/admin/agents/{id}/delete"), &[])
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
}

async fn the_cli_creates_admins_with_a_password_from_stdin(backend: Backend) {
    use std::io::Write;
    let app = TestApp::spawn(backend).await;
    let t = app.tenant(false).await;
    let run = |email: &str, password: &str| {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_callbridge"))
            .args([
                "admin",
                "create",
                "--tenant",
                &t.id,
                "--email",
                email,
                "--password-stdin",
            ])
            .env("DATABASE_URL", &app.config.database_url)
            .env(
                "CALLBRIDGE_MASTER_KEY",
                secrecy::ExposeSecret::expose_secret(app.config.master_key.as_ref().unwrap()),
            )
            .env_remove("CALLBRIDGE_CONFIG")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
        child.wait_with_output().unwrap()
    };
    let out = run("cli@acme.example", "short");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("at least 12 characters"), "{err}");
    assert_eq!(app.count("admin_users").await, 0);

    let out = run("cli@acme.example", PASSWORD);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(created["email"], "cli@acme.example");
    assert_eq!(created["tenant_id"], t.id.as_str());

    let out = run("CLI@acme.example", PASSWORD);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));

    let b = Browser::new(&app);
    assert_eq!(
        b.login("cli@acme.example", PASSWORD).await.status(),
        StatusCode::SEE_OTHER
    );
}
