//! The `askstream` binary: flags → config → bind → [`askstream::run`] → exit code.

use std::process::ExitCode;

use clap::Parser;

/// mimalloc: many small, short-lived allocations spread over worker threads (request
/// parsing, per-answer buffers) are where the system allocator is slowest.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let config = askstream::Config::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("askstream: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        // Handlers first: from here on SIGTERM means a graceful shutdown, never a kill.
        let signal = askstream::shutdown::signal();
        let listener = match tokio::net::TcpListener::bind(config.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("askstream: cannot listen on {}: {e}", config.listen);
                return ExitCode::FAILURE;
            }
        };
        match askstream::run(config, listener, signal).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("askstream: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
