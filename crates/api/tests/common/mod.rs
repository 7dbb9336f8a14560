//! Helpers shared by the crates/api integration tests (included with `mod common;`).
#![allow(dead_code, reason = "each test binary uses a different subset")]
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test helpers")]

use biplane_api::{Resource, ValidationError, parse_documents};

pub const ALL_KINDS: &str = include_str!("../data/all-kinds.yaml");

/// Parses text that must be valid.
pub fn ok(text: &str) -> Vec<Resource> {
    match parse_documents(text) {
        Ok(r) => r,
        Err(e) => panic!("expected valid input, got:\n{e}"),
    }
}

/// Parses text that must be invalid, returning the errors.
pub fn errs(text: &str) -> Vec<ValidationError> {
    match parse_documents(text) {
        Ok(r) => panic!("expected errors, parsed {} resources", r.len()),
        Err(e) => e.0,
    }
}

/// Asserts one error has exactly this path and a message containing `needle`.
pub fn has(errors: &[ValidationError], path: &str, needle: &str) {
    assert!(
        errors
            .iter()
            .any(|e| e.path == path && e.message.contains(needle)),
        "no error at {path:?} containing {needle:?}; got:\n{}",
        errors
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// A route document with the given spec body (YAML, indented by two spaces).
pub fn http_route(spec: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: web}}\nspec:\n{spec}"
    )
}

pub fn gateway(spec: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: gw}}\nspec:\n{spec}"
    )
}

pub fn backend(spec: &str) -> String {
    format!(
        "apiVersion: biplane.dev/v1alpha1\nkind: Backend\nmetadata: {{name: be}}\nspec:\n{spec}"
    )
}

pub fn grpc_route(spec: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{name: g}}\nspec:\n{spec}"
    )
}

pub const CERT_PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n";
pub const KEY_PEM: &str =
    "-----BEGIN PRIVATE KEY-----\nTOPSECRETKEYBYTES\n-----END PRIVATE KEY-----\n";
