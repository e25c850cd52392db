//! A gateway behind TLS: operators terminate TLS in front of the gateway (a
//! reverse proxy), and the node links to `https://…`. Here the proxy is a
//! small rustls terminator on loopback with a self-signed certificate made by
//! the `openssl` program; the node trusts it through `CXMPUTE_GATEWAY_CA`,
//! and refuses it without.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use common::{bin, present_or_skip, Db, Gateway};
use cxmpute_testkit::FakeUpstream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;

/// A self-signed certificate for 127.0.0.1: (cert.pem, key.pem).
fn certificate(dir: &Path) -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .args(["-days", "2", "-subj", "/CN=cxmpute test gateway"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        // A server certificate, not a CA: TLS clients refuse a CA as the leaf.
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    made.then_some((cert, key))
}

/// Accepts TLS on a loopback port and relays the plain bytes to `backend`
/// (as nginx or Caddy in front of the gateway would); returns the port.
async fn tls_terminator(cert: &Path, key: &Path, backend: u16) -> u16 {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A client that does not trust the certificate fails here.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut plain) = TcpStream::connect(("127.0.0.1", backend)).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    port
}

fn node(gateway: &str, credential: &str, upstream: &str, ca: Option<&Path>) -> Command {
    let mut cmd = Command::new(bin("cxmpute-provider"));
    cmd.args(["start", "--headless", "--gateway", gateway, "--upstream", upstream])
        .args(["--no-chat", "--no-embeddings", "--no-speech"])
        .env("CXMPUTE_CREDENTIAL", credential)
        .env_remove("CXMPUTE_GATEWAY_CA")
        .env(
            "CXMPUTE_LOG",
            std::env::var("CXMPUTE_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .kill_on_drop(true);
    if let Some(ca) = ca {
        cmd.env("CXMPUTE_GATEWAY_CA", ca);
    }
    cmd
}

#[tokio::test]
async fn a_node_links_to_an_https_gateway_it_trusts_and_refuses_one_it_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let Some((cert, key)) = certificate(dir.path()) else {
        present_or_skip(
            false,
            "the openssl program",
            "Install it (Debian: apt-get install openssl).",
        );
        return;
    };
    let upstream = FakeUpstream::start().await.unwrap();
    let db = Db::sqlite().await;
    let gw = Gateway::start(&db.url).await;
    let tls_port = tls_terminator(&cert, &key, gw.port).await;
    let https = format!("https://127.0.0.1:{tls_port}");
    let (_, credential) = gw.device().await;

    // Without the CA the node cannot even ask for its assignment: it stops
    // and says why, and never joins the pools.
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        node(&https, &credential, &upstream.base_url, None).output(),
    )
    .await
    .expect("the node should give up on an untrusted gateway")
    .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains(&https), "the error names the gateway: {said}");
    assert_eq!(gw.providers("fake-chat").await, 0);

    // With it, the node links over TLS and serves through the gateway.
    let mut trusted = node(&https, &credential, &upstream.base_url, Some(&cert))
        .spawn()
        .unwrap();
    gw.wait_providers("fake-chat", 1, Duration::from_secs(30)).await;
    let (_, key) = gw.account(1_000_000_000_000, json!({"name": "tls"})).await;
    let res = gw
        .post("/v1/chat/completions", &key)
        .json(&json!({"model": "fake-chat", "stream": true, "messages": [{"role": "user", "content": "over tls"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body = res.text().await.unwrap();
    assert!(body.contains("[DONE]"), "{body}");
    trusted.start_kill().unwrap();
    let _ = trusted.wait().await;
    gw.wait_providers("fake-chat", 0, Duration::from_secs(10)).await;
}
