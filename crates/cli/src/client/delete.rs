//! `biplane delete KIND NAME... [-n NS]` and `biplane delete -f FILE|DIR|-`: deletes
//! resources and prints kubectl's `httproute.gateway.networking.k8s.io "web" deleted`.
//! A missing resource is an error (exit 1) unless `--ignore-not-found`, as in kubectl.

use std::process::ExitCode;

use reqwest::Method;
use serde_json::Value;

use super::apply::{print_invalid, read_payload};
use super::output::str_at;
use super::{Failure, ServerArgs, finish, kinds, namespaced};

#[derive(Debug, clap::Args)]
pub struct DeleteArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// The kind (as for `get`); not with -f.
    #[arg(conflicts_with = "files", required_unless_present = "files")]
    pub kind: Option<String>,
    /// Names (`NAME` or `NAMESPACE/NAME`).
    #[arg(requires = "kind")]
    pub names: Vec<String>,
    /// Delete the resources these documents name (a file, a directory or `-`); all at once.
    #[arg(short = 'f', long = "filename", value_name = "FILE|DIR|-")]
    pub files: Vec<String>,
    /// The namespace of NAMEs (default: `default`).
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// A resource that does not exist is not an error.
    #[arg(long)]
    pub ignore_not_found: bool,
}

pub async fn run(args: DeleteArgs) -> ExitCode {
    finish(1, delete(args)).await
}

async fn delete(args: DeleteArgs) -> Result<ExitCode, Failure> {
    if !args.files.is_empty() {
        return delete_files(&args).await;
    }
    let kind_arg = args.kind.as_deref().unwrap_or_default();
    let kind = kinds::parse(kind_arg).ok_or_else(|| Failure::Usage(kinds::unknown(kind_arg)))?;
    if args.names.is_empty() {
        return Err(Failure::Usage(
            "resource name(s) required: biplane delete KIND NAME, or -f FILE".into(),
        ));
    }
    let api = args.server.api()?;
    let mut failed = false;
    for name in &args.names {
        let (ns, n) = namespaced(name, args.namespace.as_deref())?;
        let url = api.url(&[kinds::plural(kind), ns, n], &[]);
        let reply = api.send(Method::DELETE, url, None).await?;
        match reply.status.as_u16() {
            200..=299 => println!("{} {n:?} deleted", kinds::qualified(kind)),
            404 if args.ignore_not_found => {}
            404 => {
                failed = true;
                Failure::NotFound {
                    plural: kinds::plural(kind).to_owned(),
                    name: n.to_owned(),
                }
                .report();
            }
            _ => {
                failed = true;
                reply.failure().report();
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

async fn delete_files(args: &DeleteArgs) -> Result<ExitCode, Failure> {
    let api = args.server.api()?;
    let payload = read_payload(&args.files, "delete")?;
    let reply = api
        .send(
            Method::POST,
            api.url(&["delete"], &[]),
            Some((payload.content_type, payload.body.clone())),
        )
        .await?;
    if reply.status.as_u16() == 422 {
        print_invalid(&payload, &reply.body, "nothing was deleted");
        return Ok(ExitCode::FAILURE);
    }
    let body = reply.ok()?;
    let (lines, missing) = delete_lines(&body, args.ignore_not_found)?;
    for line in lines {
        println!("{line}");
    }
    for line in &missing {
        eprintln!("{line}");
    }
    Ok(if missing.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The stdout lines (`kind.group "name" deleted`) and the NotFound error lines of a
/// `/api/v1/delete` answer; with `ignore_not_found` the latter are dropped.
pub fn delete_lines(
    body: &Value,
    ignore_not_found: bool,
) -> Result<(Vec<String>, Vec<String>), Failure> {
    let results = body
        .get("results")
        .and_then(Value::as_array)
        .ok_or_else(|| Failure::Other("the server's answer has no `results` list".into()))?;
    let mut deleted = Vec::new();
    let mut missing = Vec::new();
    for r in results {
        let kind = str_at(r, "/kind").unwrap_or("unknown");
        let name = str_at(r, "/name").unwrap_or("");
        match str_at(r, "/action") {
            Some("not_found") => {
                if !ignore_not_found {
                    missing.push(
                        Failure::NotFound {
                            plural: kinds::plural_str(kind),
                            name: name.to_owned(),
                        }
                        .to_string(),
                    );
                }
            }
            action => deleted.push(format!(
                "{} {name:?} {}",
                kinds::qualified_str(kind),
                action.unwrap_or("deleted")
            )),
        }
    }
    Ok((deleted, missing))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use serde_json::json;

    #[test]
    fn delete_results_print_like_kubectl() {
        let body = json!({"revision": 9, "results": [
            {"kind": "HTTPRoute", "namespace": "default", "name": "web", "action": "deleted"},
            {"kind": "Backend", "namespace": "default", "name": "api", "action": "not_found"},
            {"kind": "Secret", "namespace": "default", "name": "tls", "action": "deleted"},
        ]});
        let (ok, missing) = delete_lines(&body, false).unwrap();
        assert_eq!(
            ok,
            [
                "httproute.gateway.networking.k8s.io \"web\" deleted",
                "secret \"tls\" deleted"
            ]
        );
        assert_eq!(
            missing,
            ["Error from server (NotFound): backends \"api\" not found"]
        );
        let (_, missing) = delete_lines(&body, true).unwrap();
        assert!(missing.is_empty());
        assert!(delete_lines(&json!({}), false).is_err());
    }
}
