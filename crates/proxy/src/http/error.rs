//! Every way a request can fail locally, and the one place that maps it to a response.
//!
//! Each [`HttpError`] becomes a status, a short `text/plain` body that says why, and an
//! `x-biplane-error` header with a stable machine-readable reason (also written to the
//! access log), in the spirit of Envoy's response flags.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use super::body::ResponseBody;

/// A request that the proxy answers itself because it could not (or must not) forward it.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("no route for host {host} path {path}")]
    NoRoute { host: String, path: String },
    #[error("route config {0} not found")]
    NoRouteConfig(String),
    #[error("cluster {name} not found")]
    UnknownCluster { name: String, status: StatusCode },
    #[error("no healthy endpoint in cluster {0}")]
    NoHealthyEndpoint(String),
    #[error("upstream connect failure: {0}")]
    ConnectFailure(String),
    #[error("upstream request timeout")]
    Timeout,
    #[error("upstream protocol error: {0}")]
    UpstreamProtocol(String),
    #[error("malformed request: {0}")]
    BadRequest(&'static str),
    #[error("request header fields too large")]
    HeadersTooLarge,
    #[error("request headers not received in time")]
    RequestHeadersTimeout,
    #[error("HTTP version not supported")]
    VersionNotSupported,
    #[error("transfer coding not implemented")]
    TransferCodingNotImplemented,
}

impl HttpError {
    pub fn status(&self) -> StatusCode {
        match self {
            HttpError::NoRoute { .. } | HttpError::NoRouteConfig(_) => StatusCode::NOT_FOUND,
            HttpError::UnknownCluster { status, .. } => *status,
            HttpError::NoHealthyEndpoint(_) | HttpError::ConnectFailure(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            HttpError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            HttpError::UpstreamProtocol(_) => StatusCode::BAD_GATEWAY,
            HttpError::BadRequest(_) => StatusCode::BAD_REQUEST,
            HttpError::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            HttpError::RequestHeadersTimeout => StatusCode::REQUEST_TIMEOUT,
            HttpError::VersionNotSupported => StatusCode::HTTP_VERSION_NOT_SUPPORTED,
            HttpError::TransferCodingNotImplemented => StatusCode::NOT_IMPLEMENTED,
        }
    }

    /// Stable reason code for the `x-biplane-error` header and the access log.
    pub fn reason(&self) -> &'static str {
        match self {
            HttpError::NoRoute { .. } => "no_route",
            HttpError::NoRouteConfig(_) => "no_route_config",
            HttpError::UnknownCluster { .. } => "unknown_cluster",
            HttpError::NoHealthyEndpoint(_) => "no_healthy_upstream",
            HttpError::ConnectFailure(_) => "upstream_connect_failure",
            HttpError::Timeout => "upstream_timeout",
            HttpError::UpstreamProtocol(_) => "upstream_protocol_error",
            HttpError::BadRequest(_) => "bad_request",
            HttpError::HeadersTooLarge => "headers_too_large",
            HttpError::RequestHeadersTimeout => "request_headers_timeout",
            HttpError::VersionNotSupported => "http_version_not_supported",
            HttpError::TransferCodingNotImplemented => "transfer_coding_not_implemented",
        }
    }

    /// The connection must be closed after this response (framing can't be trusted).
    pub fn closes_connection(&self) -> bool {
        matches!(
            self,
            HttpError::BadRequest(_)
                | HttpError::HeadersTooLarge
                | HttpError::RequestHeadersTimeout
                | HttpError::VersionNotSupported
                | HttpError::TransferCodingNotImplemented
        )
    }

    /// The local response for this error.
    pub fn to_response(&self) -> Response<ResponseBody> {
        let mut body = self.to_string();
        body.push('\n');
        let mut res = Response::new(ResponseBody::full(Bytes::from(body)));
        *res.status_mut() = self.status();
        let h = res.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        h.insert("x-biplane-error", HeaderValue::from_static(self.reason()));
        if self.closes_connection() {
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        res
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

    use super::*;

    #[test]
    fn statuses() {
        let cases = [
            (
                HttpError::NoRoute {
                    host: "a".into(),
                    path: "/".into(),
                },
                404,
                "no_route",
            ),
            (
                HttpError::NoHealthyEndpoint("c".into()),
                503,
                "no_healthy_upstream",
            ),
            (
                HttpError::ConnectFailure("refused".into()),
                503,
                "upstream_connect_failure",
            ),
            (
                HttpError::UnknownCluster {
                    name: "c".into(),
                    status: StatusCode::SERVICE_UNAVAILABLE,
                },
                503,
                "unknown_cluster",
            ),
            (HttpError::Timeout, 504, "upstream_timeout"),
            (HttpError::BadRequest("smuggling"), 400, "bad_request"),
            (HttpError::HeadersTooLarge, 431, "headers_too_large"),
            (
                HttpError::UpstreamProtocol("reset".into()),
                502,
                "upstream_protocol_error",
            ),
        ];
        for (err, status, reason) in cases {
            let res = err.to_response();
            assert_eq!(res.status().as_u16(), status, "{err}");
            assert_eq!(res.headers()["x-biplane-error"], reason);
            assert_eq!(
                res.headers().get(header::CONNECTION).is_some(),
                status == 400 || status == 431
            );
        }
    }

    #[test]
    fn no_route_body_says_why() {
        let e = HttpError::NoRoute {
            host: "example.com".into(),
            path: "/x".into(),
        };
        assert_eq!(e.to_string(), "no route for host example.com path /x");
    }
}
