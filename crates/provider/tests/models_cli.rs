//! `cxmpute-provider models list|rm` against a throwaway CXMPUTE_MODELS_DIR.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use cxmpute_provider::models::cache::{CacheListing, EntryKind};

fn run(models_dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cxmpute-provider"))
        .args(args)
        .env("CXMPUTE_MODELS_DIR", models_dir)
        .output()
        .expect("run cxmpute-provider")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn mkdir(path: &Path) {
    fs::create_dir_all(path).expect("create a test folder");
}

fn write(path: &Path, bytes: &[u8]) {
    fs::write(path, bytes).expect("write a test file");
}

/// A cache with one complete model folder (3 + 5 + 7 + 100 bytes in a subfolder), a
/// folder holding a GGUF and its licence, one incomplete folder, a GGUF file, and a
/// hidden download folder that must not show.
fn sample_cache(root: &Path) {
    let minilm = root.join("all-minilm-l6-v2");
    mkdir(&minilm.join("onnx"));
    write(&minilm.join("model.safetensors"), b"abc");
    write(&minilm.join("config.json"), b"{...}");
    write(&minilm.join("tokenizer.json"), b"{.....}");
    write(&minilm.join("onnx/model.onnx"), &[0u8; 100]);
    mkdir(&root.join("gemma-3-270m"));
    write(&root.join("gemma-3-270m/gemma-3-270m-q4_k_m.gguf"), &[2u8; 1000]);
    write(&root.join("gemma-3-270m/NOTICE.md"), b"licence");
    mkdir(&root.join("org--half"));
    write(&root.join("org--half/config.json"), b"{}");
    write(&root.join("qwen2.5-0.5b-q4_k_m.gguf"), &[1u8; 2048]);
    mkdir(&root.join(".download-123"));
    write(&root.join(".download-123/partial.whl"), &[0u8; 4096]);
    mkdir(&root.join(".partial/.wheels"));
    write(&root.join(".partial/.wheels/x-1.0-py3-none-any.whl.part"), &[0u8; 3000]);
}

#[test]
fn list_json_shows_every_model_with_its_size() {
    let tmp = tempfile::tempdir().unwrap();
    sample_cache(tmp.path());
    let out = run(tmp.path(), &["models", "list", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let listing: CacheListing = serde_json::from_str(&stdout(&out)).unwrap();

    assert!(listing.exists);
    let summary: Vec<_> = listing
        .models
        .iter()
        .map(|m| (m.name.as_str(), m.kind, m.size_bytes, m.complete))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("all-minilm-l6-v2", EntryKind::Folder, 115, Some(true)),
            ("gemma-3-270m", EntryKind::Folder, 1007, Some(true)),
            ("org--half", EntryKind::Folder, 2, Some(false)),
            ("qwen2.5-0.5b-q4_k_m.gguf", EntryKind::File, 2048, None),
        ]
    );
    assert_eq!(listing.total_bytes, 115 + 1007 + 2 + 2048);
    assert_eq!(listing.partial_bytes, 3000);
}

#[test]
fn list_human_is_a_table() {
    let tmp = tempfile::tempdir().unwrap();
    sample_cache(tmp.path());
    let out = run(tmp.path(), &["models", "list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "NAME                      SIZE     KIND    STATUS", "{text}");
    assert_eq!(lines[1], "all-minilm-l6-v2          115 B    folder  complete");
    assert_eq!(lines[2], "gemma-3-270m              1007 B   folder  complete");
    assert_eq!(lines[3], "org--half                 2 B      folder  incomplete");
    assert_eq!(lines[4], "qwen2.5-0.5b-q4_k_m.gguf  2.0 KiB  file");
    assert!(lines[5].starts_with("4 model(s), 3.1 KiB in "), "{text}");
    assert!(lines[6].starts_with("2.9 KiB of unfinished downloads in "), "{text}");
}

#[test]
fn list_of_a_missing_cache_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("never-created");
    let out = run(&missing, &["models", "list"]);
    assert!(out.status.success());
    assert!(stdout(&out).contains("does not exist yet"), "{}", stdout(&out));
    let out = run(&missing, &["models", "list", "--json"]);
    let listing: CacheListing = serde_json::from_str(&stdout(&out)).unwrap();
    assert!(!listing.exists && listing.models.is_empty());
}

#[test]
fn rm_removes_a_folder_or_a_file() {
    let tmp = tempfile::tempdir().unwrap();
    sample_cache(tmp.path());

    let out = run(tmp.path(), &["models", "rm", "all-minilm-l6-v2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "removed all-minilm-l6-v2 (115 B)\n");
    assert!(!tmp.path().join("all-minilm-l6-v2").exists());

    let out = run(tmp.path(), &["models", "rm", "qwen2.5-0.5b-q4_k_m.gguf"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!tmp.path().join("qwen2.5-0.5b-q4_k_m.gguf").exists());
    assert!(tmp.path().join("org--half").exists(), "other entries stay");
}

#[test]
fn rm_of_an_unknown_name_fails_and_lists_what_is_there() {
    let tmp = tempfile::tempdir().unwrap();
    sample_cache(tmp.path());
    let out = run(tmp.path(), &["models", "rm", "llama-70b"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("no model named `llama-70b`"), "{err}");
    assert!(
        err.contains("cached models: all-minilm-l6-v2, gemma-3-270m, org--half, qwen2.5-0.5b-q4_k_m.gguf"),
        "{err}"
    );
    // Hidden scratch folders are not models and cannot be removed by name.
    let out = run(tmp.path(), &["models", "rm", ".download-123"]);
    assert!(!out.status.success());
    assert!(tmp.path().join(".download-123").exists());
}

#[test]
fn rm_refuses_names_that_leave_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    sample_cache(&cache);
    let precious = tmp.path().join("precious");
    fs::create_dir_all(&precious).unwrap();
    fs::write(precious.join("keep.txt"), b"keep").unwrap();

    for bad in ["../precious", "..", "all-minilm-l6-v2/onnx", "sub\\dir", "/etc"] {
        let out = run(&cache, &["models", "rm", bad]);
        assert!(!out.status.success(), "{bad} was accepted");
        assert!(stderr(&out).contains("is not a model name"), "{bad}: {}", stderr(&out));
    }
    assert!(precious.join("keep.txt").is_file());
    assert!(cache.join("all-minilm-l6-v2/onnx/model.onnx").is_file());
}
