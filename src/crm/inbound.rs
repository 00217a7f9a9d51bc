//! Clicks from inside a CRM.
//!
//! - `GET /crm/{connector}/panel`: the page a CRM shows in its calling surface (Pipedrive's
//!   custom floating window). It loads the CRM's SDK, and on a click posts the CRM's signed
//!   token and the click context to:
//! - `POST /crm/{connector}/click`: the connector verifies the token (signature, expiry, the CRM
//!   account and user) and turns the context into a number and a record; callbridge finds the
//!   installation by CRM account, the agent by CRM user, and places the masked call with the
//!   CRM record attached so the write-back lands on it. Answers `201` with the call and a
//!   `status_url` the panel polls.
//! - `GET /crm/calls/status?t=…`: the call's progress. `t` is the call id and an expiry sealed
//!   with the master key (AEAD), so it cannot be forged or pointed at another call.
//!
//! Errors are JSON (`ApiError`): 401 bad token, 400 bad context, 404 account not connected,
//! 409 install needs a reconnect, 422 CRM user not mapped to a phone.

use askama::Template;
use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, Query, RawQuery, State},
    http::{HeaderMap, Method, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use callbridge_connector::{ClickError, InboundRequest};
use sea_orm::{ConnectionTrait, EntityTrait};
use serde::{Deserialize, Serialize};

use super::installations;
use crate::{
    AppState,
    admin::HtmlTemplate,
    calls::{self, CrmLink, PlaceCall, Placed},
    db::{self, stmt},
    entities::{call, tenant},
    error::ApiError,
};

/// How long a panel may poll a call's status.
const STATUS_TTL_MS: i64 = 2 * 3600 * 1000;

/// The click routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/crm/{connector}/panel", get(panel))
        .route("/crm/{connector}/click", post(click))
        .route("/crm/calls/status", get(status))
}

#[derive(Template)]
#[template(path = "crm/panel.html")]
struct PanelPage {
    connector: String,
    display: String,
    sdk_url: &'static str,
}

/// The SDK each CRM's panel loads. [U] Pipedrive publishes `@pipedrive/app-extensions-sdk`
/// on npm; this is its UMD build on a public CDN.
fn sdk_url(connector: &str) -> Option<&'static str> {
    match connector {
        "pipedrive" => {
            Some("https://cdn.jsdelivr.net/npm/@pipedrive/app-extensions-sdk@0/dist/index.umd.js")
        }
        _ => None,
    }
}

async fn panel(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    let (Some(_), Some(sdk)) = (state.connectors.get(&name), sdk_url(&name)) else {
        return (StatusCode::NOT_FOUND, "no CRM panel here").into_response();
    };
    HtmlTemplate(PanelPage {
        display: super::display_name(&name),
        connector: name,
        sdk_url: sdk,
    })
    .into_response()
}

/// What a click answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct ClickAnswer {
    /// The call.
    pub call: calls::CallView,
    /// Poll this for progress.
    pub status_url: String,
    /// Whether this was a repeated click answered with the earlier call.
    pub debounced: bool,
}

async fn click(
    State(state): State<AppState>,
    Path(name): Path<String>,
    method: Method,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Result<Response, ApiError> {
    let connector =
        state.connectors.get(&name).cloned().ok_or_else(|| {
            ApiError::NotFound(format!("no connector called {name:?} is enabled"))
        })?;
    let request = InboundRequest {
        method,
        headers,
        query,
        body,
    };
    let verified = connector
        .verify_click(None, &request, chrono::Utc::now())
        .map_err(|e| match e {
            ClickError::Unauthorized(m) => {
                tracing::warn!(connector = %name, reason = %m, "click refused");
                ApiError::Unauthorized(format!("the CRM token was not accepted: {m}"))
            }
            ClickError::Malformed(m) => ApiError::BadRequest(m),
            ClickError::Unsupported => {
                ApiError::NotFound(format!("{name} does not send clicks to callbridge"))
            }
        })?;
    tracing::info!(connector = %name, keys = ?verified.context_keys, "click context received");
    let account = verified
        .account_id
        .ok_or_else(|| ApiError::BadRequest("the click does not name the CRM account".into()))?;
    let inst = installations::by_account(&state.db, &name, &account)
        .await?
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "this {} account is not connected to callbridge; an admin installs it on the \
                 Connectors page",
                super::display_name(&name)
            ))
        })?;
    if !inst.is_active() {
        return Err(ApiError::Conflict(format!(
            "the {} connection needs a reconnect by an admin",
            super::display_name(&name)
        )));
    }
    let t = tenant::Entity::find_by_id(inst.tenant_id.clone())
        .one(&state.db)
        .await?
        .ok_or_else(|| ApiError::NotFound("tenant not found".into()))?;
    let dial = verified.dial;
    let agent = state
        .db
        .query_one_raw(stmt(
            state.db.get_database_backend(),
            "SELECT a.phone FROM agent_crm_users m JOIN agents a ON a.id = m.agent_id \
             AND a.tenant_id = m.tenant_id WHERE m.tenant_id = ? AND m.connector = ? \
             AND m.crm_user_id = ?",
            vec![
                t.id.clone().into(),
                name.clone().into(),
                dial.crm_user_id.clone().into(),
            ],
        ))
        .await?;
    let Some(agent) = agent else {
        return Err(ApiError::validation(
            "crm_user_id",
            format!(
                "your {} user ({}) is not mapped to a phone in callbridge; ask an admin to map \
                 it on the Agents page",
                super::display_name(&name),
                dial.crm_user_id
            ),
        ));
    };
    let from: String = agent.try_get("", "phone")?;
    let placed = calls::place_with(
        &state,
        &t,
        PlaceCall {
            from,
            to: dial.to_number,
            caller_id: None,
            record: None,
            custom_field: None,
        },
        Some(CrmLink {
            installation_id: inst.id.clone(),
            record: dial.record,
            related: dial.related,
            crm_user_id: dial.crm_user_id,
        }),
    )
    .await?;
    let (view, debounced) = match placed {
        Placed::New(v) => (v, false),
        Placed::Debounced(v) => (v, true),
    };
    let until = db::now_ms() + STATUS_TTL_MS;
    let token = state.sealer.seal(&format!("{}:{until}", view.id));
    let status_url = format!(
        "{}/crm/calls/status?{}",
        state.public_base,
        url::form_urlencoded::Serializer::new(String::new())
            .append_pair("t", &token)
            .finish()
    );
    Ok((
        if debounced {
            StatusCode::OK
        } else {
            StatusCode::CREATED
        },
        Json(ClickAnswer {
            call: view,
            status_url,
            debounced,
        }),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
struct StatusQuery {
    t: String,
}

/// A call's progress, as the panel shows it (no numbers: the panel knows who it called).
#[derive(Debug, Serialize, Deserialize)]
pub struct CallProgress {
    /// Call id.
    pub id: String,
    /// Status.
    pub status: String,
    /// Whether Exotel reported the end.
    pub finished: bool,
    /// Bridged seconds.
    pub conversation_duration: Option<i32>,
    /// Legs.
    pub legs: Vec<calls::LegView>,
}

async fn status(
    State(state): State<AppState>,
    Query(q): Query<StatusQuery>,
) -> Result<Json<CallProgress>, ApiError> {
    let bad = || ApiError::NotFound("unknown or expired status link".into());
    let opened = state.sealer.open(&q.t).map_err(|_| bad())?;
    let (call_id, until) = opened.rsplit_once(':').ok_or_else(bad)?;
    if until.parse::<i64>().map_err(|_| bad())? < db::now_ms() {
        return Err(bad());
    }
    let c = call::Entity::find_by_id(call_id.to_owned())
        .one(&state.db)
        .await?
        .ok_or_else(bad)?;
    let view = calls::view(&c, &[]);
    Ok(Json(CallProgress {
        id: view.id,
        status: view.status,
        finished: c.finalized_at.is_some(),
        conversation_duration: view.conversation_duration,
        legs: view.legs,
    }))
}
