//! The proxy's identity on the xDS channel: enrollment with a bootstrap token and a CSR
//! (the key is generated here and never leaves the node), credentials kept in the state
//! directory so a restart needs no token, the mTLS client config ADS connects with, and
//! renewal at half the certificate's lifetime without touching the running stream.
//!
//! # Files (`state_dir`, mode 0700)
//! `node.key` (PKCS#8 PEM, 0600), `node.crt` (the leaf, PEM), `ca.crt` (the CA bundle the
//! control plane is verified with). Each is written to a temporary file and renamed.
//!
//! # Trust on enrollment
//! The token printed by `biplane token create` may carry a pin: `bpt_<secret>.<pin>`, the
//! pin being the unpadded base64url SHA-256 of the CA certificate's DER. Only
//! `bpt_<secret>` is sent (metadata `authorization: Bearer bpt_<secret>`). The control
//! plane is verified with the `--ca-file` roots when given, otherwise with the pinned CA,
//! which must be in the chain the server presents (leaf + CA certificate). The CA bundle
//! the server returns must contain the pinned certificate too.
//!
//! # Renewal
//! At half the lifetime left when the certificate was obtained (`not_before` is backdated
//! by the CA for clock skew, so it is not used alone), a new key and CSR are sent on
//! `Renew` over a fresh mTLS connection; the new certificate is written and swapped into
//! the client-certificate resolver. Connections already up keep their TLS session, so the
//! ADS stream is untouched; only new connections present the new certificate (TLS
//! session resumption is off, so they always do). Failures are retried with backoff from
//! 1 s, capped at a tenth of the time left, until the certificate expires.

use std::fmt;
use std::fs;
use std::future::Future;

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use base64::Engine;
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, Resumption, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::node_rpc::{
    AUTHORIZATION, CertificateResponse, EnrollRequest, NodeCertificatesClient, RenewRequest,
};

/// The node's private key (PKCS#8 PEM, mode 0600).
pub const KEY_FILE: &str = "node.key";
/// The node's certificate (PEM).
pub const CERT_FILE: &str = "node.crt";
/// The CA bundle the control plane is verified with (PEM).
pub const CA_FILE: &str = "ca.crt";

/// How long connecting to a control plane for `Enroll`/`Renew` may take.
const RPC_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an `Enroll`/`Renew` call may take.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// The first retry delay of a failed renewal.
const RENEW_MIN_BACKOFF: Duration = Duration::from_secs(1);

/// How the proxy gets its identity (`biplane proxy --state-dir --node-id --token
/// --ca-file --xds-server-name`).
#[derive(Clone, Default)]
pub struct IdentityOptions {
    /// Where `node.key`, `node.crt` and `ca.crt` are kept.
    pub state_dir: PathBuf,
    /// The node id to enroll as (default: `<hostname>-<8 hex>`); with stored credentials,
    /// they must be for this id.
    pub node_id: Option<String>,
    /// A bootstrap token, `bpt_<secret>` or `bpt_<secret>.<pin>`. Needed only when no
    /// valid credentials are stored.
    pub token: Option<String>,
    /// PEM roots to verify the control plane with on enrollment (instead of the pin).
    pub ca_file: Option<PathBuf>,
    /// The name the control plane's certificate is verified for (default: the host part
    /// of each address).
    pub server_name: Option<String>,
}

impl IdentityOptions {
    /// Options with only a state directory.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        IdentityOptions {
            state_dir: state_dir.into(),
            ..Default::default()
        }
    }
}

impl fmt::Debug for IdentityOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityOptions")
            .field("state_dir", &self.state_dir)
            .field("node_id", &self.node_id)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("ca_file", &self.ca_file)
            .field("server_name", &self.server_name)
            .finish()
    }
}

/// Why the node has no usable identity, or a renewal failed.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "no node certificate in {} and no bootstrap token: enroll once with --token (from `biplane token create --gateway NAME`)",
        state_dir.display()
    )]
    NoCredentials { state_dir: PathBuf },
    #[error(
        "the node certificate in {} expired at {not_after}; enroll again with --token",
        state_dir.display()
    )]
    Expired {
        state_dir: PathBuf,
        not_after: String,
    },
    #[error(
        "the node certificate in {} is for node {stored:?}, not {wanted:?}; enroll with --token to get one for {wanted:?}, or drop --node-id",
        state_dir.display()
    )]
    NodeIdMismatch {
        state_dir: PathBuf,
        stored: String,
        wanted: String,
    },
    #[error("the stored node credentials in {} are unusable: {message}; enroll again with --token", state_dir.display())]
    InvalidStored { state_dir: PathBuf, message: String },
    #[error(
        "need --ca-file or a pinned token (bpt_<secret>.<pin>) to verify the control plane on enrollment"
    )]
    NoTrustAnchor,
    #[error("invalid bootstrap token: {0}")]
    BadToken(String),
    #[error("invalid node id {0:?}: use letters, digits, '.', '-' or '_'")]
    BadNodeId(String),
    #[error("--ca-file {}: {message}", path.display())]
    BadCaFile { path: PathBuf, message: String },
    #[error("no control-plane address given")]
    NoServers,
    #[error("invalid control-plane address {server:?}: {message}")]
    BadAddress { server: String, message: String },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("key or CSR generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("could not reach a control plane: {0}")]
    Unreachable(String),
    /// The control plane's certificate failed verification (wrong pin, wrong CA file,
    /// wrong server name, or an expired node certificate on renewal).
    #[error("refusing the control plane at {server}: {message}")]
    ServerNotTrusted { server: String, message: String },
    /// The control plane answered with an error status.
    #[error("the control plane at {server} refused to {rpc}: {code:?}: {message}")]
    Refused {
        server: String,
        rpc: &'static str,
        code: tonic::Code,
        message: String,
    },
    #[error("the control plane at {server} sent an unusable certificate: {message}")]
    BadResponse { server: String, message: String },
}

impl IdentityError {
    /// The control plane refused with `PERMISSION_DENIED` (a revoked node).
    pub fn is_permission_denied(&self) -> bool {
        matches!(
            self,
            IdentityError::Refused {
                code: tonic::Code::PermissionDenied,
                ..
            }
        )
    }
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError {
    let path = path.to_path_buf();
    move |source| IdentityError::Io { what, path, source }
}

/// What a node certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Leaf {
    /// The SPIFFE ID.
    identity: String,
    node_id: String,
    /// `namespace/name`.
    gateway: String,
    not_before: SystemTime,
    not_after: SystemTime,
    not_after_text: String,
    /// Hex, `:`-separated.
    serial: String,
}

fn unix(ts: i64) -> SystemTime {
    if ts >= 0 {
        UNIX_EPOCH + Duration::from_secs(ts.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(ts.unsigned_abs())
    }
}

/// Reads the identity and validity of a node certificate (DER).
fn parse_leaf(der: &[u8]) -> Result<Leaf, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| e.to_string())?
        .ok_or("no subjectAltName extension")?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
            _ => None,
        })
        .collect();
    let [uri] = uris.as_slice() else {
        return Err(format!(
            "expected one spiffe:// URI SAN, found {}",
            uris.len()
        ));
    };
    let (_trust_domain, gateway, node_id) = parse_spiffe(uri)?;
    let validity = cert.validity();
    Ok(Leaf {
        identity: (*uri).to_owned(),
        node_id,
        gateway,
        not_before: unix(validity.not_before.timestamp()),
        not_after: unix(validity.not_after.timestamp()),
        not_after_text: validity.not_after.to_string(),
        serial: cert.raw_serial_as_string(),
    })
}

/// `spiffe://<td>/gateway/<ns>/<name>/node/<id>` → (td, `ns/name`, id).
fn parse_spiffe(uri: &str) -> Result<(String, String, String), String> {
    let bad = || {
        format!(
            "{uri:?} is not a biplane node identity (spiffe://<trust-domain>/gateway/<ns>/<name>/node/<id>)"
        )
    };
    let rest = uri.strip_prefix("spiffe://").ok_or_else(bad)?;
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        [td, "gateway", ns, name, "node", id]
            if !td.is_empty() && [ns, name, id].iter().all(|s| valid_segment(s)) =>
        {
            Ok(((*td).to_owned(), format!("{ns}/{name}"), (*id).to_owned()))
        }
        _ => Err(bad()),
    }
}

/// The control plane's rule for a SPIFFE path segment (and a node id).
fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// `<hostname>-<8 hex random>`, the hostname reduced to valid characters.
fn default_node_id() -> String {
    let host = fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let mut host: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '-'
            }
        })
        .take(200)
        .collect();
    if host.is_empty() || host == "." || host == ".." {
        host = "node".to_owned();
    }
    format!("{host}-{:08x}", rand::random::<u32>())
}

/// The certificate in use, swapped on renewal.
struct Current {
    certified: Arc<CertifiedKey>,
    leaf: Leaf,
    /// When this node obtained it (renewal is scheduled from here).
    obtained: SystemTime,
}

impl Current {
    /// Half-way between when the certificate was obtained (or its `not_before`, if later)
    /// and its `not_after`.
    fn renew_at(&self) -> SystemTime {
        let start = self.obtained.max(self.leaf.not_before);
        let life = self
            .leaf
            .not_after
            .duration_since(start)
            .unwrap_or_default();
        start + life / 2
    }
}

/// The client-certificate resolver: whatever certificate is current.
struct CurrentCert(Arc<ArcSwap<Current>>);

impl fmt::Debug for CurrentCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("CurrentCert")
            .field(&self.0.load().leaf.serial)
            .finish()
    }
}

impl ResolvesClientCert for CurrentCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load().certified.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The node's credentials: its identity, and the mTLS client config that presents the
/// current certificate and verifies the control plane with the stored CA bundle.
pub struct NodeCredentials {
    state_dir: PathBuf,
    server_name: Option<String>,
    identity: String,
    node_id: String,
    gateway: String,
    current: Arc<ArcSwap<Current>>,
    ca_pem: String,
    client_config: Arc<rustls::ClientConfig>,
    provider: Arc<CryptoProvider>,
}

impl fmt::Debug for NodeCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeCredentials")
            .field("identity", &self.identity)
            .field("serial", &self.serial())
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

impl NodeCredentials {
    /// The node id (from the certificate).
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The Gateway, `namespace/name` (from the certificate): the xDS `node.cluster`.
    pub fn gateway(&self) -> &str {
        &self.gateway
    }

    /// The SPIFFE ID.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The end of the current certificate's validity.
    pub fn not_after(&self) -> SystemTime {
        self.current.load().leaf.not_after
    }

    /// When the current certificate is due for renewal.
    pub fn renew_at(&self) -> SystemTime {
        self.current.load().renew_at()
    }

    /// The current certificate's serial number (hex, `:`-separated).
    pub fn serial(&self) -> String {
        self.current.load().leaf.serial.clone()
    }

    /// The current certificate (DER).
    pub fn certificate_der(&self) -> CertificateDer<'static> {
        self.current.load().certified.cert[0].clone()
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The mTLS client config (ALPN `h2`, no session resumption): the client certificate
    /// is resolved per handshake, so renewal reaches new connections without a rebuild.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.client_config.clone()
    }

    /// A gRPC channel to `server` over mTLS. `endpoint` is `http://host:port` (tonic adds
    /// no TLS of its own) with the caller's timeouts and keepalive.
    pub async fn connect(&self, endpoint: Endpoint, server: &str) -> Result<Channel, String> {
        let name = server_name(self.server_name.as_deref(), server).map_err(|e| e.to_string())?;
        endpoint
            .connect_with_connector(tls_connector(self.client_config.clone(), name))
            .await
            .map_err(|e| error_chain(&e))
    }
}

/// Loads the node credentials from `opts.state_dir`, or enrolls with `opts.token` on the
/// first of `servers` that answers and stores them. See the module docs.
pub async fn load_or_enroll(
    opts: &IdentityOptions,
    servers: &[String],
) -> Result<NodeCredentials, IdentityError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    if let Some(id) = &opts.node_id
        && !valid_segment(id)
    {
        return Err(IdentityError::BadNodeId(id.clone()));
    }
    let dir = opts.state_dir.clone();
    let stored = {
        let provider = provider.clone();
        tokio::task::spawn_blocking(move || load_stored(&dir, &provider))
            .await
            .map_err(|e| IdentityError::Tls(format!("loading credentials: {e}")))?
    };
    let refusal = match stored {
        Ok(Some((current, ca_pem))) => {
            let expired = current.leaf.not_after <= SystemTime::now();
            let wrong_id = opts
                .node_id
                .as_ref()
                .filter(|id| **id != current.leaf.node_id);
            match (expired, wrong_id) {
                (false, None) => {
                    tracing::info!(identity = %current.leaf.identity, not_after = %current.leaf.not_after_text,
                        state_dir = %opts.state_dir.display(), "using the stored node certificate");
                    return credentials(opts, current, ca_pem, provider);
                }
                (true, _) => IdentityError::Expired {
                    state_dir: opts.state_dir.clone(),
                    not_after: current.leaf.not_after_text.clone(),
                },
                (false, Some(wanted)) => IdentityError::NodeIdMismatch {
                    state_dir: opts.state_dir.clone(),
                    stored: current.leaf.node_id.clone(),
                    wanted: wanted.clone(),
                },
            }
        }
        Ok(None) => IdentityError::NoCredentials {
            state_dir: opts.state_dir.clone(),
        },
        Err(e) => e,
    };
    let Some(token) = &opts.token else {
        return Err(refusal);
    };
    if !matches!(refusal, IdentityError::NoCredentials { .. }) {
        tracing::warn!(reason = %refusal, "enrolling again with the bootstrap token");
    }
    let (current, ca_pem) = enroll(opts, servers, token, &provider).await?;
    credentials(opts, current, ca_pem, provider)
}

/// The stored credentials, `None` when none of the files exist.
fn load_stored(
    dir: &Path,
    provider: &CryptoProvider,
) -> Result<Option<(Current, String)>, IdentityError> {
    let paths = [KEY_FILE, CERT_FILE, CA_FILE].map(|f| dir.join(f));
    let present: Vec<bool> = paths.iter().map(|p| p.exists()).collect();
    if present.iter().all(|p| !p) {
        return Ok(None);
    }
    let invalid = |message: String| IdentityError::InvalidStored {
        state_dir: dir.to_path_buf(),
        message,
    };
    if let Some(i) = present.iter().position(|p| !p) {
        return Err(invalid(format!(
            "{} is missing",
            paths[i].file_name().unwrap_or_default().to_string_lossy()
        )));
    }
    let [key_path, cert_path, ca_path] = &paths;
    if let Ok(meta) = fs::metadata(key_path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(key = %key_path.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "the node key is readable by other users; chmod 600 it");
    }
    let key_pem = fs::read(key_path).map_err(io_err("cannot read", key_path))?;
    let cert_pem = fs::read(cert_path).map_err(io_err("cannot read", cert_path))?;
    let ca_pem = fs::read_to_string(ca_path).map_err(io_err("cannot read", ca_path))?;
    let key =
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| invalid(format!("{KEY_FILE}: {e}")))?;
    let chain = pem_certs(&cert_pem).map_err(|e| invalid(format!("{CERT_FILE}: {e}")))?;
    pem_certs(ca_pem.as_bytes()).map_err(|e| invalid(format!("{CA_FILE}: {e}")))?;
    let leaf = parse_leaf(&chain[0]).map_err(|e| invalid(format!("{CERT_FILE}: {e}")))?;
    let certified = CertifiedKey::from_der(chain, key, provider).map_err(|e| {
        invalid(format!(
            "{KEY_FILE} and {CERT_FILE} do not go together: {e}"
        ))
    })?;
    let now = SystemTime::now();
    let obtained = fs::metadata(cert_path)
        .and_then(|m| m.modified())
        .unwrap_or(now)
        .clamp(leaf.not_before.min(now), now);
    Ok(Some((
        Current {
            certified: Arc::new(certified),
            leaf,
            obtained,
        },
        ca_pem,
    )))
}

/// Every certificate of a PEM bundle (at least one).
fn pem_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("no PEM certificate".to_owned());
    }
    Ok(certs)
}

fn credentials(
    opts: &IdentityOptions,
    current: Current,
    ca_pem: String,
    provider: Arc<CryptoProvider>,
) -> Result<NodeCredentials, IdentityError> {
    let invalid = |message: String| IdentityError::InvalidStored {
        state_dir: opts.state_dir.clone(),
        message,
    };
    let mut roots = RootCertStore::empty();
    for c in pem_certs(ca_pem.as_bytes()).map_err(|e| invalid(format!("{CA_FILE}: {e}")))? {
        roots
            .add(c)
            .map_err(|e| invalid(format!("{CA_FILE}: {e}")))?;
    }
    let identity = current.leaf.identity.clone();
    let node_id = current.leaf.node_id.clone();
    let gateway = current.leaf.gateway.clone();
    let current = Arc::new(ArcSwap::from_pointee(current));
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| IdentityError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_cert_resolver(Arc::new(CurrentCert(current.clone())));
    config.alpn_protocols = vec![b"h2".to_vec()];
    // A resumed session would carry the identity of the certificate it was made with.
    config.resumption = Resumption::disabled();
    Ok(NodeCredentials {
        state_dir: opts.state_dir.clone(),
        server_name: opts.server_name.clone(),
        identity,
        node_id,
        gateway,
        current,
        ca_pem,
        client_config: Arc::new(config),
        provider,
    })
}

/// Splits `bpt_<secret>.<pin>` at the last `.`: the bearer secret and the decoded pin.
fn split_token(token: &str) -> Result<(&str, Option<[u8; 32]>), IdentityError> {
    let token = token.trim();
    let (secret, pin) = match token.rsplit_once('.') {
        Some((secret, pin)) => {
            let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(pin)
                .map_err(|_| {
                    IdentityError::BadToken(
                        "the part after the last '.' is not a base64url CA pin".to_owned(),
                    )
                })?;
            let pin: [u8; 32] = bytes.try_into().map_err(|_| {
                IdentityError::BadToken(
                    "the CA pin after the last '.' is not a SHA-256 digest".to_owned(),
                )
            })?;
            (secret, Some(pin))
        }
        None => (token, None),
    };
    if secret.is_empty() || secret.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(IdentityError::BadToken(
            "the token is empty or has whitespace".to_owned(),
        ));
    }
    Ok((secret, pin))
}

fn sha256(der: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The pin of a CA certificate (unpadded base64url of the SHA-256 of its DER), as put
/// after the last `.` of a pinned bootstrap token.
pub fn ca_pin(ca_der: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha256(ca_der))
}

/// The control plane's chain does not hold the pinned CA.
#[derive(Debug, thiserror::Error)]
#[error(
    "the control plane's certificate chain does not contain the CA pinned by the token (sha256 {0}); wrong token or wrong control plane"
)]
struct PinMismatch(String);

/// Verifies the server with the pinned CA as the only root; the CA must be among the
/// certificates the server presents.
#[derive(Debug)]
struct PinnedCaVerifier {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates.iter().find(|c| sha256(c) == self.pin) else {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(PinMismatch(
                    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.pin),
                )))),
            ));
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The TLS client config of `Enroll`: no client certificate, the server verified by the
/// `--ca-file` roots or the token's pin.
fn enroll_config(
    opts: &IdentityOptions,
    pin: Option<[u8; 32]>,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<rustls::ClientConfig>, IdentityError> {
    let verifier: Arc<dyn ServerCertVerifier> = match (&opts.ca_file, pin) {
        (Some(path), _) => {
            let bad = |message: String| IdentityError::BadCaFile {
                path: path.clone(),
                message,
            };
            let pem = fs::read(path).map_err(|e| bad(e.to_string()))?;
            let mut roots = RootCertStore::empty();
            for c in pem_certs(&pem).map_err(bad)? {
                roots.add(c).map_err(|e| bad(e.to_string()))?;
            }
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| bad(e.to_string()))?
        }
        (None, Some(pin)) => Arc::new(PinnedCaVerifier {
            pin,
            provider: provider.clone(),
        }),
        (None, None) => return Err(IdentityError::NoTrustAnchor),
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| IdentityError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// A fresh P-256 key and a CSR for it (PEM). The CA sets the subject and SANs itself; the
/// CN is informational.
fn key_and_csr(node_id: &str) -> Result<(KeyPair, String), IdentityError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, node_id);
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key)?.pem()?;
    Ok((key, csr))
}

/// What a `CertificateResponse` must be to be used.
struct Expect<'a> {
    node_id: &'a str,
    /// Renewal: the identity must not change.
    identity: Option<&'a str>,
    /// Enrollment with a pin: the CA bundle must contain the pinned CA.
    pin: Option<[u8; 32]>,
}

/// Checks a response against the key it was asked for and builds the new current cert.
fn accept_response(
    resp: &CertificateResponse,
    key: &KeyPair,
    expect: &Expect<'_>,
    provider: &CryptoProvider,
) -> Result<Current, String> {
    let chain =
        pem_certs(resp.certificate_pem.as_bytes()).map_err(|e| format!("certificate_pem: {e}"))?;
    let ca = pem_certs(resp.ca_certificate_pem.as_bytes())
        .map_err(|e| format!("ca_certificate_pem: {e}"))?;
    if let Some(pin) = expect.pin
        && !ca.iter().any(|c| sha256(c) == pin)
    {
        return Err("the CA bundle does not contain the CA pinned by the token".to_owned());
    }
    let leaf = parse_leaf(&chain[0]).map_err(|e| format!("certificate_pem: {e}"))?;
    if leaf.node_id != expect.node_id {
        return Err(format!(
            "the certificate is for node {:?}, not {:?}",
            leaf.node_id, expect.node_id
        ));
    }
    if let Some(identity) = expect.identity
        && leaf.identity != identity
    {
        return Err(format!(
            "the certificate is for {}, not {identity}",
            leaf.identity
        ));
    }
    let now = SystemTime::now();
    if leaf.not_after <= now {
        return Err(format!(
            "the certificate expired at {}",
            leaf.not_after_text
        ));
    }
    let key_der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let certified = CertifiedKey::from_der(chain, key_der, provider)
        .map_err(|e| format!("the certificate is not for the key in the CSR: {e}"))?;
    Ok(Current {
        certified: Arc::new(certified),
        leaf,
        obtained: now,
    })
}

/// `http://host:port` for `host:port` (or the address as given when it has a scheme).
fn server_uri(server: &str) -> Result<Uri, IdentityError> {
    super::uri(server)
        .parse::<Uri>()
        .map_err(|e| IdentityError::BadAddress {
            server: server.to_owned(),
            message: e.to_string(),
        })
}

/// The name to verify `server`'s certificate for.
fn server_name(
    configured: Option<&str>,
    server: &str,
) -> Result<ServerName<'static>, IdentityError> {
    let bad = |message: String| IdentityError::BadAddress {
        server: server.to_owned(),
        message,
    };
    let name = match configured {
        Some(n) => n.to_owned(),
        None => {
            let uri = server_uri(server)?;
            uri.host()
                .ok_or_else(|| bad("no host".to_owned()))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned()
        }
    };
    ServerName::try_from(name).map_err(|e| bad(format!("invalid TLS server name: {e}")))
}

/// A tonic connector: TCP (no Nagle) to the URI's host and port, then a TLS handshake
/// with `config` for `name`.
fn tls_connector(
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
) -> impl tower::Service<
    Uri,
    Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
    Error = std::io::Error,
    Future = impl Future<Output = std::io::Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>>
             + Send,
> + Send
+ 'static {
    tower::service_fn(move |uri: Uri| {
        let config = config.clone();
        let name = name.clone();
        async move {
            let host = uri
                .host()
                .ok_or_else(|| std::io::Error::other(format!("{uri}: no host")))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().unwrap_or(80);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(handshake_error)?;
            Ok(TokioIo::new(tls))
        }
    })
}

/// The control plane's certificate was refused (not a network problem: retrying another
/// address with the same trust will not help).
#[derive(Debug, thiserror::Error)]
#[error("TLS handshake: {0}")]
struct ServerNotTrusted(String);

/// A readable handshake error; a refused server certificate becomes [`ServerNotTrusted`].
fn handshake_error(e: std::io::Error) -> std::io::Error {
    let kind = e.kind();
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return std::io::Error::new(kind, format!("TLS handshake: {e}"));
    };
    let message = match tls {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o)) => o.0.to_string(),
        rustls::Error::InvalidCertificate(c) => {
            format!("the control plane's certificate is not trusted: {c}")
        }
        other => return std::io::Error::new(kind, format!("TLS handshake: {other}")),
    };
    std::io::Error::new(kind, ServerNotTrusted(message))
}

/// Whether `e` (or a cause) is a [`ServerNotTrusted`].
fn is_server_not_trusted(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if e.is::<ServerNotTrusted>()
            || e.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .is_some_and(|i| i.is::<ServerNotTrusted>())
        {
            return true;
        }
        cur = e.source();
    }
    false
}

/// `error: cause: cause`.
fn error_chain(e: &dyn std::error::Error) -> String {
    super::error_chain(e)
}

/// A channel for one `Enroll`/`Renew` call.
async fn rpc_channel(
    config: Arc<rustls::ClientConfig>,
    configured_name: Option<&str>,
    server: &str,
) -> Result<Channel, IdentityError> {
    let name = server_name(configured_name, server)?;
    let endpoint = Endpoint::from(server_uri(server)?)
        .connect_timeout(RPC_CONNECT_TIMEOUT)
        .timeout(RPC_TIMEOUT)
        .tcp_nodelay(true);
    endpoint
        .connect_with_connector(tls_connector(config, name))
        .await
        .map_err(|e| {
            if is_server_not_trusted(&e) {
                IdentityError::ServerNotTrusted {
                    server: server.to_owned(),
                    message: error_chain(&e),
                }
            } else {
                IdentityError::Unreachable(format!("{server}: {}", error_chain(&e)))
            }
        })
}

/// A call's outcome on one server: go on with the next server, or stop here.
enum CallError {
    Next(String),
    Stop(IdentityError),
}

fn call_error(server: &str, rpc: &'static str, status: tonic::Status) -> CallError {
    // UNAVAILABLE: the connection broke or the server is going away: try another one.
    if status.code() == tonic::Code::Unavailable {
        return CallError::Next(format!("{server}: {}", status.message()));
    }
    CallError::Stop(IdentityError::Refused {
        server: server.to_owned(),
        rpc,
        code: status.code(),
        message: status.message().to_owned(),
    })
}

async fn enroll(
    opts: &IdentityOptions,
    servers: &[String],
    token: &str,
    provider: &Arc<CryptoProvider>,
) -> Result<(Current, String), IdentityError> {
    if servers.is_empty() {
        return Err(IdentityError::NoServers);
    }
    let (secret, pin) = split_token(token)?;
    let config = enroll_config(opts, pin, provider)?;
    let node_id = opts.node_id.clone().unwrap_or_else(default_node_id);
    if !valid_segment(&node_id) {
        return Err(IdentityError::BadNodeId(node_id));
    }
    let (key, csr_pem) = key_and_csr(&node_id)?;
    let bearer: tonic::metadata::MetadataValue<tonic::metadata::Ascii> = format!("Bearer {secret}")
        .parse()
        .map_err(|_| IdentityError::BadToken("not printable ASCII".to_owned()))?;
    let mut failures = Vec::new();
    for server in servers {
        let attempt = async {
            let channel = rpc_channel(config.clone(), opts.server_name.as_deref(), server)
                .await
                .map_err(|e| match e {
                    IdentityError::Unreachable(m) => CallError::Next(m),
                    other => CallError::Stop(other),
                })?;
            let mut request = tonic::Request::new(EnrollRequest {
                node_id: node_id.clone(),
                csr_pem: csr_pem.clone(),
            });
            request.metadata_mut().insert(AUTHORIZATION, bearer.clone());
            let resp = NodeCertificatesClient::new(channel)
                .enroll(request)
                .await
                .map_err(|s| call_error(server, "enroll", s))?
                .into_inner();
            let expect = Expect {
                node_id: &node_id,
                identity: None,
                pin,
            };
            let current = accept_response(&resp, &key, &expect, provider).map_err(|message| {
                CallError::Stop(IdentityError::BadResponse {
                    server: server.clone(),
                    message,
                })
            })?;
            Ok::<_, CallError>((current, resp.ca_certificate_pem))
        };
        match attempt.await {
            Ok((current, ca_pem)) => {
                persist(&opts.state_dir, &key, &current, &ca_pem).await?;
                tracing::info!(%server, identity = %current.leaf.identity, serial = %current.leaf.serial,
                    not_after = %current.leaf.not_after_text, state_dir = %opts.state_dir.display(),
                    "enrolled: node certificate issued and stored");
                return Ok((current, ca_pem));
            }
            Err(CallError::Stop(e)) => return Err(e),
            Err(CallError::Next(m)) => {
                tracing::warn!(error = %m, "enrollment: control plane unreachable; trying the next one");
                failures.push(m);
            }
        }
    }
    Err(IdentityError::Unreachable(failures.join("; ")))
}

/// Writes the key (0600), the certificate and the CA bundle, each through a temporary
/// file and a rename, in `dir` (created 0700).
async fn persist(
    dir: &Path,
    key: &KeyPair,
    current: &Current,
    ca_pem: &str,
) -> Result<(), IdentityError> {
    let dir = dir.to_path_buf();
    let key_pem = key.serialize_pem();
    let cert_pem: String = current
        .certified
        .cert
        .iter()
        .map(|c| pem_encode("CERTIFICATE", c))
        .collect();
    let ca_pem = ca_pem.to_owned();
    tokio::task::spawn_blocking(move || {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err("cannot create directory", &dir))?;
        // Key first: a crash before the certificate leaves a pair that does not match,
        // which is refused on load (and re-enrolled with a token).
        write_atomic(&dir.join(KEY_FILE), key_pem.as_bytes(), 0o600)?;
        write_atomic(&dir.join(CERT_FILE), cert_pem.as_bytes(), 0o644)?;
        write_atomic(&dir.join(CA_FILE), ca_pem.as_bytes(), 0o644)
    })
    .await
    .map_err(|e| IdentityError::Io {
        what: "writing credentials in",
        path: PathBuf::new(),
        source: std::io::Error::other(e.to_string()),
    })?
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut s = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        s.push_str(&String::from_utf8_lossy(chunk));
        s.push('\n');
    }
    s.push_str(&format!("-----END {label}-----\n"));
    s
}

fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), IdentityError> {
    crate::atomic_file::write(path, contents, mode).map_err(|e| IdentityError::Io {
        what: e.what,
        path: e.path,
        source: e.source,
    })
}

impl NodeCredentials {
    /// Renews the certificate once: a new key and CSR, `Renew` on the first server that
    /// answers (over a fresh mTLS connection with the current certificate), then the new
    /// certificate is stored and swapped in for new connections.
    pub async fn renew(&self, servers: &[String]) -> Result<(), IdentityError> {
        if servers.is_empty() {
            return Err(IdentityError::NoServers);
        }
        let (key, csr_pem) = key_and_csr(&self.node_id)?;
        let mut failures = Vec::new();
        for server in servers {
            let attempt = async {
                let channel = rpc_channel(
                    self.client_config.clone(),
                    self.server_name.as_deref(),
                    server,
                )
                .await
                .map_err(|e| match e {
                    IdentityError::Unreachable(m) => CallError::Next(m),
                    other => CallError::Stop(other),
                })?;
                let resp = NodeCertificatesClient::new(channel)
                    .renew(RenewRequest {
                        csr_pem: csr_pem.clone(),
                    })
                    .await
                    .map_err(|s| call_error(server, "renew", s))?
                    .into_inner();
                let expect = Expect {
                    node_id: &self.node_id,
                    identity: Some(&self.identity),
                    pin: None,
                };
                let current =
                    accept_response(&resp, &key, &expect, &self.provider).map_err(|message| {
                        CallError::Stop(IdentityError::BadResponse {
                            server: server.clone(),
                            message,
                        })
                    })?;
                Ok::<_, CallError>((current, resp.ca_certificate_pem))
            };
            match attempt.await {
                Ok((current, ca_pem)) => {
                    if ca_pem.trim() != self.ca_pem.trim() {
                        tracing::warn!(
                            "the control plane sent a different CA bundle; it is stored and used from the next start"
                        );
                    }
                    if let Err(e) = persist(&self.state_dir, &key, &current, &ca_pem).await {
                        // The new certificate still serves this process; a restart falls
                        // back to the previous one while it is valid.
                        tracing::error!(error = %e, "could not store the renewed node certificate");
                    }
                    tracing::info!(%server, serial = %current.leaf.serial,
                        not_after = %current.leaf.not_after_text, "node certificate renewed");
                    self.current.store(Arc::new(current));
                    return Ok(());
                }
                Err(CallError::Stop(e)) => return Err(e),
                Err(CallError::Next(m)) => failures.push(m),
            }
        }
        Err(IdentityError::Unreachable(failures.join("; ")))
    }
}

/// Renews `creds` at half its lifetime, for ever, until `shutdown` completes. Failures
/// are retried with backoff (1 s doubling, capped at a tenth of the time left; a refusal
/// with `PERMISSION_DENIED` waits the cap) until the certificate expires, then the task
/// ends with an error log: the node must enroll again.
pub fn spawn_renewal<S>(
    creds: Arc<NodeCredentials>,
    servers: Vec<String>,
    shutdown: S,
) -> JoinHandle<()>
where
    S: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        tokio::select! {
            () = renewal_loop(&creds, &servers) => {}
            () = shutdown => {}
        }
    })
}

fn until(t: SystemTime) -> Duration {
    t.duration_since(SystemTime::now()).unwrap_or_default()
}

async fn renewal_loop(creds: &NodeCredentials, servers: &[String]) {
    loop {
        let renew_at = creds.renew_at();
        tracing::debug!(in_ = ?until(renew_at), "node certificate renewal scheduled");
        tokio::time::sleep(until(renew_at)).await;
        let mut delay = RENEW_MIN_BACKOFF;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let Err(e) = creds.renew(servers).await else {
                break;
            };
            let left = until(creds.not_after());
            if left.is_zero() {
                tracing::error!(error = %e, attempt,
                    "the node certificate expired before it could be renewed; enroll again with a bootstrap token");
                return;
            }
            let cap = (left / 10).max(RENEW_MIN_BACKOFF);
            let wait = if e.is_permission_denied() {
                tracing::error!(error = %e, attempt, retry_in = ?cap, expires_in = ?left,
                    "the control plane refused to renew this node's certificate (revoked?)");
                cap
            } else {
                let wait = delay.min(cap);
                tracing::warn!(error = %e, attempt, retry_in = ?wait, expires_in = ?left,
                    "node certificate renewal failed; retrying");
                wait
            };
            tokio::time::sleep(wait).await;
            delay = (delay * 2).min(cap);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

    use super::*;

    #[test]
    fn tokens_split_at_the_last_dot() {
        let pin = ca_pin(b"ca");
        let token = format!("bpt_abc-_x.{pin}");
        let (secret, p) = split_token(&token).unwrap();
        assert_eq!(secret, "bpt_abc-_x");
        assert_eq!(p, Some(sha256(b"ca")));
        assert_eq!(split_token("bpt_abc").unwrap(), ("bpt_abc", None));
        assert!(matches!(
            split_token("bpt_abc.notapin"),
            Err(IdentityError::BadToken(_))
        ));
        assert!(matches!(split_token(""), Err(IdentityError::BadToken(_))));
    }

    #[test]
    fn spiffe_ids_parse() {
        assert_eq!(
            parse_spiffe("spiffe://biplane.local/gateway/default/web/node/n-1").unwrap(),
            (
                "biplane.local".to_owned(),
                "default/web".to_owned(),
                "n-1".to_owned()
            )
        );
        for bad in [
            "spiffe://td/gateway/default/web/node/",
            "spiffe://td/gateway/default/web/node/a/b",
            "https://td/gateway/default/web/node/a",
            "spiffe://td/gw/default/web/node/a",
            "spiffe:///gateway/default/web/node/a",
        ] {
            assert!(parse_spiffe(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn default_node_ids_are_valid() {
        let id = default_node_id();
        assert!(valid_segment(&id), "{id}");
        let (_, suffix) = id.rsplit_once('-').unwrap();
        assert_eq!(suffix.len(), 8);
        assert_ne!(default_node_id(), id);
    }

    #[test]
    fn server_names_come_from_the_address() {
        assert_eq!(
            server_name(None, "127.0.0.1:18000").unwrap(),
            ServerName::try_from("127.0.0.1").unwrap()
        );
        assert_eq!(
            server_name(None, "http://[::1]:18000").unwrap(),
            ServerName::try_from("::1").unwrap()
        );
        assert_eq!(
            server_name(None, "cp.example:18000").unwrap(),
            ServerName::try_from("cp.example").unwrap()
        );
        assert_eq!(
            server_name(Some("cp.internal"), "10.0.0.1:18000").unwrap(),
            ServerName::try_from("cp.internal").unwrap()
        );
    }

    #[test]
    fn renewal_is_due_half_way_from_when_it_was_obtained() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = CertificateParams::new(vec!["x".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let provider = rustls::crypto::ring::default_provider();
        let certified = CertifiedKey::from_der(
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            &provider,
        )
        .unwrap();
        let now = SystemTime::now();
        let leaf = Leaf {
            identity: String::new(),
            node_id: String::new(),
            gateway: String::new(),
            // Backdated a minute by the CA, valid 4 s from now.
            not_before: now - Duration::from_secs(60),
            not_after: now + Duration::from_secs(4),
            not_after_text: String::new(),
            serial: String::new(),
        };
        let current = Current {
            certified: Arc::new(certified),
            leaf,
            obtained: now,
        };
        assert_eq!(current.renew_at(), now + Duration::from_secs(2));
    }

    #[test]
    fn pem_encoding_round_trips() {
        let der = vec![7u8; 300];
        let pem = pem_encode("CERTIFICATE", &der);
        let parsed = pem_certs(pem.as_bytes()).unwrap();
        assert_eq!(parsed[0].as_ref(), der.as_slice());
    }
}
