//! Playable recording links: a wiremock "Exotel recordings host" that wants the tenant's Basic
//! credentials and honours Range, and callbridge's `/recordings/{token}` in front of it.

use sea_orm::ConnectionTrait;
use serde_json::Value;
use wiremock::{Mock, MockServer, ResponseTemplate, matchers};

use crate::{both_backends, helpers::*};

const LEN: usize = 100_000;
const PATH: &str = "/exotelrecordings/acme1/rec1.mp3";

fn recording() -> Vec<u8> {
    (0..LEN).map(|i| (i * 7 % 251) as u8).collect()
}

/// The fake recordings host: GET (whole or `bytes=100-199`) and HEAD with the tenant's
/// credentials; 401 for anything without them.
async fn recordings_host() -> MockServer {
    let rec = MockServer::start().await;
    let bytes = recording();
    Mock::given(matchers::method("GET"))
        .and(matchers::path(PATH))
        .and(matchers::basic_auth("key123", "token456"))
        .and(matchers::header("range", "bytes=100-199"))
        .respond_with(
            ResponseTemplate::new(206)
                .insert_header("content-range", format!("bytes 100-199/{LEN}").as_str())
                .insert_header("accept-ranges", "bytes")
                .set_body_raw(bytes[100..200].to_vec(), "audio/mpeg"),
        )
        .with_priority(1)
        .mount(&rec)
        .await;
    Mock::given(matchers::method("GET"))
        .and(matchers::path(PATH))
        .and(matchers::basic_auth("key123", "token456"))
        .and(matchers::header("range", "bytes=200000-"))
        .respond_with(
            ResponseTemplate::new(416)
                .insert_header("content-range", format!("bytes */{LEN}").as_str()),
        )
        .with_priority(1)
        .mount(&rec)
        .await;
    Mock::given(matchers::method("GET"))
        .and(matchers::path(PATH))
        .and(matchers::basic_auth("key123", "token456"))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("accept-ranges", "bytes")
                // S3's generic type: callbridge names the audio type by extension instead.
                .set_body_raw(bytes.clone(), "binary/octet-stream"),
        )
        .with_priority(2)
        .mount(&rec)
        .await;
    Mock::given(matchers::method("HEAD"))
        .and(matchers::path(PATH))
        .and(matchers::basic_auth("key123", "token456"))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("accept-ranges", "bytes")
                .set_body_raw(bytes, "audio/mpeg"),
        )
        .with_priority(2)
        .mount(&rec)
        .await;
    Mock::given(matchers::any())
        .respond_with(ResponseTemplate::new(401))
        .with_priority(10)
        .mount(&rec)
        .await;
    rec
}

async fn spawn(backend: Backend) -> TestApp {
    TestApp::spawn_with(backend, |c| c.recording_allow_loopback_http = true).await
}

/// Place a call to `to` (Exotel answers `sid`) and finish it with `recording_url`.
async fn finished_call(
    app: &TestApp,
    t: &TestTenant,
    sid: &str,
    to: &str,
    recording_url: Option<&str>,
) -> String {
    app.exotel.reset().await;
    app.exotel_accepts(sid).await;
    let (id, url) = app.place_call(t, to).await;
    let mut cb = guide_callback(sid);
    match recording_url {
        Some(u) => cb["RecordingUrl"] = Value::String(u.to_owned()),
        None => {
            cb.as_object_mut().unwrap().remove("RecordingUrl");
        }
    }
    let r = app.callback(&url, "application/json", cb.to_string()).await;
    assert_eq!(r.status(), 200);
    id
}

async fn link(app: &TestApp, key: &str, call_id: &str) -> reqwest::Response {
    app.http
        .post(format!(
            "{}/api/v1/calls/{call_id}/recording-link",
            app.base
        ))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
}

async fn link_url(app: &TestApp, key: &str, call_id: &str) -> String {
    let r = link(app, key, call_id).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    v["url"].as_str().unwrap().to_owned()
}

async fn revoke(app: &TestApp, key: &str, call_id: &str) -> reqwest::Response {
    app.http
        .delete(format!(
            "{}/api/v1/calls/{call_id}/recording-link",
            app.base
        ))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
}

async fn error_code(r: reqwest::Response) -> String {
    let v: Value = r.json().await.unwrap();
    assert!(v["detail"].is_string(), "{v}");
    v["code"].as_str().unwrap_or_default().to_owned()
}

both_backends!(
    a_link_plays_seeks_and_answers_head,
    unknown_and_malformed_tokens_are_not_found,
    revoked_links_are_gone,
    expired_links_are_gone,
    another_tenants_call_cannot_be_linked,
    a_recording_host_outside_the_allow_list_is_never_contacted,
    redirects_are_followed_only_to_allow_listed_hosts,
    upstream_answers_are_mapped,
    the_webhook_delivery_carries_a_playable_link,
    a_call_without_recording_has_no_link,
);

async fn a_link_plays_seeks_and_answers_head(backend: Backend) {
    let app = spawn(backend).await;
    let t = app.tenant(false).await;
    let rec = recordings_host().await;
    let id = finished_call(
        &app,
        &t,
        "sidr1",
        "+919812345678",
        Some(&format!("{}{PATH}", rec.uri())),
    )
    .await;

    let r = link(&app, &t.api_key, &id).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let url = v["url"].as_str().unwrap().to_owned();
    assert!(
        url.starts_with(&format!("{}/recordings/rec_", app.base)),
        "{url}"
    );
    assert!(v["expires_at"].is_null(), "no expiry by default: {v}");
    assert_eq!(
        link_url(&app, &t.api_key, &id).await,
        url,
        "the link is stable"
    );

    // Whole file.
    let r = app.http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "audio/mpeg");
    assert_eq!(r.headers()["content-length"], LEN.to_string().as_str());
    assert_eq!(r.headers()["accept-ranges"], "bytes");
    assert_eq!(r.bytes().await.unwrap().as_ref(), recording().as_slice());

    // Seek.
    let r = app
        .http
        .get(&url)
        .header("range", "bytes=100-199")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes 100-199/{LEN}").as_str()
    );
    assert_eq!(r.headers()["content-length"], "100");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &recording()[100..200]);

    // Past the end.
    let r = app
        .http
        .get(&url)
        .header("range", "bytes=200000-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes */{LEN}").as_str()
    );

    // HEAD: headers only.
    let r = app.http.head(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], LEN.to_string().as_str());
    assert_eq!(r.headers()["content-type"], "audio/mpeg");
    assert!(r.bytes().await.unwrap().is_empty());

    // Every upstream request carried the tenant's credentials and was one of ours.
    let seen = rec.received_requests().await.unwrap();
    assert_eq!(seen.len(), 4);
    for req in &seen {
        assert_eq!(req.url.path(), PATH);
        assert_eq!(req.headers["authorization"], "Basic a2V5MTIzOnRva2VuNDU2");
    }
    assert_eq!(seen[3].method.as_str(), "HEAD");
}

async fn unknown_and_malformed_tokens_are_not_found(backend: Backend) {
    let app = spawn(backend).await;
    for path in [
        "/recordings/rec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "/recordings/garbage",
        "/recordings/rec_%2e%2e",
    ] {
        let r = app
            .http
            .get(format!("{}{path}", app.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{path}");
        assert_eq!(error_code(r).await, "not_found");
    }
}

async fn revoked_links_are_gone(backend: Backend) {
    let app = spawn(backend).await;
    let t = app.tenant(false).await;
    let rec = recordings_host().await;
    let id = finished_call(
        &app,
        &t,
        "sidr2",
        "+919812345678",
        Some(&format!("{}{PATH}", rec.uri())),
    )
    .await;
    let url = link_url(&app, &t.api_key, &id).await;
    assert_eq!(app.http.get(&url).send().await.unwrap().status(), 200);

    let r = revoke(&app, &t.api_key, &id).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["revoked"], 1);
    let r = app.http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 410);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["code"], "gone");
    assert!(v["detail"].as_str().unwrap().contains("revoked"), "{v}");
    assert_eq!(app.http.head(&url).send().await.unwrap().status(), 410);
    let upstream_before = rec.received_requests().await.unwrap().len();

    // A new link replaces it; the old one stays gone. Revoking again is harmless.
    let fresh = link_url(&app, &t.api_key, &id).await;
    assert_ne!(fresh, url);
    assert_eq!(app.http.get(&fresh).send().await.unwrap().status(), 200);
    assert_eq!(app.http.get(&url).send().await.unwrap().status(), 410);
    assert_eq!(
        rec.received_requests().await.unwrap().len(),
        upstream_before + 1
    );

    // Tenant-wide revocation.
    let n = callbridge::recordings::revoke_all(&app.state.db, &t.id)
        .await
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(app.http.get(&fresh).send().await.unwrap().status(), 410);
    let r = revoke(&app, &t.api_key, &id).await;
    assert_eq!(r.json::<Value>().await.unwrap()["revoked"], 0);
}

async fn expired_links_are_gone(backend: Backend) {
    use callbridge::recordings::{LinkTtl, set_policy};
    let app = spawn(backend).await;
    let t = app.tenant(false).await;
    let rec = recordings_host().await;
    let id = finished_call(
        &app,
        &t,
        "sidr3",
        "+919812345678",
        Some(&format!("{}{PATH}", rec.uri())),
    )
    .await;

    // Bad policies are refused; an unknown tenant is reported.
    assert!(
        set_policy(&app.state, &t.id, LinkTtl::Seconds(0), false)
            .await
            .is_err()
    );
    assert!(
        !set_policy(&app.state, "ten_nope", LinkTtl::Never, false)
            .await
            .unwrap()
    );
    assert!(
        set_policy(&app.state, &t.id, LinkTtl::Seconds(3600), false)
            .await
            .unwrap()
    );
    assert_eq!(
        callbridge::recordings::policy(&app.state.db, &t.id)
            .await
            .unwrap(),
        Some(LinkTtl::Seconds(3600))
    );

    let r = link(&app, &t.api_key, &id).await;
    let v: Value = r.json().await.unwrap();
    let url = v["url"].as_str().unwrap().to_owned();
    let expires: chrono::DateTime<chrono::Utc> = v["expires_at"].as_str().unwrap().parse().unwrap();
    let in_secs = (expires - chrono::Utc::now()).num_seconds();
    assert!((3500..=3600).contains(&in_secs), "{in_secs}");
    assert_eq!(app.http.get(&url).send().await.unwrap().status(), 200);

    // An hour passes.
    app.state
        .db
        .execute_unprepared(&format!(
            "UPDATE recording_links SET expires_at = expires_at - 3700000 WHERE call_id = '{id}'"
        ))
        .await
        .unwrap();
    let r = app.http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 410);
    let v: Value = r.json().await.unwrap();
    assert!(v["detail"].as_str().unwrap().contains("expired"), "{v}");

    // A policy change applied to current links re-times them (here: never expire).
    assert!(
        set_policy(&app.state, &t.id, LinkTtl::Never, true)
            .await
            .unwrap()
    );
    assert_eq!(app.http.get(&url).send().await.unwrap().status(), 200);

    // Back to one hour, applied to current links: the link (made over an hour ago) is expired
    // again, and asking for the call's link gives a fresh one.
    app.state
        .db
        .execute_unprepared(&format!(
            "UPDATE recording_links SET created_at = created_at - 3700000 WHERE call_id = '{id}'"
        ))
        .await
        .unwrap();
    assert!(
        set_policy(&app.state, &t.id, LinkTtl::Seconds(3600), true)
            .await
            .unwrap()
    );
    assert_eq!(app.http.get(&url).send().await.unwrap().status(), 410);
    let fresh = link_url(&app, &t.api_key, &id).await;
    assert_ne!(fresh, url);
    assert_eq!(app.http.get(&fresh).send().await.unwrap().status(), 200);
    assert_eq!(app.http.get(&url).send().await.unwrap().status(), 410);
}

async fn another_tenants_call_cannot_be_linked(backend: Backend) {
    let app = spawn(backend).await;
    let t = app.tenant(false).await;
    let other = app.tenant(false).await;
    let rec = recordings_host().await;
    let id = finished_call(
        &app,
        &t,
        "sidr4",
        "+919812345678",
        Some(&format!("{}{PATH}", rec.uri())),
    )
    .await;
    let url = link_url(&app, &t.api_key, &id).await;

    let r = link(&app, &other.api_key, &id).await;
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "not_found");
    let r = revoke(&app, &other.api_key, &id).await;
    assert_eq!(r.status(), 404);
    assert_eq!(
        app.http.get(&url).send().await.unwrap().status(),
        200,
        "still live"
    );
    assert_eq!(link(&app, "cb_wrong", &id).await.status(), 401);
    assert_eq!(link(&app, &t.api_key, "call_nope").await.status(), 404);
}

async fn a_recording_host_outside_the_allow_list_is_never_contacted(backend: Backend) {
    let app = spawn(backend).await;
    let t = app.tenant(false).await;
    let evil = MockServer::start().await;
    Mock::given(matchers::any())
        .respond_with(ResponseTemplate::new(200).set_body_raw(b"stolen".to_vec(), "audio/mpeg"))
        .mount(&evil)
        .await;
    // Loopback, but by name: only 127.0.0.1 is allowed in tests.
    let port = evil.address().port();
    let stored = format!("http://localhost:{port}{PATH}");
    let id = finished_call(&app, &t, "sidr5", "+919812345678", Some(&stored)).await;
    let url = link_url(&app, &t.api_key, &id).await;

    for method in [reqwest::Method::GET, reqwest::Method::HEAD] {
        let r = app.http.request(method.clone(), &url).send().await.unwrap();
        assert_eq!(r.status(), 502, "{method}");
        if method == reqwest::Method::GET {
            assert_eq!(error_code(r).await, "recording_host_not_allowed");
        }
    }
    assert!(evil.received_requests().await.unwrap().is_empty());
}

async fn redirects_are_followed_only_to_allow_listed_hosts(backend: Backend) {
    let app = spawn(backend).await;
    let t = app.tenant(false).await;
    let rec = MockServer::start().await;
    let presigned = MockServer::start().await;
    let evil = MockServer::start().await;
    Mock::given(matchers::any())
        .respond_with(
            ResponseTemplate::new(200).set_body_raw(b"signed-bytes".to_vec(), "audio/mpeg"),
        )
        .mount(&presigned)
        .await;
    Mock::given(matchers::any())
        .respond_with(ResponseTemplate::new(200).set_body_raw(b"stolen".to_vec(), "audio/mpeg"))
        .mount(&evil)
        .await;
    // An allow-listed pre-signed URL on another origin: followed, without our credentials.
    Mock::given(matchers::path("/good.mp3"))
        .and(matchers::basic_auth("key123", "token456"))
        .respond_with(ResponseTemplate::new(302).insert_header(
            "location",
            format!("{}/signed.mp3?X-Amz-Signature=abc", presigned.uri()).as_str(),
        ))
        .mount(&rec)
        .await;
    // A redirect off the allow-list: refused before any request.
    Mock::given(matchers::path("/bad.mp3"))
        .respond_with(ResponseTemplate::new(302).insert_header(
            "location",
            format!("http://localhost:{}/x.mp3", evil.address().port()).as_str(),
        ))
        .mount(&rec)
        .await;

    let good = finished_call(
        &app,
        &t,
        "sidr6",
        "+919812345678",
        Some(&format!("{}/good.mp3", rec.uri())),
    )
    .await;
    let bad = finished_call(
        &app,
        &t,
        "sidr7",
        "+919812345679",
        Some(&format!("{}/bad.mp3", rec.uri())),
    )
    .await;

    let r = app
        .http
        .get(link_url(&app, &t.api_key, &good).await)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"signed-bytes");
    let seen = presigned.received_requests().await.unwrap();
    assert_eq!(seen.len(), 1);
    assert!(
        !seen[0].headers.contains_key("authorization"),
        "credentials stay with Exotel"
    );
    assert_eq!(seen[0].url.query(), Some("X-Amz-Signature=abc"));

    let r = app
        .http
        .get(link_url(&app, &t.api_key, &bad).await)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(error_code(r).await, "recording_host_not_allowed");
    assert!(evil.received_requests().await.unwrap().is_empty());
}

async fn upstream_answers_are_mapped(backend: Backend) {
    let app = spawn(backend).await;
    let t = app.tenant(false).await;
    let rec = MockServer::start().await;
    let id = finished_call(
        &app,
        &t,
        "sidr8",
        "+919812345678",
        Some(&format!("{}{PATH}", rec.uri())),
    )
    .await;
    let url = link_url(&app, &t.api_key, &id).await;

    for (upstream, ours, code) in [
        (401, 502, "exotel_credentials_refused"),
        (403, 502, "exotel_credentials_refused"),
        (404, 404, "not_found"),
        (500, 502, "recording_upstream_error"),
    ] {
        rec.reset().await;
        Mock::given(matchers::any())
            .respond_with(ResponseTemplate::new(upstream))
            .mount(&rec)
            .await;
        let r = app.http.get(&url).send().await.unwrap();
        assert_eq!(r.status(), ours, "upstream {upstream}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["code"], code, "upstream {upstream}: {v}");
        if upstream == 401 {
            assert!(v["detail"].as_str().unwrap().contains("credentials"), "{v}");
        }
    }
}

async fn the_webhook_delivery_carries_a_playable_link(backend: Backend) {
    let app = spawn(backend).await;
    let t = app.tenant(true).await;
    app.receiver_answers(200).await;
    let rec = recordings_host().await;
    let id = finished_call(
        &app,
        &t,
        "sidr9",
        "+919812345678",
        Some(&format!("{}{PATH}", rec.uri())),
    )
    .await;
    assert_eq!(app.drain_jobs().await, 1);

    let deliveries = app.deliveries().await;
    assert_eq!(deliveries.len(), 1);
    let data = &deliveries[0].1["data"];
    assert_eq!(data["call_id"], id.as_str());
    let playable = data["recording_url"].as_str().unwrap().to_owned();
    assert!(
        playable.starts_with(&format!("{}/recordings/rec_", app.base)),
        "{playable}"
    );
    assert!(
        !deliveries[0].1.to_string().contains(&rec.uri()),
        "Exotel's URL stays out"
    );

    let r = app.http.get(&playable).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().as_ref(), recording().as_slice());
    // The API hands out the same link the webhook got.
    assert_eq!(link_url(&app, &t.api_key, &id).await, playable);
    assert_eq!(app.count("recording_links").await, 1);
}

async fn a_call_without_recording_has_no_link(backend: Backend) {
    let app = spawn(backend).await;
    let t = app.tenant(true).await;
    app.receiver_answers(200).await;
    let id = finished_call(&app, &t, "sidr10", "+919812345678", None).await;
    let r = link(&app, &t.api_key, &id).await;
    assert_eq!(r.status(), 404);
    assert_eq!(app.drain_jobs().await, 1);
    let deliveries = app.deliveries().await;
    assert!(deliveries[0].1["data"]["recording_url"].is_null());
    assert_eq!(app.count("recording_links").await, 0);
}

fn proc_status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Measurement, not a check of speed: stream a 50 MiB recording from a local fake (which
/// generates its bytes, so it holds none) through the proxy and report throughput and the
/// process's peak memory growth. Run with
/// `cargo test --release --test it recording_stream_measure -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; takes a few seconds"]
async fn recording_stream_measure() {
    use axum::{Router, body::Body, routing::get};
    use futures_util::stream;

    const CHUNK: usize = 64 * 1024;
    const CHUNKS: usize = 800; // 50 MiB
    let total = CHUNK * CHUNKS;
    let fake = Router::new().route(
        "/exotelrecordings/acme1/big.mp3",
        get(move || async move {
            let chunk = bytes::Bytes::from(vec![0x55u8; CHUNK]);
            let body = Body::from_stream(stream::iter(
                (0..CHUNKS).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
            ));
            (
                [
                    ("content-type", "audio/mpeg".to_owned()),
                    ("content-length", total.to_string()),
                ],
                body,
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fake_addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, fake).await });

    let app = spawn(Backend::Sqlite).await;
    let t = app.tenant(false).await;
    let stored = format!("http://{fake_addr}/exotelrecordings/acme1/big.mp3");
    let id = finished_call(&app, &t, "sidbig", "+919812345678", Some(&stored)).await;
    let url = link_url(&app, &t.api_key, &id).await;

    // Direct from the fake, for comparison.
    let started = std::time::Instant::now();
    let mut r = app.http.get(&stored).send().await.unwrap();
    let mut direct = 0;
    while let Some(c) = r.chunk().await.unwrap() {
        direct += c.len();
    }
    let direct_secs = started.elapsed().as_secs_f64();
    assert_eq!(direct, total);

    // Reset the peak-RSS counter (Linux), then stream through the proxy.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let rss_before = proc_status_kib("VmRSS:");
    let started = std::time::Instant::now();
    let mut r = app.http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let mut got = 0;
    while let Some(c) = r.chunk().await.unwrap() {
        got += c.len();
    }
    let secs = started.elapsed().as_secs_f64();
    let peak = proc_status_kib("VmHWM:");
    assert_eq!(got, total);
    let mib = total as f64 / (1024.0 * 1024.0);
    let growth_mib = peak.saturating_sub(rss_before) as f64 / 1024.0;
    println!(
        "recording_stream_measure: {mib:.0} MiB through the proxy in {secs:.2} s = {:.0} MiB/s \
         (direct from the fake: {:.0} MiB/s); RSS before {:.1} MiB, peak {:.1} MiB, \
         growth {growth_mib:.1} MiB",
        mib / secs,
        mib / direct_secs,
        rss_before as f64 / 1024.0,
        peak as f64 / 1024.0,
    );
    // Buffering the file would grow the process by at least its size.
    assert!(
        growth_mib < mib / 2.0,
        "the proxy buffered: +{growth_mib:.1} MiB"
    );
}
