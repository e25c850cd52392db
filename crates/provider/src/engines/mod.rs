//! The engines a node serves with, one kind per service, and the table of
//! which engine answers which (service, model).
//!
//! - [`llama`]: built-in chat (llama.cpp, Gemma 3 270M by default), batched.
//! - [`minilm`]: built-in sentence embeddings (candle, all-MiniLM-L6-v2).
//! - [`piper`]: built-in text to speech (Piper voice on ONNX Runtime, espeak-ng).
//! - [`scrape`]: built-in web pages → markdown, behind [`net_guard`].
//! - [`upstream`]: any OpenAI-compatible server, for chat, embeddings, speech.
//! - [`ollama`]: a local Ollama through its own API, for chat and embeddings.

pub mod llama;
pub mod minilm;
pub mod net_guard;
pub mod ollama;
pub mod piper;
pub mod scrape;
pub mod upstream;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, HeaderValue, Response, StatusCode};
use cxmpute_protocol::link::{Offer, SCRAPE_MODEL};
use cxmpute_protocol::ErrorBody;
use tokio::sync::Semaphore;

use crate::models::{canonical_chat_model, canonical_embedding_model};

/// The built-in chat engine and the model id it answers to.
#[derive(Clone)]
pub struct BuiltinChat {
    pub model: String,
    pub engine: Arc<llama::LlamaChat>,
}

impl BuiltinChat {
    /// True when a request for `model` is for this engine (aliases included).
    pub fn serves(&self, model: &str) -> bool {
        model.trim() == self.model || canonical_chat_model(model).is_some_and(|id| id == self.model)
    }
}

/// The built-in embeddings engine and the model id it answers to.
#[derive(Clone)]
pub struct BuiltinEmbeddings {
    pub model: String,
    pub engine: Arc<minilm::MiniLm>,
}

impl BuiltinEmbeddings {
    /// True when a request for `model` is for this engine (aliases included).
    pub fn serves(&self, model: &str) -> bool {
        model.trim() == self.model || canonical_embedding_model(model).is_some_and(|id| id == self.model)
    }
}

/// Cheap to clone: every engine is shared.
#[derive(Clone)]
pub struct Engines {
    pub chat: Option<BuiltinChat>,
    pub minilm: Option<BuiltinEmbeddings>,
    pub speech: Option<Arc<piper::PiperVoice>>,
    /// CPU-bound work runs on blocking threads; this bounds how many at once so
    /// a burst cannot starve the link of threads.
    pub cpu_slots: Arc<Semaphore>,
    pub scrape: Option<Arc<scrape::ScrapeEngine>>,
    pub upstream: Option<upstream::Upstream>,
    pub ollama: Option<ollama::Ollama>,
}

impl Engines {
    /// What this node announces to the gateway.
    pub fn offers(&self) -> Vec<Offer> {
        let mut offers = Vec::new();
        if let Some(chat) = &self.chat {
            offers.push(Offer {
                service: "chat".into(),
                model: chat.model.clone(),
                upstream: false,
            });
        }
        if let Some(embeddings) = &self.minilm {
            offers.push(Offer {
                service: "embeddings".into(),
                model: embeddings.model.clone(),
                upstream: false,
            });
        }
        if let Some(voice) = &self.speech {
            offers.push(Offer {
                service: "speech".into(),
                model: voice.model.clone(),
                upstream: false,
            });
        }
        if self.scrape.is_some() {
            offers.push(Offer {
                service: "scrape".into(),
                model: SCRAPE_MODEL.into(),
                upstream: false,
            });
        }
        let extra = self.upstream.iter().flat_map(|u| &u.offers);
        for o in extra.chain(self.ollama.iter().flat_map(|o| &o.offers)) {
            if !offers.contains(o) {
                offers.push(o.clone());
            }
        }
        offers
    }
}

/// An OpenAI error response from the node.
pub fn error_response(status: StatusCode, kind: &str, message: &str) -> Response<Body> {
    let body = ErrorBody::new(message, kind, None, None).to_json();
    let mut res = Response::new(Body::from(body));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

/// The OpenAI embeddings answer for `vectors`: each as a float array, or as
/// base64 of its little-endian `f32`s when the request asked for `base64`.
pub fn embeddings_response(
    vectors: &[Vec<f32>],
    format: Option<cxmpute_protocol::openai::EncodingFormat>,
    model: &str,
    prompt_tokens: u64,
) -> Response<Body> {
    use base64::Engine as _;
    use serde_json::json;
    let base64 = format == Some(cxmpute_protocol::openai::EncodingFormat::Base64);
    let data: Vec<serde_json::Value> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({ "object": "embedding", "index": i, "embedding": embedding })
        })
        .collect();
    let body = json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": { "prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens },
    });
    let mut res = Response::new(Body::from(body.to_string()));
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}
