//! Tests of the store semantics.
