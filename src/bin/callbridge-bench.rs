//! `callbridge-bench`: a load and latency benchmark of the real `callbridge serve` binary.
//!
//! For each backend it starts `callbridge serve` as a child process on a fresh SQLite file or a
//! fresh PostgreSQL database, creates a tenant with `callbridge tenant create` whose Exotel API
//! base is a fake Exotel running inside this process (axum on loopback), and measures:
//!
//! 1. durable StatusCallback ingestion: every callback is the first terminal callback of a
//!    distinct, really placed call (its own StatusCallback token and CallSid), so each one commits
//!    the final state and a delivery job before it is answered. Reported: callbacks/s and
//!    p50/p99/max latency at `--concurrency` senders, errors by status, and a count in the
//!    database afterwards;
//! 2. click-to-call overhead: from the instant just before `POST /api/v1/calls` is handed to the
//!    client to the instant the fake Exotel's handler sees the `Calls/connect` (same process, same
//!    monotonic clock), plus the API's end-to-end latency;
//! 3. the child's memory: VmRSS idle after start, sampled during the load, VmRSS/VmHWM after.
//!
//! The child runs with the delivery worker and the reconciler off, so nothing competes with
//! ingestion. Everything created (child process, scratch directory, PostgreSQL database) is
//! removed at the end, also on error or Ctrl-C.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail};
use axum::{
    Json, Router,
    extract::{Request as AxumRequest, State},
    http::StatusCode as AxumStatus,
    response::IntoResponse,
    routing::post,
};
use base64::Engine;
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use sea_orm::{ConnectionTrait, Database, DbBackend, Statement};
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

/// The agent's phone in every placed call (the customer number varies).
const AGENT_PHONE: &str = "+917012345678";
/// The tenant's default virtual number.
const CALLER_ID: &str = "+918047112233";
/// A per-request ceiling; a request slower than this counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Load and latency benchmark of `callbridge serve` (run with `cargo build --release` first).
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// Which database backend(s) to measure.
    #[arg(long, value_enum, default_value_t = BackendArg::Both)]
    backend: BackendArg,
    /// Timed callbacks per backend (each to a distinct placed call).
    #[arg(long, default_value_t = 20_000)]
    callbacks: usize,
    /// Untimed warm-up callbacks sent first (also distinct calls).
    #[arg(long, default_value_t = 2_000)]
    warmup: usize,
    /// Concurrent callback senders.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Click-to-call requests measured one after another (0 skips the click measurement).
    #[arg(long, default_value_t = 1_000)]
    clicks: usize,
    /// Concurrency of the second click measurement (0 skips it).
    #[arg(long, default_value_t = 8)]
    click_concurrency: usize,
    /// Concurrency of the untimed setup phase that places the calls to call back.
    #[arg(long, default_value_t = 16)]
    setup_concurrency: usize,
    /// The `callbridge` binary (default: next to this executable).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// PostgreSQL server URL; a fresh `cb_bench_<random>` database is created on it and dropped.
    #[arg(
        long,
        env = "CALLBRIDGE_BENCH_PG_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    pg_url: String,
    /// Parent of the scratch directory holding the SQLite file and the server log.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Extra environment for the server, KEY=VALUE (repeatable), e.g.
    /// CALLBRIDGE_INGEST_BATCH_MAX=256.
    #[arg(long = "server-env", value_parser = parse_kv)]
    server_env: Vec<(String, String)>,
    /// Skip the HTTP ceiling measurement (GET /healthz with the same client and concurrency).
    #[arg(long)]
    no_ceiling: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BackendArg {
    Sqlite,
    Postgres,
    Both,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        }
    }
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    if k.is_empty() {
        return Err(format!("{s:?} has an empty key"));
    }
    Ok((k.to_owned(), v.to_owned()))
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A pooled HTTP/1.1 keep-alive client with Nagle off.
fn http_client(pool: usize) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(pool)
        .pool_idle_timeout(Duration::from_secs(120))
        .build(connector)
}

/// Send one request and read the whole answer.
async fn send(
    client: &HttpClient,
    req: Request<Full<Bytes>>,
) -> anyhow::Result<(StatusCode, Bytes)> {
    tokio::time::timeout(REQUEST_TIMEOUT, async {
        let resp = client.request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok::<_, anyhow::Error>((status, body))
    })
    .await
    .map_err(|_| anyhow!("no answer within {REQUEST_TIMEOUT:?}"))?
}

// ---------------------------------------------------------------------------------------------
// The fake Exotel

/// One `Calls/connect` the fake received.
struct Connect {
    /// When its handler started (after the request head was read).
    at: Instant,
    /// The `StatusCallback` form field.
    status_callback: String,
}

/// A fake Exotel `Calls/connect.json`: answers like Exotel and records every request.
struct FakeExotel {
    salt: u64,
    next: AtomicU64,
    seen: Mutex<HashMap<String, Connect>>,
}

impl FakeExotel {
    fn take(&self, sid: &str) -> Option<Connect> {
        self.seen.lock().ok()?.remove(sid)
    }
}

async fn fake_connect(
    State(fake): State<Arc<FakeExotel>>,
    axum::extract::Path(account): axum::extract::Path<String>,
    req: AxumRequest,
) -> axum::response::Response {
    let at = Instant::now();
    let Ok(body) = axum::body::to_bytes(req.into_body(), 64 * 1024).await else {
        return (AxumStatus::BAD_REQUEST, "unreadable body").into_response();
    };
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    let Some(status_callback) = form.get("StatusCallback").cloned() else {
        return (
            AxumStatus::BAD_REQUEST,
            Json(json!({"RestException": {"Status": 400, "Message": "StatusCallback missing"}})),
        )
            .into_response();
    };
    let n = fake.next.fetch_add(1, Ordering::Relaxed);
    let sid = format!("{:016x}{n:016x}", fake.salt);
    let field = |k: &str| form.get(k).cloned().unwrap_or_default();
    let answer = json!({"Call": {
        "Sid": sid, "ParentCallSid": null, "DateCreated": "2026-11-26 10:00:00",
        "DateUpdated": "2026-11-26 10:00:00", "AccountSid": account,
        "To": field("To"), "From": field("From"), "PhoneNumberSid": field("CallerId"),
        "Status": "in-progress", "StartTime": "2026-11-26 10:00:00", "EndTime": null,
        "Duration": null, "Price": null, "Direction": "outbound-api", "AnsweredBy": null,
        "ForwardedFrom": null, "CallerName": null,
        "Uri": format!("/v1/Accounts/{account}/Calls/{sid}.json"), "RecordingUrl": null
    }});
    if let Ok(mut seen) = fake.seen.lock() {
        seen.insert(
            sid,
            Connect {
                at,
                status_callback,
            },
        );
    }
    (AxumStatus::OK, Json(answer)).into_response()
}

/// Start the fake Exotel on a loopback port; it stops when `stop` is cancelled.
async fn start_fake_exotel(
    stop: CancellationToken,
) -> anyhow::Result<(Arc<FakeExotel>, SocketAddr)> {
    let fake = Arc::new(FakeExotel {
        salt: rand::random(),
        next: AtomicU64::new(1),
        seen: Mutex::new(HashMap::new()),
    });
    let app = Router::new()
        .route("/v1/Accounts/{sid}/Calls/connect.json", post(fake_connect))
        .with_state(Arc::clone(&fake));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the fake Exotel")?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
    });
    Ok((fake, addr))
}

// ---------------------------------------------------------------------------------------------
// /proc readings

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`).
fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// User + system CPU seconds of a process (all threads).
fn proc_cpu_secs(pid: u32, ticks: f64) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After "pid (comm)" the fields start at #3 (state); utime is #14, stime #15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks)
}

/// (busy, total) CPU seconds of the whole machine since boot.
fn machine_cpu_secs(ticks: f64) -> Option<(f64, f64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<f64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: f64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4)?;
    Some(((total - idle) / ticks, total / ticks))
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// The filesystem type holding `path` (from /proc/mounts, longest matching mount point).
fn filesystem_of(path: &Path) -> String {
    let Ok(mounts) = std::fs::read_to_string("/proc/mounts") else {
        return "?".into();
    };
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    mounts
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let _dev = it.next()?;
            let mnt = it.next()?;
            let fs = it.next()?;
            path.starts_with(mnt).then(|| (mnt.len(), fs.to_owned()))
        })
        .max_by_key(|(len, _)| *len)
        .map_or_else(|| "?".into(), |(_, fs)| fs)
}

// ---------------------------------------------------------------------------------------------
// Statistics

#[derive(Debug, Clone, Copy, serde::Serialize)]
struct Latency {
    n: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    mean_ms: f64,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Nearest-rank percentiles.
fn latency(mut v: Vec<Duration>) -> Latency {
    v.sort_unstable();
    let n = v.len();
    if n == 0 {
        return Latency {
            n,
            p50_ms: 0.0,
            p99_ms: 0.0,
            max_ms: 0.0,
            mean_ms: 0.0,
        };
    }
    let pct = |p: f64| {
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        v[rank.clamp(1, n) - 1]
    };
    let sum: Duration = v.iter().sum();
    Latency {
        n,
        p50_ms: ms(pct(50.0)),
        p99_ms: ms(pct(99.0)),
        max_ms: ms(v[n - 1]),
        mean_ms: ms(sum / u32::try_from(n).unwrap_or(u32::MAX)),
    }
}

// ---------------------------------------------------------------------------------------------
// The load generator

/// One request of a load run.
struct Target {
    method: Method,
    uri: Uri,
    body: Bytes,
}

/// What a load run saw.
#[derive(Default)]
struct LoadOutcome {
    latencies: Vec<Duration>,
    elapsed: Duration,
    /// Count by HTTP status.
    statuses: BTreeMap<u16, u64>,
    /// No answer (connection error or timeout).
    transport_errors: u64,
    /// 200 whose body was not the expected one (for callbacks: "duplicate ignored").
    unexpected_body: u64,
    first_error: Option<String>,
}

impl LoadOutcome {
    fn merge(&mut self, other: Self) {
        self.latencies.extend(other.latencies);
        for (k, v) in other.statuses {
            *self.statuses.entry(k).or_default() += v;
        }
        self.transport_errors += other.transport_errors;
        self.unexpected_body += other.unexpected_body;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    fn errors(&self) -> u64 {
        let non_200: u64 = self
            .statuses
            .iter()
            .filter(|(s, _)| **s != 200)
            .map(|(_, n)| n)
            .sum();
        non_200 + self.transport_errors + self.unexpected_body
    }

    fn ok(&self) -> u64 {
        self.statuses.get(&200).copied().unwrap_or(0) - self.unexpected_body
    }
}

/// Send every target once from `concurrency` tasks over one pooled client.
async fn blast(
    client: &HttpClient,
    targets: &Arc<Vec<Target>>,
    concurrency: usize,
    expect_body: &'static [u8],
) -> LoadOutcome {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let client = client.clone();
        let targets = Arc::clone(targets);
        let next = Arc::clone(&next);
        tasks.spawn(async move {
            let mut out = LoadOutcome {
                latencies: Vec::with_capacity(targets.len() / concurrency.max(1) + 1),
                ..LoadOutcome::default()
            };
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(t) = targets.get(i) else { break };
                let mut req = Request::builder()
                    .method(t.method.clone())
                    .uri(t.uri.clone());
                if !t.body.is_empty() {
                    req = req.header(header::CONTENT_TYPE, "application/json");
                }
                let req = req
                    .body(Full::new(t.body.clone()))
                    .expect("a valid request");
                let t0 = Instant::now();
                match send(&client, req).await {
                    Ok((status, body)) => {
                        out.latencies.push(t0.elapsed());
                        *out.statuses.entry(status.as_u16()).or_default() += 1;
                        if status == StatusCode::OK && body != expect_body {
                            out.unexpected_body += 1;
                        }
                        if status != StatusCode::OK && out.first_error.is_none() {
                            out.first_error =
                                Some(format!("{status}: {}", String::from_utf8_lossy(&body)));
                        }
                    }
                    Err(e) => {
                        out.transport_errors += 1;
                        if out.first_error.is_none() {
                            out.first_error = Some(format!("{e:#}"));
                        }
                    }
                }
            }
            out
        });
    }
    let mut total = LoadOutcome::default();
    while let Some(part) = tasks.join_next().await {
        match part {
            Ok(p) => total.merge(p),
            Err(e) => {
                total.transport_errors += 1;
                total.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    total.elapsed = started.elapsed();
    total
}

/// The terminal callback from Exotel's masking guide (`guide_callback` in the tests), for `sid`.
fn terminal_callback(sid: &str) -> Bytes {
    let v = json!({
      "CallSid": sid,
      "EventType": "terminal",
      "DateCreated": "2019-04-08 03:17:59",
      "DateUpdated": "2019-04-08 03:18:35",
      "Status": "completed",
      "To": "+91886799XXXX",
      "From": "+91941374XXXX",
      "PhoneNumberSid": "0113083XXXX",
      "StartTime": "2019-04-08 03:17:59",
      "EndTime": "2019-04-08 03:18:36",
      "Direction": "outbound-api",
      "RecordingUrl": "https://s3-ap-southeast-1.amazonaws.com/exotelrecordings/acme1/xxdewfcwsdw.mp3",
      "ConversationDuration": 32,
      "Legs": [
        {"OnCallDuration": 41, "Status": "completed"},
        {"OnCallDuration": 32, "Status": "completed"}
      ]
    });
    Bytes::from(serde_json::to_vec(&v).expect("JSON"))
}

// ---------------------------------------------------------------------------------------------
// The rig: child server, scratch dir, database

/// A PostgreSQL database created for one run; dropped by [`PgDb::drop_now`] or, failing that,
/// on `Drop`.
struct PgDb {
    admin_url: String,
    name: String,
    url: String,
    dropped: bool,
}

impl PgDb {
    async fn create(admin_url: &str) -> anyhow::Result<Self> {
        let name = format!("cb_bench_{}", uuid::Uuid::new_v4().simple());
        let admin = Database::connect(admin_url)
            .await
            .with_context(|| format!("connecting to PostgreSQL at {admin_url}"))?;
        admin
            .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
            .await
            .with_context(|| format!("creating database {name}"))?;
        let _ = admin.close().await;
        let mut url = url::Url::parse(admin_url).context("--pg-url is not a URL")?;
        url.set_path(&format!("/{name}"));
        Ok(Self {
            admin_url: admin_url.to_owned(),
            name,
            url: url.to_string(),
            dropped: false,
        })
    }

    async fn drop_database(admin_url: &str, name: &str) -> anyhow::Result<()> {
        let admin = Database::connect(admin_url).await?;
        admin
            .execute_unprepared(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .await?;
        let _ = admin.close().await;
        Ok(())
    }

    async fn drop_now(&mut self) -> anyhow::Result<()> {
        if !self.dropped {
            Self::drop_database(&self.admin_url, &self.name).await?;
            self.dropped = true;
        }
        Ok(())
    }

    /// CPU seconds of each PostgreSQL backend process connected to this database.
    async fn backend_cpu(&self, ticks: f64) -> HashMap<u32, f64> {
        let Ok(admin) = Database::connect(&self.admin_url).await else {
            return HashMap::new();
        };
        let rows = admin
            .query_all_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT pid FROM pg_stat_activity WHERE datname = $1",
                [self.name.clone().into()],
            ))
            .await
            .unwrap_or_default();
        let _ = admin.close().await;
        rows.iter()
            .filter_map(|r| r.try_get::<i32>("", "pid").ok())
            .filter_map(|pid| {
                let pid = u32::try_from(pid).ok()?;
                Some((pid, proc_cpu_secs(pid, ticks)?))
            })
            .collect()
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        let (admin, name) = (self.admin_url.clone(), self.name.clone());
        // Drop runs outside any await point: use a private runtime on its own thread.
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(Self::drop_database(&admin, &name)).ok()
        })
        .join();
        if !matches!(done, Ok(Some(()))) {
            eprintln!(
                "warning: could not drop database {}; drop it by hand",
                self.name
            );
        }
    }
}

/// Everything one backend run creates. Field order is drop order: the child dies before its
/// database is dropped and its directory removed.
struct Rig {
    child: Option<Child>,
    pg: Option<PgDb>,
    dir: tempfile::TempDir,
    stop_fake: CancellationToken,
}

impl Rig {
    /// Stop the child, drop the database, remove the directory.
    async fn shutdown(mut self) -> anyhow::Result<()> {
        self.stop_fake.cancel();
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        }
        let mut result = Ok(());
        if let Some(pg) = self.pg.as_mut() {
            result = pg.drop_now().await;
        }
        result
        // `dir` is removed when `self` drops here.
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.stop_fake.cancel();
        // `kill_on_drop` kills a child still held here.
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// The environment the server and `tenant create` run with.
fn server_env(
    database_url: &str,
    bind: SocketAddr,
    master_key: &str,
    extra: &[(String, String)],
) -> Vec<(String, String)> {
    let mut env = vec![
        ("DATABASE_URL".to_owned(), database_url.to_owned()),
        ("CALLBRIDGE_BIND".to_owned(), bind.to_string()),
        ("CALLBRIDGE_MASTER_KEY".to_owned(), master_key.to_owned()),
        ("CALLBRIDGE_WORKER_ENABLED".to_owned(), "false".to_owned()),
        (
            "CALLBRIDGE_RECONCILE_ENABLED".to_owned(),
            "false".to_owned(),
        ),
        ("RUST_LOG".to_owned(), "warn".to_owned()),
    ];
    for (k, v) in extra {
        env.retain(|(ek, _)| ek != k);
        env.push((k.clone(), v.clone()));
    }
    env
}

/// A command for the server binary with a clean `CALLBRIDGE_*` environment.
fn server_command(bin: &Path, dir: &Path, env: &[(String, String)]) -> Command {
    let mut cmd = Command::new(bin);
    for (k, _) in std::env::vars() {
        if k.starts_with("CALLBRIDGE_") || k == "DATABASE_URL" || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .current_dir(dir) // no stray ./callbridge.toml
        .stdin(Stdio::null());
    cmd
}

// ---------------------------------------------------------------------------------------------
// One backend run

#[derive(Debug, Default, serde::Serialize)]
struct Memory {
    idle_rss_kb: u64,
    after_setup_hwm_kb: u64,
    load_max_sampled_rss_kb: u64,
    after_rss_kb: u64,
    after_hwm_kb: u64,
}

#[derive(Debug, Default, serde::Serialize)]
struct Cpu {
    /// Seconds of CPU used during the timed callback phase.
    server_s: f64,
    bench_s: f64,
    postgres_backends_s: Option<f64>,
    machine_busy_s: f64,
    machine_capacity_s: f64,
}

#[derive(Debug, serde::Serialize)]
struct CallbackReport {
    total: usize,
    ok: u64,
    duration_s: f64,
    per_sec: f64,
    latency: Latency,
    errors: u64,
    statuses: BTreeMap<u16, u64>,
    transport_errors: u64,
    duplicate_answers: u64,
    first_error: Option<String>,
    db_finalized_calls: i64,
    db_jobs: i64,
    expected_in_db: usize,
    cpu: Cpu,
    /// The server's own group-commit metrics over the timed callbacks.
    group_commit: Option<GroupCommit>,
}

/// What `/metrics` says about the writer's transactions during the timed callbacks.
#[derive(Debug, serde::Serialize)]
struct GroupCommit {
    commits: f64,
    mean_batch: f64,
    mean_commit_ms: f64,
}

/// `(batches, callbacks, commit seconds)` so far, from the server's `/metrics`.
async fn commit_counters(ctx: &Ctx) -> Option<(f64, f64, f64)> {
    let req = Request::get(format!("{}/metrics", ctx.base))
        .body(Full::new(Bytes::new()))
        .ok()?;
    let (status, body) = send(&ctx.client, req).await.ok()?;
    if !status.is_success() {
        return None;
    }
    let text = String::from_utf8_lossy(&body);
    let value = |prefix: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    Some((
        value("callbridge_ingest_batch_size_count"),
        value("callbridge_ingest_batch_size_sum"),
        value("callbridge_ingest_commit_seconds_sum"),
    ))
}

#[derive(Debug, serde::Serialize)]
struct ClickReport {
    concurrency: usize,
    n: usize,
    errors: u64,
    first_error: Option<String>,
    overhead: Latency,
    api_e2e: Latency,
    per_sec: f64,
}

#[derive(Debug, serde::Serialize)]
struct CeilingReport {
    n: usize,
    per_sec: f64,
    latency: Latency,
    errors: u64,
}

#[derive(Debug, serde::Serialize)]
struct BackendReport {
    backend: &'static str,
    database: String,
    loadavg_before: String,
    loadavg_after: String,
    setup_calls: usize,
    setup_s: f64,
    setup_calls_per_sec: f64,
    ceiling: Option<CeilingReport>,
    callbacks: CallbackReport,
    clicks: Vec<ClickReport>,
    memory: Memory,
}

/// The running child plus what the measurements need.
struct Ctx {
    client: HttpClient,
    base: String,
    api_key: String,
    fake: Arc<FakeExotel>,
    next_number: AtomicU64,
}

impl Ctx {
    fn next_to(&self) -> String {
        // +91 98xxxxxxxx: valid Indian mobiles, distinct per call so the debounce never merges.
        format!(
            "+9198{:08}",
            self.next_number.fetch_add(1, Ordering::Relaxed)
        )
    }

    fn place_request(&self) -> anyhow::Result<Request<Full<Bytes>>> {
        let body = json!({"from": AGENT_PHONE, "to": self.next_to()});
        Ok(Request::post(format!("{}/api/v1/calls", self.base))
            .header(header::AUTHORIZATION, format!("Bearer {}", self.api_key))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(serde_json::to_vec(&body)?)))?)
    }

    /// Place one call; (send instant, answer instant, the fake's record of the connect).
    async fn place(&self) -> anyhow::Result<(Instant, Instant, String, Connect)> {
        let req = self.place_request()?;
        let t0 = Instant::now();
        let (status, body) = send(&self.client, req).await?;
        let t1 = Instant::now();
        if status != StatusCode::CREATED {
            bail!(
                "POST /api/v1/calls answered {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        let v: Value = serde_json::from_slice(&body).context("the call answer is not JSON")?;
        let sid = v["exotel_call_sid"]
            .as_str()
            .ok_or_else(|| anyhow!("no exotel_call_sid in {v}"))?
            .to_owned();
        let connect = self
            .fake
            .take(&sid)
            .ok_or_else(|| anyhow!("the fake Exotel never saw call {sid}"))?;
        Ok((t0, t1, sid, connect))
    }
}

async fn run_backend(
    args: &Args,
    backend: Backend,
    server_bin: &Path,
) -> anyhow::Result<BackendReport> {
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new()
        .prefix("cb-bench-")
        .tempdir_in(&parent)
        .with_context(|| format!("creating a scratch directory in {}", parent.display()))?;
    let stop_fake = CancellationToken::new();
    let mut rig = Rig {
        child: None,
        pg: None,
        dir,
        stop_fake: stop_fake.clone(),
    };
    let result = measure(args, backend, server_bin, &mut rig).await;
    let cleanup = rig.shutdown().await;
    let report = result?;
    cleanup.context("cleaning up")?;
    Ok(report)
}

async fn measure(
    args: &Args,
    backend: Backend,
    server_bin: &Path,
    rig: &mut Rig,
) -> anyhow::Result<BackendReport> {
    let ticks = clock_ticks();
    let loadavg_before = loadavg();
    let (fake, fake_addr) = start_fake_exotel(rig.stop_fake.clone()).await?;
    let database_url = match backend {
        Backend::Sqlite => format!(
            "sqlite://{}?mode=rwc",
            rig.dir.path().join("bench.db").display()
        ),
        Backend::Postgres => {
            let db = PgDb::create(&args.pg_url).await?;
            let url = db.url.clone();
            rig.pg = Some(db);
            url
        }
    };
    let database_label = match backend {
        Backend::Sqlite => format!("{} ({})", database_url, filesystem_of(rig.dir.path())),
        Backend::Postgres => database_url.clone(),
    };
    let master_key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>());
    let bind = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let env = server_env(&database_url, bind, &master_key, &args.server_env);
    let log_path = rig.dir.path().join("server.log");
    let log = std::fs::File::create(&log_path).context("creating the server log")?;

    println!("\n=== {} ===", backend.name());
    println!("  database        {database_label}");
    println!(
        "  server          {} serve  (delivery worker OFF, reconciler OFF, RUST_LOG=warn)",
        server_bin.display()
    );
    for (k, v) in &args.server_env {
        println!("  server env      {k}={v}");
    }
    println!("  load average    {loadavg_before} (before)");

    let mut child = server_command(server_bin, rig.dir.path(), &env)
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", server_bin.display()))?;
    let pid = child
        .id()
        .ok_or_else(|| anyhow!("the server exited at once"))?;
    let base = format!("http://{bind}");
    let client = http_client(args.concurrency.max(args.setup_concurrency) * 2);

    // Wait until it answers /readyz.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "the server exited ({status}) before it was ready:\n{}",
                tail(&log_path, 30)
            );
        }
        let req = Request::get(format!("{base}/readyz")).body(Full::new(Bytes::new()))?;
        if matches!(send(&client, req).await, Ok((s, _)) if s == StatusCode::OK) {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the server was not ready within 60 s:\n{}",
                tail(&log_path, 30)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rig.child = Some(child);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut memory = Memory {
        idle_rss_kb: proc_status_kb(pid, "VmRSS").unwrap_or(0),
        ..Memory::default()
    };

    // A tenant whose Exotel is the fake.
    let out = server_command(server_bin, rig.dir.path(), &env)
        .args([
            "tenant",
            "create",
            "--name",
            "bench",
            "--exotel-sid",
            "benchacct",
            "--exotel-api-key",
            "benchkey",
            "--exotel-api-token",
            "benchtoken",
            "--exotel-api-base",
            &format!("http://{fake_addr}"),
            "--caller-id",
            CALLER_ID,
            "--webhook-url",
            "http://127.0.0.1:9/hook",
        ])
        .output()
        .await
        .context("running `callbridge tenant create`")?;
    if !out.status.success() {
        bail!(
            "`callbridge tenant create` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let tenant: Value = serde_json::from_slice(&out.stdout)
        .context("`callbridge tenant create` did not print JSON")?;
    let api_key = tenant["api_key"]
        .as_str()
        .ok_or_else(|| anyhow!("no api_key in {tenant}"))?
        .to_owned();

    let ctx = Ctx {
        client,
        base,
        api_key,
        fake,
        next_number: AtomicU64::new(0),
    };

    // 1. Click-to-call overhead, on a quiet server.
    let mut clicks = Vec::new();
    if args.clicks > 0 {
        for _ in 0..20 {
            ctx.place().await.context("click warm-up")?;
        }
        clicks.push(measure_clicks(&ctx, args.clicks, 1).await);
        if args.click_concurrency > 1 {
            clicks.push(measure_clicks(&ctx, args.clicks, args.click_concurrency).await);
        }
        for c in &clicks {
            print_clicks(c);
        }
    }

    // 2. Setup: place the calls the callbacks will finish (not timed).
    let n_calls = args.warmup + args.callbacks;
    let setup_started = Instant::now();
    let placed = place_many(&ctx, n_calls, args.setup_concurrency).await?;
    let setup_s = setup_started.elapsed().as_secs_f64();
    memory.after_setup_hwm_kb = proc_status_kb(pid, "VmHWM").unwrap_or(0);
    println!(
        "  setup           placed {n_calls} calls in {setup_s:.2} s ({:.0} calls/s at concurrency {}; untimed)",
        n_calls as f64 / setup_s,
        args.setup_concurrency
    );

    let mut targets: Vec<Target> = Vec::with_capacity(n_calls);
    for (sid, url) in &placed {
        targets.push(Target {
            method: Method::POST,
            uri: url
                .parse()
                .with_context(|| format!("StatusCallback {url} is not a URI"))?,
            body: terminal_callback(sid),
        });
    }
    let timed = targets.split_off(args.warmup);
    let warm = targets;

    // HTTP ceiling: the same client and concurrency against a handler that does nothing.
    let ceiling = if args.no_ceiling {
        None
    } else {
        let uri: Uri = format!("{}/healthz", ctx.base).parse()?;
        let n = args.callbacks;
        let t: Vec<Target> = (0..n)
            .map(|_| Target {
                method: Method::GET,
                uri: uri.clone(),
                body: Bytes::new(),
            })
            .collect();
        let o = blast(&ctx.client, &Arc::new(t), args.concurrency, b"ok").await;
        let c = CeilingReport {
            n,
            per_sec: n as f64 / o.elapsed.as_secs_f64(),
            errors: o.errors(),
            latency: latency(o.latencies),
        };
        println!(
            "  HTTP ceiling    GET /healthz x{n} at {}: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms ({} errors)",
            args.concurrency, c.per_sec, c.latency.p50_ms, c.latency.p99_ms, c.errors
        );
        Some(c)
    };

    // 3. Callback ingestion: warm-up, then the timed run.
    let w = blast(&ctx.client, &Arc::new(warm), args.concurrency, b"ok").await;
    if w.errors() > 0 {
        println!(
            "  warm-up         {} errors (first: {})",
            w.errors(),
            w.first_error.as_deref().unwrap_or("-")
        );
    }
    let pg_before = match &rig.pg {
        Some(pg) => Some(pg.backend_cpu(ticks).await),
        None => None,
    };
    let sampler_stop = CancellationToken::new();
    let sampler = {
        let stop = sampler_stop.clone();
        tokio::spawn(async move {
            let mut max = 0;
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    _ = tick.tick() => {
                        max = max.max(proc_status_kb(pid, "VmRSS").unwrap_or(0));
                    }
                }
            }
            max
        })
    };
    let self_pid = std::process::id();
    let cpu_server0 = proc_cpu_secs(pid, ticks).unwrap_or(0.0);
    let cpu_bench0 = proc_cpu_secs(self_pid, ticks).unwrap_or(0.0);
    let machine0 = machine_cpu_secs(ticks).unwrap_or((0.0, 0.0));
    let commits0 = commit_counters(&ctx).await;
    let o = blast(&ctx.client, &Arc::new(timed), args.concurrency, b"ok").await;
    let machine1 = machine_cpu_secs(ticks).unwrap_or((0.0, 0.0));
    let group_commit = match (commits0, commit_counters(&ctx).await) {
        (Some((b0, n0, s0)), Some((b1, n1, s1))) if b1 > b0 => Some(GroupCommit {
            commits: b1 - b0,
            mean_batch: (n1 - n0) / (b1 - b0),
            mean_commit_ms: 1000.0 * (s1 - s0) / (b1 - b0),
        }),
        _ => None,
    };
    let cpu = Cpu {
        server_s: proc_cpu_secs(pid, ticks).unwrap_or(0.0) - cpu_server0,
        bench_s: proc_cpu_secs(self_pid, ticks).unwrap_or(0.0) - cpu_bench0,
        postgres_backends_s: match (&rig.pg, pg_before) {
            (Some(pg), Some(before)) => {
                let after = pg.backend_cpu(ticks).await;
                Some(
                    after
                        .iter()
                        .map(|(pid, s)| s - before.get(pid).copied().unwrap_or(0.0))
                        .sum(),
                )
            }
            _ => None,
        },
        machine_busy_s: machine1.0 - machine0.0,
        machine_capacity_s: machine1.1 - machine0.1,
    };
    sampler_stop.cancel();
    memory.load_max_sampled_rss_kb = sampler.await.unwrap_or(0);
    memory.after_rss_kb = proc_status_kb(pid, "VmRSS").unwrap_or(0);
    memory.after_hwm_kb = proc_status_kb(pid, "VmHWM").unwrap_or(0);

    // Count what was committed.
    let (db_finalized_calls, db_jobs) = count_in_db(&database_url).await?;
    let total = args.callbacks;
    let duration_s = o.elapsed.as_secs_f64();
    let callbacks = CallbackReport {
        total,
        ok: o.ok(),
        duration_s,
        per_sec: total as f64 / duration_s,
        errors: o.errors() + w.errors(),
        statuses: o.statuses.clone(),
        transport_errors: o.transport_errors,
        duplicate_answers: o.unexpected_body,
        first_error: o.first_error.clone().or(w.first_error),
        db_finalized_calls,
        db_jobs,
        expected_in_db: n_calls,
        cpu,
        group_commit,
        latency: latency(o.latencies),
    };
    print_callbacks(args, &callbacks);
    print_memory(&memory);
    let loadavg_after = loadavg();
    println!("  load average    {loadavg_after} (after)");
    let server_log = tail(&log_path, 5);
    if !server_log.trim().is_empty() {
        println!("  server log (last lines):\n{server_log}");
    }
    Ok(BackendReport {
        backend: backend.name(),
        database: database_label,
        loadavg_before,
        loadavg_after,
        setup_calls: n_calls,
        setup_s,
        setup_calls_per_sec: n_calls as f64 / setup_s,
        ceiling,
        callbacks,
        clicks,
        memory,
    })
}

/// Place `n` calls at `concurrency`; returns (CallSid, StatusCallback URL) of each.
async fn place_many(
    ctx: &Ctx,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<(String, String)>> {
    let remaining = AtomicUsize::new(n);
    let worker = || async {
        let mut out = Vec::new();
        while remaining
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| r.checked_sub(1))
            .is_ok()
        {
            let (_, _, sid, connect) = ctx.place().await.context("placing a setup call")?;
            out.push((sid, connect.status_callback));
        }
        Ok::<_, anyhow::Error>(out)
    };
    let results = futures_util::future::join_all((0..concurrency.max(1)).map(|_| worker())).await;
    let mut all = Vec::with_capacity(n);
    for r in results {
        all.extend(r?);
    }
    Ok(all)
}

/// `n` click-to-call requests at `concurrency`.
async fn measure_clicks(ctx: &Ctx, n: usize, concurrency: usize) -> ClickReport {
    let remaining = AtomicUsize::new(n);
    let worker = || async {
        let mut overhead = Vec::new();
        let mut e2e = Vec::new();
        let mut errors = 0u64;
        let mut first_error = None;
        while remaining
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| r.checked_sub(1))
            .is_ok()
        {
            match ctx.place().await {
                Ok((t0, t1, _, connect)) => {
                    overhead.push(connect.at.saturating_duration_since(t0));
                    e2e.push(t1 - t0);
                }
                Err(e) => {
                    errors += 1;
                    first_error.get_or_insert_with(|| format!("{e:#}"));
                }
            }
        }
        (overhead, e2e, errors, first_error)
    };
    let started = Instant::now();
    let parts = futures_util::future::join_all((0..concurrency.max(1)).map(|_| worker())).await;
    let elapsed = started.elapsed();
    let (mut overhead, mut e2e, mut errors, mut first_error) = (Vec::new(), Vec::new(), 0, None);
    for (o, e, err, f) in parts {
        overhead.extend(o);
        e2e.extend(e);
        errors += err;
        if first_error.is_none() {
            first_error = f;
        }
    }
    ClickReport {
        concurrency,
        n,
        errors,
        first_error,
        per_sec: n as f64 / elapsed.as_secs_f64(),
        overhead: latency(overhead),
        api_e2e: latency(e2e),
    }
}

/// (finalized calls, delivery jobs) in the database.
async fn count_in_db(database_url: &str) -> anyhow::Result<(i64, i64)> {
    let db = Database::connect(database_url)
        .await
        .context("opening the database to count")?;
    let backend = db.get_database_backend();
    let count = |sql: &'static str| {
        let db = &db;
        async move {
            let row = db
                .query_one_raw(Statement::from_string(backend, sql))
                .await?
                .ok_or_else(|| anyhow!("no row"))?;
            Ok::<i64, anyhow::Error>(row.try_get("", "n")?)
        }
    };
    let calls = count("SELECT COUNT(*) AS n FROM calls WHERE finalized_at IS NOT NULL").await?;
    let jobs = count("SELECT COUNT(*) AS n FROM jobs").await?;
    let _ = db.close().await;
    Ok((calls, jobs))
}

// ---------------------------------------------------------------------------------------------
// Output

fn print_clicks(c: &ClickReport) {
    println!(
        "  click-to-call   {} calls at concurrency {} ({:.0} calls/s), {} errors",
        c.n, c.concurrency, c.per_sec, c.errors
    );
    println!(
        "    overhead (request sent -> fake Exotel got connect)  p50 {:>7.3} ms  p99 {:>7.3} ms  max {:>8.3} ms",
        c.overhead.p50_ms, c.overhead.p99_ms, c.overhead.max_ms
    );
    println!(
        "    API end-to-end (request sent -> 201 read)           p50 {:>7.3} ms  p99 {:>7.3} ms  max {:>8.3} ms",
        c.api_e2e.p50_ms, c.api_e2e.p99_ms, c.api_e2e.max_ms
    );
    if let Some(e) = &c.first_error {
        println!("    first error: {e}");
    }
}

fn print_callbacks(args: &Args, c: &CallbackReport) {
    println!(
        "  callbacks       {} distinct first terminal callbacks (JSON), {} concurrent senders, after {} warm-up",
        c.total, args.concurrency, args.warmup
    );
    println!("    duration      {:.3} s", c.duration_s);
    println!("    throughput    {:.0} callbacks/s", c.per_sec);
    println!(
        "    latency       p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms  (mean {:.3} ms)",
        c.latency.p50_ms, c.latency.p99_ms, c.latency.max_ms, c.latency.mean_ms
    );
    let statuses: Vec<String> = c
        .statuses
        .iter()
        .map(|(s, n)| format!("{s}: {n}"))
        .collect();
    println!(
        "    answers       {}; transport errors {}; 200 \"duplicate ignored\" {}",
        statuses.join(", "),
        c.transport_errors,
        c.duplicate_answers
    );
    println!("    errors        {} (warm-up included)", c.errors);
    if let Some(e) = &c.first_error {
        println!("    first error   {e}");
    }
    println!(
        "    in database   {} calls finalized, {} delivery jobs (expected {} each)",
        c.db_finalized_calls, c.db_jobs, c.expected_in_db
    );
    let pg = c
        .cpu
        .postgres_backends_s
        .map(|s| format!(", postgres backends {s:.2} s"))
        .unwrap_or_default();
    println!(
        "    CPU           server {:.2} s, bench {:.2} s{pg}; machine busy {:.2} of {:.2} core-s ({:.0} %)",
        c.cpu.server_s,
        c.cpu.bench_s,
        c.cpu.machine_busy_s,
        c.cpu.machine_capacity_s,
        100.0 * c.cpu.machine_busy_s / c.cpu.machine_capacity_s.max(f64::MIN_POSITIVE)
    );
    if let Some(g) = &c.group_commit {
        println!(
            "    group commit  {:.0} transactions, {:.1} callbacks each, {:.2} ms each (begin to commit)",
            g.commits, g.mean_batch, g.mean_commit_ms
        );
    }
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

fn print_memory(m: &Memory) {
    println!(
        "  server memory   idle VmRSS {:.1} MB; peak VmHWM after setup {:.1} MB; max sampled VmRSS during callbacks {:.1} MB; after: VmRSS {:.1} MB, VmHWM {:.1} MB",
        mb(m.idle_rss_kb),
        mb(m.after_setup_hwm_kb),
        mb(m.load_max_sampled_rss_kb),
        mb(m.after_rss_kb),
        mb(m.after_hwm_kb)
    );
}

fn print_summary(reports: &[BackendReport]) {
    println!("\n=== summary (server: delivery worker and reconciler OFF) ===");
    println!(
        "{:<9} {:>11} {:>9} {:>9} {:>9} {:>7} {:>11} {:>11} {:>9} {:>9} {:>9}",
        "backend",
        "callbacks/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "errors",
        "click p50",
        "click p99",
        "idle MB",
        "peak MB",
        "after MB"
    );
    for r in reports {
        let seq = r.clicks.first();
        println!(
            "{:<9} {:>11.0} {:>9.3} {:>9.3} {:>9.3} {:>7} {:>11} {:>11} {:>9.1} {:>9.1} {:>9.1}",
            r.backend,
            r.callbacks.per_sec,
            r.callbacks.latency.p50_ms,
            r.callbacks.latency.p99_ms,
            r.callbacks.latency.max_ms,
            r.callbacks.errors,
            seq.map_or_else(|| "-".into(), |c| format!("{:.3}", c.overhead.p50_ms)),
            seq.map_or_else(|| "-".into(), |c| format!("{:.3}", c.overhead.p99_ms)),
            mb(r.memory.idle_rss_kb),
            mb(r.memory.after_hwm_kb),
            mb(r.memory.after_rss_kb),
        );
    }
}

// ---------------------------------------------------------------------------------------------

fn server_binary(args: &Args) -> anyhow::Result<PathBuf> {
    let path = match &args.server_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .context("locating this executable")?
            .parent()
            .ok_or_else(|| anyhow!("this executable has no directory"))?
            .join("callbridge"),
    };
    if !path.is_file() {
        bail!(
            "server binary {} not found: run `cargo build --release` (it builds both binaries) \
             or pass --server-bin",
            path.display()
        );
    }
    Ok(path)
}

async fn run(args: &Args) -> anyhow::Result<bool> {
    let server_bin = server_binary(args)?;
    if args.callbacks == 0 || args.concurrency == 0 {
        bail!("--callbacks and --concurrency must be positive");
    }
    let backends: &[Backend] = match args.backend {
        BackendArg::Sqlite => &[Backend::Sqlite],
        BackendArg::Postgres => &[Backend::Postgres],
        BackendArg::Both => &[Backend::Sqlite, Backend::Postgres],
    };
    println!(
        "callbridge-bench: {} cores, load generator and fake Exotel in this process (pid {}), server as a child process",
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        std::process::id()
    );
    let mut reports = Vec::new();
    let mut failed = false;
    for &b in backends {
        match run_backend(args, b, &server_bin).await {
            Ok(r) => reports.push(r),
            Err(e) => {
                failed = true;
                eprintln!("error: {} run failed: {e:#}", b.name());
            }
        }
    }
    if !reports.is_empty() {
        print_summary(&reports);
    }
    let errors: u64 = reports
        .iter()
        .map(|r| r.callbacks.errors + r.clicks.iter().map(|c| c.errors).sum::<u64>())
        .sum();
    let summary = json!({
        "bench": "callbridge",
        "version": env!("CARGO_PKG_VERSION"),
        "worker_enabled": false,
        "reconcile_enabled": false,
        "concurrency": args.concurrency,
        "callbacks": args.callbacks,
        "warmup": args.warmup,
        "server_env": args.server_env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        "results": reports,
    });
    println!("{summary}");
    Ok(!failed && errors == 0)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    tokio::select! {
        r = run(&args) => match r {
            Ok(true) => std::process::ExitCode::SUCCESS,
            Ok(false) => std::process::ExitCode::FAILURE,
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::ExitCode::FAILURE
            }
        },
        _ = tokio::signal::ctrl_c() => {
            // Dropping `run` kills the child, drops the database and removes the directory.
            eprintln!("interrupted; cleaned up");
            std::process::ExitCode::FAILURE
        }
    }
}
