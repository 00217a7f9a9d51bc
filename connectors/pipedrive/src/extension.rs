//! What Pipedrive sends us outside the REST API: the app-extension iframe's signed JWT and
//! click context (docs §1.2), and the `DELETE` uninstall callback (docs §1.1).
//!
//! All pure functions: the host hands over what arrived and gets verified facts back.
//!
//! Unverified facts, each a one-line fix here:
//! - the JWT's claim names: `userId`/`companyId` per one integrator; `user_id`/`company_id`
//!   are accepted too ([`USER_ID_CLAIMS`], [`COMPANY_ID_CLAIMS`]);
//! - the click context's keys are undocumented: several names are accepted per field
//!   ([`PHONE_KEYS`] …) and the keys seen are returned so the host can log them.

use base64::Engine as _;
use callbridge_connector::{ClickError, UninstallNotice};
use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value};
use subtle::ConstantTimeEq;

/// Claim names accepted for the Pipedrive user id.
pub const USER_ID_CLAIMS: &[&str] = &["userId", "user_id"];
/// Claim names accepted for the Pipedrive company id.
pub const COMPANY_ID_CLAIMS: &[&str] = &["companyId", "company_id"];
/// Seconds of clock skew tolerated on `exp`.
pub const EXP_LEEWAY_SECS: i64 = 30;

/// Context keys accepted for the number to call.
pub const PHONE_KEYS: &[&str] = &[
    "phone",
    "phoneNumber",
    "phone_number",
    "number",
    "callee",
    "to",
];
/// Context keys accepted for the person id.
pub const PERSON_KEYS: &[&str] = &["personId", "person_id", "person"];
/// Context keys accepted for the deal id.
pub const DEAL_KEYS: &[&str] = &["dealId", "deal_id", "deal"];
/// Context keys accepted for the lead id (a UUID string).
pub const LEAD_KEYS: &[&str] = &["leadId", "lead_id", "lead"];
/// Context keys accepted for the organization id.
pub const ORG_KEYS: &[&str] = &[
    "orgId",
    "org_id",
    "organizationId",
    "organization_id",
    "organization",
    "org",
];

/// The verified identity in an app-extension JWT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtensionClaims {
    /// The Pipedrive user who has the iframe open.
    pub user_id: String,
    /// Their company (find the installation by it).
    pub company_id: String,
    /// Expiry, Unix seconds.
    pub exp: i64,
}

/// Verify the JWT Pipedrive gives the iframe (query `token`, or the SDK's
/// `GET_SIGNED_TOKEN`): HS256 with the Developer Hub JWT secret (by default the client
/// secret), not expired at `now` (± [`EXP_LEEWAY_SECS`]), carrying a user and a company id.
///
/// # Errors
/// [`ClickError::Unauthorized`] for a bad signature, another algorithm, expiry, or missing
/// ids.
pub fn verify_extension_jwt(
    token: &str,
    jwt_secret: &SecretString,
    now: DateTime<Utc>,
) -> Result<ExtensionClaims, ClickError> {
    let unauthorized = |why: String| ClickError::Unauthorized(format!("extension token: {why}"));
    let mut validation = Validation::new(Algorithm::HS256);
    // Expiry is checked below against the caller's clock, so tests and callers agree on `now`.
    validation.validate_exp = false;
    validation.validate_aud = false;
    validation.required_spec_claims = ["exp".to_owned()].into_iter().collect();
    let key = DecodingKey::from_secret(jwt_secret.expose_secret().as_bytes());
    let data = jsonwebtoken::decode::<Map<String, Value>>(token.trim(), &key, &validation)
        .map_err(|e| unauthorized(e.to_string()))?;
    let claims = data.claims;
    let exp = claims
        .get("exp")
        .and_then(Value::as_i64)
        .ok_or_else(|| unauthorized("exp is not a number".into()))?;
    if now.timestamp() > exp + EXP_LEEWAY_SECS {
        return Err(unauthorized("expired".into()));
    }
    let id = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| claims.get(*n).and_then(id_string))
    };
    let user_id = id(USER_ID_CLAIMS).ok_or_else(|| unauthorized("no user id".into()))?;
    let company_id = id(COMPANY_ID_CLAIMS).ok_or_else(|| unauthorized("no company id".into()))?;
    Ok(ExtensionClaims {
        user_id,
        company_id,
        exp,
    })
}

/// A numeric id sent as a number or a numeric string.
fn id_string(v: &Value) -> Option<String> {
    match v {
        Value::Number(n) => n.as_u64().map(|n| n.to_string()),
        Value::String(s) => {
            let s = s.trim();
            (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.to_owned())
        }
        Value::Object(o) => o.get("id").and_then(id_string),
        _ => None,
    }
}

/// What a click's context said.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClickContext {
    /// The number to call, as Pipedrive showed it.
    pub phone: String,
    /// The person, when named.
    pub person_id: Option<String>,
    /// The deal, when named.
    pub deal_id: Option<String>,
    /// The lead (UUID), when named.
    pub lead_id: Option<String>,
    /// The organization, when named.
    pub org_id: Option<String>,
    /// Every key that arrived (sorted), for the host's log.
    pub keys_seen: Vec<String>,
}

/// Read the click context the iframe relays (`Event.VISIBILITY`'s `context`, or the panel's
/// `resource`/`id` query). A wrapping `{"context": {…}}` is unwrapped. Values may be plain
/// or `{id}`/`{value}` objects; ids must be numeric (leads: any non-empty string).
///
/// # Errors
/// [`ClickError::Malformed`] when the context is not an object or has no number.
pub fn parse_click_context(context: &Value) -> Result<ClickContext, ClickError> {
    let mut obj = context
        .as_object()
        .ok_or_else(|| ClickError::Malformed("click context is not an object".into()))?;
    if let Some(inner) = obj.get("context").and_then(Value::as_object) {
        obj = inner;
    }
    let mut keys_seen: Vec<String> = obj.keys().cloned().collect();
    keys_seen.sort();
    let first = |keys: &[&str], read: fn(&Value) -> Option<String>| {
        keys.iter().find_map(|k| obj.get(*k).and_then(read))
    };
    // Panels name their record as `resource` + `id` (docs §1.2).
    let resource = obj
        .get("resource")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let by_resource = |kind: &str| {
        (resource == kind)
            .then(|| obj.get("id").and_then(id_string))
            .flatten()
    };
    let phone = first(PHONE_KEYS, phone_string).ok_or_else(|| {
        ClickError::Malformed(format!(
            "no phone number in the click context (keys: {})",
            keys_seen.join(", ")
        ))
    })?;
    Ok(ClickContext {
        phone,
        person_id: first(PERSON_KEYS, id_string).or_else(|| by_resource("person")),
        deal_id: first(DEAL_KEYS, id_string).or_else(|| by_resource("deal")),
        lead_id: first(LEAD_KEYS, lead_string).or_else(|| {
            (resource == "lead")
                .then(|| obj.get("id").and_then(lead_string))
                .flatten()
        }),
        org_id: first(ORG_KEYS, id_string).or_else(|| by_resource("organization")),
        keys_seen,
    })
}

fn phone_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => {
            let s = s.trim();
            (s.bytes().filter(u8::is_ascii_digit).count() >= 3).then(|| s.to_owned())
        }
        Value::Number(n) => Some(n.to_string()),
        Value::Object(o) => o
            .get("value")
            .or_else(|| o.get("number"))
            .and_then(phone_string),
        _ => None,
    }
}

fn lead_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => {
            let s = s.trim();
            (!s.is_empty()
                && s.len() <= 64
                && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'))
            .then(|| s.to_owned())
        }
        Value::Object(o) => o.get("id").and_then(lead_string),
        _ => None,
    }
}

/// Verify Pipedrive's uninstall callback: a `DELETE` to our callback URL with Basic auth
/// carrying our client credentials (compared in constant time) and a JSON body
/// `{client_id, company_id, user_id, timestamp}`.
///
/// # Errors
/// [`ClickError::Unauthorized`] for missing or wrong credentials (or a body naming another
/// client); [`ClickError::Malformed`] for a body without a company id.
pub fn verify_uninstall_request(
    authorization_header: Option<&str>,
    body: &[u8],
    client_id: &str,
    client_secret: &SecretString,
) -> Result<UninstallNotice, ClickError> {
    let unauthorized = |why: &str| ClickError::Unauthorized(format!("uninstall callback: {why}"));
    let header = authorization_header.ok_or_else(|| unauthorized("no Authorization header"))?;
    let (scheme, encoded) = header
        .trim()
        .split_once(' ')
        .ok_or_else(|| unauthorized("malformed Authorization header"))?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(unauthorized("not Basic auth"));
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| unauthorized("malformed Basic credentials"))?;
    let colon = decoded
        .iter()
        .position(|b| *b == b':')
        .ok_or_else(|| unauthorized("malformed Basic credentials"))?;
    let (id, secret) = (&decoded[..colon], &decoded[colon + 1..]);
    let ok =
        id.ct_eq(client_id.as_bytes()) & secret.ct_eq(client_secret.expose_secret().as_bytes());
    if !bool::from(ok) {
        return Err(unauthorized("wrong client credentials"));
    }
    let body: Value = serde_json::from_slice(body)
        .map_err(|e| ClickError::Malformed(format!("uninstall body is not JSON: {e}")))?;
    if let Some(named) = body.get("client_id").and_then(Value::as_str)
        && named != client_id
    {
        return Err(unauthorized("body names another client"));
    }
    let company = body
        .get("company_id")
        .and_then(id_string)
        .ok_or_else(|| ClickError::Malformed("uninstall body has no company_id".into()))?;
    Ok(UninstallNotice {
        account_id: company,
        user_id: body.get("user_id").and_then(id_string),
    })
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_780_000_000, 0).unwrap()
    }

    fn secret() -> SecretString {
        SecretString::from("client-secret")
    }

    fn sign(claims: &Value, key: &str, alg: Algorithm) -> String {
        jsonwebtoken::encode(
            &Header::new(alg),
            claims,
            &EncodingKey::from_secret(key.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn a_valid_token_yields_user_and_company() {
        let t = sign(
            &json!({"userId": 123, "companyId": 456, "iat": now().timestamp(), "exp": now().timestamp() + 300}),
            "client-secret",
            Algorithm::HS256,
        );
        let c = verify_extension_jwt(&t, &secret(), now()).unwrap();
        assert_eq!(c.user_id, "123");
        assert_eq!(c.company_id, "456");
        assert_eq!(c.exp, now().timestamp() + 300);
    }

    #[test]
    fn snake_case_claims_and_string_ids_are_accepted() {
        let t = sign(
            &json!({"user_id": "7", "company_id": "8", "exp": now().timestamp() + 60}),
            "client-secret",
            Algorithm::HS256,
        );
        let c = verify_extension_jwt(&t, &secret(), now()).unwrap();
        assert_eq!((c.user_id.as_str(), c.company_id.as_str()), ("7", "8"));
    }

    #[test]
    fn expired_tokens_are_refused_after_the_leeway() {
        let exp = now().timestamp() - 10;
        let t = sign(
            &json!({"userId": 1, "companyId": 2, "exp": exp}),
            "client-secret",
            Algorithm::HS256,
        );
        assert!(
            verify_extension_jwt(&t, &secret(), now()).is_ok(),
            "within leeway"
        );
        let t = sign(
            &json!({"userId": 1, "companyId": 2, "exp": now().timestamp() - 600}),
            "client-secret",
            Algorithm::HS256,
        );
        assert!(matches!(
            verify_extension_jwt(&t, &secret(), now()),
            Err(ClickError::Unauthorized(m)) if m.contains("expired")
        ));
    }

    #[test]
    fn wrong_secret_other_algorithm_and_garbage_are_refused() {
        let claims = json!({"userId": 1, "companyId": 2, "exp": now().timestamp() + 60});
        let t = sign(&claims, "another-secret", Algorithm::HS256);
        assert!(matches!(
            verify_extension_jwt(&t, &secret(), now()),
            Err(ClickError::Unauthorized(_))
        ));
        let t = sign(&claims, "client-secret", Algorithm::HS512);
        assert!(matches!(
            verify_extension_jwt(&t, &secret(), now()),
            Err(ClickError::Unauthorized(_))
        ));
        assert!(matches!(
            verify_extension_jwt("not.a.jwt", &secret(), now()),
            Err(ClickError::Unauthorized(_))
        ));
    }

    #[test]
    fn missing_claims_are_refused() {
        for claims in [
            json!({"companyId": 2, "exp": now().timestamp() + 60}),
            json!({"userId": 1, "exp": now().timestamp() + 60}),
            json!({"userId": 1, "companyId": 2}),
            json!({"userId": "x1", "companyId": 2, "exp": now().timestamp() + 60}),
        ] {
            let t = sign(&claims, "client-secret", Algorithm::HS256);
            assert!(
                matches!(
                    verify_extension_jwt(&t, &secret(), now()),
                    Err(ClickError::Unauthorized(_))
                ),
                "{claims}"
            );
        }
    }

    #[test]
    fn click_context_accepts_several_key_names() {
        let c = parse_click_context(&json!({"invoker": "user", "phoneNumber": "+91 98765 43210", "personId": 12, "dealId": "34"})).unwrap();
        assert_eq!(c.phone, "+91 98765 43210");
        assert_eq!(c.person_id.as_deref(), Some("12"));
        assert_eq!(c.deal_id.as_deref(), Some("34"));
        assert_eq!(
            c.keys_seen,
            ["dealId", "invoker", "personId", "phoneNumber"]
        );

        let c = parse_click_context(&json!({"context": {"number": {"value": "098765 43210"}, "person": {"id": 5}, "lead_id": "adf21080-0e10-11eb-879b-05d71fb426ec", "organization": {"id": 9}}})).unwrap();
        assert_eq!(c.phone, "098765 43210");
        assert_eq!(c.person_id.as_deref(), Some("5"));
        assert_eq!(
            c.lead_id.as_deref(),
            Some("adf21080-0e10-11eb-879b-05d71fb426ec")
        );
        assert_eq!(c.org_id.as_deref(), Some("9"));
        assert_eq!(c.deal_id, None);

        let c =
            parse_click_context(&json!({"phone": "+15550001111", "resource": "deal", "id": 77}))
                .unwrap();
        assert_eq!(c.deal_id.as_deref(), Some("77"));
    }

    #[test]
    fn click_context_without_a_number_is_malformed() {
        assert!(matches!(
            parse_click_context(&json!({"personId": 1, "phone": "n/a"})),
            Err(ClickError::Malformed(m)) if m.contains("personId")
        ));
        assert!(parse_click_context(&json!("+91")).is_err());
    }

    fn basic(id: &str, secret: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"))
        )
    }

    const BODY: &[u8] = br#"{"client_id":"cid","company_id":456,"user_id":123,"timestamp":"2026-05-04T09:15:02.000Z"}"#;

    #[test]
    fn uninstall_with_our_credentials_is_honoured() {
        let n =
            verify_uninstall_request(Some(&basic("cid", "client-secret")), BODY, "cid", &secret())
                .unwrap();
        assert_eq!(n.account_id, "456");
        assert_eq!(n.user_id.as_deref(), Some("123"));
    }

    #[test]
    fn uninstall_with_wrong_or_missing_credentials_is_refused() {
        for header in [
            None,
            Some(basic("cid", "wrong")),
            Some(basic("other", "client-secret")),
            Some(basic("cid", "client-secret-and-more")),
            Some("Bearer abc".to_owned()),
            Some("Basic !!!".to_owned()),
        ] {
            assert!(
                matches!(
                    verify_uninstall_request(header.as_deref(), BODY, "cid", &secret()),
                    Err(ClickError::Unauthorized(_))
                ),
                "{header:?}"
            );
        }
        let other = br#"{"client_id":"x","company_id":1}"#;
        assert!(matches!(
            verify_uninstall_request(
                Some(&basic("cid", "client-secret")),
                other,
                "cid",
                &secret()
            ),
            Err(ClickError::Unauthorized(_))
        ));
        assert!(matches!(
            verify_uninstall_request(
                Some(&basic("cid", "client-secret")),
                b"{}",
                "cid",
                &secret()
            ),
            Err(ClickError::Malformed(_))
        ));
    }
}
