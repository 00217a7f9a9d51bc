//! Webhook delivery: Standard Webhooks signatures checked independently, retries with a stable
//! `webhook-id`, `Retry-After`, dead-lettering, payload shape, durability across restarts and
//! expired leases, and the real worker loop.

use std::time::Duration;

use callbridge::jobs;
use serde_json::{Value, json};
use wiremock::{Mock, ResponseTemplate, matchers};

use crate::{both_backends, helpers::*};

both_backends!(
    a_delivery_is_signed_and_carries_the_call,
    a_failed_delivery_is_retried_with_the_same_id,
    retry_after_is_honoured,
    a_receiver_that_always_fails_dead_letters_the_job,
    gone_dead_letters_at_once,
    an_unreachable_receiver_is_retried,
    a_tenant_without_webhook_gets_no_job,
    a_job_survives_a_restart,
    an_expired_lease_is_claimed_again,
    the_worker_loop_delivers_on_its_own,
);

/// Place a call and post its final callback; returns the call.
async fn finished_call(app: &TestApp, t: &TestTenant) -> PlacedCall {
    let c = app.place(t, "+919812345678").await;
    let r = app.finish(&c).await;
    assert_eq!(r.status(), 200);
    c
}

fn header<'a>(req: &'a wiremock::Request, name: &str) -> &'a str {
    req.headers
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
}

async fn a_delivery_is_signed_and_carries_the_call(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let t = app.tenant(true).await;
    app.exotel_accepts_many("sidw").await;
    app.receiver_answers(204).await;
    let r = app
        .post_call(
            &t.api_key,
            json!({"from": "09876543210", "to": "09812345678", "custom_field": "deal-7"}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let url = app.last_status_callback().await;
    let r = app
        .callback(
            &url,
            "application/json",
            guide_callback("sidw0000").to_string(),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(app.drain_jobs().await, 1);

    let reqs = app.raw_deliveries().await;
    assert_eq!(reqs.len(), 1);
    let req = &reqs[0];
    assert!(header(req, "content-type").starts_with("application/json"));
    let msg_id = header(req, "webhook-id");
    assert!(!msg_id.is_empty());
    let ts = header(req, "webhook-timestamp");
    let ts_num: i64 = ts.parse().expect("webhook-timestamp is Unix seconds");
    assert!((ts_num - chrono::Utc::now().timestamp()).abs() < 300);
    let sig = header(req, "webhook-signature");
    assert!(sig.starts_with("v1,"), "{sig}");
    let secret = t.webhook_secret.as_deref().unwrap();
    assert!(
        standard_webhooks_valid(secret, msg_id, ts, &req.body, sig),
        "signature does not verify"
    );
    // The check can fail: a tampered body, another id or another secret do not verify.
    let mut tampered = req.body.clone();
    tampered.push(b' ');
    assert!(!standard_webhooks_valid(secret, msg_id, ts, &tampered, sig));
    assert!(!standard_webhooks_valid(
        secret,
        "msg_other",
        ts,
        &req.body,
        sig
    ));
    let other = app.tenant(true).await;
    assert!(!standard_webhooks_valid(
        other.webhook_secret.as_deref().unwrap(),
        msg_id,
        ts,
        &req.body,
        sig
    ));

    let body: Value = serde_json::from_slice(&req.body).unwrap();
    assert_eq!(body["type"], "call.completed");
    assert!(body["timestamp"].as_str().is_some());
    let d = &body["data"];
    assert_eq!(d["call_id"], id.as_str());
    assert_eq!(d["exotel_call_sid"], "sidw0000");
    assert_eq!(d["outcome"], "connected");
    assert_eq!(d["status"], "completed");
    assert_eq!(d["agent_number"], "+919876543210");
    assert_eq!(d["customer_number"], "+919812345678");
    assert_eq!(d["virtual_number"], "+918047112233");
    assert_eq!(d["conversation_duration"], 32);
    assert_eq!(d["custom_field"], "deal-7");
    assert_eq!(d["ended_at"], "2019-04-07T21:48:36Z");
    let legs = d["legs"].as_array().unwrap();
    assert_eq!(legs.len(), 2);
    assert_eq!(legs[0]["party"], "agent");
    assert_eq!(legs[0]["number"], "+919876543210");
    assert_eq!(legs[0]["on_call_duration"], 41);
    assert_eq!(legs[1]["party"], "customer");
    assert_eq!(legs[1]["number"], "+919812345678");
    assert_eq!(legs[1]["on_call_duration"], 32);

    let v = app.view(&t, &id).await;
    assert_eq!(v["writeback"]["state"], "done");
    assert_eq!(v["writeback"]["attempts"], 1);
    assert_eq!(v["writeback"]["targets"][0]["last_status"], 204);
}

async fn a_failed_delivery_is_retried_with_the_same_id(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let t = app.tenant(true).await;
    app.exotel_accepts_many("sidr").await;
    Mock::given(matchers::method("POST"))
        .and(matchers::path("/hook"))
        .respond_with(ResponseTemplate::new(500).set_body_string("boom"))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&app.receiver)
        .await;
    app.receiver_answers(200).await;
    let c = finished_call(&app, &t).await;

    // Zero backoff in tests: the retry is due at once, so one drain runs both attempts.
    assert_eq!(app.drain_jobs().await, 2);
    let reqs = app.raw_deliveries().await;
    assert_eq!(reqs.len(), 2);
    assert_eq!(
        header(&reqs[0], "webhook-id"),
        header(&reqs[1], "webhook-id")
    );
    let secret = t.webhook_secret.as_deref().unwrap();
    for r in &reqs {
        assert!(standard_webhooks_valid(
            secret,
            header(r, "webhook-id"),
            header(r, "webhook-timestamp"),
            &r.body,
            header(r, "webhook-signature")
        ));
    }

    let jobs = app.jobs().await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["state"], "done");
    assert_eq!(jobs[0]["attempts"], 2);
    assert_eq!(jobs[0]["last_status"], 200);
    let attempts = app
        .rows(
            "SELECT attempt, http_status, outcome, error FROM job_attempts WHERE job_id = ? \
             ORDER BY attempt",
            vec![jobs[0]["id"].as_i64().unwrap().into()],
        )
        .await;
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0]["attempt"], 1);
    assert_eq!(attempts[0]["http_status"], 500);
    assert_eq!(attempts[0]["outcome"], "retry");
    assert!(attempts[0]["error"].as_str().unwrap().contains("500"));
    assert_eq!(attempts[1]["attempt"], 2);
    assert_eq!(attempts[1]["http_status"], 200);
    assert_eq!(attempts[1]["outcome"], "ok");
    assert_eq!(app.view(&t, &c.id).await["writeback"]["state"], "done");
}

async fn retry_after_is_honoured(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let t = app.tenant(true).await;
    app.exotel_accepts_many("sida").await;
    Mock::given(matchers::method("POST"))
        .and(matchers::path("/hook"))
        .respond_with(ResponseTemplate::new(429).insert_header("Retry-After", "120"))
        .mount(&app.receiver)
        .await;
    finished_call(&app, &t).await;
    let before = callbridge::db::now_ms();
    assert_eq!(app.drain_jobs().await, 1);
    let after = callbridge::db::now_ms();
    let jobs = app.jobs().await;
    assert_eq!(jobs[0]["state"], "queued");
    assert_eq!(jobs[0]["attempts"], 1);
    assert_eq!(jobs[0]["last_status"], 429);
    let run_at = jobs[0]["run_at"].as_i64().unwrap();
    assert!(
        run_at >= before + 120_000 && run_at <= after + 120_000,
        "run_at {run_at} is not now+120 s ({before}..{after})"
    );
    // Not due yet: an immediate drain does nothing.
    assert_eq!(app.drain_jobs().await, 0);
    assert_eq!(app.raw_deliveries().await.len(), 1);

    // Once due it runs again.
    app.exec(
        "UPDATE jobs SET run_at = ? WHERE id = ?",
        vec![
            (callbridge::db::now_ms() - 1).into(),
            jobs[0]["id"].as_i64().unwrap().into(),
        ],
    )
    .await;
    assert_eq!(app.drain_jobs().await, 1);
    assert_eq!(app.raw_deliveries().await.len(), 2);
}

async fn a_receiver_that_always_fails_dead_letters_the_job(backend: Backend) {
    let app = TestApp::spawn_with(backend, |c| c.job_max_attempts = 3).await;
    let t = app.tenant(true).await;
    app.exotel_accepts_many("sidf").await;
    Mock::given(matchers::method("POST"))
        .and(matchers::path("/hook"))
        .respond_with(ResponseTemplate::new(500).set_body_string("database on fire"))
        .mount(&app.receiver)
        .await;
    let c = finished_call(&app, &t).await;
    assert_eq!(app.drain_jobs().await, 3);
    assert_eq!(app.drain_jobs().await, 0);
    assert_eq!(app.raw_deliveries().await.len(), 3);
    let jobs = app.jobs().await;
    assert_eq!(jobs[0]["state"], "dead");
    assert_eq!(jobs[0]["attempts"], 3);
    let err = jobs[0]["last_error"].as_str().unwrap();
    assert!(err.contains("500") && err.contains("3 attempts"), "{err}");
    assert_eq!(app.count("job_attempts").await, 3);
    let v = app.view(&t, &c.id).await;
    assert_eq!(v["writeback"]["state"], "dead");
    assert_eq!(v["writeback"]["attempts"], 3);
    assert!(
        v["writeback"]["last_error"]
            .as_str()
            .unwrap()
            .contains("500")
    );
}

async fn gone_dead_letters_at_once(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let t = app.tenant(true).await;
    app.exotel_accepts_many("sidz").await;
    app.receiver_answers(410).await;
    finished_call(&app, &t).await;
    assert_eq!(app.drain_jobs().await, 1);
    assert_eq!(app.drain_jobs().await, 0);
    let jobs = app.jobs().await;
    assert_eq!(jobs[0]["state"], "dead");
    assert_eq!(jobs[0]["attempts"], 1);
    assert_eq!(jobs[0]["last_status"], 410);
    assert!(jobs[0]["last_error"].as_str().unwrap().contains("410"));
    assert_eq!(app.raw_deliveries().await.len(), 1);
}

async fn an_unreachable_receiver_is_retried(backend: Backend) {
    let app = TestApp::spawn_with(backend, |c| c.job_max_attempts = 2).await;
    // A port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let t = app
        .tenant_with(|n| n.webhook_url = Some(format!("http://127.0.0.1:{port}/hook")))
        .await;
    app.exotel_accepts_many("sidn").await;
    finished_call(&app, &t).await;
    assert_eq!(app.drain_jobs().await, 2);
    let jobs = app.jobs().await;
    assert_eq!(jobs[0]["state"], "dead");
    assert_eq!(jobs[0]["attempts"], 2);
    assert!(jobs[0]["last_status"].is_null());
    let attempts = app
        .rows(
            "SELECT outcome, error FROM job_attempts ORDER BY attempt",
            vec![],
        )
        .await;
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0]["outcome"], "retry");
    assert!(
        attempts[0]["error"]
            .as_str()
            .unwrap()
            .contains("could not reach the receiver"),
        "{attempts:?}"
    );
    assert_eq!(attempts[1]["outcome"], "dead");
}

async fn a_tenant_without_webhook_gets_no_job(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let t = app.tenant(false).await;
    assert!(t.webhook_secret.is_none());
    app.exotel_accepts_many("sidq").await;
    let c = finished_call(&app, &t).await;
    assert_eq!(app.count("jobs").await, 0);
    assert_eq!(app.drain_jobs().await, 0);
    let v = app.view(&t, &c.id).await;
    assert_eq!(v["status"], "completed");
    assert_eq!(v["writeback"]["state"], "none");
}

async fn a_job_survives_a_restart(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let t = app.tenant(true).await;
    app.exotel_accepts_many("sidt").await;
    app.receiver_answers(200).await;
    let c = finished_call(&app, &t).await;
    let app = app.restart(|_| {}).await;
    assert_eq!(app.drain_jobs().await, 1);
    assert_eq!(app.drain_jobs().await, 0);
    let d = app.deliveries().await;
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].1["data"]["call_id"], c.id.as_str());
    assert_eq!(app.view(&t, &c.id).await["writeback"]["state"], "done");
}

async fn an_expired_lease_is_claimed_again(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let t = app.tenant(true).await;
    app.exotel_accepts_many("sidl").await;
    app.receiver_answers(200).await;
    finished_call(&app, &t).await;

    // A worker claims the job and dies without finishing it.
    let lost = jobs::claim(&app.state.db, 10, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(lost.len(), 1);
    assert_eq!(lost[0].attempt, 1);
    // While the lease holds, nobody else takes it.
    assert_eq!(app.drain_jobs().await, 0);
    assert_eq!(app.jobs().await[0]["state"], "running");

    // The lease runs out.
    app.exec(
        "UPDATE jobs SET locked_until = ? WHERE id = ?",
        vec![(callbridge::db::now_ms() - 1000).into(), lost[0].id.into()],
    )
    .await;
    assert_eq!(app.drain_jobs().await, 1);
    assert_eq!(app.raw_deliveries().await.len(), 1);
    let job = &app.jobs().await[0];
    assert_eq!(job["state"], "done");
    assert_eq!(job["attempts"], 2);

    // The first worker wakes up and reports a failure: fenced out, nothing changes.
    jobs::finish(
        &app.state,
        &lost[0],
        &jobs::Delivery::Permanent {
            status: Some(500),
            error: "stale".into(),
        },
        callbridge::db::now_ms(),
        Duration::from_millis(5),
    )
    .await
    .unwrap();
    let job_after = &app.jobs().await[0];
    assert_eq!(job_after["state"], "done");
    assert!(job_after["last_error"].is_null());
    assert_eq!(app.count("job_attempts").await, 1);
}

async fn the_worker_loop_delivers_on_its_own(backend: Backend) {
    let app = TestApp::spawn_with(backend, |c| c.worker_enabled = true).await;
    let t = app.tenant(true).await;
    app.exotel_accepts_many("sidy").await;
    app.receiver_answers(200).await;
    let c = finished_call(&app, &t).await;
    let a = &app;
    let delivered = eventually(Duration::from_secs(15), move || async move {
        !a.raw_deliveries().await.is_empty()
    })
    .await;
    assert!(delivered, "the worker did not deliver within 15 s");
    let done = eventually(Duration::from_secs(15), move || async move {
        a.jobs().await[0]["state"] == "done"
    })
    .await;
    assert!(done, "the job was not marked done");
    assert_eq!(app.raw_deliveries().await.len(), 1);
    let d = app.deliveries().await;
    assert_eq!(d[0].1["data"]["call_id"], c.id.as_str());
}
