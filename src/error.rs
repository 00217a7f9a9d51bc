//! The one HTTP error type. Every handler returns `Result<_, ApiError>`; this file alone decides
//! statuses and bodies (`{"code": …, "detail": …}`), and 5xx causes are logged here and never
//! sent to the client.

use axum::{
    Json,
    extract::rejection::{JsonRejection, PathRejection, QueryRejection},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde_json::json;

/// An error answered to an HTTP client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// 401: missing or wrong credentials.
    #[error("{0}")]
    Unauthorized(String),
    /// 404: no such thing for this tenant.
    #[error("{0}")]
    NotFound(String),
    /// 409: conflicts with existing state.
    #[error("{0}")]
    Conflict(String),
    /// 413: body too large.
    #[error("{0}")]
    TooLarge(String),
    /// 415: unsupported content type.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 422: well-formed but invalid.
    #[error("{detail}")]
    Validation {
        /// The offending field.
        field: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// 502: Exotel refused; the call is stored as failed.
    #[error("Exotel refused the call: {message}")]
    Exotel {
        /// The stored call.
        call_id: String,
        /// Exotel's HTTP status.
        status: Option<u16>,
        /// Exotel's message.
        message: String,
    },
    /// 504: Exotel did not answer in time; the call may have been placed.
    #[error("Exotel did not answer in time")]
    ExotelTimeout {
        /// The stored call.
        call_id: String,
    },
    /// 503: a dependency is unavailable.
    #[error("{0}")]
    Unavailable(String),
    /// 500: anything else (logged, not shown).
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    /// A 422 for `field`.
    pub fn validation(field: &'static str, detail: impl Into<String>) -> Self {
        Self::Validation {
            field,
            detail: detail.into(),
        }
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Self::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Self::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            Self::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            Self::Validation { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
            Self::Exotel { .. } => (StatusCode::BAD_GATEWAY, "exotel_refused"),
            Self::ExotelTimeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "exotel_timeout"),
            Self::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let body = match &self {
            Self::Internal(e) => {
                tracing::error!(error = ?e, "request failed");
                json!({"code": code, "detail": "internal error; see the server log"})
            }
            Self::Validation { field, detail } => {
                json!({"code": code, "detail": detail, "field": field})
            }
            Self::Exotel {
                call_id,
                status: exotel_status,
                message,
            } => json!({"code": code, "detail": self.to_string(), "call_id": call_id,
                        "exotel_status": exotel_status, "exotel_message": message}),
            Self::ExotelTimeout { call_id } => json!({"code": code, "call_id": call_id,
                "detail": "Exotel did not answer in time; the call may still ring. Its status \
                           will update when Exotel reports it."}),
            other => json!({"code": code, "detail": other.to_string()}),
        };
        (status, Json(body)).into_response()
    }
}

impl From<sea_orm::DbErr> for ApiError {
    fn from(e: sea_orm::DbErr) -> Self {
        if crate::db::is_unique_violation(&e) {
            return Self::Conflict("that already exists".into());
        }
        Self::Internal(anyhow::Error::new(e).context("database"))
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        match r {
            JsonRejection::MissingJsonContentType(_) => {
                Self::UnsupportedMediaType("send Content-Type: application/json".into())
            }
            JsonRejection::JsonDataError(e) => Self::Validation {
                field: "body",
                detail: e.body_text(),
            },
            JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Self::TooLarge("request body is too large".into())
            }
            other => Self::BadRequest(other.body_text()),
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        Self::BadRequest(r.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        Self::BadRequest(r.body_text())
    }
}

/// `Result` with [`ApiError`].
pub type ApiResult<T> = Result<T, ApiError>;
