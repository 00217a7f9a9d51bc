//! Demo mode: a clearly-labelled built-in Exotel simulator, a webhook receiver and a page with
//! Call buttons, so a new user sees the whole loop (click → connect → callback → signed
//! delivery) in a browser with no accounts. Mounted only by `callbridge demo` / `serve --demo`;
//! the real request path is the same code the production server runs, pointed at the simulator
//! through the tenant's Exotel API base.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use askama::Template;
use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::{Html, IntoResponse},
    routing::{get, post},
};
use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, Set};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{
    AppState,
    calls::{self, PlaceCall, Placed},
    entities::tenant,
    error::{ApiError, ApiResult},
    tenants,
};

const DEMO_TENANT: &str = "Demo (simulated Exotel)";
const AGENT: &str = "+919876543210";
const VIRTUAL_NUMBER: &str = "+918047112233";
const CONTACTS: &[(&str, &str)] = &[
    ("Asha Rao (answers)", "+919812345678"),
    ("Vikram Shah (busy)", "+919900112233"),
    ("Meera Iyer (no answer)", "+917012345678"),
];

/// In-memory demo state: the demo tenant and the deliveries its webhook received.
#[derive(Default, Clone)]
pub struct DemoState {
    inner: Arc<Mutex<DemoInner>>,
}

#[derive(Default)]
struct DemoInner {
    tenant_id: Option<String>,
    deliveries: Vec<Value>,
}

impl DemoState {
    fn tenant_id(&self) -> Option<String> {
        self.inner.lock().ok()?.tenant_id.clone()
    }
}

/// Create or refresh the demo tenant so its Exotel base and webhook point at this process.
///
/// # Errors
/// Database failures.
pub async fn ensure_demo_tenant(state: &AppState) -> anyhow::Result<()> {
    let Some(demo) = &state.demo else {
        return Ok(());
    };
    let base = &state.public_base;
    let exotel_base = format!("{base}/_simulator/exotel");
    let webhook = format!("{base}/_simulator/webhook");
    let existing = tenant::Entity::find()
        .filter(tenant::Column::Name.eq(DEMO_TENANT))
        .one(&state.db)
        .await?;
    let id = if let Some(t) = existing {
        let id = t.id.clone();
        let mut am: tenant::ActiveModel = t.into();
        am.exotel_api_base = Set(exotel_base);
        am.webhook_url = Set(Some(webhook));
        let _turn = crate::db::write_turn(&state.db).await;
        am.update(&state.db).await?;
        id
    } else {
        let created = tenants::create(
            &state.db,
            &state.sealer,
            base,
            &state.config.default_region,
            tenants::NewTenant {
                name: DEMO_TENANT.into(),
                exotel_sid: "demo".into(),
                exotel_api_key: "demo-key".into(),
                exotel_api_token: "demo-token".into(),
                exotel_api_base: Some(exotel_base),
                caller_id: Some(VIRTUAL_NUMBER.into()),
                webhook_url: Some(webhook),
                default_region: None,
            },
        )
        .await?;
        created.tenant_id
    };
    if let Ok(mut g) = demo.inner.lock() {
        g.tenant_id = Some(id);
    }
    tracing::warn!(
        url = %format!("{base}/demo"),
        "DEMO MODE: Exotel is simulated in-process; open the demo page"
    );
    Ok(())
}

/// The demo routes and the simulator.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { axum::response::Redirect::to("/demo") }))
        .route("/demo", get(page))
        .route("/demo/call", post(demo_call))
        .route("/demo/state", get(demo_state))
        .route(
            "/_simulator/exotel/v1/Accounts/{sid}/Calls/connect.json",
            post(sim_connect),
        )
        .route(
            "/_simulator/exotel/v1/Accounts/{sid}/Calls/{call}",
            get(sim_details),
        )
        .route("/_simulator/exotel/recordings/{file}", get(sim_recording))
        .route("/_simulator/webhook", post(sim_webhook))
}

#[derive(Template)]
#[template(path = "demo.html")]
struct DemoPage {
    agent: &'static str,
    virtual_number: &'static str,
    contacts: Vec<(&'static str, &'static str)>,
}

async fn page() -> ApiResult<Html<String>> {
    let page = DemoPage {
        agent: AGENT,
        virtual_number: VIRTUAL_NUMBER,
        contacts: CONTACTS.to_vec(),
    };
    page.render()
        .map(Html)
        .map_err(|e| ApiError::Internal(anyhow::Error::new(e)))
}

async fn demo_tenant(state: &AppState) -> ApiResult<tenant::Model> {
    let id = state
        .demo
        .as_ref()
        .and_then(DemoState::tenant_id)
        .ok_or_else(|| ApiError::NotFound("demo mode is off".into()))?;
    tenant::Entity::find_by_id(id)
        .one(&state.db)
        .await?
        .ok_or_else(|| ApiError::NotFound("demo tenant missing".into()))
}

#[derive(Deserialize)]
struct DemoCall {
    to: String,
}

async fn demo_call(
    State(state): State<AppState>,
    Json(req): Json<DemoCall>,
) -> ApiResult<impl IntoResponse> {
    let t = demo_tenant(&state).await?;
    let placed = calls::place(
        &state,
        &t,
        PlaceCall {
            from: AGENT.into(),
            to: req.to,
            caller_id: None,
            record: Some(true),
            custom_field: Some("demo".into()),
        },
    )
    .await?;
    Ok(match placed {
        Placed::New(v) => (StatusCode::CREATED, Json(v)),
        Placed::Debounced(v) => (StatusCode::OK, Json(v)),
    })
}

async fn demo_state(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    let t = demo_tenant(&state).await?;
    let calls = calls::list(&state.db, &t.id, None, 10).await?;
    let deliveries = state
        .demo
        .as_ref()
        .and_then(|d| d.inner.lock().ok().map(|g| g.deliveries.clone()))
        .unwrap_or_default();
    Ok(Json(json!({"calls": calls, "deliveries": deliveries})))
}

/// The simulated `Calls/connect`: answers like Exotel, then "rings" and posts a realistic
/// terminal StatusCallback a few seconds later. The callee's last digits pick the outcome.
async fn sim_connect(Path(sid): Path<String>, body: Bytes) -> impl IntoResponse {
    let form: Vec<(String, String)> = url::form_urlencoded::parse(&body).into_owned().collect();
    let get = |k: &str| {
        form.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let (from, to, callback) = (get("From"), get("To"), get("StatusCallback"));
    if from.is_empty() || to.is_empty() || get("CallerId").is_empty() {
        return (
            StatusCode::BAD_REQUEST,
            Json(
                json!({"RestException":{"Status":400,"Message":"From, To and CallerId are required"}}),
            ),
        );
    }
    let call_sid = uuid::Uuid::new_v4().simple().to_string();
    let now = chrono::Utc::now()
        .with_timezone(&chrono::FixedOffset::east_opt(19_800).unwrap_or_else(|| unreachable!()));
    let fmt = |t: chrono::DateTime<chrono::FixedOffset>| t.format("%Y-%m-%d %H:%M:%S").to_string();
    let (status, legs, conv) = if to.ends_with("112233") {
        (
            "busy",
            json!([{"OnCallDuration": 12, "Status": "completed"}, {"OnCallDuration": 0, "Status": "busy"}]),
            0,
        )
    } else if to.ends_with("345678") && to.starts_with("+9170") {
        (
            "no-answer",
            json!([{"OnCallDuration": 35, "Status": "completed"}, {"OnCallDuration": 0, "Status": "no-answer"}]),
            0,
        )
    } else {
        (
            "completed",
            json!([{"OnCallDuration": 41, "Status": "completed"}, {"OnCallDuration": 32, "Status": "completed"}]),
            32,
        )
    };
    let recording_base = callback
        .split("/hooks/")
        .next()
        .unwrap_or_default()
        .to_owned();
    let payload = json!({
        "CallSid": call_sid, "EventType": "terminal",
        "DateCreated": fmt(now), "DateUpdated": fmt(now + chrono::Duration::seconds(45)),
        "Status": status, "To": to, "From": from, "PhoneNumberSid": get("CallerId"),
        "StartTime": fmt(now), "EndTime": fmt(now + chrono::Duration::seconds(45)),
        "Direction": "outbound-api", "CustomField": get("CustomField"),
        "RecordingUrl": if conv > 0 { Value::String(format!("{recording_base}/_simulator/exotel/recordings/{call_sid}.wav")) } else { Value::Null },
        "ConversationDuration": conv, "Legs": legs,
    });
    if !callback.is_empty() {
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            let client = reqwest::Client::new();
            for _ in 0..3 {
                match client.post(&callback).json(&payload).send().await {
                    Ok(r) if r.status().is_success() => return,
                    _ => tokio::time::sleep(Duration::from_secs(2)).await,
                }
            }
        });
    }
    (
        StatusCode::OK,
        Json(json!({"Call": {
            "Sid": call_sid, "ParentCallSid": null, "DateCreated": fmt(now), "DateUpdated": fmt(now),
            "AccountSid": sid, "To": to, "From": from, "PhoneNumberSid": get("CallerId"),
            "Status": "in-progress", "StartTime": fmt(now), "EndTime": null, "Duration": null,
            "Price": null, "Direction": "outbound-api", "RecordingUrl": null,
            "Uri": format!("/v1/Accounts/{sid}/Calls/{call_sid}.json")
        }})),
    )
}

async fn sim_details(Path((_sid, call)): Path<(String, String)>) -> impl IntoResponse {
    let call_sid = call.trim_end_matches(".json");
    (
        StatusCode::OK,
        Json(json!({"Call": {"Sid": call_sid, "Status": "completed",
            "Details": {"ConversationDuration": 0}}})),
    )
}

/// One second of a 440 Hz tone as 8 kHz mono WAV: a stand-in recording that plays.
async fn sim_recording() -> impl IntoResponse {
    let rate: u32 = 8000;
    let samples: Vec<i16> = (0..rate)
        .map(|i| {
            let t = f64::from(i) / f64::from(rate);
            (f64::sin(2.0 * std::f64::consts::PI * 440.0 * t) * 8000.0) as i16
        })
        .collect();
    let data_len = u32::try_from(samples.len() * 2).unwrap_or(0);
    let mut wav = Vec::with_capacity(44 + samples.len() * 2);
    wav.extend_from_slice(b"RIFF");
    wav.extend_from_slice(&(36 + data_len).to_le_bytes());
    wav.extend_from_slice(b"WAVEfmt ");
    wav.extend_from_slice(&16u32.to_le_bytes());
    wav.extend_from_slice(&1u16.to_le_bytes());
    wav.extend_from_slice(&1u16.to_le_bytes());
    wav.extend_from_slice(&rate.to_le_bytes());
    wav.extend_from_slice(&(rate * 2).to_le_bytes());
    wav.extend_from_slice(&2u16.to_le_bytes());
    wav.extend_from_slice(&16u16.to_le_bytes());
    wav.extend_from_slice(b"data");
    wav.extend_from_slice(&data_len.to_le_bytes());
    for s in samples {
        wav.extend_from_slice(&s.to_le_bytes());
    }
    ([("content-type", "audio/wav")], wav)
}

async fn sim_webhook(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let h = |k: &str| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let payload: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if let Some(demo) = &state.demo
        && let Ok(mut g) = demo.inner.lock()
    {
        g.deliveries.insert(
            0,
            json!({"webhook_id": h("webhook-id"), "signature": h("webhook-signature"),
                   "payload": payload}),
        );
        g.deliveries.truncate(20);
    }
    StatusCode::NO_CONTENT
}
