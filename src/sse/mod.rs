//! Server-Sent Events: encoding frames, the channel-backed response body, and an
//! incremental decoder.
//!
//! - [`encode`] builds each frame once as [`bytes::Bytes`];
//! - [`body`] carries those frames to hyper through a bounded channel whose sender notices
//!   when the client has gone;
//! - [`decode`] parses an event stream incrementally (used by the load tool and tests).

pub mod body;
pub mod decode;
pub mod encode;
