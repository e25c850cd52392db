//! The gateway is SIGKILLed under load and restarted on the same database:
//! every request the client saw succeed is charged exactly once, none twice,
//! and holds of the interrupted ones are returned (on SQLite they lived in
//! the killed process's memory, so the stored balance must show none).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Db, Gateway, Node};
use cxmpute_store::LedgerKind;
use cxmpute_testkit::FakeUpstream;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateway_charges_each_success_exactly_once() {
    let db = Db::sqlite().await;
    let upstream = FakeUpstream::start().await.unwrap();
    let mut gw = Gateway::start(&db.url).await;
    let (_, cred) = gw.device().await;
    let _node = Node::start(&gw, &cred, &["--upstream", &upstream.base_url, "--no-scrape"]).await;
    gw.wait_providers("fake-chat", 1, Duration::from_secs(30)).await;
    const DEPOSIT: i64 = 1_000_000_000_000;
    let (account, key) = gw.account(DEPOSIT, json!({})).await;

    let mut tasks = Vec::new();
    for i in 0..8 {
        let (url, key, http) = (gw.url.clone(), key.clone(), gw.http.clone());
        tasks.push(tokio::spawn(async move {
            let mut succeeded = Vec::new();
            for n in 0..400 {
                let stream = (i + n) % 2 == 0;
                let res = http
                    .post(format!("{url}/v1/chat/completions"))
                    .bearer_auth(&key)
                    .json(&json!({"model": "fake-chat", "max_tokens": 4, "stream": stream, "messages": [{"role": "user", "content": "a b c"}]}))
                    .send()
                    .await;
                let Ok(res) = res else { break };
                let id = res.headers().get("x-request-id").map(|v| v.to_str().unwrap().to_string());
                let ok = res.status() == 200;
                match res.text().await {
                    // A streamed answer is complete only with its [DONE].
                    Ok(body) if ok && (!stream || body.contains("[DONE]")) => succeeded.push(id.unwrap()),
                    _ => break,
                }
            }
            succeeded
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    gw.kill();
    let _ = gw.child.wait().await;
    let mut seen_ok = Vec::new();
    for t in tasks {
        seen_ok.extend(t.await.unwrap());
    }
    assert!(seen_ok.len() > 10, "the load should have had successes before the kill");

    // Restart on the same database (and port, so the node relinks).
    let gw2 = Gateway::start_on(&db.url, gw.port).await;
    let store = db.store().await;
    for id in &seen_ok {
        let usage = store.usage(id).await.unwrap();
        assert!(
            usage.is_some_and(|u| u.cost > 0 && u.status == 200),
            "success {id} was not charged"
        );
    }
    // Charged exactly once: one ledger charge per usage record, no more.
    let rows = store.usage_for_account(&account, 100_000).await.unwrap();
    let charged: i64 = rows.iter().map(|u| u.cost).sum();
    assert_eq!(store.ledger_sum(&account, LedgerKind::Charge).await.unwrap(), -charged);
    assert_eq!(
        store.held_amount(&account).await.unwrap(),
        0,
        "holds of interrupted requests were returned"
    );
    let balance = store.account(&account).await.unwrap().unwrap().balance;
    assert_eq!(balance, DEPOSIT - charged);
    // And the restarted gateway serves again once the node relinks.
    gw2.wait_providers("fake-chat", 1, Duration::from_secs(15)).await;
    let res = gw2
        .post("/v1/chat/completions", &key)
        .json(&json!({"model": "fake-chat", "messages": [{"role": "user", "content": "again"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

/// Holds live in the serving gateway's memory on SQLite, so a second gateway
/// on the same file must not start; the admin commands still work beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_gateway_on_a_served_sqlite_file_refuses_to_start() {
    let db = Db::sqlite().await;
    let gw = Gateway::start(&db.url).await;
    let run = |args: &[&str]| {
        tokio::process::Command::new(common::bin("cxmpute-gateway"))
            .args(["--database-url", db.url.as_str()])
            .args(args)
            .env("CXMPUTE_LOG", "warn")
            .kill_on_drop(true)
            .output()
    };
    let second = tokio::time::timeout(Duration::from_secs(60), run(&["serve", "--listen", "127.0.0.1:0"]))
        .await
        .expect("the second gateway should stop by itself")
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&second.stdout),
        String::from_utf8_lossy(&second.stderr),
    );
    assert!(!second.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("another gateway is serving"), "{stderr}");
    assert!(!stdout.contains("listening on"), "it announced itself: {stdout}");

    let admin = run(&["admin", "account", "create", "--name", "beside"]).await.unwrap();
    assert!(admin.status.success(), "{}", String::from_utf8_lossy(&admin.stderr));
    // The first gateway is unaffected.
    let res = gw.http.get(format!("{}/healthz", gw.url)).send().await.unwrap();
    assert_eq!(res.status(), 200);
}
