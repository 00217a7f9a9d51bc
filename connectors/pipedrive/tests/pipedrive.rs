//! The Pipedrive connector against a fake Pipedrive on loopback: an OAuth host and a company
//! `api_domain` host (wiremock), answering with the documented payload shapes.

use std::{collections::BTreeMap, time::Duration};

use base64::Engine as _;
use bytes::Bytes;
use callbridge_connector::{
    AccessToken, CallRecord, ClickError, CodeExchange, Connector, ConnectorError, CrmLogRef,
    CrmRecordRef, Direction, InboundRequest, InstallContext, InstallVars, LegRecord, OAuthError,
    Outcome, Party, RecordingFile, RecordingMode, RefreshToken, StoredTokens, oauth::callback_code,
};
use callbridge_pipedrive::{Pipedrive, PipedriveConfig};
use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use secrecy::SecretString;
use serde_json::{Value, json};
use wiremock::{
    Mock, MockServer, Request, ResponseTemplate,
    matchers::{body_string_contains, header, method, path, query_param},
};

const CLIENT_ID: &str = "cb-client";
const CLIENT_SECRET: &str = "cb-secret";

struct Fake {
    oauth: MockServer,
    api: MockServer,
    connector: Pipedrive,
}

async fn fake() -> Fake {
    let oauth = MockServer::start().await;
    let api = MockServer::start().await;
    let mut config = PipedriveConfig::new(CLIENT_ID, SecretString::from(CLIENT_SECRET));
    config.oauth_base = oauth.uri();
    config.api_hosts = vec!["127.0.0.1".into()];
    config.block_backoff = Duration::from_secs(600);
    let connector = Pipedrive::new(config, reqwest::Client::new());
    Fake {
        oauth,
        api,
        connector,
    }
}

impl Fake {
    fn install(&self) -> InstallContext {
        InstallContext {
            installation_id: "inst_1".into(),
            api_base: self.api.uri(),
            account_id: Some("456".into()),
            vars: InstallVars::new(),
            settings: Value::Null,
        }
    }
}

fn basic() -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"))
    )
}

fn token() -> AccessToken {
    AccessToken("v1u:AQ-token".into())
}

fn form(req: &Request) -> BTreeMap<String, String> {
    url::form_urlencoded::parse(&req.body)
        .into_owned()
        .collect()
}

fn token_response(api_domain: &str, refresh: &str) -> Value {
    json!({"access_token": "v1u:AQ-new", "token_type": "Bearer", "expires_in": 3599,
           "refresh_token": refresh, "scope": "base,phone-integration,contacts:read",
           "api_domain": api_domain})
}

#[tokio::test]
async fn install_exchanges_the_code_with_basic_auth_and_keeps_api_domain() {
    let f = fake().await;
    Mock::given(method("POST"))
        .and(path("/oauth/token"))
        .and(header("authorization", basic().as_str()))
        .and(header("content-type", "application/x-www-form-urlencoded"))
        .respond_with(ResponseTemplate::new(200).set_body_json(token_response(&f.api.uri(), "r-1")))
        .expect(1)
        .mount(&f.oauth)
        .await;
    let before = Utc::now();
    let set = f
        .connector
        .exchange_code(
            &InstallVars::new(),
            &CodeExchange {
                code: "code-1".into(),
                redirect_uri: "https://cb.example/oauth/pipedrive/callback".into(),
                pkce_verifier: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(set.access_token.0, "v1u:AQ-new");
    assert_eq!(
        set.refresh_token.as_ref().map(|r| r.0.as_str()),
        Some("r-1")
    );
    assert_eq!(set.api_base.as_deref(), Some(f.api.uri().as_str()));
    let exp = set.expires_at.unwrap();
    assert!(
        exp >= before + chrono::Duration::seconds(3599)
            && exp <= Utc::now() + chrono::Duration::seconds(3599)
    );
    assert_eq!(set.raw["scope"], "base,phone-integration,contacts:read");

    let received = f.oauth.received_requests().await.unwrap();
    let body = form(&received[0]);
    assert_eq!(body["grant_type"], "authorization_code");
    assert_eq!(body["code"], "code-1");
    assert_eq!(
        body["redirect_uri"],
        "https://cb.example/oauth/pipedrive/callback"
    );
    assert!(
        !body.contains_key("client_secret"),
        "credentials go in the Basic header only"
    );
}

#[tokio::test]
async fn a_marketplace_install_lands_without_our_state_and_still_exchanges() {
    let f = fake().await;
    assert!(f.connector.oauth_spec().marketplace_installs);
    let (code, state) = callback_code(&[("code".into(), "mkt-code".into())]).unwrap();
    assert_eq!(state, None);
    Mock::given(method("POST"))
        .and(path("/oauth/token"))
        .and(body_string_contains("code=mkt-code"))
        .respond_with(ResponseTemplate::new(200).set_body_json(token_response(&f.api.uri(), "r-m")))
        .expect(1)
        .mount(&f.oauth)
        .await;
    let set = f
        .connector
        .exchange_code(
            &InstallVars::new(),
            &CodeExchange {
                code,
                redirect_uri: "https://cb.example/cb".into(),
                pkce_verifier: None,
            },
        )
        .await
        .unwrap();
    assert!(set.api_base.is_some());
}

#[tokio::test]
async fn the_authorize_url_carries_client_redirect_and_state() {
    let f = fake().await;
    let url = f
        .connector
        .oauth_spec()
        .authorize_url(&InstallVars::new(), "https://cb.example/cb", "st-1", None)
        .unwrap();
    let parsed = url::Url::parse(&url).unwrap();
    assert_eq!(parsed.path(), "/oauth/authorize");
    let q: BTreeMap<String, String> = parsed.query_pairs().into_owned().collect();
    assert_eq!(q["client_id"], CLIENT_ID);
    assert_eq!(q["redirect_uri"], "https://cb.example/cb");
    assert_eq!(q["state"], "st-1");
    assert!(!q.contains_key("scope"));
}

#[tokio::test]
async fn refresh_rereads_api_domain_and_keeps_the_same_refresh_token() {
    let f = fake().await;
    let moved = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/oauth/token"))
        .and(header("authorization", basic().as_str()))
        .respond_with(ResponseTemplate::new(200).set_body_json(token_response(&moved.uri(), "r-1")))
        .expect(1)
        .mount(&f.oauth)
        .await;
    let old = RefreshToken("r-1".into());
    let set = f.connector.refresh(&f.install(), &old).await.unwrap();
    assert_eq!(set.api_base.as_deref(), Some(moved.uri().as_str()));
    assert!(
        !set.rotates(Some(&old)),
        "Pipedrive does not rotate refresh tokens"
    );
    let body = form(&f.oauth.received_requests().await.unwrap()[0]);
    assert_eq!(body["grant_type"], "refresh_token");
    assert_eq!(body["refresh_token"], "r-1");
}

#[tokio::test]
async fn refresh_failures_are_classified() {
    let f = fake().await;
    Mock::given(method("POST"))
        .and(path("/oauth/token"))
        .respond_with(ResponseTemplate::new(400).set_body_json(
            json!({"success": false, "message": "Invalid grant: refresh_token is invalid"}),
        ))
        .up_to_n_times(1)
        .mount(&f.oauth)
        .await;
    Mock::given(method("POST"))
        .and(path("/oauth/token"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "access_token": "a", "expires_in": 3600, "api_domain": "https://evil.example"})))
        .mount(&f.oauth)
        .await;
    let rt = RefreshToken("r".into());
    assert!(matches!(
        f.connector.refresh(&f.install(), &rt).await,
        Err(OAuthError::InvalidGrant(m)) if m.contains("refresh_token is invalid")
    ));
    assert!(matches!(
        f.connector.refresh(&f.install(), &rt).await,
        Err(OAuthError::Malformed(m)) if m.contains("api_domain")
    ));
}

#[tokio::test]
async fn revoke_posts_the_refresh_token_with_basic_auth() {
    let f = fake().await;
    Mock::given(method("POST"))
        .and(path("/oauth/revoke"))
        .and(header("authorization", basic().as_str()))
        .respond_with(ResponseTemplate::new(200))
        .expect(1)
        .mount(&f.oauth)
        .await;
    f.connector
        .revoke(
            &f.install(),
            &StoredTokens {
                access_token: Some(token()),
                refresh_token: Some(RefreshToken("r-9".into())),
            },
        )
        .await
        .unwrap();
    let body = form(&f.oauth.received_requests().await.unwrap()[0]);
    assert_eq!(body["token"], "r-9");
    assert_eq!(body["token_type_hint"], "refresh_token");
}

fn call() -> CallRecord {
    CallRecord {
        call_id: "call_1".into(),
        exotel_call_sid: Some("b6cfaf1ab2d0".into()),
        direction: Direction::Outbound,
        outcome: Outcome::Connected,
        status: "completed".into(),
        agent_number: "+918012345678".into(),
        customer_number: "+919876543210".into(),
        virtual_number: Some("+918047000000".into()),
        started_at: "2026-05-04T09:15:02Z".parse::<DateTime<Utc>>().ok(),
        ended_at: "2026-05-04T09:17:40Z".parse::<DateTime<Utc>>().ok(),
        conversation_duration: 158,
        legs: vec![
            LegRecord {
                party: Party::Agent,
                number: Some("+918012345678".into()),
                status: Some("completed".into()),
                on_call_duration: Some(170),
                cause: None,
            },
            LegRecord {
                party: Party::Customer,
                number: Some("+919876543210".into()),
                status: Some("completed".into()),
                on_call_duration: Some(158),
                cause: None,
            },
        ],
        recording_url: Some("https://cb.example/recordings/tok?x=1&y=2".into()),
        crm_record: Some(CrmRecordRef {
            object_type: "deal".into(),
            id: "45".into(),
        }),
        related_records: vec![],
        crm_user_id: Some("123".into()),
        custom_field: None,
    }
}

fn created(id: &Value) -> ResponseTemplate {
    ResponseTemplate::new(201).set_body_json(json!({"success": true, "data": {
        "id": id, "outcome": "connected", "has_recording": false, "company_id": 987}}))
}

#[tokio::test]
async fn log_call_posts_the_documented_fields() {
    let f = fake().await;
    Mock::given(method("POST"))
        .and(path("/api/v1/callLogs"))
        .and(header("authorization", "Bearer v1u:AQ-token"))
        .respond_with(created(&json!("5f2b-log")))
        .expect(1)
        .mount(&f.api)
        .await;
    let log = f
        .connector
        .log_call(&f.install(), &token(), &call())
        .await
        .unwrap();
    assert_eq!(
        log,
        CrmLogRef {
            id: "5f2b-log".into(),
            updatable: false
        }
    );

    let req = &f.api.received_requests().await.unwrap()[0];
    let body: Value = serde_json::from_slice(&req.body).unwrap();
    assert_eq!(body["outcome"], "connected");
    assert_eq!(body["from_phone_number"], "+918012345678");
    assert_eq!(body["to_phone_number"], "+919876543210");
    assert_eq!(body["start_time"], "2026-05-04 09:15:02");
    assert_eq!(body["end_time"], "2026-05-04 09:17:40");
    assert_eq!(body["duration"], "158", "duration is a string of seconds");
    assert_eq!(body["user_id"], 123);
    assert_eq!(body["deal_id"], 45);
    assert!(body.get("lead_id").is_none());
    assert!(body.get("person_id").is_none());
    assert_eq!(body["subject"], "Outbound call to +919876543210");
    let note = body["note"].as_str().unwrap();
    assert!(
        note.contains("<li>Customer +919876543210: completed, 158 s</li>"),
        "{note}"
    );
    assert!(
        note.contains("href=\"https://cb.example/recordings/tok?x=1&amp;y=2\""),
        "{note}"
    );
    assert!(note.contains("b6cfaf1ab2d0"));
}

#[tokio::test]
async fn a_lead_is_sent_as_its_uuid_and_never_with_a_deal() {
    let f = fake().await;
    Mock::given(method("POST"))
        .and(path("/api/v1/callLogs"))
        .respond_with(created(&json!(77)))
        .mount(&f.api)
        .await;
    let mut c = call();
    c.outcome = Outcome::AgentNoAnswer;
    c.conversation_duration = 0;
    c.crm_record = Some(CrmRecordRef {
        object_type: "lead".into(),
        id: "adf21080-0e10-11eb-879b-05d71fb426ec".into(),
    });
    let log = f
        .connector
        .log_call(&f.install(), &token(), &c)
        .await
        .unwrap();
    assert_eq!(log.id, "77");
    let body: Value =
        serde_json::from_slice(&f.api.received_requests().await.unwrap()[0].body).unwrap();
    assert_eq!(body["lead_id"], "adf21080-0e10-11eb-879b-05d71fb426ec");
    assert!(body.get("deal_id").is_none());
    assert_eq!(body["outcome"], "no_answer");
    assert_eq!(body["duration"], "0");
}

#[tokio::test]
async fn call_logs_are_immutable_so_update_sends_nothing() {
    let f = fake().await;
    Mock::given(wiremock::matchers::any())
        .respond_with(ResponseTemplate::new(500))
        .expect(0)
        .mount(&f.api)
        .await;
    let log = CrmLogRef {
        id: "1".into(),
        updatable: false,
    };
    f.connector
        .update_call(&f.install(), &token(), &log, &call())
        .await
        .unwrap();
}

fn recording() -> RecordingFile {
    RecordingFile {
        bytes: Bytes::from_static(b"ID3\x04fake-mp3-bytes"),
        filename: "b6cfaf1ab2d0.mp3".into(),
        content_type: "audio/mpeg".into(),
    }
}

#[tokio::test]
async fn the_recording_is_uploaded_as_multipart_file() {
    let f = fake().await;
    assert_eq!(f.connector.recording_mode(), RecordingMode::Upload);
    Mock::given(method("POST"))
        .and(path("/api/v1/callLogs/5f2b-log/recordings"))
        .and(header("authorization", "Bearer v1u:AQ-token"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"success": true})))
        .expect(1)
        .mount(&f.api)
        .await;
    let log = CrmLogRef {
        id: "5f2b-log".into(),
        updatable: false,
    };
    f.connector
        .upload_recording(&f.install(), &token(), &log, &recording())
        .await
        .unwrap();
    let req = &f.api.received_requests().await.unwrap()[0];
    let ct = req.headers.get("content-type").unwrap().to_str().unwrap();
    assert!(ct.starts_with("multipart/form-data; boundary="), "{ct}");
    let body = String::from_utf8_lossy(&req.body);
    assert!(
        body.contains(
            "Content-Disposition: form-data; name=\"file\"; filename=\"b6cfaf1ab2d0.mp3\""
        ),
        "{body}"
    );
    assert!(body.contains("Content-Type: audio/mpeg"));
    assert!(body.contains("fake-mp3-bytes"));
}

#[tokio::test]
async fn a_second_upload_answered_409_counts_as_done_but_404_does_not() {
    let f = fake().await;
    Mock::given(method("POST"))
        .and(path("/api/v1/callLogs/1/recordings"))
        .respond_with(ResponseTemplate::new(409).set_body_json(
            json!({"success": false, "error": "A recording for this call already exists"}),
        ))
        .mount(&f.api)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/v1/callLogs/2/recordings"))
        .respond_with(
            ResponseTemplate::new(404).set_body_json(
                json!({"success": false, "error": "Call log not found", "data": null}),
            ),
        )
        .mount(&f.api)
        .await;
    let log = |id: &str| CrmLogRef {
        id: id.into(),
        updatable: false,
    };
    f.connector
        .upload_recording(&f.install(), &token(), &log("1"), &recording())
        .await
        .unwrap();
    let e = f
        .connector
        .upload_recording(&f.install(), &token(), &log("2"), &recording())
        .await
        .unwrap_err();
    assert!(matches!(e, ConnectorError::Permanent(m) if m.contains("Call log not found")));
}

fn search_hits(ids: &[(i64, &str)]) -> ResponseTemplate {
    let items: Vec<Value> = ids
        .iter()
        .map(|(id, name)| {
            json!({"result_score": 1.0, "item": {"id": id, "type": "person", "name": name,
            "phones": ["+91 98765 43210"], "emails": [], "visible_to": 3, "owner": {"id": 123},
            "organization": null, "custom_fields": [], "notes": []}})
        })
        .collect();
    ResponseTemplate::new(200).set_body_json(json!({"success": true, "data": {"items": items},
        "additional_data": {"next_cursor": null}}))
}

#[tokio::test]
async fn persons_are_searched_in_every_stored_form_and_deduplicated_in_order() {
    let f = fake().await;
    for (term, hits) in [
        ("+919876543210", vec![(7, "Asha")]),
        ("9876543210", vec![(9, "Ravi"), (7, "Asha")]),
        ("09876543210", vec![]),
    ] {
        Mock::given(method("GET"))
            .and(path("/api/v2/persons/search"))
            .and(query_param("term", term))
            .and(query_param("fields", "phone"))
            .and(query_param("exact_match", "true"))
            .and(header("authorization", "Bearer v1u:AQ-token"))
            .respond_with(search_hits(&hits))
            .expect(1)
            .mount(&f.api)
            .await;
    }
    let found = f
        .connector
        .find_contact_by_phone(&f.install(), &token(), "+919876543210")
        .await
        .unwrap();
    let ids: Vec<(&str, Option<&str>)> = found
        .iter()
        .map(|m| (m.record.id.as_str(), m.name.as_deref()))
        .collect();
    assert_eq!(ids, [("7", Some("Asha")), ("9", Some("Ravi"))]);
    assert!(found.iter().all(|m| m.record.object_type == "person"));
    // The search sent `+` URL-encoded, and in the fixed order.
    let terms: Vec<String> = f
        .api
        .received_requests()
        .await
        .unwrap()
        .iter()
        .filter_map(|r| {
            r.url
                .query_pairs()
                .find(|(k, _)| k == "term")
                .map(|(_, v)| v.into_owned())
        })
        .collect();
    assert_eq!(terms, ["+919876543210", "9876543210", "09876543210"]);
}

#[tokio::test]
async fn users_are_listed_for_mapping() {
    let f = fake().await;
    Mock::given(method("GET"))
        .and(path("/api/v1/users"))
        .and(header("authorization", "Bearer v1u:AQ-token"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"success": true, "data": [
            {"id": 123, "name": "Priya", "email": "priya@acme.example", "phone": "+918012345678",
             "active_flag": true, "timezone_name": "Asia/Kolkata"},
            {"id": 124, "name": "Old", "email": "old@acme.example", "phone": null, "active_flag": false}
        ]})))
        .mount(&f.api)
        .await;
    let users = f
        .connector
        .list_users(&f.install(), &token())
        .await
        .unwrap();
    assert_eq!(users.len(), 1);
    assert_eq!(users[0].id, "123");
    assert_eq!(users[0].email.as_deref(), Some("priya@acme.example"));
    assert_eq!(users[0].phone.as_deref(), Some("+918012345678"));
}

#[tokio::test]
async fn the_company_id_comes_from_users_me() {
    let f = fake().await;
    Mock::given(method("GET"))
        .and(path("/api/v1/users/me"))
        .and(header("authorization", "Bearer v1u:AQ-token"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"success": true, "data": {
                "id": 123, "name": "Priya", "company_id": 7788, "company_name": "Acme",
                "company_domain": "acme"
            }})),
        )
        .expect(1)
        .mount(&f.api)
        .await;
    let id = f
        .connector
        .account_id(&f.install(), &token())
        .await
        .unwrap();
    assert_eq!(id.as_deref(), Some("7788"));
}

#[tokio::test]
async fn users_me_without_a_company_is_an_error() {
    let f = fake().await;
    Mock::given(method("GET"))
        .and(path("/api/v1/users/me"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"success": true, "data": {"id": 1}})),
        )
        .mount(&f.api)
        .await;
    let err = f
        .connector
        .account_id(&f.install(), &token())
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectorError::Permanent(_)), "{err:?}");
}

async fn users_error(template: ResponseTemplate) -> ConnectorError {
    let f = fake().await;
    Mock::given(method("GET"))
        .and(path("/api/v1/users"))
        .respond_with(template)
        .mount(&f.api)
        .await;
    f.connector
        .list_users(&f.install(), &token())
        .await
        .unwrap_err()
}

#[tokio::test]
async fn an_expired_access_token_needs_a_refresh() {
    let e = users_error(ResponseTemplate::new(401).set_body_json(
        json!({"success": false, "error": "Invalid token: access_token is invalid", "errorCode": 401}),
    ))
    .await;
    assert!(matches!(e, ConnectorError::NeedsRefresh(m) if m.contains("access_token is invalid")));
}

#[tokio::test]
async fn a_429_backs_off_by_the_rate_limit_headers() {
    let e = users_error(
        ResponseTemplate::new(429)
            .insert_header("x-ratelimit-limit", "80")
            .insert_header("x-ratelimit-remaining", "0")
            .insert_header("x-ratelimit-reset", "2"),
    )
    .await;
    assert!(
        matches!(e, ConnectorError::RateLimited { retry_after: Some(d) } if d == Duration::from_secs(2))
    );
    let e = users_error(ResponseTemplate::new(429).insert_header("retry-after", "17")).await;
    assert!(
        matches!(e, ConnectorError::RateLimited { retry_after: Some(d) } if d == Duration::from_secs(17))
    );
}

#[tokio::test]
async fn a_cloudflare_403_page_is_a_long_rate_limit() {
    let e = users_error(
        ResponseTemplate::new(403)
            .insert_header("content-type", "text/html; charset=UTF-8")
            .set_body_string(
                "<!DOCTYPE html><html><title>Attention Required! | Cloudflare</title></html>",
            ),
    )
    .await;
    assert!(
        matches!(e, ConnectorError::RateLimited { retry_after: Some(d) } if d == Duration::from_secs(600))
    );
}

#[tokio::test]
async fn server_errors_are_transient() {
    let e = users_error(
        ResponseTemplate::new(500).set_body_json(json!({"success": false, "error": "oops"})),
    )
    .await;
    assert!(matches!(e, ConnectorError::Transient(_)));
    assert!(e.is_retryable());
}

#[tokio::test]
async fn a_400_is_permanent_with_pipedrives_message() {
    let f = fake().await;
    Mock::given(method("POST"))
        .and(path("/api/v1/callLogs"))
        .respond_with(
            ResponseTemplate::new(400).set_body_json(json!({"success": false,
            "error": "Invalid outcome", "error_info": "Please check developers.pipedrive.com",
            "data": null, "additional_data": null})),
        )
        .mount(&f.api)
        .await;
    let e = f
        .connector
        .log_call(&f.install(), &token(), &call())
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ConnectorError::Permanent(m) if m.contains("Invalid outcome") && m.contains("400")),
        "{e}"
    );
}

#[tokio::test]
async fn an_unreachable_pipedrive_is_transient() {
    let f = fake().await;
    let mut install = f.install();
    // A port nobody listens on (wiremock pools its servers, so bind and drop a plain socket).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    install.api_base = format!("http://127.0.0.1:{port}");
    let e = f
        .connector
        .list_users(&install, &token())
        .await
        .unwrap_err();
    assert!(matches!(e, ConnectorError::Transient(_)), "{e}");
}

fn jwt(claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn click(token: Option<&str>, body: &Value) -> InboundRequest {
    let mut headers = http::HeaderMap::new();
    if let Some(t) = token {
        headers.insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    InboundRequest {
        method: http::Method::POST,
        headers,
        query: None,
        body: Bytes::from(body.to_string()),
    }
}

#[tokio::test]
async fn a_signed_click_becomes_a_dial_request() {
    let f = fake().await;
    let now = Utc::now();
    let t = jwt(
        &json!({"userId": 123, "companyId": 456, "exp": now.timestamp() + 300}),
        CLIENT_SECRET,
    );
    let v = f
        .connector
        .verify_click(
            None,
            &click(
                Some(&t),
                &json!({"context": {"invoker": "user",
            "phone": "+91 98765 43210", "personId": 7, "dealId": 45}}),
            ),
            now,
        )
        .unwrap();
    assert_eq!(v.account_id.as_deref(), Some("456"));
    assert_eq!(v.dial.crm_user_id, "123");
    assert_eq!(v.dial.to_number, "+91 98765 43210");
    assert_eq!(
        v.dial.record,
        Some(CrmRecordRef {
            object_type: "deal".into(),
            id: "45".into()
        })
    );
    assert_eq!(
        v.dial.related,
        [CrmRecordRef {
            object_type: "person".into(),
            id: "7".into()
        }]
    );
    assert_eq!(v.context_keys, ["dealId", "invoker", "personId", "phone"]);

    // The token may also ride in the body.
    let v = f
        .connector
        .verify_click(
            None,
            &click(None, &json!({"token": t, "number": "+15550001111"})),
            now,
        )
        .unwrap();
    assert_eq!(v.dial.to_number, "+15550001111");
    assert_eq!(v.context_keys, ["number"]);
}

#[tokio::test]
async fn expired_or_foreign_clicks_are_refused() {
    let f = fake().await;
    let now = Utc::now();
    let ctx = json!({"phone": "+919876543210"});
    let expired = jwt(
        &json!({"userId": 1, "companyId": 2, "exp": now.timestamp() - 3600}),
        CLIENT_SECRET,
    );
    let foreign = jwt(
        &json!({"userId": 1, "companyId": 2, "exp": now.timestamp() + 300}),
        "not-ours",
    );
    for t in [Some(expired.as_str()), Some(foreign.as_str()), None] {
        assert!(matches!(
            f.connector.verify_click(None, &click(t, &ctx), now),
            Err(ClickError::Unauthorized(_))
        ));
    }
    let good = jwt(
        &json!({"userId": 1, "companyId": 2, "exp": now.timestamp() + 300}),
        CLIENT_SECRET,
    );
    assert!(matches!(
        f.connector
            .verify_click(None, &click(Some(&good), &json!({"personId": 3})), now),
        Err(ClickError::Malformed(_))
    ));
}

#[tokio::test]
async fn a_separate_jwt_secret_is_used_when_configured() {
    let mut config = PipedriveConfig::new(CLIENT_ID, SecretString::from(CLIENT_SECRET));
    config.jwt_secret = Some(SecretString::from("hub-jwt-secret"));
    let c = Pipedrive::new(config, reqwest::Client::new());
    let now = Utc::now();
    let t = jwt(
        &json!({"userId": 1, "companyId": 2, "exp": now.timestamp() + 300}),
        "hub-jwt-secret",
    );
    assert!(
        c.verify_click(
            None,
            &click(Some(&t), &json!({"phone": "+15550001111"})),
            now
        )
        .is_ok()
    );
    let t = jwt(
        &json!({"userId": 1, "companyId": 2, "exp": now.timestamp() + 300}),
        CLIENT_SECRET,
    );
    assert!(
        c.verify_click(
            None,
            &click(Some(&t), &json!({"phone": "+15550001111"})),
            now
        )
        .is_err()
    );
}

#[tokio::test]
async fn pipedrives_uninstall_callback_is_verified() {
    let f = fake().await;
    let body = json!({"client_id": CLIENT_ID, "company_id": 456, "user_id": 123, "timestamp": "2026-05-04T09:15:02.000Z"});
    let mut req = click(None, &body);
    req.method = http::Method::DELETE;
    assert!(matches!(
        f.connector.verify_uninstall(&req),
        Err(ClickError::Unauthorized(_))
    ));
    req.headers
        .insert("authorization", basic().parse().unwrap());
    let n = f.connector.verify_uninstall(&req).unwrap();
    assert_eq!(n.account_id, "456");
    assert_eq!(n.user_id.as_deref(), Some("123"));
}
