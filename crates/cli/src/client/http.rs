//! The admin API client: builds URLs under `/api/v1`, sends one request, and turns the
//! answer into JSON or a [`Failure`] (unreachable server, or the server's own error body).

use std::time::Duration;

use reqwest::{Method, StatusCode, Url};
use serde_json::Value;

use super::Failure;

/// How long to wait for the TCP/TLS connection to the control plane.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one whole request may take (apply validates and fsyncs; never minutes).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A connection to one control plane's admin API.
pub struct Api {
    base: Url,
    /// The server as the user gave it, for messages.
    shown: String,
    client: reqwest::Client,
}

/// An answer from the server, whatever its status.
pub struct Reply {
    pub status: StatusCode,
    /// The JSON body; a non-JSON body becomes `{"message": text}`.
    pub body: Value,
}

impl Reply {
    /// The server's human message (`message`, else `error`, else the status text).
    pub fn message(&self) -> String {
        let field = |k: &str| self.body.get(k).and_then(Value::as_str).map(str::to_owned);
        field("message")
            .filter(|m| !m.is_empty())
            .or_else(|| field("error"))
            .unwrap_or_else(|| {
                format!(
                    "the server answered {} with no message",
                    self.status.as_u16()
                )
            })
    }

    /// The body of a 2xx answer, or the generic failure for any other status.
    pub fn ok(self) -> Result<Value, Failure> {
        if self.status.is_success() {
            Ok(self.body)
        } else {
            Err(self.failure())
        }
    }

    /// The failure this (non-2xx) answer stands for, with the server's message.
    pub fn failure(&self) -> Failure {
        Failure::Server {
            status: self.status.as_u16(),
            message: self.message(),
        }
    }
}

impl Api {
    /// A client for `server` (`http://host:port`, an `https://` URL, or `host:port`),
    /// with no token and the system's roots.
    #[cfg(test)]
    pub fn new(server: &str) -> Result<Api, Failure> {
        Self::connect(&super::config::Resolved {
            server: server.to_owned(),
            token: None,
            ca_file: None,
        })
    }

    /// A client for a resolved connection: its token is sent as `Authorization: Bearer`
    /// on every request, and an `https://` server is verified against its CA file.
    pub fn connect(resolved: &super::config::Resolved) -> Result<Api, Failure> {
        let server = resolved.server.as_str();
        let with_scheme = if server.contains("://") {
            server.to_owned()
        } else {
            format!("http://{server}")
        };
        let base = Url::parse(&with_scheme)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
            .ok_or_else(|| {
                Failure::Usage(format!(
                    "invalid --server {server:?}: expected a URL like http://127.0.0.1:7070"
                ))
            })?;
        // reqwest is built without a default crypto provider (the workspace uses ring only);
        // an `https://` server needs one installed. Failing means one already is.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("biplane-cli/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &resolved.ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                Failure::Usage(format!("cannot read the CA file {}: {e}", path.display()))
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| Failure::Usage(format!("invalid CA file {}: {e}", path.display())))?;
            if certs.is_empty() {
                return Err(Failure::Usage(format!(
                    "the CA file {} holds no certificate",
                    path.display()
                )));
            }
            builder = builder.tls_certs_only(certs);
        }
        if let Some(token) = &resolved.token {
            let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| {
                    Failure::Usage("the token has characters a header cannot carry".to_owned())
                })?;
            value.set_sensitive(true);
            let mut headers = reqwest::header::HeaderMap::new();
            headers.insert(reqwest::header::AUTHORIZATION, value);
            builder = builder.default_headers(headers);
        }
        let client = builder
            .build()
            .map_err(|e| Failure::Other(format!("cannot build the HTTP client: {e}")))?;
        Ok(Api {
            base,
            shown: server.to_owned(),
            client,
        })
    }

    /// The URL of `/api/v1/{segments...}?{query}` (segments are percent-encoded).
    pub fn url(&self, segments: &[&str], query: &[(&str, &str)]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(["api", "v1"]).extend(segments);
        }
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        url
    }

    /// Sends one request; `body` is `(content type, text)`.
    pub async fn send(
        &self,
        method: Method,
        url: Url,
        body: Option<(&str, String)>,
    ) -> Result<Reply, Failure> {
        let mut req = self
            .client
            .request(method, url)
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some((content_type, text)) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .body(text);
        }
        let resp = req.send().await.map_err(|e| self.unreachable(&e))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| self.unreachable(&e))?;
        let body = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            let text = String::from_utf8_lossy(&bytes).trim().to_owned();
            serde_json::json!({ "message": text })
        });
        Ok(Reply { status, body })
    }

    pub async fn get(&self, url: Url) -> Result<Reply, Failure> {
        self.send(Method::GET, url, None).await
    }

    fn unreachable(&self, e: &reqwest::Error) -> Failure {
        let mut reason = root_cause(e);
        if self.base.scheme() == "http" && reason.contains("invalid HTTP version") {
            reason.push_str(" (the server speaks HTTPS: use an https:// URL with --ca-file)");
        } else if self.base.scheme() == "https" && reason.contains("UnknownIssuer") {
            reason.push_str(" (give the control plane's CA certificate with --ca-file)");
        }
        Failure::Unreachable {
            server: self.shown.clone(),
            reason,
        }
    }
}

/// The innermost error message (`Connection refused (os error 111)`), which is what a user
/// can act on; reqwest's own outer layers only say "error sending request".
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    let inner = cur.to_string();
    if inner.is_empty() {
        e.to_string()
    } else {
        inner
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn urls_are_built_under_api_v1() {
        let api = Api::new("http://127.0.0.1:7070").unwrap();
        assert_eq!(
            api.url(&["httproutes", "default", "web"], &[]).as_str(),
            "http://127.0.0.1:7070/api/v1/httproutes/default/web"
        );
        let api = Api::new("127.0.0.1:7070/").unwrap();
        assert_eq!(
            api.url(&["apply"], &[("dryRun", "true")]).as_str(),
            "http://127.0.0.1:7070/api/v1/apply?dryRun=true"
        );
        let api = Api::new("https://cp.example/prefix").unwrap();
        assert_eq!(
            api.url(&["gateways", "a b", "x/y"], &[]).as_str(),
            "https://cp.example/prefix/api/v1/gateways/a%20b/x%2Fy"
        );
        assert!(Api::new("ftp://x").is_err());
        assert!(Api::new("http://").is_err());
    }

    #[test]
    fn messages_come_from_the_body() {
        let reply = |status: u16, body: Value| Reply {
            status: StatusCode::from_u16(status).unwrap(),
            body,
        };
        let r = reply(
            409,
            serde_json::json!({"error": "conflict", "message": "stale"}),
        );
        assert_eq!(r.message(), "stale");
        let r = reply(400, serde_json::json!({"error": "bad_request"}));
        assert_eq!(r.message(), "bad_request");
        let r = reply(502, serde_json::json!({}));
        assert_eq!(r.message(), "the server answered 502 with no message");
        assert!(reply(200, Value::Null).ok().is_ok());
        assert!(matches!(
            reply(500, serde_json::json!({"message": "boom"})).ok(),
            Err(Failure::Server { status: 500, .. })
        ));
    }
}
