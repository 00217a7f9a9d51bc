//! The Pipedrive connector inside the host, against a fake Pipedrive (wiremock: the OAuth host
//! and the company's `api_domain` host) shaped like ../shared/docs/crm-pipedrive-zendesk.md §1:
//! OAuth install with Basic client auth and `api_domain`, the marketplace path, the
//! app-extension panel and a JWT-verified click, the call log written once with the recording
//! file uploaded from Exotel (409 = already there), 401 → refresh, 429, and the `DELETE`
//! uninstall callback.

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{Value, json};
use wiremock::{Mock, MockServer, ResponseTemplate, matchers};

use crate::{
    admin::{Browser, location, signed_in},
    both_backends,
    helpers::*,
};

const CLIENT_ID: &str = "pd-client-1";
const CLIENT_SECRET: &str = "pd-secret-abcdefghijklmnop";
const COMPANY: i64 = 7788;
const PD_USER: i64 = 123;
const AGENT: &str = "+919876543210";
const REC_PATH: &str = "/exotelrecordings/acme1/pd.mp3";

struct Pd {
    app: TestApp,
    oauth: MockServer,
    api: MockServer,
    rec: MockServer,
    t: TestTenant,
    b: Browser,
}

fn basic() -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"))
    )
}

fn token_answer(api: &MockServer, n: u32) -> Value {
    json!({"access_token": format!("v1u:pd-access-{n}"), "token_type": "Bearer",
           "refresh_token": "pd-refresh-1", "scope": "base,phone-integration",
           "expires_in": 3599, "api_domain": api.uri()})
}

async fn setup(backend: Backend) -> Pd {
    let oauth = MockServer::start().await;
    let api = MockServer::start().await;
    let rec = MockServer::start().await;
    let (oauth_uri, api_host) = (oauth.uri(), "127.0.0.1".to_owned());
    let app = TestApp::spawn_with(backend, move |c| {
        c.pipedrive_client_id = Some(CLIENT_ID.into());
        c.pipedrive_client_secret = Some(CLIENT_SECRET.into());
        c.pipedrive_oauth_base = oauth_uri;
        c.pipedrive_api_hosts = vec![api_host];
        c.recording_allow_loopback_http = true;
    })
    .await;
    let (t, b) = signed_in(&app, false, "admin@acme.example").await;
    // The code exchange and refresh, with our client credentials as Basic auth.
    Mock::given(matchers::method("POST"))
        .and(matchers::path("/oauth/token"))
        .and(matchers::header("authorization", basic().as_str()))
        .and(matchers::body_string_contains(
            "grant_type=authorization_code",
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(token_answer(&api, 1)))
        .mount(&oauth)
        .await;
    Mock::given(matchers::method("POST"))
        .and(matchers::path("/oauth/token"))
        .and(matchers::header("authorization", basic().as_str()))
        .and(matchers::body_string_contains("grant_type=refresh_token"))
        .respond_with(ResponseTemplate::new(200).set_body_json(token_answer(&api, 2)))
        .mount(&oauth)
        .await;
    Mock::given(matchers::method("POST"))
        .and(matchers::path("/oauth/revoke"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&oauth)
        .await;
    Mock::given(matchers::method("GET"))
        .and(matchers::path("/api/v1/users/me"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"success": true,
            "data": {"id": PD_USER, "name": "Priya", "company_id": COMPANY,
                     "company_name": "Acme", "company_domain": "acme"}})),
        )
        .mount(&api)
        .await;
    // The recording on "Exotel's" host, behind the tenant's credentials.
    Mock::given(matchers::method("GET"))
        .and(matchers::path(REC_PATH))
        .and(matchers::basic_auth("key123", "token456"))
        .respond_with(
            ResponseTemplate::new(200).set_body_raw(b"ID3fake-mp3".to_vec(), "audio/mpeg"),
        )
        .mount(&rec)
        .await;
    Pd {
        app,
        oauth,
        api,
        rec,
        t,
        b,
    }
}

async fn install(pd: &Pd) {
    let r = pd.b.get("/oauth/pipedrive/start").await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let to = url::Url::parse(&location(&r)).unwrap();
    assert_eq!(to.path(), "/oauth/authorize");
    let q: Vec<(String, String)> = to.query_pairs().into_owned().collect();
    let state = q.iter().find(|(k, _)| k == "state").unwrap().1.clone();
    assert!(q.iter().any(|(k, v)| k == "client_id" && v == CLIENT_ID));
    assert!(
        !q.iter().any(|(k, _)| k == "code_challenge"),
        "Pipedrive takes no PKCE"
    );
    // Pipedrive sends the admin back with a code.
    let r =
        pd.b.get(&format!(
            "/oauth/pipedrive/callback?code=pd-code&state={state}"
        ))
        .await;
    assert_eq!(
        r.status(),
        StatusCode::SEE_OTHER,
        "{}",
        r.text().await.unwrap()
    );
    assert_eq!(location(&r), "/admin/connectors?installed=pipedrive");
}

async fn map_agent(pd: &Pd) {
    pd.app
        .add_agent(
            &pd.t.id,
            AGENT,
            Some("Priya"),
            &format!("pipedrive:{PD_USER}"),
        )
        .await;
}

fn jwt(secret: &str, exp_offset: i64) -> String {
    let claims = json!({"userId": PD_USER, "companyId": COMPANY,
                        "exp": chrono::Utc::now().timestamp() + exp_offset});
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

async fn click(pd: &Pd, token: &str) -> reqwest::Response {
    pd.app
        .http
        .post(format!("{}/crm/pipedrive/click", pd.app.base))
        .json(&json!({"token": token, "context": {"invoker": "user",
            "phone": "+91 98123 45678", "personId": 55, "dealId": 9}}))
        .send()
        .await
        .unwrap()
}

async fn finished_click(pd: &Pd, sid: &str) -> String {
    pd.app.exotel_accepts(sid).await;
    let r = click(pd, &jwt(CLIENT_SECRET, 300)).await;
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "{}",
        r.text().await.unwrap()
    );
    let body: Value = r.json().await.unwrap();
    let mut cb = guide_callback(sid);
    cb["RecordingUrl"] = Value::String(format!("{}{REC_PATH}", pd.rec.uri()));
    let r = pd
        .app
        .callback(
            &pd.app.last_status_callback().await,
            "application/json",
            cb.to_string(),
        )
        .await;
    assert_eq!(r.status(), 200);
    body["call"]["id"].as_str().unwrap().to_owned()
}

async fn requests(server: &MockServer, method: &str, path_prefix: &str) -> Vec<wiremock::Request> {
    server
        .received_requests()
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.method.as_str() == method && r.url.path().starts_with(path_prefix))
        .collect()
}

both_backends!(
    pipedrive_installs_with_basic_auth_and_its_company,
    a_panel_click_is_logged_once_with_the_recording_uploaded,
    pipedrive_clicks_need_a_valid_extension_token,
    an_expired_pipedrive_token_is_refreshed_and_429_waits,
    pipedrive_uninstall_callback_removes_the_install,
    a_pipedrive_marketplace_install_is_confirmed_first,
);

async fn pipedrive_installs_with_basic_auth_and_its_company(backend: Backend) {
    let pd = setup(backend).await;
    install(&pd).await;
    let rows = pd
        .app
        .rows(
            "SELECT account_id, api_base, access_token_sealed FROM installations \
             WHERE connector = 'pipedrive'",
            vec![],
        )
        .await;
    assert_eq!(rows[0]["account_id"], COMPANY.to_string());
    assert_eq!(rows[0]["api_base"], pd.api.uri());
    assert_eq!(
        pd.app
            .state
            .sealer
            .open(rows[0]["access_token_sealed"].as_str().unwrap())
            .unwrap(),
        "v1u:pd-access-1"
    );
    let exchange = &requests(&pd.oauth, "POST", "/oauth/token").await[0];
    let body = String::from_utf8_lossy(&exchange.body);
    assert!(body.contains("code=pd-code"));
    assert!(
        !body.contains(CLIENT_SECRET),
        "the secret goes in the Basic header only"
    );
    // The console shows where to point Pipedrive.
    let page = pd.b.page("/admin/connectors").await;
    assert!(page.contains(&format!("{}/oauth/pipedrive/callback", pd.app.base)));
    assert!(page.contains(&format!("{}/crm/pipedrive/panel", pd.app.base)));
}

async fn a_panel_click_is_logged_once_with_the_recording_uploaded(backend: Backend) {
    let pd = setup(backend).await;
    install(&pd).await;
    map_agent(&pd).await;
    // The floating-window page loads Pipedrive's SDK and relays clicks to us.
    let panel = pd
        .app
        .http
        .get(format!(
            "{}/crm/pipedrive/panel?userId=123&companyId=7788&token=x",
            pd.app.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(panel.status(), 200);
    let html = panel.text().await.unwrap();
    assert!(html.contains("app-extensions-sdk"));
    assert!(html.contains("/crm/\" + connector + \"/click") || html.contains("/click"));

    Mock::given(matchers::method("POST"))
        .and(matchers::path("/api/v1/callLogs"))
        .respond_with(
            ResponseTemplate::new(201).set_body_json(json!({"success": true,
            "data": {"id": "cl-77", "activity_id": 5}})),
        )
        .mount(&pd.api)
        .await;
    Mock::given(matchers::method("POST"))
        .and(matchers::path("/api/v1/callLogs/cl-77/recordings"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"success": true})))
        .mount(&pd.api)
        .await;
    let call_id = finished_click(&pd, "sid-pd-1").await;
    pd.app.drain_jobs().await;
    let logs = requests(&pd.api, "POST", "/api/v1/callLogs").await;
    let (create, upload): (Vec<_>, Vec<_>) = logs
        .iter()
        .partition(|r| r.url.path() == "/api/v1/callLogs");
    assert_eq!(create.len(), 1);
    assert_eq!(upload.len(), 1);
    let body: Value = serde_json::from_slice(&create[0].body).unwrap();
    assert_eq!(body["outcome"], "connected");
    assert_eq!(body["to_phone_number"], "+919812345678");
    assert_eq!(body["from_phone_number"], AGENT);
    assert_eq!(body["start_time"], "2019-04-07 21:47:59");
    assert_eq!(body["duration"], "32");
    assert_eq!(body["user_id"], PD_USER);
    assert_eq!(body["deal_id"], 9);
    assert_eq!(body["person_id"], 55);
    assert!(body["note"].as_str().unwrap().contains("/recordings/"));
    let auth = create[0].headers.get("authorization").unwrap();
    assert_eq!(auth.to_str().unwrap(), "Bearer v1u:pd-access-1");
    // The file went up as multipart `file`, fetched from Exotel with the tenant's credentials.
    let up = String::from_utf8_lossy(&upload[0].body);
    assert!(
        up.contains("name=\"file\"") && up.contains("ID3fake-mp3"),
        "{up}"
    );
    assert!(up.contains("sid-pd-1.mp3"));
    // Running the job again writes nothing more (logs are immutable; the upload is done).
    pd.app
        .exec(
            "UPDATE jobs SET state = 'queued', run_at = 0 WHERE kind = 'crm'",
            vec![],
        )
        .await;
    pd.app.drain_jobs().await;
    assert_eq!(requests(&pd.api, "POST", "/api/v1/callLogs").await.len(), 2);
    let stored = pd
        .app
        .rows(
            "SELECT crm_log_id, recording_uploaded FROM crm_logs WHERE call_id = ?",
            vec![call_id.into()],
        )
        .await;
    assert_eq!(stored[0]["crm_log_id"], "cl-77");
    assert!(stored[0]["recording_uploaded"] == true || stored[0]["recording_uploaded"] == 1);
}

async fn pipedrive_clicks_need_a_valid_extension_token(backend: Backend) {
    let pd = setup(backend).await;
    install(&pd).await;
    map_agent(&pd).await;
    pd.app.exotel_accepts("sid-never").await;
    let expired = click(&pd, &jwt(CLIENT_SECRET, -3600)).await;
    assert_eq!(expired.status(), StatusCode::UNAUTHORIZED);
    let wrong = click(&pd, &jwt("not-the-secret-not-the-secret", 300)).await;
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let garbage = click(&pd, "abc.def.ghi").await;
    assert_eq!(garbage.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(pd.app.count("calls").await, 0);
    assert!(pd.app.connect_requests().await.is_empty());
}

async fn an_expired_pipedrive_token_is_refreshed_and_429_waits(backend: Backend) {
    let pd = setup(backend).await;
    install(&pd).await;
    map_agent(&pd).await;
    // The old token is refused; the refreshed one first meets a 429, then succeeds.
    Mock::given(matchers::method("POST"))
        .and(matchers::path("/api/v1/callLogs"))
        .and(matchers::header("authorization", "Bearer v1u:pd-access-1"))
        .respond_with(
            ResponseTemplate::new(401).set_body_json(json!({"success": false,
            "error": "Invalid token: access_token is invalid", "errorCode": 401})),
        )
        .mount(&pd.api)
        .await;
    Mock::given(matchers::method("POST"))
        .and(matchers::path("/api/v1/callLogs"))
        .and(matchers::header("authorization", "Bearer v1u:pd-access-2"))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("x-ratelimit-reset", "9")
                .set_body_json(json!({"success": false, "error": "Too many requests"})),
        )
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&pd.api)
        .await;
    Mock::given(matchers::method("POST"))
        .and(matchers::path("/api/v1/callLogs"))
        .and(matchers::header("authorization", "Bearer v1u:pd-access-2"))
        .respond_with(
            ResponseTemplate::new(201).set_body_json(json!({"success": true,
            "data": {"id": "cl-88"}})),
        )
        .with_priority(2)
        .mount(&pd.api)
        .await;
    Mock::given(matchers::method("POST"))
        .and(matchers::path("/api/v1/callLogs/cl-88/recordings"))
        .respond_with(
            ResponseTemplate::new(409).set_body_json(json!({"success": false,
            "error": "Recording already exists"})),
        )
        .mount(&pd.api)
        .await;
    finished_click(&pd, "sid-pd-2").await;
    pd.app.drain_jobs().await;
    let refreshes: Vec<_> = requests(&pd.oauth, "POST", "/oauth/token")
        .await
        .into_iter()
        .filter(|r| String::from_utf8_lossy(&r.body).contains("grant_type=refresh_token"))
        .collect();
    assert_eq!(refreshes.len(), 1);
    let job = &pd
        .app
        .rows("SELECT state, run_at FROM jobs WHERE kind = 'crm'", vec![])
        .await[0];
    assert_eq!(job["state"], "queued");
    let wait = job["run_at"].as_i64().unwrap() - callbridge::db::now_ms();
    assert!(wait > 5_000, "x-ratelimit-reset honoured, got {wait} ms");
    pd.app
        .exec("UPDATE jobs SET run_at = 0 WHERE kind = 'crm'", vec![])
        .await;
    pd.app.drain_jobs().await;
    let job = &pd
        .app
        .rows("SELECT state FROM jobs WHERE kind = 'crm'", vec![])
        .await[0];
    assert_eq!(
        job["state"], "done",
        "409 on the upload means it is already there"
    );
    let created = requests(&pd.api, "POST", "/api/v1/callLogs")
        .await
        .into_iter()
        .filter(|r| r.url.path() == "/api/v1/callLogs")
        .count();
    assert_eq!(created, 3, "401, 429, then one log");
    // The refreshed token and the re-read api_domain were stored.
    let row = &pd
        .app
        .rows(
            "SELECT access_token_sealed FROM installations WHERE connector = 'pipedrive'",
            vec![],
        )
        .await[0];
    assert_eq!(
        pd.app
            .state
            .sealer
            .open(row["access_token_sealed"].as_str().unwrap())
            .unwrap(),
        "v1u:pd-access-2"
    );
}

async fn pipedrive_uninstall_callback_removes_the_install(backend: Backend) {
    let pd = setup(backend).await;
    install(&pd).await;
    let url = format!("{}/oauth/pipedrive/callback", pd.app.base);
    let notice = json!({"client_id": CLIENT_ID, "company_id": COMPANY, "user_id": PD_USER,
                        "timestamp": "2026-11-26T10:00:00Z"});
    let r = pd
        .app
        .http
        .delete(&url)
        .basic_auth(CLIENT_ID, Some("nope"))
        .json(&notice)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(pd.app.count("installations").await, 1);
    let r = pd
        .app
        .http
        .delete(&url)
        .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
        .json(&notice)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(pd.app.count("installations").await, 0);
    // And from our side: revoke the refresh token at Pipedrive.
    install(&pd).await;
    let r =
        pd.b.post("/admin/connectors/pipedrive/uninstall", &[])
            .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let revoke = &requests(&pd.oauth, "POST", "/oauth/revoke").await[0];
    let body = String::from_utf8_lossy(&revoke.body);
    assert!(body.contains("token=pd-refresh-1"), "{body}");
    assert_eq!(pd.app.count("installations").await, 0);
}

async fn a_pipedrive_marketplace_install_is_confirmed_first(backend: Backend) {
    let pd = setup(backend).await;
    let r = pd.b.get("/oauth/pipedrive/callback?code=market-code").await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let confirm = location(&r);
    assert!(confirm.starts_with("/admin/connectors/pipedrive/marketplace?"));
    assert!(requests(&pd.oauth, "POST", "/oauth/token").await.is_empty());
    let page = pd.b.page(&confirm).await;
    assert!(page.contains("Connect to Acme"), "{page}");
    let r =
        pd.b.post(
            "/admin/connectors/pipedrive/marketplace",
            &[("query", "code=market-code")],
        )
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(pd.app.count("installations").await, 1);
    let exchange = &requests(&pd.oauth, "POST", "/oauth/token").await[0];
    assert!(String::from_utf8_lossy(&exchange.body).contains("code=market-code"));
}
