//! [`CallRecord`] → the body of `POST /api/v1/callLogs` (docs §1.3).
//!
//! Pipedrive call logs cannot be updated, so the body is built once, from the final record.
//!
//! Outcome mapping (Pipedrive's enum: `connected`, `no_answer`, `left_message`,
//! `left_voicemail`, `wrong_number`, `busy`):
//!
//! | [`Outcome`] | `outcome` | why |
//! |---|---|---|
//! | `Connected` | `connected` | |
//! | `NoAnswer` | `no_answer` | |
//! | `Busy` | `busy` | |
//! | `AgentNoAnswer` | `no_answer` | the agent's phone was not answered, so nobody talked; the note says which side |
//! | `Canceled` | `no_answer` | hung up before an answer: nobody talked |
//! | `Failed` | `no_answer` | Exotel's `failed` mixes invalid numbers with network and DND blocks, so `wrong_number` would often be false; the note carries the leg causes |
//!
//! Numbers: an outbound call is logged from the agent's number to the customer's, an inbound
//! one from the customer's to the agent's; the virtual number both saw goes into the note.
//! Record: `person` → `person_id`, `deal` → `deal_id`, `lead` → `lead_id` (a UUID string),
//! `organization`/`org` → `org_id`; a [`CallRecord`] names one record, so `deal_id` and
//! `lead_id` are never both sent.

use callbridge_connector::{
    CallRecord, ConnectorError, CrmRecordRef, Direction, LegRecord, Outcome, Party,
};
use chrono::{DateTime, Duration, Utc};
use html_escape::{encode_double_quoted_attribute, encode_text};
use serde_json::{Map, Value, json};

/// Pipedrive's time format for `start_time`/`end_time` (always UTC).
pub const TIME_FORMAT: &str = "%Y-%m-%d %H:%M:%S";

/// Pipedrive's `outcome` value for one of ours (see the module table).
#[must_use]
pub fn outcome_value(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Connected => "connected",
        Outcome::Busy => "busy",
        Outcome::NoAnswer | Outcome::AgentNoAnswer | Outcome::Canceled | Outcome::Failed => {
            "no_answer"
        }
    }
}

/// The JSON body for `POST /api/v1/callLogs`.
///
/// # Errors
/// [`ConnectorError::Permanent`] when the record cannot be logged as it is: no start or end
/// time, a non-numeric Pipedrive id, or a record type Pipedrive call logs cannot link.
pub fn call_log_body(call: &CallRecord) -> Result<Value, ConnectorError> {
    let (start, end) = times(call)?;
    let (from, to) = match call.direction {
        Direction::Outbound => (&call.agent_number, &call.customer_number),
        Direction::Inbound => (&call.customer_number, &call.agent_number),
    };
    let mut body = Map::new();
    body.insert("outcome".into(), json!(outcome_value(call.outcome)));
    body.insert("to_phone_number".into(), json!(to));
    if !from.is_empty() {
        body.insert("from_phone_number".into(), json!(from));
    }
    body.insert(
        "start_time".into(),
        json!(start.format(TIME_FORMAT).to_string()),
    );
    body.insert(
        "end_time".into(),
        json!(end.format(TIME_FORMAT).to_string()),
    );
    body.insert(
        "duration".into(),
        json!(call.conversation_duration.max(0).to_string()),
    );
    if let Some(user) = &call.crm_user_id {
        body.insert("user_id".into(), json!(numeric_id("user", user)?));
    }
    if let Some(record) = &call.crm_record {
        let (field, value) = record_field(record)?;
        body.insert(field.into(), value);
    }
    // The clicked deal's person and organization too, where they fit: one value per field,
    // and never a lead beside a deal (Pipedrive takes one of them).
    for related in &call.related_records {
        let Ok((field, value)) = record_field(related) else {
            continue;
        };
        let clash = match field {
            "deal_id" => body.contains_key("lead_id"),
            "lead_id" => body.contains_key("deal_id"),
            _ => false,
        };
        if !clash && !body.contains_key(field) {
            body.insert(field.into(), value);
        }
    }
    body.insert("subject".into(), json!(subject(call)));
    body.insert("note".into(), json!(note(call)));
    Ok(Value::Object(body))
}

/// The call-log field that links `record`.
fn record_field(record: &CrmRecordRef) -> Result<(&'static str, Value), ConnectorError> {
    Ok(match record.object_type.to_ascii_lowercase().as_str() {
        "person" => ("person_id", json!(numeric_id("person", &record.id)?)),
        "deal" => ("deal_id", json!(numeric_id("deal", &record.id)?)),
        "organization" | "org" => ("org_id", json!(numeric_id("organization", &record.id)?)),
        "lead" if !record.id.trim().is_empty() => ("lead_id", json!(record.id.trim())),
        other => {
            return Err(ConnectorError::Permanent(format!(
                "a Pipedrive call log cannot link a {other} record ({:?})",
                record.id
            )));
        }
    })
}

fn numeric_id(what: &str, id: &str) -> Result<i64, ConnectorError> {
    id.trim().parse::<i64>().map_err(|_| {
        ConnectorError::Permanent(format!("Pipedrive {what} id {id:?} is not a number"))
    })
}

/// Start and end in UTC; one may be derived from the other and the talk time.
fn times(call: &CallRecord) -> Result<(DateTime<Utc>, DateTime<Utc>), ConnectorError> {
    let talk = Duration::seconds(call.conversation_duration.max(0));
    match (call.started_at, call.ended_at) {
        (Some(s), Some(e)) => Ok((s, e.max(s))),
        (Some(s), None) => Ok((s, s + talk)),
        (None, Some(e)) => Ok((e - talk, e)),
        (None, None) => Err(ConnectorError::Permanent(
            "the call has neither a start nor an end time; Pipedrive requires both".into(),
        )),
    }
}

fn subject(call: &CallRecord) -> String {
    match call.direction {
        Direction::Outbound => format!("Outbound call to {}", call.customer_number),
        Direction::Inbound => format!("Inbound call from {}", call.customer_number),
    }
}

fn outcome_text(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Connected => "connected",
        Outcome::AgentNoAnswer => "the agent did not answer, so the customer was not dialled",
        Outcome::NoAnswer => "the customer did not answer",
        Outcome::Busy => "busy",
        Outcome::Failed => "the call failed",
        Outcome::Canceled => "hung up before an answer",
    }
}

fn leg_line(leg: &LegRecord) -> String {
    let who = match leg.party {
        Party::Agent => "Agent",
        Party::Customer => "Customer",
    };
    let mut line = who.to_owned();
    if let Some(n) = &leg.number {
        line.push(' ');
        line.push_str(n);
    }
    line.push_str(": ");
    line.push_str(leg.status.as_deref().unwrap_or("unknown"));
    if let Some(secs) = leg.on_call_duration {
        line.push_str(&format!(", {secs} s"));
    }
    if let Some(cause) = leg.cause.as_deref().filter(|c| !c.is_empty()) {
        line.push_str(&format!(" ({cause})"));
    }
    format!("<li>{}</li>", encode_text(&line))
}

/// The HTML note: outcome, legs, talk time, caller id, recording link, CallSid. Every value
/// is HTML-escaped; the recording link is only written for an `http(s)` URL.
#[must_use]
pub fn note(call: &CallRecord) -> String {
    let mut html = format!(
        "<p>Exotel call: {}</p>",
        encode_text(outcome_text(call.outcome))
    );
    if !call.legs.is_empty() {
        html.push_str("<ul>");
        for leg in &call.legs {
            html.push_str(&leg_line(leg));
        }
        html.push_str("</ul>");
    }
    html.push_str(&format!(
        "<p>Talk time: {} s</p>",
        call.conversation_duration.max(0)
    ));
    if let Some(v) = &call.virtual_number {
        html.push_str(&format!("<p>Caller ID: {}</p>", encode_text(v)));
    }
    if let Some(url) = call
        .recording_url
        .as_deref()
        .filter(|u| u.starts_with("https://") || u.starts_with("http://"))
    {
        html.push_str(&format!(
            "<p>Recording: <a href=\"{}\">listen</a></p>",
            encode_double_quoted_attribute(url)
        ));
    }
    if let Some(sid) = &call.exotel_call_sid {
        html.push_str(&format!("<p>Exotel CallSid: {}</p>", encode_text(sid)));
    }
    html
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn record() -> CallRecord {
        CallRecord {
            call_id: "call_1".into(),
            exotel_call_sid: Some("sid<1>".into()),
            direction: Direction::Outbound,
            outcome: Outcome::Connected,
            status: "completed".into(),
            agent_number: "+919800000001".into(),
            customer_number: "+919876543210".into(),
            virtual_number: Some("+918000000000".into()),
            started_at: DateTime::from_timestamp(1_777_886_102, 0),
            ended_at: DateTime::from_timestamp(1_777_886_260, 0),
            conversation_duration: 158,
            legs: vec![],
            recording_url: None,
            crm_record: None,
            related_records: vec![],
            crm_user_id: None,
            custom_field: None,
        }
    }

    #[test]
    fn a_clicked_deal_also_links_its_person_but_never_a_lead() {
        let rec = |t: &str, id: &str| CrmRecordRef {
            object_type: t.into(),
            id: id.into(),
        };
        let mut c = record();
        c.crm_record = Some(rec("deal", "9"));
        c.related_records = vec![
            rec("lead", "adf21080-0e10-11eb-879b-05d71fb426ec"),
            rec("person", "55"),
            rec("organization", "3"),
            rec("person", "56"),
            rec("ticket", "x"),
        ];
        let b = call_log_body(&c).unwrap();
        assert_eq!(b["deal_id"], 9);
        assert_eq!(b["person_id"], 55, "the first person wins");
        assert_eq!(b["org_id"], 3);
        assert!(b.get("lead_id").is_none(), "never a lead beside a deal");
    }

    #[test]
    fn outcomes_map_onto_pipedrives_enum() {
        assert_eq!(outcome_value(Outcome::Connected), "connected");
        assert_eq!(outcome_value(Outcome::Busy), "busy");
        for o in [
            Outcome::NoAnswer,
            Outcome::AgentNoAnswer,
            Outcome::Canceled,
            Outcome::Failed,
        ] {
            assert_eq!(outcome_value(o), "no_answer");
        }
    }

    #[test]
    fn inbound_calls_run_from_the_customer() {
        let mut c = record();
        c.direction = Direction::Inbound;
        let b = call_log_body(&c).unwrap();
        assert_eq!(b["from_phone_number"], "+919876543210");
        assert_eq!(b["to_phone_number"], "+919800000001");
        assert_eq!(b["subject"], "Inbound call from +919876543210");
    }

    #[test]
    fn a_missing_time_is_derived_and_both_missing_is_refused() {
        let mut c = record();
        c.ended_at = None;
        let b = call_log_body(&c).unwrap();
        assert_eq!(b["start_time"], "2026-05-04 09:15:02");
        assert_eq!(b["end_time"], "2026-05-04 09:17:40");
        c.started_at = None;
        assert!(matches!(
            call_log_body(&c),
            Err(ConnectorError::Permanent(_))
        ));
    }

    #[test]
    fn records_link_by_type_and_bad_ids_are_refused() {
        let mut c = record();
        c.crm_record = Some(CrmRecordRef {
            object_type: "organization".into(),
            id: "9".into(),
        });
        assert_eq!(call_log_body(&c).unwrap()["org_id"], 9);
        c.crm_record = Some(CrmRecordRef {
            object_type: "deal".into(),
            id: "abc".into(),
        });
        assert!(
            matches!(call_log_body(&c), Err(ConnectorError::Permanent(m)) if m.contains("deal"))
        );
        c.crm_record = Some(CrmRecordRef {
            object_type: "ticket".into(),
            id: "1".into(),
        });
        assert!(call_log_body(&c).is_err());
        c.crm_record = None;
        c.crm_user_id = Some("u1".into());
        assert!(call_log_body(&c).is_err());
    }

    #[test]
    fn the_note_escapes_everything_and_skips_non_http_links() {
        let mut c = record();
        c.outcome = Outcome::AgentNoAnswer;
        c.legs = vec![LegRecord {
            party: Party::Agent,
            number: Some("+91<script>".into()),
            status: Some("no-answer".into()),
            on_call_duration: Some(0),
            cause: Some("NO_ANSWER&".into()),
        }];
        c.recording_url = Some("javascript:alert(1)".into());
        let n = note(&c);
        assert!(n.contains("the agent did not answer"));
        assert!(n.contains("<li>Agent +91&lt;script&gt;: no-answer, 0 s (NO_ANSWER&amp;)</li>"));
        assert!(!n.contains("javascript"));
        assert!(n.contains("Exotel CallSid: sid&lt;1&gt;"));
        c.recording_url = Some("https://cb.example/recordings/t?a=1&b=\"2\"".into());
        assert!(note(&c).contains(
            "<a href=\"https://cb.example/recordings/t?a=1&amp;b=&quot;2&quot;\">listen</a>"
        ));
    }
}
