//! The admin console: server-rendered askama pages under `/admin` (templates in
//! `templates/admin/`), for a tenant's admins. No JavaScript framework; plain forms.
//!
//! Rules this module enforces:
//! - every route except the login page sits behind [`auth::guard`]: no session → the login
//!   page; a state-changing request without the session's CSRF token → 403, nothing written;
//! - every query is scoped to the session's tenant; another tenant's id answers 404;
//! - secrets are shown only as their last four characters (a freshly generated webhook secret
//!   is shown once, on the page that generated it);
//! - render failures become a logged 500 ([`HtmlTemplate`]).

pub mod agents;
pub mod auth;
pub mod calls;
pub mod connectors;
pub mod csrf;
pub mod dashboard;
pub mod dead_letters;
pub mod masking;
pub mod settings;
pub mod users;

use askama::Template;
use axum::{
    Router,
    http::StatusCode,
    middleware,
    response::{Html, IntoResponse, Redirect, Response},
    routing::{get, post},
};
use chrono::{DateTime, FixedOffset};

pub use auth::AdminSession;

use crate::AppState;

/// The admin routes, to be merged into the application router.
pub fn router(state: &AppState) -> Router<AppState> {
    let guarded = Router::new()
        .route("/admin", get(dashboard::page))
        .route("/admin/", get(dashboard::page))
        .route("/admin/logout", post(auth::logout))
        .route("/admin/settings", get(settings::page).post(settings::save))
        .route(
            "/admin/settings/test-connection",
            post(settings::test_connection),
        )
        .route(
            "/admin/settings/rotate-webhook-secret",
            post(settings::rotate_webhook_secret),
        )
        .route("/admin/calls", get(calls::list))
        .route("/admin/calls/{id}", get(calls::timeline))
        .route("/admin/dead-letters", get(dead_letters::list))
        .route("/admin/dead-letters/{id}/retry", post(dead_letters::retry))
        .route(
            "/admin/dead-letters/{id}/discard",
            post(dead_letters::discard),
        )
        .route("/admin/agents", get(agents::list).post(agents::add))
        .route(
            "/admin/agents/{id}",
            get(agents::edit_form).post(agents::update),
        )
        .route("/admin/agents/{id}/delete", post(agents::remove))
        .route("/admin/connectors", get(connectors::list))
        .route(
            "/admin/connectors/{name}/uninstall",
            post(connectors::uninstall),
        )
        .route("/admin/connectors/{name}/rule", post(connectors::save_rule))
        .route(
            "/admin/connectors/{name}/import",
            get(connectors::import_form).post(connectors::import_save),
        )
        .route(
            "/admin/connectors/{name}/marketplace",
            get(connectors::marketplace_form).post(connectors::marketplace_confirm),
        )
        .route("/admin/masking", get(masking::numbers))
        .route("/admin/masking/numbers", post(masking::add_numbers))
        .route(
            "/admin/masking/numbers/{number}/remove",
            post(masking::remove_number),
        )
        .route("/admin/masking/sessions", get(masking::sessions))
        .route(
            "/admin/masking/sessions/{id}/close",
            post(masking::close_session),
        )
        .route("/admin/masking/setup", get(masking::setup))
        .route("/admin/masking/settings", post(masking::save_settings))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::guard));
    Router::new()
        .route(
            "/admin/login",
            get(auth::login_form).post(auth::login_submit),
        )
        .merge(guarded)
        .layer(axum::extract::DefaultBodyLimit::max(csrf::BODY_LIMIT))
}

/// One entry of the navigation bar.
#[derive(Debug, Clone, Copy)]
pub struct NavItem {
    /// Matches a page's `active` key.
    pub key: &'static str,
    /// Link target.
    pub href: &'static str,
    /// Link text.
    pub label: &'static str,
}

/// The navigation bar, in order.
pub const NAV: &[NavItem] = &[
    NavItem {
        key: "home",
        href: "/admin",
        label: "Home",
    },
    NavItem {
        key: "calls",
        href: "/admin/calls",
        label: "Calls",
    },
    NavItem {
        key: "dead-letters",
        href: "/admin/dead-letters",
        label: "Dead letters",
    },
    NavItem {
        key: "agents",
        href: "/admin/agents",
        label: "Agents",
    },
    NavItem {
        key: "connectors",
        href: "/admin/connectors",
        label: "Connectors",
    },
    NavItem {
        key: "masking",
        href: "/admin/masking",
        label: "Masking",
    },
    NavItem {
        key: "settings",
        href: "/admin/settings",
        label: "Settings",
    },
];

/// What the layout (`templates/admin/base.html`) shows on every signed-in page.
#[derive(Debug, Clone)]
pub struct Chrome {
    /// The tenant's name.
    pub tenant_name: String,
    /// The admin's email.
    pub email: String,
    /// For the logout form (and every other form on the page).
    pub csrf_token: String,
    /// Which nav entry is highlighted.
    pub active: &'static str,
    /// The navigation bar.
    pub nav: &'static [NavItem],
    /// The offset times are shown in, e.g. `+05:30`.
    pub offset: String,
}

impl Chrome {
    /// The layout data for `session` on the page `active`.
    #[must_use]
    pub fn new(state: &AppState, session: &AdminSession, active: &'static str) -> Self {
        Self {
            tenant_name: session.tenant_name.clone(),
            email: session.email.clone(),
            csrf_token: session.csrf_token.clone(),
            active,
            nav: NAV,
            offset: state.exotel_offset.to_string(),
        }
    }
}

/// Renders an askama template as an HTML response; a render failure is logged and answered
/// with a plain 500.
pub struct HtmlTemplate<T>(pub T);

impl<T: Template> IntoResponse for HtmlTemplate<T> {
    fn into_response(self) -> Response {
        match self.0.render() {
            Ok(html) => Html(html).into_response(),
            Err(e) => {
                tracing::error!(error = %e, template = std::any::type_name::<T>(), "template render failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Html("<h1>Internal error</h1><p>See the server log.</p>"),
                )
                    .into_response()
            }
        }
    }
}

/// An error on an admin page, answered as an HTML page (or a redirect to the login page).
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Not signed in (or the session ended): 303 to the login page.
    #[error("sign in first")]
    LoginRequired {
        /// Where to return after signing in (GET requests only).
        next: Option<String>,
    },
    /// 400.
    #[error("{0}")]
    BadRequest(String),
    /// 403 (CSRF).
    #[error("{0}")]
    Forbidden(String),
    /// 404: not found for this tenant.
    #[error("{0}")]
    NotFound(String),
    /// 500: logged, not shown.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<sea_orm::DbErr> for AdminError {
    fn from(e: sea_orm::DbErr) -> Self {
        Self::Internal(anyhow::Error::new(e).context("database"))
    }
}

#[derive(Template)]
#[template(path = "admin/error.html")]
struct ErrorPage {
    status: u16,
    title: &'static str,
    message: String,
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let (status, title, message) = match self {
            Self::LoginRequired { next } => {
                let to = match next {
                    Some(n) => format!(
                        "/admin/login?{}",
                        url::form_urlencoded::Serializer::new(String::new())
                            .append_pair("next", &n)
                            .finish()
                    ),
                    None => "/admin/login".to_owned(),
                };
                return Redirect::to(&to).into_response();
            }
            Self::BadRequest(m) => (StatusCode::BAD_REQUEST, "Bad request", m),
            Self::Forbidden(m) => (StatusCode::FORBIDDEN, "Forbidden", m),
            Self::NotFound(m) => (StatusCode::NOT_FOUND, "Not found", m),
            Self::Internal(e) => {
                tracing::error!(error = ?e, "admin page failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Internal error",
                    "Something went wrong; the details are in the server log.".to_owned(),
                )
            }
        };
        (
            status,
            HtmlTemplate(ErrorPage {
                status: status.as_u16(),
                title,
                message,
            }),
        )
            .into_response()
    }
}

/// `YYYY-MM-DD HH:MM:SS` in the display offset.
#[must_use]
pub fn fmt_ms(ms: i64, offset: FixedOffset) -> String {
    DateTime::from_timestamp_millis(ms)
        .map(|t| {
            t.with_timezone(&offset)
                .format("%Y-%m-%d %H:%M:%S")
                .to_string()
        })
        .unwrap_or_default()
}

/// [`fmt_ms`] for an optional time (`—` when absent).
#[must_use]
pub fn fmt_opt_ms(ms: Option<i64>, offset: FixedOffset) -> String {
    ms.map_or_else(|| "—".to_owned(), |m| fmt_ms(m, offset))
}

/// `••••abcd`: a secret as admin pages show it.
#[must_use]
pub fn masked(secret: &str) -> String {
    format!("••••{}", crate::crypto::last4(secret))
}
