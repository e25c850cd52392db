//! How a request reaches a provision: over its node's link, or straight to a
//! URL the node registered (direct mode). The router cannot tell them apart.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper::{Request, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

pub type DirectClient = Client<HttpConnector, Full<Bytes>>;

#[derive(Clone)]
// Cloned once per provision and matched per request; boxing the larger variant
// would add an indirection on every request for a few bytes of memory.
#[allow(clippy::large_enum_variant)]
pub enum Transport {
    Link(SendRequest<Full<Bytes>>),
    Direct {
        base: String,
        token: String,
        client: DirectClient,
    },
}

/// Why a forward failed, and whether trying another provision is safe.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("provider unreachable: {0}")]
    Unreachable(String),
    #[error("provider did not answer within {0:?}")]
    Timeout(Duration),
}

pub fn direct_client() -> DirectClient {
    let mut http = HttpConnector::new();
    // Nagle + delayed ACK would stall small streamed chunks by ~40 ms.
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .build(http)
}

impl Transport {
    /// Sends `path` with `body`; resolves when the response head arrives.
    pub async fn send(
        &self,
        mut req: Request<Full<Bytes>>,
        path: &str,
        timeout: Duration,
    ) -> Result<Response<Incoming>, ForwardError> {
        let fut = async {
            match self {
                Transport::Link(sender) => {
                    *req.uri_mut() = format!("http://node{path}")
                        .parse()
                        .map_err(|e| ForwardError::Unreachable(format!("bad path: {e}")))?;
                    let mut sender = sender.clone();
                    sender
                        .ready()
                        .await
                        .map_err(|e| ForwardError::Unreachable(e.to_string()))?;
                    sender
                        .send_request(req)
                        .await
                        .map_err(|e| ForwardError::Unreachable(e.to_string()))
                }
                Transport::Direct { base, token, client } => {
                    if let Ok(v) = http::HeaderValue::from_str(&format!("Bearer {token}")) {
                        req.headers_mut().insert(http::header::AUTHORIZATION, v);
                    }
                    *req.uri_mut() = format!("{base}{path}")
                        .parse()
                        .map_err(|e| ForwardError::Unreachable(format!("bad url: {e}")))?;
                    client
                        .request(req)
                        .await
                        .map_err(|e| ForwardError::Unreachable(e.to_string()))
                }
            }
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(ForwardError::Timeout(timeout)),
        }
    }

    pub fn mode(&self) -> &'static str {
        match self {
            Transport::Link(_) => "link",
            Transport::Direct { .. } => "direct",
        }
    }
}
