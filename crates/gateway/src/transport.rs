//! How a request reaches a provision: over its node's link, or straight to a
//! URL the node registered (direct mode). The router cannot tell them apart.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

pub type DirectClient = Client<HttpConnector, Full<Bytes>>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Clone)]
// Cloned once per provision and matched per request; boxing the larger variant
// would add an indirection on every request for a few bytes of memory.
#[allow(clippy::large_enum_variant)]
pub enum Transport {
    /// The link's HTTP/2 connection, driven by `h2` itself: a request is sent
    /// and its answer read from the caller's task, with no task spawned per
    /// request (hyper's HTTP/2 client spawned two; decision 51).
    Link(h2::client::SendRequest<Bytes>),
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

/// A node's answer as it arrives, over the link or in direct mode. Dropping
/// it before the end cancels the request at the node (an HTTP/2 reset, or
/// the direct connection closed).
pub enum NodeBody {
    Direct(Incoming),
    Link(h2::RecvStream),
}

impl Body for NodeBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            NodeBody::Direct(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            NodeBody::Link(stream) => match stream.poll_data(cx) {
                Poll::Ready(Some(Ok(data))) => {
                    // Give the window back at once: the relay holds no more
                    // than the chunk it is passing on.
                    let _ = stream.flow_control().release_capacity(data.len());
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
                // Trailers, if a node sent any, carry nothing the relay uses.
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            NodeBody::Direct(body) => body.is_end_stream(),
            NodeBody::Link(stream) => stream.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            NodeBody::Direct(body) => body.size_hint(),
            NodeBody::Link(_) => SizeHint::default(),
        }
    }
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
    /// Sends `path` with `req`'s body; resolves when the response head arrives.
    pub async fn send(
        &self,
        mut req: Request<Bytes>,
        path: &str,
        timeout: Duration,
    ) -> Result<Response<NodeBody>, ForwardError> {
        let fut = async {
            match self {
                Transport::Link(sender) => {
                    *req.uri_mut() = format!("http://node{path}")
                        .parse()
                        .map_err(|e| ForwardError::Unreachable(format!("bad path: {e}")))?;
                    let (parts, body) = req.into_parts();
                    let mut sender = sender.clone().ready().await.map_err(cannot_reach)?;
                    let last = body.is_empty();
                    let (answer, mut stream) = sender
                        .send_request(Request::from_parts(parts, ()), last)
                        .map_err(cannot_reach)?;
                    if !last {
                        // Queued on the stream, and written as the peer's
                        // window allows (a request body is small).
                        stream.send_data(body, true).map_err(cannot_reach)?;
                    }
                    let res = answer.await.map_err(cannot_reach)?;
                    Ok(res.map(NodeBody::Link))
                }
                Transport::Direct { base, token, client } => {
                    if let Ok(v) = http::HeaderValue::from_str(&format!("Bearer {token}")) {
                        req.headers_mut().insert(http::header::AUTHORIZATION, v);
                    }
                    *req.uri_mut() = format!("{base}{path}")
                        .parse()
                        .map_err(|e| ForwardError::Unreachable(format!("bad url: {e}")))?;
                    let res = client.request(req.map(Full::new)).await.map_err(cannot_reach)?;
                    Ok(res.map(NodeBody::Direct))
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

fn cannot_reach(e: impl std::fmt::Display) -> ForwardError {
    ForwardError::Unreachable(e.to_string())
}
