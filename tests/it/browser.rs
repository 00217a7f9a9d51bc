//! The admin console in a real browser: headless Chromium driven over WebDriver (`fantoccini`
//! against a `chromedriver` this test starts on a free port). It signs in, saves settings,
//! opens the calls list and a call's timeline, and saves PNG screenshots under
//! `target/screenshots/` for a person to look at (desktop and phone widths).
//!
//! Needs Debian's `chromium` and `chromium-driver` packages (`chromedriver` on PATH, or set
//! `CHROMEDRIVER`). Without them the test fails and says how to install them.

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use fantoccini::{Client, ClientBuilder, Locator};
use futures_util::FutureExt;
use serde_json::json;

use crate::{admin::PASSWORD, helpers::*};

/// A chromedriver process, killed on drop.
pub struct Driver {
    child: Child,
    pub url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find_chromedriver() -> PathBuf {
    if let Ok(p) = std::env::var("CHROMEDRIVER") {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("chromedriver"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "chromedriver was not found on PATH. The browser test needs headless Chromium and \
                 its WebDriver: on Debian run `apt-get update && apt-get install -y chromium \
                 chromium-driver` (or set CHROMEDRIVER=/path/to/chromedriver)."
            )
        })
}

/// Start chromedriver on a free loopback port and wait until it answers.
pub async fn start_driver() -> Driver {
    let exe = find_chromedriver();
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let child = Command::new(&exe)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("could not start {}: {e}", exe.display()));
    let driver = Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let probe = reqwest::Client::new();
    let started = Instant::now();
    loop {
        if let Ok(r) = probe.get(format!("{}/status", driver.url)).send().await
            && r.status().is_success()
        {
            return driver;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "chromedriver at {} did not answer within 30 s",
            driver.url
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A headless Chromium session.
pub async fn browser(driver: &Driver) -> Client {
    let mut chrome = json!({
        "args": [
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--no-first-run", "--window-size=1280,1000", "--lang=en-US"
        ]
    });
    if std::path::Path::new("/usr/bin/chromium").exists() {
        chrome["binary"] = json!("/usr/bin/chromium");
    }
    let mut caps = serde_json::Map::new();
    caps.insert("goog:chromeOptions".into(), chrome);
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("a WebDriver session with headless Chromium")
}

/// Save a screenshot of the viewport as `target/screenshots/{name}.png`.
pub async fn screenshot(c: &Client, name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    let png = c.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    let path = dir.join(format!("{name}.png"));
    std::fs::write(&path, png).unwrap();
    path
}

/// Fill in and submit the login form on the current page.
pub async fn sign_in(c: &Client, email: &str) {
    c.find(Locator::Css("input#email"))
        .await
        .unwrap()
        .send_keys(email)
        .await
        .unwrap();
    c.find(Locator::Css("input#password"))
        .await
        .unwrap()
        .send_keys(PASSWORD)
        .await
        .unwrap();
    c.find(Locator::Css("form button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

async fn wait_for(c: &Client, css: &str) -> fantoccini::elements::Element {
    c.wait()
        .at_most(Duration::from_secs(15))
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css} did not appear: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_console_in_headless_chromium() {
    let driver = start_driver().await;
    let app = TestApp::spawn(Backend::Sqlite).await;
    let t = app.tenant(true).await;
    callbridge::admin::users::create(&app.state.db, &t.id, "ops@acme.example", PASSWORD)
        .await
        .unwrap();
    // A finished call whose webhook delivery keeps failing, so the timeline has attempts.
    app.exotel_accepts("sidBrowser1").await;
    app.receiver_answers(503).await;
    let (call_id, url) = app.place_call(&t, "+919812345678").await;
    app.callback(
        &url,
        "application/json",
        guide_callback("sidBrowser1").to_string(),
    )
    .await;
    app.drain_jobs().await;
    app.exotel.reset().await;
    app.exotel_accepts("sidBrowser2").await;
    let _open = app.place_call(&t, "+919812340000").await;

    let c = browser(&driver).await;
    let result = std::panic::AssertUnwindSafe(async {
        c.goto(&format!("{}/admin/settings", app.base))
            .await
            .unwrap();
        wait_for(&c, "input#email").await;
        assert!(
            c.current_url()
                .await
                .unwrap()
                .path()
                .starts_with("/admin/login")
        );
        screenshot(&c, "01-login").await;

        sign_in(&c, "ops@acme.example").await;
        // Back where we asked to go.
        wait_for(&c, "form#settings-form").await;
        assert_eq!(c.current_url().await.unwrap().path(), "/admin/settings");
        let html = c.source().await.unwrap();
        assert!(html.contains("••••n456") && !html.contains("token456"));
        screenshot(&c, "02-settings").await;

        let name = c.find(Locator::Css("input#name")).await.unwrap();
        name.clear().await.unwrap();
        name.send_keys("Acme Browser Test").await.unwrap();
        let tl = c.find(Locator::Css("input#time_limit")).await.unwrap();
        tl.clear().await.unwrap();
        tl.send_keys("1800").await.unwrap();
        c.find(Locator::Css("form#settings-form button[type=submit]"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        let notice = wait_for(&c, "p.notice").await;
        assert_eq!(notice.text().await.unwrap(), "Settings saved.");
        screenshot(&c, "03-settings-saved").await;

        c.goto(&format!("{}/admin", app.base)).await.unwrap();
        wait_for(&c, "#dial-whom-url").await;
        let html = c.source().await.unwrap();
        assert!(html.contains("Acme Browser Test"));
        assert!(html.contains("/hooks/exotel/flow/"));
        screenshot(&c, "04-home").await;

        c.goto(&format!("{}/admin/calls", app.base)).await.unwrap();
        wait_for(&c, "table#calls").await;
        screenshot(&c, "05-calls").await;
        c.find(Locator::Css(&format!("a[href='/admin/calls/{call_id}']")))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        wait_for(&c, "table.attempts").await;
        let html = c.source().await.unwrap();
        assert!(html.contains("sidBrowser1"));
        assert!(html.contains("HTTP 503") || html.contains(">503<"));
        c.set_window_size(1280, 2200).await.unwrap();
        screenshot(&c, "06-call-timeline").await;

        // A phone-sized screen.
        c.set_window_size(390, 844).await.unwrap();
        c.goto(&format!("{}/admin/calls", app.base)).await.unwrap();
        wait_for(&c, "table#calls").await;
        screenshot(&c, "07-calls-phone").await;
        c.goto(&format!("{}/admin/calls/{call_id}", app.base))
            .await
            .unwrap();
        wait_for(&c, "table.attempts").await;
        c.set_window_size(390, 1800).await.unwrap();
        screenshot(&c, "08-call-timeline-phone").await;
        c.set_window_size(390, 844).await.unwrap();
        c.goto(&format!("{}/admin/settings", app.base))
            .await
            .unwrap();
        wait_for(&c, "form#settings-form").await;
        screenshot(&c, "09-settings-phone").await;
    })
    .catch_unwind()
    .await;
    // Close the browser even when a step failed, then report the failure.
    let _ = c.close().await;
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
    let name: Option<String> = {
        use sea_orm::ConnectionTrait;
        let row = app
            .state
            .db
            .query_one_raw(sea_orm::Statement::from_string(
                app.state.db.get_database_backend(),
                "SELECT name FROM tenants".to_owned(),
            ))
            .await
            .unwrap()
            .unwrap();
        row.try_get("", "name").unwrap()
    };
    assert_eq!(name.as_deref(), Some("Acme Browser Test"));
}

/// The CRM leg: install the fake CRM through its real OAuth redirect chain, import its users as
/// agents, then a click from the CRM places a call whose write-back shows on the timeline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crm_install_and_write_back_in_headless_chromium() {
    let driver = start_driver().await;
    let crm = crate::fakecrm::FakeCrm::start().await;
    let app = TestApp::spawn_with_connectors(Backend::Sqlite, |_| {}, vec![crm.connector()]).await;
    let t = app.tenant(false).await;
    callbridge::admin::users::create(&app.state.db, &t.id, "ops@acme.example", PASSWORD)
        .await
        .unwrap();
    app.exotel_accepts("sidCrmBrowser").await;

    let c = browser(&driver).await;
    let result = std::panic::AssertUnwindSafe(async {
        c.goto(&format!("{}/admin/connectors", app.base))
            .await
            .unwrap();
        wait_for(&c, "input#email").await;
        sign_in(&c, "ops@acme.example").await;
        wait_for(&c, "section#connector-fakecrm").await;
        screenshot(&c, "10-connectors-before").await;
        // Install: our start → the CRM's authorize → our callback → the Connectors page.
        c.find(Locator::Css(
            "section#connector-fakecrm form[action='/oauth/fakecrm/start'] button",
        ))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
        let notice = wait_for(&c, "p.notice").await;
        assert!(notice.text().await.unwrap().contains("is connected"));
        let html = c.source().await.unwrap();
        assert!(html.contains("acct-1"));
        screenshot(&c, "11-connectors-installed").await;

        c.find(Locator::Css("a[href='/admin/connectors/fakecrm/import']"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        wait_for(&c, "form#import-users").await;
        screenshot(&c, "12-import-users").await;
        c.find(Locator::Css("form#import-users button[type=submit]"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        let saved = wait_for(&c, "p.notice").await;
        assert_eq!(saved.text().await.unwrap(), "1 agent saved.");

        // The CRM relays a click; Exotel reports the end; the write-back runs.
        let r = app
            .http
            .post(format!("{}/crm/fakecrm/click", app.base))
            .header("x-fake-signature", crate::fakecrm::CLIENT_SECRET)
            .json(
                &json!({"account": "acct-1", "user": "u1", "phone": "+919812345678",
                          "record": {"object_type": "deal", "id": "d-42"}}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let body: serde_json::Value = r.json().await.unwrap();
        let call_id = body["call"]["id"].as_str().unwrap().to_owned();
        app.callback(
            &app.last_status_callback().await,
            "application/json",
            guide_callback("sidCrmBrowser").to_string(),
        )
        .await;
        app.drain_jobs().await;
        assert_eq!(crm.data().logs.len(), 1);

        c.goto(&format!("{}/admin/calls/{call_id}", app.base))
            .await
            .unwrap();
        let logs = wait_for(&c, "#crm-logs").await;
        assert!(logs.text().await.unwrap().contains("log-1"));
        c.set_window_size(1280, 1800).await.unwrap();
        screenshot(&c, "13-call-crm-writeback").await;
        c.set_window_size(390, 1400).await.unwrap();
        c.goto(&format!("{}/admin/connectors", app.base))
            .await
            .unwrap();
        wait_for(&c, "section#connector-fakecrm").await;
        screenshot(&c, "14-connectors-phone").await;
    })
    .catch_unwind()
    .await;
    let _ = c.close().await;
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// Pipedrive's calling panel as a browser runs it: the iframe page with the token Pipedrive puts
/// in its URL, a number typed in, the call placed and its progress shown until Exotel reports
/// the end. (Pipedrive's SDK cannot load here — no network — which the page tolerates; clicks
/// relayed by the SDK take the same path.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipedrive_panel_places_a_call_and_shows_progress() {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    let driver = start_driver().await;
    let api = wiremock::MockServer::start().await;
    let app = TestApp::spawn_with(Backend::Sqlite, |c| {
        c.pipedrive_client_id = Some("pd-client".into());
        c.pipedrive_client_secret = Some("pd-secret-for-the-panel-test".into());
        c.pipedrive_api_hosts = vec!["127.0.0.1".into()];
    })
    .await;
    let t = app.tenant(false).await;
    // An installed Pipedrive company 7788 and its user 123 mapped to the agent's phone.
    let tokens = callbridge_connector::TokenSet {
        access_token: callbridge_connector::AccessToken("at".into()),
        refresh_token: None,
        expires_at: None,
        api_base: Some(api.uri()),
        raw: json!({}),
    };
    callbridge::crm::installations::upsert(
        &app.state,
        callbridge::crm::installations::NewInstall {
            tenant_id: &t.id,
            connector: "pipedrive",
            vars: &callbridge_connector::InstallVars::new(),
            tokens: &tokens,
            account_id: Some("7788"),
            installed_by: "ops@acme.example",
        },
    )
    .await
    .unwrap();
    app.add_agent(&t.id, "+919876543210", None, "pipedrive:123")
        .await;
    app.exotel_accepts("sidPanel").await;
    let jwt = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"userId": 123, "companyId": 7788,
                "exp": chrono::Utc::now().timestamp() + 300}),
        &EncodingKey::from_secret(b"pd-secret-for-the-panel-test"),
    )
    .unwrap();

    let c = browser(&driver).await;
    let result = std::panic::AssertUnwindSafe(async {
        c.set_window_size(400, 700).await.unwrap();
        c.goto(&format!(
            "{}/crm/pipedrive/panel?userId=123&companyId=7788&id=rt1&token={jwt}",
            app.base
        ))
        .await
        .unwrap();
        wait_for(&c, "form#dial").await;
        c.find(Locator::Css("input#number"))
            .await
            .unwrap()
            .send_keys("098123 45678")
            .await
            .unwrap();
        c.find(Locator::Css("form#dial button"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        let status = c.find(Locator::Css("#status")).await.unwrap();
        let started = Instant::now();
        while !status.text().await.unwrap().contains("Ringing") {
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "panel said: {}",
                status.text().await.unwrap()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        screenshot(&c, "15-pipedrive-panel-ringing").await;
        let connect = app.connect_requests().await.pop().expect("a connect");
        assert!(
            connect
                .iter()
                .any(|(k, v)| k == "To" && v == "+919812345678")
        );
        app.callback(
            &app.last_status_callback().await,
            "application/json",
            guide_callback("sidPanel").to_string(),
        )
        .await;
        let started = Instant::now();
        while !status.text().await.unwrap().contains("talked 32 s") {
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "panel said: {}",
                status.text().await.unwrap()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        screenshot(&c, "16-pipedrive-panel-finished").await;
    })
    .catch_unwind()
    .await;
    let _ = c.close().await;
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}
