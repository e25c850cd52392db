//! The built-in voice end to end: client → gateway → link → node → espeak-ng +
//! Piper on ONNX Runtime, in every format we offer, billed per character.
//!
//! Needs the voice and ONNX Runtime in the cache (scripts/fetch-model.sh) and the
//! espeak-ng program. Without them the test passes with a loud SKIP message,
//! unless CXMPUTE_REQUIRE_MODELS is set.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{present_or_skip, settled_usage, Db, Gateway, Node};
use serde_json::{json, Value};

const MODEL: &str = "piper-en-us-joe-medium";
const RATE: u32 = 22_050;

fn speech_present() -> bool {
    let root = common::models_root();
    let voice = root
        .as_ref()
        .map(|r| r.join(MODEL).join("en_US-joe-medium.onnx"))
        .is_some_and(|f| f.is_file());
    let runtime = root
        .as_ref()
        .and_then(|r| std::fs::read_dir(r.join("onnxruntime-1.32.0")).ok())
        .is_some_and(|mut d| d.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("libonnxruntime"))));
    let espeak = std::process::Command::new("espeak-ng")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    present_or_skip(
        voice && runtime && espeak,
        &format!("the voice ({voice}), ONNX Runtime ({runtime}) or espeak-ng ({espeak})"),
        "Run scripts/fetch-model.sh and install espeak-ng to test the built-in voice.",
    )
}

/// The samples of a 16-bit mono WAV file, after checking its header.
fn wav_samples(bytes: &[u8]) -> Vec<i16> {
    assert_eq!(&bytes[0..4], b"RIFF");
    assert_eq!(&bytes[8..16], b"WAVEfmt ");
    let u16_at = |i: usize| u16::from_le_bytes([bytes[i], bytes[i + 1]]);
    let u32_at = |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    assert_eq!(u16_at(20), 1, "PCM");
    assert_eq!(u16_at(22), 1, "mono");
    assert_eq!(u32_at(24), RATE);
    assert_eq!(u16_at(34), 16, "bits");
    assert_eq!(&bytes[36..40], b"data");
    let len = u32_at(40) as usize;
    assert_eq!(len, bytes.len() - 44, "data size in the header");
    bytes[44..]
        .chunks_exact(2)
        .map(|c| i16::from_le_bytes([c[0], c[1]]))
        .collect()
}

/// Root-mean-square level of 16-bit samples.
fn rms(samples: &[i16]) -> f64 {
    let sum: f64 = samples.iter().map(|&s| f64::from(s) * f64::from(s)).sum();
    (sum / samples.len().max(1) as f64).sqrt()
}

#[tokio::test]
async fn builtin_speech_through_the_gateway() {
    if !speech_present() {
        return;
    }
    let db = Db::sqlite().await;
    let gw = Gateway::start(&db.url).await;
    let (_, cred) = gw.device().await;
    let _node = Node::start(&gw, &cred, &["--speech", "--no-scrape"]).await;
    gw.wait_providers(MODEL, 1, Duration::from_secs(60)).await;
    let (account, key) = gw.account(1_000_000_000_000, json!({"name": "t"})).await;
    let text = "The quick brown fox jumps over the lazy dog. Then it runs away, fast!";

    // WAV: a whole file with exact sizes, about as long as the text takes to say.
    let started = Instant::now();
    let res = gw
        .post("/v1/audio/speech", &key)
        .json(&json!({"model": MODEL, "input": text, "voice": "joe", "response_format": "wav"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "audio/wav");
    let wav = res.bytes().await.unwrap();
    let elapsed = started.elapsed();
    let samples = wav_samples(&wav);
    let seconds = samples.len() as f64 / f64::from(RATE);
    eprintln!(
        "wav: {seconds:.2} s of audio in {:.2} s (real-time factor {:.3})",
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() / seconds
    );
    assert!(
        (2.0..12.0).contains(&seconds),
        "{seconds} s for {} characters",
        text.len()
    );
    assert!(rms(&samples) > 500.0, "speech, not silence: rms {}", rms(&samples));

    // Twice the speed: clearly shorter.
    let res = gw
        .post("/v1/audio/speech", &key)
        .json(&json!({"model": MODEL, "input": text, "voice": "alloy", "response_format": "wav", "speed": 2.0}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let fast = wav_samples(&res.bytes().await.unwrap());
    assert!(
        (fast.len() as f64) < samples.len() as f64 * 0.75,
        "speed 2.0 gave {} samples against {}",
        fast.len(),
        samples.len()
    );

    // MP3 is the default format (as OpenAI's), MPEG frames at our rate.
    let res = gw
        .post("/v1/audio/speech", &key)
        .json(&json!({"model": MODEL, "input": text, "voice": "joe"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "audio/mpeg");
    let mp3 = res.bytes().await.unwrap();
    let sync = mp3
        .windows(2)
        .position(|w| w[0] == 0xFF && w[1] & 0xE0 == 0xE0)
        .expect("an MPEG frame");
    // MPEG-2 layer III at 22.05 kHz: version bits 10, layer bits 01, rate index 0.
    assert_eq!(mp3[sync + 1] & 0x1E, 0x12, "MPEG-2 layer III");
    assert_eq!((mp3[sync + 2] >> 2) & 0x03, 0, "22.05 kHz");
    assert!(mp3.len() > 8_000, "{} bytes of mp3", mp3.len());

    // PCM: raw 16-bit at 24 kHz, OpenAI's documented rate.
    let res = gw
        .post("/v1/audio/speech", &key)
        .json(&json!({"model": MODEL, "input": "Hello there.", "response_format": "pcm"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let pcm = res.bytes().await.unwrap();
    assert_eq!(pcm.len() % 2, 0);
    let secs = pcm.len() as f64 / 2.0 / 24_000.0;
    assert!((0.3..4.0).contains(&secs), "{secs} s of pcm");

    // FLAC: a FLAC stream whose STREAMINFO says mono 22.05 kHz.
    let res = gw
        .post("/v1/audio/speech", &key)
        .json(&json!({"model": MODEL, "input": "Hello there.", "response_format": "flac"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let flac = res.bytes().await.unwrap();
    assert_eq!(&flac[0..4], b"fLaC");
    // STREAMINFO starts at byte 8: rate is the top 20 bits at offset 18.
    let rate = (u32::from(flac[18]) << 12) | (u32::from(flac[19]) << 4) | (u32::from(flac[20]) >> 4);
    assert_eq!(rate, RATE);

    // What the voice cannot do is a clear 400 that names the parameter.
    for (body, param) in [
        (json!({"model": MODEL, "input": "x", "voice": "nobody"}), "voice"),
        (
            json!({"model": MODEL, "input": "x", "response_format": "opus"}),
            "response_format",
        ),
    ] {
        let res = gw.post("/v1/audio/speech", &key).json(&body).send().await.unwrap();
        assert_eq!(res.status(), 400, "{body}");
        let err: Value = res.json().await.unwrap();
        assert_eq!(err["error"]["param"], param, "{err}");
    }

    // The five good requests were billed (per character); the refused ones not.
    let store = db.store().await;
    settled_usage(store.as_ref(), &account, 5).await;
    let rows = store.usage_for_account(&account, 100).await.unwrap();
    let ok: Vec<_> = rows.iter().filter(|r| r.status == 200).collect();
    assert_eq!(ok.len(), 5, "{rows:?}");
    assert!(ok.iter().all(|r| r.cost > 0));
}
