//! Recording links over HTTP: the public `GET|HEAD /recordings/{token}` (the token is the only
//! credential; unknown or malformed → 404, revoked or expired → 410) and the tenant API
//! `POST|DELETE /api/v1/calls/{id}/recording-link` (bearer key; another tenant's call → 404).

use axum::{
    Json, Router,
    extract::{Path, State},
    http::{HeaderMap, Method, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde_json::json;

use super::api::Tenant;
use crate::{
    AppState,
    entities::call,
    error::{ApiError, ApiResult},
    recordings::{self, Resolved, proxy},
};

pub(super) fn router() -> Router<AppState> {
    Router::new().route("/recordings/{token}", get(play)).route(
        "/api/v1/calls/{id}/recording-link",
        post(create_link).delete(revoke_link),
    )
}

fn gone(detail: &str) -> Response {
    (
        StatusCode::GONE,
        Json(json!({"code": "gone", "detail": detail})),
    )
        .into_response()
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// `GET` (axum routes `HEAD` here too) `/recordings/{token}`.
async fn play(
    State(state): State<AppState>,
    Path(token): Path<String>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    let resolved = match recordings::resolve(&state.db, &token).await {
        Ok(r) => r,
        Err(e) => return ApiError::from(e).into_response(),
    };
    match resolved {
        Resolved::Unknown => ApiError::NotFound("no such recording link".into()).into_response(),
        Resolved::Revoked(at) => gone(&format!(
            "this recording link was revoked at {}",
            rfc3339(at)
        )),
        Resolved::Expired(at) => gone(&format!("this recording link expired at {}", rfc3339(at))),
        Resolved::Live { tenant, call } => {
            match proxy::play(&state, &tenant, &call, &method, &headers).await {
                Ok(r) => r,
                Err(e) => e.into_response(),
            }
        }
    }
}

async fn tenant_call(state: &AppState, tenant_id: &str, id: &str) -> ApiResult<call::Model> {
    crate::calls::find(&state.db, tenant_id, id)
        .await?
        .map(|(c, _)| c)
        .ok_or_else(|| ApiError::NotFound(format!("no call {id}")))
}

/// Get or create the call's playable link: `{url, expires_at}`.
async fn create_link(
    State(state): State<AppState>,
    Tenant(t): Tenant,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let c = tenant_call(&state, &t.id, &id).await?;
    let link = recordings::get_or_create(&state, &c)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("call {id} has no recording (yet)")))?;
    Ok(Json(link))
}

/// Revoke the call's links (idempotent).
async fn revoke_link(
    State(state): State<AppState>,
    Tenant(t): Tenant,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let c = tenant_call(&state, &t.id, &id).await?;
    let revoked = recordings::revoke_call(&state.db, &t.id, &c.id).await?;
    Ok(Json(json!({"revoked": revoked})))
}
