//! Direct mode: a node with a reachable URL registers it, and the gateway calls
//! it like any HTTP server. Liveness comes from a background ping per node, never
//! from a probe on the request path.

use std::net::IpAddr;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use bytes::Bytes;
use cxmpute_protocol::link::Register;
use cxmpute_protocol::parse::parse_json;
use serde_json::json;

use crate::auth;
use crate::error::ApiError;
use crate::link::register;
use crate::state::AppState;
use crate::transport::Transport;

/// Addresses a direct-mode URL may not point at unless the operator allows it:
/// the gateway would otherwise call into its own network on a stranger's word.
pub fn is_internal_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1]))
                || o[0] >= 240
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal_ip(IpAddr::V4(v4));
            }
            let seg = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (seg[0] & 0xfe00) == 0xfc00
                || (seg[0] & 0xffc0) == 0xfe80
        }
    }
}

async fn check_url(url: &str, allow_private: bool) -> Result<String, ApiError> {
    let bad = |why: &str| ApiError::bad_request(format!("url: {why}")).with_param("url");
    let uri: http::Uri = url.parse().map_err(|_| bad("not a valid URL"))?;
    if !matches!(uri.scheme_str(), Some("http")) {
        // TLS to nodes comes with the gateway's TLS support; see docs/decisions.md.
        return Err(bad("only http:// URLs are supported for direct mode"));
    }
    let host = uri.host().ok_or_else(|| bad("no host"))?;
    let port = uri.port_u16().unwrap_or(80);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<IpAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|_| bad("the host does not resolve"))?
        .map(|a| a.ip())
        .collect();
    if addrs.is_empty() {
        return Err(bad("the host does not resolve"));
    }
    if !allow_private && addrs.iter().any(|ip| is_internal_ip(*ip)) {
        return Err(bad("the host resolves to a private, loopback or link-local address"));
    }
    Ok(url.trim_end_matches('/').to_string())
}

pub async fn register_direct(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let token = auth::bearer(&headers).ok_or_else(ApiError::missing_key)?;
    let device = auth::authenticate_device(state.store.as_ref(), token).await?;
    let req: Register = parse_json(&body).map_err(ApiError::invalid_body)?;
    let base = check_url(&req.url, state.config.link.allow_private_direct_urls).await?;
    if req.token.len() < 16 || req.token.len() > 256 {
        return Err(ApiError::bad_request("'token' must be 16-256 characters").with_param("token"));
    }
    let transport = Transport::Direct {
        base: base.clone(),
        token: req.token,
        client: state.direct.clone(),
    };
    let session = state.new_session();
    let n = register::register(&state, &device, transport.clone(), session, Some(&base))
        .await
        .map_err(|e| ApiError::bad_request(format!("the gateway could not reach {base}: {e}")).with_param("url"))?;
    // One registration per device: the new one replaces the old (added first,
    // so the device's models never leave the pools in between).
    state.pools.remove_device_except(&device.id, session);
    tokio::spawn(watch(state.clone(), device.id.clone(), transport, session));
    tracing::info!(device = %device.id, session, provisions = n, url = %base, "direct provider registered");
    Ok(Json(json!({ "provisions": n, "session": session })))
}

/// Pings a direct node until it fails twice in a row, then removes it.
async fn watch(state: AppState, device_id: String, transport: Transport, session: u64) {
    let every = Duration::from_millis(state.config.link.ping_interval_ms);
    let mut misses = 0;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = state.shutdown.cancelled() => return,
        }
        if !state.pools.all().iter().any(|p| p.session == session) {
            return; // replaced or drained
        }
        match register::hello(&transport).await {
            Ok(_) => misses = 0,
            Err(_) => misses += 1,
        }
        if misses >= 2 {
            register::unregister(&state, &device_id, session).await;
            tracing::info!(device = %device_id, session, "direct provider stopped answering");
            return;
        }
    }
}

/// A node says it is about to stop: no new requests go to it.
pub async fn drain(State(state): State<AppState>, headers: HeaderMap) -> Result<Json<serde_json::Value>, ApiError> {
    let token = auth::bearer(&headers).ok_or_else(ApiError::missing_key)?;
    let device = auth::authenticate_device(state.store.as_ref(), token).await?;
    let removed = state.pools.remove_device(&device.id);
    state.store.set_device_offline(&device.id, None).await?;
    tracing::info!(device = %device.id, removed, "provider draining");
    Ok(Json(json!({ "removed": removed })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_recognised() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(is_internal_ip(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["8.8.8.8", "1.1.1.1", "2606:4700::1111"] {
            assert!(!is_internal_ip(ip.parse().unwrap()), "{ip}");
        }
    }

    #[tokio::test]
    async fn loopback_urls_need_the_operator_switch() {
        assert!(check_url("http://127.0.0.1:9", false).await.is_err());
        assert_eq!(
            check_url("http://127.0.0.1:9/", true).await.unwrap(),
            "http://127.0.0.1:9"
        );
        assert!(check_url("ftp://127.0.0.1", true).await.is_err());
    }
}
