//! TLS towards the gateway, for `https://` gateway URLs: the public CAs
//! (Mozilla's list, from `webpki-roots`), the operating system's (which is
//! where a TLS-inspecting proxy's CA usually is; `SSL_CERT_FILE` and
//! `SSL_CERT_DIR` are honoured) plus, when `CXMPUTE_GATEWAY_CA`
//! names a PEM file, the certificates in it (a gateway behind a private CA or
//! a self-signed certificate). Both the link and the node's other calls to the
//! gateway (assignment, stats, drain, login) trust the same set.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// Names a PEM file of extra CA certificates the node trusts for the gateway.
pub const CA_ENV: &str = "CXMPUTE_GATEWAY_CA";

fn extra_ca_pem() -> anyhow::Result<Option<Vec<u8>>> {
    match std::env::var_os(CA_ENV).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(path) => std::fs::read(&path)
            .map(Some)
            .with_context(|| format!("cannot read {CA_ENV}={}", path.to_string_lossy())),
    }
}

fn extra_cas() -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let Some(pem) = extra_ca_pem()? else {
        return Ok(Vec::new());
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{CA_ENV} is not a PEM file of certificates"))?;
    anyhow::ensure!(!certs.is_empty(), "{CA_ENV} holds no certificate");
    Ok(certs)
}

/// An HTTP client for the gateway's API, trusting what the link trusts.
pub fn http_client(timeout: Duration) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder().timeout(timeout);
    for cert in extra_cas()? {
        let cert = reqwest::Certificate::from_der(&cert).context("an extra CA certificate")?;
        builder = builder.add_root_certificate(cert);
    }
    builder.build().context("building the HTTP client")
}

/// The rustls configuration of the link's TLS connection.
pub fn link_config() -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    // As reqwest does for the other calls: a store that cannot be read adds nothing.
    let native = rustls_native_certs::load_native_certs();
    let (_added, _unusable) = roots.add_parsable_certificates(native.certs);
    for cert in extra_cas()? {
        roots
            .add(cert)
            .with_context(|| format!("{CA_ENV}: a certificate rustls cannot use"))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// When `err` (or what caused it) is the gateway's certificate being refused,
/// a sentence that says so and what to do; retrying cannot help then.
pub fn certificate_problem(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(rustls::Error::InvalidCertificate(why)) = e.downcast_ref::<rustls::Error>() {
            return Some(format!(
                "the gateway's TLS certificate is not trusted ({why:?}): if it comes from a private CA or is \
                 self-signed, point {CA_ENV} at its PEM file"
            ));
        }
        // An io::Error's `source` skips the error it wraps: step into it.
        next = match e.downcast_ref::<std::io::Error>() {
            Some(io) => io.get_ref().map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    None
}
