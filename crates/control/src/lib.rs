//! Biplane's control plane: the revisioned resource store ([`store`]), the admin API
//! ([`api`]), the controller that compiles Gateways into xDS snapshots ([`controller`]),
//! status computed on read ([`status`]), metrics ([`metrics`]) and the wiring that runs
//! them with the ADS server ([`server`], entry point [`run`]).
pub mod api;
pub mod controller;
pub mod docs;
pub mod metrics;
pub mod server;
pub mod status;
pub mod store;

pub use server::{ControlError, ControlHandle, ControlOptions, run};
