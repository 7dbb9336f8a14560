//! Static mode: a resource file → parse → validate → `ResourceSet` → `to_xds` → `from_xds`
//! → `biplane_config::Config`, the same pipeline a control plane and the proxy's xDS client
//! run, only in one process.

use std::hash::{DefaultHasher, Hash, Hasher};

use biplane_api as api;
use biplane_config::Config;

use crate::from_xds::{XdsErrors, XdsResources, from_xds};
use crate::to_xds::{TranslateErrors, TranslateOptions, to_xds};

/// Why a static file cannot become a proxy config.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StaticError {
    /// Parse or validation errors, every one of them.
    #[error("{0}")]
    Invalid(api::ValidationErrors),
    #[error("no Gateway in the file")]
    NoGateway,
    #[error("Gateway {wanted:?} not found; the file has: {}", list(.available))]
    GatewayNotFound {
        wanted: String,
        available: Vec<String>,
    },
    #[error("the file has several Gateways, choose one: {}", list(.available))]
    AmbiguousGateway { available: Vec<String> },
    #[error("{0}")]
    Translate(TranslateErrors),
    /// The translated resources were rejected (a translator bug or an unsupported feature).
    #[error("{0}")]
    Xds(XdsErrors),
}

fn list(v: &[String]) -> String {
    v.join(", ")
}

/// The xDS resources a static file gives for one Gateway, with the Gateway's key.
pub fn static_xds(
    text: &str,
    gateway: Option<&str>,
    opts: &TranslateOptions,
) -> Result<(String, String, XdsResources), StaticError> {
    let resources = api::parse_documents(text).map_err(StaticError::Invalid)?;
    let set = api::ResourceSet::new(resources);
    let (ns, name) = select_gateway(&set, gateway)?;
    let xds = to_xds(&set, &ns, &name, opts).map_err(StaticError::Translate)?;
    Ok((ns, name, xds))
}

/// Compiles a static resource file into the proxy's config, for the Gateway named
/// `gateway` (`name` or `namespace/name`), or the only Gateway of the file.
pub fn compile_static(
    text: &str,
    gateway: Option<&str>,
    opts: &TranslateOptions,
) -> Result<Config, StaticError> {
    let (_, _, xds) = static_xds(text, gateway, opts)?;
    let mut h = DefaultHasher::new();
    text.hash(&mut h);
    gateway.hash(&mut h);
    let version = format!("static-{:016x}", h.finish());
    from_xds(&xds, &version).map_err(StaticError::Xds)
}

fn select_gateway(
    set: &api::ResourceSet,
    wanted: Option<&str>,
) -> Result<(String, String), StaticError> {
    let all: Vec<(String, String)> = set
        .gateways()
        .map(|g| (g.metadata.namespace().to_owned(), g.metadata.name.clone()))
        .collect();
    let names = || {
        all.iter()
            .map(|(ns, n)| format!("{ns}/{n}"))
            .collect::<Vec<_>>()
    };
    match wanted {
        None => match all.as_slice() {
            [] => Err(StaticError::NoGateway),
            [one] => Ok(one.clone()),
            _ => Err(StaticError::AmbiguousGateway { available: names() }),
        },
        Some(w) => {
            let hits: Vec<&(String, String)> = match w.split_once('/') {
                Some((ns, n)) => all.iter().filter(|(a, b)| a == ns && b == n).collect(),
                None => all.iter().filter(|(_, b)| b == w).collect(),
            };
            match hits.as_slice() {
                [one] => Ok((*one).clone()),
                [] => Err(StaticError::GatewayNotFound {
                    wanted: w.to_owned(),
                    available: names(),
                }),
                _ => Err(StaticError::AmbiguousGateway {
                    available: hits.iter().map(|(ns, n)| format!("{ns}/{n}")).collect(),
                }),
            }
        }
    }
}

impl StaticError {
    /// Number of individual problems (for "N errors" summaries).
    pub fn count(&self) -> usize {
        match self {
            StaticError::Invalid(e) => e.len(),
            StaticError::Translate(e) => e.0.len(),
            StaticError::Xds(e) => e.0.len(),
            _ => 1,
        }
    }
}
