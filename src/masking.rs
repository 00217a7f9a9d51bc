//! Number masking over a tenant's virtual-number pool (Exotel's caller-based and PIN-based
//! masking, Twilio-Proxy-style sessions): the pool, session allocation, the dial-whom routing
//! decision, the Passthru call log, and the expiry sweep.
//!
//! Rules this module enforces:
//! - A participant never holds the same virtual number in two active caller-mode sessions. The
//!   routing keys live in `masking_allocations` only while a session routes; its primary key
//!   `(tenant_id, number, virtual_number)` is the final guard. Allocation runs in one write
//!   transaction and inserts with `ON CONFLICT DO NOTHING`, so a concurrent create that took the
//!   candidate first makes this one move to the next candidate (bounded) instead of colliding
//!   or aborting the transaction.
//! - A PIN is unique among the active sessions on one virtual number (`masking_pins` key).
//! - A released (participant, number) pair is not reused for that participant within
//!   `masking_cooloff_secs`.
//! - Expired sessions stop routing at once: every lookup checks `expires_at`. Their routing keys
//!   are released by the background sweep (`masking_sweep_interval_secs`) and, lazily, by any
//!   allocation or pool change that touches them.
//! - Every dial-whom lookup is one indexed query and the answer waits for nothing else; the TTL
//!   slides on each routed call, recorded in batches by [`Slides`] off the answer path (written
//!   when it moves by more than a tenth of the TTL, at most a minute).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use rand::Rng;
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr, QueryResult, Value,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};
use tokio_util::sync::CancellationToken;

use crate::{
    AppState, crypto,
    db::{self, placeholders, stmt},
    error::ApiError,
    exotel::{Leg, callback::pairs_to_json, parse_time},
    phone,
};

/// Caller-based mode: (caller, virtual number) → the other participant.
pub const MODE_CALLER: &str = "caller";
/// PIN mode: (virtual number, PIN entered) → the other participant.
pub const MODE_PIN: &str = "pin";

/// Candidates tried per allocation round, and rounds before giving up.
const CANDIDATES_PER_ROUND: u64 = 16;
const ALLOCATION_ROUNDS: usize = 4;
/// Random PINs tried per participant before the number is declared full.
const PIN_ATTEMPTS: usize = 32;
/// Sessions closed per sweep transaction.
const SWEEP_BATCH: usize = 500;

fn ms_to_time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

fn backend_of(db: &impl ConnectionTrait) -> DbBackend {
    db.get_database_backend()
}

// ---------------------------------------------------------------------------------------------
// Settings
// ---------------------------------------------------------------------------------------------

/// A tenant's effective masking settings (its overrides over the configured defaults).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Settings {
    /// `national` or `e164`: how dial-whom writes the number.
    pub dial_format: String,
    /// Dialled when nothing matches; `None` answers an empty body (the flow's failure branch).
    pub fallback_number: Option<String>,
    /// PIN mode: route only when the caller owns the PIN entered.
    pub pin_caller_check: bool,
    /// Sync Passthru: 200 or 302 for an unanswered call.
    pub passthru_branch_on_unanswered: u16,
}

/// `PATCH /api/v1/masking/settings`: `null` clears an override, an absent field keeps it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsPatch {
    /// `national` | `e164` | null.
    #[serde(default, deserialize_with = "double_option")]
    pub dial_format: Option<Option<String>>,
    /// A phone number | null.
    #[serde(default, deserialize_with = "double_option")]
    pub fallback_number: Option<Option<String>>,
    /// bool | null.
    #[serde(default, deserialize_with = "double_option")]
    pub pin_caller_check: Option<Option<bool>>,
    /// 200 | 302 | null.
    #[serde(default, deserialize_with = "double_option")]
    pub passthru_branch_on_unanswered: Option<Option<u16>>,
}

fn double_option<'de, T, D>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    T: Deserialize<'de>,
    D: serde::Deserializer<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Debug, Clone, Default)]
struct Overrides {
    dial_format: Option<String>,
    fallback_number: Option<String>,
    pin_caller_check: Option<bool>,
    passthru_branch_on_unanswered: Option<i32>,
}

impl Overrides {
    fn from_row(row: &QueryResult) -> Result<Self, DbErr> {
        Ok(Self {
            dial_format: row.try_get("", "dial_format")?,
            fallback_number: row.try_get("", "fallback_number")?,
            pin_caller_check: row.try_get("", "pin_caller_check")?,
            passthru_branch_on_unanswered: row.try_get("", "passthru_branch_on_unanswered")?,
        })
    }

    fn effective(self, config: &crate::config::Config) -> Settings {
        Settings {
            dial_format: self
                .dial_format
                .unwrap_or_else(|| config.masking_dial_format.clone()),
            fallback_number: self.fallback_number,
            pin_caller_check: self
                .pin_caller_check
                .unwrap_or(config.masking_pin_caller_check),
            passthru_branch_on_unanswered: self
                .passthru_branch_on_unanswered
                .and_then(|v| u16::try_from(v).ok())
                .unwrap_or(config.passthru_branch_on_unanswered),
        }
    }
}

/// A tenant's effective settings.
///
/// # Errors
/// Database failure.
pub async fn settings(state: &AppState, tenant_id: &str) -> Result<Settings, DbErr> {
    let row = state
        .db
        .query_one_raw(stmt(
            backend_of(&state.db),
            "SELECT dial_format, fallback_number, pin_caller_check, \
             passthru_branch_on_unanswered FROM masking_settings WHERE tenant_id = ?",
            vec![tenant_id.into()],
        ))
        .await?;
    let o = match row {
        Some(r) => Overrides::from_row(&r)?,
        None => Overrides::default(),
    };
    Ok(o.effective(&state.config))
}

/// Change a tenant's overrides and return the effective settings.
///
/// # Errors
/// 422 for an invalid value; database failure.
pub async fn update_settings(
    state: &AppState,
    tenant_id: &str,
    region: &str,
    patch: SettingsPatch,
) -> Result<Settings, ApiError> {
    if let Some(Some(f)) = &patch.dial_format
        && !matches!(f.as_str(), "national" | "e164")
    {
        return Err(ApiError::validation(
            "dial_format",
            "dial_format must be national or e164",
        ));
    }
    if let Some(Some(code)) = patch.passthru_branch_on_unanswered
        && !matches!(code, 200 | 302)
    {
        return Err(ApiError::validation(
            "passthru_branch_on_unanswered",
            "passthru_branch_on_unanswered must be 200 or 302",
        ));
    }
    let fallback = match &patch.fallback_number {
        Some(Some(n)) => Some(Some(phone::to_e164(n, region).map_err(|e| {
            ApiError::validation("fallback_number", format!("fallback_number {e}"))
        })?)),
        Some(None) => Some(None),
        None => None,
    };
    let db = &state.db;
    let backend = backend_of(db);
    let txn = db::begin_write(db).await?;
    let now = db::now_ms();
    txn.execute_raw(stmt(
        backend,
        "INSERT INTO masking_settings (tenant_id, updated_at) VALUES (?, ?) \
         ON CONFLICT (tenant_id) DO UPDATE SET updated_at = excluded.updated_at",
        vec![tenant_id.into(), now.into()],
    ))
    .await?;
    let mut sets: Vec<&str> = Vec::new();
    let mut values: Vec<Value> = Vec::new();
    if let Some(v) = patch.dial_format {
        sets.push("dial_format = ?");
        values.push(v.into());
    }
    if let Some(v) = fallback {
        sets.push("fallback_number = ?");
        values.push(v.into());
    }
    if let Some(v) = patch.pin_caller_check {
        sets.push("pin_caller_check = ?");
        values.push(v.into());
    }
    if let Some(v) = patch.passthru_branch_on_unanswered {
        sets.push("passthru_branch_on_unanswered = ?");
        values.push(v.map(i32::from).into());
    }
    if !sets.is_empty() {
        values.push(tenant_id.into());
        txn.execute_raw(stmt(
            backend,
            &format!(
                "UPDATE masking_settings SET {} WHERE tenant_id = ?",
                sets.join(", ")
            ),
            values,
        ))
        .await?;
    }
    txn.commit().await?;
    Ok(settings(state, tenant_id).await?)
}

// ---------------------------------------------------------------------------------------------
// Pool
// ---------------------------------------------------------------------------------------------

/// A pool number as listed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PoolNumber {
    /// E.164.
    pub number: String,
    /// RFC 3339 UTC.
    pub created_at: DateTime<Utc>,
    /// Open (unexpired) sessions on this number.
    pub open_sessions: i64,
}

/// The tenant's pool, with how many open sessions use each number.
///
/// # Errors
/// Database failure.
pub async fn list_numbers(
    db: &DatabaseConnection,
    tenant_id: &str,
) -> Result<Vec<PoolNumber>, DbErr> {
    let backend = backend_of(db);
    let rows = db
        .query_all_raw(stmt(
            backend,
            "SELECT n.number, n.created_at, \
             (SELECT COUNT(*) FROM masking_sessions s WHERE s.tenant_id = n.tenant_id \
              AND s.virtual_number = n.number AND s.status = 'open' AND s.expires_at > ?) AS open_sessions \
             FROM masking_numbers n WHERE n.tenant_id = ? ORDER BY n.number",
            vec![db::now_ms().into(), tenant_id.into()],
        ))
        .await?;
    rows.iter()
        .map(|r| {
            Ok(PoolNumber {
                number: r.try_get("", "number")?,
                created_at: ms_to_time(r.try_get("", "created_at")?),
                open_sessions: r.try_get("", "open_sessions")?,
            })
        })
        .collect()
}

/// Normalise pool numbers given by an operator or the API.
///
/// # Errors
/// The first number that is not a phone number, named.
pub fn normalise_numbers(inputs: &[String], region: &str) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::with_capacity(inputs.len());
    for n in inputs {
        let e164 = phone::to_e164(n, region).map_err(|e| format!("{n:?} {e}"))?;
        if !out.contains(&e164) {
            out.push(e164);
        }
    }
    Ok(out)
}

/// Add E.164 numbers to a tenant's pool; returns for each whether it was new.
///
/// # Errors
/// Database failure (an unknown tenant fails its foreign key).
pub async fn add_numbers(
    db: &DatabaseConnection,
    tenant_id: &str,
    numbers: &[String],
) -> Result<Vec<(String, bool)>, DbErr> {
    let backend = backend_of(db);
    let txn = db::begin_write(db).await?;
    let now = db::now_ms();
    let mut out = Vec::with_capacity(numbers.len());
    for n in numbers {
        let row = txn
            .query_one_raw(stmt(
                backend,
                "INSERT INTO masking_numbers (tenant_id, number, created_at) VALUES (?, ?, ?) \
                 ON CONFLICT (tenant_id, number) DO NOTHING RETURNING number",
                vec![tenant_id.into(), n.clone().into(), now.into()],
            ))
            .await?;
        out.push((n.clone(), row.is_some()));
    }
    txn.commit().await?;
    Ok(out)
}

/// Remove a number from the pool.
///
/// # Errors
/// 404 when it is not in the pool, 409 while an open session uses it.
pub async fn remove_number(
    state: &AppState,
    tenant_id: &str,
    number: &str,
) -> Result<(), ApiError> {
    let db = &state.db;
    let backend = backend_of(db);
    let txn = db::begin_write(db).await?;
    let now = db::now_ms();
    // The delete comes first: on PostgreSQL it waits for any create that holds the row
    // `FOR SHARE`, and the check below then sees that create's session.
    let deleted = txn
        .query_one_raw(stmt(
            backend,
            "DELETE FROM masking_numbers WHERE tenant_id = ? AND number = ? RETURNING number",
            vec![tenant_id.into(), number.into()],
        ))
        .await?;
    if deleted.is_none() {
        return Err(ApiError::NotFound(format!("{number} is not in the pool")));
    }
    expire_where(
        &txn,
        backend,
        "tenant_id = ? AND virtual_number = ?",
        vec![tenant_id.into(), number.into()],
        now,
    )
    .await?;
    let open = txn
        .query_one_raw(stmt(
            backend,
            "SELECT COUNT(*) AS n FROM masking_sessions WHERE tenant_id = ? \
             AND virtual_number = ? AND status = 'open'",
            vec![tenant_id.into(), number.into()],
        ))
        .await?
        .map(|r| r.try_get::<i64>("", "n"))
        .transpose()?
        .unwrap_or(0);
    if open > 0 {
        txn.rollback().await?;
        return Err(ApiError::Conflict(format!(
            "{number} is used by {open} open session(s); close them first"
        )));
    }
    txn.commit().await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Sessions
// ---------------------------------------------------------------------------------------------

/// `POST /api/v1/sessions` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewSession {
    /// Exactly two parties.
    pub participants: Vec<NewParticipant>,
    /// Seconds of inactivity before the session expires (slides on each routed call).
    pub ttl_seconds: Option<i64>,
    /// `caller` (default) or `pin`.
    pub mode: Option<String>,
}

/// One party of a new session.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewParticipant {
    /// The real phone number.
    pub number: String,
    /// What the party is (`customer`, `rider`, `restaurant` …).
    pub role: String,
    /// The caller's CRM reference for this party (any JSON), echoed back.
    pub crm: Option<Json>,
}

/// `PATCH /api/v1/sessions/{id}` body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionPatch {
    /// Only `closed`.
    pub status: Option<String>,
    /// A new TTL; the session then expires `ttl_seconds` from now.
    pub ttl_seconds: Option<i64>,
    /// Push the expiry this many seconds further.
    pub extend_seconds: Option<i64>,
}

/// A session as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SessionView {
    /// `ses_…`.
    pub id: String,
    /// `caller` or `pin`.
    pub mode: String,
    /// `open` or `closed` (an open session past its expiry reads as closed/`expired`).
    pub status: String,
    /// `closed` (by the API) or `expired`, once closed.
    pub closed_reason: Option<String>,
    /// The pool number both parties call (E.164).
    pub virtual_number: String,
    /// Seconds of inactivity before expiry.
    pub ttl_seconds: i64,
    /// RFC 3339 UTC.
    pub expires_at: DateTime<Utc>,
    /// RFC 3339 UTC: the last routed call.
    pub last_interaction_at: Option<DateTime<Utc>>,
    /// RFC 3339 UTC.
    pub created_at: DateTime<Utc>,
    /// RFC 3339 UTC.
    pub closed_at: Option<DateTime<Utc>>,
    /// The parties.
    pub participants: Vec<ParticipantView>,
}

/// A party as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ParticipantView {
    /// E.164.
    pub number: String,
    /// The caller-given role.
    pub role: String,
    /// The caller's CRM reference.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crm: Option<Json>,
    /// PIN mode: what this party enters after calling the virtual number.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pin: Option<String>,
    /// Whether the party still routes.
    pub active: bool,
}

struct SessionRow {
    id: String,
    mode: String,
    virtual_number: String,
    status: String,
    closed_reason: Option<String>,
    ttl_seconds: i64,
    expires_at: i64,
    last_interaction_at: Option<i64>,
    created_at: i64,
    closed_at: Option<i64>,
}

const SESSION_COLUMNS: &str = "id, mode, virtual_number, status, closed_reason, ttl_seconds, \
                               expires_at, last_interaction_at, created_at, closed_at";

impl SessionRow {
    fn from_row(r: &QueryResult) -> Result<Self, DbErr> {
        Ok(Self {
            id: r.try_get("", "id")?,
            mode: r.try_get("", "mode")?,
            virtual_number: r.try_get("", "virtual_number")?,
            status: r.try_get("", "status")?,
            closed_reason: r.try_get("", "closed_reason")?,
            ttl_seconds: r.try_get("", "ttl_seconds")?,
            expires_at: r.try_get("", "expires_at")?,
            last_interaction_at: r.try_get("", "last_interaction_at")?,
            created_at: r.try_get("", "created_at")?,
            closed_at: r.try_get("", "closed_at")?,
        })
    }

    fn view(self, participants: Vec<ParticipantView>, now: i64) -> SessionView {
        let expired = self.status == "open" && self.expires_at <= now;
        let live = self.status == "open" && !expired;
        SessionView {
            id: self.id,
            mode: self.mode,
            status: if live { "open" } else { "closed" }.into(),
            closed_reason: if expired {
                Some("expired".into())
            } else {
                self.closed_reason
            },
            virtual_number: self.virtual_number,
            ttl_seconds: self.ttl_seconds,
            expires_at: ms_to_time(self.expires_at),
            last_interaction_at: self.last_interaction_at.map(ms_to_time),
            created_at: ms_to_time(self.created_at),
            closed_at: self
                .closed_at
                .or(expired.then_some(self.expires_at))
                .map(ms_to_time),
            participants: participants
                .into_iter()
                .map(|mut p| {
                    p.active = p.active && live;
                    p
                })
                .collect(),
        }
    }
}

fn validate_ttl(
    field: &'static str,
    ttl: i64,
    config: &crate::config::Config,
) -> Result<i64, ApiError> {
    let max = i64::try_from(config.masking_max_ttl_secs).unwrap_or(i64::MAX);
    let min = if field == "extend_seconds" { 1 } else { 60 };
    if !(min..=max).contains(&ttl) {
        return Err(ApiError::validation(
            field,
            format!("{field} must be between {min} and {max}"),
        ));
    }
    Ok(ttl)
}

struct Party {
    number: String,
    role: String,
    crm: Option<String>,
}

fn validate_new(
    req: &NewSession,
    region: &str,
    config: &crate::config::Config,
) -> Result<(String, i64, Vec<Party>), ApiError> {
    let mode = req.mode.as_deref().unwrap_or(MODE_CALLER);
    if mode != MODE_CALLER && mode != MODE_PIN {
        return Err(ApiError::validation("mode", "mode must be caller or pin"));
    }
    let ttl = validate_ttl(
        "ttl_seconds",
        req.ttl_seconds
            .unwrap_or_else(|| i64::try_from(config.masking_default_ttl_secs).unwrap_or(86_400)),
        config,
    )?;
    // Two parties per session, as in Twilio Proxy: with a third, "the other participant" is
    // ambiguous. Three-way orders (customer, restaurant, rider) use one session per pair.
    if req.participants.len() != 2 {
        return Err(ApiError::validation(
            "participants",
            "a session has exactly two participants (use one session per pair)",
        ));
    }
    let mut parties = Vec::with_capacity(2);
    for (i, p) in req.participants.iter().enumerate() {
        let number = phone::to_e164(&p.number, region).map_err(|e| {
            ApiError::validation("participants", format!("participants[{i}].number {e}"))
        })?;
        let role = p.role.trim();
        if role.is_empty() || role.len() > 64 {
            return Err(ApiError::validation(
                "participants",
                format!("participants[{i}].role must be 1 to 64 characters"),
            ));
        }
        let crm = match &p.crm {
            None | Some(Json::Null) => None,
            Some(v) => {
                let s = v.to_string();
                if s.len() > 4096 {
                    return Err(ApiError::validation(
                        "participants",
                        format!("participants[{i}].crm is larger than 4096 bytes"),
                    ));
                }
                Some(s)
            }
        };
        parties.push(Party {
            number,
            role: role.to_owned(),
            crm,
        });
    }
    if parties[0].number == parties[1].number {
        return Err(ApiError::validation(
            "participants",
            "the two participants have the same number",
        ));
    }
    Ok((mode.to_owned(), ttl, parties))
}

/// Close the open sessions matching `filter` whose expiry has passed and release their routing
/// keys (recording the cool-off); returns their ids.
async fn expire_where(
    txn: &DatabaseTransaction,
    backend: DbBackend,
    filter: &str,
    mut values: Vec<Value>,
    now: i64,
) -> Result<Vec<String>, DbErr> {
    let mut all = vec![now.into()];
    all.append(&mut values);
    all.push(now.into());
    let rows = txn
        .query_all_raw(stmt(
            backend,
            &format!(
                "UPDATE masking_sessions SET status = 'closed', closed_reason = 'expired', \
                 closed_at = ? WHERE {filter} AND status = 'open' AND expires_at <= ? RETURNING id"
            ),
            all,
        ))
        .await?;
    let ids = rows
        .iter()
        .map(|r| r.try_get("", "id"))
        .collect::<Result<Vec<String>, DbErr>>()?;
    release(txn, backend, &ids, "expired", now).await?;
    Ok(ids)
}

/// Release the routing keys of `ids` (recording the cool-off) and mark them closed.
async fn release(
    txn: &DatabaseTransaction,
    backend: DbBackend,
    ids: &[String],
    reason: &str,
    now: i64,
) -> Result<(), DbErr> {
    if ids.is_empty() {
        return Ok(());
    }
    let list = placeholders(ids.len());
    let ids_v = || ids.iter().cloned().map(Value::from).collect::<Vec<_>>();
    // An expired session's pair was released when it expired, not when the sweep noticed.
    let mut v: Vec<Value> = vec![now.into(), now.into()];
    v.extend(ids_v());
    txn.execute_raw(stmt(
        backend,
        &format!(
            "INSERT INTO masking_cooloffs (tenant_id, number, virtual_number, released_at) \
             SELECT a.tenant_id, a.number, a.virtual_number, \
             CASE WHEN s.expires_at < ? THEN s.expires_at ELSE ? END \
             FROM masking_allocations a JOIN masking_sessions s ON s.id = a.session_id \
             WHERE a.session_id IN ({list}) \
             ON CONFLICT (tenant_id, number, virtual_number) \
             DO UPDATE SET released_at = excluded.released_at"
        ),
        v,
    ))
    .await?;
    for sql in [
        format!("DELETE FROM masking_allocations WHERE session_id IN ({list})"),
        format!("DELETE FROM masking_pins WHERE session_id IN ({list})"),
    ] {
        txn.execute_raw(stmt(backend, &sql, ids_v())).await?;
    }
    let mut v: Vec<Value> = vec![false.into()];
    v.extend(ids_v());
    txn.execute_raw(stmt(
        backend,
        &format!("UPDATE masking_participants SET active = ? WHERE session_id IN ({list})"),
        v,
    ))
    .await?;
    let mut v: Vec<Value> = vec![reason.into(), now.into()];
    v.extend(ids_v());
    txn.execute_raw(stmt(
        backend,
        &format!(
            "UPDATE masking_sessions SET status = 'closed', closed_reason = ?, closed_at = ? \
             WHERE id IN ({list}) AND status = 'open'"
        ),
        v,
    ))
    .await?;
    Ok(())
}

fn random_pin(len: u32) -> String {
    let mut rng = rand::rng();
    (0..len)
        .map(|_| char::from(b'0' + rng.random_range(0..10u8)))
        .collect()
}

/// Create a session, allocating a virtual number from the tenant's pool.
///
/// # Errors
/// 422 for invalid input, 409 when the pool has no number for these participants.
pub async fn create_session(
    state: &AppState,
    tenant_id: &str,
    region: &str,
    req: NewSession,
) -> Result<SessionView, ApiError> {
    let (mode, ttl, parties) = validate_new(&req, region, &state.config)?;
    let db = &state.db;
    let backend = backend_of(db);
    let id = format!("ses_{}", uuid::Uuid::now_v7().simple());
    let txn = db::begin_write(db).await?;
    let now = db::now_ms();
    let a = parties[0].number.clone();
    let b = parties[1].number.clone();

    // First statement writes (SQLite holds the write lock from here): expired sessions of these
    // participants give their pairs back before we look for a free number.
    expire_where(
        &txn,
        backend,
        "tenant_id = ? AND id IN (SELECT session_id FROM masking_allocations \
         WHERE tenant_id = ? AND number IN (?, ?))",
        vec![
            tenant_id.into(),
            tenant_id.into(),
            a.clone().into(),
            b.clone().into(),
        ],
        now,
    )
    .await?;

    let pool_size = txn
        .query_one_raw(stmt(
            backend,
            "SELECT COUNT(*) AS n FROM masking_numbers WHERE tenant_id = ?",
            vec![tenant_id.into()],
        ))
        .await?
        .map(|r| r.try_get::<i64>("", "n"))
        .transpose()?
        .unwrap_or(0);
    if pool_size == 0 {
        txn.rollback().await?;
        return Err(ApiError::Conflict(
            "the virtual-number pool is empty: add numbers with POST /api/v1/numbers".into(),
        ));
    }
    let lock = if backend == DbBackend::Postgres {
        " FOR SHARE"
    } else {
        ""
    };

    let virtual_number = if mode == MODE_CALLER {
        let cooloff_from = now
            - i64::try_from(state.config.masking_cooloff_secs)
                .unwrap_or(0)
                .saturating_mul(1000);
        let mut chosen = None;
        'rounds: for _ in 0..ALLOCATION_ROUNDS {
            let rows = txn
                .query_all_raw(stmt(
                    backend,
                    &format!(
                        "SELECT n.number FROM masking_numbers n WHERE n.tenant_id = ? \
                         AND NOT EXISTS (SELECT 1 FROM masking_allocations a WHERE a.tenant_id = ? \
                           AND a.number IN (?, ?) AND a.virtual_number = n.number) \
                         AND NOT EXISTS (SELECT 1 FROM masking_cooloffs c WHERE c.tenant_id = ? \
                           AND c.number IN (?, ?) AND c.virtual_number = n.number \
                           AND c.released_at > ?) \
                         ORDER BY RANDOM() LIMIT {CANDIDATES_PER_ROUND}"
                    ),
                    vec![
                        tenant_id.into(),
                        tenant_id.into(),
                        a.clone().into(),
                        b.clone().into(),
                        tenant_id.into(),
                        a.clone().into(),
                        b.clone().into(),
                        cooloff_from.into(),
                    ],
                ))
                .await?;
            if rows.is_empty() {
                break;
            }
            for r in rows {
                let vn: String = r.try_get("", "number")?;
                // PostgreSQL: hold the pool row so a concurrent DELETE waits for us.
                let still = txn
                    .query_one_raw(stmt(
                        backend,
                        &format!(
                            "SELECT number FROM masking_numbers WHERE tenant_id = ? AND number = ?{lock}"
                        ),
                        vec![tenant_id.into(), vn.clone().into()],
                    ))
                    .await?;
                if still.is_none() {
                    continue;
                }
                // The unique key is the final guard: a concurrent create that took this pair
                // first makes our insert a no-op (never an error that would abort the
                // transaction), and we move on to the next candidate.
                let inserted = txn
                    .query_all_raw(stmt(
                        backend,
                        "INSERT INTO masking_allocations \
                         (tenant_id, number, virtual_number, session_id, counterpart) \
                         VALUES (?, ?, ?, ?, ?), (?, ?, ?, ?, ?) \
                         ON CONFLICT (tenant_id, number, virtual_number) DO NOTHING RETURNING number",
                        vec![
                            tenant_id.into(),
                            a.clone().into(),
                            vn.clone().into(),
                            id.clone().into(),
                            b.clone().into(),
                            tenant_id.into(),
                            b.clone().into(),
                            vn.clone().into(),
                            id.clone().into(),
                            a.clone().into(),
                        ],
                    ))
                    .await?;
                if inserted.len() == 2 {
                    chosen = Some(vn);
                    break 'rounds;
                }
                if !inserted.is_empty() {
                    txn.execute_raw(stmt(
                        backend,
                        "DELETE FROM masking_allocations WHERE session_id = ?",
                        vec![id.clone().into()],
                    ))
                    .await?;
                }
            }
        }
        let Some(vn) = chosen else {
            txn.rollback().await?;
            return Err(ApiError::Conflict(format!(
                "no virtual number is free for these participants: each of the {pool_size} \
                 pool number(s) is in an active session or cool-off with one of them; add \
                 numbers (POST /api/v1/numbers) or close sessions"
            )));
        };
        vn
    } else {
        let row = txn
            .query_one_raw(stmt(
                backend,
                &format!(
                    "SELECT number FROM masking_numbers WHERE tenant_id = ? \
                     ORDER BY RANDOM() LIMIT 1{lock}"
                ),
                vec![tenant_id.into()],
            ))
            .await?;
        let Some(row) = row else {
            txn.rollback().await?;
            return Err(ApiError::Conflict(
                "the virtual-number pool is empty: add numbers with POST /api/v1/numbers".into(),
            ));
        };
        row.try_get::<String>("", "number")?
    };

    let mut pins: Vec<Option<String>> = vec![None, None];
    if mode == MODE_PIN {
        for i in 0..2 {
            let (owner, other) = (&parties[i].number, &parties[1 - i].number);
            for _ in 0..PIN_ATTEMPTS {
                let pin = random_pin(state.config.masking_pin_length);
                let row = txn
                    .query_one_raw(stmt(
                        backend,
                        "INSERT INTO masking_pins \
                         (tenant_id, virtual_number, pin, session_id, owner, counterpart) \
                         VALUES (?, ?, ?, ?, ?, ?) \
                         ON CONFLICT (tenant_id, virtual_number, pin) DO NOTHING RETURNING pin",
                        vec![
                            tenant_id.into(),
                            virtual_number.clone().into(),
                            pin.clone().into(),
                            id.clone().into(),
                            owner.clone().into(),
                            other.clone().into(),
                        ],
                    ))
                    .await?;
                if row.is_some() {
                    pins[i] = Some(pin);
                    break;
                }
            }
            if pins[i].is_none() {
                txn.rollback().await?;
                return Err(ApiError::Conflict(format!(
                    "no free PIN on {virtual_number}: raise CALLBRIDGE_MASKING_PIN_LENGTH, add \
                     numbers, or close sessions"
                )));
            }
        }
    }

    let expires_at = now + ttl * 1000;
    txn.execute_raw(stmt(
        backend,
        "INSERT INTO masking_sessions (id, tenant_id, mode, virtual_number, status, \
         closed_reason, ttl_seconds, expires_at, last_interaction_at, created_at, closed_at) \
         VALUES (?, ?, ?, ?, 'open', NULL, ?, ?, NULL, ?, NULL)",
        vec![
            id.clone().into(),
            tenant_id.into(),
            mode.clone().into(),
            virtual_number.clone().into(),
            ttl.into(),
            expires_at.into(),
            now.into(),
        ],
    ))
    .await?;
    for (i, p) in parties.iter().enumerate() {
        txn.execute_raw(stmt(
            backend,
            "INSERT INTO masking_participants (session_id, position, tenant_id, number, role, \
             crm, pin, active) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            vec![
                id.clone().into(),
                i32::try_from(i).unwrap_or(0).into(),
                tenant_id.into(),
                p.number.clone().into(),
                p.role.clone().into(),
                p.crm.clone().into(),
                pins[i].clone().into(),
                true.into(),
            ],
        ))
        .await?;
    }
    txn.commit().await?;
    get_session(db, tenant_id, &id)
        .await?
        .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("session vanished after commit")))
}

async fn participants_of(
    db: &impl ConnectionTrait,
    tenant_id: &str,
    ids: &[String],
) -> Result<HashMap<String, Vec<ParticipantView>>, DbErr> {
    let mut out: HashMap<String, Vec<ParticipantView>> = HashMap::new();
    if ids.is_empty() {
        return Ok(out);
    }
    let mut v: Vec<Value> = vec![tenant_id.into()];
    v.extend(ids.iter().cloned().map(Value::from));
    let rows = db
        .query_all_raw(stmt(
            backend_of(db),
            &format!(
                "SELECT session_id, number, role, crm, pin, active FROM masking_participants \
                 WHERE tenant_id = ? AND session_id IN ({}) ORDER BY session_id, position",
                placeholders(ids.len())
            ),
            v,
        ))
        .await?;
    for r in rows {
        let crm: Option<String> = r.try_get("", "crm")?;
        out.entry(r.try_get("", "session_id")?)
            .or_default()
            .push(ParticipantView {
                number: r.try_get("", "number")?,
                role: r.try_get("", "role")?,
                crm: crm.and_then(|c| serde_json::from_str(&c).ok()),
                pin: r.try_get("", "pin")?,
                active: r.try_get("", "active")?,
            });
    }
    Ok(out)
}

/// One session of a tenant, with its participants and PINs.
///
/// # Errors
/// Database failure.
pub async fn get_session(
    db: &impl ConnectionTrait,
    tenant_id: &str,
    id: &str,
) -> Result<Option<SessionView>, DbErr> {
    let Some(row) = db
        .query_one_raw(stmt(
            backend_of(db),
            &format!(
                "SELECT {SESSION_COLUMNS} FROM masking_sessions WHERE tenant_id = ? AND id = ?"
            ),
            vec![tenant_id.into(), id.into()],
        ))
        .await?
    else {
        return Ok(None);
    };
    let s = SessionRow::from_row(&row)?;
    let mut parts = participants_of(db, tenant_id, std::slice::from_ref(&s.id)).await?;
    let p = parts.remove(&s.id).unwrap_or_default();
    Ok(Some(s.view(p, db::now_ms())))
}

/// A page of a tenant's sessions, newest first, after `before` (a session id); `status`
/// `open` or `closed` filters (expired sessions count as closed).
///
/// # Errors
/// Database failure.
pub async fn list_sessions(
    db: &DatabaseConnection,
    tenant_id: &str,
    before: Option<&str>,
    limit: u64,
    status: Option<&str>,
) -> Result<Vec<SessionView>, DbErr> {
    let now = db::now_ms();
    let mut sql = format!("SELECT {SESSION_COLUMNS} FROM masking_sessions WHERE tenant_id = ?");
    let mut v: Vec<Value> = vec![tenant_id.into()];
    if let Some(b) = before {
        sql.push_str(" AND id < ?");
        v.push(b.into());
    }
    match status {
        Some("open") => {
            sql.push_str(" AND status = 'open' AND expires_at > ?");
            v.push(now.into());
        }
        Some("closed") => {
            sql.push_str(" AND (status = 'closed' OR expires_at <= ?)");
            v.push(now.into());
        }
        _ => {}
    }
    sql.push_str(&format!(" ORDER BY id DESC LIMIT {limit}"));
    let rows = db.query_all_raw(stmt(backend_of(db), &sql, v)).await?;
    let sessions: Vec<SessionRow> = rows
        .iter()
        .map(SessionRow::from_row)
        .collect::<Result<_, _>>()?;
    let ids: Vec<String> = sessions.iter().map(|s| s.id.clone()).collect();
    let mut parts = participants_of(db, tenant_id, &ids).await?;
    Ok(sessions
        .into_iter()
        .map(|s| {
            let p = parts.remove(&s.id).unwrap_or_default();
            s.view(p, now)
        })
        .collect())
}

/// Close a session and release its number (idempotent).
///
/// # Errors
/// 404 for an unknown id.
pub async fn close_session(
    state: &AppState,
    tenant_id: &str,
    id: &str,
) -> Result<SessionView, ApiError> {
    let db = &state.db;
    let backend = backend_of(db);
    let txn = db::begin_write(db).await?;
    let now = db::now_ms();
    expire_where(
        &txn,
        backend,
        "tenant_id = ? AND id = ?",
        vec![tenant_id.into(), id.into()],
        now,
    )
    .await?;
    let open = txn
        .query_one_raw(stmt(
            backend,
            "SELECT id FROM masking_sessions WHERE tenant_id = ? AND id = ? AND status = 'open'",
            vec![tenant_id.into(), id.into()],
        ))
        .await?;
    if open.is_some() {
        release(&txn, backend, &[id.to_owned()], "closed", now).await?;
    }
    let view = get_session(&*txn, tenant_id, id).await?;
    txn.commit().await?;
    view.ok_or_else(|| ApiError::NotFound(format!("no session {id}")))
}

/// Close, re-time or extend a session.
///
/// # Errors
/// 404 unknown id, 409 the session is closed or expired, 422 invalid values.
pub async fn update_session(
    state: &AppState,
    tenant_id: &str,
    id: &str,
    patch: SessionPatch,
) -> Result<SessionView, ApiError> {
    if let Some(s) = patch.status.as_deref() {
        if s != "closed" {
            return Err(ApiError::validation(
                "status",
                "status can only be set to closed",
            ));
        }
        return close_session(state, tenant_id, id).await;
    }
    let (set, v): (&str, i64) = match (patch.ttl_seconds, patch.extend_seconds) {
        (Some(ttl), None) => (
            "ttl_seconds = ?, expires_at = ",
            validate_ttl("ttl_seconds", ttl, &state.config)?,
        ),
        (None, Some(ext)) => ("", validate_ttl("extend_seconds", ext, &state.config)?),
        (None, None) => {
            return Err(ApiError::validation(
                "body",
                "send one of status, ttl_seconds or extend_seconds",
            ));
        }
        (Some(_), Some(_)) => {
            return Err(ApiError::validation(
                "body",
                "send ttl_seconds or extend_seconds, not both",
            ));
        }
    };
    let db = &state.db;
    let backend = backend_of(db);
    let txn = db::begin_write(db).await?;
    let now = db::now_ms();
    let (sql, values): (String, Vec<Value>) = if set.is_empty() {
        (
            "UPDATE masking_sessions SET expires_at = expires_at + ? \
             WHERE tenant_id = ? AND id = ? AND status = 'open' AND expires_at > ? RETURNING id"
                .into(),
            vec![(v * 1000).into(), tenant_id.into(), id.into(), now.into()],
        )
    } else {
        (
            format!(
                "UPDATE masking_sessions SET {set}? WHERE tenant_id = ? AND id = ? \
                 AND status = 'open' AND expires_at > ? RETURNING id"
            ),
            vec![
                v.into(),
                (now + v * 1000).into(),
                tenant_id.into(),
                id.into(),
                now.into(),
            ],
        )
    };
    let updated = txn.query_one_raw(stmt(backend, &sql, values)).await?;
    if updated.is_none() {
        expire_where(
            &txn,
            backend,
            "tenant_id = ? AND id = ?",
            vec![tenant_id.into(), id.into()],
            now,
        )
        .await?;
        let exists = get_session(&*txn, tenant_id, id).await?;
        txn.commit().await?;
        return Err(match exists {
            Some(_) => ApiError::Conflict(format!("session {id} is closed or expired")),
            None => ApiError::NotFound(format!("no session {id}")),
        });
    }
    let view = get_session(&*txn, tenant_id, id).await?;
    txn.commit().await?;
    view.ok_or_else(|| ApiError::NotFound(format!("no session {id}")))
}

/// Close every open session whose expiry has passed and release its routing keys, in batches.
/// Returns how many were closed.
///
/// # Errors
/// Database failure.
pub async fn sweep_expired(db: &DatabaseConnection) -> Result<usize, DbErr> {
    let backend = backend_of(db);
    let mut total = 0;
    loop {
        let txn = db::begin_write(db).await?;
        let now = db::now_ms();
        let ids = expire_where(
            &txn,
            backend,
            &format!(
                "id IN (SELECT id FROM masking_sessions WHERE status = 'open' \
                 AND expires_at <= ? LIMIT {SWEEP_BATCH})"
            ),
            vec![now.into()],
            now,
        )
        .await?;
        txn.commit().await?;
        total += ids.len();
        if ids.len() < SWEEP_BATCH {
            return Ok(total);
        }
    }
}

/// The background sweep: every `masking_sweep_interval_secs` until shutdown.
pub async fn run_sweeper(state: AppState, shutdown: CancellationToken) {
    let every = std::time::Duration::from_secs(state.config.masking_sweep_interval_secs.max(1));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        match sweep_expired(&state.db).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(closed = n, "expired masking sessions released"),
            Err(e) => tracing::warn!(error = %e, "masking sweep failed"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Flow webhooks
// ---------------------------------------------------------------------------------------------

/// The tenant behind a flow token, with what routing needs.
#[derive(Debug, Clone)]
pub struct FlowTenant {
    /// Tenant id.
    pub id: String,
    /// Region for reading Exotel's national numbers.
    pub region: String,
    /// Effective masking settings.
    pub settings: Settings,
}

/// Resolve a flow URL token (one indexed query on `flow_token_hash`).
///
/// # Errors
/// Database failure.
pub async fn flow_tenant(state: &AppState, token: &str) -> Result<Option<FlowTenant>, DbErr> {
    if token.len() < 16 || token.len() > 64 {
        return Ok(None);
    }
    let row = state
        .db
        .query_one_raw(stmt(
            backend_of(&state.db),
            "SELECT t.id, t.default_region, s.dial_format, s.fallback_number, \
             s.pin_caller_check, s.passthru_branch_on_unanswered FROM tenants t \
             LEFT JOIN masking_settings s ON s.tenant_id = t.id WHERE t.flow_token_hash = ?",
            vec![crypto::token_hash(token).into()],
        ))
        .await?;
    let Some(row) = row else { return Ok(None) };
    Ok(Some(FlowTenant {
        id: row.try_get("", "id")?,
        region: row.try_get("", "default_region")?,
        settings: Overrides::from_row(&row)?.effective(&state.config),
    }))
}

/// Exotel's flow query string, names matched case-insensitively.
#[derive(Debug, Clone, Default)]
pub struct FlowParams {
    pairs: Vec<(String, String)>,
}

impl FlowParams {
    /// Parse a raw query string (`%5B`/`%5D` and `+` decoded).
    #[must_use]
    pub fn parse(query: Option<&str>) -> Self {
        Self {
            pairs: query
                .map(|q| {
                    url::form_urlencoded::parse(q.as_bytes())
                        .into_owned()
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// A field's value: trimmed, `""` and `null` read as absent.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == name)
            .or_else(|| {
                self.pairs
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(name))
            })
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty() && !v.eq_ignore_ascii_case("null"))
    }

    /// The first of several names that is present.
    #[must_use]
    pub fn first(&self, names: &[&str]) -> Option<&str> {
        names.iter().find_map(|n| self.get(n))
    }

    /// The DTMF digits, with Exotel's double quotes, spaces and a trailing `#` removed.
    #[must_use]
    pub fn digits(&self) -> Option<String> {
        clean_digits(self.get("digits")?)
    }
}

/// `"568"` → `568`; `null`, empty or non-digits → `None`.
#[must_use]
pub fn clean_digits(raw: &str) -> Option<String> {
    let s: String = raw
        .trim()
        .trim_matches(|c: char| c == '"' || c == '\'' || c.is_whitespace())
        .trim_end_matches('#')
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    if s.is_empty() || s.len() > 16 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(s)
}

/// How dial-whom found the number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// The PIN entered.
    Pin,
    /// The caller's allocation on the virtual number.
    Caller,
    /// The agent who last click-to-called the caller from this number.
    Reverse,
    /// The tenant's fallback number.
    Fallback,
}

/// Dial-whom's decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// E.164.
    pub number: String,
    /// Which rule matched.
    pub via: Via,
    /// The session routed through, for PIN and caller matches.
    pub session_id: Option<String>,
}

/// Decide whom to dial for an incoming flow call; `None` means "nobody" (empty body).
/// Each rule is one indexed query; a match in a session slides its TTL.
///
/// # Errors
/// Database failure.
pub async fn dial_whom(
    state: &AppState,
    t: &FlowTenant,
    q: &FlowParams,
) -> Result<Option<Route>, DbErr> {
    let db = &state.db;
    let backend = backend_of(db);
    let now = db::now_ms();
    let norm = |v: Option<&str>| v.and_then(|n| phone::to_e164(n, &t.region).ok());
    let caller = norm(q.first(&["CallFrom", "From"]));
    let virtual_number = norm(q.first(&["CallTo", "To"]));
    let mut route = None;

    if let (Some(vn), Some(pin)) = (&virtual_number, q.digits()) {
        let row = db
            .query_one_raw(stmt(
                backend,
                "SELECT p.session_id, p.owner, p.counterpart FROM masking_pins p \
                 JOIN masking_sessions s ON s.id = p.session_id \
                 WHERE p.tenant_id = ? AND p.virtual_number = ? AND p.pin = ? \
                 AND s.status = 'open' AND s.expires_at > ?",
                vec![
                    t.id.clone().into(),
                    vn.clone().into(),
                    pin.into(),
                    now.into(),
                ],
            ))
            .await?;
        if let Some(row) = row {
            let owner: String = row.try_get("", "owner")?;
            if !t.settings.pin_caller_check || caller.as_deref() == Some(owner.as_str()) {
                route = Some(Route {
                    number: row.try_get("", "counterpart")?,
                    via: Via::Pin,
                    session_id: Some(row.try_get("", "session_id")?),
                });
            }
        }
    }
    if route.is_none()
        && let (Some(from), Some(vn)) = (&caller, &virtual_number)
    {
        let row = db
            .query_one_raw(stmt(
                backend,
                "SELECT a.session_id, a.counterpart FROM masking_allocations a \
                 JOIN masking_sessions s ON s.id = a.session_id \
                 WHERE a.tenant_id = ? AND a.number = ? AND a.virtual_number = ? \
                 AND s.status = 'open' AND s.expires_at > ?",
                vec![
                    t.id.clone().into(),
                    from.clone().into(),
                    vn.clone().into(),
                    now.into(),
                ],
            ))
            .await?;
        if let Some(row) = row {
            route = Some(Route {
                number: row.try_get("", "counterpart")?,
                via: Via::Caller,
                session_id: Some(row.try_get("", "session_id")?),
            });
        }
    }
    if route.is_none()
        && state.config.masking_reverse_window_secs > 0
        && let (Some(from), Some(vn)) = (&caller, &virtual_number)
    {
        let since = now
            - i64::try_from(state.config.masking_reverse_window_secs)
                .unwrap_or(i64::MAX / 2000)
                .saturating_mul(1000);
        // Calls Exotel never accepted (no CallSid) never rang the customer.
        let row = db
            .query_one_raw(stmt(
                backend,
                "SELECT from_number FROM calls WHERE tenant_id = ? AND to_number = ? \
                 AND caller_id = ? AND created_at >= ? AND direction = 'outbound' \
                 AND exotel_call_sid IS NOT NULL ORDER BY created_at DESC LIMIT 1",
                vec![
                    t.id.clone().into(),
                    from.clone().into(),
                    vn.clone().into(),
                    since.into(),
                ],
            ))
            .await?;
        if let Some(row) = row {
            route = Some(Route {
                number: row.try_get("", "from_number")?,
                via: Via::Reverse,
                session_id: None,
            });
        }
    }
    if let Some(Route {
        session_id: Some(sid),
        ..
    }) = &route
    {
        // Recorded off the answer path: Exotel is waiting on the line.
        state.slides.slide(sid);
    }
    if route.is_none()
        && let Some(f) = &t.settings.fallback_number
    {
        route = Some(Route {
            number: f.clone(),
            via: Via::Fallback,
            session_id: None,
        });
    }
    Ok(route)
}

/// The number as dial-whom writes it.
#[must_use]
pub fn format_for_dial(e164: &str, format: &str) -> String {
    if format == "e164" {
        e164.to_owned()
    } else {
        phone::to_national_dialing(e164)
    }
}

/// What a Passthru did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassthruOutcome {
    /// Our call id.
    pub call_id: String,
    /// The status stored (non-final for `call-attempt`).
    pub status: String,
    /// Whether this request changed anything (false for a repeat).
    pub changed: bool,
    /// The HTTP status to answer (sync Passthru branch).
    pub branch: u16,
}

/// Why a Passthru request was refused.
#[derive(Debug, thiserror::Error)]
pub enum PassthruError {
    /// Unusable query string (400).
    #[error("{0}")]
    Malformed(String),
    /// Database failure.
    #[error(transparent)]
    Db(#[from] DbErr),
}

/// The final status of a flow call from Passthru's `CallType` and `DialCallStatus`; `None`
/// while the call is still in the flow (`call-attempt`).
#[must_use]
pub fn passthru_status(call_type: Option<&str>, dial_status: Option<&str>) -> Option<&'static str> {
    let call_type = call_type.map(str::to_ascii_lowercase);
    let dial = dial_status.map(str::to_ascii_lowercase);
    let unanswered = |default: &'static str| match dial.as_deref() {
        Some("busy") => "busy",
        Some("failed") => "failed",
        Some("canceled" | "cancelled") => "canceled",
        Some("no-answer") => "no-answer",
        _ => default,
    };
    match call_type.as_deref() {
        Some("completed") => Some("completed"),
        Some("client-hangup") => Some(unanswered("canceled")),
        Some("incomplete" | "voicemail") => Some(unanswered("no-answer")),
        _ => None,
    }
}

fn leg_status(cause_code: Option<&str>, fallback: &str) -> String {
    match cause_code.map(str::to_ascii_uppercase).as_deref() {
        Some("NORMAL_CLEARING") => "completed".into(),
        Some("RING_TIMEOUT" | "NO_ANSWER" | "NO_USER_RESPONSE") => "no-answer".into(),
        Some("USER_BUSY") => "busy".into(),
        Some("ORIGINATOR_CANCEL") => "canceled".into(),
        _ => fallback.to_owned(),
    }
}

fn json_text(map: &Map<String, Json>, name: &str) -> Option<String> {
    let v = map.get(name).or_else(|| {
        map.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    })?;
    match v {
        Json::String(s) => {
            let s = s.trim();
            (!s.is_empty() && !s.eq_ignore_ascii_case("null")).then(|| s.to_owned())
        }
        Json::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn json_int(map: &Map<String, Json>, name: &str) -> Option<i64> {
    json_text(map, name)
        .and_then(|s| s.parse::<i64>().ok())
        .filter(|n| (0..=10_000_000).contains(n))
}

/// Store the flow call a Passthru describes (direction `inbound`, idempotent on CallSid) and,
/// once final, enqueue its delivery through the same outbox as outbound calls.
///
/// # Errors
/// [`PassthruError::Malformed`] without a usable CallSid; database failure.
pub async fn record_passthru(
    state: &AppState,
    t: &FlowTenant,
    query: Option<&str>,
) -> Result<PassthruOutcome, PassthruError> {
    let pairs: Vec<(String, String)> = query
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let raw = pairs_to_json(&pairs).map_err(|e| PassthruError::Malformed(e.to_string()))?;
    let Json::Object(map) = &raw else {
        return Err(PassthruError::Malformed("not a query string".into()));
    };
    let call_sid = json_text(map, "CallSid")
        .ok_or_else(|| PassthruError::Malformed("CallSid is missing".into()))?;
    if call_sid.len() > 64
        || !call_sid
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(PassthruError::Malformed(
            "CallSid must be up to 64 letters and digits".into(),
        ));
    }
    // Exotel masks or mangles numbers at times; keep what it sent when it does not parse.
    let number = |v: Option<String>| v.map(|n| phone::to_e164(&n, &t.region).unwrap_or(n));
    let from =
        number(json_text(map, "CallFrom").or_else(|| json_text(map, "From"))).unwrap_or_default();
    let virtual_number = number(json_text(map, "CallTo").or_else(|| json_text(map, "To")));
    let dial_status = json_text(map, "DialCallStatus");
    let final_status = passthru_status(
        json_text(map, "CallType").as_deref(),
        dial_status.as_deref(),
    );
    let status = final_status.unwrap_or("in-progress");

    // Exotel reports the dialled legs; index 0 is the caller's own leg (see calls::party_of),
    // so Exotel's Legs[i] is stored as leg i + 1.
    let mut legs: Vec<Leg> = Vec::new();
    if let Some(Json::Array(items)) = map.get("Legs") {
        for (i, item) in items.iter().enumerate() {
            let Json::Object(l) = item else { continue };
            let cause_code = json_text(l, "CauseCode");
            legs.push(Leg {
                index: i + 1,
                number: number(json_text(l, "Number")),
                status: Some(leg_status(
                    cause_code.as_deref(),
                    dial_status
                        .as_deref()
                        .map(str::to_ascii_lowercase)
                        .as_deref()
                        .unwrap_or(status),
                )),
                on_call_duration: json_int(l, "OnCallDuration"),
                cause: cause_code.or_else(|| json_text(l, "Cause")),
            });
        }
    }
    // The agent dialled: the first of DialWhomNumber and the legs' numbers that parses.
    let dialled = json_text(map, "DialWhomNumber");
    let to = dialled
        .iter()
        .chain(legs.iter().filter_map(|l| l.number.as_ref()))
        .find_map(|n| phone::to_e164(n, &t.region).ok())
        .or(dialled)
        .unwrap_or_default();
    let conversation = legs
        .iter()
        .filter_map(|l| l.on_call_duration)
        .max()
        .or_else(|| json_int(map, "DialCallDuration"))
        .unwrap_or(0);
    let conversation = if status == "completed" {
        conversation
    } else {
        0
    };
    let recording_url = json_text(map, "RecordingUrl");
    let offset = state.exotel_offset;
    let time = |name: &str| {
        json_text(map, name)
            .and_then(|s| parse_time(&s, offset))
            .map(|d| d.timestamp_millis())
    };
    let started_at = time("StartTime");
    let ended_at = if final_status.is_some() {
        time("EndTime").or_else(|| time("CurrentTime"))
    } else {
        None
    };
    let legs_json =
        (!legs.is_empty()).then(|| serde_json::to_string(&legs).unwrap_or_else(|_| "[]".into()));
    let raw_text = raw.to_string();

    let db = &state.db;
    let backend = backend_of(db);
    let now = db::now_ms();
    let finalized = final_status.map(|_| now);
    let call_id = format!("call_{}", uuid::Uuid::now_v7().simple());
    let txn = db::begin_write(db).await?;
    let inserted = txn
        .query_one_raw(stmt(
            backend,
            "INSERT INTO calls (id, tenant_id, token_hash, direction, from_number, to_number, \
             caller_id, custom_field, record, exotel_call_sid, status, error, started_at, \
             ended_at, finalized_at, final_source, conversation_duration, recording_url, legs, \
             final_payload, created_at, updated_at) \
             VALUES (?, ?, ?, 'inbound', ?, ?, ?, NULL, ?, ?, ?, NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?, \
             ?) ON CONFLICT (tenant_id, exotel_call_sid) DO NOTHING RETURNING id",
            vec![
                call_id.clone().into(),
                t.id.clone().into(),
                // Exotel gets no per-call URL for flow calls; the column still wants a secret.
                crypto::token_hash(&crypto::random_token("", 24)).into(),
                from.clone().into(),
                to.clone().into(),
                virtual_number.clone().into(),
                recording_url.is_some().into(),
                call_sid.clone().into(),
                status.into(),
                started_at.into(),
                ended_at.into(),
                finalized.into(),
                final_status.map(|_| "passthru").into(),
                i32::try_from(conversation).unwrap_or(i32::MAX).into(),
                recording_url.clone().into(),
                legs_json.clone().into(),
                raw_text.clone().into(),
                now.into(),
                now.into(),
            ],
        ))
        .await?;
    let (id, changed, finished) = if let Some(row) = inserted {
        (
            row.try_get::<String>("", "id")?,
            true,
            final_status.is_some(),
        )
    } else if final_status.is_some() {
        // A call-attempt Passthru stored the call earlier; this one finalises it once.
        let row = txn
            .query_one_raw(stmt(
                backend,
                "UPDATE calls SET status = ?, from_number = ?, to_number = ?, \
                 caller_id = COALESCE(?, caller_id), record = ?, \
                 started_at = COALESCE(?, started_at), ended_at = ?, finalized_at = ?, \
                 final_source = 'passthru', conversation_duration = ?, recording_url = ?, \
                 legs = COALESCE(?, legs), final_payload = ?, updated_at = ? \
                 WHERE tenant_id = ? AND exotel_call_sid = ? AND direction = 'inbound' \
                 AND finalized_at IS NULL RETURNING id",
                vec![
                    status.into(),
                    from.clone().into(),
                    to.clone().into(),
                    virtual_number.clone().into(),
                    recording_url.is_some().into(),
                    started_at.into(),
                    ended_at.into(),
                    now.into(),
                    i32::try_from(conversation).unwrap_or(i32::MAX).into(),
                    recording_url.clone().into(),
                    legs_json.into(),
                    raw_text.into(),
                    now.into(),
                    t.id.clone().into(),
                    call_sid.clone().into(),
                ],
            ))
            .await?;
        match row {
            Some(r) => (r.try_get::<String>("", "id")?, true, true),
            None => (
                existing_id(&txn, backend, &t.id, &call_sid).await?,
                false,
                false,
            ),
        }
    } else {
        (
            existing_id(&txn, backend, &t.id, &call_sid).await?,
            false,
            false,
        )
    };
    if finished {
        // The agent who took the call: write it back to their CRM like an outbound call.
        crate::crm::link_to_agent_crm(&*txn, &id, &t.id, &to).await?;
    }
    let enqueued = if finished {
        crate::ingest::after_finalize(
            &txn,
            backend,
            std::slice::from_ref(&id),
            now,
            state.config.job_max_attempts,
        )
        .await?
    } else {
        false
    };
    txn.commit().await?;
    if enqueued {
        state.jobs_ready.notify_one();
    }
    let branch = match final_status {
        Some(s) if s != "completed" => t.settings.passthru_branch_on_unanswered,
        _ => 200,
    };
    Ok(PassthruOutcome {
        call_id: id,
        status: status.to_owned(),
        changed,
        branch,
    })
}

async fn existing_id(
    txn: &DatabaseTransaction,
    backend: DbBackend,
    tenant_id: &str,
    call_sid: &str,
) -> Result<String, DbErr> {
    let row = txn
        .query_one_raw(stmt(
            backend,
            "SELECT id FROM calls WHERE tenant_id = ? AND exotel_call_sid = ?",
            vec![tenant_id.into(), call_sid.into()],
        ))
        .await?;
    match row {
        Some(r) => r.try_get("", "id"),
        None => Err(DbErr::RecordNotFound(format!(
            "call with CallSid {call_sid}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_tolerate_quotes_spaces_and_null() {
        assert_eq!(clean_digits("\"568\"").as_deref(), Some("568"));
        assert_eq!(clean_digits(" 568 ").as_deref(), Some("568"));
        assert_eq!(clean_digits("\" 5 6 8 \"").as_deref(), Some("568"));
        assert_eq!(clean_digits("568#").as_deref(), Some("568"));
        assert_eq!(clean_digits("0042").as_deref(), Some("0042"));
        assert_eq!(clean_digits("\"\""), None);
        assert_eq!(clean_digits("abc"), None);
        let q = FlowParams::parse(Some("digits=null&CallFrom=1"));
        assert_eq!(q.digits(), None);
        let q = FlowParams::parse(Some("Digits=%22568%22&callfrom=1"));
        assert_eq!(q.digits().as_deref(), Some("568"));
        assert_eq!(q.get("CallFrom"), Some("1"));
    }

    #[test]
    fn passthru_statuses() {
        assert_eq!(
            passthru_status(Some("completed"), Some("completed")),
            Some("completed")
        );
        assert_eq!(
            passthru_status(Some("client-hangup"), Some("canceled")),
            Some("canceled")
        );
        assert_eq!(
            passthru_status(Some("client-hangup"), None),
            Some("canceled")
        );
        assert_eq!(
            passthru_status(Some("incomplete"), Some("no-answer")),
            Some("no-answer")
        );
        assert_eq!(
            passthru_status(Some("incomplete"), Some("busy")),
            Some("busy")
        );
        assert_eq!(passthru_status(Some("incomplete"), None), Some("no-answer"));
        assert_eq!(passthru_status(Some("call-attempt"), None), None);
        assert_eq!(passthru_status(None, None), None);
    }

    #[test]
    fn the_guides_numbers_read_in_india() {
        assert_eq!(
            phone::to_e164("07709562799", "IN").unwrap(),
            "+917709562799"
        );
        assert_eq!(
            phone::to_e164("07314853246", "IN").unwrap(),
            "+917314853246"
        );
        assert_eq!(
            phone::to_e164("07995679243", "IN").unwrap(),
            "+917995679243"
        );
        assert_eq!(format_for_dial("+917995679243", "national"), "07995679243");
        assert_eq!(format_for_dial("+917995679243", "e164"), "+917995679243");
    }
}

/// Records the TTL slides of routed calls in the background, many per statement, so a
/// dial-whom answer never waits on a write (on SQLite, concurrent writers would otherwise queue
/// on the database lock while Exotel holds the line). A slide is written on a session's first
/// routed call and then only when it moves the expiry by more than a tenth of the TTL (at most
/// a minute); a session that expired meanwhile is never revived. Slides still queued when the process stops are lost: the session then expires
/// up to that much earlier.
#[derive(Clone, Debug)]
pub struct Slides {
    tx: tokio::sync::mpsc::Sender<String>,
}

impl Slides {
    /// Start the recorder on `db`.
    #[must_use]
    pub fn start(db: DatabaseConnection) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(8192);
        tokio::spawn(async move {
            let mut ids = Vec::with_capacity(512);
            while rx.recv_many(&mut ids, 512).await > 0 {
                ids.sort_unstable();
                ids.dedup();
                if let Err(e) = record_slides(&db, &ids, db::now_ms()).await {
                    tracing::warn!(error = %e, sessions = ids.len(), "could not record session TTL slides");
                }
                ids.clear();
            }
        });
        Self { tx }
    }

    /// Queue a slide of session `id` (dropped, with a log line, if the queue is full).
    pub fn slide(&self, id: &str) {
        if self.tx.try_send(id.to_owned()).is_err() {
            tracing::debug!(session = %id, "slide queue full; slide dropped");
        }
    }
}

async fn record_slides(db: &DatabaseConnection, ids: &[String], now: i64) -> Result<(), DbErr> {
    let backend = backend_of(db);
    let json = serde_json::to_string(ids).unwrap_or_else(|_| "[]".into());
    db::execute_write(
        db,
        stmt(
            backend,
            &format!(
                "UPDATE masking_sessions SET expires_at = ? + ttl_seconds * 1000, \
             last_interaction_at = ? WHERE id IN ({}) AND status = 'open' AND expires_at > ? \
             AND (last_interaction_at IS NULL OR expires_at < ? + ttl_seconds * 1000 - \
             CASE WHEN ttl_seconds * 100 < 60000 THEN ttl_seconds * 100 ELSE 60000 END)",
                db::json_ids_subquery(backend)
            ),
            vec![now.into(), now.into(), json.into(), now.into(), now.into()],
        ),
    )
    .await?;
    Ok(())
}
