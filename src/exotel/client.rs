//! Exotel's v1 voice API: `Calls/connect` (click-to-call) and `Calls/{sid}` (call details, for
//! reconciling lost callbacks). Form-encoded requests, Basic auth with API key and token, JSON
//! responses via the `.json` suffix. A connect is never retried: it may have gone through.

use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use super::callback::{Leg, StatusCallback};

/// One Exotel account's credentials and cluster.
#[derive(Clone)]
pub struct ExotelAccount {
    /// `https://api.exotel.com`, `https://api.in.exotel.com`, or a test fake.
    pub api_base: String,
    /// Account SID.
    pub sid: String,
    /// API key (Basic auth user).
    pub api_key: String,
    /// API token (Basic auth password).
    pub api_token: SecretString,
}

impl std::fmt::Debug for ExotelAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExotelAccount")
            .field("api_base", &self.api_base)
            .field("sid", &self.sid)
            .finish_non_exhaustive()
    }
}

/// What `Calls/connect` needs.
#[derive(Debug, Clone)]
pub struct ConnectParams {
    /// Rung first (the agent).
    pub from: String,
    /// Rung when From answers (the customer).
    pub to: String,
    /// The virtual number both see.
    pub caller_id: String,
    /// Record the call.
    pub record: bool,
    /// Our correlation string (our call id).
    pub custom_field: String,
    /// Where Exotel posts the terminal callback.
    pub status_callback: String,
    /// Max call seconds.
    pub time_limit: Option<i32>,
    /// Ring seconds.
    pub time_out: Option<i32>,
    /// Audio played to From while To rings.
    pub wait_url: Option<String>,
}

/// A call Exotel accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectedCall {
    /// `Call.Sid`.
    pub sid: String,
    /// `Call.Status` (`in-progress`, `queued`).
    pub status: String,
}

/// Why an Exotel request failed.
#[derive(Debug, thiserror::Error)]
pub enum ExotelError {
    /// Exotel answered with a non-2xx status.
    #[error("Exotel refused the request (HTTP {status}): {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// `RestException.Message`, or the body.
        message: String,
    },
    /// No answer within the timeout; the request may or may not have taken effect.
    #[error("Exotel did not answer within {0:?}")]
    Timeout(Duration),
    /// Could not reach Exotel.
    #[error("could not reach Exotel: {0}")]
    Transport(String),
    /// A 2xx whose body we could not read.
    #[error("unexpected Exotel response: {0}")]
    BadResponse(String),
}

/// Longest a recording body may take to stream (a call lasts at most 4 h, and a browser that
/// plays while it downloads reads at playback speed).
pub const RECORDING_TRANSFER_LIMIT: Duration = Duration::from_secs(4 * 3600 + 600);

/// One request for a recording file.
#[derive(Debug, Clone)]
pub struct RecordingRequest<'a> {
    /// `GET` or `HEAD`.
    pub method: reqwest::Method,
    /// The (allow-listed) URL.
    pub url: &'a str,
    /// Credentials to send; `None` for a pre-signed URL on another origin.
    pub account: Option<&'a ExotelAccount>,
    /// The client's `Range`, forwarded.
    pub range: Option<&'a str>,
    /// The client's `If-Range`, forwarded.
    pub if_range: Option<&'a str>,
}

/// The Exotel client; cheap to clone (one shared connection pool).
#[derive(Clone, Debug)]
pub struct ExotelClient {
    http: reqwest::Client,
    timeout: Duration,
    metrics: Option<crate::metrics::Metrics>,
}

impl ExotelClient {
    /// A client over the shared HTTP client.
    #[must_use]
    pub fn new(
        http: reqwest::Client,
        timeout: Duration,
        metrics: Option<crate::metrics::Metrics>,
    ) -> Self {
        Self {
            http,
            timeout,
            metrics,
        }
    }

    fn url(account: &ExotelAccount, path: &str) -> String {
        format!(
            "{}/v1/Accounts/{}/{}",
            account.api_base.trim_end_matches('/'),
            account.sid,
            path
        )
    }

    /// `POST Calls/connect.json`.
    ///
    /// # Errors
    /// [`ExotelError`]; on `Timeout` the call may have been placed.
    pub async fn connect(
        &self,
        account: &ExotelAccount,
        p: &ConnectParams,
    ) -> Result<ConnectedCall, ExotelError> {
        let mut form: Vec<(&str, String)> = vec![
            ("From", p.from.clone()),
            ("To", p.to.clone()),
            ("CallerId", p.caller_id.clone()),
            ("CallType", "trans".into()),
            ("Record", p.record.to_string()),
            ("CustomField", p.custom_field.clone()),
            ("StatusCallback", p.status_callback.clone()),
            ("StatusCallbackEvents[0]", "terminal".into()),
            ("StatusCallbackContentType", "application/json".into()),
        ];
        if let Some(t) = p.time_limit {
            form.push(("TimeLimit", t.to_string()));
        }
        if let Some(t) = p.time_out {
            form.push(("TimeOut", t.to_string()));
        }
        if let Some(w) = &p.wait_url {
            form.push(("WaitUrl", w.clone()));
        }
        let req = self
            .http
            .post(Self::url(account, "Calls/connect.json"))
            .basic_auth(&account.api_key, Some(account.api_token.expose_secret()))
            .form(&form);
        let body = self.send(req, "connect").await?;
        let call = body.get("Call").ok_or_else(|| {
            ExotelError::BadResponse("no Call object in the connect response".into())
        })?;
        let sid = call
            .get("Sid")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                ExotelError::BadResponse("no Call.Sid in the connect response".into())
            })?;
        Ok(ConnectedCall {
            sid: sid.to_owned(),
            status: call
                .get("Status")
                .and_then(Value::as_str)
                .unwrap_or("queued")
                .to_ascii_lowercase(),
        })
    }

    /// `GET Calls/{sid}.json?details=true`, read into the same shape as a StatusCallback so the
    /// reconciler finalises calls through the same path.
    ///
    /// # Errors
    /// [`ExotelError`].
    pub async fn call_details(
        &self,
        account: &ExotelAccount,
        call_sid: &str,
    ) -> Result<StatusCallback, ExotelError> {
        let req = self
            .http
            .get(Self::url(account, &format!("Calls/{call_sid}.json")))
            .query(&[("details", "true")])
            .basic_auth(&account.api_key, Some(account.api_token.expose_secret()));
        let body = self.send(req, "call_details").await?;
        details_to_callback(&body)
            .ok_or_else(|| ExotelError::BadResponse("call details without Call.Sid/Status".into()))
    }

    /// `GET Calls.json?PageSize=1` (bulk call details): a cheap, read-only request that
    /// proves the account's SID, key, token and cluster are right. Used by the admin console's
    /// "Test connection".
    ///
    /// # Errors
    /// [`ExotelError`]: `Refused` carries Exotel's `RestException.Message` (e.g. a 401).
    pub async fn check_account(&self, account: &ExotelAccount) -> Result<(), ExotelError> {
        let req = self
            .http
            .get(Self::url(account, "Calls.json"))
            .query(&[("PageSize", "1")])
            .basic_auth(&account.api_key, Some(account.api_token.expose_secret()));
        self.send(req, "check_account").await.map(|_| ())
    }

    /// `GET` a recording on Exotel with the account's credentials, forwarding a `Range`.
    ///
    /// # Errors
    /// As [`ExotelClient::fetch_recording`].
    pub async fn get_authenticated(
        &self,
        account: &ExotelAccount,
        url: &str,
        range: Option<&str>,
    ) -> Result<reqwest::Response, ExotelError> {
        self.fetch_recording(&RecordingRequest {
            method: reqwest::Method::GET,
            url,
            account: Some(account),
            range,
            if_range: None,
        })
        .await
    }

    /// Send one recording request (no redirect is followed: the caller checks each hop against
    /// the allow-list). The response headers must arrive within the Exotel timeout; the body
    /// may then take up to [`RECORDING_TRANSFER_LIMIT`] to stream.
    ///
    /// # Errors
    /// `Timeout` when no response headers came in time, `Transport` when Exotel could not be
    /// reached. Any HTTP status is returned as a response, for the caller to map.
    pub async fn fetch_recording(
        &self,
        r: &RecordingRequest<'_>,
    ) -> Result<reqwest::Response, ExotelError> {
        let mut req = self
            .http
            .request(r.method.clone(), r.url)
            .timeout(RECORDING_TRANSFER_LIMIT);
        if let Some(account) = r.account {
            req = req.basic_auth(&account.api_key, Some(account.api_token.expose_secret()));
        }
        if let Some(range) = r.range {
            req = req.header(reqwest::header::RANGE, range);
        }
        if let Some(if_range) = r.if_range {
            req = req.header(reqwest::header::IF_RANGE, if_range);
        }
        let started = Instant::now();
        let result = tokio::time::timeout(self.timeout, req.send()).await;
        if let Some(m) = &self.metrics {
            m.exotel_latency
                .with_label_values(&["recording"])
                .observe(started.elapsed().as_secs_f64());
        }
        match result {
            Err(_) => Err(ExotelError::Timeout(self.timeout)),
            Ok(Err(e)) if e.is_timeout() => Err(ExotelError::Timeout(self.timeout)),
            Ok(Err(e)) => Err(ExotelError::Transport(without_url(&e))),
            Ok(Ok(resp)) => Ok(resp),
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder, op: &str) -> Result<Value, ExotelError> {
        let started = Instant::now();
        let result = req.timeout(self.timeout).send().await;
        if let Some(m) = &self.metrics {
            m.exotel_latency
                .with_label_values(&[op])
                .observe(started.elapsed().as_secs_f64());
        }
        let resp = result.map_err(|e| {
            if e.is_timeout() {
                ExotelError::Timeout(self.timeout)
            } else {
                ExotelError::Transport(without_url(&e))
            }
        })?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| {
            if e.is_timeout() {
                ExotelError::Timeout(self.timeout)
            } else {
                ExotelError::Transport(without_url(&e))
            }
        })?;
        if !status.is_success() {
            return Err(ExotelError::Refused {
                status: status.as_u16(),
                message: rest_exception_message(&text),
            });
        }
        serde_json::from_str(&text).map_err(|_| ExotelError::BadResponse(truncate(&text, 200)))
    }
}

/// reqwest errors print the URL, which carries the account sid; keep the message only.
fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(url) = e.url() {
        s = s.replace(url.as_str(), "<exotel>");
    }
    s
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// `RestException.Message` from a JSON or XML error body, else the body's start.
#[must_use]
pub fn rest_exception_message(body: &str) -> String {
    if let Ok(v) = serde_json::from_str::<Value>(body)
        && let Some(m) = v.pointer("/RestException/Message").and_then(Value::as_str)
    {
        return m.to_owned();
    }
    if let (Some(a), Some(b)) = (body.find("<Message>"), body.find("</Message>"))
        && a + 9 <= b
    {
        return body[a + 9..b].to_owned();
    }
    let t = truncate(body.trim(), 200);
    if t.is_empty() { "no message".into() } else { t }
}

fn details_to_callback(body: &Value) -> Option<StatusCallback> {
    let call = body.get("Call")?;
    let s = |v: &Value, k: &str| {
        v.get(k)
            .and_then(|x| match x {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            })
            .filter(|s| !s.is_empty() && s != "null")
    };
    let n = |v: &Value, k: &str| {
        v.get(k).and_then(|x| match x {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => s.parse().ok(),
            _ => None,
        })
    };
    let details = call.get("Details").cloned().unwrap_or(Value::Null);
    let mut legs = Vec::new();
    let durations: Vec<Option<i64>> = details
        .get("Legs")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|l| n(l.get("Leg").unwrap_or(l), "OnCallDuration"))
                .collect()
        })
        .unwrap_or_default();
    for (index, key) in ["Leg1Status", "Leg2Status"].iter().enumerate() {
        let status = s(&details, key);
        let dur = durations.get(index).copied().flatten();
        if status.is_some() || dur.is_some() {
            legs.push(Leg {
                index,
                number: None,
                status: status.map(|x| x.to_ascii_lowercase()),
                on_call_duration: dur,
                cause: None,
            });
        }
    }
    Some(StatusCallback {
        call_sid: s(call, "Sid")?,
        status: s(call, "Status")?.to_ascii_lowercase(),
        event_type: Some("terminal".into()),
        start_time: s(call, "StartTime"),
        end_time: s(call, "EndTime"),
        date_updated: s(call, "DateUpdated"),
        from: s(call, "From"),
        to: s(call, "To"),
        direction: s(call, "Direction"),
        custom_field: None,
        recording_url: s(call, "RecordingUrl"),
        conversation_duration: n(&details, "ConversationDuration"),
        legs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rest_exception_messages_from_json_and_xml() {
        assert_eq!(
            rest_exception_message(
                r#"{"RestException":{"Status":400,"Message":"To is not a valid number"}}"#
            ),
            "To is not a valid number"
        );
        assert_eq!(
            rest_exception_message(
                "<TwilioResponse><RestException><Status>403</Status><Message>Account inactive</Message></RestException></TwilioResponse>"
            ),
            "Account inactive"
        );
        assert_eq!(rest_exception_message(""), "no message");
    }

    #[test]
    fn call_details_read_like_a_callback() {
        let body = serde_json::json!({"Call":{"Sid":"abc","Status":"completed","StartTime":"2026-01-01 10:00:00",
            "EndTime":"2026-01-01 10:01:00","RecordingUrl":"https://r/x.mp3",
            "Details":{"ConversationDuration":30,"Leg1Status":"completed","Leg2Status":"completed",
            "Legs":[{"Leg":{"Id":1,"OnCallDuration":40}},{"Leg":{"Id":2,"OnCallDuration":30}}]}}});
        let cb = details_to_callback(&body).unwrap();
        assert_eq!(cb.status, "completed");
        assert_eq!(cb.conversation_duration, Some(30));
        assert_eq!(cb.legs.len(), 2);
        assert_eq!(cb.legs[0].on_call_duration, Some(40));
    }
}
