//! Playable recording links. Exotel's recordings have been private since October 2024 (a
//! `RecordingUrl` only plays with the account's API credentials), so what callbridge hands to
//! webhooks and CRMs is its own link, `{public_url}/recordings/{token}`, which streams the file
//! from Exotel with the tenant's credentials ([`proxy`]) and only from allow-listed hosts
//! ([`allow`]).
//!
//! Design: a stored random token, not a stateless signed one. The link must be revocable one
//! call at a time and tenant-wide, and its expiry follows a per-tenant policy; a signed token
//! would still need a database row per link for revocation (and the call row for the upstream
//! URL), so signing buys nothing and makes the link longer. Each link is 192 random bits; the
//! table keeps its SHA-256 (lookup) and a sealed copy, so [`link_for_call`] can hand the *same*
//! link to every sink (webhook retries, CRM updates) until it is revoked or expires, and a
//! leaked database alone yields no playable link.
//!
//! Rules: one current link per call (`current_call_id` unique; get-or-create is race-free on
//! both backends); `expires_at` is fixed when a link is made from the tenant's TTL policy (or
//! the configured default) and a policy change applies to new links unless the caller asks for
//! it to apply to current ones; revoked and expired links answer 410, unknown ones 404; after a
//! revocation or expiry the next get-or-create makes a fresh link.
//!
//! Entry points:
//! - write-back composers: [`link_for_call`]`(&state, &call) -> anyhow::Result<Option<String>>`
//!   (the webhook sink uses it; CRM sinks should too, so a CRM log never holds Exotel's raw
//!   URL, which does not play without credentials);
//! - tenant API: `POST|DELETE /api/v1/calls/{id}/recording-link` ([`get_or_create`],
//!   [`revoke_call`]);
//! - admin console: [`set_policy`]`(&state, tenant_id, LinkTtl, apply_to_current) ->
//!   Result<bool, ApiError>`, [`policy`]`(&db, tenant_id)`, [`revoke_all`]`(&db, tenant_id)`;
//! - configuration: `CALLBRIDGE_RECORDING_HOSTS` (allow-list), `CALLBRIDGE_RECORDING_LINK_TTL_SECS`
//!   (default lifetime; unset = never), `CALLBRIDGE_RECORDING_ALLOW_LOOPBACK_HTTP` (tests, demo).

pub mod allow;
pub mod proxy;

use chrono::{DateTime, Utc};
use sea_orm::{ColumnTrait, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait, QueryFilter};
use serde::Serialize;

use crate::{
    AppState, crypto,
    db::{self, stmt},
    entities::{call, tenant},
    error::ApiError,
};

/// Every link token starts with this.
pub const TOKEN_PREFIX: &str = "rec_";
/// Random bytes in a token (192 bits).
const TOKEN_BYTES: usize = 24;
/// Longest TTL a tenant may set: ten years.
pub const MAX_TTL_SECS: u64 = 10 * 365 * 24 * 3600;

/// A link as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Link {
    /// The playable URL.
    pub url: String,
    /// When it stops working (RFC 3339 UTC); `null` = never.
    pub expires_at: Option<DateTime<Utc>>,
}

/// A tenant's link lifetime policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "ttl", content = "seconds")]
pub enum LinkTtl {
    /// Use `CALLBRIDGE_RECORDING_LINK_TTL_SECS` (the default for every tenant).
    Inherit,
    /// Links never expire.
    Never,
    /// Links expire this many seconds after they are made (1 ..= [`MAX_TTL_SECS`]).
    Seconds(u64),
}

impl LinkTtl {
    /// The lifetime this policy gives a new link under `config_default`; `None` = never expires.
    #[must_use]
    pub fn effective(self, config_default: Option<u64>) -> Option<u64> {
        match self {
            Self::Inherit => config_default,
            Self::Never => None,
            Self::Seconds(s) => Some(s),
        }
    }
}

/// What a token resolves to.
#[derive(Debug)]
pub enum Resolved {
    /// A live link: the call and its tenant.
    Live {
        /// The tenant.
        tenant: Box<tenant::Model>,
        /// The call.
        call: Box<call::Model>,
    },
    /// Revoked at (Unix ms).
    Revoked(i64),
    /// Expired at (Unix ms).
    Expired(i64),
    /// Malformed, unknown, or its call is gone.
    Unknown,
}

/// Whether `token` has the shape of a link token (checked before any lookup).
#[must_use]
pub fn well_formed(token: &str) -> bool {
    token.strip_prefix(TOKEN_PREFIX).is_some_and(|rest| {
        rest.len() == TOKEN_BYTES.div_ceil(3) * 4
            && rest
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

fn url_for(public_base: &str, token: &str) -> String {
    format!("{public_base}/recordings/{token}")
}

fn ms_to_time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// The stable public link for a call that has a recording (creating it on first use); `None`
/// when the call has no recording. This is what the write-back composer puts in
/// `CallRecord::recording_url`.
///
/// # Errors
/// Database failure, or a stored token that does not open with the master key.
pub async fn link_for_call(state: &AppState, c: &call::Model) -> anyhow::Result<Option<String>> {
    Ok(get_or_create(state, c).await?.map(|l| l.url))
}

/// Like [`link_for_call`], with the link's expiry.
///
/// # Errors
/// As [`link_for_call`].
pub async fn get_or_create(state: &AppState, c: &call::Model) -> anyhow::Result<Option<Link>> {
    if c.recording_url.as_deref().is_none_or(str::is_empty) {
        return Ok(None);
    }
    let db = &state.db;
    let backend = db.get_database_backend();
    let now = db::now_ms();
    let current = |conn_now: i64| {
        stmt(
            backend,
            "SELECT token_sealed, expires_at FROM recording_links WHERE current_call_id = ? \
             AND tenant_id = ? AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?)",
            vec![
                c.id.clone().into(),
                c.tenant_id.clone().into(),
                conn_now.into(),
            ],
        )
    };
    // Fast path: the link already exists (every retry and every later sink).
    if let Some(row) = db.query_one_raw(current(now)).await? {
        return Ok(Some(link_from_row(state, &row)?));
    }

    let token = crypto::random_token(TOKEN_PREFIX, TOKEN_BYTES);
    let txn = db::begin_write(db).await?;
    // First statement writes (SQLite takes the lock here): retire an expired current link so a
    // fresh one can take its place.
    txn.execute_raw(stmt(
        backend,
        "UPDATE recording_links SET current_call_id = NULL WHERE current_call_id = ? \
         AND expires_at IS NOT NULL AND expires_at <= ?",
        vec![c.id.clone().into(), now.into()],
    ))
    .await?;
    let ttl = tenant_ttl(&*txn, &c.tenant_id)
        .await?
        .unwrap_or(LinkTtl::Inherit)
        .effective(state.config.recording_link_ttl_secs);
    let expires_at =
        ttl.map(|s| now.saturating_add(i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX)));
    txn.execute_raw(stmt(
        backend,
        "INSERT INTO recording_links (id, token_hash, token_sealed, tenant_id, call_id, \
         current_call_id, created_at, expires_at, revoked_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL) \
         ON CONFLICT (current_call_id) DO NOTHING",
        vec![
            format!("rlk_{}", uuid::Uuid::now_v7().simple()).into(),
            crypto::token_hash(&token).into(),
            state.sealer.seal(&token).into(),
            c.tenant_id.clone().into(),
            c.id.clone().into(),
            c.id.clone().into(),
            now.into(),
            expires_at.into(),
        ],
    ))
    .await?;
    // Ours, or the one a concurrent request committed first.
    let row = txn.query_one_raw(current(now)).await?;
    txn.commit().await?;
    let row = row.ok_or_else(|| anyhow::anyhow!("the call's recording link vanished"))?;
    Ok(Some(link_from_row(state, &row)?))
}

fn link_from_row(state: &AppState, row: &sea_orm::QueryResult) -> anyhow::Result<Link> {
    let sealed: String = row.try_get("", "token_sealed")?;
    let expires_at: Option<i64> = row.try_get("", "expires_at")?;
    let token = state.sealer.open(&sealed)?;
    Ok(Link {
        url: url_for(&state.public_base, &token),
        expires_at: expires_at.map(ms_to_time),
    })
}

async fn tenant_ttl(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
) -> Result<Option<LinkTtl>, DbErr> {
    let backend = conn.get_database_backend();
    let Some(row) = conn
        .query_one_raw(stmt(
            backend,
            "SELECT recording_link_ttl_inherit, recording_link_ttl_secs FROM tenants WHERE id = ?",
            vec![tenant_id.to_owned().into()],
        ))
        .await?
    else {
        return Ok(None);
    };
    let inherit: bool = row.try_get("", "recording_link_ttl_inherit")?;
    let secs: Option<i64> = row.try_get("", "recording_link_ttl_secs")?;
    Ok(Some(match (inherit, secs) {
        (true, _) => LinkTtl::Inherit,
        (false, None) => LinkTtl::Never,
        (false, Some(s)) => LinkTtl::Seconds(u64::try_from(s).unwrap_or(0)),
    }))
}

/// A tenant's link policy; `None` when there is no such tenant.
///
/// # Errors
/// Database failure.
pub async fn policy(db: &DatabaseConnection, tenant_id: &str) -> Result<Option<LinkTtl>, DbErr> {
    tenant_ttl(db, tenant_id).await
}

/// Set a tenant's link lifetime (the admin console's "recording links" setting):
/// `set_policy(&state, tenant_id, LinkTtl::Seconds(86_400), false).await`. New links get the
/// new lifetime; with `apply_to_current`, the tenant's current links are re-timed from their
/// creation too (shortening can expire them at once). Returns `false` when there is no such
/// tenant.
///
/// # Errors
/// 422 for a TTL outside 1 ..= ten years; database failure.
pub async fn set_policy(
    state: &AppState,
    tenant_id: &str,
    ttl: LinkTtl,
    apply_to_current: bool,
) -> Result<bool, ApiError> {
    if let LinkTtl::Seconds(s) = ttl
        && !(1..=MAX_TTL_SECS).contains(&s)
    {
        return Err(ApiError::validation(
            "ttl",
            format!("a recording link lifetime must be 1 to {MAX_TTL_SECS} seconds"),
        ));
    }
    let (inherit, secs) = match ttl {
        LinkTtl::Inherit => (true, None),
        LinkTtl::Never => (false, None),
        LinkTtl::Seconds(s) => (false, Some(i64::try_from(s).unwrap_or(i64::MAX))),
    };
    let db = &state.db;
    let backend = db.get_database_backend();
    let now = db::now_ms();
    let txn = db::begin_write(db).await?;
    let updated = txn
        .execute_raw(stmt(
            backend,
            "UPDATE tenants SET recording_link_ttl_inherit = ?, recording_link_ttl_secs = ?, \
             updated_at = ? WHERE id = ?",
            vec![
                inherit.into(),
                secs.into(),
                now.into(),
                tenant_id.to_owned().into(),
            ],
        ))
        .await?;
    if updated.rows_affected() == 0 {
        txn.rollback().await?;
        return Ok(false);
    }
    if apply_to_current {
        retime(
            &*txn,
            tenant_id,
            ttl.effective(state.config.recording_link_ttl_secs),
        )
        .await?;
    }
    txn.commit().await?;
    Ok(true)
}

async fn retime(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    ttl_secs: Option<u64>,
) -> Result<u64, DbErr> {
    let backend = conn.get_database_backend();
    let r = match ttl_secs {
        None => {
            conn.execute_raw(stmt(
                backend,
                "UPDATE recording_links SET expires_at = NULL WHERE tenant_id = ? \
                 AND current_call_id IS NOT NULL",
                vec![tenant_id.to_owned().into()],
            ))
            .await?
        }
        Some(s) => {
            conn.execute_raw(stmt(
                backend,
                "UPDATE recording_links SET expires_at = created_at + ? WHERE tenant_id = ? \
                 AND current_call_id IS NOT NULL",
                vec![
                    i64::try_from(s.saturating_mul(1000))
                        .unwrap_or(i64::MAX / 2)
                        .into(),
                    tenant_id.to_owned().into(),
                ],
            ))
            .await?
        }
    };
    Ok(r.rows_affected())
}

/// Revoke every link of one call (they answer 410 from now on; the next get-or-create makes a
/// new one). Returns how many were revoked.
///
/// # Errors
/// Database failure.
pub async fn revoke_call(
    db: &DatabaseConnection,
    tenant_id: &str,
    call_id: &str,
) -> Result<u64, DbErr> {
    let r = db::execute_write(
        db,
        stmt(
            db.get_database_backend(),
            "UPDATE recording_links SET revoked_at = ?, current_call_id = NULL \
             WHERE tenant_id = ? AND call_id = ? AND revoked_at IS NULL",
            vec![
                db::now_ms().into(),
                tenant_id.to_owned().into(),
                call_id.to_owned().into(),
            ],
        ),
    )
    .await?;
    Ok(r.rows_affected())
}

/// Revoke every recording link a tenant has (e.g. after a link leaked). Returns how many.
///
/// # Errors
/// Database failure.
pub async fn revoke_all(db: &DatabaseConnection, tenant_id: &str) -> Result<u64, DbErr> {
    let r = db::execute_write(
        db,
        stmt(
            db.get_database_backend(),
            "UPDATE recording_links SET revoked_at = ?, current_call_id = NULL \
             WHERE tenant_id = ? AND revoked_at IS NULL",
            vec![db::now_ms().into(), tenant_id.to_owned().into()],
        ),
    )
    .await?;
    Ok(r.rows_affected())
}

/// Look a token up: the live call it plays, or why it does not.
///
/// # Errors
/// Database failure.
pub async fn resolve(db: &DatabaseConnection, token: &str) -> Result<Resolved, DbErr> {
    if !well_formed(token) {
        return Ok(Resolved::Unknown);
    }
    let Some(row) = db
        .query_one_raw(stmt(
            db.get_database_backend(),
            "SELECT tenant_id, call_id, expires_at, revoked_at FROM recording_links \
             WHERE token_hash = ?",
            vec![crypto::token_hash(token).into()],
        ))
        .await?
    else {
        return Ok(Resolved::Unknown);
    };
    let tenant_id: String = row.try_get("", "tenant_id")?;
    let call_id: String = row.try_get("", "call_id")?;
    let expires_at: Option<i64> = row.try_get("", "expires_at")?;
    let revoked_at: Option<i64> = row.try_get("", "revoked_at")?;
    if let Some(at) = revoked_at {
        return Ok(Resolved::Revoked(at));
    }
    if let Some(at) = expires_at
        && at <= db::now_ms()
    {
        return Ok(Resolved::Expired(at));
    }
    let (t, c) = tokio::try_join!(
        tenant::Entity::find_by_id(tenant_id.clone()).one(db),
        call::Entity::find_by_id(call_id)
            .filter(call::Column::TenantId.eq(tenant_id))
            .one(db),
    )?;
    Ok(match (t, c) {
        (Some(t), Some(c)) => Resolved::Live {
            tenant: Box::new(t),
            call: Box::new(c),
        },
        _ => Resolved::Unknown,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked_for_shape() {
        let t = crypto::random_token(TOKEN_PREFIX, TOKEN_BYTES);
        assert!(well_formed(&t), "{t}");
        assert!(!well_formed("rec_short"));
        assert!(!well_formed(&t.replace("rec_", "ct_x")));
        assert!(!well_formed(&format!("{t}A")));
        assert!(!well_formed(&format!("rec_{}", "/".repeat(32))));
    }

    #[test]
    fn ttl_policy_resolves_against_the_default() {
        assert_eq!(LinkTtl::Inherit.effective(Some(60)), Some(60));
        assert_eq!(LinkTtl::Inherit.effective(None), None);
        assert_eq!(LinkTtl::Never.effective(Some(60)), None);
        assert_eq!(LinkTtl::Seconds(5).effective(None), Some(5));
    }
}
