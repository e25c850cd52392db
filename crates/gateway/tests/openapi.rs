//! `docs/openapi.json` and the router agree: every documented route is
//! routed (not the 404 fallback, not 405), and every routed path is documented.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use cxmpute_gateway::{Config, Gateway};
use http_body_util::BodyExt;
use tower::ServiceExt;

fn spec() -> serde_json::Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[tokio::test]
async fn every_documented_route_is_served_and_every_route_documented() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        database_url: format!("sqlite://{}", dir.path().join("g.db").display()),
        ..Config::default()
    };
    let gw = Gateway::open(config).await.unwrap();
    let router = gw.router();
    let spec = spec();
    let mut documented = BTreeSet::new();
    for (path, ops) in spec["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            documented.insert((method.to_uppercase(), path.clone()));
            let uri = path.replace("{id}", "x");
            let req = Request::builder()
                .method(Method::from_bytes(method.to_uppercase().as_bytes()).unwrap())
                .uri(&uri)
                .body(Body::empty())
                .unwrap();
            let res = router.clone().oneshot(req).await.unwrap();
            let status = res.status();
            let body = res.into_body().collect().await.unwrap().to_bytes();
            let text = String::from_utf8_lossy(&body);
            assert_ne!(
                status,
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path} is documented but not routed"
            );
            assert!(
                !text.contains("Unknown route"),
                "{method} {path} is documented but falls through to 404"
            );
        }
    }
    let routed: BTreeSet<(String, String)> = cxmpute_gateway::server::all_routes()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(routed, documented, "server::ROUTES and docs/openapi.json differ");
}
