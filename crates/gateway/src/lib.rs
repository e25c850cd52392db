//! The cxmpute gateway: an OpenAI-compatible API in front of a pool of provider
//! nodes, with credits, routing and metering.
//!
//! # Layout
//! - [`server`]: opens the store, builds the router, serves ([`run`]).
//! - [`api`]: the public routes (`/v1/…` and `/api/v1/…`); each handler checks
//!   the key, parses the body, and hands a [`relay::Forward`] to the relay.
//! - [`auth`], [`ratelimit`]: API keys, device credentials, per-key RPM.
//! - [`billing`], [`meter`]: holds, metering of answers, costs and rewards.
//! - [`pools`], [`transport`]: live provisions and how to reach them.
//! - [`relay`]: forward with one retry, stream back, settle before the end.
//! - [`link`]: provider links (reversed HTTP/2) and direct-mode registration.
//! - [`orchestrator`]: the model catalog and which models each node serves.
//! - [`admin`]: the operator's HTTP API; [`config`], [`error`], [`metrics`].
//! - [`web`]: email login, sessions, the dashboard and its JSON API.

pub mod admin;
pub mod api;
pub mod auth;
pub mod billing;
pub mod config;
pub mod error;
pub mod link;
pub mod meter;
pub mod metrics;
pub mod orchestrator;
pub mod pools;
pub mod ratelimit;
pub mod relay;
pub mod server;
pub mod state;
pub mod transport;
pub mod web;

pub use config::Config;
pub use server::{run, Gateway};
