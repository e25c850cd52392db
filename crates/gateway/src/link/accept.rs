//! Accepting a link: WebSocket-style upgrade handshake, then reversed HTTP/2.

use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use bytes::Bytes;
use cxmpute_protocol::link::WEBSOCKET_GUID;
use hyper_util::rt::TokioIo;
use sha1::{Digest, Sha1};

use crate::auth;
use crate::error::ApiError;
use crate::link::register;
use crate::state::AppState;

/// The `Sec-WebSocket-Accept` answer to a handshake key.
pub fn accept_key(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(WEBSOCKET_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

pub async fn link(State(state): State<AppState>, mut req: Request) -> Result<Response, ApiError> {
    let token = auth::bearer(req.headers()).ok_or_else(ApiError::missing_key)?;
    let device = auth::authenticate_device(state.store.as_ref(), token).await?;
    let upgrade_ok = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let ws_key = req
        .headers()
        .get("sec-websocket-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let (true, Some(ws_key)) = (upgrade_ok, ws_key) else {
        return Err(ApiError::bad_request(
            "the link needs an upgrade: send 'Connection: Upgrade', 'Upgrade: websocket' and 'Sec-WebSocket-Key'",
        ));
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let accept = accept_key(&ws_key);
    tokio::spawn(async move {
        // The upgrade completes only after the 101 below has been sent.
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(device = %device.id, error = %e, "link upgrade failed");
                return;
            }
        };
        serve_link(state, device, upgraded).await;
    });
    let mut res = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let h = res.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert("sec-websocket-accept", v);
    }
    Ok(res)
}

/// Runs one link until it dies, then removes its provisions.
async fn serve_link<T>(state: AppState, device: cxmpute_store::Device, io: T)
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let ping_every = Duration::from_millis(state.config.link.ping_interval_ms);
    let ping_timeout = Duration::from_millis(state.config.link.ping_timeout_ms);
    let handshake = h2::client::Builder::new()
        // As hyper's client had it: no server push (a node has nothing to
        // push), and a node's answer headers bounded at 16 KiB.
        .enable_push(false)
        .max_header_list_size(16 << 10)
        .initial_window_size(1 << 20)
        .initial_connection_window_size(8 << 20)
        .max_concurrent_reset_streams(1024)
        .handshake::<_, Bytes>(TokioIo::new(io))
        .await;
    let (sender, mut conn) = match handshake {
        Ok(pair) => pair,
        Err(e) => {
            tracing::warn!(device = %device.id, error = %e, "link handshake failed");
            return;
        }
    };
    let Some(pings) = conn.ping_pong() else {
        tracing::warn!(device = %device.id, "link handshake gave no ping handle");
        return;
    };
    let session = state.new_session();
    state.metrics.link_opened();
    let mut conn_task = tokio::spawn(conn);
    let registered = register::register(
        &state,
        &device,
        crate::transport::Transport::Link(sender),
        session,
        None,
    )
    .await;
    match registered {
        Ok(n) => tracing::info!(device = %device.id, session, provisions = n, "provider linked"),
        Err(e) => {
            tracing::warn!(device = %device.id, error = %e, "provider link refused");
            conn_task.abort();
            state.metrics.link_closed();
            return;
        }
    }
    let shutdown = state.shutdown.clone();
    let close = state.links.open(session, &device.id);
    let result = tokio::select! {
        r = &mut conn_task => r.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())),
        e = keep_alive(pings, ping_every, ping_timeout) => Err(e),
        _ = shutdown.cancelled() => Ok(()),
        _ = close.cancelled() => Err("closed by an operator".to_string()),
    };
    state.links.closed(session);
    // Dropping a JoinHandle leaves its task running: end the connection.
    conn_task.abort();
    register::unregister(&state, &device.id, session).await;
    state.metrics.link_closed();
    match result {
        Ok(()) => tracing::info!(device = %device.id, session, "provider link closed"),
        Err(e) => tracing::info!(device = %device.id, session, error = %e, "provider link lost"),
    }
}

/// Pings the node every `every`, idle or not, and returns why the link is
/// dead once a ping goes unanswered for `timeout` (or cannot be sent). A
/// link whose node vanished without closing it (power cut, network gone) is
/// noticed this way within `every + timeout`.
async fn keep_alive(mut pings: h2::PingPong, every: Duration, timeout: Duration) -> String {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        match tokio::time::timeout(timeout, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(e)) => return format!("ping failed: {e}"),
            Err(_) => return format!("no answer to a ping within {timeout:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn accept_key_matches_rfc6455_example() {
        assert_eq!(
            super::accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
