//! The admin console's masking pages over HTTP: the virtual-number pool (list, add, remove),
//! sessions (list, filter, page, close), masking settings, the Exotel flow-setup page, CSRF and
//! tenant isolation. Every write is checked in the database, not only in the page.

use callbridge::masking::{self, NewParticipant, NewSession, SessionView};
use futures_util::FutureExt;
use reqwest::{StatusCode, header};
use serde_json::Value;

use crate::{
    admin::{Browser, PASSWORD, location, signed_in},
    both_backends,
    browser::{browser, screenshot, start_driver},
    helpers::*,
};

both_backends!(
    pool_page_lists_adds_and_removes_numbers,
    sessions_page_lists_filters_pages_and_closes,
    masking_settings_are_saved_and_validated,
    masking_writes_without_the_csrf_token_are_refused,
    admins_cannot_see_or_change_another_tenants_masking,
    flow_setup_shows_this_tenants_own_flow_urls,
);

/// A caller-mode (or PIN-mode) session between `a` (customer) and `b` (rider).
async fn session(app: &TestApp, t: &TestTenant, a: &str, b: &str, mode: &str) -> SessionView {
    masking::create_session(
        &app.state,
        &t.id,
        "IN",
        NewSession {
            participants: vec![
                NewParticipant {
                    number: a.into(),
                    role: "customer".into(),
                    crm: None,
                },
                NewParticipant {
                    number: b.into(),
                    role: "rider".into(),
                    crm: None,
                },
            ],
            ttl_seconds: None,
            mode: Some(mode.into()),
        },
    )
    .await
    .expect("session created")
}

/// The tenant's pool numbers, sorted.
async fn pool(app: &TestApp, t: &TestTenant) -> Vec<String> {
    app.rows(
        "SELECT number FROM masking_numbers WHERE tenant_id = ? ORDER BY number",
        vec![t.id.clone().into()],
    )
    .await
    .into_iter()
    .map(|r| r["number"].as_str().unwrap().to_owned())
    .collect()
}

async fn session_status(app: &TestApp, id: &str) -> String {
    app.rows(
        "SELECT status FROM masking_sessions WHERE id = ?",
        vec![id.into()],
    )
    .await
    .pop()
    .expect("session row")["status"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn allocations_of(app: &TestApp, id: &str) -> i64 {
    app.scalar(
        "SELECT COUNT(*) AS n FROM masking_allocations WHERE session_id = ?",
        vec![id.into()],
    )
    .await
}

/// The settings row of a tenant as stored (overrides), for before/after comparisons.
async fn settings_row(app: &TestApp, t: &TestTenant) -> Option<Value> {
    app.rows(
        "SELECT dial_format, fallback_number, pin_caller_check, passthru_branch_on_unanswered \
         FROM masking_settings WHERE tenant_id = ?",
        vec![t.id.clone().into()],
    )
    .await
    .pop()
}

/// The `<tr>` of the row whose `data-{attr}` is `value`.
fn row_of<'a>(html: &'a str, attr: &str, value: &str) -> &'a str {
    let marker = format!("data-{attr}=\"{value}\"");
    let start = html
        .find(&marker)
        .unwrap_or_else(|| panic!("no row {marker}"));
    let end = start + html[start..].find("</tr>").unwrap();
    &html[start..end]
}

async fn pool_page_lists_adds_and_removes_numbers(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (t, b) = signed_in(&app, false, "ops@acme.example").await;
    let html = b.page("/admin/masking").await;
    assert!(html.contains("href=\"/admin/masking\" aria-current=\"page\">Masking</a>"));
    assert!(html.contains("No numbers in the pool yet."));

    // Several at once, national and E.164, a duplicate folded: normalised with the tenant's
    // region (IN).
    let r = b
        .post(
            "/admin/masking/numbers",
            &[("numbers", "080 4711 2233\n+918047112234, 08047112233")],
        )
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let to = location(&r);
    assert_eq!(to, "/admin/masking?added=2&already=0");
    assert_eq!(pool(&app, &t).await, ["+918047112233", "+918047112234"]);
    let html = b.page(&to).await;
    assert!(html.contains("Added 2 numbers."));
    assert!(html.contains("data-number=\"+918047112233\""));
    assert!(html.contains("data-number=\"+918047112234\""));

    let r = b
        .post("/admin/masking/numbers", &[("numbers", "08047112233")])
        .await;
    assert_eq!(location(&r), "/admin/masking?added=0&already=1");
    assert!(
        b.page(&location(&r))
            .await
            .contains("1 was already in the pool.")
    );

    // One bad number: nothing is written, the page says which, the input is kept.
    let r = b
        .post(
            "/admin/masking/numbers",
            &[("numbers", "08047112235\nnot-a-number")],
        )
        .await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let html = r.text().await.unwrap();
    let alert = &html[html.find("role=\"alert\"").expect("an error box")..];
    let alert = &alert[..alert.find("</div>").unwrap()];
    assert!(alert.contains("Nothing was saved"), "{alert}");
    assert!(
        alert.contains("not-a-number") && !alert.contains("08047112235"),
        "{alert}"
    );
    assert!(html.contains("08047112235\nnot-a-number</textarea>"));
    let r = b
        .post("/admin/masking/numbers", &[("numbers", " \n ")])
        .await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("Enter at least one number.")
    );
    assert_eq!(pool(&app, &t).await, ["+918047112233", "+918047112234"]);

    // A number in use shows its session count and cannot be removed.
    let s = session(&app, &t, "+919811111111", "+919822222222", "caller").await;
    let used = s.virtual_number.clone();
    let free = pool(&app, &t)
        .await
        .into_iter()
        .find(|n| *n != used)
        .unwrap();
    let html = b.page("/admin/masking").await;
    assert!(row_of(&html, "number", &used).contains("in use · 1"));
    assert!(row_of(&html, "number", &free).contains(">free<"));
    let r = b
        .post(&format!("/admin/masking/numbers/{used}/remove"), &[])
        .await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert!(r.text().await.unwrap().contains("close them first"));
    assert_eq!(pool(&app, &t).await.len(), 2);

    // The form's own action (the number percent-encoded) removes a free number.
    assert!(html.contains(&format!(
        "action=\"/admin/masking/numbers/{}/remove\"",
        free.replace('+', "%2B")
    )));
    let r = b
        .post(
            &format!("/admin/masking/numbers/{}/remove", free.replace('+', "%2B")),
            &[],
        )
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(pool(&app, &t).await, vec![used.clone()]);
    let html = b.page(&location(&r)).await;
    assert!(html.contains("The number was removed from the pool."));
    assert!(!html.contains(&format!("data-number=\"{free}\"")));
    assert!(html.contains(&format!("data-number=\"{used}\"")));
    assert_eq!(
        b.post(&format!("/admin/masking/numbers/{free}/remove"), &[])
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
}

async fn sessions_page_lists_filters_pages_and_closes(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (t, b) = signed_in(&app, false, "ops@acme.example").await;
    assert!(
        b.page("/admin/masking/sessions")
            .await
            .contains("No active sessions.")
    );
    masking::add_numbers(
        &app.state.db,
        &t.id,
        &["+918047112233".into(), "+918047112234".into()],
    )
    .await
    .unwrap();
    let caller = session(&app, &t, "+919811111111", "+919822222222", "caller").await;
    let pin = session(&app, &t, "+919833333333", "+919844444444", "pin").await;
    let pins: Vec<String> = pin
        .participants
        .iter()
        .map(|p| p.pin.clone().expect("PIN mode issues PINs"))
        .collect();

    let html = b.page("/admin/masking/sessions").await;
    // Newest first.
    let (at_pin, at_caller) = (html.find(&pin.id).unwrap(), html.find(&caller.id).unwrap());
    assert!(at_pin < at_caller);
    let row = row_of(&html, "session", &caller.id);
    for part in [
        ">caller<",
        caller.virtual_number.as_str(),
        "+919811111111",
        "customer",
        "+919822222222",
        "rider",
        ">active<",
        "/close\"",
    ] {
        assert!(row.contains(part), "{part} missing in {row}");
    }
    assert!(!row.contains("PIN"));
    let row = row_of(&html, "session", &pin.id);
    assert!(row.contains(">pin<"));
    for p in &pins {
        assert!(
            row.contains(&format!("PIN <code class=\"pin\">{p}</code>")),
            "{row}"
        );
    }

    // Close the caller-mode session through its button.
    let r = b
        .post(&format!("/admin/masking/sessions/{}/close", caller.id), &[])
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(session_status(&app, &caller.id).await, "closed");
    assert_eq!(allocations_of(&app, &caller.id).await, 0, "number released");
    assert_eq!(session_status(&app, &pin.id).await, "open");
    let html = b.page(&location(&r)).await;
    assert!(html.contains("The session was closed"));
    let row = row_of(&html, "session", &caller.id);
    assert!(row.contains(">closed<") && !row.contains("/close\""));
    let active = b.page("/admin/masking/sessions?show=active").await;
    assert!(!active.contains(&caller.id) && active.contains(&pin.id));
    assert_eq!(
        b.get("/admin/masking/sessions?show=bogus").await.status(),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        b.post("/admin/masking/sessions/ses_nope/close", &[])
            .await
            .status(),
        StatusCode::NOT_FOUND
    );

    // 51 more sessions: 53 in all, 52 active; pages of 50 joined by "Older »".
    let mut made = vec![caller.id.clone(), pin.id.clone()];
    for i in 0..51 {
        let s = session(
            &app,
            &t,
            &format!("+9197{:08}", i),
            &format!("+9196{:08}", i),
            "caller",
        )
        .await;
        made.push(s.id);
    }
    let mut seen = Vec::new();
    let mut path = "/admin/masking/sessions?show=all".to_owned();
    let mut pages = 0;
    loop {
        let html = b.page(&path).await;
        pages += 1;
        assert!(pages <= 3, "paging does not advance: {path}");
        let ids: Vec<String> = html
            .match_indices("data-session=\"")
            .map(|(i, m)| {
                let s = &html[i + m.len()..];
                s[..s.find('"').unwrap()].to_owned()
            })
            .collect();
        assert!(ids.len() <= 50);
        seen.extend(ids);
        let marker = "href=\"/admin/masking/sessions?";
        match html.find("id=\"older\"") {
            Some(end) => {
                let start = html[..end].rfind(marker).unwrap() + "href=\"".len();
                let href = &html[start..end];
                // askama writes `&` as `&#38;`.
                path = href[..href.find('"').unwrap()].replace("&#38;", "&");
            }
            None => break,
        }
    }
    assert_eq!(pages, 2);
    let mut expected = made.clone();
    expected.sort();
    expected.reverse();
    assert_eq!(seen, expected, "every session once, newest first");
}

async fn masking_settings_are_saved_and_validated(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (t, b) = signed_in(&app, false, "ops@acme.example").await;
    let html = b.page("/admin/masking/setup").await;
    assert!(html.contains("<option value=\"national\" selected>"));
    assert!(html.contains("<option value=\"200\" selected>"));
    assert!(settings_row(&app, &t).await.is_none());

    let r = b
        .post(
            "/admin/masking/settings",
            &[
                ("dial_format", "e164"),
                ("fallback_number", "098765 43210"),
                ("pin_caller_check", "on"),
                ("passthru_branch_on_unanswered", "302"),
            ],
        )
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&r), "/admin/masking/setup?notice=saved");
    let s = masking::settings(&app.state, &t.id).await.unwrap();
    assert_eq!(s.dial_format, "e164");
    assert_eq!(s.fallback_number.as_deref(), Some("+919876543210"));
    assert!(s.pin_caller_check);
    assert_eq!(s.passthru_branch_on_unanswered, 302);
    let html = b.page("/admin/masking/setup?notice=saved").await;
    assert!(html.contains("Masking settings saved."));
    assert!(html.contains("<option value=\"e164\" selected>"));
    assert!(html.contains("<option value=\"302\" selected>"));
    assert!(html.contains("value=\"+919876543210\""));
    assert!(html.contains("name=\"pin_caller_check\" value=\"on\" checked"));
    // The flow answers with them: an unknown caller gets the fallback, in E.164.
    let r = app
        .http
        .get(format!(
            "{}?CallFrom=09999999999&CallTo=08047112299",
            t.created.dial_whom_url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "+919876543210");

    // Every bad field is reported; nothing changes.
    let before = settings_row(&app, &t).await;
    let r = b
        .post(
            "/admin/masking/settings",
            &[
                ("dial_format", "sip"),
                ("fallback_number", "12"),
                ("passthru_branch_on_unanswered", "500"),
            ],
        )
        .await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let html = r.text().await.unwrap();
    assert!(html.contains("Number format must be national or E.164"));
    assert!(html.contains("Fallback number"));
    assert!(html.contains("Unanswered calls must answer 200 or 302"));
    assert!(html.contains("value=\"12\""), "the input is shown again");
    assert_eq!(settings_row(&app, &t).await, before);

    // A blank fallback clears it; an unchecked box turns the check off.
    let r = b
        .post(
            "/admin/masking/settings",
            &[
                ("dial_format", "national"),
                ("fallback_number", ""),
                ("passthru_branch_on_unanswered", "200"),
            ],
        )
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let s = masking::settings(&app.state, &t.id).await.unwrap();
    assert_eq!(
        (
            s.dial_format.as_str(),
            s.fallback_number,
            s.pin_caller_check,
            s.passthru_branch_on_unanswered
        ),
        ("national", None, false, 200)
    );
}

async fn masking_writes_without_the_csrf_token_are_refused(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (t, b) = signed_in(&app, false, "ops@acme.example").await;
    masking::add_numbers(&app.state.db, &t.id, &["+918047112233".into()])
        .await
        .unwrap();
    let s = session(&app, &t, "+919811111111", "+919822222222", "caller").await;
    let n = s.virtual_number.clone();
    for (path, fields) in [
        (
            "/admin/masking/numbers".to_owned(),
            vec![("numbers", "+918047112299")],
        ),
        (format!("/admin/masking/numbers/{n}/remove"), vec![]),
        (format!("/admin/masking/sessions/{}/close", s.id), vec![]),
        (
            "/admin/masking/settings".to_owned(),
            vec![
                ("dial_format", "e164"),
                ("fallback_number", "+919876543210"),
                ("passthru_branch_on_unanswered", "302"),
            ],
        ),
    ] {
        let r = b.post_raw(&path, &fields).await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{path}");
        let mut wrong = fields.clone();
        wrong.push(("csrf_token", "not-the-token-not-the-token-not-the-token-xx"));
        assert_eq!(
            b.post_raw(&path, &wrong).await.status(),
            StatusCode::FORBIDDEN,
            "{path}"
        );
    }
    assert_eq!(pool(&app, &t).await, vec![n.clone()]);
    assert_eq!(session_status(&app, &s.id).await, "open");
    assert_eq!(allocations_of(&app, &s.id).await, 2);
    assert!(settings_row(&app, &t).await.is_none());

    // The same close with the token goes through (so the refusals above were the token's).
    let r = b
        .post(&format!("/admin/masking/sessions/{}/close", s.id), &[])
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(session_status(&app, &s.id).await, "closed");
}

async fn admins_cannot_see_or_change_another_tenants_masking(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (a, admin_a) = signed_in(&app, false, "a@acme.example").await;
    let (bt, admin_b) = signed_in(&app, false, "b@other.example").await;
    masking::add_numbers(&app.state.db, &a.id, &["+918047112233".into()])
        .await
        .unwrap();
    masking::add_numbers(&app.state.db, &bt.id, &["+918047119999".into()])
        .await
        .unwrap();
    let s = session(&app, &a, "+919811111111", "+919822222222", "pin").await;
    let pin_a = s.participants[0].pin.clone().unwrap();

    // A sees its own.
    assert!(
        admin_a
            .page("/admin/masking")
            .await
            .contains("+918047112233")
    );
    assert!(
        admin_a
            .page("/admin/masking/sessions")
            .await
            .contains(&s.id)
    );

    // B sees none of it.
    let pool_b = admin_b.page("/admin/masking").await;
    assert!(!pool_b.contains("data-number=\"+918047112233\""));
    assert!(pool_b.contains("data-number=\"+918047119999\""));
    let sessions_b = admin_b.page("/admin/masking/sessions?show=all").await;
    assert!(!sessions_b.contains(&s.id) && !sessions_b.contains("+919811111111"));
    assert!(!sessions_b.contains(&format!(">{pin_a}<")));
    assert!(sessions_b.contains("No sessions."));

    // B cannot remove A's number or close A's session.
    assert_eq!(
        admin_b
            .post("/admin/masking/numbers/+918047112233/remove", &[])
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        admin_b
            .post(&format!("/admin/masking/sessions/{}/close", s.id), &[])
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(pool(&app, &a).await, ["+918047112233"]);
    assert_eq!(session_status(&app, &s.id).await, "open");
    assert_eq!(
        allocations_of(&app, &s.id).await,
        0,
        "PIN mode allocates no caller keys"
    );
    assert_eq!(
        app.scalar(
            "SELECT COUNT(*) AS n FROM masking_pins WHERE session_id = ?",
            vec![s.id.clone().into()],
        )
        .await,
        2
    );

    // B's settings are B's: saving them leaves A's untouched.
    let r = admin_b
        .post(
            "/admin/masking/settings",
            &[
                ("dial_format", "e164"),
                ("fallback_number", ""),
                ("passthru_branch_on_unanswered", "302"),
            ],
        )
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert!(settings_row(&app, &a).await.is_none());
    assert_eq!(
        masking::settings(&app.state, &bt.id)
            .await
            .unwrap()
            .passthru_branch_on_unanswered,
        302
    );
    assert!(
        admin_a
            .page("/admin/masking/setup")
            .await
            .contains("<option value=\"200\" selected>")
    );
}

async fn flow_setup_shows_this_tenants_own_flow_urls(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (a, admin_a) = signed_in(&app, false, "a@acme.example").await;
    let (bt, admin_b) = signed_in(&app, false, "b@other.example").await;
    assert_ne!(a.created.dial_whom_url, bt.created.dial_whom_url);
    for (t, other, admin) in [(&a, &bt, &admin_a), (&bt, &a, &admin_b)] {
        let r = admin.get("/admin/masking/setup").await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            r.headers()
                .get(header::CACHE_CONTROL)
                .map(|v| v.to_str().unwrap()),
            Some("no-store"),
            "the page carries the flow token"
        );
        let html = r.text().await.unwrap();
        assert!(html.contains(&format!(
            "<code id=\"dial-whom-url\">{}</code>",
            t.created.dial_whom_url
        )));
        assert!(html.contains(&format!(
            "<code id=\"passthru-url\">{}</code>",
            t.created.passthru_url
        )));
        assert!(!html.contains(&other.created.dial_whom_url));
        assert!(!html.contains(&other.created.passthru_url));
        for step in ["App Bazaar", "Connect", "Dial whom", "Passthru", "Gather"] {
            assert!(html.contains(step), "{step}");
        }
        // Other secrets stay hidden.
        assert!(!html.contains(&t.api_key) && !html.contains("token456"));
        // The URLs shown are live for this tenant.
        let r = app
            .http
            .head(&t.created.dial_whom_url)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    // Signed out, the page is not shown.
    let anon = Browser::new(&app);
    let r = anon.get("/admin/masking/setup").await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert!(location(&r).starts_with("/admin/login"));
}

/// The three masking pages at phone width in headless Chromium (like the console's browser
/// test): nothing wider than the screen, the close button usable; screenshots under
/// `target/screenshots/masking-*.png`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn masking_pages_fit_a_phone_screen() {
    use fantoccini::Locator;
    let driver = start_driver().await;
    let app = TestApp::spawn(Backend::Sqlite).await;
    let t = app.tenant(false).await;
    callbridge::admin::users::create(&app.state.db, &t.id, "ops@acme.example", PASSWORD)
        .await
        .unwrap();
    masking::add_numbers(
        &app.state.db,
        &t.id,
        &["+918047112233".into(), "+918047112234".into()],
    )
    .await
    .unwrap();
    let caller = session(&app, &t, "+919811111111", "+919822222222", "caller").await;
    session(&app, &t, "+919833333333", "+919844444444", "pin").await;

    let c = browser(&driver).await;
    let result = std::panic::AssertUnwindSafe(async {
        c.set_window_size(390, 844).await.unwrap();
        c.goto(&format!("{}/admin/login", app.base)).await.unwrap();
        crate::browser::sign_in(&c, "ops@acme.example").await;
        c.wait()
            .at_most(std::time::Duration::from_secs(15))
            .for_element(Locator::Css("nav.main"))
            .await
            .unwrap();
        for (path, name, css) in [
            ("/admin/masking", "masking-numbers-phone", "table#pool"),
            (
                "/admin/masking/sessions",
                "masking-sessions-phone",
                "table#sessions",
            ),
            (
                "/admin/masking/setup",
                "masking-setup-phone",
                "form#masking-settings",
            ),
        ] {
            c.goto(&format!("{}{path}", app.base)).await.unwrap();
            c.wait()
                .at_most(std::time::Duration::from_secs(15))
                .for_element(Locator::Css(css))
                .await
                .unwrap_or_else(|e| panic!("{css} on {path}: {e}"));
            let fits = c
                .execute(
                    "return document.documentElement.scrollWidth <= window.innerWidth && \
                     Array.from(document.querySelectorAll('.table-wrap')) \
                     .every(e => e.scrollWidth <= e.clientWidth);",
                    vec![],
                )
                .await
                .unwrap();
            c.set_window_size(390, 1600).await.unwrap();
            screenshot(&c, name).await;
            c.set_window_size(390, 844).await.unwrap();
            assert_eq!(
                fits,
                serde_json::json!(true),
                "{path} is wider than a phone"
            );
        }
        c.goto(&format!("{}/admin/masking/sessions", app.base))
            .await
            .unwrap();
        c.find(Locator::Css(&format!(
            "tr[data-session='{}'] button[type=submit]",
            caller.id
        )))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
        c.wait()
            .at_most(std::time::Duration::from_secs(15))
            .for_element(Locator::Css("p.notice"))
            .await
            .unwrap();
    })
    .catch_unwind()
    .await;
    let _ = c.close().await;
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
    assert_eq!(session_status(&app, &caller.id).await, "closed");
}
