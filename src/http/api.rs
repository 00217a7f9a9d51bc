//! `/api/v1/*`: the tenant API, authenticated with `Authorization: Bearer <api_key>`. Every
//! query is scoped to the authenticated tenant; another tenant's id answers 404.

use axum::{
    Json, Router,
    extract::{FromRequestParts, Path, Query, State, rejection::JsonRejection},
    http::{StatusCode, request::Parts},
    response::IntoResponse,
    routing::get,
};
use serde::Deserialize;

use crate::{
    AppState,
    calls::{self, PlaceCall, Placed},
    entities::tenant,
    error::{ApiError, ApiResult},
    tenants,
};

pub(super) fn router(_state: &AppState) -> Router<AppState> {
    Router::new()
        .route("/api/v1/calls", get(list_calls).post(place_call))
        .route("/api/v1/calls/{id}", get(get_call))
        .layer(axum::extract::DefaultBodyLimit::max(16 * 1024))
}

/// The tenant behind the request's API key.
pub(crate) struct Tenant(pub(crate) tenant::Model);

impl FromRequestParts<AppState> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| ApiError::Unauthorized("send Authorization: Bearer <api key>".into()))?;
        let key = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|k| !k.is_empty() && k.len() <= 128)
            .ok_or_else(|| ApiError::Unauthorized("send Authorization: Bearer <api key>".into()))?;
        tenants::by_api_key(&state.db, key)
            .await?
            .map(Tenant)
            .ok_or_else(|| ApiError::Unauthorized("unknown API key".into()))
    }
}

async fn place_call(
    State(state): State<AppState>,
    Tenant(t): Tenant,
    body: Result<Json<PlaceCall>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let Json(req) = body?;
    Ok(match calls::place(&state, &t, req).await? {
        Placed::New(v) => (StatusCode::CREATED, Json(v)),
        Placed::Debounced(v) => (StatusCode::OK, Json(v)),
    })
}

async fn get_call(
    State(state): State<AppState>,
    Tenant(t): Tenant,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let (c, jobs) = calls::find(&state.db, &t.id, &id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no call {id}")))?;
    Ok(Json(calls::view(&c, &jobs)))
}

#[derive(Deserialize)]
struct Page {
    before: Option<String>,
    limit: Option<u64>,
}

async fn list_calls(
    State(state): State<AppState>,
    Tenant(t): Tenant,
    page: Result<Query<Page>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let Query(page) = page?;
    let limit = page.limit.unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(ApiError::validation(
            "limit",
            "limit must be between 1 and 200",
        ));
    }
    let items = calls::list(&state.db, &t.id, page.before.as_deref(), limit).await?;
    let next = (items.len() as u64 == limit)
        .then(|| items.last().map(|c| c.id.clone()))
        .flatten();
    Ok(Json(
        serde_json::json!({"items": items, "next_before": next}),
    ))
}
