//! Admin API authentication and authorization: an axum middleware that requires
//! `Authorization: Bearer <token>` and checks the token's role against what the request
//! needs ([`required_role`]). Refusals are 401 (no, unknown or expired token; with
//! `WWW-Authenticate: Bearer`) or 403 (role too low), with JSON bodies, and are logged at
//! info with the method, path and the token's name and role when known, never the token.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::tokens::{Principal, Role, TokenError, Tokens};

/// What the middleware needs.
#[derive(Clone, Debug)]
pub struct AuthState {
    /// Token lookup.
    pub tokens: Tokens,
}

/// The role a request needs; `None` = open (`/healthz`).
pub fn required_role(method: &Method, path: &str, query: Option<&str>) -> Option<Role> {
    // `/api/v1/enroll` authenticates with a bootstrap token, in its handler.
    if path == "/healthz" || path == "/api/v1/enroll" {
        return None;
    }
    if path == "/api/v1/tokens"
        || path.starts_with("/api/v1/tokens/")
        || path.starts_with("/api/v1/nodes/")
    {
        return Some(Role::Admin);
    }
    let reads = *method == Method::GET || *method == Method::HEAD;
    if reads {
        let shows_secrets = query.is_some_and(|q| {
            q.split('&').any(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                k == "showSecrets" && !matches!(v, "false" | "0")
            })
        });
        return Some(if shows_secrets {
            Role::Admin
        } else {
            Role::Viewer
        });
    }
    Some(Role::Editor)
}

fn refusal(status: StatusCode, code: &str, message: String) -> Response {
    let mut resp = (
        status,
        axum::Json(json!({"error": code, "message": message})),
    )
        .into_response();
    if status == StatusCode::UNAUTHORIZED {
        let challenge = if code == "unauthorized" {
            "Bearer realm=\"biplane\""
        } else {
            "Bearer realm=\"biplane\", error=\"invalid_token\""
        };
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(challenge),
        );
    }
    resp
}

/// The bearer token of a request, if the header is there and well formed.
fn bearer(req: &Request<Body>) -> Result<Option<&str>, &'static str> {
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| "the Authorization header is not ASCII")?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or("the Authorization header must be \"Bearer <token>\"")?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err("the Authorization header must use the Bearer scheme");
    }
    Ok(Some(token.trim()))
}

/// The middleware: authenticates, authorizes, and stores the [`Principal`] in the
/// request's extensions for the handlers.
pub async fn require_token(
    State(auth): State<Arc<AuthState>>,
    mut req: Request<Body>,
    next: Next,
) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let Some(needed) = required_role(&method, &path, req.uri().query()) else {
        return next.run(req).await;
    };
    let token = match bearer(&req) {
        Ok(Some(t)) => t,
        Ok(None) => {
            tracing::info!(%method, %path, "refused: no bearer token");
            return refusal(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this API requires a token: send \"Authorization: Bearer <token>\" (the initial admin token is in <data-dir>/admin-token)".to_owned(),
            );
        }
        Err(why) => {
            tracing::info!(%method, %path, "refused: malformed Authorization header");
            return refusal(StatusCode::UNAUTHORIZED, "invalid_token", why.to_owned());
        }
    };
    let principal = match auth.tokens.authenticate(token).await {
        Ok(p) => p,
        Err(TokenError::Store(e)) => {
            tracing::error!(error = %e, "store error while checking a token");
            return refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "store",
                format!("cannot check the token: {e}"),
            );
        }
        Err(e) => {
            tracing::info!(%method, %path, reason = %e, "refused: invalid token");
            return refusal(StatusCode::UNAUTHORIZED, "invalid_token", e.to_string());
        }
    };
    if principal.role < needed {
        tracing::info!(
            %method, %path,
            token = %principal.name, role = %principal.role, needed = %needed,
            "refused: role too low"
        );
        return refusal(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "token {:?} has role {}; {method} {path} needs {needed}",
                principal.name, principal.role
            ),
        );
    }
    req.extensions_mut().insert(principal);
    next.run(req).await
}

/// The caller's principal when the API runs with authentication (`None` without).
pub fn principal_of(req_ext: &axum::http::Extensions) -> Option<&Principal> {
    req_ext.get::<Principal>()
}

/// The xDS authorizer of an mTLS control plane: the stream's client certificate (already
/// verified against the CA by TLS) must carry a SPIFFE identity of `trust_domain`, and
/// the node must claim exactly that identity (`node.id` = its node id, `node.cluster` =
/// its Gateway). Anything else is refused and logged.
pub fn xds_node_authorizer(
    trust_domain: String,
    revocations: crate::nodes::Revocations,
) -> biplane_xds::server::NodeAuthorizer {
    Arc::new(move |node, peer| {
        let Some(leaf) = peer.and_then(|chain| chain.first()) else {
            tracing::info!(node = %node.id, "xDS stream refused: no client certificate");
            return Err(tonic::Status::unauthenticated(
                "this xDS server requires a client certificate issued by the control plane's CA",
            ));
        };
        let identity = crate::ca::identity_of(leaf).map_err(|e| {
            tracing::info!(node = %node.id, error = %e, "xDS stream refused: no usable identity in the client certificate");
            tonic::Status::permission_denied(format!("client certificate: {e}"))
        })?;
        if identity.trust_domain != trust_domain {
            tracing::info!(node = %node.id, %identity, "xDS stream refused: foreign trust domain");
            return Err(tonic::Status::permission_denied(format!(
                "certificate identity {identity} is not in trust domain {trust_domain}"
            )));
        }
        if revocations.is_revoked(&identity.node_id) {
            tracing::info!(node = %node.id, %identity, "xDS stream refused: node revoked");
            return Err(tonic::Status::permission_denied(format!(
                "node {:?} is revoked",
                identity.node_id
            )));
        }
        let cluster = biplane_xds::server::GatewayKey::parse(&node.cluster);
        let cluster_ok = cluster
            .as_ref()
            .is_some_and(|g| g.namespace == identity.namespace && g.name == identity.gateway);
        if node.id != identity.node_id || !cluster_ok {
            tracing::info!(
                node = %node.id, cluster = %node.cluster, %identity,
                "xDS stream refused: node claims another identity than its certificate"
            );
            return Err(tonic::Status::permission_denied(format!(
                "node id {:?} / cluster {:?} do not match the certificate identity {identity} (node id {:?}, gateway {})",
                node.id,
                node.cluster,
                identity.node_id,
                identity.gateway_ref()
            )));
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_per_route() {
        let r = |m: Method, p: &str, q: Option<&str>| required_role(&m, p, q);
        assert_eq!(r(Method::GET, "/healthz", None), None);
        assert_eq!(r(Method::POST, "/api/v1/enroll", None), None);
        assert_eq!(r(Method::GET, "/metrics", None), Some(Role::Viewer));
        assert_eq!(r(Method::GET, "/api/v1/status", None), Some(Role::Viewer));
        assert_eq!(
            r(
                Method::GET,
                "/api/v1/secrets/default/s",
                Some("showSecrets=true")
            ),
            Some(Role::Admin)
        );
        assert_eq!(
            r(
                Method::GET,
                "/api/v1/secrets",
                Some("namespace=a&showSecrets=false")
            ),
            Some(Role::Viewer)
        );
        assert_eq!(r(Method::POST, "/api/v1/apply", None), Some(Role::Editor));
        assert_eq!(r(Method::POST, "/api/v1/diff", None), Some(Role::Editor));
        assert_eq!(
            r(Method::DELETE, "/api/v1/gateways/a/b", None),
            Some(Role::Editor)
        );
        assert_eq!(r(Method::POST, "/api/v1/tokens", None), Some(Role::Admin));
        assert_eq!(r(Method::GET, "/api/v1/tokens", None), Some(Role::Admin));
    }
}
