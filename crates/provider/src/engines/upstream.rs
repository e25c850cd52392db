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
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::config::UpstreamModels;
use crate::engines::error_response;

#[derive(Clone)]
pub struct Upstream {
    /// Ends in `/v1`.
    base: String,
    api_key: Option<String>,
    client: reqwest::Client,
    /// Requests to an `http://` upstream (the usual local server) go through a
    /// bare HTTP/1.1 client: reqwest parses the URL three times per request
    /// (its redirect layer included), about a sixth of the node's CPU under
    /// load (docs/benchmarks.md, "Allocator and the node's pass-through";
    /// decision 49). `https://` keeps reqwest and its TLS.
    plain: Option<Client<HttpConnector, Full<Bytes>>>,
    pub offers: Vec<Offer>,
}

fn plain_client() -> Client<HttpConnector, Full<Bytes>> {
    let mut http = HttpConnector::new();
    // Small streamed chunks must not wait for Nagle's algorithm.
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .build(http)
}

fn unreachable(error: &dyn std::fmt::Display) -> Response<Body> {
    tracing::warn!(error = %error, "upstream unreachable");
    error_response(
        StatusCode::BAD_GATEWAY,
        "server_error",
        "the node's upstream server could not be reached",
    )
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
        let plain = base.starts_with("http://").then(plain_client);
        Ok(Upstream {
            base,
            api_key,
            client,
            plain,
            offers,
        })
    }

    pub fn serves(&self, service: &str, model: &str) -> bool {
        self.offers.iter().any(|o| o.service == service && o.model == model)
    }

    /// Passes a request through; `path` is relative to `/v1`, e.g. `/chat/completions`.
    pub async fn forward(&self, path: &str, body: Bytes) -> Response<Body> {
        let url = format!("{}{path}", self.base);
        if let Some(plain) = &self.plain {
            return self.forward_plain(plain, &url, body).await;
        }
        let mut req = self
            .client
            .post(url)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(k) = &self.api_key {
            req = req.bearer_auth(k);
        }
        let res = match req.send().await {
            Ok(r) => r,
            Err(e) => return unreachable(&e),
        };
        let status = StatusCode::from_u16(res.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        let content_type = res.headers().get(header::CONTENT_TYPE).cloned();
        // Dropping this body (the gateway cancelled) drops the upstream request.
        answer(status, content_type, Body::from_stream(res.bytes_stream()))
    }

    async fn forward_plain(
        &self,
        client: &Client<HttpConnector, Full<Bytes>>,
        url: &str,
        body: Bytes,
    ) -> Response<Body> {
        let mut req = hyper::Request::post(url).header(header::CONTENT_TYPE, "application/json");
        if let Some(k) = &self.api_key {
            match header::HeaderValue::from_str(&format!("Bearer {k}")) {
                Ok(mut v) => {
                    v.set_sensitive(true);
                    req = req.header(header::AUTHORIZATION, v);
                }
                Err(_) => return unreachable(&"the upstream API key cannot be sent as a header"),
            }
        }
        let req = match req.body(Full::new(body)) {
            Ok(r) => r,
            Err(e) => return unreachable(&e),
        };
        match client.request(req).await {
            Ok(res) => {
                let (parts, incoming) = res.into_parts();
                let content_type = parts.headers.get(header::CONTENT_TYPE).cloned();
                // Dropping this body (the gateway cancelled) closes the
                // upstream connection, which cancels the request there.
                answer(parts.status, content_type, Body::new(incoming))
            }
            Err(e) => unreachable(&e),
        }
    }
}

fn answer(status: StatusCode, content_type: Option<header::HeaderValue>, body: Body) -> Response<Body> {
    let mut out = Response::new(body);
    *out.status_mut() = status;
    if let Some(ct) = content_type {
        out.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    out
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

    /// A server that answers its model list and echoes, for a chat request,
    /// the headers the node sent and the body, as a stream of two chunks.
    async fn echo_server() -> std::net::SocketAddr {
        use axum::routing::{get, post};
        let app = axum::Router::new()
            .route(
                "/v1/models",
                get(|| async {
                    axum::Json(serde_json::json!({"object": "list", "data": [{"id": "echo-chat", "object": "model"}]}))
                }),
            )
            .route(
                "/v1/chat/completions",
                post(|headers: axum::http::HeaderMap, body: Bytes| async move {
                    let seen = |h| headers.get(h).and_then(|v| v.to_str().ok()).unwrap_or("-").to_string();
                    let head = format!("{}|{}|", seen(header::AUTHORIZATION), seen(header::CONTENT_TYPE));
                    let chunks = [Ok::<_, std::io::Error>(Bytes::from(head)), Ok(body)];
                    let mut res = Response::new(Body::from_stream(futures_util::stream::iter(chunks)));
                    *res.status_mut() = StatusCode::ACCEPTED;
                    res.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static("text/event-stream"),
                    );
                    res
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    #[tokio::test]
    async fn plain_http_upstreams_get_the_key_the_body_and_give_back_status_and_type() {
        let addr = echo_server().await;
        let up = Upstream::discover(
            &format!("http://{addr}"),
            Some("up-secret".into()),
            &UpstreamModels::default(),
        )
        .await
        .unwrap();
        assert!(up.plain.is_some(), "an http:// upstream takes the plain client");
        assert!(up.serves("chat", "echo-chat"));
        let res = up
            .forward("/chat/completions", Bytes::from_static(b"{\"model\":\"echo-chat\"}"))
            .await;
        assert_eq!(res.status(), StatusCode::ACCEPTED);
        assert_eq!(res.headers()[header::CONTENT_TYPE], "text/event-stream");
        let body = axum::body::to_bytes(res.into_body(), 1 << 20).await.unwrap();
        assert_eq!(
            &body[..],
            b"Bearer up-secret|application/json|{\"model\":\"echo-chat\"}"
        );
    }

    #[tokio::test]
    async fn an_upstream_gone_after_discovery_is_a_502() {
        let addr = echo_server().await;
        let mut up = Upstream::discover(&format!("http://{addr}"), None, &UpstreamModels::default())
            .await
            .unwrap();
        // A port nothing listens on (bound, then released).
        let free = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        up.base = format!("http://{free}/v1");
        let res = up.forward("/chat/completions", Bytes::from_static(b"{}")).await;
        assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
        let body = axum::body::to_bytes(res.into_body(), 1 << 20).await.unwrap();
        assert!(String::from_utf8_lossy(&body).contains("upstream server could not be reached"));
    }
}
