//! Prometheus metrics of the data plane.
//!
//! Label sets are resolved when a config snapshot is compiled (handles are `Arc`-backed
//! clones kept in the compiled route/cluster), so the per-request path only does atomic
//! adds: no label hashing, no allocation.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    // Shared strings: a route has ten of these label sets per listener, and 10k routes
    // would otherwise hold 300k small string copies.
    pub listener: Arc<str>,
    pub route: Arc<str>,
    pub backend: Arc<str>,
    /// `1xx` .. `5xx`.
    pub class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub listener: Arc<str>,
    pub route: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    pub cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpBytesLabels {
    pub cluster: String,
    /// `upstream` (downstream -> upstream) or `downstream` (upstream -> downstream).
    pub direction: &'static str,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~16 s, doubling.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0005, 2.0, 16,
    ))
}

/// All data-plane metrics, shared by every snapshot (counters survive config swaps).
pub struct Metrics {
    registry: Registry,
    /// Requests by listener, route, backend (cluster) and status class.
    pub http_requests: Family<RequestLabels, Counter>,
    /// Downstream request duration (first byte in to last byte of response headers out).
    pub http_request_duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    pub downstream_connections_active: Family<ListenerLabels, Gauge>,
    pub downstream_connections_total: Family<ListenerLabels, Counter>,
    pub upstream_connections_active: Family<ClusterLabels, Gauge>,
    pub upstream_connect_failures: Family<ClusterLabels, Counter>,
    pub upstream_requests_timeout: Family<ClusterLabels, Counter>,
    pub tcp_connections_total: Family<ClusterLabels, Counter>,
    /// Bytes relayed by TCP (L4) proxying, by cluster and direction.
    pub tcp_bytes: Family<TcpBytesLabels, Counter>,
    pub config_swaps: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("biplane");
        let http_requests = Family::<RequestLabels, Counter>::default();
        let http_request_duration =
            Family::<RouteLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram as fn() -> Histogram,
            );
        let downstream_connections_active = Family::<ListenerLabels, Gauge>::default();
        let downstream_connections_total = Family::<ListenerLabels, Counter>::default();
        let upstream_connections_active = Family::<ClusterLabels, Gauge>::default();
        let upstream_connect_failures = Family::<ClusterLabels, Counter>::default();
        let upstream_requests_timeout = Family::<ClusterLabels, Counter>::default();
        let tcp_connections_total = Family::<ClusterLabels, Counter>::default();
        let tcp_bytes = Family::<TcpBytesLabels, Counter>::default();
        let config_swaps = Counter::default();
        registry.register(
            "http_requests",
            "HTTP requests by listener, route, backend and status class",
            http_requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request duration until the response headers are sent",
            http_request_duration.clone(),
        );
        registry.register(
            "downstream_connections_active",
            "Open downstream connections",
            downstream_connections_active.clone(),
        );
        registry.register(
            "downstream_connections",
            "Accepted downstream connections",
            downstream_connections_total.clone(),
        );
        registry.register(
            "upstream_connections_active",
            "Open upstream connections",
            upstream_connections_active.clone(),
        );
        registry.register(
            "upstream_connect_failures",
            "Failed upstream connection attempts",
            upstream_connect_failures.clone(),
        );
        registry.register(
            "upstream_request_timeouts",
            "Upstream requests that timed out",
            upstream_requests_timeout.clone(),
        );
        registry.register(
            "tcp_connections",
            "TCP (L4) connections proxied, by cluster",
            tcp_connections_total.clone(),
        );
        registry.register(
            "tcp_bytes",
            "Bytes relayed by TCP (L4) proxying, by cluster and direction",
            tcp_bytes.clone(),
        );
        registry.register(
            "config_swaps",
            "Config snapshots swapped in",
            config_swaps.clone(),
        );
        Self {
            registry,
            http_requests,
            http_request_duration,
            downstream_connections_active,
            downstream_connections_total,
            upstream_connections_active,
            upstream_connect_failures,
            upstream_requests_timeout,
            tcp_connections_total,
            tcp_bytes,
            config_swaps,
        }
    }

    /// Prometheus text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Status class label for a status code.
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}
