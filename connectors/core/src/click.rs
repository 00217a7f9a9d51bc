//! What a CRM sends to us outside OAuth (a click relayed from its UI, a CRM-initiated
//! uninstall), as plain data: the host hands the raw request to the connector, which verifies
//! it with its own rules (Pipedrive's extension JWT, Zoho's PhoneBridge auth parameter,
//! Zendesk's ZAF token) and answers a [`VerifiedClick`] or an [`UninstallNotice`].
//!
//! Rule: nothing here is trusted until the connector's verification passed; a click without a
//! valid signature is a [`ClickError::Unauthorized`], never a call.

use bytes::Bytes;
use http::{HeaderMap, Method};
use serde::{Deserialize, Serialize};

use crate::CrmRecordRef;

/// An inbound HTTP request, as the host received it. Its `Debug` shows the method, header
/// names and body length only: headers, query and body may carry tokens.
#[derive(Clone)]
pub struct InboundRequest {
    /// The method.
    pub method: Method,
    /// The headers.
    pub headers: HeaderMap,
    /// The raw query string (without `?`), if any.
    pub query: Option<String>,
    /// The body.
    pub body: Bytes,
}

impl std::fmt::Debug for InboundRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundRequest")
            .field("method", &self.method)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("body_len", &self.body.len())
            .finish_non_exhaustive()
    }
}

impl InboundRequest {
    /// A header value as text.
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The query string's pairs, decoded.
    #[must_use]
    pub fn query_pairs(&self) -> Vec<(String, String)> {
        self.query
            .as_deref()
            .map(|q| {
                url::form_urlencoded::parse(q.as_bytes())
                    .into_owned()
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A click turned into what the host must dial.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DialRequest {
    /// The CRM user who clicked (mapped to an agent phone by the host).
    pub crm_user_id: String,
    /// The number to call, as the CRM gave it (the host normalises it).
    pub to_number: String,
    /// The record the call belongs to, when the CRM says (the most specific one: a deal over
    /// its person).
    pub record: Option<CrmRecordRef>,
    /// Other records the click named (the person of a deal, the organisation).
    #[serde(default)]
    pub related: Vec<CrmRecordRef>,
}

/// A click whose origin the connector has verified.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VerifiedClick {
    /// The CRM account the click came from (Pipedrive company id, Zoho org, Zendesk
    /// subdomain), so the host can find the installation.
    pub account_id: Option<String>,
    /// What to dial.
    pub dial: DialRequest,
    /// The context keys that arrived, for the log (several CRMs leave them undocumented).
    pub context_keys: Vec<String>,
}

/// A CRM telling us that an account removed our app.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UninstallNotice {
    /// The CRM account that uninstalled (the host deletes that installation's tokens).
    pub account_id: String,
    /// The CRM user who uninstalled, when said.
    pub user_id: Option<String>,
}

/// Why an inbound click or notice was refused.
#[derive(Debug, thiserror::Error)]
pub enum ClickError {
    /// The signature, token or credentials did not verify (or expired): answer 401.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// Verified, but the content is unusable (no number, bad JSON): answer 400/422.
    #[error("malformed: {0}")]
    Malformed(String),
    /// This connector has no such entry point: answer 404.
    #[error("not supported by this connector")]
    Unsupported,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_pairs_are_decoded() {
        let r = InboundRequest {
            method: Method::GET,
            headers: HeaderMap::new(),
            query: Some("userId=1&token=a%2Bb&x".into()),
            body: Bytes::new(),
        };
        let q = r.query_pairs();
        assert_eq!(q[0], ("userId".into(), "1".into()));
        assert_eq!(q[1], ("token".into(), "a+b".into()));
        assert_eq!(q[2], ("x".into(), String::new()));
        assert_eq!(r.header("authorization"), None);
    }

    #[test]
    fn debug_output_hides_credentials() {
        let mut headers = HeaderMap::new();
        headers.insert("authorization", "Bearer s3cret".parse().unwrap());
        let r = InboundRequest {
            method: Method::POST,
            headers,
            query: Some("token=q-s3cret".into()),
            body: Bytes::from_static(b"{\"token\":\"b-s3cret\"}"),
        };
        let shown = format!("{r:?}");
        assert!(shown.contains("authorization"), "{shown}");
        assert!(!shown.contains("s3cret"), "{shown}");
    }

    #[test]
    fn dial_requests_without_related_records_still_parse() {
        let d: DialRequest =
            serde_json::from_str(r#"{"crm_user_id":"7","to_number":"+1","record":null}"#).unwrap();
        assert!(d.related.is_empty());
    }
}
