//! `biplane get KIND [NAME...] [-n NS | -A] [-o table|yaml|json|name]`: reads resources
//! (with their computed status) and prints a kubectl-like table, YAML or JSON.

use std::process::ExitCode;

use biplane_api::ResourceKind;
use serde_json::{Value, json};

use super::output::{self, Table, age, now_unix, str_at};
use super::{DEFAULT_NAMESPACE, Failure, ServerArgs, finish, kinds, namespaced};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Yaml,
    Json,
    Name,
}

#[derive(Debug, clap::Args)]
pub struct GetArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// gateways, httproutes, grpcroutes, tcproutes, tlsroutes, secrets, backends (singular,
    /// plural or `kind.group`).
    pub kind: String,
    /// Names (`NAME` or `NAMESPACE/NAME`); none lists the namespace.
    pub names: Vec<String>,
    /// The namespace (default: `default`).
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// List across every namespace.
    #[arg(short = 'A', long, conflicts_with = "namespace")]
    pub all_namespaces: bool,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Format,
    /// Show Secret private keys instead of `<redacted>` (yaml/json output).
    #[arg(long)]
    pub show_secrets: bool,
}

pub async fn run(args: GetArgs) -> ExitCode {
    finish(1, get(args)).await
}

async fn get(args: GetArgs) -> Result<ExitCode, Failure> {
    let kind =
        kinds::parse(&args.kind).ok_or_else(|| Failure::Usage(kinds::unknown(&args.kind)))?;
    let api = args.server.api()?;
    let query: &[(&str, &str)] = if args.show_secrets {
        &[("showSecrets", "true")]
    } else {
        &[]
    };
    let mut items = Vec::new();
    let mut failed = false;
    let listing = args.names.is_empty();
    if listing {
        let ns = args
            .namespace
            .clone()
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
        let mut q: Vec<(&str, &str)> = query.to_vec();
        if !args.all_namespaces {
            q.push(("namespace", &ns));
        }
        let body = api.get(api.url(&[kinds::plural(kind)], &q)).await?.ok()?;
        items = body
            .get("items")
            .and_then(Value::as_array)
            .cloned()
            .ok_or_else(|| Failure::Other("the server's list has no `items`".into()))?;
        if items.is_empty() && args.output == Format::Table {
            if args.all_namespaces {
                eprintln!("No resources found");
            } else {
                eprintln!("No resources found in {ns} namespace.");
            }
            return Ok(ExitCode::SUCCESS);
        }
    } else {
        for name in &args.names {
            let (ns, n) = namespaced(name, args.namespace.as_deref())?;
            let reply = api
                .get(api.url(&[kinds::plural(kind), ns, n], query))
                .await?;
            match reply.status.as_u16() {
                200..=299 => items.push(reply.body),
                404 => {
                    failed = true;
                    Failure::NotFound {
                        plural: kinds::plural(kind).to_owned(),
                        name: n.to_owned(),
                    }
                    .report();
                }
                _ => return Err(reply.failure()),
            }
        }
    }
    let text = match args.output {
        Format::Table => {
            if items.is_empty() {
                String::new()
            } else {
                table(kind, &items, args.all_namespaces, now_unix()).render()
            }
        }
        Format::Name => items
            .iter()
            .map(|i| {
                format!(
                    "{}/{}\n",
                    kinds::qualified(kind),
                    str_at(i, "/metadata/name").unwrap_or("")
                )
            })
            .collect(),
        Format::Yaml if items.len() == 1 && !listing => output::to_yaml(&items[0])?,
        Format::Yaml => output::to_yaml_stream(&items)?,
        Format::Json if items.len() == 1 && !listing => output::to_json(&items[0]),
        Format::Json => output::to_json(&json!({
            "apiVersion": "v1",
            "kind": "List",
            "items": items,
        })),
    };
    print!("{text}");
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// The table for `items` of one kind: `NAMESPACE` (with `-A`), `NAME`, the kind's own
/// columns, `AGE`.
pub fn table(kind: ResourceKind, items: &[Value], with_namespace: bool, now: i64) -> Table {
    let mut headers: Vec<&str> = Vec::new();
    if with_namespace {
        headers.push("NAMESPACE");
    }
    headers.push("NAME");
    headers.extend_from_slice(columns(kind));
    headers.push("AGE");
    let mut t = Table::new(&headers);
    for item in items {
        let mut row = Vec::new();
        if with_namespace {
            row.push(
                str_at(item, "/metadata/namespace")
                    .unwrap_or(DEFAULT_NAMESPACE)
                    .to_owned(),
            );
        }
        row.push(str_at(item, "/metadata/name").unwrap_or("").to_owned());
        row.extend(cells(kind, item));
        row.push(age(str_at(item, "/metadata/creationTimestamp"), now));
        t.row(row);
    }
    t
}

fn columns(kind: ResourceKind) -> &'static [&'static str] {
    match kind {
        ResourceKind::Gateway => &["CLASS", "LISTENERS", "ACCEPTED", "PROGRAMMED"],
        ResourceKind::HttpRoute | ResourceKind::GrpcRoute | ResourceKind::TlsRoute => {
            &["HOSTNAMES", "ACCEPTED", "RESOLVED", "PROGRAMMED"]
        }
        ResourceKind::TcpRoute => &["ACCEPTED", "RESOLVED", "PROGRAMMED"],
        ResourceKind::Backend => &["ENDPOINTS", "LB"],
        ResourceKind::Secret => &["TYPE", "DATA"],
    }
}

fn cells(kind: ResourceKind, item: &Value) -> Vec<String> {
    let cond = |t: &str| condition(item, t);
    match kind {
        ResourceKind::Gateway => vec![
            str_at(item, "/spec/gatewayClassName")
                .unwrap_or("<none>")
                .to_owned(),
            listeners(item),
            cond("Accepted"),
            cond("Programmed"),
        ],
        ResourceKind::HttpRoute | ResourceKind::GrpcRoute | ResourceKind::TlsRoute => vec![
            hostnames(item),
            cond("Accepted"),
            cond("ResolvedRefs"),
            cond("Programmed"),
        ],
        ResourceKind::TcpRoute => vec![cond("Accepted"), cond("ResolvedRefs"), cond("Programmed")],
        ResourceKind::Backend => vec![
            endpoints(item),
            str_at(item, "/spec/loadBalancer/type")
                .unwrap_or("RoundRobin")
                .to_owned(),
        ],
        ResourceKind::Secret => {
            let keys = |field: &str| {
                item.get(field)
                    .and_then(Value::as_object)
                    .map(|m| m.keys().cloned().collect::<Vec<_>>())
                    .unwrap_or_default()
            };
            let mut all = keys("data");
            all.extend(keys("stringData"));
            all.sort();
            all.dedup();
            vec![
                str_at(item, "/type").unwrap_or("Opaque").to_owned(),
                all.len().to_string(),
            ]
        }
    }
}

/// A condition's status (`True`/`False`/`Unknown`), `-` when the server reported none.
/// Reads `status.conditions`, else folds the per-parent conditions of a route
/// (`status.parents[].conditions`): `True` only when every parent says so.
pub fn condition(item: &Value, kind: &str) -> String {
    let find = |conds: &Value| -> Option<String> {
        conds.as_array()?.iter().find_map(|c| {
            (str_at(c, "/type") == Some(kind))
                .then(|| str_at(c, "/status").unwrap_or("Unknown").to_owned())
        })
    };
    if let Some(s) = item.pointer("/status/conditions").and_then(find) {
        return s;
    }
    let per_parent: Vec<String> = item
        .pointer("/status/parents")
        .and_then(Value::as_array)
        .map(|ps| {
            ps.iter()
                .filter_map(|p| p.get("conditions").and_then(find))
                .collect()
        })
        .unwrap_or_default();
    if per_parent.is_empty() {
        "-".to_owned()
    } else if per_parent.iter().all(|s| s == "True") {
        "True".to_owned()
    } else if per_parent.iter().any(|s| s == "False") {
        "False".to_owned()
    } else {
        "Unknown".to_owned()
    }
}

fn hostnames(item: &Value) -> String {
    let names: Vec<&str> = item
        .pointer("/spec/hostnames")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if names.is_empty() {
        "*".to_owned()
    } else {
        names.join(",")
    }
}

/// `80/HTTP,443/HTTPS`.
fn listeners(item: &Value) -> String {
    let ls: Vec<String> = item
        .pointer("/spec/listeners")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|l| {
                    let port = l
                        .get("port")
                        .map(|p| match p {
                            Value::String(s) => s.clone(),
                            other => other.to_string(),
                        })
                        .unwrap_or_else(|| "?".into());
                    format!("{port}/{}", str_at(l, "/protocol").unwrap_or("?"))
                })
                .collect()
        })
        .unwrap_or_default();
    if ls.is_empty() {
        "<none>".to_owned()
    } else {
        ls.join(",")
    }
}

/// kubectl's endpoints column: the first three `address:port`, then `+ N more...`.
fn endpoints(item: &Value) -> String {
    let eps: Vec<String> = item
        .pointer("/spec/endpoints")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|e| {
                    let addr = str_at(e, "/address").unwrap_or("?");
                    let port = e
                        .get("port")
                        .map(Value::to_string)
                        .unwrap_or_else(|| "?".into());
                    if addr.contains(':') {
                        format!("[{addr}]:{port}")
                    } else {
                        format!("{addr}:{port}")
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    match eps.len() {
        0 => "<none>".to_owned(),
        n if n <= 3 => eps.join(","),
        n => format!("{} + {} more...", eps[..3].join(","), n - 3),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(name: &str, ns: &str) -> Value {
        json!({"name": name, "namespace": ns, "creationTimestamp": "1970-01-01T00:00:00Z"})
    }

    #[test]
    fn route_table() {
        let items = [
            json!({"kind": "HTTPRoute", "metadata": meta("web", "default"),
                "spec": {"hostnames": ["a.example", "b.example"]},
                "status": {"conditions": [
                    {"type": "Accepted", "status": "True"},
                    {"type": "ResolvedRefs", "status": "False", "reason": "BackendNotFound"},
                    {"type": "Programmed", "status": "Unknown"}]}}),
            json!({"kind": "HTTPRoute", "metadata": meta("api", "prod"), "spec": {}}),
        ];
        assert_eq!(
            table(ResourceKind::HttpRoute, &items, true, 150).render(),
            "NAMESPACE   NAME   HOSTNAMES             ACCEPTED   RESOLVED   PROGRAMMED   AGE\n\
             default     web    a.example,b.example   True       False      Unknown      2m30s\n\
             prod        api    *                     -          -          -            2m30s\n"
        );
    }

    #[test]
    fn gateway_backend_secret_tables() {
        let gw = json!({"metadata": meta("gw", "default"), "spec": {"gatewayClassName": "biplane",
            "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}, {"name": "tls", "port": 443, "protocol": "HTTPS"}]},
            "status": {"conditions": [{"type": "Accepted", "status": "True"}, {"type": "Programmed", "status": "False"}]}});
        assert_eq!(
            table(ResourceKind::Gateway, &[gw], false, 5).render(),
            "NAME   CLASS     LISTENERS           ACCEPTED   PROGRAMMED   AGE\n\
             gw     biplane   80/HTTP,443/HTTPS   True       False        5s\n"
        );
        let be = json!({"metadata": meta("api", "default"), "spec": {"endpoints": [
            {"address": "10.0.0.1", "port": 80}, {"address": "::1", "port": 81},
            {"address": "10.0.0.3", "port": 80}, {"address": "10.0.0.4", "port": 80}],
            "loadBalancer": {"type": "Maglev"}}});
        let be2 = json!({"metadata": meta("one", "default"), "spec": {"endpoints": [{"address": "10.0.0.1", "port": 80}]}});
        assert_eq!(
            table(ResourceKind::Backend, &[be, be2], false, 5).render(),
            "NAME   ENDPOINTS                                      LB           AGE\n\
             api    10.0.0.1:80,[::1]:81,10.0.0.3:80 + 1 more...   Maglev       5s\n\
             one    10.0.0.1:80                                    RoundRobin   5s\n"
        );
        let secret = json!({"metadata": meta("tls", "default"), "type": "kubernetes.io/tls",
            "data": {"tls.crt": "x", "tls.key": "<redacted>"}});
        assert_eq!(
            table(ResourceKind::Secret, &[secret], false, 5).render(),
            "NAME   TYPE                DATA   AGE\n\
             tls    kubernetes.io/tls   2      5s\n"
        );
    }

    #[test]
    fn per_parent_conditions_fold() {
        let route = json!({"status": {"parents": [
            {"conditions": [{"type": "Accepted", "status": "True"}, {"type": "Programmed", "status": "True"}]},
            {"conditions": [{"type": "Accepted", "status": "False"}, {"type": "Programmed", "status": "Unknown"}]},
        ]}});
        assert_eq!(condition(&route, "Accepted"), "False");
        assert_eq!(condition(&route, "Programmed"), "Unknown");
        assert_eq!(condition(&route, "ResolvedRefs"), "-");
        let one = json!({"status": {"parents": [{"conditions": [{"type": "Accepted", "status": "True"}]}]}});
        assert_eq!(condition(&one, "Accepted"), "True");
    }
}
