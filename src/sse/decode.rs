//! Incremental SSE decoder. STUB — being implemented (issue 2 §8).
