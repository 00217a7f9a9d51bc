//! The HTTP surface. Each module exports a `router()`; this file merges them and adds the
//! layers. Order matters: the panic catcher is innermost-but-one so a panicking handler still
//! gets a logged 500 with a request id, and tracing wraps everything.

mod api;
mod flow;
mod health;
mod hooks;
mod recordings;
mod sessions;

use std::time::Duration;

use axum::{Router, http::HeaderName};
use tower_http::{
    catch_panic::CatchPanicLayer,
    request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer},
    timeout::TimeoutLayer,
    trace::TraceLayer,
};

use crate::AppState;

/// The whole application's routes.
pub fn router(state: AppState) -> Router {
    let request_id = HeaderName::from_static("x-request-id");
    let mut app = Router::new()
        .merge(api::router(&state))
        .merge(hooks::router(&state))
        .merge(flow::router())
        .merge(sessions::router())
        .merge(health::router())
        .merge(crate::admin::router(&state))
        .merge(recordings::router())
        .merge(crate::crm::oauth::router())
        .merge(crate::crm::inbound::router());
    if state.demo.is_some() {
        app = app.merge(crate::demo::router());
    }
    app.with_state(state)
        .layer(CatchPanicLayer::custom(|_| {
            crate::error::ApiError::Internal(anyhow::anyhow!("handler panicked"))
                .into_response_owned()
        }))
        .layer(TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(30),
        ))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(TraceLayer::new_for_http())
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
}

impl crate::error::ApiError {
    fn into_response_owned(self) -> axum::response::Response {
        axum::response::IntoResponse::into_response(self)
    }
}
