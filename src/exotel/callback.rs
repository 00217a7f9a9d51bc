//! Exotel's StatusCallback in every shape it arrives in: JSON (`StatusCallbackContentType=
//! application/json`), `multipart/form-data` (Exotel's default) and URL-encoded forms, the form
//! kinds with bracketed `Legs[0][Status]` keys. Field names are matched case-insensitively,
//! numbers may be strings, `"null"` means absent, unknown fields are ignored and kept in the raw
//! payload.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// The most legs a callback may carry (Exotel sends two for click-to-call).
const MAX_LEGS: usize = 16;

/// Statuses Exotel reports for a call.
const KNOWN_STATUSES: &[&str] = &[
    "queued",
    "ringing",
    "in-progress",
    "completed",
    "failed",
    "busy",
    "no-answer",
    "canceled",
];

/// A parsed StatusCallback.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusCallback {
    /// Exotel's CallSid.
    pub call_sid: String,
    /// Lower-cased status (`completed`, `no-answer` …).
    pub status: String,
    /// `terminal` or `answered`, when StatusCallbackEvents was set.
    pub event_type: Option<String>,
    /// Offset-less Exotel times, as sent.
    pub start_time: Option<String>,
    /// End time as sent.
    pub end_time: Option<String>,
    /// Last update time as sent.
    pub date_updated: Option<String>,
    /// Caller number as sent.
    pub from: Option<String>,
    /// Callee number as sent.
    pub to: Option<String>,
    /// `outbound-api`, `inbound` …
    pub direction: Option<String>,
    /// Our CustomField echoed back.
    pub custom_field: Option<String>,
    /// Exotel's (private) recording URL.
    pub recording_url: Option<String>,
    /// Seconds the parties were bridged.
    pub conversation_duration: Option<i64>,
    /// The legs, in index order.
    pub legs: Vec<Leg>,
}

/// One leg of a callback.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Leg {
    /// 0 = the From leg (agent), 1 = the To leg (customer).
    pub index: usize,
    /// The leg's number, when sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub number: Option<String>,
    /// Leg status (`completed`, `busy`, `no-answer`, `failed`, `canceled`), when sent.
    pub status: Option<String>,
    /// Seconds on the call.
    pub on_call_duration: Option<i64>,
    /// Disconnect cause, when sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
}

/// Why a body is not a usable callback.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    /// The body is not valid for its content type.
    #[error("body is not valid {0}")]
    Syntax(&'static str),
    /// A required field is missing or empty.
    #[error("{0} is missing")]
    Missing(&'static str),
    /// A field has a value we cannot accept.
    #[error("{field} is invalid: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The content type is not one Exotel uses.
    #[error("unsupported content type {0:?}")]
    ContentType(String),
}

/// Parse a body by its content type into the callback and the raw payload (as JSON, for the
/// call's audit trail). `query` pairs are merged under the body's (some receivers see fields
/// there).
///
/// # Errors
/// [`ParseError`] with a message fit for a 400.
pub async fn parse_body(
    content_type: &str,
    body: bytes::Bytes,
    query: &[(String, String)],
) -> Result<(StatusCallback, Value), ParseError> {
    let mime = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let raw = match mime.as_str() {
        "application/json" | "text/json" => {
            let mut v: Value =
                serde_json::from_slice(&body).map_err(|_| ParseError::Syntax("JSON"))?;
            let Value::Object(map) = &mut v else {
                return Err(ParseError::Syntax("JSON object"));
            };
            for (k, val) in query {
                map.entry(k.clone())
                    .or_insert_with(|| Value::String(val.clone()));
            }
            v
        }
        "application/x-www-form-urlencoded" => {
            let mut pairs: Vec<(String, String)> = serde_urlencoded_pairs(&body)?;
            pairs.extend(query.iter().cloned());
            pairs_to_json(&pairs)?
        }
        "multipart/form-data" => {
            let boundary = multer::parse_boundary(content_type)
                .map_err(|_| ParseError::Syntax("multipart (no boundary)"))?;
            let stream = futures_util::stream::once(async move { Ok::<_, std::io::Error>(body) });
            let mut mp = multer::Multipart::new(stream, boundary);
            let mut pairs = Vec::new();
            while let Some(field) = mp
                .next_field()
                .await
                .map_err(|_| ParseError::Syntax("multipart"))?
            {
                let name = field.name().unwrap_or_default().to_owned();
                let text = field
                    .text()
                    .await
                    .map_err(|_| ParseError::Syntax("multipart"))?;
                pairs.push((name, text));
            }
            pairs.extend(query.iter().cloned());
            pairs_to_json(&pairs)?
        }
        "" if body.is_empty() && !query.is_empty() => pairs_to_json(query)?,
        other => return Err(ParseError::ContentType(other.to_owned())),
    };
    let cb = from_json(&raw)?;
    Ok((cb, raw))
}

fn serde_urlencoded_pairs(body: &[u8]) -> Result<Vec<(String, String)>, ParseError> {
    if std::str::from_utf8(body).is_err() {
        return Err(ParseError::Syntax("form (not UTF-8)"));
    }
    Ok(url::form_urlencoded::parse(body).into_owned().collect())
}

/// Turn flat form pairs into the JSON shape of the JSON callback: `Legs[1][Status]=busy` becomes
/// `{"Legs":[{…},{"Status":"busy"}]}`. Later duplicates of a key do not override earlier ones.
///
/// # Errors
/// A leg index that is not a small number.
pub fn pairs_to_json(pairs: &[(String, String)]) -> Result<Value, ParseError> {
    let mut top = Map::new();
    let mut legs: BTreeMap<usize, Map<String, Value>> = BTreeMap::new();
    for (key, value) in pairs {
        if let Some((index, field)) = leg_key(key) {
            let index: usize = index.parse().map_err(|_| ParseError::Invalid {
                field: "Legs",
                reason: format!("bad leg index in {key:?}"),
            })?;
            if index >= MAX_LEGS {
                return Err(ParseError::Invalid {
                    field: "Legs",
                    reason: format!("leg index {index} is too large"),
                });
            }
            legs.entry(index)
                .or_default()
                .entry(field.to_owned())
                .or_insert_with(|| Value::String(value.clone()));
        } else {
            top.entry(key.clone())
                .or_insert_with(|| Value::String(value.clone()));
        }
    }
    if !legs.is_empty() {
        let max = legs.keys().max().copied().unwrap_or(0);
        let arr = (0..=max)
            .map(|i| Value::Object(legs.remove(&i).unwrap_or_default()))
            .collect();
        top.insert("Legs".into(), Value::Array(arr));
    }
    Ok(Value::Object(top))
}

/// `Legs[0][Status]` → (`0`, `Status`); also `Legs[0].Status`.
fn leg_key(key: &str) -> Option<(&str, &str)> {
    let rest = key
        .strip_prefix("Legs[")
        .or_else(|| key.strip_prefix("legs["))?;
    let (index, rest) = rest.split_once(']')?;
    let field = rest
        .strip_prefix('[')
        .and_then(|f| f.strip_suffix(']'))
        .or_else(|| rest.strip_prefix('.'))?;
    Some((index, field))
}

fn get<'a>(map: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    map.get(name).or_else(|| {
        map.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    })
}

/// A string field; `""` and `"null"` are absent. Numbers are rendered.
fn text(map: &Map<String, Value>, name: &str) -> Option<String> {
    match get(map, name)? {
        Value::String(s) => {
            let s = s.trim();
            (!s.is_empty() && !s.eq_ignore_ascii_case("null")).then(|| s.to_owned())
        }
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A whole number that may arrive as a string; junk is absent, negatives are refused.
fn number(map: &Map<String, Value>, name: &'static str) -> Result<Option<i64>, ParseError> {
    let n = match get(map, name) {
        Some(Value::Number(n)) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        Some(Value::String(s)) => {
            let s = s.trim();
            if s.is_empty() || s.eq_ignore_ascii_case("null") {
                None
            } else {
                Some(
                    s.parse::<i64>()
                        .or_else(|_| s.parse::<f64>().map(|f| f as i64))
                        .map_err(|_| ParseError::Invalid {
                            field: name,
                            reason: format!("{s:?} is not a number"),
                        })?,
                )
            }
        }
        _ => None,
    };
    match n {
        Some(v) if !(0..=10_000_000).contains(&v) => Err(ParseError::Invalid {
            field: name,
            reason: format!("{v} is out of range"),
        }),
        other => Ok(other),
    }
}

/// Read the callback from its JSON form (native JSON or built by [`pairs_to_json`]).
///
/// # Errors
/// Missing CallSid/Status, an unknown status, malformed legs.
pub fn from_json(raw: &Value) -> Result<StatusCallback, ParseError> {
    let Value::Object(map) = raw else {
        return Err(ParseError::Syntax("JSON object"));
    };
    let call_sid = text(map, "CallSid").ok_or(ParseError::Missing("CallSid"))?;
    if call_sid.len() > 64
        || !call_sid
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(ParseError::Invalid {
            field: "CallSid",
            reason: "must be up to 64 letters and digits".into(),
        });
    }
    let status = text(map, "Status")
        .or_else(|| text(map, "CallStatus"))
        .ok_or(ParseError::Missing("Status"))?
        .to_ascii_lowercase();
    let status = if status == "cancelled" {
        "canceled".to_owned()
    } else {
        status
    };
    if !KNOWN_STATUSES.contains(&status.as_str()) {
        return Err(ParseError::Invalid {
            field: "Status",
            reason: format!("{status:?} is not an Exotel call status"),
        });
    }
    let legs = match get(map, "Legs") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => {
            if items.len() > MAX_LEGS {
                return Err(ParseError::Invalid {
                    field: "Legs",
                    reason: "too many legs".into(),
                });
            }
            let mut legs = Vec::with_capacity(items.len());
            for (index, item) in items.iter().enumerate() {
                // Exotel's JSON may wrap each leg as {"Leg": {...}} (call-details shape).
                let item = match item {
                    Value::Object(m) if m.len() == 1 => match get(m, "Leg") {
                        Some(inner @ Value::Object(_)) => inner,
                        _ => item,
                    },
                    _ => item,
                };
                let Value::Object(leg) = item else {
                    return Err(ParseError::Invalid {
                        field: "Legs",
                        reason: format!("leg {index} is not an object"),
                    });
                };
                legs.push(Leg {
                    index,
                    number: text(leg, "Number"),
                    status: text(leg, "Status").map(|s| s.to_ascii_lowercase()),
                    on_call_duration: number(leg, "OnCallDuration")?,
                    cause: text(leg, "Cause").or_else(|| text(leg, "CauseCode")),
                });
            }
            legs
        }
        Some(_) => {
            return Err(ParseError::Invalid {
                field: "Legs",
                reason: "must be a list".into(),
            });
        }
    };
    Ok(StatusCallback {
        call_sid,
        status,
        event_type: text(map, "EventType").map(|s| s.to_ascii_lowercase()),
        start_time: text(map, "StartTime"),
        end_time: text(map, "EndTime"),
        date_updated: text(map, "DateUpdated"),
        from: text(map, "From"),
        to: text(map, "To"),
        direction: text(map, "Direction"),
        custom_field: text(map, "CustomField"),
        recording_url: text(map, "RecordingUrl"),
        conversation_duration: number(map, "ConversationDuration")?,
        legs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The terminal callback from Exotel's number-masking guide, verbatim.
    const GUIDE_JSON: &str = r#"{
      "CallSid": "492205107c5fb48f4ac25d1f77759339",
      "EventType": "terminal",
      "DateCreated": "2019-04-08 03:17:59",
      "DateUpdated": "2019-04-08 03:18:35",
      "Status": "no-answer",
      "To": "+91886799XXXX",
      "From": "+91941374XXXX",
      "PhoneNumberSid": "0113083XXXX",
      "StartTime": "2019-04-08 03:17:59",
      "EndTime": "2019-04-08 03:18:36",
      "Direction": "outbound-api",
      "RecordingUrl": "https://s3-ap-southeast-1.amazonaws.com/exotelrecordings/<your_sid>/xxdewfcwsdw.mp3",
      "ConversationDuration": 32,
      "Legs": [
        {"OnCallDuration": 41, "Status": "completed"},
        {"OnCallDuration": 32, "Status": "completed"}
      ]
    }"#;

    #[tokio::test]
    async fn the_guides_json_callback_parses() {
        let (cb, raw) = parse_body("application/json", GUIDE_JSON.into(), &[])
            .await
            .unwrap();
        assert_eq!(cb.call_sid, "492205107c5fb48f4ac25d1f77759339");
        assert_eq!(cb.status, "no-answer");
        assert_eq!(cb.conversation_duration, Some(32));
        assert_eq!(cb.legs.len(), 2);
        assert_eq!(cb.legs[0].on_call_duration, Some(41));
        assert_eq!(cb.legs[1].status.as_deref(), Some("completed"));
        assert_eq!(raw["PhoneNumberSid"], "0113083XXXX");
    }

    #[tokio::test]
    async fn form_callbacks_with_bracketed_legs_and_string_numbers() {
        let body = "CallSid=abc123&Status=completed&ConversationDuration=32&\
                    Legs%5B0%5D%5BStatus%5D=completed&Legs%5B0%5D%5BOnCallDuration%5D=41&\
                    Legs[1][Status]=completed&Legs[1][OnCallDuration]=32&Extra=kept";
        let (cb, raw) = parse_body("application/x-www-form-urlencoded", body.into(), &[])
            .await
            .unwrap();
        assert_eq!(cb.legs[0].on_call_duration, Some(41));
        assert_eq!(cb.legs[1].on_call_duration, Some(32));
        assert_eq!(cb.conversation_duration, Some(32));
        assert!(cb.recording_url.is_none());
        assert_eq!(raw["Extra"], "kept");
    }

    #[tokio::test]
    async fn multipart_callbacks_parse() {
        let b = "XBOUNDARY";
        let mut body = String::new();
        for (k, v) in [
            ("CallSid", "m1"),
            ("Status", "busy"),
            ("Legs[0][Status]", "completed"),
            ("Legs[1][Status]", "busy"),
        ] {
            body.push_str(&format!(
                "--{b}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n"
            ));
        }
        body.push_str(&format!("--{b}--\r\n"));
        let (cb, _) = parse_body(
            &format!("multipart/form-data; boundary={b}"),
            body.into(),
            &[],
        )
        .await
        .unwrap();
        assert_eq!(cb.status, "busy");
        assert_eq!(cb.legs[1].status.as_deref(), Some("busy"));
    }

    #[tokio::test]
    async fn bad_bodies_are_refused_with_reasons() {
        let cases: [(&str, &str); 6] = [
            ("application/json", "{not json"),
            ("application/json", "[1,2]"),
            ("application/json", r#"{"Status":"completed"}"#),
            ("application/json", r#"{"CallSid":"a","Status":"exploded"}"#),
            (
                "application/json",
                r#"{"CallSid":"a","Status":"completed","ConversationDuration":"ten"}"#,
            ),
            ("text/plain", "CallSid=a"),
        ];
        for (ct, body) in cases {
            assert!(
                parse_body(ct, body.to_owned().into(), &[]).await.is_err(),
                "{body}"
            );
        }
        let huge_leg = "CallSid=a&Status=completed&Legs[99999][Status]=x";
        assert!(
            parse_body("application/x-www-form-urlencoded", huge_leg.into(), &[])
                .await
                .is_err()
        );
    }

    #[test]
    fn null_strings_and_case_variants() {
        let raw = serde_json::json!({"callsid":"x1","status":"Completed","RecordingUrl":"null",
            "ConversationDuration":"0"});
        let cb = from_json(&raw).unwrap();
        assert_eq!(cb.status, "completed");
        assert!(cb.recording_url.is_none());
        assert_eq!(cb.conversation_duration, Some(0));
    }
}
