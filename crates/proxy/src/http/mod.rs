//! HTTP layer (in progress).

/// Compiled route tables and clusters.
#[derive(Default)]
pub struct HttpState {}
