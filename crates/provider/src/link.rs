//! The node's side of the link: dial out to the gateway, upgrade, then serve
//! the local router over HTTP/2 on that one connection. Reconnects with
//! exponential backoff and jitter for as long as the node runs.
//!
//! When the node's offering changes (a model fetched in the background is
//! ready), the link is replaced: a new one dials in and says hello, and the
//! gateway, which learns offers from a link's hello, adds the new model; the
//! old link then closes gracefully (GOAWAY), so its running requests finish.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use base64::Engine;
use bytes::Bytes;
use cxmpute_protocol::link::LINK_PATH;
use http_body_util::{BodyExt, Empty};
use hyper::header;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rand::Rng;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::status::Phase;

/// The link's byte stream: plain TCP or TLS over it.
trait LinkIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> LinkIo for T {}

/// Why one link attempt ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Retrying will not help (bad credential, suspended account).
    #[error("the gateway refused this node: {0}")]
    Refused(String),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

pub struct LinkTarget {
    pub host: String,
    pub port: u16,
    pub authority: String,
    /// Set for `https://` gateways.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for LinkTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkTarget")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

pub fn parse_gateway(url: &str) -> anyhow::Result<LinkTarget> {
    let uri: http::Uri = url.parse().with_context(|| format!("not a URL: {url}"))?;
    let (tls, default_port) = match uri.scheme_str() {
        Some("http") => (None, 80),
        Some("https") => (Some(crate::gateway_tls::link_config()?), 443),
        _ => anyhow::bail!("the gateway URL must start with http:// or https://"),
    };
    let host = uri
        .host()
        .context("the gateway URL has no host")?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(default_port);
    let authority = uri.authority().map(|a| a.to_string()).unwrap_or_else(|| host.clone());
    Ok(LinkTarget {
        host,
        port,
        authority,
        tls,
    })
}

/// How a link learns that the node's offering changed.
pub struct Relink {
    /// Changes when the offering is replaced.
    pub replaced: tokio::sync::watch::Receiver<u64>,
    /// Changes when the node answers a hello (on any link).
    pub hellos: tokio::sync::watch::Receiver<u64>,
}

/// How long an old link waits for its successor's hello; without one it stays
/// (the gateway closes it when another link takes its place).
const SUCCESSOR_HELLO: Duration = Duration::from_secs(15);
/// After the successor's hello, time for the gateway to put its provisions in
/// the pools before the old link stops taking requests. The gateway normally
/// closes the old link itself as soon as the new one's provisions replace it.
const HANDOVER: Duration = Duration::from_secs(2);

/// Keeps a link up until `stop` is cancelled. Returns only on stop or refusal,
/// or when the link closes once `draining` is cancelled (the node is on its
/// way out: the gateway closing the link then is expected, not a fault).
pub async fn run(
    gateway: &str,
    credential: &str,
    router: Router,
    max_streams: u32,
    stop: CancellationToken,
    draining: CancellationToken,
    mut relink: Relink,
) -> Result<(), LinkError> {
    let target = Arc::new(parse_gateway(gateway)?);
    let credential: Arc<str> = Arc::from(credential);
    let mut backoff = Duration::from_millis(100);
    loop {
        // A link that has not said hello yet announces the latest offering anyway.
        relink.replaced.borrow_and_update();
        let started = std::time::Instant::now();
        let status = crate::status::global();
        let retire = stop.child_token();
        let linked = Arc::new(AtomicBool::new(false));
        let mut attempt = Box::pin(connect_once(
            target.clone(),
            credential.clone(),
            router.clone(),
            max_streams,
            retire.clone(),
            linked.clone(),
        ));
        let outcome = loop {
            tokio::select! {
                r = &mut attempt => break Some(r),
                Ok(()) = relink.replaced.changed() => {
                    if linked.load(Ordering::SeqCst) && !draining.is_cancelled() {
                        break None;
                    }
                }
            }
        };
        let Some(outcome) = outcome else {
            tracing::info!("the node's offering changed: opening a new link to announce it");
            retire_after_successor(attempt, retire, relink.hellos.clone());
            backoff = Duration::from_millis(100);
            continue;
        };
        match outcome {
            Ok(()) if stop.is_cancelled() || draining.is_cancelled() => return Ok(()),
            Ok(()) => {
                tracing::warn!("link closed by the gateway; reconnecting");
                status.set_phase_unless_leaving(Phase::Retrying("the gateway closed the link".into()));
            }
            Err(LinkError::Refused(why)) => {
                status.set_phase(Phase::Refused(why.clone()));
                return Err(LinkError::Refused(why));
            }
            Err(LinkError::Other(e)) => {
                let why = format!("{e:#}");
                tracing::warn!(error = %why, "link failed; retrying");
                status.error(format!("link failed: {why}"));
                status.set_phase_unless_leaving(Phase::Retrying(why));
            }
        }
        // A link that lived a while starts the backoff afresh.
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(100);
        }
        let jitter = rand::thread_rng().gen_range(0..=backoff.as_millis() as u64 / 2);
        tokio::select! {
            _ = tokio::time::sleep(backoff + Duration::from_millis(jitter)) => {}
            _ = stop.cancelled() => return Ok(()),
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Keeps serving the link `attempt` until it ends: the gateway closes it
/// when the next link's provisions replace its own. Failing that, it is
/// closed gracefully a moment after the next link has said hello.
fn retire_after_successor(
    attempt: impl Future<Output = Result<(), LinkError>> + Send + Unpin + 'static,
    retire: CancellationToken,
    mut hellos: tokio::sync::watch::Receiver<u64>,
) {
    hellos.borrow_and_update();
    tokio::spawn(async move {
        let mut attempt = attempt;
        let successor_said_hello = async {
            let heard = tokio::time::timeout(SUCCESSOR_HELLO, hellos.changed()).await;
            if matches!(heard, Ok(Ok(()))) {
                tokio::time::sleep(HANDOVER).await;
                true
            } else {
                false
            }
        };
        let ended = tokio::select! {
            ended = &mut attempt => ended,
            hello = successor_said_hello => {
                if hello {
                    retire.cancel();
                }
                attempt.await
            }
        };
        match ended {
            Ok(()) => tracing::debug!("the replaced link closed"),
            Err(e) => tracing::debug!(error = %e, "the replaced link ended with an error"),
        }
    });
}

/// One link: dial, upgrade, then serve until the connection ends or `stop`
/// (then gracefully). `linked` is set once the upgrade is through.
async fn connect_once(
    target: Arc<LinkTarget>,
    credential: Arc<str>,
    router: Router,
    max_streams: u32,
    stop: CancellationToken,
    linked: Arc<AtomicBool>,
) -> Result<(), LinkError> {
    let upgraded = tokio::select! {
        r = dial(&target, &credential) => r?,
        _ = stop.cancelled() => return Ok(()),
    };
    linked.store(true, Ordering::SeqCst);
    tracing::info!(gateway = %target.authority, "linked to the gateway");
    crate::status::global().set_phase_unless_leaving(Phase::Linked {
        since: std::time::Instant::now(),
    });
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(5)))
        .keep_alive_timeout(Duration::from_secs(10))
        .max_concurrent_streams(max_streams)
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(8 << 20);
    let conn = builder.serve_connection(upgraded, TowerToHyperService::new(router));
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r.context("link connection").map_err(LinkError::Other),
        _ = stop.cancelled() => {
            // GOAWAY: the gateway opens no new streams; running ones finish.
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
            Ok(())
        }
    }
}

/// Dials the gateway and upgrades the connection to a link.
async fn dial(target: &LinkTarget, credential: &str) -> Result<hyper::upgrade::Upgraded, LinkError> {
    let tcp = TcpStream::connect((target.host.as_str(), target.port))
        .await
        .with_context(|| format!("cannot connect to the gateway at {}:{}", target.host, target.port))?;
    // Without this, small streamed chunks stall on Nagle + delayed ACK.
    tcp.set_nodelay(true).context("TCP_NODELAY")?;
    let io: Box<dyn LinkIo> = match &target.tls {
        None => Box::new(tcp),
        Some(config) => {
            let name = rustls::pki_types::ServerName::try_from(target.host.clone())
                .with_context(|| format!("'{}' is not a TLS server name", target.host))?;
            match tokio_rustls::TlsConnector::from(config.clone())
                .connect(name, tcp)
                .await
            {
                Ok(tls) => Box::new(tls),
                Err(e) => {
                    if let Some(why) = crate::gateway_tls::certificate_problem(&e) {
                        return Err(LinkError::Refused(format!("{}: {why}", target.authority)));
                    }
                    return Err(anyhow::Error::new(e)
                        .context(format!("TLS handshake with the gateway at {}", target.authority))
                        .into());
                }
            }
        }
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(io))
        .await
        .context("HTTP handshake with the gateway")?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let mut nonce = [0u8; 16];
    rand::thread_rng().fill(&mut nonce);
    let req = hyper::Request::get(LINK_PATH)
        .header(header::HOST, &target.authority)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header("sec-websocket-version", "13")
        .header(
            "sec-websocket-key",
            base64::engine::general_purpose::STANDARD.encode(nonce),
        )
        .header(header::AUTHORIZATION, format!("Bearer {credential}"))
        .body(Empty::new())
        .context("building the link request")?;
    let res = sender.send_request(req).await.context("sending the link request")?;
    let status = res.status();
    if status != http::StatusCode::SWITCHING_PROTOCOLS {
        let body = res
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&body).chars().take(500).collect::<String>();
        return Err(match status.as_u16() {
            401 | 403 => LinkError::Refused(format!("{status}: {text}")),
            _ => LinkError::Other(anyhow::anyhow!("the gateway answered {status}: {text}")),
        });
    }
    Ok(hyper::upgrade::on(res).await.context("upgrading the link")?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_urls() {
        let t = parse_gateway("http://127.0.0.1:8080").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("127.0.0.1", 8080));
        let tls = parse_gateway("https://gw.example.com").unwrap();
        assert_eq!((tls.port, tls.tls.is_some()), (443, true));
        assert!(parse_gateway("ftp://x").is_err());
        let t = parse_gateway("http://[::1]:9").unwrap();
        assert_eq!(t.host, "::1");
    }
}
