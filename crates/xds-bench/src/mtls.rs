//! mTLS runs: enrolls the simulated nodes the way `biplane proxy --token` does (a P-256
//! key made here, a CSR, the `Enroll` RPC with the bootstrap token, the control plane
//! verified with its CA) and opens one TLS connection per node, presenting that node's
//! own client certificate, for its ADS stream.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use biplane_xds::node_rpc::{AUTHORIZATION, EnrollRequest, NodeCertificatesClient};
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use rustls::RootCertStore;
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint, Uri};

/// One enrolled node: its id and the TLS client config that presents its certificate.
pub struct NodeTls {
    pub id: String,
    config: Arc<rustls::ClientConfig>,
}

impl NodeTls {
    /// Opens this node's own TLS connection to the xDS port.
    pub async fn connect(&self, xds: SocketAddr, timeout: Duration) -> anyhow::Result<Channel> {
        connect(xds, self.config.clone(), timeout)
            .await
            .with_context(|| format!("{}: mTLS connection", self.id))
    }
}

/// The outcome of [`enroll`].
pub struct Enrolled {
    /// In the order of the ids given.
    pub nodes: Vec<NodeTls>,
    /// Wall-clock time of the whole enrollment.
    pub elapsed: Duration,
    /// `Enroll` calls answered UNAVAILABLE (the control plane's "retry") and retried.
    pub retries: usize,
    /// The first UNAVAILABLE message, when there were retries.
    pub first_retry_reason: Option<String>,
}

/// What every enrollment task shares.
struct Shared {
    channel: Channel,
    bearer: MetadataValue<Ascii>,
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    deadline: Instant,
    retries: AtomicUsize,
    first_retry_reason: Mutex<Option<String>>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca_pem: &str) -> anyhow::Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(c.context("CA certificate PEM")?)
            .context("CA certificate")?;
    }
    if roots.is_empty() {
        bail!("no certificate in the control plane's CA file");
    }
    Ok(Arc::new(roots))
}

/// ALPN h2 and no session resumption, as the real node's config
/// (`biplane_xds::client::identity`): every connection does a full handshake.
fn finish(mut config: rustls::ClientConfig) -> Arc<rustls::ClientConfig> {
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.resumption = Resumption::disabled();
    Arc::new(config)
}

/// A gRPC channel over TLS with `config` to `xds` (the server certificate is verified
/// for the IP address, which the control plane's certificate carries by default).
async fn connect(
    xds: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> anyhow::Result<Channel> {
    let name = ServerName::IpAddress(xds.ip().into());
    let endpoint = Endpoint::from_shared(format!("http://{xds}"))?.connect_timeout(timeout);
    let connector = tower::service_fn(move |_: Uri| {
        let config = config.clone();
        let name = name.clone();
        async move {
            let tcp = TcpStream::connect(xds).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    Ok(endpoint.connect_with_connector(connector).await?)
}

/// Enrolls one node per id with `token` (a bootstrap token with at least `ids.len()`
/// uses), at most `concurrency` `Enroll` calls in flight on one TLS connection (no client
/// certificate, as a node that has none yet). UNAVAILABLE answers are retried with
/// backoff until `timeout`; any other refusal fails the run.
pub async fn enroll(
    xds: SocketAddr,
    ca_pem: &str,
    token: &str,
    ids: Vec<String>,
    concurrency: usize,
    timeout: Duration,
) -> anyhow::Result<Enrolled> {
    let provider = provider();
    let roots = roots(ca_pem)?;
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    let started = Instant::now();
    let channel = connect(xds, finish(config), timeout)
        .await
        .context("enrollment connection")?;
    let shared = Arc::new(Shared {
        channel,
        bearer: format!("Bearer {token}")
            .parse()
            .context("the token is not printable ASCII")?,
        roots,
        provider,
        deadline: started + timeout,
        retries: AtomicUsize::new(0),
        first_retry_reason: Mutex::new(None),
    });
    let limit = Arc::new(Semaphore::new(concurrency.max(1)));
    let n = ids.len();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, id) in ids.into_iter().enumerate() {
        let permit = limit.clone().acquire_owned().await?;
        let shared = shared.clone();
        tasks.spawn(async move {
            let r = enroll_one(&shared, id).await;
            drop(permit);
            (i, r)
        });
    }
    let mut nodes: Vec<Option<NodeTls>> = (0..n).map(|_| None).collect();
    while let Some(joined) = tasks.join_next().await {
        let (i, r) = joined.context("enrollment task")?;
        nodes[i] = Some(r?);
    }
    let nodes = nodes
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .context("a node was not enrolled")?;
    let first_retry_reason = shared
        .first_retry_reason
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    Ok(Enrolled {
        nodes,
        elapsed: started.elapsed(),
        retries: shared.retries.load(Ordering::Relaxed),
        first_retry_reason,
    })
}

async fn enroll_one(shared: &Shared, id: String) -> anyhow::Result<NodeTls> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, id.as_str());
    params.distinguished_name = dn;
    let csr_pem = params.serialize_request(&key)?.pem()?;
    let mut backoff = Duration::from_millis(5);
    let resp = loop {
        let mut request = tonic::Request::new(EnrollRequest {
            node_id: id.clone(),
            csr_pem: csr_pem.clone(),
        });
        request
            .metadata_mut()
            .insert(AUTHORIZATION, shared.bearer.clone());
        match NodeCertificatesClient::new(shared.channel.clone())
            .enroll(request)
            .await
        {
            Ok(r) => break r.into_inner(),
            Err(s) if s.code() == tonic::Code::Unavailable && Instant::now() < shared.deadline => {
                shared.retries.fetch_add(1, Ordering::Relaxed);
                shared
                    .first_retry_reason
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get_or_insert_with(|| s.message().to_owned());
                // Backoff between attempts, as a node would do; not synchronization.
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
            Err(s) => bail!("{id}: Enroll refused: {:?}: {}", s.code(), s.message()),
        }
    };
    if resp.node_id != id {
        bail!("{id}: enrolled as {:?}", resp.node_id);
    }
    let chain = CertificateDer::pem_slice_iter(resp.certificate_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{id}: issued certificate"))?;
    let key_der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let config = rustls::ClientConfig::builder_with_provider(shared.provider.clone())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(shared.roots.clone())
        .with_client_auth_cert(chain, key_der)
        .with_context(|| format!("{id}: client certificate"))?;
    Ok(NodeTls {
        id,
        config: finish(config),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

    use super::*;

    #[test]
    fn ca_roots_are_parsed_and_an_empty_file_refused() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).unwrap();
        assert_eq!(roots(&ca.pem()).unwrap().len(), 1);
        assert!(roots("").is_err());
        assert!(
            roots("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n").is_err()
        );
    }
}
