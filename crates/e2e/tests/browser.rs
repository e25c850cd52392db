//! The web pages in a real browser: headless Chromium (Debian's `chromium`)
//! driven by `playwright-core` (`tests/browser/flows.mjs`) against the real
//! gateway, a real SMTP server and a real provider node that the browser links.
//! This test starts those and checks what the flows left in the database;
//! the script does what people do in the browser and takes screenshots.
//!
//! `CXMPUTE_UPDATE_SCREENSHOTS=1` copies the screenshots into
//! `docs/screenshots/`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::mail::SmtpServer;
use common::{bin, present_or_skip, Db, Gateway};
use cxmpute_testkit::FakeUpstream;
use tokio::process::Command;

const ADMIN: &str = "admin@example.com";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn chromium() -> Option<PathBuf> {
    std::env::var_os("CXMPUTE_CHROMIUM")
        .map(PathBuf::from)
        .or_else(|| Some(PathBuf::from("/usr/bin/chromium")))
        .filter(|p| p.is_file())
}

#[tokio::test]
async fn users_admins_and_providers_in_headless_chromium() {
    let browser_dir = repo_root().join("tests/browser");
    let Some(chromium) = chromium() else {
        present_or_skip(
            false,
            "Chromium (/usr/bin/chromium)",
            "Install it (Debian: apt-get install chromium) or set CXMPUTE_CHROMIUM.",
        );
        return;
    };
    let node_ok = std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let playwright = browser_dir.join("node_modules/playwright-core");
    if !present_or_skip(
        node_ok && playwright.is_dir(),
        "Node.js with playwright-core (tests/browser/node_modules)",
        "Run `npm ci --prefix tests/browser` (scripts/test.sh does).",
    ) {
        return;
    }

    let mail = tempfile::tempdir().unwrap();
    let smtp = SmtpServer::start(mail.path()).await;
    let conf_dir = tempfile::tempdir().unwrap();
    let conf = conf_dir.path().join("gateway.toml");
    std::fs::write(
        &conf,
        format!(
            "[web]\nadmin_emails = [\"{ADMIN}\"]\n\
             [web.smtp]\nhost = \"127.0.0.1\"\nport = {}\nfrom = \"cxmpute <login@cxmpute.test>\"\ntls = \"none\"\n\
             [device_login]\npoll_interval_secs = 1\n",
            smtp.port
        ),
    )
    .unwrap();
    let upstream = FakeUpstream::start().await.unwrap();
    let db = Db::sqlite().await;
    let gw = Gateway::start_with(&db.url, 0, &["--config", conf.to_str().unwrap()]).await;
    let home = tempfile::tempdir().unwrap();
    let shots = tempfile::tempdir().unwrap();

    let out = tokio::time::timeout(
        Duration::from_secs(240),
        Command::new("node")
            .arg(browser_dir.join("flows.mjs"))
            .env("CXMPUTE_GATEWAY_URL", &gw.url)
            .env("CXMPUTE_MAILDIR", mail.path())
            .env("CXMPUTE_PROVIDER_BIN", bin("cxmpute-provider"))
            .env("CXMPUTE_PROVIDER_HOME", home.path())
            .env("CXMPUTE_UPSTREAM_URL", &upstream.base_url)
            .env("CXMPUTE_SCREENSHOTS", shots.path())
            .env("CXMPUTE_ADMIN_EMAIL", ADMIN)
            .env("CXMPUTE_CHROMIUM", &chromium)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the browser flows did not finish in 240 s")
    .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "browser flows failed:\n{stdout}\n{stderr}");

    // What the clicks did, as the database has it.
    let store = db.store().await;
    let user = store
        .account_by_email("ada@example.com")
        .await
        .unwrap()
        .expect("the user");
    assert!(user.suspended, "the admin suspended the user");
    assert_eq!(
        user.suspended_reason.as_deref(),
        Some(format!("abuse report (by {ADMIN})").as_str()),
        "the reason records who suspended"
    );
    let ledger = store.ledger(&user.id, 20).await.unwrap();
    assert!(
        ledger
            .iter()
            .any(|e| e.amount == 5_000_000_000 && e.note.as_deref().is_some_and(|n| n.contains("welcome credit"))),
        "the admin's deposit is in the ledger: {ledger:?}"
    );
    let keys = store.api_keys(&user.id).await.unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(keys[0].spent > 0, "the key was used and charged: {keys:?}");
    let owner = store
        .account_by_email("grace@example.com")
        .await
        .unwrap()
        .expect("the provider");
    let devices = store.devices(&owner.id).await.unwrap();
    assert_eq!(devices.len(), 1, "the browser linked one node: {devices:?}");

    let pages = [
        "login",
        "login-code",
        "models",
        "dashboard",
        "admin",
        "admin-account",
        "link",
        "provider",
        "network",
    ];
    for name in pages {
        let file = shots.path().join(format!("{name}.png"));
        let bytes = std::fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(
            bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 5_000,
            "{name}.png is not a screenshot"
        );
    }
    if std::env::var_os("CXMPUTE_UPDATE_SCREENSHOTS").is_some_and(|v| v == "1") {
        let dest = repo_root().join("docs/screenshots");
        std::fs::create_dir_all(&dest).unwrap();
        for name in pages {
            std::fs::copy(
                shots.path().join(format!("{name}.png")),
                dest.join(format!("{name}.png")),
            )
            .unwrap();
        }
    }
}
