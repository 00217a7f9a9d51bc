//! The Pipedrive connector: OAuth app install, app-extension click-to-call, call logs with
//! recording upload, person lookup by phone and user listing (shared/docs/crm-pipedrive-zendesk.md §1).
//!
//! What shapes it:
//! - OAuth at `oauth.pipedrive.com` (configurable), client credentials as Basic auth on token,
//!   refresh and revoke; `api_domain` is read from *every* token response (refresh too) and
//!   must be a `pipedrive.com` host (configurable for tests); 60-minute access tokens;
//!   refresh tokens do not rotate. Marketplace installs land on the callback without our
//!   `state`.
//! - Call logs are immutable: [`Connector::update_call`] succeeds without a request; the
//!   recording is uploaded once ([`RecordingMode::Upload`]), a 409 meaning it already is.
//! - Never retry in a tight loop: persistent 429s turn into a Cloudflare 403 block, which is
//!   reported as rate limited for [`PipedriveConfig::block_backoff`].
//!
//! Error policy: every failure is a [`ConnectorError`] (API) or [`OAuthError`] (token
//! endpoint), classified in [`api::classify`] and [`OAuthSpec::parse_token_response`].

use std::time::Duration;

use bytes::Bytes;
use callbridge_connector::{
    AccessToken, ApiBaseSource, CallRecord, ClickError, ClientAuth, CodeExchange, Connector,
    ConnectorError, ContactMatch, CrmLogRef, CrmRecordRef, CrmUser, DialRequest, InboundRequest,
    InstallContext, InstallVars, OAuthError, OAuthRequest, OAuthSpec, RecordingFile, RecordingMode,
    RefreshRotation, RefreshToken, StoredTokens, TokenExpiry, TokenGrant, TokenSet,
    UninstallNotice, VerifiedClick,
};
use chrono::{DateTime, Utc};
use http::HeaderMap;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

pub mod api;
pub mod calllog;
pub mod extension;

pub use extension::{
    ClickContext, ExtensionClaims, parse_click_context, verify_extension_jwt,
    verify_uninstall_request,
};

/// The connector's stable name.
pub const NAME: &str = "pipedrive";

/// The scopes the app needs, set in Pipedrive's Developer Hub (Pipedrive's authorize URL
/// takes no `scope`): shown to admins, not sent.
pub const REQUIRED_SCOPES: &[&str] = &[
    "base",
    "phone-integration",
    "contacts:read",
    "deals:read",
    "leads:read",
    "users:read",
];

/// Configuration: client credentials and every base URL (tests point them at loopback).
#[derive(Debug, Clone)]
pub struct PipedriveConfig {
    /// The OAuth host, `https://oauth.pipedrive.com`.
    pub oauth_base: String,
    /// The app's client id.
    pub client_id: String,
    /// The app's client secret.
    pub client_secret: SecretString,
    /// The Developer Hub "JWT secret" for app-extension tokens; `None` = the client secret
    /// (Pipedrive's default).
    pub jwt_secret: Option<SecretString>,
    /// Host suffixes an `api_domain` may have (`pipedrive.com`).
    pub api_hosts: Vec<String>,
    /// How long to wait after a Cloudflare 403 block page.
    pub block_backoff: Duration,
    /// How long to wait after a 429 without usable headers.
    pub burst_backoff: Duration,
    /// Per-request timeout.
    pub request_timeout: Duration,
}

impl PipedriveConfig {
    /// Production defaults for these credentials.
    #[must_use]
    pub fn new(client_id: impl Into<String>, client_secret: SecretString) -> Self {
        Self {
            oauth_base: "https://oauth.pipedrive.com".into(),
            client_id: client_id.into(),
            client_secret,
            jwt_secret: None,
            api_hosts: vec!["pipedrive.com".into()],
            block_backoff: Duration::from_secs(15 * 60),
            burst_backoff: Duration::from_secs(2),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// The Pipedrive connector.
#[derive(Debug, Clone)]
pub struct Pipedrive {
    config: PipedriveConfig,
    http: reqwest::Client,
}

impl Pipedrive {
    /// A connector using the host's shared HTTP client.
    #[must_use]
    pub fn new(config: PipedriveConfig, http: reqwest::Client) -> Self {
        Self { config, http }
    }

    /// Its configuration.
    #[must_use]
    pub fn config(&self) -> &PipedriveConfig {
        &self.config
    }

    fn backoff(&self) -> api::Backoff {
        api::Backoff {
            burst: self.config.burst_backoff,
            block: self.config.block_backoff,
        }
    }

    fn spec(&self) -> OAuthSpec {
        let base = self.config.oauth_base.trim_end_matches('/');
        OAuthSpec {
            client_id: self.config.client_id.clone(),
            authorize_url: format!("{base}/oauth/authorize"),
            token_url: format!("{base}/oauth/token"),
            revoke_url: Some(format!("{base}/oauth/revoke")),
            scopes: vec![],
            scope_separator: " ".into(),
            scope_in_token_request: false,
            extra_authorize_params: vec![],
            pkce: false,
            client_auth: ClientAuth::BasicHeader,
            install_params: vec![],
            api_base_from: ApiBaseSource::TokenResponseField("api_domain".into()),
            api_base_hosts: self.config.api_hosts.clone(),
            refresh_rotation: RefreshRotation::Never,
            expiry: TokenExpiry::ExpiresIn,
            marketplace_installs: true,
            uninstall_callback: true,
        }
    }

    async fn send_oauth(
        &self,
        req: OAuthRequest,
    ) -> Result<(u16, HeaderMap, Bytes), reqwest::Error> {
        let resp = self
            .http
            .request(req.method, &req.url)
            .headers(req.headers)
            .body(req.body)
            .timeout(self.config.request_timeout)
            .send()
            .await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        Ok((status, headers, resp.bytes().await?))
    }

    async fn token(&self, grant: TokenGrant<'_>) -> Result<TokenSet, OAuthError> {
        let spec = self.spec();
        let vars = InstallVars::new();
        let req = spec.token_request(
            grant,
            self.config.client_secret.expose_secret(),
            &vars,
            None,
        )?;
        let (status, headers, body) = self
            .send_oauth(req)
            .await
            .map_err(|e| OAuthError::Transient(e.to_string()))?;
        let set = spec.parse_token_response(status, &headers, &body, &vars, Utc::now())?;
        if set.api_base.is_none() {
            return Err(OAuthError::Malformed(
                "Pipedrive's token response has no api_domain".into(),
            ));
        }
        Ok(set)
    }

    /// Revoke the refresh token (`POST /oauth/revoke`, form
    /// `token=…&token_type_hint=refresh_token`, Basic auth). This uninstalls the app for the
    /// company; Pipedrive answers 200 even for unknown tokens.
    ///
    /// # Errors
    /// Transport failures and 5xx/429 are retryable; anything else is permanent.
    pub async fn revoke_token(
        &self,
        token: &str,
        token_type_hint: &str,
    ) -> Result<(), ConnectorError> {
        let req = self
            .spec()
            .revoke_request(
                token,
                Some(token_type_hint),
                self.config.client_secret.expose_secret(),
                &InstallVars::new(),
                None,
            )
            .map_err(|e| ConnectorError::Permanent(e.to_string()))?
            .ok_or_else(|| ConnectorError::Permanent("no revoke URL".into()))?;
        let (status, headers, body) = self
            .send_oauth(req)
            .await
            .map_err(ConnectorError::transport)?;
        if (200..300).contains(&status) {
            return Ok(());
        }
        Err(
            match api::classify(status, &headers, &body, Utc::now(), self.backoff()) {
                // A 401 here means our client credentials, not an access token: no refresh helps.
                ConnectorError::NeedsRefresh(m) => ConnectorError::Permanent(m),
                other => other,
            },
        )
    }

    fn url(install: &InstallContext, path: &str) -> String {
        format!("{}{path}", install.api_base.trim_end_matches('/'))
    }

    /// Send an API request; a 2xx body comes back as JSON, anything else is classified.
    async fn call(&self, request: reqwest::RequestBuilder) -> Result<Value, ConnectorError> {
        let (status, headers, body) = self.call_raw(request).await?;
        if !(200..300).contains(&status) {
            return Err(api::classify(
                status,
                &headers,
                &body,
                Utc::now(),
                self.backoff(),
            ));
        }
        let json: Value = serde_json::from_slice(&body).map_err(|e| {
            ConnectorError::Transient(format!(
                "Pipedrive answered {status} with a non-JSON body: {e}"
            ))
        })?;
        if json.get("success").and_then(Value::as_bool) == Some(false) {
            return Err(ConnectorError::Permanent(format!(
                "Pipedrive answered success=false: {}",
                callbridge_connector::error_message(&body).unwrap_or_default()
            )));
        }
        Ok(json)
    }

    async fn call_raw(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<(u16, HeaderMap, Bytes), ConnectorError> {
        let resp = request
            .timeout(self.config.request_timeout)
            .header(http::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(ConnectorError::transport)?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.bytes().await.map_err(ConnectorError::transport)?;
        Ok((status, headers, body))
    }

    /// Verify an app-extension click relayed by callbridge's iframe page. The JWT comes in
    /// `Authorization: Bearer …` or the body's `token`; the context is the body's `context`
    /// (or the body itself).
    ///
    /// # Errors
    /// [`ClickError::Unauthorized`] for a bad token, [`ClickError::Malformed`] for a body
    /// without a usable number.
    pub fn verify_relayed_click(
        &self,
        request: &InboundRequest,
        now: DateTime<Utc>,
    ) -> Result<VerifiedClick, ClickError> {
        let body: Value = if request.body.is_empty() {
            Value::Object(serde_json::Map::new())
        } else {
            serde_json::from_slice(&request.body)
                .map_err(|e| ClickError::Malformed(format!("click body is not JSON: {e}")))?
        };
        let token = request
            .header("authorization")
            .and_then(|h| {
                h.split_once(' ')
                    .filter(|(s, _)| s.eq_ignore_ascii_case("bearer"))
                    .map(|(_, t)| t.trim().to_owned())
            })
            .or_else(|| body.get("token").and_then(Value::as_str).map(str::to_owned))
            .ok_or_else(|| ClickError::Unauthorized("no extension token".into()))?;
        let secret = self
            .config
            .jwt_secret
            .as_ref()
            .unwrap_or(&self.config.client_secret);
        let claims = verify_extension_jwt(&token, secret, now)?;
        let context = match body.get("context") {
            Some(c) => c.clone(),
            None => {
                let mut b = body;
                if let Some(o) = b.as_object_mut() {
                    o.remove("token");
                }
                b
            }
        };
        let ctx = parse_click_context(&context)?;
        let rec = |t: &str, id: &Option<String>| {
            id.clone().map(|id| CrmRecordRef {
                object_type: t.into(),
                id,
            })
        };
        // Most specific first: a deal or lead is what the call is about, the person and the
        // organization are who it was with.
        let mut records: Vec<CrmRecordRef> = [
            rec("deal", &ctx.deal_id),
            rec("lead", &ctx.lead_id),
            rec("person", &ctx.person_id),
            rec("organization", &ctx.org_id),
        ]
        .into_iter()
        .flatten()
        .collect();
        let record = (!records.is_empty()).then(|| records.remove(0));
        Ok(VerifiedClick {
            account_id: Some(claims.company_id),
            dial: DialRequest {
                crm_user_id: claims.user_id,
                to_number: ctx.phone,
                record,
                related: records,
            },
            context_keys: ctx.keys_seen,
        })
    }
}

#[async_trait::async_trait]
impl Connector for Pipedrive {
    fn name(&self) -> &'static str {
        NAME
    }

    fn oauth_spec(&self) -> OAuthSpec {
        self.spec()
    }

    async fn exchange_code(
        &self,
        _vars: &InstallVars,
        exchange: &CodeExchange,
    ) -> Result<TokenSet, OAuthError> {
        self.token(TokenGrant::AuthorizationCode {
            code: &exchange.code,
            redirect_uri: &exchange.redirect_uri,
            pkce_verifier: None,
        })
        .await
    }

    async fn refresh(
        &self,
        _install: &InstallContext,
        refresh_token: &RefreshToken,
    ) -> Result<TokenSet, OAuthError> {
        self.token(TokenGrant::RefreshToken(refresh_token)).await
    }

    async fn revoke(
        &self,
        _install: &InstallContext,
        tokens: &StoredTokens,
    ) -> Result<(), ConnectorError> {
        // Revoking the refresh token removes the install; the access token alone would leave
        // it installed, so it is only the fallback.
        match (&tokens.refresh_token, &tokens.access_token) {
            (Some(rt), _) => self.revoke_token(&rt.0, "refresh_token").await,
            (None, Some(at)) => self.revoke_token(&at.0, "access_token").await,
            (None, None) => Ok(()),
        }
    }

    fn verify_click(
        &self,
        _install: Option<&InstallContext>,
        request: &InboundRequest,
        now: DateTime<Utc>,
    ) -> Result<VerifiedClick, ClickError> {
        self.verify_relayed_click(request, now)
    }

    fn verify_uninstall(&self, request: &InboundRequest) -> Result<UninstallNotice, ClickError> {
        verify_uninstall_request(
            request.header("authorization"),
            &request.body,
            &self.config.client_id,
            &self.config.client_secret,
        )
    }

    async fn log_call(
        &self,
        install: &InstallContext,
        token: &AccessToken,
        call: &CallRecord,
    ) -> Result<CrmLogRef, ConnectorError> {
        let body = calllog::call_log_body(call)?;
        let json = self
            .call(
                self.http
                    .post(Self::url(install, "/api/v1/callLogs"))
                    .bearer_auth(&token.0)
                    .json(&body),
            )
            .await?;
        let id = api::call_log_id(&json).ok_or_else(|| {
            ConnectorError::Permanent("Pipedrive's call log answer has no data.id".into())
        })?;
        Ok(CrmLogRef {
            id,
            updatable: false,
        })
    }

    async fn update_call(
        &self,
        _install: &InstallContext,
        _token: &AccessToken,
        _log: &CrmLogRef,
        _call: &CallRecord,
    ) -> Result<(), ConnectorError> {
        // Pipedrive call logs have no update endpoint; the log was written from the final
        // record and the recording goes through `upload_recording`.
        Ok(())
    }

    fn recording_mode(&self) -> RecordingMode {
        RecordingMode::Upload
    }

    async fn upload_recording(
        &self,
        install: &InstallContext,
        token: &AccessToken,
        log: &CrmLogRef,
        file: &RecordingFile,
    ) -> Result<(), ConnectorError> {
        let mut url = url::Url::parse(&Self::url(install, "/api/v1/callLogs"))
            .map_err(|e| ConnectorError::Permanent(format!("api base: {e}")))?;
        url.path_segments_mut()
            .map_err(|()| ConnectorError::Permanent("api base cannot take a path".into()))?
            .push(&log.id)
            .push("recordings");
        let part = reqwest::multipart::Part::stream(reqwest::Body::from(file.bytes.clone()))
            .file_name(file.filename.clone())
            .mime_str(&file.content_type)
            .map_err(|e| ConnectorError::Permanent(format!("content type: {e}")))?;
        let form = reqwest::multipart::Form::new().part("file", part);
        let (status, headers, body) = self
            .call_raw(self.http.post(url).bearer_auth(&token.0).multipart(form))
            .await?;
        match status {
            200..=299 => Ok(()),
            // "A recording for this call already exists": the earlier attempt landed.
            409 => Ok(()),
            _ => Err(api::classify(
                status,
                &headers,
                &body,
                Utc::now(),
                self.backoff(),
            )),
        }
    }

    async fn find_contact_by_phone(
        &self,
        install: &InstallContext,
        token: &AccessToken,
        e164: &str,
    ) -> Result<Vec<ContactMatch>, ConnectorError> {
        let mut found: Vec<ContactMatch> = Vec::new();
        for term in api::number_forms(e164) {
            let json = self
                .call(
                    self.http
                        .get(Self::url(install, "/api/v2/persons/search"))
                        .bearer_auth(&token.0)
                        .query(&[
                            ("term", term.as_str()),
                            ("fields", "phone"),
                            ("exact_match", "true"),
                        ]),
                )
                .await?;
            for m in api::persons_from_search(&json) {
                if !found.iter().any(|f| f.record == m.record) {
                    found.push(m);
                }
            }
        }
        Ok(found)
    }

    /// `GET /api/v1/users/me` → `data.company_id` (the id app-extension JWTs and the
    /// uninstall callback carry).
    async fn account_id(
        &self,
        install: &InstallContext,
        token: &AccessToken,
    ) -> Result<Option<String>, ConnectorError> {
        let json = self
            .call(
                self.http
                    .get(Self::url(install, "/api/v1/users/me"))
                    .bearer_auth(&token.0),
            )
            .await?;
        let id = match json.pointer("/data/company_id") {
            Some(Value::Number(n)) => n.to_string(),
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => {
                return Err(ConnectorError::Permanent(
                    "Pipedrive's /users/me has no data.company_id".into(),
                ));
            }
        };
        Ok(Some(id))
    }

    async fn list_users(
        &self,
        install: &InstallContext,
        token: &AccessToken,
    ) -> Result<Vec<CrmUser>, ConnectorError> {
        let json = self
            .call(
                self.http
                    .get(Self::url(install, "/api/v1/users"))
                    .bearer_auth(&token.0),
            )
            .await?;
        Ok(api::users_from_list(&json))
    }
}
