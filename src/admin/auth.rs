//! Admin login, sessions and the guard in front of every admin page.
//!
//! - The session id is 256 random bits in an `HttpOnly; SameSite=Lax` cookie (`Secure` when the
//!   public URL is https); the database keeps only its SHA-256. A session ends after
//!   `admin_session_idle_secs` without a request or `admin_session_max_secs` after login,
//!   whichever comes first, and on logout (the row is deleted).
//! - Failed logins are counted per email and per client IP in `admin_login_failures` (shared by
//!   every instance); past the limit the login is refused for the rest of the window without
//!   checking the password. An unknown email is verified against a dummy hash, so it costs the
//!   same as a wrong password and the answer is the same.
//! - [`guard`] wraps every admin route: no valid session → redirect to the login page; a
//!   state-changing request without the session's CSRF token → 403 before the handler runs.

use std::net::{IpAddr, SocketAddr};

use askama::Template;
use axum::{
    Form,
    body::Body,
    extract::{ConnectInfo, FromRequestParts, Query, Request, State, rejection::FormRejection},
    http::{HeaderMap, HeaderValue, Method, header, request::Parts},
    middleware::Next,
    response::{IntoResponse, Redirect, Response},
};
use cookie::{Cookie, SameSite};
use sea_orm::{ConnectionTrait, DbErr};
use serde::Deserialize;

use super::{AdminError, HtmlTemplate, csrf, users};
use crate::{
    AppState, crypto,
    db::{self, stmt},
};

/// The session cookie.
pub const SESSION_COOKIE: &str = "cb_admin";
/// The login form's double-submit cookie.
pub const LOGIN_CSRF_COOKIE: &str = "cb_login_csrf";
/// `last_seen_at` is written at most this often per session (ms).
const TOUCH_EVERY_MS: i64 = 60_000;

/// The signed-in admin; in request extensions after [`guard`], and an extractor for routes
/// outside `/admin` (e.g. OAuth installs) that need the admin's session and tenant.
#[derive(Debug, Clone)]
pub struct AdminSession {
    /// SHA-256 of the session id (the row's key).
    pub session_hash: String,
    /// The admin user.
    pub admin_user_id: String,
    /// Their email.
    pub email: String,
    /// The only tenant this session may see.
    pub tenant_id: String,
    /// The tenant's display name.
    pub tenant_name: String,
    /// This session's CSRF token (goes into every form).
    pub csrf_token: String,
}

impl FromRequestParts<AppState> for AdminSession {
    type Rejection = AdminError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AdminError> {
        if let Some(s) = parts.extensions.get::<Self>() {
            return Ok(s.clone());
        }
        load(state, &parts.headers)
            .await?
            .ok_or_else(|| AdminError::LoginRequired {
                next: Some(parts.uri.path().to_owned()),
            })
    }
}

/// The peer address of the connection (no proxy headers are trusted).
#[derive(Debug, Clone, Copy)]
pub struct ClientIp(pub Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip()),
        ))
    }
}

fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == name)
        .map(|c| c.value().to_owned())
}

fn secure(state: &AppState) -> bool {
    state.public_base.starts_with("https://")
}

fn set_cookie(state: &AppState, name: &str, value: &str, same_site: SameSite) -> HeaderValue {
    let c = Cookie::build((name.to_owned(), value.to_owned()))
        .path("/")
        .http_only(true)
        .same_site(same_site)
        .secure(secure(state))
        .build();
    HeaderValue::from_str(&c.to_string()).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn clear_cookie(state: &AppState, name: &str) -> HeaderValue {
    let c = Cookie::build((name.to_owned(), ""))
        .path("/")
        .http_only(true)
        .same_site(SameSite::Lax)
        .secure(secure(state))
        .max_age(cookie::time::Duration::ZERO)
        .build();
    HeaderValue::from_str(&c.to_string()).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The live session behind the request's cookie, if any (expired ones are deleted).
///
/// # Errors
/// Database failure.
pub async fn load(state: &AppState, headers: &HeaderMap) -> Result<Option<AdminSession>, DbErr> {
    let Some(token) =
        cookie_value(headers, SESSION_COOKIE).filter(|t| (16..=128).contains(&t.len()))
    else {
        return Ok(None);
    };
    let hash = crypto::token_hash(&token);
    let db = &state.db;
    let backend = db.get_database_backend();
    let Some(row) = db
        .query_one_raw(stmt(
            backend,
            "SELECT s.admin_user_id, s.tenant_id, s.csrf_token, s.expires_at, s.last_seen_at, \
             u.email, t.name AS tenant_name FROM admin_sessions s \
             JOIN admin_users u ON u.id = s.admin_user_id \
             JOIN tenants t ON t.id = s.tenant_id WHERE s.id = ?",
            vec![hash.clone().into()],
        ))
        .await?
    else {
        return Ok(None);
    };
    let now = db::now_ms();
    let expires_at: i64 = row.try_get("", "expires_at")?;
    let last_seen: i64 = row.try_get("", "last_seen_at")?;
    let idle_ms = secs_ms(state.config.admin_session_idle_secs);
    if now >= expires_at || now >= last_seen.saturating_add(idle_ms) {
        db::execute_write(
            db,
            stmt(
                backend,
                "DELETE FROM admin_sessions WHERE id = ?",
                vec![hash.into()],
            ),
        )
        .await?;
        return Ok(None);
    }
    if now - last_seen >= TOUCH_EVERY_MS {
        db::execute_write(
            db,
            stmt(
                backend,
                "UPDATE admin_sessions SET last_seen_at = ? WHERE id = ?",
                vec![now.into(), hash.clone().into()],
            ),
        )
        .await?;
    }
    Ok(Some(AdminSession {
        session_hash: hash,
        admin_user_id: row.try_get("", "admin_user_id")?,
        email: row.try_get("", "email")?,
        tenant_id: row.try_get("", "tenant_id")?,
        tenant_name: row.try_get("", "tenant_name")?,
        csrf_token: row.try_get("", "csrf_token")?,
    }))
}

fn secs_ms(secs: u64) -> i64 {
    i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX / 4)
}

/// Middleware on every admin route except the login page: require a session, and the
/// session's CSRF token on every state-changing request.
pub async fn guard(State(state): State<AppState>, req: Request, next: Next) -> Response {
    match guard_inner(&state, req).await {
        Ok(req) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

async fn guard_inner(state: &AppState, req: Request) -> Result<Request, AdminError> {
    let session = load(state, req.headers()).await?;
    let Some(session) = session else {
        let next = (req.method() == Method::GET).then(|| {
            req.uri()
                .path_and_query()
                .map_or_else(|| req.uri().path().to_owned(), |p| p.as_str().to_owned())
        });
        return Err(AdminError::LoginRequired { next });
    };
    let safe = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    let mut req = if safe {
        req
    } else {
        let (parts, body) = req.into_parts();
        let bytes = axum::body::to_bytes(body, csrf::BODY_LIMIT)
            .await
            .map_err(|_| AdminError::BadRequest("the form is too large".into()))?;
        let ok = csrf::presented(&parts.headers, &bytes)
            .is_some_and(|t| csrf::tokens_match(&session.csrf_token, &t));
        if !ok {
            tracing::warn!(path = %parts.uri.path(), "admin request refused: missing or wrong CSRF token");
            return Err(AdminError::Forbidden(
                "This form has expired or did not come from this site. Go back, reload the page \
                 and try again."
                    .into(),
            ));
        }
        Request::from_parts(parts, Body::from(bytes))
    };
    req.extensions_mut().insert(session);
    Ok(req)
}

#[derive(Template)]
#[template(path = "admin/login.html")]
struct LoginPage {
    csrf_token: String,
    email: String,
    next: String,
    error: Option<String>,
    notice: Option<&'static str>,
}

#[derive(Deserialize)]
pub(super) struct LoginQuery {
    next: Option<String>,
    notice: Option<String>,
}

/// A safe place to go after login: an admin path on this site, never another origin.
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n)
            if n.starts_with("/admin")
                && !n.starts_with("//")
                && !n.contains('\\')
                && !n.starts_with("/admin/login")
                && !n.starts_with("/admin/logout") =>
        {
            n.to_owned()
        }
        _ => "/admin".to_owned(),
    }
}

fn login_page(
    state: &AppState,
    status: axum::http::StatusCode,
    email: String,
    next: String,
    error: Option<String>,
    notice: Option<&'static str>,
) -> Response {
    let token = csrf::new_token();
    let cookie = set_cookie(state, LOGIN_CSRF_COOKIE, &token, SameSite::Strict);
    let mut resp = (
        status,
        HtmlTemplate(LoginPage {
            csrf_token: token,
            email,
            next,
            error,
            notice,
        }),
    )
        .into_response();
    resp.headers_mut().append(header::SET_COOKIE, cookie);
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

pub(super) async fn login_form(
    State(state): State<AppState>,
    headers: HeaderMap,
    q: Result<Query<LoginQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, AdminError> {
    let q = q.map(|Query(q)| q).unwrap_or(LoginQuery {
        next: None,
        notice: None,
    });
    if load(&state, &headers).await?.is_some() {
        return Ok(Redirect::to(&safe_next(q.next.as_deref())).into_response());
    }
    let notice = match q.notice.as_deref() {
        Some("logged-out") => Some("You are signed out."),
        Some("expired") => Some("Your session ended; sign in again."),
        _ => None,
    };
    Ok(login_page(
        &state,
        axum::http::StatusCode::OK,
        String::new(),
        safe_next(q.next.as_deref()),
        None,
        notice,
    ))
}

#[derive(Deserialize)]
pub(super) struct LoginForm {
    #[serde(default)]
    email: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    csrf_token: String,
    next: Option<String>,
}

pub(super) async fn login_submit(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    form: Result<Form<LoginForm>, FormRejection>,
) -> Result<Response, AdminError> {
    let Form(f) = form.map_err(|e| AdminError::BadRequest(e.body_text()))?;
    let cookie_token = cookie_value(&headers, LOGIN_CSRF_COOKIE).unwrap_or_default();
    if !csrf::tokens_match(&cookie_token, &f.csrf_token) {
        return Err(AdminError::Forbidden(
            "The sign-in form expired (or cookies are blocked). Reload the page and try again."
                .into(),
        ));
    }
    let next = safe_next(f.next.as_deref());
    let email = f.email.trim().to_lowercase();
    let fail = |msg: &str, status| {
        Ok(login_page(
            &state,
            status,
            email.clone(),
            next.clone(),
            Some(msg.to_owned()),
            None,
        ))
    };
    if email.is_empty() || f.password.is_empty() || f.password.len() > users::MAX_PASSWORD_BYTES {
        return fail(
            "Enter your email and password.",
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
        );
    }
    let keys = throttle_keys(&email, ip);
    if let Some(wait_secs) = throttled(&state, &keys).await? {
        let minutes = wait_secs.div_ceil(60).max(1);
        return fail(
            &format!("Too many failed sign-ins. Try again in {minutes} minute(s)."),
            axum::http::StatusCode::TOO_MANY_REQUESTS,
        );
    }
    let user = users::by_email(&state.db, &email).await?;
    let hash = user.as_ref().map(|u| u.password_hash.clone());
    let password = f.password;
    let ok =
        tokio::task::spawn_blocking(move || users::verify_password(&password, hash.as_deref()))
            .await
            .map_err(|e| AdminError::Internal(anyhow::anyhow!("password check: {e}")))?;
    let Some(user) = user.filter(|_| ok) else {
        record_failure(&state, &keys).await?;
        tracing::info!(ip = ?ip, "admin sign-in failed");
        return fail(
            "Wrong email or password.",
            axum::http::StatusCode::UNAUTHORIZED,
        );
    };
    clear_failures(&state, &keys[..1]).await?;
    let token = create_session(&state, &user).await?;
    tracing::info!(admin = %user.id, tenant = %user.tenant_id, "admin signed in");
    let mut resp = Redirect::to(&next).into_response();
    resp.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(&state, SESSION_COOKIE, &token, SameSite::Lax),
    );
    resp.headers_mut()
        .append(header::SET_COOKIE, clear_cookie(&state, LOGIN_CSRF_COOKIE));
    Ok(resp)
}

async fn create_session(state: &AppState, user: &users::AdminUser) -> Result<String, DbErr> {
    let db = &state.db;
    let backend = db.get_database_backend();
    let now = db::now_ms();
    let token = crypto::random_token("", 32);
    let idle = secs_ms(state.config.admin_session_idle_secs);
    let txn = db::begin_write(db).await?;
    // Housekeeping: drop sessions that can no longer be used.
    txn.execute_raw(stmt(
        backend,
        "DELETE FROM admin_sessions WHERE expires_at <= ? OR last_seen_at <= ?",
        vec![now.into(), (now - idle).into()],
    ))
    .await?;
    txn.execute_raw(stmt(
        backend,
        "INSERT INTO admin_sessions (id, admin_user_id, tenant_id, csrf_token, created_at, \
         expires_at, last_seen_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        vec![
            crypto::token_hash(&token).into(),
            user.id.clone().into(),
            user.tenant_id.clone().into(),
            csrf::new_token().into(),
            now.into(),
            (now + secs_ms(state.config.admin_session_max_secs)).into(),
            now.into(),
        ],
    ))
    .await?;
    txn.execute_raw(stmt(
        backend,
        "UPDATE admin_users SET last_login_at = ? WHERE id = ?",
        vec![now.into(), user.id.clone().into()],
    ))
    .await?;
    txn.commit().await?;
    Ok(token)
}

/// `[email key, ip key]` (the IP key only when the peer is known).
fn throttle_keys(email: &str, ip: Option<IpAddr>) -> Vec<(String, i32)> {
    let mut keys = vec![(format!("email:{email}"), 1)];
    if let Some(ip) = ip {
        keys.push((format!("ip:{ip}"), 4));
    }
    keys
}

/// Seconds until the earliest throttled key frees up, if any key is over its limit.
async fn throttled(state: &AppState, keys: &[(String, i32)]) -> Result<Option<u64>, DbErr> {
    let db = &state.db;
    let backend = db.get_database_backend();
    let now = db::now_ms();
    let window = secs_ms(state.config.admin_login_window_secs);
    let max = state.config.admin_login_max_failures;
    let mut wait: Option<i64> = None;
    for (key, factor) in keys {
        let row = db
            .query_one_raw(stmt(
                backend,
                "SELECT window_start, failures FROM admin_login_failures WHERE key = ?",
                vec![key.clone().into()],
            ))
            .await?;
        if let Some(r) = row {
            let start: i64 = r.try_get("", "window_start")?;
            let failures: i32 = r.try_get("", "failures")?;
            if start + window > now && failures >= max.saturating_mul(*factor) {
                let left = start + window - now;
                wait = Some(wait.map_or(left, |w| w.max(left)));
            }
        }
    }
    Ok(wait.map(|ms| u64::try_from(ms / 1000).unwrap_or(0)))
}

async fn record_failure(state: &AppState, keys: &[(String, i32)]) -> Result<(), DbErr> {
    let db = &state.db;
    let backend = db.get_database_backend();
    let now = db::now_ms();
    let window_floor = now - secs_ms(state.config.admin_login_window_secs);
    for (key, _) in keys {
        db::execute_write(
            db,
            stmt(
                backend,
                "INSERT INTO admin_login_failures (key, window_start, failures) VALUES (?, ?, 1) \
             ON CONFLICT (key) DO UPDATE SET \
             failures = CASE WHEN admin_login_failures.window_start <= ? THEN 1 \
                        ELSE admin_login_failures.failures + 1 END, \
             window_start = CASE WHEN admin_login_failures.window_start <= ? THEN ? \
                        ELSE admin_login_failures.window_start END",
                vec![
                    key.clone().into(),
                    now.into(),
                    window_floor.into(),
                    window_floor.into(),
                    now.into(),
                ],
            ),
        )
        .await?;
    }
    Ok(())
}

async fn clear_failures(state: &AppState, keys: &[(String, i32)]) -> Result<(), DbErr> {
    let backend = state.db.get_database_backend();
    for (key, _) in keys {
        db::execute_write(
            &state.db,
            stmt(
                backend,
                "DELETE FROM admin_login_failures WHERE key = ?",
                vec![key.clone().into()],
            ),
        )
        .await?;
    }
    Ok(())
}

/// `POST /admin/logout` (behind the guard, so CSRF-checked): end the session.
pub(super) async fn logout(
    State(state): State<AppState>,
    session: AdminSession,
) -> Result<Response, AdminError> {
    let backend = state.db.get_database_backend();
    db::execute_write(
        &state.db,
        stmt(
            backend,
            "DELETE FROM admin_sessions WHERE id = ? AND admin_user_id = ?",
            vec![
                session.session_hash.clone().into(),
                session.admin_user_id.clone().into(),
            ],
        ),
    )
    .await?;
    let mut resp = Redirect::to("/admin/login?notice=logged-out").into_response();
    resp.headers_mut()
        .append(header::SET_COOKIE, clear_cookie(&state, SESSION_COOKIE));
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_stays_on_admin_pages() {
        assert_eq!(
            safe_next(Some("/admin/calls?status=busy")),
            "/admin/calls?status=busy"
        );
        for bad in [
            "https://evil.example",
            "//evil.example",
            "/other",
            "/admin/login",
            "/admin\\x",
        ] {
            assert_eq!(safe_next(Some(bad)), "/admin", "{bad}");
        }
        assert_eq!(safe_next(None), "/admin");
    }

    #[test]
    fn cookies_are_read_from_any_cookie_header() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, "a=1; cb_admin=tok".parse().unwrap());
        assert_eq!(cookie_value(&h, SESSION_COOKIE).as_deref(), Some("tok"));
        assert_eq!(cookie_value(&h, "zzz"), None);
    }
}
