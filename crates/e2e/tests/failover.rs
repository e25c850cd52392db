//! A node dies under load: non-streamed requests keep succeeding (retried on
//! the other node), streams it was serving end with an error event instead of
//! hanging, it leaves the pool within seconds, and it comes back on restart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Db, Gateway, Node};
use cxmpute_testkit::FakeUpstream;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_is_routed_around_and_rejoins() {
    let db = Db::sqlite().await;
    let upstream = FakeUpstream::start().await.unwrap();
    let gw = Gateway::start(&db.url).await;
    let (_, cred_a) = gw.device().await;
    let (_, cred_b) = gw.device().await;
    let args = ["--upstream", upstream.base_url.as_str(), "--no-scrape"];
    let mut a = Node::start(&gw, &cred_a, &args).await;
    let _b = Node::start(&gw, &cred_b, &args).await;
    gw.wait_providers("fake-chat", 2, Duration::from_secs(30)).await;
    let (_, key) = gw.account(1_000_000_000_000, json!({})).await;

    // Slow streams in flight on both nodes when one dies.
    let mut streams = Vec::new();
    for _ in 0..6 {
        let req = gw.post("/v1/chat/completions", &key).json(&json!({
            "model": "fake-chat", "stream": true, "max_tokens": 100,
            "messages": [{"role": "user", "content": "__slow__ long story"}],
        }));
        streams.push(tokio::spawn(async move {
            let res = req.send().await.unwrap();
            assert_eq!(res.status(), 200);
            // Must end, one way or the other, well before 100 tokens × 50 ms.
            tokio::time::timeout(Duration::from_secs(30), res.text())
                .await
                .expect("stream hung")
        }));
    }
    // Steady non-streamed load.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (gw_url, key, stop, ok, failed, http) = (
            gw.url.clone(),
            key.clone(),
            stop.clone(),
            ok.clone(),
            failed.clone(),
            gw.http.clone(),
        );
        load.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) && n < 2_000 {
                n += 1;
                let res = http
                    .post(format!("{gw_url}/v1/chat/completions"))
                    .bearer_auth(&key)
                    .json(&json!({"model": "fake-chat", "max_tokens": 3, "messages": [{"role": "user", "content": "hi there"}]}))
                    .send()
                    .await;
                let good = match res {
                    Ok(r) => r.status() == 200 && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                if good {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed_at = Instant::now();
    a.kill();
    let left = gw.wait_providers("fake-chat", 1, Duration::from_secs(5)).await;
    eprintln!(
        "dead node left the pool after {:?} (kill → observed {:?})",
        left,
        killed_at.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    assert!(ok.load(Ordering::Relaxed) > 20, "load ran");
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "non-streamed requests must survive a node dying"
    );

    let mut errored = 0;
    for s in streams {
        let body = s.await.unwrap().unwrap_or_default();
        if body.contains("\"error\"") {
            errored += 1;
        } else {
            assert!(
                body.contains("[DONE]"),
                "a stream neither finished nor reported an error: {body}"
            );
        }
    }
    eprintln!("{errored} of 6 streams were on the killed node and ended with an error event");

    // Restarted, the node rejoins.
    let _a2 = Node::start(&gw, &cred_a, &args).await;
    gw.wait_providers("fake-chat", 2, Duration::from_secs(15)).await;
}

/// A node that stops answering without closing its connection (frozen here
/// with SIGSTOP; a power cut or a lost network looks the same to the
/// gateway, since the kernel keeps the socket open) is found by the link's
/// pings and leaves the pool within a few seconds; woken up, it links again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_node_is_found_by_pings_and_rejoins_when_it_wakes() {
    let db = Db::sqlite().await;
    let upstream = FakeUpstream::start().await.unwrap();
    let gw = Gateway::start(&db.url).await;
    let (_, cred) = gw.device().await;
    let node = Node::start(&gw, &cred, &["--upstream", upstream.base_url.as_str(), "--no-scrape"]).await;
    gw.wait_providers("fake-chat", 1, Duration::from_secs(30)).await;
    let pid = node.child.id().expect("node pid").to_string();
    let signal = |name: &str| {
        let status = std::process::Command::new("kill")
            .args([name, pid.as_str()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {name} {pid}");
    };

    signal("-STOP");
    // Default pings: every 1 s, dead after 2 s without an answer.
    let gone = gw.wait_providers("fake-chat", 0, Duration::from_secs(8)).await;
    signal("-CONT");
    assert!(
        gone >= Duration::from_millis(500),
        "left after {gone:?}, before any ping could fail"
    );
    let back = gw.wait_providers("fake-chat", 1, Duration::from_secs(30)).await;
    eprintln!("frozen node left the pool after {gone:?} and was back {back:?} after waking");
}
