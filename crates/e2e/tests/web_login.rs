//! Email login end to end: a real SMTP server (Python's `aiosmtpd`, on a
//! loopback port, storing mail in a temporary maildir), the real gateway
//! binary configured to send through it, and a client that does what a
//! browser and then an API user would.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Db, Gateway};
use serde_json::{json, Value};
use tokio::process::{Child, Command};

/// `python3 -m aiosmtpd` writing every message into `dir` (a maildir).
struct SmtpServer {
    _child: Child,
    port: u16,
    dir: PathBuf,
}

impl SmtpServer {
    async fn start(dir: &Path) -> SmtpServer {
        let probe = Command::new("python3")
            .args(["-c", "import aiosmtpd"])
            .status()
            .await
            .expect("python3 is needed for this test");
        assert!(
            probe.success(),
            "this test needs Python's aiosmtpd: pip install aiosmtpd (scripts/test.sh does)"
        );
        // A maildir: Python's Maildir creates its subfolders only for a new folder.
        for sub in ["tmp", "new", "cur"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        // A free loopback port: bind, read, release. aiosmtpd cannot report
        // the port it picked itself.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("python3")
            .args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}")])
            .args(["-c", "aiosmtpd.handlers.Mailbox"])
            .arg(dir)
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start aiosmtpd");
        let started = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(started.elapsed() < Duration::from_secs(20), "aiosmtpd did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        SmtpServer {
            _child: child,
            port,
            dir: dir.to_path_buf(),
        }
    }

    /// Waits for a message to `to` and returns its text.
    async fn message_to(&self, to: &str) -> String {
        let started = Instant::now();
        loop {
            if let Ok(entries) = std::fs::read_dir(self.dir.join("new")) {
                for entry in entries.flatten() {
                    let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                    if text.lines().any(|l| l.starts_with("To:") && l.contains(to)) {
                        return text;
                    }
                }
            }
            assert!(started.elapsed() < Duration::from_secs(20), "no mail to {to} arrived");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The six-digit code in the message's subject.
fn code_in(message: &str) -> String {
    let subject = message
        .lines()
        .find(|l| l.starts_with("Subject:"))
        .expect("a subject line");
    let code: String = subject.chars().filter(char::is_ascii_digit).collect();
    assert_eq!(code.len(), 6, "{subject}");
    code
}

/// `name=value` of a `Set-Cookie` header for `name`.
fn set_cookie(res: &reqwest::Response, name: &str) -> Option<String> {
    res.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split(';').next())
        .find(|kv| kv.starts_with(&format!("{name}=")))
        .map(str::to_string)
}

/// The value of the hidden `csrf` field of a page.
fn csrf_field(page: &str) -> String {
    let at = page.find("name=\"csrf\" value=\"").expect("a csrf field") + "name=\"csrf\" value=\"".len();
    page[at..].chars().take_while(|c| *c != '"').collect()
}

#[tokio::test]
async fn a_user_logs_in_by_mail_creates_a_key_and_uses_it() {
    let mail = tempfile::tempdir().unwrap();
    let smtp = SmtpServer::start(mail.path()).await;
    let conf_dir = tempfile::tempdir().unwrap();
    let conf = conf_dir.path().join("gateway.toml");
    std::fs::write(
        &conf,
        format!(
            "[web.smtp]\nhost = \"127.0.0.1\"\nport = {}\nfrom = \"cxmpute <login@cxmpute.test>\"\ntls = \"none\"\n",
            smtp.port
        ),
    )
    .unwrap();
    let db = Db::sqlite().await;
    let gw = Gateway::start_with(&db.url, 0, &["--config", conf.to_str().unwrap()]).await;
    // A browser does not follow redirects for us here: we want the cookies.
    let http = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let email = "dev@example.com";

    let page = http.get(format!("{}/login", gw.url)).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let login_cookie = set_cookie(&page, "cx_login").expect("login cookie");
    let csrf = csrf_field(&page.text().await.unwrap());

    let sent = http
        .post(format!("{}/login", gw.url))
        .header("cookie", &login_cookie)
        .form(&[("email", email), ("csrf", &csrf)])
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 200, "{}", sent.text().await.unwrap());

    let message = smtp.message_to(email).await;
    assert!(message.contains("From: cxmpute <login@cxmpute.test>"), "{message}");
    let code = code_in(&message);

    let verified = http
        .post(format!("{}/login/verify", gw.url))
        .header("cookie", &login_cookie)
        .form(&[("email", email), ("code", &code), ("csrf", &csrf)])
        .send()
        .await
        .unwrap();
    assert_eq!(verified.status(), 303);
    assert_eq!(verified.headers()["location"], "/app");
    let session = set_cookie(&verified, "cx_session").expect("session cookie");

    let me: Value = http
        .get(format!("{}/web/api/me", gw.url))
        .header("cookie", &session)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["account"]["email"], email);
    let token = me["csrf_token"].as_str().unwrap();

    let created = http
        .post(format!("{}/web/api/keys", gw.url))
        .header("cookie", &session)
        .header("x-csrf-token", token)
        .json(&json!({"name": "laptop", "allowed_services": ["chat"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let created: Value = created.json().await.unwrap();
    let key = created["key"].as_str().unwrap();

    let models = http
        .get(format!("{}/v1/models", gw.url))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), 200);
    assert_eq!(models.json::<Value>().await.unwrap()["object"], "list");
    // The key authenticates: an unknown model is a 404, not a 401.
    let chat = http
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(key)
        .json(&json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(chat.status(), 404, "{}", chat.text().await.unwrap());
    let wrong = http
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(format!("{key}x"))
        .json(&json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);

    let dashboard = http
        .get(format!("{}/app", gw.url))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(dashboard.status(), 200);
    assert!(dashboard.text().await.unwrap().contains("laptop"));
}
