//! The whole loop once: click → Exotel connect → callback → signed webhook delivery.

use crate::{both_backends, helpers::*};

both_backends!(a_click_becomes_a_delivered_call);

async fn a_click_becomes_a_delivered_call(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let t = app.tenant(true).await;
    app.exotel_accepts("sid0001").await;
    app.receiver_answers(200).await;

    let (id, url) = app.place_call(&t, "+919812345678").await;
    let r = app
        .callback(
            &url,
            "application/json",
            guide_callback("sid0001").to_string(),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(app.drain_jobs().await, 1);

    let deliveries = app.deliveries().await;
    assert_eq!(deliveries.len(), 1);
    assert_eq!(deliveries[0].1["data"]["call_id"], id.as_str());
    assert_eq!(deliveries[0].1["data"]["outcome"], "connected");

    let view: serde_json::Value = app
        .get(&t.api_key, &format!("/api/v1/calls/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(view["status"], "completed");
    assert_eq!(view["writeback"]["state"], "done");
}
