//! The `biplane.node.v1.NodeCertificates` gRPC service: a proxy enrolls with a bootstrap
//! token and a CSR, and renews its certificate over mTLS. Served by the control plane on
//! the xDS port, next to ADS (same tonic server, same TLS listener).
//!
//! ```proto
//! package biplane.node.v1;
//! service NodeCertificates {
//!   // No client certificate needed. Metadata `authorization: Bearer <bootstrap token>`.
//!   rpc Enroll(EnrollRequest) returns (CertificateResponse);
//!   // Needs the node's current client certificate (mTLS); the identity comes from it.
//!   rpc Renew(RenewRequest) returns (CertificateResponse);
//! }
//! message EnrollRequest { string node_id = 1; string csr_pem = 2; }
//! message RenewRequest { string csr_pem = 1; }
//! message CertificateResponse {
//!   string identity = 1;            // spiffe://<td>/gateway/<ns>/<name>/node/<id>
//!   string certificate_pem = 2;     // the leaf (PEM)
//!   string ca_certificate_pem = 3;  // the CA bundle (PEM)
//!   int64 not_after_unix = 4;
//!   string gateway = 5;             // "ns/name" the token was for
//!   string node_id = 6;
//! }
//! ```
//!
//! Hand-written equivalent of tonic-build's output (no protoc, no build script): the
//! messages derive `prost::Message`; [`NodeCertificatesServer`] routes the two paths to a
//! [`NodeCertificates`] implementation; [`NodeCertificatesClient`] calls them.
//!
//! Status codes a server should use (the proxy reports them as they are):
//! `UNAUTHENTICATED` for a missing, unknown, expired or used-up token or a missing client
//! certificate, `PERMISSION_DENIED` for a revoked node, `INVALID_ARGUMENT` for a bad CSR
//! or node id.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::uri::PathAndQuery;
use tonic::body::Body;
use tonic::codegen::{Body as HttpBody, Bytes, GrpcMethod, StdError};
use tonic::{Request, Response, Status};

/// The fully qualified service name.
pub const SERVICE_NAME: &str = "biplane.node.v1.NodeCertificates";
/// The HTTP/2 path of `Enroll`.
pub const ENROLL_PATH: &str = "/biplane.node.v1.NodeCertificates/Enroll";
/// The HTTP/2 path of `Renew`.
pub const RENEW_PATH: &str = "/biplane.node.v1.NodeCertificates/Renew";
/// The metadata key carrying the bootstrap token (`Bearer <token>`) on `Enroll`.
pub const AUTHORIZATION: &str = "authorization";

/// `Enroll`'s request: the node id asked for and a PKCS#10 CSR (PEM).
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct EnrollRequest {
    #[prost(string, tag = "1")]
    pub node_id: String,
    #[prost(string, tag = "2")]
    pub csr_pem: String,
}

/// `Renew`'s request: a PKCS#10 CSR (PEM) for a new key; the identity is the client
/// certificate's.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct RenewRequest {
    #[prost(string, tag = "1")]
    pub csr_pem: String,
}

/// A certificate issued to a node.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct CertificateResponse {
    /// The SPIFFE ID in the certificate's URI SAN.
    #[prost(string, tag = "1")]
    pub identity: String,
    /// The leaf certificate (PEM).
    #[prost(string, tag = "2")]
    pub certificate_pem: String,
    /// The CA bundle the node verifies the control plane with (PEM).
    #[prost(string, tag = "3")]
    pub ca_certificate_pem: String,
    /// The end of the leaf's validity (Unix seconds).
    #[prost(int64, tag = "4")]
    pub not_after_unix: i64,
    /// The Gateway (`namespace/name`) the node serves.
    #[prost(string, tag = "5")]
    pub gateway: String,
    /// The node id.
    #[prost(string, tag = "6")]
    pub node_id: String,
}

/// The bearer token of a request's `authorization` metadata, if well formed.
pub fn bearer_token<T>(request: &Request<T>) -> Option<&str> {
    let value = request.metadata().get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The server side of the service.
#[tonic::async_trait]
pub trait NodeCertificates: Send + Sync + 'static {
    /// Enrolls a node: checks the bearer token, signs the CSR for the token's Gateway.
    async fn enroll(
        &self,
        request: Request<EnrollRequest>,
    ) -> Result<Response<CertificateResponse>, Status>;

    /// Renews a node's certificate: the identity is the peer certificate's.
    async fn renew(
        &self,
        request: Request<RenewRequest>,
    ) -> Result<Response<CertificateResponse>, Status>;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, Infallible>> + Send + 'static>>;

/// A tower service serving a [`NodeCertificates`] implementation; give it to
/// `tonic::transport::Server::builder().add_service(..)`.
#[derive(Debug)]
pub struct NodeCertificatesServer<T> {
    inner: Arc<T>,
    max_decoding_message_size: Option<usize>,
    max_encoding_message_size: Option<usize>,
}

impl<T> Clone for NodeCertificatesServer<T> {
    fn clone(&self) -> Self {
        NodeCertificatesServer {
            inner: self.inner.clone(),
            max_decoding_message_size: self.max_decoding_message_size,
            max_encoding_message_size: self.max_encoding_message_size,
        }
    }
}

impl<T: NodeCertificates> NodeCertificatesServer<T> {
    /// Serves `inner`.
    pub fn new(inner: T) -> Self {
        Self::from_arc(Arc::new(inner))
    }

    /// Serves a shared `inner`.
    pub fn from_arc(inner: Arc<T>) -> Self {
        NodeCertificatesServer {
            inner,
            max_decoding_message_size: None,
            max_encoding_message_size: None,
        }
    }

    /// The largest request accepted (tonic's default: 4 MiB).
    #[must_use]
    pub fn max_decoding_message_size(mut self, limit: usize) -> Self {
        self.max_decoding_message_size = Some(limit);
        self
    }

    /// The largest response sent (tonic's default: unlimited).
    #[must_use]
    pub fn max_encoding_message_size(mut self, limit: usize) -> Self {
        self.max_encoding_message_size = Some(limit);
        self
    }
}

impl<T> tonic::server::NamedService for NodeCertificatesServer<T> {
    const NAME: &'static str = SERVICE_NAME;
}

type MethodFuture =
    Pin<Box<dyn Future<Output = Result<Response<CertificateResponse>, Status>> + Send>>;

/// `Enroll`, as `tonic::server::Grpc` wants it.
struct EnrollSvc<T>(Arc<T>);

impl<T: NodeCertificates> tonic::server::UnaryService<EnrollRequest> for EnrollSvc<T> {
    type Response = CertificateResponse;
    type Future = MethodFuture;

    fn call(&mut self, request: Request<EnrollRequest>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { inner.enroll(request).await })
    }
}

/// `Renew`, as `tonic::server::Grpc` wants it.
struct RenewSvc<T>(Arc<T>);

impl<T: NodeCertificates> tonic::server::UnaryService<RenewRequest> for RenewSvc<T> {
    type Response = CertificateResponse;
    type Future = MethodFuture;

    fn call(&mut self, request: Request<RenewRequest>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { inner.renew(request).await })
    }
}

impl<T, B> tower::Service<http::Request<B>> for NodeCertificatesServer<T>
where
    T: NodeCertificates,
    B: HttpBody + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let inner = self.inner.clone();
        let (max_dec, max_enc) = (
            self.max_decoding_message_size,
            self.max_encoding_message_size,
        );
        fn grpc<Req, Resp>(
            max_dec: Option<usize>,
            max_enc: Option<usize>,
        ) -> tonic::server::Grpc<tonic_prost::ProstCodec<Resp, Req>>
        where
            Req: prost::Message + Default + Send + 'static,
            Resp: prost::Message + Send + 'static,
        {
            tonic::server::Grpc::new(tonic_prost::ProstCodec::default())
                .apply_max_message_size_config(max_dec, max_enc)
        }
        match req.uri().path() {
            ENROLL_PATH => {
                Box::pin(
                    async move { Ok(grpc(max_dec, max_enc).unary(EnrollSvc(inner), req).await) },
                )
            }
            RENEW_PATH => {
                Box::pin(
                    async move { Ok(grpc(max_dec, max_enc).unary(RenewSvc(inner), req).await) },
                )
            }
            _ => Box::pin(async move { Ok(Status::unimplemented("").into_http()) }),
        }
    }
}

/// A client of the service.
#[derive(Debug, Clone)]
pub struct NodeCertificatesClient<T> {
    inner: tonic::client::Grpc<T>,
}

impl<T> NodeCertificatesClient<T>
where
    T: tonic::client::GrpcService<Body>,
    T::Error: Into<StdError>,
    T::ResponseBody: HttpBody<Data = Bytes> + Send + 'static,
    <T::ResponseBody as HttpBody>::Error: Into<StdError> + Send,
{
    /// A client over `inner` (e.g. a `tonic::transport::Channel`).
    pub fn new(inner: T) -> Self {
        NodeCertificatesClient {
            inner: tonic::client::Grpc::new(inner),
        }
    }

    /// Calls `Enroll`; put the token in the request's `authorization` metadata
    /// (`Bearer <token>`).
    pub async fn enroll(
        &mut self,
        request: impl tonic::IntoRequest<EnrollRequest>,
    ) -> Result<Response<CertificateResponse>, Status> {
        self.unary(request.into_request(), ENROLL_PATH, "Enroll")
            .await
    }

    /// Calls `Renew` (over mTLS with the node's current certificate).
    pub async fn renew(
        &mut self,
        request: impl tonic::IntoRequest<RenewRequest>,
    ) -> Result<Response<CertificateResponse>, Status> {
        self.unary(request.into_request(), RENEW_PATH, "Renew")
            .await
    }

    async fn unary<Req>(
        &mut self,
        mut request: Request<Req>,
        path: &'static str,
        method: &'static str,
    ) -> Result<Response<CertificateResponse>, Status>
    where
        Req: prost::Message + Send + Sync + 'static,
    {
        self.inner.ready().await.map_err(|e| {
            Status::unavailable(format!("the connection is not ready: {}", e.into()))
        })?;
        request
            .extensions_mut()
            .insert(GrpcMethod::new(SERVICE_NAME, method));
        self.inner
            .unary(
                request,
                PathAndQuery::from_static(path),
                tonic_prost::ProstCodec::default(),
            )
            .await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

    use super::*;

    #[test]
    fn bearer_token_parses() {
        let mut r = Request::new(());
        assert_eq!(bearer_token(&r), None);
        r.metadata_mut()
            .insert(AUTHORIZATION, "Bearer bpt_abc".parse().unwrap());
        assert_eq!(bearer_token(&r), Some("bpt_abc"));
        r.metadata_mut()
            .insert(AUTHORIZATION, "Basic xyz".parse().unwrap());
        assert_eq!(bearer_token(&r), None);
        r.metadata_mut()
            .insert(AUTHORIZATION, "bearer  ".parse().unwrap());
        assert_eq!(bearer_token(&r), None);
    }

    #[test]
    fn messages_round_trip() {
        use prost::Message;
        let m = CertificateResponse {
            identity: "spiffe://biplane.local/gateway/default/web/node/n1".into(),
            certificate_pem: "c".into(),
            ca_certificate_pem: "ca".into(),
            not_after_unix: 1_900_000_000,
            gateway: "default/web".into(),
            node_id: "n1".into(),
        };
        assert_eq!(CertificateResponse::decode(&*m.encode_to_vec()).unwrap(), m);
    }
}
