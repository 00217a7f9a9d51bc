//! The connector host: which CRM connectors run ([`Registry`]), their installations per tenant
//! ([`installations`]), token custody with single-flight refresh ([`tokens`]), the OAuth install
//! routes ([`oauth`]), CRM-initiated requests — relayed clicks and uninstall notices —
//! ([`inbound`]) and the write-back job ([`writeback`]).
//!
//! Connectors live in their own crates (`connectors/*`) and know nothing of the database or
//! axum; everything per installation is passed to them as an
//! [`callbridge_connector::InstallContext`].

pub mod inbound;
pub mod installations;
pub mod oauth;
pub mod tokens;
pub mod writeback;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use callbridge_connector::Connector;
use sea_orm::{ConnectionTrait, DbErr};

use crate::{config::Config, db::stmt};

/// The connectors this process runs, by name.
#[derive(Clone, Default)]
pub struct Registry {
    connectors: BTreeMap<&'static str, Arc<dyn Connector>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.connectors.keys()).finish()
    }
}

impl Registry {
    /// The connectors enabled by configuration (see [`Config::enabled_connectors`]).
    ///
    /// # Errors
    /// A connector enabled without its credentials.
    pub fn from_config(config: &Config, http: &reqwest::Client) -> anyhow::Result<Self> {
        let mut registry = Self::default();
        for name in config.enabled_connectors()? {
            if name == callbridge_pipedrive::NAME {
                let (Some(id), Some(secret)) = (
                    config.pipedrive_client_id.clone(),
                    config.pipedrive_client_secret.clone(),
                ) else {
                    anyhow::bail!("pipedrive is enabled without its client credentials");
                };
                let mut pd = callbridge_pipedrive::PipedriveConfig::new(id, secret);
                pd.oauth_base.clone_from(&config.pipedrive_oauth_base);
                pd.api_hosts.clone_from(&config.pipedrive_api_hosts);
                pd.jwt_secret.clone_from(&config.pipedrive_jwt_secret);
                pd.request_timeout = Duration::from_secs(config.crm_timeout_secs);
                registry = registry.with(Arc::new(callbridge_pipedrive::Pipedrive::new(
                    pd,
                    http.clone(),
                )));
            }
        }
        Ok(registry)
    }

    /// Add (or replace) a connector; tests add fakes this way.
    #[must_use]
    pub fn with(mut self, connector: Arc<dyn Connector>) -> Self {
        self.connectors.insert(connector.name(), connector);
        self
    }

    /// The connector called `name`.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Connector>> {
        self.connectors.get(name)
    }

    /// Every connector, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &Arc<dyn Connector>)> {
        self.connectors.iter().map(|(k, v)| (*k, v))
    }
}

/// A connector's display name.
#[must_use]
pub fn display_name(connector: &str) -> String {
    match connector {
        "pipedrive" => "Pipedrive".into(),
        "zoho" => "Zoho CRM".into(),
        "zendesk" => "Zendesk".into(),
        "salesforce" => "Salesforce".into(),
        other => {
            let mut c = other.chars();
            c.next()
                .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
                .unwrap_or_default()
        }
    }
}

/// `FROM … LIMIT 1` of the agent's CRM, with the tenant id and the agent's number bound to the
/// placeholders `tenant` and `agent`: select `i.id` for the installation and `m.crm_user_id`
/// for the agent's user in it.
pub(crate) fn agent_crm_match(tenant: &str, agent: &str) -> String {
    format!(
        "FROM agents a JOIN agent_crm_users m \
         ON m.agent_id = a.id AND m.tenant_id = a.tenant_id JOIN installations i \
         ON i.tenant_id = a.tenant_id AND i.connector = m.connector \
         WHERE a.tenant_id = {tenant} AND a.phone = {agent} \
         ORDER BY i.connector, m.crm_user_id LIMIT 1"
    )
}

/// Link a call to the CRM of its agent: the first installed connector (by name) the agent with
/// phone `agent_number` is mapped to. Calls that already have a CRM keep it; an agent without a
/// mapping leaves the call unlinked.
///
/// # Errors
/// Database failure.
pub(crate) async fn link_to_agent_crm(
    db: &impl ConnectionTrait,
    call_id: &str,
    tenant_id: &str,
    agent_number: &str,
) -> Result<(), DbErr> {
    let m = agent_crm_match("?", "?");
    db.execute_raw(stmt(
        db.get_database_backend(),
        &format!(
            "UPDATE calls SET crm_installation_id = (SELECT i.id {m}), \
             crm_user_id = (SELECT m.crm_user_id {m}) \
             WHERE id = ? AND crm_installation_id IS NULL"
        ),
        vec![
            tenant_id.into(),
            agent_number.into(),
            tenant_id.into(),
            agent_number.into(),
            call_id.into(),
        ],
    ))
    .await?;
    Ok(())
}
