//! Token custody: hand out an installation's access token, refresh it single-flight.
//!
//! Single-flight has two layers:
//! - inside a process, one async mutex per installation: of 100 tasks that got a 401 with
//!   token version `n`, the first refreshes and the other 99 find version `n + 1` when they get
//!   the mutex;
//! - across processes sharing the database, a lease on the row
//!   (`refresh_lease_until`/`refresh_lease_owner`, taken only while `token_version` is still
//!   `n`): the instance without the lease waits for the version to change.
//!
//! A refresh stores the new access token, the rotated refresh token (if any) and the new API
//! base in one UPDATE fenced on the lease, *before* the new access token is used. When the
//! CRM says `invalid_grant`, storage is read again first (another instance may have rotated
//! the token under us); only if nothing changed is the install marked broken ("reconnect
//! needed").

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use callbridge_connector::{
    AccessToken, Connector, ConnectorError, InstallContext, OAuthError, RefreshToken,
};
use sea_orm::DbErr;

use super::installations::{self, Installation};
use crate::{
    AppState,
    db::{self, stmt},
};

/// How long one refresh may hold the row lease.
const LEASE: Duration = Duration::from_secs(30);
/// How often a waiting instance re-reads the row.
const POLL: Duration = Duration::from_millis(50);

/// Why no usable token could be had.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The installation no longer exists (uninstalled).
    #[error("the CRM installation was removed")]
    Gone,
    /// The install needs an admin to reconnect it.
    #[error("reconnect needed: {0}")]
    Broken(String),
    /// Try again later (CRM token endpoint busy or down, lease held too long).
    #[error("token refresh failed: {error}")]
    Retry {
        /// What happened.
        error: String,
        /// When to try again, if the CRM said.
        after: Option<Duration>,
    },
    /// The connector is not enabled in this process.
    #[error("connector {0} is not enabled")]
    NoConnector(String),
    /// Database failure.
    #[error(transparent)]
    Db(#[from] DbErr),
    /// A stored token could not be opened (wrong master key?).
    #[error("could not open a stored token: {0}")]
    Sealed(String),
}

/// A usable token for one installation.
#[derive(Debug, Clone)]
pub struct Lease {
    /// The installation's request context.
    pub ctx: InstallContext,
    /// The access token.
    pub token: AccessToken,
    /// The `token_version` it came from.
    pub version: i32,
}

/// A failure of a CRM request made with [`TokenBroker::call`].
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No token.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The CRM request failed.
    #[error(transparent)]
    Crm(#[from] ConnectorError),
}

/// Per-process token custodian (one per [`AppState`]).
pub struct TokenBroker {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    owner: String,
    refreshes: std::sync::atomic::AtomicU64,
}

impl Default for TokenBroker {
    fn default() -> Self {
        Self {
            locks: Mutex::new(HashMap::new()),
            owner: format!("proc_{}", uuid::Uuid::new_v4().simple()),
            refreshes: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl std::fmt::Debug for TokenBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenBroker")
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

impl TokenBroker {
    /// How many refresh requests this process sent (for tests and metrics).
    #[must_use]
    pub fn refresh_count(&self) -> u64 {
        self.refreshes.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn lock_for(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self
            .locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(map.entry(id.to_owned()).or_default())
    }

    fn connector<'a>(
        state: &'a AppState,
        inst: &Installation,
    ) -> Result<&'a Arc<dyn Connector>, TokenError> {
        state
            .connectors
            .get(&inst.connector)
            .ok_or_else(|| TokenError::NoConnector(inst.connector.clone()))
    }

    fn lease_of(state: &AppState, inst: &Installation) -> Result<Lease, TokenError> {
        let token = state
            .sealer
            .open(&inst.access_token_sealed)
            .map_err(|e| TokenError::Sealed(e.to_string()))?;
        Ok(Lease {
            ctx: inst.context(),
            token: AccessToken(token),
            version: inst.token_version,
        })
    }

    async fn load(state: &AppState, id: &str) -> Result<Installation, TokenError> {
        let inst = installations::get(&state.db, id)
            .await?
            .ok_or(TokenError::Gone)?;
        if !inst.is_active() {
            return Err(TokenError::Broken(inst.last_error.clone().unwrap_or_else(
                || "the CRM no longer accepts this install".into(),
            )));
        }
        Ok(inst)
    }

    /// The installation's access token, refreshed first when it expires within
    /// `crm_refresh_margin_secs`.
    ///
    /// # Errors
    /// [`TokenError`].
    pub async fn current(&self, state: &AppState, id: &str) -> Result<Lease, TokenError> {
        let inst = Self::load(state, id).await?;
        let margin =
            i64::try_from(state.config.crm_refresh_margin_secs * 1000).unwrap_or(i64::MAX / 4);
        if inst
            .expires_at
            .is_some_and(|at| at - margin <= db::now_ms())
            && inst.refresh_token_sealed.is_some()
        {
            return self.refresh_after(state, id, inst.token_version).await;
        }
        Self::lease_of(state, &inst)
    }

    /// Get a token newer than `seen_version`: refresh it unless another task or instance
    /// already did. Single-flight per installation across tasks and instances.
    ///
    /// # Errors
    /// [`TokenError`].
    pub async fn refresh_after(
        &self,
        state: &AppState,
        id: &str,
        seen_version: i32,
    ) -> Result<Lease, TokenError> {
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        let started = Instant::now();
        loop {
            let inst = Self::load(state, id).await?;
            if inst.token_version != seen_version {
                return Self::lease_of(state, &inst);
            }
            if self.take_lease(state, &inst).await? {
                return self.refresh_holding_lease(state, inst).await;
            }
            // Another instance is refreshing: wait for the version to move (or its lease to
            // run out, after which we take it).
            if started.elapsed() > LEASE + Duration::from_secs(5) {
                return Err(TokenError::Retry {
                    error: "another instance holds the refresh lease".into(),
                    after: None,
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn take_lease(&self, state: &AppState, inst: &Installation) -> Result<bool, DbErr> {
        let now = db::now_ms();
        let until = now + i64::try_from(LEASE.as_millis()).unwrap_or(30_000);
        let r = db::execute_write(
            &state.db,
            stmt(
                state.db.get_database_backend(),
                "UPDATE installations SET refresh_lease_until = ?, refresh_lease_owner = ? \
                 WHERE id = ? AND token_version = ? AND status = 'active' \
                 AND (refresh_lease_until IS NULL OR refresh_lease_until < ?)",
                vec![
                    until.into(),
                    self.owner.clone().into(),
                    inst.id.clone().into(),
                    inst.token_version.into(),
                    now.into(),
                ],
            ),
        )
        .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn release_lease(&self, state: &AppState, id: &str) -> Result<(), DbErr> {
        db::execute_write(
            &state.db,
            stmt(
                state.db.get_database_backend(),
                "UPDATE installations SET refresh_lease_until = NULL, refresh_lease_owner = NULL \
                 WHERE id = ? AND refresh_lease_owner = ?",
                vec![id.into(), self.owner.clone().into()],
            ),
        )
        .await?;
        Ok(())
    }

    async fn refresh_holding_lease(
        &self,
        state: &AppState,
        inst: Installation,
    ) -> Result<Lease, TokenError> {
        let connector = Self::connector(state, &inst)?;
        let Some(sealed) = inst.refresh_token_sealed.as_deref() else {
            self.release_lease(state, &inst.id).await?;
            return self
                .broken(state, &inst.id, "the CRM gave no refresh token")
                .await;
        };
        let refresh = RefreshToken(
            state
                .sealer
                .open(sealed)
                .map_err(|e| TokenError::Sealed(e.to_string()))?,
        );
        self.refreshes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let result = connector.refresh(&inst.context(), &refresh).await;
        match result {
            Ok(set) => {
                let now = db::now_ms();
                let access = state.sealer.seal(&set.access_token.0);
                let rotated = set.refresh_token.as_ref().map(|r| state.sealer.seal(&r.0));
                let r = db::execute_write(
                    &state.db,
                    stmt(
                        state.db.get_database_backend(),
                        "UPDATE installations SET access_token_sealed = ?, \
                         refresh_token_sealed = COALESCE(?, refresh_token_sealed), \
                         api_base = COALESCE(?, api_base), expires_at = ?, \
                         token_version = token_version + 1, refresh_lease_until = NULL, \
                         refresh_lease_owner = NULL, last_refresh_at = ?, last_error = NULL, \
                         last_error_at = NULL, updated_at = ? \
                         WHERE id = ? AND refresh_lease_owner = ? AND token_version = ?",
                        vec![
                            access.into(),
                            rotated.into(),
                            set.api_base.clone().into(),
                            set.expires_at.map(|t| t.timestamp_millis()).into(),
                            now.into(),
                            now.into(),
                            inst.id.clone().into(),
                            self.owner.clone().into(),
                            inst.token_version.into(),
                        ],
                    ),
                )
                .await?;
                if r.rows_affected() != 1 {
                    // Our lease ran out mid-refresh and someone else stored a newer token.
                    tracing::warn!(installation = %inst.id, "refresh lease lost; using the stored token");
                    return Self::lease_of(state, &Self::load(state, &inst.id).await?);
                }
                tracing::info!(installation = %inst.id, connector = %inst.connector, "CRM token refreshed");
                let stored = Self::load(state, &inst.id).await?;
                Self::lease_of(state, &stored)
            }
            Err(OAuthError::InvalidGrant(detail)) => {
                self.release_lease(state, &inst.id).await?;
                // Re-read: a rotated refresh token stored by someone else means our copy was
                // simply stale.
                let now = installations::get(&state.db, &inst.id)
                    .await?
                    .ok_or(TokenError::Gone)?;
                let changed = now.token_version != inst.token_version
                    || now
                        .refresh_token_sealed
                        .as_deref()
                        .and_then(|s| state.sealer.open(s).ok())
                        != Some(refresh.0.clone());
                if changed && now.is_active() {
                    return Self::lease_of(state, &now);
                }
                self.broken(
                    state,
                    &inst.id,
                    &format!("the CRM refused the refresh token ({detail}); reconnect needed"),
                )
                .await
            }
            Err(OAuthError::RateLimited { retry_after }) => {
                self.release_lease(state, &inst.id).await?;
                Err(TokenError::Retry {
                    error: "the CRM's token endpoint rate-limited us".into(),
                    after: retry_after,
                })
            }
            Err(e) => {
                self.release_lease(state, &inst.id).await?;
                let msg = format!("token refresh failed: {e}");
                installations::record_error(&state.db, &inst.id, &msg, false).await?;
                Err(TokenError::Retry {
                    error: msg,
                    after: None,
                })
            }
        }
    }

    async fn broken(&self, state: &AppState, id: &str, why: &str) -> Result<Lease, TokenError> {
        tracing::warn!(installation = %id, reason = %why, "CRM install needs a reconnect");
        installations::record_error(&state.db, id, why, true).await?;
        Err(TokenError::Broken(why.to_owned()))
    }

    /// Run one CRM request with the installation's token; on
    /// [`ConnectorError::NeedsRefresh`], refresh (single-flight) and try once more.
    ///
    /// # Errors
    /// [`CallError`].
    pub async fn call<T, F, Fut>(&self, state: &AppState, id: &str, f: F) -> Result<T, CallError>
    where
        F: Fn(InstallContext, AccessToken) -> Fut,
        Fut: Future<Output = Result<T, ConnectorError>>,
    {
        let lease = self.current(state, id).await?;
        match f(lease.ctx, lease.token).await {
            Err(ConnectorError::NeedsRefresh(detail)) => {
                tracing::debug!(installation = %id, %detail, "access token refused; refreshing");
                let fresh = self.refresh_after(state, id, lease.version).await?;
                Ok(f(fresh.ctx, fresh.token).await?)
            }
            other => Ok(other?),
        }
    }
}
