//! `cxmpute-provider models pull` against a loopback server acting as the
//! Hugging Face hub (HF_ENDPOINT points at it): resume after a cut
//! connection, checksum mismatches, missing files, no disk space, no hub;
//! and catalog models pulled with `--engine` and `--source`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Output;

use cxmpute_testkit::fake_hub::{FakeHub, HubFile};
use sha2::{Digest, Sha256};

async fn hub(files: Vec<(&str, HubFile)>) -> (String, FakeHub) {
    let files = files.into_iter().map(|(p, f)| (p.to_owned(), f)).collect();
    let hub = FakeHub::start(files).await.unwrap();
    (hub.url.clone(), hub)
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn weights(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 % 251) as u8).collect()
}

fn lfs(body: Vec<u8>) -> HubFile {
    let sha = sha(&body);
    HubFile::lfs(body, sha)
}

fn git(body: &[u8]) -> HubFile {
    HubFile::git(body)
}

async fn pull(endpoint: &str, models: &Path, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_cxmpute-provider"))
        .args(["models", "pull"])
        .args(args)
        .env("CXMPUTE_MODELS_DIR", models)
        .env("HF_ENDPOINT", endpoint)
        .env_remove("HF_TOKEN")
        .output()
        .await
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn model_files(big: Vec<u8>) -> Vec<(&'static str, HubFile)> {
    vec![
        ("org/tiny-embed/main/model.safetensors", lfs(big)),
        ("org/tiny-embed/main/config.json", git(b"{\"hidden_size\": 4}")),
        ("org/tiny-embed/main/tokenizer.json", git(b"{\"model\": {}}")),
    ]
}

#[tokio::test]
async fn an_interrupted_download_resumes_where_it_stopped() {
    let big = weights(3 << 20);
    let mut files = model_files(big.clone());
    files[0].1.cut_after = Some(1_200_000);
    let (endpoint, state) = hub(files).await;
    let tmp = tempfile::tempdir().unwrap();

    let first = pull(&endpoint, tmp.path(), &["org/tiny-embed"]).await;
    assert!(!first.status.success());
    let err = stderr(&first);
    assert!(
        err.contains("interrupted") && err.contains("the next attempt resumes from there"),
        "{err}"
    );
    let part = tmp.path().join(".partial/org--tiny-embed/model.safetensors.part");
    let kept = std::fs::metadata(&part).unwrap().len();
    assert!(kept >= 1_000_000 && kept < big.len() as u64, "{kept}");
    assert!(
        !tmp.path().join("org--tiny-embed").exists(),
        "no folder before it is complete"
    );

    let second = pull(&endpoint, tmp.path(), &["org/tiny-embed"]).await;
    assert!(second.status.success(), "{}", stderr(&second));
    let dir = tmp.path().join("org--tiny-embed");
    assert_eq!(
        String::from_utf8_lossy(&second.stdout).trim(),
        dir.display().to_string()
    );
    assert_eq!(std::fs::read(dir.join("model.safetensors")).unwrap(), big);
    assert_eq!(std::fs::read(dir.join("config.json")).unwrap(), b"{\"hidden_size\": 4}");
    assert!(stderr(&second).contains("resuming after"), "{}", stderr(&second));
    assert!(!tmp.path().join(".partial/org--tiny-embed").exists());

    // The second run asked only for the missing bytes.
    let gets: Vec<Option<String>> = state
        .log()
        .iter()
        .filter(|(m, p, _)| m == "GET" && p.ends_with("model.safetensors"))
        .map(|(_, _, r)| r.clone())
        .collect();
    assert_eq!(gets, [None, Some(format!("bytes={kept}-"))]);

    // The cache lists it; a third run downloads nothing.
    let before = state.log().len();
    let third = pull(&endpoint, tmp.path(), &["org/tiny-embed"]).await;
    assert!(third.status.success());
    assert_eq!(state.log().len(), before);
}

#[tokio::test]
async fn a_checksum_mismatch_is_refused_and_discarded() {
    let mut files = model_files(weights(300_000));
    files[0].1.lfs_sha256 = Some(sha(b"something else"));
    let (endpoint, _) = hub(files).await;
    let tmp = tempfile::tempdir().unwrap();
    let out = pull(&endpoint, tmp.path(), &["org/tiny-embed"]).await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("checksum mismatch for model.safetensors"), "{err}");
    assert!(!tmp.path().join("org--tiny-embed").exists());
    assert!(!tmp
        .path()
        .join(".partial/org--tiny-embed/model.safetensors.part")
        .exists());
}

#[tokio::test]
async fn missing_files_unreachable_hubs_and_full_disks_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let (endpoint, state) = hub(model_files(weights(1000))).await;

    let out = pull(&endpoint, tmp.path(), &["org/tiny-embed", "--file", "model.gguf"]).await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("org/tiny-embed has no file 'model.gguf' at revision 'main'"),
        "{err}"
    );

    let out = pull(&endpoint, tmp.path(), &["org/../etc"]).await;
    assert!(
        stderr(&out).contains("not a Hugging Face repository id"),
        "{}",
        stderr(&out)
    );

    // A port nothing listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let out = pull(&format!("http://{closed}"), tmp.path(), &["org/tiny-embed"]).await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("cannot reach the Hugging Face hub at http://"), "{err}");

    // A file larger than any disk: refused before a single GET.
    assert!(state.edit("org/tiny-embed/main/model.safetensors", |f| f.claimed_size =
        Some(1 << 60)));
    let out = pull(&endpoint, tmp.path(), &["org/tiny-embed"]).await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("not enough disk space"), "{err}");
    assert!(!state.log().iter().any(|(m, _, _)| m == "GET"));
}

#[tokio::test]
async fn a_catalog_model_is_pulled_from_its_sources_for_an_engine() {
    let voice = weights(200_000);
    let (endpoint, state) = hub(vec![
        ("org/voices/main/en/v.onnx", lfs(voice.clone())),
        ("org/voices/main/en/v.onnx.json", git(b"{\"audio\": {}}")),
    ])
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let args = [
        "voice-x",
        "--engine",
        "piper",
        "--source",
        "s3:voices/v",
        "--source",
        "hf:org/voices/en/v.onnx",
    ];
    let out = pull(&endpoint, tmp.path(), &args).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let file = tmp.path().join("voice-x/en/v.onnx");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), file.display().to_string());
    assert_eq!(std::fs::read(&file).unwrap(), voice);
    assert!(stderr(&out).contains("voice-x is ready in"), "{}", stderr(&out));

    // `models list` shows it as fetched for the catalog.
    let list = tokio::process::Command::new(env!("CARGO_BIN_EXE_cxmpute-provider"))
        .args(["models", "list"])
        .env("CXMPUTE_MODELS_DIR", tmp.path())
        .output()
        .await
        .unwrap();
    let table = String::from_utf8_lossy(&list.stdout).into_owned();
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("voice-x") && l.contains("complete, catalog")),
        "{table}"
    );

    // Cached now: a second pull asks the hub nothing.
    let before = state.log().len();
    let again = pull(&endpoint, tmp.path(), &args).await;
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(state.log().len(), before);

    // Every source failing is one error that says why for each.
    let out = pull(
        &endpoint,
        tmp.path(),
        &[
            "chat-x",
            "--engine",
            "llama",
            "--source",
            "s3:x/y",
            "--source",
            "hf:org/voices",
        ],
    )
    .await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("cannot fetch chat-x from any of its sources"), "{err}");
    assert!(
        err.contains("s3:x/y: this node cannot fetch from 's3' sources"),
        "{err}"
    );
    assert!(
        err.contains("hf:org/voices: name the GGUF file in the repository"),
        "{err}"
    );
    // A folder the owner filled by hand is neither reused nor overwritten for a catalog id.
    std::fs::create_dir_all(tmp.path().join("voice-y/en")).unwrap();
    std::fs::write(tmp.path().join("voice-y/en/v.onnx"), b"mine").unwrap();
    std::fs::write(tmp.path().join("voice-y/en/v.onnx.json"), b"{}").unwrap();
    let out = pull(
        &endpoint,
        tmp.path(),
        &["voice-y", "--engine", "piper", "--source", "hf:org/voices/en/v.onnx"],
    )
    .await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("was not fetched for the catalog"),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read(tmp.path().join("voice-y/en/v.onnx")).unwrap(), b"mine");
    // A source needs the engine that decides what to fetch.
    let out = pull(&endpoint, tmp.path(), &["chat-x", "--source", "path:/tmp"]).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--engine"), "{}", stderr(&out));
}
