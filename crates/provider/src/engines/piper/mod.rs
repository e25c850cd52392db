//! Built-in text to speech: Piper voices (VITS models in ONNX) run by ONNX
//! Runtime through `ort`, with phonemes from espeak-ng.
//!
//! - [`phonemes`]: sentences → espeak-ng IPA → the voice's phoneme ids.
//! - [`audio`]: 16-bit samples → mp3 / wav / flac / pcm.
//! - [`http`]: the `/v1/audio/speech` handler, streaming sentence by sentence.
//!
//! ONNX Runtime is loaded at run time from a shared library (`load-dynamic`):
//! the one inside the PyPI `onnxruntime` wheel, which the model cache fetches,
//! or whichever `ORT_DYLIB_PATH` names. Nothing native is linked at build time.

pub mod audio;
pub mod http;
pub mod phonemes;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{anyhow, bail, Context, Result};
use ort::session::Session;
use ort::value::Tensor;
use serde::Deserialize;

use phonemes::{Espeak, PhonemeIds, Sentence};

/// The voice's `.onnx.json`, the parts we use.
#[derive(Debug, Deserialize)]
struct VoiceConfig {
    audio: AudioConfig,
    espeak: EspeakConfig,
    #[serde(default)]
    inference: InferenceConfig,
    phoneme_id_map: HashMap<String, Vec<i64>>,
    #[serde(default)]
    num_speakers: u32,
    #[serde(default)]
    phoneme_type: Option<String>,
}

#[derive(Debug, Deserialize)]
struct AudioConfig {
    sample_rate: u32,
}

#[derive(Debug, Deserialize)]
struct EspeakConfig {
    voice: String,
}

#[derive(Debug, Clone, Copy, Deserialize)]
struct InferenceConfig {
    noise_scale: f32,
    length_scale: f32,
    noise_w: f32,
}

impl Default for InferenceConfig {
    fn default() -> Self {
        // Piper's defaults.
        Self {
            noise_scale: 0.667,
            length_scale: 1.0,
            noise_w: 0.8,
        }
    }
}

/// Silence between sentences (Piper's default).
const SENTENCE_SILENCE_SECS: f32 = 0.2;

/// A loaded Piper voice. One ONNX session, used by one request at a time per
/// sentence, so concurrent requests interleave sentence by sentence.
pub struct PiperVoice {
    /// The public model id this voice answers to.
    pub model: String,
    /// The voice names accepted in requests (the voice's own name first).
    pub voices: Vec<String>,
    pub sample_rate: u32,
    session: Mutex<Session>,
    espeak: Espeak,
    ids: PhonemeIds,
    inference: InferenceConfig,
    multi_speaker: bool,
}

const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<PiperVoice>();
};

/// Voice names OpenAI clients send; a single-speaker model answers all of them
/// with its one voice, so code written for OpenAI works unchanged.
pub const OPENAI_VOICES: [&str; 11] = [
    "alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse",
];

/// Loads ONNX Runtime from `library` once per process. Later calls are no-ops
/// (the first library stays loaded).
pub fn init_onnxruntime(library: &Path) -> Result<()> {
    if !library.is_file() {
        bail!("ONNX Runtime library {} does not exist", library.display());
    }
    ort::init_from(library.display().to_string())
        .with_name("cxmpute-tts")
        .commit()
        .map_err(|e| anyhow!("cannot load ONNX Runtime from {}: {e}", library.display()))?;
    Ok(())
}

impl PiperVoice {
    /// Loads `<dir>/<name>.onnx` and its `.onnx.json` (the folder's only voice).
    /// [`init_onnxruntime`] must have been called.
    pub fn load(model: &str, dir: &Path, threads: usize) -> Result<Self> {
        let onnx = find_voice_file(dir)?;
        let json_path = PathBuf::from(format!("{}.json", onnx.display()));
        let text =
            std::fs::read_to_string(&json_path).with_context(|| format!("cannot read {}", json_path.display()))?;
        let config: VoiceConfig = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a Piper voice config", json_path.display()))?;
        if let Some(kind) = config.phoneme_type.as_deref() {
            if kind != "espeak" {
                bail!(
                    "voice {} uses '{kind}' phonemes; only espeak voices are supported",
                    onnx.display()
                );
            }
        }
        let ids = PhonemeIds::new(&config.phoneme_id_map)?;
        let espeak = Espeak::find(&config.espeak.voice)?;
        let session = Session::builder()
            .and_then(|b| b.with_intra_threads(threads.max(1)))
            .and_then(|b| b.commit_from_file(&onnx))
            .map_err(|e| anyhow!("cannot load the voice {}: {e}", onnx.display()))?;
        let stem = onnx
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| model.to_string());
        // en_US-joe-medium → "joe"
        let speaker = stem.split('-').nth(1).unwrap_or(&stem).to_string();
        let mut voices = vec![speaker, stem];
        voices.extend(OPENAI_VOICES.iter().map(|v| v.to_string()));
        Ok(Self {
            model: model.to_string(),
            voices,
            sample_rate: config.audio.sample_rate,
            session: Mutex::new(session),
            espeak,
            ids,
            inference: config.inference,
            multi_speaker: config.num_speakers > 1,
        })
    }

    /// True when `voice` is one this model answers to (case-insensitive).
    pub fn accepts_voice(&self, voice: &str) -> bool {
        let voice = voice.trim();
        voice.is_empty() || self.voices.iter().any(|v| v.eq_ignore_ascii_case(voice))
    }

    /// Samples of silence put between sentences.
    pub fn gap(&self) -> Vec<i16> {
        vec![0; (self.sample_rate as f32 * SENTENCE_SILENCE_SECS) as usize]
    }

    /// Speaks one sentence: 16-bit samples at [`Self::sample_rate`]. `speed` is
    /// OpenAI's (1.0 normal, 2.0 twice as fast).
    pub fn speak(&self, sentence: &Sentence, speed: f32) -> Result<Vec<i16>> {
        let phonemes = self.espeak.phonemes(sentence)?;
        let ids = self.ids.encode(&phonemes);
        let samples = self.infer(ids, speed)?;
        Ok(audio::to_i16_normalised(&samples))
    }

    fn infer(&self, ids: Vec<i64>, speed: f32) -> Result<Vec<f32>> {
        let len = ids.len();
        let scales = vec![
            self.inference.noise_scale,
            self.inference.length_scale / speed.clamp(0.25, 4.0),
            self.inference.noise_w,
        ];
        let input = Tensor::from_array(([1usize, len], ids)).map_err(|e| anyhow!("{e}"))?;
        let lengths = Tensor::from_array(([1usize], vec![len as i64])).map_err(|e| anyhow!("{e}"))?;
        let scales = Tensor::from_array(([3usize], scales)).map_err(|e| anyhow!("{e}"))?;
        let mut session = self.session.lock().map_err(|_| anyhow!("the voice failed earlier"))?;
        let outputs = if self.multi_speaker {
            let sid = Tensor::from_array(([1usize], vec![0i64])).map_err(|e| anyhow!("{e}"))?;
            session.run(ort::inputs![
                "input" => input, "input_lengths" => lengths, "scales" => scales, "sid" => sid
            ])
        } else {
            session.run(ort::inputs!["input" => input, "input_lengths" => lengths, "scales" => scales])
        }
        .map_err(|e| anyhow!("the voice model failed: {e}"))?;
        let (_, samples) = outputs[0]
            .try_extract_tensor::<f32>()
            .map_err(|e| anyhow!("the voice model gave no audio: {e}"))?;
        Ok(samples.to_vec())
    }
}

/// The `.onnx` file of a voice folder (exactly one, with its `.onnx.json`).
pub fn find_voice_file(dir: &Path) -> Result<PathBuf> {
    if dir.is_file() {
        return Ok(dir.to_path_buf());
    }
    let voices: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "onnx"))
        .filter(|p| PathBuf::from(format!("{}.json", p.display())).is_file())
        .collect();
    match voices.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(
            "{} holds no Piper voice (a .onnx file with its .onnx.json)",
            dir.display()
        ),
        _ => bail!(
            "{} holds {} voices; name the .onnx file to serve",
            dir.display(),
            voices.len()
        ),
    }
}
