//! `/healthz` (the process is up), `/readyz` (the database answers) and `/metrics`.

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};

use crate::{AppState, db, jobs};

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    if db::ping(&state.db).await {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "database unreachable")
    }
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    if let Ok(counts) = jobs::counts(&state.db).await {
        for s in ["queued", "running", "done", "dead"] {
            let n = counts.iter().find(|(k, _)| k == s).map_or(0, |(_, n)| *n);
            state.metrics.jobs.with_label_values(&[s]).set(n);
        }
    }
    (
        [("content-type", "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
