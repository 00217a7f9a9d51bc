//! `/admin/masking…`: number masking for the tenant's admins, on top of [`crate::masking`]:
//! - `GET /admin/masking`: the virtual-number pool with how many active sessions use each
//!   number; `POST /admin/masking/numbers` adds one or several (normalised with the tenant's
//!   default region; any bad number → the page again with the error, 422, nothing written);
//!   `POST /admin/masking/numbers/{number}/remove` removes one (409 while a session uses it);
//! - `GET /admin/masking/sessions`: sessions newest first, active or all, paged by id;
//!   `POST /admin/masking/sessions/{id}/close` closes one and releases its number;
//! - `GET /admin/masking/setup`: the tenant's Exotel flow URLs (they carry the secret flow
//!   token, so the page is `no-store`) with the flow-builder how-to, and the tenant's masking
//!   settings; `POST /admin/masking/settings` saves them (every field validated first; any
//!   problem → 422, nothing written).
//!
//! Every read and write is scoped to the session's tenant; another tenant's number or session
//! answers 404.

use askama::Template;
use axum::{
    Form,
    extract::{Path, Query, State, rejection::FormRejection, rejection::QueryRejection},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Redirect, Response},
};
use sea_orm::EntityTrait;
use serde::Deserialize;

use super::{AdminError, AdminSession, Chrome, HtmlTemplate, fmt_ms};
use crate::{
    AppState,
    entities::tenant,
    error::ApiError,
    masking::{self, SessionView, Settings, SettingsPatch},
    phone, tenants,
};

/// Sessions per page.
const PAGE: u64 = 50;
/// Numbers accepted in one "Add numbers" submission.
const MAX_ADD: usize = 500;
/// The number the format examples are written with.
const EXAMPLE_NUMBER: &str = "+919876543210";

/// The sub-pages, for the tab bar.
const TAB_NUMBERS: &str = "numbers";
const TAB_SESSIONS: &str = "sessions";
const TAB_SETUP: &str = "setup";

fn api_error(e: ApiError) -> AdminError {
    match e {
        ApiError::NotFound(m) => AdminError::NotFound(m),
        ApiError::BadRequest(m) | ApiError::Conflict(m) => AdminError::BadRequest(m),
        ApiError::Validation { detail, .. } => AdminError::BadRequest(detail),
        ApiError::Internal(e) => AdminError::Internal(e),
        other => AdminError::Internal(anyhow::anyhow!(other.to_string())),
    }
}

async fn load_tenant(
    state: &AppState,
    session: &AdminSession,
) -> Result<tenant::Model, AdminError> {
    tenant::Entity::find_by_id(session.tenant_id.clone())
        .one(&state.db)
        .await?
        .ok_or_else(|| AdminError::NotFound("the tenant no longer exists".into()))
}

// ---------------------------------------------------------------------------------------------
// Pool
// ---------------------------------------------------------------------------------------------

/// One pool number as listed.
pub(super) struct NumberRow {
    number: String,
    added: String,
    open_sessions: i64,
}

/// The "Add numbers" form.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(super) struct AddForm {
    /// One or several numbers, one per line or separated by commas or semicolons.
    numbers: String,
}

#[derive(Template)]
#[template(path = "admin/masking_numbers.html")]
struct NumbersPage {
    chrome: Chrome,
    tab: &'static str,
    numbers: Vec<NumberRow>,
    region: String,
    form: AddForm,
    errors: Vec<String>,
    notice: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct NumbersQuery {
    added: Option<usize>,
    already: Option<usize>,
    notice: Option<String>,
}

fn plural(n: usize, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

async fn render_numbers(
    state: &AppState,
    session: &AdminSession,
    status: StatusCode,
    form: AddForm,
    errors: Vec<String>,
    notice: Option<String>,
) -> Result<Response, AdminError> {
    let t = load_tenant(state, session).await?;
    let offset = state.exotel_offset;
    let numbers = masking::list_numbers(&state.db, &t.id)
        .await?
        .into_iter()
        .map(|n| NumberRow {
            added: fmt_ms(n.created_at.timestamp_millis(), offset),
            number: n.number,
            open_sessions: n.open_sessions,
        })
        .collect();
    Ok((
        status,
        HtmlTemplate(NumbersPage {
            chrome: Chrome::new(state, session, "masking"),
            tab: TAB_NUMBERS,
            numbers,
            region: t.default_region,
            form,
            errors,
            notice,
        }),
    )
        .into_response())
}

pub(super) async fn numbers(
    State(state): State<AppState>,
    session: AdminSession,
    q: Result<Query<NumbersQuery>, QueryRejection>,
) -> Result<Response, AdminError> {
    let q = q.map(|Query(q)| q).unwrap_or_default();
    let notice = match (q.added, q.already, q.notice.as_deref()) {
        (_, _, Some("removed")) => Some("The number was removed from the pool.".to_owned()),
        (Some(added), already, _) => {
            let mut s = format!("Added {}.", plural(added, "number", "numbers"));
            if let Some(a) = already.filter(|a| *a > 0) {
                s.push_str(&format!(
                    " {} already in the pool.",
                    plural(a, "was", "were")
                ));
            }
            Some(s)
        }
        _ => None,
    };
    render_numbers(
        &state,
        &session,
        StatusCode::OK,
        AddForm::default(),
        Vec::new(),
        notice,
    )
    .await
}

/// The numbers of the form, in order: one per line, or separated by commas or semicolons
/// (spaces stay: `080 4711 2233` is one number).
fn split_numbers(text: &str) -> Vec<String> {
    text.split(['\n', '\r', ',', ';'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

pub(super) async fn add_numbers(
    State(state): State<AppState>,
    session: AdminSession,
    form: Result<Form<AddForm>, FormRejection>,
) -> Result<Response, AdminError> {
    let Form(f) = form.map_err(|e| AdminError::BadRequest(e.body_text()))?;
    let t = load_tenant(&state, &session).await?;
    let inputs = split_numbers(&f.numbers);
    let checked = if inputs.is_empty() {
        Err("Enter at least one number.".to_owned())
    } else if inputs.len() > MAX_ADD {
        Err(format!(
            "At most {MAX_ADD} numbers at a time; {} were entered.",
            inputs.len()
        ))
    } else {
        masking::normalise_numbers(&inputs, &t.default_region).map_err(|e| format!("Number {e}"))
    };
    let numbers = match checked {
        Ok(n) => n,
        Err(e) => {
            return render_numbers(
                &state,
                &session,
                StatusCode::UNPROCESSABLE_ENTITY,
                f,
                vec![e],
                None,
            )
            .await;
        }
    };
    let added = masking::add_numbers(&state.db, &t.id, &numbers).await?;
    let new = added.iter().filter(|(_, new)| *new).count();
    tracing::info!(tenant = %t.id, admin = %session.admin_user_id, added = new, "pool numbers added");
    Ok(Redirect::to(&format!(
        "/admin/masking?added={new}&already={}",
        added.len() - new
    ))
    .into_response())
}

pub(super) async fn remove_number(
    State(state): State<AppState>,
    session: AdminSession,
    Path(number): Path<String>,
) -> Result<Response, AdminError> {
    let t = load_tenant(&state, &session).await?;
    let not_found = || AdminError::NotFound(format!("{number} is not in this account's pool."));
    let e164 = phone::to_e164(&number, &t.default_region).map_err(|_| not_found())?;
    match masking::remove_number(&state, &t.id, &e164).await {
        Ok(()) => {
            tracing::info!(tenant = %t.id, admin = %session.admin_user_id, number = %e164, "pool number removed");
            Ok(Redirect::to("/admin/masking?notice=removed").into_response())
        }
        Err(ApiError::NotFound(_)) => Err(not_found()),
        Err(ApiError::Conflict(m)) => {
            render_numbers(
                &state,
                &session,
                StatusCode::CONFLICT,
                AddForm::default(),
                vec![m],
                None,
            )
            .await
        }
        Err(e) => Err(api_error(e)),
    }
}

// ---------------------------------------------------------------------------------------------
// Sessions
// ---------------------------------------------------------------------------------------------

/// One participant as listed.
pub(super) struct PartyRow {
    number: String,
    role: String,
    pin: Option<String>,
}

/// One session as listed.
pub(super) struct SessionRow {
    id: String,
    mode: String,
    virtual_number: String,
    participants: Vec<PartyRow>,
    created: String,
    expires: String,
    /// `active`, `closed` or `expired`.
    state: String,
}

impl SessionRow {
    fn new(s: SessionView, offset: chrono::FixedOffset) -> Self {
        let state = if s.status == "open" {
            "active".to_owned()
        } else {
            s.closed_reason.unwrap_or_else(|| "closed".into())
        };
        Self {
            id: s.id,
            mode: s.mode,
            virtual_number: s.virtual_number,
            participants: s
                .participants
                .into_iter()
                .map(|p| PartyRow {
                    number: p.number,
                    role: p.role,
                    pin: p.pin,
                })
                .collect(),
            created: fmt_ms(s.created_at.timestamp_millis(), offset),
            expires: fmt_ms(s.expires_at.timestamp_millis(), offset),
            state,
        }
    }

    fn is_active(&self) -> bool {
        self.state == "active"
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(super) struct SessionsQuery {
    /// `active` (default) or `all`.
    show: String,
    /// Paging: sessions older than this id.
    before: String,
    notice: String,
}

#[derive(Template)]
#[template(path = "admin/masking_sessions.html")]
struct SessionsPage {
    chrome: Chrome,
    tab: &'static str,
    show: &'static str,
    rows: Vec<SessionRow>,
    notice: Option<&'static str>,
    next_query: Option<String>,
    first_query: Option<String>,
}

pub(super) async fn sessions(
    State(state): State<AppState>,
    session: AdminSession,
    q: Result<Query<SessionsQuery>, QueryRejection>,
) -> Result<Response, AdminError> {
    let Query(q) = q.map_err(|e| AdminError::BadRequest(e.body_text()))?;
    let (show, status) = match q.show.as_str() {
        "" | "active" => ("active", Some("open")),
        "all" => ("all", None),
        other => {
            return Err(AdminError::BadRequest(format!(
                "Unknown filter {other:?}: use active or all."
            )));
        }
    };
    let before = (!q.before.is_empty()).then_some(q.before.as_str());
    let mut views =
        masking::list_sessions(&state.db, &session.tenant_id, before, PAGE + 1, status).await?;
    let more = views.len() as u64 > PAGE;
    views.truncate(usize::try_from(PAGE).unwrap_or(50));
    let query = |before: Option<&str>| {
        let mut s = url::form_urlencoded::Serializer::new(String::new());
        s.append_pair("show", show);
        if let Some(b) = before {
            s.append_pair("before", b);
        }
        s.finish()
    };
    let next_query = more
        .then(|| views.last().map(|v| query(Some(&v.id))))
        .flatten();
    let first_query = before.map(|_| query(None));
    let offset = state.exotel_offset;
    let notice = match q.notice.as_str() {
        "closed" => Some("The session was closed and its virtual number released."),
        _ => None,
    };
    Ok(HtmlTemplate(SessionsPage {
        chrome: Chrome::new(&state, &session, "masking"),
        tab: TAB_SESSIONS,
        show,
        rows: views
            .into_iter()
            .map(|v| SessionRow::new(v, offset))
            .collect(),
        notice,
        next_query,
        first_query,
    })
    .into_response())
}

pub(super) async fn close_session(
    State(state): State<AppState>,
    session: AdminSession,
    Path(id): Path<String>,
) -> Result<Response, AdminError> {
    let view = masking::close_session(&state, &session.tenant_id, &id)
        .await
        .map_err(|e| match e {
            ApiError::NotFound(_) => {
                AdminError::NotFound(format!("No masking session {id} in this account."))
            }
            other => api_error(other),
        })?;
    tracing::info!(tenant = %session.tenant_id, admin = %session.admin_user_id, session = %view.id, "masking session closed");
    Ok(Redirect::to("/admin/masking/sessions?show=all&notice=closed").into_response())
}

// ---------------------------------------------------------------------------------------------
// Flow setup and settings
// ---------------------------------------------------------------------------------------------

/// The settings form (what is shown, and what was posted when re-shown with errors).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(super) struct SettingsForm {
    /// `national` or `e164`.
    dial_format: String,
    /// Blank = none.
    fallback_number: String,
    /// Checkbox.
    pin_caller_check: Option<String>,
    /// `200` or `302`.
    passthru_branch_on_unanswered: String,
}

impl SettingsForm {
    fn from_settings(s: &Settings) -> Self {
        Self {
            dial_format: s.dial_format.clone(),
            fallback_number: s.fallback_number.clone().unwrap_or_default(),
            pin_caller_check: s.pin_caller_check.then(|| "on".to_owned()),
            passthru_branch_on_unanswered: s.passthru_branch_on_unanswered.to_string(),
        }
    }
}

#[derive(Template)]
#[template(path = "admin/masking_setup.html")]
struct SetupPage {
    chrome: Chrome,
    tab: &'static str,
    dial_whom_url: String,
    passthru_url: String,
    form: SettingsForm,
    errors: Vec<String>,
    notice: Option<&'static str>,
    region: String,
    example_national: String,
    example_e164: &'static str,
    /// The server-wide reverse-call window, for the text (`7 days`, or `None` when off).
    reverse_window: Option<String>,
}

/// `604800` → `7 days`; `0` → `None` (off).
fn human_secs(secs: u64) -> Option<String> {
    let (n, unit) = match secs {
        0 => return None,
        s if s % 86_400 == 0 => (s / 86_400, "day"),
        s if s % 3_600 == 0 => (s / 3_600, "hour"),
        s if s % 60 == 0 => (s / 60, "minute"),
        s => (s, "second"),
    };
    Some(if n == 1 {
        format!("1 {unit}")
    } else {
        format!("{n} {unit}s")
    })
}

async fn render_setup(
    state: &AppState,
    session: &AdminSession,
    status: StatusCode,
    form: Option<SettingsForm>,
    errors: Vec<String>,
    notice: Option<&'static str>,
) -> Result<Response, AdminError> {
    let t = load_tenant(state, session).await?;
    let flow_token = state
        .sealer
        .open(&t.flow_token_sealed)
        .map_err(|e| AdminError::Internal(e.context("opening the flow token")))?;
    let (dial_whom_url, passthru_url) = tenants::flow_urls(&state.public_base, &flow_token);
    let form = match form {
        Some(f) => f,
        None => SettingsForm::from_settings(&masking::settings(state, &t.id).await?),
    };
    let mut resp = (
        status,
        HtmlTemplate(SetupPage {
            chrome: Chrome::new(state, session, "masking"),
            tab: TAB_SETUP,
            dial_whom_url,
            passthru_url,
            form,
            errors,
            notice,
            region: t.default_region,
            example_national: masking::format_for_dial(EXAMPLE_NUMBER, "national"),
            example_e164: EXAMPLE_NUMBER,
            reverse_window: human_secs(state.config.masking_reverse_window_secs),
        }),
    )
        .into_response();
    // The flow URLs carry the tenant's secret token: keep the page out of caches.
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct SetupQuery {
    notice: String,
}

pub(super) async fn setup(
    State(state): State<AppState>,
    session: AdminSession,
    q: Result<Query<SetupQuery>, QueryRejection>,
) -> Result<Response, AdminError> {
    let notice = match q.map(|Query(q)| q.notice).unwrap_or_default().as_str() {
        "saved" => Some("Masking settings saved."),
        _ => None,
    };
    render_setup(&state, &session, StatusCode::OK, None, Vec::new(), notice).await
}

/// Check every field (collecting all problems) and build the patch that sets each of them.
fn validate(f: &SettingsForm, region: &str) -> Result<SettingsPatch, Vec<String>> {
    let mut errors = Vec::new();
    let dial_format = f.dial_format.trim();
    if !matches!(dial_format, "national" | "e164") {
        errors.push("Number format must be national or E.164".to_owned());
    }
    let branch = match f.passthru_branch_on_unanswered.trim() {
        "200" => Some(200),
        "302" => Some(302),
        _ => {
            errors.push("Unanswered calls must answer 200 or 302".to_owned());
            None
        }
    };
    let fallback = if f.fallback_number.trim().is_empty() {
        None
    } else {
        phone::to_e164(&f.fallback_number, region)
            .map_err(|e| errors.push(format!("Fallback number {e}")))
            .ok()
    };
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(SettingsPatch {
        dial_format: Some(Some(dial_format.to_owned())),
        fallback_number: Some(fallback),
        pin_caller_check: Some(Some(f.pin_caller_check.is_some())),
        passthru_branch_on_unanswered: Some(branch),
    })
}

pub(super) async fn save_settings(
    State(state): State<AppState>,
    session: AdminSession,
    form: Result<Form<SettingsForm>, FormRejection>,
) -> Result<Response, AdminError> {
    let Form(f) = form.map_err(|e| AdminError::BadRequest(e.body_text()))?;
    let t = load_tenant(&state, &session).await?;
    let result = match validate(&f, &t.default_region) {
        Ok(patch) => masking::update_settings(&state, &t.id, &t.default_region, patch)
            .await
            .map_err(|e| match e {
                ApiError::Validation { detail, .. } => Ok(vec![detail]),
                other => Err(api_error(other)),
            }),
        Err(errors) => Err(Ok(errors)),
    };
    match result {
        Ok(s) => {
            tracing::info!(tenant = %t.id, admin = %session.admin_user_id, settings = ?s, "masking settings saved");
            Ok(Redirect::to("/admin/masking/setup?notice=saved").into_response())
        }
        Err(Ok(errors)) => {
            render_setup(
                &state,
                &session,
                StatusCode::UNPROCESSABLE_ENTITY,
                Some(f),
                errors,
                None,
            )
            .await
        }
        Err(Err(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_split_on_lines_commas_and_semicolons_only() {
        assert_eq!(
            split_numbers("080 4711 2233\r\n+918047112234, 08047112235;\n\n ;"),
            vec!["080 4711 2233", "+918047112234", "08047112235"]
        );
        assert!(split_numbers(" \n,").is_empty());
    }

    #[test]
    fn settings_are_validated_together() {
        let ok = SettingsForm {
            dial_format: "e164".into(),
            fallback_number: "098765 43210".into(),
            pin_caller_check: Some("on".into()),
            passthru_branch_on_unanswered: "302".into(),
        };
        let p = validate(&ok, "IN").unwrap();
        assert_eq!(p.fallback_number, Some(Some("+919876543210".into())));
        assert_eq!(p.passthru_branch_on_unanswered, Some(Some(302)));
        assert_eq!(p.pin_caller_check, Some(Some(true)));
        let blank = SettingsForm {
            fallback_number: String::new(),
            pin_caller_check: None,
            ..ok
        };
        let p = validate(&blank, "IN").unwrap();
        assert_eq!(p.fallback_number, Some(None), "blank clears the fallback");
        assert_eq!(p.pin_caller_check, Some(Some(false)));
        let bad = SettingsForm {
            dial_format: "weird".into(),
            fallback_number: "12".into(),
            pin_caller_check: None,
            passthru_branch_on_unanswered: "500".into(),
        };
        assert_eq!(validate(&bad, "IN").err().unwrap().len(), 3);
    }

    #[test]
    fn windows_read_as_words() {
        assert_eq!(human_secs(0), None);
        assert_eq!(human_secs(604_800).as_deref(), Some("7 days"));
        assert_eq!(human_secs(3_600).as_deref(), Some("1 hour"));
        assert_eq!(human_secs(90).as_deref(), Some("90 seconds"));
    }
}
