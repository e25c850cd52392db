//! `POST /v1/embeddings` and `POST /v1/audio/speech`.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use futures_util::stream;
use serde::{Deserialize, Serialize};

use super::{bad_request, json_response, model_not_found, parse_body, AppState, InFlight, FAKE_TTS_MODEL};

/// Length of every vector returned by the fake embeddings endpoint.
pub const EMBEDDING_DIMS: usize = 8;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The unit-length vector the fake server returns for `text`: dimension `d`
/// is FNV-1a of the text with the offset basis perturbed by `d`, mapped to
/// [-1, 1], and the whole vector is then L2-normalised.
pub fn fake_embedding(text: &str) -> Vec<f32> {
    let raw: Vec<f64> = (0..EMBEDDING_DIMS as u64)
        .map(|d| {
            let seed = FNV_OFFSET ^ d.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let hash = text
                .bytes()
                .fold(seed, |h, b| (h ^ u64::from(b)).wrapping_mul(FNV_PRIME));
            (hash as f64 / u64::MAX as f64) * 2.0 - 1.0
        })
        .collect();
    let norm = raw.iter().map(|x| x * x).sum::<f64>().sqrt();
    // A zero vector is astronomically unlikely, but must not become NaNs.
    let norm = if norm > 0.0 { norm } else { 1.0 };
    raw.iter().map(|x| (x / norm) as f32).collect()
}

/// The audio bytes the fake server returns for `input`: `FAKEAUDIO`
/// followed by the input's bytes in reverse order.
pub fn fake_speech(input: &str) -> Vec<u8> {
    let mut out = b"FAKEAUDIO".to_vec();
    out.extend(input.bytes().rev());
    out
}

#[derive(Deserialize)]
struct EmbeddingsRequest {
    model: String,
    input: EmbeddingInput,
    encoding_format: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum EmbeddingInput {
    One(String),
    Many(Vec<String>),
}

#[derive(Serialize)]
#[serde(untagged)]
enum EmbeddingData {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Serialize)]
struct EmbeddingItem {
    object: &'static str,
    index: usize,
    embedding: EmbeddingData,
}

pub(super) async fn embeddings(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let _guard = InFlight::new(&state.stats);
    let req: EmbeddingsRequest = match parse_body(&body) {
        Ok(req) => req,
        Err(msg) => return bad_request(&msg),
    };
    if !state.embedding_models.contains(&req.model) {
        return model_not_found(&req.model);
    }
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(_) => return bad_request("encoding_format must be \"float\" or \"base64\""),
    };
    let inputs = match req.input {
        EmbeddingInput::One(text) => vec![text],
        EmbeddingInput::Many(texts) if texts.is_empty() => return bad_request("input must not be an empty array"),
        EmbeddingInput::Many(texts) => texts,
    };
    let data: Vec<EmbeddingItem> = inputs
        .iter()
        .enumerate()
        .map(|(index, text)| {
            let vector = fake_embedding(text);
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                EmbeddingData::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                EmbeddingData::Float(vector)
            };
            EmbeddingItem {
                object: "embedding",
                index,
                embedding,
            }
        })
        .collect();
    let tokens: usize = inputs.iter().map(|t| t.split_whitespace().count()).sum();
    let body = serde_json::json!({
        "object": "list",
        "data": data,
        "model": req.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    });
    json_response(StatusCode::OK, body.to_string())
}

#[derive(Deserialize)]
struct SpeechRequest {
    model: String,
    input: String,
    // `voice` is required by OpenAI but irrelevant here; it is not read, so
    // a missing one is tolerated.
    response_format: Option<String>,
}

pub(super) async fn speech(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let _guard = InFlight::new(&state.stats);
    let req: SpeechRequest = match parse_body(&body) {
        Ok(req) => req,
        Err(msg) => return bad_request(&msg),
    };
    if req.model != FAKE_TTS_MODEL {
        return model_not_found(&req.model);
    }
    let content_type = match req.response_format.as_deref().unwrap_or("mp3") {
        "mp3" => "audio/mpeg",
        "wav" => "audio/wav",
        "pcm" => "audio/pcm",
        "opus" => "audio/opus",
        "aac" => "audio/aac",
        "flac" => "audio/flac",
        _ => return bad_request("response_format must be one of mp3, opus, aac, flac, wav, pcm"),
    };
    // Two chunks, so that proxies are exercised with a genuinely streamed body.
    let mut audio = Bytes::from(fake_speech(&req.input));
    let first = audio.split_to(audio.len() / 2);
    let chunks = [Ok::<_, Infallible>(first), Ok(audio)];
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, content_type)],
        Body::from_stream(stream::iter(chunks)),
    )
        .into_response()
}
