//! `GET /admin`: today's calls by status, the tenant's delivery jobs by state, dead letters,
//! and the flow URLs to paste into Exotel's flow builder.

use askama::Template;
use axum::{extract::State, response::IntoResponse};
use chrono::{TimeZone, Utc};
use sea_orm::{ConnectionTrait, EntityTrait};

use super::{AdminError, AdminSession, Chrome, HtmlTemplate};
use crate::{AppState, db::stmt, entities::tenant, tenants};

#[derive(Template)]
#[template(path = "admin/dashboard.html")]
struct DashboardPage {
    chrome: Chrome,
    calls_today: Vec<(String, i64)>,
    calls_today_total: i64,
    jobs: Vec<(String, i64)>,
    dead: i64,
    dial_whom_url: String,
    passthru_url: String,
    api_key_last4: String,
    public_base: String,
}

/// Unix ms of today's midnight in `offset`.
pub(super) fn today_start_ms(offset: chrono::FixedOffset) -> i64 {
    let now = Utc::now().with_timezone(&offset);
    let midnight = now.date_naive().and_hms_opt(0, 0, 0).unwrap_or_default();
    offset
        .from_local_datetime(&midnight)
        .single()
        .map_or(0, |t| t.timestamp_millis())
}

/// `(key, count)` rows of a `GROUP BY` query.
pub(super) async fn grouped(
    state: &AppState,
    sql: &str,
    values: Vec<sea_orm::Value>,
) -> Result<Vec<(String, i64)>, sea_orm::DbErr> {
    let backend = state.db.get_database_backend();
    let rows = state.db.query_all_raw(stmt(backend, sql, values)).await?;
    rows.into_iter()
        .map(|r| Ok((r.try_get("", "k")?, r.try_get("", "n")?)))
        .collect()
}

pub(super) async fn page(
    State(state): State<AppState>,
    session: AdminSession,
) -> Result<impl IntoResponse, AdminError> {
    let t = tenant::Entity::find_by_id(session.tenant_id.clone())
        .one(&state.db)
        .await?
        .ok_or_else(|| AdminError::NotFound("the tenant no longer exists".into()))?;
    let calls_today = grouped(
        &state,
        "SELECT status AS k, COUNT(*) AS n FROM calls WHERE tenant_id = ? AND created_at >= ? \
         GROUP BY status ORDER BY status",
        vec![
            t.id.clone().into(),
            today_start_ms(state.exotel_offset).into(),
        ],
    )
    .await?;
    let jobs = grouped(
        &state,
        "SELECT state AS k, COUNT(*) AS n FROM jobs WHERE tenant_id = ? GROUP BY state \
         ORDER BY state",
        vec![t.id.clone().into()],
    )
    .await?;
    let dead = jobs
        .iter()
        .find(|(s, _)| s == "dead")
        .map_or(0, |(_, n)| *n);
    let flow_token = state
        .sealer
        .open(&t.flow_token_sealed)
        .map_err(|e| AdminError::Internal(e.context("opening the flow token")))?;
    let (dial_whom_url, passthru_url) = tenants::flow_urls(&state.public_base, &flow_token);
    Ok(HtmlTemplate(DashboardPage {
        chrome: Chrome::new(&state, &session, "home"),
        calls_today_total: calls_today.iter().map(|(_, n)| n).sum(),
        calls_today,
        jobs,
        dead,
        dial_whom_url,
        passthru_url,
        api_key_last4: t.api_key_last4.clone(),
        public_base: state.public_base.clone(),
    }))
}
