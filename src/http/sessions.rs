//! `/api/v1/numbers`, `/api/v1/sessions` and `/api/v1/masking/settings`: the tenant's
//! virtual-number pool, masking sessions and masking settings, behind the tenant API key.
//! Every query is scoped to the authenticated tenant; another tenant's id answers 404.

use axum::{
    Json, Router,
    extract::{
        DefaultBodyLimit, Path, Query, State,
        rejection::{JsonRejection, QueryRejection},
    },
    http::StatusCode,
    response::IntoResponse,
    routing::{delete, get},
};
use serde::Deserialize;

use super::api::Tenant;
use crate::{
    AppState,
    error::{ApiError, ApiResult},
    masking::{self, NewSession, SessionPatch, SettingsPatch},
};

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/numbers", get(list_numbers).post(add_number))
        .route("/api/v1/numbers/{number}", delete(remove_number))
        .route("/api/v1/sessions", get(list_sessions).post(create_session))
        .route(
            "/api/v1/sessions/{id}",
            get(get_session).patch(update_session).delete(close_session),
        )
        .route(
            "/api/v1/masking/settings",
            get(get_settings).patch(update_settings),
        )
        .layer(DefaultBodyLimit::max(16 * 1024))
}

async fn list_numbers(
    State(state): State<AppState>,
    Tenant(t): Tenant,
) -> ApiResult<impl IntoResponse> {
    let items = masking::list_numbers(&state.db, &t.id).await?;
    Ok(Json(serde_json::json!({ "items": items })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddNumber {
    number: String,
}

async fn add_number(
    State(state): State<AppState>,
    Tenant(t): Tenant,
    body: Result<Json<AddNumber>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let Json(req) = body?;
    let numbers = masking::normalise_numbers(std::slice::from_ref(&req.number), &t.default_region)
        .map_err(|e| ApiError::validation("number", format!("number {e}")))?;
    let added = masking::add_numbers(&state.db, &t.id, &numbers).await?;
    let Some((number, true)) = added.into_iter().next() else {
        return Err(ApiError::Conflict(format!(
            "{} is already in the pool",
            numbers[0]
        )));
    };
    let item = masking::list_numbers(&state.db, &t.id)
        .await?
        .into_iter()
        .find(|n| n.number == number)
        .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("pool number vanished")))?;
    Ok((StatusCode::CREATED, Json(item)))
}

async fn remove_number(
    State(state): State<AppState>,
    Tenant(t): Tenant,
    Path(number): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let number = crate::phone::to_e164(&number, &t.default_region)
        .map_err(|_| ApiError::NotFound(format!("{number} is not in the pool")))?;
    masking::remove_number(&state, &t.id, &number).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn create_session(
    State(state): State<AppState>,
    Tenant(t): Tenant,
    body: Result<Json<NewSession>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let Json(req) = body?;
    let view = masking::create_session(&state, &t.id, &t.default_region, req).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

async fn get_session(
    State(state): State<AppState>,
    Tenant(t): Tenant,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    masking::get_session(&state.db, &t.id, &id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no session {id}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Page {
    before: Option<String>,
    limit: Option<u64>,
    status: Option<String>,
}

async fn list_sessions(
    State(state): State<AppState>,
    Tenant(t): Tenant,
    page: Result<Query<Page>, QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let Query(page) = page?;
    let limit = page.limit.unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(ApiError::validation(
            "limit",
            "limit must be between 1 and 200",
        ));
    }
    if let Some(s) = page.status.as_deref()
        && s != "open"
        && s != "closed"
    {
        return Err(ApiError::validation(
            "status",
            "status must be open or closed",
        ));
    }
    let items = masking::list_sessions(
        &state.db,
        &t.id,
        page.before.as_deref(),
        limit,
        page.status.as_deref(),
    )
    .await?;
    let next = (items.len() as u64 == limit)
        .then(|| items.last().map(|s| s.id.clone()))
        .flatten();
    Ok(Json(
        serde_json::json!({"items": items, "next_before": next}),
    ))
}

async fn update_session(
    State(state): State<AppState>,
    Tenant(t): Tenant,
    Path(id): Path<String>,
    body: Result<Json<SessionPatch>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let Json(patch) = body?;
    Ok(Json(
        masking::update_session(&state, &t.id, &id, patch).await?,
    ))
}

async fn close_session(
    State(state): State<AppState>,
    Tenant(t): Tenant,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(masking::close_session(&state, &t.id, &id).await?))
}

async fn get_settings(
    State(state): State<AppState>,
    Tenant(t): Tenant,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(masking::settings(&state, &t.id).await?))
}

async fn update_settings(
    State(state): State<AppState>,
    Tenant(t): Tenant,
    body: Result<Json<SettingsPatch>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let Json(patch) = body?;
    Ok(Json(
        masking::update_settings(&state, &t.id, &t.default_region, patch).await?,
    ))
}
