//! The reconciler: calls whose callback never came are looked up through Exotel's call-details
//! API and finalised through the same path as a callback, within a per-account budget.

use base64::Engine;
use callbridge::reconcile;
use serde_json::{Value, json};
use wiremock::{Mock, ResponseTemplate, matchers};

use crate::{both_backends, helpers::*};

both_backends!(
    a_lost_callback_is_reconciled,
    an_unfinished_call_is_asked_again_later,
    the_per_account_budget_limits_lookups,
    the_schedule_moves_out_of_calls_and_back,
);

fn basic_auth() -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("key123:token456")
    )
}

fn details(sid: &str, status: &str) -> Value {
    json!({"Call": {
        "Sid": sid, "ParentCallSid": null, "AccountSid": "acme1", "Status": status,
        "StartTime": "2019-04-08 03:17:59", "EndTime": "2019-04-08 03:18:36",
        "DateUpdated": "2019-04-08 03:18:36", "Direction": "outbound-api",
        "RecordingUrl": "https://s3-ap-southeast-1.amazonaws.com/exotelrecordings/acme1/r.mp3",
        "Details": {"ConversationDuration": 32, "Leg1Status": "completed",
                    "Leg2Status": "completed",
                    "Legs": [{"Leg": {"Id": 1, "OnCallDuration": 41}},
                             {"Leg": {"Id": 2, "OnCallDuration": 32}}]}
    }})
}

async fn a_lost_callback_is_reconciled(backend: Backend) {
    let app = TestApp::spawn_with(backend, |c| c.reconcile_after_secs = 0).await;
    let t = app.tenant(true).await;
    app.exotel_accepts_many("sidr").await;
    app.receiver_answers(200).await;
    let c = app.place(&t, "+919812345678").await;
    Mock::given(matchers::method("GET"))
        .and(matchers::path(format!(
            "/v1/Accounts/acme1/Calls/{}.json",
            c.sid
        )))
        .and(matchers::query_param("details", "true"))
        .and(matchers::header("authorization", basic_auth().as_str()))
        .respond_with(ResponseTemplate::new(200).set_body_json(details(&c.sid, "completed")))
        .mount(&app.exotel)
        .await;

    assert_eq!(reconcile::pass(&app.state).await.unwrap(), 1);
    let reqs = app.details_requests().await;
    assert_eq!(reqs.len(), 1);

    let v = app.view(&t, &c.id).await;
    assert_eq!(v["status"], "completed");
    assert_eq!(v["conversation_duration"], 32);
    assert_eq!(v["ended_at"], "2019-04-07T21:48:36Z");
    assert_eq!(
        v["legs"],
        json!([
            {"party": "agent", "status": "completed", "on_call_duration": 41},
            {"party": "customer", "status": "completed", "on_call_duration": 32}
        ])
    );
    let row = app.call_row(&c.id).await;
    assert_eq!(row["final_source"], "reconcile");
    assert!(app.schedule(&c.id).await.is_none(), "off the schedule");
    assert_eq!(app.count("jobs").await, 1);

    // Delivery goes out as for a callback.
    assert_eq!(app.drain_jobs().await, 1);
    let d = app.deliveries().await;
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].1["data"]["call_id"], c.id.as_str());
    assert_eq!(d[0].1["data"]["outcome"], "connected");

    // The late real callback is a duplicate: nothing changes, nothing more is delivered.
    let r = app.finish(&c).await;
    assert_eq!(r.status(), 200);
    assert_eq!(app.call_row(&c.id).await, row);
    assert_eq!(app.count("jobs").await, 1);
    assert_eq!(app.drain_jobs().await, 0);

    // A finished call is never asked about again.
    assert_eq!(reconcile::pass(&app.state).await.unwrap(), 0);
    assert_eq!(app.details_requests().await.len(), 1);
}

async fn an_unfinished_call_is_asked_again_later(backend: Backend) {
    let app = TestApp::spawn_with(backend, |c| c.reconcile_after_secs = 0).await;
    let t = app.tenant(true).await;
    app.exotel_accepts_many("sidu").await;
    let c = app.place(&t, "+919812345678").await;
    Mock::given(matchers::method("GET"))
        .and(matchers::path(format!(
            "/v1/Accounts/acme1/Calls/{}.json",
            c.sid
        )))
        .and(matchers::header("authorization", basic_auth().as_str()))
        .respond_with(ResponseTemplate::new(200).set_body_json(details(&c.sid, "in-progress")))
        .mount(&app.exotel)
        .await;

    let before = callbridge::db::now_ms();
    assert_eq!(reconcile::pass(&app.state).await.unwrap(), 0);
    assert_eq!(app.details_requests().await.len(), 1);
    let row = app.call_row(&c.id).await;
    assert!(row["finalized_at"].is_null());
    assert_eq!(row["status"], "in-progress");
    let (next, attempts) = app.schedule(&c.id).await.expect("rescheduled");
    assert_eq!(attempts, 1);
    assert!(
        next >= before + 60_000,
        "asked again too soon: {next} vs {before}"
    );
    assert_eq!(app.count("jobs").await, 0);

    // Not due yet: the next pass does not ask.
    assert_eq!(reconcile::pass(&app.state).await.unwrap(), 0);
    assert_eq!(app.details_requests().await.len(), 1);

    // Due again: asked again; this time it ended.
    app.exotel.reset().await;
    Mock::given(matchers::method("GET"))
        .and(matchers::path(format!(
            "/v1/Accounts/acme1/Calls/{}.json",
            c.sid
        )))
        .respond_with(ResponseTemplate::new(200).set_body_json(details(&c.sid, "no-answer")))
        .mount(&app.exotel)
        .await;
    app.exec(
        "UPDATE call_reconcile SET due_at = ? WHERE call_id = ?",
        vec![(callbridge::db::now_ms() - 1).into(), c.id.clone().into()],
    )
    .await;
    assert_eq!(reconcile::pass(&app.state).await.unwrap(), 1);
    assert_eq!(app.view(&t, &c.id).await["status"], "no-answer");
    assert_eq!(app.count("jobs").await, 1);
}

async fn the_per_account_budget_limits_lookups(backend: Backend) {
    let app = TestApp::spawn_with(backend, |c| {
        c.reconcile_after_secs = 0;
        c.reconcile_per_minute = 2;
        c.reconcile_interval_secs = 60;
    })
    .await;
    let t = app.tenant(true).await;
    app.exotel_accepts_many("sidb").await;
    let mut calls = Vec::new();
    for i in 0..5 {
        calls.push(app.place(&t, &format!("+9198123456{i:02}")).await);
    }
    for c in &calls {
        Mock::given(matchers::method("GET"))
            .and(matchers::path(format!(
                "/v1/Accounts/acme1/Calls/{}.json",
                c.sid
            )))
            .respond_with(ResponseTemplate::new(200).set_body_json(details(&c.sid, "completed")))
            .mount(&app.exotel)
            .await;
    }

    assert_eq!(reconcile::pass(&app.state).await.unwrap(), 2);
    assert_eq!(app.details_requests().await.len(), 2);
    // The calls over budget were released for the next pass, not counted as attempts.
    let waiting = app
        .rows(
            "SELECT r.attempts FROM call_reconcile r JOIN calls c ON c.id = r.call_id \
             WHERE c.finalized_at IS NULL",
            vec![],
        )
        .await;
    assert_eq!(waiting.len(), 3);
    assert!(waiting.iter().all(|r| r["attempts"] == 0), "{waiting:?}");

    assert_eq!(reconcile::pass(&app.state).await.unwrap(), 2);
    assert_eq!(app.details_requests().await.len(), 4);
    assert_eq!(reconcile::pass(&app.state).await.unwrap(), 1);
    assert_eq!(app.details_requests().await.len(), 5);
    assert_eq!(reconcile::pass(&app.state).await.unwrap(), 0);
    assert_eq!(app.details_requests().await.len(), 5);
    assert_eq!(app.count("jobs").await, 5);
}

/// Migration 000006 on a database that already has calls: open calls keep their place and
/// attempts on the reconciler's schedule, final ones are not scheduled, and `down` restores the
/// old columns.
async fn the_schedule_moves_out_of_calls_and_back(backend: Backend) {
    use migration::MigratorTrait;
    use sea_orm::{ConnectionTrait, Database};

    let dir = tempfile::tempdir().unwrap();
    let url = test_config(backend, dir.path()).await.database_url;
    let db = Database::connect(&url).await.unwrap();
    migration::Migrator::up(&db, Some(5)).await.unwrap();
    let b = db.get_database_backend();
    let exec = |sql: &str| {
        let db = &db;
        let sql = sql.to_owned();
        async move {
            db.execute_raw(sea_orm::Statement::from_string(b, sql))
                .await
                .unwrap();
        }
    };
    exec(
        "INSERT INTO tenants (id, name, exotel_sid, exotel_api_key, exotel_api_token_sealed, \
         exotel_api_base, default_region, record, api_key_hash, api_key_last4, flow_token_hash, \
         flow_token_sealed, created_at, updated_at) VALUES ('ten_1', 't', 's', 'k', 'x', \
         'http://e', 'IN', false, 'h', '1234', 'fh', 'x', 1, 1)",
    )
    .await;
    for (id, due, attempts, finalized) in [
        ("call_open", "1700000000000", 3, "NULL"),
        ("call_final", "NULL", 0, "1700000000001"),
    ] {
        exec(&format!(
            "INSERT INTO calls (id, tenant_id, token_hash, direction, from_number, to_number, \
             record, exotel_call_sid, status, finalized_at, reconcile_attempts, \
             next_reconcile_at, created_at, updated_at) VALUES ('{id}', 'ten_1', '{id}', \
             'outbound', '+1', '+2', false, 'sid_{id}', 'ringing', {finalized}, {attempts}, \
             {due}, 1, 1)"
        ))
        .await;
    }

    migration::Migrator::up(&db, None).await.unwrap();
    let rows = db
        .query_all_raw(sea_orm::Statement::from_string(
            b,
            "SELECT call_id, due_at, attempts FROM call_reconcile",
        ))
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        rows[0].try_get::<String>("", "call_id").unwrap(),
        "call_open"
    );
    assert_eq!(
        rows[0].try_get::<i64>("", "due_at").unwrap(),
        1_700_000_000_000
    );
    assert_eq!(rows[0].try_get::<i32>("", "attempts").unwrap(), 3);
    assert!(
        db.query_one_raw(sea_orm::Statement::from_string(
            b,
            "SELECT next_reconcile_at FROM calls"
        ))
        .await
        .is_err(),
        "the old column is gone"
    );

    migration::Migrator::down(&db, Some(1)).await.unwrap();
    let back = db
        .query_all_raw(sea_orm::Statement::from_string(
            b,
            "SELECT id, next_reconcile_at, reconcile_attempts FROM calls ORDER BY id",
        ))
        .await
        .unwrap();
    let got: Vec<(String, Option<i64>, i32)> = back
        .iter()
        .map(|r| {
            (
                r.try_get("", "id").unwrap(),
                r.try_get("", "next_reconcile_at").unwrap(),
                r.try_get("", "reconcile_attempts").unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("call_final".to_owned(), None, 0),
            ("call_open".to_owned(), Some(1_700_000_000_000), 3),
        ]
    );
    db.close().await.unwrap();
}
