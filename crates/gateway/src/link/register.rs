//! What links and direct registrations share: learn the node's offers, admit
//! those of its assignment (and its upstream's), fill the pools, and empty
//! them again when the node goes.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cxmpute_protocol::link::{Hello, HELLO_PATH};
use cxmpute_store::{Device, Service};
use http_body_util::{BodyExt, Limited};
use hyper::Request;

use crate::orchestrator::handler::admits;
use crate::pools::Provision;
use crate::state::AppState;
use crate::transport::Transport;

/// Asks the node for its [`Hello`].
pub async fn hello(transport: &Transport) -> anyhow::Result<Hello> {
    let req = Request::get("/").body(Bytes::new())?;
    let res = transport.send(req, HELLO_PATH, Duration::from_secs(10)).await?;
    anyhow::ensure!(res.status().is_success(), "hello answered {}", res.status());
    let body = Limited::new(res.into_body(), 1 << 20)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("reading hello: {e}"))?
        .to_bytes();
    Ok(serde_json::from_slice(&body)?)
}

/// Registers the node's provisions in the store and the pools; returns how many.
pub async fn register(
    state: &AppState,
    device: &Device,
    transport: Transport,
    session: u64,
    endpoint: Option<&str>,
) -> anyhow::Result<usize> {
    let hello = hello(&transport).await?;
    let assignment = state.store.assignment(&device.id).await?;
    let placement = Arc::new(crate::pools::NodePlacement::from_announced(&hello.placement));
    let mut provisions = Vec::new();
    for offer in &hello.offers {
        let Some(service) = Service::parse(&offer.service) else {
            tracing::warn!(device = %device.id, service = %offer.service, "ignoring an offer of an unknown service");
            continue;
        };
        anyhow::ensure!(
            !offer.model.is_empty() && offer.model.len() <= 200,
            "model ids must be 1-200 characters"
        );
        if !admits(assignment.as_ref(), service, offer) {
            tracing::warn!(
                device = %device.id,
                service = %service,
                model = %offer.model,
                "refusing an offer that is not in the device's assignment"
            );
            continue;
        }
        let id = state
            .store
            .upsert_provision(
                &device.id,
                service,
                &offer.model,
                transport.mode(),
                endpoint,
                Some(&state.link_id(session)),
            )
            .await?;
        provisions.push(Arc::new(
            Provision::new(
                id,
                device.id.clone(),
                device.account_id.clone(),
                service,
                offer.model.clone(),
                transport.clone(),
                session,
            )
            .with_placement(placement.clone()),
        ));
    }
    state
        .store
        .touch_device(&device.id, cxmpute_store::now_millis())
        .await?;
    let n = provisions.len();
    state.pools.add(provisions);
    Ok(n)
}

pub async fn unregister(state: &AppState, device_id: &str, session: u64) {
    let removed = state.pools.remove_session(session);
    tracing::debug!(device = %device_id, session, removed, "provisions left the pools");
    // Another session of the same device (a reconnect) may be live already,
    // here or on another replica: only what this session announced goes offline.
    let still_linked = state.pools.all().iter().any(|p| p.device_id == device_id);
    if !still_linked {
        if let Err(e) = state
            .store
            .set_device_offline(device_id, Some(&state.link_id(session)))
            .await
        {
            tracing::warn!(device = %device_id, error = %e, "could not mark device offline");
        }
    }
}
