//! The durable delivery queue: jobs live in the `jobs` table, inserted in the same transaction
//! as the state they deliver (outbox). Workers claim due jobs with a lease (PostgreSQL:
//! `FOR UPDATE SKIP LOCKED`, so instances share the queue; SQLite: one atomic
//! `UPDATE … RETURNING`), run them with no transaction open, then record the attempt and either
//! finish, reschedule (exponential backoff with ±20 % jitter, or the receiver's `Retry-After`)
//! or dead-letter them. A lease that expires (crashed worker) makes the job claimable again, so
//! nothing is lost on restart; completion is fenced on the attempt number so a worker that lost
//! its lease cannot overwrite the new owner's result.

pub mod webhook;

use std::time::{Duration, Instant};

use rand::Rng;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, DbErr, EntityTrait};
use tokio_util::sync::CancellationToken;

use crate::{
    AppState,
    db::{self, stmt},
    entities::{call, tenant},
};

/// Job kind: POST the finished call to the tenant's webhook.
pub const KIND_WEBHOOK: &str = "webhook";
/// Job kind: write the finished call onto the CRM record (`crate::crm::writeback`).
pub const KIND_CRM: &str = "crm";

/// A claimed job.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// Job id.
    pub id: i64,
    /// Tenant.
    pub tenant_id: String,
    /// Kind.
    pub kind: String,
    /// The call it delivers.
    pub call_id: Option<String>,
    /// Stable message id (`webhook-id`).
    pub message_id: String,
    /// This attempt's number (1-based).
    pub attempt: i32,
    /// Attempts allowed.
    pub max_attempts: i32,
}

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Delivered.
    Done {
        /// Receiver's status.
        status: Option<u16>,
    },
    /// Try again later.
    Retry {
        /// Receiver's status, if it answered.
        status: Option<u16>,
        /// What went wrong.
        error: String,
        /// The receiver's `Retry-After`, if any.
        retry_after: Option<Duration>,
    },
    /// Retrying cannot help.
    Permanent {
        /// Receiver's status, if it answered.
        status: Option<u16>,
        /// What went wrong.
        error: String,
    },
}

/// Claim up to `n` due jobs.
///
/// # Errors
/// Database failure.
pub async fn claim(
    db: &DatabaseConnection,
    n: usize,
    lease: Duration,
) -> Result<Vec<Claimed>, DbErr> {
    let backend = db.get_database_backend();
    let now = db::now_ms();
    let lock = if backend == DbBackend::Postgres {
        " FOR UPDATE SKIP LOCKED"
    } else {
        ""
    };
    let sql = format!(
        "UPDATE jobs SET state = 'running', attempts = attempts + 1, locked_until = ?, \
         updated_at = ? WHERE id IN (SELECT id FROM jobs WHERE \
         (state = 'queued' AND run_at <= ?) OR (state = 'running' AND locked_until < ?) \
         ORDER BY run_at LIMIT ?{lock}) \
         RETURNING id, tenant_id, kind, call_id, message_id, attempts, max_attempts"
    );
    let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX / 4);
    let rows = db::query_write(
        db,
        stmt(
            backend,
            &sql,
            vec![
                (now + lease_ms).into(),
                now.into(),
                now.into(),
                now.into(),
                i64::try_from(n).unwrap_or(1).into(),
            ],
        ),
    )
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(Claimed {
                id: r.try_get("", "id")?,
                tenant_id: r.try_get("", "tenant_id")?,
                kind: r.try_get("", "kind")?,
                call_id: r.try_get("", "call_id")?,
                message_id: r.try_get("", "message_id")?,
                attempt: r.try_get("", "attempts")?,
                max_attempts: r.try_get("", "max_attempts")?,
            })
        })
        .collect()
}

/// The delay before attempt `attempt + 1`.
#[must_use]
pub fn backoff(
    attempt: i32,
    base: Duration,
    max: Duration,
    retry_after: Option<Duration>,
) -> Duration {
    if let Some(ra) = retry_after {
        // Honour the receiver, within sane bounds.
        return ra.clamp(Duration::from_secs(1), Duration::from_secs(24 * 3600));
    }
    let exp = u32::try_from(attempt.saturating_sub(1).clamp(0, 30)).unwrap_or(30);
    let raw = base.saturating_mul(2u32.saturating_pow(exp)).min(max);
    let jitter = rand::rng().random_range(0.8..1.2);
    raw.mul_f64(jitter)
}

/// Record how an attempt ended. Fenced on the attempt number.
///
/// # Errors
/// Database failure.
pub async fn finish(
    state: &AppState,
    job: &Claimed,
    result: &Delivery,
    started_at: i64,
    took: Duration,
) -> Result<(), DbErr> {
    let db = &state.db;
    let backend = db.get_database_backend();
    let now = db::now_ms();
    let cfg = &state.config;
    let (job_state, run_at, error, status, outcome) = match result {
        Delivery::Done { status } => ("done", now, None, *status, "ok"),
        Delivery::Retry {
            status,
            error,
            retry_after,
        } if job.attempt < job.max_attempts => {
            let delay = backoff(
                job.attempt,
                Duration::from_secs(cfg.job_backoff_base_secs),
                Duration::from_secs(cfg.job_backoff_max_secs),
                *retry_after,
            );
            let at = now + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX / 4);
            ("queued", at, Some(error.clone()), *status, "retry")
        }
        Delivery::Retry { status, error, .. } => (
            "dead",
            now,
            Some(format!("gave up after {} attempts: {error}", job.attempt)),
            *status,
            "dead",
        ),
        Delivery::Permanent { status, error } => {
            ("dead", now, Some(error.clone()), *status, "dead")
        }
    };
    let status_i32 = status.map(i32::from);
    let txn = db::begin_write(db).await?;
    let updated = txn
        .execute_raw(stmt(
            backend,
            "UPDATE jobs SET state = ?, run_at = ?, locked_until = NULL, last_error = ?, \
             last_status = ?, updated_at = ? WHERE id = ? AND attempts = ? AND state = 'running'",
            vec![
                job_state.into(),
                run_at.into(),
                error.clone().into(),
                status_i32.into(),
                now.into(),
                job.id.into(),
                job.attempt.into(),
            ],
        ))
        .await?;
    if updated.rows_affected() == 1 {
        txn.execute_raw(stmt(
            backend,
            "INSERT INTO job_attempts (job_id, attempt, started_at, duration_ms, http_status, \
             outcome, error) VALUES (?, ?, ?, ?, ?, ?, ?)",
            vec![
                job.id.into(),
                job.attempt.into(),
                started_at.into(),
                i32::try_from(took.as_millis()).unwrap_or(i32::MAX).into(),
                status_i32.into(),
                outcome.into(),
                error.into(),
            ],
        ))
        .await?;
    } else {
        tracing::warn!(
            job = job.id,
            "lost the lease before finishing; result discarded"
        );
    }
    txn.commit().await
}

/// The tenant, call and the [`callbridge_connector::CallRecord`] every sink receives for a
/// delivery job. Exotel's own `RecordingUrl` does not play without the tenant's API
/// credentials (private since October 2024), so the record carries callbridge's playable
/// link instead, never the raw URL.
///
/// # Errors
/// The [`Delivery`] to record: permanent when the call or tenant is gone, retry on database
/// trouble.
pub(crate) async fn finished_call(
    state: &AppState,
    job: &Claimed,
) -> Result<(tenant::Model, call::Model, callbridge_connector::CallRecord), Delivery> {
    let retry = |error: String| Delivery::Retry {
        status: None,
        error,
        retry_after: None,
    };
    let Some(call_id) = &job.call_id else {
        return Err(Delivery::Permanent {
            status: None,
            error: "job has no call".into(),
        });
    };
    let (t, c) = match tokio::try_join!(
        tenant::Entity::find_by_id(job.tenant_id.clone()).one(&state.db),
        call::Entity::find_by_id(call_id.clone()).one(&state.db),
    ) {
        Ok((Some(t), Some(c))) if c.tenant_id == t.id => (t, c),
        Ok(_) => {
            return Err(Delivery::Permanent {
                status: None,
                error: "the call or tenant no longer exists".into(),
            });
        }
        Err(e) => return Err(retry(format!("database: {e}"))),
    };
    let mut record = crate::calls::record(&c);
    record.recording_url = crate::recordings::link_for_call(state, &c)
        .await
        .map_err(|e| retry(format!("could not make the recording link: {e:#}")))?;
    Ok((t, c, record))
}

/// Run one claimed job to completion and record the result.
pub async fn execute(state: &AppState, job: Claimed) {
    let started_at = db::now_ms();
    let t = Instant::now();
    let result = match job.kind.as_str() {
        KIND_WEBHOOK => webhook::deliver(state, &job).await,
        KIND_CRM => crate::crm::writeback::deliver(state, &job).await,
        other => Delivery::Permanent {
            status: None,
            error: format!("no handler for job kind {other:?}"),
        },
    };
    let took = t.elapsed();
    let outcome = match &result {
        Delivery::Done { .. } => "done",
        Delivery::Retry { .. } => "retry",
        Delivery::Permanent { .. } => "dead",
    };
    state
        .metrics
        .delivery_latency
        .with_label_values(&[job.kind.as_str(), outcome])
        .observe(took.as_secs_f64());
    if let Err(e) = finish(state, &job, &result, started_at, took).await {
        // The lease will expire and the job will be retried: at-least-once.
        tracing::error!(job = job.id, error = %e, "could not record a job result");
    }
}

/// Claim and run every job that is due now, one batch after another, until none is left.
/// Returns how many ran. Tests and tools use this to drain the queue deterministically.
///
/// # Errors
/// Database failure.
pub async fn run_due(state: &AppState) -> Result<usize, DbErr> {
    let mut total = 0;
    loop {
        let batch = claim(
            &state.db,
            state.config.worker_concurrency,
            Duration::from_secs(state.config.job_lease_secs),
        )
        .await?;
        if batch.is_empty() {
            return Ok(total);
        }
        total += batch.len();
        let mut set = tokio::task::JoinSet::new();
        for job in batch {
            let s = state.clone();
            set.spawn(async move { execute(&s, job).await });
        }
        while set.join_next().await.is_some() {}
    }
}

/// The worker loop: claim what fits in the concurrency budget, run it, sleep until woken by a
/// new job or the poll interval.
pub async fn run_worker(state: AppState, shutdown: CancellationToken) {
    let limit = state.config.worker_concurrency;
    let lease = Duration::from_secs(state.config.job_lease_secs);
    let poll = Duration::from_millis(state.config.worker_poll_ms);
    let mut running = tokio::task::JoinSet::new();
    loop {
        while running.try_join_next().is_some() {}
        let free = limit.saturating_sub(running.len());
        if free > 0 {
            match claim(&state.db, free, lease).await {
                Ok(batch) => {
                    let got = batch.len();
                    for job in batch {
                        let s = state.clone();
                        running.spawn(async move { execute(&s, job).await });
                    }
                    if got == free {
                        // There may be more; go round again without sleeping.
                        tokio::task::yield_now().await;
                        continue;
                    }
                }
                Err(e) => tracing::error!(error = %e, "claiming jobs failed"),
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = state.jobs_ready.notified() => {}
            () = tokio::time::sleep(poll) => {}
            Some(_) = running.join_next(), if !running.is_empty() => {}
        }
    }
    // Let in-flight deliveries finish (bounded by the webhook timeout); unfinished leases
    // expire and the jobs are retried by the next process.
    let grace = Duration::from_secs(state.config.webhook_timeout_secs + 1);
    let _ = tokio::time::timeout(grace, async {
        while running.join_next().await.is_some() {}
    })
    .await;
}

/// Jobs by state, for `/metrics` and the API.
///
/// # Errors
/// Database failure.
pub async fn counts(db: &DatabaseConnection) -> Result<Vec<(String, i64)>, DbErr> {
    let backend = db.get_database_backend();
    let rows = db
        .query_all_raw(stmt(
            backend,
            "SELECT state, COUNT(*) AS n FROM jobs GROUP BY state",
            vec![],
        ))
        .await?;
    rows.into_iter()
        .map(|r| Ok((r.try_get("", "state")?, r.try_get("", "n")?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_honours_retry_after() {
        let base = Duration::from_secs(10);
        let max = Duration::from_secs(3600);
        let d1 = backoff(1, base, max, None);
        assert!(d1 >= Duration::from_secs(8) && d1 <= Duration::from_secs(12));
        let d3 = backoff(3, base, max, None);
        assert!(d3 >= Duration::from_secs(32) && d3 <= Duration::from_secs(48));
        let d20 = backoff(20, base, max, None);
        assert!(d20 <= Duration::from_secs(4320));
        assert_eq!(
            backoff(1, base, max, Some(Duration::from_secs(120))),
            Duration::from_secs(120)
        );
    }
}
