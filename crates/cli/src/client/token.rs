//! `biplane token create|list` and `biplane node revoke|revoked`: minting bootstrap tokens
//! (node enrollment) and admin API tokens, and cutting nodes off. All need an admin token.
//!
//! `token create` prints only the token on stdout (so `TOKEN=$(biplane token create ...)`
//! works) and what it is for on stderr. A bootstrap token is printed with the CA pin
//! appended (`bpt_....<pin>`): `biplane proxy --token` verifies the control plane with it
//! on first contact, so no CA file has to be copied to the node.

use std::process::ExitCode;

use reqwest::Method;
use serde_json::{Value, json};

use super::output::{self, Table, str_at};
use super::{Failure, ServerArgs, finish};

#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// Mint a token: `--gateway NAME` for a node bootstrap token, or `--role ROLE` for an
    /// admin API token. The token is printed once and cannot be shown again.
    Create(CreateArgs),
    /// List tokens (their metadata; never the tokens).
    List(ListArgs),
}

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Bootstrap token for nodes of this Gateway (`name` or `namespace/name`).
    #[arg(
        long,
        value_name = "NAME",
        conflicts_with = "role",
        required_unless_present = "role"
    )]
    pub gateway: Option<String>,
    /// Admin API token with this role.
    #[arg(long, value_enum)]
    pub role: Option<RoleArg>,
    /// The API token's name (shown in listings and logs; default: the role).
    #[arg(long, requires = "role")]
    pub name: Option<String>,
    /// Lifetime (e.g. `1h`, `30m`); bootstrap tokens default to 1h, API tokens never
    /// expire unless given.
    #[arg(long, value_name = "DURATION")]
    pub ttl: Option<String>,
    /// How many nodes may enroll with the bootstrap token.
    #[arg(long, default_value_t = 1, conflicts_with = "role")]
    pub uses: u32,
    /// Print the bootstrap token without the CA pin (the node then needs `--ca-file`).
    #[arg(long, conflicts_with = "role")]
    pub no_pin: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RoleArg {
    Admin,
    Editor,
    Viewer,
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: super::status::Format,
}

pub async fn run(cmd: TokenCommand) -> ExitCode {
    match cmd {
        TokenCommand::Create(args) => finish(1, create(args)).await,
        TokenCommand::List(args) => finish(1, list(args)).await,
    }
}

async fn create(args: CreateArgs) -> Result<ExitCode, Failure> {
    let body = match (&args.gateway, args.role) {
        (Some(gateway), _) => {
            json!({"kind": "bootstrap", "gateway": gateway, "ttl": args.ttl, "uses": args.uses})
        }
        (None, Some(role)) => {
            let role = match role {
                RoleArg::Admin => "admin",
                RoleArg::Editor => "editor",
                RoleArg::Viewer => "viewer",
            };
            json!({"kind": "api", "role": role, "name": args.name.as_deref().unwrap_or(role), "ttl": args.ttl})
        }
        (None, None) => return Err(Failure::Usage("--gateway or --role is required".into())),
    };
    let api = args.server.api()?;
    let reply = api
        .send(
            Method::POST,
            api.url(&["tokens"], &[]),
            Some(("application/json", body.to_string())),
        )
        .await?
        .ok()?;
    let token = match str_at(&reply, "/pinnedToken") {
        Some(pinned) if !args.no_pin => pinned,
        _ => str_at(&reply, "/token")
            .ok_or_else(|| Failure::Other("the server's answer has no token".into()))?,
    };
    println!("{token}");
    match str_at(&reply, "/kind") {
        Some("bootstrap") => eprintln!(
            "bootstrap token for Gateway {}: {} use(s) left, expires {}",
            str_at(&reply, "/gateway").unwrap_or("?"),
            reply.get("usesLeft").and_then(Value::as_u64).unwrap_or(0),
            str_at(&reply, "/expiresAt").unwrap_or("?"),
        ),
        _ => eprintln!(
            "{} token {:?}{}",
            str_at(&reply, "/role").unwrap_or("api"),
            str_at(&reply, "/name").unwrap_or(""),
            str_at(&reply, "/expiresAt").map_or_else(String::new, |e| format!(", expires {e}")),
        ),
    }
    Ok(ExitCode::SUCCESS)
}

async fn list(args: ListArgs) -> Result<ExitCode, Failure> {
    let api = args.server.api()?;
    let body = api.get(api.url(&["tokens"], &[])).await?.ok()?;
    print_list(
        &body,
        args.output,
        &[
            "ID",
            "KIND",
            "GATEWAY/ROLE",
            "NAME",
            "USES LEFT",
            "EXPIRES",
            "VALID",
        ],
        |t| {
            vec![
                str_at(t, "/id").unwrap_or("").chars().take(12).collect(),
                str_at(t, "/kind").unwrap_or("").to_owned(),
                str_at(t, "/gateway")
                    .or_else(|| str_at(t, "/role"))
                    .unwrap_or("")
                    .to_owned(),
                str_at(t, "/name").unwrap_or("").to_owned(),
                t.get("usesLeft")
                    .and_then(Value::as_u64)
                    .map_or_else(String::new, |u| u.to_string()),
                str_at(t, "/expiresAt").unwrap_or("never").to_owned(),
                t.get("valid")
                    .and_then(Value::as_bool)
                    .map_or_else(String::new, |v| v.to_string()),
            ]
        },
    )
}

/// Prints `body.items` as a table (or the whole body as JSON/YAML).
fn print_list(
    body: &Value,
    format: super::status::Format,
    headers: &[&str],
    row: impl Fn(&Value) -> Vec<String>,
) -> Result<ExitCode, Failure> {
    use super::status::Format;
    let text = match format {
        Format::Json => output::to_json(body),
        Format::Yaml => output::to_yaml(body)?,
        Format::Table => {
            let mut table = Table::new(headers);
            for item in body
                .get("items")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                table.row(row(item));
            }
            table.render()
        }
    };
    print!("{text}");
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, clap::Subcommand)]
pub enum NodeCommand {
    /// Revoke a node: its xDS streams are closed now, and it can no longer connect,
    /// renew its certificate or enroll again under this id.
    Revoke(RevokeArgs),
    /// List revoked node ids.
    Revoked(ListArgs),
}

#[derive(Debug, clap::Args)]
pub struct RevokeArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// The node id (`biplane status` lists them).
    pub id: String,
}

pub async fn run_node(cmd: NodeCommand) -> ExitCode {
    match cmd {
        NodeCommand::Revoke(args) => finish(1, revoke(args)).await,
        NodeCommand::Revoked(args) => finish(1, revoked(args)).await,
    }
}

async fn revoke(args: RevokeArgs) -> Result<ExitCode, Failure> {
    let api = args.server.api()?;
    let reply = api
        .send(
            Method::POST,
            api.url(&["nodes", &args.id, "revoke"], &[]),
            None,
        )
        .await?
        .ok()?;
    if reply.get("new").and_then(Value::as_bool) == Some(false) {
        println!(
            "node {:?} was already revoked at {}",
            args.id,
            str_at(&reply, "/revokedAt").unwrap_or("?")
        );
    } else {
        println!("node {:?} revoked", args.id);
    }
    Ok(ExitCode::SUCCESS)
}

async fn revoked(args: ListArgs) -> Result<ExitCode, Failure> {
    let api = args.server.api()?;
    let body = api.get(api.url(&["revocations"], &[])).await?.ok()?;
    print_list(&body, args.output, &["NODE", "REVOKED AT", "BY"], |r| {
        vec![
            str_at(r, "/nodeId").unwrap_or("").to_owned(),
            str_at(r, "/revokedAt").unwrap_or("").to_owned(),
            str_at(r, "/revokedBy").unwrap_or("").to_owned(),
        ]
    })
}
