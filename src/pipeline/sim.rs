//! Simulated generator. STUB — being implemented (issue 2 §6).
