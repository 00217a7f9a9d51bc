//! The `callbridge` binary's admin commands, run as a subprocess on a temporary SQLite file
//! (and once against PostgreSQL to check it refuses to start without a master key).

use std::{
    path::Path,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::helpers::pg_admin_url;

/// A `callbridge` command with a clean environment pointing at `db`.
fn cli(dir: &Path, database_url: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_callbridge"));
    cmd.current_dir(dir)
        .env("DATABASE_URL", database_url)
        .env("CALLBRIDGE_LOG_FORMAT", "pretty")
        .env("CALLBRIDGE_PUBLIC_URL", "https://cb.example.com")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    for (k, _) in std::env::vars() {
        if k.starts_with("CALLBRIDGE_")
            && k != "CALLBRIDGE_PUBLIC_URL"
            && k != "CALLBRIDGE_LOG_FORMAT"
        {
            cmd.env_remove(k);
        }
    }
    cmd
}

fn sqlite_url(dir: &Path) -> String {
    format!("sqlite://{}?mode=rwc", dir.join("x.db").display())
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("callbridge runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

const TENANT_ARGS: [&str; 12] = [
    "tenant",
    "create",
    "--name",
    "Acme Sales",
    "--exotel-sid",
    "acme1",
    "--exotel-api-key",
    "key123",
    "--exotel-api-token",
    "token456",
    "--webhook-url",
    "https://crm.example.com/hooks/calls",
];

fn create_tenant(dir: &Path, extra: &[&str]) -> Output {
    run(cli(dir, &sqlite_url(dir)).args(TENANT_ARGS).args(extra))
}

fn flow_token<'a>(url: &'a str, suffix: &str) -> &'a str {
    url.strip_prefix("https://cb.example.com/hooks/exotel/flow/")
        .and_then(|rest| rest.strip_suffix(suffix))
        .unwrap_or_else(|| panic!("unexpected flow URL {url}"))
}

#[test]
fn tenant_create_prints_credentials_once_and_makes_a_private_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = create_tenant(dir.path(), &["--caller-id", "080 4711 2233"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON object");
    assert!(json["tenant_id"].as_str().unwrap().starts_with("ten_"));
    let key = json["api_key"].as_str().unwrap();
    assert!(key.starts_with("cb_") && key.len() >= 3 + 22, "{key}");
    assert!(
        json["webhook_secret"]
            .as_str()
            .unwrap()
            .starts_with("whsec_")
    );
    let dial = json["dial_whom_url"].as_str().unwrap();
    let pass = json["passthru_url"].as_str().unwrap();
    let token = flow_token(dial, "/dial-whom");
    assert!(token.len() >= 22, "flow token {token:?} too short");
    assert!(
        token
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    );
    assert_eq!(flow_token(pass, "/passthru"), token);

    let key_file = dir.path().join("x.db.key");
    assert!(key_file.exists(), "no key file beside the database");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "key file mode {mode:o}");
    }
    let key_before = std::fs::read(&key_file).unwrap();
    // No secret reached stderr (logs).
    let err = stderr(&out);
    assert!(!err.contains(key) && !err.contains("token456"), "{err}");

    // A second tenant reuses the key file and gets its own credentials.
    let out2 = create_tenant(dir.path(), &[]);
    assert!(out2.status.success(), "{}", stderr(&out2));
    let json2: Value = serde_json::from_slice(&out2.stdout).unwrap();
    assert_ne!(json2["tenant_id"], json["tenant_id"]);
    assert_ne!(json2["api_key"], json["api_key"]);
    assert_ne!(
        flow_token(json2["dial_whom_url"].as_str().unwrap(), "/dial-whom"),
        token
    );
    assert_eq!(std::fs::read(&key_file).unwrap(), key_before);
}

#[test]
fn tenant_create_refuses_bad_arguments_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(dir.path());
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--webhook-url", "not a url"], "--webhook-url"),
        (
            vec!["--webhook-url", "ftp://example.com/x"],
            "--webhook-url",
        ),
        (vec!["--caller-id", "12"], "--caller-id"),
        (vec!["--exotel-api-base", "nope"], "--exotel-api-base"),
        (vec!["--region", "XX"], "region"),
    ];
    for (extra, expect) in cases {
        let mut args: Vec<&str> = TENANT_ARGS.to_vec();
        // Replace the good webhook URL when the case supplies its own.
        if extra[0] == "--webhook-url" {
            args.truncate(10);
        }
        let out = run(cli(dir.path(), &url).args(&args).args(&extra));
        assert!(!out.status.success(), "{extra:?} succeeded");
        let err = stderr(&out);
        assert!(err.contains(expect), "{extra:?}: stderr {err:?}");
        assert!(out.stdout.is_empty(), "{extra:?} printed {:?}", out.stdout);
    }
    // A missing required flag is a usage error from clap.
    let out = run(cli(dir.path(), &url).args([
        "tenant",
        "create",
        "--name",
        "X",
        "--exotel-api-key",
        "k",
        "--exotel-api-token",
        "t",
    ]));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--exotel-sid"), "{}", stderr(&out));
    // An empty value is refused too.
    let out = run(cli(dir.path(), &url).args([
        "tenant",
        "create",
        "--name",
        "X",
        "--exotel-sid",
        " ",
        "--exotel-api-key",
        "k",
        "--exotel-api-token",
        "t",
    ]));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--exotel-sid"), "{}", stderr(&out));
}

#[test]
fn agent_add_maps_crm_users_and_refuses_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(dir.path());
    let out = create_tenant(dir.path(), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let tenant: Value = serde_json::from_slice(&out.stdout).unwrap();
    let tid = tenant["tenant_id"].as_str().unwrap();

    let out = run(cli(dir.path(), &url).args([
        "agent",
        "add",
        "--tenant",
        tid,
        "--phone",
        "09876543210",
        "--name",
        "Asha",
        "--crm-user",
        "pipedrive:42",
        "--crm-user",
        "zoho:9001",
    ]));
    assert!(out.status.success(), "{}", stderr(&out));
    let agent: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(agent["agent_id"].as_str().unwrap().starts_with("agt_"));
    assert_eq!(agent["tenant_id"], tid);
    assert_eq!(agent["phone"], "+919876543210");
    assert_eq!(agent["name"], "Asha");

    // Adding the same phone again updates, it does not duplicate.
    let out = run(cli(dir.path(), &url).args([
        "agent",
        "add",
        "--tenant",
        tid,
        "--phone",
        "+919876543210",
        "--crm-user",
        "pipedrive:42",
    ]));
    assert!(out.status.success(), "{}", stderr(&out));
    let again: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(again["agent_id"], agent["agent_id"]);

    for bad in ["pipedrive", "pipedrive:", ":42", "pipe drive:42"] {
        let out = run(cli(dir.path(), &url).args([
            "agent",
            "add",
            "--tenant",
            tid,
            "--phone",
            "09876543211",
            "--crm-user",
            bad,
        ]));
        assert!(!out.status.success(), "{bad} accepted");
        assert!(
            stderr(&out).contains("--crm-user"),
            "{bad}: {}",
            stderr(&out)
        );
    }
    let out = run(cli(dir.path(), &url).args(["agent", "add", "--tenant", tid, "--phone", "12"]));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--phone"), "{}", stderr(&out));
    let out = run(cli(dir.path(), &url).args([
        "agent",
        "add",
        "--tenant",
        "ten_nope",
        "--phone",
        "09876543210",
    ]));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no tenant"), "{}", stderr(&out));
}

#[test]
fn migrate_applies_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(dir.path());
    for _ in 0..2 {
        let out = run(cli(dir.path(), &url).arg("migrate"));
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(stderr(&out).contains("migrations applied"));
    }
    assert!(dir.path().join("x.db").exists());
}

#[test]
fn postgres_without_a_master_key_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let pg = pg_admin_url();
    // `tenant create` would seal secrets: refused with the reason.
    let out = run(cli(dir.path(), &pg).args(TENANT_ARGS));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("CALLBRIDGE_MASTER_KEY"),
        "{}",
        stderr(&out)
    );
    // `serve` refuses to start at all (bounded wait: it must exit, not serve).
    let mut child = cli(dir.path(), &pg)
        .arg("serve")
        .env("CALLBRIDGE_BIND", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("serve kept running on PostgreSQL without a master key");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(err.contains("CALLBRIDGE_MASTER_KEY"), "{err}");
    assert!(!Path::new(&dir.path().join("callbridge.db.key")).exists());
}

#[test]
fn a_connector_enabled_without_its_credentials_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(cli(dir.path(), &sqlite_url(dir.path()))
        .arg("migrate")
        .env("CALLBRIDGE_CONNECTORS", "[\"pipedrive\"]"));
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("CALLBRIDGE_PIPEDRIVE_CLIENT_ID")
            && err.contains("CALLBRIDGE_PIPEDRIVE_CLIENT_SECRET"),
        "{err}"
    );
    // Half the credentials is no better.
    let out = run(cli(dir.path(), &sqlite_url(dir.path()))
        .arg("migrate")
        .env("CALLBRIDGE_PIPEDRIVE_CLIENT_ID", "abc"));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("CALLBRIDGE_PIPEDRIVE_CLIENT_SECRET"));
    // An unknown connector is named.
    let out = run(cli(dir.path(), &sqlite_url(dir.path()))
        .arg("migrate")
        .env("CALLBRIDGE_CONNECTORS", "[\"hubspot\"]"));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("hubspot"), "{}", stderr(&out));
    // With both, it starts.
    let out = run(cli(dir.path(), &sqlite_url(dir.path()))
        .arg("migrate")
        .env("CALLBRIDGE_PIPEDRIVE_CLIENT_ID", "abc")
        .env("CALLBRIDGE_PIPEDRIVE_CLIENT_SECRET", "def"));
    assert!(out.status.success(), "{}", stderr(&out));
}
