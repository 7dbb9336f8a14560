//! `biplane apply -f FILE|DIR|- [--dry-run]`: sends every document in one atomic apply and
//! prints kubectl's `httproute.gateway.networking.k8s.io/web created` lines.

use std::process::ExitCode;

use reqwest::Method;
use serde_json::Value;

use super::input::{self, Payload};
use super::output::str_at;
use super::{Failure, ServerArgs, finish, kinds};

#[derive(Debug, clap::Args)]
pub struct ApplyArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// A file, a directory (its *.yaml, *.yml, *.json, sorted) or `-` for stdin; repeatable.
    /// All documents are applied together: all or nothing.
    #[arg(
        short = 'f',
        long = "filename",
        required = true,
        value_name = "FILE|DIR|-"
    )]
    pub files: Vec<String>,
    /// Validate and show what would happen without storing anything.
    #[arg(long)]
    pub dry_run: bool,
}

pub async fn run(args: ApplyArgs) -> ExitCode {
    finish(1, apply(args)).await
}

async fn apply(args: ApplyArgs) -> Result<ExitCode, Failure> {
    let api = args.server.api()?;
    let payload = read_payload(&args.files, "apply")?;
    let query: &[(&str, &str)] = if args.dry_run {
        &[("dryRun", "true")]
    } else {
        &[]
    };
    let url = api.url(&["apply"], query);
    let reply = api
        .send(
            Method::POST,
            url,
            Some((payload.content_type, payload.body.clone())),
        )
        .await?;
    if reply.status.as_u16() == 422 {
        print_invalid(&payload, &reply.body, "nothing was applied");
        return Ok(ExitCode::FAILURE);
    }
    let body = reply.ok()?;
    let suffix = if args.dry_run { " (dry run)" } else { "" };
    for line in result_lines(&body, "action")? {
        println!("{line}{suffix}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Reads the `-f` inputs; refuses an input set with no documents, as kubectl does.
pub fn read_payload(files: &[String], verb: &str) -> Result<Payload, Failure> {
    let sources = input::read(files)?;
    let payload = Payload::new(&sources);
    if payload.total() == 0 {
        return Err(Failure::Usage(format!("no objects passed to {verb}")));
    }
    Ok(payload)
}

/// `KIND.GROUP/NAME ACTION` for each of the server's `results`.
pub fn result_lines(body: &Value, action_field: &str) -> Result<Vec<String>, Failure> {
    let results = body
        .get("results")
        .and_then(Value::as_array)
        .ok_or_else(|| Failure::Other("the server's answer has no `results` list".into()))?;
    Ok(results
        .iter()
        .map(|r| {
            let kind = str_at(r, "/kind").unwrap_or("unknown");
            let name = str_at(r, "/name").unwrap_or("");
            let action = str_at(r, &format!("/{action_field}")).unwrap_or("unknown");
            format!("{}/{name} {action}", kinds::qualified_str(kind))
        })
        .collect())
}

/// Prints a 422 answer: every error on its own line, mapped back to its input, then a
/// summary line. Everything goes to stderr.
pub fn print_invalid(payload: &Payload, body: &Value, outcome: &str) {
    for line in invalid_lines(payload, body) {
        eprintln!("{line}");
    }
    let message = str_at(body, "/message").unwrap_or("invalid resources");
    eprintln!("error: {message}; {outcome}");
}

/// `error: FILE: document K (Kind ns/name): path: message` for each error of a 422 body.
pub fn invalid_lines(payload: &Payload, body: &Value) -> Vec<String> {
    let errors = body
        .get("errors")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    errors
        .iter()
        .map(|e| {
            let mut line = String::from("error: ");
            let document = e
                .get("document")
                .and_then(Value::as_u64)
                .map(|d| d as usize);
            if let Some(d) = document {
                line.push_str(&payload.describe(d));
            }
            let kind = str_at(e, "/kind");
            let name = str_at(e, "/name");
            let ns = str_at(e, "/namespace");
            let what = match (kind, ns, name) {
                (Some(k), Some(ns), Some(n)) => Some(format!("{k} {ns}/{n}")),
                (Some(k), None, Some(n)) => Some(format!("{k} {n}")),
                (Some(k), _, None) => Some(k.to_owned()),
                (None, Some(ns), Some(n)) => Some(format!("{ns}/{n}")),
                (None, None, Some(n)) => Some(n.to_owned()),
                (None, _, None) => None,
            };
            if let Some(w) = what {
                if document.is_some() {
                    line.push(' ');
                }
                line.push_str(&format!("({w})"));
            }
            if document.is_some() || line.len() > "error: ".len() {
                line.push_str(": ");
            }
            if let Some(p) = str_at(e, "/path").filter(|p| !p.is_empty()) {
                line.push_str(p);
                line.push_str(": ");
            }
            let message = str_at(e, "/message").unwrap_or("invalid");
            match document {
                Some(d) => line.push_str(&payload.localize(d, message)),
                None => line.push_str(message),
            }
            line
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use crate::client::input::Source;
    use serde_json::json;

    #[test]
    fn results_print_like_kubectl() {
        let body = json!({"revision": 7, "results": [
            {"kind": "HTTPRoute", "namespace": "default", "name": "web", "action": "created", "resourceVersion": "7"},
            {"kind": "Secret", "namespace": "default", "name": "tls", "action": "unchanged", "resourceVersion": "3"},
            {"kind": "Backend", "namespace": "prod", "name": "api", "action": "configured", "resourceVersion": "7"},
            {"kind": "Gateway", "namespace": "default", "name": "gw", "action": "created", "resourceVersion": "7"},
        ]});
        assert_eq!(
            result_lines(&body, "action").unwrap(),
            [
                "httproute.gateway.networking.k8s.io/web created",
                "secret/tls unchanged",
                "backend.biplane.dev/api configured",
                "gateway.gateway.networking.k8s.io/gw created",
            ]
        );
        assert!(result_lines(&json!({"revision": 1}), "action").is_err());
    }

    #[test]
    fn errors_name_file_document_resource_and_path() {
        let payload = Payload::new(&[
            Source {
                label: "a.yaml".into(),
                text: "kind: A\n---\nkind: B\n".into(),
            },
            Source {
                label: "b.yaml".into(),
                text: "kind: C\n---\nkind: D\n".into(),
            },
        ]);
        let body = json!({"error": "invalid", "message": "3 errors", "errors": [
            {"document": 2, "kind": "HTTPRoute", "namespace": "default", "name": "web", "path": "spec.rules[0].matches[0].path.value", "message": "must start with /"},
            {"document": 4, "kind": null, "namespace": null, "name": null, "path": "", "message": "invalid YAML: x"},
            {"document": 3, "kind": "Backend", "namespace": null, "name": "api", "path": "spec.endpoints", "message": "required"},
            {"message": "something global"},
        ]});
        assert_eq!(
            invalid_lines(&payload, &body),
            [
                "error: a.yaml: document 2 (HTTPRoute default/web): spec.rules[0].matches[0].path.value: must start with /",
                "error: b.yaml: document 2: invalid YAML: x",
                "error: b.yaml: document 1 (Backend api): spec.endpoints: required",
                "error: something global",
            ]
        );
    }
}
