//! `POST /v1/provider/assignment` and the admission check the link makes.

use std::collections::HashMap;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use bytes::Bytes;
use cxmpute_protocol::assign::{Assignment, AssignmentRequest};
use cxmpute_protocol::link::Offer;
use cxmpute_protocol::parse::parse_json;
use cxmpute_store::{Service, StoredAssignment};

use super::assign::assign;
use crate::auth;
use crate::error::ApiError;
use crate::state::AppState;

/// Longest list a node may send in a request (models, engines…).
const MAX_LIST: usize = 1000;

/// A node reports its hardware and opt-ins; the answer is what it should
/// load. The assignment is stored: the link admits only those offers.
pub async fn request_assignment(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Assignment>, ApiError> {
    let token = auth::bearer(&headers).ok_or_else(ApiError::missing_key)?;
    let device = auth::authenticate_device(state.store.as_ref(), token).await?;
    let req: AssignmentRequest = parse_json(&body).map_err(ApiError::invalid_body)?;
    for (name, list) in [
        ("engines", &req.engines),
        ("models", &req.models),
        ("cached", &req.cached),
        ("upstream_models", &req.upstream_models),
        ("opt_in.services", &req.opt_in.services),
        ("fetch.engines", &req.fetch.engines),
        ("fetch.sources", &req.fetch.sources),
        ("fetch.failed", &req.fetch.failed),
    ] {
        if list.len() > MAX_LIST || list.iter().any(|s| s.len() > 200) {
            return Err(ApiError::bad_request(format!(
                "'{name}' may hold at most {MAX_LIST} names of at most 200 characters"
            ))
            .with_param(name));
        }
    }
    if let Some(bad) = req.opt_in.services.iter().find(|s| Service::parse(s).is_none()) {
        return Err(ApiError::bad_request(format!(
            "unknown service '{bad}': use chat, embeddings, speech or scrape"
        ))
        .with_param("opt_in.services"));
    }
    // Other devices only: a node asking again while it serves must not see its
    // own provisions as the network's supply and be moved off what it serves.
    let mut online: HashMap<(Service, String), usize> = HashMap::new();
    for p in state.pools.all().iter().filter(|p| p.device_id != device.id) {
        *online.entry((p.service, p.model.clone())).or_default() += 1;
    }
    let assignment = assign(&state.config.catalog, &req, |service, model| {
        online.get(&(service, model.to_string())).copied().unwrap_or(0)
    });
    let models: Vec<(Service, String)> = assignment
        .models
        .iter()
        .filter_map(|m| Service::parse(&m.service).map(|s| (s, m.id.clone())))
        .collect();
    let hardware = serde_json::to_string(&req.hardware).map_err(|_| ApiError::internal())?;
    state
        .store
        .put_assignment(&device.id, &models, &hardware, cxmpute_store::now_millis())
        .await?;
    let names: Vec<&str> = models.iter().map(|(_, m)| m.as_str()).collect();
    tracing::info!(
        device = %device.id,
        tier = req.hardware.tier,
        assigned = ?names,
        declined = assignment.declined.len(),
        "assignment made"
    );
    Ok(Json(assignment))
}

/// Whether the link may put `offer` in the pools: upstream models always,
/// catalog models only when they are in the device's assignment.
pub fn admits(assignment: Option<&StoredAssignment>, service: Service, offer: &Offer) -> bool {
    offer.upstream || assignment.is_some_and(|a| a.models.iter().any(|(s, m)| *s == service && *m == offer.model))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_assigned_or_upstream_offers_are_admitted() {
        let stored = StoredAssignment {
            models: vec![(Service::Scrape, "web-scrape".into())],
            hardware: "{}".into(),
            assigned_at: 0,
        };
        let offer = |model: &str, upstream| Offer {
            service: "scrape".into(),
            model: model.into(),
            upstream,
        };
        assert!(admits(Some(&stored), Service::Scrape, &offer("web-scrape", false)));
        assert!(!admits(Some(&stored), Service::Chat, &offer("web-scrape", false)));
        assert!(!admits(Some(&stored), Service::Scrape, &offer("other", false)));
        assert!(!admits(None, Service::Scrape, &offer("web-scrape", false)));
        assert!(admits(None, Service::Chat, &offer("my-vllm-model", true)));
    }
}
