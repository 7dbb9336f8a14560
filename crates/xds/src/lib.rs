//! Envoy xDS v3 glue.
