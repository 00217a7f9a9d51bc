//! A CRM's OAuth install described as data ([`OAuthSpec`]), the per-install values it needs
//! ([`InstallVars`]: Zendesk subdomain, Zoho accounts server …), the requests built from it
//! (authorize URL, token and revoke requests) and the token-response parser ([`TokenSet`]).
//!
//! Rules this module enforces:
//! - every per-install value that ends up in a URL is validated first (a subdomain is one DNS
//!   label; a base URL is https on an allow-listed host suffix), so a tenant or a forged
//!   callback cannot point our credentials at another host;
//! - a token response is checked for an `error` member even on HTTP 200 (Zoho answers
//!   over-limit refreshes that way);
//! - a refresh response may omit the refresh token or the API base: `None` means "keep the one
//!   you have"; a returned refresh token must be persisted before the access token is used.

use std::collections::BTreeMap;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use http::{HeaderMap, HeaderValue, Method, header};
use serde::{Deserialize, Serialize};

use crate::{AccessToken, RefreshToken, error::retry_after};

/// How a CRM's OAuth install works.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OAuthSpec {
    /// Our OAuth client id at this CRM (public; the secret stays inside the connector).
    pub client_id: String,
    /// Authorization endpoint template. Placeholders are `{name}` of an [`InstallParam`] or
    /// `{api_base}`; see [`fill_template`].
    pub authorize_url: String,
    /// Token endpoint template (code exchange and refresh).
    pub token_url: String,
    /// Revocation endpoint template, when the CRM has one.
    pub revoke_url: Option<String>,
    /// Scopes to request; empty when the CRM fixes them in its developer console (Pipedrive).
    pub scopes: Vec<String>,
    /// How scopes are joined (`" "` for most, `","` for Zoho).
    pub scope_separator: String,
    /// Also send `scope` in the code-exchange request (Zendesk's JSON token endpoint wants it).
    pub scope_in_token_request: bool,
    /// Extra authorize parameters (Zoho: `access_type=offline`, `prompt=consent`).
    pub extra_authorize_params: Vec<(String, String)>,
    /// Whether to send a PKCE (S256) challenge.
    pub pkce: bool,
    /// How our client credentials reach the token and revoke endpoints.
    pub client_auth: ClientAuth,
    /// Per-install values the flow needs, and where each comes from.
    pub install_params: Vec<InstallParam>,
    /// How the per-install API base comes back.
    pub api_base_from: ApiBaseSource,
    /// Host suffixes an API base may have (`pipedrive.com`, `zohoapis.eu` …). A token response
    /// naming another host is refused, so the access token is never sent elsewhere.
    pub api_base_hosts: Vec<String>,
    /// What a refresh does to the refresh token.
    pub refresh_rotation: RefreshRotation,
    /// Whether the token response says when the access token expires.
    pub expiry: TokenExpiry,
    /// Whether installs may start at the CRM (a marketplace) and land on our callback without
    /// a `state` we issued. The host must then bind the install some other way (e.g. ask the
    /// admin to log in and pick the tenant before exchanging the code).
    pub marketplace_installs: bool,
    /// Whether the CRM calls us when an app is uninstalled on its side (Pipedrive's `DELETE`).
    pub uninstall_callback: bool,
}

/// How client credentials are presented to the token endpoint.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// `Authorization: Basic base64(client_id:client_secret)`, form body without them
    /// (Pipedrive).
    BasicHeader,
    /// `client_id` and `client_secret` in the form body (Salesforce, Zoho).
    FormBody,
    /// Everything, credentials included, in a JSON body (Zendesk).
    JsonBody,
}

/// One per-install value the OAuth flow needs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InstallParam {
    /// The placeholder name used in templates (`subdomain`, `accounts_server`).
    pub name: String,
    /// Where the value comes from.
    pub source: ParamSource,
    /// What a valid value looks like.
    pub rule: ParamRule,
    /// Whether the flow cannot proceed without it.
    pub required: bool,
}

/// Where a per-install value comes from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "kind", content = "key")]
pub enum ParamSource {
    /// Typed by the admin before the flow starts (Zendesk subdomain).
    AdminInput,
    /// A query parameter of the OAuth callback (Zoho `accounts-server`, `location`).
    CallbackQuery(String),
}

/// What a valid per-install value looks like.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "kind", content = "host_suffixes")]
pub enum ParamRule {
    /// One DNS label (`[a-z0-9-]`, 1–63, no leading/trailing `-`); lower-cased.
    Subdomain,
    /// A short token (`[A-Za-z0-9_.-]`, 1–64), e.g. a data-centre code.
    Token,
    /// An `https` origin whose host is one of these suffixes (or a subdomain of one).
    BaseUrl(Vec<String>),
}

/// Where the per-install API base is found after the token exchange.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "kind", content = "value")]
pub enum ApiBaseSource {
    /// A field of the token response (`api_domain`, `instance_url`).
    TokenResponseField(String),
    /// A template over the install values (`https://{subdomain}.zendesk.com`).
    Template(String),
}

/// What a refresh does to the refresh token.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RefreshRotation {
    /// The refresh token stays valid (Pipedrive returns the same one; Zoho returns none).
    Never,
    /// Every refresh returns a new refresh token and kills the old pair (Zendesk).
    Always,
    /// The CRM may rotate (Salesforce with Refresh Token Rotation on): a returned token
    /// replaces the stored one.
    WhenReturned,
}

/// Whether the token response carries the access token's lifetime.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TokenExpiry {
    /// `expires_in` (seconds; Zoho's `expires_in_sec` preferred when present).
    ExpiresIn,
    /// No lifetime is sent (Salesforce): refresh when the API answers 401.
    Absent,
}

/// Per-install values (validated), keyed by [`InstallParam::name`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct InstallVars(BTreeMap<String, String>);

impl InstallVars {
    /// No values (CRMs with fixed hosts, such as Pipedrive).
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Collect and validate the values the spec asks for from what the admin typed and the
    /// callback's query string. Unknown inputs are ignored.
    ///
    /// # Errors
    /// [`OAuthError::MissingParam`] for an absent required value, [`OAuthError::InvalidParam`]
    /// for one that breaks its [`ParamRule`].
    pub fn collect(
        spec: &OAuthSpec,
        admin_inputs: &[(String, String)],
        callback_query: &[(String, String)],
    ) -> Result<Self, OAuthError> {
        let lookup = |pairs: &[(String, String)], key: &str| {
            pairs
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let mut vars = Self::new();
        for param in &spec.install_params {
            let value = match &param.source {
                ParamSource::AdminInput => lookup(admin_inputs, &param.name),
                ParamSource::CallbackQuery(key) => lookup(callback_query, key),
            };
            match value {
                Some(v) => {
                    vars.0.insert(
                        param.name.clone(),
                        validate_param(&param.name, &param.rule, &v)?,
                    );
                }
                None if param.required => return Err(OAuthError::MissingParam(param.name.clone())),
                None => {}
            }
        }
        Ok(vars)
    }

    /// A value by name.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// Set a value after validating it against `rule`.
    ///
    /// # Errors
    /// [`OAuthError::InvalidParam`] when the value breaks the rule.
    pub fn set(&mut self, name: &str, rule: &ParamRule, value: &str) -> Result<(), OAuthError> {
        let v = validate_param(name, rule, value)?;
        self.0.insert(name.to_owned(), v);
        Ok(())
    }
}

fn validate_param(name: &str, rule: &ParamRule, value: &str) -> Result<String, OAuthError> {
    let invalid = |reason: &str| OAuthError::InvalidParam {
        name: name.to_owned(),
        reason: reason.to_owned(),
    };
    match rule {
        ParamRule::Subdomain => {
            let v = value.to_ascii_lowercase();
            let ok = (1..=63).contains(&v.len())
                && v.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !v.starts_with('-')
                && !v.ends_with('-');
            if ok {
                Ok(v)
            } else {
                Err(invalid("not a single DNS label"))
            }
        }
        ParamRule::Token => {
            let ok = (1..=64).contains(&value.len())
                && value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
            if ok {
                Ok(value.to_owned())
            } else {
                Err(invalid("not a short token"))
            }
        }
        ParamRule::BaseUrl(suffixes) => validate_base_url(value, suffixes).map_err(|r| invalid(&r)),
    }
}

/// Check that `raw` is an origin we may send credentials to: `https` (plain `http` only for a
/// loopback host, for tests), no user info, query or path beyond `/`, and a host equal to one
/// of `host_suffixes` or a subdomain of one. Returns the normalised origin (no trailing `/`).
///
/// # Errors
/// A human reason when the URL is refused.
pub fn validate_base_url(raw: &str, host_suffixes: &[String]) -> Result<String, String> {
    let url = url::Url::parse(raw.trim()).map_err(|e| format!("not a URL: {e}"))?;
    let host = url
        .host_str()
        .ok_or_else(|| "URL has no host".to_owned())?
        .to_ascii_lowercase();
    let loopback = matches!(host.as_str(), "127.0.0.1" | "[::1]" | "localhost");
    match url.scheme() {
        "https" => {}
        "http" if loopback => {}
        other => return Err(format!("scheme {other} is not allowed")),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("URL carries credentials".to_owned());
    }
    if url.query().is_some() || url.fragment().is_some() || !matches!(url.path(), "" | "/") {
        return Err("URL must be an origin (no path or query)".to_owned());
    }
    let allowed = host_suffixes.iter().any(|s| {
        let s = s.trim_start_matches('.').to_ascii_lowercase();
        host == s || host.ends_with(&format!(".{s}"))
    });
    if !allowed {
        return Err(format!("host {host} is not an allowed API host"));
    }
    Ok(url.origin().ascii_serialization())
}

/// Fill `{name}` placeholders from `vars`, and `{api_base}` from `api_base`.
///
/// # Errors
/// [`OAuthError::MissingParam`] for a placeholder without a value, or an unclosed `{`.
pub fn fill_template(
    template: &str,
    vars: &InstallVars,
    api_base: Option<&str>,
) -> Result<String, OAuthError> {
    let mut out = String::with_capacity(template.len() + 32);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let close = after.find('}').ok_or_else(|| {
            OAuthError::MissingParam(format!("unclosed placeholder in {template}"))
        })?;
        let name = &after[..close];
        let value = if name == "api_base" {
            api_base.map(|b| b.trim_end_matches('/'))
        } else {
            vars.get(name)
        }
        .ok_or_else(|| OAuthError::MissingParam(name.to_owned()))?;
        out.push_str(value);
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The grant a token request carries.
#[derive(Clone, Copy)]
pub enum TokenGrant<'a> {
    /// Exchange the callback's code.
    AuthorizationCode {
        /// The `code` query parameter of the callback.
        code: &'a str,
        /// The exact redirect URI used in the authorize request.
        redirect_uri: &'a str,
        /// The PKCE verifier, when the spec uses PKCE.
        pkce_verifier: Option<&'a str>,
    },
    /// Get a new access token.
    RefreshToken(&'a RefreshToken),
}

/// An HTTP request to an OAuth endpoint, ready to send with any client. Its `Debug` shows
/// neither headers nor body (both may hold secrets).
#[derive(Clone)]
pub struct OAuthRequest {
    /// The method (POST for token and RFC 7009 revoke).
    pub method: Method,
    /// The absolute URL.
    pub url: String,
    /// Headers (content type, accept, Basic auth).
    pub headers: HeaderMap,
    /// The encoded body.
    pub body: Vec<u8>,
}

impl std::fmt::Debug for OAuthRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuthRequest")
            .field("method", &self.method)
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl OAuthSpec {
    /// The URL to send the admin's browser to.
    ///
    /// # Errors
    /// A missing placeholder value, a bad template, or a missing PKCE challenge when the
    /// spec requires one.
    pub fn authorize_url(
        &self,
        vars: &InstallVars,
        redirect_uri: &str,
        state: &str,
        pkce_challenge: Option<&str>,
    ) -> Result<String, OAuthError> {
        let base = fill_template(&self.authorize_url, vars, None)?;
        let mut url = url::Url::parse(&base)
            .map_err(|e| OAuthError::MissingParam(format!("authorize URL {base}: {e}")))?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("response_type", "code")
                .append_pair("client_id", &self.client_id)
                .append_pair("redirect_uri", redirect_uri)
                .append_pair("state", state);
            if !self.scopes.is_empty() {
                q.append_pair("scope", &self.scopes.join(&self.scope_separator));
            }
            if self.pkce {
                let challenge = pkce_challenge.ok_or(OAuthError::PkceRequired)?;
                q.append_pair("code_challenge", challenge)
                    .append_pair("code_challenge_method", "S256");
            }
            for (k, v) in &self.extra_authorize_params {
                q.append_pair(k, v);
            }
        }
        Ok(url.into())
    }

    /// The code-exchange or refresh request, with client credentials placed per
    /// [`ClientAuth`].
    ///
    /// # Errors
    /// A missing placeholder value, or a missing PKCE verifier when the spec requires one.
    pub fn token_request(
        &self,
        grant: TokenGrant<'_>,
        client_secret: &str,
        vars: &InstallVars,
        api_base: Option<&str>,
    ) -> Result<OAuthRequest, OAuthError> {
        let url = fill_template(&self.token_url, vars, api_base)?;
        let mut fields: Vec<(&str, String)> = Vec::with_capacity(6);
        match grant {
            TokenGrant::AuthorizationCode {
                code,
                redirect_uri,
                pkce_verifier,
            } => {
                fields.push(("grant_type", "authorization_code".to_owned()));
                fields.push(("code", code.to_owned()));
                fields.push(("redirect_uri", redirect_uri.to_owned()));
                match (self.pkce, pkce_verifier) {
                    (_, Some(v)) => fields.push(("code_verifier", v.to_owned())),
                    (true, None) => return Err(OAuthError::PkceRequired),
                    (false, None) => {}
                }
                if self.scope_in_token_request && !self.scopes.is_empty() {
                    fields.push(("scope", self.scopes.join(&self.scope_separator)));
                }
            }
            TokenGrant::RefreshToken(rt) => {
                fields.push(("grant_type", "refresh_token".to_owned()));
                fields.push(("refresh_token", rt.0.clone()));
            }
        }
        Ok(self.credentialed_post(url, fields, client_secret))
    }

    /// An RFC 7009 revocation request (`token`, optional `token_type_hint`, client credentials
    /// per [`ClientAuth`]); `None` when the CRM has no revocation endpoint. CRMs that revoke
    /// differently (Zoho's query-string token, Zendesk's `DELETE /api/v2/oauth/tokens/{id}`)
    /// build their own request.
    ///
    /// # Errors
    /// A missing placeholder value.
    pub fn revoke_request(
        &self,
        token: &str,
        token_type_hint: Option<&str>,
        client_secret: &str,
        vars: &InstallVars,
        api_base: Option<&str>,
    ) -> Result<Option<OAuthRequest>, OAuthError> {
        let Some(template) = &self.revoke_url else {
            return Ok(None);
        };
        let url = fill_template(template, vars, api_base)?;
        let mut fields = vec![("token", token.to_owned())];
        if let Some(hint) = token_type_hint {
            fields.push(("token_type_hint", hint.to_owned()));
        }
        Ok(Some(self.credentialed_post(url, fields, client_secret)))
    }

    fn credentialed_post(
        &self,
        url: String,
        mut fields: Vec<(&str, String)>,
        client_secret: &str,
    ) -> OAuthRequest {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        let body = match self.client_auth {
            ClientAuth::BasicHeader => {
                let basic = base64::engine::general_purpose::STANDARD
                    .encode(format!("{}:{client_secret}", self.client_id));
                if let Ok(mut v) = HeaderValue::from_str(&format!("Basic {basic}")) {
                    v.set_sensitive(true);
                    headers.insert(header::AUTHORIZATION, v);
                }
                form_body(&fields)
            }
            ClientAuth::FormBody => {
                fields.push(("client_id", self.client_id.clone()));
                fields.push(("client_secret", client_secret.to_owned()));
                form_body(&fields)
            }
            ClientAuth::JsonBody => {
                fields.push(("client_id", self.client_id.clone()));
                fields.push(("client_secret", client_secret.to_owned()));
                let obj: serde_json::Map<String, serde_json::Value> = fields
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), serde_json::Value::String(v)))
                    .collect();
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                return OAuthRequest {
                    method: Method::POST,
                    url,
                    headers,
                    body: serde_json::Value::Object(obj).to_string().into_bytes(),
                };
            }
        };
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        OAuthRequest {
            method: Method::POST,
            url,
            headers,
            body,
        }
    }

    /// Read a token endpoint's answer into a [`TokenSet`], or classify its failure.
    ///
    /// An `error` member makes the answer a failure whatever the status (Zoho). The API base
    /// is taken per [`ApiBaseSource`] and validated against [`OAuthSpec::api_base_hosts`].
    ///
    /// # Errors
    /// The classified [`OAuthError`].
    pub fn parse_token_response(
        &self,
        status: u16,
        headers: &HeaderMap,
        body: &[u8],
        vars: &InstallVars,
        now: DateTime<Utc>,
    ) -> Result<TokenSet, OAuthError> {
        let json: Option<serde_json::Value> = serde_json::from_slice(body).ok();
        let has_error = json
            .as_ref()
            .and_then(|j| j.get("error"))
            .is_some_and(|e| !e.is_null() && e != &serde_json::Value::Bool(false));
        if !(200..300).contains(&status) || has_error {
            return Err(classify_token_failure(
                status,
                headers,
                body,
                json.as_ref(),
                now,
            ));
        }
        let raw =
            json.ok_or_else(|| OAuthError::Malformed("token response is not JSON".to_owned()))?;
        let field = |k: &str| {
            raw.get(k)
                .and_then(|v| v.as_str())
                .filter(|s| !s.is_empty())
        };
        let access = field("access_token").ok_or_else(|| {
            OAuthError::Malformed("token response has no access_token".to_owned())
        })?;
        let refresh = field("refresh_token").map(|s| RefreshToken(s.to_owned()));
        let expires_at = match self.expiry {
            TokenExpiry::Absent => None,
            TokenExpiry::ExpiresIn => ["expires_in_sec", "expires_in"]
                .iter()
                .find_map(|k| raw.get(*k).and_then(seconds))
                .map(|secs| now + chrono::Duration::seconds(secs)),
        };
        let api_base = match &self.api_base_from {
            ApiBaseSource::TokenResponseField(f) => field(f)
                .map(|b| validate_base_url(b, &self.api_base_hosts))
                .transpose()
                .map_err(|r| OAuthError::Malformed(format!("{f}: {r}")))?,
            ApiBaseSource::Template(t) => Some(
                validate_base_url(&fill_template(t, vars, None)?, &self.api_base_hosts)
                    .map_err(|r| OAuthError::Malformed(format!("api base: {r}")))?,
            ),
        };
        Ok(TokenSet {
            access_token: AccessToken(access.to_owned()),
            refresh_token: refresh,
            expires_at,
            api_base,
            raw,
        })
    }
}

fn form_body(fields: &[(&str, String)]) -> Vec<u8> {
    let mut s = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in fields {
        s.append_pair(k, v);
    }
    s.finish().into_bytes()
}

/// A lifetime in seconds, sent as a number or a numeric string.
fn seconds(v: &serde_json::Value) -> Option<i64> {
    let n = match v {
        serde_json::Value::Number(n) => n.as_f64()?,
        serde_json::Value::String(s) => s.trim().parse().ok()?,
        _ => return None,
    };
    (n.is_finite() && n > 0.0 && n < 1e9).then_some(n as i64)
}

fn classify_token_failure(
    status: u16,
    headers: &HeaderMap,
    body: &[u8],
    json: Option<&serde_json::Value>,
    now: DateTime<Utc>,
) -> OAuthError {
    let text = |k: &str| {
        json.and_then(|j| j.get(k))
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    let code = text("error").to_ascii_lowercase();
    let described = [text("error_description"), text("message")]
        .into_iter()
        .find(|s| !s.is_empty())
        .unwrap_or_default();
    let detail = match (code.is_empty(), described.is_empty()) {
        (false, false) => format!("{code}: {described}"),
        (false, true) => code.clone(),
        (true, false) => described.clone(),
        (true, true) => crate::error::body_excerpt(body),
    };
    let lower = described.to_ascii_lowercase();
    if status == 429 || (code == "access denied" && lower.contains("too many requests")) {
        return OAuthError::RateLimited {
            retry_after: retry_after(headers, now),
        };
    }
    if status >= 500 {
        return OAuthError::Transient(detail);
    }
    // Zoho says `invalid_code` for an expired code and for a revoked refresh token; Pipedrive
    // words it "Invalid grant: …".
    if matches!(code.as_str(), "invalid_grant" | "invalid_code")
        || lower.starts_with("invalid grant")
    {
        return OAuthError::InvalidGrant(detail);
    }
    if code == "invalid_client" || lower.starts_with("invalid client") || status == 401 {
        return OAuthError::InvalidClient(detail);
    }
    OAuthError::Rejected(detail)
}

/// Read the OAuth callback's query: the code and our state, or the CRM's error (the user
/// denied access) as [`OAuthError::Denied`].
///
/// # Errors
/// [`OAuthError::Denied`] for `error=…`, [`OAuthError::MissingParam`] without a code.
pub fn callback_code(query: &[(String, String)]) -> Result<(String, Option<String>), OAuthError> {
    let get = |k: &str| {
        query
            .iter()
            .find(|(q, _)| q == k)
            .map(|(_, v)| v.clone())
            .filter(|v| !v.is_empty())
    };
    if let Some(error) = get("error") {
        let desc = get("error_description")
            .map(|d| format!(": {d}"))
            .unwrap_or_default();
        return Err(OAuthError::Denied(format!("{error}{desc}")));
    }
    let code = get("code").ok_or_else(|| OAuthError::MissingParam("code".to_owned()))?;
    Ok((code, get("state")))
}

/// The result of a token exchange or refresh, for the host to seal and store.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenSet {
    /// The bearer credential.
    pub access_token: AccessToken,
    /// The refresh token. `None` on a refresh means "keep the stored one"; `Some` that differs
    /// from the stored one must be persisted before the access token is used.
    pub refresh_token: Option<RefreshToken>,
    /// When the access token expires; `None` when the CRM does not say (refresh on 401).
    pub expires_at: Option<DateTime<Utc>>,
    /// The validated per-install API base; `None` when this response did not carry it
    /// (keep the stored one).
    pub api_base: Option<String>,
    /// The whole response (contains secrets: seal it or drop it).
    pub raw: serde_json::Value,
}

impl std::fmt::Debug for TokenSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSet")
            .field("refresh_token", &self.refresh_token.as_ref().map(|_| "***"))
            .field("expires_at", &self.expires_at)
            .field("api_base", &self.api_base)
            .finish_non_exhaustive()
    }
}

impl TokenSet {
    /// Whether the access token should be refreshed before use: it expires within `margin`.
    /// Without a known expiry, never (refresh on 401 instead).
    #[must_use]
    pub fn expires_within(&self, now: DateTime<Utc>, margin: chrono::Duration) -> bool {
        self.expires_at.is_some_and(|at| at - margin <= now)
    }

    /// Whether this response replaces the stored refresh token.
    #[must_use]
    pub fn rotates(&self, stored: Option<&RefreshToken>) -> bool {
        match (&self.refresh_token, stored) {
            (Some(new), Some(old)) => new.0 != old.0,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }
}

/// What went wrong in an OAuth step.
#[derive(Debug, thiserror::Error)]
pub enum OAuthError {
    /// A per-install value is missing (or a template names one that was never collected).
    #[error("missing OAuth parameter: {0}")]
    MissingParam(String),
    /// A per-install value is not acceptable.
    #[error("invalid OAuth parameter {name}: {reason}")]
    InvalidParam {
        /// The parameter.
        name: String,
        /// Why it was refused.
        reason: String,
    },
    /// The spec needs PKCE but no challenge/verifier was given.
    #[error("this CRM needs PKCE but no challenge or verifier was given")]
    PkceRequired,
    /// The user (or CRM) refused the authorization at the callback.
    #[error("authorization denied: {0}")]
    Denied(String),
    /// The code or refresh token was refused. On refresh: re-read storage (a sibling may
    /// have rotated it), retry with the stored token if it changed, else mark the install
    /// "reconnect needed".
    #[error("grant refused: {0}")]
    InvalidGrant(String),
    /// Our client credentials (or the data centre) are wrong: a configuration problem.
    #[error("client refused: {0}")]
    InvalidClient(String),
    /// The token endpoint asked us to slow down.
    #[error("token endpoint rate limited{}", .retry_after.map(|d| format!(" (retry after {}s)", d.as_secs())).unwrap_or_default())]
    RateLimited {
        /// When to try again, if it said.
        retry_after: Option<std::time::Duration>,
    },
    /// A failure that may pass (5xx, transport).
    #[error("token endpoint unavailable: {0}")]
    Transient(String),
    /// Any other OAuth error answer.
    #[error("token request rejected: {0}")]
    Rejected(String),
    /// A success status whose body we cannot use.
    #[error("malformed token response: {0}")]
    Malformed(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_780_000_000, 0).unwrap()
    }

    /// Shaped like Zoho's: multi-DC accounts server from the callback, `api_domain` in the
    /// token response, comma scopes, form credentials.
    fn zoho() -> OAuthSpec {
        OAuthSpec {
            client_id: "1000.CID".into(),
            authorize_url: "https://accounts.zoho.com/oauth/v2/auth".into(),
            token_url: "{accounts_server}/oauth/v2/token".into(),
            revoke_url: Some("{accounts_server}/oauth/v2/token/revoke".into()),
            scopes: vec![
                "ZohoCRM.modules.calls.CREATE".into(),
                "ZohoCRM.users.READ".into(),
            ],
            scope_separator: ",".into(),
            scope_in_token_request: false,
            extra_authorize_params: vec![
                ("access_type".into(), "offline".into()),
                ("prompt".into(), "consent".into()),
            ],
            pkce: false,
            client_auth: ClientAuth::FormBody,
            install_params: vec![
                InstallParam {
                    name: "accounts_server".into(),
                    source: ParamSource::CallbackQuery("accounts-server".into()),
                    rule: ParamRule::BaseUrl(vec![
                        "zoho.com".into(),
                        "zoho.eu".into(),
                        "zohocloud.ca".into(),
                    ]),
                    required: true,
                },
                InstallParam {
                    name: "location".into(),
                    source: ParamSource::CallbackQuery("location".into()),
                    rule: ParamRule::Token,
                    required: false,
                },
            ],
            api_base_from: ApiBaseSource::TokenResponseField("api_domain".into()),
            api_base_hosts: vec!["zohoapis.com".into(), "zohoapis.eu".into()],
            refresh_rotation: RefreshRotation::Never,
            expiry: TokenExpiry::ExpiresIn,
            marketplace_installs: false,
            uninstall_callback: false,
        }
    }

    /// Shaped like Zendesk's: per-subdomain hosts, JSON body, PKCE, rotating refresh.
    fn zendesk() -> OAuthSpec {
        OAuthSpec {
            client_id: "zdg-callbridge".into(),
            authorize_url: "https://{subdomain}.zendesk.com/oauth/authorizations/new".into(),
            token_url: "https://{subdomain}.zendesk.com/oauth/tokens".into(),
            revoke_url: None,
            scopes: vec!["read".into(), "write".into()],
            scope_separator: " ".into(),
            scope_in_token_request: true,
            extra_authorize_params: vec![],
            pkce: true,
            client_auth: ClientAuth::JsonBody,
            install_params: vec![InstallParam {
                name: "subdomain".into(),
                source: ParamSource::AdminInput,
                rule: ParamRule::Subdomain,
                required: true,
            }],
            api_base_from: ApiBaseSource::Template("https://{subdomain}.zendesk.com".into()),
            api_base_hosts: vec!["zendesk.com".into()],
            refresh_rotation: RefreshRotation::Always,
            expiry: TokenExpiry::ExpiresIn,
            marketplace_installs: false,
            uninstall_callback: false,
        }
    }

    /// Shaped like Salesforce's: `instance_url`, no `expires_in`, RTR optional.
    fn salesforce() -> OAuthSpec {
        OAuthSpec {
            client_id: "3MVG9".into(),
            authorize_url: "https://login.salesforce.com/services/oauth2/authorize".into(),
            token_url: "https://login.salesforce.com/services/oauth2/token".into(),
            revoke_url: Some("{api_base}/services/oauth2/revoke".into()),
            scopes: vec!["api".into(), "refresh_token".into()],
            scope_separator: " ".into(),
            scope_in_token_request: false,
            extra_authorize_params: vec![],
            pkce: true,
            client_auth: ClientAuth::FormBody,
            install_params: vec![],
            api_base_from: ApiBaseSource::TokenResponseField("instance_url".into()),
            api_base_hosts: vec!["salesforce.com".into()],
            refresh_rotation: RefreshRotation::WhenReturned,
            expiry: TokenExpiry::Absent,
            marketplace_installs: false,
            uninstall_callback: false,
        }
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn form(body: &[u8]) -> BTreeMap<String, String> {
        url::form_urlencoded::parse(body).into_owned().collect()
    }

    #[test]
    fn zoho_accounts_server_comes_from_the_callback_and_is_allow_listed() {
        let spec = zoho();
        let vars = InstallVars::collect(
            &spec,
            &[],
            &pairs(&[
                ("code", "x"),
                ("location", "eu"),
                ("accounts-server", "https://accounts.zoho.eu"),
            ]),
        )
        .unwrap();
        assert_eq!(
            vars.get("accounts_server"),
            Some("https://accounts.zoho.eu")
        );
        assert_eq!(vars.get("location"), Some("eu"));

        let forged = InstallVars::collect(
            &spec,
            &[],
            &pairs(&[("accounts-server", "https://accounts.zoho.eu.evil.example")]),
        );
        assert!(
            matches!(forged, Err(OAuthError::InvalidParam { name, .. }) if name == "accounts_server")
        );
        let plain = InstallVars::collect(
            &spec,
            &[],
            &pairs(&[("accounts-server", "http://accounts.zoho.eu")]),
        );
        assert!(matches!(plain, Err(OAuthError::InvalidParam { .. })));
        let missing = InstallVars::collect(&spec, &[], &[]);
        assert!(matches!(missing, Err(OAuthError::MissingParam(n)) if n == "accounts_server"));
    }

    #[test]
    fn zoho_token_request_goes_to_the_data_centre_with_form_credentials() {
        let spec = zoho();
        let vars = InstallVars::collect(
            &spec,
            &[],
            &pairs(&[("accounts-server", "https://accounts.zoho.eu/")]),
        )
        .unwrap();
        let req = spec
            .token_request(
                TokenGrant::AuthorizationCode {
                    code: "c1",
                    redirect_uri: "https://cb/x",
                    pkce_verifier: None,
                },
                "s3cret",
                &vars,
                None,
            )
            .unwrap();
        assert_eq!(req.url, "https://accounts.zoho.eu/oauth/v2/token");
        assert_eq!(req.method, Method::POST);
        assert!(req.headers.get(header::AUTHORIZATION).is_none());
        let f = form(&req.body);
        assert_eq!(f["grant_type"], "authorization_code");
        assert_eq!(f["code"], "c1");
        assert_eq!(f["redirect_uri"], "https://cb/x");
        assert_eq!(f["client_id"], "1000.CID");
        assert_eq!(f["client_secret"], "s3cret");
        assert!(!format!("{req:?}").contains("s3cret"));
    }

    #[test]
    fn zoho_errors_inside_http_200_are_failures() {
        let spec = zoho();
        let vars = InstallVars::new();
        let h = HeaderMap::new();
        let e = spec
            .parse_token_response(200, &h, br#"{"error":"invalid_code"}"#, &vars, now())
            .unwrap_err();
        assert!(matches!(e, OAuthError::InvalidGrant(_)));
        let e = spec
            .parse_token_response(200, &h, br#"{"error":"invalid_client"}"#, &vars, now())
            .unwrap_err();
        assert!(matches!(e, OAuthError::InvalidClient(_)));
        let e = spec
            .parse_token_response(
                200,
                &h,
                br#"{"error":"Access Denied","error_description":"You have made too many requests continuously. Please try again after some time."}"#,
                &vars,
                now(),
            )
            .unwrap_err();
        assert!(matches!(e, OAuthError::RateLimited { .. }));
    }

    #[test]
    fn zoho_refresh_keeps_refresh_token_and_prefers_expires_in_sec() {
        let spec = zoho();
        let t = spec
            .parse_token_response(
                200,
                &HeaderMap::new(),
                br#"{"access_token":"1000.n","api_domain":"https://www.zohoapis.eu","token_type":"Bearer","expires_in":3600000,"expires_in_sec":3600}"#,
                &InstallVars::new(),
                now(),
            )
            .unwrap();
        assert_eq!(t.access_token.0, "1000.n");
        assert!(t.refresh_token.is_none());
        assert!(!t.rotates(Some(&RefreshToken("old".into()))));
        assert_eq!(t.api_base.as_deref(), Some("https://www.zohoapis.eu"));
        assert_eq!(t.expires_at, Some(now() + chrono::Duration::seconds(3600)));
    }

    #[test]
    fn api_base_from_an_unexpected_host_is_refused() {
        let e = zoho()
            .parse_token_response(
                200,
                &HeaderMap::new(),
                br#"{"access_token":"a","api_domain":"https://attacker.example"}"#,
                &InstallVars::new(),
                now(),
            )
            .unwrap_err();
        assert!(matches!(e, OAuthError::Malformed(m) if m.contains("api_domain")));
    }

    #[test]
    fn zendesk_subdomain_is_validated_and_builds_every_host() {
        let spec = zendesk();
        assert!(matches!(
            InstallVars::collect(&spec, &pairs(&[("subdomain", "acme.evil.com")]), &[]),
            Err(OAuthError::InvalidParam { .. })
        ));
        let vars =
            InstallVars::collect(&spec, &pairs(&[("subdomain", "Acme-Support")]), &[]).unwrap();
        let url = spec
            .authorize_url(&vars, "https://cb/z", "st", Some("chal"))
            .unwrap();
        let parsed = url::Url::parse(&url).unwrap();
        assert_eq!(parsed.host_str(), Some("acme-support.zendesk.com"));
        let q: BTreeMap<String, String> = parsed.query_pairs().into_owned().collect();
        assert_eq!(q["scope"], "read write");
        assert_eq!(q["code_challenge"], "chal");
        assert_eq!(q["code_challenge_method"], "S256");
        assert_eq!(q["state"], "st");
        assert!(matches!(
            spec.authorize_url(&vars, "https://cb/z", "st", None),
            Err(OAuthError::PkceRequired)
        ));
    }

    #[test]
    fn zendesk_token_request_is_json_with_scope_and_verifier() {
        let spec = zendesk();
        let vars = InstallVars::collect(&spec, &pairs(&[("subdomain", "acme")]), &[]).unwrap();
        let req = spec
            .token_request(
                TokenGrant::AuthorizationCode {
                    code: "c",
                    redirect_uri: "https://cb/z",
                    pkce_verifier: Some("ver"),
                },
                "sec",
                &vars,
                None,
            )
            .unwrap();
        assert_eq!(req.url, "https://acme.zendesk.com/oauth/tokens");
        assert_eq!(req.headers[header::CONTENT_TYPE], "application/json");
        let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
        assert_eq!(body["grant_type"], "authorization_code");
        assert_eq!(body["code_verifier"], "ver");
        assert_eq!(body["scope"], "read write");
        assert_eq!(body["client_secret"], "sec");
    }

    #[test]
    fn zendesk_refresh_rotates_and_api_base_comes_from_the_subdomain() {
        let spec = zendesk();
        let vars = InstallVars::collect(&spec, &pairs(&[("subdomain", "acme")]), &[]).unwrap();
        let t = spec
            .parse_token_response(
                200,
                &HeaderMap::new(),
                br#"{"access_token":"a2","refresh_token":"r2","token_type":"bearer","expires_in":1800,"refresh_token_expires_in":2592000}"#,
                &vars,
                now(),
            )
            .unwrap();
        assert!(t.rotates(Some(&RefreshToken("r1".into()))));
        assert_eq!(t.api_base.as_deref(), Some("https://acme.zendesk.com"));
        assert!(t.expires_within(
            now() + chrono::Duration::seconds(1700),
            chrono::Duration::seconds(120)
        ));
        assert!(!t.expires_within(now(), chrono::Duration::seconds(120)));
        let e = spec
            .parse_token_response(
                400,
                &HeaderMap::new(),
                br#"{"error":"invalid_grant","error_description":"reused"}"#,
                &vars,
                now(),
            )
            .unwrap_err();
        assert!(matches!(e, OAuthError::InvalidGrant(d) if d.contains("reused")));
    }

    #[test]
    fn salesforce_has_no_expiry_and_instance_url_feeds_revoke() {
        let spec = salesforce();
        let t = spec
            .parse_token_response(
                200,
                &HeaderMap::new(),
                br#"{"access_token":"00D!x","instance_url":"https://acme.my.salesforce.com","id":"https://login.salesforce.com/id/00D/005","issued_at":"1780000000000","token_type":"Bearer"}"#,
                &InstallVars::new(),
                now(),
            )
            .unwrap();
        assert_eq!(t.expires_at, None);
        assert!(!t.expires_within(now(), chrono::Duration::hours(10)));
        assert!(t.refresh_token.is_none());
        let req = spec
            .revoke_request(
                "rt",
                None,
                "sec",
                &InstallVars::new(),
                t.api_base.as_deref(),
            )
            .unwrap()
            .unwrap();
        assert_eq!(
            req.url,
            "https://acme.my.salesforce.com/services/oauth2/revoke"
        );
        assert_eq!(form(&req.body)["token"], "rt");
        assert!(
            spec.revoke_request("rt", None, "sec", &InstallVars::new(), None)
                .is_err()
        );
    }

    #[test]
    fn basic_header_auth_keeps_credentials_out_of_the_body() {
        let mut spec = salesforce();
        spec.client_auth = ClientAuth::BasicHeader;
        let rt = RefreshToken("r".into());
        let req = spec
            .token_request(
                TokenGrant::RefreshToken(&rt),
                "sec",
                &InstallVars::new(),
                None,
            )
            .unwrap();
        let expected = base64::engine::general_purpose::STANDARD.encode("3MVG9:sec");
        assert_eq!(
            req.headers[header::AUTHORIZATION],
            format!("Basic {expected}").as_str()
        );
        let f = form(&req.body);
        assert_eq!(f["grant_type"], "refresh_token");
        assert_eq!(f["refresh_token"], "r");
        assert!(!f.contains_key("client_secret"));
    }

    #[test]
    fn token_failures_are_classified() {
        let spec = salesforce();
        let v = InstallVars::new();
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("12"));
        assert!(matches!(
            spec.parse_token_response(429, &h, b"", &v, now()),
            Err(OAuthError::RateLimited { retry_after: Some(d) }) if d.as_secs() == 12
        ));
        assert!(matches!(
            spec.parse_token_response(503, &HeaderMap::new(), b"down", &v, now()),
            Err(OAuthError::Transient(_))
        ));
        assert!(matches!(
            spec.parse_token_response(
                400,
                &HeaderMap::new(),
                br#"{"success":false,"message":"Invalid grant: refresh_token is invalid"}"#,
                &v,
                now()
            ),
            Err(OAuthError::InvalidGrant(_))
        ));
        assert!(matches!(
            spec.parse_token_response(401, &HeaderMap::new(), b"", &v, now()),
            Err(OAuthError::InvalidClient(_))
        ));
        assert!(matches!(
            spec.parse_token_response(
                400,
                &HeaderMap::new(),
                br#"{"error":"unsupported_grant_type"}"#,
                &v,
                now()
            ),
            Err(OAuthError::Rejected(_))
        ));
        assert!(matches!(
            spec.parse_token_response(
                200,
                &HeaderMap::new(),
                br#"{"token_type":"Bearer"}"#,
                &v,
                now()
            ),
            Err(OAuthError::Malformed(_))
        ));
    }

    #[test]
    fn callback_query_yields_code_or_denial() {
        assert_eq!(
            callback_code(&pairs(&[("code", "abc"), ("state", "s")])).unwrap(),
            ("abc".to_owned(), Some("s".to_owned()))
        );
        assert_eq!(callback_code(&pairs(&[("code", "abc")])).unwrap().1, None);
        assert!(
            matches!(callback_code(&pairs(&[("error", "user_denied")])), Err(OAuthError::Denied(d)) if d == "user_denied")
        );
        assert!(matches!(
            callback_code(&[]),
            Err(OAuthError::MissingParam(_))
        ));
    }

    #[test]
    fn templates_fail_on_missing_values() {
        assert!(matches!(
            fill_template("https://{subdomain}.x", &InstallVars::new(), None),
            Err(OAuthError::MissingParam(n)) if n == "subdomain"
        ));
        assert!(fill_template("https://{oops", &InstallVars::new(), None).is_err());
        assert_eq!(
            fill_template("{api_base}/r", &InstallVars::new(), Some("https://a.b/")).unwrap(),
            "https://a.b/r"
        );
    }

    #[test]
    fn base_urls_are_origins_on_allowed_hosts() {
        let hosts = vec!["pipedrive.com".to_owned()];
        assert_eq!(
            validate_base_url("https://acme.pipedrive.com/", &hosts).unwrap(),
            "https://acme.pipedrive.com"
        );
        assert!(validate_base_url("https://pipedrive.com.evil.io", &hosts).is_err());
        assert!(validate_base_url("https://evilpipedrive.com", &hosts).is_err());
        assert!(validate_base_url("https://u:p@acme.pipedrive.com", &hosts).is_err());
        assert!(validate_base_url("https://acme.pipedrive.com/api", &hosts).is_err());
        assert!(validate_base_url("http://acme.pipedrive.com", &hosts).is_err());
        let local = vec!["127.0.0.1".to_owned()];
        assert_eq!(
            validate_base_url("http://127.0.0.1:8080", &local).unwrap(),
            "http://127.0.0.1:8080"
        );
    }

    #[test]
    fn specs_round_trip_as_data() {
        for spec in [zoho(), zendesk(), salesforce()] {
            let json = serde_json::to_string(&spec).unwrap();
            let back: OAuthSpec = serde_json::from_str(&json).unwrap();
            assert_eq!(back, spec);
        }
    }
}
