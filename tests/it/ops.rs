//! Operations endpoints: liveness, readiness and the Prometheus metrics after real activity.

use crate::{both_backends, helpers::*};

both_backends!(health_and_readiness_answer, metrics_reflect_activity);

async fn health_and_readiness_answer(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    for path in ["/healthz", "/readyz"] {
        let r = app
            .http
            .get(format!("{}{path}", app.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
}

fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn metrics_reflect_activity(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let t = app.tenant(true).await;
    app.exotel_accepts_many("sidm").await;
    app.receiver_answers(200).await;
    let c = app.place(&t, "+919812345678").await;
    let body = guide_callback(&c.sid).to_string();
    assert_eq!(
        app.callback(&c.url, "application/json", body.clone())
            .await
            .status(),
        200
    );
    assert_eq!(
        app.callback(&c.url, "application/json", body)
            .await
            .status(),
        200
    );
    assert_eq!(app.callback(&c.url, "text/plain", "x").await.status(), 415);
    assert_eq!(app.drain_jobs().await, 1);

    let r = app
        .http
        .get(format!("{}/metrics", app.base))
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
    let text = r.text().await.unwrap();
    let expect = [
        (r#"callbridge_callbacks_total{result="accepted"}"#, 1.0),
        (r#"callbridge_callbacks_total{result="duplicate"}"#, 1.0),
        (r#"callbridge_callbacks_total{result="malformed"}"#, 1.0),
        (r#"callbridge_jobs{state="done"}"#, 1.0),
        (r#"callbridge_jobs{state="queued"}"#, 0.0),
        (r#"callbridge_jobs{state="dead"}"#, 0.0),
        (
            r#"callbridge_exotel_request_seconds_count{op="connect"}"#,
            1.0,
        ),
        (
            r#"callbridge_delivery_seconds_count{kind="webhook",outcome="done"}"#,
            1.0,
        ),
        (r#"callbridge_calls_total{result="placed"}"#, 1.0),
    ];
    for (series, value) in expect {
        assert_eq!(
            metric_value(&text, series),
            Some(value),
            "{series} in\n{text}"
        );
    }
}
