//! The proxy's identity against a TLS control plane built here (an rcgen CA, a server
//! chain of leaf + CA, client certificates optional): enrollment with a pinned token or a
//! CA file, the stored files and their modes, restart without a token, a wrong pin, a bad
//! token, ADS over mTLS, and renewal of a 4 s certificate while the ADS stream stays up.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod client_util;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use biplane_xds::client::ClientOptions;
use biplane_xds::client::identity::{
    CA_FILE, CERT_FILE, IdentityError, IdentityOptions, KEY_FILE, NodeCredentials, ca_pin,
    load_or_enroll, spawn_renewal,
};
use biplane_xds::node_rpc::{
    CertificateResponse, EnrollRequest, NodeCertificates, NodeCertificatesServer, RenewRequest,
    bearer_token,
};
use biplane_xds::server::{AdsServer, FleetStatus, SnapshotCache};
use client_util::{WAIT, eventually, gw, marker, resources, run_client};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

const GOOD_TOKEN: &str = "bpt_good-secret_1";

struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: Vec<u8>,
}

impl TestCa {
    fn new() -> TestCa {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "test root CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            issuer: Issuer::new(params, key),
        }
    }

    /// The control plane's chain (leaf for 127.0.0.1, then the CA) and key.
    fn server_cert(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (
            vec![
                cert.der().clone(),
                CertificateDer::from(self.cert_der.clone()),
            ],
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
    }

    /// A node certificate for the CSR's key, as the control plane's CA issues them
    /// (backdated a minute, the identity set by the CA).
    fn sign(
        &self,
        csr_pem: &str,
        node_id: &str,
        ttl: Duration,
    ) -> Result<CertificateResponse, Status> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| Status::invalid_argument(format!("bad CSR: {e}")))?;
        let identity = format!("spiffe://biplane.local/gateway/default/gw/node/{node_id}");
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(identity.clone().try_into().unwrap())];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(60)).into();
        params.not_after = (now + ttl).into();
        params.serial_number = Some(rand::random::<u64>().into());
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&csr.public_key, &self.issuer).unwrap();
        Ok(CertificateResponse {
            identity,
            certificate_pem: cert.pem(),
            ca_certificate_pem: self.cert_pem.clone(),
            not_after_unix: (now + ttl)
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64,
            gateway: "default/gw".to_owned(),
            node_id: node_id.to_owned(),
        })
    }
}

fn serial_of(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    cert.raw_serial_as_string()
}

fn node_of(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    let uri = san
        .value
        .general_names
        .iter()
        .find_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .unwrap();
    uri.rsplit('/').next().unwrap().to_owned()
}

/// What the control plane saw.
#[derive(Default)]
struct Seen {
    enrolls: AtomicUsize,
    renews: AtomicUsize,
    revoked: AtomicBool,
    /// The client certificate serial of every TLS connection, in accept order.
    connections: Mutex<Vec<Option<String>>>,
    /// Serials issued, in order.
    issued: Mutex<Vec<String>>,
}

struct Service {
    ca: Arc<TestCa>,
    ttl: Duration,
    seen: Arc<Seen>,
}

impl Service {
    fn issued(&self, resp: &CertificateResponse) {
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(resp.certificate_pem.as_bytes())
            .map(|c: CertificateDer<'static>| serial_of(&c))
            .unwrap();
        self.seen.issued.lock().unwrap().push(der);
    }
}

#[tonic::async_trait]
impl NodeCertificates for Service {
    async fn enroll(
        &self,
        request: Request<EnrollRequest>,
    ) -> Result<Response<CertificateResponse>, Status> {
        if bearer_token(&request) != Some(GOOD_TOKEN) {
            return Err(Status::unauthenticated("unknown token"));
        }
        self.seen.enrolls.fetch_add(1, Ordering::SeqCst);
        let r = request.into_inner();
        let resp = self.ca.sign(&r.csr_pem, &r.node_id, self.ttl)?;
        self.issued(&resp);
        Ok(Response::new(resp))
    }

    async fn renew(
        &self,
        request: Request<RenewRequest>,
    ) -> Result<Response<CertificateResponse>, Status> {
        let peer = request
            .peer_certs()
            .and_then(|c| c.first().cloned())
            .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
        if self.seen.revoked.load(Ordering::SeqCst) {
            return Err(Status::permission_denied("node revoked"));
        }
        self.seen.renews.fetch_add(1, Ordering::SeqCst);
        let resp = self
            .ca
            .sign(&request.get_ref().csr_pem, &node_of(&peer), self.ttl)?;
        self.issued(&resp);
        Ok(Response::new(resp))
    }
}

/// A TLS control plane (client certificates optional) serving ADS and NodeCertificates.
struct ControlPlane {
    addr: SocketAddr,
    ca: Arc<TestCa>,
    cache: SnapshotCache,
    fleet: FleetStatus,
    seen: Arc<Seen>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl ControlPlane {
    async fn start(ttl: Duration) -> ControlPlane {
        let ca = Arc::new(TestCa::new());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(ca.cert_der.clone()))
            .unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .allow_unauthenticated()
        .build()
        .unwrap();
        let (chain, key) = ca.server_cert();
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let accept_seen = seen.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, tx, seen) = (acceptor.clone(), tx.clone(), accept_seen.clone());
                tokio::spawn(async move {
                    // A refused handshake (wrong pin, plaintext) just ends here.
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let serial = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| serial_of(c));
                    seen.connections.lock().unwrap().push(serial);
                    let _ = tx.send(Ok::<_, std::io::Error>(tls)).await;
                });
            }
        });
        let cache = SnapshotCache::new();
        let fleet = FleetStatus::new();
        let ads = AdsServer::new(cache.clone(), fleet.clone());
        let certs = NodeCertificatesServer::new(Service {
            ca: ca.clone(),
            ttl,
            seen: seen.clone(),
        });
        let serve = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(ads.into_service())
                .add_service(certs)
                .serve_with_incoming(ReceiverStream::new(rx))
                .await
                .unwrap();
        });
        ControlPlane {
            addr,
            ca,
            cache,
            fleet,
            seen,
            tasks: vec![accept, serve],
        }
    }

    fn servers(&self) -> Vec<String> {
        vec![self.addr.to_string()]
    }

    fn pinned_token(&self) -> String {
        format!("{GOOD_TOKEN}.{}", ca_pin(&self.ca.cert_der))
    }

    fn connections(&self) -> Vec<Option<String>> {
        self.seen.connections.lock().unwrap().clone()
    }
}

fn options(dir: &std::path::Path, node_id: Option<&str>, token: Option<String>) -> IdentityOptions {
    IdentityOptions {
        node_id: node_id.map(str::to_owned),
        token,
        ..IdentityOptions::new(dir)
    }
}

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn ads_options(cp: &ControlPlane, creds: &Arc<NodeCredentials>) -> ClientOptions {
    let mut o = ClientOptions::new(cp.servers(), creds.node_id(), creds.gateway());
    o.backoff = client_util::fast_backoff();
    o.connect_timeout = Duration::from_secs(2);
    o.tls = Some(creds.clone());
    o
}

#[tokio::test]
async fn enroll_with_a_pinned_token_then_ads_over_mtls_then_restart_without_token() {
    let cp = ControlPlane::start(Duration::from_secs(3600)).await;
    cp.cache.set(&gw(), &resources(8080, 9001)).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");

    let creds = load_or_enroll(
        &options(&dir, Some("n1"), Some(cp.pinned_token())),
        &cp.servers(),
    )
    .await
    .unwrap();
    assert_eq!(creds.node_id(), "n1");
    assert_eq!(creds.gateway(), "default/gw");
    assert_eq!(
        creds.identity(),
        "spiffe://biplane.local/gateway/default/gw/node/n1"
    );
    assert!(creds.not_after() > SystemTime::now() + Duration::from_secs(3000));
    assert_eq!(cp.seen.enrolls.load(Ordering::SeqCst), 1);
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);
    assert!(dir.join(CERT_FILE).is_file());
    assert_eq!(
        std::fs::read_to_string(dir.join(CA_FILE)).unwrap(),
        cp.ca.cert_pem
    );
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 3, "no temporary file left: {names:?}");
    // The enrollment connection carried no client certificate.
    assert_eq!(cp.connections(), vec![None]);

    // ADS over mTLS, with the enrolled certificate.
    let creds = Arc::new(creds);
    let mut client = run_client(ads_options(&cp, &creds));
    assert_eq!(marker(&client.next().await), 9001);
    assert_eq!(cp.connections()[1], Some(creds.serial()));
    eventually("the node is on the fleet", || {
        cp.fleet.nodes().iter().any(|n| n.node_id == "n1")
    })
    .await;
    client.handle.shutdown().await;

    // Restart: no token, no node id: the stored credentials are used.
    let again = load_or_enroll(&options(&dir, None, None), &cp.servers())
        .await
        .unwrap();
    assert_eq!(again.node_id(), "n1");
    assert_eq!(again.serial(), creds.serial());
    assert_eq!(cp.seen.enrolls.load(Ordering::SeqCst), 1);
    // Asking for another node id without a token is refused clearly.
    let err = load_or_enroll(&options(&dir, Some("n2"), None), &cp.servers())
        .await
        .unwrap_err();
    assert!(matches!(err, IdentityError::NodeIdMismatch { .. }), "{err}");
    assert!(err.to_string().contains("\"n1\""), "{err}");
}

#[tokio::test]
async fn enroll_with_a_ca_file_and_an_unpinned_token() {
    let cp = ControlPlane::start(Duration::from_secs(3600)).await;
    let tmp = tempfile::tempdir().unwrap();
    let ca_file = tmp.path().join("ca.pem");
    std::fs::write(&ca_file, &cp.ca.cert_pem).unwrap();
    let dir = tmp.path().join("state");

    // Neither a CA file nor a pin: refused before anything is sent.
    let err = load_or_enroll(&options(&dir, None, Some(GOOD_TOKEN.into())), &cp.servers())
        .await
        .unwrap_err();
    assert!(matches!(err, IdentityError::NoTrustAnchor), "{err}");
    assert!(err.to_string().contains("need --ca-file or a pinned token"));
    assert!(cp.connections().is_empty());

    let mut opts = options(&dir, None, Some(GOOD_TOKEN.into()));
    opts.ca_file = Some(ca_file);
    let creds = load_or_enroll(&opts, &cp.servers()).await.unwrap();
    // The default node id: `<hostname>-<8 hex>`.
    let (_, suffix) = creds.node_id().rsplit_once('-').unwrap();
    assert_eq!(suffix.len(), 8, "{}", creds.node_id());
    assert!(suffix.chars().all(|c| c.is_ascii_hexdigit()));
}

#[tokio::test]
async fn a_wrong_pin_is_refused_and_nothing_is_written() {
    let cp = ControlPlane::start(Duration::from_secs(3600)).await;
    let other = TestCa::new();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    let token = format!("{GOOD_TOKEN}.{}", ca_pin(&other.cert_der));
    let err = load_or_enroll(&options(&dir, Some("n1"), Some(token)), &cp.servers())
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, IdentityError::ServerNotTrusted { .. }),
        "{msg}"
    );
    assert!(
        msg.contains("does not contain the CA pinned by the token"),
        "{msg}"
    );
    assert!(!dir.exists());
    assert_eq!(cp.seen.enrolls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_bad_token_is_refused_by_the_server_and_reported() {
    let cp = ControlPlane::start(Duration::from_secs(3600)).await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    let token = format!("bpt_wrong.{}", ca_pin(&cp.ca.cert_der));
    let err = load_or_enroll(&options(&dir, Some("n1"), Some(token)), &cp.servers())
        .await
        .unwrap_err();
    match &err {
        IdentityError::Refused { code, message, .. } => {
            assert_eq!(*code, tonic::Code::Unauthenticated);
            assert_eq!(message, "unknown token");
        }
        other => panic!("unexpected error: {other}"),
    }
    assert!(err.to_string().contains("refused to enroll"), "{err}");
    assert!(!dir.exists());

    // No token and nothing stored.
    let err = load_or_enroll(&options(&dir, None, None), &cp.servers())
        .await
        .unwrap_err();
    assert!(matches!(err, IdentityError::NoCredentials { .. }), "{err}");
    assert!(err.to_string().contains("--token"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_swaps_the_certificate_without_touching_the_ads_stream() {
    let cp = ControlPlane::start(Duration::from_secs(4)).await;
    cp.cache.set(&gw(), &resources(8080, 9001)).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    let creds = Arc::new(
        load_or_enroll(
            &options(&dir, Some("n1"), Some(cp.pinned_token())),
            &cp.servers(),
        )
        .await
        .unwrap(),
    );
    let first_serial = creds.serial();
    let first_key = std::fs::read(dir.join(KEY_FILE)).unwrap();
    // Half of the 4 s left when it was obtained (not half of the backdated validity).
    let due = creds.renew_at().duration_since(SystemTime::now()).unwrap();
    assert!(
        due > Duration::from_secs(1) && due <= Duration::from_secs(2),
        "{due:?}"
    );

    let mut client = run_client(ads_options(&cp, &creds));
    assert_eq!(marker(&client.next().await), 9001);
    eventually("the node is on the fleet", || {
        cp.fleet.nodes().iter().any(|n| n.node_id == "n1")
    })
    .await;
    let stream_id = cp.fleet.nodes()[0].stream_id;

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let renewal = spawn_renewal(creds.clone(), cp.servers(), async move {
        let _ = stopped.await;
    });
    let deadline = tokio::time::Instant::now() + WAIT;
    while creds.serial() == first_serial {
        assert!(tokio::time::Instant::now() < deadline, "no renewal");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let renewed = creds.serial();
    assert!(cp.seen.issued.lock().unwrap().contains(&renewed));
    // A new key, on disk too.
    assert_ne!(std::fs::read(dir.join(KEY_FILE)).unwrap(), first_key);
    assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);
    // The renewal connection itself used the certificate being replaced.
    assert!(cp.connections().contains(&Some(first_serial.clone())));

    // Renewals keep coming (every ~2 s); the ADS stream stays the one opened first.
    let renews = cp.seen.renews.load(Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + WAIT;
    while cp.seen.renews.load(Ordering::SeqCst) < renews + 1 {
        assert!(tokio::time::Instant::now() < deadline, "no second renewal");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(());
    renewal.await.unwrap();
    let status = client.status();
    assert!(status.connected, "{status:?}");
    assert_eq!(
        status.last_error, None,
        "the ADS stream was never interrupted"
    );
    let nodes = cp.fleet.nodes();
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].stream_id, stream_id, "same ADS stream");
    // A config change still reaches the node on that stream.
    cp.cache.set(&gw(), &resources(8080, 9002)).unwrap();
    assert_eq!(marker(&client.next().await), 9002);

    // A new connection presents the current (renewed) certificate.
    let current = creds.serial();
    assert_ne!(current, first_serial);
    let before = cp.connections().len();
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", cp.addr)).unwrap();
    let _channel = creds.connect(endpoint, &cp.addr.to_string()).await.unwrap();
    // The server records a connection once its side of the handshake is done.
    eventually("the server sees the new connection", || {
        cp.connections().len() > before
    })
    .await;
    assert_eq!(cp.connections()[before], Some(current));

    // Revoked: the control plane refuses renewals with PERMISSION_DENIED.
    cp.seen.revoked.store(true, Ordering::SeqCst);
    let err = creds.renew(&cp.servers()).await.unwrap_err();
    assert!(err.is_permission_denied(), "{err}");
    assert!(err.to_string().contains("node revoked"), "{err}");
    client.handle.shutdown().await;
}
