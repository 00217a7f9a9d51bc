//! Exotel call-flow webhooks, authenticated by the tenant's flow token in the URL (only its
//! SHA-256 is stored; an unknown token answers 404 and touches nothing):
//! - `GET|HEAD /hooks/exotel/flow/{token}/dial-whom`: the Connect applet's "Dial whom" URL.
//!   Answers `text/plain` with the one number to dial, or an empty 200 body so the flow takes
//!   its failure branch. HEAD only checks the token (Exotel probes some applet URLs with HEAD)
//!   and never slides a session.
//! - `GET|HEAD /hooks/exotel/flow/{token}/passthru`: the Passthru applet. Stores the flow call
//!   (idempotent on CallSid) and enqueues its delivery once final; answers 200, or the tenant's
//!   configured status (302 = branch B) for an unanswered call in sync mode.

use axum::{
    Router,
    extract::{Path, RawQuery, State},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};

use crate::{
    AppState,
    error::{ApiError, ApiResult},
    masking::{self, FlowParams, FlowTenant, PassthruError},
};

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/hooks/exotel/flow/{token}/dial-whom",
            get(dial_whom).head(probe),
        )
        .route(
            "/hooks/exotel/flow/{token}/passthru",
            get(passthru).head(probe),
        )
}

async fn tenant(state: &AppState, token: &str) -> ApiResult<FlowTenant> {
    masking::flow_tenant(state, token)
        .await?
        .ok_or_else(|| ApiError::NotFound("unknown flow URL".into()))
}

fn plain(status: StatusCode, body: String) -> Response {
    let mut r = (status, body).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

async fn probe(State(state): State<AppState>, Path(token): Path<String>) -> ApiResult<Response> {
    tenant(&state, &token).await?;
    Ok(plain(StatusCode::OK, String::new()))
}

async fn dial_whom(
    State(state): State<AppState>,
    Path(token): Path<String>,
    RawQuery(query): RawQuery,
) -> ApiResult<Response> {
    let t = tenant(&state, &token).await?;
    let params = FlowParams::parse(query.as_deref());
    let route = masking::dial_whom(&state, &t, &params).await?;
    tracing::debug!(
        tenant = %t.id,
        call_sid = params.get("CallSid").unwrap_or(""),
        via = ?route.as_ref().map(|r| r.via),
        "dial-whom"
    );
    let body = route
        .map(|r| masking::format_for_dial(&r.number, &t.settings.dial_format))
        .unwrap_or_default();
    Ok(plain(StatusCode::OK, body))
}

async fn passthru(
    State(state): State<AppState>,
    Path(token): Path<String>,
    RawQuery(query): RawQuery,
) -> ApiResult<Response> {
    let t = tenant(&state, &token).await?;
    let outcome = masking::record_passthru(&state, &t, query.as_deref())
        .await
        .map_err(|e| match e {
            PassthruError::Malformed(m) => ApiError::BadRequest(format!("not a Passthru: {m}")),
            PassthruError::Db(e) => ApiError::from(e),
        })?;
    let status = StatusCode::from_u16(outcome.branch).unwrap_or(StatusCode::OK);
    Ok(plain(
        status,
        if outcome.changed {
            "ok"
        } else {
            "duplicate ignored"
        }
        .to_owned(),
    ))
}
