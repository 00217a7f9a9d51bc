//! Calls: placing a masked click-to-call through Exotel, and reading calls back (the API view
//! and the [`CallRecord`] every sink receives).
//!
//! Placing a call: the call row and the debounce guard are written in one transaction before
//! Exotel is asked, so a callback can never arrive for a call we do not know, and a repeated
//! click for the same from/to inside `click_debounce_secs` returns the first call instead of
//! ringing anyone twice (the guard is a row with a primary key, so this holds across instances).

use callbridge_connector::{CallRecord, Direction, LegRecord, Outcome, Party};
use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect,
};
use serde::{Deserialize, Serialize};

use crate::{
    AppState, crypto,
    db::{self, stmt},
    entities::{call, job, tenant},
    error::ApiError,
    exotel::{ConnectParams, ExotelError, Leg},
    phone, tenants,
};

/// `POST /api/v1/calls` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlaceCall {
    /// The agent's phone (rung first).
    pub from: String,
    /// The customer's phone.
    pub to: String,
    /// The virtual number to show; the tenant default when absent.
    pub caller_id: Option<String>,
    /// Record the call; the tenant default when absent.
    pub record: Option<bool>,
    /// The caller's own correlation string (≤ 128 characters), echoed in deliveries.
    pub custom_field: Option<String>,
}

/// A call as the API shows it.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
pub struct CallView {
    /// Our id.
    pub id: String,
    /// `initiating`, Exotel's statuses, `failed` (refused) or `unknown` (connect timed out).
    pub status: String,
    /// `outbound` or `inbound`.
    pub direction: String,
    /// E.164.
    pub from: String,
    /// E.164.
    pub to: String,
    /// The virtual number.
    pub caller_id: Option<String>,
    /// Exotel's CallSid.
    pub exotel_call_sid: Option<String>,
    /// The caller's correlation string.
    pub custom_field: Option<String>,
    /// Whether the call was recorded.
    pub record: bool,
    /// RFC 3339 UTC.
    pub created_at: DateTime<Utc>,
    /// RFC 3339 UTC.
    pub started_at: Option<DateTime<Utc>>,
    /// RFC 3339 UTC.
    pub ended_at: Option<DateTime<Utc>>,
    /// Bridged seconds, once final.
    pub conversation_duration: Option<i32>,
    /// Exotel's recording URL, once final.
    pub recording_url: Option<String>,
    /// Per-leg status and duration.
    pub legs: Vec<LegView>,
    /// Why Exotel refused, for failed calls.
    pub error: Option<String>,
    /// Delivery of the finished call.
    pub writeback: Writeback,
}

/// One leg in the API view.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct LegView {
    /// `agent` or `customer`.
    pub party: Party,
    /// Leg status.
    pub status: Option<String>,
    /// Seconds on the call.
    pub on_call_duration: Option<i64>,
}

/// Delivery summary over every sink of the call.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq, Eq, Default)]
pub struct Writeback {
    /// `none` (nothing to deliver yet), `pending`, `done`, `dead`.
    pub state: String,
    /// Attempts over all sinks.
    pub attempts: i32,
    /// The latest error, if any.
    pub last_error: Option<String>,
    /// Per sink.
    pub targets: Vec<WritebackTarget>,
}

/// Delivery to one sink.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct WritebackTarget {
    /// `webhook`, later `crm:<installation>`.
    pub target: String,
    /// `queued`, `running`, `done`, `dead`.
    pub state: String,
    /// Attempts so far.
    pub attempts: i32,
    /// Latest error.
    pub last_error: Option<String>,
    /// Latest HTTP status from the receiver.
    pub last_status: Option<i32>,
}

fn ms_to_time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// The stored legs.
#[must_use]
pub fn legs_of(c: &call::Model) -> Vec<Leg> {
    c.legs
        .as_deref()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_default()
}

fn party_of(direction: &str, index: usize) -> Party {
    // Click-to-call rings the agent (From) first; inbound flows dial the agent second.
    match (direction, index) {
        ("inbound", 0) | ("outbound", 1) => Party::Customer,
        _ => Party::Agent,
    }
}

/// Build the API view.
#[must_use]
pub fn view(c: &call::Model, jobs: &[job::Model]) -> CallView {
    let legs = legs_of(c)
        .into_iter()
        .map(|l| LegView {
            party: party_of(&c.direction, l.index),
            status: l.status,
            on_call_duration: l.on_call_duration,
        })
        .collect();
    CallView {
        id: c.id.clone(),
        status: c.status.clone(),
        direction: c.direction.clone(),
        from: c.from_number.clone(),
        to: c.to_number.clone(),
        caller_id: c.caller_id.clone(),
        exotel_call_sid: c.exotel_call_sid.clone(),
        custom_field: c.custom_field.clone(),
        record: c.record,
        created_at: ms_to_time(c.created_at),
        started_at: c.started_at.map(ms_to_time),
        ended_at: c.ended_at.map(ms_to_time),
        conversation_duration: c.conversation_duration,
        recording_url: c.recording_url.clone(),
        legs,
        error: c.error.clone(),
        writeback: writeback(jobs),
    }
}

fn writeback(jobs: &[job::Model]) -> Writeback {
    if jobs.is_empty() {
        return Writeback {
            state: "none".into(),
            ..Writeback::default()
        };
    }
    let state = if jobs.iter().any(|j| j.state == "dead") {
        "dead"
    } else if jobs.iter().all(|j| j.state == "done") {
        "done"
    } else {
        "pending"
    };
    let latest_error = jobs
        .iter()
        .filter(|j| j.last_error.is_some())
        .max_by_key(|j| j.updated_at)
        .and_then(|j| j.last_error.clone());
    Writeback {
        state: state.into(),
        attempts: jobs.iter().map(|j| j.attempts).sum(),
        last_error: latest_error,
        targets: jobs
            .iter()
            .map(|j| WritebackTarget {
                target: j.target.clone(),
                state: j.state.clone(),
                attempts: j.attempts,
                last_error: j.last_error.clone(),
                last_status: j.last_status,
            })
            .collect(),
    }
}

/// The call every sink receives.
#[must_use]
pub fn record(c: &call::Model) -> CallRecord {
    let legs: Vec<LegRecord> = legs_of(c)
        .into_iter()
        .map(|l| {
            let party = party_of(&c.direction, l.index);
            let number = match (party, c.direction.as_str()) {
                (Party::Agent, "outbound") => Some(c.from_number.clone()),
                (Party::Customer, "outbound") => Some(c.to_number.clone()),
                _ => l.number.clone(),
            };
            LegRecord {
                party,
                number,
                status: l.status,
                on_call_duration: l.on_call_duration,
                cause: l.cause,
            }
        })
        .collect();
    let conversation = i64::from(c.conversation_duration.unwrap_or(0));
    let (agent, customer) = if c.direction == "inbound" {
        (c.to_number.clone(), c.from_number.clone())
    } else {
        (c.from_number.clone(), c.to_number.clone())
    };
    CallRecord {
        call_id: c.id.clone(),
        exotel_call_sid: c.exotel_call_sid.clone(),
        direction: if c.direction == "inbound" {
            Direction::Inbound
        } else {
            Direction::Outbound
        },
        outcome: Outcome::derive(&c.status, &legs, conversation),
        status: c.status.clone(),
        agent_number: agent,
        customer_number: customer,
        virtual_number: c.caller_id.clone(),
        started_at: c.started_at.map(ms_to_time),
        ended_at: c.ended_at.map(ms_to_time),
        conversation_duration: conversation,
        legs,
        recording_url: c.recording_url.clone(),
        crm_record: c
            .crm_record
            .as_deref()
            .and_then(|r| serde_json::from_str(r).ok()),
        related_records: c
            .crm_related
            .as_deref()
            .and_then(|r| serde_json::from_str(r).ok())
            .unwrap_or_default(),
        crm_user_id: c.crm_user_id.clone(),
        custom_field: c.custom_field.clone(),
    }
}

/// One call of a tenant, with its delivery jobs.
///
/// # Errors
/// Database failure.
pub async fn find(
    db: &DatabaseConnection,
    tenant_id: &str,
    call_id: &str,
) -> Result<Option<(call::Model, Vec<job::Model>)>, sea_orm::DbErr> {
    let Some(c) = call::Entity::find_by_id(call_id.to_owned())
        .filter(call::Column::TenantId.eq(tenant_id))
        .one(db)
        .await?
    else {
        return Ok(None);
    };
    let jobs = job::Entity::find()
        .filter(job::Column::CallId.eq(call_id))
        .filter(job::Column::TenantId.eq(tenant_id))
        .all(db)
        .await?;
    Ok(Some((c, jobs)))
}

/// A page of a tenant's calls, newest first, starting after `before` (a call id).
///
/// # Errors
/// Database failure.
pub async fn list(
    db: &DatabaseConnection,
    tenant_id: &str,
    before: Option<&str>,
    limit: u64,
) -> Result<Vec<CallView>, sea_orm::DbErr> {
    let mut q = call::Entity::find().filter(call::Column::TenantId.eq(tenant_id));
    if let Some(b) = before {
        q = q.filter(call::Column::Id.lt(b));
    }
    let calls = q
        .order_by_desc(call::Column::Id)
        .limit(limit)
        .all(db)
        .await?;
    let ids: Vec<String> = calls.iter().map(|c| c.id.clone()).collect();
    let jobs = if ids.is_empty() {
        Vec::new()
    } else {
        job::Entity::find()
            .filter(job::Column::TenantId.eq(tenant_id))
            .filter(job::Column::CallId.is_in(ids))
            .all(db)
            .await?
    };
    Ok(calls
        .iter()
        .map(|c| {
            let mine: Vec<job::Model> = jobs
                .iter()
                .filter(|j| j.call_id.as_deref() == Some(c.id.as_str()))
                .cloned()
                .collect();
            view(c, &mine)
        })
        .collect())
}

/// The result of placing a call.
#[derive(Debug)]
pub enum Placed {
    /// A new call went to Exotel.
    New(CallView),
    /// A repeated click inside the debounce window: the earlier call.
    Debounced(CallView),
}

/// Validate, store and connect a call.
///
/// # Errors
/// 422 for bad input, 502 when Exotel refuses (the call is stored as failed), 504 when Exotel
/// does not answer (the call may have been placed; its callback will still be accepted).
pub async fn place(
    state: &AppState,
    t: &tenant::Model,
    req: PlaceCall,
) -> Result<Placed, ApiError> {
    place_with(state, t, req, None).await
}

/// The CRM a call is placed from (a verified click): where its write-back goes.
#[derive(Debug, Clone)]
pub struct CrmLink {
    /// The installation the click came through.
    pub installation_id: String,
    /// The record the agent clicked on.
    pub record: Option<callbridge_connector::CrmRecordRef>,
    /// Other records of the click (the deal's person …).
    pub related: Vec<callbridge_connector::CrmRecordRef>,
    /// The clicking agent's CRM user id.
    pub crm_user_id: String,
}

/// [`place`], with the CRM the click came from. Without one, a call whose agent (`from`) is
/// mapped to a user of an installed CRM is written back there.
///
/// # Errors
/// As [`place`].
pub async fn place_with(
    state: &AppState,
    t: &tenant::Model,
    req: PlaceCall,
    crm: Option<CrmLink>,
) -> Result<Placed, ApiError> {
    let region = t.default_region.as_str();
    let from = phone::to_e164(&req.from, region)
        .map_err(|e| ApiError::validation("from", format!("from {e}")))?;
    let to = phone::to_e164(&req.to, region)
        .map_err(|e| ApiError::validation("to", format!("to {e}")))?;
    if from == to {
        return Err(ApiError::validation(
            "to",
            "from and to are the same number",
        ));
    }
    let caller_id = match req.caller_id.as_deref().or(t.caller_id.as_deref()) {
        Some(n) => phone::to_e164(n, region)
            .map_err(|e| ApiError::validation("caller_id", format!("caller_id {e}")))?,
        None => {
            return Err(ApiError::validation(
                "caller_id",
                "caller_id is required (the tenant has no default virtual number)",
            ));
        }
    };
    if let Some(cf) = &req.custom_field
        && (cf.chars().count() > 128 || cf.chars().any(char::is_control))
    {
        return Err(ApiError::validation(
            "custom_field",
            "custom_field must be at most 128 printable characters",
        ));
    }
    let record = req.record.unwrap_or(t.record);
    let account = tenants::exotel_account(&state.sealer, t).map_err(ApiError::Internal)?;

    let call_id = format!("call_{}", uuid::Uuid::now_v7().simple());
    let token = crypto::random_token("", 24);
    let now = db::now_ms();
    let window_ms = i64::try_from(state.config.click_debounce_secs * 1000).unwrap_or(5000);
    let reconcile_at = now + i64::try_from(state.config.reconcile_after_secs * 1000).unwrap_or(0);

    let db = &state.db;
    let backend = db.get_database_backend();
    // The debounce guard, the call (linked to its CRM: the click's, or else the agent's) and its
    // place on the reconciler's schedule (asked about through the call-details API if no final
    // state has arrived by then), written in one transaction that costs one hop to SQLite's
    // worker thread or one round trip to PostgreSQL before Exotel is asked to ring anyone.
    // The guard comes first: a live one (a repeated click) means no call is inserted.
    // Parameters: $1 call id, $2 tenant, $3 token hash, $4 from, $5 to, $6 caller id,
    // $7 custom field, $8 record, $9 now, $10 reconcile at, $11 guard expiry, then the CRM's.
    let mut values: Vec<sea_orm::Value> = vec![
        call_id.clone().into(),
        t.id.clone().into(),
        crypto::token_hash(&token).into(),
        from.clone().into(),
        to.clone().into(),
        caller_id.clone().into(),
        req.custom_field.clone().into(),
        record.into(),
        now.into(),
        reconcile_at.into(),
        (now + window_ms).into(),
    ];
    let crm_values = match &crm {
        Some(link) => {
            values.extend([
                link.installation_id.clone().into(),
                link.record
                    .as_ref()
                    .and_then(|r| serde_json::to_string(r).ok())
                    .into(),
                (!link.related.is_empty())
                    .then(|| serde_json::to_string(&link.related).ok())
                    .flatten()
                    .into(),
                link.crm_user_id.clone().into(),
            ]);
            "$12, $13, $14, $15".to_owned()
        }
        None => {
            let m = crate::crm::agent_crm_match("$2", "$4");
            format!("(SELECT i.id {m}), NULL, NULL, (SELECT m.crm_user_id {m})")
        }
    };
    let guard = "INSERT INTO call_debounce (tenant_id, from_number, to_number, call_id, \
         expires_at) VALUES ($2, $4, $5, $1, $11) \
         ON CONFLICT (tenant_id, from_number, to_number) DO UPDATE \
         SET call_id = excluded.call_id, expires_at = excluded.expires_at \
         WHERE call_debounce.expires_at < $9";
    let insert_call = format!(
        "INSERT INTO calls (id, tenant_id, token_hash, direction, from_number, to_number, \
         caller_id, custom_field, record, status, created_at, updated_at, crm_installation_id, \
         crm_record, crm_related, crm_user_id) \
         SELECT $1, $2, $3, 'outbound', $4, $5, $6, $7, $8, 'initiating', $9, $9, {crm_values}"
    );
    let placed = if backend == sea_orm::DbBackend::Postgres {
        // One statement, committed on its own: the guard's RETURNING row (none when a live
        // guard holds another call) feeds the call, whose row feeds the schedule.
        let sql = format!(
            "WITH g AS ({guard} RETURNING call_id), c AS ({insert_call} FROM g RETURNING id), \
             r AS (INSERT INTO call_reconcile (call_id, due_at, attempts) \
             SELECT id, $10, 0 FROM c) SELECT call_id FROM g"
        );
        let rows = db
            .query_all_raw(sea_orm::Statement::from_sql_and_values(
                backend, sql, values,
            ))
            .await?;
        !rows.is_empty()
    } else {
        // SQLite has no INSERT in a CTE: the statements run in order in one query, the call
        // only where the guard now holds this call's id.
        let sql = format!(
            "{guard}; {insert_call} FROM call_debounce WHERE tenant_id = $2 \
             AND from_number = $4 AND to_number = $5 AND call_id = $1; \
             INSERT INTO call_reconcile (call_id, due_at, attempts) \
             SELECT id, $10, 0 FROM calls WHERE id = $1; \
             SELECT count(*) AS n FROM calls WHERE id = $1"
        );
        let rows = db::sqlite_write_script(db, &sql, values).await?;
        let n: i64 = match rows.first() {
            Some(r) => r.try_get("", "n")?,
            None => 0,
        };
        n == 1
    };
    if !placed {
        let existing = db
            .query_one_raw(stmt(
                backend,
                "SELECT call_id FROM call_debounce WHERE tenant_id = ? AND from_number = ? \
                 AND to_number = ?",
                vec![t.id.clone().into(), from.clone().into(), to.clone().into()],
            ))
            .await?;
        if let Some(row) = existing {
            let id: String = row.try_get("", "call_id")?;
            if let Some((c, jobs)) = find(db, &t.id, &id).await? {
                state.metrics.calls.with_label_values(&["debounced"]).inc();
                return Ok(Placed::Debounced(view(&c, &jobs)));
            }
        }
        return Err(ApiError::Conflict(
            "a call between these numbers was just placed; try again in a few seconds".into(),
        ));
    }

    let params = ConnectParams {
        from,
        to,
        caller_id,
        record,
        custom_field: call_id.clone(),
        status_callback: format!("{}/hooks/exotel/status/{token}", state.public_base),
        time_limit: t.time_limit,
        time_out: t.time_out,
        wait_url: t.wait_url.clone(),
    };
    let result = state.exotel.connect(&account, &params).await;
    let now = db::now_ms();
    let outcome = match &result {
        Ok(c) => {
            state.metrics.calls.with_label_values(&["placed"]).inc();
            db::execute_write(db, stmt(
                backend,
                "UPDATE calls SET exotel_call_sid = ?, status = CASE WHEN status = 'initiating' \
                 THEN ? ELSE status END, updated_at = ? WHERE id = ?",
                vec![
                    c.sid.clone().into(),
                    c.status.clone().into(),
                    now.into(),
                    call_id.clone().into(),
                ],
            ))
            .await
        }
        Err(e) => {
            let (status, label) = match e {
                ExotelError::Timeout(_) => ("unknown", "timeout"),
                ExotelError::Refused { .. } => ("failed", "refused"),
                _ => ("failed", "error"),
            };
            state.metrics.calls.with_label_values(&[label]).inc();
            tracing::warn!(call = %call_id, error = %e, "Exotel connect failed");
            // Not reconciled: without a CallSid there is nothing to ask Exotel about.
            let r = mark_connect_failed(db, &call_id, status, &e.to_string(), now).await;
            if status == "failed" {
                // Nothing rang: let the user click again right away.
                let _ = db::execute_write(
                    db,
                    stmt(
                        backend,
                        "DELETE FROM call_debounce WHERE call_id = ?",
                        vec![call_id.clone().into()],
                    ),
                )
                .await;
            }
            r
        }
    };
    outcome?;
    match result {
        Ok(_) => {
            let (c, jobs) = find(db, &t.id, &call_id)
                .await?
                .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("call vanished")))?;
            Ok(Placed::New(view(&c, &jobs)))
        }
        Err(ExotelError::Refused { status, message }) => Err(ApiError::Exotel {
            call_id,
            status: Some(status),
            message,
        }),
        Err(ExotelError::Timeout(_)) => Err(ApiError::ExotelTimeout { call_id }),
        Err(e) => Err(ApiError::Exotel {
            call_id,
            status: None,
            message: e.to_string(),
        }),
    }
}

/// Exotel did not take the call: store why, and take it off the reconciler's schedule (without
/// a CallSid there is nothing to ask the call-details API), in one transaction.
async fn mark_connect_failed(
    db: &DatabaseConnection,
    call_id: &str,
    status: &str,
    error: &str,
    now: i64,
) -> Result<sea_orm::ExecResult, sea_orm::DbErr> {
    let backend = db.get_database_backend();
    let txn = db::begin_write(db).await?;
    let updated = txn
        .execute_raw(stmt(
            backend,
            "UPDATE calls SET status = ?, error = ?, updated_at = ? \
             WHERE id = ? AND finalized_at IS NULL",
            vec![status.into(), error.into(), now.into(), call_id.into()],
        ))
        .await?;
    txn.execute_raw(stmt(
        backend,
        "DELETE FROM call_reconcile WHERE call_id = ?",
        vec![call_id.into()],
    ))
    .await?;
    txn.commit().await?;
    Ok(updated)
}
