//! Last-known-good persistence: the full set of xDS resources the proxy last applied,
//! written atomically (temp file, fsync, rename, fsync of the directory) with a SHA-256
//! checksum, and read back only when it is whole and intact.
//!
//! # File format (`lkg.bin`)
//! | bytes | content |
//! |---|---|
//! | 0..8 | magic `BPLNLKG1` (format version 1) |
//! | 8..16 | payload length, u64 big-endian |
//! | 16..48 | SHA-256 of the payload |
//! | 48.. | payload: a protobuf `LkgFile` (below) |
//!
//! The payload holds the Gateway and node it was saved for, the time, and per resource
//! type one `DeltaDiscoveryResponse` (type URL, the type's version, and every resource with
//! its name, version and `Any`), as if a server had sent the whole set in one response. A
//! file that is short, long, has another magic or a checksum mismatch is refused whole.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use biplane_config::Config;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;

use super::state::ResourceState;
use crate::server::PUSH_ORDER;
use crate::{ResourceKind, XdsErrors, XdsResources, from_xds};

/// The file name inside `--state-dir`.
pub const LKG_FILE: &str = "lkg.bin";

const MAGIC: &[u8; 8] = b"BPLNLKG1";
const HEADER_LEN: usize = 8 + 8 + 32;
/// Refuse absurd lengths before allocating (1 GiB).
const MAX_PAYLOAD: u64 = 1 << 30;

#[derive(Clone, PartialEq, Message)]
struct LkgFile {
    #[prost(string, tag = "1")]
    gateway: String,
    #[prost(string, tag = "2")]
    node_id: String,
    #[prost(uint64, tag = "3")]
    saved_unix_ms: u64,
    #[prost(message, repeated, tag = "4")]
    types: Vec<DeltaDiscoveryResponse>,
}

/// One resource in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct LkgResource {
    pub name: String,
    pub version: String,
    pub any: Any,
}

/// The resources of one type and the type's version.
#[derive(Debug, Clone, PartialEq)]
pub struct LkgType {
    pub kind: ResourceKind,
    pub version: String,
    pub resources: Vec<LkgResource>,
}

/// A last-known-good resource set.
#[derive(Debug, Clone, PartialEq)]
pub struct LastKnownGood {
    /// `node.cluster` it was received for.
    pub gateway: String,
    pub node_id: String,
    pub saved_at: SystemTime,
    /// In push order (CDS, EDS, SDS, LDS, RDS).
    pub types: Vec<LkgType>,
}

/// Why a last-known-good file cannot be written or used.
#[derive(Debug, thiserror::Error)]
pub enum LkgError {
    #[error("{}: {op}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a biplane last-known-good file (bad magic)", path.display())]
    BadMagic { path: PathBuf },
    #[error("{}: truncated: {actual} bytes, the header announces {expected}", path.display())]
    Truncated {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("{}: {actual} bytes, {} more than the header announces ({expected})", path.display(), actual - expected)]
    TrailingData {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("{}: checksum mismatch (the file is corrupt)", path.display())]
    Checksum { path: PathBuf },
    #[error("{}: cannot decode: {source}", path.display())]
    Decode {
        path: PathBuf,
        #[source]
        source: prost::DecodeError,
    },
    #[error("{}: resource {name:?}: {message}", path.display())]
    Resource {
        path: PathBuf,
        name: String,
        message: String,
    },
    #[error("{}: saved for Gateway {found:?}, this node serves {wanted:?}", path.display())]
    WrongGateway {
        path: PathBuf,
        found: String,
        wanted: String,
    },
    #[error("last-known-good resources do not translate: {0}")]
    Invalid(XdsErrors),
}

impl LastKnownGood {
    pub(crate) fn from_state(
        state: &ResourceState,
        gateway: &str,
        node_id: &str,
        saved_at: SystemTime,
    ) -> Self {
        LastKnownGood {
            gateway: gateway.to_owned(),
            node_id: node_id.to_owned(),
            saved_at,
            types: PUSH_ORDER
                .iter()
                .zip(&state.types)
                .map(|(kind, t)| LkgType {
                    kind: *kind,
                    version: t.version.clone(),
                    resources: t
                        .resources
                        .iter()
                        .map(|(name, h)| LkgResource {
                            name: name.clone(),
                            version: h.version.clone(),
                            any: h.any.clone(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    /// The client's state for this set (every type counts as received).
    pub(crate) fn to_state(&self) -> Result<ResourceState, String> {
        let mut state = ResourceState::default();
        for t in &self.types {
            let Some(i) = PUSH_ORDER.iter().position(|k| *k == t.kind) else {
                continue;
            };
            let ts = &mut state.types[i];
            ts.version = t.version.clone();
            ts.received = true;
            for r in &t.resources {
                let name = state.insert(i, r.version.clone(), &r.any)?;
                if name != r.name {
                    return Err(format!("stored as {:?} but named {name:?}", r.name));
                }
            }
        }
        Ok(state)
    }

    /// The resources, decoded.
    pub fn resources(&self) -> Result<XdsResources, XdsErrors> {
        XdsResources::from_any(
            self.types
                .iter()
                .flat_map(|t| t.resources.iter().map(|r| r.any.clone())),
        )
    }

    /// Decodes and translates the set (the config's version says it is last-known-good).
    pub fn config(&self) -> Result<Config, LkgError> {
        let res = self.resources().map_err(LkgError::Invalid)?;
        from_xds(&res, &self.version_label()).map_err(LkgError::Invalid)
    }

    /// `lkg <type versions>`.
    pub fn version_label(&self) -> String {
        let mut s = "lkg".to_owned();
        for t in &self.types {
            s.push_str(&format!(" {}={}", short(t.kind), t.version));
        }
        s
    }

    fn encode(&self) -> Vec<u8> {
        let file = LkgFile {
            gateway: self.gateway.clone(),
            node_id: self.node_id.clone(),
            saved_unix_ms: self
                .saved_at
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            types: self
                .types
                .iter()
                .map(|t| DeltaDiscoveryResponse {
                    system_version_info: t.version.clone(),
                    type_url: t.kind.type_url(),
                    resources: t
                        .resources
                        .iter()
                        .map(|r| Resource {
                            name: r.name.clone(),
                            version: r.version.clone(),
                            resource: Some(r.any.clone()),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                })
                .collect(),
        };
        file.encode_to_vec()
    }
}

fn short(kind: ResourceKind) -> &'static str {
    match kind {
        ResourceKind::Cluster => "cds",
        ResourceKind::ClusterLoadAssignment => "eds",
        ResourceKind::Secret => "sds",
        ResourceKind::Listener => "lds",
        ResourceKind::RouteConfiguration => "rds",
        ResourceKind::Unknown => "?",
    }
}

/// The file's bytes: header (magic, length, SHA-256) and payload.
pub fn encode(lkg: &LastKnownGood) -> Vec<u8> {
    let payload = lkg.encode();
    let digest = ring::digest::digest(&ring::digest::SHA256, &payload);
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(payload.len() as u64).to_be_bytes());
    out.extend_from_slice(digest.as_ref());
    out.extend_from_slice(&payload);
    out
}

/// Checks and decodes a file's bytes (`path` only names it in errors).
pub fn decode(path: &Path, bytes: &[u8]) -> Result<LastKnownGood, LkgError> {
    let path = || path.to_path_buf();
    let actual = bytes.len() as u64;
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(LkgError::BadMagic { path: path() });
    }
    if bytes.len() < HEADER_LEN {
        return Err(LkgError::Truncated {
            path: path(),
            expected: HEADER_LEN as u64,
            actual,
        });
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[8..16]);
    let len = u64::from_be_bytes(len);
    let expected = (HEADER_LEN as u64).saturating_add(len.min(MAX_PAYLOAD + 1));
    if len > MAX_PAYLOAD || actual < expected {
        return Err(LkgError::Truncated {
            path: path(),
            expected,
            actual,
        });
    }
    if actual > expected {
        return Err(LkgError::TrailingData {
            path: path(),
            expected,
            actual,
        });
    }
    let payload = &bytes[HEADER_LEN..];
    let digest = ring::digest::digest(&ring::digest::SHA256, payload);
    if digest.as_ref() != &bytes[16..48] {
        return Err(LkgError::Checksum { path: path() });
    }
    let file = LkgFile::decode(payload).map_err(|source| LkgError::Decode {
        path: path(),
        source,
    })?;
    let mut types = Vec::new();
    for t in file.types {
        let kind = ResourceKind::from_type_url(&t.type_url).ok_or_else(|| LkgError::Resource {
            path: path(),
            name: String::new(),
            message: format!("unknown type_url {:?}", t.type_url),
        })?;
        let mut resources = Vec::with_capacity(t.resources.len());
        for r in t.resources {
            let any = r.resource.ok_or_else(|| LkgError::Resource {
                path: path(),
                name: r.name.clone(),
                message: "no resource body".to_owned(),
            })?;
            resources.push(LkgResource {
                name: r.name,
                version: r.version,
                any,
            });
        }
        types.push(LkgType {
            kind,
            version: t.system_version_info,
            resources,
        });
    }
    Ok(LastKnownGood {
        gateway: file.gateway,
        node_id: file.node_id,
        saved_at: UNIX_EPOCH + Duration::from_millis(file.saved_unix_ms),
        types,
    })
}

/// Writes `lkg` to `path` atomically, mode 0600 ([`crate::atomic_file`]). The directory
/// is created if needed. Blocking: call it from `spawn_blocking` in async code.
pub fn write(path: &Path, lkg: &LastKnownGood) -> Result<(), LkgError> {
    let io = |op: &'static str, p: &Path| {
        let p = p.to_path_buf();
        move |source| LkgError::Io {
            path: p,
            op,
            source,
        }
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(io("creating the directory", &dir))?;
    // Mode 0600: the set carries the Gateway's TLS private keys (SDS secrets).
    crate::atomic_file::write(path, &encode(lkg), 0o600).map_err(|e| LkgError::Io {
        path: e.path,
        op: e.what,
        source: e.source,
    })
}

/// Reads and checks `path`. Blocking.
pub fn read(path: &Path) -> Result<LastKnownGood, LkgError> {
    let bytes = std::fs::read(path).map_err(|source| LkgError::Io {
        path: path.to_path_buf(),
        op: "reading",
        source,
    })?;
    decode(path, &bytes)
}

/// Reads `path` and checks it belongs to `gateway`; the resources are validated too (by
/// decoding them into the client's state), so a file that passes is fully usable.
pub fn read_for(path: &Path, gateway: &str) -> Result<LastKnownGood, LkgError> {
    let lkg = read(path)?;
    if lkg.gateway != gateway {
        return Err(LkgError::WrongGateway {
            path: path.to_path_buf(),
            found: lkg.gateway,
            wanted: gateway.to_owned(),
        });
    }
    lkg.to_state().map_err(|message| LkgError::Resource {
        path: path.to_path_buf(),
        name: String::new(),
        message,
    })?;
    Ok(lkg)
}
