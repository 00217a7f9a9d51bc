//! The reconciler: Exotel's callbacks can be lost, so calls still open `reconcile_after_secs`
//! after they were placed are looked up through the call-details API and finalised through the
//! same writer as a callback (same idempotency, same delivery jobs).
//!
//! Open calls wait in `call_reconcile` (deleted when the final state is stored). They are
//! claimed with a lease (`due_at` pushed forward in the claiming statement; `SKIP LOCKED` on
//! PostgreSQL) so instances never ask twice, and each Exotel account
//! gets at most `reconcile_per_minute` lookups, well under Exotel's 200/min per account.

use std::{collections::HashMap, time::Duration};

use sea_orm::{ConnectionTrait, DbBackend, EntityTrait};
use tokio_util::sync::CancellationToken;

use crate::{
    AppState,
    db::{self, stmt},
    entities::tenant,
    exotel::is_terminal,
    ingest::{CallKey, Source, Update},
    tenants,
};

/// Run passes until shutdown.
pub async fn run(state: AppState, shutdown: CancellationToken) {
    let every = Duration::from_secs(state.config.reconcile_interval_secs.max(1));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        match pass(&state).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(calls = n, "reconciled"),
            Err(e) => tracing::error!(error = %e, "reconcile pass failed"),
        }
    }
}

/// One pass: claim due calls, ask Exotel, finalise the ones that ended. Returns how many were
/// finalised.
///
/// # Errors
/// Database failure.
pub async fn pass(state: &AppState) -> anyhow::Result<usize> {
    let db = &state.db;
    let backend = db.get_database_backend();
    let now = db::now_ms();
    let cfg = &state.config;
    let per_pass = u64::from(cfg.reconcile_per_minute)
        .saturating_mul(cfg.reconcile_interval_secs.max(1))
        .div_ceil(60)
        .max(1);
    let lock = if backend == DbBackend::Postgres {
        " FOR UPDATE OF r SKIP LOCKED"
    } else {
        ""
    };
    // Lease: five minutes, so a crashed instance's claims come back.
    let sql = format!(
        "UPDATE call_reconcile SET due_at = ?, attempts = attempts + 1 \
         WHERE call_id IN (SELECT r.call_id FROM call_reconcile r JOIN calls c ON c.id = r.call_id \
         WHERE r.due_at <= ? AND c.finalized_at IS NULL AND c.exotel_call_sid IS NOT NULL \
         ORDER BY r.due_at LIMIT ?{lock}) \
         RETURNING call_id, attempts"
    );
    let claimed = db
        .query_all_raw(stmt(
            backend,
            &sql,
            vec![
                (now + 300_000).into(),
                now.into(),
                i64::try_from(per_pass * 4).unwrap_or(100).into(),
            ],
        ))
        .await?;
    let mut attempts_of: HashMap<String, i32> = HashMap::with_capacity(claimed.len());
    for row in &claimed {
        attempts_of.insert(row.try_get("", "call_id")?, row.try_get("", "attempts")?);
    }
    if attempts_of.is_empty() {
        return Ok(0);
    }
    let ids = serde_json::to_string(&attempts_of.keys().collect::<Vec<_>>())?;
    let rows = db
        .query_all_raw(stmt(
            backend,
            &format!(
                "SELECT id, tenant_id, exotel_call_sid FROM calls WHERE id IN ({}) ORDER BY id",
                db::json_ids_subquery(backend)
            ),
            vec![ids.into()],
        ))
        .await?;
    let mut budget: HashMap<String, u64> = HashMap::new();
    let mut tenants_cache: HashMap<String, Option<tenant::Model>> = HashMap::new();
    let mut done = 0;
    for row in rows {
        let id: String = row.try_get("", "id")?;
        let tenant_id: String = row.try_get("", "tenant_id")?;
        let sid: String = row.try_get("", "exotel_call_sid")?;
        let attempts = attempts_of.get(&id).copied().unwrap_or(1);
        if !tenants_cache.contains_key(&tenant_id) {
            let t = tenant::Entity::find_by_id(tenant_id.clone())
                .one(db)
                .await?;
            tenants_cache.insert(tenant_id.clone(), t);
        }
        let Some(Some(t)) = tenants_cache.get(&tenant_id) else {
            continue;
        };
        let used = budget.entry(t.exotel_sid.clone()).or_default();
        if *used >= per_pass {
            // Over this account's budget: release the claim for the next pass.
            reschedule(state, &id, now, attempts - 1, Duration::ZERO).await?;
            continue;
        }
        *used += 1;
        let account = tenants::exotel_account(&state.sealer, t)?;
        match state.exotel.call_details(&account, &sid).await {
            Ok(details) if is_terminal(&details.status) => {
                let update = Update::from_callback(
                    CallKey::CallId(id.clone()),
                    &details,
                    state.exotel_offset,
                    None,
                    Source::Reconcile,
                );
                state.ingest.submit(update).await?;
                done += 1;
            }
            Ok(_) | Err(_) if attempts >= cfg.reconcile_max_attempts => {
                tracing::warn!(call = %id, "giving up reconciling after {attempts} attempts");
                db::execute_write(
                    db,
                    stmt(
                        backend,
                        "DELETE FROM call_reconcile WHERE call_id = ?",
                        vec![id.into()],
                    ),
                )
                .await?;
            }
            Ok(_) => {
                let wait = Duration::from_secs(cfg.reconcile_after_secs.max(60))
                    .saturating_mul(1 << attempts.clamp(0, 5));
                reschedule(
                    state,
                    &id,
                    now,
                    attempts,
                    wait.min(Duration::from_secs(3600)),
                )
                .await?;
            }
            Err(e) => {
                tracing::warn!(call = %id, error = %e, "call details lookup failed");
                reschedule(state, &id, now, attempts, Duration::from_secs(120)).await?;
            }
        }
    }
    Ok(done)
}

async fn reschedule(
    state: &AppState,
    id: &str,
    now: i64,
    attempts: i32,
    wait: Duration,
) -> anyhow::Result<()> {
    let backend = state.db.get_database_backend();
    db::execute_write(
        &state.db,
        stmt(
            backend,
            "UPDATE call_reconcile SET due_at = ?, attempts = ? WHERE call_id = ?",
            vec![
                (now + i64::try_from(wait.as_millis()).unwrap_or(0)).into(),
                attempts.max(0).into(),
                id.to_owned().into(),
            ],
        ),
    )
    .await?;
    Ok(())
}
