//! OAuth installs of CRM connectors.
//!
//! - `GET /oauth/{connector}/start` (signed-in admin): stores a single-use state bound to the
//!   admin's session and tenant (and a PKCE verifier, sealed, where the CRM takes PKCE), then
//!   redirects to the CRM's consent page. State and PKCE come from the `oauth2` crate; the
//!   token exchange itself is the connector's (each CRM has its own quirks: Basic vs body
//!   credentials, JSON bodies, errors inside HTTP 200).
//! - `GET /oauth/{connector}/callback`: consumes the state (a second use, another session, an
//!   expired state or a CRM error → a clear page, nothing stored), exchanges the code, asks the
//!   CRM which account the token belongs to and stores the installation.
//! - Marketplace installs (the CRM sends the admin to our callback without our state): the
//!   code is never exchanged on the bare redirect. The admin is sent to
//!   `/admin/connectors/{connector}/marketplace`, signs in if needed, sees which tenant the CRM
//!   account will be connected to and confirms with a CSRF-protected POST.
//! - `DELETE /oauth/{connector}/callback`: the CRM's own uninstall notice (Pipedrive), verified
//!   by the connector; the installation and its tokens are deleted.

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, RawQuery, State},
    http::{HeaderMap, Method, StatusCode},
    response::{IntoResponse, Redirect, Response},
    routing::get,
};
use callbridge_connector::{
    ClickError, CodeExchange, InboundRequest, InstallVars, OAuthError, OAuthSpec, ParamSource,
};
use sea_orm::ConnectionTrait;
use serde_json::json;

use super::installations::{self, InstallError, NewInstall};
use crate::{
    AppState,
    admin::{AdminError, AdminSession, auth},
    crypto,
    db::{self, stmt},
};

/// The OAuth routes (outside `/admin`; they check the admin session themselves).
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/oauth/{connector}/start", get(start))
        .route(
            "/oauth/{connector}/callback",
            get(callback).delete(uninstall_notice),
        )
}

/// The redirect URI registered at the CRM for `connector`.
#[must_use]
pub fn redirect_uri(state: &AppState, connector: &str) -> String {
    format!("{}/oauth/{connector}/callback", state.public_base)
}

fn query_pairs(raw: Option<&str>) -> Vec<(String, String)> {
    url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
        .into_owned()
        .collect()
}

/// The spec restricted to the values of one source (admin input at start, callback query at
/// the end), so that each step only asks for what it can have.
fn spec_for(spec: &OAuthSpec, admin: bool) -> OAuthSpec {
    let mut s = spec.clone();
    s.install_params
        .retain(|p| matches!(p.source, ParamSource::AdminInput) == admin);
    s
}

fn oauth_problem(e: &OAuthError) -> AdminError {
    AdminError::BadRequest(match e {
        OAuthError::Denied(m) => {
            format!("The CRM did not grant access ({m}). Nothing was installed.")
        }
        OAuthError::InvalidGrant(m) => format!(
            "The CRM refused the authorization code ({m}); it may have expired. Start the install \
             again."
        ),
        OAuthError::InvalidClient(m) => format!(
            "The CRM refused callbridge's OAuth client credentials ({m}); check the connector's \
             client id and secret."
        ),
        other => format!("The install failed: {other}. Nothing was installed."),
    })
}

/// `GET /oauth/{connector}/start`.
async fn start(
    State(state): State<AppState>,
    Path(name): Path<String>,
    session: AdminSession,
    RawQuery(raw): RawQuery,
) -> Result<Response, AdminError> {
    let connector = state
        .connectors
        .get(&name)
        .ok_or_else(|| AdminError::NotFound(format!("no connector called {name:?} is enabled")))?;
    let spec = connector.oauth_spec();
    let vars = InstallVars::collect(&spec_for(&spec, true), &query_pairs(raw.as_deref()), &[])
        .map_err(|e| AdminError::BadRequest(format!("{e}")))?;
    let csrf = oauth2::CsrfToken::new_random_len(32);
    let (challenge, verifier) = if spec.pkce {
        let (c, v) = oauth2::PkceCodeChallenge::new_random_sha256();
        (Some(c.as_str().to_owned()), Some(v.secret().clone()))
    } else {
        (None, None)
    };
    let redirect = redirect_uri(&state, &name);
    let url = spec
        .authorize_url(&vars, &redirect, csrf.secret(), challenge.as_deref())
        .map_err(|e| AdminError::BadRequest(format!("{e}")))?;
    let now = db::now_ms();
    let ttl = i64::try_from(state.config.oauth_state_ttl_secs * 1000).unwrap_or(600_000);
    db::execute_write(
        &state.db,
        stmt(
            state.db.get_database_backend(),
            "INSERT INTO oauth_states (state_hash, tenant_id, session_hash, connector, \
             pkce_verifier_sealed, vars, redirect_uri, expires_at, created_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            vec![
                crypto::token_hash(csrf.secret()).into(),
                session.tenant_id.clone().into(),
                session.session_hash.clone().into(),
                name.clone().into(),
                verifier.map(|v| state.sealer.seal(&v)).into(),
                serde_json::to_string(&vars)
                    .unwrap_or_else(|_| "{}".into())
                    .into(),
                redirect.into(),
                (now + ttl).into(),
                now.into(),
            ],
        ),
    )
    .await?;
    // Old, unused states of anyone: a small table stays small.
    db::execute_write(
        &state.db,
        stmt(
            state.db.get_database_backend(),
            "DELETE FROM oauth_states WHERE expires_at < ?",
            vec![now.into()],
        ),
    )
    .await?;
    tracing::info!(connector = %name, tenant = %session.tenant_id, "OAuth install started");
    Ok(Redirect::to(&url).into_response())
}

/// A consumed state row.
struct StateRow {
    tenant_id: String,
    session_hash: String,
    connector: String,
    pkce_verifier_sealed: Option<String>,
    vars: String,
    redirect_uri: String,
    expires_at: i64,
}

/// Delete the state and return it: a state works once.
async fn consume_state(state: &AppState, raw_state: &str) -> Result<Option<StateRow>, AdminError> {
    let row = state
        .db
        .query_one_raw(stmt(
            state.db.get_database_backend(),
            "DELETE FROM oauth_states WHERE state_hash = ? RETURNING tenant_id, session_hash, \
             connector, pkce_verifier_sealed, vars, redirect_uri, expires_at",
            vec![crypto::token_hash(raw_state).into()],
        ))
        .await?;
    let Some(r) = row else { return Ok(None) };
    Ok(Some(StateRow {
        tenant_id: r.try_get("", "tenant_id")?,
        session_hash: r.try_get("", "session_hash")?,
        connector: r.try_get("", "connector")?,
        pkce_verifier_sealed: r.try_get("", "pkce_verifier_sealed")?,
        vars: r.try_get("", "vars")?,
        redirect_uri: r.try_get("", "redirect_uri")?,
        expires_at: r.try_get("", "expires_at")?,
    }))
}

/// `GET /oauth/{connector}/callback`.
async fn callback(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, AdminError> {
    let connector =
        state.connectors.get(&name).cloned().ok_or_else(|| {
            AdminError::NotFound(format!("no connector called {name:?} is enabled"))
        })?;
    let spec = connector.oauth_spec();
    let pairs = query_pairs(raw.as_deref());
    let given_state = pairs
        .iter()
        .find(|(k, _)| k == "state")
        .map(|(_, v)| v.clone())
        .filter(|v| !v.is_empty());
    let Some(given_state) = given_state else {
        if spec.marketplace_installs && pairs.iter().any(|(k, _)| k == "code") {
            // Started at the CRM's marketplace: confirm in the console before exchanging.
            let to = format!(
                "/admin/connectors/{name}/marketplace?{}",
                raw.unwrap_or_default()
            );
            return Ok(Redirect::to(&to).into_response());
        }
        if let Err(e) = callbridge_connector::oauth::callback_code(&pairs) {
            return Err(oauth_problem(&e));
        }
        return Err(AdminError::BadRequest(
            "The CRM's redirect carried no state; start the install from the Connectors page."
                .into(),
        ));
    };
    // The state is spent whatever happens next.
    let row = consume_state(&state, &given_state).await?.ok_or_else(|| {
        AdminError::BadRequest(
            "This install link was already used or is unknown. Start the install again from the \
             Connectors page."
                .into(),
        )
    })?;
    if row.expires_at < db::now_ms() {
        return Err(AdminError::BadRequest(
            "The install took too long and expired. Start it again from the Connectors page."
                .into(),
        ));
    }
    if row.connector != name {
        return Err(AdminError::BadRequest(
            "This install link belongs to another connector.".into(),
        ));
    }
    let session = auth::load(&state, &headers).await?;
    let Some(session) = session.filter(|s| s.session_hash == row.session_hash) else {
        return Err(AdminError::Forbidden(
            "This install was started in another browser session. Sign in and start it again \
             from the Connectors page."
                .into(),
        ));
    };
    if session.tenant_id != row.tenant_id {
        return Err(AdminError::Forbidden(
            "This install belongs to another tenant.".into(),
        ));
    }
    let (code, _) =
        callbridge_connector::oauth::callback_code(&pairs).map_err(|e| oauth_problem(&e))?;
    let mut vars: InstallVars = serde_json::from_str(&row.vars).unwrap_or_default();
    merge_callback_vars(&spec, &mut vars, &pairs)?;
    let verifier = match row.pkce_verifier_sealed {
        Some(s) => Some(
            state
                .sealer
                .open(&s)
                .map_err(|e| AdminError::Internal(e.context("opening the PKCE verifier")))?,
        ),
        None => None,
    };
    install(
        &state,
        &session,
        &name,
        &vars,
        CodeExchange {
            code,
            redirect_uri: row.redirect_uri,
            pkce_verifier: verifier,
        },
    )
    .await
}

/// Add the values the CRM sends on the callback (Zoho's accounts server) to the admin's.
fn merge_callback_vars(
    spec: &OAuthSpec,
    vars: &mut InstallVars,
    pairs: &[(String, String)],
) -> Result<(), AdminError> {
    let from_callback =
        InstallVars::collect(&spec_for(spec, false), &[], pairs).map_err(|e| oauth_problem(&e))?;
    for p in &spec.install_params {
        if let Some(v) = from_callback.get(&p.name) {
            vars.set(&p.name, &p.rule, v)
                .map_err(|e| oauth_problem(&e))?;
        }
    }
    Ok(())
}

/// Exchange the code, find the CRM account, store the installation; then the Connectors page.
///
/// # Errors
/// A clear page; nothing is stored on failure.
pub async fn install(
    state: &AppState,
    session: &AdminSession,
    name: &str,
    vars: &InstallVars,
    exchange: CodeExchange,
) -> Result<Response, AdminError> {
    let connector =
        state.connectors.get(name).cloned().ok_or_else(|| {
            AdminError::NotFound(format!("no connector called {name:?} is enabled"))
        })?;
    let tokens = connector
        .exchange_code(vars, &exchange)
        .await
        .map_err(|e| oauth_problem(&e))?;
    let Some(api_base) = tokens.api_base.clone() else {
        return Err(AdminError::BadRequest(
            "The CRM did not say which API host serves this account; nothing was installed.".into(),
        ));
    };
    let probe = callbridge_connector::InstallContext {
        installation_id: String::new(),
        api_base,
        account_id: None,
        vars: vars.clone(),
        settings: serde_json::Value::Null,
    };
    let account = connector
        .account_id(&probe, &tokens.access_token)
        .await
        .map_err(|e| {
            AdminError::BadRequest(format!(
                "Connected, but the CRM would not say which account this is ({e}); nothing was \
                 installed. Try again."
            ))
        })?;
    let stored = installations::upsert(
        state,
        NewInstall {
            tenant_id: &session.tenant_id,
            connector: name,
            vars,
            tokens: &tokens,
            account_id: account.as_deref(),
            installed_by: &session.email,
        },
    )
    .await
    .map_err(|e| match e {
        InstallError::Db(e) => AdminError::from(e),
        other => AdminError::BadRequest(other.to_string()),
    })?;
    tracing::info!(connector = %name, tenant = %session.tenant_id, installation = %stored.id,
        account = ?stored.account_id, "CRM connector installed");
    Ok(Redirect::to(&format!("/admin/connectors?installed={name}")).into_response())
}

/// `DELETE /oauth/{connector}/callback`: the CRM says the app was uninstalled on its side.
async fn uninstall_notice(
    State(state): State<AppState>,
    Path(name): Path<String>,
    method: Method,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    let Some(connector) = state.connectors.get(&name) else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "unknown connector"})),
        )
            .into_response();
    };
    let request = InboundRequest {
        method,
        headers,
        query,
        body,
    };
    let notice = match connector.verify_uninstall(&request) {
        Ok(n) => n,
        Err(ClickError::Unauthorized(m)) => {
            tracing::warn!(connector = %name, reason = %m, "uninstall notice refused");
            return (StatusCode::UNAUTHORIZED, Json(json!({"error": m}))).into_response();
        }
        Err(ClickError::Malformed(m)) => {
            return (StatusCode::BAD_REQUEST, Json(json!({"error": m}))).into_response();
        }
        Err(ClickError::Unsupported) => {
            return (
                StatusCode::METHOD_NOT_ALLOWED,
                Json(json!({"error": "this connector sends no uninstall notices"})),
            )
                .into_response();
        }
    };
    let removed = match installations::by_account(&state.db, &name, &notice.account_id).await {
        Ok(Some(inst)) => match installations::delete(&state.db, &inst.id).await {
            Ok(r) => {
                tracing::info!(connector = %name, installation = %inst.id, tenant = %inst.tenant_id,
                    "installation removed by the CRM's uninstall notice");
                r
            }
            Err(e) => {
                tracing::error!(error = %e, "could not remove an uninstalled installation");
                return StatusCode::SERVICE_UNAVAILABLE.into_response();
            }
        },
        Ok(None) => false,
        Err(e) => {
            tracing::error!(error = %e, "could not look up an uninstalled installation");
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        }
    };
    Json(json!({"removed": removed})).into_response()
}

/// Uninstall from our side: revoke at the CRM (best effort), then delete the tokens.
/// Returns the revoke problem, if any, for the admin to see.
///
/// # Errors
/// Database failure.
pub async fn uninstall(
    state: &AppState,
    tenant_id: &str,
    name: &str,
) -> Result<Option<Option<String>>, sea_orm::DbErr> {
    let Some(inst) = installations::for_tenant(&state.db, tenant_id, name).await? else {
        return Ok(None);
    };
    let mut problem = None;
    if let Some(connector) = state.connectors.get(name) {
        let open = |s: &str| state.sealer.open(s).ok();
        let tokens = callbridge_connector::StoredTokens {
            access_token: open(&inst.access_token_sealed).map(callbridge_connector::AccessToken),
            refresh_token: inst
                .refresh_token_sealed
                .as_deref()
                .and_then(open)
                .map(callbridge_connector::RefreshToken),
        };
        if let Err(e) = connector.revoke(&inst.context(), &tokens).await {
            tracing::warn!(installation = %inst.id, error = %e, "revoking at the CRM failed");
            problem = Some(format!(
                "callbridge deleted its tokens, but the CRM did not confirm the revocation ({e}); \
                 remove the app in the CRM as well."
            ));
        }
    }
    installations::delete(&state.db, &inst.id).await?;
    tracing::info!(installation = %inst.id, connector = %name, "installation uninstalled by an admin");
    Ok(Some(problem))
}
