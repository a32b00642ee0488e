//! Channel-backed SSE body. STUB.
