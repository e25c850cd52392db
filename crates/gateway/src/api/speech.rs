//! `POST /v1/audio/speech`, and the original's `POST /v1/tts`.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Response};
use cxmpute_protocol::openai::{LegacyTtsRequest, SpeechRequest};
use cxmpute_protocol::parse::parse_json;
use cxmpute_store::Service;

use crate::billing::Bounds;
use crate::error::ApiError;
use crate::relay::{relay, Forward, MeterKind};
use crate::state::AppState;

/// OpenAI's limit on the text of one speech request.
const MAX_CHARACTERS: usize = 4096;
const FORMATS: [&str; 6] = ["mp3", "opus", "aac", "flac", "wav", "pcm"];

pub async fn create(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Result<Response<Body>, ApiError> {
    let (caller, bytes) = super::begin(&state, &headers, body, Service::Speech).await?;
    let req: SpeechRequest = parse_json(&bytes).map_err(ApiError::invalid_body)?;
    forward(&state, caller, req, bytes).await
}

/// The original API: `{text, voice}`; the model is any speech model on offer.
pub async fn legacy(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Result<Response<Body>, ApiError> {
    let (caller, bytes) = super::begin(&state, &headers, body, Service::Speech).await?;
    let legacy: LegacyTtsRequest = parse_json(&bytes).map_err(ApiError::invalid_body)?;
    let model = match legacy.model {
        Some(m) => m,
        None => state
            .pools
            .summary()
            .into_iter()
            .find(|(s, _, _)| *s == Service::Speech)
            .map(|(_, m, _)| m)
            .ok_or_else(|| ApiError::no_provider("text-to-speech"))?,
    };
    let req = SpeechRequest {
        model,
        input: legacy.text,
        voice: legacy.voice,
        response_format: Some("wav".into()),
        speed: None,
        extra: legacy.extra,
    };
    let bytes = serde_json::to_vec(&req).map_err(|_| ApiError::internal())?.into();
    forward(&state, caller, req, bytes).await
}

async fn forward(
    state: &AppState,
    caller: crate::relay::Caller,
    req: SpeechRequest,
    bytes: bytes::Bytes,
) -> Result<Response<Body>, ApiError> {
    if req.input.is_empty() {
        return Err(ApiError::bad_request("'input' must not be empty").with_param("input"));
    }
    let characters = req.input.chars().count();
    if characters > MAX_CHARACTERS {
        return Err(
            ApiError::bad_request(format!("'input' is longer than {MAX_CHARACTERS} characters")).with_param("input"),
        );
    }
    if let Some(f) = &req.response_format {
        if !FORMATS.contains(&f.as_str()) {
            return Err(
                ApiError::bad_request(format!("'response_format' must be one of {}", FORMATS.join(", ")))
                    .with_param("response_format"),
            );
        }
    }
    if req.speed.is_some_and(|s| !(0.25..=4.0).contains(&s)) {
        return Err(ApiError::bad_request("'speed' must be between 0.25 and 4.0").with_param("speed"));
    }
    let bounds = Bounds {
        characters: characters as u64,
        ..Bounds::default()
    };
    let fwd = Forward {
        service: Service::Speech,
        model: req.model,
        path: "/v1/audio/speech",
        body: bytes,
        meter: MeterKind::Opaque,
        bounds,
    };
    relay(state, caller, fwd).await
}
