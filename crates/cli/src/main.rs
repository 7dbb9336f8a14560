//! The `biplane` binary.
fn main() {}
