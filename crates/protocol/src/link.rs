//! The provider link: how a node and the gateway introduce themselves.
//!
//! The node dials `GET {gateway}/v1/provider/link` with a WebSocket-style upgrade
//! handshake (many proxies pass only `Upgrade: websocket`), authenticating with
//! `Authorization: Bearer <device id>.<access key>`. After the `101` the bytes are
//! plain HTTP/2 with the roles reversed: the gateway is the client, the node the
//! server of its ordinary local router. The gateway's first request is
//! `GET /_cxmpute/hello`, answered with a [`Hello`].

use serde::{Deserialize, Serialize};

/// Where nodes dial in.
pub const LINK_PATH: &str = "/v1/provider/link";
/// The gateway's first request on a new link.
pub const HELLO_PATH: &str = "/_cxmpute/hello";
/// Where a node with a public address registers it (direct mode).
pub const REGISTER_PATH: &str = "/v1/provider/register";
/// Sent by a node that is about to stop, so the gateway stops routing to it.
pub const DRAIN_PATH: &str = "/v1/provider/drain";
/// A node asks for its earnings (device credential), for its dashboard.
pub const STATS_PATH: &str = "/v1/provider/stats";
/// A node signs out (`cxmpute-provider logout`): its credential stops working.
pub const LOGOUT_PATH: &str = "/v1/provider/logout";
/// The request id the gateway gives every forwarded request.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// The model id of the built-in scrape service.
pub const SCRAPE_MODEL: &str = "web-scrape";

/// One thing a node serves: a service and the public model id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Offer {
    /// `chat`, `embeddings`, `speech` or `scrape`.
    pub service: String,
    pub model: String,
    /// Served by the node's own OpenAI-compatible upstream, not a built-in
    /// engine: admitted without a catalog assignment.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub upstream: bool,
}

/// The node's introduction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub node_version: String,
    pub offers: Vec<Offer>,
    /// Requests the node is willing to run at once.
    pub max_concurrency: u32,
    /// Its tier and rough location, for the public network figures. Older
    /// nodes send none.
    #[serde(default)]
    pub placement: Placement,
}

/// How capable a node is and roughly where it runs. No city: the gateway
/// publishes these per tier and region and needs nothing finer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Placement {
    /// Provider tier 0-4 (see docs/provider.md).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tier: Option<u8>,
    /// Country code, e.g. `NL`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    /// Region within the country, e.g. `South Holland`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

/// Body of a direct-mode registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Register {
    /// Base URL the gateway calls, e.g. `http://node.example.com:8081`.
    pub url: String,
    /// A secret the node made up; the gateway sends it as a bearer token on
    /// every request, so nobody else can use the node's public URL.
    pub token: String,
}

/// Builds the `Sec-WebSocket-Accept` value for a handshake key: base64 of the
/// SHA-1 of the key and the fixed RFC 6455 GUID. Kept here so both sides agree.
pub const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
