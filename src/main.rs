//! The `askstream` binary: flags → [`ServiceConfig`](askstream::ServiceConfig) → bind →
//! [`askstream::serve`] → exit code. Everything else is the library's.

mod cli;

use std::process::ExitCode;

use clap::Parser;

/// mimalloc: many small, short-lived allocations spread over worker threads (request
/// parsing, per-answer buffers) are where the system allocator is slowest.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let flags = cli::Flags::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = match flags.service_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("askstream: {e}");
            return ExitCode::FAILURE;
        }
    };
    // `available_parallelism` honours the CPU affinity mask, so a server pinned to one core
    // (`taskset -c 0`) gets the single-threaded runtime: on one core, work stealing and
    // cross-thread wake-ups only add latency.
    let workers = flags.workers.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        |n| n as usize,
    );
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("askstream: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        // Handlers first: from here on SIGTERM means a graceful shutdown, never a kill.
        let mut signals = match askstream::shutdown::Signals::install() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("askstream: cannot install signal handlers: {e}");
                return ExitCode::FAILURE;
            }
        };
        // SIGHUP's default action ends the process: the handler goes in before anything
        // an operator could reload exists.
        #[cfg(unix)]
        let mut hangups =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("askstream: cannot install the SIGHUP handler: {e}");
                    return ExitCode::FAILURE;
                }
            };
        let service = match askstream::AskService::builder(config).build() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("askstream: {e}");
                return ExitCode::FAILURE;
            }
        };
        // The first signal drains (serve's grace period); a second ends the answers still
        // running at once, refunded, for an operator who cannot wait out the grace.
        let (first_tx, first) = tokio::sync::oneshot::channel::<()>();
        let stopper = service.shutdown().clone();
        tokio::spawn(async move {
            signals.next().await;
            let _ = first_tx.send(());
            signals.next().await;
            tracing::warn!("second signal: ending the answers still running now");
            stopper.stop();
        });
        let signal = async {
            let _ = first.await;
        };
        // SIGHUP: the keys file and the certificate read again (reload logs the outcome),
        // off the runtime's threads since it reads files.
        #[cfg(unix)]
        {
            let service = service.clone();
            tokio::spawn(async move {
                while hangups.recv().await.is_some() {
                    let service = service.clone();
                    let _ = tokio::task::spawn_blocking(move || service.reload()).await;
                }
            });
        }
        let listener = match tokio::net::TcpListener::bind(flags.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("askstream: cannot listen on {}: {e}", flags.listen);
                return ExitCode::FAILURE;
            }
        };
        askstream::serve(listener, service, signal).await;
        ExitCode::SUCCESS
    })
}
