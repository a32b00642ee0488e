//! Mounting askstream inside your own hyper service.
//!
//! The outer service owns `/` and delegates everything under `/ai/` to an [`AskService`],
//! stripping the prefix, so `POST /ai/api/v1/ai/ask?stream=true` streams an answer.
//!
//! ```text
//! cargo run --example embed
//! curl -N -X POST 'http://127.0.0.1:3000/ai/api/v1/ai/ask?stream=true' \
//!      -H 'content-type: application/json' -d '{"query":"How do refunds work?"}'
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;

use askstream::{AskBody, AskService, PeerAddr, ServiceConfig};
use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::service::{Service, service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

const PREFIX: &str = "/ai";

/// The outer app's body: its own small pages, or whatever the ask service streams.
type AppBody = Either<Full<Bytes>, AskBody>;

async fn app(ask: AskService, mut req: Request<Incoming>) -> Result<Response<AppBody>, Infallible> {
    let Some(rest) = req.uri().path().strip_prefix(PREFIX) else {
        return Ok(Response::new(Either::Left(Full::new(Bytes::from_static(
            b"my app; ask under /ai/\n",
        )))));
    };
    // Hand the ask service the path it knows, keeping the query string (`?stream=true`).
    let path_and_query = match req.uri().query() {
        Some(q) => format!("{rest}?{q}"),
        None => rest.to_string(),
    };
    match Uri::builder().path_and_query(path_and_query).build() {
        Ok(uri) => *req.uri_mut() = uri,
        Err(_) => {
            let mut res = Response::new(Either::Left(Full::new(Bytes::from_static(b"bad path\n"))));
            *res.status_mut() = http::StatusCode::BAD_REQUEST;
            return Ok(res);
        }
    }
    let res = ask.call(req).await?;
    Ok(res.map(Either::Right))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The embedded defaults: built-in corpus, simulated generator, in-memory quota.
    let ask = AskService::builder(ServiceConfig::default()).build()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("listening on http://{}", listener.local_addr()?);
    loop {
        let (stream, peer): (_, SocketAddr) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let ask = ask.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |mut req: Request<Incoming>| {
                // Open mode charges per client IP when there is no bearer token.
                req.extensions_mut().insert(PeerAddr(peer));
                app(ask.clone(), req)
            });
            if let Err(e) = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                eprintln!("connection from {peer}: {e}");
            }
        });
    }
}
