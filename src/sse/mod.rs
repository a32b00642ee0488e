//! Server-Sent Events as a transport: the channel-backed response body, and an
//! incremental decoder.
//!
//! - [`body`] carries pre-encoded frames ([`crate::wire`]) to hyper through a bounded
//!   channel whose sender notices when the client has gone;
//! - [`decode`] parses an event stream incrementally (used by the openai generator, the
//!   load tool and the tests).

pub mod body;
pub mod decode;
