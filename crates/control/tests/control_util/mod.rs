//! Shared harness of the control-plane tests: an in-process `biplane_control::run` on
//! 127.0.0.1:0 ports over a temporary data directory, a small JSON client for the admin
//! API, sample resources, and bounded polling.
#![allow(dead_code, reason = "each test crate uses a subset")]

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use biplane_control::{ControlHandle, ControlOptions};
use serde_json::Value;

/// Upper bound for anything that must happen.
pub const WAIT: Duration = Duration::from_secs(10);

/// A running control plane and a client for it.
pub struct Cp {
    pub handle: ControlHandle,
    pub base: String,
    pub http: reqwest::Client,
}

pub async fn start_in(dir: &Path) -> Cp {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let handle = biplane_control::run(
        ControlOptions {
            api_addr: "127.0.0.1:0".parse().unwrap(),
            xds_addr: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.to_path_buf(),
            debounce: Duration::from_millis(20),
            bind_ip: "127.0.0.1".parse().unwrap(),
            ..ControlOptions::default()
        }
        .insecure(),
    )
    .await
    .unwrap();
    let base = format!("http://{}", handle.api_addr());
    Cp {
        handle,
        base,
        http: reqwest::Client::new(),
    }
}

/// The response status and its JSON body (`Value::Null` when the body is not JSON).
pub type Answer = (u16, Value);

async fn answer(r: reqwest::Response) -> Answer {
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

impl Cp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn get(&self, path: &str) -> Answer {
        answer(self.http.get(self.url(path)).send().await.unwrap()).await
    }

    pub async fn post(&self, path: &str, body: &str) -> Answer {
        answer(
            self.http
                .post(self.url(path))
                .body(body.to_owned())
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    pub async fn put(&self, path: &str, body: &str) -> Answer {
        answer(
            self.http
                .put(self.url(path))
                .body(body.to_owned())
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    pub async fn delete(&self, path: &str) -> Answer {
        answer(self.http.delete(self.url(path)).send().await.unwrap()).await
    }

    pub async fn apply(&self, docs: &str) -> Answer {
        self.post("/api/v1/apply", docs).await
    }

    /// Applies and asserts 200; returns the body.
    pub async fn apply_ok(&self, docs: &str) -> Value {
        let (status, body) = self.apply(docs).await;
        assert_eq!(status, 200, "apply failed: {body:#}");
        body
    }

    /// The store revision as the API reports it.
    pub async fn revision(&self) -> u64 {
        let (status, body) = self.get("/api/v1/status").await;
        assert_eq!(status, 200);
        body["revision"].as_u64().unwrap()
    }

    /// Polls `f` on `GET path` until it holds.
    pub async fn get_until(&self, path: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (status, body) = self.get(path).await;
            if status == 200 && f(&body) {
                return body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; last answer {status}: {body:#}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Runs `f` until it returns `Some`, failing after [`WAIT`].
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `results[i].action` of an apply answer, by resource name.
pub fn actions(body: &Value) -> Vec<(String, String)> {
    body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap().to_owned(),
                r["action"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// A condition of a served document's status.
pub fn condition<'a>(doc: &'a Value, kind: &str) -> &'a Value {
    doc["status"]["conditions"]
        .as_array()
        .unwrap_or_else(|| panic!("no conditions in {doc:#}"))
        .iter()
        .find(|c| c["type"] == kind)
        .unwrap_or_else(|| panic!("no {kind} condition in {doc:#}"))
}

pub const GATEWAY: &str = "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: gw
spec:
  listeners:
  - name: http
    port: 8080
    protocol: HTTP
";

pub fn backend(name: &str, port: u16) -> String {
    format!(
        "apiVersion: biplane.dev/v1alpha1
kind: Backend
metadata:
  name: {name}
spec:
  endpoints:
  - address: 127.0.0.1
    port: {port}
"
    )
}

pub fn route(name: &str, backend: &str, prefix: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: {name}
spec:
  parentRefs:
  - name: gw
  rules:
  - matches:
    - path:
        type: PathPrefix
        value: {prefix}
    backendRefs:
    - group: biplane.dev
      kind: Backend
      name: {backend}
"
    )
}

/// Joins documents with `---`.
pub fn docs(parts: &[&str]) -> String {
    parts.join("---\n")
}
