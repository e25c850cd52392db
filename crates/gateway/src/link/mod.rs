//! The gateway's side of provider links and direct registrations.
//!
//! - [`accept`]: a node dials in, proves who it is, and the upgraded connection
//!   becomes an HTTP/2 connection on which the gateway is the client.
//! - [`register`]: what both modes share once a node is known: ask it what it
//!   offers, put its provisions in the pools, take them out when it goes.
//! - [`direct`]: nodes with a public URL, checked by a background ping.

pub mod accept;
pub mod direct;
pub mod links;
pub mod register;
pub mod stats;
