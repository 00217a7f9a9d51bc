//! Number masking: the virtual-number pool, masking sessions, Exotel's dial-whom and Passthru
//! flow webhooks with the seed guide's sample requests verbatim, reverse call flow, expiry,
//! cool-off, and concurrent allocation.

use std::collections::HashSet;

use sea_orm::ConnectionTrait;
use serde_json::{Value, json};

use crate::{both_backends, helpers::*};

/// The seed guide's "Dial whom" sample request (caller-based), verbatim after the `?`.
const GUIDE_DIAL_WHOM: &str = "CallFrom=07709562799&CallSid=066b197844c030d6737dac19cca6157p&CallStatus=in-progress&CallTo=07314853246&CallType=call-attempt&Created=Sun, 25 Jul 2021 14:56:12&CurrentTime=2021-07-25 14:56:14&DialCallDuration=0&DialWhomNumber=&Direction=incoming&EndTime=1970-01-01 05:30:00&From=07709562799&StartTime=2021-07-25 14:56:12&To=07314853246&flow_id=383431&tenant_id=53926";

/// The seed guide's Passthru "Incomplete call" sample, verbatim.
const GUIDE_PASSTHRU_INCOMPLETE: &str = "CallFrom=077095xxxx&CallSid=0e50bc001da69c238b55b56a0a1c157e&CallTo=07314853246&CallType=client-hangup&Created=Wed, 14 Jul 2021 15:36:22&CurrentTime=2021-07-14 15:36:43&DialCallDuration=0&DialCallStatus=canceled&DialWhomNumber=07995679243&Direction=incoming&EndTime=1970-01-01 05:30:00&ForwardedFrom=null&From=0770956xx&Legs[0][Number]=07995679xx&Legs[0][Type]=single&Legs[0][OnCallDuration]=0&Legs[0][CauseCode]=RING_TIMEOUT&Legs[0][Cause]=1003&OutgoingPhoneNumber=07314853246&ProcessStatus=null&StartTime=2021-07-14 15:36:22&To=07314853246&flow_id=383431&tenant_id=53926";

/// The seed guide's Passthru "Completed call" sample, verbatim.
const GUIDE_PASSTHRU_COMPLETED: &str = "CallFrom=0770956xxx&CallSid=3edd4e59486d063b46403496ad3e157e&CallTo=07314853246&CallType=completed&Created=Wed, 14 Jul 2021 15:40:07&CurrentTime=2021-07-14 15:40:55&DialCallDuration=40&DialCallStatus=completed&DialWhomNumber=0799567xxxx&Direction=incoming&EndTime=1970-01-01 05:30:00&ForwardedFrom=null&From=077095627xx&Legs[0][Number]=07995679243&Legs[0][Type]=single&Legs[0][OnCallDuration]=31&Legs[0][CauseCode]=NORMAL_CLEARING&Legs[0][Cause]=16&OutgoingPhoneNumber=07314853246&ProcessStatus=null&RecordingAvailableBy=Wed, 14 Jul 2021 15:45:55&RecordingUrl=https://s3-ap-southeast-1.amazonaws.com/exotelrecordings/skillstreet/3edd4e59486d063b46403496xxx3e157e.mp3&StartTime=2021-07-14 15:40:07&To=07314853246&flow_id=383431&tenant_id=53926";

/// The seed guide's PIN-based "Dial whom" sample (`digits="568"`), verbatim.
const GUIDE_DIAL_WHOM_PIN: &str = "CallFrom=07709562799&CallSid=c39894edd8a85d7fd95dbf5fdb65157g&CallTo=07314853246&CallType=call-attempt&Created=Fri, 16 Jul 2021 18:24:05&CurrentTime=2021-07-16 18:24:12&DialCallDuration=0&DialCallStatus=null&DialWhomNumber=&Direction=incoming&EndTime=1970-01-01 05:30:00&ForwardedFrom=null&From=07709562799&ProcessStatus=null&RecordingUrl=null&StartTime=2021-07-16 18:24:05&To=07314853246&digits=\"568\"&flow_id=383431&tenant_id=53926";

/// The guide's virtual number (CallTo) and caller (CallFrom), in E.164.
const GUIDE_VN: &str = "+917314853246";
const GUIDE_CALLER: &str = "+917709562799";
const AGENT: &str = "+919812345678";

async fn flow(app: &TestApp, url: &str, query: &str) -> reqwest::Response {
    app.http.get(format!("{url}?{query}")).send().await.unwrap()
}

async fn dial(app: &TestApp, t: &TestTenant, query: &str) -> String {
    let r = flow(app, &t.created.dial_whom_url, query).await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    r.text().await.unwrap()
}

async fn api(
    app: &TestApp,
    key: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = app
        .http
        .request(method, format!("{}{path}", app.base))
        .bearer_auth(key);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn add_number(app: &TestApp, t: &TestTenant, n: &str) {
    let (s, b) = api(
        app,
        &t.api_key,
        reqwest::Method::POST,
        "/api/v1/numbers",
        Some(json!({ "number": n })),
    )
    .await;
    assert_eq!(s, 201, "{b}");
}

async fn create(app: &TestApp, t: &TestTenant, body: Value) -> (u16, Value) {
    api(
        app,
        &t.api_key,
        reqwest::Method::POST,
        "/api/v1/sessions",
        Some(body),
    )
    .await
}

fn pair(a: &str, b: &str) -> Value {
    json!({"participants": [{"number": a, "role": "customer", "crm": {"id": 7}},
                            {"number": b, "role": "agent"}]})
}

async fn exec(app: &TestApp, sql: &str) {
    app.state.db.execute_unprepared(sql).await.unwrap();
}

async fn scalar_i64(app: &TestApp, sql: &str) -> i64 {
    let row = app
        .state
        .db
        .query_one_raw(sea_orm::Statement::from_string(
            app.state.db.get_database_backend(),
            sql.to_owned(),
        ))
        .await
        .unwrap()
        .unwrap();
    row.try_get_by_index(0).unwrap()
}

async fn set_settings(app: &TestApp, t: &TestTenant, body: Value) {
    let (s, b) = api(
        app,
        &t.api_key,
        reqwest::Method::PATCH,
        "/api/v1/masking/settings",
        Some(body),
    )
    .await;
    assert_eq!(s, 200, "{b}");
}

both_backends!(
    caller_based_dial_whom_answers_the_counterpart_for_the_guides_request,
    pin_mode_routes_the_guides_quoted_digits_and_plain_digits,
    unknown_callers_get_an_empty_body_or_the_fallback,
    expired_sessions_stop_routing_and_are_released_with_a_cooloff,
    each_routed_call_slides_the_ttl,
    pool_exhaustion_and_invalid_sessions_are_refused,
    concurrent_creates_never_give_a_participant_the_same_number_twice,
    a_customer_calling_back_reaches_the_agent_who_click_called_them,
    passthru_stores_the_guides_calls_once_and_delivers_them,
    passthru_branch_for_unanswered_calls_is_configurable,
    flow_urls_with_unknown_tokens_are_404_and_head_only_probes,
    the_numbers_api_validates_and_guards_numbers_in_use,
    sessions_can_be_listed_extended_and_closed_per_tenant,
);

async fn caller_based_dial_whom_answers_the_counterpart_for_the_guides_request(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let t = app.tenant(false).await;
    add_number(&app, &t, "07314853246").await;
    let (s, ses) = create(&app, &t, pair("07709562799", AGENT)).await;
    assert_eq!(s, 201, "{ses}");
    assert_eq!(ses["virtual_number"], GUIDE_VN);
    assert_eq!(ses["mode"], "caller");
    assert_eq!(ses["status"], "open");
    assert_eq!(ses["participants"][0]["number"], GUIDE_CALLER);
    assert_eq!(ses["participants"][0]["crm"], json!({"id": 7}));
    assert!(ses["participants"][0].get("pin").is_none());
    assert!(ses["expires_at"].is_string());

    // The customer dials the virtual number: Exotel should dial the agent, national form.
    assert_eq!(dial(&app, &t, GUIDE_DIAL_WHOM).await, "09812345678");
    // And the agent calling the same virtual number reaches the customer.
    let back = GUIDE_DIAL_WHOM
        .replace("CallFrom=07709562799", "CallFrom=09812345678")
        .replace("From=07709562799", "From=09812345678");
    assert_eq!(dial(&app, &t, &back).await, "07709562799");
    // Lower-case parameter names are read too.
    let lower = "callfrom=07709562799&callto=07314853246&callsid=x1";
    assert_eq!(dial(&app, &t, lower).await, "09812345678");

    // E.164 when the tenant asks for it.
    set_settings(&app, &t, json!({"dial_format": "e164"})).await;
    assert_eq!(dial(&app, &t, GUIDE_DIAL_WHOM).await, AGENT);

    let id = ses["id"].as_str().unwrap();
    // The slide is recorded just after the answer, off Exotel's wait.
    let seen = eventually(std::time::Duration::from_secs(5), || async {
        let (_, view) = api(
            &app,
            &t.api_key,
            reqwest::Method::GET,
            &format!("/api/v1/sessions/{id}"),
            None,
        )
        .await;
        view["last_interaction_at"].is_string()
    })
    .await;
    assert!(seen, "the routed call was recorded on the session");
}

async fn pin_mode_routes_the_guides_quoted_digits_and_plain_digits(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let t = app.tenant(false).await;
    add_number(&app, &t, GUIDE_VN).await;
    let mut body = pair(GUIDE_CALLER, AGENT);
    body["mode"] = json!("pin");
    let (s, ses) = create(&app, &t, body).await;
    assert_eq!(s, 201, "{ses}");
    assert_eq!(ses["mode"], "pin");
    let pins: Vec<String> = ses["participants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["pin"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(pins.len(), 2);
    assert_ne!(pins[0], pins[1]);
    assert!(
        pins.iter()
            .all(|p| p.len() == 4 && p.bytes().all(|b| b.is_ascii_digit()))
    );

    // Without digits there is no caller-based allocation in PIN mode: nobody to dial.
    assert_eq!(dial(&app, &t, GUIDE_DIAL_WHOM).await, "");

    // Give the customer the guide's PIN, then replay the guide's request verbatim.
    let id = ses["id"].as_str().unwrap();
    exec(
        &app,
        &format!(
            "UPDATE masking_pins SET pin = '568' WHERE session_id = '{id}' AND owner = '{GUIDE_CALLER}'"
        ),
    )
    .await;
    assert_eq!(dial(&app, &t, GUIDE_DIAL_WHOM_PIN).await, "09812345678");

    // The agent's PIN, unquoted, with spaces, and URL-encoded quotes, reaches the customer.
    let agent_pin = &pins[1];
    for digits in [
        agent_pin.clone(),
        format!("%20{agent_pin}%20"),
        format!("%22{agent_pin}%22"),
    ] {
        let q = format!("CallFrom=09812345678&CallTo=07314853246&CallSid=p2&digits={digits}");
        assert_eq!(dial(&app, &t, &q).await, "07709562799", "digits={digits}");
    }
    // A wrong PIN and a null one route nowhere.
    let q = "CallFrom=09812345678&CallTo=07314853246&CallSid=p3&digits=%229999%22";
    let wrong = if agent_pin == "9999" || pins[0] == "9999" {
        q.replace("9999", "99999")
    } else {
        q.to_owned()
    };
    assert_eq!(dial(&app, &t, &wrong).await, "");
    let q = "CallFrom=09812345678&CallTo=07314853246&CallSid=p4&digits=null";
    assert_eq!(dial(&app, &t, q).await, "");

    // With the caller check on, only the PIN's owner is routed.
    set_settings(&app, &t, json!({"pin_caller_check": true})).await;
    let stranger = GUIDE_DIAL_WHOM_PIN
        .replace("CallFrom=07709562799", "CallFrom=09900011122")
        .replace("From=07709562799", "From=09900011122");
    assert_eq!(dial(&app, &t, &stranger).await, "");
    assert_eq!(dial(&app, &t, GUIDE_DIAL_WHOM_PIN).await, "09812345678");
}

async fn unknown_callers_get_an_empty_body_or_the_fallback(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let t = app.tenant(false).await;
    add_number(&app, &t, GUIDE_VN).await;
    assert_eq!(dial(&app, &t, GUIDE_DIAL_WHOM).await, "");
    // No query at all, and a mangled caller, are not errors either.
    assert_eq!(dial(&app, &t, "").await, "");
    assert_eq!(
        dial(&app, &t, "CallFrom=077095xxxx&CallTo=07314853246").await,
        ""
    );

    set_settings(&app, &t, json!({"fallback_number": "08047112299"})).await;
    assert_eq!(dial(&app, &t, GUIDE_DIAL_WHOM).await, "08047112299");
    let (s, b) = api(
        &app,
        &t.api_key,
        reqwest::Method::GET,
        "/api/v1/masking/settings",
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(b["fallback_number"], "+918047112299");
    // Clearing it goes back to the empty answer; a bad value is refused.
    set_settings(&app, &t, json!({"fallback_number": null})).await;
    assert_eq!(dial(&app, &t, GUIDE_DIAL_WHOM).await, "");
    let (s, _) = api(
        &app,
        &t.api_key,
        reqwest::Method::PATCH,
        "/api/v1/masking/settings",
        Some(json!({"fallback_number": "nope"})),
    )
    .await;
    assert_eq!(s, 422);
}

async fn expired_sessions_stop_routing_and_are_released_with_a_cooloff(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let t = app.tenant(false).await;
    add_number(&app, &t, GUIDE_VN).await;
    let (s, ses) = create(&app, &t, pair(GUIDE_CALLER, AGENT)).await;
    assert_eq!(s, 201);
    let id = ses["id"].as_str().unwrap().to_owned();
    assert_eq!(dial(&app, &t, GUIDE_DIAL_WHOM).await, "09812345678");

    let past = chrono::Utc::now().timestamp_millis() - 1_000;
    exec(
        &app,
        &format!("UPDATE masking_sessions SET expires_at = {past} WHERE id = '{id}'"),
    )
    .await;
    // Expired: no routing even before anything released it.
    assert_eq!(dial(&app, &t, GUIDE_DIAL_WHOM).await, "");
    let (_, view) = api(
        &app,
        &t.api_key,
        reqwest::Method::GET,
        &format!("/api/v1/sessions/{id}"),
        None,
    )
    .await;
    assert_eq!(view["status"], "closed");
    assert_eq!(view["closed_reason"], "expired");

    // The sweep releases the pair and records the cool-off.
    assert_eq!(
        callbridge::masking::sweep_expired(&app.state.db)
            .await
            .unwrap(),
        1
    );
    assert_eq!(app.count("masking_allocations").await, 0);
    assert_eq!(app.count("masking_cooloffs").await, 2);
    assert_eq!(
        scalar_i64(
            &app,
            "SELECT COUNT(*) FROM masking_participants WHERE active = false"
        )
        .await,
        2
    );

    // Cool-off: the only number is not handed to the same customer again yet …
    let (s, b) = create(&app, &t, pair(GUIDE_CALLER, "+919811111111")).await;
    assert_eq!(s, 409, "{b}");
    // … but two other people can have it.
    let (s, b) = create(&app, &t, pair("+919822222222", "+919833333333")).await;
    assert_eq!(s, 201, "{b}");
    // Once the cool-off has passed, the customer can have it again.
    exec(&app, "UPDATE masking_cooloffs SET released_at = 0").await;
    let (s, b) = create(&app, &t, pair(GUIDE_CALLER, "+919811111111")).await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["virtual_number"], GUIDE_VN);
}

async fn each_routed_call_slides_the_ttl(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let t = app.tenant(false).await;
    add_number(&app, &t, GUIDE_VN).await;
    let mut body = pair(GUIDE_CALLER, AGENT);
    body["ttl_seconds"] = json!(600);
    let (s, ses) = create(&app, &t, body).await;
    assert_eq!(s, 201);
    let id = ses["id"].as_str().unwrap().to_owned();
    let soon = chrono::Utc::now().timestamp_millis() + 5_000;
    exec(
        &app,
        &format!("UPDATE masking_sessions SET expires_at = {soon} WHERE id = '{id}'"),
    )
    .await;
    let before = chrono::Utc::now().timestamp_millis();
    assert_eq!(dial(&app, &t, GUIDE_DIAL_WHOM).await, "09812345678");
    let slid = eventually(std::time::Duration::from_secs(5), || async {
        let expires = scalar_i64(
            &app,
            &format!("SELECT expires_at FROM masking_sessions WHERE id = '{id}'"),
        )
        .await;
        expires >= before + 600_000
    })
    .await;
    assert!(slid, "expiry slid to now + ttl");
    let last = scalar_i64(
        &app,
        &format!("SELECT last_interaction_at FROM masking_sessions WHERE id = '{id}'"),
    )
    .await;
    assert!(last >= before);
    // An unmatched call slides nothing.
    exec(
        &app,
        &format!("UPDATE masking_sessions SET expires_at = {soon} WHERE id = '{id}'"),
    )
    .await;
    assert_eq!(
        dial(&app, &t, "CallFrom=09900011122&CallTo=07314853246").await,
        ""
    );
    // Give a (wrongly) queued slide the time to land before looking.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let expires = scalar_i64(
        &app,
        &format!("SELECT expires_at FROM masking_sessions WHERE id = '{id}'"),
    )
    .await;
    assert_eq!(expires, soon);
}

async fn pool_exhaustion_and_invalid_sessions_are_refused(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let t = app.tenant(false).await;
    let (s, b) = create(&app, &t, pair(GUIDE_CALLER, AGENT)).await;
    assert_eq!(s, 409, "empty pool: {b}");
    assert!(b["detail"].as_str().unwrap().contains("pool is empty"));

    add_number(&app, &t, "+918047112201").await;
    add_number(&app, &t, "+918047112202").await;
    let mut vns = HashSet::new();
    for other in ["+919811111111", "+919822222222"] {
        let (s, b) = create(&app, &t, pair(GUIDE_CALLER, other)).await;
        assert_eq!(s, 201, "{b}");
        vns.insert(b["virtual_number"].as_str().unwrap().to_owned());
    }
    assert_eq!(vns.len(), 2, "the customer got two different numbers");
    let (s, b) = create(&app, &t, pair(GUIDE_CALLER, "+919833333333")).await;
    assert_eq!(s, 409, "{b}");
    assert!(
        b["detail"]
            .as_str()
            .unwrap()
            .contains("no virtual number is free")
    );
    // Other people still fit.
    let (s, _) = create(&app, &t, pair("+919844444444", "+919855555555")).await;
    assert_eq!(s, 201);

    let sessions_before = app.count("masking_sessions").await;
    for (body, field) in [
        (
            json!({"participants": [{"number": AGENT, "role": "agent"}]}),
            "participants",
        ),
        (pair("hello", AGENT), "participants"),
        (pair(AGENT, "09812345678"), "participants"),
        (
            json!({"participants": [{"number": "+919800000001", "role": "a"},
                                 {"number": "+919800000002", "role": "b"},
                                 {"number": "+919800000003", "role": "c"}]}),
            "participants",
        ),
        (
            {
                let mut b = pair("+919800000001", "+919800000002");
                b["ttl_seconds"] = json!(0);
                b
            },
            "ttl_seconds",
        ),
        (
            {
                let mut b = pair("+919800000001", "+919800000002");
                b["ttl_seconds"] = json!(999_999_999);
                b
            },
            "ttl_seconds",
        ),
        (
            {
                let mut b = pair("+919800000001", "+919800000002");
                b["mode"] = json!("sms");
                b
            },
            "mode",
        ),
        (
            json!({"participants": [{"number": "+919800000001", "role": ""},
                                 {"number": "+919800000002", "role": "b"}]}),
            "participants",
        ),
    ] {
        let (s, b) = create(&app, &t, body.clone()).await;
        assert_eq!(s, 422, "{body} → {b}");
        assert_eq!(b["field"], field, "{b}");
    }
    let (s, _) = create(&app, &t, json!({"participants": "x"})).await;
    assert_eq!(s, 422);
    assert_eq!(app.count("masking_sessions").await, sessions_before);
}

async fn concurrent_creates_never_give_a_participant_the_same_number_twice(backend: Backend) {
    let app = TestApp::spawn_with(backend, |c| c.db_max_connections = 8).await;
    let t = app.tenant(false).await;
    for i in 1..=5 {
        add_number(&app, &t, &format!("+9180471122{i:02}")).await;
    }
    let mut tasks = Vec::new();
    for i in 0..20 {
        let http = app.http.clone();
        let url = format!("{}/api/v1/sessions", app.base);
        let key = t.api_key.clone();
        tasks.push(tokio::spawn(async move {
            let r = http
                .post(url)
                .bearer_auth(key)
                .json(&pair(GUIDE_CALLER, &format!("+9198111111{i:02}")))
                .send()
                .await
                .unwrap();
            let s = r.status().as_u16();
            (s, r.json::<Value>().await.unwrap())
        }));
    }
    let mut ok = Vec::new();
    let mut conflicts = 0;
    for task in tasks {
        let (s, b) = task.await.unwrap();
        match s {
            201 => ok.push(b["virtual_number"].as_str().unwrap().to_owned()),
            409 => conflicts += 1,
            other => panic!("unexpected {other}: {b}"),
        }
    }
    assert_eq!(ok.len(), 5, "{ok:?}");
    assert_eq!(conflicts, 15);
    let distinct: HashSet<&String> = ok.iter().collect();
    assert_eq!(
        distinct.len(),
        5,
        "no number twice for the customer: {ok:?}"
    );
    assert_eq!(
        scalar_i64(
            &app,
            &format!(
                "SELECT COUNT(DISTINCT virtual_number) FROM masking_allocations WHERE number = '{GUIDE_CALLER}'"
            )
        )
        .await,
        5
    );
    assert_eq!(app.count("masking_sessions").await, 5);
    assert_eq!(app.count("masking_allocations").await, 10);
}

async fn a_customer_calling_back_reaches_the_agent_who_click_called_them(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let t = app.tenant(false).await;
    app.exotel_accepts("sidrev1").await;
    // The agent +919876543210 click-calls the customer from the tenant's number 08047112233.
    let (call_id, _) = app.place_call(&t, "+919812345678").await;
    let q = "CallFrom=09812345678&CallSid=in1&CallTo=08047112233&CallType=call-attempt&Direction=incoming";
    assert_eq!(dial(&app, &t, q).await, "09876543210");
    // Another customer, or the same customer on another number, is not routed.
    assert_eq!(
        dial(&app, &t, "CallFrom=09811111111&CallTo=08047112233").await,
        ""
    );
    assert_eq!(
        dial(&app, &t, "CallFrom=09812345678&CallTo=08047112234").await,
        ""
    );
    // Outside the window, the history no longer routes.
    exec(
        &app,
        &format!("UPDATE calls SET created_at = 1000 WHERE id = '{call_id}'"),
    )
    .await;
    assert_eq!(dial(&app, &t, q).await, "");
}

async fn passthru_stores_the_guides_calls_once_and_delivers_them(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let t = app.tenant(true).await;
    app.receiver_answers(200).await;
    let url = t.created.passthru_url.clone();

    let r = flow(&app, &url, GUIDE_PASSTHRU_INCOMPLETE).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "ok");
    assert_eq!(app.count("calls").await, 1);
    assert_eq!(app.count("jobs").await, 1);
    // The same Passthru again changes nothing and enqueues nothing.
    let r = flow(&app, &url, GUIDE_PASSTHRU_INCOMPLETE).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "duplicate ignored");
    assert_eq!(app.count("calls").await, 1);
    assert_eq!(app.count("jobs").await, 1);

    let r = flow(&app, &url, GUIDE_PASSTHRU_COMPLETED).await;
    assert_eq!(r.status(), 200);
    assert_eq!(app.count("calls").await, 2);
    assert_eq!(app.count("jobs").await, 2);
    assert_eq!(
        flow(&app, &url, GUIDE_PASSTHRU_COMPLETED).await.status(),
        200
    );
    assert_eq!(app.count("jobs").await, 2);

    let (_, list) = api(
        &app,
        &t.api_key,
        reqwest::Method::GET,
        "/api/v1/calls",
        None,
    )
    .await;
    let items = list["items"].as_array().unwrap();
    let by_sid = |sid: &str| {
        items
            .iter()
            .find(|c| c["exotel_call_sid"] == sid)
            .cloned()
            .unwrap()
    };
    let incomplete = by_sid("0e50bc001da69c238b55b56a0a1c157e");
    assert_eq!(incomplete["direction"], "inbound");
    assert_eq!(incomplete["status"], "canceled");
    assert_eq!(
        incomplete["from"], "077095xxxx",
        "an unparsable caller is kept as sent"
    );
    assert_eq!(incomplete["to"], "+917995679243");
    assert_eq!(incomplete["caller_id"], GUIDE_VN);
    assert_eq!(incomplete["legs"][0]["party"], "agent");
    assert_eq!(incomplete["legs"][0]["status"], "no-answer");
    assert_eq!(incomplete["legs"][0]["on_call_duration"], 0);
    assert!(incomplete["started_at"].is_string());
    assert!(incomplete["ended_at"].is_string());

    let completed = by_sid("3edd4e59486d063b46403496ad3e157e");
    assert_eq!(completed["status"], "completed");
    assert_eq!(completed["to"], "+917995679243");
    assert_eq!(completed["conversation_duration"], 31);
    assert_eq!(
        completed["recording_url"],
        "https://s3-ap-southeast-1.amazonaws.com/exotelrecordings/skillstreet/3edd4e59486d063b46403496xxx3e157e.mp3"
    );
    assert_eq!(completed["legs"][0]["status"], "completed");

    // Delivered like an outbound call, once each.
    assert_eq!(app.drain_jobs().await, 2);
    let deliveries = app.deliveries().await;
    assert_eq!(deliveries.len(), 2);
    let d = deliveries
        .iter()
        .map(|(_, b)| b["data"].clone())
        .find(|d| d["exotel_call_sid"] == "3edd4e59486d063b46403496ad3e157e")
        .unwrap();
    assert_eq!(d["direction"], "inbound");
    assert_eq!(d["outcome"], "connected");
    assert_eq!(d["agent_number"], "+917995679243");
    assert_eq!(d["virtual_number"], GUIDE_VN);
    assert_eq!(app.drain_jobs().await, 0);

    // A call-attempt Passthru stores the call without delivering; its final Passthru delivers.
    let attempt = "CallFrom=07709562799&CallSid=attempt0001&CallTo=07314853246&CallType=call-attempt&digits=%22568%22";
    assert_eq!(flow(&app, &url, attempt).await.status(), 200);
    assert_eq!(app.count("calls").await, 3);
    assert_eq!(app.count("jobs").await, 2);
    let done = "CallFrom=07709562799&CallSid=attempt0001&CallTo=07314853246&CallType=completed&DialCallStatus=completed&DialWhomNumber=09812345678&DialCallDuration=12&Legs%5B0%5D%5BNumber%5D=09812345678&Legs%5B0%5D%5BOnCallDuration%5D=9&Legs%5B0%5D%5BCauseCode%5D=NORMAL_CLEARING";
    assert_eq!(flow(&app, &url, done).await.status(), 200);
    assert_eq!(flow(&app, &url, done).await.status(), 200);
    assert_eq!(app.count("calls").await, 3);
    assert_eq!(app.count("jobs").await, 3);
    assert_eq!(
        scalar_i64(
            &app,
            "SELECT CAST(conversation_duration AS BIGINT) FROM calls WHERE exotel_call_sid = 'attempt0001'"
        )
        .await,
        9
    );

    // No CallSid: refused, nothing stored.
    let r = flow(&app, &url, "CallFrom=07709562799&CallType=completed").await;
    assert_eq!(r.status(), 400);
    assert_eq!(app.count("calls").await, 3);
}

async fn passthru_branch_for_unanswered_calls_is_configurable(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let t = app.tenant(false).await;
    let url = t.created.passthru_url.clone();
    set_settings(&app, &t, json!({"passthru_branch_on_unanswered": 302})).await;
    let r = app
        .http
        .get(format!("{url}?{GUIDE_PASSTHRU_INCOMPLETE}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    // A repeat answers the same branch.
    assert_eq!(
        flow(&app, &url, GUIDE_PASSTHRU_INCOMPLETE).await.status(),
        302
    );
    assert_eq!(
        flow(&app, &url, GUIDE_PASSTHRU_COMPLETED).await.status(),
        200
    );
    let (s, _) = api(
        &app,
        &t.api_key,
        reqwest::Method::PATCH,
        "/api/v1/masking/settings",
        Some(json!({"passthru_branch_on_unanswered": 301})),
    )
    .await;
    assert_eq!(s, 422);
    // Without a webhook nothing is queued, but the calls are stored.
    assert_eq!(app.count("jobs").await, 0);
    assert_eq!(app.count("calls").await, 2);
}

async fn flow_urls_with_unknown_tokens_are_404_and_head_only_probes(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let t = app.tenant(false).await;
    add_number(&app, &t, GUIDE_VN).await;
    let (_, ses) = create(&app, &t, pair(GUIDE_CALLER, AGENT)).await;
    let id = ses["id"].as_str().unwrap().to_owned();

    let bad_dial = format!(
        "{}/hooks/exotel/flow/{}/dial-whom",
        app.base,
        "A".repeat(32)
    );
    let bad_pass = format!("{}/hooks/exotel/flow/{}/passthru", app.base, "A".repeat(32));
    assert_eq!(flow(&app, &bad_dial, GUIDE_DIAL_WHOM).await.status(), 404);
    assert_eq!(
        flow(&app, &bad_pass, GUIDE_PASSTHRU_COMPLETED)
            .await
            .status(),
        404
    );
    let short = format!("{}/hooks/exotel/flow/x/dial-whom", app.base);
    assert_eq!(flow(&app, &short, GUIDE_DIAL_WHOM).await.status(), 404);
    let r = app.http.head(&bad_dial).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(app.count("calls").await, 0);

    // HEAD on the real URL: 200 text/plain, no body, and no session touched.
    let r = app
        .http
        .head(format!("{}?{GUIDE_DIAL_WHOM}", t.created.dial_whom_url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    assert_eq!(r.text().await.unwrap(), "");
    assert_eq!(
        scalar_i64(
            &app,
            &format!(
                "SELECT COUNT(*) FROM masking_sessions WHERE id = '{id}' AND last_interaction_at IS NULL"
            )
        )
        .await,
        1
    );
    let r = app
        .http
        .head(format!(
            "{}?{GUIDE_PASSTHRU_COMPLETED}",
            t.created.passthru_url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(app.count("calls").await, 0);
}

async fn the_numbers_api_validates_and_guards_numbers_in_use(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let t = app.tenant(false).await;
    let other = app.tenant(false).await;
    use reqwest::Method;

    let (s, _) = api(&app, "cb_wrong", Method::GET, "/api/v1/numbers", None).await;
    assert_eq!(s, 401);
    add_number(&app, &t, "08047112201").await;
    let (s, b) = api(
        &app,
        &t.api_key,
        Method::POST,
        "/api/v1/numbers",
        Some(json!({"number": "+918047112201"})),
    )
    .await;
    assert_eq!(s, 409, "{b}");
    for bad in [json!({"number": "hello"}), json!({"number": "123"})] {
        let (s, _) = api(&app, &t.api_key, Method::POST, "/api/v1/numbers", Some(bad)).await;
        assert_eq!(s, 422);
    }
    let (s, _) = api(
        &app,
        &t.api_key,
        Method::POST,
        "/api/v1/numbers",
        Some(json!({"numbr": "+918047112201"})),
    )
    .await;
    assert_eq!(s, 422);
    // The other tenant may hold the same number in its own pool.
    add_number(&app, &other, "+918047112201").await;

    let (_, ses) = create(&app, &t, pair(GUIDE_CALLER, AGENT)).await;
    let id = ses["id"].as_str().unwrap().to_owned();
    let (s, list) = api(&app, &t.api_key, Method::GET, "/api/v1/numbers", None).await;
    assert_eq!(s, 200);
    assert_eq!(list["items"][0]["number"], "+918047112201");
    assert_eq!(list["items"][0]["open_sessions"], 1);

    let (s, b) = api(
        &app,
        &t.api_key,
        Method::DELETE,
        "/api/v1/numbers/+918047112201",
        None,
    )
    .await;
    assert_eq!(s, 409, "{b}");
    // The other tenant's copy is not in use by our session.
    let (s, _) = api(
        &app,
        &other.api_key,
        Method::DELETE,
        "/api/v1/numbers/%2B918047112201",
        None,
    )
    .await;
    assert_eq!(s, 204);
    let (s, _) = api(
        &app,
        &t.api_key,
        Method::DELETE,
        &format!("/api/v1/sessions/{id}"),
        None,
    )
    .await;
    assert_eq!(s, 200);
    let (s, _) = api(
        &app,
        &t.api_key,
        Method::DELETE,
        "/api/v1/numbers/08047112201",
        None,
    )
    .await;
    assert_eq!(s, 204);
    let (s, _) = api(
        &app,
        &t.api_key,
        Method::DELETE,
        "/api/v1/numbers/08047112201",
        None,
    )
    .await;
    assert_eq!(s, 404);
    let (_, list) = api(&app, &t.api_key, Method::GET, "/api/v1/numbers", None).await;
    assert_eq!(list["items"], json!([]));
}

async fn sessions_can_be_listed_extended_and_closed_per_tenant(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let t = app.tenant(false).await;
    let other = app.tenant(false).await;
    use reqwest::Method;
    add_number(&app, &t, GUIDE_VN).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let (s, b) = create(&app, &t, pair(&format!("+91981111110{i}"), AGENT)).await;
        // The agent can hold the single number once only.
        if i == 0 {
            assert_eq!(s, 201, "{b}");
            ids.push(b["id"].as_str().unwrap().to_owned());
        } else {
            assert_eq!(s, 409, "{b}");
        }
    }
    add_number(&app, &t, "+918047112202").await;
    add_number(&app, &t, "+918047112203").await;
    for i in 1..3 {
        let (s, b) = create(&app, &t, pair(&format!("+91981111110{i}"), AGENT)).await;
        assert_eq!(s, 201, "{b}");
        ids.push(b["id"].as_str().unwrap().to_owned());
    }

    let (s, page) = api(
        &app,
        &t.api_key,
        Method::GET,
        "/api/v1/sessions?limit=2",
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    assert_eq!(page["items"][0]["id"], ids[2].as_str());
    let next = page["next_before"].as_str().unwrap();
    let (_, page2) = api(
        &app,
        &t.api_key,
        Method::GET,
        &format!("/api/v1/sessions?limit=2&before={next}"),
        None,
    )
    .await;
    assert_eq!(page2["items"].as_array().unwrap().len(), 1);
    assert_eq!(page2["items"][0]["id"], ids[0].as_str());
    let (s, _) = api(
        &app,
        &t.api_key,
        Method::GET,
        "/api/v1/sessions?limit=0",
        None,
    )
    .await;
    assert_eq!(s, 422);

    // Another tenant sees none of it.
    let (s, _) = api(
        &app,
        &other.api_key,
        Method::GET,
        &format!("/api/v1/sessions/{}", ids[0]),
        None,
    )
    .await;
    assert_eq!(s, 404);
    let (s, _) = api(
        &app,
        &other.api_key,
        Method::PATCH,
        &format!("/api/v1/sessions/{}", ids[0]),
        Some(json!({"status": "closed"})),
    )
    .await;
    assert_eq!(s, 404);
    let (s, _) = api(
        &app,
        &other.api_key,
        Method::DELETE,
        &format!("/api/v1/sessions/{}", ids[0]),
        None,
    )
    .await;
    assert_eq!(s, 404);
    let (_, l) = api(&app, &other.api_key, Method::GET, "/api/v1/sessions", None).await;
    assert_eq!(l["items"], json!([]));

    // Extend and re-time.
    let path = format!("/api/v1/sessions/{}", ids[0]);
    let (_, before) = api(&app, &t.api_key, Method::GET, &path, None).await;
    let exp0 =
        chrono::DateTime::parse_from_rfc3339(before["expires_at"].as_str().unwrap()).unwrap();
    let (s, b) = api(
        &app,
        &t.api_key,
        Method::PATCH,
        &path,
        Some(json!({"extend_seconds": 3600})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let exp1 = chrono::DateTime::parse_from_rfc3339(b["expires_at"].as_str().unwrap()).unwrap();
    assert_eq!((exp1 - exp0).num_seconds(), 3600);
    let (s, b) = api(
        &app,
        &t.api_key,
        Method::PATCH,
        &path,
        Some(json!({"ttl_seconds": 120})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["ttl_seconds"], 120);
    for bad in [
        json!({"ttl_seconds": 5}),
        json!({"extend_seconds": 0}),
        json!({"status": "open"}),
        json!({}),
        json!({"ttl_seconds": 120, "extend_seconds": 10}),
    ] {
        let (s, _) = api(&app, &t.api_key, Method::PATCH, &path, Some(bad.clone())).await;
        assert_eq!(s, 422, "{bad}");
    }

    // Close: routing stops, the pair is released, and further changes conflict.
    let (s, b) = api(
        &app,
        &t.api_key,
        Method::PATCH,
        &path,
        Some(json!({"status": "closed"})),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(b["status"], "closed");
    assert_eq!(b["closed_reason"], "closed");
    assert_eq!(b["participants"][0]["active"], false);
    assert_eq!(
        scalar_i64(
            &app,
            &format!(
                "SELECT COUNT(*) FROM masking_allocations WHERE session_id = '{}'",
                ids[0]
            )
        )
        .await,
        0
    );
    let (s, _) = api(
        &app,
        &t.api_key,
        Method::PATCH,
        &path,
        Some(json!({"extend_seconds": 60})),
    )
    .await;
    assert_eq!(s, 409);
    let (s, b) = api(&app, &t.api_key, Method::DELETE, &path, None).await;
    assert_eq!(s, 200, "closing twice is harmless");
    assert_eq!(b["status"], "closed");
    let (_, open) = api(
        &app,
        &t.api_key,
        Method::GET,
        "/api/v1/sessions?status=open",
        None,
    )
    .await;
    assert_eq!(open["items"].as_array().unwrap().len(), 2);
    let (_, closed) = api(
        &app,
        &t.api_key,
        Method::GET,
        "/api/v1/sessions?status=closed",
        None,
    )
    .await;
    assert_eq!(closed["items"].as_array().unwrap().len(), 1);
    let (s, _) = api(
        &app,
        &t.api_key,
        Method::GET,
        "/api/v1/sessions/ses_nope",
        None,
    )
    .await;
    assert_eq!(s, 404);
}

/// The dial-whom benchmark (`src/bin/callbridge-maskbench.rs`) through the test build; run with
/// `--ignored --nocapture`, arguments in `MASKBENCH_ARGS` (e.g. `--sessions 100000 --postgres
/// postgres://postgres@127.0.0.1:5432/test`). It asserts every answer, never a timing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run explicitly"]
async fn maskbench() {
    use clap::Parser;
    let extra = std::env::var("MASKBENCH_ARGS").unwrap_or_default();
    let args =
        std::iter::once("maskbench".to_owned()).chain(extra.split_whitespace().map(str::to_owned));
    crate::maskbench::bench(crate::maskbench::Args::parse_from(args))
        .await
        .unwrap();
}
