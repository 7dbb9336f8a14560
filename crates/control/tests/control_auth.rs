//! Security of the control plane, in process: the admin API's bearer tokens and roles
//! (401/403/200), the initial admin token file, bootstrap token uses and expiry, the CA's
//! files and permissions, CSR signing for an enrolled identity (not the one the CSR asks
//! for) verified against the CA, and identity parsing.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod control_util;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use biplane_control::ca::{Ca, CaSource, NodeIdentity, identity_of};
use biplane_control::tokens::{Role, TokenError, TokenRecord};
use biplane_control::{ControlHandle, ControlOptions};
use control_util::GATEWAY;
use rustls::pki_types::{CertificateDer, UnixTime};
use serde_json::{Value, json};

async fn start(dir: &Path) -> ControlHandle {
    let _ = rustls::crypto::ring::default_provider().install_default();
    biplane_control::run(ControlOptions {
        api_addr: "127.0.0.1:0".parse().unwrap(),
        xds_addr: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_path_buf(),
        debounce: Duration::from_millis(20),
        bind_ip: "127.0.0.1".parse().unwrap(),
        auth: true,
        api_tls: false,
        xds_mtls: false,
        ..ControlOptions::default()
    })
    .await
    .unwrap()
}

struct Client {
    base: String,
    http: reqwest::Client,
}

/// Status, `WWW-Authenticate` header, JSON body (Null when not JSON) and raw text.
struct Answer {
    status: u16,
    challenge: Option<String>,
    body: Value,
    text: String,
}

impl Client {
    fn new(h: &ControlHandle) -> Self {
        Client {
            base: format!("http://{}", h.api_addr()),
            http: reqwest::Client::new(),
        }
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> Answer {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        if let Some(b) = body {
            req = req.body(b.to_owned());
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let challenge = r
            .headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_owned());
        let text = r.text().await.unwrap();
        Answer {
            status,
            challenge,
            body: serde_json::from_str(&text).unwrap_or(Value::Null),
            text,
        }
    }

    async fn get(&self, path: &str, token: Option<&str>) -> Answer {
        self.call(reqwest::Method::GET, path, token, None).await
    }

    async fn post(&self, path: &str, token: Option<&str>, body: &str) -> Answer {
        self.call(reqwest::Method::POST, path, token, Some(body))
            .await
    }

    async fn mint(&self, admin: &str, body: Value) -> String {
        let a = self
            .post("/api/v1/tokens", Some(admin), &body.to_string())
            .await;
        assert_eq!(a.status, 200, "{}", a.text);
        a.body["token"].as_str().unwrap().to_owned()
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn read_admin_token(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("admin-token"))
        .unwrap()
        .trim()
        .to_owned()
}

#[tokio::test]
async fn admin_api_requires_a_token_with_the_right_role() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start(dir.path()).await;
    let c = Client::new(&cp);

    // The initial admin token: a 0600 file that works.
    let token_file = dir.path().join("admin-token");
    assert_eq!(cp.admin_token_file(), token_file);
    assert_eq!(mode(&token_file), 0o600);
    let admin = read_admin_token(dir.path());
    assert!(admin.starts_with("bpt_"), "{admin}");
    assert_eq!(c.get("/api/v1/gateways", Some(&admin)).await.status, 200);

    // /healthz is open.
    let h = c.get("/healthz", None).await;
    assert_eq!((h.status, h.text.as_str()), (200, "ok"));

    // 401: no token, garbage, an expired token, a bootstrap token.
    let none = c.get("/api/v1/gateways", None).await;
    assert_eq!(none.status, 401, "{}", none.text);
    assert_eq!(none.body["error"], "unauthorized");
    assert!(none.challenge.unwrap().starts_with("Bearer"));
    for garbage in ["nope", "bpt_AAAA", &format!("bpt_{}", "A".repeat(43))] {
        let a = c.get("/api/v1/gateways", Some(garbage)).await;
        assert_eq!(a.status, 401, "{garbage}: {}", a.text);
        assert_eq!(a.body["error"], "invalid_token");
        assert!(a.challenge.unwrap().contains("invalid_token"));
    }
    let expired = cp
        .tokens()
        .mint(&TokenRecord::Api {
            role: Role::Admin,
            name: "old".to_owned(),
            expires_at: Some(1_000),
            created_at: 1,
        })
        .await
        .unwrap();
    let a = c.get("/api/v1/gateways", Some(&expired)).await;
    assert_eq!(a.status, 401);
    assert!(
        a.body["message"].as_str().unwrap().contains("expired"),
        "{}",
        a.text
    );
    let bootstrap = c
        .mint(
            &admin,
            json!({"kind": "bootstrap", "gateway": "default/web", "ttl": "1h", "uses": 1}),
        )
        .await;
    let a = c.get("/api/v1/gateways", Some(&bootstrap)).await;
    assert_eq!(a.status, 401, "{}", a.text);
    assert!(a.body["message"].as_str().unwrap().contains("bootstrap"));

    // Viewer and editor tokens minted by the admin.
    let viewer = c
        .mint(
            &admin,
            json!({"kind": "api", "role": "viewer", "name": "ci"}),
        )
        .await;
    let editor = c
        .mint(
            &admin,
            json!({"kind": "api", "role": "editor", "name": "deployer", "ttl": "1h"}),
        )
        .await;

    // Token writes bump the store revision; reads must not wait for the controller to
    // see a revision it does not follow (the wait is 2 s when it does not).
    let started = std::time::Instant::now();
    assert_eq!(c.get("/api/v1/gateways", Some(&viewer)).await.status, 200);
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );

    // Viewer: reads yes, writes and secrets no.
    for path in [
        "/api/v1/gateways",
        "/api/v1/status",
        "/metrics",
        "/api/v1/secrets?namespace=default",
    ] {
        let a = c.get(path, Some(&viewer)).await;
        assert_eq!(a.status, 200, "viewer GET {path}: {}", a.text);
    }
    let a = c.post("/api/v1/apply", Some(&viewer), GATEWAY).await;
    assert_eq!(a.status, 403, "{}", a.text);
    assert_eq!(a.body["error"], "forbidden");
    assert!(a.body["message"].as_str().unwrap().contains("editor"));
    assert!(!a.text.contains(&viewer));
    for path in ["/api/v1/secrets?showSecrets=true", "/api/v1/tokens"] {
        assert_eq!(c.get(path, Some(&viewer)).await.status, 403, "{path}");
    }
    let a = c
        .call(
            reqwest::Method::DELETE,
            "/api/v1/gateways/default/web",
            Some(&viewer),
            None,
        )
        .await;
    assert_eq!(a.status, 403);
    // Nothing changed.
    let list = c.get("/api/v1/gateways", Some(&viewer)).await;
    assert_eq!(list.body["items"], json!([]));

    // Editor: apply, diff, delete yes; tokens and secrets no.
    let a = c.post("/api/v1/apply", Some(&editor), GATEWAY).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(
        c.post("/api/v1/diff", Some(&editor), GATEWAY).await.status,
        200
    );
    let a = c
        .post(
            "/api/v1/tokens",
            Some(&editor),
            &json!({"kind": "api", "role": "admin", "name": "x"}).to_string(),
        )
        .await;
    assert_eq!(a.status, 403, "{}", a.text);
    assert_eq!(
        c.get("/api/v1/secrets?showSecrets=true", Some(&editor))
            .await
            .status,
        403
    );

    // Admin: everything; the token list has metadata only.
    assert_eq!(
        c.get("/api/v1/secrets?showSecrets=true", Some(&admin))
            .await
            .status,
        200
    );
    let list = c.get("/api/v1/tokens", Some(&admin)).await;
    assert_eq!(list.status, 200, "{}", list.text);
    let items = list.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 5, "{}", list.text);
    for t in [&admin, &viewer, &editor, &bootstrap, &expired] {
        assert!(
            !list.text.contains(t.as_str()),
            "a token leaked in the list"
        );
    }
    assert!(
        items.iter().any(|i| i["kind"] == "bootstrap"
            && i["gateway"] == "default/web"
            && i["usesLeft"] == 1)
    );
    assert!(
        items
            .iter()
            .any(|i| i["name"] == "old" && i["valid"] == false)
    );
    assert!(
        items
            .iter()
            .any(|i| i["name"] == "ci" && i["role"] == "viewer")
    );

    // Bad token requests are 400.
    for bad in [
        json!({"kind": "api", "role": "root", "name": "x"}),
        json!({"kind": "api", "role": "viewer"}),
        json!({"kind": "bootstrap"}),
        json!({"kind": "bootstrap", "gateway": "web", "uses": 0}),
        json!({"kind": "bootstrap", "gateway": "web", "ttl": "forever"}),
        json!({"kind": "other"}),
    ] {
        let a = c
            .post("/api/v1/tokens", Some(&admin), &bad.to_string())
            .await;
        assert_eq!(a.status, 400, "{bad}: {}", a.text);
    }
    drop(c);
    cp.shutdown().await;
}

#[tokio::test]
async fn bootstrap_tokens_are_used_up_and_expire() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start(dir.path()).await;
    let tokens = cp.tokens().clone();

    let t = tokens
        .mint_bootstrap("web", Duration::from_secs(3600), 2)
        .await
        .unwrap();
    let g = tokens.consume_bootstrap(&t).await.unwrap();
    assert_eq!((g.gateway.as_str(), g.uses_left), ("default/web", 1));
    assert_eq!(tokens.consume_bootstrap(&t).await.unwrap().uses_left, 0);
    let e = tokens.consume_bootstrap(&t).await.unwrap_err();
    assert!(matches!(e, TokenError::UsedUp), "{e}");
    assert!(e.to_string().contains("no uses left"));

    // Concurrent consumers of a 3-use token: exactly 3 win.
    let t = tokens
        .mint_bootstrap("prod/edge", Duration::from_secs(60), 3)
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let tokens = tokens.clone();
        let t = t.clone();
        tasks.push(tokio::spawn(
            async move { tokens.consume_bootstrap(&t).await },
        ));
    }
    let mut won = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(g) => {
                assert_eq!(g.gateway, "prod/edge");
                won += 1;
            }
            Err(TokenError::UsedUp) => {}
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert_eq!(won, 3);

    // Expired, unknown and API tokens are refused for enrollment.
    let expired = tokens
        .mint(&TokenRecord::Bootstrap {
            gateway: "default/web".to_owned(),
            expires_at: 1_000,
            uses_left: 5,
            created_at: 1,
        })
        .await
        .unwrap();
    let e = tokens.consume_bootstrap(&expired).await.unwrap_err();
    assert!(matches!(e, TokenError::Expired(_)), "{e}");
    assert!(matches!(
        tokens.consume_bootstrap("bpt_nope").await.unwrap_err(),
        TokenError::Unknown
    ));
    let admin = read_admin_token(dir.path());
    assert!(matches!(
        tokens.consume_bootstrap(&admin).await.unwrap_err(),
        TokenError::WrongKind { .. }
    ));
    // The store holds hashes, never the token values.
    let listed = tokens.list().await.unwrap();
    let text = serde_json::to_string(&listed).unwrap();
    assert!(!text.contains(&t) && !text.contains(&admin));
    cp.shutdown().await;
}

#[tokio::test]
async fn ca_files_permissions_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start(dir.path()).await;
    let ca_dir = dir.path().join("ca");
    assert_eq!(mode(&ca_dir), 0o700);
    assert_eq!(mode(&ca_dir.join("ca.crt")), 0o644);
    assert_eq!(mode(&ca_dir.join("ca.key")), 0o600);
    let ca_pem = cp.ca().cert_pem().to_owned();
    assert_eq!(
        std::fs::read_to_string(ca_dir.join("ca.crt")).unwrap(),
        ca_pem
    );
    let (_, parsed) = x509_parser::parse_x509_certificate(cp.ca().cert_der()).unwrap();
    assert!(parsed.is_ca());
    assert_eq!(
        parsed
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap(),
        "biplane root CA"
    );
    let years = (parsed.validity().not_after.timestamp()
        - parsed.validity().not_before.timestamp())
        / (365 * 24 * 3600);
    assert_eq!(years, 10);
    let admin = read_admin_token(dir.path());

    // The server certificate: localhost and 127.0.0.1, signed by the CA.
    let server = cp.server_cert();
    let leaf = first_cert(&server.cert_pem);
    let (_, leaf_parsed) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    leaf_parsed
        .verify_signature(Some(parsed.public_key()))
        .unwrap();
    let sans = format!(
        "{:?}",
        leaf_parsed
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
    );
    assert!(
        sans.contains("DNSName(\"localhost\")") && sans.contains("IPAddress([127, 0, 0, 1])"),
        "{sans}"
    );
    cp.shutdown().await;

    // A restart keeps the CA and the admin token.
    let cp = start(dir.path()).await;
    assert_eq!(cp.ca().cert_pem(), ca_pem);
    assert_eq!(read_admin_token(dir.path()), admin);
    let c = Client::new(&cp);
    assert_eq!(c.get("/api/v1/status", Some(&admin)).await.status, 200);
    cp.shutdown().await;

    // The same CA given as files to another control plane.
    let other = tempfile::tempdir().unwrap();
    let cp = biplane_control::run(ControlOptions {
        api_addr: "127.0.0.1:0".parse().unwrap(),
        xds_addr: "127.0.0.1:0".parse().unwrap(),
        data_dir: other.path().to_path_buf(),
        ca_cert: Some(ca_dir.join("ca.crt")),
        ca_key: Some(ca_dir.join("ca.key")),
        ..ControlOptions::default().insecure()
    })
    .await
    .unwrap();
    assert_eq!(cp.ca().cert_pem(), ca_pem);
    assert!(!other.path().join("ca").exists());
    cp.shutdown().await;

    // A key that does not match the certificate is refused.
    let stray = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    std::fs::write(stray.path().join("other.key"), key.serialize_pem()).unwrap();
    let e = Ca::open(
        &CaSource::Files {
            cert: ca_dir.join("ca.crt"),
            key: stray.path().join("other.key"),
        },
        "biplane.local",
        Duration::from_secs(60),
    )
    .unwrap_err();
    assert!(e.to_string().contains("does not match"), "{e}");
}

fn first_cert(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

fn csr_asking_for(uri: &str) -> String {
    csr_with_key(&rcgen::KeyPair::generate().unwrap(), uri)
}

/// A CSR for `key` asking for the URI SAN `uri`, a DNS name and CA rights.
fn csr_with_key(key: &rcgen::KeyPair, uri: &str) -> String {
    let mut params = rcgen::CertificateParams::new(vec!["evil.example".to_owned()]).unwrap();
    params.subject_alt_names.push(rcgen::SanType::URI(
        rcgen::string::Ia5String::try_from(uri.to_owned()).unwrap(),
    ));
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.serialize_request(key).unwrap().pem().unwrap()
}

#[test]
fn csr_signing_uses_the_enrolled_identity() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::open(
        &CaSource::DataDir(dir.path().to_path_buf()),
        "biplane.local",
        Duration::from_secs(24 * 3600),
    )
    .unwrap();
    let enrolled = NodeIdentity::new("biplane.local", "default", "web", "node-a").unwrap();
    let csr = csr_asking_for("spiffe://biplane.local/gateway/default/admin/node/node-b");
    let issued = ca.sign_csr(&csr, &enrolled).unwrap();

    // The identity is the enrolled one, whatever the CSR asked.
    assert_eq!(identity_of(&issued.cert_der).unwrap(), enrolled);
    let (_, cert) = x509_parser::parse_x509_certificate(&issued.cert_der).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert_eq!(san.value.general_names.len(), 1, "{:?}", san.value);
    assert!(!cert.is_ca());
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth);
    let lifetime = cert.validity().not_after.timestamp() - now_secs();
    assert!(
        (24 * 3600 - 5..=24 * 3600).contains(&lifetime),
        "{lifetime}"
    );

    // It verifies against the CA: signature, and a full client-auth path check.
    let (_, ca_cert) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
    cert.verify_signature(Some(ca_cert.public_key())).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca.cert_der().to_vec()))
        .unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    verifier
        .verify_client_cert(
            &CertificateDer::from(issued.cert_der.clone()),
            &[],
            UnixTime::now(),
        )
        .unwrap();

    // A certificate from another CA does not verify.
    let other_dir = tempfile::tempdir().unwrap();
    let other = Ca::open(
        &CaSource::DataDir(other_dir.path().to_path_buf()),
        "biplane.local",
        Duration::from_secs(60),
    )
    .unwrap();
    let foreign = other.sign_csr(&csr, &enrolled).unwrap();
    assert!(
        verifier
            .verify_client_cert(
                &CertificateDer::from(foreign.cert_der),
                &[],
                UnixTime::now()
            )
            .is_err()
    );

    // Short lifetimes (seconds) for renewal tests.
    let short = ca
        .sign_csr_for(&csr, &enrolled, Duration::from_secs(3))
        .unwrap();
    let (_, c) = x509_parser::parse_x509_certificate(&short.cert_der).unwrap();
    assert!(c.validity().not_after.timestamp() - now_secs() <= 3);

    // Refused: a corrupted CSR, another trust domain.
    let tampered = csr.replace("MII", "MIJ");
    assert!(ca.sign_csr(&tampered, &enrolled).is_err());
    assert!(ca.sign_csr("not a csr", &enrolled).is_err());
    let foreign_id = NodeIdentity::new("example.org", "default", "web", "n").unwrap();
    assert!(ca.sign_csr(&csr, &foreign_id).is_err());
}

#[test]
fn identity_round_trip() {
    let id = NodeIdentity::new("biplane.local", "prod", "edge-1", "ip-10-0-0-1.node_2").unwrap();
    assert_eq!(
        id.uri(),
        "spiffe://biplane.local/gateway/prod/edge-1/node/ip-10-0-0-1.node_2"
    );
    assert_eq!(NodeIdentity::parse(&id.uri()).unwrap(), id);
    assert_eq!(id.gateway_ref(), "prod/edge-1");
    assert!(NodeIdentity::new("biplane.local", "a/b", "web", "n").is_err());
    // A certificate with no SPIFFE URI has no identity.
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    assert!(identity_of(cert.der()).is_err());
    assert!(identity_of(b"garbage").is_err());
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test]
async fn admin_api_over_tls_with_the_ca_certificate() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let cp = biplane_control::run(ControlOptions {
        api_addr: "127.0.0.1:0".parse().unwrap(),
        xds_addr: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        auth: true,
        api_tls: true,
        xds_mtls: false,
        ..ControlOptions::default()
    })
    .await
    .unwrap();
    let admin = read_admin_token(dir.path());
    let port = cp.api_addr().port();
    let ca = reqwest::Certificate::from_pem(cp.ca().cert_pem().as_bytes()).unwrap();

    // Trusting the CA: both names of the server certificate work, over h2 and h1.
    for (url, h2) in [
        (format!("https://127.0.0.1:{port}/api/v1/status"), false),
        (format!("https://localhost:{port}/api/v1/status"), true),
    ] {
        let mut builder = reqwest::Client::builder().tls_certs_only([ca.clone()]);
        if !h2 {
            builder = builder.http1_only();
        }
        let client = builder.build().unwrap();
        let r = client.get(&url).bearer_auth(&admin).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "{url}");
        let want = if h2 {
            reqwest::Version::HTTP_2
        } else {
            reqwest::Version::HTTP_11
        };
        assert_eq!(r.version(), want);
        // Still needs the token.
        let r = client.get(&url).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 401);
    }

    // Not trusting the CA, or speaking plaintext: refused.
    let other = tempfile::tempdir().unwrap();
    let foreign = Ca::open(
        &CaSource::DataDir(other.path().to_path_buf()),
        "biplane.local",
        Duration::from_secs(60),
    )
    .unwrap();
    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(foreign.cert_pem().as_bytes()).unwrap()])
        .build()
        .unwrap();
    assert!(
        client
            .get(format!("https://127.0.0.1:{port}/healthz"))
            .send()
            .await
            .is_err()
    );
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await;
    assert!(
        plain.is_err() || !plain.unwrap().status().is_success(),
        "plaintext served on the TLS port"
    );
    cp.shutdown().await;
}

mod xds_mtls {
    use super::*;
    use control_util::{backend, docs, route};
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

    const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";

    /// A node certificate and key for `identity`, issued by `ca` from a local CSR.
    fn enroll(ca: &Ca, identity: &NodeIdentity) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        (
            ca.sign_csr(&csr, identity).unwrap().cert_pem,
            key.serialize_pem(),
        )
    }

    /// The first response of an ADS stream opened as `id`/`cluster`, or the error text.
    async fn first_response(
        url: &str,
        tls: Option<ClientTlsConfig>,
        id: &str,
        cluster: &str,
    ) -> Result<usize, String> {
        let mut endpoint = Channel::from_shared(url.to_owned()).unwrap();
        if let Some(tls) = tls {
            endpoint = endpoint.tls_config(tls).unwrap();
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("connect: {e:?}"))?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(DiscoveryRequest {
            node: Some(Node {
                id: id.to_owned(),
                cluster: cluster.to_owned(),
                ..Default::default()
            }),
            type_url: CDS.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap();
        let mut stream = AggregatedDiscoveryServiceClient::new(channel)
            .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
            .into_inner();
        let msg = tokio::time::timeout(control_util::WAIT, stream.message())
            .await
            .map_err(|_| "no answer in time".to_owned())?;
        drop(tx);
        match msg {
            Ok(Some(resp)) => Ok(resp.resources.len()),
            Ok(None) => Err("stream ended".to_owned()),
            Err(s) => Err(format!("{:?}: {}", s.code(), s.message())),
        }
    }

    #[tokio::test]
    async fn xds_requires_a_ca_client_cert_and_the_matching_identity() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let cp = biplane_control::run(ControlOptions {
            api_addr: "127.0.0.1:0".parse().unwrap(),
            xds_addr: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.path().to_path_buf(),
            debounce: Duration::from_millis(20),
            bind_ip: "127.0.0.1".parse().unwrap(),
            auth: true,
            xds_mtls: true,
            api_tls: false,
            ..ControlOptions::default()
        })
        .await
        .unwrap();
        let c = Client::new(&cp);
        let admin = read_admin_token(dir.path());
        let body = docs(&[GATEWAY, &backend("echo", 9001), &route("web", "echo", "/")]);
        let a = c.post("/api/v1/apply", Some(&admin), &body).await;
        assert_eq!(a.status, 200, "{}", a.text);

        let url = format!("https://localhost:{}", cp.xds_addr().port());
        let ca_root = Certificate::from_pem(cp.ca().cert_pem());
        let tls = |cert: &(String, String)| {
            ClientTlsConfig::new()
                .ca_certificate(ca_root.clone())
                .identity(Identity::from_pem(&cert.0, &cert.1))
                .domain_name("localhost")
        };
        let me = NodeIdentity::new("biplane.local", "default", "gw", "node-a").unwrap();

        // Enrollment over the admin API with a one-use bootstrap token for Gateway gw.
        let bootstrap = c
            .mint(
                &admin,
                json!({"kind": "bootstrap", "gateway": "gw", "uses": 1}),
            )
            .await;
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = csr_with_key(&key, "spiffe://biplane.local/gateway/default/admin/node/x");
        let bad = c
            .post(
                "/api/v1/enroll",
                Some(&bootstrap),
                &json!({"nodeId": "node-a", "csr": "garbage"}).to_string(),
            )
            .await;
        assert_eq!(bad.status, 400, "{}", bad.text);
        let bad = c
            .post(
                "/api/v1/enroll",
                Some(&bootstrap),
                &json!({"nodeId": "a/b", "csr": csr}).to_string(),
            )
            .await;
        assert_eq!(bad.status, 400, "{}", bad.text);
        let a = c
            .post(
                "/api/v1/enroll",
                Some(&bootstrap),
                &json!({"nodeId": "node-a", "csr": csr}).to_string(),
            )
            .await;
        assert_eq!(a.status, 200, "{}", a.text);
        assert_eq!(a.body["identity"], me.uri());
        assert_eq!(a.body["caCertificate"], cp.ca().cert_pem());
        let enrolled_pem = a.body["certificate"].as_str().unwrap();
        assert_eq!(identity_of(&first_cert(enrolled_pem)).unwrap(), me);
        // The token is used up; an admin token does not enroll; no token is 401.
        for token in [Some(bootstrap.as_str()), Some(admin.as_str()), None] {
            let a = c
                .post(
                    "/api/v1/enroll",
                    token,
                    &json!({"nodeId": "node-c", "csr": csr}).to_string(),
                )
                .await;
            assert_eq!(a.status, 401, "{}", a.text);
            assert!(a.challenge.is_some());
        }
        let cert = (enrolled_pem.to_owned(), key.serialize_pem());

        // The enrolled node gets its Gateway's config.
        let got = control_util::eventually("the enrolled node gets its Cluster", || {
            let tls = tls(&cert);
            let url = url.clone();
            async move {
                match first_response(&url, Some(tls), "node-a", "gw").await {
                    Ok(n) if n > 0 => Some(n),
                    _ => None,
                }
            }
        })
        .await;
        assert_eq!(got, 1);
        assert_eq!(
            first_response(&url, Some(tls(&cert)), "node-a", "default/gw").await,
            Ok(1)
        );

        // Impersonation: another node id, or another Gateway, with node-a's certificate.
        for (id, cluster) in [
            ("node-b", "gw"),
            ("node-a", "default/other"),
            ("node-a", ""),
        ] {
            let e = first_response(&url, Some(tls(&cert)), id, cluster)
                .await
                .unwrap_err();
            assert!(e.starts_with("PermissionDenied"), "{id}/{cluster}: {e}");
        }

        // No client certificate, a certificate of another CA, plaintext: refused.
        let no_cert = ClientTlsConfig::new()
            .ca_certificate(ca_root.clone())
            .domain_name("localhost");
        assert!(
            first_response(&url, Some(no_cert), "node-a", "gw")
                .await
                .is_err()
        );
        let other = tempfile::tempdir().unwrap();
        let foreign_ca = Ca::open(
            &CaSource::DataDir(other.path().to_path_buf()),
            "biplane.local",
            Duration::from_secs(60),
        )
        .unwrap();
        let foreign = enroll(&foreign_ca, &me);
        assert!(
            first_response(&url, Some(tls(&foreign)), "node-a", "gw")
                .await
                .is_err()
        );
        let plain = format!("http://127.0.0.1:{}", cp.xds_addr().port());
        assert!(first_response(&plain, None, "node-a", "gw").await.is_err());
        drop(c);
        cp.shutdown().await;
    }
}
