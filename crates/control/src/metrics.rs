//! The control plane's Prometheus metrics (`GET /metrics`, OpenMetrics text): fleet
//! gauges and ADS counters read from [`FleetStatus`] at scrape time, plus the controller's
//! and the admin API's own counters and the convergence histogram.

use std::sync::atomic::Ordering;

use biplane_xds::server::FleetStatus;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The outcome label of `biplane_api_apply_requests_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApplyLabels {
    /// `applied` (something was written), `unchanged`, `dry_run`, `invalid`, `conflict`,
    /// `bad_request` or `error`.
    pub outcome: String,
}

/// Every metric of the control plane.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Apply requests (apply and PUT) by outcome.
    pub apply_requests: Family<ApplyLabels, Counter>,
    /// Store commit → the last connected node of the Gateway ACKed it, per change and
    /// Gateway, in seconds.
    pub convergence: Histogram,
    /// The store revision the controller has seen.
    pub store_revision: Gauge,
    /// Gateway compilations (one per Gateway per debounced change).
    pub compiles: Counter,
    /// Gateway compilations that failed (the Gateway keeps its previous configuration).
    pub compile_errors: Counter,
    /// Compilations that changed what the Gateway's nodes receive (a push).
    pub snapshot_changes: Counter,
}

/// Content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

impl Metrics {
    /// Registers every metric; the ADS ones are read from `fleet` at scrape time.
    pub fn new(fleet: FleetStatus) -> Self {
        let mut registry = Registry::default();
        let apply_requests = Family::<ApplyLabels, Counter>::default();
        registry.register(
            "biplane_api_apply_requests",
            "Apply and PUT requests by outcome",
            apply_requests.clone(),
        );
        let convergence = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        registry.register(
            "biplane_config_convergence_seconds",
            "Store commit to the last connected node of the Gateway ACKing it, per change",
            convergence.clone(),
        );
        let store_revision = Gauge::default();
        registry.register(
            "biplane_store_revision",
            "The store revision the controller has seen",
            store_revision.clone(),
        );
        let compiles = Counter::default();
        registry.register(
            "biplane_controller_compiles",
            "Gateway compilations",
            compiles.clone(),
        );
        let compile_errors = Counter::default();
        registry.register(
            "biplane_controller_compile_errors",
            "Gateway compilations that failed",
            compile_errors.clone(),
        );
        let snapshot_changes = Counter::default();
        registry.register(
            "biplane_controller_snapshot_changes",
            "Compilations whose xDS output changed (pushed to the Gateway's nodes)",
            snapshot_changes.clone(),
        );
        registry.register_collector(Box::new(FleetCollector { fleet }));
        Metrics {
            registry,
            apply_requests,
            convergence,
            store_revision,
            compiles,
            compile_errors,
            snapshot_changes,
        }
    }

    /// Counts one apply request.
    pub fn apply(&self, outcome: &str) {
        self.apply_requests
            .get_or_create(&ApplyLabels {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Reads the ADS server's atomics at scrape time.
#[derive(Debug)]
struct FleetCollector {
    fleet: FleetStatus,
}

impl Collector for FleetCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = self.fleet.metrics();
        let nodes = i64::try_from(self.fleet.nodes().len()).unwrap_or(i64::MAX);
        let gauge = ConstGauge::new(nodes);
        gauge.encode(encoder.encode_descriptor(
            "biplane_xds_connected_nodes",
            "Data-plane nodes connected over ADS",
            None,
            gauge.metric_type(),
        )?)?;
        let active = ConstGauge::new(
            i64::try_from(m.streams_active.load(Ordering::Relaxed)).unwrap_or(i64::MAX),
        );
        active.encode(encoder.encode_descriptor(
            "biplane_xds_streams_active",
            "ADS streams open now",
            None,
            active.metric_type(),
        )?)?;
        for (name, help, v) in [
            (
                "biplane_xds_streams",
                "ADS streams accepted",
                m.streams_total.load(Ordering::Relaxed),
            ),
            (
                "biplane_xds_streams_rejected",
                "ADS streams ended by the server for a bad request",
                m.streams_rejected.load(Ordering::Relaxed),
            ),
            (
                "biplane_xds_stale_requests",
                "SotW requests ignored for a stale nonce",
                m.stale_requests.load(Ordering::Relaxed),
            ),
        ] {
            let c = ConstCounter::new(v);
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        let per_type = m.per_type_values();
        for (name, help, pick) in [
            (
                "biplane_xds_pushes",
                "xDS responses sent, by resource type",
                0usize,
            ),
            ("biplane_xds_acks", "ACKs received, by resource type", 1),
            ("biplane_xds_nacks", "NACKs received, by resource type", 2),
        ] {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (kind, pushes, acks, nacks) in &per_type {
                let v = [*pushes, *acks, *nacks][pick];
                let labels = [("type", kind.to_string())];
                ConstCounter::new(v).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

    use super::*;

    #[test]
    fn encodes_fleet_and_own_metrics() {
        let m = Metrics::new(FleetStatus::new());
        m.apply("applied");
        m.convergence.observe(0.02);
        m.store_revision.set(7);
        let text = m.encode();
        for needle in [
            "biplane_api_apply_requests_total{outcome=\"applied\"} 1",
            "biplane_store_revision 7",
            "biplane_config_convergence_seconds_count 1",
            "biplane_xds_connected_nodes 0",
            "biplane_xds_pushes_total{type=\"Cluster\"} 0",
            "biplane_xds_nacks_total{type=\"RouteConfiguration\"} 0",
            "biplane_xds_streams_total 0",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
    }
}
