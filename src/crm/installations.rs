//! A tenant's CRM installations: one row per (tenant, connector), tokens sealed with the
//! master key, the per-install API base and OAuth values stored beside them.
//!
//! Rules:
//! - tokens are only ever stored sealed and only opened in [`super::tokens`];
//! - one CRM account (Pipedrive company, Salesforce org …) belongs to one tenant: a second
//!   tenant installing the same account is refused, so clicks and uninstall notices that name
//!   the account reach exactly one tenant;
//! - reconnecting keeps the installation's id and settings and bumps `token_version`.

use callbridge_connector::{CrmRecordRef, InstallContext, InstallVars, TokenSet};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, QueryResult};
use serde::{Deserialize, Serialize};

use crate::{
    AppState,
    db::{self, stmt},
};

/// What to do with a call whose customer number matches no CRM record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownNumberRule {
    /// Log nothing (the default: lookups never create anything).
    Nothing,
    /// Create a contact/lead for the number, then log on it.
    Create,
    /// Attach the log to one configured record.
    DefaultRecord,
}

impl UnknownNumberRule {
    /// The stored form.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Nothing => "nothing",
            Self::Create => "create",
            Self::DefaultRecord => "default_record",
        }
    }

    /// Parse the stored form.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "nothing" => Some(Self::Nothing),
            "create" => Some(Self::Create),
            "default_record" => Some(Self::DefaultRecord),
            _ => None,
        }
    }
}

/// One installation row.
#[derive(Debug, Clone)]
pub struct Installation {
    /// `ins_…`.
    pub id: String,
    /// Owning tenant.
    pub tenant_id: String,
    /// Connector name.
    pub connector: String,
    /// `active` or `broken` (reconnect needed).
    pub status: String,
    /// The CRM account id.
    pub account_id: Option<String>,
    /// The per-install API base.
    pub api_base: String,
    /// Per-install OAuth values (JSON object).
    pub vars: String,
    /// Connector settings (JSON object).
    pub settings: String,
    /// Sealed access token.
    pub access_token_sealed: String,
    /// Sealed refresh token.
    pub refresh_token_sealed: Option<String>,
    /// Access-token expiry, Unix ms.
    pub expires_at: Option<i64>,
    /// Grows on every token change.
    pub token_version: i32,
    /// Last refresh, Unix ms.
    pub last_refresh_at: Option<i64>,
    /// Latest problem (shown to admins).
    pub last_error: Option<String>,
    /// When it happened, Unix ms.
    pub last_error_at: Option<i64>,
    /// Unknown-number rule.
    pub unknown_number_rule: UnknownNumberRule,
    /// The record calls go to under [`UnknownNumberRule::DefaultRecord`].
    pub default_record: Option<CrmRecordRef>,
    /// Admin who installed (email).
    pub installed_by: Option<String>,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms.
    pub updated_at: i64,
}

const COLUMNS: &str = "id, tenant_id, connector, status, account_id, api_base, vars, settings, \
    access_token_sealed, refresh_token_sealed, expires_at, token_version, last_refresh_at, \
    last_error, last_error_at, unknown_number_rule, default_record, installed_by, created_at, \
    updated_at";

impl Installation {
    fn from_row(r: &QueryResult) -> Result<Self, DbErr> {
        let rule: String = r.try_get("", "unknown_number_rule")?;
        let default_record: Option<String> = r.try_get("", "default_record")?;
        Ok(Self {
            id: r.try_get("", "id")?,
            tenant_id: r.try_get("", "tenant_id")?,
            connector: r.try_get("", "connector")?,
            status: r.try_get("", "status")?,
            account_id: r.try_get("", "account_id")?,
            api_base: r.try_get("", "api_base")?,
            vars: r.try_get("", "vars")?,
            settings: r.try_get("", "settings")?,
            access_token_sealed: r.try_get("", "access_token_sealed")?,
            refresh_token_sealed: r.try_get("", "refresh_token_sealed")?,
            expires_at: r.try_get("", "expires_at")?,
            token_version: r.try_get("", "token_version")?,
            last_refresh_at: r.try_get("", "last_refresh_at")?,
            last_error: r.try_get("", "last_error")?,
            last_error_at: r.try_get("", "last_error_at")?,
            unknown_number_rule: UnknownNumberRule::parse(&rule)
                .unwrap_or(UnknownNumberRule::Nothing),
            default_record: default_record.and_then(|d| serde_json::from_str(&d).ok()),
            installed_by: r.try_get("", "installed_by")?,
            created_at: r.try_get("", "created_at")?,
            updated_at: r.try_get("", "updated_at")?,
        })
    }

    /// What the connector needs for a request (no tokens).
    #[must_use]
    pub fn context(&self) -> InstallContext {
        InstallContext {
            installation_id: self.id.clone(),
            api_base: self.api_base.clone(),
            account_id: self.account_id.clone(),
            vars: serde_json::from_str(&self.vars).unwrap_or_default(),
            settings: serde_json::from_str(&self.settings).unwrap_or(serde_json::Value::Null),
        }
    }

    /// Whether write-back and clicks may use it.
    #[must_use]
    pub fn is_active(&self) -> bool {
        self.status == "active"
    }
}

async fn one(
    db: &impl ConnectionTrait,
    where_sql: &str,
    values: Vec<sea_orm::Value>,
) -> Result<Option<Installation>, DbErr> {
    let sql = format!("SELECT {COLUMNS} FROM installations WHERE {where_sql}");
    db.query_one_raw(stmt(db.get_database_backend(), &sql, values))
        .await?
        .map(|r| Installation::from_row(&r))
        .transpose()
}

/// The installation `id`.
///
/// # Errors
/// Database failure.
pub async fn get(db: &impl ConnectionTrait, id: &str) -> Result<Option<Installation>, DbErr> {
    one(db, "id = ?", vec![id.into()]).await
}

/// The tenant's installation of `connector`.
///
/// # Errors
/// Database failure.
pub async fn for_tenant(
    db: &impl ConnectionTrait,
    tenant_id: &str,
    connector: &str,
) -> Result<Option<Installation>, DbErr> {
    one(
        db,
        "tenant_id = ? AND connector = ?",
        vec![tenant_id.into(), connector.into()],
    )
    .await
}

/// The installation of `connector` for the CRM account `account_id`.
///
/// # Errors
/// Database failure.
pub async fn by_account(
    db: &impl ConnectionTrait,
    connector: &str,
    account_id: &str,
) -> Result<Option<Installation>, DbErr> {
    one(
        db,
        "connector = ? AND account_id = ?",
        vec![connector.into(), account_id.into()],
    )
    .await
}

/// Every installation of a tenant.
///
/// # Errors
/// Database failure.
pub async fn list(db: &DatabaseConnection, tenant_id: &str) -> Result<Vec<Installation>, DbErr> {
    let sql = format!("SELECT {COLUMNS} FROM installations WHERE tenant_id = ? ORDER BY connector");
    db.query_all_raw(stmt(
        db.get_database_backend(),
        &sql,
        vec![tenant_id.into()],
    ))
    .await?
    .iter()
    .map(Installation::from_row)
    .collect()
}

/// Why an install could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The CRM account is connected to another tenant.
    #[error(
        "this {0} account is already connected to another callbridge tenant; uninstall it there first"
    )]
    AccountTaken(String),
    /// The token response carried no API base.
    #[error("the CRM did not say which API host to use for this account")]
    NoApiBase,
    /// Database failure.
    #[error(transparent)]
    Db(#[from] DbErr),
}

/// What an install stores.
#[derive(Debug)]
pub struct NewInstall<'a> {
    /// Tenant.
    pub tenant_id: &'a str,
    /// Connector name.
    pub connector: &'a str,
    /// Validated per-install values.
    pub vars: &'a InstallVars,
    /// The token exchange's result.
    pub tokens: &'a TokenSet,
    /// The CRM account id (from [`callbridge_connector::Connector::account_id`]).
    pub account_id: Option<&'a str>,
    /// The admin's email.
    pub installed_by: &'a str,
}

/// Store a new install, or replace the tokens of the tenant's existing one (reconnect).
///
/// # Errors
/// [`InstallError`].
pub async fn upsert(state: &AppState, new: NewInstall<'_>) -> Result<Installation, InstallError> {
    let db = &state.db;
    let backend = db.get_database_backend();
    let api_base = new.tokens.api_base.clone().ok_or(InstallError::NoApiBase)?;
    let txn = db::begin_write(db).await?;
    if let Some(account) = new.account_id
        && let Some(other) = by_account(&*txn, new.connector, account).await?
        && other.tenant_id != new.tenant_id
    {
        txn.rollback().await?;
        return Err(InstallError::AccountTaken(super::display_name(
            new.connector,
        )));
    }
    let now = db::now_ms();
    let id = format!("ins_{}", uuid::Uuid::now_v7().simple());
    let access = state.sealer.seal(&new.tokens.access_token.0);
    let refresh = new
        .tokens
        .refresh_token
        .as_ref()
        .map(|r| state.sealer.seal(&r.0));
    let vars = serde_json::to_string(new.vars).unwrap_or_else(|_| "{}".into());
    let expires = new.tokens.expires_at.map(|t| t.timestamp_millis());
    txn.execute_raw(stmt(
        backend,
        "INSERT INTO installations (id, tenant_id, connector, status, account_id, api_base, vars, \
         settings, access_token_sealed, refresh_token_sealed, expires_at, token_version, \
         unknown_number_rule, installed_by, created_at, updated_at) \
         VALUES (?, ?, ?, 'active', ?, ?, ?, '{}', ?, ?, ?, 1, 'nothing', ?, ?, ?) \
         ON CONFLICT (tenant_id, connector) DO UPDATE SET status = 'active', \
         account_id = excluded.account_id, api_base = excluded.api_base, vars = excluded.vars, \
         access_token_sealed = excluded.access_token_sealed, \
         refresh_token_sealed = excluded.refresh_token_sealed, expires_at = excluded.expires_at, \
         token_version = installations.token_version + 1, refresh_lease_until = NULL, \
         refresh_lease_owner = NULL, last_error = NULL, last_error_at = NULL, \
         installed_by = excluded.installed_by, updated_at = excluded.updated_at",
        vec![
            id.into(),
            new.tenant_id.into(),
            new.connector.into(),
            new.account_id.map(str::to_owned).into(),
            api_base.into(),
            vars.into(),
            access.into(),
            refresh.into(),
            expires.into(),
            new.installed_by.into(),
            now.into(),
            now.into(),
        ],
    ))
    .await?;
    let stored = for_tenant(&*txn, new.tenant_id, new.connector)
        .await?
        .ok_or_else(|| DbErr::Custom("installation vanished".into()))?;
    txn.commit().await?;
    Ok(stored)
}

/// Record a problem; `broken` marks the install as needing a reconnect.
///
/// # Errors
/// Database failure.
pub async fn record_error(
    db: &DatabaseConnection,
    id: &str,
    error: &str,
    broken: bool,
) -> Result<(), DbErr> {
    let now = db::now_ms();
    let sql = if broken {
        "UPDATE installations SET status = 'broken', last_error = ?, last_error_at = ?, \
         updated_at = ? WHERE id = ?"
    } else {
        "UPDATE installations SET last_error = ?, last_error_at = ?, updated_at = ? WHERE id = ?"
    };
    db::execute_write(
        db,
        stmt(
            db.get_database_backend(),
            sql,
            vec![error.into(), now.into(), now.into(), id.into()],
        ),
    )
    .await?;
    Ok(())
}

/// Set the unknown-number rule (and the default record it may need).
///
/// # Errors
/// Database failure.
pub async fn set_rule(
    db: &DatabaseConnection,
    tenant_id: &str,
    id: &str,
    rule: UnknownNumberRule,
    default_record: Option<&CrmRecordRef>,
) -> Result<bool, DbErr> {
    let record = default_record.and_then(|r| serde_json::to_string(r).ok());
    let r = db::execute_write(
        db,
        stmt(
            db.get_database_backend(),
            "UPDATE installations SET unknown_number_rule = ?, default_record = ?, updated_at = ? \
             WHERE id = ? AND tenant_id = ?",
            vec![
                rule.as_str().into(),
                record.into(),
                db::now_ms().into(),
                id.into(),
                tenant_id.into(),
            ],
        ),
    )
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Delete an installation and its tokens. Pending write-back jobs for it end as dead letters
/// when they run ("installation removed").
///
/// # Errors
/// Database failure.
pub async fn delete(db: &DatabaseConnection, id: &str) -> Result<bool, DbErr> {
    let r = db::execute_write(
        db,
        stmt(
            db.get_database_backend(),
            "DELETE FROM installations WHERE id = ?",
            vec![id.into()],
        ),
    )
    .await?;
    Ok(r.rows_affected() == 1)
}
