//! TLS on the listener side: a ClientHello parser for SNI/ALPN inspection (over peeked,
//! unconsumed bytes) and the per-filter-chain rustls acceptors with SNI certificate
//! selection.
//!
//! Inspection works like Envoy's `tls_inspector`: the listener peeks the first bytes of a
//! connection, [`parse_client_hello`] says "not TLS", "need more bytes" or "here are the SNI
//! and ALPN", and the bytes stay in the socket for the terminating handshake or for a
//! passthrough upstream.

use std::collections::HashMap;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// Largest ClientHello handshake message accepted (Envoy `tls_inspector`'s default
/// `max_client_hello_size`). Larger hellos close the connection.
pub const MAX_CLIENT_HELLO: usize = 64 * 1024;

/// TLS record header length (type, version, length).
const RECORD_HEADER: usize = 5;
/// Largest TLS plaintext record fragment (2^14) plus the slack RFC 8446 allows for
/// compressed/legacy records; a longer record is malformed.
const MAX_RECORD: usize = 16384 + 2048;
const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;

/// What a ClientHello told us.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientHelloInfo {
    /// The first `host_name` of the server_name extension, lower-cased, trailing dot
    /// removed.
    pub sni: Option<String>,
    /// ALPN protocols offered by the client, in its order.
    pub alpn: Vec<Vec<u8>>,
}

/// Outcome of inspecting the first bytes of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inspection {
    /// The bytes are not a TLS handshake record (plaintext).
    NotTls,
    /// A TLS handshake that is not complete yet: at least `needed` bytes (in total, from
    /// the start of the stream) are required to go on.
    Incomplete { needed: usize },
    /// A complete ClientHello.
    Hello(ClientHelloInfo),
}

/// A TLS handshake record that cannot be a valid ClientHello.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    #[error("ClientHello larger than {MAX_CLIENT_HELLO} bytes")]
    TooLarge,
}

/// Parses the first bytes of a connection as a TLS ClientHello, possibly fragmented over
/// several handshake records. Never panics, whatever the input.
pub fn parse_client_hello(buf: &[u8]) -> Result<Inspection, HelloError> {
    // Plaintext detection needs the content type and the major version.
    match buf {
        [] => return Ok(Inspection::Incomplete { needed: 1 }),
        [first, ..] if *first != CONTENT_HANDSHAKE => return Ok(Inspection::NotTls),
        [_] => return Ok(Inspection::Incomplete { needed: 2 }),
        [_, major, ..] if *major != 3 => return Ok(Inspection::NotTls),
        _ => {}
    }

    // Walk handshake records, gathering the handshake message they carry. The common case
    // (one record holds the whole hello) borrows; only fragmented hellos copy.
    let mut offset = 0usize;
    let mut first: &[u8] = &[];
    let mut gathered: Vec<u8> = Vec::new();
    let mut records = 0usize;
    loop {
        let Some(header) = buf.get(offset..offset + RECORD_HEADER) else {
            return Ok(Inspection::Incomplete {
                needed: offset + RECORD_HEADER,
            });
        };
        if header[0] != CONTENT_HANDSHAKE {
            return Err(HelloError::Malformed(
                "non-handshake record before the ClientHello ended",
            ));
        }
        if header[1] != 3 {
            return Err(HelloError::Malformed("record version"));
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > MAX_RECORD {
            return Err(HelloError::Malformed("record length"));
        }
        let start = offset + RECORD_HEADER;
        let Some(fragment) = buf.get(start..start + len) else {
            return Ok(Inspection::Incomplete {
                needed: start + len,
            });
        };
        offset = start + len;
        records += 1;
        let message: &[u8] = if records == 1 {
            first = fragment;
            fragment
        } else {
            if records == 2 {
                gathered.extend_from_slice(first);
            }
            gathered.extend_from_slice(fragment);
            &gathered
        };

        // Handshake header: type, 24-bit length. It may itself be split over records.
        let Some(hs_header) = message.get(..4) else {
            continue;
        };
        if hs_header[0] != HANDSHAKE_CLIENT_HELLO {
            return Err(HelloError::Malformed(
                "first handshake message is not a ClientHello",
            ));
        }
        let hs_len = (usize::from(hs_header[1]) << 16)
            | (usize::from(hs_header[2]) << 8)
            | usize::from(hs_header[3]);
        if hs_len > MAX_CLIENT_HELLO {
            return Err(HelloError::TooLarge);
        }
        let total = 4 + hs_len;
        if message.len() >= total {
            return parse_hello_body(&message[4..total]).map(Inspection::Hello);
        }
        // The hello goes on in the next record(s): at least one more header and the rest.
        if buf.len() < offset + RECORD_HEADER {
            let rest = total - message.len();
            return Ok(Inspection::Incomplete {
                needed: offset + RECORD_HEADER + rest,
            });
        }
    }
}

/// A bounds-checked reader over a byte slice.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], HelloError> {
        if self.rest.len() < n {
            return Err(HelloError::Malformed(what));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, HelloError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, HelloError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a one-byte length prefix.
    fn vec8(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let n = self.u8(what)?;
        self.take(usize::from(n), what)
    }

    /// A vector with a two-byte length prefix.
    fn vec16(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let n = self.u16(what)?;
        self.take(usize::from(n), what)
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }
}

fn parse_hello_body(body: &[u8]) -> Result<ClientHelloInfo, HelloError> {
    let mut r = Reader::new(body);
    let version = r.u16("legacy_version")?;
    if version >> 8 != 3 {
        return Err(HelloError::Malformed("legacy_version"));
    }
    r.take(32, "random")?;
    let session_id = r.vec8("session_id")?;
    if session_id.len() > 32 {
        return Err(HelloError::Malformed("session_id length"));
    }
    let suites = r.vec16("cipher_suites")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(HelloError::Malformed("cipher_suites length"));
    }
    let compression = r.vec8("compression_methods")?;
    if compression.is_empty() {
        return Err(HelloError::Malformed("compression_methods length"));
    }
    let mut info = ClientHelloInfo::default();
    if r.is_empty() {
        // Pre-TLS-1.2 hellos may omit extensions altogether.
        return Ok(info);
    }
    let mut exts = Reader::new(r.vec16("extensions")?);
    if !r.is_empty() {
        return Err(HelloError::Malformed("trailing bytes after extensions"));
    }
    let mut seen_sni = false;
    let mut seen_alpn = false;
    while !exts.is_empty() {
        let ty = exts.u16("extension type")?;
        let data = exts.vec16("extension data")?;
        match ty {
            EXT_SERVER_NAME => {
                if std::mem::replace(&mut seen_sni, true) {
                    return Err(HelloError::Malformed("duplicate server_name extension"));
                }
                info.sni = parse_sni(data)?;
            }
            EXT_ALPN => {
                if std::mem::replace(&mut seen_alpn, true) {
                    return Err(HelloError::Malformed("duplicate ALPN extension"));
                }
                info.alpn = parse_alpn(data)?;
            }
            _ => {}
        }
    }
    Ok(info)
}

fn parse_sni(data: &[u8]) -> Result<Option<String>, HelloError> {
    let mut r = Reader::new(data);
    let mut list = Reader::new(r.vec16("server_name_list")?);
    if !r.is_empty() {
        return Err(HelloError::Malformed("trailing bytes in server_name"));
    }
    let mut sni = None;
    while !list.is_empty() {
        let name_type = list.u8("server_name type")?;
        let name = list.vec16("server_name")?;
        if name_type != 0 || sni.is_some() {
            continue;
        }
        let name = name.strip_suffix(b".").unwrap_or(name);
        if name.is_empty()
            || name.len() > 253
            || !name.iter().all(|b| b.is_ascii_graphic() && *b != b'/')
        {
            return Err(HelloError::Malformed("server_name is not a host name"));
        }
        let mut s = String::with_capacity(name.len());
        s.extend(name.iter().map(|b| char::from(b.to_ascii_lowercase())));
        sni = Some(s);
    }
    Ok(sni)
}

fn parse_alpn(data: &[u8]) -> Result<Vec<Vec<u8>>, HelloError> {
    let mut r = Reader::new(data);
    let mut list = Reader::new(r.vec16("ALPN list")?);
    if !r.is_empty() {
        return Err(HelloError::Malformed("trailing bytes in ALPN"));
    }
    let mut out = Vec::new();
    while !list.is_empty() {
        let proto = list.vec8("ALPN protocol")?;
        if proto.is_empty() {
            return Err(HelloError::Malformed("empty ALPN protocol"));
        }
        out.push(proto.to_vec());
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Termination
// ---------------------------------------------------------------------------------------

/// A filter chain's TLS settings that rustls refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("certificate {name:?}: no certificate in the PEM chain")]
    NoCertificate { name: String },
    #[error("certificate {name:?}: bad PEM: {source}")]
    Pem {
        name: String,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("certificate {name:?}: cannot parse the leaf certificate: {reason}")]
    Leaf { name: String, reason: String },
    #[error("certificate {name:?}: {source}")]
    Key {
        name: String,
        #[source]
        source: rustls::Error,
    },
    #[error("no certificate configured")]
    NoCertificates,
    #[error("TLS server config: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Builds the acceptor of one TLS-terminating filter chain (ring provider, TLS 1.2 and
/// 1.3, no client certificates, ALPN from the config, certificate chosen by SNI).
pub fn build_acceptor(tls: &biplane_config::TlsTermination) -> Result<TlsAcceptor, TlsConfigError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let resolver = SniResolver::new(&tls.certificates, &provider)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = tls.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Picks the served certificate by SNI.
///
/// Names come from each leaf certificate itself (DNS SANs, or the subject CN when the
/// certificate has no DNS SAN), so the choice does not depend on how the Secrets were
/// named. Order: an exact name, then a wildcard certificate (`*.example.com` covers exactly
/// one more label, as RFC 6125 has clients check), then the first configured certificate.
/// When two certificates claim the same name, the first in config order wins.
pub struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the suffix after `*.`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl std::fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SniResolver")
            .field("exact", &self.exact.keys().collect::<Vec<_>>())
            .field("wildcard", &self.wildcard.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl SniResolver {
    pub fn new(
        certificates: &[biplane_config::Certificate],
        provider: &CryptoProvider,
    ) -> Result<Self, TlsConfigError> {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        let mut default = None;
        for cert in certificates {
            let (key, names) = load_certificate(cert, provider)?;
            let key = Arc::new(key);
            for name in names {
                let name = name.trim_end_matches('.').to_ascii_lowercase();
                match name.strip_prefix("*.") {
                    Some(suffix) => wildcard.entry(suffix.to_owned()),
                    None => exact.entry(name),
                }
                .or_insert_with(|| key.clone());
            }
            default.get_or_insert(key);
        }
        let default = default.ok_or(TlsConfigError::NoCertificates)?;
        Ok(Self {
            exact,
            wildcard,
            default,
        })
    }

    /// The certificate served for an SNI (or for none).
    pub fn select(&self, sni: Option<&str>) -> &Arc<CertifiedKey> {
        let Some(sni) = sni else { return &self.default };
        if let Some(key) = self.exact.get(sni) {
            return key;
        }
        if let Some((_, parent)) = sni.split_once('.')
            && let Some(key) = self.wildcard.get(parent)
        {
            return key;
        }
        &self.default
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // rustls hands the SNI over already validated and lower-cased.
        Some(self.select(client_hello.server_name()).clone())
    }
}

/// Parses a PEM chain and key into a rustls key, and the DNS names the leaf covers.
fn load_certificate(
    cert: &biplane_config::Certificate,
    provider: &CryptoProvider,
) -> Result<(CertifiedKey, Vec<String>), TlsConfigError> {
    let pem_err = |source| TlsConfigError::Pem {
        name: cert.name.clone(),
        source,
    };
    let chain = CertificateDer::pem_slice_iter(cert.cert_chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err)?;
    let Some(leaf) = chain.first() else {
        return Err(TlsConfigError::NoCertificate {
            name: cert.name.clone(),
        });
    };
    let names = leaf_names(leaf).map_err(|reason| TlsConfigError::Leaf {
        name: cert.name.clone(),
        reason,
    })?;
    let key = PrivateKeyDer::from_pem_slice(cert.private_key_pem.as_bytes()).map_err(pem_err)?;
    let key =
        CertifiedKey::from_der(chain, key, provider).map_err(|source| TlsConfigError::Key {
            name: cert.name.clone(),
            source,
        })?;
    Ok((key, names))
}

/// DNS SANs of a certificate, or its subject CNs when it has no DNS SAN.
fn leaf_names(leaf: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf).map_err(|e| e.to_string())?;
    let mut names = Vec::new();
    if let Some(san) = parsed
        .subject_alternative_name()
        .map_err(|e| e.to_string())?
    {
        for general in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(name) = general {
                names.push((*name).to_owned());
            }
        }
    }
    if names.is_empty() {
        for cn in parsed.subject().iter_common_name() {
            if let Ok(cn) = cn.as_str() {
                names.push(cn.to_owned());
            }
        }
    }
    Ok(names)
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

    use super::*;
    use proptest::prelude::*;

    /// The first flight of a real rustls client, as it would arrive on the wire.
    pub(crate) fn rustls_client_hello(sni: &str, alpn: &[&[u8]]) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let name = rustls_pki_types::ServerName::try_from(sni.to_owned()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    /// Re-frames the handshake bytes of `wire` into records of at most `size` bytes.
    fn refragment(wire: &[u8], size: usize) -> Vec<u8> {
        let len = usize::from(u16::from_be_bytes([wire[3], wire[4]]));
        let hs = &wire[5..5 + len];
        let mut out = Vec::new();
        for chunk in hs.chunks(size) {
            out.extend_from_slice(&[22, 3, 1]);
            out.extend_from_slice(&u16::try_from(chunk.len()).unwrap().to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    #[test]
    fn parses_a_real_rustls_client_hello() {
        let wire = rustls_client_hello("Api.Example.COM", &[b"h2", b"http/1.1"]);
        let got = parse_client_hello(&wire).unwrap();
        assert_eq!(
            got,
            Inspection::Hello(ClientHelloInfo {
                sni: Some("api.example.com".into()),
                alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            })
        );
    }

    #[test]
    fn every_strict_prefix_is_incomplete_with_a_growing_need() {
        let wire = rustls_client_hello("a.example.com", &[b"h2"]);
        for n in 0..wire.len() {
            match parse_client_hello(&wire[..n]).unwrap() {
                Inspection::Incomplete { needed } => {
                    assert!(needed > n, "prefix {n}: needed {needed}");
                    assert!(
                        needed <= wire.len(),
                        "prefix {n}: needed {needed} > {}",
                        wire.len()
                    );
                }
                other => panic!("prefix {n}: {other:?}"),
            }
        }
    }

    #[test]
    fn hello_fragmented_over_many_records() {
        let wire = rustls_client_hello("frag.example.com", &[b"http/1.1"]);
        for size in [1, 2, 3, 4, 5, 50, 100, 1000] {
            let frag = refragment(&wire, size);
            let got = parse_client_hello(&frag).unwrap();
            let Inspection::Hello(info) = got else {
                panic!("size {size}: {got:?}")
            };
            assert_eq!(info.sni.as_deref(), Some("frag.example.com"));
            assert_eq!(info.alpn, vec![b"http/1.1".to_vec()]);
            for n in 0..frag.len() {
                match parse_client_hello(&frag[..n]).unwrap() {
                    Inspection::Incomplete { needed } => {
                        assert!(needed > n && needed <= frag.len())
                    }
                    other => panic!("size {size} prefix {n}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn plaintext_is_not_tls() {
        assert_eq!(
            parse_client_hello(b"GET / HTTP/1.1\r\n").unwrap(),
            Inspection::NotTls
        );
        assert_eq!(
            parse_client_hello(b"PRI * HTTP/2.0").unwrap(),
            Inspection::NotTls
        );
        assert_eq!(parse_client_hello(&[22, 7]).unwrap(), Inspection::NotTls);
        assert_eq!(
            parse_client_hello(&[22]).unwrap(),
            Inspection::Incomplete { needed: 2 }
        );
    }

    #[test]
    fn rejects_garbage_handshakes() {
        // A ServerHello (type 2) instead of a ClientHello.
        let rec = [22, 3, 1, 0, 4, 2, 0, 0, 0];
        assert!(parse_client_hello(&rec).is_err());
        // Record length 0.
        assert!(parse_client_hello(&[22, 3, 1, 0, 0]).is_err());
        // An alert record while the hello is incomplete.
        let mut wire = refragment(&rustls_client_hello("x.example", &[]), 10);
        wire[15] = 21;
        assert!(parse_client_hello(&wire).is_err());
        // A handshake that claims to be larger than the limit.
        assert_eq!(
            parse_client_hello(&[22, 3, 1, 0, 4, 1, 0x10, 0, 0]),
            Err(HelloError::TooLarge)
        );
        // Truncated body inside a complete handshake message.
        assert!(parse_client_hello(&[22, 3, 1, 0, 6, 1, 0, 0, 2, 3, 3]).is_err());
    }

    #[test]
    fn hello_without_sni_or_alpn() {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[0u8; 32]);
        body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
        let mut wire = vec![22, 3, 1];
        wire.extend_from_slice(&u16::try_from(body.len() + 4).unwrap().to_be_bytes());
        wire.extend_from_slice(&[1, 0, 0, u8::try_from(body.len()).unwrap()]);
        wire.extend_from_slice(&body);
        assert_eq!(
            parse_client_hello(&wire).unwrap(),
            Inspection::Hello(ClientHelloInfo::default())
        );
    }

    proptest! {
        #[test]
        fn never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_client_hello(&bytes);
        }

        #[test]
        fn never_panics_on_garbage_behind_a_handshake_header(
            len in 0u16..700,
            hs_len in 0u32..700,
            body in proptest::collection::vec(any::<u8>(), 0..700),
        ) {
            let mut wire = vec![22, 3, 1];
            wire.extend_from_slice(&len.to_be_bytes());
            wire.push(1);
            wire.extend_from_slice(&hs_len.to_be_bytes()[1..]);
            wire.extend_from_slice(&body);
            let _ = parse_client_hello(&wire);
        }

        #[test]
        fn never_panics_on_mutated_real_hellos(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut wire = rustls_client_hello("m.example.com", &[b"h2"]);
            for (at, byte) in flips {
                let i = at.index(wire.len());
                wire[i] = byte;
            }
            let cut = cut.index(wire.len() + 1);
            let _ = parse_client_hello(&wire[..cut]);
        }
    }
}
