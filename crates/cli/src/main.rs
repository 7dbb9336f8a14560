//! The `biplane` binary: parses the command line, sets up logging and the runtime, and
//! hands over to one subcommand module. Subcommand bodies live in their own modules.

mod client;
mod control_cmd;
mod echo;
mod proxy_cmd;
mod up_cmd;

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
    /// Run the control plane, two echo upstreams and a proxy node in one process, and apply
    /// the quick start (examples/quickstart.yaml) on first run.
    Up(up_cmd::UpArgs),
    /// Run the data plane: over xDS from control planes (`--control-plane`), or from a
    /// static resource file (`--config`).
    Proxy(proxy_cmd::ProxyArgs),
    /// A small upstream for tests, demos and benchmarks (HTTP/1.1, h2c, WebSocket, gRPC).
    Echo(echo::EchoArgs),
    /// Create or update resources from files, a directory or stdin (all or nothing).
    Apply(client::apply::ApplyArgs),
    /// Show resources and their status from the control plane.
    Get(client::get::GetArgs),
    /// Delete resources by kind and name, or those named in files.
    Delete(client::delete::DeleteArgs),
    /// Show what applying files would change (exit 1 when something would).
    Diff(client::diff::DiffArgs),
    /// Show the data-plane nodes connected to the control plane and their ACK/NACK state.
    Status(client::status::StatusArgs),
    /// Run the control plane: embedded store, admin API and xDS (ADS) server.
    Control(control_cmd::ControlArgs),
    /// Mint and list tokens (node bootstrap tokens, admin API tokens).
    #[command(subcommand)]
    Token(client::token::TokenCommand),
    /// Revoke data-plane nodes.
    #[command(subcommand)]
    Node(client::token::NodeCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let runtime = match build_runtime(&cli.command) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Up(args) => up_cmd::run(args).await,
            Command::Proxy(args) => proxy_cmd::run(args).await,
            Command::Control(args) => control_cmd::run(args).await,
            Command::Echo(args) => echo::run(args).await.map(|()| ExitCode::SUCCESS),
            Command::Apply(args) => Ok(client::apply::run(args).await),
            Command::Get(args) => Ok(client::get::run(args).await),
            Command::Delete(args) => Ok(client::delete::run(args).await),
            Command::Diff(args) => Ok(client::diff::run(args).await),
            Command::Status(args) => Ok(client::status::run(args).await),
            Command::Token(cmd) => Ok(client::token::run(cmd).await),
            Command::Node(cmd) => Ok(client::token::run_node(cmd).await),
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

/// The async runtime. `biplane proxy` with one worker — one core available to the process
/// (e.g. pinned with `taskset`), or `TOKIO_WORKER_THREADS=1` — runs on a current-thread
/// runtime, like one NGINX worker: tasks are polled on the thread that is woken, without
/// the multi-thread scheduler's queues, stealing and cross-thread wake-ups. Everything
/// else, and a proxy with more cores, runs on the multi-thread runtime.
fn build_runtime(command: &Command) -> std::io::Result<tokio::runtime::Runtime> {
    if matches!(command, Command::Proxy(_)) && proxy_workers() == 1 {
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

/// Worker threads the proxy gets: `TOKIO_WORKER_THREADS` (what tokio's multi-thread
/// runtime reads too), else the cores this process may run on.
fn proxy_workers() -> usize {
    std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, std::num::NonZero::get))
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
