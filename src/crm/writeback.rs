//! The CRM sink of the delivery queue (job kind `crm`): write a finished call onto the CRM
//! record it belongs to, exactly once.
//!
//! One job per (call, installation), enqueued in the transaction that finalised the call. A run:
//! 1. composes the [`CallRecord`] (legs, outcome, durations, UTC times, callbridge's playable
//!    recording link) and fills in the agent's CRM user and the CRM record;
//! 2. when the call has no record, looks the customer's number up (never creating anything)
//!    and otherwise applies the installation's unknown-number rule;
//! 3. writes the log — or, if `crm_logs` already holds one for this call, updates it when the
//!    CRM allows it and what we would write has changed; never a second log;
//! 4. uploads the recording file for CRMs that take files, once (`recording_uploaded`).
//!
//! The log id is stored right after the CRM answers. The only window for a duplicate is a
//! crash between the CRM's answer and that commit; CRMs without idempotency keys cannot close it.

use callbridge_connector::{
    CallRecord, Connector, ConnectorError, CrmLogRef, CrmRecordRef, RecordingFile, RecordingMode,
};
use sea_orm::{ConnectionTrait, DbErr};
use sha2::{Digest, Sha256};

use super::{
    installations::{self, Installation, UnknownNumberRule},
    tokens::{CallError, TokenError},
};
use crate::{
    AppState,
    db::{self, stmt},
    entities::{call, tenant},
    jobs::{Claimed, Delivery},
    recordings::proxy,
};

/// Largest recording file uploaded to a CRM.
pub const MAX_UPLOAD_BYTES: usize = 100 * 1024 * 1024;

/// The stored log of a call at an installation.
#[derive(Debug, Clone)]
struct StoredLog {
    log: CrmLogRef,
    written_hash: String,
    recording_uploaded: bool,
}

fn retry(error: String) -> Delivery {
    Delivery::Retry {
        status: None,
        error,
        retry_after: None,
    }
}

fn permanent(error: String) -> Delivery {
    Delivery::Permanent {
        status: None,
        error,
    }
}

fn from_call_error(e: CallError) -> Delivery {
    match e {
        CallError::Token(TokenError::Gone) => permanent("the CRM installation was removed".into()),
        CallError::Token(TokenError::Retry { error, after }) => Delivery::Retry {
            status: None,
            error,
            retry_after: after,
        },
        CallError::Token(other) => retry(other.to_string()),
        CallError::Crm(ConnectorError::RateLimited { retry_after }) => Delivery::Retry {
            status: Some(429),
            error: "rate limited by the CRM".into(),
            retry_after,
        },
        CallError::Crm(e) if e.is_retryable() => retry(e.to_string()),
        CallError::Crm(e) => permanent(e.to_string()),
    }
}

/// Run one `crm` job.
pub async fn deliver(state: &AppState, job: &Claimed) -> Delivery {
    let (t, c, mut record) = match crate::jobs::finished_call(state, job).await {
        Ok(found) => found,
        Err(d) => return d,
    };
    let Some(installation_id) = c.crm_installation_id.clone() else {
        return permanent("the call is not linked to a CRM installation".into());
    };
    let inst = match installations::get(&state.db, &installation_id).await {
        Ok(Some(i)) if i.tenant_id == t.id => i,
        Ok(_) => return permanent("the CRM installation was removed".into()),
        Err(e) => return retry(format!("database: {e}")),
    };
    let Some(connector) = state.connectors.get(&inst.connector).cloned() else {
        return retry(format!(
            "connector {} is not enabled in this instance",
            inst.connector
        ));
    };
    let result = write(state, &t, &c, &inst, connector.as_ref(), &mut record).await;
    if let Err(Delivery::Retry { error, .. } | Delivery::Permanent { error, .. }) = &result
        && let Err(e) =
            installations::record_error(&state.db, &inst.id, &format!("write-back: {error}"), false)
                .await
    {
        tracing::warn!(error = %e, "could not record the installation's last error");
    }
    match result {
        Ok(()) => Delivery::Done { status: None },
        Err(d) => d,
    }
}

async fn write(
    state: &AppState,
    t: &tenant::Model,
    c: &call::Model,
    inst: &Installation,
    connector: &dyn Connector,
    record: &mut CallRecord,
) -> Result<(), Delivery> {
    let db_err = |e: DbErr| retry(format!("database: {e}"));
    if record.crm_user_id.is_none() {
        record.crm_user_id = crm_user_for(state, &t.id, &inst.connector, &record.agent_number)
            .await
            .map_err(db_err)?;
    }
    let stored = stored_log(state, &c.id, &inst.id).await.map_err(db_err)?;
    let broker = &state.tokens;
    let log = match stored {
        None => {
            if record.crm_record.is_none() {
                match resolve_record(state, inst, connector, &record.customer_number).await? {
                    Some(r) => record.crm_record = Some(r),
                    None => {
                        tracing::info!(call = %c.id, installation = %inst.id,
                            "no CRM record carries the customer's number; nothing logged (rule: nothing)");
                        return Ok(());
                    }
                }
                persist_record(state, &c.id, record.crm_record.as_ref())
                    .await
                    .map_err(db_err)?;
            }
            let written = hash(record);
            let rec = &*record;
            let log = broker
                .call(state, &inst.id, move |ctx, token| async move {
                    connector.log_call(&ctx, &token, rec).await
                })
                .await
                .map_err(from_call_error)?;
            insert_log(state, &c.id, inst, &log, &written)
                .await
                .map_err(db_err)?;
            tracing::info!(call = %c.id, installation = %inst.id, log = %log.id, "call logged in the CRM");
            StoredLog {
                log,
                written_hash: written,
                recording_uploaded: false,
            }
        }
        Some(s) => {
            let written = hash(record);
            if s.log.updatable && s.written_hash != written {
                let (rec, log) = (&*record, &s.log);
                broker
                    .call(state, &inst.id, move |ctx, token| async move {
                        connector.update_call(&ctx, &token, log, rec).await
                    })
                    .await
                    .map_err(from_call_error)?;
                set_hash(state, &c.id, &inst.id, &written)
                    .await
                    .map_err(db_err)?;
            }
            s
        }
    };
    if connector.recording_mode() == RecordingMode::Upload
        && !log.recording_uploaded
        && c.recording_url.as_deref().is_some_and(|u| !u.is_empty())
    {
        let (bytes, content_type) = proxy::download(state, t, c, MAX_UPLOAD_BYTES)
            .await
            .map_err(|e| match e {
                proxy::PlayError::NotAllowed(_) | proxy::PlayError::Credentials(_) => {
                    permanent(format!("recording: {e}"))
                }
                other => retry(format!("recording: {other}")),
            })?;
        let file = RecordingFile {
            filename: format!(
                "{}.{}",
                c.exotel_call_sid.as_deref().unwrap_or(&c.id),
                proxy::extension_of(&content_type)
            ),
            content_type,
            bytes,
        };
        let (file, log_ref) = (&file, &log.log);
        broker
            .call(state, &inst.id, move |ctx, token| async move {
                connector
                    .upload_recording(&ctx, &token, log_ref, file)
                    .await
            })
            .await
            .map_err(from_call_error)?;
        mark_uploaded(state, &c.id, &inst.id)
            .await
            .map_err(db_err)?;
    }
    Ok(())
}

/// The CRM record for a call placed without one: the first lookup match, else the rule.
async fn resolve_record(
    state: &AppState,
    inst: &Installation,
    connector: &dyn Connector,
    customer: &str,
) -> Result<Option<CrmRecordRef>, Delivery> {
    let found = state
        .tokens
        .call(state, &inst.id, move |ctx, token| async move {
            connector
                .find_contact_by_phone(&ctx, &token, customer)
                .await
        })
        .await
        .map_err(from_call_error)?;
    if let Some(m) = found.into_iter().next() {
        return Ok(Some(m.record));
    }
    match inst.unknown_number_rule {
        UnknownNumberRule::Nothing => Ok(None),
        UnknownNumberRule::DefaultRecord => match &inst.default_record {
            Some(r) => Ok(Some(r.clone())),
            None => Err(permanent(
                "the unknown-number rule is \"attach to a default record\" but none is set".into(),
            )),
        },
        UnknownNumberRule::Create => state
            .tokens
            .call(state, &inst.id, move |ctx, token| async move {
                connector.create_contact(&ctx, &token, customer).await
            })
            .await
            .map(Some)
            .map_err(from_call_error),
    }
}

/// What we would write, hashed, so an update that changes nothing is skipped.
fn hash(record: &CallRecord) -> String {
    let json = serde_json::to_vec(record).unwrap_or_default();
    hex::encode(Sha256::digest(json))
}

/// The agent's user id in `connector`, from the agent mapping.
async fn crm_user_for(
    state: &AppState,
    tenant_id: &str,
    connector: &str,
    agent_number: &str,
) -> Result<Option<String>, DbErr> {
    let row = state
        .db
        .query_one_raw(stmt(
            state.db.get_database_backend(),
            "SELECT m.crm_user_id FROM agents a JOIN agent_crm_users m ON m.agent_id = a.id \
             AND m.tenant_id = a.tenant_id WHERE a.tenant_id = ? AND a.phone = ? \
             AND m.connector = ? ORDER BY m.crm_user_id LIMIT 1",
            vec![tenant_id.into(), agent_number.into(), connector.into()],
        ))
        .await?;
    row.map(|r| r.try_get("", "crm_user_id")).transpose()
}

async fn stored_log(
    state: &AppState,
    call_id: &str,
    installation_id: &str,
) -> Result<Option<StoredLog>, DbErr> {
    let row = state
        .db
        .query_one_raw(stmt(
            state.db.get_database_backend(),
            "SELECT crm_log_id, updatable, written_hash, recording_uploaded FROM crm_logs \
             WHERE call_id = ? AND installation_id = ?",
            vec![call_id.into(), installation_id.into()],
        ))
        .await?;
    row.map(|r| {
        Ok(StoredLog {
            log: CrmLogRef {
                id: r.try_get("", "crm_log_id")?,
                updatable: r.try_get("", "updatable")?,
            },
            written_hash: r.try_get("", "written_hash")?,
            recording_uploaded: r.try_get("", "recording_uploaded")?,
        })
    })
    .transpose()
}

async fn insert_log(
    state: &AppState,
    call_id: &str,
    inst: &Installation,
    log: &CrmLogRef,
    written: &str,
) -> Result<(), DbErr> {
    let now = db::now_ms();
    db::execute_write(
        &state.db,
        stmt(
            state.db.get_database_backend(),
            "INSERT INTO crm_logs (call_id, installation_id, tenant_id, crm_log_id, updatable, \
             written_hash, recording_uploaded, created_at, updated_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            vec![
                call_id.into(),
                inst.id.clone().into(),
                inst.tenant_id.clone().into(),
                log.id.clone().into(),
                log.updatable.into(),
                written.into(),
                false.into(),
                now.into(),
                now.into(),
            ],
        ),
    )
    .await?;
    Ok(())
}

async fn set_hash(
    state: &AppState,
    call_id: &str,
    installation_id: &str,
    written: &str,
) -> Result<(), DbErr> {
    db::execute_write(
        &state.db,
        stmt(
            state.db.get_database_backend(),
            "UPDATE crm_logs SET written_hash = ?, updated_at = ? WHERE call_id = ? \
             AND installation_id = ?",
            vec![
                written.into(),
                db::now_ms().into(),
                call_id.into(),
                installation_id.into(),
            ],
        ),
    )
    .await?;
    Ok(())
}

async fn mark_uploaded(
    state: &AppState,
    call_id: &str,
    installation_id: &str,
) -> Result<(), DbErr> {
    db::execute_write(
        &state.db,
        stmt(
            state.db.get_database_backend(),
            "UPDATE crm_logs SET recording_uploaded = ?, updated_at = ? WHERE call_id = ? \
             AND installation_id = ?",
            vec![
                true.into(),
                db::now_ms().into(),
                call_id.into(),
                installation_id.into(),
            ],
        ),
    )
    .await?;
    Ok(())
}

async fn persist_record(
    state: &AppState,
    call_id: &str,
    record: Option<&CrmRecordRef>,
) -> Result<(), DbErr> {
    let json = record.and_then(|r| serde_json::to_string(r).ok());
    db::execute_write(
        &state.db,
        stmt(
            state.db.get_database_backend(),
            "UPDATE calls SET crm_record = ? WHERE id = ? AND crm_record IS NULL",
            vec![json.into(), call_id.into()],
        ),
    )
    .await?;
    Ok(())
}

/// The CRM logs written for a call (for the admin timeline): `(installation, connector, log
/// id, recording uploaded)`.
///
/// # Errors
/// Database failure.
pub async fn logs_for_call(
    db: &impl ConnectionTrait,
    tenant_id: &str,
    call_id: &str,
) -> Result<Vec<(String, String, String, bool)>, DbErr> {
    let rows = db
        .query_all_raw(stmt(
            db.get_database_backend(),
            "SELECT l.installation_id, i.connector, l.crm_log_id, l.recording_uploaded \
             FROM crm_logs l JOIN installations i ON i.id = l.installation_id \
             WHERE l.tenant_id = ? AND l.call_id = ?",
            vec![tenant_id.into(), call_id.into()],
        ))
        .await?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get("", "installation_id")?,
                r.try_get("", "connector")?,
                r.try_get("", "crm_log_id")?,
                r.try_get("", "recording_uploaded")?,
            ))
        })
        .collect()
}
