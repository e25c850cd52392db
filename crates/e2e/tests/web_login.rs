//! Email login end to end: a real SMTP server (Python's `aiosmtpd`, on a
//! loopback port, storing mail in a temporary maildir), the real gateway
//! binary configured to send through it, and a client that does what a
//! browser and then an API user would.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::mail::{code_in, csrf_field, set_cookie, SmtpServer};
use common::{Db, Gateway};
use serde_json::{json, Value};

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
