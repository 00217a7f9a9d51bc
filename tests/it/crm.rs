//! The connector host against a fake CRM (`fakecrm.rs`): OAuth installs through the real
//! redirect chain (state single-use and bound to the session, PKCE, CRM errors), sealed tokens,
//! single-flight refresh across tasks and instances, write-back exactly once, the unknown-number
//! rules, user import, uninstall from both sides, marketplace installs, clicks and isolation.

use callbridge::crm::tokens::{CallError, TokenError};
use callbridge_connector::ConnectorError;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::{
    admin::{Browser, PASSWORD, location, signed_in},
    both_backends,
    fakecrm::{self, FakeCrm},
    helpers::*,
};

const ADMIN: &str = "admin@acme.example";
const AGENT: &str = "+919876543210";
const CUSTOMER: &str = "+919812345678";

struct Setup {
    app: TestApp,
    crm: FakeCrm,
    t: TestTenant,
    b: Browser,
}

async fn setup(backend: Backend) -> Setup {
    let crm = FakeCrm::start().await;
    let app = TestApp::spawn_with_connectors(backend, |_| {}, vec![crm.connector()]).await;
    let (t, b) = signed_in(&app, false, ADMIN).await;
    Setup { app, crm, t, b }
}

/// Start an install and follow the CRM's redirect; returns the callback URL (not yet visited).
async fn authorize(s: &Setup, b: &Browser) -> String {
    let r = b.get("/oauth/fakecrm/start").await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let to_crm = location(&r);
    assert!(
        to_crm.starts_with(&format!("{}/oauth/authorize?", s.crm.base)),
        "{to_crm}"
    );
    let q: Vec<(String, String)> = url::Url::parse(&to_crm)
        .unwrap()
        .query_pairs()
        .into_owned()
        .collect();
    let get = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(get("client_id").as_deref(), Some(fakecrm::CLIENT_ID));
    assert_eq!(get("code_challenge_method").as_deref(), Some("S256"));
    assert!(get("state").is_some_and(|s| s.len() >= 32));
    assert_eq!(
        get("redirect_uri").as_deref(),
        Some(format!("{}/oauth/fakecrm/callback", s.app.base).as_str())
    );
    let r = b.http.get(&to_crm).send().await.unwrap();
    assert!(r.status().is_redirection());
    location(&r)
}

/// Install the fake CRM for the signed-in admin; returns the installation id.
async fn install(s: &Setup) -> String {
    let callback = authorize(s, &s.b).await;
    let r = s.b.http.get(&callback).send().await.unwrap();
    assert_eq!(
        r.status(),
        StatusCode::SEE_OTHER,
        "{}",
        r.text().await.unwrap()
    );
    assert_eq!(location(&r), "/admin/connectors?installed=fakecrm");
    let rows = s
        .app
        .rows(
            "SELECT id FROM installations WHERE tenant_id = ? AND connector = 'fakecrm'",
            vec![s.t.id.clone().into()],
        )
        .await;
    rows[0]["id"].as_str().unwrap().to_owned()
}

/// What the panel's sealed status link answers.
async fn call_progress(s: &Setup, status_url: &str) -> Value {
    s.app
        .http
        .get(status_url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn map_agent(s: &Setup, phone: &str, user: &str) {
    s.app
        .add_agent(&s.t.id, phone, Some("Priya"), &format!("fakecrm:{user}"))
        .await;
}

/// List the fake CRM's users with the installation's token (refreshing it when refused).
async fn users_through_the_broker(
    state: &callbridge::AppState,
    inst: &str,
) -> Result<usize, CallError> {
    let connector = state.connectors.get("fakecrm").unwrap().clone();
    state
        .tokens
        .call(state, inst, |ctx, token| {
            let connector = connector.clone();
            async move { connector.list_users(&ctx, &token).await }
        })
        .await
        .map(|u| u.len())
}

async fn click(s: &Setup, body: Value, signature: &str) -> reqwest::Response {
    s.app
        .http
        .post(format!("{}/crm/fakecrm/click", s.app.base))
        .header("x-fake-signature", signature)
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn finish_call(s: &Setup, status_callback: &str, sid: &str) {
    let r = s
        .app
        .callback(
            status_callback,
            "application/json",
            guide_callback(sid).to_string(),
        )
        .await;
    assert_eq!(r.status(), 200);
}

both_backends!(
    an_install_stores_sealed_tokens_and_the_account,
    the_state_works_once_and_only_in_its_session,
    crm_errors_are_shown_and_store_nothing,
    a_click_places_the_call_and_writes_it_back_exactly_once,
    unknown_numbers_follow_the_installation_rule,
    a_hundred_refused_requests_cause_one_refresh,
    instances_sharing_the_database_refresh_once,
    invalid_grant_rereads_storage_then_asks_for_a_reconnect,
    rate_limits_and_outages_are_retried_without_a_second_log,
    uninstall_from_either_side_deletes_the_tokens,
    marketplace_installs_need_a_signed_in_confirmation,
    crm_users_are_imported_as_agents,
    one_crm_account_belongs_to_one_tenant,
    bad_clicks_are_refused_and_place_nothing,
    inbound_calls_are_written_back_to_the_agents_crm,
    calls_finished_together_each_get_one_crm_job,
);

async fn an_install_stores_sealed_tokens_and_the_account(backend: Backend) {
    let s = setup(backend).await;
    let id = install(&s).await;
    let row = &s
        .app
        .rows(
            "SELECT status, account_id, api_base, access_token_sealed, refresh_token_sealed, \
             expires_at, installed_by FROM installations WHERE id = ?",
            vec![id.clone().into()],
        )
        .await[0];
    assert_eq!(row["status"], "active");
    assert_eq!(row["account_id"], "acct-1");
    assert_eq!(row["api_base"], s.crm.base.as_str());
    assert_eq!(row["installed_by"], ADMIN);
    let access = row["access_token_sealed"].as_str().unwrap();
    let refresh = row["refresh_token_sealed"].as_str().unwrap();
    assert!(!access.contains("at-1") && !refresh.contains("rt-1"));
    assert_eq!(s.app.state.sealer.open(access).unwrap(), "at-1");
    assert_eq!(s.app.state.sealer.open(refresh).unwrap(), "rt-1");
    assert!(row["expires_at"].as_i64().unwrap() > callbridge::db::now_ms());
    // The code exchange carried the PKCE verifier (the fake checks it against the challenge).
    let exchange = s.crm.data().token_requests[0].clone();
    assert!(exchange.iter().any(|(k, _)| k == "code_verifier"));
    // The page shows the install, never a token.
    let page = s.b.page("/admin/connectors").await;
    assert!(page.contains("connected"), "{page}");
    assert!(page.contains("acct-1"));
    assert!(!page.contains("at-1") && !page.contains("rt-1"));
}

async fn the_state_works_once_and_only_in_its_session(backend: Backend) {
    let s = setup(backend).await;
    // Another admin of the same tenant, in another browser.
    callbridge::admin::users::create(&s.app.state.db, &s.t.id, "other@acme.example", PASSWORD)
        .await
        .unwrap();
    let other = Browser::new(&s.app);
    assert_eq!(
        other.login("other@acme.example", PASSWORD).await.status(),
        StatusCode::SEE_OTHER
    );
    let callback = authorize(&s, &s.b).await;
    let r = other.http.get(&callback).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(r.text().await.unwrap().contains("another browser session"));
    assert_eq!(s.app.count("installations").await, 0);
    // The state was spent by that attempt: even its own session cannot use it now.
    let r = s.b.http.get(&callback).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(r.text().await.unwrap().contains("already used"));
    assert_eq!(s.app.count("installations").await, 0);
    // A fresh install works, once.
    let callback = authorize(&s, &s.b).await;
    let r = s.b.http.get(&callback).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let r = s.b.http.get(&callback).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(s.app.count("installations").await, 1);
    // Only the one good callback reached the token endpoint.
    assert_eq!(s.crm.data().token_requests.len(), 1);
    // Not signed in: the start asks for a login first.
    let anon = Browser::new(&s.app);
    let r = anon.get("/oauth/fakecrm/start").await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert!(location(&r).starts_with("/admin/login"));
}

async fn crm_errors_are_shown_and_store_nothing(backend: Backend) {
    let s = setup(backend).await;
    // The user says no at the CRM.
    let callback = authorize(&s, &s.b).await;
    let state = url::Url::parse(&callback)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "state")
        .unwrap()
        .1
        .into_owned();
    let denied = format!(
        "{}/oauth/fakecrm/callback?error=access_denied&error_description=The+user+denied+access&state={state}",
        s.app.base
    );
    let r = s.b.http.get(&denied).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let body = r.text().await.unwrap();
    assert!(body.contains("did not grant access"), "{body}");
    assert!(body.contains("The user denied access"));
    // The CRM refuses the code.
    s.crm.data().reject_code = true;
    let callback = authorize(&s, &s.b).await;
    let r = s.b.http.get(&callback).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("refused the authorization code")
    );
    assert_eq!(s.app.count("installations").await, 0);
    // An unknown connector is a 404, not a crash.
    assert_eq!(
        s.b.get("/oauth/nosuchcrm/start").await.status(),
        StatusCode::NOT_FOUND
    );
}

async fn a_click_places_the_call_and_writes_it_back_exactly_once(backend: Backend) {
    let s = setup(backend).await;
    install(&s).await;
    map_agent(&s, AGENT, "u1").await;
    s.app.exotel_accepts("sid-crm-1").await;
    let r = click(
        &s,
        json!({"account": "acct-1", "user": "u1", "phone": "098123 45678",
               "record": {"object_type": "deal", "id": "d-9"}}),
        fakecrm::CLIENT_SECRET,
    )
    .await;
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "{}",
        r.text().await.unwrap()
    );
    let body: Value = r.json().await.unwrap();
    let call_id = body["call"]["id"].as_str().unwrap().to_owned();
    let status_url = body["status_url"].as_str().unwrap().to_owned();
    // Exotel rang the agent's phone first, then the clicked number.
    let connect = s.app.connect_requests().await.pop().unwrap();
    let field = |k: &str| connect.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(field("From").as_deref(), Some(AGENT));
    assert_eq!(field("To").as_deref(), Some(CUSTOMER));
    let progress = call_progress(&s, &status_url).await;
    assert_eq!(progress["finished"], false);

    finish_call(&s, &s.app.last_status_callback().await, "sid-crm-1").await;
    s.app.drain_jobs().await;
    {
        let d = s.crm.data();
        assert_eq!(d.logs.len(), 1, "exactly one CRM log");
        let log = &d.logs[0].1;
        assert_eq!(log["call_id"], call_id.as_str());
        assert_eq!(
            log["crm_record"],
            json!({"object_type": "deal", "id": "d-9"})
        );
        assert_eq!(log["crm_user_id"], "u1");
        assert_eq!(log["direction"], "outbound");
        assert_eq!(log["outcome"], "connected");
        assert_eq!(log["conversation_duration"], 32);
        assert_eq!(log["legs"][0]["on_call_duration"], 41);
        assert_eq!(log["legs"][1]["status"], "completed");
        assert_eq!(log["started_at"], "2019-04-07T21:47:59Z");
        let rec = log["recording_url"].as_str().unwrap();
        assert!(
            rec.starts_with(&format!("{}/recordings/", s.app.base)),
            "{rec}"
        );
        // The clicked record was used; nothing was looked up.
        assert!(d.lookups.is_empty());
    }
    let stored = s
        .app
        .rows(
            "SELECT crm_log_id FROM crm_logs WHERE call_id = ?",
            vec![call_id.clone().into()],
        )
        .await;
    assert_eq!(stored[0]["crm_log_id"], "log-1");
    // A repeated callback and another drain change nothing at the CRM.
    finish_call(&s, &s.app.last_status_callback().await, "sid-crm-1").await;
    s.app.drain_jobs().await;
    // Even a job forced to run again updates (nothing changed → no request), never re-logs.
    s.app
        .exec(
            "UPDATE jobs SET state = 'queued', run_at = 0 WHERE kind = 'crm'",
            vec![],
        )
        .await;
    s.app.drain_jobs().await;
    assert_eq!(s.crm.data().logs.len(), 1);
    assert!(s.crm.data().updates.is_empty());
    let progress = call_progress(&s, &status_url).await;
    assert_eq!(progress["finished"], true);
    assert_eq!(progress["conversation_duration"], 32);
    // The API shows the CRM sink.
    let view = s.app.view(&s.t, &call_id).await;
    let targets = view["writeback"]["targets"].as_array().unwrap();
    assert!(
        targets
            .iter()
            .any(|t| t["target"] == "crm:fakecrm" && t["state"] == "done"),
        "{view}"
    );
    // A forged status link is a 404.
    let forged = status_url.replace("t=", "t=x");
    assert_eq!(
        s.app.http.get(&forged).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
}

async fn unknown_numbers_follow_the_installation_rule(backend: Backend) {
    let s = setup(backend).await;
    let inst = install(&s).await;
    map_agent(&s, AGENT, "u1").await;
    s.app.exotel_accepts_many("sid-rule-").await;
    s.crm
        .data()
        .contacts
        .push(("+919811111111".into(), "c-known".into()));

    // An API call (no CRM record) to a known number: looked up and logged on the match.
    let known = s.app.place(&s.t, "+919811111111").await;
    finish_call(&s, &known.url, &known.sid).await;
    s.app.drain_jobs().await;
    assert_eq!(s.crm.data().logs.len(), 1);
    assert_eq!(
        s.crm.data().logs[0].1["crm_record"],
        json!({"object_type": "contact", "id": "c-known"})
    );
    assert_eq!(s.crm.data().logs[0].1["crm_user_id"], "u1");

    // Unknown number, rule "nothing" (the default): looked up, nothing created or logged.
    let unknown = s.app.place(&s.t, "+919822222222").await;
    finish_call(&s, &unknown.url, &unknown.sid).await;
    s.app.drain_jobs().await;
    assert_eq!(s.crm.data().logs.len(), 1);
    assert!(s.crm.data().created_contacts.is_empty());
    assert!(s.crm.data().lookups.contains(&"+919822222222".to_owned()));

    // Rule "create": a contact is created, then the call is logged on it.
    let r =
        s.b.post("/admin/connectors/fakecrm/rule", &[("rule", "create")])
            .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let created = s.app.place(&s.t, "+919833333333").await;
    finish_call(&s, &created.url, &created.sid).await;
    s.app.drain_jobs().await;
    assert_eq!(
        s.crm.data().created_contacts,
        vec!["+919833333333".to_owned()]
    );
    assert_eq!(
        s.crm.data().logs[1].1["crm_record"],
        json!({"object_type": "contact", "id": "c-new-1"})
    );

    // Rule "default record": bad input is refused and changes nothing…
    let r =
        s.b.post(
            "/admin/connectors/fakecrm/rule",
            &[
                ("rule", "default_record"),
                ("record_type", ""),
                ("record_id", "x"),
            ],
        )
        .await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let rule = s
        .app
        .rows(
            "SELECT unknown_number_rule FROM installations WHERE id = ?",
            vec![inst.clone().into()],
        )
        .await;
    assert_eq!(rule[0]["unknown_number_rule"], "create");
    // …a valid one attaches unknown numbers to that record.
    let r =
        s.b.post(
            "/admin/connectors/fakecrm/rule",
            &[
                ("rule", "default_record"),
                ("record_type", "account"),
                ("record_id", "inbox-1"),
            ],
        )
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let dflt = s.app.place(&s.t, "+919844444444").await;
    finish_call(&s, &dflt.url, &dflt.sid).await;
    s.app.drain_jobs().await;
    assert_eq!(s.crm.data().logs.len(), 3);
    assert_eq!(
        s.crm.data().logs[2].1["crm_record"],
        json!({"object_type": "account", "id": "inbox-1"})
    );
    assert_eq!(s.crm.data().created_contacts.len(), 1);
}

async fn a_hundred_refused_requests_cause_one_refresh(backend: Backend) {
    let s = setup(backend).await;
    let inst = install(&s).await;
    s.crm.data().refresh_delay_ms = 100;
    s.crm.expire_access_tokens();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let state = s.app.state.clone();
        let inst = inst.clone();
        set.spawn(async move { users_through_the_broker(&state, &inst).await });
    }
    while let Some(r) = set.join_next().await {
        assert_eq!(r.unwrap().unwrap(), 2);
    }
    assert_eq!(s.crm.data().refresh_requests, 1);
    assert_eq!(s.app.state.tokens.refresh_count(), 1);
    // The rotated refresh token was stored (the old one no longer works at the CRM).
    let row = &s
        .app
        .rows(
            "SELECT refresh_token_sealed, token_version, last_refresh_at FROM installations WHERE id = ?",
            vec![inst.into()],
        )
        .await[0];
    assert_eq!(
        s.app
            .state
            .sealer
            .open(row["refresh_token_sealed"].as_str().unwrap())
            .unwrap(),
        "rt-2"
    );
    assert_eq!(row["token_version"], 2);
    assert!(row["last_refresh_at"].as_i64().is_some());
}

async fn instances_sharing_the_database_refresh_once(backend: Backend) {
    let s = setup(backend).await;
    let inst = install(&s).await;
    s.crm.data().refresh_delay_ms = 300;
    s.crm.expire_access_tokens();
    // A second instance on the same database (not serving; its state is enough).
    let mut config = s.app.config.clone();
    config.bind = "127.0.0.1:0".parse().unwrap();
    let second = callbridge::Application::build_with(config, None, vec![s.crm.connector()])
        .await
        .unwrap();
    let states = [s.app.state.clone(), second.state()];
    let mut set = tokio::task::JoinSet::new();
    for i in 0..60 {
        let state = states[i % 2].clone();
        let inst = inst.clone();
        set.spawn(async move { users_through_the_broker(&state, &inst).await });
    }
    while let Some(r) = set.join_next().await {
        assert_eq!(r.unwrap().unwrap(), 2);
    }
    assert_eq!(
        s.crm.data().refresh_requests,
        1,
        "one refresh over both instances"
    );
    assert_eq!(
        states[0].tokens.refresh_count() + states[1].tokens.refresh_count(),
        1
    );
}

async fn invalid_grant_rereads_storage_then_asks_for_a_reconnect(backend: Backend) {
    let s = setup(backend).await;
    let inst = install(&s).await;
    let state = &s.app.state;
    // Another instance rotated the refresh token after we read version 1: our refresh with the
    // stale copy is refused, storage has a newer token, so the install stays healthy.
    let lease = state.tokens.current(state, &inst).await.unwrap();
    assert_eq!(lease.version, 1);
    s.app
        .exec(
            "UPDATE installations SET access_token_sealed = ?, refresh_token_sealed = ?, \
             token_version = 2 WHERE id = ?",
            vec![
                state.sealer.seal("at-other").into(),
                state.sealer.seal("rt-other").into(),
                inst.clone().into(),
            ],
        )
        .await;
    let fresh = state.tokens.refresh_after(state, &inst, 1).await.unwrap();
    assert_eq!(fresh.token.0, "at-other");
    assert_eq!(
        s.crm.data().refresh_requests,
        0,
        "newer version: no refresh needed"
    );
    // Now the CRM refuses the refresh token for real.
    s.crm.data().reject_refresh = true;
    let err = state
        .tokens
        .refresh_after(state, &inst, 2)
        .await
        .unwrap_err();
    assert!(matches!(err, TokenError::Broken(_)), "{err:?}");
    assert_eq!(s.crm.data().refresh_requests, 1);
    let page = s.b.page("/admin/connectors").await;
    assert!(page.contains("reconnect needed"), "{page}");
    assert!(page.contains("Reconnect"));
    // A broken install refuses further use without calling the CRM.
    let err = state
        .tokens
        .call(state, &inst, |_, _| async { Ok::<_, ConnectorError>(()) })
        .await
        .unwrap_err();
    assert!(matches!(err, CallError::Token(TokenError::Broken(_))));
    // Reconnecting through OAuth heals it and keeps its id.
    s.crm.data().reject_refresh = false;
    let again = install(&s).await;
    assert_eq!(again, inst);
    let row = &s
        .app
        .rows(
            "SELECT status, last_error FROM installations WHERE id = ?",
            vec![inst.into()],
        )
        .await[0];
    assert_eq!(row["status"], "active");
    assert!(row["last_error"].is_null());
}

async fn rate_limits_and_outages_are_retried_without_a_second_log(backend: Backend) {
    let s = setup(backend).await;
    install(&s).await;
    map_agent(&s, AGENT, "u1").await;
    s.app.exotel_accepts("sid-429").await;
    let r = click(
        &s,
        json!({"account": "acct-1", "user": "u1", "phone": CUSTOMER,
               "record": {"object_type": "deal", "id": "d-1"}}),
        fakecrm::CLIENT_SECRET,
    )
    .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    s.crm.data().throttle_logs = 1;
    finish_call(&s, &s.app.last_status_callback().await, "sid-429").await;
    s.app.drain_jobs().await;
    let job = &s
        .app
        .rows(
            "SELECT state, attempts, run_at, last_error FROM jobs WHERE kind = 'crm'",
            vec![],
        )
        .await[0];
    assert_eq!(job["state"], "queued");
    let wait = job["run_at"].as_i64().unwrap() - callbridge::db::now_ms();
    assert!(wait > 5_000, "Retry-After: 7 honoured, got {wait} ms");
    assert!(s.crm.data().logs.is_empty());
    // Expired access token at the next try: refreshed, then logged once.
    s.crm.expire_access_tokens();
    s.app
        .exec("UPDATE jobs SET run_at = 0 WHERE kind = 'crm'", vec![])
        .await;
    s.app.drain_jobs().await;
    assert_eq!(s.crm.data().logs.len(), 1);
    assert_eq!(s.crm.data().refresh_requests, 1);
    let job = &s
        .app
        .rows(
            "SELECT state, attempts FROM jobs WHERE kind = 'crm'",
            vec![],
        )
        .await[0];
    assert_eq!(job["state"], "done");
    assert_eq!(job["attempts"], 2);
}

async fn uninstall_from_either_side_deletes_the_tokens(backend: Backend) {
    let s = setup(backend).await;
    install(&s).await;
    // From the console: revoked at the CRM with the refresh token, tokens deleted.
    let r = s.b.post("/admin/connectors/fakecrm/uninstall", &[]).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(s.crm.data().revoked, vec!["rt-1".to_owned()]);
    assert_eq!(s.app.count("installations").await, 0);
    // Without the CSRF token nothing happens.
    install(&s).await;
    let r =
        s.b.post_raw("/admin/connectors/fakecrm/uninstall", &[])
            .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(s.app.count("installations").await, 1);
    // From the CRM: a DELETE to the callback URL with our client credentials.
    let url = format!("{}/oauth/fakecrm/callback", s.app.base);
    let r = s
        .app
        .http
        .delete(&url)
        .basic_auth(fakecrm::CLIENT_ID, Some("wrong"))
        .json(&json!({"account": "acct-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(s.app.count("installations").await, 1);
    let r = s
        .app
        .http
        .delete(&url)
        .basic_auth(fakecrm::CLIENT_ID, Some(fakecrm::CLIENT_SECRET))
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = s
        .app
        .http
        .delete(&url)
        .basic_auth(fakecrm::CLIENT_ID, Some(fakecrm::CLIENT_SECRET))
        .json(&json!({"account": "acct-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap()["removed"], true);
    assert_eq!(s.app.count("installations").await, 0);
}

async fn marketplace_installs_need_a_signed_in_confirmation(backend: Backend) {
    let s = setup(backend).await;
    // The CRM's marketplace sends the admin straight to our callback with a code, no state.
    let code = "code-from-marketplace";
    s.crm.data().codes.insert(code.into(), None);
    let anon = Browser::new(&s.app);
    let r = anon
        .get(&format!("/oauth/fakecrm/callback?code={code}"))
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let confirm = location(&r);
    assert_eq!(
        confirm,
        format!("/admin/connectors/fakecrm/marketplace?code={code}")
    );
    // Not signed in: login first, and the code was not exchanged.
    let r = anon.get(&confirm).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert!(location(&r).starts_with("/admin/login"));
    assert!(s.crm.data().token_requests.is_empty());
    // Signed in: a confirmation page naming the tenant…
    let page = s.b.page(&confirm).await;
    assert!(page.contains("Acme"), "{page}");
    // …whose POST without CSRF does nothing…
    let r =
        s.b.post_raw(
            "/admin/connectors/fakecrm/marketplace",
            &[("query", &format!("code={code}"))],
        )
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(s.crm.data().token_requests.is_empty());
    // …and with it installs for this admin's tenant.
    let r =
        s.b.post(
            "/admin/connectors/fakecrm/marketplace",
            &[("query", &format!("code={code}"))],
        )
        .await;
    assert_eq!(
        r.status(),
        StatusCode::SEE_OTHER,
        "{}",
        r.text().await.unwrap()
    );
    assert_eq!(location(&r), "/admin/connectors?installed=fakecrm");
    let rows = s
        .app
        .rows("SELECT tenant_id FROM installations", vec![])
        .await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["tenant_id"], s.t.id.as_str());
}

async fn crm_users_are_imported_as_agents(backend: Backend) {
    let s = setup(backend).await;
    install(&s).await;
    let page = s.b.page("/admin/connectors/fakecrm/import").await;
    assert!(page.contains("Priya") && page.contains("Ravi"), "{page}");
    assert!(
        page.contains("+919876543210"),
        "the CRM's phone is prefilled"
    );
    let r =
        s.b.post(
            "/admin/connectors/fakecrm/import",
            &[
                ("name.u1", "Priya"),
                ("phone.u1", "+919876543210"),
                ("name.u2", "Ravi"),
                ("phone.u2", "not a phone"),
            ],
        )
        .await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body = r.text().await.unwrap();
    assert!(body.contains("1 agent saved"), "{body}");
    assert!(body.contains("Ravi"));
    let maps = s
        .app
        .rows(
            "SELECT a.phone, a.name, m.crm_user_id FROM agents a JOIN agent_crm_users m \
             ON m.agent_id = a.id WHERE a.tenant_id = ? AND m.connector = 'fakecrm'",
            vec![s.t.id.clone().into()],
        )
        .await;
    assert_eq!(maps.len(), 1);
    assert_eq!(maps[0]["crm_user_id"], "u1");
    assert_eq!(maps[0]["phone"], AGENT);
    assert_eq!(maps[0]["name"], "Priya");
}

async fn one_crm_account_belongs_to_one_tenant(backend: Backend) {
    let s = setup(backend).await;
    install(&s).await;
    // Tenant B's admin installs the same CRM account: refused, A's install untouched.
    let b_tenant = s.app.tenant_with(|t| t.name = "Beta".into()).await;
    callbridge::admin::users::create(&s.app.state.db, &b_tenant.id, "b@beta.example", PASSWORD)
        .await
        .unwrap();
    let b = Browser::new(&s.app);
    assert_eq!(
        b.login("b@beta.example", PASSWORD).await.status(),
        StatusCode::SEE_OTHER
    );
    let page = b.page("/admin/connectors").await;
    assert!(page.contains("not installed"), "B sees no install of A's");
    assert!(!page.contains("acct-1"));
    let callback = authorize(&s, &b).await;
    let r = b.http.get(&callback).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("another callbridge tenant")
    );
    let rows = s
        .app
        .rows("SELECT tenant_id FROM installations", vec![])
        .await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["tenant_id"], s.t.id.as_str());
    // B cannot uninstall A's connector: B has none.
    let r = b.post("/admin/connectors/fakecrm/uninstall", &[]).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(s.app.count("installations").await, 1);
}

async fn bad_clicks_are_refused_and_place_nothing(backend: Backend) {
    let s = setup(backend).await;
    install(&s).await;
    s.app.exotel_accepts("sid-never").await;
    let body = json!({"account": "acct-1", "user": "u1", "phone": CUSTOMER});
    // Wrong signature.
    assert_eq!(
        click(&s, body.clone(), "forged").await.status(),
        StatusCode::UNAUTHORIZED
    );
    // Not JSON.
    let r = s
        .app
        .http
        .post(format!("{}/crm/fakecrm/click", s.app.base))
        .header("x-fake-signature", fakecrm::CLIENT_SECRET)
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    // A CRM user mapped to no phone.
    let r = click(&s, body.clone(), fakecrm::CLIENT_SECRET).await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.text().await.unwrap().contains("not mapped"));
    // An account nobody installed.
    let r = click(
        &s,
        json!({"account": "acct-9", "user": "u1", "phone": CUSTOMER}),
        fakecrm::CLIENT_SECRET,
    )
    .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(s.app.count("calls").await, 0);
    assert!(s.app.connect_requests().await.is_empty());
}

async fn inbound_calls_are_written_back_to_the_agents_crm(backend: Backend) {
    let s = setup(backend).await;
    install(&s).await;
    map_agent(&s, "+917995679243", "u1").await;
    s.crm
        .data()
        .contacts
        .push(("+917709562799".into(), "c-caller".into()));
    // The seed guide's completed Passthru, with full numbers: the customer called the virtual
    // number and the flow connected the mapped agent.
    let query = "CallFrom=07709562799&CallSid=3edd4e59486d063b46403496ad3e1999&CallTo=07314853246\
        &CallType=completed&DialCallDuration=40&DialCallStatus=completed\
        &DialWhomNumber=07995679243&Direction=incoming&From=07709562799\
        &Legs[0][Number]=07995679243&Legs[0][Type]=single&Legs[0][OnCallDuration]=31\
        &Legs[0][CauseCode]=NORMAL_CLEARING&Legs[0][Cause]=16\
        &StartTime=2021-07-14%2015:40:07&To=07314853246";
    let r = s
        .app
        .http
        .get(format!("{}?{query}", s.t.created.passthru_url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    s.app.drain_jobs().await;
    let d = s.crm.data();
    assert_eq!(d.logs.len(), 1, "the inbound call is logged once");
    let log = &d.logs[0].1;
    assert_eq!(log["direction"], "inbound");
    assert_eq!(log["customer_number"], "+917709562799");
    assert_eq!(log["agent_number"], "+917995679243");
    assert_eq!(log["crm_user_id"], "u1");
    assert_eq!(
        log["crm_record"],
        json!({"object_type": "contact", "id": "c-caller"})
    );
}

/// Callbacks that arrive together are finalised in one batch statement (see `ingest`), which
/// also inserts each call's CRM job: every call gets exactly one, logged once.
async fn calls_finished_together_each_get_one_crm_job(backend: Backend) {
    let s = setup(backend).await;
    let inst = install(&s).await;
    map_agent(&s, AGENT, "u1").await;
    s.app.exotel_accepts_many("sid-wave-").await;
    let mut calls = Vec::new();
    for i in 0..24 {
        let customer = format!("+9198111111{i:02}");
        s.crm
            .data()
            .contacts
            .push((customer.clone(), format!("c-{i}")));
        calls.push(s.app.place(&s.t, &customer).await);
    }
    let statuses = futures_util::future::join_all(
        calls
            .iter()
            .map(|c| async { s.app.finish(c).await.status().as_u16() }),
    )
    .await;
    assert!(statuses.iter().all(|st| *st == 200), "{statuses:?}");
    let jobs = s
        .app
        .rows(
            "SELECT call_id, target, dedupe_key, message_id, state, max_attempts FROM jobs \
             WHERE kind = 'crm' ORDER BY call_id",
            vec![],
        )
        .await;
    assert_eq!(jobs.len(), calls.len(), "{jobs:?}");
    let mut ids: Vec<String> = calls.iter().map(|c| c.id.clone()).collect();
    ids.sort();
    for (job, id) in jobs.iter().zip(&ids) {
        assert_eq!(job["call_id"], id.as_str());
        assert_eq!(job["target"], "crm:fakecrm");
        assert_eq!(job["dedupe_key"], format!("{id}:crm:{inst}").as_str());
        assert_eq!(job["message_id"], format!("msg_{id}_{inst}").as_str());
        assert_eq!(job["state"], "queued");
        assert!(job["max_attempts"].as_i64().unwrap() > 1);
    }
    assert_eq!(s.app.count("call_reconcile").await, 0);
    // Repeats enqueue nothing more.
    for c in calls.iter().take(3) {
        assert_eq!(s.app.finish(c).await.status(), 200);
    }
    assert_eq!(s.app.count("jobs").await, calls.len() as i64);
    s.app.drain_jobs().await;
    assert_eq!(s.crm.data().logs.len(), calls.len());
}
