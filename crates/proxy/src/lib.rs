//! Biplane data plane.
