//! Authorization matrix: every web route × every kind of caller → the status
//! it must answer. The table is keyed by `web::ROUTES`, so a route added there
//! without a row here fails this test.

#![allow(clippy::unwrap_used)]

mod common;

use axum::http::Method;
use common::{app, session_for, Browser, ADMIN_EMAIL};
use cxmpute_gateway::web::session::csrf_of;
use cxmpute_store::ids::random_secret;
use cxmpute_store::{Account, NewApiKey};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Anonymous,
    OtherUser,
    Owner,
    SuspendedOwner,
    Admin,
}

const EVERYONE: [Who; 5] = [
    Who::Anonymous,
    Who::OtherUser,
    Who::Owner,
    Who::SuspendedOwner,
    Who::Admin,
];

/// Expected status per caller, in the order of [`EVERYONE`].
fn expected(method: &str, path: &str) -> Option<[u16; 5]> {
    Some(match (method, path) {
        ("GET", "/login") => [200; 5],
        ("POST", "/login") => [200; 5],
        // No code was requested for the address: refused for everyone.
        ("POST", "/login/verify") => [401; 5],
        ("POST", "/logout") => [303; 5],
        ("GET", "/app") => [303, 200, 200, 403, 200],
        ("POST", "/app/keys") => [303, 200, 200, 403, 200],
        ("POST", "/app/keys/{id}/revoke") => [303, 404, 303, 403, 404],
        ("POST", "/app/keys/{id}/edit") => [303, 404, 303, 403, 404],
        ("GET", "/web/api/me") => [401, 200, 200, 403, 200],
        ("GET", "/web/api/keys") => [401, 200, 200, 403, 200],
        ("POST", "/web/api/keys") => [401, 201, 201, 403, 201],
        ("DELETE", "/web/api/keys/{id}") => [401, 404, 200, 403, 404],
        ("PATCH", "/web/api/keys/{id}") => [401, 404, 200, 403, 404],
        ("GET", "/web/api/ledger") => [401, 200, 200, 403, 200],
        ("GET", "/web/api/usage") => [401, 200, 200, 403, 200],
        ("GET", "/web/api/admin/accounts") => [401, 403, 403, 403, 200],
        // Device login: the node's half needs no session.
        ("POST", "/v1/device/code") => [200; 5],
        // A device code nobody issued.
        ("POST", "/v1/device/token") => [400; 5],
        // Without a code: the form to type one in.
        ("GET", "/link") => [303, 200, 200, 403, 200],
        // A well-formed code no node is waiting with.
        ("POST", "/link") => [303, 404, 404, 403, 404],
        ("GET", "/app/provider") => [303, 200, 200, 403, 200],
        ("GET", "/web/api/provider" | "/web/api/usage/daily" | "/web/api/referrals") => [401, 200, 200, 403, 200],
        // Operator pages: the login for visitors, 403 for everyone but admins.
        ("GET", "/admin" | "/admin/users/{id}") => [303, 403, 403, 403, 200],
        ("POST", "/admin/referrals/run") => [303, 403, 403, 403, 200],
        ("POST", p) if p.starts_with("/admin/") => [303, 403, 403, 403, 303],
        ("GET", p) if p.starts_with("/web/api/admin/") => [401, 403, 403, 403, 200],
        ("POST", "/web/api/admin/banners") => [401, 403, 403, 403, 201],
        ("POST" | "DELETE", p) if p.starts_with("/web/api/admin/") => [401, 403, 403, 403, 200],
        // Public: the same for everyone, suspended or not.
        ("GET", "/network" | "/models") => [200; 5],
        ("GET", p) if p.starts_with("/web/api/public/") => [200; 5],
        _ => return None,
    })
}

/// Valid fields of each operator form, so that an allowed caller succeeds.
fn form_fields(path: &str) -> Vec<(&'static str, &'static str)> {
    match path {
        "/admin/users/{id}/credits" => vec![("kind", "deposit"), ("amount_usd", "1"), ("reason", "matrix")],
        "/admin/users/{id}/suspend" | "/admin/users/{id}/unsuspend" => vec![("reason", "matrix")],
        "/admin/banners" => vec![("message", "matrix"), ("ends", "2099-01-01T00:00")],
        "/app/keys/{id}/edit" => vec![("name", "edited"), ("service", "chat")],
        _ => vec![],
    }
}

/// A valid JSON body for each JSON route that takes one.
fn json_body(method: &str, path: &str) -> &'static str {
    match (method, path) {
        ("POST", "/web/api/admin/accounts/{id}/credits") => r#"{"kind":"deposit","amount":1,"reason":"matrix"}"#,
        ("POST", "/web/api/admin/accounts/{id}/suspend" | "/web/api/admin/accounts/{id}/unsuspend") => {
            r#"{"reason":"matrix"}"#
        }
        ("POST", "/web/api/admin/pricing") => "{}",
        ("POST", "/web/api/admin/banners") => r#"{"message":"matrix","ends_at":4070908800000}"#,
        ("PATCH", "/web/api/keys/{id}") => r#"{"name":"edited","rpm_limit":5}"#,
        _ => "",
    }
}

async fn new_key(app: &common::App, owner: &Account) -> String {
    let id = cxmpute_store::ids::new_id("");
    app.store
        .create_api_key(NewApiKey {
            id: id.clone(),
            account_id: owner.id.clone(),
            name: "matrix".into(),
            prefix: "sk-cx-…".into(),
            secret_hash: "x".into(),
            credit_limit: None,
            allowed_services: None,
            rpm_limit: None,
        })
        .await
        .unwrap();
    id
}

#[tokio::test]
async fn every_web_route_answers_each_caller_as_the_table_says() {
    let app = app().await;
    let s = app.store.as_ref();
    let owner = s.create_account("owner", Some("owner@example.com")).await.unwrap();
    let other = s.create_account("other", Some("other@example.com")).await.unwrap();
    let suspended = s.create_account("susp", Some("susp@example.com")).await.unwrap();
    s.set_suspended(&suspended.id, Some("test")).await.unwrap();
    let admin = s.create_account("admin", Some(ADMIN_EMAIL)).await.unwrap();

    let mut failures = Vec::new();
    for (n, (method, path)) in cxmpute_gateway::web::ROUTES.iter().enumerate() {
        let Some(want) = expected(method, path) else {
            panic!("{method} {path} has no row in the authorization matrix: add one to expected()");
        };
        for (who, want) in EVERYONE.iter().zip(want) {
            // Fresh per case: a session (logout ends it) and a key (revocation spends it).
            let (session_of, key_owner) = match who {
                Who::Anonymous => (None, &owner),
                Who::OtherUser => (Some(&other), &owner),
                Who::Owner => (Some(&owner), &owner),
                Who::SuspendedOwner => (Some(&suspended), &suspended),
                Who::Admin => (Some(&admin), &owner),
            };
            let key = new_key(&app, key_owner).await;
            let mut b = match session_of {
                Some(acc) => Browser::with_session(&session_for(s, &acc.id).await),
                None => Browser::default(),
            };
            let login = random_secret();
            b.cookies.push(("cx_login".into(), login.clone()));
            let login_csrf = csrf_of(&login);
            let csrf = b.session_csrf();
            // Each route's {id} names a fresh thing of its kind.
            let id = if path.contains("/users/{id}") || path.contains("/accounts/{id}") {
                s.create_account(&format!("target {n} {who:?}"), None).await.unwrap().id
            } else if path.contains("/devices/{id}") {
                s.create_device(&owner.id, "matrix", &cxmpute_store::ids::new_id("dev_"), "h")
                    .await
                    .unwrap()
                    .id
            } else if path.contains("/banners/{id}") {
                s.create_banner(cxmpute_store::NewBanner {
                    message: "matrix".into(),
                    level: cxmpute_store::BannerLevel::Info,
                    starts_at: 0,
                    ends_at: 4_070_908_800_000,
                    created_by: "matrix".into(),
                })
                .await
                .unwrap()
                .id
            } else {
                key.clone()
            };
            let uri = path.replace("{id}", &id);
            let email = format!("matrix{n}-{who:?}@example.com").to_lowercase();
            let got = match (*method, *path) {
                ("POST", "/login") => b.form(&app, &uri, &[("email", &email), ("csrf", &login_csrf)]).await,
                ("POST", "/login/verify") => {
                    b.form(
                        &app,
                        &uri,
                        &[("email", &email), ("code", "123456"), ("csrf", &login_csrf)],
                    )
                    .await
                }
                ("POST", "/v1/device/code") => b.json(&app, Method::POST, &uri, r#"{"name": "matrix node"}"#).await,
                ("POST", "/v1/device/token") => {
                    let body = format!(r#"{{"device_code": "{}"}}"#, random_secret());
                    b.json(&app, Method::POST, &uri, &body).await
                }
                ("POST", "/link") => {
                    b.form(
                        &app,
                        &uri,
                        &[("csrf", &csrf), ("code", "BBBB-CCCC"), ("action", "approve")],
                    )
                    .await
                }
                ("POST", "/app/keys") => {
                    b.form(&app, &uri, &[("csrf", &csrf), ("name", "m"), ("service", "chat")])
                        .await
                }
                ("POST", _) if !path.starts_with("/web/api/") => {
                    let mut fields = vec![("csrf", csrf.as_str())];
                    fields.extend(form_fields(path));
                    b.form(&app, &uri, &fields).await
                }
                (m, _) => {
                    b.json(
                        &app,
                        Method::from_bytes(m.as_bytes()).unwrap(),
                        &uri,
                        json_body(m, path),
                    )
                    .await
                }
            };
            if got.status.as_u16() != want {
                failures.push(format!(
                    "{method} {path} as {who:?}: want {want}, got {} {}",
                    got.status,
                    got.body.chars().take(200).collect::<String>()
                ));
            }
            // Whoever may not revoke or edit a key must have left it alone.
            let now = s.key_auth(&key).await.unwrap().unwrap().key;
            let revoked = now.revoked_at.is_some();
            let editing = *path == "/app/keys/{id}/edit" || *method == "PATCH";
            let revoking = path.contains("keys/{id}") && !editing;
            if revoked != (revoking && *who == Who::Owner) {
                failures.push(format!("{method} {path} as {who:?}: key revoked = {revoked}"));
            }
            let edited = now.name == "edited";
            if edited != (editing && *who == Who::Owner) {
                failures.push(format!("{method} {path} as {who:?}: key edited = {edited}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "authorization matrix failures:\n{}",
        failures.join("\n")
    );
}
