//! Device login end to end: the real `cxmpute-provider login` asks the real
//! gateway for a code and prints it; a browser signs in by mail (a real SMTP
//! server), lands back on `/link`, approves; the login process saves the
//! credentials (mode 0600) and `start` links with them, and `logout` deletes
//! them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::mail::{code_in, csrf_field, set_cookie, SmtpServer};
use common::{bin, Db, Gateway};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// A provider command with its config and cache folders in `home`.
fn provider(home: &Path) -> Command {
    let mut cmd = Command::new(bin("cxmpute-provider"));
    cmd.env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("CXMPUTE_MODELS_DIR", home.join("models"))
        .env_remove("CXMPUTE_CREDENTIAL")
        .env_remove("CXMPUTE_CREDENTIALS")
        .env_remove("CXMPUTE_GATEWAY")
        .env(
            "CXMPUTE_LOG",
            std::env::var("CXMPUTE_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .kill_on_drop(true);
    cmd
}

#[tokio::test]
async fn a_node_logs_in_with_a_code_approved_on_the_web_and_then_links() {
    let mail = tempfile::tempdir().unwrap();
    let smtp = SmtpServer::start(mail.path()).await;
    let conf_dir = tempfile::tempdir().unwrap();
    let conf = conf_dir.path().join("gateway.toml");
    std::fs::write(
        &conf,
        format!(
            "[web.smtp]\nhost = \"127.0.0.1\"\nport = {}\nfrom = \"cxmpute <login@cxmpute.test>\"\ntls = \"none\"\n\
             [device_login]\npoll_interval_secs = 1\n",
            smtp.port
        ),
    )
    .unwrap();
    let db = Db::sqlite().await;
    let gw = Gateway::start_with(&db.url, 0, &["--config", conf.to_str().unwrap()]).await;
    let home = tempfile::tempdir().unwrap();

    // The node asks for a code and shows where to approve it.
    let mut login = provider(home.path())
        .args(["login", "--gateway", &gw.url, "--name", "e2e rig"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn cxmpute-provider login");
    let mut lines = BufReader::new(login.stdout.take().unwrap()).lines();
    let link = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(at) = line.find("/link?code=") {
                return line[at..].trim().to_string();
            }
        }
        panic!("cxmpute-provider login printed no /link URL");
    })
    .await
    .expect("no code within 30 s");
    let shown = link.trim_start_matches("/link?code=").to_string();
    assert_eq!(shown.len(), 9, "{link}");

    // The owner opens the link signed out, signs in by mail, comes back.
    let http = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let first = http.get(format!("{}{link}", gw.url)).send().await.unwrap();
    assert_eq!(first.status(), 303);
    let link_cookie = set_cookie(&first, "cx_link").expect("the code rides along");
    let page = http.get(format!("{}/login", gw.url)).send().await.unwrap();
    let login_cookie = set_cookie(&page, "cx_login").unwrap();
    let csrf = csrf_field(&page.text().await.unwrap());
    let cookies = format!("{login_cookie}; {link_cookie}");
    let email = "rig-owner@example.com";
    let sent = http
        .post(format!("{}/login", gw.url))
        .header("cookie", &cookies)
        .form(&[("email", email), ("csrf", &csrf)])
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 200);
    let code = code_in(&smtp.message_to(email).await);
    let verified = http
        .post(format!("{}/login/verify", gw.url))
        .header("cookie", &cookies)
        .form(&[("email", email), ("code", &code), ("csrf", &csrf)])
        .send()
        .await
        .unwrap();
    assert_eq!(verified.status(), 303);
    assert_eq!(verified.headers()["location"], link.as_str());
    let session = set_cookie(&verified, "cx_session").unwrap();

    let confirm = http
        .get(format!("{}{link}", gw.url))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(confirm.status(), 200);
    let confirm = confirm.text().await.unwrap();
    assert!(confirm.contains("e2e rig") && confirm.contains(&shown), "{confirm}");
    let approved = http
        .post(format!("{}/link", gw.url))
        .header("cookie", &session)
        .form(&[
            ("code", shown.as_str()),
            ("action", "approve"),
            ("csrf", &csrf_field(&confirm)),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(approved.status(), 200);

    // The login process gets the credentials and saves them privately.
    let status = tokio::time::timeout(Duration::from_secs(30), login.wait())
        .await
        .expect("login did not finish after approval")
        .unwrap();
    assert!(status.success());
    let mut rest = String::new();
    while let Some(line) = lines.next_line().await.unwrap() {
        rest.push_str(&line);
        rest.push('\n');
    }
    assert!(rest.contains("Linked"), "{rest}");
    let file = home.path().join("config").join("cxmpute").join("credentials.toml");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "credentials must be private");
    }
    let saved: toml::Table = toml::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let device_id = saved["device_id"].as_str().unwrap().to_string();
    assert_eq!(saved["gateway"].as_str(), Some(gw.url.as_str()));
    let store = db.store().await;
    let owner = store.account_by_email(email).await.unwrap().unwrap();
    let device = store.device(&device_id).await.unwrap().expect("the device exists");
    assert_eq!(
        (device.account_id.as_str(), device.name.as_str()),
        (owner.id.as_str(), "e2e rig")
    );

    // `start` with no credential or gateway given uses the saved ones.
    let mut node = provider(home.path())
        .args(["start", "--headless", "--no-chat", "--no-embeddings"])
        .spawn()
        .unwrap();
    gw.wait_providers("web-scrape", 1, Duration::from_secs(60)).await;
    let assigned = store
        .assignment(&device_id)
        .await
        .unwrap()
        .expect("the node asked for an assignment");
    assert!(assigned.models.iter().any(|(_, m)| m == "web-scrape"), "{assigned:?}");
    // `logout` while the node runs: the gateway revokes the credential and
    // closes the link, and the file goes.
    let credential = format!("{device_id}.{}", saved["access_key"].as_str().unwrap());
    let out = provider(home.path()).arg("logout").output().await.unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}{}", String::from_utf8_lossy(&out.stderr));
    assert!(said.contains("Signed out"), "{said}");
    assert!(!file.exists(), "logout deletes the credentials");
    gw.wait_providers("web-scrape", 0, Duration::from_secs(10)).await;
    let stats = gw
        .http
        .get(format!("{}/v1/provider/stats", gw.url))
        .bearer_auth(&credential)
        .send()
        .await
        .unwrap();
    assert_eq!(stats.status(), 401, "the credential no longer works");
    assert_eq!(
        store.device(&device_id).await.unwrap().unwrap().name,
        "e2e rig",
        "the device stays"
    );
    node.start_kill().unwrap();
    let _ = node.wait().await;
    // Without credentials, start explains what to do.
    let out = provider(home.path())
        .args(["start", "--headless", "--no-chat", "--no-embeddings"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cxmpute-provider login"));
}
