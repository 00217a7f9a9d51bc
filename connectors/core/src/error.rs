//! [`ConnectorError`]: every CRM failure classified by what the caller must do next, and the
//! helpers that read a failed HTTP response (status, rate-limit headers, the CRM's message).
//!
//! Rule: a connector never hands the host a raw status. It calls [`classify_response`] (or
//! refines it for its CRM: Salesforce's 403 `REQUEST_LIMIT_EXCEEDED`, Pipedrive's Cloudflare
//! 403, Zoho's errors inside a 200) and returns one of the four classes.

use std::time::Duration;

use chrono::{DateTime, Utc};
use http::HeaderMap;

/// The longest delay a rate-limit header may ask for; anything later is clamped (a reset
/// header that points at tomorrow's daily budget should not park a job for longer).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// What went wrong talking to a CRM, classified by what the caller must do next.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    /// The access token was refused: refresh it (single-flight) and retry once.
    #[error("the CRM refused the access token: {0}")]
    NeedsRefresh(String),
    /// The CRM asked us to slow down; retry no earlier than `retry_after`.
    #[error("rate limited by the CRM{}", .retry_after.map(|d| format!(" (retry after {}s)", d.as_secs())).unwrap_or_default())]
    RateLimited {
        /// When to try again, if the CRM said.
        retry_after: Option<Duration>,
    },
    /// A failure that may pass: 5xx, timeouts, connection resets. Retry with backoff.
    #[error("transient CRM failure: {0}")]
    Transient(String),
    /// A failure that retrying cannot fix (validation, permissions, missing record).
    #[error("permanent CRM failure: {0}")]
    Permanent(String),
    /// The connector does not offer this capability (e.g. recording upload on a CRM that only
    /// takes links). Never retried; the host should not have asked.
    #[error("not supported by this connector: {0}")]
    Unsupported(String),
}

impl ConnectorError {
    /// Classify an HTTP response status the usual way. Connectors refine this where their CRM
    /// says otherwise (Salesforce's daily limit is a 403, Zoho reports errors inside 200s).
    #[must_use]
    pub fn from_status(status: u16, retry_after: Option<Duration>, detail: String) -> Self {
        match status {
            401 => Self::NeedsRefresh(detail),
            429 => Self::RateLimited { retry_after },
            408 | 425 | 500..=599 => Self::Transient(detail),
            _ => Self::Permanent(format!("HTTP {status}: {detail}")),
        }
    }

    /// Classify a transport failure (no HTTP response at all: DNS, connect, TLS, timeout).
    /// These are always worth retrying with backoff.
    #[must_use]
    pub fn transport(detail: impl std::fmt::Display) -> Self {
        Self::Transient(format!("transport: {detail}"))
    }

    /// Whether the write-back engine may try the same request again (after a refresh or a
    /// delay). `Permanent` and `Unsupported` go to the dead-letter list instead.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::NeedsRefresh(_) | Self::RateLimited { .. } | Self::Transient(_)
        )
    }
}

/// Classify a failed (non-2xx) response with the default rules: 401 → refresh, 429 → rate
/// limited with the delay from the headers, 408/425/5xx → transient, other 4xx → permanent
/// carrying the CRM's own message.
#[must_use]
pub fn classify_response(
    status: u16,
    headers: &HeaderMap,
    body: &[u8],
    now: DateTime<Utc>,
) -> ConnectorError {
    ConnectorError::from_status(
        status,
        retry_after(headers, now),
        error_message(body).unwrap_or_else(|| body_excerpt(body)),
    )
}

/// When the CRM says we may try again, read from the usual headers in order of authority:
/// `Retry-After` (delta-seconds or HTTP-date), then `x-ratelimit-reset`, `ratelimit-reset`,
/// `x-rate-limit-reset`. Reset values are read as seconds to wait, or as a Unix time in
/// seconds/milliseconds when they are that large. The result is clamped to
/// [`MAX_RETRY_AFTER`]; a time in the past gives zero.
#[must_use]
pub fn retry_after(headers: &HeaderMap, now: DateTime<Utc>) -> Option<Duration> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
    };
    let found = if let Some(v) = header("retry-after") {
        parse_delay(v, now).or_else(|| {
            DateTime::parse_from_rfc2822(v)
                .ok()
                .map(|at| until(at.with_timezone(&Utc), now))
        })
    } else {
        ["x-ratelimit-reset", "ratelimit-reset", "x-rate-limit-reset"]
            .into_iter()
            .find_map(|name| header(name).and_then(|v| parse_delay(v, now)))
    }?;
    Some(found.min(MAX_RETRY_AFTER))
}

/// A number of seconds to wait, or a Unix timestamp (s or ms) to wait until.
fn parse_delay(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let n: f64 = value.parse().ok()?;
    if !n.is_finite() || n < 0.0 {
        return None;
    }
    // Anything above 10^12 is a millisecond timestamp, above 10^9 a second timestamp; a
    // genuine delta that large would be decades.
    let at = if n >= 1e12 {
        DateTime::from_timestamp_millis(n as i64)
    } else if n >= 1e9 {
        DateTime::from_timestamp(n as i64, 0)
    } else {
        return Some(Duration::from_secs_f64(n));
    }?;
    Some(until(at, now))
}

fn until(at: DateTime<Utc>, now: DateTime<Utc>) -> Duration {
    (at - now).to_std().unwrap_or(Duration::ZERO)
}

/// The CRM's human message from the common JSON error shapes: `error` (string or
/// `{message}`), `error_description`, `message`, `description`, or the first element of a
/// Salesforce-style array (`[{"message", "errorCode"}]`). `None` when the body is not JSON or
/// has none of these.
#[must_use]
pub fn error_message(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let v = match &v {
        serde_json::Value::Array(items) => items.first()?.clone(),
        _ => v,
    };
    let text = |key: &str| match v.get(key) {
        Some(serde_json::Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(serde_json::Value::Object(o)) => {
            o.get("message").and_then(|m| m.as_str()).map(str::to_owned)
        }
        _ => None,
    };
    let main = text("error_description")
        .or_else(|| text("message"))
        .or_else(|| text("error"))
        .or_else(|| text("description"))?;
    let code = text("errorCode")
        .or_else(|| text("code"))
        .filter(|c| *c != main);
    Some(match code {
        Some(code) => format!("{main} ({code})"),
        None => main,
    })
}

/// The start of a body that is not a JSON error (an HTML page, plain text), for the log.
#[must_use]
pub fn body_excerpt(body: &[u8]) -> String {
    const MAX: usize = 200;
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// Whether a response body is an HTML page (a CDN or WAF block page rather than the API).
#[must_use]
pub fn is_html(headers: &HeaderMap, body: &[u8]) -> bool {
    let by_type = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.to_ascii_lowercase().starts_with("text/html"));
    let start = String::from_utf8_lossy(&body[..body.len().min(64)]).to_ascii_lowercase();
    let start = start.trim_start();
    by_type || start.starts_with("<!doctype html") || start.starts_with("<html")
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_780_000_000, 0).unwrap()
    }

    #[test]
    fn statuses_map_to_what_the_caller_must_do() {
        assert!(matches!(
            ConnectorError::from_status(401, None, String::new()),
            ConnectorError::NeedsRefresh(_)
        ));
        assert!(matches!(
            ConnectorError::from_status(429, Some(Duration::from_secs(3)), String::new()),
            ConnectorError::RateLimited { retry_after: Some(d) } if d.as_secs() == 3
        ));
        assert!(matches!(
            ConnectorError::from_status(503, None, String::new()),
            ConnectorError::Transient(_)
        ));
        assert!(matches!(
            ConnectorError::from_status(422, None, String::new()),
            ConnectorError::Permanent(_)
        ));
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        assert_eq!(
            retry_after(&headers(&[("retry-after", "7")]), now()),
            Some(Duration::from_secs(7))
        );
        let at = (now() + chrono::Duration::seconds(90)).to_rfc2822();
        let at = at.replace("+0000", "GMT");
        assert_eq!(
            retry_after(&headers(&[("retry-after", &at)]), now()),
            Some(Duration::from_secs(90))
        );
    }

    #[test]
    fn reset_headers_are_deltas_or_timestamps() {
        assert_eq!(
            retry_after(&headers(&[("x-ratelimit-reset", "2")]), now()),
            Some(Duration::from_secs(2))
        );
        let epoch = (now().timestamp() + 30).to_string();
        assert_eq!(
            retry_after(&headers(&[("x-ratelimit-reset", &epoch)]), now()),
            Some(Duration::from_secs(30))
        );
        let epoch_ms = (now().timestamp_millis() + 4_000).to_string();
        assert_eq!(
            retry_after(&headers(&[("ratelimit-reset", &epoch_ms)]), now()),
            Some(Duration::from_secs(4))
        );
        let past = (now().timestamp() - 30).to_string();
        assert_eq!(
            retry_after(&headers(&[("x-rate-limit-reset", &past)]), now()),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn retry_after_wins_and_absurd_values_are_clamped_or_ignored() {
        assert_eq!(
            retry_after(
                &headers(&[("retry-after", "5"), ("x-ratelimit-reset", "60")]),
                now()
            ),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            retry_after(&headers(&[("retry-after", "900000")]), now()),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(retry_after(&headers(&[("retry-after", "-1")]), now()), None);
        assert_eq!(
            retry_after(&headers(&[("retry-after", "soon")]), now()),
            None
        );
        assert_eq!(retry_after(&HeaderMap::new(), now()), None);
    }

    #[test]
    fn messages_come_from_the_common_error_shapes() {
        assert_eq!(
            error_message(br#"{"success":false,"error":"Person not found","errorCode":404}"#)
                .as_deref(),
            Some("Person not found")
        );
        assert_eq!(
            error_message(
                br#"[{"message":"Session expired or invalid","errorCode":"INVALID_SESSION_ID"}]"#
            )
            .as_deref(),
            Some("Session expired or invalid (INVALID_SESSION_ID)")
        );
        assert_eq!(
            error_message(br#"{"error":"invalid_grant","error_description":"expired"}"#).as_deref(),
            Some("expired")
        );
        assert_eq!(
            error_message(br#"{"code":"INVALID_TOKEN","message":"invalid oauth token"}"#)
                .as_deref(),
            Some("invalid oauth token (INVALID_TOKEN)")
        );
        assert_eq!(error_message(b"<html>blocked</html>"), None);
    }

    #[test]
    fn classify_uses_headers_and_message() {
        let e = classify_response(429, &headers(&[("retry-after", "3")]), b"{}", now());
        assert!(
            matches!(e, ConnectorError::RateLimited { retry_after: Some(d) } if d.as_secs() == 3)
        );
        let e = classify_response(400, &HeaderMap::new(), br#"{"error":"bad field"}"#, now());
        assert!(
            matches!(&e, ConnectorError::Permanent(m) if m.contains("bad field") && m.contains("400"))
        );
        assert!(!e.is_retryable());
        let e = classify_response(502, &HeaderMap::new(), b"Bad Gateway", now());
        assert!(matches!(&e, ConnectorError::Transient(m) if m == "Bad Gateway"));
        assert!(e.is_retryable());
    }

    #[test]
    fn html_bodies_are_recognised() {
        assert!(is_html(&HeaderMap::new(), b"  <!DOCTYPE html><html>"));
        assert!(is_html(
            &headers(&[("content-type", "text/html; charset=UTF-8")]),
            b"x"
        ));
        assert!(!is_html(
            &headers(&[("content-type", "application/json")]),
            b"{}"
        ));
    }

    #[test]
    fn excerpts_are_bounded() {
        let long = "é".repeat(500);
        let e = body_excerpt(long.as_bytes());
        assert_eq!(e.chars().count(), 201);
    }
}
