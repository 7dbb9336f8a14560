//! `biplane diff -f FILE|DIR|-`: prints the server's unified diffs between what is stored and
//! what applying the files would store. Exit codes follow `kubectl diff`: 0 no differences,
//! 1 differences, 2 (>1) on any error.

use std::io::IsTerminal as _;
use std::process::ExitCode;

use reqwest::Method;
use serde_json::Value;

use super::apply::{print_invalid, read_payload};
use super::output::str_at;
use super::{Failure, ServerArgs, finish, kinds};

/// `kubectl diff`'s exit code for "something went wrong".
const ERROR_EXIT: u8 = 2;

#[derive(Debug, clap::Args)]
pub struct DiffArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// A file, a directory (its *.yaml, *.yml, *.json) or `-` for stdin; repeatable.
    #[arg(
        short = 'f',
        long = "filename",
        required = true,
        value_name = "FILE|DIR|-"
    )]
    pub files: Vec<String>,
}

pub async fn run(args: DiffArgs) -> ExitCode {
    finish(ERROR_EXIT, diff(args)).await
}

async fn diff(args: DiffArgs) -> Result<ExitCode, Failure> {
    let api = args.server.api()?;
    let payload = read_payload(&args.files, "diff")?;
    let reply = api
        .send(
            Method::POST,
            api.url(&["diff"], &[]),
            Some((payload.content_type, payload.body.clone())),
        )
        .await?;
    if reply.status.as_u16() == 422 {
        print_invalid(&payload, &reply.body, "nothing to compare");
        return Ok(ExitCode::from(ERROR_EXIT));
    }
    let body = reply.ok()?;
    let (text, changed) = render(&body)?;
    let color = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    print!("{}", if color { colorize(&text) } else { text });
    Ok(if changed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// The diffs of every resource that would change, each under `---`/`+++` headers naming it,
/// and whether anything would change.
pub fn render(body: &Value) -> Result<(String, bool), Failure> {
    let diffs = body
        .get("diffs")
        .and_then(Value::as_array)
        .ok_or_else(|| Failure::Other("the server's answer has no `diffs` list".into()))?;
    let mut out = String::new();
    let mut changed = false;
    for d in diffs {
        let action = str_at(d, "/action").unwrap_or("update");
        let text = str_at(d, "/diff").unwrap_or("");
        if action == "unchanged" && text.is_empty() {
            continue;
        }
        changed = true;
        if !text.starts_with("--- ") {
            let kind = kinds::qualified_str(str_at(d, "/kind").unwrap_or("unknown"));
            let ns = str_at(d, "/namespace").unwrap_or("default");
            let name = str_at(d, "/name").unwrap_or("");
            let live = if action == "create" {
                "/dev/null".to_owned()
            } else {
                format!("live/{kind}/{ns}/{name}")
            };
            out.push_str(&format!("--- {live}\n+++ merged/{kind}/{ns}/{name}\n"));
        }
        out.push_str(text);
        if !text.is_empty() && !text.ends_with('\n') {
            out.push('\n');
        }
    }
    Ok((out, changed))
}

/// `git diff`'s colors: headers bold, hunks cyan, removals red, additions green.
fn colorize(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 4);
    for line in text.split_inclusive('\n') {
        let (body, nl) = match line.strip_suffix('\n') {
            Some(b) => (b, "\n"),
            None => (line, ""),
        };
        let code = if body.starts_with("--- ") || body.starts_with("+++ ") {
            "1"
        } else if body.starts_with("@@") {
            "36"
        } else if body.starts_with('-') {
            "31"
        } else if body.starts_with('+') {
            "32"
        } else {
            ""
        };
        if code.is_empty() {
            out.push_str(line);
        } else {
            out.push_str(&format!("\x1b[{code}m{body}\x1b[0m{nl}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use serde_json::json;

    #[test]
    fn only_changes_are_printed() {
        let body = json!({"diffs": [
            {"kind": "HTTPRoute", "namespace": "default", "name": "web", "action": "unchanged", "diff": ""},
            {"kind": "Backend", "namespace": "default", "name": "api", "action": "update",
             "diff": "--- a\n+++ b\n@@ -1 +1 @@\n-x\n+y"},
            {"kind": "Secret", "namespace": "prod", "name": "tls", "action": "create",
             "diff": "@@ -0,0 +1 @@\n+kind: Secret\n"},
        ]});
        let (text, changed) = render(&body).unwrap();
        assert!(changed);
        assert_eq!(
            text,
            "--- a\n+++ b\n@@ -1 +1 @@\n-x\n+y\n\
             --- /dev/null\n+++ merged/secret/prod/tls\n@@ -0,0 +1 @@\n+kind: Secret\n"
        );
        let same = json!({"diffs": [{"kind": "Gateway", "name": "gw", "action": "unchanged", "diff": ""}]});
        assert_eq!(render(&same).unwrap(), (String::new(), false));
        assert!(render(&json!({})).is_err());
    }

    #[test]
    fn colors_wrap_whole_lines() {
        assert_eq!(
            colorize("--- a\n@@ x\n-a\n+b\n c"),
            "\x1b[1m--- a\x1b[0m\n\x1b[36m@@ x\x1b[0m\n\x1b[31m-a\x1b[0m\n\x1b[32m+b\x1b[0m\n c"
        );
    }
}
