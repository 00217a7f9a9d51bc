//! `/admin/calls`: the tenant's calls, newest first, filterable by status, direction, a number
//! and a date range (days in the display offset), paged by id (UUIDv7, so id order is creation
//! order); and `/admin/calls/{id}`: one call's timeline — our request to Exotel and its result,
//! the final callback with its raw payload, the legs, the recording, and every write-back
//! attempt per target.

use askama::Template;
use axum::{
    extract::{Path, Query, State, rejection::QueryRejection},
    response::IntoResponse,
};
use chrono::{NaiveDate, TimeZone};
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
};
use serde::Deserialize;

use super::{AdminError, AdminSession, Chrome, HtmlTemplate, fmt_ms, fmt_opt_ms};
use crate::{
    AppState,
    calls::{self as call_repo},
    db::stmt,
    entities::{call, job},
};

/// Page size of the list.
const PAGE: u64 = 50;

/// Statuses a call can have (ours and Exotel's).
pub const STATUSES: &[&str] = &[
    "initiating",
    "queued",
    "ringing",
    "in-progress",
    "completed",
    "busy",
    "no-answer",
    "failed",
    "canceled",
    "unknown",
];

/// The list's query string.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(super) struct Filter {
    status: String,
    direction: String,
    number: String,
    from: String,
    to: String,
    before: String,
}

impl Filter {
    fn query_string(&self, before: Option<&str>) -> String {
        let mut s = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in [
            ("status", &self.status),
            ("direction", &self.direction),
            ("number", &self.number),
            ("from", &self.from),
            ("to", &self.to),
        ] {
            if !v.is_empty() {
                s.append_pair(k, v);
            }
        }
        if let Some(b) = before {
            s.append_pair("before", b);
        }
        s.finish()
    }
}

/// One row of the list.
pub(super) struct Row {
    id: String,
    created: String,
    direction: String,
    from: String,
    to: String,
    status: String,
    duration: String,
    writeback: String,
}

#[derive(Template)]
#[template(path = "admin/calls.html")]
struct CallsPage {
    chrome: Chrome,
    filter: Filter,
    /// `(status, selected)`.
    statuses: Vec<(&'static str, bool)>,
    rows: Vec<Row>,
    errors: Vec<String>,
    next_query: Option<String>,
    first_query: Option<String>,
}

fn day_start(
    errors: &mut Vec<String>,
    what: &str,
    v: &str,
    offset: chrono::FixedOffset,
    add_days: i64,
) -> Option<i64> {
    let v = v.trim();
    if v.is_empty() {
        return None;
    }
    match NaiveDate::parse_from_str(v, "%Y-%m-%d") {
        Ok(d) => {
            let d = d + chrono::Days::new(u64::try_from(add_days).unwrap_or(0));
            offset
                .from_local_datetime(&d.and_hms_opt(0, 0, 0).unwrap_or_default())
                .single()
                .map(|t| t.timestamp_millis())
        }
        Err(_) => {
            errors.push(format!("{what} must be a date like 2026-11-26"));
            None
        }
    }
}

pub(super) async fn list(
    State(state): State<AppState>,
    session: AdminSession,
    q: Result<Query<Filter>, QueryRejection>,
) -> Result<impl IntoResponse, AdminError> {
    let Query(filter) = q.map_err(|e| AdminError::BadRequest(e.body_text()))?;
    let mut errors = Vec::new();
    let mut query =
        call::Entity::find().filter(call::Column::TenantId.eq(session.tenant_id.as_str()));
    if !filter.status.is_empty() {
        if STATUSES.contains(&filter.status.as_str()) {
            query = query.filter(call::Column::Status.eq(filter.status.as_str()));
        } else {
            errors.push(format!("Unknown status {:?}", filter.status));
        }
    }
    match filter.direction.as_str() {
        "" => {}
        "inbound" | "outbound" => {
            query = query.filter(call::Column::Direction.eq(filter.direction.as_str()));
        }
        other => errors.push(format!("Unknown direction {other:?}")),
    }
    // Numbers are stored in E.164; match on digits so "98123", "+9198123" and "098123" work,
    // and no LIKE wildcard can come from the input.
    let digits: String = filter
        .number
        .chars()
        .filter(char::is_ascii_digit)
        .collect::<String>()
        .trim_start_matches('0')
        .to_owned();
    if !digits.is_empty() {
        let pattern = format!("%{digits}%");
        query = query.filter(
            Condition::any()
                .add(call::Column::FromNumber.like(pattern.as_str()))
                .add(call::Column::ToNumber.like(pattern.as_str()))
                .add(call::Column::CallerId.like(pattern.as_str())),
        );
    } else if !filter.number.trim().is_empty() {
        errors.push("Number must contain digits".to_owned());
    }
    let offset = state.exotel_offset;
    if let Some(from) = day_start(&mut errors, "From date", &filter.from, offset, 0) {
        query = query.filter(call::Column::CreatedAt.gte(from));
    }
    if let Some(to) = day_start(&mut errors, "To date", &filter.to, offset, 1) {
        query = query.filter(call::Column::CreatedAt.lt(to));
    }
    if !filter.before.is_empty() {
        query = query.filter(call::Column::Id.lt(filter.before.as_str()));
    }
    let mut calls = if errors.is_empty() {
        query
            .order_by_desc(call::Column::Id)
            .limit(PAGE + 1)
            .all(&state.db)
            .await?
    } else {
        Vec::new()
    };
    let more = calls.len() as u64 > PAGE;
    calls.truncate(usize::try_from(PAGE).unwrap_or(50));
    let ids: Vec<String> = calls.iter().map(|c| c.id.clone()).collect();
    let jobs = if ids.is_empty() {
        Vec::new()
    } else {
        job::Entity::find()
            .filter(job::Column::TenantId.eq(session.tenant_id.as_str()))
            .filter(job::Column::CallId.is_in(ids))
            .all(&state.db)
            .await?
    };
    let rows = calls
        .iter()
        .map(|c| {
            let mine: Vec<job::Model> = jobs
                .iter()
                .filter(|j| j.call_id.as_deref() == Some(c.id.as_str()))
                .cloned()
                .collect();
            let v = call_repo::view(c, &mine);
            Row {
                id: c.id.clone(),
                created: fmt_ms(c.created_at, offset),
                direction: c.direction.clone(),
                from: c.from_number.clone(),
                to: c.to_number.clone(),
                status: c.status.clone(),
                duration: c
                    .conversation_duration
                    .map_or_else(String::new, |d| format!("{d} s")),
                writeback: v.writeback.state,
            }
        })
        .collect();
    let next_query = more
        .then(|| calls.last().map(|c| filter.query_string(Some(&c.id))))
        .flatten();
    let first_query = (!filter.before.is_empty()).then(|| filter.query_string(None));
    Ok(HtmlTemplate(CallsPage {
        chrome: Chrome::new(&state, &session, "calls"),
        statuses: STATUSES.iter().map(|s| (*s, filter.status == *s)).collect(),
        rows,
        errors,
        next_query,
        first_query,
        filter,
    }))
}

/// One leg on the timeline.
pub(super) struct LegRow {
    party: String,
    status: String,
    duration: String,
}

/// One write-back attempt.
pub(super) struct AttemptRow {
    at: String,
    attempt: i32,
    http_status: String,
    outcome: String,
    error: String,
    took_ms: i32,
}

/// One write-back target (a job) with its attempts.
pub(super) struct TargetRow {
    target: String,
    kind: String,
    state: String,
    attempts: i32,
    max_attempts: i32,
    next_run: String,
    last_error: String,
    rows: Vec<AttemptRow>,
}

#[derive(Template)]
#[template(path = "admin/call.html")]
struct CallPage {
    chrome: Chrome,
    c: call::Model,
    created: String,
    started: String,
    ended: String,
    finalized: String,
    payload: Option<String>,
    legs: Vec<LegRow>,
    targets: Vec<TargetRow>,
    /// `(connector, CRM log id, recording uploaded)` for each CRM log written.
    crm_logs: Vec<(String, String, bool)>,
}

fn pretty(raw: &str) -> String {
    serde_json::from_str::<serde_json::Value>(raw)
        .and_then(|v| serde_json::to_string_pretty(&v))
        .unwrap_or_else(|_| raw.to_owned())
}

pub(super) async fn timeline(
    State(state): State<AppState>,
    session: AdminSession,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, AdminError> {
    let (c, jobs) = call_repo::find(&state.db, &session.tenant_id, &id)
        .await?
        .ok_or_else(|| AdminError::NotFound(format!("No call {id} in this account.")))?;
    let offset = state.exotel_offset;
    let backend = state.db.get_database_backend();
    let attempts = state
        .db
        .query_all_raw(stmt(
            backend,
            "SELECT a.job_id, a.attempt, a.started_at, a.duration_ms, a.http_status, a.outcome, \
             a.error FROM job_attempts a JOIN jobs j ON j.id = a.job_id \
             WHERE j.tenant_id = ? AND j.call_id = ? ORDER BY a.started_at, a.id",
            vec![session.tenant_id.clone().into(), c.id.clone().into()],
        ))
        .await?;
    let mut targets: Vec<TargetRow> = jobs
        .iter()
        .map(|j| TargetRow {
            target: j.target.clone(),
            kind: j.kind.clone(),
            state: j.state.clone(),
            attempts: j.attempts,
            max_attempts: j.max_attempts,
            next_run: if j.state == "queued" {
                fmt_ms(j.run_at, offset)
            } else {
                String::new()
            },
            last_error: j.last_error.clone().unwrap_or_default(),
            rows: Vec::new(),
        })
        .collect();
    for r in attempts {
        let job_id: i64 = r.try_get("", "job_id")?;
        let Some(pos) = jobs.iter().position(|j| j.id == job_id) else {
            continue;
        };
        let status: Option<i32> = r.try_get("", "http_status")?;
        let error: Option<String> = r.try_get("", "error")?;
        targets[pos].rows.push(AttemptRow {
            at: fmt_ms(r.try_get("", "started_at")?, offset),
            attempt: r.try_get("", "attempt")?,
            http_status: status.map_or_else(|| "—".to_owned(), |s| s.to_string()),
            outcome: r.try_get("", "outcome")?,
            error: error.unwrap_or_default(),
            took_ms: r.try_get("", "duration_ms")?,
        });
    }
    let crm_logs = crate::crm::writeback::logs_for_call(&state.db, &session.tenant_id, &c.id)
        .await?
        .into_iter()
        .map(|(_, connector, log, uploaded)| (crate::crm::display_name(&connector), log, uploaded))
        .collect();
    let view = call_repo::view(&c, &jobs);
    let legs = view
        .legs
        .iter()
        .map(|l| LegRow {
            party: serde_json::to_value(l.party)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            status: l.status.clone().unwrap_or_else(|| "—".into()),
            duration: l
                .on_call_duration
                .map_or_else(|| "—".to_owned(), |d| format!("{d} s")),
        })
        .collect();
    Ok(HtmlTemplate(CallPage {
        chrome: Chrome::new(&state, &session, "calls"),
        created: fmt_ms(c.created_at, offset),
        started: fmt_opt_ms(c.started_at, offset),
        ended: fmt_opt_ms(c.ended_at, offset),
        finalized: fmt_opt_ms(c.finalized_at, offset),
        payload: c.final_payload.as_deref().map(pretty),
        legs,
        targets,
        crm_logs,
        c,
    }))
}
