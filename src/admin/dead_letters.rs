//! `/admin/dead-letters`: the tenant's jobs that gave up (state `dead`), with Retry (back to
//! `queued`, due now, with a fresh round of `job_max_attempts` attempts; the worker is woken)
//! and Discard (state `discarded`, kept for the call's timeline). Both are CSRF-checked POSTs
//! scoped to the tenant; a job of another tenant, or one that is no longer dead, answers 404.

use askama::Template;
use axum::{
    extract::{Path, Query, State, rejection::QueryRejection},
    response::{IntoResponse, Redirect},
};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use serde::Deserialize;

use super::{AdminError, AdminSession, Chrome, HtmlTemplate, fmt_ms};
use crate::{
    AppState,
    db::{self, stmt},
    entities::job,
};

/// One dead job.
pub(super) struct DeadRow {
    id: i64,
    kind: String,
    target: String,
    call_id: String,
    attempts: i32,
    last_status: String,
    last_error: String,
    died: String,
}

#[derive(Template)]
#[template(path = "admin/dead_letters.html")]
struct DeadLettersPage {
    chrome: Chrome,
    rows: Vec<DeadRow>,
    notice: Option<&'static str>,
}

#[derive(Deserialize)]
pub(super) struct NoticeQuery {
    notice: Option<String>,
}

pub(super) async fn list(
    State(state): State<AppState>,
    session: AdminSession,
    q: Result<Query<NoticeQuery>, QueryRejection>,
) -> Result<impl IntoResponse, AdminError> {
    let jobs = job::Entity::find()
        .filter(job::Column::TenantId.eq(session.tenant_id.as_str()))
        .filter(job::Column::State.eq("dead"))
        .order_by_desc(job::Column::UpdatedAt)
        .limit(500)
        .all(&state.db)
        .await?;
    let offset = state.exotel_offset;
    let notice = match q.ok().and_then(|Query(q)| q.notice).as_deref() {
        Some("retried") => Some("The job is queued and will be delivered again shortly."),
        Some("discarded") => Some("The job was discarded."),
        _ => None,
    };
    Ok(HtmlTemplate(DeadLettersPage {
        chrome: Chrome::new(&state, &session, "dead-letters"),
        rows: jobs
            .into_iter()
            .map(|j| DeadRow {
                id: j.id,
                kind: j.kind,
                target: j.target,
                call_id: j.call_id.unwrap_or_default(),
                attempts: j.attempts,
                last_status: j.last_status.map(|s| s.to_string()).unwrap_or_default(),
                last_error: j.last_error.unwrap_or_default(),
                died: fmt_ms(j.updated_at, offset),
            })
            .collect(),
        notice,
    }))
}

pub(super) async fn retry(
    State(state): State<AppState>,
    session: AdminSession,
    Path(id): Path<i64>,
) -> Result<impl IntoResponse, AdminError> {
    let now = db::now_ms();
    let backend = state.db.get_database_backend();
    let r = db::execute_write(
        &state.db,
        stmt(
            backend,
            "UPDATE jobs SET state = 'queued', run_at = ?, locked_until = NULL, \
             max_attempts = attempts + ?, updated_at = ? \
             WHERE id = ? AND tenant_id = ? AND state = 'dead'",
            vec![
                now.into(),
                state.config.job_max_attempts.into(),
                now.into(),
                id.into(),
                session.tenant_id.clone().into(),
            ],
        ),
    )
    .await?;
    if r.rows_affected() == 0 {
        return Err(AdminError::NotFound(format!(
            "No dead job {id} in this account."
        )));
    }
    state.jobs_ready.notify_one();
    tracing::info!(job = id, admin = %session.admin_user_id, "dead letter retried");
    Ok(Redirect::to("/admin/dead-letters?notice=retried"))
}

pub(super) async fn discard(
    State(state): State<AppState>,
    session: AdminSession,
    Path(id): Path<i64>,
) -> Result<impl IntoResponse, AdminError> {
    let backend = state.db.get_database_backend();
    let r = db::execute_write(
        &state.db,
        stmt(
            backend,
            "UPDATE jobs SET state = 'discarded', locked_until = NULL, updated_at = ? \
             WHERE id = ? AND tenant_id = ? AND state = 'dead'",
            vec![
                db::now_ms().into(),
                id.into(),
                session.tenant_id.clone().into(),
            ],
        ),
    )
    .await?;
    if r.rows_affected() == 0 {
        return Err(AdminError::NotFound(format!(
            "No dead job {id} in this account."
        )));
    }
    tracing::info!(job = id, admin = %session.admin_user_id, "dead letter discarded");
    Ok(Redirect::to("/admin/dead-letters?notice=discarded"))
}
