//! Pipedrive's REST answers: failure classification (docs §1.1, §1.5) and the pure parts of
//! lookups (number forms for person search, response readers).
//!
//! Classification: 401 → refresh; 429 → rate limited for `Retry-After` or `x-ratelimit-reset`
//! (else the 2-second burst window); 403 with an HTML page → Cloudflare block after repeated
//! 429s: rate limited for a long delay, never retried in a tight loop; 408/5xx → transient;
//! any other 4xx → permanent, carrying Pipedrive's `error` (and `error_info`).

use std::time::Duration;

use callbridge_connector::{
    ConnectorError, ContactMatch, CrmRecordRef, CrmUser, error::body_excerpt, is_html, retry_after,
};
use chrono::{DateTime, Utc};
use http::HeaderMap;
use serde_json::Value;

/// How long to back off when rate-limit headers are silent or when Cloudflare blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// A 429 without a usable header (Pipedrive's burst window is 2 s).
    pub burst: Duration,
    /// A 403 HTML block page.
    pub block: Duration,
}

/// Classify a non-2xx Pipedrive API response.
#[must_use]
pub fn classify(
    status: u16,
    headers: &HeaderMap,
    body: &[u8],
    now: DateTime<Utc>,
    backoff: Backoff,
) -> ConnectorError {
    let message = pipedrive_message(body).unwrap_or_else(|| body_excerpt(body));
    match status {
        401 => ConnectorError::NeedsRefresh(message),
        429 => ConnectorError::RateLimited {
            retry_after: Some(retry_after(headers, now).unwrap_or(backoff.burst)),
        },
        403 if is_html(headers, body) => ConnectorError::RateLimited {
            retry_after: Some(
                retry_after(headers, now)
                    .unwrap_or_default()
                    .max(backoff.block),
            ),
        },
        408 | 500..=599 => ConnectorError::Transient(format!("HTTP {status}: {message}")),
        _ => ConnectorError::Permanent(format!("HTTP {status}: {message}")),
    }
}

/// Pipedrive's error text: `error`, then `error_info` (`{success:false, error, error_info}`),
/// falling back to the common shapes.
fn pipedrive_message(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let text = |k: &str| v.get(k).and_then(Value::as_str).filter(|s| !s.is_empty());
    match (text("error"), text("error_info")) {
        (Some(e), Some(info)) => Some(format!("{e} ({info})")),
        (Some(e), None) => Some(e.to_owned()),
        _ => callbridge_connector::error_message(body),
    }
}

/// The forms a number may be stored in, searched in this order: E.164, the national
/// significant number, and the national form with the country's trunk prefix (`0` for India
/// and the UK; none is tried where the country has no prefix). Deduplicated. An input that
/// does not parse is searched as given.
#[must_use]
pub fn number_forms(e164: &str) -> Vec<String> {
    let e164 = e164.trim();
    let mut forms = vec![e164.to_owned()];
    if let Ok(number) = phonenumber::parse(None, e164) {
        let national = number.national();
        let nsn = format!(
            "{}{}",
            "0".repeat(usize::from(national.zeros())),
            national.value()
        );
        let prefix = number
            .metadata(&phonenumber::metadata::DATABASE)
            .and_then(|m| m.national_prefix().map(str::to_owned));
        forms.push(nsn.clone());
        if let Some(p) = prefix.filter(|p| !nsn.starts_with(p.as_str())) {
            forms.push(format!("{p}{nsn}"));
        }
    }
    let mut seen = std::collections::HashSet::new();
    forms.retain(|f| !f.is_empty() && seen.insert(f.clone()));
    forms
}

fn id_of(v: &Value) -> Option<String> {
    match v {
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

/// Persons from a `/api/v2/persons/search` answer (`data.items[].item{id,name}`), in the
/// order Pipedrive ranked them.
#[must_use]
pub fn persons_from_search(body: &Value) -> Vec<ContactMatch> {
    body.pointer("/data/items")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|entry| {
            let item = entry.get("item")?;
            Some(ContactMatch {
                record: CrmRecordRef {
                    object_type: "person".into(),
                    id: id_of(item.get("id")?)?,
                },
                name: item.get("name").and_then(Value::as_str).map(str::to_owned),
            })
        })
        .collect()
}

/// Active users from `/api/v1/users` (`data[]{id,name,email,phone,active_flag}`);
/// deactivated users cannot place calls and are left out.
#[must_use]
pub fn users_from_list(body: &Value) -> Vec<CrmUser> {
    let text = |u: &Value, k: &str| {
        u.get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    body.get("data")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|u| u.get("active_flag").and_then(Value::as_bool) != Some(false))
        .filter_map(|u| {
            Some(CrmUser {
                id: id_of(u.get("id")?)?,
                name: text(u, "name"),
                email: text(u, "email"),
                phone: text(u, "phone"),
            })
        })
        .collect()
}

/// The new log's id from a `POST /callLogs` answer (`data.id`, a string or a number).
#[must_use]
pub fn call_log_id(body: &Value) -> Option<String> {
    body.pointer("/data/id").and_then(id_of)
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;
    use serde_json::json;

    use super::*;

    #[test]
    fn indian_numbers_are_searched_in_three_forms() {
        assert_eq!(
            number_forms("+919876543210"),
            ["+919876543210", "9876543210", "09876543210"]
        );
    }

    #[test]
    fn us_numbers_use_their_own_trunk_prefix_and_garbage_is_searched_as_is() {
        assert_eq!(
            number_forms("+14155552671"),
            ["+14155552671", "4155552671", "14155552671"]
        );
        assert_eq!(number_forms("12"), ["12"]);
    }

    #[test]
    fn italian_leading_zeros_are_kept() {
        let forms = number_forms("+390212345678");
        assert_eq!(forms[1], "0212345678");
        assert_eq!(forms.len(), 2, "{forms:?}");
    }

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_780_000_000, 0).unwrap()
    }

    const B: Backoff = Backoff {
        burst: Duration::from_secs(2),
        block: Duration::from_secs(900),
    };

    #[test]
    fn a_silent_429_waits_for_the_burst_window() {
        assert!(matches!(
            classify(429, &HeaderMap::new(), b"", now(), B),
            ConnectorError::RateLimited { retry_after: Some(d) } if d == Duration::from_secs(2)
        ));
    }

    #[test]
    fn a_json_403_is_permanent_but_an_html_403_is_a_block() {
        let e = classify(
            403,
            &HeaderMap::new(),
            br#"{"success":false,"error":"Scope and URL mismatch","errorCode":403}"#,
            now(),
            B,
        );
        assert!(matches!(e, ConnectorError::Permanent(m) if m.contains("Scope and URL mismatch")));
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("text/html"));
        h.insert("retry-after", HeaderValue::from_static("5"));
        assert!(matches!(
            classify(403, &h, b"<html>Attention Required! | Cloudflare</html>", now(), B),
            ConnectorError::RateLimited { retry_after: Some(d) } if d == Duration::from_secs(900)
        ));
    }

    #[test]
    fn error_info_is_kept_with_the_message() {
        let e = classify(
            400,
            &HeaderMap::new(),
            br#"{"success":false,"error":"Validation failed","error_info":"outcome is invalid","data":null}"#,
            now(),
            B,
        );
        assert!(
            matches!(e, ConnectorError::Permanent(m) if m == "HTTP 400: Validation failed (outcome is invalid)")
        );
    }

    #[test]
    fn readers_take_ids_as_numbers_or_strings() {
        assert_eq!(
            call_log_id(&json!({"data": {"id": "abc"}})).as_deref(),
            Some("abc")
        );
        assert_eq!(
            call_log_id(&json!({"data": {"id": 42}})).as_deref(),
            Some("42")
        );
        assert_eq!(call_log_id(&json!({"data": null})), None);
        let users = users_from_list(&json!({"data": [
            {"id": 1, "name": "A", "email": "a@x", "phone": "", "active_flag": true},
            {"id": 2, "name": "B", "active_flag": false},
        ]}));
        assert_eq!(users.len(), 1);
        assert_eq!(users[0].phone, None);
    }
}
