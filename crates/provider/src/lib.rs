//! The cxmpute provider node: links to a gateway and serves AI requests with
//! local engines.
//!
//! # Layout
//! - [`node`]: load engines, link or register, serve, drain on stop.
//! - [`link`]: dial out, upgrade, serve HTTP/2 over the one connection.
//! - [`server`]: the local router (OpenAI-shaped routes + hello).
//! - [`engines`]: MiniLM embeddings, web scraping, OpenAI-compatible upstreams.
//! - [`models`]: the per-user model cache, fetching models into it, listing and removing them.
//! - [`config`]: layered configuration.
//! - [`assignment`]: report the hardware, learn from the gateway what to serve.
//! - [`device_login`], [`credentials`]: `login` (device codes) and the saved credentials file.
//! - [`diagnose`]: hardware report and provider tier (`cxmpute-provider diagnose`).
//! - [`status`]: what the node is doing now, for the dashboard.
//! - [`tui`]: the setup wizard and the live terminal dashboard.

pub mod assignment;
pub mod config;
pub mod credentials;
pub mod device_login;
pub mod diagnose;
pub mod engines;
pub mod gateway_tls;
pub mod link;
pub mod models;
pub mod node;
pub mod server;
pub mod status;
pub mod tui;

pub use config::NodeConfig;
