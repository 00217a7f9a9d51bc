//! `/admin/agents`: the tenant's agents (people and their real phones) and the CRM users mapped
//! to each. Add goes through `tenants::add_agent` (idempotent on the phone); edit changes the
//! name, the phone and replaces the mappings in one transaction; remove deletes the agent and
//! its mappings. Everything is scoped to the session's tenant.

use askama::Template;
use axum::{
    Form,
    extract::{Path, Query, State, rejection::FormRejection, rejection::QueryRejection},
    http::StatusCode,
    response::{IntoResponse, Redirect, Response},
};
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder};
use serde::Deserialize;

use super::{AdminError, AdminSession, Chrome, HtmlTemplate};
use crate::{
    AppState,
    db::{self, stmt},
    entities::{agent, agent_crm_user, tenant},
    phone, tenants,
};

/// One agent row.
pub(super) struct AgentRow {
    id: String,
    name: String,
    phone: String,
    crm_users: Vec<String>,
}

/// The add/edit form.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(super) struct AgentForm {
    name: String,
    phone: String,
    /// One `connector:user_id` per line.
    crm_users: String,
}

#[derive(Template)]
#[template(path = "admin/agents.html")]
struct AgentsPage {
    chrome: Chrome,
    agents: Vec<AgentRow>,
    form: AgentForm,
    errors: Vec<String>,
    notice: Option<&'static str>,
}

#[derive(Template)]
#[template(path = "admin/agent_edit.html")]
struct AgentEditPage {
    chrome: Chrome,
    id: String,
    form: AgentForm,
    errors: Vec<String>,
}

#[derive(Deserialize)]
pub(super) struct NoticeQuery {
    notice: Option<String>,
}

async fn rows(state: &AppState, tenant_id: &str) -> Result<Vec<AgentRow>, sea_orm::DbErr> {
    let agents = agent::Entity::find()
        .filter(agent::Column::TenantId.eq(tenant_id))
        .order_by_asc(agent::Column::Name)
        .order_by_asc(agent::Column::Phone)
        .all(&state.db)
        .await?;
    let maps = agent_crm_user::Entity::find()
        .filter(agent_crm_user::Column::TenantId.eq(tenant_id))
        .order_by_asc(agent_crm_user::Column::Connector)
        .order_by_asc(agent_crm_user::Column::CrmUserId)
        .all(&state.db)
        .await?;
    Ok(agents
        .into_iter()
        .map(|a| AgentRow {
            crm_users: maps
                .iter()
                .filter(|m| m.agent_id == a.id)
                .map(|m| format!("{}:{}", m.connector, m.crm_user_id))
                .collect(),
            id: a.id,
            name: a.name.unwrap_or_default(),
            phone: a.phone,
        })
        .collect())
}

/// `(crm_user_id, agent phone)` for every user of `connector` mapped in the tenant.
pub(super) async fn crm_mappings(
    state: &AppState,
    tenant_id: &str,
    connector: &str,
) -> Result<Vec<(String, String)>, sea_orm::DbErr> {
    let rows = state
        .db
        .query_all_raw(stmt(
            state.db.get_database_backend(),
            "SELECT m.crm_user_id, a.phone FROM agent_crm_users m JOIN agents a \
             ON a.id = m.agent_id AND a.tenant_id = m.tenant_id \
             WHERE m.tenant_id = ? AND m.connector = ?",
            vec![tenant_id.into(), connector.into()],
        ))
        .await?;
    rows.iter()
        .map(|r| Ok((r.try_get("", "crm_user_id")?, r.try_get("", "phone")?)))
        .collect()
}

fn crm_lines(text: &str) -> Vec<String> {
    text.lines()
        .flat_map(|l| l.split(','))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

async fn render_list(
    state: &AppState,
    session: &AdminSession,
    status: StatusCode,
    form: AgentForm,
    errors: Vec<String>,
    notice: Option<&'static str>,
) -> Result<Response, AdminError> {
    Ok((
        status,
        HtmlTemplate(AgentsPage {
            chrome: Chrome::new(state, session, "agents"),
            agents: rows(state, &session.tenant_id).await?,
            form,
            errors,
            notice,
        }),
    )
        .into_response())
}

pub(super) async fn list(
    State(state): State<AppState>,
    session: AdminSession,
    q: Result<Query<NoticeQuery>, QueryRejection>,
) -> Result<Response, AdminError> {
    let notice = match q.ok().and_then(|Query(q)| q.notice).as_deref() {
        Some("added") => Some("Agent saved."),
        Some("updated") => Some("Agent updated."),
        Some("removed") => Some("Agent removed."),
        _ => None,
    };
    render_list(
        &state,
        &session,
        StatusCode::OK,
        AgentForm::default(),
        Vec::new(),
        notice,
    )
    .await
}

pub(super) async fn add(
    State(state): State<AppState>,
    session: AdminSession,
    form: Result<Form<AgentForm>, FormRejection>,
) -> Result<Response, AdminError> {
    let Form(f) = form.map_err(|e| AdminError::BadRequest(e.body_text()))?;
    let name = f.name.trim();
    if name.len() > 200 {
        return render_list(
            &state,
            &session,
            StatusCode::UNPROCESSABLE_ENTITY,
            f.clone(),
            vec!["Name must be at most 200 characters".into()],
            None,
        )
        .await;
    }
    let result = tenants::add_agent(
        &state.db,
        tenants::NewAgent {
            tenant_id: session.tenant_id.clone(),
            phone: f.phone.clone(),
            name: (!name.is_empty()).then(|| name.to_owned()),
            crm_users: crm_lines(&f.crm_users),
        },
    )
    .await;
    match result {
        Ok(a) => {
            tracing::info!(agent = %a.id, admin = %session.admin_user_id, "agent saved");
            Ok(Redirect::to("/admin/agents?notice=added").into_response())
        }
        Err(e) => {
            let msg = e
                .to_string()
                .replace("--phone ", "Phone: ")
                .replace("--crm-user", "CRM user");
            render_list(
                &state,
                &session,
                StatusCode::UNPROCESSABLE_ENTITY,
                f,
                vec![msg],
                None,
            )
            .await
        }
    }
}

async fn find_agent(
    state: &AppState,
    session: &AdminSession,
    id: &str,
) -> Result<agent::Model, AdminError> {
    agent::Entity::find_by_id(id.to_owned())
        .filter(agent::Column::TenantId.eq(session.tenant_id.as_str()))
        .one(&state.db)
        .await?
        .ok_or_else(|| AdminError::NotFound(format!("No agent {id} in this account.")))
}

pub(super) async fn edit_form(
    State(state): State<AppState>,
    session: AdminSession,
    Path(id): Path<String>,
) -> Result<Response, AdminError> {
    let a = find_agent(&state, &session, &id).await?;
    let row = rows(&state, &session.tenant_id)
        .await?
        .into_iter()
        .find(|r| r.id == a.id);
    Ok(HtmlTemplate(AgentEditPage {
        chrome: Chrome::new(&state, &session, "agents"),
        id: a.id.clone(),
        form: AgentForm {
            name: a.name.clone().unwrap_or_default(),
            phone: a.phone.clone(),
            crm_users: row.map(|r| r.crm_users.join("\n")).unwrap_or_default(),
        },
        errors: Vec::new(),
    })
    .into_response())
}

/// Parse `connector:user_id` lines with the rules of `tenants::add_agent`.
fn parse_mappings(lines: &[String]) -> Result<Vec<(String, String)>, String> {
    lines
        .iter()
        .map(|m| {
            let bad = || format!("CRM user must look like CONNECTOR:USER_ID, got {m:?}");
            let (connector, user) = m.split_once(':').ok_or_else(bad)?;
            let connector = connector.trim().to_ascii_lowercase();
            if connector.is_empty()
                || user.trim().is_empty()
                || !connector
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                return Err(bad());
            }
            Ok((connector, user.trim().to_owned()))
        })
        .collect()
}

pub(super) async fn update(
    State(state): State<AppState>,
    session: AdminSession,
    Path(id): Path<String>,
    form: Result<Form<AgentForm>, FormRejection>,
) -> Result<Response, AdminError> {
    let Form(f) = form.map_err(|e| AdminError::BadRequest(e.body_text()))?;
    let a = find_agent(&state, &session, &id).await?;
    let t = tenant::Entity::find_by_id(session.tenant_id.clone())
        .one(&state.db)
        .await?
        .ok_or_else(|| AdminError::NotFound("the tenant no longer exists".into()))?;
    let mut errors = Vec::new();
    let name = f.name.trim().to_owned();
    if name.len() > 200 {
        errors.push("Name must be at most 200 characters".to_owned());
    }
    let phone = phone::to_e164(&f.phone, &t.default_region)
        .map_err(|e| errors.push(format!("Phone: {e}")))
        .ok();
    let mappings = parse_mappings(&crm_lines(&f.crm_users))
        .map_err(|e| errors.push(e))
        .ok();
    let (Some(phone), Some(mappings), true) = (phone, mappings, errors.is_empty()) else {
        return Ok((
            StatusCode::UNPROCESSABLE_ENTITY,
            HtmlTemplate(AgentEditPage {
                chrome: Chrome::new(&state, &session, "agents"),
                id: a.id,
                form: f,
                errors,
            }),
        )
            .into_response());
    };
    let backend = state.db.get_database_backend();
    let txn = db::begin_write(&state.db).await?;
    let updated = txn
        .execute_raw(stmt(
            backend,
            "UPDATE agents SET name = ?, phone = ? WHERE id = ? AND tenant_id = ?",
            vec![
                (!name.is_empty()).then_some(name).into(),
                phone.into(),
                a.id.clone().into(),
                session.tenant_id.clone().into(),
            ],
        ))
        .await;
    if let Err(e) = &updated
        && db::is_unique_violation(e)
    {
        drop(txn);
        return Ok((
            StatusCode::UNPROCESSABLE_ENTITY,
            HtmlTemplate(AgentEditPage {
                chrome: Chrome::new(&state, &session, "agents"),
                id: a.id,
                form: f,
                errors: vec!["Another agent already has that phone.".into()],
            }),
        )
            .into_response());
    }
    updated?;
    txn.execute_raw(stmt(
        backend,
        "DELETE FROM agent_crm_users WHERE tenant_id = ? AND agent_id = ?",
        vec![session.tenant_id.clone().into(), a.id.clone().into()],
    ))
    .await?;
    for (connector, user) in mappings {
        // A CRM user maps to one agent: taking it over from another agent is intended.
        txn.execute_raw(stmt(
            backend,
            "DELETE FROM agent_crm_users WHERE tenant_id = ? AND connector = ? AND crm_user_id = ?",
            vec![
                session.tenant_id.clone().into(),
                connector.clone().into(),
                user.clone().into(),
            ],
        ))
        .await?;
        txn.execute_raw(stmt(
            backend,
            "INSERT INTO agent_crm_users (tenant_id, connector, crm_user_id, agent_id) \
             VALUES (?, ?, ?, ?)",
            vec![
                session.tenant_id.clone().into(),
                connector.into(),
                user.into(),
                a.id.clone().into(),
            ],
        ))
        .await?;
    }
    txn.commit().await?;
    tracing::info!(agent = %a.id, admin = %session.admin_user_id, "agent updated");
    Ok(Redirect::to("/admin/agents?notice=updated").into_response())
}

pub(super) async fn remove(
    State(state): State<AppState>,
    session: AdminSession,
    Path(id): Path<String>,
) -> Result<Response, AdminError> {
    let backend = state.db.get_database_backend();
    let txn = db::begin_write(&state.db).await?;
    // First statement writes (SQLite IMMEDIATE rule); mappings first, then the agent.
    txn.execute_raw(stmt(
        backend,
        "DELETE FROM agent_crm_users WHERE tenant_id = ? AND agent_id = ?",
        vec![session.tenant_id.clone().into(), id.clone().into()],
    ))
    .await?;
    let r = txn
        .execute_raw(stmt(
            backend,
            "DELETE FROM agents WHERE id = ? AND tenant_id = ?",
            vec![id.clone().into(), session.tenant_id.clone().into()],
        ))
        .await?;
    if r.rows_affected() == 0 {
        txn.rollback().await?;
        return Err(AdminError::NotFound(format!(
            "No agent {id} in this account."
        )));
    }
    txn.commit().await?;
    tracing::info!(agent = %id, admin = %session.admin_user_id, "agent removed");
    Ok(Redirect::to("/admin/agents?notice=removed").into_response())
}
