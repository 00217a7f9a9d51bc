//! The contract between the callbridge host and its CRM connectors.
//!
//! A connector crate depends on this crate only: never on the host, a database or a web
//! framework. The host owns storage, OAuth token custody, retries and scheduling; a connector
//! owns one CRM's wire format. Everything a connector needs for one request (the access token,
//! the per-install API base) is passed per call, never stored inside the connector.
//!
//! Error policy: a connector reports *what the caller must do next* (see [`ConnectorError`]),
//! not the raw HTTP status, so the write-back engine can treat every CRM alike.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

mod record;

pub use record::{CallRecord, Direction, LegRecord, Outcome, Party};

/// The per-installation facts a connector needs to reach a CRM account.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InstallContext {
    /// The installation's id in the host (opaque to the connector).
    pub installation_id: String,
    /// The API base the CRM handed back at install (Zoho/Pipedrive `api_domain`, Salesforce
    /// `instance_url`, `https://{subdomain}.zendesk.com`).
    pub api_base: String,
    /// The CRM's own account id (company id, org id), when the CRM reports one.
    pub account_id: Option<String>,
    /// Connector-specific settings stored with the installation (JSON object).
    #[serde(default)]
    pub settings: serde_json::Value,
}

/// A bearer credential for one request. The host refreshes it; the connector only uses it.
#[derive(Clone)]
pub struct AccessToken(pub String);

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccessToken(***)")
    }
}

/// Where the CRM keeps the record a call belongs to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CrmRecordRef {
    /// The CRM's object type (`person`, `deal`, `Lead`, `Contact`, `ticket` …).
    pub object_type: String,
    /// The record's id in the CRM.
    pub id: String,
}

/// What the CRM returned for a written call log; stored against the Exotel CallSid so a retry
/// or late data updates this log instead of creating a second one.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CrmLogRef {
    /// The log's id in the CRM.
    pub id: String,
    /// Whether the CRM lets this log be updated later (Pipedrive call logs cannot be).
    pub updatable: bool,
}

/// A click turned into what the host must dial.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DialRequest {
    /// The CRM user who clicked (mapped to an agent phone by the host).
    pub crm_user_id: String,
    /// The number to call, as the CRM gave it (the host normalises it).
    pub to_number: String,
    /// The record the call belongs to, when the CRM says.
    pub record: Option<CrmRecordRef>,
}

/// A CRM contact found by phone number.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ContactMatch {
    /// The record.
    pub record: CrmRecordRef,
    /// Its display name.
    pub name: Option<String>,
}

/// A CRM user, for mapping CRM users to agent phones.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CrmUser {
    /// The user's id in the CRM.
    pub id: String,
    /// Display name.
    pub name: Option<String>,
    /// Email, when the CRM shares it.
    pub email: Option<String>,
    /// Phone, when the CRM has one.
    pub phone: Option<String>,
}

/// How a CRM's OAuth install works, as data (the host drives the flow with the `oauth2` crate).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OAuthSpec {
    /// Authorization endpoint template; `{subdomain}`/`{accounts_server}` are filled by the host.
    pub authorize_url: String,
    /// Token endpoint template.
    pub token_url: String,
    /// Revocation endpoint template, when the CRM has one.
    pub revoke_url: Option<String>,
    /// Scopes to request.
    pub scopes: Vec<String>,
    /// Whether to send a PKCE challenge.
    pub pkce: bool,
    /// How the per-install API base comes back.
    pub api_base_from: ApiBaseSource,
    /// Whether each refresh returns a new refresh token that replaces the old one.
    pub rotates_refresh_tokens: bool,
}

/// Where the per-install API base is found after the token exchange.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "kind", content = "field")]
pub enum ApiBaseSource {
    /// A field of the token response (`api_domain`, `instance_url`).
    TokenResponseField(String),
    /// Built from the subdomain the admin typed (`https://{subdomain}.zendesk.com`).
    Subdomain(String),
}

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
}

/// One CRM, as the host sees it. Implementations hold configuration only (client ids, base
/// URLs); every per-install fact arrives as an argument.
#[async_trait::async_trait]
pub trait Connector: Send + Sync {
    /// The connector's stable name (`pipedrive`, `zoho`, `zendesk`, `salesforce`).
    fn name(&self) -> &'static str;

    /// How this CRM's OAuth install works.
    fn oauth_spec(&self) -> OAuthSpec;

    /// Write a finished call onto the CRM.
    ///
    /// # Errors
    /// A classified [`ConnectorError`].
    async fn log_call(
        &self,
        install: &InstallContext,
        token: &AccessToken,
        call: &CallRecord,
    ) -> Result<CrmLogRef, ConnectorError>;

    /// Update a log written earlier (late recording, corrected data). CRMs whose logs cannot be
    /// changed return `Ok(())` without a request when nothing they accept has changed.
    ///
    /// # Errors
    /// A classified [`ConnectorError`].
    async fn update_call(
        &self,
        install: &InstallContext,
        token: &AccessToken,
        log: &CrmLogRef,
        call: &CallRecord,
    ) -> Result<(), ConnectorError>;

    /// Look up the CRM records that carry this number (E.164 given; connectors try the forms
    /// their CRM stores). Must never create anything.
    ///
    /// # Errors
    /// A classified [`ConnectorError`].
    async fn find_contact_by_phone(
        &self,
        install: &InstallContext,
        token: &AccessToken,
        e164: &str,
    ) -> Result<Vec<ContactMatch>, ConnectorError>;

    /// The CRM's users, for mapping them to agent phones.
    ///
    /// # Errors
    /// A classified [`ConnectorError`].
    async fn list_users(
        &self,
        install: &InstallContext,
        token: &AccessToken,
    ) -> Result<Vec<CrmUser>, ConnectorError>;
}

/// When a time came from a source without an offset, the host converts it; connectors only see
/// UTC. This alias documents that rule at the type level.
pub type UtcTime = DateTime<Utc>;

#[cfg(test)]
mod tests {
    use super::*;

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
    fn access_tokens_never_print() {
        assert_eq!(
            format!("{:?}", AccessToken("secret".into())),
            "AccessToken(***)"
        );
    }
}
