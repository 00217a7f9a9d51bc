//! The contract between the callbridge host and its CRM connectors.
//!
//! A connector crate depends on this crate only: never on the host, a database or a web
//! framework. The host owns storage, token custody (sealing, single-flight refresh), retries
//! and scheduling; a connector owns one CRM's wire format and its OAuth client credentials.
//! Everything a connector needs for one request (the access token, the per-install API base)
//! is passed per call, never stored inside the connector.
//!
//! The pieces:
//! - [`OAuthSpec`] describes the install as data; [`OAuthSpec::parse_token_response`] turns a
//!   token answer into a [`TokenSet`] the host stores ([`oauth`]).
//! - [`Connector`] is the behaviour: token exchange/refresh/revoke, click verification,
//!   call logs, recordings, lookups.
//! - [`ConnectorError`] classifies every failure by what the caller must do next
//!   ([`classify_response`], [`retry_after`]), so the write-back engine treats every CRM
//!   alike.
//!
//! How the four CRMs fit (see `shared/docs/`): Zoho = `accounts_server` from the callback
//! query, `api_domain` from the token response, PhoneBridge clicks arrive server-to-server
//! through [`Connector::verify_click`], per-item errors inside HTTP 200 are the connector's to
//! classify. Pipedrive = `api_domain` re-read on every refresh, immutable logs
//! ([`CrmLogRef::updatable`] false), [`RecordingMode::Upload`], marketplace installs and a
//! CRM-initiated uninstall. Zendesk = `{subdomain}` templates, rotating refresh tokens, JSON
//! token body, `PATCH`-able calls. Salesforce = `instance_url`, [`TokenExpiry::Absent`],
//! 401 `INVALID_SESSION_ID` → [`ConnectorError::NeedsRefresh`], 403 `REQUEST_LIMIT_EXCEEDED`
//! → [`ConnectorError::RateLimited`].

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub mod click;
pub mod error;
pub mod oauth;
mod record;

pub use click::{ClickError, DialRequest, InboundRequest, UninstallNotice, VerifiedClick};
pub use error::{ConnectorError, classify_response, error_message, is_html, retry_after};
pub use oauth::{
    ApiBaseSource, ClientAuth, InstallParam, InstallVars, OAuthError, OAuthRequest, OAuthSpec,
    ParamRule, ParamSource, RefreshRotation, TokenExpiry, TokenGrant, TokenSet,
};
pub use record::{CallRecord, Direction, LegRecord, Outcome, Party};

/// The per-installation facts a connector needs to reach a CRM account.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InstallContext {
    /// The installation's id in the host (opaque to the connector).
    pub installation_id: String,
    /// The API base the CRM handed back at install (Zoho/Pipedrive `api_domain`, Salesforce
    /// `instance_url`, `https://{subdomain}.zendesk.com`), as validated by the [`OAuthSpec`].
    pub api_base: String,
    /// The CRM's own account id (company id, org id), when the CRM reports one.
    pub account_id: Option<String>,
    /// The per-install OAuth values (Zendesk subdomain, Zoho accounts server).
    #[serde(default)]
    pub vars: InstallVars,
    /// Connector-specific settings stored with the installation (JSON object), e.g. Zoho's
    /// PhoneBridge auth parameter (the host opens sealed values before passing them).
    #[serde(default)]
    pub settings: serde_json::Value,
}

/// A bearer credential for one request. The host refreshes it; the connector only uses it.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct AccessToken(pub String);

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccessToken(***)")
    }
}

/// A refresh token; like [`AccessToken`] it never prints.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct RefreshToken(pub String);

impl std::fmt::Debug for RefreshToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RefreshToken(***)")
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

/// How a CRM takes a call's recording.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RecordingMode {
    /// A link (callbridge's signed recording URL) written into the log.
    Link,
    /// The file itself, uploaded with [`Connector::upload_recording`] after the log exists.
    Upload,
}

/// A recording file to upload.
#[derive(Debug, Clone)]
pub struct RecordingFile {
    /// The audio bytes.
    pub bytes: Bytes,
    /// A file name for the CRM (`<CallSid>.mp3`).
    pub filename: String,
    /// Its MIME type (`audio/mpeg`).
    pub content_type: String,
}

/// What the OAuth callback gave us, for [`Connector::exchange_code`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeExchange {
    /// The callback's `code`.
    pub code: String,
    /// The exact redirect URI used in the authorize request.
    pub redirect_uri: String,
    /// The PKCE verifier, when the spec uses PKCE.
    pub pkce_verifier: Option<String>,
}

/// The tokens the host holds for an installation, for [`Connector::revoke`].
#[derive(Debug, Clone, Default)]
pub struct StoredTokens {
    /// The access token, if still held.
    pub access_token: Option<AccessToken>,
    /// The refresh token, if any.
    pub refresh_token: Option<RefreshToken>,
}

/// One CRM, as the host sees it. Implementations hold configuration only (client ids and
/// secrets, base URLs); every per-install fact arrives as an argument.
#[cfg_attr(feature = "mock", mockall::automock)]
#[async_trait::async_trait]
pub trait Connector: Send + Sync {
    /// The connector's stable name (`pipedrive`, `zoho`, `zendesk`, `salesforce`).
    fn name(&self) -> &'static str;

    /// How this CRM's OAuth install works.
    fn oauth_spec(&self) -> OAuthSpec;

    /// Exchange the callback's code for tokens (the connector holds the client secret).
    ///
    /// # Errors
    /// A classified [`OAuthError`].
    async fn exchange_code(
        &self,
        vars: &InstallVars,
        exchange: &CodeExchange,
    ) -> Result<TokenSet, OAuthError>;

    /// Use the refresh token. The host runs this single-flight per installation and persists
    /// a returned refresh token (and API base) before using the new access token.
    ///
    /// # Errors
    /// A classified [`OAuthError`]; [`OAuthError::InvalidGrant`] means re-read storage, then
    /// reconnect.
    async fn refresh(
        &self,
        install: &InstallContext,
        refresh_token: &RefreshToken,
    ) -> Result<TokenSet, OAuthError>;

    /// Revoke the installation's grant at the CRM (uninstall from our side). Connectors use
    /// whichever of the stored tokens their CRM revokes with.
    ///
    /// # Errors
    /// A classified [`ConnectorError`].
    async fn revoke(
        &self,
        install: &InstallContext,
        tokens: &StoredTokens,
    ) -> Result<(), ConnectorError>;

    /// The CRM account (company, org, subdomain) a fresh token belongs to, asked once at
    /// install. The host routes clicks and CRM-initiated uninstalls by it and refuses to
    /// connect one CRM account to two tenants. `None` when the CRM has no such notion.
    ///
    /// # Errors
    /// A classified [`ConnectorError`].
    async fn account_id(
        &self,
        install: &InstallContext,
        token: &AccessToken,
    ) -> Result<Option<String>, ConnectorError> {
        let _ = (install, token);
        Ok(None)
    }

    /// Verify a click relayed from the CRM's UI (or posted by the CRM) and turn it into what
    /// to dial. `install` is given when the request's URL already identifies one (Zoho's
    /// per-user click-to-dial URL); otherwise the connector reports the account it came from.
    ///
    /// # Errors
    /// [`ClickError`]; the default is [`ClickError::Unsupported`].
    #[allow(
        clippy::needless_lifetimes,
        reason = "mockall needs the lifetime of an Option<&T> argument named"
    )]
    fn verify_click<'a>(
        &self,
        install: Option<&'a InstallContext>,
        request: &InboundRequest,
        now: DateTime<Utc>,
    ) -> Result<VerifiedClick, ClickError> {
        let _ = (install, request, now);
        Err(ClickError::Unsupported)
    }

    /// Verify a CRM-initiated uninstall notice (Pipedrive's `DELETE` to the callback URL).
    ///
    /// # Errors
    /// [`ClickError`]; the default is [`ClickError::Unsupported`].
    fn verify_uninstall(&self, request: &InboundRequest) -> Result<UninstallNotice, ClickError> {
        let _ = request;
        Err(ClickError::Unsupported)
    }

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

    /// Update a log written earlier (late recording link, corrected data). CRMs whose logs
    /// cannot be changed return `Ok(())` without a request.
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

    /// How this CRM takes recordings.
    fn recording_mode(&self) -> RecordingMode {
        RecordingMode::Link
    }

    /// Attach the recording file to a written log. Only for [`RecordingMode::Upload`];
    /// "already has a recording" counts as success.
    ///
    /// # Errors
    /// A classified [`ConnectorError`]; the default is [`ConnectorError::Unsupported`].
    async fn upload_recording(
        &self,
        install: &InstallContext,
        token: &AccessToken,
        log: &CrmLogRef,
        file: &RecordingFile,
    ) -> Result<(), ConnectorError> {
        let _ = (install, token, log, file);
        Err(ConnectorError::Unsupported(format!(
            "{} takes recording links, not uploads",
            self.name()
        )))
    }

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

    /// Create a contact (or lead) for a number no record carries, for installations whose
    /// admins chose "create a contact for unknown numbers". Never called by a lookup.
    ///
    /// # Errors
    /// A classified [`ConnectorError`]; the default is [`ConnectorError::Unsupported`].
    async fn create_contact(
        &self,
        install: &InstallContext,
        token: &AccessToken,
        e164: &str,
    ) -> Result<CrmRecordRef, ConnectorError> {
        let _ = (install, token, e164);
        Err(ConnectorError::Unsupported(format!(
            "{} cannot create contacts",
            self.name()
        )))
    }

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
    fn secrets_never_print() {
        assert_eq!(
            format!("{:?}", AccessToken("secret".into())),
            "AccessToken(***)"
        );
        assert_eq!(
            format!("{:?}", RefreshToken("secret".into())),
            "RefreshToken(***)"
        );
    }

    /// A connector that implements only what every CRM must: the defaults for the optional
    /// capabilities must answer "unsupported", never pretend to succeed.
    struct Minimal;

    #[async_trait::async_trait]
    impl Connector for Minimal {
        fn name(&self) -> &'static str {
            "minimal"
        }
        fn oauth_spec(&self) -> OAuthSpec {
            OAuthSpec {
                client_id: "c".into(),
                authorize_url: "https://crm.example/auth".into(),
                token_url: "https://crm.example/token".into(),
                revoke_url: None,
                scopes: vec![],
                scope_separator: " ".into(),
                scope_in_token_request: false,
                extra_authorize_params: vec![],
                pkce: false,
                client_auth: ClientAuth::FormBody,
                install_params: vec![],
                api_base_from: ApiBaseSource::TokenResponseField("api".into()),
                api_base_hosts: vec!["crm.example".into()],
                refresh_rotation: RefreshRotation::Never,
                expiry: TokenExpiry::ExpiresIn,
                marketplace_installs: false,
                uninstall_callback: false,
            }
        }
        async fn exchange_code(
            &self,
            _: &InstallVars,
            _: &CodeExchange,
        ) -> Result<TokenSet, OAuthError> {
            Err(OAuthError::Rejected("test".into()))
        }
        async fn refresh(
            &self,
            _: &InstallContext,
            _: &RefreshToken,
        ) -> Result<TokenSet, OAuthError> {
            Err(OAuthError::Rejected("test".into()))
        }
        async fn revoke(&self, _: &InstallContext, _: &StoredTokens) -> Result<(), ConnectorError> {
            Ok(())
        }
        async fn log_call(
            &self,
            _: &InstallContext,
            _: &AccessToken,
            call: &CallRecord,
        ) -> Result<CrmLogRef, ConnectorError> {
            Ok(CrmLogRef {
                id: call.call_id.clone(),
                updatable: true,
            })
        }
        async fn update_call(
            &self,
            _: &InstallContext,
            _: &AccessToken,
            _: &CrmLogRef,
            _: &CallRecord,
        ) -> Result<(), ConnectorError> {
            Ok(())
        }
        async fn find_contact_by_phone(
            &self,
            _: &InstallContext,
            _: &AccessToken,
            _: &str,
        ) -> Result<Vec<ContactMatch>, ConnectorError> {
            Ok(vec![])
        }
        async fn list_users(
            &self,
            _: &InstallContext,
            _: &AccessToken,
        ) -> Result<Vec<CrmUser>, ConnectorError> {
            Ok(vec![])
        }
    }

    fn install() -> InstallContext {
        InstallContext {
            installation_id: "inst_1".into(),
            api_base: "https://crm.example".into(),
            account_id: None,
            vars: InstallVars::new(),
            settings: serde_json::Value::Null,
        }
    }

    #[tokio::test]
    async fn optional_capabilities_default_to_unsupported() {
        let c: Box<dyn Connector> = Box::new(Minimal);
        assert_eq!(c.recording_mode(), RecordingMode::Link);
        let file = RecordingFile {
            bytes: Bytes::from_static(b"ID3"),
            filename: "a.mp3".into(),
            content_type: "audio/mpeg".into(),
        };
        let log = CrmLogRef {
            id: "1".into(),
            updatable: true,
        };
        let err = c
            .upload_recording(&install(), &AccessToken("t".into()), &log, &file)
            .await
            .unwrap_err();
        assert!(matches!(err, ConnectorError::Unsupported(m) if m.contains("minimal")));
        let req = InboundRequest {
            method: http::Method::POST,
            headers: http::HeaderMap::new(),
            query: None,
            body: Bytes::new(),
        };
        assert!(matches!(
            c.verify_click(None, &req, Utc::now()),
            Err(ClickError::Unsupported)
        ));
        assert!(matches!(
            c.verify_uninstall(&req),
            Err(ClickError::Unsupported)
        ));
    }

    #[test]
    fn install_context_reads_without_vars() {
        let i: InstallContext = serde_json::from_str(
            r#"{"installation_id":"i","api_base":"https://x","account_id":null}"#,
        )
        .unwrap();
        assert_eq!(i.vars, InstallVars::new());
    }
}

#[cfg(all(test, feature = "mock"))]
mod mock_tests {
    use super::*;

    #[tokio::test]
    async fn the_mock_stands_in_for_a_connector() {
        let mut mock = MockConnector::new();
        mock.expect_name().return_const("fake");
        mock.expect_log_call()
            .withf(|_, token, call| token.0 == "tok" && call.call_id == "call_1")
            .times(1)
            .returning(|_, _, _| Err(ConnectorError::RateLimited { retry_after: None }));
        let c: std::sync::Arc<dyn Connector> = std::sync::Arc::new(mock);
        assert_eq!(c.name(), "fake");
        let call = CallRecord {
            call_id: "call_1".into(),
            exotel_call_sid: None,
            direction: Direction::Outbound,
            outcome: Outcome::Connected,
            status: "completed".into(),
            agent_number: "+1".into(),
            customer_number: "+2".into(),
            virtual_number: None,
            started_at: None,
            ended_at: None,
            conversation_duration: 0,
            legs: vec![],
            recording_url: None,
            crm_record: None,
            related_records: vec![],
            crm_user_id: None,
            custom_field: None,
        };
        let install = InstallContext {
            installation_id: "i".into(),
            api_base: "https://x".into(),
            account_id: None,
            vars: InstallVars::new(),
            settings: serde_json::Value::Null,
        };
        let err = c
            .log_call(&install, &AccessToken("tok".into()), &call)
            .await
            .unwrap_err();
        assert!(err.is_retryable());
    }
}
