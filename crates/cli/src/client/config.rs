//! Where the client commands find the control plane and their credentials.
//!
//! Each of the server URL, the bearer token and the CA file comes from, in order: the
//! flag (`--server`, `--token`, `--ca-file`), its environment variable (`BIPLANE_SERVER`,
//! `BIPLANE_TOKEN`, `BIPLANE_CA_FILE`), then the client config file. The file is
//! `--client-config` / `BIPLANE_CONFIG` if given (it must exist), else the first of
//! `$XDG_CONFIG_HOME/biplane/config.yaml` (or `~/.config/biplane/config.yaml`) and
//! `./biplane-data/client.yaml` that exists. `biplane control` and `biplane up` write the
//! latter into their data directory at every start, so in the quick start the CLI works
//! from the same directory with no flags.
//!
//! ```yaml
//! server: https://127.0.0.1:7070
//! caFile: biplane-data/ca/ca.crt   # relative paths are relative to this file
//! tokenFile: biplane-data/admin-token   # or `token: bpt_...`
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Failure;

use biplane_control::server::CLIENT_CONFIG_FILE;

/// The server when nothing says otherwise.
pub const DEFAULT_SERVER: &str = "https://127.0.0.1:7070";

/// The client config file's contents.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClientConfig {
    /// The admin API URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// A bearer token (prefer `tokenFile`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// A file holding the bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// The CA certificate (PEM) that issued the admin API's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

/// What a command connects with, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub server: String,
    pub token: Option<String>,
    pub ca_file: Option<PathBuf>,
}

/// The default config file locations, in order.
fn default_paths() -> Vec<PathBuf> {
    let mut paths = Vec::new();
    if let Some(xdg) = std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        paths.push(PathBuf::from(xdg).join("biplane/config.yaml"));
    } else if let Some(home) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        paths.push(PathBuf::from(home).join(".config/biplane/config.yaml"));
    }
    paths.push(Path::new(biplane_control::store::DEFAULT_DATA_DIR).join(CLIENT_CONFIG_FILE));
    paths
}

/// Reads a config file; relative paths in it become relative to its directory.
pub fn load(path: &Path) -> Result<ClientConfig, Failure> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Failure::Usage(format!(
            "cannot read the client config {}: {e}",
            path.display()
        ))
    })?;
    let mut config: ClientConfig = serde_saphyr::from_str(&text)
        .map_err(|e| Failure::Usage(format!("invalid client config {}: {e}", path.display())))?;
    let base = path.parent().unwrap_or(Path::new("."));
    for p in [&mut config.token_file, &mut config.ca_file]
        .into_iter()
        .flatten()
    {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    }
    Ok(config)
}

/// Resolves the connection from the flags/environment (`server`, `token`, `ca_file`)
/// and the config file (`explicit` or the defaults).
pub fn resolve(
    server: Option<&str>,
    token: Option<&str>,
    ca_file: Option<&Path>,
    explicit: Option<&Path>,
) -> Result<Resolved, Failure> {
    let config = match explicit {
        Some(p) => load(p)?,
        None => match default_paths().into_iter().find(|p| p.is_file()) {
            Some(p) => load(&p)?,
            None => ClientConfig::default(),
        },
    };
    // A server given on the command line with no other credentials does not pick up
    // the file's token: the token belongs to the file's server.
    let same_server = server.is_none() || server == config.server.as_deref();
    let token = match token {
        Some(t) => Some(t.trim().to_owned()),
        None if same_server => match (&config.token, &config.token_file) {
            (Some(t), _) => Some(t.trim().to_owned()),
            (None, Some(f)) => Some(
                std::fs::read_to_string(f)
                    .map_err(|e| {
                        Failure::Usage(format!("cannot read the token file {}: {e}", f.display()))
                    })?
                    .trim()
                    .to_owned(),
            ),
            (None, None) => None,
        },
        None => None,
    };
    let ca_file = match ca_file {
        Some(p) => Some(p.to_path_buf()),
        None if same_server => config.ca_file.clone(),
        None => None,
    };
    Ok(Resolved {
        server: server
            .map(str::to_owned)
            .or(config.server)
            .unwrap_or_else(|| DEFAULT_SERVER.to_owned()),
        token: token.filter(|t| !t.is_empty()),
        ca_file,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn flags_beat_the_file_and_paths_are_relative_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.yaml");
        std::fs::write(dir.path().join("tok"), "bpt_fromfile\n").unwrap();
        std::fs::write(
            &file,
            "server: https://cp:7070\ncaFile: ca.crt\ntokenFile: tok\n",
        )
        .unwrap();
        let r = resolve(None, None, None, Some(&file)).unwrap();
        assert_eq!(r.server, "https://cp:7070");
        assert_eq!(r.token.as_deref(), Some("bpt_fromfile"));
        assert_eq!(r.ca_file, Some(dir.path().join("ca.crt")));

        let r = resolve(None, Some("bpt_flag"), None, Some(&file)).unwrap();
        assert_eq!(r.token.as_deref(), Some("bpt_flag"));
        // Another server: the file's credentials are not sent to it.
        let r = resolve(Some("http://other:1"), None, None, Some(&file)).unwrap();
        assert_eq!(r.server, "http://other:1");
        assert_eq!(r.token, None);
        assert_eq!(r.ca_file, None);
    }

    #[test]
    fn bad_files_are_usage_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.yaml");
        assert!(resolve(None, None, None, Some(&file)).is_err());
        std::fs::write(&file, "sever: x\n").unwrap();
        let e = resolve(None, None, None, Some(&file)).unwrap_err();
        assert!(e.to_string().contains("sever"), "{e}");
    }
}
