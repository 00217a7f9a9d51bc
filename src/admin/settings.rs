//! `/admin/settings`: the tenant's Exotel account and call defaults, the webhook, and the
//! "Test connection" button.
//!
//! The API token is never sent back: the page shows its last four characters and a blank token
//! field keeps the stored one; a new token is sealed before it is stored. Saving validates with
//! the same rules as `tenants::create` and writes nothing when any field is wrong. A webhook
//! secret is shown in full only on the response that generated it.

use askama::Template;
use axum::{
    Form,
    extract::{Query, State, rejection::FormRejection},
    http::StatusCode,
    response::{IntoResponse, Redirect, Response},
};
use sea_orm::{ActiveModelTrait, EntityTrait, IntoActiveModel, Set};
use serde::Deserialize;

use super::{AdminError, AdminSession, Chrome, HtmlTemplate, masked};
use crate::{AppState, crypto, db, entities::tenant, exotel::ExotelError, phone, tenants};

/// Exotel's Singapore cluster.
pub const API_BASE_SG: &str = "https://api.exotel.com";
/// Exotel's Mumbai cluster.
pub const API_BASE_IN: &str = "https://api.in.exotel.com";
/// Exotel's documented ceiling for `TimeLimit` (seconds).
const MAX_TIME_LIMIT: i32 = 14_400;
/// Ring timeout ceiling (seconds); Exotel caps ringing at 60 s per TRAI [U].
const MAX_TIME_OUT: i32 = 60;

/// The form's values (what is shown, and what was posted when re-shown with errors).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(super) struct SettingsForm {
    name: String,
    exotel_sid: String,
    exotel_api_key: String,
    /// Blank = keep the stored token.
    exotel_api_token: String,
    /// `sg`, `in` or `custom`.
    api_base: String,
    api_base_custom: String,
    caller_id: String,
    record: Option<String>,
    time_limit: String,
    time_out: String,
    wait_url: String,
    default_region: String,
    webhook_url: String,
}

impl SettingsForm {
    fn from_tenant(t: &tenant::Model) -> Self {
        let (api_base, api_base_custom) = match t.exotel_api_base.as_str() {
            API_BASE_SG => ("sg", String::new()),
            API_BASE_IN => ("in", String::new()),
            other => ("custom", other.to_owned()),
        };
        Self {
            name: t.name.clone(),
            exotel_sid: t.exotel_sid.clone(),
            exotel_api_key: t.exotel_api_key.clone(),
            exotel_api_token: String::new(),
            api_base: api_base.into(),
            api_base_custom,
            caller_id: t.caller_id.clone().unwrap_or_default(),
            record: t.record.then(|| "on".to_owned()),
            time_limit: t.time_limit.map(|v| v.to_string()).unwrap_or_default(),
            time_out: t.time_out.map(|v| v.to_string()).unwrap_or_default(),
            wait_url: t.wait_url.clone().unwrap_or_default(),
            default_region: t.default_region.clone(),
            webhook_url: t.webhook_url.clone().unwrap_or_default(),
        }
    }

    fn record_checked(&self) -> bool {
        self.record.is_some()
    }
}

/// The outcome of "Test connection".
pub(super) struct TestResult {
    ok: bool,
    message: String,
}

#[derive(Template)]
#[template(path = "admin/settings.html")]
struct SettingsPage {
    chrome: Chrome,
    form: SettingsForm,
    token_hint: String,
    webhook_secret_hint: Option<String>,
    errors: Vec<String>,
    notice: Option<&'static str>,
    new_webhook_secret: Option<String>,
    test: Option<TestResult>,
    api_base_sg: &'static str,
    api_base_in: &'static str,
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

fn token_hint(state: &AppState, t: &tenant::Model) -> String {
    state.sealer.open(&t.exotel_api_token_sealed).map_or_else(
        |_| "(cannot be opened with this master key)".to_owned(),
        |s| masked(&s),
    )
}

fn secret_hint(state: &AppState, t: &tenant::Model) -> Option<String> {
    t.webhook_secret_sealed
        .as_deref()
        .and_then(|s| state.sealer.open(s).ok())
        .map(|s| masked(&s))
}

struct PageParts {
    form: Option<SettingsForm>,
    errors: Vec<String>,
    notice: Option<&'static str>,
    new_webhook_secret: Option<String>,
    test: Option<TestResult>,
}

fn render(
    state: &AppState,
    session: &AdminSession,
    t: &tenant::Model,
    status: StatusCode,
    p: PageParts,
) -> Response {
    let page = SettingsPage {
        chrome: Chrome::new(state, session, "settings"),
        form: p.form.unwrap_or_else(|| SettingsForm::from_tenant(t)),
        token_hint: token_hint(state, t),
        webhook_secret_hint: secret_hint(state, t),
        errors: p.errors,
        notice: p.notice,
        new_webhook_secret: p.new_webhook_secret,
        test: p.test,
        api_base_sg: API_BASE_SG,
        api_base_in: API_BASE_IN,
    };
    let mut resp = (status, HtmlTemplate(page)).into_response();
    resp.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
    resp
}

#[derive(Deserialize)]
pub(super) struct NoticeQuery {
    notice: Option<String>,
}

pub(super) async fn page(
    State(state): State<AppState>,
    session: AdminSession,
    q: Result<Query<NoticeQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, AdminError> {
    let t = load_tenant(&state, &session).await?;
    let notice = match q.ok().and_then(|Query(q)| q.notice).as_deref() {
        Some("saved") => Some("Settings saved."),
        _ => None,
    };
    Ok(render(
        &state,
        &session,
        &t,
        StatusCode::OK,
        PageParts {
            form: None,
            errors: Vec::new(),
            notice,
            new_webhook_secret: None,
            test: None,
        },
    ))
}

/// The validated values to store.
struct Valid {
    name: String,
    sid: String,
    api_key: String,
    token: Option<String>,
    api_base: String,
    caller_id: Option<String>,
    record: bool,
    time_limit: Option<i32>,
    time_out: Option<i32>,
    wait_url: Option<String>,
    region: String,
    webhook_url: Option<String>,
}

fn optional_int(errors: &mut Vec<String>, what: &str, v: &str, max: i32) -> Option<i32> {
    let v = v.trim();
    if v.is_empty() {
        return None;
    }
    match v.parse::<i32>() {
        Ok(n) if (1..=max).contains(&n) => Some(n),
        _ => {
            errors.push(format!(
                "{what} must be a whole number of seconds from 1 to {max}"
            ));
            None
        }
    }
}

/// Validate with the rules of `tenants::create`; every problem is collected.
fn validate(f: &SettingsForm) -> Result<Valid, Vec<String>> {
    let mut errors = Vec::new();
    let name = f.name.trim();
    if name.is_empty() || name.len() > 200 {
        errors.push("Name must be 1 to 200 characters".to_owned());
    }
    let credential = |errors: &mut Vec<String>, what: &str, v: &str| {
        let v = v.trim();
        if v.is_empty() || v.len() > 200 || v.chars().any(char::is_whitespace) {
            errors.push(format!("{what} must be a non-empty value without spaces"));
        }
        v.to_owned()
    };
    let sid = credential(&mut errors, "Account SID", &f.exotel_sid);
    let api_key = credential(&mut errors, "API key", &f.exotel_api_key);
    let token = if f.exotel_api_token.trim().is_empty() {
        None
    } else {
        Some(credential(&mut errors, "API token", &f.exotel_api_token))
    };
    let api_base = match f.api_base.as_str() {
        "sg" => API_BASE_SG.to_owned(),
        "in" => API_BASE_IN.to_owned(),
        "custom" => tenants::validate_http_url("Custom API base", &f.api_base_custom)
            .unwrap_or_else(|e| {
                errors.push(e.to_string());
                String::new()
            }),
        _ => {
            errors.push("Choose an API base".to_owned());
            String::new()
        }
    };
    let region = f.default_region.trim().to_ascii_uppercase();
    let region_ok = phone::region(&region).is_ok();
    if !region_ok {
        errors.push(format!(
            "Default region {region:?} is not a known ISO 3166 country code (e.g. IN)"
        ));
    }
    let caller_id = if f.caller_id.trim().is_empty() {
        None
    } else if region_ok {
        phone::to_e164(&f.caller_id, &region)
            .map_err(|e| errors.push(format!("Virtual number (caller id): {e}")))
            .ok()
    } else {
        None
    };
    let time_limit = optional_int(&mut errors, "TimeLimit", &f.time_limit, MAX_TIME_LIMIT);
    let time_out = optional_int(&mut errors, "TimeOut", &f.time_out, MAX_TIME_OUT);
    let url_opt = |errors: &mut Vec<String>, what: &str, v: &str| {
        if v.trim().is_empty() {
            None
        } else {
            tenants::validate_http_url(what, v)
                .map_err(|e| errors.push(e.to_string()))
                .ok()
        }
    };
    let wait_url = url_opt(&mut errors, "WaitUrl", &f.wait_url);
    let webhook_url = url_opt(&mut errors, "Webhook URL", &f.webhook_url);
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Valid {
        name: name.to_owned(),
        sid,
        api_key,
        token,
        api_base,
        caller_id,
        record: f.record_checked(),
        time_limit,
        time_out,
        wait_url,
        region,
        webhook_url,
    })
}

pub(super) async fn save(
    State(state): State<AppState>,
    session: AdminSession,
    form: Result<Form<SettingsForm>, FormRejection>,
) -> Result<Response, AdminError> {
    let Form(f) = form.map_err(|e| AdminError::BadRequest(e.body_text()))?;
    let t = load_tenant(&state, &session).await?;
    let v = match validate(&f) {
        Ok(v) => v,
        Err(errors) => {
            let mut shown = f;
            shown.exotel_api_token = String::new();
            return Ok(render(
                &state,
                &session,
                &t,
                StatusCode::UNPROCESSABLE_ENTITY,
                PageParts {
                    form: Some(shown),
                    errors,
                    notice: None,
                    new_webhook_secret: None,
                    test: None,
                },
            ));
        }
    };
    // A webhook URL without a secret gets one now (shown once below); clearing the URL drops it.
    let new_secret =
        (v.webhook_url.is_some() && t.webhook_secret_sealed.is_none()).then(crypto::webhook_secret);
    let mut am = t.clone().into_active_model();
    am.name = Set(v.name);
    am.exotel_sid = Set(v.sid);
    am.exotel_api_key = Set(v.api_key);
    if let Some(token) = &v.token {
        am.exotel_api_token_sealed = Set(state.sealer.seal(token));
    }
    am.exotel_api_base = Set(v.api_base);
    am.caller_id = Set(v.caller_id);
    am.record = Set(v.record);
    am.time_limit = Set(v.time_limit);
    am.time_out = Set(v.time_out);
    am.wait_url = Set(v.wait_url);
    am.default_region = Set(v.region);
    if v.webhook_url.is_none() {
        am.webhook_secret_sealed = Set(None);
    } else if let Some(s) = &new_secret {
        am.webhook_secret_sealed = Set(Some(state.sealer.seal(s)));
    }
    am.webhook_url = Set(v.webhook_url);
    am.updated_at = Set(db::now_ms());
    let t = {
        let _turn = db::write_turn(&state.db).await;
        am.update(&state.db).await?
    };
    tracing::info!(tenant = %t.id, admin = %session.admin_user_id, token_changed = v.token.is_some(), "tenant settings saved");
    match new_secret {
        Some(secret) => Ok(render(
            &state,
            &session,
            &t,
            StatusCode::OK,
            PageParts {
                form: None,
                errors: Vec::new(),
                notice: Some("Settings saved."),
                new_webhook_secret: Some(secret),
                test: None,
            },
        )),
        None => Ok(Redirect::to("/admin/settings?notice=saved").into_response()),
    }
}

pub(super) async fn rotate_webhook_secret(
    State(state): State<AppState>,
    session: AdminSession,
) -> Result<Response, AdminError> {
    let t = load_tenant(&state, &session).await?;
    if t.webhook_url.is_none() {
        return Ok(render(
            &state,
            &session,
            &t,
            StatusCode::UNPROCESSABLE_ENTITY,
            PageParts {
                form: None,
                errors: vec!["Set a webhook URL first; the secret signs its deliveries.".into()],
                notice: None,
                new_webhook_secret: None,
                test: None,
            },
        ));
    }
    let secret = crypto::webhook_secret();
    let mut am = t.into_active_model();
    am.webhook_secret_sealed = Set(Some(state.sealer.seal(&secret)));
    am.updated_at = Set(db::now_ms());
    let t = {
        let _turn = db::write_turn(&state.db).await;
        am.update(&state.db).await?
    };
    tracing::info!(tenant = %t.id, admin = %session.admin_user_id, "webhook secret rotated");
    Ok(render(
        &state,
        &session,
        &t,
        StatusCode::OK,
        PageParts {
            form: None,
            errors: Vec::new(),
            notice: Some(
                "New webhook secret generated. Deliveries are signed with it from now on.",
            ),
            new_webhook_secret: Some(secret),
            test: None,
        },
    ))
}

pub(super) async fn test_connection(
    State(state): State<AppState>,
    session: AdminSession,
) -> Result<Response, AdminError> {
    let t = load_tenant(&state, &session).await?;
    let test = match tenants::exotel_account(&state.sealer, &t) {
        Err(e) => TestResult {
            ok: false,
            message: format!("{e:#}"),
        },
        Ok(account) => match state.exotel.check_account(&account).await {
            Ok(()) => TestResult {
                ok: true,
                message: format!(
                    "Exotel accepted the credentials for account {} at {}.",
                    t.exotel_sid, t.exotel_api_base
                ),
            },
            Err(ExotelError::Refused { status, message }) => TestResult {
                ok: false,
                message: format!("Exotel answered HTTP {status}: {message}"),
            },
            Err(e) => TestResult {
                ok: false,
                message: e.to_string(),
            },
        },
    };
    Ok(render(
        &state,
        &session,
        &t,
        StatusCode::OK,
        PageParts {
            form: None,
            errors: Vec::new(),
            notice: None,
            new_webhook_secret: None,
            test: Some(test),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form() -> SettingsForm {
        SettingsForm {
            name: "Acme".into(),
            exotel_sid: "acme1".into(),
            exotel_api_key: "key".into(),
            api_base: "in".into(),
            default_region: "in".into(),
            caller_id: "080 4711 2233".into(),
            time_limit: "3600".into(),
            ..SettingsForm::default()
        }
    }

    #[test]
    fn valid_settings_are_normalised() {
        let v = validate(&form()).unwrap();
        assert_eq!(v.api_base, API_BASE_IN);
        assert_eq!(v.region, "IN");
        assert_eq!(v.caller_id.as_deref(), Some("+918047112233"));
        assert_eq!(v.time_limit, Some(3600));
        assert!(v.token.is_none(), "blank token keeps the stored one");
    }

    #[test]
    fn every_problem_is_reported() {
        let mut f = form();
        f.exotel_sid = "has space".into();
        f.api_base = "custom".into();
        f.api_base_custom = "ftp://x".into();
        f.time_out = "600".into();
        f.webhook_url = "not a url".into();
        f.default_region = "ZZ".into();
        let errors = validate(&f).err().unwrap();
        assert_eq!(errors.len(), 5, "{errors:?}");
    }
}
