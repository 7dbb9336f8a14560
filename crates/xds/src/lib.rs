//! Envoy xDS v3 glue: Biplane resources → xDS (control side) and xDS → runtime config
//! (data side).

pub mod from_xds;

pub use from_xds::{ResourceKind, XdsError, XdsErrors, XdsResources, from_xds, to_any};
