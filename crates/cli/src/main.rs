//! The `biplane` binary: parses the command line, sets up logging and the runtime, and
//! hands over to one subcommand module. Subcommand bodies live in their own modules.

mod echo;
mod proxy_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "biplane",
    version,
    about = "Biplane: an L4/L7 proxy and its control plane"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the data plane from a static resource file (Gateway API + Backend YAML/JSON).
    Proxy(proxy_cmd::ProxyArgs),
    /// A small upstream for tests, demos and benchmarks (HTTP/1.1, h2c, WebSocket, gRPC).
    Echo(echo::EchoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Proxy(args) => proxy_cmd::run(args).await,
            Command::Echo(args) => echo::run(args).await.map(|()| ExitCode::SUCCESS),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr (stdout is for access logs and machine-readable output). The filter
/// comes from `BIPLANE_LOG`, else `RUST_LOG`, else `info`.
fn init_logging() {
    let spec = std::env::var("BIPLANE_LOG").or_else(|_| std::env::var("RUST_LOG"));
    let (filter, bad) = match spec {
        Ok(s) => match EnvFilter::try_new(&s) {
            Ok(f) => (f, None),
            Err(e) => (EnvFilter::new("info"), Some(format!("{s:?}: {e}"))),
        },
        Err(_) => (EnvFilter::new("info"), None),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Some(bad) = bad {
        tracing::warn!("ignoring the invalid log filter {bad}; using info");
    }
}
