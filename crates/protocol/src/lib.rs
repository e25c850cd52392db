//! Wire types shared by the cxmpute gateway and provider node.
//!
//! # Layout
//! - [`error`]: the OpenAI error body every HTTP answer of ours uses on failure.
//! - [`openai`]: the OpenAI-compatible requests we accept, parsed just enough to
//!   validate and meter them; unknown fields ride along untouched in `extra`.
//! - [`link`]: what the gateway and a node say to each other about the link.
//! - [`assign`]: the node's hardware report and the gateway's assignment.
//! - [`parse`]: JSON parsing that reports *which* field was wrong.

pub mod assign;
pub mod error;
pub mod link;
pub mod openai;
pub mod parse;

pub use error::{ErrorBody, ErrorDetail};
