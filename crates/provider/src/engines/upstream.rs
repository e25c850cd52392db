//! Any OpenAI-compatible server (vLLM, llama.cpp server, LM Studio…) as an
//! engine: the node announces its models and passes requests through,
//! streaming the answers back unchanged.

use std::time::Duration;

use anyhow::Context;
use axum::body::Body;
use axum::http::{header, Response, StatusCode};
use bytes::Bytes;
use cxmpute_protocol::link::Offer;
use cxmpute_protocol::openai::ModelList;

use crate::config::UpstreamModels;
use crate::engines::error_response;

#[derive(Clone)]
pub struct Upstream {
    /// Ends in `/v1`.
    base: String,
    api_key: Option<String>,
    client: reqwest::Client,
    pub offers: Vec<Offer>,
}

/// Guesses the service of a model from its name when the config does not say.
pub fn guess_service(model: &str) -> &'static str {
    let m = model.to_ascii_lowercase();
    if m.contains("embed") || m.contains("minilm") || m.contains("bge-") || m.contains("e5-") {
        "embeddings"
    } else if m.contains("tts") || m.contains("speech") || m.contains("kokoro") || m.contains("piper") {
        "speech"
    } else {
        "chat"
    }
}

pub fn normalise_base(url: &str) -> String {
    let trimmed = url.trim_end_matches('/');
    if trimmed.ends_with("/v1") {
        trimmed.to_string()
    } else {
        format!("{trimmed}/v1")
    }
}

impl Upstream {
    /// Asks the upstream for its models and sorts them into services.
    pub async fn discover(url: &str, api_key: Option<String>, overrides: &UpstreamModels) -> anyhow::Result<Upstream> {
        let base = normalise_base(url);
        let client = reqwest::Client::builder()
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()?;
        let mut req = client.get(format!("{base}/models")).timeout(Duration::from_secs(10));
        if let Some(k) = &api_key {
            req = req.bearer_auth(k);
        }
        let list: ModelList = req
            .send()
            .await
            .with_context(|| format!("cannot reach the upstream at {base}"))?
            .error_for_status()
            .with_context(|| format!("the upstream at {base} refused GET /models"))?
            .json()
            .await
            .with_context(|| {
                format!("the upstream at {base} answered GET /models with something that is not a model list")
            })?;
        let configured = !(overrides.chat.is_empty() && overrides.embeddings.is_empty() && overrides.speech.is_empty());
        let mut offers = Vec::new();
        for m in list.data {
            let service = if configured {
                if overrides.chat.contains(&m.id) {
                    "chat"
                } else if overrides.embeddings.contains(&m.id) {
                    "embeddings"
                } else if overrides.speech.contains(&m.id) {
                    "speech"
                } else {
                    continue;
                }
            } else {
                guess_service(&m.id)
            };
            offers.push(Offer {
                service: service.into(),
                model: m.id,
                upstream: true,
            });
        }
        Ok(Upstream {
            base,
            api_key,
            client,
            offers,
        })
    }

    pub fn serves(&self, service: &str, model: &str) -> bool {
        self.offers.iter().any(|o| o.service == service && o.model == model)
    }

    /// Passes a request through; `path` is relative to `/v1`, e.g. `/chat/completions`.
    pub async fn forward(&self, path: &str, body: Bytes) -> Response<Body> {
        let mut req = self
            .client
            .post(format!("{}{path}", self.base))
            .header(header::CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(k) = &self.api_key {
            req = req.bearer_auth(k);
        }
        let res = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "upstream unreachable");
                return error_response(
                    StatusCode::BAD_GATEWAY,
                    "server_error",
                    "the node's upstream server could not be reached",
                );
            }
        };
        let status = StatusCode::from_u16(res.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        let content_type = res.headers().get(header::CONTENT_TYPE).cloned();
        // Dropping this body (the gateway cancelled) drops the upstream request.
        let mut out = Response::new(Body::from_stream(res.bytes_stream()));
        *out.status_mut() = status;
        if let Some(ct) = content_type {
            out.headers_mut().insert(header::CONTENT_TYPE, ct);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_are_guessed_from_names() {
        assert_eq!(guess_service("nomic-embed-text"), "embeddings");
        assert_eq!(guess_service("kokoro-82m"), "speech");
        assert_eq!(guess_service("llama3.2:3b"), "chat");
    }

    #[test]
    fn bases_end_in_v1() {
        assert_eq!(normalise_base("http://h:1/"), "http://h:1/v1");
        assert_eq!(normalise_base("http://h:1/v1/"), "http://h:1/v1");
    }
}
