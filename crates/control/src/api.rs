//! The admin API (`/api/v1/...`, axum): atomic apply, create-or-update, get/list/delete,
//! delete-many, diff, watch, fleet status, `/metrics` and `/healthz`. The contract is
//! `briefs/api.md`; handlers translate between HTTP and the store, with validation done
//! by `biplane_api::parse_documents` plus whole-set checks on the union of stored and
//! applied resources.
//!
//! # Apply
//! One consistent read of `/registry/` at revision `R`; each document becomes `created`,
//! `configured` or `unchanged` (same spec/labels/annotations: no write); every touched
//! key's mod revision as read is compared in one store transaction with the puts, so two
//! concurrent applies conflict instead of interleaving. A compare failure that is not the
//! user's own `resourceVersion` mismatch is retried from the read (a few times).

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use biplane_api::{Resource, ResourceKey, ResourceKind, ResourceSet, ValidationErrors};
use biplane_xds::server::{AdsServer, FleetStatus};
use biplane_xds::{TranslateError, TranslateOptions, to_xds};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::auth::{AuthState, require_token};
use crate::ca::{Ca, NodeIdentity};
use crate::certs::{CertError, NodeCerts};
use crate::controller::{ControllerShared, decode, stopping};
use crate::docs::{
    self, REGISTRY_PREFIX, generation_of, key_of, kind_from_path, kind_prefix, new_uid,
    parse_store_key, redact, redact_pair, rfc3339, set_resource_version, spec_view, to_yaml,
    unified_diff, user_view,
};
use crate::metrics::{CONTENT_TYPE, Metrics};
use crate::nodes::Revocations;
use crate::status::{StatusContext, fleet_status};
use crate::store::{
    Compare, Event, KeyValue, Op, Precondition, RangeResponse, Store, StoreError, Txn,
};
use crate::tokens::{Principal, Role, TokenError, Tokens};

/// How many times an apply or delete re-reads and retries after a concurrent write.
const ATTEMPTS: usize = 5;
/// Largest accepted request body.
const BODY_LIMIT: usize = 16 << 20;
/// How long a read waits for the controller to reach the revision it read (for status).
const STATUS_WAIT: Duration = Duration::from_secs(2);

/// What the handlers share.
pub struct ApiState {
    /// The resource store.
    pub store: Arc<dyn Store>,
    /// The controller's view (resources, compile records, lags).
    pub shared: Arc<ControllerShared>,
    /// The ADS server's fleet view.
    pub fleet: FleetStatus,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Translation options (the whole-set checks compile Gateways as the controller does).
    pub translate: TranslateOptions,
    /// Becomes true on shutdown (ends watch streams).
    pub shutdown: watch::Receiver<bool>,
    /// Bootstrap and API tokens (`/api/v1/tokens`).
    pub tokens: Tokens,
    /// Whether every request (but `/healthz`) needs a bearer token ([`crate::auth`]).
    pub auth: bool,
    /// The CA that signs enrolled nodes' certificates (`/api/v1/enroll`).
    pub ca: Arc<Ca>,
    /// Enrollment and renewal.
    pub certs: NodeCerts,
    /// Revoked node ids (`/api/v1/nodes/{id}/revoke`, `/api/v1/revocations`).
    pub revocations: Revocations,
    /// The ADS server, to close a revoked node's streams.
    pub ads: AdsServer,
}

/// The admin API's routes.
pub fn router(state: Arc<ApiState>) -> Router {
    let auth = state.auth.then(|| {
        Arc::new(AuthState {
            tokens: state.tokens.clone(),
        })
    });
    let router = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route("/api/v1/apply", post(apply))
        .route("/api/v1/delete", post(delete_many))
        .route("/api/v1/diff", post(diff))
        .route("/api/v1/watch", get(watch_handler))
        .route("/api/v1/status", get(status))
        .route("/api/v1/tokens", get(list_tokens).post(create_token))
        .route("/api/v1/enroll", post(enroll))
        .route("/api/v1/nodes/{id}/revoke", post(revoke_node))
        .route("/api/v1/revocations", get(list_revocations))
        .route("/api/v1/{kind}", get(list))
        .route(
            "/api/v1/{kind}/{namespace}/{name}",
            get(get_one).put(put_one).delete(delete_one),
        )
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state);
    match auth {
        Some(auth) => router.layer(axum::middleware::from_fn_with_state(auth, require_token)),
        None => router,
    }
}

// ------------------------------------------------------------------ errors

/// An error answer: `{"error": code, "message": text, ...}` with a status code.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: Value,
    /// Adds `WWW-Authenticate: Bearer` (401 answers).
    challenge: bool,
}

impl ApiError {
    fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            body: json!({"error": code, "message": message.into()}),
            challenge: false,
        }
    }

    fn with(mut self, field: &str, value: Value) -> Self {
        if let Some(o) = self.body.as_object_mut() {
            o.insert(field.to_owned(), value);
        }
        self
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    fn not_found(key: &ResourceKey) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{} {}/{} not found", key.kind, key.namespace, key.name),
        )
        .with_key(key)
    }

    fn conflict(key: &ResourceKey, message: String) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message).with_key(key)
    }

    fn invalid(errors: Vec<Value>) -> Self {
        let n = errors.len();
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            format!("{n} error{}", if n == 1 { "" } else { "s" }),
        )
        .with("errors", Value::Array(errors))
    }

    fn with_key(self, key: &ResourceKey) -> Self {
        self.with("kind", json!(key.kind.as_str()))
            .with("namespace", json!(key.namespace))
            .with("name", json!(key.name))
    }

    /// The metrics outcome of an apply that ended with this error.
    fn outcome(&self) -> &'static str {
        match self.status {
            StatusCode::UNPROCESSABLE_ENTITY => "invalid",
            StatusCode::CONFLICT => "conflict",
            StatusCode::BAD_REQUEST => "bad_request",
            _ => "error",
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let status = match e {
            StoreError::Closed => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        tracing::error!(error = %e, "store error");
        ApiError::new(status, "store", format!("store error: {e}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body)).into_response();
        if self.challenge {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static(
                    "Bearer realm=\"biplane\", error=\"invalid_token\"",
                ),
            );
        }
        resp
    }
}

type ApiResult = Result<Response, ApiError>;

fn ok(body: Value) -> ApiResult {
    Ok((StatusCode::OK, axum::Json(body)).into_response())
}

// ------------------------------------------------------------------ parsing

fn body_text(body: &Bytes) -> Result<String, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not UTF-8: {e}")))?;
    Ok(docs::strip_status(text))
}

fn error_json(
    document: usize,
    kind: Option<&str>,
    namespace: Option<&str>,
    name: Option<&str>,
    path: &str,
    message: &str,
) -> Value {
    json!({
        "document": document + 1,
        "kind": kind,
        "namespace": namespace.or(name.map(|_| biplane_api::DEFAULT_NAMESPACE)),
        "name": name,
        "path": path,
        "message": message,
    })
}

fn validation_errors_json(errors: &ValidationErrors) -> Vec<Value> {
    errors
        .errors()
        .iter()
        .map(|e| {
            error_json(
                e.document,
                e.kind.as_deref(),
                e.namespace.as_deref(),
                e.name.as_deref(),
                &e.path,
                &e.message,
            )
        })
        .collect()
}

/// Parses and validates documents: 400 when nothing in the body can be read as YAML or
/// JSON, 422 with every problem otherwise.
fn parse_body(text: &str) -> Result<Vec<Resource>, ApiError> {
    match biplane_api::parse_documents(text) {
        Ok(v) if v.is_empty() => Err(ApiError::bad_request("the request body has no documents")),
        Ok(v) => Ok(v),
        Err(errors) => {
            let syntax_only = errors.errors().iter().all(|e| {
                e.kind.is_none()
                    && e.path.is_empty()
                    && (e.message.starts_with("invalid YAML")
                        || e.message.starts_with("invalid JSON"))
            });
            let list = validation_errors_json(&errors);
            if syntax_only {
                Err(ApiError::bad_request(errors.to_string()).with("errors", Value::Array(list)))
            } else {
                Err(ApiError::invalid(list))
            }
        }
    }
}

// ------------------------------------------------------------------ planning

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Created,
    Configured,
    Unchanged,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Created => "created",
            Action::Configured => "configured",
            Action::Unchanged => "unchanged",
        }
    }
}

/// One applied document, decided against one read of the store.
struct Planned {
    key: ResourceKey,
    store_key: String,
    action: Action,
    /// The stored document, if any.
    old_doc: Option<Value>,
    /// The document to store.
    new_doc: Value,
    /// The key's mod revision as read (0 = absent).
    read_mod_revision: u64,
}

struct Plan {
    revision: u64,
    items: Vec<Planned>,
}

impl ApiState {
    /// Reads the store once, decides each document's action and validates the union.
    async fn plan(&self, resources: &[Resource]) -> Result<Plan, ApiError> {
        let listed = self.store.range(REGISTRY_PREFIX).await?;
        let stored = self.stored_resources(&listed);
        let by_key: HashMap<&str, &KeyValue> =
            listed.kvs.iter().map(|kv| (kv.key.as_str(), kv)).collect();
        let now = rfc3339(SystemTime::now());
        let mut items = Vec::with_capacity(resources.len());
        for r in resources {
            let key = r.key();
            let skey = key_of(&key);
            let kv = by_key.get(skey.as_str()).copied();
            let read_mod_revision = kv.map_or(0, |kv| kv.mod_revision);
            if let Some(rv) = &r.metadata().resource_version {
                let matches = rv.parse::<u64>().ok() == Some(read_mod_revision) && kv.is_some();
                if !matches {
                    let current = kv.map_or("absent".to_owned(), |kv| {
                        format!("at resourceVersion {}", kv.mod_revision)
                    });
                    return Err(ApiError::conflict(
                        &key,
                        format!(
                            "{} {}/{}: resourceVersion {rv} does not match the stored object ({current}); re-read and apply again",
                            key.kind, key.namespace, key.name
                        ),
                    ));
                }
            }
            let old_doc: Option<Value> = kv.and_then(|kv| serde_json::from_slice(&kv.value).ok());
            let new_doc = stored_form(r, old_doc.as_ref(), &now);
            let action = match &old_doc {
                None => Action::Created,
                Some(old) if *old == new_doc => Action::Unchanged,
                Some(_) => Action::Configured,
            };
            items.push(Planned {
                key,
                store_key: skey,
                action,
                old_doc,
                new_doc,
                read_mod_revision,
            });
        }
        let errors = self.union_errors(stored, resources).await;
        if !errors.is_empty() {
            return Err(ApiError::invalid(errors));
        }
        Ok(Plan {
            revision: listed.revision,
            items,
        })
    }

    /// The stored resources of a listing with their create revisions, reusing the
    /// controller's parsed copies when they are current.
    fn stored_resources(&self, listed: &RangeResponse) -> Vec<(u64, Resource)> {
        let world = self.shared.world();
        let mut out = Vec::with_capacity(listed.kvs.len());
        for kv in &listed.kvs {
            let Some(key) = parse_store_key(&kv.key) else {
                continue;
            };
            match world.items.get(&key) {
                Some(item) if item.mod_revision == kv.mod_revision => {
                    out.push((kv.create_revision, item.resource.clone()));
                }
                _ => match decode(&kv.value) {
                    Ok(r) => out.push((kv.create_revision, r)),
                    Err(e) => {
                        tracing::warn!(key = %kv.key, error = %e, "stored document is invalid; ignored")
                    }
                },
            }
        }
        out
    }

    /// Checks that need the whole set: every Gateway of the union of stored and applied
    /// resources is compiled as the controller would; problems in applied documents are
    /// errors (problems only in stored ones are the controller's to report).
    async fn union_errors(&self, stored: Vec<(u64, Resource)>, applied: &[Resource]) -> Vec<Value> {
        // Translation problems belong to a Gateway (listeners) or a Backend (endpoint
        // resolution): without either among the applied documents there is nothing to
        // report, so skip the compilation (and its DNS lookups).
        if !applied
            .iter()
            .any(|r| matches!(r.kind(), ResourceKind::Gateway | ResourceKind::Backend))
        {
            return Vec::new();
        }
        let applied_index: HashMap<ResourceKey, usize> = applied
            .iter()
            .enumerate()
            .map(|(i, r)| (r.key(), i))
            .collect();
        let mut union: BTreeMap<ResourceKey, (u64, Resource)> = stored
            .into_iter()
            .map(|(rev, r)| (r.key(), (rev, r)))
            .collect();
        for r in applied {
            let rev = union.get(&r.key()).map_or(u64::MAX, |(rev, _)| *rev);
            union.insert(r.key(), (rev, r.clone()));
        }
        let mut ordered: Vec<(u64, Resource)> = union.into_values().collect();
        ordered.sort_by_key(|a| (a.0, a.1.key()));
        let set = ResourceSet::new(ordered.into_iter().map(|(_, r)| r).collect());
        let opts = self.translate;
        let work = tokio::task::spawn_blocking(move || {
            let mut found: Vec<(ResourceKey, String, String)> = Vec::new();
            let gateways: Vec<(String, String)> = set
                .gateways()
                .map(|g| (g.metadata.namespace().to_owned(), g.metadata.name.clone()))
                .collect();
            for (ns, name) in gateways {
                let Err(errs) = to_xds(&set, &ns, &name, &opts) else {
                    continue;
                };
                for e in errs.0 {
                    if let Some(p) = attribute(&e) {
                        found.push(p);
                    }
                }
            }
            found
        });
        let found = work.await.unwrap_or_default();
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (key, path, message) in found {
            let Some(&doc) = applied_index.get(&key) else {
                continue;
            };
            if !seen.insert((key.clone(), path.clone(), message.clone())) {
                continue;
            }
            out.push(error_json(
                doc,
                Some(key.kind.as_str()),
                Some(&key.namespace),
                Some(&key.name),
                &path,
                &message,
            ));
        }
        out
    }

    /// Apply (and PUT): plan, then one transaction; retried on concurrent writes.
    async fn apply_resources(
        &self,
        resources: Vec<Resource>,
        dry_run: bool,
    ) -> Result<(Value, &'static str), ApiError> {
        let mut last_conflict = None;
        for _ in 0..ATTEMPTS {
            let plan = self.plan(&resources).await?;
            if dry_run {
                return Ok((
                    apply_body(plan.revision, &plan.items, None, true),
                    "dry_run",
                ));
            }
            let ops: Vec<Op> = plan
                .items
                .iter()
                .filter(|p| p.action != Action::Unchanged)
                .map(|p| {
                    Op::put(
                        p.store_key.clone(),
                        serde_json::to_vec(&p.new_doc).unwrap_or_default(),
                    )
                })
                .collect();
            if ops.is_empty() {
                return Ok((
                    apply_body(plan.revision, &plan.items, None, false),
                    "unchanged",
                ));
            }
            let txn = Txn {
                compares: plan
                    .items
                    .iter()
                    .map(|p| Compare::mod_revision(p.store_key.clone(), p.read_mod_revision))
                    .collect(),
                ops,
            };
            match self.store.txn(txn).await {
                Ok(resp) => {
                    for p in &plan.items {
                        tracing::info!(resource = %p.key, action = p.action.as_str(), revision = resp.revision, "applied");
                    }
                    let body = apply_body(resp.revision, &plan.items, Some(resp.revision), false);
                    return Ok((body, "applied"));
                }
                Err(StoreError::Conflict { key, .. }) => {
                    tracing::debug!(key, "apply raced with another write; retrying");
                    last_conflict = Some(key);
                }
                Err(e) => return Err(e.into()),
            }
        }
        let key = last_conflict
            .as_deref()
            .and_then(parse_store_key)
            .unwrap_or_else(|| resources[0].key());
        Err(ApiError::conflict(
            &key,
            format!(
                "{key}: the store kept changing under this apply ({ATTEMPTS} attempts); try again"
            ),
        ))
    }
}

/// Maps a translation error to (resource, path, message).
fn attribute(e: &TranslateError) -> Option<(ResourceKey, String, String)> {
    let split = |s: &str| -> (String, String) {
        match s.split_once('/') {
            Some((ns, n)) => (ns.to_owned(), n.to_owned()),
            None => (biplane_api::DEFAULT_NAMESPACE.to_owned(), s.to_owned()),
        }
    };
    match e {
        TranslateError::GatewayNotFound { .. } => None,
        TranslateError::ListenerConflict {
            gateway,
            listener,
            protocol,
            port,
            other,
            other_protocol,
        } => {
            let (ns, name) = split(gateway);
            Some((
                ResourceKey::new(ResourceKind::Gateway, ns, name),
                format!("spec.listeners[{listener}]"),
                format!(
                    "protocol {protocol} cannot share port {port} with listener {other:?} ({other_protocol})"
                ),
            ))
        }
        TranslateError::EndpointResolution {
            backend,
            index,
            address,
            message,
        } => {
            let (ns, name) = split(backend);
            Some((
                ResourceKey::new(ResourceKind::Backend, ns, name),
                format!("spec.endpoints[{index}].address"),
                format!("cannot resolve {address:?} to an IP address: {message}"),
            ))
        }
    }
}

/// The document as stored: normalized by `Resource::to_document`, with the server-set
/// metadata (uid and creationTimestamp kept from the stored version; generation bumped
/// when anything but metadata changed). `resourceVersion` is never stored.
fn stored_form(r: &Resource, old: Option<&Value>, now: &str) -> Value {
    let mut r = r.clone();
    let ns = r.namespace().to_owned();
    let old_meta = |field: &str| -> Option<String> {
        old.and_then(|d| d.get("metadata"))
            .and_then(|m| m.get(field))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let m = r.metadata_mut();
    m.namespace = Some(ns);
    m.resource_version = None;
    m.uid = Some(old_meta("uid").unwrap_or_else(new_uid));
    m.creation_timestamp = Some(old_meta("creationTimestamp").unwrap_or_else(|| now.to_owned()));
    m.generation = None;
    let mut doc = r.to_document();
    let generation = match old {
        None => 1,
        Some(old) if spec_view(old) == spec_view(&doc) => generation_of(old),
        Some(old) => generation_of(old) + 1,
    };
    if let Some(meta) = doc.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("generation".to_owned(), json!(generation));
    }
    doc
}

fn apply_body(revision: u64, items: &[Planned], written: Option<u64>, dry_run: bool) -> Value {
    let results: Vec<Value> = items
        .iter()
        .map(|p| {
            let rv = match (p.action, written) {
                (Action::Unchanged, _) => Some(p.read_mod_revision),
                (_, Some(w)) => Some(w),
                (_, None) if p.read_mod_revision > 0 => Some(p.read_mod_revision),
                _ => None,
            };
            json!({
                "kind": p.key.kind.as_str(),
                "namespace": p.key.namespace,
                "name": p.key.name,
                "action": p.action.as_str(),
                "resourceVersion": rv.map(|r| r.to_string()),
            })
        })
        .collect();
    let mut body = json!({"revision": revision, "results": results});
    if dry_run && let Some(o) = body.as_object_mut() {
        o.insert("dryRun".to_owned(), json!(true));
    }
    body
}

// ------------------------------------------------------------------ handlers

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApplyQuery {
    #[serde(default)]
    dry_run: bool,
}

async fn apply(
    State(state): State<Arc<ApiState>>,
    Query(q): Query<ApplyQuery>,
    body: Bytes,
) -> Response {
    let result = async {
        let text = body_text(&body)?;
        let resources = parse_body(&text)?;
        state.apply_resources(resources, q.dry_run).await
    }
    .await;
    finish_apply(&state.metrics, result)
}

/// Counts an apply by outcome and turns it into the response.
fn finish_apply(metrics: &Metrics, result: Result<(Value, &'static str), ApiError>) -> Response {
    match result {
        Ok((body, outcome)) => {
            metrics.apply(outcome);
            (StatusCode::OK, axum::Json(body)).into_response()
        }
        Err(e) => {
            metrics.apply(e.outcome());
            e.into_response()
        }
    }
}

fn path_key(kind: &str, namespace: &str, name: &str) -> Result<ResourceKey, ApiError> {
    let kind = kind_from_path(kind).ok_or_else(|| unknown_kind(kind))?;
    Ok(ResourceKey::new(kind, namespace, name))
}

fn unknown_kind(kind: &str) -> ApiError {
    let known: Vec<&str> = ResourceKind::ALL.iter().map(|k| k.as_str()).collect();
    ApiError::new(
        StatusCode::NOT_FOUND,
        "unknown_kind",
        format!("unknown kind {kind:?} (known: {})", known.join(", ")),
    )
}

async fn put_one(
    State(state): State<Arc<ApiState>>,
    Path((kind, namespace, name)): Path<(String, String, String)>,
    Query(q): Query<ApplyQuery>,
    body: Bytes,
) -> Response {
    let result = async {
        let key = path_key(&kind, &namespace, &name)?;
        let text = body_text(&body)?;
        let resources = parse_body(&text)?;
        let [r] = resources.as_slice() else {
            return Err(ApiError::bad_request(format!(
                "PUT takes exactly one document, got {}",
                resources.len()
            )));
        };
        if r.key() != key {
            return Err(ApiError::bad_request(format!(
                "the document is {} but the path names {key}",
                r.key()
            )));
        }
        state.apply_resources(resources, q.dry_run).await
    }
    .await;
    finish_apply(&state.metrics, result)
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReadQuery {
    namespace: Option<String>,
    #[serde(default)]
    show_secrets: bool,
}

/// A stored document as served: resourceVersion, redaction, status.
fn served(kv: &KeyValue, show_secrets: bool, ctx: &StatusContext<'_>) -> Option<Value> {
    let key = parse_store_key(&kv.key)?;
    let mut doc: Value = serde_json::from_slice(&kv.value).ok()?;
    set_resource_version(&mut doc, kv.mod_revision);
    if !show_secrets {
        redact(&mut doc);
    }
    let generation = generation_of(&doc);
    if let Some(status) = ctx.status_of(&key, generation, kv.mod_revision)
        && let Some(o) = doc.as_object_mut()
    {
        o.insert("status".to_owned(), status);
    }
    Some(doc)
}

async fn list(
    State(state): State<Arc<ApiState>>,
    Path(kind): Path<String>,
    Query(q): Query<ReadQuery>,
) -> ApiResult {
    let kind = kind_from_path(&kind).ok_or_else(|| unknown_kind(&kind))?;
    let listed = state
        .store
        .range(&kind_prefix(kind, q.namespace.as_deref()))
        .await?;
    let world = state.shared.world_at(listed.revision, STATUS_WAIT).await;
    let ctx = StatusContext::new(&world, &state.shared, &state.fleet);
    let mut kvs: Vec<(ResourceKey, &KeyValue)> = listed
        .kvs
        .iter()
        .filter_map(|kv| parse_store_key(&kv.key).map(|k| (k, kv)))
        .collect();
    kvs.sort_by(|a, b| (&a.0.namespace, &a.0.name).cmp(&(&b.0.namespace, &b.0.name)));
    let items: Vec<Value> = kvs
        .iter()
        .filter_map(|(_, kv)| served(kv, q.show_secrets, &ctx))
        .collect();
    ok(json!({"kind": "List", "revision": listed.revision, "items": items}))
}

async fn get_one(
    State(state): State<Arc<ApiState>>,
    Path((kind, namespace, name)): Path<(String, String, String)>,
    Query(q): Query<ReadQuery>,
) -> ApiResult {
    let key = path_key(&kind, &namespace, &name)?;
    let got = state.store.get(&key_of(&key)).await?;
    let Some(kv) = got.kv else {
        return Err(ApiError::not_found(&key));
    };
    let world = state.shared.world_at(got.revision, STATUS_WAIT).await;
    let ctx = StatusContext::new(&world, &state.shared, &state.fleet);
    let doc = served(&kv, q.show_secrets, &ctx).ok_or_else(|| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "corrupt",
            format!("the stored document of {key} cannot be read"),
        )
    })?;
    ok(doc)
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeleteQuery {
    resource_version: Option<String>,
}

fn rv_matches(expected: Option<&str>, mod_revision: u64) -> bool {
    expected.is_none_or(|rv| rv.parse::<u64>().ok() == Some(mod_revision))
}

async fn delete_one(
    State(state): State<Arc<ApiState>>,
    Path((kind, namespace, name)): Path<(String, String, String)>,
    Query(q): Query<DeleteQuery>,
) -> ApiResult {
    let key = path_key(&kind, &namespace, &name)?;
    let skey = key_of(&key);
    for _ in 0..ATTEMPTS {
        let got = state.store.get(&skey).await?;
        let Some(kv) = got.kv else {
            return Err(ApiError::not_found(&key));
        };
        if !rv_matches(q.resource_version.as_deref(), kv.mod_revision) {
            return Err(ApiError::conflict(
                &key,
                format!(
                    "{key}: resourceVersion {} does not match the stored object (at resourceVersion {})",
                    q.resource_version.as_deref().unwrap_or_default(),
                    kv.mod_revision
                ),
            ));
        }
        match state
            .store
            .delete(&skey, Precondition::ModRevision(kv.mod_revision))
            .await
        {
            Ok(resp) => {
                tracing::info!(resource = %key, revision = resp.revision, "deleted");
                return ok(json!({
                    "revision": resp.revision,
                    "deleted": {"kind": key.kind.as_str(), "namespace": key.namespace, "name": key.name},
                }));
            }
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::conflict(
        &key,
        format!("{key}: the object kept changing during the delete; try again"),
    ))
}

async fn delete_many(State(state): State<Arc<ApiState>>, body: Bytes) -> ApiResult {
    let text = body_text(&body)?;
    let ids = docs::identities(&text).map_err(|problems| {
        ApiError::invalid(
            problems
                .iter()
                .map(|(doc, kind, name, message)| {
                    let (path, msg) = message.split_once(": ").unwrap_or(("", message));
                    error_json(*doc, kind.as_deref(), None, name.as_deref(), path, msg)
                })
                .collect(),
        )
    })?;
    if ids.is_empty() {
        return Err(ApiError::bad_request("the request body has no documents"));
    }
    let mut unique: Vec<&docs::DocIdentity> = Vec::new();
    for id in &ids {
        if !unique.iter().any(|u| u.key == id.key) {
            unique.push(id);
        }
    }
    for _ in 0..ATTEMPTS {
        let mut compares = Vec::new();
        let mut ops = Vec::new();
        let mut found = Vec::new();
        let mut revision = 0;
        for id in &unique {
            let skey = key_of(&id.key);
            let got = state.store.get(&skey).await?;
            revision = revision.max(got.revision);
            let current = got.kv.as_ref().map_or(0, |kv| kv.mod_revision);
            if let Some(rv) = &id.resource_version
                && !(current > 0 && rv_matches(Some(rv), current))
            {
                return Err(ApiError::conflict(
                    &id.key,
                    format!(
                        "{}: resourceVersion {rv} does not match the stored object ({})",
                        id.key,
                        if current == 0 {
                            "absent".to_owned()
                        } else {
                            format!("at resourceVersion {current}")
                        }
                    ),
                ));
            }
            compares.push(Compare::mod_revision(skey.clone(), current));
            if current > 0 {
                ops.push(Op::delete(skey));
            }
            found.push(current > 0);
        }
        let result_body = |revision: u64| {
            let results: Vec<Value> = unique
                .iter()
                .zip(&found)
                .map(|(id, present)| {
                    json!({
                        "kind": id.key.kind.as_str(),
                        "namespace": id.key.namespace,
                        "name": id.key.name,
                        "action": if *present { "deleted" } else { "not_found" },
                    })
                })
                .collect();
            json!({"revision": revision, "results": results})
        };
        if ops.is_empty() {
            return ok(result_body(revision));
        }
        match state.store.txn(Txn { compares, ops }).await {
            Ok(resp) => return ok(result_body(resp.revision)),
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::new(
        StatusCode::CONFLICT,
        "conflict",
        "the objects kept changing during the delete; try again",
    ))
}

async fn diff(State(state): State<Arc<ApiState>>, body: Bytes) -> ApiResult {
    let text = body_text(&body)?;
    let resources = parse_body(&text)?;
    let plan = state.plan(&resources).await?;
    let diffs: Vec<Value> = plan
        .items
        .iter()
        .map(|p| {
            let label = format!("{}/{}/{}", p.key.kind, p.key.namespace, p.key.name);
            let mut new = user_view(&p.new_doc);
            let (action, text) = match (&p.old_doc, p.action) {
                (_, Action::Unchanged) => ("unchanged", String::new()),
                (None, _) => {
                    redact(&mut new);
                    ("create", unified_diff("", &to_yaml(&new), &label))
                }
                (Some(old), _) => {
                    let mut old = user_view(old);
                    redact_pair(&mut old, &mut new);
                    (
                        "update",
                        unified_diff(&to_yaml(&old), &to_yaml(&new), &label),
                    )
                }
            };
            json!({
                "kind": p.key.kind.as_str(),
                "namespace": p.key.namespace,
                "name": p.key.name,
                "action": action,
                "diff": text,
            })
        })
        .collect();
    ok(json!({"diffs": diffs}))
}

#[derive(Debug, Deserialize)]
struct WatchQuery {
    revision: Option<u64>,
    kind: Option<String>,
}

/// One watch event as an ndjson line.
fn watch_line(event: &Event) -> Option<Bytes> {
    let (kind, revision, object) = match event {
        Event::Put { kv, prev } => {
            let mut doc: Value = serde_json::from_slice(&kv.value).ok()?;
            set_resource_version(&mut doc, kv.mod_revision);
            redact(&mut doc);
            let kind = if prev.is_some() { "MODIFIED" } else { "ADDED" };
            (kind, kv.mod_revision, doc)
        }
        Event::Delete { key, mod_revision } => {
            let k = parse_store_key(key)?;
            let doc = json!({
                "apiVersion": k.kind.api_version(),
                "kind": k.kind.as_str(),
                "metadata": {
                    "name": k.name,
                    "namespace": k.namespace,
                    "resourceVersion": mod_revision.to_string(),
                },
            });
            ("DELETED", *mod_revision, doc)
        }
    };
    let mut line =
        serde_json::to_vec(&json!({"type": kind, "revision": revision, "object": object})).ok()?;
    line.push(b'\n');
    Some(Bytes::from(line))
}

async fn watch_handler(
    State(state): State<Arc<ApiState>>,
    Query(q): Query<WatchQuery>,
) -> ApiResult {
    let prefix = match &q.kind {
        Some(k) => kind_prefix(kind_from_path(k).ok_or_else(|| unknown_kind(k))?, None),
        None => REGISTRY_PREFIX.to_owned(),
    };
    let from = q.revision.map_or(0, |r| r + 1);
    let mut stream = match state.store.watch(&prefix, from).await {
        Ok(s) => s,
        Err(StoreError::Compacted {
            requested,
            compact_revision,
        }) => {
            return Err(ApiError::new(
                StatusCode::GONE,
                "compacted",
                format!(
                    "revision {requested} has been compacted (history starts after revision {compact_revision}); list again and watch from its revision"
                ),
            ));
        }
        Err(e) => return Err(e.into()),
    };
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(16);
    let mut shutdown = state.shutdown.clone();
    tokio::spawn(async move {
        loop {
            let batch = tokio::select! {
                () = stopping(&mut shutdown) => return,
                () = tx.closed() => return,
                b = stream.recv() => b,
            };
            match batch {
                Some(Ok(b)) => {
                    for e in &b.events {
                        if let Some(line) = watch_line(e)
                            && tx.send(Ok(line)).await.is_err()
                        {
                            return;
                        }
                    }
                }
                Some(Err(e)) => {
                    let mut line =
                        serde_json::to_vec(&json!({"type": "ERROR", "message": e.to_string()}))
                            .unwrap_or_default();
                    line.push(b'\n');
                    let _ = tx.send(Ok(Bytes::from(line))).await;
                    return;
                }
                None => return,
            }
        }
    });
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(ReceiverStream::new(rx)))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()))
}

async fn status(State(state): State<Arc<ApiState>>) -> ApiResult {
    let revision = state.store.current_revision().await?;
    ok(fleet_status(revision, &state.fleet, &state.shared))
}

async fn metrics(State(state): State<Arc<ApiState>>) -> Response {
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        state.metrics.encode(),
    )
        .into_response()
}

// ------------------------------------------------------------------ tokens

/// The body of `POST /api/v1/tokens`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    kind: String,
    gateway: Option<String>,
    role: Option<String>,
    name: Option<String>,
    ttl: Option<String>,
    uses: Option<u32>,
}

/// Default lifetime of a bootstrap token.
const BOOTSTRAP_TTL: Duration = Duration::from_secs(3600);

fn token_error(e: TokenError) -> ApiError {
    match e {
        TokenError::Store(e) => e.into(),
        TokenError::Random | TokenError::File(_) => {
            tracing::error!(error = %e, "cannot mint a token");
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        }
        e => ApiError::bad_request(e.to_string()),
    }
}

/// `POST /api/v1/tokens`: mints a bootstrap or API token; the only time it is shown.
async fn create_token(State(state): State<Arc<ApiState>>, body: Bytes) -> ApiResult {
    let req: TokenRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid token request: {e}")))?;
    let ttl = req
        .ttl
        .as_deref()
        .map(|t| {
            biplane_api::parse_duration(t).map_err(|e| ApiError::bad_request(format!("ttl: {e}")))
        })
        .transpose()?;
    match req.kind.as_str() {
        "bootstrap" => {
            if req.role.is_some() || req.name.is_some() {
                return Err(ApiError::bad_request(
                    "a bootstrap token takes gateway, ttl and uses (not role or name)",
                ));
            }
            let gateway = req
                .gateway
                .ok_or_else(|| ApiError::bad_request("a bootstrap token needs a gateway"))?;
            let ttl = ttl.unwrap_or(BOOTSTRAP_TTL);
            let uses = req.uses.unwrap_or(1);
            let token = state
                .tokens
                .mint_bootstrap(&gateway, ttl, uses)
                .await
                .map_err(token_error)?;
            let gateway = crate::tokens::normalize_gateway(&gateway).map_err(token_error)?;
            tracing::info!(%gateway, uses, ttl_secs = ttl.as_secs(), "bootstrap token minted");
            ok(json!({
                "token": token,
                // What a node is given: the token and the CA pin it verifies us with.
                "pinnedToken": format!("{token}.{}", state.ca.pin()),
                "caPin": state.ca.pin(),
                "kind": "bootstrap",
                "gateway": gateway,
                "usesLeft": uses,
                "expiresAt": rfc3339(SystemTime::now() + ttl),
            }))
        }
        "api" => {
            if req.gateway.is_some() || req.uses.is_some() {
                return Err(ApiError::bad_request(
                    "an api token takes role, name and ttl (not gateway or uses)",
                ));
            }
            let role_text = req
                .role
                .ok_or_else(|| ApiError::bad_request("an api token needs a role"))?;
            let role = Role::parse(&role_text).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "unknown role {role_text:?} (admin, editor or viewer)"
                ))
            })?;
            let name = req
                .name
                .ok_or_else(|| ApiError::bad_request("an api token needs a name"))?;
            let token = state
                .tokens
                .mint_api(role, &name, ttl)
                .await
                .map_err(token_error)?;
            tracing::info!(token = %name, %role, "api token minted");
            ok(json!({
                "token": token,
                "kind": "api",
                "role": role,
                "name": name,
                "expiresAt": ttl.map(|t| rfc3339(SystemTime::now() + t)),
            }))
        }
        other => Err(ApiError::bad_request(format!(
            "unknown token kind {other:?} (bootstrap or api)"
        ))),
    }
}

/// `GET /api/v1/tokens`: metadata of every token (never the tokens).
async fn list_tokens(State(state): State<Arc<ApiState>>) -> ApiResult {
    let items = state.tokens.list().await.map_err(token_error)?;
    ok(json!({"kind": "TokenList", "items": items}))
}

/// The body of `POST /api/v1/enroll`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct EnrollRequest {
    /// The node id the proxy will send as `node.id`.
    node_id: String,
    /// A PEM PKCS#10 CSR for the key pair the proxy generated.
    csr: String,
}

/// `POST /api/v1/enroll` with `Authorization: Bearer <bootstrap token>`: spends one use
/// of the token and returns a certificate for `spiffe://<td>/gateway/<ns>/<name>/node/<id>`
/// (the Gateway comes from the token, never from the request) and the CA bundle. The
/// same as the `Enroll` RPC on the xDS port, for tooling that speaks only HTTP.
async fn enroll(
    State(state): State<Arc<ApiState>>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> ApiResult {
    let unauthorized = |message: String| {
        let mut e = ApiError::new(StatusCode::UNAUTHORIZED, "invalid_token", message);
        e.challenge = true;
        e
    };
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())
        .ok_or_else(|| {
            unauthorized("enrollment needs \"Authorization: Bearer <bootstrap token>\"".to_owned())
        })?;
    let req: EnrollRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid enrollment request: {e}")))?;
    let issued = state
        .certs
        .enroll(strip_pin(token), &req.node_id, &req.csr)
        .await
        .map_err(|e| match e {
            CertError::Unauthenticated(m) => unauthorized(m),
            CertError::Denied(m) => ApiError::new(StatusCode::FORBIDDEN, "forbidden", m),
            CertError::Invalid(m) => ApiError::bad_request(m),
            CertError::Store(e) => e.into(),
        })?;
    ok(json!({
        "identity": issued.cert.identity.uri(),
        "gateway": issued.gateway,
        "nodeId": issued.cert.identity.node_id,
        "certificate": issued.cert.cert_pem,
        "caCertificate": issued.ca_pem,
        "notAfter": rfc3339(issued.cert.not_after),
    }))
}

/// A bootstrap token as handed out (`<token>.<CA pin>`) without its pin.
pub fn strip_pin(token: &str) -> &str {
    token.rsplit_once('.').map_or(token, |(t, _)| t)
}

/// `POST /api/v1/nodes/{id}/revoke` (admin): the node's streams are closed now, and it
/// can no longer connect, renew its certificate or enroll again under that id.
async fn revoke_node(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    principal: Option<axum::Extension<Principal>>,
) -> ApiResult {
    NodeIdentity::new(state.ca.trust_domain(), "default", "x", &id)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let by = principal.map_or_else(|| "anonymous".to_owned(), |p| p.0.name);
    let (record, new) = state.revocations.revoke(&id, &by).await?;
    state.ads.disconnect(&id);
    if new {
        tracing::warn!(node = %id, by = %by, "node revoked");
    }
    ok(
        json!({"kind": "Revocation", "nodeId": record.node_id, "revokedAt": record.revoked_at, "revokedBy": record.revoked_by, "new": new}),
    )
}

/// `GET /api/v1/revocations`: the revoked node ids.
async fn list_revocations(State(state): State<Arc<ApiState>>) -> ApiResult {
    ok(json!({"kind": "RevocationList", "items": state.revocations.list()}))
}
