//! `POST /hooks/exotel/status/{call_token}`: Exotel's StatusCallback.
//!
//! Exotel does not sign callbacks, so the per-call token in the URL is the credential (only its
//! SHA-256 is stored). The handler answers 200 only after the writer has committed the final
//! state and the delivery job; unknown tokens get 404, malformed bodies 400, oversize 413, and
//! none of those write anything.

use axum::{
    Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Path, RawQuery, State},
    http::{HeaderMap, StatusCode, header::CONTENT_TYPE},
    response::IntoResponse,
    routing::post,
};

use crate::{
    AppState, crypto,
    error::{ApiError, ApiResult},
    exotel::callback::{ParseError, parse_body},
    ingest::{CallKey, Outcome, Source, Update},
};

pub(super) fn router(state: &AppState) -> Router<AppState> {
    Router::new()
        .route("/hooks/exotel/status/{token}", post(status_callback))
        .layer(DefaultBodyLimit::max(state.config.callback_body_limit))
}

fn count(state: &AppState, result: &str) {
    state.metrics.callbacks.with_label_values(&[result]).inc();
}

async fn status_callback(
    State(state): State<AppState>,
    Path(token): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<impl IntoResponse> {
    let body = body.map_err(|e| {
        count(&state, "malformed");
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge(format!(
                "callback bodies are limited to {} bytes",
                state.config.callback_body_limit
            ))
        } else {
            ApiError::BadRequest(e.body_text())
        }
    })?;
    if token.len() < 16 || token.len() > 64 {
        count(&state, "unknown_token");
        return Err(ApiError::NotFound("unknown callback URL".into()));
    }
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let query: Vec<(String, String)> = query
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let (cb, raw) = parse_body(content_type, body, &query).await.map_err(|e| {
        count(&state, "malformed");
        match e {
            ParseError::ContentType(_) => ApiError::UnsupportedMediaType(format!(
                "{e}; send JSON, multipart/form-data or application/x-www-form-urlencoded"
            )),
            other => ApiError::BadRequest(format!("not a StatusCallback: {other}")),
        }
    })?;
    let update = Update::from_callback(
        CallKey::TokenHash(crypto::token_hash(&token)),
        &cb,
        state.exotel_offset,
        Some(raw.to_string()),
        Source::Callback,
    );
    match state.ingest.submit(update).await {
        Ok(Outcome::Applied { .. }) => {
            count(&state, "accepted");
            Ok((StatusCode::OK, "ok"))
        }
        Ok(Outcome::Duplicate) => {
            count(&state, "duplicate");
            Ok((StatusCode::OK, "duplicate ignored"))
        }
        Ok(Outcome::Unknown) => {
            count(&state, "unknown_token");
            Err(ApiError::NotFound("unknown callback URL".into()))
        }
        Ok(Outcome::SidMismatch) => {
            count(&state, "malformed");
            Err(ApiError::BadRequest(
                "CallSid does not match the call this URL belongs to".into(),
            ))
        }
        Err(e) => {
            count(&state, "error");
            Err(ApiError::Unavailable(e.to_string()))
        }
    }
}
