//! `POST /v1/audio/speech` on the built-in voice.
//!
//! Speech is made one sentence at a time on a blocking thread and sent as soon
//! as each sentence is ready (mp3, pcm), or all at once for formats whose
//! header carries the length (wav, flac). The first sentence is made before the
//! answer starts, so a failure there is a proper JSON error; a failure later
//! ends the stream with an error. A client that goes away stops the work at the
//! next sentence.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, HeaderValue, Response, StatusCode};
use bytes::Bytes;
use cxmpute_protocol::openai::SpeechRequest;
use futures_util::stream;
use tokio::sync::{mpsc, Semaphore};

use super::audio::{self, Format, Mp3, Resampler, PCM_RATE};
use super::phonemes::sentences;
use super::PiperVoice;
use crate::engines::error_response;

/// OpenAI's limit on one request's text.
pub const MAX_CHARACTERS: usize = 4096;

fn bad_request(message: &str, param: &str) -> Response<Body> {
    let body = cxmpute_protocol::ErrorBody::new(message, "invalid_request_error", Some(param), None).to_json();
    let mut res = Response::new(Body::from(body));
    *res.status_mut() = StatusCode::BAD_REQUEST;
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

fn bad_field(message: impl Into<String>, param: &'static str) -> (String, &'static str) {
    (message.into(), param)
}

/// Checks a request against what this voice can do; the error names the field.
fn validate(voice: &PiperVoice, req: &SpeechRequest) -> Result<(Format, f32), (String, &'static str)> {
    let chars = req.input.chars().count();
    if req.input.trim().is_empty() {
        return Err(bad_field("'input' must not be empty", "input"));
    }
    if chars > MAX_CHARACTERS {
        return Err(bad_field(
            format!("'input' is longer than {MAX_CHARACTERS} characters"),
            "input",
        ));
    }
    if let Some(v) = &req.voice {
        if !voice.accepts_voice(v) {
            return Err(bad_field(
                format!("unknown voice '{v}'; this model speaks as: {}", voice.voices.join(", ")),
                "voice",
            ));
        }
    }
    let format = Format::parse(req.response_format.as_deref()).map_err(|m| bad_field(m, "response_format"))?;
    let speed = req.speed.unwrap_or(1.0);
    if !(0.25..=4.0).contains(&speed) || speed.is_nan() {
        return Err(bad_field("'speed' must be between 0.25 and 4.0", "speed"));
    }
    Ok((format, speed))
}

type Chunk = Result<Bytes, String>;

pub async fn speech(voice: Arc<PiperVoice>, cpu_slots: Arc<Semaphore>, req: SpeechRequest) -> Response<Body> {
    let (format, speed) = match validate(&voice, &req) {
        Ok(v) => v,
        Err((message, param)) => return bad_request(&message, param),
    };
    let Ok(slot) = cpu_slots.acquire_owned().await else {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the node is shutting down",
        );
    };
    let (tx, mut rx) = mpsc::channel::<Chunk>(4);
    let text = req.input;
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        if let Err(e) = produce(&voice, &text, format, speed, &tx) {
            tracing::warn!(error = %e, "speech failed");
            let _ = tx.blocking_send(Err(e.to_string()));
        }
    });
    let first = match rx.recv().await {
        Some(Ok(b)) => b,
        Some(Err(_)) | None => {
            return error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "the speech engine failed",
            )
        }
    };
    let rest = stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|c| (c.map_err(|e| std::io::Error::other(format!("speech failed: {e}"))), rx))
    });
    let body = stream::iter([Ok::<_, std::io::Error>(first)]);
    let mut res = Response::new(Body::from_stream(futures_util::StreamExt::chain(body, rest)));
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(format.content_type()));
    res
}

/// Makes the audio and sends it down `tx`; stops early when the receiver is gone.
fn produce(voice: &PiperVoice, text: &str, format: Format, speed: f32, tx: &mpsc::Sender<Chunk>) -> anyhow::Result<()> {
    let parts = sentences(text);
    if parts.is_empty() {
        // Only punctuation: a short silence, still a valid file of the asked format.
        let silence = voice.gap();
        return send_whole(voice, &silence, format, tx);
    }
    let gap = voice.gap();
    if !format.streams() {
        let mut all = Vec::new();
        for (i, sentence) in parts.iter().enumerate() {
            if i > 0 {
                all.extend_from_slice(&gap);
            }
            all.extend(voice.speak(sentence, speed)?);
            if tx.is_closed() {
                return Ok(());
            }
        }
        return send_whole(voice, &all, format, tx);
    }
    let mut mp3 = match format {
        Format::Mp3 => Some(Mp3::new(voice.sample_rate)?),
        _ => None,
    };
    let mut resampler = Resampler::new(voice.sample_rate, PCM_RATE);
    for (i, sentence) in parts.iter().enumerate() {
        let mut samples = if i > 0 { gap.clone() } else { Vec::new() };
        samples.extend(voice.speak(sentence, speed)?);
        let bytes = match &mut mp3 {
            Some(enc) => enc.encode(&samples)?,
            None => audio::pcm_bytes(&resampler.push(&samples)),
        };
        if !bytes.is_empty() && tx.blocking_send(Ok(Bytes::from(bytes))).is_err() {
            return Ok(());
        }
    }
    if let Some(enc) = &mut mp3 {
        let tail = enc.finish()?;
        let _ = tx.blocking_send(Ok(Bytes::from(tail)));
    }
    Ok(())
}

fn send_whole(voice: &PiperVoice, samples: &[i16], format: Format, tx: &mpsc::Sender<Chunk>) -> anyhow::Result<()> {
    let bytes = match format {
        Format::Wav => audio::wav(samples, voice.sample_rate),
        Format::Flac => audio::flac(samples, voice.sample_rate)?,
        Format::Pcm => audio::pcm_bytes(&Resampler::new(voice.sample_rate, PCM_RATE).push(samples)),
        Format::Mp3 => {
            let mut enc = Mp3::new(voice.sample_rate)?;
            let mut out = enc.encode(samples)?;
            out.extend(enc.finish()?);
            out
        }
    };
    let _ = tx.blocking_send(Ok(Bytes::from(bytes)));
    Ok(())
}
