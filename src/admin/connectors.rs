//! `/admin/connectors`: the CRM connectors this instance runs and the tenant's installation of
//! each — install / reconnect (the OAuth routes in `crate::crm::oauth`), uninstall (revoke at
//! the CRM, delete the tokens), status and last error, the unknown-number rule, importing the
//! CRM's users as agents, and the marketplace-install confirmation.

use askama::Template;
use axum::{
    Form,
    extract::{
        Path, Query, RawQuery, State,
        rejection::{FormRejection, QueryRejection},
    },
    http::StatusCode,
    response::{IntoResponse, Redirect, Response},
};
use callbridge_connector::{CodeExchange, CrmRecordRef, InstallVars, ParamSource};
use serde::Deserialize;

use super::{AdminError, AdminSession, Chrome, HtmlTemplate, fmt_opt_ms};
use crate::{
    AppState,
    crm::{
        self,
        installations::{self, UnknownNumberRule},
        oauth,
    },
    tenants,
};

/// One connector on the page.
pub(super) struct ConnectorRow {
    name: String,
    display: String,
    /// `not installed`, `connected`, `reconnect needed`.
    status: &'static str,
    /// The status as a CSS class.
    status_class: &'static str,
    installed: bool,
    account_id: String,
    api_base: String,
    installed_by: String,
    installed_at: String,
    last_refresh: String,
    last_error: String,
    rule: &'static str,
    default_record_type: String,
    default_record_id: String,
    /// Values the admin types before the install (Zendesk subdomain).
    admin_inputs: Vec<String>,
    redirect_uri: String,
    panel_url: Option<String>,
}

#[derive(Template)]
#[template(path = "admin/connectors.html")]
struct ConnectorsPage {
    chrome: Chrome,
    connectors: Vec<ConnectorRow>,
    notice: Option<String>,
    errors: Vec<String>,
}

#[derive(Debug, Deserialize, Default)]
pub(super) struct NoticeQuery {
    installed: Option<String>,
    notice: Option<String>,
}

async fn rows(state: &AppState, tenant_id: &str) -> Result<Vec<ConnectorRow>, AdminError> {
    let installs = installations::list(&state.db, tenant_id).await?;
    let offset = state.exotel_offset;
    Ok(state
        .connectors
        .iter()
        .map(|(name, connector)| {
            let inst = installs.iter().find(|i| i.connector == name);
            let spec = connector.oauth_spec();
            let (rtype, rid) = inst
                .and_then(|i| i.default_record.clone())
                .map(|r| (r.object_type, r.id))
                .unwrap_or_default();
            ConnectorRow {
                name: name.to_owned(),
                display: crm::display_name(name),
                status: match inst {
                    None => "not installed",
                    Some(i) if i.is_active() => "connected",
                    Some(_) => "reconnect needed",
                },
                status_class: match inst {
                    None => "none",
                    Some(i) if i.is_active() => "done",
                    Some(_) => "dead",
                },
                installed: inst.is_some(),
                account_id: inst.and_then(|i| i.account_id.clone()).unwrap_or_default(),
                api_base: inst.map(|i| i.api_base.clone()).unwrap_or_default(),
                installed_by: inst
                    .and_then(|i| i.installed_by.clone())
                    .unwrap_or_default(),
                installed_at: fmt_opt_ms(inst.map(|i| i.updated_at), offset),
                last_refresh: fmt_opt_ms(inst.and_then(|i| i.last_refresh_at), offset),
                last_error: inst.and_then(|i| i.last_error.clone()).unwrap_or_default(),
                rule: inst.map_or("nothing", |i| i.unknown_number_rule.as_str()),
                default_record_type: rtype,
                default_record_id: rid,
                admin_inputs: spec
                    .install_params
                    .iter()
                    .filter(|p| matches!(p.source, ParamSource::AdminInput))
                    .map(|p| p.name.clone())
                    .collect(),
                redirect_uri: oauth::redirect_uri(state, name),
                panel_url: (name == "pipedrive")
                    .then(|| format!("{}/crm/{name}/panel", state.public_base)),
            }
        })
        .collect())
}

async fn render(
    state: &AppState,
    session: &AdminSession,
    status: StatusCode,
    notice: Option<String>,
    errors: Vec<String>,
) -> Result<Response, AdminError> {
    Ok((
        status,
        HtmlTemplate(ConnectorsPage {
            chrome: Chrome::new(state, session, "connectors"),
            connectors: rows(state, &session.tenant_id).await?,
            notice,
            errors,
        }),
    )
        .into_response())
}

pub(super) async fn list(
    State(state): State<AppState>,
    session: AdminSession,
    q: Result<Query<NoticeQuery>, QueryRejection>,
) -> Result<Response, AdminError> {
    let q = q.map(|Query(q)| q).unwrap_or_default();
    let notice = match (q.installed.as_deref(), q.notice.as_deref()) {
        (Some(name), _) if state.connectors.get(name).is_some() => {
            Some(format!("{} is connected.", crm::display_name(name)))
        }
        (_, Some("uninstalled")) => Some("Uninstalled; callbridge's tokens are deleted.".into()),
        (_, Some("rule")) => Some("Unknown-number rule saved.".into()),
        _ => None,
    };
    render(&state, &session, StatusCode::OK, notice, Vec::new()).await
}

fn known(state: &AppState, name: &str) -> Result<(), AdminError> {
    state
        .connectors
        .get(name)
        .map(|_| ())
        .ok_or_else(|| AdminError::NotFound(format!("no connector called {name:?} is enabled")))
}

pub(super) async fn uninstall(
    State(state): State<AppState>,
    session: AdminSession,
    Path(name): Path<String>,
) -> Result<Response, AdminError> {
    known(&state, &name)?;
    match oauth::uninstall(&state, &session.tenant_id, &name).await? {
        None => Err(AdminError::NotFound(format!(
            "{} is not installed",
            crm::display_name(&name)
        ))),
        Some(None) => Ok(Redirect::to("/admin/connectors?notice=uninstalled").into_response()),
        Some(Some(problem)) => {
            render(
                &state,
                &session,
                StatusCode::OK,
                Some("Uninstalled; callbridge's tokens are deleted.".into()),
                vec![problem],
            )
            .await
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
pub(super) struct RuleForm {
    rule: String,
    record_type: String,
    record_id: String,
}

pub(super) async fn save_rule(
    State(state): State<AppState>,
    session: AdminSession,
    Path(name): Path<String>,
    form: Result<Form<RuleForm>, FormRejection>,
) -> Result<Response, AdminError> {
    known(&state, &name)?;
    let Form(f) = form.map_err(|e| AdminError::BadRequest(e.body_text()))?;
    let Some(rule) = UnknownNumberRule::parse(f.rule.trim()) else {
        return render(
            &state,
            &session,
            StatusCode::UNPROCESSABLE_ENTITY,
            None,
            vec!["Choose what to do with unknown numbers.".into()],
        )
        .await;
    };
    let record = (rule == UnknownNumberRule::DefaultRecord).then(|| CrmRecordRef {
        object_type: f.record_type.trim().to_owned(),
        id: f.record_id.trim().to_owned(),
    });
    if let Some(r) = &record {
        let ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 64
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        };
        if !ok(&r.object_type) || !ok(&r.id) {
            return render(
                &state,
                &session,
                StatusCode::UNPROCESSABLE_ENTITY,
                None,
                vec![
                    "A default record needs its type (e.g. person, deal) and its id (letters, \
                     digits, _ . -)."
                        .into(),
                ],
            )
            .await;
        }
    }
    let Some(inst) = installations::for_tenant(&state.db, &session.tenant_id, &name).await? else {
        return Err(AdminError::NotFound(format!(
            "{} is not installed",
            crm::display_name(&name)
        )));
    };
    installations::set_rule(
        &state.db,
        &session.tenant_id,
        &inst.id,
        rule,
        record.as_ref(),
    )
    .await?;
    Ok(Redirect::to("/admin/connectors?notice=rule").into_response())
}

/// One CRM user on the import page.
pub(super) struct ImportRow {
    id: String,
    name: String,
    email: String,
    phone: String,
    mapped_to: String,
}

#[derive(Template)]
#[template(path = "admin/connector_import.html")]
struct ImportPage {
    chrome: Chrome,
    name: String,
    display: String,
    users: Vec<ImportRow>,
    errors: Vec<String>,
    saved: usize,
}

/// `GET /admin/connectors/{name}/import`: the CRM's users with a phone field each.
pub(super) async fn import_form(
    State(state): State<AppState>,
    session: AdminSession,
    Path(name): Path<String>,
) -> Result<Response, AdminError> {
    render_import(&state, &session, &name, Vec::new(), 0).await
}

async fn render_import(
    state: &AppState,
    session: &AdminSession,
    name: &str,
    errors: Vec<String>,
    saved: usize,
) -> Result<Response, AdminError> {
    known(state, name)?;
    let Some(inst) = installations::for_tenant(&state.db, &session.tenant_id, name).await? else {
        return Err(AdminError::NotFound(format!(
            "{} is not installed",
            crm::display_name(name)
        )));
    };
    let connector = state
        .connectors
        .get(name)
        .cloned()
        .ok_or_else(|| AdminError::NotFound("connector gone".into()))?;
    let users = state
        .tokens
        .call(state, &inst.id, |ctx, token| {
            let connector = connector.clone();
            async move { connector.list_users(&ctx, &token).await }
        })
        .await
        .map_err(|e| {
            AdminError::BadRequest(format!(
                "{} did not list its users: {e}",
                crm::display_name(name)
            ))
        })?;
    let mapped = super::agents::crm_mappings(state, &session.tenant_id, name).await?;
    let rows = users
        .into_iter()
        .map(|u| {
            let mapped_to = mapped
                .iter()
                .find(|(uid, _)| *uid == u.id)
                .map(|(_, phone)| phone.clone())
                .unwrap_or_default();
            ImportRow {
                phone: if mapped_to.is_empty() {
                    u.phone.clone().unwrap_or_default()
                } else {
                    mapped_to.clone()
                },
                id: u.id,
                name: u.name.unwrap_or_default(),
                email: u.email.unwrap_or_default(),
                mapped_to,
            }
        })
        .collect();
    let status = if errors.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::UNPROCESSABLE_ENTITY
    };
    Ok((
        status,
        HtmlTemplate(ImportPage {
            chrome: Chrome::new(state, session, "connectors"),
            display: crm::display_name(name),
            name: name.to_owned(),
            users: rows,
            errors,
            saved,
        }),
    )
        .into_response())
}

/// `POST /admin/connectors/{name}/import`: `phone.<user id>` and `name.<user id>` fields; every
/// row with a phone becomes (or updates) an agent mapped to that CRM user.
pub(super) async fn import_save(
    State(state): State<AppState>,
    session: AdminSession,
    Path(name): Path<String>,
    form: Result<Form<Vec<(String, String)>>, FormRejection>,
) -> Result<Response, AdminError> {
    known(&state, &name)?;
    let Form(fields) = form.map_err(|e| AdminError::BadRequest(e.body_text()))?;
    let mut errors = Vec::new();
    let mut saved = 0;
    for (key, phone) in &fields {
        let Some(user_id) = key.strip_prefix("phone.") else {
            continue;
        };
        let phone = phone.trim();
        if phone.is_empty() || user_id.is_empty() || user_id.len() > 128 {
            continue;
        }
        let display = fields
            .iter()
            .find(|(k, _)| k.strip_prefix("name.") == Some(user_id))
            .map(|(_, v)| v.trim().chars().take(200).collect::<String>())
            .filter(|v| !v.is_empty());
        match tenants::add_agent(
            &state.db,
            tenants::NewAgent {
                tenant_id: session.tenant_id.clone(),
                phone: phone.to_owned(),
                name: display.clone(),
                crm_users: vec![format!("{name}:{user_id}")],
            },
        )
        .await
        {
            Ok(_) => saved += 1,
            Err(e) => errors.push(format!(
                "{}: {}",
                display.as_deref().unwrap_or(user_id),
                e.to_string().replace("--phone ", "phone ")
            )),
        }
    }
    tracing::info!(connector = %name, saved, failed = errors.len(), admin = %session.admin_user_id,
        "CRM users imported as agents");
    render_import(&state, &session, &name, errors, saved).await
}

#[derive(Template)]
#[template(path = "admin/connector_marketplace.html")]
struct MarketplacePage {
    chrome: Chrome,
    display: String,
    name: String,
    query: String,
}

/// `GET /admin/connectors/{name}/marketplace?code=…`: an install that started at the CRM's
/// marketplace. Nothing is exchanged until the admin confirms.
pub(super) async fn marketplace_form(
    State(state): State<AppState>,
    session: AdminSession,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, AdminError> {
    known(&state, &name)?;
    let raw = raw.unwrap_or_default();
    if !url::form_urlencoded::parse(raw.as_bytes()).any(|(k, v)| k == "code" && !v.is_empty()) {
        return Err(AdminError::BadRequest(
            "The CRM's redirect carried no authorization code.".into(),
        ));
    }
    Ok(HtmlTemplate(MarketplacePage {
        chrome: Chrome::new(&state, &session, "connectors"),
        display: crm::display_name(&name),
        name,
        query: raw,
    })
    .into_response())
}

#[derive(Debug, Deserialize)]
pub(super) struct MarketplaceForm {
    query: String,
}

/// `POST /admin/connectors/{name}/marketplace` (CSRF-checked by the guard): exchange the code
/// for this admin's tenant.
pub(super) async fn marketplace_confirm(
    State(state): State<AppState>,
    session: AdminSession,
    Path(name): Path<String>,
    form: Result<Form<MarketplaceForm>, FormRejection>,
) -> Result<Response, AdminError> {
    known(&state, &name)?;
    let Form(f) = form.map_err(|e| AdminError::BadRequest(e.body_text()))?;
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(f.query.as_bytes())
        .into_owned()
        .collect();
    let (code, _) = callbridge_connector::oauth::callback_code(&pairs)
        .map_err(|e| AdminError::BadRequest(format!("The CRM's redirect was not usable: {e}")))?;
    oauth::install(
        &state,
        &session,
        &name,
        &InstallVars::new(),
        CodeExchange {
            code,
            redirect_uri: oauth::redirect_uri(&state, &name),
            pkce_verifier: None,
        },
    )
    .await
}
