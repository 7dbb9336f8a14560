//! Input to resources: split YAML (`---`) or JSON (object, array, `List`) into documents,
//! dispatch on `apiVersion` + `kind`, deserialize with every schema problem recorded, run
//! the semantic checks, and reject duplicates. See [`parse_documents`].

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::backend::Backend;
use crate::de::{Problems, from_value, join_key};
use crate::error::{ValidationError, ValidationErrors};
use crate::gateway::Gateway;
use crate::meta::{DEFAULT_NAMESPACE, ObjectMeta, ResourceKind};
use crate::resource::Resource;
use crate::route::{GrpcRoute, HttpRoute, TcpRoute, TlsRoute};
use crate::secret::{
    CRT_KEY, KEY_KEY, PrivateKeyPem, SecretDoc, TLS_SECRET_TYPE, TlsSecret, has_pem_block,
};
use crate::validate::{self, Sink};

/// A document as written: `apiVersion`, `kind`, `metadata`, `spec`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Doc<S> {
    #[allow(
        dead_code,
        reason = "checked before deserializing; listed so it is a known field"
    )]
    api_version: String,
    #[allow(
        dead_code,
        reason = "checked before deserializing; listed so it is a known field"
    )]
    kind: String,
    metadata: ObjectMeta,
    spec: S,
}

/// One raw document: its 0-based index and its tree, or why it could not be read.
struct RawDoc {
    index: usize,
    value: Result<Value, String>,
}

/// Parses YAML (one or more documents separated by `---`) or JSON (an object, an array of
/// objects, or `{"kind": "List", "items": [...]}`) into validated resources.
///
/// Empty documents are skipped and not counted. On failure, every problem of every document
/// is returned (see [`ValidationError`] for how documents are numbered). References between
/// resources are not checked here: see [`crate::ResourceSet::resolve_refs`].
pub fn parse_documents(text: &str) -> Result<Vec<Resource>, ValidationErrors> {
    let docs = split(text);
    let mut errors = Vec::new();
    let mut resources = Vec::new();
    let mut seen: BTreeMap<(ResourceKind, String, String), usize> = BTreeMap::new();
    for doc in docs {
        let value = match doc.value {
            Ok(v) => v,
            Err(message) => {
                errors.push(ValidationError {
                    document: doc.index,
                    kind: None,
                    namespace: None,
                    name: None,
                    path: String::new(),
                    message,
                });
                continue;
            }
        };
        let outcome = document(&value);
        let label = |path: String, message: String| ValidationError {
            document: doc.index,
            kind: outcome.kind.clone(),
            namespace: outcome.namespace.clone(),
            name: outcome.name.clone(),
            path,
            message,
        };
        if let (Some(kind), Some(name)) = (
            outcome
                .kind
                .as_deref()
                .and_then(ResourceKind::from_kind_str),
            &outcome.name,
        ) {
            let ns = outcome
                .namespace
                .clone()
                .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
            match seen.get(&(kind, ns.clone(), name.clone())) {
                Some(first) => errors.push(label(
                    "metadata.name".to_owned(),
                    format!(
                        "duplicate {kind} {ns}/{name} (first defined in document {})",
                        first + 1
                    ),
                )),
                None => {
                    seen.insert((kind, ns, name.clone()), doc.index);
                }
            }
        }
        if outcome.problems.is_empty()
            && let Some(r) = outcome.resource
        {
            resources.push(r);
        }
        errors.extend(outcome.problems.into_iter().map(|(p, m)| label(p, m)));
    }
    if errors.is_empty() {
        Ok(resources)
    } else {
        Err(ValidationErrors(errors))
    }
}

// ------------------------------------------------------------------ splitting

fn split(text: &str) -> Vec<RawDoc> {
    let trimmed = text.trim_start_matches('\u{feff}').trim_start();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        let json = split_json(trimmed);
        // `{apiVersion: v1, ...}` is a YAML flow mapping, not JSON: if it reads as YAML, use
        // that; otherwise the JSON error is the more precise one.
        if json.iter().any(|d| d.value.is_err()) {
            let yaml = split_yaml(text);
            if yaml.iter().all(|d| d.value.is_ok()) {
                return yaml;
            }
        }
        return json;
    }
    split_yaml(text)
}

fn split_yaml(text: &str) -> Vec<RawDoc> {
    let mut out = Vec::new();
    let mut index = 0;
    for (start_line, chunk) in yaml_chunks(text) {
        if yaml_is_empty(chunk) {
            continue;
        }
        let value = parse_yaml(chunk)
            .map_err(|e| format!("invalid YAML (document starts at line {start_line}): {e}"));
        match value {
            Ok(Value::Null) => {}
            Ok(v) => expand(v, &mut index, &mut out),
            Err(e) => {
                out.push(RawDoc {
                    index,
                    value: Err(e),
                });
                index += 1;
            }
        }
    }
    out
}

fn split_json(text: &str) -> Vec<RawDoc> {
    let mut out = Vec::new();
    let mut index = 0;
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Array(items)) => {
            for item in items {
                expand(item, &mut index, &mut out);
            }
        }
        Ok(v) => expand(v, &mut index, &mut out),
        Err(e) => out.push(RawDoc {
            index,
            value: Err(format!("invalid JSON: {e}")),
        }),
    }
    out
}

/// Pushes a document, or the items of a `List`.
fn expand(v: Value, index: &mut usize, out: &mut Vec<RawDoc>) {
    if let Value::Object(map) = &v
        && map.get("kind").and_then(Value::as_str) == Some("List")
        && map
            .get("apiVersion")
            .is_none_or(|a| a.as_str() == Some("v1"))
        && let Some(Value::Array(items)) = map.get("items")
    {
        for item in items {
            if !item.is_null() {
                out.push(RawDoc {
                    index: *index,
                    value: Ok(item.clone()),
                });
                *index += 1;
            }
        }
        return;
    }
    if v.is_null() {
        return;
    }
    out.push(RawDoc {
        index: *index,
        value: Ok(v),
    });
    *index += 1;
}

/// Splits YAML text into documents at lines that start with `---` (as kubectl does), giving
/// each chunk's 1-based first line. A document-start line stays with its document.
fn yaml_chunks(text: &str) -> Vec<(usize, &str)> {
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut start_line = 1;
    let mut offset = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end_matches(['\n', '\r']);
        let is_marker = bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t");
        if is_marker && offset > start {
            chunks.push((start_line, &text[start..offset]));
            start = offset;
            start_line = i + 1;
        }
        offset += line.len();
    }
    if start < text.len() {
        chunks.push((start_line, &text[start..]));
    }
    chunks
}

fn yaml_is_empty(chunk: &str) -> bool {
    chunk.lines().all(|l| {
        let t = l.trim();
        let t = t.strip_prefix("---").map(str::trim_start).unwrap_or(t);
        t.is_empty() || t.starts_with('#') || t == "..."
    })
}

fn parse_yaml(chunk: &str) -> Result<Value, String> {
    let mut options = serde_saphyr::Options::default();
    // YAML 1.2 booleans only: `on`, `yes`, `n` stay strings (gotcha: untyped Value).
    options.strict_booleans = true;
    options.leading_zero_numbers_as_strings = true;
    options.underscored_numbers_as_strings = true;
    options.with_snippet = false;
    serde_saphyr::from_str_with_options::<Value>(chunk, options).map_err(|e| e.to_string())
}

// ------------------------------------------------------------------ one document

struct Outcome {
    kind: Option<String>,
    namespace: Option<String>,
    name: Option<String>,
    resource: Option<Resource>,
    problems: Vec<(String, String)>,
}

fn document(value: &Value) -> Outcome {
    let meta = value.get("metadata");
    let mut out = Outcome {
        kind: value.get("kind").and_then(Value::as_str).map(str::to_owned),
        namespace: meta
            .and_then(|m| m.get("namespace"))
            .and_then(Value::as_str)
            .map(str::to_owned),
        name: meta
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .map(str::to_owned),
        resource: None,
        problems: Vec::new(),
    };
    let Value::Object(map) = value else {
        out.problems.push((
            String::new(),
            "a document must be an object with apiVersion, kind, metadata and spec".to_owned(),
        ));
        return out;
    };
    let api_version = map.get("apiVersion");
    let kind_value = map.get("kind");
    let (Some(Value::String(api_version)), Some(Value::String(kind_str))) =
        (api_version, kind_value)
    else {
        for (field, v) in [("apiVersion", api_version), ("kind", kind_value)] {
            match v {
                None | Some(Value::Null) => out
                    .problems
                    .push((field.to_owned(), "missing required field".to_owned())),
                Some(Value::String(_)) => {}
                Some(_) => out
                    .problems
                    .push((field.to_owned(), "expected a string".to_owned())),
            }
        }
        return out;
    };
    let Some(kind) = ResourceKind::from_kind_str(kind_str) else {
        let supported: Vec<&str> = ResourceKind::ALL.iter().map(|k| k.as_str()).collect();
        out.problems.push((
            "kind".to_owned(),
            format!(
                "unknown kind {kind_str:?} (supported: {})",
                supported.join(", ")
            ),
        ));
        out.kind = None;
        return out;
    };
    if api_version != kind.api_version() {
        out.problems.push((
            "apiVersion".to_owned(),
            format!(
                "unsupported apiVersion {api_version:?} for {kind} (expected {})",
                kind.api_version()
            ),
        ));
        return out;
    }
    let problems = Problems::default();
    let mut sink = Sink::default();
    let resource = match kind {
        ResourceKind::Gateway => {
            typed::<crate::gateway::GatewaySpec>(value, &problems).map(|(metadata, spec)| {
                let g = Gateway { metadata, spec };
                validate::gateway(&g, &mut sink);
                Resource::Gateway(g)
            })
        }
        ResourceKind::HttpRoute => typed(value, &problems).map(|(metadata, spec)| {
            let r = HttpRoute { metadata, spec };
            validate::http_route(&r, &mut sink);
            Resource::HttpRoute(r)
        }),
        ResourceKind::GrpcRoute => typed(value, &problems).map(|(metadata, spec)| {
            let r = GrpcRoute { metadata, spec };
            validate::grpc_route(&r, &mut sink);
            Resource::GrpcRoute(r)
        }),
        ResourceKind::TcpRoute => typed(value, &problems).map(|(metadata, spec)| {
            let r = TcpRoute { metadata, spec };
            validate::l4_route(&r.spec.parent_refs, None, &r.spec.rules, &mut sink);
            Resource::TcpRoute(r)
        }),
        ResourceKind::TlsRoute => typed(value, &problems).map(|(metadata, spec)| {
            let r = TlsRoute { metadata, spec };
            validate::l4_route(
                &r.spec.parent_refs,
                Some(&r.spec.hostnames),
                &r.spec.rules,
                &mut sink,
            );
            Resource::TlsRoute(r)
        }),
        ResourceKind::Backend => typed(value, &problems).map(|(metadata, spec)| {
            let b = Backend { metadata, spec };
            validate::backend(&b, &mut sink);
            Resource::Backend(b)
        }),
        ResourceKind::Secret => from_value::<SecretDoc>(value, &problems)
            .and_then(|doc| {
                validate::metadata(&doc.metadata, kind, &mut sink);
                secret(doc, &mut sink)
            })
            .map(Resource::Secret),
    };
    if let Some(r) = resource
        .as_ref()
        .filter(|r| r.kind() != ResourceKind::Secret)
    {
        validate::metadata(r.metadata(), kind, &mut sink);
    }
    let schema = problems.into_inner();
    // A semantic check that looked at a placeholder (a value a schema problem replaced) would
    // only echo that problem: drop it.
    let semantic: Vec<(String, String)> = sink
        .0
        .into_iter()
        .filter(|(p, _)| {
            !schema
                .iter()
                .any(|sp| sp.substituted && related(&sp.path, p))
        })
        .collect();
    out.problems = schema.into_iter().map(|p| (p.path, p.message)).collect();
    out.problems.extend(semantic);
    out.resource = resource;
    out
}

fn typed<S: DeserializeOwned>(value: &Value, problems: &Problems) -> Option<(ObjectMeta, S)> {
    from_value::<Doc<S>>(value, problems).map(|d| (d.metadata, d.spec))
}

/// Whether a semantic problem at `semantic` may be an echo of a placeholder at `schema`: one
/// path is inside the other, or `semantic` is inside the object holding `schema` (a sibling
/// field may have been checked against it), except at the top of `spec`/`metadata`, whose
/// fields are checked independently.
fn related(schema: &str, semantic: &str) -> bool {
    fn within(inner: &str, outer: &str) -> bool {
        outer.is_empty()
            || inner == outer
            || (inner.starts_with(outer)
                && matches!(inner.as_bytes().get(outer.len()), Some(b'.' | b'[')))
    }
    let parent = match schema.rfind(['.', '[']) {
        Some(i) => &schema[..i],
        None => "",
    };
    let independent = matches!(parent, "" | "spec" | "metadata");
    within(semantic, schema)
        || within(schema, semantic)
        || (!independent && within(semantic, parent))
}

// ------------------------------------------------------------------ Secret

fn secret(doc: SecretDoc, s: &mut Sink) -> Option<TlsSecret> {
    match doc.secret_type.as_deref() {
        Some(TLS_SECRET_TYPE) => {}
        Some(other) => {
            s.0.push((
                "type".to_owned(),
                format!("unsupported Secret type {other:?} (only {TLS_SECRET_TYPE})"),
            ));
            return None;
        }
        None => {
            s.0.push((
                "type".to_owned(),
                format!("required: only {TLS_SECRET_TYPE} Secrets are supported"),
            ));
            return None;
        }
    }
    let _ = doc.immutable;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut decoded: BTreeMap<&str, String> = BTreeMap::new();
    for (field, map, encoded) in [
        ("data", &doc.data, true),
        ("stringData", &doc.string_data, false),
    ] {
        for (k, v) in map {
            let path = join_key(field, k);
            if k != CRT_KEY && k != KEY_KEY {
                s.0.push((
                    path,
                    format!("unsupported key (a TLS Secret holds {CRT_KEY} and {KEY_KEY})"),
                ));
                continue;
            }
            let text = if encoded {
                let compact: String = v.chars().filter(|c| !c.is_whitespace()).collect();
                match b64.decode(compact.as_bytes()) {
                    Ok(bytes) => match String::from_utf8(bytes) {
                        Ok(t) => t,
                        Err(_) => {
                            s.0.push((path, "decoded value is not PEM text".to_owned()));
                            continue;
                        }
                    },
                    Err(_) => {
                        s.0.push((path, "not valid base64".to_owned()));
                        continue;
                    }
                }
            } else {
                v.clone()
            };
            let key = if k == CRT_KEY { CRT_KEY } else { KEY_KEY };
            let ok = if key == CRT_KEY {
                has_pem_block(&text, "CERTIFICATE")
            } else {
                has_pem_block(&text, "PRIVATE KEY")
            };
            if !ok {
                let what = if key == CRT_KEY {
                    "a CERTIFICATE"
                } else {
                    "a PRIVATE KEY"
                };
                s.0.push((path, format!("must contain {what} PEM block")));
                continue;
            }
            // stringData wins over data, as in Kubernetes.
            decoded.insert(key, text);
        }
    }
    let mut missing = false;
    for key in [CRT_KEY, KEY_KEY] {
        let present = doc.data.contains_key(key) || doc.string_data.contains_key(key);
        if !present {
            s.0.push((join_key("data", key), "missing required key".to_owned()));
            missing = true;
        }
    }
    if missing {
        return None;
    }
    let cert = decoded.remove(CRT_KEY)?;
    let key = decoded.remove(KEY_KEY)?;
    Some(TlsSecret {
        metadata: doc.metadata,
        cert_chain_pem: cert,
        private_key_pem: PrivateKeyPem::new(key),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]
    use super::*;

    #[test]
    fn chunks_split_on_marker_lines_only() {
        let text = "a: 1\n---\nb: |\n  ---\n  x\n--- # c\nc: 3\n----\n";
        let chunks = yaml_chunks(text);
        assert_eq!(chunks.len(), 3, "{chunks:?}");
        assert_eq!(chunks[0], (1, "a: 1\n"));
        assert_eq!(chunks[1].0, 2);
        assert!(chunks[1].1.contains("  ---"));
        assert_eq!(chunks[2], (6, "--- # c\nc: 3\n----\n"));
        assert!(yaml_is_empty("--- # nothing\n\n# x\n...\n"));
        assert!(!yaml_is_empty("---\na: 1\n"));
        assert_eq!(yaml_chunks("a: 1\r\n---\r\nb: 2\r\n").len(), 2);
    }

    #[test]
    fn related_paths() {
        assert!(related(
            "spec.listeners[1].protocol",
            "spec.listeners[1].tls"
        ));
        assert!(related("spec.listeners[1].protocol", "spec.listeners[1]"));
        assert!(related("spec.listeners[1]", "spec.listeners[1].port"));
        assert!(!related(
            "spec.listeners[1].protocol",
            "spec.listeners[10].tls"
        ));
        assert!(!related("spec.appProtocol", "spec.connectTimeout"));
        assert!(!related("metadata.name", "metadata.namespace"));
        assert!(related("metadata.name", "metadata.name"));
        assert!(related("", "spec"));
    }

    #[test]
    fn pem_shapes() {
        assert!(has_pem_block(
            "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----",
            "CERTIFICATE"
        ));
        assert!(has_pem_block(
            "-----BEGIN EC PRIVATE KEY-----\n",
            "PRIVATE KEY"
        ));
        assert!(!has_pem_block(
            "-----BEGIN PUBLIC KEY-----\n",
            "PRIVATE KEY"
        ));
        assert!(!has_pem_block(
            "-----BEGIN ENCRYPTED PRIVATE KEYS-----\n",
            "PRIVATE KEY"
        ));
    }

    #[test]
    fn paths_join() {
        assert_eq!(join_key("", "spec"), "spec");
        assert_eq!(join_key("spec", "rules"), "spec.rules");
        assert_eq!(join_key("data", "tls.crt"), "data[tls.crt]");
    }
}
