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
//! The contract these modules implement is `docs/contract.md`; comments cite it as
//! "contract §N".
//!
//! - [`ServiceConfig`] (`config`): every setting, with its default.
//! - [`Builder`] (`builder`): the composition root, the one place that picks concrete
//!   pieces (BM25, the sim or openai generator, the in-memory quota map).
//! - [`serve`] (`server`): the accept loop, socket options, the shutdown sequence;
//!   [`shutdown`]: the drain and stop states it drives. `peer`: the socket shared between
//!   hyper and the answer in flight, which sees an HTTP/1 client leave while hyper is not
//!   reading. `activity`: an h2 connection's deadlines.
//! - [`AskService`] (`service`): the hyper service; routing, the checks an ask passes in
//!   order, and the one place an error becomes a response ([`AskBody`], `body`).
//!   `request` turns a request into a validated ask.
//! - [`auth`]: keys file or open mode; who pays for an ask.
//! - [`quota`]: the [`quota::QuotaStore`] trait, its self-refunding [`quota::Charge`], and
//!   the sharded in-memory [`quota::QuotaMap`].
//! - `answer`: the per-ask driver that races the generator against the client leaving,
//!   timeouts, heartbeats and shutdown, and its one `Outcome`, on which the charge, the
//!   log line and the metrics are settled exactly once.
//! - [`pipeline`]: the [`pipeline::Retriever`] and [`pipeline::Generator`] traits, with the
//!   embedded BM25 index, the simulated generator and the OpenAI-compatible one.
//! - [`wire`]: every document the API sends, as bytes; [`ErrorCode`] and [`ApiError`]
//!   (`error`): the error vocabulary.
//! - [`sse`]: the channel-backed body and its sender; an incremental decoder.
//! - `metrics` (`GET /metrics`) and `web` (the demo page), served by the service.

mod activity;
mod answer;
pub mod auth;
mod body;
mod builder;
mod clock;
pub mod config;
mod cors;
mod error;
mod metrics;
mod peer;
pub mod pipeline;
pub mod quota;
mod request;
mod server;
mod service;
pub mod shutdown;
pub mod sse;
#[cfg(feature = "tls")]
mod tls;
mod web;
pub mod wire;

pub use body::AskBody;
pub use builder::{Builder, StartupError};
pub use config::{GeneratorConfig, QuotaStoreConfig, ServiceConfig, TlsFiles};
pub use error::{ApiError, ErrorCode};
pub use pipeline::BoxFuture;
pub use server::serve;
pub use service::{AskService, PeerAddr, ReloadError};
