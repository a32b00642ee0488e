//! askstream: stream the answers of a retrieval-augmented LLM pipeline as Server-Sent Events.
#![warn(missing_docs)]

pub mod auth;
pub mod config;
pub mod error;
pub mod pipeline;
pub mod quota;
pub mod sse;
