//! [`CallRecord`]: the one description of a finished call that the host composes and every
//! sink (the tenant webhook, each CRM connector) maps onto its own fields.

use serde::{Deserialize, Serialize};

use crate::{CrmRecordRef, UtcTime};

/// Which way the call went, from the business's side.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// The business called out (click-to-call: agent first, then the customer).
    Outbound,
    /// A customer called a virtual number.
    Inbound,
}

/// The call's outcome in the vocabulary CRMs share (Pipedrive's enum is the model).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Both sides talked.
    Connected,
    /// The agent's phone was not answered, so the customer was never dialled.
    AgentNoAnswer,
    /// The customer did not answer.
    NoAnswer,
    /// The customer (or agent) was busy.
    Busy,
    /// The call failed (invalid number, network, DND block …).
    Failed,
    /// Someone hung up before the other side answered.
    Canceled,
}

/// One leg of the call. For click-to-call, leg 0 is the agent and leg 1 the customer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LegRecord {
    /// Whose leg this is.
    pub party: Party,
    /// The leg's number, when known (E.164).
    pub number: Option<String>,
    /// Exotel's leg status (`completed`, `busy`, `no-answer`, `failed`, `canceled`), if any.
    pub status: Option<String>,
    /// Seconds this leg was on the call.
    pub on_call_duration: Option<i64>,
    /// Exotel's disconnect cause, when it sent one.
    pub cause: Option<String>,
}

/// A party of the call.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Party {
    /// The business's person (rep, delivery executive).
    Agent,
    /// The customer.
    Customer,
}

/// A finished call, ready to be written anywhere.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CallRecord {
    /// callbridge's call id.
    pub call_id: String,
    /// Exotel's CallSid (the dedupe key CRMs store as external id).
    pub exotel_call_sid: Option<String>,
    /// Which way the call went.
    pub direction: Direction,
    /// The outcome derived from the legs.
    pub outcome: Outcome,
    /// Exotel's final call status.
    pub status: String,
    /// The agent's number (E.164).
    pub agent_number: String,
    /// The customer's number (E.164).
    pub customer_number: String,
    /// The virtual number both sides saw.
    pub virtual_number: Option<String>,
    /// When the call started (UTC).
    pub started_at: Option<UtcTime>,
    /// When it ended (UTC).
    pub ended_at: Option<UtcTime>,
    /// Seconds the two parties were bridged.
    pub conversation_duration: i64,
    /// Per-leg detail.
    pub legs: Vec<LegRecord>,
    /// A link that plays the recording, when there is one.
    pub recording_url: Option<String>,
    /// The CRM record the call belongs to, when known.
    pub crm_record: Option<CrmRecordRef>,
    /// Other records the call concerns (the person of a clicked deal, its organization), most
    /// specific first; CRMs whose logs link several record kinds use them.
    #[serde(default)]
    pub related_records: Vec<CrmRecordRef>,
    /// The CRM user who placed or took the call, when known.
    pub crm_user_id: Option<String>,
    /// The caller's own correlation string (`custom_field` on the API).
    pub custom_field: Option<String>,
}

impl Outcome {
    /// Derive the outcome from Exotel's final status and legs.
    ///
    /// The agent leg decides first: if the agent never answered there was no call to the
    /// customer at all. Then the customer leg's status, then the call status.
    #[must_use]
    pub fn derive(status: &str, legs: &[LegRecord], conversation_duration: i64) -> Self {
        let leg = |party| legs.iter().find(|l| l.party == party);
        let by_status = |s: &str| match s {
            "completed" => Self::Connected,
            "busy" => Self::Busy,
            "no-answer" => Self::NoAnswer,
            "canceled" | "cancelled" => Self::Canceled,
            _ => Self::Failed,
        };
        if conversation_duration > 0 {
            return Self::Connected;
        }
        if let Some(agent) = leg(Party::Agent)
            && let Some(s) = agent.status.as_deref()
            && s != "completed"
        {
            return match by_status(s) {
                Self::NoAnswer | Self::Canceled => Self::AgentNoAnswer,
                other => other,
            };
        }
        if let Some(customer) = leg(Party::Customer)
            && let Some(s) = customer.status.as_deref()
        {
            return match by_status(s) {
                // A customer leg that "completed" with no conversation time was not a talk.
                Self::Connected => Self::NoAnswer,
                other => other,
            };
        }
        match by_status(status) {
            Self::Connected => Self::NoAnswer,
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leg(party: Party, status: &str, secs: i64) -> LegRecord {
        LegRecord {
            party,
            number: None,
            status: Some(status.into()),
            on_call_duration: Some(secs),
            cause: None,
        }
    }

    #[test]
    fn a_bridged_call_is_connected() {
        let legs = [
            leg(Party::Agent, "completed", 41),
            leg(Party::Customer, "completed", 32),
        ];
        assert_eq!(Outcome::derive("completed", &legs, 32), Outcome::Connected);
    }

    #[test]
    fn an_unanswered_customer_is_no_answer() {
        let legs = [
            leg(Party::Agent, "completed", 41),
            leg(Party::Customer, "no-answer", 0),
        ];
        assert_eq!(Outcome::derive("no-answer", &legs, 0), Outcome::NoAnswer);
    }

    #[test]
    fn an_unanswered_agent_is_told_apart() {
        let legs = [leg(Party::Agent, "no-answer", 0)];
        assert_eq!(
            Outcome::derive("no-answer", &legs, 0),
            Outcome::AgentNoAnswer
        );
    }

    #[test]
    fn a_busy_customer_is_busy() {
        let legs = [
            leg(Party::Agent, "completed", 5),
            leg(Party::Customer, "busy", 0),
        ];
        assert_eq!(Outcome::derive("busy", &legs, 0), Outcome::Busy);
    }

    #[test]
    fn without_legs_the_status_decides() {
        assert_eq!(Outcome::derive("failed", &[], 0), Outcome::Failed);
        assert_eq!(Outcome::derive("busy", &[], 0), Outcome::Busy);
    }
}
