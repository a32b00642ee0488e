//! askstream streams the answers of a retrieval-augmented LLM pipeline to clients as
//! Server-Sent Events, with per-user quotas that refund themselves whenever a user does
//! not get a complete answer.
//!
//! # How a request flows
//!
//! ```text
//! accept ─▶ HTTP/1.1 or h2c ─▶ route ─▶ identify ─▶ parse ─▶ charge quota
//!    ─▶ retrieve ─▶ generate tokens ─▶ encode frames ─▶ channel body ─▶ socket
//! ```
//!
//! The quota is charged before any pipeline work; the charge is a value that refunds
//! itself unless the answer's `done` frame is handed to hyper. Each token is encoded once
//! into a [`bytes::Bytes`] frame and passes through a bounded channel to the response
//! body, whose sender learns at once when the client has gone.
//!
//! # Modules, in reading order
//!
//! - [`server`]: the accept loop, socket options, graceful shutdown ([`shutdown`]).
//! - [`service`]: [`AskService`], the hyper service; routing and error rendering.
//! - [`request`]: from HTTP request to a validated ask.
//! - [`auth`]: keys file or open mode; who pays for an ask.
//! - [`quota`]: the sharded quota map and its self-refunding [`quota::Charge`].
//! - `answer` (private): the per-ask driver that races the generator against the client
//!   leaving, timeouts, heartbeats and shutdown, and settles or refunds exactly once.
//! - [`pipeline`]: the [`pipeline::Retriever`] and [`pipeline::Generator`] traits, with the
//!   embedded BM25 index and simulated generator.
//! - [`sse`]: frame encoding, the channel-backed body, an incremental decoder.
//! - [`error`]: the SPEC's error codes; [`config`]: every flag.
//! - [`web`]: the demo page at `/` and the reusable browser client at `/client.js`,
//!   embedded in the binary.

mod answer;
pub mod auth;
pub mod config;
pub mod error;
pub mod metrics;
pub mod pipeline;
pub mod quota;
pub mod request;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod sse;
pub mod web;

pub use answer::{JsonBody, QueryId};
pub use config::Config;
pub use error::{ApiError, ErrorCode};
pub use server::{run, serve};
pub use service::{AskBody, AskService, PeerAddr};
