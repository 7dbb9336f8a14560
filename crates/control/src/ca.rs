//! The control plane's certificate authority: a root CA created on first start in
//! `<data-dir>/ca/` (or loaded from `--ca-cert/--ca-key`), the control plane's own server
//! certificate, short-lived node certificates signed from CSRs for an enrolled SPIFFE
//! identity, and parsing that identity back from a peer certificate.
//!
//! # Trust model
//! The CA key never leaves the control plane: it is written once with mode 0600 in a 0700
//! directory. A node sends a PKCS#10 CSR; only its public key is used. The subject, the
//! SANs and the extensions of the certificate are set by the CA from the identity the
//! node enrolled as (`spiffe://<trust-domain>/gateway/<ns>/<name>/node/<id>`), never from
//! what the CSR asks for. Node certificates carry the client-auth EKU only.

use std::fmt;
use std::fs;

use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use time::OffsetDateTime;

/// The default SPIFFE trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "biplane.local";
/// The default lifetime of a node certificate.
pub const DEFAULT_NODE_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// The Common Name of a generated root CA.
pub const ROOT_CA_CN: &str = "biplane root CA";
/// The directory of the generated CA inside the data directory.
pub const CA_DIR: &str = "ca";
/// The CA certificate's file name inside [`CA_DIR`].
pub const CA_CERT_FILE: &str = "ca.crt";
/// The CA key's file name inside [`CA_DIR`].
pub const CA_KEY_FILE: &str = "ca.key";

/// Validity of a generated root CA.
const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Validity of the control plane's server certificate (re-issued at every start).
const SERVER_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// How far back `not_before` is set, to tolerate clock skew between hosts.
const BACKDATE: Duration = Duration::from_secs(60);

/// Why a CA operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A file could not be read or written.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The given or stored CA material is unusable.
    #[error("invalid CA: {0}")]
    InvalidCa(String),
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// The CSR could not be parsed or its signature does not verify.
    #[error("invalid CSR: {0}")]
    InvalidCsr(String),
    /// An identity is malformed or not of this trust domain.
    #[error("invalid identity: {0}")]
    InvalidIdentity(String),
    /// A peer certificate could not be parsed or carries no SPIFFE identity.
    #[error("invalid certificate: {0}")]
    InvalidCertificate(String),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CaError {
    let path = path.to_path_buf();
    move |source| CaError::Io { what, path, source }
}

/// A node's identity: `spiffe://<trust_domain>/gateway/<namespace>/<gateway>/node/<node_id>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NodeIdentity {
    /// The SPIFFE trust domain.
    pub trust_domain: String,
    /// The Gateway's namespace.
    pub namespace: String,
    /// The Gateway's name.
    pub gateway: String,
    /// The node id (the proxy's `node.id`).
    pub node_id: String,
}

/// Whether `s` is a valid SPIFFE path segment (letters, digits, `.`, `-`, `_`; not `.`/`..`).
fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// Whether `s` is a valid trust domain (lowercase letters, digits, `.`, `-`, `_`).
fn valid_trust_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
}

impl NodeIdentity {
    /// A validated identity.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        gateway: &str,
        node_id: &str,
    ) -> Result<Self, CaError> {
        if !valid_trust_domain(trust_domain) {
            return Err(CaError::InvalidIdentity(format!(
                "trust domain {trust_domain:?} must be lowercase letters, digits, '.', '-' or '_'"
            )));
        }
        for (what, s) in [
            ("namespace", namespace),
            ("gateway name", gateway),
            ("node id", node_id),
        ] {
            if !valid_segment(s) {
                return Err(CaError::InvalidIdentity(format!(
                    "{what} {s:?} must be non-empty letters, digits, '.', '-' or '_'"
                )));
            }
        }
        Ok(NodeIdentity {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            gateway: gateway.to_owned(),
            node_id: node_id.to_owned(),
        })
    }

    /// The SPIFFE ID (the certificate's URI SAN).
    pub fn uri(&self) -> String {
        format!(
            "spiffe://{}/gateway/{}/{}/node/{}",
            self.trust_domain, self.namespace, self.gateway, self.node_id
        )
    }

    /// The Gateway as `namespace/name` (the proxy's `node.cluster`).
    pub fn gateway_ref(&self) -> String {
        format!("{}/{}", self.namespace, self.gateway)
    }

    /// Parses a SPIFFE ID of the form [`NodeIdentity::uri`] returns.
    pub fn parse(uri: &str) -> Result<Self, CaError> {
        let bad = || {
            CaError::InvalidIdentity(format!(
                "{uri:?} is not a biplane node SPIFFE ID (spiffe://<trust-domain>/gateway/<ns>/<name>/node/<id>)"
            ))
        };
        let rest = uri.strip_prefix("spiffe://").ok_or_else(bad)?;
        let mut parts = rest.split('/');
        let (Some(td), Some("gateway"), Some(ns), Some(name), Some("node"), Some(id), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(bad());
        };
        Self::new(td, ns, name, id)
    }
}

impl fmt::Display for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri())
    }
}

/// Where the CA comes from.
#[derive(Clone, Debug)]
pub enum CaSource {
    /// `<data_dir>/ca/`: loaded if present, created otherwise.
    DataDir(PathBuf),
    /// Given files (`--ca-cert`, `--ca-key`).
    Files {
        /// The PEM certificate.
        cert: PathBuf,
        /// The PEM private key (PKCS#8).
        key: PathBuf,
    },
}

/// A certificate and its private key, PEM encoded.
#[derive(Clone)]
pub struct CertAndKey {
    /// The certificate chain, leaf first (PEM).
    pub cert_pem: String,
    /// The private key (PKCS#8 PEM).
    pub key_pem: String,
}

impl fmt::Debug for CertAndKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertAndKey")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// A node certificate issued from a CSR.
#[derive(Clone, Debug)]
pub struct IssuedCert {
    /// The certificate (PEM).
    pub cert_pem: String,
    /// The certificate (DER).
    pub cert_der: Vec<u8>,
    /// The identity it certifies.
    pub identity: NodeIdentity,
    /// The end of its validity.
    pub not_after: SystemTime,
}

/// The control plane's CA.
pub struct Ca {
    trust_domain: String,
    cert_pem: String,
    cert_der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
    node_cert_ttl: Duration,
    /// The certificate's file, when it is on disk.
    cert_path: Option<PathBuf>,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("cert_path", &self.cert_path)
            .field("node_cert_ttl", &self.node_cert_ttl)
            .finish_non_exhaustive()
    }
}

fn offset(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

fn random_serial(rng: &SystemRandom) -> Result<SerialNumber, CaError> {
    let mut bytes = vec![0u8; 16];
    rng.fill(&mut bytes)
        .map_err(|_| CaError::InvalidCa("the system random generator failed".to_owned()))?;
    // Positive, and no leading zero byte to be stripped.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from(bytes))
}

fn ia5(s: String) -> Result<Ia5String, CaError> {
    Ia5String::try_from(s.clone())
        .map_err(|_| CaError::InvalidIdentity(format!("{s:?} is not ASCII")))
}

/// Writes `contents` to `path` with `mode` (through a temporary file and a rename).
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    biplane_xds::atomic_file::write(path, contents, mode).map_err(|e| CaError::Io {
        what: e.what,
        path: e.path,
        source: e.source,
    })
}

/// Creates `dir` (and parents) and sets its mode to 0700.
pub(crate) fn private_dir(dir: &Path) -> Result<(), CaError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err("cannot create directory", dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(io_err("cannot set permissions of", dir))
}

/// Writes a secret file with mode 0600 (used for the CA key and the admin token).
pub(crate) fn write_secret_file(path: &Path, contents: &[u8]) -> Result<(), CaError> {
    write_file(path, contents, 0o600)
}

/// Writes a non-secret file atomically with mode 0644.
pub(crate) fn write_public_file(path: &Path, contents: &[u8]) -> Result<(), CaError> {
    write_file(path, contents, 0o644)
}

impl Ca {
    /// Loads or creates the CA (see [`CaSource`]).
    pub fn open(
        source: &CaSource,
        trust_domain: &str,
        node_cert_ttl: Duration,
    ) -> Result<Ca, CaError> {
        if !valid_trust_domain(trust_domain) {
            return Err(CaError::InvalidIdentity(format!(
                "trust domain {trust_domain:?} must be lowercase letters, digits, '.', '-' or '_'"
            )));
        }
        if node_cert_ttl.is_zero() {
            return Err(CaError::InvalidCa(
                "the node certificate lifetime must be positive".to_owned(),
            ));
        }
        let (cert_path, key_path) = match source {
            CaSource::Files { cert, key } => (cert.clone(), key.clone()),
            CaSource::DataDir(data_dir) => {
                let dir = data_dir.join(CA_DIR);
                let cert = dir.join(CA_CERT_FILE);
                let key = dir.join(CA_KEY_FILE);
                match (cert.exists(), key.exists()) {
                    (false, false) => {
                        Self::create(&dir, &cert, &key)?;
                        tracing::info!(cert = %cert.display(), key = %key.display(), "created the root CA");
                    }
                    (true, true) => {}
                    _ => {
                        return Err(CaError::InvalidCa(format!(
                            "{} holds only one of {CA_CERT_FILE} and {CA_KEY_FILE}; restore the other or remove both to create a new CA",
                            dir.display()
                        )));
                    }
                }
                (cert, key)
            }
        };
        let mut ca = Self::load(&cert_path, &key_path)?;
        ca.trust_domain = trust_domain.to_owned();
        ca.node_cert_ttl = node_cert_ttl;
        Ok(ca)
    }

    /// Generates a root CA and writes it (certificate 0644, key 0600, directory 0700).
    fn create(dir: &Path, cert_path: &Path, key_path: &Path) -> Result<(), CaError> {
        private_dir(dir)?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, ROOT_CA_CN);
        dn.push(DnType::OrganizationName, "biplane");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = offset(now - BACKDATE);
        params.not_after = offset(now + ROOT_VALIDITY);
        params.serial_number = Some(random_serial(&SystemRandom::new())?);
        let cert = params.self_signed(&key)?;
        // The key first: a crash in between leaves "key only", which is refused loudly
        // instead of silently creating a second CA.
        write_file(key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_file(cert_path, cert.pem().as_bytes(), 0o644)?;
        Ok(())
    }

    fn load(cert_path: &Path, key_path: &Path) -> Result<Ca, CaError> {
        let cert_pem = fs::read_to_string(cert_path)
            .map_err(io_err("cannot read the CA certificate", cert_path))?;
        let key_pem =
            fs::read_to_string(key_path).map_err(io_err("cannot read the CA key", key_path))?;
        if let Ok(meta) = fs::metadata(key_path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                key = %key_path.display(),
                mode = format!("{:o}", meta.permissions().mode() & 0o777),
                "the CA key is readable by other users; chmod 600 it"
            );
        }
        let key = KeyPair::from_pem(&key_pem).map_err(|e| {
            CaError::InvalidCa(format!(
                "{}: not a PEM private key: {e}",
                key_path.display()
            ))
        })?;
        let block = pem_block(&cert_pem, "CERTIFICATE").ok_or_else(|| {
            CaError::InvalidCa(format!("{}: no PEM certificate", cert_path.display()))
        })?;
        {
            let (_, parsed) = x509_parser::parse_x509_certificate(&block)
                .map_err(|e| CaError::InvalidCa(format!("{}: {e}", cert_path.display())))?;
            if !parsed.is_ca() {
                return Err(CaError::InvalidCa(format!(
                    "{} is not a CA certificate (basicConstraints CA:TRUE missing)",
                    cert_path.display()
                )));
            }
            if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
                return Err(CaError::InvalidCa(format!(
                    "the key {} does not match the certificate {}",
                    key_path.display(),
                    cert_path.display()
                )));
            }
        }
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
            .map_err(|e| CaError::InvalidCa(format!("{}: {e}", cert_path.display())))?;
        Ok(Ca {
            trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
            cert_pem,
            cert_der: block,
            issuer,
            node_cert_ttl: DEFAULT_NODE_CERT_TTL,
            cert_path: Some(cert_path.to_path_buf()),
        })
    }

    /// The trust domain of the identities this CA issues.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The CA certificate (PEM): the bundle clients verify the control plane with.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate (DER).
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The CA certificate's file.
    pub fn cert_path(&self) -> Option<&Path> {
        self.cert_path.as_deref()
    }

    /// The CA certificate's pin: unpadded base64url of the SHA-256 of its DER. A
    /// bootstrap token is handed out as `<token>.<pin>` so a node can verify the control
    /// plane on its first contact without a CA file.
    pub fn pin(&self) -> String {
        use base64::Engine;
        let digest = ring::digest::digest(&ring::digest::SHA256, &self.cert_der);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref())
    }

    /// The lifetime of node certificates.
    pub fn node_cert_ttl(&self) -> Duration {
        self.node_cert_ttl
    }

    /// Issues a server certificate for the control plane with `names` (DNS names or IP
    /// addresses) as SANs, valid for a year, with a fresh P-256 key. The returned chain is
    /// the leaf followed by the CA certificate.
    pub fn issue_server_cert(&self, names: &[String]) -> Result<CertAndKey, CaError> {
        if names.is_empty() {
            return Err(CaError::InvalidIdentity(
                "a server certificate needs at least one name".to_owned(),
            ));
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "biplane control plane");
        params.distinguished_name = dn;
        for n in names {
            let san = match n.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(ia5(n.clone())?),
            };
            params.subject_alt_names.push(san);
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = SystemTime::now();
        params.not_before = offset(now - BACKDATE);
        params.not_after = offset(now + SERVER_VALIDITY);
        params.serial_number = Some(random_serial(&SystemRandom::new())?);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertAndKey {
            cert_pem: format!("{}{}", cert.pem(), self.cert_pem),
            key_pem: key.serialize_pem(),
        })
    }

    /// Checks that a PEM PKCS#10 CSR parses and its self-signature verifies (before a
    /// bootstrap token use is spent on it).
    pub fn check_csr(&self, csr_pem: &str) -> Result<(), CaError> {
        CertificateSigningRequestParams::from_pem(csr_pem)
            .map(|_| ())
            .map_err(|e| CaError::InvalidCsr(e.to_string()))
    }

    /// Signs a PEM PKCS#10 CSR for `identity` with the default node lifetime.
    pub fn sign_csr(&self, csr_pem: &str, identity: &NodeIdentity) -> Result<IssuedCert, CaError> {
        self.sign_csr_for(csr_pem, identity, self.node_cert_ttl)
    }

    /// Signs a PEM PKCS#10 CSR for `identity`, valid for `ttl`. Only the CSR's public key
    /// is used (after its self-signature is checked); the URI SAN, subject and extensions
    /// come from `identity`.
    pub fn sign_csr_for(
        &self,
        csr_pem: &str,
        identity: &NodeIdentity,
        ttl: Duration,
    ) -> Result<IssuedCert, CaError> {
        if identity.trust_domain != self.trust_domain {
            return Err(CaError::InvalidIdentity(format!(
                "{identity} is not in this CA's trust domain {}",
                self.trust_domain
            )));
        }
        if ttl.is_zero() {
            return Err(CaError::InvalidCsr(
                "the lifetime must be positive".to_owned(),
            ));
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::InvalidCsr(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, identity.node_id.as_str());
        dn.push(DnType::OrganizationName, identity.gateway_ref());
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(ia5(identity.uri())?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let now = SystemTime::now();
        let not_after = now + ttl;
        params.not_before = offset(now - BACKDATE);
        params.not_after = offset(not_after);
        params.serial_number = Some(random_serial(&SystemRandom::new())?);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            identity: identity.clone(),
            not_after,
        })
    }
}

/// The DER contents of the first PEM block labelled `label` in `pem`.
fn pem_block(pem: &str, label: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = pem.find(&begin)? + begin.len();
    let stop = start + pem[start..].find(&end)?;
    let body: String = pem[start..stop].split_whitespace().collect();
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

/// The biplane node identity in a peer certificate's URI SAN (DER input). The chain and
/// validity are the TLS layer's job; this only reads the identity.
pub fn identity_of(cert_der: &[u8]) -> Result<NodeIdentity, CaError> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| CaError::InvalidCertificate(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| CaError::InvalidCertificate(e.to_string()))?
        .ok_or_else(|| CaError::InvalidCertificate("no subjectAltName extension".to_owned()))?;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
        _ => None,
    });
    let uri = uris
        .next()
        .ok_or_else(|| CaError::InvalidCertificate("no spiffe:// URI SAN".to_owned()))?;
    if uris.next().is_some() {
        return Err(CaError::InvalidCertificate(
            "more than one spiffe:// URI SAN".to_owned(),
        ));
    }
    NodeIdentity::parse(uri)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

    use super::*;

    #[test]
    fn identity_uri_round_trip() {
        let id = NodeIdentity::new("biplane.local", "default", "web", "node-1").unwrap();
        assert_eq!(
            id.uri(),
            "spiffe://biplane.local/gateway/default/web/node/node-1"
        );
        assert_eq!(NodeIdentity::parse(&id.uri()).unwrap(), id);
        for bad in [
            "spiffe://biplane.local/gateway/default/web/node/",
            "spiffe://biplane.local/gateway/default/web/node/a/b",
            "https://biplane.local/gateway/default/web/node/a",
            "spiffe://Biplane/gateway/default/web/node/a",
            "spiffe://biplane.local/gw/default/web/node/a",
            "spiffe://biplane.local/gateway/../web/node/a",
        ] {
            assert!(NodeIdentity::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pem_block_decodes() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = CertificateParams::new(vec!["x".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(
            pem_block(&cert.pem(), "CERTIFICATE").unwrap(),
            cert.der().to_vec()
        );
        assert!(pem_block("nothing", "CERTIFICATE").is_none());
    }
}
