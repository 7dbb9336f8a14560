//! Node revocation: `biplane node revoke ID` stores the node id under
//! `/biplane/revoked/<id>`, and from then on the node's ADS streams are closed, new ones
//! are refused, and it can neither renew its certificate nor enroll again under that id.
//!
//! The revoked set is read from the store at start and kept in memory (the xDS
//! authorizer consults it synchronously on every new stream). With one control plane per
//! store that is exact; several replicas on one etcd would also need to watch the prefix.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::docs::rfc3339;
use crate::store::{Precondition, Store, StoreError};

/// The store prefix of revoked node ids.
pub const REVOKED_PREFIX: &str = "/biplane/revoked/";

/// What is stored for a revoked node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Revocation {
    /// The node id.
    pub node_id: String,
    /// When (RFC 3339).
    pub revoked_at: String,
    /// Who (the API token's name).
    pub revoked_by: String,
}

/// The revoked node ids, shared by the admin API, the certificate service and the xDS
/// authorizer. Cheap to clone.
#[derive(Clone)]
pub struct Revocations {
    store: Arc<dyn Store>,
    set: Arc<RwLock<BTreeMap<String, Revocation>>>,
}

impl std::fmt::Debug for Revocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revocations").finish_non_exhaustive()
    }
}

impl Revocations {
    /// Loads the revoked set from the store.
    pub async fn load(store: Arc<dyn Store>) -> Result<Self, StoreError> {
        let mut set = BTreeMap::new();
        for kv in store.range(REVOKED_PREFIX).await?.kvs {
            let r: Revocation = serde_json::from_slice(&kv.value)
                .map_err(|e| StoreError::Corrupt(format!("revocation {}: {e}", kv.key)))?;
            set.insert(r.node_id.clone(), r);
        }
        Ok(Revocations {
            store,
            set: Arc::new(RwLock::new(set)),
        })
    }

    /// Whether `node_id` is revoked.
    pub fn is_revoked(&self, node_id: &str) -> bool {
        self.set
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains_key(node_id)
    }

    /// Every revocation, by node id.
    pub fn list(&self) -> Vec<Revocation> {
        self.set
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    /// Revokes `node_id` durably; returns the record and whether it is new (revoking
    /// twice keeps the first record).
    pub async fn revoke(&self, node_id: &str, by: &str) -> Result<(Revocation, bool), StoreError> {
        if let Some(r) = self
            .set
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(node_id)
        {
            return Ok((r.clone(), false));
        }
        let record = Revocation {
            node_id: node_id.to_owned(),
            revoked_at: rfc3339(std::time::SystemTime::now()),
            revoked_by: by.to_owned(),
        };
        let value = serde_json::to_vec(&record)
            .map_err(|e| StoreError::Corrupt(format!("cannot encode a revocation: {e}")))?;
        let key = format!("{REVOKED_PREFIX}{node_id}");
        match self
            .store
            .put(&key, Bytes::from(value), Precondition::ModRevision(0))
            .await
        {
            Ok(_) => {}
            // Revoked concurrently (or by another replica): read what is there.
            Err(StoreError::Conflict { .. }) => {
                let kv = self.store.get(&key).await?.kv;
                if let Some(kv) = kv {
                    let existing: Revocation = serde_json::from_slice(&kv.value)
                        .map_err(|e| StoreError::Corrupt(format!("revocation {key}: {e}")))?;
                    self.insert(existing.clone());
                    return Ok((existing, false));
                }
            }
            Err(e) => return Err(e),
        }
        self.insert(record.clone());
        Ok((record, true))
    }

    fn insert(&self, r: Revocation) {
        self.set
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(r.node_id.clone(), r);
    }
}
