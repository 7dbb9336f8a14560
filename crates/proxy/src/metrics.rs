//! Prometheus metrics of the data plane.
//!
//! Label sets are resolved when a config snapshot is compiled (handles are `Arc`-backed
//! clones kept in the compiled route/cluster), so the per-request path only does atomic
//! adds: no label hashing, no allocation. Per-route series ([`RouteStats`]) are created
//! on the first request that needs them, as Istio and Linkerd do: a route that never
//! sees traffic costs a few pointers instead of eleven series, and a config with
//! thousands of routes does not export tens of thousands of zero lines.

use std::sync::{Arc, OnceLock};

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

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
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

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Index into [`CLASSES`] for a status code.
fn class_index(status: u16) -> usize {
    match status {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

/// Request metrics of one route on one listener (or of a listener's requests that
/// matched no route: empty route and backend labels). Each series is created in the
/// shared families on first use and its handle kept here, so later requests do one
/// atomic load and an atomic add; a swapped-in snapshot finds the existing series, so
/// counts survive config changes.
#[derive(Debug)]
pub struct RouteStats {
    metrics: Arc<Metrics>,
    pub listener: Arc<str>,
    route: Arc<str>,
    duration: OnceLock<Histogram>,
    /// One per forward target (same order as the route's targets), then one for local
    /// responses (redirects, direct responses, errors before a target was picked).
    by_target: Box<[StatusCounters]>,
}

#[derive(Debug)]
struct StatusCounters {
    backend: Arc<str>,
    classes: [OnceLock<Counter>; 5],
}

impl RouteStats {
    pub fn new<'a>(
        metrics: &Arc<Metrics>,
        listener: &Arc<str>,
        route: &Arc<str>,
        backends: impl IntoIterator<Item = &'a Arc<str>>,
        local: &'a Arc<str>,
    ) -> Self {
        let by_target = backends
            .into_iter()
            .chain(std::iter::once(local))
            .map(|b| StatusCounters {
                backend: b.clone(),
                classes: Default::default(),
            })
            .collect();
        Self {
            metrics: metrics.clone(),
            listener: listener.clone(),
            route: route.clone(),
            duration: OnceLock::new(),
            by_target,
        }
    }

    /// Counts a response with `status` for target `i` (`None`: a local response), and
    /// observes its duration in seconds when given.
    pub fn record(&self, target: Option<usize>, status: u16, seconds: Option<f64>) {
        if let Some(secs) = seconds {
            self.duration
                .get_or_init(|| {
                    self.metrics
                        .http_request_duration
                        .get_or_create(&RouteLabels {
                            listener: self.listener.clone(),
                            route: self.route.clone(),
                        })
                        .clone()
                })
                .observe(secs);
        }
        let counters = match target {
            Some(i) => self.by_target.get(i),
            None => self.by_target.last(),
        };
        let Some(counters) = counters else { return };
        let class = class_index(status);
        let Some(slot) = counters.classes.get(class) else {
            return;
        };
        slot.get_or_init(|| {
            self.metrics
                .http_requests
                .get_or_create(&RequestLabels {
                    listener: self.listener.clone(),
                    route: self.route.clone(),
                    backend: counters.backend.clone(),
                    class: CLASSES.get(class).copied().unwrap_or("5xx"),
                })
                .clone()
        })
        .inc();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

    use super::*;

    fn line<'a>(text: &'a str, prefix: &str, labels: &[&str]) -> Option<&'a str> {
        text.lines()
            .find(|l| l.starts_with(prefix) && labels.iter().all(|x| l.contains(x)))
    }

    #[test]
    fn route_series_appear_on_first_use_and_survive_a_swap() {
        let metrics = Arc::new(Metrics::new());
        let (l, r, b, none): (Arc<str>, Arc<str>, Arc<str>, Arc<str>) =
            ("web".into(), "r".into(), "api".into(), "".into());
        let stats = RouteStats::new(&metrics, &l, &r, [&b], &none);
        let text = metrics.encode();
        assert!(
            !text.contains("route=\"r\""),
            "no series before traffic:\n{text}"
        );

        stats.record(Some(0), 204, Some(0.003));
        stats.record(None, 302, Some(0.001));
        let text = metrics.encode();
        let two = ["route=\"r\"", "backend=\"api\"", "class=\"2xx\""];
        assert!(
            line(&text, "biplane_http_requests_total{", &two)
                .unwrap()
                .ends_with(" 1")
        );
        let local = ["route=\"r\"", "backend=\"\"", "class=\"3xx\""];
        assert!(
            line(&text, "biplane_http_requests_total{", &local)
                .unwrap()
                .ends_with(" 1")
        );
        assert!(line(&text, "biplane_http_requests_total{", &["class=\"5xx\""]).is_none());
        let count = line(
            &text,
            "biplane_http_request_duration_seconds_count{",
            &["route=\"r\""],
        );
        assert!(count.unwrap().ends_with(" 2"), "{text}");

        // A recompiled snapshot finds the same series.
        let swapped = RouteStats::new(&metrics, &l, &r, [&b], &none);
        swapped.record(Some(0), 200, None);
        let text = metrics.encode();
        assert!(
            line(&text, "biplane_http_requests_total{", &two)
                .unwrap()
                .ends_with(" 2")
        );
        let count = line(
            &text,
            "biplane_http_request_duration_seconds_count{",
            &["route=\"r\""],
        );
        assert!(
            count.unwrap().ends_with(" 2"),
            "no duration given, none observed"
        );
    }
}
