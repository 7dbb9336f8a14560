//! Kind names as users type them (`httproutes`, `HTTPRoute`, `gtw`, `backend.biplane.dev`)
//! and as the CLI prints them (`httproute.gateway.networking.k8s.io/web`, kubectl's form).

use biplane_api::ResourceKind;

/// Every spelling `get`/`delete` accept for a kind (compared case-insensitively), besides the
/// group-qualified forms (`httproute.gateway.networking.k8s.io`, `backends.biplane.dev`).
const ALIASES: &[(ResourceKind, &[&str])] = &[
    (ResourceKind::Gateway, &["gateway", "gateways", "gtw"]),
    (ResourceKind::HttpRoute, &["httproute", "httproutes"]),
    (ResourceKind::GrpcRoute, &["grpcroute", "grpcroutes"]),
    (ResourceKind::TcpRoute, &["tcproute", "tcproutes"]),
    (ResourceKind::TlsRoute, &["tlsroute", "tlsroutes"]),
    (ResourceKind::Secret, &["secret", "secrets"]),
    (ResourceKind::Backend, &["backend", "backends"]),
];

/// Parses a kind as typed on the command line: singular, plural, short name or the
/// `Kind` string, optionally qualified with its API group.
pub fn parse(input: &str) -> Option<ResourceKind> {
    let lower = input.trim().to_ascii_lowercase();
    let (name, group) = match lower.split_once('.') {
        Some((n, g)) => (n, Some(g)),
        None => (lower.as_str(), None),
    };
    let (kind, _) = ALIASES.iter().find(|(_, names)| names.contains(&name))?;
    match group {
        // Versioned groups (`httproutes.v1.gateway.networking.k8s.io`) are accepted too.
        Some(g)
            if g != kind.group()
                && g.split_once('.').map(|(_, rest)| rest) != Some(kind.group()) =>
        {
            None
        }
        _ => Some(*kind),
    }
}

/// The error for a kind `parse` refused, listing what is accepted.
pub fn unknown(input: &str) -> String {
    let names: Vec<&str> = ALIASES.iter().map(|(_, n)| n[1]).collect();
    format!(
        "the server doesn't have a resource type {input:?} (known: {})",
        names.join(", ")
    )
}

/// The URL segment of a kind (`httproutes`); the API takes singular or plural.
pub fn plural(kind: ResourceKind) -> &'static str {
    match kind {
        ResourceKind::Gateway => "gateways",
        ResourceKind::HttpRoute => "httproutes",
        ResourceKind::GrpcRoute => "grpcroutes",
        ResourceKind::TcpRoute => "tcproutes",
        ResourceKind::TlsRoute => "tlsroutes",
        ResourceKind::Secret => "secrets",
        ResourceKind::Backend => "backends",
    }
}

/// kubectl's `resource.group` form: `httproute.gateway.networking.k8s.io`, `secret` for the
/// core group, `backend.biplane.dev`.
pub fn qualified(kind: ResourceKind) -> String {
    let lower = kind.as_str().to_ascii_lowercase();
    match kind.group() {
        "" => lower,
        g => format!("{lower}.{g}"),
    }
}

/// [`qualified`] for a `kind` string the server sent (`HTTPRoute`); an unknown kind is
/// printed lower-cased as it came.
pub fn qualified_str(kind: &str) -> String {
    match ResourceKind::from_kind_str(kind) {
        Some(k) => qualified(k),
        None => kind.to_ascii_lowercase(),
    }
}

/// The plural, lower-case form used in kubectl's NotFound message (`httproutes "web"`), for
/// a kind string the server sent.
pub fn plural_str(kind: &str) -> String {
    match ResourceKind::from_kind_str(kind) {
        Some(k) => plural(k).to_owned(),
        None => format!("{}s", kind.to_ascii_lowercase()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_parses() {
        for (input, want) in [
            ("httproutes", ResourceKind::HttpRoute),
            ("HTTPRoute", ResourceKind::HttpRoute),
            (
                "httproute.gateway.networking.k8s.io",
                ResourceKind::HttpRoute,
            ),
            (
                "httproutes.v1.gateway.networking.k8s.io",
                ResourceKind::HttpRoute,
            ),
            ("gtw", ResourceKind::Gateway),
            ("Gateways", ResourceKind::Gateway),
            ("grpcroute", ResourceKind::GrpcRoute),
            ("tcproutes", ResourceKind::TcpRoute),
            ("TLSRoute", ResourceKind::TlsRoute),
            ("secret", ResourceKind::Secret),
            ("secrets", ResourceKind::Secret),
            ("backend.biplane.dev", ResourceKind::Backend),
            ("backends", ResourceKind::Backend),
        ] {
            assert_eq!(parse(input), Some(want), "{input}");
        }
        for bad in [
            "",
            "route",
            "httproute.biplane.dev",
            "secret.apps",
            "services",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
        assert!(unknown("services").contains("httproutes"));
    }

    #[test]
    fn printed_forms() {
        assert_eq!(
            qualified(ResourceKind::HttpRoute),
            "httproute.gateway.networking.k8s.io"
        );
        assert_eq!(qualified(ResourceKind::Secret), "secret");
        assert_eq!(qualified(ResourceKind::Backend), "backend.biplane.dev");
        assert_eq!(
            qualified_str("TCPRoute"),
            "tcproute.gateway.networking.k8s.io"
        );
        assert_eq!(qualified_str("Widget"), "widget");
        assert_eq!(plural_str("HTTPRoute"), "httproutes");
        assert_eq!(plural_str("Widget"), "widgets");
        for k in ResourceKind::ALL {
            assert_eq!(parse(plural(k)), Some(k));
            assert_eq!(parse(&qualified(k)), Some(k));
            assert_eq!(parse(k.as_str()), Some(k));
        }
    }
}
