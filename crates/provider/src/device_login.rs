//! `cxmpute-provider login`: the node's half of device login. Ask the gateway
//! for a code pair, show the owner where to approve it, poll until they do,
//! and return the device credentials it then hands out (see the gateway's
//! `web::device` module and docs/provider.md).

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Deserialize;
use serde_json::json;

use crate::credentials::Credentials;

#[derive(Deserialize)]
struct CodeAnswer {
    device_code: String,
    user_code: String,
    verification_uri: String,
    verification_uri_complete: String,
    expires_in: u64,
    interval: u64,
}

#[derive(Deserialize)]
struct TokenAnswer {
    device_id: String,
    access_key: String,
    name: String,
}

#[derive(Deserialize)]
struct ErrorAnswer {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    message: String,
    #[serde(default)]
    code: Option<String>,
}

/// The gateway's error message and code, from an OpenAI-style error body.
fn error_of(text: &str) -> (String, Option<String>) {
    match serde_json::from_str::<ErrorAnswer>(text) {
        Ok(e) => (e.error.message, e.error.code),
        Err(_) => (text.chars().take(300).collect(), None),
    }
}

/// Tells the gateway to revoke this device's credential
/// (`POST /v1/provider/logout`). An answer of 401 means it already was.
pub async fn revoke(creds: &Credentials) -> anyhow::Result<()> {
    let gateway = creds.gateway.trim_end_matches('/');
    let http = crate::gateway_tls::http_client(Duration::from_secs(10))?;
    let res = http
        .post(format!("{gateway}{}", cxmpute_protocol::link::LOGOUT_PATH))
        .bearer_auth(creds.credential())
        .send()
        .await
        .with_context(|| format!("cannot reach the gateway at {gateway}"))?;
    let status = res.status();
    if status.is_success() || status == reqwest::StatusCode::UNAUTHORIZED {
        return Ok(());
    }
    let text = res.text().await.unwrap_or_default();
    anyhow::bail!(
        "the gateway did not sign the device out ({status}): {}",
        error_of(&text).0
    )
}

/// Runs the whole flow, writing instructions for the owner to `out`.
pub async fn login(gateway: &str, name: &str, out: &mut impl Write) -> anyhow::Result<Credentials> {
    let gateway = gateway.trim_end_matches('/');
    anyhow::ensure!(
        gateway.starts_with("http://") || gateway.starts_with("https://"),
        "the gateway must be an http:// or https:// URL, got '{gateway}'"
    );
    let http = crate::gateway_tls::http_client(Duration::from_secs(15))?;
    let res = http
        .post(format!("{gateway}/v1/device/code"))
        .json(&json!({ "name": name }))
        .send()
        .await
        .with_context(|| format!("cannot reach the gateway at {gateway}"))?;
    let status = res.status();
    let text = res.text().await.unwrap_or_default();
    if !status.is_success() {
        anyhow::bail!("the gateway refused to start a login ({status}): {}", error_of(&text).0);
    }
    let code: CodeAnswer = serde_json::from_str(&text).context("the gateway's answer is not a device code")?;
    writeln!(
        out,
        "To link this node to your account, open\n\n    {}\n\nsign in, and check that the page shows the code\n\n    {}\n\n\
         (or open {} and type the code). Waiting for approval…",
        code.verification_uri_complete, code.user_code, code.verification_uri
    )?;
    out.flush()?;

    let deadline = Instant::now() + Duration::from_secs(code.expires_in.saturating_add(5));
    let mut interval = Duration::from_secs(code.interval.max(1));
    loop {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the code expired before it was approved: run `cxmpute-provider login` again"
        );
        tokio::time::sleep(interval).await;
        let sent = http
            .post(format!("{gateway}/v1/device/token"))
            .json(&json!({ "device_code": code.device_code }))
            .send()
            .await;
        let res = match sent {
            Ok(res) => res,
            Err(e) => {
                tracing::warn!(error = %e, "polling the gateway failed; retrying");
                continue;
            }
        };
        let status = res.status();
        let text = res.text().await.unwrap_or_default();
        if status.is_success() {
            let token: TokenAnswer =
                serde_json::from_str(&text).context("the gateway's answer holds no device credentials")?;
            return Ok(Credentials {
                gateway: gateway.to_string(),
                device_id: token.device_id,
                access_key: token.access_key,
                name: token.name,
            });
        }
        let (message, code) = error_of(&text);
        match code.as_deref() {
            Some("authorization_pending") => {}
            Some("slow_down") => interval += Duration::from_secs(5),
            Some("expired_token") => {
                anyhow::bail!("the code expired before it was approved: run `cxmpute-provider login` again")
            }
            Some("access_denied") => anyhow::bail!("the login was denied on the web page"),
            _ if status.is_server_error() => {
                tracing::warn!(%status, message = %message, "the gateway failed a poll; retrying");
            }
            _ => anyhow::bail!("the gateway refused the login ({status}): {message}"),
        }
    }
}

/// A name for this machine when none is given: its host name.
pub fn default_name() -> String {
    sysinfo::System::host_name()
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(|| "provider node".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_read_from_openai_bodies() {
        let (m, c) =
            error_of(r#"{"error":{"message":"wait","type":"invalid_request_error","param":null,"code":"slow_down"}}"#);
        assert_eq!((m.as_str(), c.as_deref()), ("wait", Some("slow_down")));
        let (m, c) = error_of("plain text");
        assert_eq!((m.as_str(), c), ("plain text", None));
    }
}
