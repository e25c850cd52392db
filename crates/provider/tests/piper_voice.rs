//! The built-in voice with the real model (Piper en_US-joe-medium on ONNX
//! Runtime, phonemes from espeak-ng).
//!
//! `scripts/fetch-model.sh` puts the voice and ONNX Runtime in the cache; the
//! espeak-ng program comes from the system. Without them these tests pass with a
//! loud SKIP message, unless CXMPUTE_REQUIRE_MODELS is set, when they fail.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use cxmpute_provider::engines::piper::phonemes::{sentences, Espeak};
use cxmpute_provider::engines::piper::{self, PiperVoice};
use cxmpute_provider::models;

fn voice() -> Option<Arc<PiperVoice>> {
    static VOICE: OnceLock<Option<Arc<PiperVoice>>> = OnceLock::new();
    VOICE
        .get_or_init(|| {
            let library = models::cached_onnxruntime();
            let ready = models::is_piper_folder(&models::piper_dir()) && library.is_some();
            let espeak = Espeak::find("en-us");
            if !ready || espeak.is_err() {
                let required = std::env::var_os("CXMPUTE_REQUIRE_MODELS").is_some_and(|v| !v.is_empty());
                let what = format!(
                    "voice in cache: {ready}; espeak-ng: {:?}",
                    espeak.as_ref().err().map(|e| e.to_string())
                );
                assert!(
                    !required,
                    "CXMPUTE_REQUIRE_MODELS is set but the voice cannot run ({what})"
                );
                eprintln!("\n*** SKIPPED: the built-in voice cannot run here ({what}). ***\n");
                return None;
            }
            piper::init_onnxruntime(&library.expect("checked")).expect("load ONNX Runtime");
            let started = Instant::now();
            let v = PiperVoice::load(models::PIPER_ID, &models::piper_dir(), 2).expect("load the voice");
            eprintln!("voice loaded in {:?}", started.elapsed());
            Some(Arc::new(v))
        })
        .clone()
}

fn seconds(v: &PiperVoice, samples: &[i16]) -> f64 {
    samples.len() as f64 / f64::from(v.sample_rate)
}

#[test]
fn speaks_a_sentence_at_a_plausible_length_and_faster_than_real_time() {
    let Some(v) = voice() else { return };
    let text = "The weather is lovely today, and the sea is calm.";
    let parts = sentences(text);
    assert_eq!(parts.len(), 1);
    let started = Instant::now();
    let samples = v.speak(&parts[0], 1.0).unwrap();
    let took = started.elapsed().as_secs_f64();
    let secs = seconds(&v, &samples);
    eprintln!(
        "{secs:.2} s of audio in {took:.3} s: real-time factor {:.3}",
        took / secs
    );
    // About 2.5-4 s for ten words; anything far off means wrong ids or scales.
    assert!((1.5..6.0).contains(&secs), "{secs} s");
    let peak = samples.iter().map(|s| s.unsigned_abs()).max().unwrap_or(0);
    assert!(peak > 20_000, "normalised to near full scale, got peak {peak}");
    assert!(took < secs, "slower than real time: {took} s for {secs} s");
}

#[test]
fn speed_shortens_and_lengthens_the_audio() {
    let Some(v) = voice() else { return };
    let s = &sentences("Speech at different speeds should take different amounts of time.")[0];
    let normal = seconds(&v, &v.speak(s, 1.0).unwrap());
    let fast = seconds(&v, &v.speak(s, 2.0).unwrap());
    let slow = seconds(&v, &v.speak(s, 0.5).unwrap());
    eprintln!("0.5x {slow:.2} s, 1x {normal:.2} s, 2x {fast:.2} s");
    assert!(fast < normal * 0.7, "{fast} vs {normal}");
    assert!(slow > normal * 1.4, "{slow} vs {normal}");
}

#[test]
fn text_that_looks_like_espeak_options_is_spoken_not_obeyed() {
    let Some(v) = voice() else { return };
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("owned.wav");
    let text = format!("-w {} --stdout hello", target.display());
    let samples = v.speak(&sentences(&text)[0], 1.0).unwrap();
    assert!(!target.exists(), "espeak-ng took the text as options");
    assert!(seconds(&v, &samples) > 0.5);
}

#[test]
fn voices_include_the_speaker_and_openai_names() {
    let Some(v) = voice() else { return };
    assert_eq!(v.model, models::PIPER_ID);
    assert_eq!(v.sample_rate, 22_050);
    for name in ["joe", "JOE", "en_US-joe-medium", "alloy", "nova", ""] {
        assert!(v.accepts_voice(name), "{name}");
    }
    assert!(!v.accepts_voice("af_bella"));
}
