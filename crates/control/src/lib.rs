//! Biplane's control plane: the revisioned resource store ([`store`]), the admin API
//! ([`api`]), the controller that compiles Gateways into xDS snapshots ([`controller`]),
//! status computed on read ([`status`]), metrics ([`metrics`]) and the wiring that runs
//! them with the ADS server ([`server`], entry point [`run`]). Security: the CA
//! ([`ca`]), bootstrap and API tokens ([`tokens`]) and the admin API's bearer-token
//! middleware ([`auth`]), TLS listeners ([`tls`]).
pub mod api;
pub mod auth;
pub mod ca;
pub mod certs;
pub mod controller;
pub mod docs;
pub mod metrics;
pub mod nodes;
pub mod server;
pub mod status;
pub mod store;
pub mod tls;
pub mod tokens;

pub use server::{ControlError, ControlHandle, ControlOptions, run};
