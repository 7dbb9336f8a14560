//! Resource documents as the control plane stores and serves them: store keys
//! (`/registry/{Kind}/{namespace}/{name}`), the normalized stored form, server-set metadata,
//! secret redaction, YAML rendering, unified diffs, kind names in URL paths, and a lenient
//! reader of document identities (for `delete -f`).

use std::time::{SystemTime, UNIX_EPOCH};

use biplane_api::{ResourceKey, ResourceKind};
use serde_json::{Map, Value};

/// Every resource lives under this store prefix.
pub const REGISTRY_PREFIX: &str = "/registry/";

/// What a redacted secret value reads as.
pub const REDACTED: &str = "<redacted>";

/// The store key of a resource.
pub fn store_key(kind: ResourceKind, namespace: &str, name: &str) -> String {
    format!("{REGISTRY_PREFIX}{}/{namespace}/{name}", kind.as_str())
}

/// The store key of a [`ResourceKey`].
pub fn key_of(key: &ResourceKey) -> String {
    store_key(key.kind, &key.namespace, &key.name)
}

/// The store prefix of one kind (optionally one namespace of it).
pub fn kind_prefix(kind: ResourceKind, namespace: Option<&str>) -> String {
    match namespace {
        Some(ns) => format!("{REGISTRY_PREFIX}{}/{ns}/", kind.as_str()),
        None => format!("{REGISTRY_PREFIX}{}/", kind.as_str()),
    }
}

/// The resource a store key names (`None` for keys outside the registry layout).
pub fn parse_store_key(key: &str) -> Option<ResourceKey> {
    let rest = key.strip_prefix(REGISTRY_PREFIX)?;
    let mut parts = rest.splitn(3, '/');
    let kind = ResourceKind::from_kind_str(parts.next()?)?;
    let ns = parts.next()?;
    let name = parts.next()?;
    if ns.is_empty() || name.is_empty() || name.contains('/') {
        return None;
    }
    Some(ResourceKey::new(kind, ns, name))
}

/// A kind as written in a URL path or on the command line: case-insensitive, singular or
/// plural (`gateway`, `Gateways`, `httproutes`, ...).
pub fn kind_from_path(s: &str) -> Option<ResourceKind> {
    let lower = s.to_ascii_lowercase();
    ResourceKind::ALL.into_iter().find(|k| {
        let singular = k.as_str().to_ascii_lowercase();
        lower == singular || lower == format!("{singular}s")
    })
}

/// The server-set metadata fields (never taken from user input).
const SERVER_FIELDS: [&str; 4] = ["resourceVersion", "uid", "creationTimestamp", "generation"];

fn metadata_mut(doc: &mut Value) -> Option<&mut Map<String, Value>> {
    doc.get_mut("metadata").and_then(Value::as_object_mut)
}

/// The document without server-set metadata: what a user wrote, normalized. Diffs and the
/// `unchanged` check look at this.
pub fn user_view(doc: &Value) -> Value {
    let mut v = doc.clone();
    if let Some(m) = metadata_mut(&mut v) {
        for f in SERVER_FIELDS {
            m.remove(f);
        }
    }
    v
}

/// The document without its metadata and status (what `generation` tracks).
pub fn spec_view(doc: &Value) -> Value {
    let mut v = doc.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("metadata");
        o.remove("status");
    }
    v
}

/// Sets `metadata.resourceVersion` (a string, as in Kubernetes).
pub fn set_resource_version(doc: &mut Value, revision: u64) {
    if let Some(m) = metadata_mut(doc) {
        m.insert(
            "resourceVersion".to_owned(),
            Value::String(revision.to_string()),
        );
    }
}

/// `metadata.resourceVersion` of a document (string or number), if any.
pub fn resource_version_of(doc: &Value) -> Option<String> {
    match doc.get("metadata")?.get("resourceVersion")? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// `metadata.generation` of a stored document (1 when absent).
pub fn generation_of(doc: &Value) -> i64 {
    doc.get("metadata")
        .and_then(|m| m.get("generation"))
        .and_then(Value::as_i64)
        .unwrap_or(1)
}

/// Replaces a Secret's private key with [`REDACTED`] (other kinds are left alone).
pub fn redact(doc: &mut Value) {
    if doc.get("kind").and_then(Value::as_str) != Some("Secret") {
        return;
    }
    for field in ["data", "stringData"] {
        if let Some(data) = doc.get_mut(field).and_then(Value::as_object_mut)
            && let Some(v) = data.get_mut("tls.key")
        {
            *v = Value::String(REDACTED.to_owned());
        }
    }
}

/// For a diff of two Secret versions: redacts both keys, marking them when they differ.
pub fn redact_pair(old: &mut Value, new: &mut Value) {
    let key = |d: &Value| d.get("data").and_then(|d| d.get("tls.key")).cloned();
    let differ = key(old) != key(new);
    redact(old);
    redact(new);
    if differ {
        for (doc, label) in [(old, "before"), (new, "after")] {
            if let Some(v) = doc.get_mut("data").and_then(|d| d.get_mut("tls.key")) {
                *v = Value::String(format!("{REDACTED} ({label})"));
            }
        }
    }
}

/// Renders a JSON value as block YAML (keys in the value's order).
pub fn to_yaml(v: &Value) -> String {
    match serde_saphyr::to_string(v) {
        Ok(s) => s,
        // The serializer only fails on types JSON cannot hold; fall back to JSON, which is
        // valid YAML.
        Err(_) => serde_json::to_string_pretty(v).unwrap_or_default(),
    }
}

/// A unified diff of two texts (`old` empty for a creation), with `label` in the headers;
/// empty when equal.
pub fn unified_diff(old: &str, new: &str, label: &str) -> String {
    if old == new {
        return String::new();
    }
    let diff = similar::TextDiff::from_lines(old, new);
    let a = if old.is_empty() {
        "/dev/null".to_owned()
    } else {
        format!("a/{label}")
    };
    let b = if new.is_empty() {
        "/dev/null".to_owned()
    } else {
        format!("b/{label}")
    };
    diff.unified_diff()
        .context_radius(3)
        .header(&a, &b)
        .to_string()
}

/// Blanks out top-level `status:` blocks of YAML documents (a document fetched with
/// `get -o yaml` can be applied again, as with kubectl). Removed lines become empty lines,
/// so line numbers in errors stay true. JSON input is handled by [`strip_status_json`].
pub fn strip_status_yaml(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_status = false;
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end_matches(['\n', '\r']);
        let ending = &line[bare.len()..];
        if in_status {
            let continues = bare.is_empty()
                || bare.starts_with(' ')
                || bare.starts_with('\t')
                || bare.starts_with('#')
                || bare == "-"
                || bare.starts_with("- ");
            if continues {
                out.push_str(ending);
                continue;
            }
            in_status = false;
        }
        if bare == "status:" || bare.starts_with("status: ") || bare.starts_with("status:\t") {
            in_status = true;
            out.push_str(ending);
            continue;
        }
        out.push_str(line);
    }
    out
}

/// Removes `status` from every document of a JSON input (object, array or `List`); the
/// text is returned unchanged when it is not valid JSON.
pub fn strip_status_json(text: &str) -> String {
    let Ok(mut v) = serde_json::from_str::<Value>(text) else {
        return text.to_owned();
    };
    fn strip(v: &mut Value) {
        match v {
            Value::Array(items) => items.iter_mut().for_each(strip),
            Value::Object(o) => {
                if o.get("kind").and_then(Value::as_str) == Some("List")
                    && let Some(Value::Array(items)) = o.get_mut("items")
                {
                    items.iter_mut().for_each(strip);
                } else {
                    o.remove("status");
                }
            }
            _ => {}
        }
    }
    strip(&mut v);
    serde_json::to_string(&v).unwrap_or_else(|_| text.to_owned())
}

/// Drops `status` from user input, YAML or JSON.
pub fn strip_status(text: &str) -> String {
    let t = text.trim_start_matches('\u{feff}').trim_start();
    if t.starts_with('{') || t.starts_with('[') {
        strip_status_json(t)
    } else {
        strip_status_yaml(text)
    }
}

/// One document's identity, read leniently (kind and name only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocIdentity {
    /// 0-based document index.
    pub document: usize,
    /// The resource.
    pub key: ResourceKey,
    /// `metadata.resourceVersion`, if written.
    pub resource_version: Option<String>,
}

/// A problem reading a document's identity: (0-based document, message).
pub type IdentityProblem = (usize, Option<String>, Option<String>, String);

/// Reads `kind`, `metadata.name` and `metadata.namespace` of every document of a YAML or
/// JSON input without validating the rest (what `delete -f` needs).
pub fn identities(text: &str) -> Result<Vec<DocIdentity>, Vec<IdentityProblem>> {
    let t = text.trim_start_matches('\u{feff}').trim_start();
    let mut raw: Vec<Value> = Vec::new();
    if t.starts_with('{') || t.starts_with('[') {
        match serde_json::from_str::<Value>(t) {
            Ok(Value::Array(items)) => raw.extend(items),
            Ok(v) => raw.push(v),
            Err(e) => return Err(vec![(0, None, None, format!("invalid JSON: {e}"))]),
        }
    } else {
        let mut options = serde_saphyr::Options::default();
        options.strict_booleans = true;
        options.leading_zero_numbers_as_strings = true;
        options.underscored_numbers_as_strings = true;
        options.with_snippet = false;
        match serde_saphyr::from_str_multiple_with_options::<Value, Vec<Value>>(text, options) {
            Ok(docs) => raw.extend(docs),
            Err(e) => return Err(vec![(0, None, None, format!("invalid YAML: {e}"))]),
        }
    }
    let mut docs = Vec::new();
    for v in raw {
        if v.get("kind").and_then(Value::as_str) == Some("List")
            && let Some(Value::Array(items)) = v.get("items")
        {
            docs.extend(items.iter().filter(|i| !i.is_null()).cloned());
        } else if !v.is_null() {
            docs.push(v);
        }
    }
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for (i, d) in docs.iter().enumerate() {
        let kind_str = d.get("kind").and_then(Value::as_str);
        let meta = d.get("metadata");
        let name = meta
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty());
        let ns = meta
            .and_then(|m| m.get("namespace"))
            .and_then(Value::as_str)
            .unwrap_or(biplane_api::DEFAULT_NAMESPACE);
        let kind = kind_str.and_then(ResourceKind::from_kind_str);
        match (kind, name) {
            (Some(kind), Some(name)) => out.push(DocIdentity {
                document: i,
                key: ResourceKey::new(kind, ns, name),
                resource_version: resource_version_of(d),
            }),
            (None, _) => problems.push((
                i,
                kind_str.map(str::to_owned),
                name.map(str::to_owned),
                match kind_str {
                    Some(k) => format!("kind: unknown kind {k:?}"),
                    None => "kind: missing required field".to_owned(),
                },
            )),
            (Some(_), None) => problems.push((
                i,
                kind_str.map(str::to_owned),
                None,
                "metadata.name: missing required field".to_owned(),
            )),
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

/// A random 128-bit id as 32 hex digits, for `metadata.uid`.
pub fn new_uid() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// RFC 3339 in UTC with second precision (`2026-11-25T10:00:00Z`).
pub fn rfc3339(t: SystemTime) -> String {
    format_time(t, false)
}

/// RFC 3339 in UTC with millisecond precision (`2026-11-25T10:00:00.123Z`).
pub fn rfc3339_millis(t: SystemTime) -> String {
    format_time(t, true)
}

fn format_time(t: SystemTime, millis: bool) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let (y, m, day) = civil_from_days(days);
    let (hh, mm, ss) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    if millis {
        format!(
            "{y:04}-{m:02}-{day:02}T{hh:02}:{mm:02}:{ss:02}.{:03}Z",
            d.subsec_millis()
        )
    } else {
        format!("{y:04}-{m:02}-{day:02}T{hh:02}:{mm:02}:{ss:02}Z")
    }
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    (
        y,
        u32::try_from(m).unwrap_or(1),
        u32::try_from(d).unwrap_or(1),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

    use std::time::Duration;

    use super::*;

    #[test]
    fn keys_round_trip() {
        let k = store_key(ResourceKind::HttpRoute, "default", "web");
        assert_eq!(k, "/registry/HTTPRoute/default/web");
        assert_eq!(
            parse_store_key(&k),
            Some(ResourceKey::new(ResourceKind::HttpRoute, "default", "web"))
        );
        assert_eq!(parse_store_key("/registry/Nope/a/b"), None);
        assert_eq!(parse_store_key("/registry/Gateway/a"), None);
    }

    #[test]
    fn kinds_in_paths() {
        assert_eq!(kind_from_path("httproutes"), Some(ResourceKind::HttpRoute));
        assert_eq!(kind_from_path("Gateway"), Some(ResourceKind::Gateway));
        assert_eq!(kind_from_path("BACKENDS"), Some(ResourceKind::Backend));
        assert_eq!(kind_from_path("tlsroute"), Some(ResourceKind::TlsRoute));
        assert_eq!(kind_from_path("services"), None);
    }

    #[test]
    fn times() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_000_000_123);
        assert_eq!(rfc3339_millis(t), "2026-11-18T11:06:40.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn status_blocks_are_blanked() {
        let text = "kind: A\nstatus:\n  conditions:\n  - type: X\nspec:\n  a: 1\n---\nstatus: {}\nkind: B\n";
        let out = strip_status_yaml(text);
        assert_eq!(out, "kind: A\n\n\n\nspec:\n  a: 1\n---\n\nkind: B\n");
        let json =
            r#"[{"kind":"A","status":{"x":1}},{"kind":"List","items":[{"kind":"B","status":1}]}]"#;
        assert_eq!(
            strip_status_json(json),
            r#"[{"kind":"A"},{"items":[{"kind":"B"}],"kind":"List"}]"#
        );
    }

    #[test]
    fn identities_are_read_leniently() {
        let text = "apiVersion: v1\nkind: Secret\nmetadata: {name: s, namespace: x}\ndata: 3\n---\nkind: Backend\nmetadata: {name: b, resourceVersion: '7'}\n";
        let ids = identities(text).unwrap();
        assert_eq!(ids.len(), 2);
        assert_eq!(ids[0].key, ResourceKey::new(ResourceKind::Secret, "x", "s"));
        assert_eq!(ids[1].resource_version.as_deref(), Some("7"));
        let bad =
            identities("kind: Service\nmetadata: {name: a}\n---\nkind: Gateway\n").unwrap_err();
        assert_eq!(bad.len(), 2);
        assert_eq!(bad[1].0, 1);
    }

    #[test]
    fn yaml_quotes_ambiguous_strings_and_diffs() {
        let v = serde_json::json!({"a": "yes", "b": "010", "c": 1, "d": ["x"]});
        let y = to_yaml(&v);
        let back: Value = serde_saphyr::from_str(&y).unwrap();
        assert_eq!(back, v, "{y}");
        let d = unified_diff("a: 1\nb: 2\n", "a: 1\nb: 3\n", "Backend/default/b");
        assert!(d.contains("--- a/Backend/default/b"), "{d}");
        assert!(d.contains("-b: 2\n+b: 3"), "{d}");
        assert_eq!(unified_diff("x", "x", "l"), "");
    }

    #[test]
    fn secrets_are_redacted() {
        let mut a =
            serde_json::json!({"kind": "Secret", "data": {"tls.crt": "Y3J0", "tls.key": "a2V5"}});
        let mut b = a.clone();
        b["data"]["tls.key"] = Value::from("b3RoZXI=");
        redact_pair(&mut a, &mut b);
        assert_eq!(a["data"]["tls.key"], "<redacted> (before)");
        assert_eq!(b["data"]["tls.key"], "<redacted> (after)");
        assert_eq!(a["data"]["tls.crt"], "Y3J0");
    }
}
