//! Data side: Envoy xDS v3 resources → `biplane_config::Config`, rejecting with a resource
//! name and field path everything the proxy cannot honour.
//!
//! Every message is destructured field by field (no `..`), so a field added to the protos
//! by an `envoy-types` upgrade is a compile error here rather than a field silently
//! ignored. Fields the proxy does not implement are checked to be unset
//! (`reject_set!`) and named in the error when they are set.

mod cluster;
mod listener;
mod route;

use std::collections::{HashMap, HashSet};
use std::fmt;

use biplane_config::Config;
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::google::protobuf as pbuf;
use prost::{Message, Name};

/// The five xDS resource types Biplane exchanges, as decoded protos.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct XdsResources {
    pub listeners: Vec<Listener>,
    pub route_configs: Vec<RouteConfiguration>,
    pub clusters: Vec<Cluster>,
    pub load_assignments: Vec<ClusterLoadAssignment>,
    pub secrets: Vec<Secret>,
}

impl XdsResources {
    /// Decodes a mixed list of `Any`s (e.g. everything an ADS stream delivered), sorting
    /// them by type URL. Unknown type URLs and undecodable payloads are errors.
    pub fn from_any(resources: impl IntoIterator<Item = pbuf::Any>) -> Result<Self, XdsErrors> {
        let mut out = XdsResources::default();
        let mut errors = Vec::new();
        for (i, any) in resources.into_iter().enumerate() {
            if let Err(e) = out.push_any(&any) {
                errors.push(XdsError {
                    kind: e.kind,
                    name: if e.name.is_empty() {
                        format!("#{i}")
                    } else {
                        e.name
                    },
                    path: e.path,
                    message: e.message,
                });
            }
        }
        if errors.is_empty() {
            Ok(out)
        } else {
            Err(XdsErrors(errors))
        }
    }

    /// Decodes one `Any` and appends it to the matching list.
    pub fn push_any(&mut self, any: &pbuf::Any) -> Result<(), XdsError> {
        let kind = ResourceKind::from_type_url(&any.type_url).ok_or_else(|| XdsError {
            kind: ResourceKind::Unknown,
            name: String::new(),
            path: "type_url".to_owned(),
            message: format!("unsupported resource type {:?}", any.type_url),
        })?;
        let bad = |e: prost::DecodeError| XdsError {
            kind,
            name: String::new(),
            path: "value".to_owned(),
            message: format!("cannot decode protobuf: {e}"),
        };
        match kind {
            ResourceKind::Listener => self
                .listeners
                .push(Listener::decode(&*any.value).map_err(bad)?),
            ResourceKind::RouteConfiguration => self
                .route_configs
                .push(RouteConfiguration::decode(&*any.value).map_err(bad)?),
            ResourceKind::Cluster => self
                .clusters
                .push(Cluster::decode(&*any.value).map_err(bad)?),
            ResourceKind::ClusterLoadAssignment => self
                .load_assignments
                .push(ClusterLoadAssignment::decode(&*any.value).map_err(bad)?),
            ResourceKind::Secret => self.secrets.push(Secret::decode(&*any.value).map_err(bad)?),
            ResourceKind::Unknown => {}
        }
        Ok(())
    }

    /// Encodes every resource as `(type_url, resource name, Any)`, in the xDS warming
    /// order: clusters, load assignments, listeners, route configurations, secrets.
    pub fn to_any(&self) -> Vec<(ResourceKind, String, pbuf::Any)> {
        let mut out = Vec::new();
        out.extend(
            self.clusters
                .iter()
                .map(|c| (ResourceKind::Cluster, c.name.clone(), to_any(c))),
        );
        out.extend(self.load_assignments.iter().map(|c| {
            (
                ResourceKind::ClusterLoadAssignment,
                c.cluster_name.clone(),
                to_any(c),
            )
        }));
        out.extend(
            self.listeners
                .iter()
                .map(|l| (ResourceKind::Listener, l.name.clone(), to_any(l))),
        );
        out.extend(
            self.route_configs
                .iter()
                .map(|r| (ResourceKind::RouteConfiguration, r.name.clone(), to_any(r))),
        );
        out.extend(
            self.secrets
                .iter()
                .map(|s| (ResourceKind::Secret, s.name.clone(), to_any(s))),
        );
        out
    }
}

/// Packs a message into envoy-types' own `google.protobuf.Any`.
pub fn to_any<M: Message + Name>(m: &M) -> pbuf::Any {
    pbuf::Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

/// The xDS resource types, named as in error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResourceKind {
    Listener,
    RouteConfiguration,
    Cluster,
    ClusterLoadAssignment,
    Secret,
    /// A type URL Biplane does not know.
    Unknown,
}

impl ResourceKind {
    pub fn type_url(self) -> String {
        match self {
            ResourceKind::Listener => Listener::type_url(),
            ResourceKind::RouteConfiguration => RouteConfiguration::type_url(),
            ResourceKind::Cluster => Cluster::type_url(),
            ResourceKind::ClusterLoadAssignment => ClusterLoadAssignment::type_url(),
            ResourceKind::Secret => Secret::type_url(),
            ResourceKind::Unknown => String::new(),
        }
    }

    pub fn from_type_url(url: &str) -> Option<Self> {
        [
            ResourceKind::Listener,
            ResourceKind::RouteConfiguration,
            ResourceKind::Cluster,
            ResourceKind::ClusterLoadAssignment,
            ResourceKind::Secret,
        ]
        .into_iter()
        .find(|k| k.type_url() == url)
    }
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ResourceKind::Listener => "Listener",
            ResourceKind::RouteConfiguration => "RouteConfiguration",
            ResourceKind::Cluster => "Cluster",
            ResourceKind::ClusterLoadAssignment => "ClusterLoadAssignment",
            ResourceKind::Secret => "Secret",
            ResourceKind::Unknown => "Resource",
        })
    }
}

/// One reason a set of xDS resources cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {name:?}: {path}: {message}")]
pub struct XdsError {
    pub kind: ResourceKind,
    /// Resource name (`#<index>` when the resource has none).
    pub name: String,
    /// Field path inside the resource, e.g. `filter_chains[0].filters[0].typed_config`.
    pub path: String,
    pub message: String,
}

/// Every problem found in one translation, in resource order. Displays one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XdsErrors(pub Vec<XdsError>);

impl fmt::Display for XdsErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for XdsErrors {}

impl XdsErrors {
    /// Errors about one resource (for a NACK's `error_detail`, per resource).
    pub fn for_resource(&self, kind: ResourceKind, name: &str) -> impl Iterator<Item = &XdsError> {
        self.0
            .iter()
            .filter(move |e| e.kind == kind && e.name == name)
    }
}

/// Error collector scoped to one resource.
pub(crate) struct Ctx<'e> {
    kind: ResourceKind,
    name: String,
    errors: &'e mut Vec<XdsError>,
}

impl<'e> Ctx<'e> {
    pub(crate) fn new(
        kind: ResourceKind,
        name: &str,
        index: usize,
        errors: &'e mut Vec<XdsError>,
    ) -> Self {
        let name = if name.is_empty() {
            format!("#{index}")
        } else {
            name.to_owned()
        };
        Ctx { kind, name, errors }
    }

    pub(crate) fn err(&mut self, path: &str, message: impl Into<String>) {
        self.errors.push(XdsError {
            kind: self.kind,
            name: self.name.clone(),
            path: if path.is_empty() {
                "<resource>".to_owned()
            } else {
                path.to_owned()
            },
            message: message.into(),
        });
    }

    pub(crate) fn unsupported(&mut self, path: &str, field: &str) {
        self.err(&at(path, field), "not supported by biplane (must be unset)");
    }

    pub(crate) fn resource_name(&self) -> &str {
        &self.name
    }

    /// Number of errors recorded so far (to tell whether a sub-step failed).
    pub(crate) fn error_count(&self) -> usize {
        self.errors.len()
    }
}

/// `parent.field` (or `field` at the top).
pub(crate) fn at(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_owned()
    } else {
        format!("{path}.{field}")
    }
}

/// `parent.field[i]`.
pub(crate) fn idx(path: &str, field: &str, i: usize) -> String {
    format!("{}[{i}]", at(path, field))
}

pub(crate) fn is_set<T: Default + PartialEq>(v: &T) -> bool {
    *v != T::default()
}

/// Rejects each listed (destructured, by-reference) field that is not at its default.
macro_rules! reject_set {
    ($cx:expr, $path:expr, $($field:ident),+ $(,)?) => {
        $( if $crate::from_xds::is_set($field) { $cx.unsupported($path, stringify!($field)); } )+
    };
}
pub(crate) use reject_set;

/// Converts an optional proto Duration. Negative or out-of-range durations are errors.
pub(crate) fn duration(
    cx: &mut Ctx<'_>,
    path: &str,
    d: &Option<pbuf::Duration>,
) -> Option<std::time::Duration> {
    let d = d.as_ref()?;
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        cx.err(
            path,
            format!("invalid duration {}s {}ns", d.seconds, d.nanos),
        );
        return None;
    }
    Some(std::time::Duration::new(d.seconds as u64, d.nanos as u32))
}

/// Envoy's convention for timeouts: unset → `default`, zero → disabled (`None`).
pub(crate) fn timeout_with_default(
    cx: &mut Ctx<'_>,
    path: &str,
    d: &Option<pbuf::Duration>,
    default: Option<std::time::Duration>,
) -> Option<std::time::Duration> {
    if d.is_none() {
        return default;
    }
    duration(cx, path, d).filter(|d| !d.is_zero())
}

/// Decodes a `typed_config` Any as `M`, with an error naming the expected type.
pub(crate) fn decode_typed<M: Message + Name + Default>(
    cx: &mut Ctx<'_>,
    path: &str,
    any: &pbuf::Any,
) -> Option<M> {
    if any.type_url != M::type_url() {
        cx.err(
            path,
            format!("expected {}, got {:?}", M::type_url(), any.type_url),
        );
        return None;
    }
    match M::decode(&*any.value) {
        Ok(m) => Some(m),
        Err(e) => {
            cx.err(path, format!("cannot decode {}: {e}", M::full_name()));
            None
        }
    }
}

/// Accepts config sources Biplane can serve: unset, `ads` or `self` (the resource comes
/// over the same ADS stream, or was given statically alongside).
pub(crate) fn check_config_source(cx: &mut Ctx<'_>, path: &str, src: &Option<core::ConfigSource>) {
    use core::config_source::ConfigSourceSpecifier as S;
    let Some(src) = src else { return };
    let core::ConfigSource {
        authorities,
        initial_fetch_timeout,
        resource_api_version,
        config_source_specifier,
    } = src;
    reject_set!(cx, path, authorities);
    let _ = initial_fetch_timeout; // how long the client waits before giving up: ADS client policy, not config
    if *resource_api_version != core::ApiVersion::V3 as i32
        && *resource_api_version != core::ApiVersion::Auto as i32
    {
        cx.err(&at(path, "resource_api_version"), "only V3 is supported");
    }
    match config_source_specifier {
        None | Some(S::Ads(_)) | Some(S::Self_(_)) => {}
        Some(_) => cx.err(
            &at(path, "config_source_specifier"),
            "only `ads` and `self` config sources are supported (biplane fetches everything over one ADS stream)",
        ),
    }
}

/// Compiles an RE2-style pattern for a full match, as Envoy's `safe_regex` matchers do.
pub(crate) fn full_match_regex(
    cx: &mut Ctx<'_>,
    path: &str,
    pattern: &str,
    ignore_case: bool,
) -> Option<regex::Regex> {
    let anchored = format!("^(?:{pattern})$");
    match regex::RegexBuilder::new(&anchored)
        .case_insensitive(ignore_case)
        .build()
    {
        Ok(re) => Some(re),
        Err(e) => {
            cx.err(
                path,
                format!("regex parse error: {}", one_line(&e.to_string())),
            );
            None
        }
    }
}

/// Compiles an unanchored pattern (for `regex_rewrite`, which replaces every match).
pub(crate) fn search_regex(cx: &mut Ctx<'_>, path: &str, pattern: &str) -> Option<regex::Regex> {
    match regex::Regex::new(pattern) {
        Ok(re) => Some(re),
        Err(e) => {
            cx.err(
                path,
                format!("regex parse error: {}", one_line(&e.to_string())),
            );
            None
        }
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Translates a complete set of xDS resources into the proxy's runtime config.
///
/// All resources are checked, and every problem is reported, before anything is returned:
/// the result is all or nothing. References are checked too: an HCM's RDS name must be
/// among `route_configs`, every cluster named by a route or TCP proxy must be among
/// `clusters`, every EDS cluster must have a load assignment, every SDS secret must be
/// among `secrets`.
pub fn from_xds(res: &XdsResources, version: &str) -> Result<Config, XdsErrors> {
    let mut errors = Vec::new();

    check_unique(
        &mut errors,
        ResourceKind::Listener,
        res.listeners.iter().map(|l| l.name.as_str()),
    );
    check_unique(
        &mut errors,
        ResourceKind::RouteConfiguration,
        res.route_configs.iter().map(|r| r.name.as_str()),
    );
    check_unique(
        &mut errors,
        ResourceKind::Cluster,
        res.clusters.iter().map(|c| c.name.as_str()),
    );
    check_unique(
        &mut errors,
        ResourceKind::ClusterLoadAssignment,
        res.load_assignments.iter().map(|c| c.cluster_name.as_str()),
    );
    check_unique(
        &mut errors,
        ResourceKind::Secret,
        res.secrets.iter().map(|s| s.name.as_str()),
    );

    // Secrets first: listeners resolve SDS names against them.
    let mut secrets = HashMap::new();
    for (i, s) in res.secrets.iter().enumerate() {
        let mut cx = Ctx::new(ResourceKind::Secret, &s.name, i, &mut errors);
        // Present but invalid secrets map to None: their error is already reported.
        secrets.insert(s.name.clone(), cluster::secret(&mut cx, s));
    }

    // Load assignments, keyed by cluster (service) name.
    let mut assignments = HashMap::new();
    for (i, cla) in res.load_assignments.iter().enumerate() {
        let mut cx = Ctx::new(
            ResourceKind::ClusterLoadAssignment,
            &cla.cluster_name,
            i,
            &mut errors,
        );
        if let Some(eps) = cluster::load_assignment(&mut cx, "", cla) {
            assignments.insert(cla.cluster_name.clone(), eps);
        }
    }

    let mut clusters = Vec::new();
    for (i, c) in res.clusters.iter().enumerate() {
        let mut cx = Ctx::new(ResourceKind::Cluster, &c.name, i, &mut errors);
        if let Some(c) = cluster::cluster(&mut cx, c, &assignments) {
            clusters.push(c);
        }
    }
    let cluster_names: HashSet<&str> = res.clusters.iter().map(|c| c.name.as_str()).collect();

    let mut route_configs = Vec::new();
    for (i, rc) in res.route_configs.iter().enumerate() {
        let mut cx = Ctx::new(ResourceKind::RouteConfiguration, &rc.name, i, &mut errors);
        if let Some(rc) = route::route_configuration(&mut cx, "", rc, &cluster_names) {
            route_configs.push(rc);
        }
    }

    let rds_names: HashSet<&str> = res.route_configs.iter().map(|r| r.name.as_str()).collect();
    let mut listeners = Vec::new();
    let mut addresses = HashMap::new();
    let env = listener::Env {
        secrets: &secrets,
        clusters: &cluster_names,
        rds_names: &rds_names,
    };
    for (i, l) in res.listeners.iter().enumerate() {
        let mut cx = Ctx::new(ResourceKind::Listener, &l.name, i, &mut errors);
        if let Some((l, inline_routes)) = listener::listener(&mut cx, l, &env) {
            if let Some(other) = addresses.insert(l.address, l.name.clone()) {
                cx.err(
                    "address",
                    format!("{} is also the address of listener {other:?}", l.address),
                );
            }
            for rc in inline_routes {
                if route_configs
                    .iter()
                    .any(|r: &biplane_config::RouteConfig| r.name == rc.name)
                {
                    cx.err(
                        "filter_chains",
                        format!(
                            "inline route_config {:?} has the name of another route configuration",
                            rc.name
                        ),
                    );
                }
                route_configs.push(rc);
            }
            listeners.push(l);
        }
    }

    if errors.is_empty() {
        Ok(Config {
            version: version.to_owned(),
            listeners,
            route_configs,
            clusters,
        })
    } else {
        Err(XdsErrors(errors))
    }
}

fn check_unique<'a>(
    errors: &mut Vec<XdsError>,
    kind: ResourceKind,
    names: impl Iterator<Item = &'a str>,
) {
    let mut seen = HashSet::new();
    for (i, name) in names.enumerate() {
        let mut cx = Ctx::new(kind, name, i, errors);
        if name.is_empty() {
            cx.err("name", "must not be empty");
        } else if !seen.insert(name) {
            cx.err("name", "duplicate resource name");
        }
    }
}
