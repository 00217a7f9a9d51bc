//! Tenants (one Exotel account each) and their agents. Creation hands out the tenant's API
//! key, webhook secret and flow-URL token exactly once; only hashes and sealed copies are kept.

use anyhow::{Context, bail};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, Set,
    TransactionTrait,
};
use secrecy::SecretString;
use serde::Serialize;

use crate::{
    crypto::{self, Sealer},
    db,
    entities::{agent, agent_crm_user, tenant},
    exotel::ExotelAccount,
    phone,
};

/// What `tenant create` takes.
#[derive(Debug, Clone)]
pub struct NewTenant {
    /// Display name.
    pub name: String,
    /// Exotel account SID.
    pub exotel_sid: String,
    /// Exotel API key.
    pub exotel_api_key: String,
    /// Exotel API token (sealed at rest).
    pub exotel_api_token: String,
    /// Exotel API base; `https://api.exotel.com` when absent.
    pub exotel_api_base: Option<String>,
    /// Default virtual number (CallerId).
    pub caller_id: Option<String>,
    /// Where finished calls are POSTed.
    pub webhook_url: Option<String>,
    /// Region for national numbers; the configured default when absent.
    pub default_region: Option<String>,
}

/// What `tenant create` prints (secrets shown once).
#[derive(Debug, Clone, Serialize)]
pub struct CreatedTenant {
    /// The tenant's id.
    pub tenant_id: String,
    /// Bearer key for `/api/v1/*` (stored hashed).
    pub api_key: String,
    /// Standard Webhooks signing secret, when a webhook URL was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_secret: Option<String>,
    /// Paste into the Connect applet's "Dial whom" URL.
    pub dial_whom_url: String,
    /// Paste into the Passthru applet's URL.
    pub passthru_url: String,
}

/// Validate an http(s) URL given by an operator.
///
/// # Errors
/// Not an absolute http(s) URL.
pub fn validate_http_url(what: &str, value: &str) -> anyhow::Result<String> {
    let url = url::Url::parse(value.trim()).with_context(|| format!("{what} is not a URL"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        bail!("{what} must be an http(s) URL with a host");
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

/// The flow webhook URLs for a flow token.
#[must_use]
pub fn flow_urls(public_base: &str, flow_token: &str) -> (String, String) {
    (
        format!("{public_base}/hooks/exotel/flow/{flow_token}/dial-whom"),
        format!("{public_base}/hooks/exotel/flow/{flow_token}/passthru"),
    )
}

/// Create a tenant.
///
/// # Errors
/// Invalid input (named) or a database failure.
pub async fn create(
    db: &DatabaseConnection,
    sealer: &Sealer,
    public_base: &str,
    fallback_region: &str,
    t: NewTenant,
) -> anyhow::Result<CreatedTenant> {
    let name = t.name.trim();
    if name.is_empty() || name.len() > 200 {
        bail!("--name must be 1 to 200 characters");
    }
    for (what, v) in [
        ("--exotel-sid", &t.exotel_sid),
        ("--exotel-api-key", &t.exotel_api_key),
        ("--exotel-api-token", &t.exotel_api_token),
    ] {
        if v.trim().is_empty() || v.len() > 200 || v.chars().any(char::is_whitespace) {
            bail!("{what} must be a non-empty value without spaces");
        }
    }
    let api_base = validate_http_url(
        "--exotel-api-base",
        t.exotel_api_base
            .as_deref()
            .unwrap_or("https://api.exotel.com"),
    )?;
    let region = t
        .default_region
        .unwrap_or_else(|| fallback_region.to_owned())
        .to_ascii_uppercase();
    phone::region(&region).map_err(anyhow::Error::msg)?;
    let caller_id = t
        .caller_id
        .as_deref()
        .map(|n| phone::to_e164(n, &region).map_err(|e| anyhow::anyhow!("--caller-id {e}")))
        .transpose()?;
    let webhook_url = t
        .webhook_url
        .as_deref()
        .map(|u| validate_http_url("--webhook-url", u))
        .transpose()?;

    let tenant_id = format!("ten_{}", uuid::Uuid::now_v7().simple());
    let api_key = crypto::random_token("cb_", 24);
    let flow_token = crypto::random_token("", 24);
    let webhook_secret = webhook_url.as_ref().map(|_| crypto::webhook_secret());
    let now = db::now_ms();
    let turn = db::write_turn(db).await;
    tenant::ActiveModel {
        id: Set(tenant_id.clone()),
        name: Set(name.to_owned()),
        exotel_sid: Set(t.exotel_sid.trim().to_owned()),
        exotel_api_key: Set(t.exotel_api_key.trim().to_owned()),
        exotel_api_token_sealed: Set(sealer.seal(t.exotel_api_token.trim())),
        exotel_api_base: Set(api_base),
        caller_id: Set(caller_id),
        default_region: Set(region),
        record: Set(true),
        time_limit: Set(None),
        time_out: Set(None),
        wait_url: Set(None),
        webhook_url: Set(webhook_url),
        webhook_secret_sealed: Set(webhook_secret.as_deref().map(|s| sealer.seal(s))),
        api_key_hash: Set(crypto::token_hash(&api_key)),
        api_key_last4: Set(crypto::last4(&api_key)),
        flow_token_hash: Set(crypto::token_hash(&flow_token)),
        flow_token_sealed: Set(sealer.seal(&flow_token)),
        created_at: Set(now),
        updated_at: Set(now),
    }
    .insert(db)
    .await
    .context("storing the tenant")?;
    drop(turn);
    let (dial_whom_url, passthru_url) = flow_urls(public_base, &flow_token);
    Ok(CreatedTenant {
        tenant_id,
        api_key,
        webhook_secret,
        dial_whom_url,
        passthru_url,
    })
}

/// The tenant holding this API key.
///
/// # Errors
/// Database failure.
pub async fn by_api_key(
    db: &DatabaseConnection,
    api_key: &str,
) -> Result<Option<tenant::Model>, sea_orm::DbErr> {
    tenant::Entity::find()
        .filter(tenant::Column::ApiKeyHash.eq(crypto::token_hash(api_key)))
        .one(db)
        .await
}

/// The tenant's Exotel account with its token opened.
///
/// # Errors
/// The sealed token does not open with this master key.
pub fn exotel_account(sealer: &Sealer, t: &tenant::Model) -> anyhow::Result<ExotelAccount> {
    Ok(ExotelAccount {
        api_base: t.exotel_api_base.clone(),
        sid: t.exotel_sid.clone(),
        api_key: t.exotel_api_key.clone(),
        api_token: SecretString::from(
            sealer
                .open(&t.exotel_api_token_sealed)
                .context("opening the tenant's Exotel token")?,
        ),
    })
}

/// What `agent add` takes.
#[derive(Debug, Clone)]
pub struct NewAgent {
    /// Tenant id.
    pub tenant_id: String,
    /// The agent's real phone.
    pub phone: String,
    /// Display name.
    pub name: Option<String>,
    /// `connector:user_id` pairs.
    pub crm_users: Vec<String>,
}

/// Add an agent (idempotent on tenant + phone: a second add updates name and mappings).
///
/// # Errors
/// Unknown tenant, bad phone, bad mapping, database failure.
pub async fn add_agent(db: &DatabaseConnection, a: NewAgent) -> anyhow::Result<agent::Model> {
    let Some(t) = tenant::Entity::find_by_id(a.tenant_id.clone())
        .one(db)
        .await?
    else {
        bail!("no tenant {}", a.tenant_id);
    };
    let phone =
        phone::to_e164(&a.phone, &t.default_region).map_err(|e| anyhow::anyhow!("--phone {e}"))?;
    let mut mappings = Vec::new();
    for m in &a.crm_users {
        let Some((connector, user)) = m.split_once(':') else {
            bail!("--crm-user must look like CONNECTOR:USER_ID, got {m:?}");
        };
        let connector = connector.trim().to_ascii_lowercase();
        if connector.is_empty()
            || user.trim().is_empty()
            || !connector
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            bail!("--crm-user must look like CONNECTOR:USER_ID, got {m:?}");
        }
        mappings.push((connector, user.trim().to_owned()));
    }
    let txn = db.begin().await?;
    let existing = agent::Entity::find()
        .filter(agent::Column::TenantId.eq(&t.id))
        .filter(agent::Column::Phone.eq(&phone))
        .one(&txn)
        .await?;
    let model = match existing {
        Some(m) => {
            let mut am: agent::ActiveModel = m.into();
            if a.name.is_some() {
                am.name = Set(a.name.clone());
            }
            am.update(&txn).await?
        }
        None => {
            agent::ActiveModel {
                id: Set(format!("agt_{}", uuid::Uuid::now_v7().simple())),
                tenant_id: Set(t.id.clone()),
                name: Set(a.name.clone()),
                phone: Set(phone),
                created_at: Set(db::now_ms()),
            }
            .insert(&txn)
            .await?
        }
    };
    for (connector, user) in mappings {
        agent_crm_user::Entity::delete_many()
            .filter(agent_crm_user::Column::TenantId.eq(&t.id))
            .filter(agent_crm_user::Column::Connector.eq(&connector))
            .filter(agent_crm_user::Column::CrmUserId.eq(&user))
            .exec(&txn)
            .await?;
        agent_crm_user::ActiveModel {
            tenant_id: Set(t.id.clone()),
            connector: Set(connector),
            crm_user_id: Set(user),
            agent_id: Set(model.id.clone()),
        }
        .insert(&txn)
        .await?;
    }
    txn.commit().await?;
    Ok(model)
}
