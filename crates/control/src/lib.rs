//! Biplane's control plane: the revisioned resource store (see [`store`]).
pub mod store;
