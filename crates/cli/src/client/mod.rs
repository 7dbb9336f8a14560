//! The kubectl-style client commands (`apply`, `get`, `delete`, `diff`, `status`): each
//! talks to a running `biplane control` over its admin API (`/api/v1`, see
//! `crates/control`) and prints what kubectl users expect, with kubectl's exit codes.
//!
//! Every command takes `--server URL`, `--token` and `--ca-file` (or their environment
//! variables, or a client config file: see [`config`]). Failures print one plain `error: ...` line per problem on
//! stderr and exit 1 (`diff` exits 2 on errors, as `kubectl diff` does).

pub mod apply;
pub mod config;
pub mod delete;
pub mod diff;
pub mod get;
pub mod http;
pub mod input;
pub mod kinds;
pub mod output;
pub mod status;
pub mod token;

use std::process::ExitCode;

/// The namespace of a resource whose document names none, and of `get`/`delete` without `-n`.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The connection flags shared by every client command (see [`config`] for the order
/// in which flags, environment and the client config file are consulted).
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// The control plane's admin API URL (default `https://127.0.0.1:7070`).
    #[arg(long, env = "BIPLANE_SERVER", value_name = "URL")]
    pub server: Option<String>,
    /// Bearer token for the admin API (`biplane token create --role ...`).
    #[arg(
        long,
        env = "BIPLANE_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// CA certificate (PEM) to verify an `https://` server with (the control plane's
    /// `<data-dir>/ca/ca.crt`).
    #[arg(long, env = "BIPLANE_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<std::path::PathBuf>,
    /// Client config file (server, token or tokenFile, caFile).
    #[arg(long, env = "BIPLANE_CONFIG", value_name = "FILE")]
    pub client_config: Option<std::path::PathBuf>,
}

impl ServerArgs {
    pub fn api(&self) -> Result<http::Api, Failure> {
        let resolved = config::resolve(
            self.server.as_deref(),
            self.token.as_deref(),
            self.ca_file.as_deref(),
            self.client_config.as_deref(),
        )?;
        http::Api::connect(&resolved)
    }
}

/// Why a client command failed; [`Failure::report`] prints it the way kubectl would.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// No HTTP answer at all (refused, timed out, DNS, TLS).
    #[error("cannot reach the control plane at {server}: {reason}")]
    Unreachable { server: String, reason: String },
    /// A non-2xx answer, with the server's `message`.
    #[error("{}", server_line(*status, message))]
    Server { status: u16, message: String },
    /// kubectl's `Error from server (NotFound): httproutes "web" not found`.
    #[error("Error from server (NotFound): {plural} {name:?} not found")]
    NotFound { plural: String, name: String },
    /// Bad command line or unreadable input.
    #[error("{0}")]
    Usage(String),
    /// Anything else (an answer that does not have the documented shape, ...).
    #[error("{0}")]
    Other(String),
}

fn server_line(status: u16, message: &str) -> String {
    match status {
        409 => format!("Error from server (Conflict): {message}"),
        _ => format!("error: {message}"),
    }
}

impl Failure {
    /// Prints the failure on stderr as one line.
    pub fn report(&self) {
        match self {
            Failure::Server { .. } | Failure::NotFound { .. } => eprintln!("{self}"),
            _ => eprintln!("error: {self}"),
        }
    }
}

/// Runs a command body: a failure is reported and becomes `code_on_error`.
pub async fn finish(
    code_on_error: u8,
    body: impl std::future::Future<Output = Result<ExitCode, Failure>>,
) -> ExitCode {
    match body.await {
        Ok(code) => code,
        Err(f) => {
            f.report();
            ExitCode::from(code_on_error)
        }
    }
}

/// Splits `ns/name` (or takes `name` in `namespace`, else `default`).
pub fn namespaced<'a>(
    name: &'a str,
    namespace: Option<&'a str>,
) -> Result<(&'a str, &'a str), Failure> {
    match name.split_once('/') {
        Some((ns, n)) => {
            if let Some(flag) = namespace.filter(|f| *f != ns) {
                return Err(Failure::Usage(format!(
                    "{name:?} names namespace {ns:?} but -n says {flag:?}"
                )));
            }
            if ns.is_empty() || n.is_empty() || n.contains('/') {
                return Err(Failure::Usage(format!(
                    "invalid name {name:?}: expected NAME or NAMESPACE/NAME"
                )));
            }
            Ok((ns, n))
        }
        None if name.is_empty() => Err(Failure::Usage("a resource name cannot be empty".into())),
        None => Ok((namespace.unwrap_or(DEFAULT_NAMESPACE), name)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn names_split_on_the_slash() {
        assert_eq!(namespaced("web", None).unwrap(), ("default", "web"));
        assert_eq!(namespaced("web", Some("prod")).unwrap(), ("prod", "web"));
        assert_eq!(namespaced("prod/web", None).unwrap(), ("prod", "web"));
        assert_eq!(
            namespaced("prod/web", Some("prod")).unwrap(),
            ("prod", "web")
        );
        assert!(namespaced("prod/web", Some("dev")).is_err());
        assert!(namespaced("/web", None).is_err());
        assert!(namespaced("a/b/c", None).is_err());
        assert!(namespaced("", None).is_err());
    }

    #[test]
    fn failures_read_like_kubectl() {
        let f = Failure::NotFound {
            plural: "httproutes".into(),
            name: "web".into(),
        };
        assert_eq!(
            f.to_string(),
            "Error from server (NotFound): httproutes \"web\" not found"
        );
        let f = Failure::Server {
            status: 409,
            message: "HTTPRoute default/web was modified".into(),
        };
        assert_eq!(
            f.to_string(),
            "Error from server (Conflict): HTTPRoute default/web was modified"
        );
        let f = Failure::Server {
            status: 400,
            message: "bad body".into(),
        };
        assert_eq!(f.to_string(), "error: bad body");
        let f = Failure::Unreachable {
            server: "http://127.0.0.1:1".into(),
            reason: "Connection refused (os error 111)".into(),
        };
        assert_eq!(
            f.to_string(),
            "cannot reach the control plane at http://127.0.0.1:1: Connection refused (os error 111)"
        );
    }
}
