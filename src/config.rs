//! Configuration: built-in defaults → optional `callbridge.toml` → `CALLBRIDGE_*` environment
//! (plus the conventional `DATABASE_URL`), validated once at start so a bad value stops the
//! process with a message instead of surfacing as a runtime failure.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context, bail};
use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

/// Every setting, flat so each maps to one `CALLBRIDGE_<NAME>` variable.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// `sqlite://…` (default, WAL) or `postgres://…`.
    pub database_url: String,
    /// Address the HTTP server listens on.
    pub bind: SocketAddr,
    /// Base of every URL handed to Exotel and CRMs; default `http://{bind}`.
    pub public_url: Option<String>,
    /// 32 bytes, base64: seals secrets at rest. Required with PostgreSQL.
    #[serde(skip_serializing)]
    pub master_key: Option<SecretString>,
    /// Region used to read national numbers (ISO 3166 alpha-2).
    pub default_region: String,
    /// Offset of the times Exotel sends without one (`+05:30` = IST).
    pub exotel_utc_offset: String,
    /// Seconds to wait for Exotel's API before giving up (no retry of a connect).
    pub exotel_timeout_secs: u64,
    /// Seconds during which a repeated click for the same from/to returns the first call.
    pub click_debounce_secs: u64,
    /// Largest accepted callback body, in bytes.
    pub callback_body_limit: usize,
    /// Most callbacks committed in one transaction.
    pub ingest_batch_max: usize,
    /// Writer tasks committing callback batches.
    pub ingest_writers: usize,
    /// SQLite `synchronous` pragma: `full` (fsync every commit) or `normal`.
    pub sqlite_synchronous: String,
    /// Database pool size (0 = 8 on SQLite, 16 on PostgreSQL).
    pub db_max_connections: u32,
    /// Run the delivery worker in this process.
    pub worker_enabled: bool,
    /// Deliveries in flight at once per process.
    pub worker_concurrency: usize,
    /// Milliseconds between queue polls when idle.
    pub worker_poll_ms: u64,
    /// Seconds a claimed job is leased before another worker may take it over.
    pub job_lease_secs: u64,
    /// Attempts before a job is dead-lettered.
    pub job_max_attempts: i32,
    /// First retry delay in seconds (doubles each attempt, ±20 % jitter).
    pub job_backoff_base_secs: u64,
    /// Longest retry delay in seconds.
    pub job_backoff_max_secs: u64,
    /// Seconds to wait for a webhook receiver.
    pub webhook_timeout_secs: u64,
    /// Run the reconciler (asks Exotel about calls whose callback never came).
    pub reconcile_enabled: bool,
    /// Seconds after a call is placed before it is reconciled.
    pub reconcile_after_secs: u64,
    /// Seconds between reconciler passes.
    pub reconcile_interval_secs: u64,
    /// Call-details requests per Exotel account per minute (Exotel allows 200 for all APIs).
    pub reconcile_per_minute: u32,
    /// Times one call is asked about before the reconciler gives up on it.
    pub reconcile_max_attempts: i32,
    /// `pretty` or `json`.
    pub log_format: String,
    /// Masking: session TTL in seconds when a create does not give one.
    pub masking_default_ttl_secs: u64,
    /// Masking: the longest session TTL (and extension) accepted, in seconds.
    pub masking_max_ttl_secs: u64,
    /// Masking: seconds before a released virtual number is handed to the same participant again.
    pub masking_cooloff_secs: u64,
    /// Masking: digits in a generated PIN (4 to 6).
    pub masking_pin_length: u32,
    /// Masking: how far back (seconds) the reverse call flow looks for a click-to-call to the
    /// caller from the dialled virtual number (0 = reverse flow off).
    pub masking_reverse_window_secs: u64,
    /// Masking: the number dial-whom answers, `national` (`0XXXXXXXXXX`, what Exotel dials) or
    /// `e164`; a tenant may override it.
    pub masking_dial_format: String,
    /// Masking: in PIN mode, only route a caller who is the PIN's owner; a tenant may override it.
    pub masking_pin_caller_check: bool,
    /// Masking: seconds between sweeps that close expired sessions and release their numbers
    /// (0 = no sweep; expired sessions still stop routing and are released lazily).
    pub masking_sweep_interval_secs: u64,
    /// Sync Passthru: status answered for an unanswered call (200 = branch A, 302 = branch B);
    /// answered calls always get 200. A tenant may override it.
    pub passthru_branch_on_unanswered: u16,
    /// Admin console: seconds of inactivity after which a session ends.
    pub admin_session_idle_secs: u64,
    /// Admin console: seconds after login at which a session ends regardless of activity.
    pub admin_session_max_secs: u64,
    /// Admin console: failed logins per email inside `admin_login_window_secs` before that email
    /// is refused for the rest of the window (one client IP gets four times as many).
    pub admin_login_max_failures: i32,
    /// Admin console: length of the login-failure window, in seconds.
    pub admin_login_window_secs: u64,
    /// Where recordings may be fetched from (https only). `exotel.com` allows that host and
    /// its subdomains; an entry with a path, `host/prefix/`, allows exactly that host under that
    /// path (an S3 bucket). Env: `CALLBRIDGE_RECORDING_HOSTS='["exotel.com","exotel.in"]'`.
    pub recording_hosts: Vec<String>,
    /// Also allow plain-http recording URLs on `127.0.0.1` (tests and the demo simulator only).
    pub recording_allow_loopback_http: bool,
    /// Lifetime in seconds of a recording link for tenants that set no policy of their own;
    /// unset = links never expire (they sit in CRM logs for years).
    pub recording_link_ttl_secs: Option<u64>,
    /// CRM connectors to enable (`["pipedrive"]`). A connector whose client id is set is
    /// enabled too; an enabled connector without its client id and secret stops the start.
    pub connectors: Vec<String>,
    /// Pipedrive OAuth app: client id (Developer Hub).
    pub pipedrive_client_id: Option<String>,
    /// Pipedrive OAuth app: client secret.
    #[serde(skip_serializing)]
    pub pipedrive_client_secret: Option<SecretString>,
    /// Pipedrive app-extension JWT secret; unset = the client secret (Pipedrive's default).
    #[serde(skip_serializing)]
    pub pipedrive_jwt_secret: Option<SecretString>,
    /// Pipedrive's OAuth host (tests point it at a local fake).
    pub pipedrive_oauth_base: String,
    /// Host suffixes a Pipedrive `api_domain` may have.
    pub pipedrive_api_hosts: Vec<String>,
    /// Refresh a CRM access token this many seconds before it expires.
    pub crm_refresh_margin_secs: u64,
    /// How long an OAuth install may take between "Install" and the CRM's redirect back.
    pub oauth_state_ttl_secs: u64,
    /// Timeout of one CRM API request, in seconds.
    pub crm_timeout_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            database_url: "sqlite://callbridge.db?mode=rwc".into(),
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            public_url: None,
            master_key: None,
            default_region: "IN".into(),
            exotel_utc_offset: "+05:30".into(),
            exotel_timeout_secs: 10,
            click_debounce_secs: 5,
            callback_body_limit: 64 * 1024,
            ingest_batch_max: 512,
            ingest_writers: 1,
            sqlite_synchronous: "full".into(),
            db_max_connections: 0,
            worker_enabled: true,
            worker_concurrency: 16,
            worker_poll_ms: 500,
            job_lease_secs: 120,
            job_max_attempts: 12,
            job_backoff_base_secs: 10,
            job_backoff_max_secs: 3600,
            webhook_timeout_secs: 15,
            reconcile_enabled: true,
            reconcile_after_secs: 600,
            reconcile_interval_secs: 30,
            reconcile_per_minute: 60,
            reconcile_max_attempts: 10,
            log_format: "pretty".into(),
            masking_default_ttl_secs: 86_400,
            masking_max_ttl_secs: 30 * 86_400,
            masking_cooloff_secs: 3_600,
            masking_pin_length: 4,
            masking_reverse_window_secs: 7 * 86_400,
            masking_dial_format: "national".into(),
            masking_pin_caller_check: false,
            masking_sweep_interval_secs: 60,
            passthru_branch_on_unanswered: 200,
            admin_session_idle_secs: 2 * 3600,
            admin_session_max_secs: 12 * 3600,
            admin_login_max_failures: 5,
            admin_login_window_secs: 15 * 60,
            recording_hosts: crate::recordings::allow::DEFAULT_HOSTS
                .iter()
                .map(|h| (*h).to_owned())
                .collect(),
            recording_allow_loopback_http: false,
            recording_link_ttl_secs: None,
            connectors: Vec::new(),
            pipedrive_client_id: None,
            pipedrive_client_secret: None,
            pipedrive_jwt_secret: None,
            pipedrive_oauth_base: "https://oauth.pipedrive.com".into(),
            pipedrive_api_hosts: vec!["pipedrive.com".into()],
            crm_refresh_margin_secs: 300,
            oauth_state_ttl_secs: 600,
            crm_timeout_secs: 30,
        }
    }
}

impl Config {
    /// Load defaults, then `file` (or `./callbridge.toml` when present), then the environment.
    ///
    /// # Errors
    /// A setting that does not parse or does not validate.
    pub fn load(file: Option<PathBuf>) -> anyhow::Result<Self> {
        let mut figment = Figment::from(Serialized::defaults(Self::default()));
        match file {
            Some(path) => {
                if !path.exists() {
                    bail!("config file {} does not exist", path.display());
                }
                figment = figment.merge(Toml::file(path));
            }
            None => figment = figment.merge(Toml::file("callbridge.toml")),
        }
        figment = figment
            .merge(Env::raw().only(&["DATABASE_URL"]))
            .merge(Env::prefixed("CALLBRIDGE_"));
        let config: Self = figment.extract().context("reading configuration")?;
        config.validate()?;
        Ok(config)
    }

    /// Check every value that could only fail later.
    ///
    /// # Errors
    /// The first invalid setting, named.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !(self.database_url.starts_with("sqlite:")
            || self.database_url.starts_with("postgres://")
            || self.database_url.starts_with("postgresql://"))
        {
            bail!("DATABASE_URL must start with sqlite: or postgres://");
        }
        if let Some(url) = &self.public_url {
            let parsed = url::Url::parse(url).context("CALLBRIDGE_PUBLIC_URL is not a URL")?;
            if !matches!(parsed.scheme(), "http" | "https") {
                bail!("CALLBRIDGE_PUBLIC_URL must be http(s)");
            }
        }
        crate::phone::region(&self.default_region).map_err(|e| {
            anyhow::anyhow!("CALLBRIDGE_DEFAULT_REGION is not a known region code: {e}")
        })?;
        crate::exotel::parse_offset(&self.exotel_utc_offset).map_err(|e| {
            anyhow::anyhow!("CALLBRIDGE_EXOTEL_UTC_OFFSET must look like +05:30: {e}")
        })?;
        if !matches!(self.sqlite_synchronous.as_str(), "full" | "normal") {
            bail!("CALLBRIDGE_SQLITE_SYNCHRONOUS must be full or normal");
        }
        if !matches!(self.log_format.as_str(), "pretty" | "json") {
            bail!("CALLBRIDGE_LOG_FORMAT must be pretty or json");
        }
        if self.job_max_attempts < 1 {
            bail!("CALLBRIDGE_JOB_MAX_ATTEMPTS must be at least 1");
        }
        if self.ingest_batch_max == 0 || self.ingest_writers == 0 || self.worker_concurrency == 0 {
            bail!(
                "CALLBRIDGE_INGEST_BATCH_MAX, CALLBRIDGE_INGEST_WRITERS and \
                 CALLBRIDGE_WORKER_CONCURRENCY must be positive"
            );
        }
        if self.job_lease_secs <= self.webhook_timeout_secs {
            bail!("CALLBRIDGE_JOB_LEASE_SECS must exceed CALLBRIDGE_WEBHOOK_TIMEOUT_SECS");
        }
        if !matches!(self.masking_dial_format.as_str(), "national" | "e164") {
            bail!("CALLBRIDGE_MASKING_DIAL_FORMAT must be national or e164");
        }
        if !(4..=6).contains(&self.masking_pin_length) {
            bail!("CALLBRIDGE_MASKING_PIN_LENGTH must be 4, 5 or 6");
        }
        if self.masking_max_ttl_secs < 60
            || !(60..=self.masking_max_ttl_secs).contains(&self.masking_default_ttl_secs)
        {
            bail!(
                "CALLBRIDGE_MASKING_DEFAULT_TTL_SECS must be between 60 and \
                 CALLBRIDGE_MASKING_MAX_TTL_SECS"
            );
        }
        if !matches!(self.passthru_branch_on_unanswered, 200 | 302) {
            bail!("CALLBRIDGE_PASSTHRU_BRANCH_ON_UNANSWERED must be 200 or 302");
        }
        if self.admin_session_idle_secs == 0
            || self.admin_session_max_secs < self.admin_session_idle_secs
        {
            bail!(
                "CALLBRIDGE_ADMIN_SESSION_IDLE_SECS must be positive and at most \
                 CALLBRIDGE_ADMIN_SESSION_MAX_SECS"
            );
        }
        if self.admin_login_max_failures < 1 || self.admin_login_window_secs == 0 {
            bail!("CALLBRIDGE_ADMIN_LOGIN_MAX_FAILURES and _WINDOW_SECS must be positive");
        }
        crate::recordings::allow::AllowList::parse(
            &self.recording_hosts,
            self.recording_allow_loopback_http,
        )
        .context("CALLBRIDGE_RECORDING_HOSTS")?;
        if let Some(ttl) = self.recording_link_ttl_secs
            && !(1..=crate::recordings::MAX_TTL_SECS).contains(&ttl)
        {
            bail!("CALLBRIDGE_RECORDING_LINK_TTL_SECS must be 1 to ten years in seconds, or unset");
        }
        self.enabled_connectors()?;
        if self.oauth_state_ttl_secs < 60 || self.crm_timeout_secs == 0 {
            bail!(
                "CALLBRIDGE_OAUTH_STATE_TTL_SECS must be at least 60 and \
                 CALLBRIDGE_CRM_TIMEOUT_SECS positive"
            );
        }
        if let Some(key) = &self.master_key {
            crate::crypto::Sealer::from_base64(key.expose_secret())
                .context("CALLBRIDGE_MASTER_KEY must be 32 bytes, base64")?;
        }
        Ok(())
    }

    /// The connectors to start: listed in `connectors` or given a client id. Each must be known
    /// and have its client id and secret.
    ///
    /// # Errors
    /// An unknown connector, or one enabled without its credentials (the message names the
    /// settings to set).
    pub fn enabled_connectors(&self) -> anyhow::Result<Vec<&'static str>> {
        let mut out = Vec::new();
        for name in &self.connectors {
            let name = name.trim().to_ascii_lowercase();
            match name.as_str() {
                "pipedrive" => {}
                other => {
                    bail!("CALLBRIDGE_CONNECTORS names {other:?}; known connectors: pipedrive")
                }
            }
        }
        let listed = |n: &str| {
            self.connectors
                .iter()
                .any(|c| c.trim().eq_ignore_ascii_case(n))
        };
        if listed("pipedrive") || self.pipedrive_client_id.is_some() {
            if self
                .pipedrive_client_id
                .as_deref()
                .is_none_or(str::is_empty)
                || self
                    .pipedrive_client_secret
                    .as_ref()
                    .is_none_or(|s| s.expose_secret().is_empty())
            {
                bail!(
                    "the pipedrive connector is enabled but CALLBRIDGE_PIPEDRIVE_CLIENT_ID and \
                     CALLBRIDGE_PIPEDRIVE_CLIENT_SECRET are not both set (Pipedrive Developer \
                     Hub → your app → OAuth & access scopes)"
                );
            }
            out.push("pipedrive");
        }
        Ok(out)
    }

    /// Whether the database is PostgreSQL.
    #[must_use]
    pub fn is_postgres(&self) -> bool {
        self.database_url.starts_with("postgres")
    }

    /// The public base URL without a trailing slash.
    #[must_use]
    pub fn public_base(&self) -> String {
        self.public_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.bind))
            .trim_end_matches('/')
            .to_owned()
    }

    /// Exotel's API timeout.
    #[must_use]
    pub fn exotel_timeout(&self) -> Duration {
        Duration::from_secs(self.exotel_timeout_secs)
    }
}
