//! Database connection for SQLite (default, WAL) and PostgreSQL, migrations, and the few
//! helpers every repository uses.
//!
//! SQLite rule: a transaction that writes begins `IMMEDIATE` (via [`begin_write`]), so it takes
//! the write lock up front and waits on `busy_timeout` instead of failing when a read snapshot
//! would have to be upgraded.

use std::{
    collections::HashMap,
    path::PathBuf,
    str::FromStr,
    sync::{Arc, LazyLock},
    time::Duration,
};

use anyhow::Context;
use migration::{Migrator, MigratorTrait};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DatabaseTransaction, DbBackend,
    DbErr, ExecResult, QueryResult, SqliteTransactionMode, Statement, TransactionOptions,
    TransactionTrait, Value,
    sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous},
};

use crate::config::Config;

/// Open the pool for `config.database_url`.
///
/// # Errors
/// The database cannot be reached or opened.
pub async fn connect(config: &Config) -> anyhow::Result<DatabaseConnection> {
    let max = match config.db_max_connections {
        0 if config.is_postgres() => 16,
        0 => 8,
        n => n,
    };
    connect_pool(config, max).await
}

/// SQLite only: a pool of one connection for the callback writer. Its page cache stays valid
/// from one group commit to the next (SQLite drops a connection's cache whenever another
/// connection has written), where a pooled connection would be a different one each time,
/// re-reading every page it touches.
///
/// # Errors
/// The database cannot be opened.
pub async fn connect_writer(config: &Config) -> anyhow::Result<DatabaseConnection> {
    connect_pool(config, 1).await
}

async fn connect_pool(config: &Config, max: u32) -> anyhow::Result<DatabaseConnection> {
    let mut opts = ConnectOptions::new(config.database_url.clone());
    opts.max_connections(max)
        .min_connections(1)
        .connect_timeout(Duration::from_secs(10))
        .acquire_timeout(Duration::from_secs(15))
        .sqlx_logging(false);
    // sqlx pings every connection it hands out by default: one more round trip (PostgreSQL) or
    // worker-thread hop (SQLite) before every transaction and query. A busy connection has just
    // proven itself, so only one that sat idle is pinged on PostgreSQL (a server restart still
    // costs at most one failed statement per busy connection), and an SQLite file never
    // goes away under an open connection.
    if config.is_postgres() {
        opts.test_before_acquire_if_idle_for(Duration::from_secs(30));
    } else {
        opts.test_before_acquire(false);
    }
    if !config.is_postgres() {
        let sync = SqliteSynchronous::from_str(&config.sqlite_synchronous)
            .unwrap_or(SqliteSynchronous::Full);
        opts.map_sqlx_sqlite_opts(move |o| {
            o.journal_mode(SqliteJournalMode::Wal)
                .synchronous(sync)
                .busy_timeout(Duration::from_secs(10))
                .foreign_keys(true)
                .pragma("temp_store", "memory")
                // Checkpoints run in `run_checkpointer`, not inside a committing callback batch.
                .pragma("wal_autocheckpoint", "0")
                .create_if_missing(true)
        });
    }
    if config.is_postgres() && loopback_without_sslmode(&config.database_url) {
        // sqlx's default `prefer` negotiates TLS even to 127.0.0.1: the encryption and TLS's
        // 16 KiB records (each a separate segment that can wait on a delayed ACK) halved the
        // callbacks/s callbridge-bench measured. Traffic that never leaves the machine gets
        // plain TCP unless the URL asks for TLS with an explicit `sslmode`.
        tracing::info!("PostgreSQL on loopback without sslmode in the URL: connecting without TLS");
        opts.map_sqlx_postgres_opts(|o| o.ssl_mode(sea_orm::sqlx::postgres::PgSslMode::Disable));
    }
    Database::connect(opts)
        .await
        .with_context(|| format!("connecting to {}", redact_url(&config.database_url)))
}

/// Whether `url` names a PostgreSQL server on this machine's loopback (`localhost`, 127.0.0.0/8,
/// `::1`) over TCP and says nothing about `sslmode`.
fn loopback_without_sslmode(url: &str) -> bool {
    let Ok(u) = url::Url::parse(url) else {
        return false;
    };
    if u.query_pairs()
        .any(|(k, _)| k == "sslmode" || k == "ssl-mode" || k == "host")
    {
        return false;
    }
    match u.host() {
        // `postgres:` is not a special scheme, so an IPv4 address arrives as an opaque host.
        Some(url::Host::Domain(d)) => {
            d.eq_ignore_ascii_case("localhost")
                || d.parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// Bring the schema up to date.
///
/// # Errors
/// A migration failed.
pub async fn migrate(db: &DatabaseConnection) -> anyhow::Result<()> {
    Migrator::up(db, None).await.context("running migrations")
}

/// This process's turn to write to one SQLite file; nothing on PostgreSQL. Held until dropped.
///
/// SQLite lets one connection write at a time. A connection that finds the write lock taken
/// does not queue: it sleeps in SQLite's busy handler in growing steps (1, 2, 5 … 100 ms) and
/// tries again, so eight concurrent clicks, each holding the lock well under a millisecond,
/// waited up to 0.5–0.7 s (callbridge-bench, click-to-call at concurrency 8: p99 105–130 ms).
/// Writers in this process therefore take turns on a first-come-first-served async lock per
/// database file before they touch SQLite's lock; `busy_timeout` is left for other processes
/// (the `callbridge` CLI). Never take a second turn while holding one.
#[must_use = "the turn ends when this is dropped"]
pub struct WriteTurn {
    _guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

/// Wait for this process's turn to write (see [`WriteTurn`]).
pub async fn write_turn(db: &DatabaseConnection) -> WriteTurn {
    static GATES: LazyLock<std::sync::Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>> =
        LazyLock::new(Default::default);
    if db.get_database_backend() != DbBackend::Sqlite {
        return WriteTurn { _guard: None };
    }
    let file = db
        .get_sqlite_connection_pool()
        .connect_options()
        .get_filename()
        .to_path_buf();
    let gate = {
        let mut gates = GATES
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(gates.entry(file).or_default())
    };
    WriteTurn {
        _guard: Some(gate.lock_owned().await),
    }
}

/// A transaction that writes: IMMEDIATE on SQLite, begun in this process's [`WriteTurn`], which
/// it keeps until commit or rollback. Derefs to the [`DatabaseTransaction`].
pub struct WriteTxn {
    // Field order is drop order: the transaction ends before the turn passes on.
    txn: DatabaseTransaction,
    _turn: WriteTurn,
}

impl std::ops::Deref for WriteTxn {
    type Target = DatabaseTransaction;

    fn deref(&self) -> &DatabaseTransaction {
        &self.txn
    }
}

impl WriteTxn {
    /// Commit, then give up the turn.
    ///
    /// # Errors
    /// The commit failed.
    pub async fn commit(self) -> Result<(), DbErr> {
        self.txn.commit().await
    }

    /// Roll back, then give up the turn.
    ///
    /// # Errors
    /// The rollback failed.
    pub async fn rollback(self) -> Result<(), DbErr> {
        self.txn.rollback().await
    }
}

/// Begin a transaction that will write (IMMEDIATE on SQLite, in this process's turn).
///
/// # Errors
/// The pool or the lock could not be had.
pub async fn begin_write(db: &DatabaseConnection) -> Result<WriteTxn, DbErr> {
    let turn = write_turn(db).await;
    let txn = db
        .begin_with_options(TransactionOptions {
            isolation_level: None,
            access_mode: None,
            sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
        })
        .await?;
    Ok(WriteTxn { txn, _turn: turn })
}

/// One statement that writes, outside a transaction, in this process's turn.
///
/// # Errors
/// The statement failed.
pub async fn execute_write(
    db: &DatabaseConnection,
    statement: Statement,
) -> Result<ExecResult, DbErr> {
    let _turn = write_turn(db).await;
    db.execute_raw(statement).await
}

/// One statement that writes and returns rows (`… RETURNING`), outside a transaction, in this
/// process's turn.
///
/// # Errors
/// The statement failed.
pub async fn query_write(
    db: &DatabaseConnection,
    statement: Statement,
) -> Result<Vec<QueryResult>, DbErr> {
    let _turn = write_turn(db).await;
    db.query_all_raw(statement).await
}

/// SQLite only: `BEGIN IMMEDIATE; {body}; COMMIT` as one query on one pooled connection, in
/// this process's write turn; the rows `body`'s statements yield, in order. Parameters are
/// numbered (`$1` or `?1` …) and may repeat across statements.
///
/// Through sea-orm, the begin, each statement and the commit are one hop each to the
/// connection's worker thread, and every hop waits for a thread to wake: on a busy machine the
/// wake-ups are most of a click's tail. Here the whole transaction is one hop.
///
/// The query runs on its own task, so a caller that goes away (a client hanging up) cannot stop
/// it between the BEGIN and the COMMIT. If a statement fails, the transaction is rolled back on
/// the same connection before it goes back to the pool, and the connection is closed if even
/// that fails: no later user of the pool inherits an open transaction.
///
/// # Errors
/// A statement failed (nothing was written), or the pool could not be had.
pub async fn sqlite_write_script(
    db: &DatabaseConnection,
    body: &str,
    values: Vec<Value>,
) -> Result<Vec<QueryResult>, DbErr> {
    use sea_orm::{RuntimeErr, sqlx};
    let err = |e: sqlx::Error| DbErr::Exec(RuntimeErr::SqlxError(e.into()));
    let pool = db.get_sqlite_connection_pool().clone();
    let turn = write_turn(db).await;
    let sql = format!("BEGIN IMMEDIATE; {body}; COMMIT");
    let task = tokio::spawn(async move {
        let _turn = turn;
        let mut conn = pool.acquire().await.map_err(err)?;
        let args = sea_query_sqlx::SqlxValues(sea_orm::sea_query::Values(values));
        match sqlx::query_with(sqlx::AssertSqlSafe(sql), args)
            .fetch_all(&mut *conn)
            .await
        {
            Ok(rows) => Ok(rows.into_iter().map(QueryResult::from).collect()),
            Err(e) => {
                if let Err(r) = sqlx::query("ROLLBACK").execute(&mut *conn).await {
                    // "no transaction is active": BEGIN itself failed, or SQLite rolled back
                    // on its own. Anything else leaves the connection's state unknown.
                    if !r.to_string().contains("no transaction is active") {
                        conn.close_on_drop();
                    }
                }
                Err(err(e))
            }
        }
    });
    task.await
        .map_err(|e| DbErr::Custom(format!("write task failed: {e}")))?
}

/// A subquery yielding the elements of a JSON array of strings bound as one parameter, for
/// `col IN (…)`: one statement text for any number of ids, so it is prepared once and cached.
#[must_use]
pub fn json_ids_subquery(backend: DbBackend) -> &'static str {
    if backend == DbBackend::Postgres {
        "SELECT json_array_elements_text(CAST(? AS json))"
    } else {
        "SELECT value FROM json_each(?)"
    }
}

/// Now, in Unix milliseconds: the unit of every stored timestamp.
#[must_use]
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A raw statement whose `?` placeholders are rewritten to `$n` on PostgreSQL.
#[must_use]
pub fn stmt(backend: DbBackend, sql: &str, values: Vec<Value>) -> Statement {
    let sql = if backend == DbBackend::Postgres {
        let mut out = String::with_capacity(sql.len() + 8);
        let mut n = 0;
        for c in sql.chars() {
            if c == '?' {
                n += 1;
                out.push('$');
                out.push_str(&n.to_string());
            } else {
                out.push(c);
            }
        }
        out
    } else {
        sql.to_owned()
    };
    Statement::from_sql_and_values(backend, sql, values)
}

/// `?, ?, ?` for an `IN (…)` list of `n` values.
#[must_use]
pub fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

/// Whether the database answers.
pub async fn ping(db: &DatabaseConnection) -> bool {
    db.execute_unprepared("SELECT 1").await.is_ok()
}

/// A database URL with its password removed, for messages.
#[must_use]
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

/// Whether a database error is a unique-constraint violation (→ 409 at the HTTP edge).
#[must_use]
pub fn is_unique_violation(err: &DbErr) -> bool {
    matches!(
        err.sql_err(),
        Some(sea_orm::SqlErr::UniqueConstraintViolation(_))
    )
}

/// The WAL size (frames, each one page) past which the checkpointer rewinds the WAL: 1 GiB of
/// 4 KiB pages.
pub const WAL_REWIND_FRAMES: i64 = 262_144;

/// SQLite only: checkpoint the WAL in the background every `every` (PASSIVE: never blocks
/// writers), so commits on the callback path never pay for a checkpoint. Returns at shutdown.
pub async fn run_checkpointer(
    db: DatabaseConnection,
    every: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(every) => {}
        }
        if let Err(e) = checkpoint(&db, WAL_REWIND_FRAMES).await {
            tracing::warn!(error = %e, "WAL checkpoint failed");
        }
    }
    // Leave a short WAL behind.
    let _ = db
        .execute_unprepared("PRAGMA wal_checkpoint(TRUNCATE)")
        .await;
}

/// One checkpoint round; returns the WAL's size in frames before it.
///
/// A PASSIVE checkpoint never finishes under a steady stream of commits (a reader or the next
/// commit always holds a newer snapshot), so SQLite never rewinds the WAL and the file only
/// grows: placing 42,000 calls in callbridge-bench left a 3.5 GB WAL. Once it holds more than
/// `rewind_frames`, the round finishes with a RESTART checkpoint in a write turn: writers wait
/// while the frames committed since the PASSIVE copy are copied and the readers still on the
/// WAL finish, and the next commit starts again at the beginning of the file. That stall
/// (tens of milliseconds at full load) is why it is rare instead of every round: measured at
/// every round it tripled the callbacks' p99.
///
/// # Errors
/// The checkpoint failed.
pub async fn checkpoint(db: &DatabaseConnection, rewind_frames: i64) -> Result<i64, DbErr> {
    let frames = |row: Option<QueryResult>| {
        row.and_then(|r| r.try_get_by_index::<i64>(1).ok())
            .unwrap_or(0)
    };
    let pragma = |mode: &str| {
        Statement::from_string(DbBackend::Sqlite, format!("PRAGMA wal_checkpoint({mode})"))
    };
    let log = frames(db.query_one_raw(pragma("PASSIVE")).await?);
    if log > rewind_frames {
        let _turn = write_turn(db).await;
        db.query_one_raw(pragma("RESTART")).await?;
    }
    Ok(log)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_for_postgres() {
        let s = stmt(DbBackend::Postgres, "a = ? AND b IN (?, ?)", vec![]);
        assert_eq!(s.sql, "a = $1 AND b IN ($2, $3)");
        let s = stmt(DbBackend::Sqlite, "a = ?", vec![]);
        assert_eq!(s.sql, "a = ?");
    }

    #[test]
    fn only_loopback_urls_without_sslmode_drop_tls() {
        for url in [
            "postgres://postgres@127.0.0.1:5432/test",
            "postgres://u:p@localhost/db",
            "postgresql://u@[::1]:5433/db?application_name=cb",
            "postgres://u@127.0.0.2/db",
        ] {
            assert!(loopback_without_sslmode(url), "{url}");
        }
        for url in [
            "postgres://u@127.0.0.1/db?sslmode=require",
            "postgres://u@localhost/db?sslmode=prefer",
            "postgres://u@db.internal:5432/db",
            "postgres://u@10.0.0.5/db",
            "postgres://u@localhost/db?host=/var/run/postgresql",
            "not a url",
        ] {
            assert!(!loopback_without_sslmode(url), "{url}");
        }
    }

    /// A WAL-mode SQLite file in `dir` without automatic checkpoints, as `connect` opens it.
    async fn scratch_sqlite(
        dir: &tempfile::TempDir,
        connections: u32,
        busy_timeout: Duration,
    ) -> DatabaseConnection {
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display());
        let mut opts = ConnectOptions::new(url);
        opts.max_connections(connections).sqlx_logging(false);
        opts.map_sqlx_sqlite_opts(move |o| {
            o.journal_mode(SqliteJournalMode::Wal)
                .busy_timeout(busy_timeout)
                .pragma("wal_autocheckpoint", "0")
        });
        Database::connect(opts).await.unwrap()
    }

    /// A fresh [`scratch_sqlite`] in its own directory holding one table `t ({columns})`.
    async fn scratch_table(
        connections: u32,
        busy_timeout: Duration,
        columns: &str,
    ) -> (tempfile::TempDir, DatabaseConnection) {
        let dir = tempfile::tempdir().unwrap();
        let db = scratch_sqlite(&dir, connections, busy_timeout).await;
        db.execute_unprepared(&format!("CREATE TABLE t ({columns})"))
            .await
            .unwrap();
        (dir, db)
    }

    /// Eight writers at once on one SQLite file whose connections do not wait for the lock at
    /// all (`busy_timeout` 0): without the turns, every writer that meets a held lock fails
    /// with "database is locked".
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn sqlite_writers_in_one_process_take_turns() {
        let (_dir, db) = scratch_table(8, Duration::ZERO, "n INTEGER NOT NULL").await;
        let writers = (0..8).map(|i| {
            let db = db.clone();
            tokio::spawn(async move {
                for j in 0..10 {
                    let txn = begin_write(&db).await?;
                    txn.execute_raw(stmt(
                        DbBackend::Sqlite,
                        "INSERT INTO t (n) VALUES (?)",
                        vec![(i * 100 + j).into()],
                    ))
                    .await?;
                    // Hold the lock across an await, as a click's transaction does.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    txn.commit().await?;
                    execute_write(
                        &db,
                        stmt(
                            DbBackend::Sqlite,
                            "UPDATE t SET n = n + 1000 WHERE n = ?",
                            vec![(i * 100 + j).into()],
                        ),
                    )
                    .await?;
                }
                Ok::<_, DbErr>(())
            })
        });
        for w in futures_util::future::join_all(writers).await {
            w.unwrap().unwrap();
        }
        let row = db
            .query_one_raw(Statement::from_string(
                DbBackend::Sqlite,
                "SELECT COUNT(*) AS n, MIN(n) AS lo FROM t",
            ))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(row.try_get::<i64>("", "n").unwrap(), 80);
        assert!(row.try_get::<i64>("", "lo").unwrap() >= 1000);
    }

    async fn count(db: &DatabaseConnection, sql: &str) -> i64 {
        db.query_one_raw(Statement::from_string(DbBackend::Sqlite, sql))
            .await
            .unwrap()
            .unwrap()
            .try_get::<i64>("", "n")
            .unwrap()
    }

    /// A script whose second statement fails writes nothing, and the pool's only connection
    /// comes back without an open transaction: the next script on it commits.
    #[tokio::test]
    async fn a_failed_script_is_rolled_back_on_its_connection() {
        let (dir, db) = scratch_table(1, Duration::from_secs(5), "n INTEGER PRIMARY KEY").await;
        let err = sqlite_write_script(
            &db,
            "INSERT INTO t (n) VALUES ($1); INSERT INTO t (n) VALUES ($1)",
            vec![7.into()],
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("UNIQUE"), "{err}");
        assert_eq!(count(&db, "SELECT COUNT(*) AS n FROM t").await, 0);
        let rows = sqlite_write_script(
            &db,
            "INSERT INTO t (n) VALUES ($1), ($2); SELECT SUM(n) AS n FROM t WHERE n >= $1",
            vec![7.into(), 8.into()],
        )
        .await
        .unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].try_get::<i64>("", "n").unwrap(), 15);
        // Committed: another connection sees it.
        let other = scratch_sqlite(&dir, 1, Duration::from_secs(5)).await;
        assert_eq!(count(&other, "SELECT COUNT(*) AS n FROM t").await, 2);
    }

    /// A caller that goes away once the script has started (a client hanging up) does not
    /// leave it between BEGIN and COMMIT: it commits, and the writer after it gets its turn.
    #[tokio::test]
    async fn a_script_whose_caller_goes_away_still_commits() {
        let (dir, db) = scratch_table(1, Duration::from_secs(5), "n INTEGER NOT NULL").await;
        let mut script = Box::pin(sqlite_write_script(
            &db,
            "INSERT INTO t (n) VALUES ($1)",
            vec![1.into()],
        ));
        // One poll takes the (free) turn and starts the query; then the caller is gone.
        assert!(futures_util::poll!(script.as_mut()).is_pending());
        drop(script);
        execute_write(
            &db,
            Statement::from_string(DbBackend::Sqlite, "INSERT INTO t (n) VALUES (2)"),
        )
        .await
        .unwrap();
        let other = scratch_sqlite(&dir, 1, Duration::from_secs(5)).await;
        assert_eq!(count(&other, "SELECT COUNT(*) AS n FROM t").await, 2);
    }

    /// A reader holding an old snapshot keeps PASSIVE checkpoints from finishing, so the WAL
    /// grows with every commit; past the cap, a round rewinds it once the reader is done.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_growing_wal_is_rewound_past_its_cap() {
        let (_dir, db) = scratch_table(
            4,
            Duration::from_secs(5),
            "n INTEGER NOT NULL, pad TEXT NOT NULL",
        )
        .await;
        let write = |n: i64| {
            let db = db.clone();
            async move {
                execute_write(
                    &db,
                    stmt(
                        DbBackend::Sqlite,
                        "INSERT INTO t (n, pad) VALUES (?, ?)",
                        vec![n.into(), "x".repeat(3000).into()],
                    ),
                )
                .await
                .unwrap();
            }
        };
        for n in 0..20 {
            write(n).await;
        }
        // A reader's snapshot pins the WAL while more commits land.
        let reader = db.begin().await.unwrap();
        reader
            .query_one_raw(Statement::from_string(
                DbBackend::Sqlite,
                "SELECT COUNT(*) FROM t",
            ))
            .await
            .unwrap();
        for n in 20..40 {
            write(n).await;
        }
        // Under the cap: PASSIVE only; it cannot finish past the reader, and the WAL goes on
        // growing after the reader is gone.
        let before = checkpoint(&db, i64::MAX).await.unwrap();
        assert!(before >= 40, "{before} frames");
        let release = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            reader.rollback().await.unwrap();
        });
        write(40).await;
        let grown = checkpoint(&db, i64::MAX).await.unwrap();
        assert!(grown > before, "{grown} frames after {before}");
        // Over the cap: the round waits for readers, finishes, and the next commit starts over.
        for n in 41..45 {
            write(n).await;
        }
        checkpoint(&db, 10).await.unwrap();
        release.await.unwrap();
        write(45).await;
        let after = checkpoint(&db, i64::MAX).await.unwrap();
        assert!(after < 10, "{after} frames after a rewind (was {grown})");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:secret@h/db"),
            "postgres://u:***@h/db"
        );
    }
}
