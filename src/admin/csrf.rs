//! CSRF protection for the admin console.
//!
//! Rule: every state-changing admin request (anything but GET/HEAD/OPTIONS) carries the
//! session's CSRF token, either as the `csrf_token` field of a form body or in an
//! `x-csrf-token` header. [`super::auth::guard`] checks it in constant time **before** the
//! handler runs, so a handler cannot forget, and a request without the right token is answered
//! 403 with nothing written. The login form (no session yet) uses a double-submit cookie
//! instead: a random value in a `SameSite=Strict` cookie that the form must repeat.

use axum::{body::Bytes, http::HeaderMap};
use subtle::ConstantTimeEq;

/// The form field that carries the token.
pub const FIELD: &str = "csrf_token";
/// The header that carries the token (for scripts and `fetch`).
pub const HEADER: &str = "x-csrf-token";
/// Largest admin form body the guard buffers, in bytes.
pub const BODY_LIMIT: usize = 64 * 1024;

/// A fresh token (256 bits, URL-safe).
#[must_use]
pub fn new_token() -> String {
    crate::crypto::random_token("", 32)
}

/// Constant-time equality of two tokens (length is not secret).
#[must_use]
pub fn tokens_match(expected: &str, given: &str) -> bool {
    !expected.is_empty() && bool::from(expected.as_bytes().ct_eq(given.as_bytes()))
}

/// The token a request presents: the header first, else the form field of a URL-encoded body.
#[must_use]
pub fn presented(headers: &HeaderMap, body: &Bytes) -> Option<String> {
    if let Some(v) = headers.get(HEADER).and_then(|v| v.to_str().ok()) {
        return Some(v.trim().to_owned());
    }
    let is_form = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/x-www-form-urlencoded"));
    if !is_form {
        return None;
    }
    url::form_urlencoded::parse(body)
        .find(|(k, _)| k == FIELD)
        .map(|(_, v)| v.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_exactly() {
        let t = new_token();
        assert!(t.len() >= 43);
        assert!(tokens_match(&t, &t.clone()));
        assert!(!tokens_match(&t, ""));
        assert!(!tokens_match("", ""));
        assert!(!tokens_match(&t, &new_token()));
    }

    #[test]
    fn the_token_comes_from_the_header_or_the_form() {
        let mut h = HeaderMap::new();
        h.insert(
            "content-type",
            "application/x-www-form-urlencoded".parse().unwrap(),
        );
        let body = Bytes::from_static(b"a=1&csrf_token=abc%2Bd&b=2");
        assert_eq!(presented(&h, &body).as_deref(), Some("abc+d"));
        h.insert(HEADER, "hdr".parse().unwrap());
        assert_eq!(presented(&h, &body).as_deref(), Some("hdr"));
        let mut json = HeaderMap::new();
        json.insert("content-type", "application/json".parse().unwrap());
        assert_eq!(presented(&json, &body), None);
    }
}
