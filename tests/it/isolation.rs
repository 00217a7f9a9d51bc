//! Tenant isolation (calls and callback URLs) and call listing (newest first, `limit`,
//! `before` cursor).

use serde_json::Value;

use crate::{both_backends, helpers::*};

both_backends!(
    a_tenant_sees_only_its_own_calls,
    a_callback_url_cannot_touch_another_tenants_call,
    listing_pages_newest_first,
);

async fn a_tenant_sees_only_its_own_calls(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let a = app.tenant(true).await;
    let b = app.tenant(true).await;
    app.exotel_accepts_many("sidi").await;
    let ca = app.place(&a, "+919812345678").await;
    // The same numbers for tenant B are B's own call, not A's debounced one.
    let cb = app.place(&b, "+919812345678").await;
    assert_ne!(ca.id, cb.id);

    let r = app
        .get(&b.api_key, &format!("/api/v1/calls/{}", ca.id))
        .await;
    assert_eq!(r.status(), 404);
    let err: Value = r.json().await.unwrap();
    assert_eq!(err["code"], "not_found");
    let r = app
        .get(&a.api_key, &format!("/api/v1/calls/{}", cb.id))
        .await;
    assert_eq!(r.status(), 404);
    assert_eq!(app.view(&a, &ca.id).await["id"], ca.id.as_str());
    assert_eq!(app.view(&b, &cb.id).await["id"], cb.id.as_str());
    let r = app.get(&a.api_key, "/api/v1/calls/call_doesnotexist").await;
    assert_eq!(r.status(), 404);

    for (t, mine) in [(&a, &ca.id), (&b, &cb.id)] {
        let list: Value = app
            .get(&t.api_key, "/api/v1/calls")
            .await
            .json()
            .await
            .unwrap();
        let ids: Vec<&str> = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, vec![mine.as_str()]);
    }
}

async fn a_callback_url_cannot_touch_another_tenants_call(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let a = app.tenant(true).await;
    let b = app.tenant(true).await;
    app.exotel_accepts_many("sidt").await;
    let ca = app.place(&a, "+919812345678").await;
    let cb = app.place(&b, "+919812345679").await;
    let a_before = app.call_row(&ca.id).await;
    let b_before = app.call_row(&cb.id).await;

    // A's URL carrying B's CallSid.
    let r = app
        .callback(
            &ca.url,
            "application/json",
            guide_callback(&cb.sid).to_string(),
        )
        .await;
    assert_eq!(r.status(), 400);
    assert_eq!(app.call_row(&ca.id).await, a_before);
    assert_eq!(app.call_row(&cb.id).await, b_before);
    assert_eq!(app.count("jobs").await, 0);

    // B's call id is not a callback URL.
    let r = app
        .callback(
            &format!("{}/hooks/exotel/status/{}", app.base, cb.id),
            "application/json",
            guide_callback(&cb.sid).to_string(),
        )
        .await;
    assert_eq!(r.status(), 404);
    assert_eq!(app.call_row(&cb.id).await, b_before);

    // A's own callback finishes A's call only.
    let r = app
        .callback(
            &ca.url,
            "application/json",
            guide_callback(&ca.sid).to_string(),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(app.view(&a, &ca.id).await["status"], "completed");
    assert_eq!(app.call_row(&cb.id).await, b_before);
    let jobs = app.jobs().await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["tenant_id"], a.id.as_str());
}

async fn listing_pages_newest_first(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let t = app.tenant(true).await;
    let other = app.tenant(true).await;
    app.exotel_accepts_many("sidp").await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(app.place(&t, &format!("+9198123456{i:02}")).await.id);
        // Another tenant's calls interleave and must never show up.
        app.place(&other, &format!("+9198123457{i:02}")).await;
    }
    ids.reverse();

    let all: Value = app
        .get(&t.api_key, "/api/v1/calls")
        .await
        .json()
        .await
        .unwrap();
    let got: Vec<String> = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(got, ids);
    assert!(all["next_before"].is_null());

    let mut seen = Vec::new();
    let mut path = "/api/v1/calls?limit=2".to_owned();
    let mut pages = 0;
    loop {
        let r = app.get(&t.api_key, &path).await;
        assert_eq!(r.status(), 200);
        let page: Value = r.json().await.unwrap();
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 2);
        seen.extend(items.iter().map(|c| c["id"].as_str().unwrap().to_owned()));
        pages += 1;
        match page["next_before"].as_str() {
            Some(next) => path = format!("/api/v1/calls?limit=2&before={next}"),
            None => break,
        }
        assert!(pages < 10, "paging does not end");
    }
    assert_eq!(seen, ids);
    assert_eq!(pages, 3);

    for bad in ["limit=0", "limit=201", "limit=100000"] {
        let r = app.get(&t.api_key, &format!("/api/v1/calls?{bad}")).await;
        assert_eq!(r.status(), 422, "{bad}");
        let err: Value = r.json().await.unwrap();
        assert_eq!(err["field"], "limit");
    }
    let r = app.get(&t.api_key, "/api/v1/calls?limit=abc").await;
    assert_eq!(r.status(), 400);
    let r = app.get(&t.api_key, "/api/v1/calls?limit=200").await;
    assert_eq!(r.status(), 200);
}
