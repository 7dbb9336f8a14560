//! Bearer tokens: node bootstrap tokens (enrollment of a proxy for one Gateway, limited
//! uses and lifetime) and admin API tokens (a role: admin, editor or viewer).
//!
//! A token is `bpt_` + 32 random bytes in unpadded base64url. Only its SHA-256 is stored,
//! under `/biplane/tokens/<hex>`; the value itself is shown once, to whoever minted it,
//! and is never logged. Consuming a bootstrap use is a compare-and-swap on the key's mod
//! revision, so two enrollments racing for the last use cannot both win.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::ca::{CaError, write_secret_file};
use crate::docs::rfc3339;
use crate::store::{Precondition, Store, StoreError};

/// The store prefix of token records.
pub const TOKENS_PREFIX: &str = "/biplane/tokens/";
/// The prefix of every token.
pub const TOKEN_PREFIX: &str = "bpt_";
/// The file (in the data directory) the initial admin token is written to.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";
/// The name of the initial admin token.
pub const INITIAL_ADMIN_NAME: &str = "initial-admin";
/// How many times a bootstrap use is retried after a concurrent consumer.
const ATTEMPTS: usize = 8;

/// An admin API role. Ordered: `Viewer < Editor < Admin`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads: get, list, watch, status, metrics.
    Viewer,
    /// Reads and writes resources: apply, put, delete, diff.
    Editor,
    /// Everything, tokens and secrets included.
    Admin,
}

impl Role {
    /// The role's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Editor => "editor",
            Role::Admin => "admin",
        }
    }

    /// Parses `admin`, `editor` or `viewer`.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "editor" => Some(Role::Editor),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stored token record (what `/biplane/tokens/<sha256>` holds). Times are Unix seconds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum TokenRecord {
    /// Enrolls proxies of one Gateway.
    Bootstrap {
        /// The Gateway, `namespace/name`.
        gateway: String,
        /// When it stops working.
        expires_at: u64,
        /// How many enrollments it still allows.
        uses_left: u32,
        /// When it was minted.
        created_at: u64,
    },
    /// Authenticates admin API calls.
    Api {
        /// The role.
        role: Role,
        /// A label for logs and listings.
        name: String,
        /// When it stops working, if ever.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_at: Option<u64>,
        /// When it was minted.
        created_at: u64,
    },
}

/// Why a token was refused or could not be minted.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Not a token this control plane minted (or malformed).
    #[error("unknown token")]
    Unknown,
    /// Past its expiry.
    #[error("the token expired at {0}")]
    Expired(String),
    /// A bootstrap token with no use left.
    #[error("the bootstrap token has no uses left")]
    UsedUp,
    /// A token of the other kind (an API token used to enroll, or the reverse).
    #[error("this is a {found} token, not a{} {wanted} token", if *.wanted == "api" { "n" } else { "" })]
    WrongKind {
        /// The kind expected.
        wanted: &'static str,
        /// The kind presented.
        found: &'static str,
    },
    /// Minting arguments are invalid.
    #[error("{0}")]
    Invalid(String),
    /// The store failed.
    #[error("store error: {0}")]
    Store(#[from] StoreError),
    /// The random generator failed.
    #[error("the system random generator failed")]
    Random,
    /// The admin token file could not be written.
    #[error("{0}")]
    File(#[from] CaError),
}

/// Who an API token belongs to (no secret in it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The role.
    pub role: Role,
    /// The token's name.
    pub name: String,
}

/// What a consumed bootstrap token grants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootstrapGrant {
    /// The Gateway, `namespace/name`.
    pub gateway: String,
    /// Uses left after this one.
    pub uses_left: u32,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn secs_to_time(s: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(s)
}

/// The hex SHA-256 of a token (its store key suffix).
pub fn token_hash(token: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn key_for(token: &str) -> String {
    format!("{TOKENS_PREFIX}{}", token_hash(token))
}

/// Whether `s` looks like a token (prefix and length), checked before any store lookup.
fn well_formed(s: &str) -> bool {
    s.len() == TOKEN_PREFIX.len() + 43
        && s.starts_with(TOKEN_PREFIX)
        && s[TOKEN_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `namespace/name`, or `name` in the `default` namespace.
pub fn normalize_gateway(gateway: &str) -> Result<String, TokenError> {
    let (ns, name) = gateway
        .split_once('/')
        .unwrap_or((biplane_api::DEFAULT_NAMESPACE, gateway));
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    };
    if !ok(ns) || !ok(name) {
        return Err(TokenError::Invalid(format!(
            "gateway {gateway:?} must be NAME or NAMESPACE/NAME (lowercase DNS labels)"
        )));
    }
    Ok(format!("{ns}/{name}"))
}

/// Token minting, lookup and consumption over the store.
#[derive(Clone)]
pub struct Tokens {
    store: Arc<dyn Store>,
    rng: SystemRandom,
    /// Serialises bootstrap uses in this process, so a burst of nodes enrolling with one
    /// token does not spin on compare-and-swap conflicts (other replicas still race, and
    /// lose a CAS now and then: those retry with backoff).
    consume: Arc<tokio::sync::Mutex<()>>,
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokens").finish_non_exhaustive()
    }
}

impl Tokens {
    /// Tokens kept in `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Tokens {
            store,
            rng: SystemRandom::new(),
            consume: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    fn generate(&self) -> Result<String, TokenError> {
        let mut bytes = [0u8; 32];
        self.rng.fill(&mut bytes).map_err(|_| TokenError::Random)?;
        Ok(format!(
            "{TOKEN_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        ))
    }

    /// Stores `record` under a fresh token and returns the token.
    pub async fn mint(&self, record: &TokenRecord) -> Result<String, TokenError> {
        let token = self.generate()?;
        let value = serde_json::to_vec(record)
            .map_err(|e| TokenError::Invalid(format!("cannot encode the token record: {e}")))?;
        self.store
            .put(
                &key_for(&token),
                Bytes::from(value),
                Precondition::ModRevision(0),
            )
            .await?;
        Ok(token)
    }

    /// Mints a bootstrap token for `gateway` (`ns/name` or `name`).
    pub async fn mint_bootstrap(
        &self,
        gateway: &str,
        ttl: Duration,
        uses: u32,
    ) -> Result<String, TokenError> {
        if uses == 0 {
            return Err(TokenError::Invalid("uses must be at least 1".to_owned()));
        }
        if ttl.is_zero() {
            return Err(TokenError::Invalid("ttl must be positive".to_owned()));
        }
        let now = now_secs();
        self.mint(&TokenRecord::Bootstrap {
            gateway: normalize_gateway(gateway)?,
            expires_at: now.saturating_add(ttl.as_secs().max(1)),
            uses_left: uses,
            created_at: now,
        })
        .await
    }

    /// Mints an admin API token.
    pub async fn mint_api(
        &self,
        role: Role,
        name: &str,
        ttl: Option<Duration>,
    ) -> Result<String, TokenError> {
        if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
            return Err(TokenError::Invalid(
                "name must be 1 to 128 printable characters".to_owned(),
            ));
        }
        let now = now_secs();
        self.mint(&TokenRecord::Api {
            role,
            name: name.to_owned(),
            expires_at: ttl.map(|t| now.saturating_add(t.as_secs().max(1))),
            created_at: now,
        })
        .await
    }

    async fn lookup(&self, token: &str) -> Result<(TokenRecord, u64, String), TokenError> {
        if !well_formed(token) {
            return Err(TokenError::Unknown);
        }
        let key = key_for(token);
        let kv = self.store.get(&key).await?.kv.ok_or(TokenError::Unknown)?;
        let record: TokenRecord = serde_json::from_slice(&kv.value)
            .map_err(|e| StoreError::Corrupt(format!("token record {key}: {e}")))?;
        Ok((record, kv.mod_revision, key))
    }

    /// The principal of a valid, unexpired API token.
    pub async fn authenticate(&self, token: &str) -> Result<Principal, TokenError> {
        match self.lookup(token).await?.0 {
            TokenRecord::Api {
                role,
                name,
                expires_at,
                ..
            } => {
                if let Some(exp) = expires_at
                    && exp <= now_secs()
                {
                    return Err(TokenError::Expired(rfc3339(secs_to_time(exp))));
                }
                Ok(Principal { role, name })
            }
            TokenRecord::Bootstrap { .. } => Err(TokenError::WrongKind {
                wanted: "api",
                found: "bootstrap",
            }),
        }
    }

    /// Uses one enrollment of a bootstrap token, atomically.
    pub async fn consume_bootstrap(&self, token: &str) -> Result<BootstrapGrant, TokenError> {
        let _serial = self.consume.lock().await;
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                // Lost a race with another replica: back off a little, with jitter.
                let mut b = [0u8; 1];
                let _ = self.rng.fill(&mut b);
                let ms = (5u64 << attempt.min(5)) + u64::from(b[0] % 16);
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            let (record, mod_revision, key) = self.lookup(token).await?;
            let TokenRecord::Bootstrap {
                gateway,
                expires_at,
                uses_left,
                created_at,
            } = record
            else {
                return Err(TokenError::WrongKind {
                    wanted: "bootstrap",
                    found: "api",
                });
            };
            if expires_at <= now_secs() {
                return Err(TokenError::Expired(rfc3339(secs_to_time(expires_at))));
            }
            if uses_left == 0 {
                return Err(TokenError::UsedUp);
            }
            let updated = TokenRecord::Bootstrap {
                gateway: gateway.clone(),
                expires_at,
                uses_left: uses_left - 1,
                created_at,
            };
            let value = serde_json::to_vec(&updated)
                .map_err(|e| TokenError::Invalid(format!("cannot encode the token record: {e}")))?;
            match self
                .store
                .put(
                    &key,
                    Bytes::from(value),
                    Precondition::ModRevision(mod_revision),
                )
                .await
            {
                Ok(_) => {
                    return Ok(BootstrapGrant {
                        gateway,
                        uses_left: uses_left - 1,
                    });
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(TokenError::Store(StoreError::InvalidRequest(
            "too many concurrent uses of this bootstrap token; retry".to_owned(),
        )))
    }

    /// Every token's metadata (never the token), as JSON objects: `id` (the first 12 hex
    /// digits of its hash), `kind`, and the record's fields with times in RFC 3339.
    pub async fn list(&self) -> Result<Vec<Value>, TokenError> {
        let listed = self.store.range(TOKENS_PREFIX).await?;
        let now = now_secs();
        let mut out = Vec::with_capacity(listed.kvs.len());
        for kv in &listed.kvs {
            let id = kv.key.strip_prefix(TOKENS_PREFIX).unwrap_or(&kv.key);
            let id = id.get(..12).unwrap_or(id);
            let Ok(record) = serde_json::from_slice::<TokenRecord>(&kv.value) else {
                continue;
            };
            let t = |s: u64| rfc3339(secs_to_time(s));
            out.push(match record {
                TokenRecord::Bootstrap {
                    gateway,
                    expires_at,
                    uses_left,
                    created_at,
                } => json!({
                    "id": id, "kind": "bootstrap", "gateway": gateway,
                    "expiresAt": t(expires_at), "usesLeft": uses_left,
                    "createdAt": t(created_at),
                    "valid": expires_at > now && uses_left > 0,
                }),
                TokenRecord::Api {
                    role,
                    name,
                    expires_at,
                    created_at,
                } => json!({
                    "id": id, "kind": "api", "role": role, "name": name,
                    "expiresAt": expires_at.map(t), "createdAt": t(created_at),
                    "valid": expires_at.is_none_or(|e| e > now),
                }),
            });
        }
        Ok(out)
    }

    /// On first start (no `<data_dir>/admin-token` and no initial admin token stored),
    /// mints an admin token and writes it to that file with mode 0600. Returns the file
    /// when a token was written.
    pub async fn ensure_initial_admin(
        &self,
        data_dir: &Path,
    ) -> Result<Option<PathBuf>, TokenError> {
        let path = data_dir.join(ADMIN_TOKEN_FILE);
        if path.exists() {
            return Ok(None);
        }
        let listed = self.store.range(TOKENS_PREFIX).await?;
        let exists = listed.kvs.iter().any(|kv| {
            matches!(
                serde_json::from_slice::<TokenRecord>(&kv.value),
                Ok(TokenRecord::Api { name, .. }) if name == INITIAL_ADMIN_NAME
            )
        });
        if exists {
            tracing::warn!(
                file = %path.display(),
                "the initial admin token file is gone but its token still exists; not minting another (mint one with an admin token)"
            );
            return Ok(None);
        }
        let token = self.mint_api(Role::Admin, INITIAL_ADMIN_NAME, None).await?;
        write_secret_file(&path, format!("{token}\n").as_bytes())?;
        Ok(Some(path))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

    use super::*;

    #[test]
    fn hash_is_sha256_hex() {
        assert_eq!(
            token_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn gateway_names() {
        assert_eq!(normalize_gateway("web").unwrap(), "default/web");
        assert_eq!(normalize_gateway("prod/web").unwrap(), "prod/web");
        assert!(normalize_gateway("a/b/c").is_err());
        assert!(normalize_gateway("").is_err());
        assert!(normalize_gateway("Web").is_err());
    }

    #[test]
    fn record_json_shape() {
        let r = TokenRecord::Api {
            role: Role::Viewer,
            name: "ci".to_owned(),
            expires_at: None,
            created_at: 1,
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v,
            json!({"kind": "api", "role": "viewer", "name": "ci", "created_at": 1})
        );
        assert!(Role::Admin > Role::Editor && Role::Editor > Role::Viewer);
    }
}
