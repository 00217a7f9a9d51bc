//! `POST /api/v1/calls`: the exact `Calls/connect` request Exotel gets, validation, auth,
//! Exotel refusing or not answering, and the click debounce (sequential and concurrent).

use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};
use wiremock::{Mock, ResponseTemplate, matchers};

use crate::{both_backends, helpers::*};

both_backends!(
    the_connect_request_is_exactly_what_exotel_expects,
    invalid_input_is_422_with_the_field_and_writes_nothing,
    a_missing_or_wrong_api_key_is_401,
    a_body_that_is_not_json_is_415,
    exotel_refusing_is_502_and_the_call_is_stored_failed,
    exotel_not_answering_is_504_and_the_call_is_unknown,
    a_repeated_click_returns_the_first_call,
    concurrent_double_clicks_ring_once,
    the_same_click_after_the_window_is_a_new_call,
);

fn field<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

async fn the_connect_request_is_exactly_what_exotel_expects(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let t = app.tenant(true).await;
    app.exotel_accepts_many("sidc").await;

    let r = app
        .post_call(
            &t.api_key,
            json!({"from": "09876543210", "to": "098123 45678", "record": true,
                   "custom_field": "deal-42"}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let body: Value = r.json().await.unwrap();
    let id = body["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("call_"), "{body}");
    assert_eq!(body["status"], "in-progress");
    assert_eq!(body["exotel_call_sid"], "sidc0000");
    assert_eq!(body["from"], "+919876543210");
    assert_eq!(body["to"], "+919812345678");
    assert_eq!(body["custom_field"], "deal-42");

    let reqs = app.exotel.received_requests().await.unwrap();
    assert_eq!(reqs.len(), 1);
    let req = &reqs[0];
    assert_eq!(req.method.as_str(), "POST");
    assert_eq!(req.url.path(), "/v1/Accounts/acme1/Calls/connect.json");
    let expected_auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("key123:token456")
    );
    assert_eq!(
        req.headers.get("authorization").unwrap().to_str().unwrap(),
        expected_auth
    );
    assert!(
        req.headers
            .get("content-type")
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("application/x-www-form-urlencoded")
    );
    let form: Vec<(String, String)> = url::form_urlencoded::parse(&req.body)
        .into_owned()
        .collect();
    assert_eq!(field(&form, "From"), Some("+919876543210"));
    assert_eq!(field(&form, "To"), Some("+919812345678"));
    assert_eq!(field(&form, "CallerId"), Some("+918047112233"));
    assert_eq!(field(&form, "Record"), Some("true"));
    assert_eq!(field(&form, "CustomField"), Some(id.as_str()));
    assert_eq!(field(&form, "StatusCallbackEvents[0]"), Some("terminal"));
    assert_eq!(
        field(&form, "StatusCallbackContentType"),
        Some("application/json")
    );
    let cb1 = field(&form, "StatusCallback").unwrap().to_owned();
    let prefix = format!("{}/hooks/exotel/status/", app.base);
    let token1 = cb1
        .strip_prefix(&prefix)
        .expect("callback under public_url");
    assert!(
        token1.len() >= 22,
        "token {token1:?} is shorter than 128 bits"
    );
    assert!(
        token1
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
        "token {token1:?} is not url-safe base64"
    );
    // The token is not derivable from the call id.
    assert!(!token1.contains(&id) && !id.contains(token1));

    // A second call (explicit national caller id, record off) gets its own token.
    let r = app
        .post_call(
            &t.api_key,
            json!({"from": "+91 98765 43210", "to": "09812345679", "caller_id": "080 4711 2299",
                   "record": false}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let id2 = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let reqs = app.connect_requests().await;
    assert_eq!(reqs.len(), 2);
    let form2 = &reqs[1];
    assert_eq!(field(form2, "CallerId"), Some("+918047112299"));
    assert_eq!(field(form2, "Record"), Some("false"));
    assert_eq!(field(form2, "CustomField"), Some(id2.as_str()));
    let token2 = field(form2, "StatusCallback")
        .unwrap()
        .strip_prefix(&prefix)
        .unwrap();
    assert!(token2.len() >= 22);
    assert_ne!(token1, token2);

    // Only the hash of the token is stored.
    let row = app.call_row(&id).await;
    assert_ne!(row["token_hash"], token1);
    assert!(!row.to_string().contains(token1));
}

async fn invalid_input_is_422_with_the_field_and_writes_nothing(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let t = app.tenant(true).await;
    app.exotel_accepts_many("sidv").await;
    let long = "x".repeat(129);
    let cases: Vec<(Value, &str)> = vec![
        (json!({"from": "12", "to": "+919812345678"}), "from"),
        (json!({"from": "+919876543210", "to": "call me"}), "to"),
        (json!({"from": "", "to": "+919812345678"}), "from"),
        (json!({"from": "+919876543210", "to": "09876543210"}), "to"),
        (
            json!({"from": "+919876543210", "to": "+919812345678", "custom_field": long}),
            "custom_field",
        ),
        (
            json!({"from": "+919876543210", "to": "+919812345678", "caller_id": "5"}),
            "caller_id",
        ),
        (
            json!({"from": "+919876543210", "to": "+919812345678", "priority": "high"}),
            "body",
        ),
        (json!({"from": "+919876543210"}), "body"),
        (
            json!({"from": "+919876543210", "to": "+919812345678", "record": "yes"}),
            "body",
        ),
    ];
    for (body, expected_field) in cases {
        let r = app.post_call(&t.api_key, body.clone()).await;
        assert_eq!(r.status(), 422, "{body}");
        let err: Value = r.json().await.unwrap();
        assert_eq!(err["code"], "validation_failed", "{body}: {err}");
        assert_eq!(err["field"], expected_field, "{body}: {err}");
        assert!(err["detail"].as_str().is_some_and(|d| !d.is_empty()));
    }
    // 128 characters exactly is fine.
    let r = app
        .post_call(
            &t.api_key,
            json!({"from": "+919876543210", "to": "+919812345678", "custom_field": "y".repeat(128)}),
        )
        .await;
    assert_eq!(r.status(), 201);
    assert_eq!(app.count("calls").await, 1);

    // A tenant without a default virtual number must name one.
    let bare = app.tenant_with(|n| n.caller_id = None).await;
    let r = app
        .post_call(
            &bare.api_key,
            json!({"from": "+919876543210", "to": "+919812345670"}),
        )
        .await;
    assert_eq!(r.status(), 422);
    let err: Value = r.json().await.unwrap();
    assert_eq!(err["field"], "caller_id");

    assert_eq!(app.count("calls").await, 1, "rejected requests wrote calls");
    assert_eq!(app.count("call_debounce").await, 1);
    assert_eq!(app.connect_requests().await.len(), 1);
}

async fn a_missing_or_wrong_api_key_is_401(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let _t = app.tenant(true).await;
    app.exotel_accepts_many("sida").await;
    let body = json!({"from": "+919876543210", "to": "+919812345678"});
    let url = format!("{}/api/v1/calls", app.base);

    let r = app.http.post(&url).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let err: Value = r.json().await.unwrap();
    assert_eq!(err["code"], "unauthorized");

    for header in [
        "Bearer ",
        "Bearer garbage",
        "Bearer cb_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "Basic a2V5MTIzOnRva2VuNDU2",
        "cb_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    ] {
        let r = app
            .http
            .post(&url)
            .header("authorization", header)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{header}");
    }
    let r = app.get("nope", "/api/v1/calls").await;
    assert_eq!(r.status(), 401);
    let r = app.get("nope", "/api/v1/calls/call_x").await;
    assert_eq!(r.status(), 401);

    assert_eq!(app.count("calls").await, 0);
    assert!(app.connect_requests().await.is_empty());
}

async fn a_body_that_is_not_json_is_415(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let t = app.tenant(true).await;
    app.exotel_accepts_many("sidj").await;
    let url = format!("{}/api/v1/calls", app.base);
    for (ct, body) in [
        (
            "text/plain",
            r#"{"from":"+919876543210","to":"+919812345678"}"#,
        ),
        (
            "application/x-www-form-urlencoded",
            "from=%2B919876543210&to=%2B919812345678",
        ),
    ] {
        let r = app
            .http
            .post(&url)
            .bearer_auth(&t.api_key)
            .header("content-type", ct)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 415, "{ct}");
        let err: Value = r.json().await.unwrap();
        assert_eq!(err["code"], "unsupported_media_type");
    }
    // No content type at all.
    let r = app
        .http
        .post(&url)
        .bearer_auth(&t.api_key)
        .body(r#"{"from":"+919876543210","to":"+919812345678"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    // JSON that does not parse is malformed, not unsupported.
    let r = app
        .http
        .post(&url)
        .bearer_auth(&t.api_key)
        .header("content-type", "application/json")
        .body(r#"{"from": "+919876543210", "#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(app.count("calls").await, 0);
    assert!(app.connect_requests().await.is_empty());
}

async fn exotel_refusing_is_502_and_the_call_is_stored_failed(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let t = app.tenant(true).await;
    let click = json!({"from": "+919876543210", "to": "+919812345678"});

    for (status, message) in [
        (400, "To is not a valid number"),
        (403, "Your account is inactive"),
    ] {
        app.exotel.reset().await;
        app.exotel_refuses(status, message).await;
        let r = app.post_call(&t.api_key, click.clone()).await;
        assert_eq!(r.status(), 502, "Exotel {status}");
        let err: Value = r.json().await.unwrap();
        assert_eq!(err["code"], "exotel_refused");
        assert_eq!(err["exotel_status"], status);
        assert_eq!(err["exotel_message"], message);
        assert!(err["detail"].as_str().unwrap().contains(message));
        let id = err["call_id"].as_str().unwrap().to_owned();

        let view = app.view(&t, &id).await;
        assert_eq!(view["status"], "failed");
        assert!(view["error"].as_str().unwrap().contains(message), "{view}");
        assert!(view["exotel_call_sid"].is_null());
        assert_eq!(view["writeback"]["state"], "none");
        // A refused call is not reconciled: nothing rang.
        assert!(app.schedule(&id).await.is_none());
        assert_eq!(app.connect_requests().await.len(), 1);
    }
    assert_eq!(app.count("calls").await, 2);

    // Nothing rang, so the same click can be placed again at once.
    app.exotel.reset().await;
    app.exotel_accepts_many("sidr").await;
    let r = app.post_call(&t.api_key, click).await;
    assert_eq!(r.status(), 201);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["exotel_call_sid"], "sidr0000");
    assert_eq!(app.connect_requests().await.len(), 1);
    assert_eq!(app.count("calls").await, 3);
    assert_eq!(app.count("jobs").await, 0);
}

async fn exotel_not_answering_is_504_and_the_call_is_unknown(backend: Backend) {
    let app = TestApp::spawn_with(backend, |c| c.exotel_timeout_secs = 1).await;
    let t = app.tenant(true).await;
    Mock::given(matchers::method("POST"))
        .and(matchers::path("/v1/Accounts/acme1/Calls/connect.json"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_delay(Duration::from_secs(4))
                .set_body_json(json!({"Call": {"Sid": "late1", "Status": "in-progress"}})),
        )
        .mount(&app.exotel)
        .await;
    let r = app
        .post_call(
            &t.api_key,
            json!({"from": "+919876543210", "to": "+919812345678"}),
        )
        .await;
    assert_eq!(r.status(), 504);
    let err: Value = r.json().await.unwrap();
    assert_eq!(err["code"], "exotel_timeout");
    let id = err["call_id"].as_str().unwrap().to_owned();
    let view = app.view(&t, &id).await;
    assert_eq!(view["status"], "unknown", "{view}");
    assert_ne!(view["status"], "failed");

    // The call may well have rung: a repeated click inside the window does not ring again.
    let r = app
        .post_call(
            &t.api_key,
            json!({"from": "+919876543210", "to": "+919812345678"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["id"], id.as_str());
    assert_eq!(app.connect_requests().await.len(), 1);

    // And Exotel's callback for it is still accepted and finalises it.
    let url = app.last_status_callback().await;
    let r = app
        .callback(
            &url,
            "application/json",
            guide_callback("late1").to_string(),
        )
        .await;
    assert_eq!(r.status(), 200);
    let view = app.view(&t, &id).await;
    assert_eq!(view["status"], "completed");
    assert_eq!(view["exotel_call_sid"], "late1");
    assert_eq!(app.count("jobs").await, 1);
}

async fn a_repeated_click_returns_the_first_call(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let t = app.tenant(true).await;
    app.exotel_accepts_many("sidd").await;

    let r1 = app
        .post_call(
            &t.api_key,
            json!({"from": "+919876543210", "to": "+919812345678"}),
        )
        .await;
    assert_eq!(r1.status(), 201);
    let first: Value = r1.json().await.unwrap();
    // The same numbers written differently are the same click.
    let r2 = app
        .post_call(
            &t.api_key,
            json!({"from": "09876543210", "to": "98123 45678"}),
        )
        .await;
    assert_eq!(r2.status(), 200);
    let second: Value = r2.json().await.unwrap();
    assert_eq!(second["id"], first["id"]);
    assert_eq!(second["exotel_call_sid"], "sidd0000");
    assert_eq!(app.connect_requests().await.len(), 1);
    assert_eq!(app.count("calls").await, 1);

    // Another customer is another call.
    let r3 = app
        .post_call(
            &t.api_key,
            json!({"from": "+919876543210", "to": "+919812345679"}),
        )
        .await;
    assert_eq!(r3.status(), 201);
    assert_ne!(r3.json::<Value>().await.unwrap()["id"], first["id"]);
    assert_eq!(app.connect_requests().await.len(), 2);
}

async fn the_same_click_after_the_window_is_a_new_call(backend: Backend) {
    let app = TestApp::spawn_with(backend, |c| c.click_debounce_secs = 1).await;
    let t = app.tenant(true).await;
    app.exotel_accepts_many("sidw").await;
    let click = json!({"from": "+919876543210", "to": "+919812345678"});

    let r1 = app.post_call(&t.api_key, click.clone()).await;
    assert_eq!(r1.status(), 201);
    let first: Value = r1.json().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // The expired guard is taken over by the new call.
    let r2 = app.post_call(&t.api_key, click.clone()).await;
    assert_eq!(r2.status(), 201);
    let second: Value = r2.json().await.unwrap();
    assert_ne!(second["id"], first["id"]);
    assert_eq!(second["exotel_call_sid"], "sidw0001");
    // … and guards it in turn.
    let r3 = app.post_call(&t.api_key, click).await;
    assert_eq!(r3.status(), 200);
    assert_eq!(r3.json::<Value>().await.unwrap()["id"], second["id"]);
    assert_eq!(app.connect_requests().await.len(), 2);
    assert_eq!(app.count("calls").await, 2);
    assert_eq!(app.count("call_debounce").await, 1);
    for id in [&first["id"], &second["id"]] {
        assert!(app.schedule(id.as_str().unwrap()).await.is_some());
    }
}

async fn concurrent_double_clicks_ring_once(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let t = app.tenant(true).await;
    // A slow Exotel keeps the first click in flight while the others arrive.
    Mock::given(matchers::method("POST"))
        .and(matchers::path("/v1/Accounts/acme1/Calls/connect.json"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_delay(Duration::from_millis(300))
                .set_body_json(json!({"Call": {"Sid": "dbl1", "Status": "in-progress"}})),
        )
        .mount(&app.exotel)
        .await;
    let click = json!({"from": "+919876543210", "to": "+919812345678"});
    let results = futures_util::future::join_all((0..6).map(|_| async {
        let r = app.post_call(&t.api_key, click.clone()).await;
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap();
        (status, body)
    }))
    .await;
    let created = results.iter().filter(|(s, _)| *s == 201).count();
    let repeated = results.iter().filter(|(s, _)| *s == 200).count();
    assert_eq!(created, 1, "{results:?}");
    assert_eq!(repeated, 5, "{results:?}");
    let ids: std::collections::HashSet<&str> = results
        .iter()
        .map(|(_, b)| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 1, "{results:?}");
    assert_eq!(app.connect_requests().await.len(), 1);
    assert_eq!(app.count("calls").await, 1);
}
