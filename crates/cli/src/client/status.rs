//! `biplane status [-o table|json|yaml]`: the data-plane fleet as the control plane sees it,
//! one row per connected node with its per-type ACK state, then every node's last NACK in
//! full.

use std::process::ExitCode;

use serde_json::Value;

use super::output::{self, Table, age, now_unix, short, str_at};
use super::{Failure, ServerArgs, finish};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Output format (`json` is the server's answer as is).
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Format,
}

/// The xDS types in push order, with their column names.
const TYPES: [(&str, &str); 5] = [
    ("Cluster", "CDS"),
    ("ClusterLoadAssignment", "EDS"),
    ("Listener", "LDS"),
    ("RouteConfiguration", "RDS"),
    ("Secret", "SDS"),
];

/// How many characters of a version a table shows.
const VERSION_CHARS: usize = 8;

pub async fn run(args: StatusArgs) -> ExitCode {
    finish(1, status(args)).await
}

async fn status(args: StatusArgs) -> Result<ExitCode, Failure> {
    let api = args.server.api()?;
    let body = api.get(api.url(&["status"], &[])).await?.ok()?;
    let text = match args.output {
        Format::Json => output::to_json(&body),
        Format::Yaml => output::to_yaml(&body)?,
        Format::Table => render(&body, now_unix())?,
    };
    print!("{text}");
    Ok(ExitCode::SUCCESS)
}

/// The node table, then (when any node has one) the `LAST NACKS` section.
pub fn render(body: &Value, now: i64) -> Result<String, Failure> {
    let nodes = body
        .get("nodes")
        .and_then(Value::as_array)
        .ok_or_else(|| Failure::Other("the server's status has no `nodes` list".into()))?;
    let mut nodes: Vec<&Value> = nodes.iter().collect();
    nodes.sort_by_key(|n| (str_at(n, "/gateway"), str_at(n, "/nodeId")));
    let mut headers = vec!["NODE", "GATEWAY", "PROTOCOL", "CONNECTED"];
    headers.extend(TYPES.iter().map(|(_, col)| *col));
    headers.push("LAG");
    let mut table = Table::new(&headers);
    let mut nacks = Vec::new();
    for node in &nodes {
        let id = str_at(node, "/nodeId").unwrap_or("?");
        let mut row = vec![
            id.to_owned(),
            str_at(node, "/gateway").unwrap_or("-").to_owned(),
            str_at(node, "/protocol").unwrap_or("-").to_owned(),
            age(str_at(node, "/connectedSince"), now),
        ];
        let types: Vec<&Value> = node
            .get("types")
            .and_then(Value::as_array)
            .map(|t| t.iter().collect())
            .unwrap_or_default();
        let mut lag: Option<u64> = None;
        for (type_name, col) in TYPES {
            let entry = types.iter().find(|t| {
                str_at(t, "/type")
                    .is_some_and(|s| s == type_name || s.ends_with(&format!(".{type_name}")))
            });
            row.push(entry.map_or_else(|| "-".to_owned(), |e| cell(e)));
            if let Some(e) = entry {
                if let Some(ms) = e.get("lagMs").and_then(Value::as_u64) {
                    lag = Some(lag.map_or(ms, |l| l.max(ms)));
                }
                if let Some(n) = e.get("lastNack").filter(|n| n.is_object()) {
                    nacks.push(nack_entry(id, col, n, now));
                }
            }
        }
        row.push(lag.map_or_else(|| "-".to_owned(), |ms| format!("{ms}ms")));
        table.row(row);
    }
    let mut out = table.render();
    if !nacks.is_empty() {
        out.push_str("\nLAST NACKS\n");
        for n in nacks {
            out.push_str(&n);
        }
    }
    Ok(out)
}

/// `ok 1a2b3c4d` (the sent version is ACKed), `NACK 1a2b3c4d` (the sent version was
/// refused), `pending 1a2b3c4d` (sent, no answer yet), `pending` (subscribed, nothing sent
/// yet), `-` (not subscribed).
fn cell(entry: &Value) -> String {
    let nonempty = |p: &str| str_at(entry, p).filter(|s| !s.is_empty());
    let sent = nonempty("/sentVersion");
    let acked = nonempty("/ackedVersion");
    let nack = entry.get("lastNack").filter(|n| n.is_object());
    match (sent, acked) {
        // The node never asked for this type (say, no Secrets over SotW).
        (None, None) if entry.get("subscribed") == Some(&Value::Bool(false)) => "-".to_owned(),
        (None, None) => "pending".to_owned(),
        (None, Some(a)) => format!("ok {}", short(a, VERSION_CHARS)),
        (Some(s), Some(a)) if s == a => format!("ok {}", short(a, VERSION_CHARS)),
        (Some(s), _) => {
            let refused =
                nack.is_some_and(|n| str_at(n, "/version") == Some(s) || nack_after_ack(n, entry));
            let state = if refused { "NACK" } else { "pending" };
            format!("{state} {}", short(s, VERSION_CHARS))
        }
    }
}

/// Whether the NACK came after the last ACK (then the outstanding version is the refused one).
fn nack_after_ack(nack: &Value, entry: &Value) -> bool {
    let at = str_at(nack, "/at").and_then(output::parse_rfc3339);
    let acked = str_at(entry, "/ackedAt").and_then(output::parse_rfc3339);
    match (at, acked) {
        (Some(n), Some(a)) => n >= a,
        (Some(_), None) => true,
        _ => false,
    }
}

fn nack_entry(node: &str, col: &str, nack: &Value, now: i64) -> String {
    let version = str_at(nack, "/version").unwrap_or("?");
    let at = str_at(nack, "/at");
    let when = match at {
        Some(t) => format!(" at {t} ({} ago)", age(Some(t), now)),
        None => String::new(),
    };
    let mut s = format!("{node} {col} version {version}{when}:\n");
    let message = str_at(nack, "/message").unwrap_or("(no message)");
    for line in message.lines() {
        s.push_str("  ");
        s.push_str(line);
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use serde_json::json;

    #[test]
    fn no_nodes_is_a_header() {
        let out = render(&json!({"revision": 3, "nodes": []}), 0).unwrap();
        assert_eq!(
            out,
            "NODE   GATEWAY   PROTOCOL   CONNECTED   CDS   EDS   LDS   RDS   SDS   LAG\n"
        );
        assert!(render(&json!({}), 0).is_err());
    }

    #[test]
    fn nodes_show_ack_state_and_nacks() {
        let body = json!({"revision": 9, "nodes": [
            {"nodeId": "node-b", "gateway": "gw", "protocol": "delta", "connectedSince": "1970-01-01T00:00:00Z",
             "types": [
                {"type": "Cluster", "sentVersion": "0123456789", "ackedVersion": "0123456789", "ackedAt": "1970-01-01T00:00:01Z", "lagMs": 12, "lastNack": null},
                {"type": "Listener", "sentVersion": "abcdef0123", "ackedVersion": "0123456789", "ackedAt": "1970-01-01T00:00:01Z", "lagMs": 30,
                 "lastNack": {"version": "abcdef0123", "message": "listener \"http\": bad\nsecond line", "at": "1970-01-01T00:00:02Z"}},
                {"type": "RouteConfiguration", "sentVersion": "fff", "ackedVersion": null, "lagMs": null, "lastNack": null},
                {"type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment", "sentVersion": null, "ackedVersion": null, "lastNack": null},
                {"type": "Secret", "subscribed": false, "sentVersion": null, "ackedVersion": null, "lastNack": null},
             ]},
            {"nodeId": "node-a", "gateway": "gw", "protocol": "sotw", "connectedSince": "1970-01-01T00:00:00Z", "types": []},
        ]});
        let out = render(&body, 150).unwrap();
        assert_eq!(
            out,
            "NODE     GATEWAY   PROTOCOL   CONNECTED   CDS           EDS       LDS             RDS           SDS   LAG\n\
             node-a   gw        sotw       2m30s       -             -         -               -             -     -\n\
             node-b   gw        delta      2m30s       ok 01234567   pending   NACK abcdef01   pending fff   -     30ms\n\
             \n\
             LAST NACKS\n\
             node-b LDS version abcdef0123 at 1970-01-01T00:00:02Z (2m28s ago):\n  \
             listener \"http\": bad\n  \
             second line\n"
        );
    }

    #[test]
    fn a_nack_after_the_last_ack_marks_the_type() {
        let e = json!({"sentVersion": "v3", "ackedVersion": "v1", "ackedAt": "1970-01-01T00:00:01Z",
            "lastNack": {"version": "v1", "message": "x", "at": "1970-01-01T00:00:02Z"}});
        assert_eq!(cell(&e), "NACK v3");
        let e = json!({"sentVersion": "v3", "ackedVersion": "v2", "ackedAt": "1970-01-01T00:00:05Z",
            "lastNack": {"version": "v1", "message": "x", "at": "1970-01-01T00:00:02Z"}});
        assert_eq!(cell(&e), "pending v3");
    }
}
