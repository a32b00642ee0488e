//! Documents and the built-in corpus. STUB — being implemented (issue 2 §6).
