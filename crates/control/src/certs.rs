//! Node certificates: enrollment with a bootstrap token and renewal with the current
//! certificate, independent of the transport (the `biplane.node.v1.NodeCertificates`
//! gRPC service on the xDS port, and `POST /api/v1/enroll` on the admin API).
//!
//! Every check runs before a bootstrap use is spent: a malformed node id or CSR, or a
//! revoked node id, costs the token nothing. The identity always comes from the token
//! (enroll) or from the verified client certificate (renew), never from the request.

use std::sync::Arc;
use std::time::SystemTime;

use crate::ca::{Ca, CaError, IssuedCert, NodeIdentity, identity_of};
use crate::nodes::Revocations;
use crate::store::StoreError;
use crate::tokens::{TokenError, Tokens};

/// Why a certificate was not issued.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// Missing, unknown, expired or spent bootstrap token (401 / UNAUTHENTICATED).
    #[error("{0}")]
    Unauthenticated(String),
    /// The node is revoked, or the certificate is not one of ours (403 /
    /// PERMISSION_DENIED).
    #[error("{0}")]
    Denied(String),
    /// A malformed node id or CSR (400 / INVALID_ARGUMENT).
    #[error("{0}")]
    Invalid(String),
    /// The store failed (500 / UNAVAILABLE).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A freshly issued node certificate.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate.
    pub cert: IssuedCert,
    /// The CA certificate (PEM) to trust the control plane with.
    pub ca_pem: String,
    /// `namespace/name` of the Gateway.
    pub gateway: String,
}

/// Issues node certificates.
#[derive(Clone)]
pub struct NodeCerts {
    /// The CA.
    pub ca: Arc<Ca>,
    /// Bootstrap tokens.
    pub tokens: Tokens,
    /// Revoked node ids.
    pub revocations: Revocations,
}

impl std::fmt::Debug for NodeCerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCerts").finish_non_exhaustive()
    }
}

impl NodeCerts {
    /// Spends one use of `token` and signs `csr_pem` for
    /// `spiffe://<td>/gateway/<token's gateway>/node/<node_id>`.
    pub async fn enroll(
        &self,
        token: &str,
        node_id: &str,
        csr_pem: &str,
    ) -> Result<Issued, CertError> {
        let td = self.ca.trust_domain();
        NodeIdentity::new(td, "default", "x", node_id)
            .map_err(|e| CertError::Invalid(e.to_string()))?;
        self.ca
            .check_csr(csr_pem)
            .map_err(|e| CertError::Invalid(e.to_string()))?;
        if self.revocations.is_revoked(node_id) {
            tracing::info!(node = %node_id, "enrollment refused: the node id is revoked");
            return Err(CertError::Denied(format!(
                "node id {node_id:?} is revoked; enroll under another id"
            )));
        }
        let grant = match self.tokens.consume_bootstrap(token).await {
            Ok(g) => g,
            Err(TokenError::Store(e)) => return Err(e.into()),
            Err(e) => {
                tracing::info!(node = %node_id, reason = %e, "enrollment refused");
                return Err(CertError::Unauthenticated(format!("bootstrap token: {e}")));
            }
        };
        let (namespace, gateway) = grant
            .gateway
            .split_once('/')
            .unwrap_or((biplane_api::DEFAULT_NAMESPACE, grant.gateway.as_str()));
        let identity = NodeIdentity::new(td, namespace, gateway, node_id)
            .map_err(|e| CertError::Invalid(e.to_string()))?;
        let cert = self.sign(csr_pem, &identity)?;
        tracing::info!(%identity, uses_left = grant.uses_left, not_after = %crate::docs::rfc3339(cert.not_after), "node enrolled");
        Ok(Issued {
            cert,
            ca_pem: self.ca.cert_pem().to_owned(),
            gateway: identity.gateway_ref(),
        })
    }

    /// Signs `csr_pem` for the identity of `peer_leaf_der`, the client certificate TLS
    /// verified against the CA (chain and validity).
    pub fn renew(&self, peer_leaf_der: Option<&[u8]>, csr_pem: &str) -> Result<Issued, CertError> {
        let leaf = peer_leaf_der.ok_or_else(|| {
            CertError::Unauthenticated(
                "renewal needs the node's current client certificate (mTLS)".to_owned(),
            )
        })?;
        let identity = identity_of(leaf).map_err(|e| CertError::Denied(e.to_string()))?;
        if identity.trust_domain != self.ca.trust_domain() {
            return Err(CertError::Denied(format!(
                "{identity} is not in trust domain {}",
                self.ca.trust_domain()
            )));
        }
        if self.revocations.is_revoked(&identity.node_id) {
            tracing::info!(%identity, "renewal refused: the node is revoked");
            return Err(CertError::Denied(format!(
                "node {:?} is revoked",
                identity.node_id
            )));
        }
        self.ca
            .check_csr(csr_pem)
            .map_err(|e| CertError::Invalid(e.to_string()))?;
        let cert = self.sign(csr_pem, &identity)?;
        tracing::info!(%identity, not_after = %crate::docs::rfc3339(cert.not_after), "node certificate renewed");
        Ok(Issued {
            cert,
            ca_pem: self.ca.cert_pem().to_owned(),
            gateway: identity.gateway_ref(),
        })
    }

    fn sign(&self, csr_pem: &str, identity: &NodeIdentity) -> Result<IssuedCert, CertError> {
        self.ca.sign_csr(csr_pem, identity).map_err(|e| {
            tracing::warn!(%identity, error = %e, "signing failed");
            match e {
                CaError::InvalidCsr(m) => CertError::Invalid(format!("invalid CSR: {m}")),
                other => CertError::Invalid(other.to_string()),
            }
        })
    }
}

/// Seconds since the Unix epoch of `t` (0 before it).
pub fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// `biplane.node.v1.NodeCertificates` on the xDS port.
#[tonic::async_trait]
impl biplane_xds::node_rpc::NodeCertificates for NodeCerts {
    async fn enroll(
        &self,
        request: tonic::Request<biplane_xds::node_rpc::EnrollRequest>,
    ) -> Result<tonic::Response<biplane_xds::node_rpc::CertificateResponse>, tonic::Status> {
        let token = biplane_xds::node_rpc::bearer_token(&request)
            .map(|t| crate::api::strip_pin(t).to_owned())
            .ok_or_else(|| {
                tonic::Status::unauthenticated(
                    "Enroll needs metadata \"authorization: Bearer <bootstrap token>\"",
                )
            })?;
        let req = request.into_inner();
        let issued = NodeCerts::enroll(self, &token, &req.node_id, &req.csr_pem)
            .await
            .map_err(to_status)?;
        Ok(tonic::Response::new(response(issued)))
    }

    async fn renew(
        &self,
        request: tonic::Request<biplane_xds::node_rpc::RenewRequest>,
    ) -> Result<tonic::Response<biplane_xds::node_rpc::CertificateResponse>, tonic::Status> {
        let peer = request.peer_certs();
        let leaf = peer.as_deref().and_then(|c| c.first()).map(|c| c.as_ref());
        let issued = NodeCerts::renew(self, leaf, &request.get_ref().csr_pem).map_err(to_status)?;
        Ok(tonic::Response::new(response(issued)))
    }
}

fn to_status(e: CertError) -> tonic::Status {
    match e {
        CertError::Unauthenticated(m) => tonic::Status::unauthenticated(m),
        CertError::Denied(m) => tonic::Status::permission_denied(m),
        CertError::Invalid(m) => tonic::Status::invalid_argument(m),
        CertError::Store(e) => {
            tracing::error!(error = %e, "node certificates: store failed");
            tonic::Status::unavailable(format!("store: {e}"))
        }
    }
}

fn response(issued: Issued) -> biplane_xds::node_rpc::CertificateResponse {
    biplane_xds::node_rpc::CertificateResponse {
        identity: issued.cert.identity.uri(),
        certificate_pem: issued.cert.cert_pem,
        ca_certificate_pem: issued.ca_pem,
        not_after_unix: unix_secs(issued.cert.not_after),
        gateway: issued.gateway,
        node_id: issued.cert.identity.node_id,
    }
}
