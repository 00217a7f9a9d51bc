//! `POST /hooks/exotel/status/{token}`: every body shape Exotel sends, the resulting call view,
//! rejections that write nothing, idempotency, and group commit under concurrency.

use serde_json::{Value, json};

use crate::{both_backends, helpers::*};

both_backends!(
    the_guides_json_callback_finalises_the_call,
    a_multipart_callback_is_read,
    urlencoded_callbacks_with_encoded_and_raw_brackets,
    rejected_callbacks_write_nothing,
    an_oversize_callback_is_413_and_writes_nothing,
    a_repeated_callback_changes_nothing,
    a_progress_callback_updates_without_finalising,
    a_callback_for_another_callsid_is_400,
    concurrent_identical_callbacks_enqueue_one_job,
    concurrent_callbacks_for_many_calls_all_commit,
    finalising_a_call_changes_no_indexed_column,
);

async fn the_guides_json_callback_finalises_the_call(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let t = app.tenant(true).await;
    app.exotel_accepts_many("sidj").await;
    let c = app.place(&t, "+919812345678").await;
    let before = app.view(&t, &c.id).await;
    assert_eq!(before["status"], "in-progress");
    assert!(before["ended_at"].is_null());

    let r = app.finish(&c).await;
    assert_eq!(r.status(), 200);

    let v = app.view(&t, &c.id).await;
    assert_eq!(v["status"], "completed");
    assert_eq!(v["exotel_call_sid"], c.sid.as_str());
    assert_eq!(v["conversation_duration"], 32);
    // Exotel's times are IST without an offset.
    assert_eq!(v["started_at"], "2019-04-07T21:47:59Z");
    assert_eq!(v["ended_at"], "2019-04-07T21:48:36Z");
    assert_eq!(
        v["recording_url"],
        "https://s3-ap-southeast-1.amazonaws.com/exotelrecordings/acme1/xxdewfcwsdw.mp3"
    );
    assert_eq!(
        v["legs"],
        json!([
            {"party": "agent", "status": "completed", "on_call_duration": 41},
            {"party": "customer", "status": "completed", "on_call_duration": 32}
        ])
    );
    assert_eq!(v["writeback"]["state"], "pending");
    let jobs = app.jobs().await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["call_id"], c.id.as_str());
    assert_eq!(jobs[0]["state"], "queued");
    let row = app.call_row(&c.id).await;
    assert_eq!(row["final_source"], "callback");
    // The raw payload is kept for audit.
    let raw: Value = serde_json::from_str(row["final_payload"].as_str().unwrap()).unwrap();
    assert_eq!(raw["PhoneNumberSid"], "0113083XXXX");
}

async fn a_multipart_callback_is_read(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let t = app.tenant(true).await;
    app.exotel_accepts_many("sidm").await;
    let c = app.place(&t, "+919812345678").await;
    // Exotel's default: multipart/form-data, every value a string, no RecordingUrl, and
    // fields we do not know.
    let (ct, body) = multipart(&[
        ("CallSid", &c.sid),
        ("EventType", "terminal"),
        ("Status", "no-answer"),
        ("DateUpdated", "2026-11-26 10:01:05"),
        ("StartTime", "2026-11-26 10:00:00"),
        ("EndTime", "2026-11-26 10:01:05"),
        ("ConversationDuration", "0"),
        ("Legs[0][Status]", "completed"),
        ("Legs[0][OnCallDuration]", "45"),
        ("Legs[1][Status]", "no-answer"),
        ("Legs[1][OnCallDuration]", "0"),
        ("SomethingNew", "whatever"),
    ]);
    let r = app.callback(&c.url, &ct, body).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let v = app.view(&t, &c.id).await;
    assert_eq!(v["status"], "no-answer");
    assert!(v["recording_url"].is_null());
    assert_eq!(v["conversation_duration"], 0);
    assert_eq!(v["started_at"], "2026-11-26T04:30:00Z");
    assert_eq!(v["ended_at"], "2026-11-26T04:31:05Z");
    assert_eq!(
        v["legs"],
        json!([
            {"party": "agent", "status": "completed", "on_call_duration": 45},
            {"party": "customer", "status": "no-answer", "on_call_duration": 0}
        ])
    );
    assert_eq!(app.count("jobs").await, 1);
    let row = app.call_row(&c.id).await;
    let raw: Value = serde_json::from_str(row["final_payload"].as_str().unwrap()).unwrap();
    assert_eq!(raw["SomethingNew"], "whatever");
}

async fn urlencoded_callbacks_with_encoded_and_raw_brackets(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let t = app.tenant(true).await;
    app.exotel_accepts_many("sidu").await;
    let a = app.place(&t, "+919812345678").await;
    let b = app.place(&t, "+919812345679").await;

    let encoded = format!(
        "CallSid={}&Status=completed&StartTime=2019-04-08+03%3A17%3A59&\
         EndTime=2019-04-08+03%3A18%3A36&ConversationDuration=32&\
         Legs%5B0%5D%5BStatus%5D=completed&Legs%5B0%5D%5BOnCallDuration%5D=41&\
         Legs%5B1%5D%5BStatus%5D=completed&Legs%5B1%5D%5BOnCallDuration%5D=32&Unknown=1",
        a.sid
    );
    let raw = format!(
        "CallSid={}&Status=busy&EndTime=2019-04-08 03:18:36&ConversationDuration=0&\
         Legs[0][Status]=completed&Legs[0][OnCallDuration]=12&\
         Legs[1][Status]=busy&Legs[1][OnCallDuration]=0",
        b.sid
    );
    for (url, body) in [(&a.url, encoded), (&b.url, raw)] {
        let r = app
            .callback(url, "application/x-www-form-urlencoded", body)
            .await;
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
    let va = app.view(&t, &a.id).await;
    assert_eq!(va["status"], "completed");
    assert_eq!(va["conversation_duration"], 32);
    assert_eq!(va["started_at"], "2019-04-07T21:47:59Z");
    assert_eq!(va["ended_at"], "2019-04-07T21:48:36Z");
    assert_eq!(
        va["legs"],
        json!([
            {"party": "agent", "status": "completed", "on_call_duration": 41},
            {"party": "customer", "status": "completed", "on_call_duration": 32}
        ])
    );
    let vb = app.view(&t, &b.id).await;
    assert_eq!(vb["status"], "busy");
    assert_eq!(vb["ended_at"], "2019-04-07T21:48:36Z");
    assert_eq!(
        vb["legs"],
        json!([
            {"party": "agent", "status": "completed", "on_call_duration": 12},
            {"party": "customer", "status": "busy", "on_call_duration": 0}
        ])
    );
    assert_eq!(app.count("jobs").await, 2);
}

/// Assert a rejected callback changed nothing.
async fn assert_untouched(app: &TestApp, id: &str, before: &Value, what: &str) {
    assert_eq!(&app.call_row(id).await, before, "{what} changed the call");
    assert_eq!(app.count("jobs").await, 0, "{what} enqueued a job");
}

async fn rejected_callbacks_write_nothing(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let t = app.tenant(true).await;
    app.exotel_accepts_many("sidx").await;
    let c = app.place(&t, "+919812345678").await;
    let before = app.call_row(&c.id).await;
    let token = c.url.rsplit('/').next().unwrap().to_owned();
    let good = guide_callback(&c.sid);

    // Unknown tokens.
    for bad_url in [
        format!(
            "{}/hooks/exotel/status/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            app.base
        ),
        format!("{}/hooks/exotel/status/short", app.base),
        format!("{}/hooks/exotel/status/{}", app.base, c.id),
        format!("{}/hooks/exotel/status/{}x", app.base, token),
    ] {
        let r = app
            .callback(&bad_url, "application/json", good.to_string())
            .await;
        assert_eq!(r.status(), 404, "{bad_url}");
        let err: Value = r.json().await.unwrap();
        assert_eq!(err["code"], "not_found");
        assert_untouched(&app, &c.id, &before, &bad_url).await;
    }

    let with = |k: &str, v: Value| {
        let mut b = good.clone();
        b[k] = v;
        b.to_string()
    };
    let without = |k: &str| {
        let mut b = good.clone();
        b.as_object_mut().unwrap().remove(k);
        b.to_string()
    };
    let mut bad_leg = good.clone();
    bad_leg["Legs"][1]["OnCallDuration"] = json!(-3);
    let malformed: Vec<(&str, String)> = vec![
        ("bad JSON", r#"{"CallSid": "x", "Status": "#.to_owned()),
        ("a JSON list", "[1, 2]".to_owned()),
        ("missing CallSid", without("CallSid")),
        ("missing Status", without("Status")),
        ("empty Status", with("Status", json!(""))),
        ("unknown status", with("Status", json!("exploded"))),
        ("negative duration", with("ConversationDuration", json!(-5))),
        (
            "garbage duration",
            with("ConversationDuration", json!("ten")),
        ),
        ("negative leg duration", bad_leg.to_string()),
        ("legs not a list", with("Legs", json!("two"))),
        ("CallSid with junk", with("CallSid", json!("a b;c"))),
    ];
    for (what, body) in malformed {
        let r = app.callback(&c.url, "application/json", body).await;
        assert_eq!(r.status(), 400, "{what}");
        let err: Value = r.json().await.unwrap();
        assert_eq!(err["code"], "bad_request", "{what}");
        assert_untouched(&app, &c.id, &before, what).await;
    }
    // The same in form encodings.
    for (ct, body) in [
        (
            "application/x-www-form-urlencoded",
            format!("CallSid={}&Status=completed&ConversationDuration=-1", c.sid),
        ),
        (
            "application/x-www-form-urlencoded",
            format!("CallSid={}&Status=completed&Legs[99][Status]=busy", c.sid),
        ),
        (
            "application/x-www-form-urlencoded",
            "Status=completed".to_owned(),
        ),
        (
            "multipart/form-data; boundary=nothere",
            "garbage".to_owned(),
        ),
    ] {
        let r = app.callback(&c.url, ct, body.clone()).await;
        assert_eq!(r.status(), 400, "{ct} {body}");
        assert_untouched(&app, &c.id, &before, &body).await;
    }
    let (ct, body) = multipart(&[
        ("CallSid", &c.sid),
        ("Status", "completed"),
        ("ConversationDuration", "abc"),
    ]);
    let r = app.callback(&c.url, &ct, body).await;
    assert_eq!(r.status(), 400);
    assert_untouched(&app, &c.id, &before, "multipart garbage number").await;

    // Unsupported content types.
    for ct in ["text/plain", "application/xml"] {
        let r = app.callback(&c.url, ct, good.to_string()).await;
        assert_eq!(r.status(), 415, "{ct}");
        let err: Value = r.json().await.unwrap();
        assert_eq!(err["code"], "unsupported_media_type");
        assert_untouched(&app, &c.id, &before, ct).await;
    }

    // After all that, the real callback still lands.
    let r = app
        .callback(&c.url, "application/json", good.to_string())
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(app.count("jobs").await, 1);
}

async fn an_oversize_callback_is_413_and_writes_nothing(backend: Backend) {
    let app = TestApp::spawn_with(backend, |c| c.callback_body_limit = 2048).await;
    let t = app.tenant(true).await;
    app.exotel_accepts_many("sido").await;
    let c = app.place(&t, "+919812345678").await;
    let before = app.call_row(&c.id).await;
    let mut body = guide_callback(&c.sid);
    body["Padding"] = json!("p".repeat(4096));
    let r = app
        .callback(&c.url, "application/json", body.to_string())
        .await;
    assert_eq!(r.status(), 413);
    let err: Value = r.json().await.unwrap();
    assert_eq!(err["code"], "payload_too_large");
    assert_untouched(&app, &c.id, &before, "oversize body").await;

    // Just under the limit is fine.
    let small = guide_callback(&c.sid).to_string();
    assert!(small.len() < 2048);
    let r = app.callback(&c.url, "application/json", small).await;
    assert_eq!(r.status(), 200);
}

async fn a_repeated_callback_changes_nothing(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let t = app.tenant(true).await;
    app.exotel_accepts_many("sidp").await;
    let c = app.place(&t, "+919812345678").await;
    let r = app.finish(&c).await;
    assert_eq!(r.status(), 200);
    let after_first = app.call_row(&c.id).await;
    let jobs_first = app.jobs().await;
    assert_eq!(jobs_first.len(), 1);

    let r = app.finish(&c).await;
    assert_eq!(r.status(), 200);
    // A different terminal status after the final one does not rewrite history either.
    let mut other = guide_callback(&c.sid);
    other["Status"] = json!("busy");
    other["ConversationDuration"] = json!(0);
    let r = app
        .callback(&c.url, "application/json", other.to_string())
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(app.call_row(&c.id).await, after_first);
    assert_eq!(app.jobs().await, jobs_first);
}

async fn a_callback_for_another_callsid_is_400(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let t = app.tenant(true).await;
    app.exotel_accepts_many("sids").await;
    let c = app.place(&t, "+919812345678").await;
    let before = app.call_row(&c.id).await;
    let r = app
        .callback(
            &c.url,
            "application/json",
            guide_callback("someoneelse123").to_string(),
        )
        .await;
    assert_eq!(r.status(), 400);
    let err: Value = r.json().await.unwrap();
    assert!(err["detail"].as_str().unwrap().contains("CallSid"));
    assert_untouched(&app, &c.id, &before, "foreign CallSid").await;
}

async fn concurrent_identical_callbacks_enqueue_one_job(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let t = app.tenant(true).await;
    app.exotel_accepts_many("sidk").await;
    let c = app.place(&t, "+919812345678").await;
    let body = guide_callback(&c.sid).to_string();
    let statuses = futures_util::future::join_all((0..64).map(|_| async {
        app.callback(&c.url, "application/json", body.clone())
            .await
            .status()
            .as_u16()
    }))
    .await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(app.count("jobs").await, 1);
    assert_eq!(app.view(&t, &c.id).await["status"], "completed");
}

async fn concurrent_callbacks_for_many_calls_all_commit(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let t = app.tenant(true).await;
    app.exotel_accepts_many("sidg").await;
    let mut calls = Vec::new();
    for i in 0..48 {
        calls.push(app.place(&t, &format!("+9198123456{i:02}")).await);
    }
    let statuses = futures_util::future::join_all(
        calls
            .iter()
            .map(|c| async { app.finish(c).await.status().as_u16() }),
    )
    .await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(app.count("jobs").await, 48);
    assert_eq!(app.count("call_reconcile").await, 0, "all off the schedule");
    let finals = app
        .scalar(
            "SELECT COUNT(*) AS n FROM calls WHERE finalized_at IS NOT NULL AND status = ?",
            vec!["completed".into()],
        )
        .await;
    assert_eq!(finals, 48);
    let job_calls: std::collections::HashSet<String> = app
        .jobs()
        .await
        .iter()
        .map(|j| j["call_id"].as_str().unwrap().to_owned())
        .collect();
    let call_ids: std::collections::HashSet<String> = calls.iter().map(|c| c.id.clone()).collect();
    assert_eq!(job_calls, call_ids);
    // Every field is stored as a lone callback stores it (the batched statement reads them
    // from JSON), and the wave really was committed in batches of more than one.
    let rows = app
        .rows(
            "SELECT conversation_duration, recording_url, legs, started_at, ended_at, \
             final_source, exotel_call_sid, final_payload FROM calls",
            vec![],
        )
        .await;
    let started = chrono::DateTime::parse_from_rfc3339("2019-04-08T03:17:59+05:30")
        .unwrap()
        .timestamp_millis();
    for r in &rows {
        assert_eq!(r["conversation_duration"], 32, "{r}");
        assert!(
            r["recording_url"]
                .as_str()
                .unwrap()
                .ends_with("xxdewfcwsdw.mp3")
        );
        let legs: Value = serde_json::from_str(r["legs"].as_str().unwrap()).unwrap();
        assert_eq!(legs.as_array().unwrap().len(), 2);
        assert_eq!(legs[0]["on_call_duration"], 41);
        assert_eq!(r["started_at"], started);
        assert_eq!(r["ended_at"], started + 37_000);
        assert_eq!(r["final_source"], "callback");
        assert!(r["exotel_call_sid"].as_str().unwrap().starts_with("sidg"));
        let raw: Value = serde_json::from_str(r["final_payload"].as_str().unwrap()).unwrap();
        assert_eq!(raw["ConversationDuration"], 32);
    }
    let metrics = app
        .http
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {metrics}"))
    };
    assert!(
        value("callbridge_ingest_batch_size_sum") > value("callbridge_ingest_batch_size_count"),
        "some commit held more than one callback"
    );
    // Every group commit is timed.
    assert_eq!(
        value("callbridge_ingest_commit_seconds_count"),
        value("callbridge_ingest_batch_size_count")
    );
    assert!(value("callbridge_ingest_commit_seconds_sum") > 0.0);
    // A second wave mixing new calls, repeats (of old and new calls), an unknown token and a
    // foreign CallSid: each answered on its own merits; only the new calls enqueue.
    let mut fresh = Vec::new();
    for i in 0..8 {
        fresh.push(app.place(&t, &format!("+9198765432{i:02}")).await);
    }
    let unknown = format!("{}/hooks/exotel/status/{}", app.base, "Z".repeat(32));
    let mut wave: Vec<(String, String)> = vec![
        (unknown, fresh[0].sid.clone()),
        (fresh[1].url.clone(), "someone-elses-sid".to_owned()),
        (fresh[2].url.clone(), fresh[2].sid.clone()),
    ];
    for c in fresh.iter().skip(2).chain(calls.iter().take(4)) {
        wave.push((c.url.clone(), c.sid.clone()));
    }
    let answers = futures_util::future::join_all(wave.iter().map(|(url, sid)| {
        let app = &app;
        async move {
            app.callback(url, "application/json", guide_callback(sid).to_string())
                .await
                .status()
                .as_u16()
        }
    }))
    .await;
    assert_eq!(answers[0], 404);
    assert_eq!(answers[1], 400);
    assert!(answers[2..].iter().all(|s| *s == 200), "{answers:?}");
    assert_eq!(app.count("jobs").await, 48 + 6);
    assert_eq!(app.view(&t, &fresh[1].id).await["status"], "in-progress");
    assert_eq!(app.view(&t, &fresh[2].id).await["status"], "completed");
}

/// Finalisation rewrites these columns of `calls` (see `ingest`). None may be indexed: on
/// PostgreSQL an update that changes no indexed column, and finds room on its page (the table's
/// fillfactor keeps some), is a heap-only-tuple update that writes no index entry at all,
/// instead of one in each of the table's indexes.
const FINALISED_COLUMNS: [&str; 10] = [
    "status",
    "started_at",
    "ended_at",
    "finalized_at",
    "final_source",
    "conversation_duration",
    "recording_url",
    "legs",
    "final_payload",
    "updated_at",
];

async fn finalising_a_call_changes_no_indexed_column(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let sql = match backend {
        Backend::Postgres => {
            "SELECT a.attname AS col FROM pg_index i JOIN pg_attribute a \
             ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
             WHERE i.indrelid = 'calls'::regclass \
             UNION SELECT 'expression or predicate' AS col FROM pg_index i \
             WHERE i.indrelid = 'calls'::regclass AND (i.indexprs IS NOT NULL OR i.indpred IS NOT NULL)"
        }
        Backend::Sqlite => {
            "SELECT ii.name AS col FROM pragma_index_list('calls') il, \
             pragma_index_info(il.name) ii"
        }
    };
    let indexed: Vec<String> = app
        .rows(sql, vec![])
        .await
        .iter()
        .map(|r| r["col"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(indexed.iter().any(|c| c == "token_hash"), "{indexed:?}");
    for col in FINALISED_COLUMNS {
        assert!(
            !indexed.iter().any(|c| c == col),
            "{col} is indexed: {indexed:?}"
        );
    }
    assert!(
        !indexed.iter().any(|c| c == "expression or predicate"),
        "an expression or partial index on calls: {indexed:?}"
    );
    if backend == Backend::Postgres {
        let opts = app
            .rows(
                "SELECT array_to_string(reloptions, ',') AS o FROM pg_class WHERE relname = 'calls'",
                vec![],
            )
            .await;
        assert_eq!(opts[0]["o"], "fillfactor=30", "{opts:?}");
    }
    // And the reconciler's schedule really lives apart: a placed call is on it until final.
    let t = app.tenant(true).await;
    app.exotel_accepts("sidh").await;
    let c = app.place(&t, "+919812345678").await;
    let (due, attempts) = app.schedule(&c.id).await.expect("scheduled");
    assert_eq!(attempts, 0);
    assert!(due > callbridge::db::now_ms(), "due later, not now: {due}");
    let r = app.finish(&c).await;
    assert_eq!(r.status(), 200);
    assert!(app.schedule(&c.id).await.is_none());
}

async fn a_progress_callback_updates_without_finalising(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let t = app.tenant(true).await;
    app.exotel_accepts_many("sidn").await;
    let c = app.place(&t, "+919812345678").await;
    let ringing = json!({"CallSid": c.sid, "EventType": "answered", "Status": "ringing",
                         "StartTime": "2019-04-08 03:17:59"});
    let r = app
        .callback(&c.url, "application/json", ringing.to_string())
        .await;
    assert_eq!(r.status(), 200);
    let v = app.view(&t, &c.id).await;
    assert_eq!(v["status"], "ringing");
    assert_eq!(v["started_at"], "2019-04-07T21:47:59Z");
    assert!(v["ended_at"].is_null());
    assert!(app.call_row(&c.id).await["finalized_at"].is_null());
    assert_eq!(app.count("jobs").await, 0);

    let r = app.finish(&c).await;
    assert_eq!(r.status(), 200);
    assert_eq!(app.count("jobs").await, 1);
    let final_row = app.call_row(&c.id).await;

    // A progress event arriving late does not reopen the call.
    let r = app
        .callback(&c.url, "application/json", ringing.to_string())
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(app.call_row(&c.id).await, final_row);
    assert_eq!(app.count("jobs").await, 1);
}
