//! Streaming a call's recording from Exotel to whoever holds a live link.
//!
//! Rules: the upstream URL comes only from the stored call row; it and every redirect target
//! must pass the allow-list before any request is made; the tenant's Basic credentials go only
//! to the stored URL's origin (a redirect to another origin, e.g. a pre-signed S3 URL, is
//! followed without them); the body is streamed chunk by chunk, never buffered, so memory per
//! playback is a few socket buffers whatever the file size. The client's `Range`/`If-Range` are
//! forwarded so browsers can seek, and 206/`Content-Range` pass back unchanged.
//!
//! Status mapping: 200/206 pass through; upstream 404 → 404; 401/403 → 502 (the tenant's
//! Exotel credentials were refused); 416 → 416; anything else, a timeout or a refused host →
//! 502/504 with a JSON `{code, detail}` body.

use std::time::Duration;

use axum::{
    Json,
    body::Body,
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use serde_json::json;

use super::allow::AllowList;
use crate::{
    AppState,
    entities::{call, tenant},
    exotel::{ExotelAccount, ExotelError, client::RecordingRequest},
    tenants,
};

/// Redirect hops followed (each one allow-listed).
const MAX_REDIRECTS: usize = 3;
/// Longest wait for the next chunk from upstream while the client is reading.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest `Range` header forwarded.
const MAX_RANGE_LEN: usize = 256;

/// Why a recording could not be played.
#[derive(Debug, thiserror::Error)]
pub enum PlayError {
    /// The call has no recording.
    #[error("this call has no recording")]
    NoRecording,
    /// The stored URL (or a redirect) points outside the allow-list.
    #[error("refusing to fetch the recording: {0}")]
    NotAllowed(String),
    /// Exotel refused the tenant's credentials.
    #[error(
        "Exotel refused the tenant's API credentials for this recording (HTTP {0}); check the \
         tenant's Exotel API key and token"
    )]
    Credentials(u16),
    /// Exotel has no file at that address.
    #[error("Exotel has no recording at the stored address (it may not be ready yet)")]
    NotFound,
    /// The requested range is outside the file.
    #[error("the requested range is outside the recording")]
    RangeNotSatisfiable(Option<HeaderValue>),
    /// Exotel answered something unusable.
    #[error("{0}")]
    Upstream(String),
    /// Exotel did not answer in time.
    #[error("Exotel did not answer in time for the recording")]
    Timeout,
    /// Our side failed (sealed token, …); logged, not shown.
    #[error("internal error; see the server log")]
    Internal(#[source] anyhow::Error),
}

impl IntoResponse for PlayError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            Self::NoRecording | Self::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            Self::NotAllowed(_) => (StatusCode::BAD_GATEWAY, "recording_host_not_allowed"),
            Self::Credentials(_) => (StatusCode::BAD_GATEWAY, "exotel_credentials_refused"),
            Self::RangeNotSatisfiable(_) => {
                (StatusCode::RANGE_NOT_SATISFIABLE, "range_not_satisfiable")
            }
            Self::Upstream(_) => (StatusCode::BAD_GATEWAY, "recording_upstream_error"),
            Self::Timeout => (StatusCode::GATEWAY_TIMEOUT, "recording_upstream_timeout"),
            Self::Internal(e) => {
                tracing::error!(error = ?e, "recording playback failed");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        let mut resp = (
            status,
            Json(json!({"code": code, "detail": self.to_string()})),
        )
            .into_response();
        if let Self::RangeNotSatisfiable(Some(cr)) = self {
            resp.headers_mut().insert(header::CONTENT_RANGE, cr);
        }
        resp
    }
}

/// The media type for a recording whose upstream type is missing or generic, by extension.
#[must_use]
pub fn guess_content_type(path: &str) -> &'static str {
    let ext = path
        .rsplit('/')
        .next()
        .and_then(|f| f.rsplit_once('.'))
        .map(|(_, e)| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("wav") => "audio/wav",
        Some("ogg" | "oga" | "opus") => "audio/ogg",
        Some("m4a" | "mp4" | "aac") => "audio/mp4",
        Some("webm") => "audio/webm",
        _ => "audio/mpeg",
    }
}

pub(crate) fn extension_of(content_type: &str) -> &'static str {
    match content_type {
        "audio/wav" | "audio/x-wav" | "audio/wave" => "wav",
        "audio/ogg" => "ogg",
        "audio/mp4" => "m4a",
        "audio/webm" => "webm",
        _ => "mp3",
    }
}

/// Serve `c`'s recording for a `GET` or `HEAD` with the client's `headers`.
///
/// # Errors
/// [`PlayError`], already shaped as the HTTP answer.
pub async fn play(
    state: &AppState,
    t: &tenant::Model,
    c: &call::Model,
    method: &Method,
    headers: &HeaderMap,
) -> Result<Response, PlayError> {
    let stored = c
        .recording_url
        .as_deref()
        .filter(|u| !u.is_empty())
        .ok_or(PlayError::NoRecording)?;
    let allow = AllowList::parse(
        &state.config.recording_hosts,
        state.config.recording_allow_loopback_http,
    )
    .map_err(PlayError::Internal)?;
    let first = allow.check(stored).map_err(|why| {
        tracing::warn!(call = %c.id, %why, "recording URL refused by the allow-list");
        PlayError::NotAllowed(why)
    })?;
    let account = tenants::exotel_account(&state.sealer, t).map_err(PlayError::Internal)?;
    let range = header_str(headers, header::RANGE)
        .filter(|r| r.len() <= MAX_RANGE_LEN && r.trim_start().starts_with("bytes="));
    let if_range = header_str(headers, header::IF_RANGE).filter(|v| v.len() <= MAX_RANGE_LEN);

    let head = *method == Method::HEAD;
    let mut upstream = fetch(state, &allow, &account, &first, head, range, if_range).await?;
    if head
        && matches!(
            upstream.status(),
            reqwest::StatusCode::METHOD_NOT_ALLOWED | reqwest::StatusCode::NOT_IMPLEMENTED
        )
    {
        // [U] A host that does not answer HEAD: ask with GET and send only the headers (the
        // unread body is dropped with the connection).
        upstream = fetch(state, &allow, &account, &first, false, range, if_range).await?;
    }

    let status = upstream.status();
    match status.as_u16() {
        200 | 206 => {}
        404 | 410 => return Err(PlayError::NotFound),
        401 | 403 => {
            tracing::warn!(call = %c.id, tenant = %t.id, status = status.as_u16(),
                "Exotel refused the tenant's credentials for a recording");
            return Err(PlayError::Credentials(status.as_u16()));
        }
        416 => {
            return Err(PlayError::RangeNotSatisfiable(
                upstream.headers().get(header::CONTENT_RANGE).cloned(),
            ));
        }
        s => {
            return Err(PlayError::Upstream(format!(
                "Exotel answered HTTP {s} for the recording"
            )));
        }
    }

    let up = upstream.headers();
    let content_type = up
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .filter(|v| v.starts_with("audio/") || v.starts_with("video/") || v == "application/ogg")
        .unwrap_or_else(|| guess_content_type(first.path()).to_owned());
    let mut out = Response::builder()
        .status(StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::OK))
        .header(header::CONTENT_TYPE, &content_type)
        .header(
            header::CONTENT_DISPOSITION,
            format!(
                "inline; filename=\"{}.{}\"",
                c.id,
                extension_of(&content_type)
            ),
        )
        .header(header::CACHE_CONTROL, "private, max-age=60")
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .header(
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; sandbox",
        )
        .header(header::REFERRER_POLICY, "no-referrer")
        .header("x-robots-tag", "noindex");
    for name in [
        header::CONTENT_LENGTH,
        header::CONTENT_RANGE,
        header::ETAG,
        header::LAST_MODIFIED,
    ] {
        if let Some(v) = up.get(&name) {
            out = out.header(name, v.clone());
        }
    }
    // Seeking works through us whether or not upstream says so, as long as it honours Range;
    // pass its own answer when it gives one.
    out = out.header(
        header::ACCEPT_RANGES,
        up.get(header::ACCEPT_RANGES)
            .cloned()
            .unwrap_or_else(|| HeaderValue::from_static("bytes")),
    );
    let body = if head {
        Body::empty()
    } else {
        Body::from_stream(stream(upstream))
    };
    out.body(body)
        .map_err(|e| PlayError::Internal(anyhow::Error::new(e).context("building the response")))
}

/// The whole recording of `c`, for CRMs that take the file (at most `max_bytes`), with its
/// content type. Same allow-list and credential rules as [`play`].
///
/// # Errors
/// [`PlayError`]; a file over `max_bytes` is [`PlayError::Upstream`].
pub async fn download(
    state: &AppState,
    t: &tenant::Model,
    c: &call::Model,
    max_bytes: usize,
) -> Result<(bytes::Bytes, String), PlayError> {
    let stored = c
        .recording_url
        .as_deref()
        .filter(|u| !u.is_empty())
        .ok_or(PlayError::NoRecording)?;
    let allow = AllowList::parse(
        &state.config.recording_hosts,
        state.config.recording_allow_loopback_http,
    )
    .map_err(PlayError::Internal)?;
    let first = allow.check(stored).map_err(PlayError::NotAllowed)?;
    let account = tenants::exotel_account(&state.sealer, t).map_err(PlayError::Internal)?;
    let mut resp = fetch(state, &allow, &account, &first, false, None, None).await?;
    match resp.status().as_u16() {
        200 => {}
        404 | 410 => return Err(PlayError::NotFound),
        s @ (401 | 403) => return Err(PlayError::Credentials(s)),
        s => {
            return Err(PlayError::Upstream(format!(
                "Exotel answered {s} for the recording"
            )));
        }
    }
    let content_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.starts_with("audio/"))
        .map_or_else(
            || guess_content_type(first.path()).to_owned(),
            str::to_owned,
        );
    let mut body = bytes::BytesMut::new();
    loop {
        let chunk = tokio::time::timeout(IDLE_TIMEOUT, resp.chunk())
            .await
            .map_err(|_| PlayError::Timeout)?
            .map_err(|e| PlayError::Upstream(format!("reading the recording: {e}")))?;
        let Some(chunk) = chunk else { break };
        if body.len() + chunk.len() > max_bytes {
            return Err(PlayError::Upstream(format!(
                "the recording is larger than {max_bytes} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body.freeze(), content_type))
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Request `url` (and each allow-listed redirect), with credentials only on the first origin.
async fn fetch(
    state: &AppState,
    allow: &AllowList,
    account: &ExotelAccount,
    first: &url::Url,
    head: bool,
    range: Option<&str>,
    if_range: Option<&str>,
) -> Result<reqwest::Response, PlayError> {
    let origin = first.origin();
    let mut url = first.clone();
    for _ in 0..=MAX_REDIRECTS {
        let same_origin = url.origin() == origin;
        let resp = state
            .exotel
            .fetch_recording(&RecordingRequest {
                method: if head { Method::HEAD } else { Method::GET },
                url: url.as_str(),
                account: same_origin.then_some(account),
                range,
                if_range,
            })
            .await
            .map_err(|e| match e {
                ExotelError::Timeout(_) => PlayError::Timeout,
                other => PlayError::Upstream(format!("could not fetch the recording: {other}")),
            })?;
        if !matches!(resp.status().as_u16(), 301 | 302 | 303 | 307 | 308) {
            return Ok(resp);
        }
        let next = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|l| url.join(l).ok())
            .ok_or_else(|| {
                PlayError::Upstream("Exotel redirected the recording without a Location".into())
            })?;
        url = allow.check(next.as_str()).map_err(|why| {
            tracing::warn!(%why, "recording redirect refused by the allow-list");
            PlayError::NotAllowed(format!("Exotel redirected the recording: {why}"))
        })?;
    }
    Err(PlayError::Upstream(
        "Exotel redirected the recording too many times".into(),
    ))
}

/// The upstream body as a stream of chunks, failing if upstream stalls while we wait on it
/// (a client that stops reading does not trigger this: nothing is awaited then).
fn stream(
    resp: reqwest::Response,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    futures_util::stream::unfold(Some(resp), |state| async move {
        let mut resp = state?;
        match tokio::time::timeout(IDLE_TIMEOUT, resp.chunk()).await {
            Ok(Ok(Some(chunk))) => Some((Ok(chunk), Some(resp))),
            Ok(Ok(None)) => None,
            Ok(Err(e)) => Some((
                Err(std::io::Error::other(format!(
                    "recording stream failed: {}",
                    e.without_url()
                ))),
                None,
            )),
            Err(_) => Some((
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "recording upstream stalled",
                )),
                None,
            )),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_type_is_guessed_from_the_extension() {
        assert_eq!(
            guess_content_type("/exotelrecordings/a/x.mp3"),
            "audio/mpeg"
        );
        assert_eq!(guess_content_type("/r/x.WAV"), "audio/wav");
        assert_eq!(guess_content_type("/r/x"), "audio/mpeg");
        assert_eq!(guess_content_type("/r.d/x"), "audio/mpeg");
        assert_eq!(guess_content_type("/r/x.ogg"), "audio/ogg");
    }
}
