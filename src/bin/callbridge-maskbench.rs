//! Dial-whom latency benchmark: seeds N active caller-mode masking sessions straight into a
//! fresh SQLite file or a fresh PostgreSQL database, starts the real server on loopback, and
//! fires Exotel-shaped dial-whom requests (hits, and misses that fall through every rule),
//! checking each answer and reporting p50/p90/p99/max latency and throughput.
//!
//! ```text
//! cargo run --release --bin callbridge-maskbench -- --sessions 100000 --requests 20000
//! cargo run --release --bin callbridge-maskbench -- --postgres postgres://postgres@127.0.0.1:5432/test
//! # the same code through the (unoptimised) test build:
//! MASKBENCH_ARGS="--sessions 100000" cargo test --test it maskbench -- --ignored --nocapture
//! ```

use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine;
use callbridge::{Application, config::Config, db, tenants};
use clap::Parser;
use rand::Rng;
use sea_orm::{ConnectionTrait, Database, Value};

/// Measure dial-whom with many active sessions.
#[derive(Debug, Parser)]
pub(crate) struct Args {
    /// Active sessions to seed.
    #[arg(long, default_value_t = 100_000)]
    sessions: usize,
    /// Requests per measured run.
    #[arg(long, default_value_t = 20_000)]
    requests: usize,
    /// Concurrent clients for the concurrent run (a sequential run always comes first).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Pool size (virtual numbers).
    #[arg(long, default_value_t = 100)]
    pool: usize,
    /// Use PostgreSQL: an admin URL on which a fresh database is created (and dropped after).
    #[arg(long)]
    postgres: Option<String>,
    /// SQLite `synchronous` (full or normal).
    #[arg(long, default_value = "full")]
    sqlite_synchronous: String,
}

const AGENTS: usize = 1000;

fn customer(i: usize) -> String {
    format!("+9170{:08}", i)
}
fn agent(j: usize) -> String {
    format!("+9198{:08}", j)
}
fn virtual_number(k: usize) -> String {
    format!("+9180{:08}", 47_000_000 + k)
}
fn national(e164: &str) -> String {
    format!("0{}", &e164[3..])
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    bench(Args::parse()).await
}

/// Run the benchmark (also reachable from the integration-test build, see tests/it/main.rs).
pub(crate) async fn bench(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.sessions.div_ceil(AGENTS) <= args.pool,
        "--pool must be at least sessions / {AGENTS} so no agent holds a number twice"
    );
    let mut config = Config::default();
    let mut cleanup_pg: Option<(String, String)> = None;
    let mut cleanup_file = None;
    match &args.postgres {
        Some(admin) => {
            let name = format!("maskbench_{}", uuid::Uuid::new_v4().simple());
            let conn = Database::connect(admin)
                .await
                .context("PostgreSQL admin URL")?;
            conn.execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
                .await?;
            let mut url = url::Url::parse(admin)?;
            url.set_path(&format!("/{name}"));
            config.database_url = url.to_string();
            cleanup_pg = Some((admin.clone(), name));
        }
        None => {
            let path = std::env::temp_dir()
                .join(format!("maskbench-{}.db", uuid::Uuid::new_v4().simple()));
            config.database_url = format!("sqlite://{}?mode=rwc", path.display());
            cleanup_file = Some(path);
        }
    }
    config.bind = "127.0.0.1:0".parse()?;
    config.master_key = Some(
        base64::engine::general_purpose::STANDARD
            .encode(rand::random::<[u8; 32]>())
            .into(),
    );
    config.worker_enabled = false;
    config.reconcile_enabled = false;
    config.masking_sweep_interval_secs = 0;
    config.sqlite_synchronous = args.sqlite_synchronous.clone();
    config.log_format = "pretty".into();

    let result = run(&args, config).await;

    if let Some((admin, name)) = cleanup_pg {
        let conn = Database::connect(&admin).await?;
        let _ = conn
            .execute_unprepared(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .await;
    }
    if let Some(path) = cleanup_file {
        for suffix in ["", "-wal", "-shm", ".key"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }
    result
}

async fn run(args: &Args, config: Config) -> anyhow::Result<()> {
    let backend_name = if config.is_postgres() {
        "postgres"
    } else {
        "sqlite"
    };
    let app = Application::build(config, None).await?;
    let state = app.state();
    let shutdown = app.shutdown_token();
    let server = tokio::spawn(app.run(false));

    let created = tenants::create(
        &state.db,
        &state.sealer,
        &state.public_base,
        "IN",
        tenants::NewTenant {
            name: "bench".into(),
            exotel_sid: "bench".into(),
            exotel_api_key: "k".into(),
            exotel_api_token: "t".into(),
            exotel_api_base: None,
            caller_id: None,
            webhook_url: None,
            default_region: None,
        },
    )
    .await?;
    let tenant = created.tenant_id.clone();

    let t0 = Instant::now();
    seed(&state.db, &tenant, args.sessions, args.pool).await?;
    eprintln!(
        "[{backend_name}] seeded {} sessions ({} allocations) on a pool of {} in {:.1?}",
        args.sessions,
        args.sessions * 2,
        args.pool,
        t0.elapsed()
    );

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency * 2)
        .build()?;
    let url = created.dial_whom_url.clone();
    // Warm up the pool and caches.
    measure(&http, &url, args.sessions, 500, 4, Kind::Hit).await?;

    for (label, conc, kind) in [
        ("hit, sequential", 1, Kind::Hit),
        ("hit, concurrent", args.concurrency, Kind::Hit),
        (
            "miss (falls through every rule), concurrent",
            args.concurrency,
            Kind::Miss,
        ),
    ] {
        let n = if conc == 1 {
            args.requests / 4
        } else {
            args.requests
        };
        let (mut lat, wall) = measure(&http, &url, args.sessions, n, conc, kind).await?;
        lat.sort_unstable();
        let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
        println!(
            "[{backend_name}] {label:<45} n={n:<6} c={conc:<3} p50={:>7.3}ms p90={:>7.3}ms \
             p99={:>7.3}ms max={:>7.3}ms  {:>6.0} req/s",
            ms(pct(0.50)),
            ms(pct(0.90)),
            ms(pct(0.99)),
            ms(*lat.last().unwrap_or(&Duration::ZERO)),
            n as f64 / wall.as_secs_f64()
        );
    }
    shutdown.cancel();
    let _ = server.await;
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Hit,
    Miss,
}

async fn measure(
    http: &reqwest::Client,
    url: &str,
    sessions: usize,
    n: usize,
    conc: usize,
    kind: Kind,
) -> anyhow::Result<(Vec<Duration>, Duration)> {
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..conc {
        let http = http.clone();
        let url = url.to_owned();
        let share = n / conc + usize::from(w < n % conc);
        tasks.spawn(async move {
            let mut out = Vec::with_capacity(share);
            for _ in 0..share {
                let i = rand::rng().random_range(0..sessions);
                let (from, expect) = match kind {
                    Kind::Hit => (customer(i), national(&agent(i % AGENTS))),
                    Kind::Miss => (format!("+9171{:08}", i), String::new()),
                };
                let vn = virtual_number(i / AGENTS);
                let q = format!(
                    "{url}?CallFrom={}&CallSid=bench{i}&CallStatus=in-progress&CallTo={}\
                     &CallType=call-attempt&Direction=incoming&DialWhomNumber=&flow_id=1",
                    national(&from),
                    national(&vn)
                );
                let t = Instant::now();
                let r = http.get(&q).send().await?;
                let status = r.status();
                let body = r.text().await?;
                out.push(t.elapsed());
                anyhow::ensure!(
                    status == 200 && body == expect,
                    "session {i}: expected {expect:?}, got {status} {body:?}"
                );
            }
            Ok::<_, anyhow::Error>(out)
        });
    }
    let mut all = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        all.extend(r??);
    }
    Ok((all, start.elapsed()))
}

/// Session i: customer i ↔ agent (i mod 1000) on pool number (i / 1000) — so no participant
/// holds a number twice, exactly as the allocator would guarantee.
async fn seed(
    conn: &sea_orm::DatabaseConnection,
    tenant: &str,
    sessions: usize,
    pool: usize,
) -> anyhow::Result<()> {
    let backend = conn.get_database_backend();
    let now = db::now_ms();
    let numbers: Vec<String> = (0..pool).map(virtual_number).collect();
    callbridge::masking::add_numbers(conn, tenant, &numbers).await?;
    let expires = now + 86_400_000;
    const BATCH: usize = 500;
    let mut i = 0;
    while i < sessions {
        let end = (i + BATCH).min(sessions);
        let txn = db::begin_write(conn).await?;
        let mut s_vals: Vec<Value> = Vec::new();
        let mut p_vals: Vec<Value> = Vec::new();
        let mut a_vals: Vec<Value> = Vec::new();
        for k in i..end {
            let id = format!("ses_{}", uuid::Uuid::now_v7().simple());
            let (c, a, vn) = (customer(k), agent(k % AGENTS), virtual_number(k / AGENTS));
            s_vals.extend([
                id.clone().into(),
                tenant.into(),
                vn.clone().into(),
                expires.into(),
                now.into(),
            ]);
            for (pos, (num, role)) in [(c.clone(), "customer"), (a.clone(), "agent")]
                .into_iter()
                .enumerate()
            {
                p_vals.extend([
                    id.clone().into(),
                    i32::try_from(pos)?.into(),
                    tenant.into(),
                    num.into(),
                    role.into(),
                    true.into(),
                ]);
            }
            for (me, other) in [(&c, &a), (&a, &c)] {
                a_vals.extend([
                    tenant.into(),
                    me.clone().into(),
                    vn.clone().into(),
                    id.clone().into(),
                    other.clone().into(),
                ]);
            }
        }
        let n = end - i;
        let rows = |per: usize, count: usize| {
            vec![format!("({})", db::placeholders(per)); count].join(", ")
        };
        txn.execute_raw(db::stmt(
            backend,
            &format!(
                "INSERT INTO masking_sessions (id, tenant_id, mode, virtual_number, status, \
                 ttl_seconds, expires_at, created_at) VALUES {}",
                vec!["(?, ?, 'caller', ?, 'open', 86400, ?, ?)"; n].join(", ")
            ),
            s_vals,
        ))
        .await?;
        txn.execute_raw(db::stmt(
            backend,
            &format!(
                "INSERT INTO masking_participants (session_id, position, tenant_id, number, \
                 role, active) VALUES {}",
                rows(6, n * 2)
            ),
            p_vals,
        ))
        .await?;
        txn.execute_raw(db::stmt(
            backend,
            &format!(
                "INSERT INTO masking_allocations (tenant_id, number, virtual_number, \
                 session_id, counterpart) VALUES {}",
                rows(5, n * 2)
            ),
            a_vals,
        ))
        .await?;
        txn.commit().await?;
        i = end;
    }
    // Fresh statistics so both planners see the real table sizes.
    conn.execute_unprepared("ANALYZE").await?;
    Ok(())
}
