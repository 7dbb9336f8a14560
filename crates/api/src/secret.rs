//! `v1` `Secret` of type `kubernetes.io/tls`: a PEM certificate chain and private key.
//! The key is never printed: [`PrivateKeyPem`]'s `Debug` redacts it.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::meta::ObjectMeta;

/// The only Secret type Biplane accepts.
pub const TLS_SECRET_TYPE: &str = "kubernetes.io/tls";

/// A TLS Secret, decoded: PEM text of the chain and of the key.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsSecret {
    /// Metadata.
    pub metadata: ObjectMeta,
    /// `tls.crt`: one or more `CERTIFICATE` PEM blocks, leaf first.
    pub cert_chain_pem: String,
    /// `tls.key`: one `PRIVATE KEY` PEM block (PKCS#8, RSA or EC).
    pub private_key_pem: PrivateKeyPem,
}

/// Alias kept for readers who look for the Kubernetes kind name.
pub type Secret = TlsSecret;

impl fmt::Debug for TlsSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSecret")
            .field("metadata", &self.metadata)
            .field(
                "cert_chain_pem",
                &format_args!("<{} bytes of PEM>", self.cert_chain_pem.len()),
            )
            .field("private_key_pem", &self.private_key_pem)
            .finish()
    }
}

/// PEM text of a private key. `Debug` and `Display` print `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKeyPem(String);

impl PrivateKeyPem {
    /// Wraps PEM text.
    pub fn new(pem: impl Into<String>) -> Self {
        Self(pem.into())
    }
    /// The PEM text. Call only to hand the key to a TLS library.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for PrivateKeyPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for PrivateKeyPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The Secret document as written (before decoding).
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct SecretDoc {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(rename = "type")]
    pub secret_type: Option<String>,
    pub data: BTreeMap<String, String>,
    pub string_data: BTreeMap<String, String>,
    pub immutable: Option<bool>,
}

/// Key names inside a TLS Secret.
pub(crate) const CRT_KEY: &str = "tls.crt";
pub(crate) const KEY_KEY: &str = "tls.key";

/// Checks the PEM text has at least one block whose label ends with `label`.
pub(crate) fn has_pem_block(text: &str, label: &str) -> bool {
    text.lines().any(|l| {
        let l = l.trim();
        l.strip_prefix("-----BEGIN ")
            .and_then(|rest| rest.strip_suffix("-----"))
            .is_some_and(|got| got == label || got.ends_with(&format!(" {label}")))
    })
}

impl TlsSecret {
    /// Renders the Secret back as a `kubernetes.io/tls` document (`data` base64-encoded).
    pub fn to_document(&self) -> serde_json::Value {
        let b64 = base64::engine::general_purpose::STANDARD;
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": crate::resource::prune(serde_json::to_value(&self.metadata).unwrap_or_default()),
            "type": TLS_SECRET_TYPE,
            "data": {
                CRT_KEY: b64.encode(&self.cert_chain_pem),
                KEY_KEY: b64.encode(self.private_key_pem.expose()),
            }
        })
    }
}
