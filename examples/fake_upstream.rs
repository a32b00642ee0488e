//! A stand-in for a model server: an OpenAI-compatible streaming chat-completions endpoint
//! that answers at once, for trying `--generator openai` without a GPU and for measuring
//! what askstream adds on top of an upstream's own time to first token.
//!
//! ```text
//! cargo run --release --example fake_upstream -- 127.0.0.1:8000 64
//! cargo run --release -- --generator openai \
//!     --upstream-url http://127.0.0.1:8000/v1 --upstream-model fake
//! ```
//!
//! Every `POST /v1/chat/completions` gets a role chunk, `TOKENS` content deltas (default
//! 64), a usage chunk and `[DONE]`, all in one write.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

fn completion(tokens: usize) -> Bytes {
    let mut out = String::new();
    let chunk = |delta: serde_json::Value| {
        let c = serde_json::json!({"id": "fake", "object": "chat.completion.chunk", "model": "fake",
            "choices": [{"index": 0, "delta": delta, "finish_reason": null}]});
        format!("data: {c}\n\n")
    };
    out.push_str(&chunk(serde_json::json!({"role": "assistant"})));
    for i in 0..tokens {
        out.push_str(&chunk(serde_json::json!({"content": format!(" word{i}")})));
    }
    let usage = serde_json::json!({"id": "fake", "object": "chat.completion.chunk", "choices": [],
        "usage": {"prompt_tokens": 100, "completion_tokens": tokens, "total_tokens": 100 + tokens}});
    out.push_str(&format!("data: {usage}\n\ndata: [DONE]\n\n"));
    Bytes::from(out)
}

async fn handle(req: Request<Incoming>, body: Bytes) -> Result<Response<Full<Bytes>>, Infallible> {
    let path_ok = req.uri().path().ends_with("/chat/completions");
    // Read the request so the connection can be reused.
    let _ = req.into_body().collect().await;
    let mut res = Response::new(Full::new(if path_ok {
        body
    } else {
        Bytes::from_static(b"not found")
    }));
    if path_ok {
        res.headers_mut().insert(
            "content-type",
            http::HeaderValue::from_static("text/event-stream"),
        );
    } else {
        *res.status_mut() = StatusCode::NOT_FOUND;
    }
    Ok(res)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = args.next().as_deref().unwrap_or("127.0.0.1:8000").parse()?;
    let tokens: usize = args.next().as_deref().unwrap_or("64").parse()?;
    let body = completion(tokens);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!(
        "fake upstream on http://{}/v1 ({tokens} tokens per answer)",
        listener.local_addr()?
    );
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let body = body.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(req, body.clone()));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
