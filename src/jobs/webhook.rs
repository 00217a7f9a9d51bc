//! The tenant webhook sink: the finished call as JSON, signed the Standard Webhooks way
//! (`webhook-id` stable across retries, `webhook-timestamp`, `webhook-signature: v1,<base64
//! HMAC-SHA256 of "{id}.{timestamp}.{body}">` keyed with the base64 part of the `whsec_` secret).
//!
//! The body's `data.recording_url` is callbridge's playable link (`/recordings/{token}`, see
//! [`crate::recordings`]), never Exotel's raw `RecordingUrl`, which has needed the account's
//! credentials since October 2024.
//!
//! Retry policy (Standard Webhooks / Svix practice): every non-2xx answer and every transport
//! failure is retried with backoff, except `410 Gone`, which means the receiver asks us to stop.

use std::time::Duration;

use base64::{Engine, engine::general_purpose::STANDARD};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{Claimed, Delivery};
use crate::AppState;

/// Sign `body` for `msg_id` at `timestamp` with a `whsec_…` secret.
///
/// # Errors
/// The secret is not `whsec_` + base64.
pub fn sign(secret: &str, msg_id: &str, timestamp: i64, body: &[u8]) -> Result<String, String> {
    let key = STANDARD
        .decode(secret.strip_prefix("whsec_").unwrap_or(secret))
        .map_err(|_| "webhook secret is not base64".to_owned())?;
    let mut mac =
        Hmac::<Sha256>::new_from_slice(&key).map_err(|_| "webhook secret is empty".to_owned())?;
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Ok(format!(
        "v1,{}",
        STANDARD.encode(mac.finalize().into_bytes())
    ))
}

/// Parse `Retry-After` (seconds or an HTTP date).
#[must_use]
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let secs = (when.timestamp() - chrono::Utc::now().timestamp()).max(0);
    Some(Duration::from_secs(u64::try_from(secs).unwrap_or(0)))
}

/// Deliver one finished call to the tenant's webhook.
pub async fn deliver(state: &AppState, job: &Claimed) -> Delivery {
    let permanent = |error: String| Delivery::Permanent {
        status: None,
        error,
    };
    let (t, _, record) = match super::finished_call(state, job).await {
        Ok(found) => found,
        Err(d) => return d,
    };
    let (Some(url), Some(sealed)) = (&t.webhook_url, &t.webhook_secret_sealed) else {
        return permanent("the tenant no longer has a webhook".into());
    };
    let secret = match state.sealer.open(sealed) {
        Ok(s) => s,
        Err(e) => return permanent(format!("cannot open the webhook secret: {e}")),
    };
    let now = chrono::Utc::now();
    let body = serde_json::json!({
        "type": "call.completed",
        "timestamp": now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "data": record,
    });
    let body = serde_json::to_vec(&body).unwrap_or_default();
    let ts = now.timestamp();
    let signature = match sign(&secret, &job.message_id, ts, &body) {
        Ok(s) => s,
        Err(e) => return permanent(e),
    };
    let resp = state
        .http
        .post(url)
        .timeout(Duration::from_secs(state.config.webhook_timeout_secs))
        .header("content-type", "application/json")
        .header("webhook-id", &job.message_id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", signature)
        .body(body)
        .send()
        .await;
    match resp {
        Ok(r) if r.status().is_success() => Delivery::Done {
            status: Some(r.status().as_u16()),
        },
        Ok(r) if r.status() == reqwest::StatusCode::GONE => Delivery::Permanent {
            status: Some(410),
            error: "receiver answered 410 Gone".into(),
        },
        Ok(r) => {
            let status = r.status().as_u16();
            let ra = retry_after(r.headers());
            let text: String = r
                .text()
                .await
                .unwrap_or_default()
                .chars()
                .take(200)
                .collect();
            Delivery::Retry {
                status: Some(status),
                error: format!("receiver answered HTTP {status}: {text}"),
                retry_after: ra,
            }
        }
        Err(e) => Delivery::Retry {
            status: None,
            error: if e.is_timeout() {
                "receiver timed out".into()
            } else {
                format!("could not reach the receiver: {}", e.without_url())
            },
            retry_after: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example from the Standard Webhooks specification.
    #[test]
    fn signature_matches_the_standard_webhooks_example() {
        let sig = sign(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_330,
            br#"{"test": 2432232314}"#,
        )
        .unwrap();
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn retry_after_seconds() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("retry-after", "7".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
    }
}
