//! callbridge: a self-hosted bridge between Exotel telephony and CRMs.
//!
//! The library owns all wiring; `main.rs` only parses the command line. [`Application::build`]
//! binds the listener (port 0 in tests), opens the database, runs migrations and starts the
//! HTTP server, the callback writer, the delivery worker and the reconciler under one
//! cancellation token.
//!
//! Error policy: handlers return [`error::ApiError`] (one place maps errors to statuses and
//! never leaks internals); background tasks and startup use `anyhow` with context at each I/O
//! step; library modules that others match on (Exotel client, callback parser, connectors) own
//! `thiserror` enums.

pub mod admin;
pub mod calls;
pub mod cli;
pub mod config;
pub mod crm;
pub mod crypto;
pub mod db;
pub mod demo;
pub mod entities;
pub mod error;
pub mod exotel;
pub mod http;
pub mod ingest;
pub mod jobs;
pub mod masking;
pub mod metrics;
pub mod phone;
pub mod reconcile;
pub mod recordings;
pub mod telemetry;
pub mod tenants;

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context;
use chrono::FixedOffset;
use sea_orm::DatabaseConnection;
use secrecy::ExposeSecret;
use tokio::{net::TcpListener, sync::Notify};
use tokio_util::sync::CancellationToken;

use crate::{config::Config, crypto::Sealer, exotel::ExotelClient, ingest::Ingestor};

/// Everything a handler or background task needs; cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

/// The shared parts behind [`AppState`].
pub struct Inner {
    /// Database pool.
    pub db: DatabaseConnection,
    /// Validated configuration.
    pub config: Arc<Config>,
    /// Seals secrets at rest.
    pub sealer: Sealer,
    /// The one outbound HTTP client (timeouts, User-Agent).
    pub http: reqwest::Client,
    /// Exotel API client.
    pub exotel: ExotelClient,
    /// Prometheus metrics.
    pub metrics: metrics::Metrics,
    /// Group-commit callback writer.
    pub ingest: Ingestor,
    /// Wakes the delivery worker when jobs are enqueued.
    pub jobs_ready: Arc<Notify>,
    /// Offset of Exotel's offset-less timestamps.
    pub exotel_offset: FixedOffset,
    /// Public base URL (no trailing slash).
    pub public_base: String,
    /// Demo mode: the built-in Exotel simulator is mounted.
    pub demo: Option<demo::DemoState>,
    /// The CRM connectors this process runs.
    pub connectors: crm::Registry,
    /// CRM token custody (single-flight refresh).
    pub tokens: crm::tokens::TokenBroker,
    /// Masking-session TTL slides, recorded off the dial-whom answer path.
    pub slides: masking::Slides,
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// The User-Agent on every outbound request.
pub const USER_AGENT: &str = concat!("callbridge/", env!("CARGO_PKG_VERSION"));

/// Build the shared outbound HTTP client.
///
/// # Errors
/// TLS backend initialisation failed.
pub fn http_client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .user_agent(USER_AGENT)
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(std::time::Duration::from_secs(60))
        .pool_idle_timeout(std::time::Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .context("building the HTTP client")
}

/// Open the master key: from configuration, or (SQLite only) from a key file beside the
/// database, created on first start.
///
/// # Errors
/// PostgreSQL without a key, or an unreadable/invalid key.
pub fn load_sealer(config: &Config) -> anyhow::Result<Sealer> {
    if let Some(key) = &config.master_key {
        return Sealer::from_base64(key.expose_secret());
    }
    if config.is_postgres() {
        anyhow::bail!(
            "CALLBRIDGE_MASTER_KEY is required with PostgreSQL (32 random bytes, base64: \
             `openssl rand -base64 32`)"
        );
    }
    let path = sqlite_key_path(&config.database_url);
    let (sealer, created) = Sealer::from_key_file(&path)?;
    if created {
        tracing::warn!(
            path = %path.display(),
            "created a new master key file beside the database; back it up with the database, \
             or set CALLBRIDGE_MASTER_KEY"
        );
    } else {
        tracing::info!(path = %path.display(), "using the master key file");
    }
    Ok(sealer)
}

/// `sqlite://data/cb.db?mode=rwc` → `data/cb.db.key`.
#[must_use]
pub fn sqlite_key_path(database_url: &str) -> PathBuf {
    let rest = database_url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:");
    let path = rest.split('?').next().unwrap_or("callbridge.db");
    let path = if path.is_empty() || path == ":memory:" {
        "callbridge.db"
    } else {
        path
    };
    PathBuf::from(format!("{path}.key"))
}

/// Open the database, migrate, and assemble the state (no tasks started).
///
/// # Errors
/// Database, key or configuration problems.
pub async fn build_state(
    config: Config,
    demo: Option<demo::DemoState>,
    extra_connectors: Vec<Arc<dyn callbridge_connector::Connector>>,
) -> anyhow::Result<(AppState, ingest::IngestHandle)> {
    let sealer = load_sealer(&config)?;
    let db = db::connect(&config).await?;
    db::migrate(&db).await?;
    let metrics = metrics::Metrics::new();
    let http = http_client()?;
    let exotel = ExotelClient::new(http.clone(), config.exotel_timeout(), Some(metrics.clone()));
    let jobs_ready = Arc::new(Notify::new());
    let ingest_db = if config.is_postgres() {
        db.clone()
    } else {
        db::connect_writer(&config).await?
    };
    let (ingest, handle) =
        Ingestor::start(ingest_db, &config, metrics.clone(), Arc::clone(&jobs_ready));
    let exotel_offset =
        exotel::parse_offset(&config.exotel_utc_offset).map_err(anyhow::Error::msg)?;
    let public_base = config.public_base();
    let slides = masking::Slides::start(db.clone());
    let connectors = extra_connectors
        .into_iter()
        .fold(crm::Registry::from_config(&config, &http)?, |r, c| {
            r.with(c)
        });
    Ok((
        AppState(Arc::new(Inner {
            db,
            config: Arc::new(config),
            sealer,
            http,
            exotel,
            metrics,
            ingest,
            jobs_ready,
            exotel_offset,
            public_base,
            demo,
            connectors,
            tokens: crm::tokens::TokenBroker::default(),
            slides,
        })),
        handle,
    ))
}

/// A running server with its background tasks.
pub struct Application {
    listener: TcpListener,
    state: AppState,
    ingest: ingest::IngestHandle,
    shutdown: CancellationToken,
}

impl Application {
    /// Bind `config.bind` (or use `listener`), open the database and migrate.
    ///
    /// # Errors
    /// Bind, database or key failures.
    pub async fn build(config: Config, listener: Option<TcpListener>) -> anyhow::Result<Self> {
        Self::build_with(config, listener, Vec::new()).await
    }

    /// [`Application::build`] with connectors beyond the configured ones (tests add a fake
    /// CRM this way).
    ///
    /// # Errors
    /// As [`Application::build`].
    pub async fn build_with(
        mut config: Config,
        listener: Option<TcpListener>,
        extra_connectors: Vec<Arc<dyn callbridge_connector::Connector>>,
    ) -> anyhow::Result<Self> {
        let listener = match listener {
            Some(l) => l,
            None => TcpListener::bind(config.bind)
                .await
                .with_context(|| format!("binding {}", config.bind))?,
        };
        let addr = listener.local_addr()?;
        if config.public_url.is_none() {
            config.public_url = Some(format!("http://{addr}"));
        }
        let demo = None;
        let (state, ingest) = build_state(config, demo, extra_connectors).await?;
        Ok(Self {
            listener,
            state,
            ingest,
            shutdown: CancellationToken::new(),
        })
    }

    /// Like [`Application::build`], with the built-in Exotel simulator and demo page mounted.
    ///
    /// # Errors
    /// As [`Application::build`].
    pub async fn build_demo(mut config: Config) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(config.bind)
            .await
            .with_context(|| format!("binding {}", config.bind))?;
        let addr = listener.local_addr()?;
        if config.public_url.is_none() {
            config.public_url = Some(format!("http://{addr}"));
        }
        // The simulator serves its recordings over plain http on this process's address.
        config.recording_allow_loopback_http = true;
        let (state, ingest) =
            build_state(config, Some(demo::DemoState::default()), Vec::new()).await?;
        demo::ensure_demo_tenant(&state).await?;
        Ok(Self {
            listener,
            state,
            ingest,
            shutdown: CancellationToken::new(),
        })
    }

    /// The bound address.
    ///
    /// # Errors
    /// The socket has no local address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The state, for tests and tools that act on the same database.
    #[must_use]
    pub fn state(&self) -> AppState {
        self.state.clone()
    }

    /// A token that stops the server and its tasks when cancelled.
    #[must_use]
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Serve until the shutdown token is cancelled (or SIGINT/SIGTERM when `signals`), then
    /// drain: stop accepting, let in-flight requests and callback commits finish.
    ///
    /// # Errors
    /// The server failed.
    pub async fn run(self, signals: bool) -> anyhow::Result<()> {
        let Self {
            listener,
            state,
            ingest,
            shutdown,
        } = self;
        if signals {
            let s = shutdown.clone();
            tokio::spawn(async move {
                telemetry::wait_for_signal().await;
                tracing::info!("shutting down");
                s.cancel();
            });
        }
        let mut tasks = tokio::task::JoinSet::new();
        if state.config.worker_enabled {
            tasks.spawn(jobs::run_worker(state.clone(), shutdown.clone()));
        }
        if state.config.reconcile_enabled {
            tasks.spawn(reconcile::run(state.clone(), shutdown.clone()));
        }
        if !state.config.is_postgres() {
            tasks.spawn(db::run_checkpointer(
                state.db.clone(),
                std::time::Duration::from_millis(500),
                shutdown.clone(),
            ));
        }
        if state.config.masking_sweep_interval_secs > 0 {
            tasks.spawn(masking::run_sweeper(state.clone(), shutdown.clone()));
        }
        let app = http::router(state.clone());
        tracing::info!(addr = %listener.local_addr()?, public = %state.public_base, "callbridge listening");
        let s = shutdown.clone();
        // Connect info gives the admin login throttle the peer address.
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move { s.cancelled().await })
        .await
        .context("HTTP server")?;
        shutdown.cancel();
        while tasks.join_next().await.is_some() {}
        // Every accepted callback was answered after its commit; this only waits for the
        // writer tasks to notice the channel closing.
        drop(state);
        ingest.stop().await;
        Ok(())
    }
}
