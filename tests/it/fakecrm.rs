//! A fake CRM on loopback (axum) and a connector for it, exercising the whole connector
//! contract from the host's side: OAuth with PKCE and rotating refresh tokens (Zendesk-like),
//! an API base in the token response (Salesforce/Zoho-like), updatable call logs, contact
//! lookup and creation, users, a signed click relay and a CRM-initiated uninstall.
//!
//! The fake is strict where the host could get it wrong: a code works once and only with the
//! PKCE verifier of its challenge; a refresh token works once (rotation); an access token that
//! was refreshed away answers 401; every request is recorded for assertions.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Redirect, Response},
    routing::{get, patch, post},
};
use base64::Engine;
use bytes::Bytes;
use callbridge_connector::{
    AccessToken, ApiBaseSource, CallRecord, ClickError, ClientAuth, CodeExchange, Connector,
    ConnectorError, ContactMatch, CrmLogRef, CrmRecordRef, CrmUser, DialRequest, InboundRequest,
    InstallContext, InstallVars, OAuthError, OAuthRequest, OAuthSpec, RefreshRotation,
    RefreshToken, StoredTokens, TokenExpiry, TokenGrant, TokenSet, UninstallNotice, VerifiedClick,
};
use chrono::Utc;
use serde_json::{Value, json};
use sha2::Digest;

pub const NAME: &str = "fakecrm";
pub const CLIENT_ID: &str = "fake-client";
pub const CLIENT_SECRET: &str = "fake-secret-0123456789";

/// What the fake CRM holds and saw.
#[derive(Debug, Default)]
pub struct CrmData {
    pub account: String,
    /// code → PKCE challenge.
    pub codes: HashMap<String, Option<String>>,
    pub valid_access: Vec<String>,
    pub valid_refresh: Vec<String>,
    pub issued: u64,
    pub token_requests: Vec<Vec<(String, String)>>,
    pub refresh_requests: u64,
    pub refresh_delay_ms: u64,
    /// Answer the next code exchange with `invalid_grant`.
    pub reject_code: bool,
    /// Answer every refresh with `invalid_grant`.
    pub reject_refresh: bool,
    pub revoked: Vec<String>,
    pub logs: Vec<(String, Value)>,
    pub updates: Vec<(String, Value)>,
    /// Answer this many log POSTs with 429 first.
    pub throttle_logs: u32,
    pub contacts: Vec<(String, String)>,
    pub created_contacts: Vec<String>,
    pub lookups: Vec<String>,
    pub users: Vec<Value>,
}

/// The running fake.
#[derive(Clone)]
pub struct FakeCrm {
    pub base: String,
    pub data: Arc<Mutex<CrmData>>,
}

impl FakeCrm {
    pub async fn start() -> Self {
        let data = Arc::new(Mutex::new(CrmData {
            account: "acct-1".into(),
            users: vec![
                json!({"id": "u1", "name": "Priya", "email": "priya@acme.example", "phone": "+919876543210"}),
                json!({"id": "u2", "name": "Ravi", "email": "ravi@acme.example", "phone": null}),
            ],
            ..CrmData::default()
        }));
        let app = Router::new()
            .route("/oauth/authorize", get(authorize))
            .route("/oauth/token", post(token))
            .route("/oauth/revoke", post(revoke))
            .route("/api/me", get(me))
            .route("/api/calls", post(log_call))
            .route("/api/calls/{id}", patch(update_call))
            .route("/api/contacts", get(find_contacts).post(create_contact))
            .route("/api/users", get(users))
            .with_state(Arc::clone(&data));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(listener, app).await.ok();
        });
        Self {
            base: format!("http://{addr}"),
            data,
        }
    }

    pub fn data(&self) -> std::sync::MutexGuard<'_, CrmData> {
        self.data.lock().unwrap()
    }

    /// The connector for this fake.
    pub fn connector(&self) -> Arc<dyn Connector> {
        Arc::new(FakeConnector {
            base: self.base.clone(),
            http: reqwest::Client::new(),
        })
    }

    /// Invalidate every access token (as if they expired at the CRM).
    pub fn expire_access_tokens(&self) {
        self.data().valid_access.clear();
    }
}

fn form(body: &Bytes) -> Vec<(String, String)> {
    url::form_urlencoded::parse(body).into_owned().collect()
}

fn field<'a>(pairs: &'a [(String, String)], k: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(key, _)| key == k)
        .map(|(_, v)| v.as_str())
}

async fn authorize(
    State(data): State<Arc<Mutex<CrmData>>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let redirect = q.get("redirect_uri").cloned().unwrap_or_default();
    let state = q.get("state").cloned().unwrap_or_default();
    if q.get("client_id").map(String::as_str) != Some(CLIENT_ID) {
        return (StatusCode::BAD_REQUEST, "unknown client").into_response();
    }
    if q.contains_key("deny") {
        return Redirect::to(&format!(
            "{redirect}?error=access_denied&error_description=The+user+denied+access&state={state}"
        ))
        .into_response();
    }
    let code = format!("code-{}", uuid::Uuid::new_v4().simple());
    let challenge = q.get("code_challenge").cloned();
    data.lock().unwrap().codes.insert(code.clone(), challenge);
    let sep = if redirect.contains('?') { '&' } else { '?' };
    Redirect::to(&format!("{redirect}{sep}code={code}&state={state}")).into_response()
}

fn issue(d: &mut CrmData, base: &str) -> Value {
    d.issued += 1;
    let n = d.issued;
    let access = format!("at-{n}");
    let refresh = format!("rt-{n}");
    d.valid_access = vec![access.clone()];
    d.valid_refresh = vec![refresh.clone()];
    json!({"access_token": access, "refresh_token": refresh, "expires_in": 3600,
           "token_type": "bearer", "api_base": base})
}

fn token_error(code: &str, desc: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": code, "error_description": desc})),
    )
        .into_response()
}

async fn token(
    State(data): State<Arc<Mutex<CrmData>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let pairs = form(&body);
    let host = headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let base = format!("http://{host}");
    if field(&pairs, "client_id") != Some(CLIENT_ID)
        || field(&pairs, "client_secret") != Some(CLIENT_SECRET)
    {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "invalid_client"})),
        )
            .into_response();
    }
    let delay = {
        let mut d = data.lock().unwrap();
        d.token_requests.push(pairs.clone());
        if field(&pairs, "grant_type") == Some("refresh_token") {
            d.refresh_requests += 1;
        }
        d.refresh_delay_ms
    };
    match field(&pairs, "grant_type") {
        Some("authorization_code") => {
            let mut d = data.lock().unwrap();
            let code = field(&pairs, "code").unwrap_or_default();
            if d.reject_code {
                return token_error("invalid_grant", "code expired");
            }
            let Some(challenge) = d.codes.remove(code) else {
                return token_error("invalid_grant", "unknown or used code");
            };
            if let Some(challenge) = challenge {
                let verifier = field(&pairs, "code_verifier").unwrap_or_default();
                let computed = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .encode(sha2::Sha256::digest(verifier.as_bytes()));
                if computed != challenge {
                    return token_error("invalid_grant", "PKCE verification failed");
                }
            }
            Json(issue(&mut d, &base)).into_response()
        }
        Some("refresh_token") => {
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            let mut d = data.lock().unwrap();
            let rt = field(&pairs, "refresh_token").unwrap_or_default();
            if d.reject_refresh || !d.valid_refresh.iter().any(|v| v == rt) {
                return token_error("invalid_grant", "refresh token is invalid");
            }
            Json(issue(&mut d, &base)).into_response()
        }
        _ => token_error("unsupported_grant_type", "?"),
    }
}

async fn revoke(State(data): State<Arc<Mutex<CrmData>>>, body: Bytes) -> StatusCode {
    let pairs = form(&body);
    let mut d = data.lock().unwrap();
    if let Some(t) = field(&pairs, "token") {
        d.revoked.push(t.to_owned());
        d.valid_refresh.retain(|v| v != t);
    }
    StatusCode::OK
}

fn authorized(data: &Arc<Mutex<CrmData>>, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let token = headers
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .unwrap_or_default();
    if data.lock().unwrap().valid_access.iter().any(|v| v == token) {
        Ok(())
    } else {
        Err(Box::new(
            (
                StatusCode::UNAUTHORIZED,
                Json(json!({"error": "invalid_token", "message": "access token expired"})),
            )
                .into_response(),
        ))
    }
}

async fn me(State(data): State<Arc<Mutex<CrmData>>>, headers: HeaderMap) -> Response {
    if let Err(r) = authorized(&data, &headers) {
        return *r;
    }
    let account = data.lock().unwrap().account.clone();
    Json(json!({"account": account})).into_response()
}

async fn log_call(
    State(data): State<Arc<Mutex<CrmData>>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Err(r) = authorized(&data, &headers) {
        return *r;
    }
    let mut d = data.lock().unwrap();
    if d.throttle_logs > 0 {
        d.throttle_logs -= 1;
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", "7")],
            Json(json!({"error": "slow down"})),
        )
            .into_response();
    }
    let id = format!("log-{}", d.logs.len() + 1);
    d.logs.push((id.clone(), body));
    (StatusCode::CREATED, Json(json!({"id": id}))).into_response()
}

async fn update_call(
    State(data): State<Arc<Mutex<CrmData>>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Json(body): Json<Value>,
) -> Response {
    if let Err(r) = authorized(&data, &headers) {
        return *r;
    }
    data.lock().unwrap().updates.push((id, body));
    StatusCode::NO_CONTENT.into_response()
}

async fn find_contacts(
    State(data): State<Arc<Mutex<CrmData>>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Err(r) = authorized(&data, &headers) {
        return *r;
    }
    let phone = q.get("phone").cloned().unwrap_or_default();
    let mut d = data.lock().unwrap();
    d.lookups.push(phone.clone());
    let found: Vec<Value> = d
        .contacts
        .iter()
        .filter(|(p, _)| *p == phone)
        .map(|(_, id)| json!({"id": id, "type": "contact", "name": "Known Customer"}))
        .collect();
    Json(json!({"data": found})).into_response()
}

async fn create_contact(
    State(data): State<Arc<Mutex<CrmData>>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Err(r) = authorized(&data, &headers) {
        return *r;
    }
    let phone = body["phone"].as_str().unwrap_or_default().to_owned();
    let mut d = data.lock().unwrap();
    let id = format!("c-new-{}", d.created_contacts.len() + 1);
    d.created_contacts.push(phone.clone());
    d.contacts.push((phone, id.clone()));
    (StatusCode::CREATED, Json(json!({"id": id}))).into_response()
}

async fn users(State(data): State<Arc<Mutex<CrmData>>>, headers: HeaderMap) -> Response {
    if let Err(r) = authorized(&data, &headers) {
        return *r;
    }
    let users = data.lock().unwrap().users.clone();
    Json(json!({"data": users})).into_response()
}

/// The connector for the fake CRM.
pub struct FakeConnector {
    base: String,
    http: reqwest::Client,
}

impl FakeConnector {
    async fn send(&self, req: OAuthRequest) -> Result<(u16, http::HeaderMap, Bytes), String> {
        let resp = self
            .http
            .request(req.method, &req.url)
            .headers(req.headers)
            .body(req.body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        Ok((
            status,
            headers,
            resp.bytes().await.map_err(|e| e.to_string())?,
        ))
    }

    async fn grant(
        &self,
        grant: TokenGrant<'_>,
        vars: &InstallVars,
    ) -> Result<TokenSet, OAuthError> {
        let mut spec = self.oauth_spec();
        // A marketplace install began at the CRM, without our PKCE challenge.
        if let TokenGrant::AuthorizationCode {
            pkce_verifier: None,
            ..
        } = grant
        {
            spec.pkce = false;
        }
        let req = spec.token_request(grant, CLIENT_SECRET, vars, None)?;
        let (status, headers, body) = self.send(req).await.map_err(OAuthError::Transient)?;
        spec.parse_token_response(status, &headers, &body, vars, Utc::now())
    }

    async fn api(
        &self,
        req: reqwest::RequestBuilder,
        token: &AccessToken,
    ) -> Result<Value, ConnectorError> {
        let resp = req
            .bearer_auth(&token.0)
            .send()
            .await
            .map_err(ConnectorError::transport)?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.bytes().await.map_err(ConnectorError::transport)?;
        if !(200..300).contains(&status) {
            return Err(callbridge_connector::classify_response(
                status,
                &headers,
                &body,
                Utc::now(),
            ));
        }
        if body.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&body).map_err(|e| ConnectorError::Permanent(e.to_string()))
    }
}

#[async_trait::async_trait]
impl Connector for FakeConnector {
    fn name(&self) -> &'static str {
        NAME
    }

    fn oauth_spec(&self) -> OAuthSpec {
        OAuthSpec {
            client_id: CLIENT_ID.into(),
            authorize_url: format!("{}/oauth/authorize", self.base),
            token_url: format!("{}/oauth/token", self.base),
            revoke_url: Some(format!("{}/oauth/revoke", self.base)),
            scopes: vec!["calls".into(), "contacts".into()],
            scope_separator: " ".into(),
            scope_in_token_request: false,
            extra_authorize_params: vec![],
            pkce: true,
            client_auth: ClientAuth::FormBody,
            install_params: vec![],
            api_base_from: ApiBaseSource::TokenResponseField("api_base".into()),
            api_base_hosts: vec!["127.0.0.1".into()],
            refresh_rotation: RefreshRotation::Always,
            expiry: TokenExpiry::ExpiresIn,
            marketplace_installs: true,
            uninstall_callback: true,
        }
    }

    async fn exchange_code(
        &self,
        vars: &InstallVars,
        exchange: &CodeExchange,
    ) -> Result<TokenSet, OAuthError> {
        self.grant(
            TokenGrant::AuthorizationCode {
                code: &exchange.code,
                redirect_uri: &exchange.redirect_uri,
                pkce_verifier: exchange.pkce_verifier.as_deref(),
            },
            vars,
        )
        .await
    }

    async fn refresh(
        &self,
        install: &InstallContext,
        refresh_token: &RefreshToken,
    ) -> Result<TokenSet, OAuthError> {
        self.grant(TokenGrant::RefreshToken(refresh_token), &install.vars)
            .await
    }

    async fn revoke(
        &self,
        install: &InstallContext,
        tokens: &StoredTokens,
    ) -> Result<(), ConnectorError> {
        let Some(rt) = &tokens.refresh_token else {
            return Ok(());
        };
        let req = self
            .oauth_spec()
            .revoke_request(
                &rt.0,
                Some("refresh_token"),
                CLIENT_SECRET,
                &install.vars,
                None,
            )
            .map_err(|e| ConnectorError::Permanent(e.to_string()))?
            .ok_or_else(|| ConnectorError::Unsupported("no revoke".into()))?;
        self.send(req).await.map_err(ConnectorError::Transient)?;
        Ok(())
    }

    async fn account_id(
        &self,
        install: &InstallContext,
        token: &AccessToken,
    ) -> Result<Option<String>, ConnectorError> {
        let v = self
            .api(self.http.get(format!("{}/api/me", install.api_base)), token)
            .await?;
        Ok(v["account"].as_str().map(str::to_owned))
    }

    /// A click is `{"account","user","phone","record":{"object_type","id"}}` with the client
    /// secret in `x-fake-signature`.
    fn verify_click(
        &self,
        _install: Option<&InstallContext>,
        request: &InboundRequest,
        _now: chrono::DateTime<Utc>,
    ) -> Result<VerifiedClick, ClickError> {
        if request.header("x-fake-signature") != Some(CLIENT_SECRET) {
            return Err(ClickError::Unauthorized("bad signature".into()));
        }
        let body: Value = serde_json::from_slice(&request.body)
            .map_err(|e| ClickError::Malformed(e.to_string()))?;
        let text = |k: &str| body[k].as_str().map(str::to_owned);
        let phone = text("phone").ok_or_else(|| ClickError::Malformed("no phone".into()))?;
        Ok(VerifiedClick {
            account_id: text("account"),
            dial: DialRequest {
                crm_user_id: text("user").ok_or_else(|| ClickError::Malformed("no user".into()))?,
                to_number: phone,
                record: serde_json::from_value(body["record"].clone()).ok(),
                related: vec![],
            },
            context_keys: body
                .as_object()
                .map(|o| o.keys().cloned().collect())
                .unwrap_or_default(),
        })
    }

    fn verify_uninstall(&self, request: &InboundRequest) -> Result<UninstallNotice, ClickError> {
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD
                .encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"))
        );
        if request.header("authorization") != Some(expected.as_str()) {
            return Err(ClickError::Unauthorized("bad credentials".into()));
        }
        let body: Value = serde_json::from_slice(&request.body)
            .map_err(|e| ClickError::Malformed(e.to_string()))?;
        Ok(UninstallNotice {
            account_id: body["account"]
                .as_str()
                .ok_or_else(|| ClickError::Malformed("no account".into()))?
                .to_owned(),
            user_id: None,
        })
    }

    async fn log_call(
        &self,
        install: &InstallContext,
        token: &AccessToken,
        call: &CallRecord,
    ) -> Result<CrmLogRef, ConnectorError> {
        let v = self
            .api(
                self.http
                    .post(format!("{}/api/calls", install.api_base))
                    .json(call),
                token,
            )
            .await?;
        Ok(CrmLogRef {
            id: v["id"].as_str().unwrap_or_default().to_owned(),
            updatable: true,
        })
    }

    async fn update_call(
        &self,
        install: &InstallContext,
        token: &AccessToken,
        log: &CrmLogRef,
        call: &CallRecord,
    ) -> Result<(), ConnectorError> {
        self.api(
            self.http
                .patch(format!("{}/api/calls/{}", install.api_base, log.id))
                .json(call),
            token,
        )
        .await?;
        Ok(())
    }

    async fn find_contact_by_phone(
        &self,
        install: &InstallContext,
        token: &AccessToken,
        e164: &str,
    ) -> Result<Vec<ContactMatch>, ConnectorError> {
        let v = self
            .api(
                self.http
                    .get(format!("{}/api/contacts", install.api_base))
                    .query(&[("phone", e164)]),
                token,
            )
            .await?;
        Ok(v["data"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| ContactMatch {
                record: CrmRecordRef {
                    object_type: "contact".into(),
                    id: c["id"].as_str().unwrap_or_default().to_owned(),
                },
                name: c["name"].as_str().map(str::to_owned),
            })
            .collect())
    }

    async fn create_contact(
        &self,
        install: &InstallContext,
        token: &AccessToken,
        e164: &str,
    ) -> Result<CrmRecordRef, ConnectorError> {
        let v = self
            .api(
                self.http
                    .post(format!("{}/api/contacts", install.api_base))
                    .json(&json!({"phone": e164})),
                token,
            )
            .await?;
        Ok(CrmRecordRef {
            object_type: "contact".into(),
            id: v["id"].as_str().unwrap_or_default().to_owned(),
        })
    }

    async fn list_users(
        &self,
        install: &InstallContext,
        token: &AccessToken,
    ) -> Result<Vec<CrmUser>, ConnectorError> {
        let v = self
            .api(
                self.http.get(format!("{}/api/users", install.api_base)),
                token,
            )
            .await?;
        Ok(v["data"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|u| CrmUser {
                id: u["id"].as_str().unwrap_or_default().to_owned(),
                name: u["name"].as_str().map(str::to_owned),
                email: u["email"].as_str().map(str::to_owned),
                phone: u["phone"].as_str().map(str::to_owned),
            })
            .collect())
    }
}
