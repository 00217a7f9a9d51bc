//! Durable callback ingestion with group commit.
//!
//! A handler parses the callback, then hands it to the writer and waits. Writer tasks take every
//! callback that is waiting (up to `ingest_batch_max`), apply them all in **one** transaction
//! (final state, legs, and the delivery jobs: a transactional outbox), commit, and only then
//! answer each waiting handler. So a 200 always means "committed", and one fsync covers a whole
//! batch. A repeated callback matches no row (`finalized_at IS NULL` fails) and enqueues nothing.
//! If a batch fails, each callback in it is retried in its own transaction so one bad row cannot
//! fail its neighbours.

use std::{
    collections::HashSet,
    sync::{Arc, LazyLock},
};

use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr, Statement, Value,
};
use tokio::sync::{Notify, oneshot};

use crate::{
    config::Config,
    db::{self, stmt},
    exotel::{StatusCallback, is_terminal, parse_time},
    metrics::Metrics,
};

/// How the call is identified.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CallKey {
    /// SHA-256 of the callback URL token.
    TokenHash(String),
    /// Our call id (reconciler).
    CallId(String),
}

/// Where a final state came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Exotel's StatusCallback.
    Callback,
    /// The call-details API.
    Reconcile,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Self::Callback => "callback",
            Self::Reconcile => "reconcile",
        }
    }
}

/// A state change ready to write.
#[derive(Debug, Clone)]
pub struct Update {
    /// Which call.
    pub key: CallKey,
    /// Exotel's CallSid (must match the stored one if we have it).
    pub call_sid: String,
    /// Exotel status.
    pub status: String,
    /// UTC millis.
    pub started_at: Option<i64>,
    /// UTC millis.
    pub ended_at: Option<i64>,
    /// Bridged seconds.
    pub conversation_duration: Option<i32>,
    /// Exotel's recording URL.
    pub recording_url: Option<String>,
    /// Legs as JSON.
    pub legs: Option<String>,
    /// The raw payload as JSON text.
    pub raw: Option<String>,
    /// Origin.
    pub source: Source,
}

impl Update {
    /// Build from a parsed callback, converting Exotel's offset-less times to UTC.
    #[must_use]
    pub fn from_callback(
        key: CallKey,
        cb: &StatusCallback,
        offset: chrono::FixedOffset,
        raw: Option<String>,
        source: Source,
    ) -> Self {
        let ms = |s: &Option<String>| {
            s.as_deref()
                .and_then(|s| parse_time(s, offset))
                .map(|t| t.timestamp_millis())
        };
        Self {
            key,
            call_sid: cb.call_sid.clone(),
            status: cb.status.clone(),
            started_at: ms(&cb.start_time),
            ended_at: ms(&cb.end_time).or_else(|| {
                if is_terminal(&cb.status) {
                    ms(&cb.date_updated)
                } else {
                    None
                }
            }),
            conversation_duration: cb
                .conversation_duration
                .map(|d| i32::try_from(d).unwrap_or(i32::MAX)),
            recording_url: cb.recording_url.clone(),
            legs: (!cb.legs.is_empty())
                .then(|| serde_json::to_string(&cb.legs).unwrap_or_else(|_| "[]".into())),
            raw,
            source,
        }
    }
}

/// What happened to an update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Committed; `call_id` is the call, `final` whether it was the terminal state.
    Applied {
        /// The call.
        call_id: String,
        /// Whether the call is now final (and delivery was enqueued).
        terminal: bool,
    },
    /// The call was already final: nothing changed.
    Duplicate,
    /// No call has this key.
    Unknown,
    /// The CallSid differs from the one Exotel gave us for this call.
    SidMismatch,
}

/// The writer failed to commit.
#[derive(Debug, thiserror::Error)]
#[error("could not store the callback: {0}")]
pub struct IngestError(String);

struct Item {
    update: Update,
    reply: oneshot::Sender<Result<Outcome, IngestError>>,
}

/// Submits updates to the writer tasks.
#[derive(Clone)]
pub struct Ingestor {
    tx: async_channel::Sender<Item>,
}

/// Stops the writer tasks.
pub struct IngestHandle {
    tx: async_channel::Sender<Item>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl IngestHandle {
    /// Close the queue and wait until every submitted update is committed or answered.
    pub async fn stop(self) {
        self.tx.close();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

impl Ingestor {
    /// Start the writer tasks.
    #[must_use]
    pub fn start(
        db: DatabaseConnection,
        config: &Config,
        metrics: Metrics,
        jobs_ready: Arc<Notify>,
    ) -> (Self, IngestHandle) {
        // One by default on both backends. PostgreSQL, callbridge-bench on 2 cores, 8
        // alternating runs each: 1 writer 7.8-11.9k callbacks/s, p99 9.7-14.0 ms (mean 11.6);
        // 2 writers 7.6-9.5k, p99 12.6-15.2 ms (mean 13.7). Once a batch is one statement, a
        // second writer only competes for the same CPU and index pages. A database far away
        // (every batch waits a network round trip) may want more.
        let writers = config.ingest_writers.max(1);
        let (tx, rx) = async_channel::bounded::<Item>(16_384);
        let writer = Arc::new(Writer {
            db,
            batch_max: config.ingest_batch_max,
            max_attempts: config.job_max_attempts,
            metrics,
            jobs_ready,
        });
        let tasks = (0..writers)
            .map(|_| {
                let rx = rx.clone();
                let w = Arc::clone(&writer);
                tokio::spawn(async move { w.run(rx).await })
            })
            .collect();
        (Self { tx: tx.clone() }, IngestHandle { tx, tasks })
    }

    /// Submit an update and wait until it is committed.
    ///
    /// # Errors
    /// The commit failed (the caller answers 5xx so Exotel retries).
    pub async fn submit(&self, update: Update) -> Result<Outcome, IngestError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Item { update, reply })
            .await
            .map_err(|_| IngestError("the writer is shutting down".into()))?;
        rx.await
            .map_err(|_| IngestError("the writer stopped before answering".into()))?
    }
}

struct Writer {
    db: DatabaseConnection,
    batch_max: usize,
    max_attempts: i32,
    metrics: Metrics,
    jobs_ready: Arc<Notify>,
}

impl Writer {
    async fn run(&self, rx: async_channel::Receiver<Item>) {
        while let Ok(first) = rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < self.batch_max {
                match rx.try_recv() {
                    Ok(item) => batch.push(item),
                    Err(_) => break,
                }
            }
            self.commit_batch(batch).await;
        }
    }

    async fn commit_batch(&self, batch: Vec<Item>) {
        let label = if self.db.get_database_backend() == DbBackend::Postgres {
            "postgres"
        } else {
            "sqlite"
        };
        self.metrics
            .ingest_batch
            .with_label_values(&[label])
            .observe(batch.len() as f64);
        let updates: Vec<&Update> = batch.iter().map(|i| &i.update).collect();
        let started = std::time::Instant::now();
        let applied = self.apply(&updates).await;
        self.metrics
            .ingest_commit
            .with_label_values(&[label])
            .observe(started.elapsed().as_secs_f64());
        match applied {
            Ok((outcomes, enqueued)) => {
                if enqueued {
                    self.jobs_ready.notify_one();
                }
                for (item, outcome) in batch.into_iter().zip(outcomes) {
                    let _ = item.reply.send(Ok(outcome));
                }
            }
            Err(err) if batch.len() > 1 => {
                tracing::warn!(error = %err, size = batch.len(), "batch commit failed; retrying one by one");
                for item in batch {
                    let result = self.apply(&[&item.update]).await;
                    let reply = match result {
                        Ok((mut o, enqueued)) => {
                            if enqueued {
                                self.jobs_ready.notify_one();
                            }
                            Ok(o.pop().unwrap_or(Outcome::Unknown))
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "callback commit failed");
                            Err(IngestError(e.to_string()))
                        }
                    };
                    let _ = item.reply.send(reply);
                }
            }
            Err(err) => {
                tracing::error!(error = %err, "callback commit failed");
                for item in batch {
                    let _ = item.reply.send(Err(IngestError(err.to_string())));
                }
            }
        }
    }

    /// Apply `updates` atomically. Returns each outcome and whether jobs were enqueued.
    async fn apply(&self, updates: &[&Update]) -> Result<(Vec<Outcome>, bool), DbErr> {
        let all_terminal_callbacks = updates.len() > 1
            && updates
                .iter()
                .all(|u| is_terminal(&u.status) && matches!(u.key, CallKey::TokenHash(_)));
        if all_terminal_callbacks {
            return self.apply_terminal_callbacks(updates).await;
        }
        let txn = db::begin_write(&self.db).await?;
        let backend = txn.get_database_backend();
        let now = db::now_ms();
        let mut outcomes = Vec::with_capacity(updates.len());
        let mut finished: Vec<String> = Vec::new();
        let mut seen: HashSet<&CallKey> = HashSet::new();
        for u in updates {
            if !seen.insert(&u.key) && is_terminal(&u.status) {
                // The same call twice in one batch: the first one wins.
                outcomes.push(Outcome::Duplicate);
                continue;
            }
            outcomes.push(apply_one(&txn, backend, u, now, &mut finished).await?);
        }
        let enqueued = after_finalize(&txn, backend, &finished, now, self.max_attempts).await?;
        txn.commit().await?;
        Ok((outcomes, enqueued))
    }

    /// The common case (Exotel sends terminal callbacks only, keyed by URL token): the whole
    /// batch is finalised, taken off the reconciler's schedule and given its delivery jobs by
    /// [`finalize_batch`] in one database round trip (PostgreSQL) or one worker hop, BEGIN to
    /// COMMIT (SQLite), instead of five or six.
    async fn apply_terminal_callbacks(
        &self,
        updates: &[&Update],
    ) -> Result<(Vec<Outcome>, bool), DbErr> {
        let mut seen: HashSet<&CallKey> = HashSet::new();
        let mut firsts: Vec<&Update> = updates
            .iter()
            .copied()
            .filter(|u| seen.insert(&u.key))
            .collect();
        // Rows are locked in this order: the same order in every writer, so two writers
        // holding callbacks for the same calls wait for each other instead of deadlocking.
        firsts.sort_by(|a, b| a.key.cmp(&b.key));
        let applied = finalize_batch(&self.db, &firsts, db::now_ms(), self.max_attempts).await?;
        let backend = self.db.get_database_backend();
        let mut outcomes = Vec::with_capacity(updates.len());
        let mut answered: HashSet<&CallKey> = HashSet::new();
        for u in updates {
            if !answered.insert(&u.key) {
                // The same call twice in one batch: the first one wins.
                outcomes.push(Outcome::Duplicate);
                continue;
            }
            let CallKey::TokenHash(h) = &u.key else {
                continue;
            };
            outcomes.push(match applied.get(h.as_str()) {
                Some(id) => Outcome::Applied {
                    call_id: id.clone(),
                    terminal: true,
                },
                // Committed already; the row says why this one matched nothing (a finalised
                // call stays final, so a repeat reads as one).
                None => why_not_applied(&self.db, backend, &u.key).await?,
            });
        }
        Ok((outcomes, !applied.is_empty()))
    }
}

fn key_clause(key: &CallKey) -> (&'static str, Value) {
    match key {
        CallKey::TokenHash(h) => ("token_hash = ?", h.clone().into()),
        CallKey::CallId(id) => ("id = ?", id.clone().into()),
    }
}

async fn apply_one(
    txn: &DatabaseTransaction,
    backend: DbBackend,
    u: &Update,
    now: i64,
    finished: &mut Vec<String>,
) -> Result<Outcome, DbErr> {
    let (key_sql, key_val) = key_clause(&u.key);
    let terminal = is_terminal(&u.status);
    // The first statement writes, so SQLite's IMMEDIATE lock is already held; PostgreSQL locks
    // the row, so two instances racing on one callback serialise here and the loser matches
    // nothing.
    let row = if terminal {
        let sql = format!(
            "UPDATE calls SET status = ?, exotel_call_sid = COALESCE(exotel_call_sid, ?), \
             started_at = COALESCE(?, started_at), ended_at = COALESCE(?, ended_at), \
             finalized_at = ?, final_source = ?, conversation_duration = ?, recording_url = ?, \
             legs = COALESCE(?, legs), final_payload = ?, updated_at = ? \
             WHERE {key_sql} AND finalized_at IS NULL \
             AND (exotel_call_sid IS NULL OR exotel_call_sid = ?) RETURNING id"
        );
        txn.query_one_raw(stmt(
            backend,
            &sql,
            vec![
                u.status.clone().into(),
                u.call_sid.clone().into(),
                u.started_at.into(),
                u.ended_at.into(),
                now.into(),
                u.source.as_str().into(),
                u.conversation_duration.unwrap_or(0).into(),
                u.recording_url.clone().into(),
                u.legs.clone().into(),
                u.raw.clone().into(),
                now.into(),
                key_val.clone(),
                u.call_sid.clone().into(),
            ],
        ))
        .await?
    } else {
        let sql = format!(
            "UPDATE calls SET status = ?, exotel_call_sid = COALESCE(exotel_call_sid, ?), \
             started_at = COALESCE(?, started_at), updated_at = ? \
             WHERE {key_sql} AND finalized_at IS NULL \
             AND (exotel_call_sid IS NULL OR exotel_call_sid = ?) RETURNING id"
        );
        txn.query_one_raw(stmt(
            backend,
            &sql,
            vec![
                u.status.clone().into(),
                u.call_sid.clone().into(),
                u.started_at.into(),
                now.into(),
                key_val.clone(),
                u.call_sid.clone().into(),
            ],
        ))
        .await?
    };
    if let Some(row) = row {
        let id: String = row.try_get("", "id")?;
        if terminal {
            finished.push(id.clone());
        }
        return Ok(Outcome::Applied {
            call_id: id,
            terminal,
        });
    }
    why_not_applied(txn, backend, &u.key).await
}

/// Nothing matched: tell unknown, already-final and wrong-sid apart.
async fn why_not_applied(
    conn: &impl ConnectionTrait,
    backend: DbBackend,
    key: &CallKey,
) -> Result<Outcome, DbErr> {
    let (key_sql, key_val) = key_clause(key);
    let sql = format!("SELECT finalized_at, exotel_call_sid FROM calls WHERE {key_sql}");
    let Some(row) = conn
        .query_one_raw(stmt(backend, &sql, vec![key_val]))
        .await?
    else {
        return Ok(Outcome::Unknown);
    };
    let finalized: Option<i64> = row.try_get("", "finalized_at")?;
    if finalized.is_some() {
        return Ok(Outcome::Duplicate);
    }
    Ok(Outcome::SidMismatch)
}

/// Finalise many calls (terminal callbacks keyed by token hash, one per call), take them off
/// the reconciler's schedule and insert their delivery jobs (see [`after_finalize`]), with the
/// batch passed as a single JSON parameter, so the statement text is the same for every batch
/// size and is prepared once:
/// - PostgreSQL: one statement whose data-modifying CTEs feed the finalised rows to the DELETE
///   and the INSERTs, committed on its own: one round trip per batch.
/// - SQLite (no UPDATE in a CTE): BEGIN IMMEDIATE, the four statements and COMMIT as one
///   multi-statement query ([`db::sqlite_write_script`]): one hop to the writer's thread. The
///   later statements select the calls this transaction finalised
///   (`finalized_at` = this batch's `now`; a call finalised by an earlier batch in the same
///   millisecond matches too, and its schedule DELETE and job INSERTs are no-ops).
///
/// Returns token hash → call id for the calls it finalised; the others matched nothing
/// (unknown, already final, other sid).
async fn finalize_batch(
    db: &DatabaseConnection,
    updates: &[&Update],
    now: i64,
    max_attempts: i32,
) -> Result<std::collections::HashMap<String, String>, DbErr> {
    let backend = db.get_database_backend();
    let hash = |u: &Update| match &u.key {
        CallKey::TokenHash(h) | CallKey::CallId(h) => h.clone(),
    };
    let rows = updates.iter().map(|u| {
        serde_json::json!({
            "h": hash(u), "sid": u.call_sid, "status": u.status, "started_at": u.started_at,
            "ended_at": u.ended_at, "source": u.source.as_str(),
            "dur": u.conversation_duration.unwrap_or(0), "rec": u.recording_url,
            "legs": u.legs, "raw": u.raw,
        })
    });
    let mut returned = Vec::new();
    if backend == DbBackend::Postgres {
        // Each chunk commits on its own; the caller answers only after the last one.
        for json in json_array_chunks(rows, BULK_PARAM_MAX_BYTES) {
            returned.extend(
                db.query_all_raw(Statement::from_sql_and_values(
                    backend,
                    finalize_batch_postgres_sql(),
                    [json.into(), now.into(), max_attempts.into()],
                ))
                .await?,
            );
        }
    } else {
        // No socket, so no segment size to stay under: the batch is one parameter, and BEGIN,
        // the statements and COMMIT one hop to the writer's thread.
        let json = serde_json::Value::Array(rows.collect()).to_string();
        let hashes = serde_json::Value::from(updates.iter().map(|u| hash(u)).collect::<Vec<_>>());
        returned = db::sqlite_write_script(
            db,
            finalize_batch_sqlite_sql(),
            vec![
                json.into(),
                now.into(),
                max_attempts.into(),
                hashes.to_string().into(),
            ],
        )
        .await?;
    }
    let mut applied = std::collections::HashMap::with_capacity(updates.len());
    for r in returned {
        applied.insert(
            r.try_get::<String>("", "token_hash")?,
            r.try_get::<String>("", "id")?,
        );
    }
    Ok(applied)
}

/// `SET …` of a finalising UPDATE from the batch row `v`, the batch's `now` being parameter 2.
fn finalize_set(now: &str) -> String {
    format!(
        "SET status = v.status, exotel_call_sid = COALESCE(calls.exotel_call_sid, v.sid), \
         started_at = COALESCE(v.started_at, calls.started_at), \
         ended_at = COALESCE(v.ended_at, calls.ended_at), finalized_at = {now}, \
         final_source = v.source, conversation_duration = v.dur, recording_url = v.rec, \
         legs = COALESCE(v.legs, calls.legs), final_payload = v.raw, updated_at = {now}"
    )
}

/// The match of a finalising UPDATE: the call of that token, not final yet, same CallSid.
const FINALIZE_WHERE: &str = "WHERE calls.token_hash = v.h AND calls.finalized_at IS NULL \
    AND (calls.exotel_call_sid IS NULL OR calls.exotel_call_sid = v.sid)";

/// `INSERT INTO jobs … SELECT` for each sink of the finalised calls `f` (`from` yields their
/// id, tenant_id, crm_installation_id): the tenant webhook, and the CRM installation the call
/// is linked to. `dedupe_key` makes a second enqueue a no-op. Placeholders appear in the order
/// max_attempts, now, now, now, then those of `from`.
fn insert_jobs_sql(from: &str, max_attempts: &str, now: &str) -> [String; 2] {
    let columns = "INSERT INTO jobs (tenant_id, kind, call_id, target, dedupe_key, message_id, \
        state, attempts, max_attempts, run_at, created_at, updated_at)";
    // `WHERE` keeps SQLite's parser from reading `ON CONFLICT` as a join constraint.
    [
        format!(
            "{columns} SELECT f.tenant_id, '{kind}', f.id, 'webhook', f.id || ':webhook:final', \
             'msg_' || f.id, 'queued', 0, {max_attempts}, {now}, {now}, {now} \
             FROM {from} JOIN tenants t ON t.id = f.tenant_id \
             WHERE t.webhook_url IS NOT NULL ON CONFLICT (dedupe_key) DO NOTHING",
            kind = crate::jobs::KIND_WEBHOOK,
        ),
        format!(
            "{columns} SELECT f.tenant_id, '{kind}', f.id, 'crm:' || i.connector, \
             f.id || ':crm:' || i.id, 'msg_' || f.id || '_' || i.id, 'queued', 0, \
             {max_attempts}, {now}, {now}, {now} \
             FROM {from} JOIN installations i ON i.id = f.crm_installation_id \
             AND i.tenant_id = f.tenant_id WHERE TRUE \
             ON CONFLICT (dedupe_key) DO NOTHING",
            kind = crate::jobs::KIND_CRM,
        ),
    ]
}

/// PostgreSQL: `$1` the batch as a JSON array, `$2` now, `$3` the jobs' max attempts.
fn finalize_batch_postgres_sql() -> &'static str {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        let [webhook, crm] = insert_jobs_sql("f", "$3", "$2");
        format!(
            "WITH v AS (SELECT * FROM json_to_recordset(CAST($1 AS json)) AS v(h text, \
             sid text, status text, started_at bigint, ended_at bigint, source text, \
             dur integer, rec text, legs text, raw text)), \
             f AS (UPDATE calls {set} FROM v {FINALIZE_WHERE} \
             RETURNING calls.id, calls.tenant_id, calls.crm_installation_id, calls.token_hash), \
             d AS (DELETE FROM call_reconcile r USING f WHERE r.call_id = f.id), \
             w AS ({webhook}), c AS ({crm}) \
             SELECT id, token_hash FROM f",
            set = finalize_set("$2"),
        )
    });
    &SQL
}

/// SQLite: `?1` the batch as a JSON array, `?2` now, `?3` the jobs' max attempts, `?4` the
/// batch's token hashes as a JSON array of strings (the follow-up statements read those
/// instead of taking every batch row apart again: 10-18 % less time per batch).
fn finalize_batch_sqlite_sql() -> &'static str {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        let field = |f: &str| format!("json_extract(value, '$.{f}') AS {f}");
        let fields = [
            "h",
            "sid",
            "status",
            "started_at",
            "ended_at",
            "source",
            "dur",
            "rec",
            "legs",
            "raw",
        ]
        .map(field)
        .join(", ");
        // The calls this batch finalised (see `finalize_batch`).
        let finalized = "SELECT id, tenant_id, crm_installation_id FROM calls \
            WHERE token_hash IN (SELECT value FROM json_each(?4)) AND finalized_at = ?2";
        let [webhook, crm] = insert_jobs_sql(&format!("({finalized}) AS f"), "?3", "?2");
        format!(
            "UPDATE calls {set} FROM (SELECT {fields} FROM json_each(?1)) AS v {FINALIZE_WHERE} \
             RETURNING calls.id, calls.token_hash; \
             DELETE FROM call_reconcile WHERE call_id IN (SELECT id FROM ({finalized})); \
             {webhook}; {crm}",
            set = finalize_set("?2"),
        )
    });
    &SQL
}

/// The largest JSON parameter of one batch statement. sqlx 0.9.0 leaves Nagle's algorithm on
/// for PostgreSQL's TCP sockets (launchbadge/sqlx#4335; fixed upstream by #4336, not released
/// yet), so a message just over one TCP segment — 64 KiB on loopback — waits up to 40 ms for
/// the server's delayed ACK. Keeping each statement's parameter under this keeps it in one
/// segment on loopback; a bigger batch takes one more statement per chunk.
const BULK_PARAM_MAX_BYTES: usize = 48 * 1024;

/// Serialise `rows` as JSON arrays of at most `max_bytes` each (a single larger row gets an
/// array of its own), preserving order.
fn json_array_chunks(
    rows: impl Iterator<Item = serde_json::Value>,
    max_bytes: usize,
) -> Vec<String> {
    let mut chunks = Vec::new();
    let mut current = String::from("[");
    for row in rows {
        let row = row.to_string();
        if current.len() > 1 && current.len() + 1 + row.len() + 1 > max_bytes {
            current.push(']');
            chunks.push(std::mem::replace(&mut current, String::from("[")));
        }
        if current.len() > 1 {
            current.push(',');
        }
        current.push_str(&row);
    }
    if current.len() > 1 {
        current.push(']');
        chunks.push(current);
    }
    chunks
}

/// What finalising calls implies, in the finalising transaction: take them off the reconciler's
/// schedule, and insert one delivery job per sink of each: the tenant webhook, and the CRM
/// installation the call is linked to (see `crate::crm::writeback`). Each is one statement
/// whatever the batch size; `dedupe_key` makes a second enqueue a no-op. Returns whether a job
/// was enqueued.
pub(crate) async fn after_finalize(
    txn: &DatabaseTransaction,
    backend: DbBackend,
    finished: &[String],
    now: i64,
    max_attempts: i32,
) -> Result<bool, DbErr> {
    if finished.is_empty() {
        return Ok(false);
    }
    let ids = serde_json::to_string(finished).unwrap_or_else(|_| "[]".into());
    let ids_in = db::json_ids_subquery(backend);
    txn.execute_raw(stmt(
        backend,
        &format!("DELETE FROM call_reconcile WHERE call_id IN ({ids_in})"),
        vec![ids.clone().into()],
    ))
    .await?;
    let finished_calls = format!(
        "(SELECT id, tenant_id, crm_installation_id FROM calls WHERE id IN ({ids_in})) AS f"
    );
    let mut enqueued = 0;
    for sql in insert_jobs_sql(&finished_calls, "?", "?") {
        enqueued += txn
            .execute_raw(stmt(
                backend,
                &sql,
                vec![
                    max_attempts.into(),
                    now.into(),
                    now.into(),
                    now.into(),
                    ids.clone().into(),
                ],
            ))
            .await?
            .rows_affected();
    }
    Ok(enqueued > 0)
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::json_array_chunks;

    #[test]
    fn json_chunks_stay_under_the_limit_and_keep_every_row_in_order() {
        let rows: Vec<Value> = (0..50)
            .map(|i| json!({"h": i, "pad": "x".repeat(90)}))
            .collect();
        let chunks = json_array_chunks(rows.clone().into_iter(), 1_000);
        assert!(chunks.len() > 1, "{} chunk(s)", chunks.len());
        assert!(chunks.iter().all(|c| c.len() <= 1_000), "{chunks:?}");
        let back: Vec<Value> = chunks
            .iter()
            .flat_map(|c| serde_json::from_str::<Vec<Value>>(c).unwrap())
            .collect();
        assert_eq!(back, rows);
        // Everything fits: one array.
        assert_eq!(
            json_array_chunks(rows.clone().into_iter(), 1 << 20).len(),
            1
        );
        // A row larger than the limit still goes out, alone.
        let big = vec![json!({"h": "x".repeat(50)}), json!({"h": 1})];
        let chunks = json_array_chunks(big.clone().into_iter(), 20);
        assert_eq!(chunks.len(), 2);
        assert_eq!(
            serde_json::from_str::<Vec<Value>>(&chunks[0]).unwrap(),
            vec![big[0].clone()]
        );
        assert!(json_array_chunks(std::iter::empty(), 10).is_empty());
    }
}
