//! BM25 retriever. STUB — being implemented (issue 2 §6).
