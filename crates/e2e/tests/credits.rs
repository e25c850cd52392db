//! Credits under contention: a balance that covers exactly 50 requests, 200
//! fired at once. Never more than 50 succeed, never a negative balance, and the
//! ledger agrees with the usage records to the credit.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{settled_usage, Db, Gateway, Node};
use cxmpute_store::LedgerKind;
use cxmpute_testkit::FakeUpstream;
use serde_json::json;

/// Speech is charged per character, counted by the gateway: hold = cost.
const INPUT: &str = "hello";
const PRICE_PER_CHAR: i64 = 18_750;

async fn contention(db: Db) {
    let upstream = FakeUpstream::start().await.unwrap();
    let gw = Gateway::start(&db.url).await;
    let (_, cred) = gw.device().await;
    let _node = Node::start(&gw, &cred, &["--upstream", &upstream.base_url, "--no-scrape"]).await;
    gw.wait_providers("fake-tts", 1, Duration::from_secs(30)).await;
    let per_request = PRICE_PER_CHAR * INPUT.len() as i64;
    let (account, key) = gw.account(50 * per_request, json!({})).await;

    let mut tasks = Vec::new();
    for _ in 0..200 {
        let req = gw
            .post("/v1/audio/speech", &key)
            .json(&json!({"model": "fake-tts", "input": INPUT, "voice": "a"}));
        tasks.push(tokio::spawn(async move {
            let res = req.send().await.unwrap();
            let status = res.status().as_u16();
            let body = res.bytes().await.unwrap();
            (status, body)
        }));
    }
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        let (status, body) = t.await.unwrap();
        match status {
            200 => ok += 1,
            402 => {
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(v["error"]["code"], "insufficient_quota");
                refused += 1;
            }
            other => panic!("unexpected status {other}: {}", String::from_utf8_lossy(&body)),
        }
    }
    assert!(ok <= 50, "{ok} requests succeeded on credit for 50");
    assert_eq!(ok + refused, 200);
    assert_eq!(ok, 50, "every credit should have been usable");

    let store = db.store().await;
    let (charged, rows) = settled_usage(store.as_ref(), &account, ok).await;
    let acc = store.account(&account).await.unwrap().unwrap();
    assert!(acc.balance >= 0);
    assert_eq!(rows, ok);
    assert_eq!(charged, 50 * per_request);
    assert_eq!(store.ledger_sum(&account, LedgerKind::Charge).await.unwrap(), -charged);
    assert_eq!(acc.balance, 50 * per_request - charged);
    assert_eq!(store.held_amount(&account).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credits_hold_under_contention_on_sqlite() {
    contention(Db::sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credits_hold_under_contention_on_postgres() {
    if let Some(db) = Db::postgres().await {
        contention(db).await;
    }
}
