//! Status computed on read, in Gateway API form: `Accepted`, `ResolvedRefs` and
//! `Programmed` conditions for routes and Gateways (from the controller's [`World`], the
//! unresolved references of the set and the fleet's ACKs), and the fleet view of
//! `GET /api/v1/status`.

use biplane_api::{RefProblem, Resource, ResourceKey, ResourceKind, RouteRef};
use biplane_xds::server::{FleetStatus, GatewayKey, NackStatus, NodeStatus, PUSH_ORDER};
use serde_json::{Value, json};

use crate::controller::{ControllerShared, World};
use crate::docs::rfc3339_millis;

/// Everything needed to compute the status of many resources of one [`World`].
pub struct StatusContext<'a> {
    world: &'a World,
    problems: Vec<RefProblem>,
    nodes: Vec<NodeStatus>,
    shared: &'a ControllerShared,
}

struct Condition {
    kind: &'static str,
    status: &'static str,
    reason: String,
    message: String,
}

/// The `controllerName` in route parent statuses (Gateway API's GatewayClass
/// `spec.controllerName`).
pub const CONTROLLER_NAME: &str = "biplane.dev/gateway-controller";

impl Condition {
    fn to_json(&self, generation: i64) -> Value {
        json!({
            "type": self.kind,
            "status": self.status,
            "reason": self.reason,
            "message": self.message,
            "observedGeneration": generation,
        })
    }

    fn new(kind: &'static str, ok: bool, reason: impl Into<String>, message: String) -> Self {
        Condition {
            kind,
            status: if ok { "True" } else { "False" },
            reason: reason.into(),
            message,
        }
    }
}

impl<'a> StatusContext<'a> {
    /// Resolves the references of `world` once, and snapshots the fleet.
    pub fn new(world: &'a World, shared: &'a ControllerShared, fleet: &FleetStatus) -> Self {
        StatusContext {
            world,
            problems: world.set.resolve_refs(),
            nodes: fleet.nodes(),
            shared,
        }
    }

    /// The `status` of a route or Gateway stored at `mod_revision` with `generation`;
    /// `None` for kinds without status.
    pub fn status_of(
        &self,
        key: &ResourceKey,
        generation: i64,
        mod_revision: u64,
    ) -> Option<Value> {
        if !matches!(
            key.kind,
            ResourceKind::Gateway
                | ResourceKind::HttpRoute
                | ResourceKind::GrpcRoute
                | ResourceKind::TcpRoute
                | ResourceKind::TlsRoute
        ) {
            return None;
        }
        let mut parents = None;
        let conditions = match self.world.items.get(key) {
            Some(item) if item.mod_revision >= mod_revision => match &item.resource {
                Resource::Gateway(_) => self.gateway_conditions(key, mod_revision),
                r => match RouteRef::from_resource(r) {
                    Some(route) => {
                        let conditions = self.route_conditions(key, route, mod_revision);
                        parents = Some(self.route_parents(
                            route,
                            &conditions[1],
                            mod_revision,
                            generation,
                        ));
                        conditions
                    }
                    None => return None,
                },
            },
            _ => vec![Condition {
                kind: "Accepted",
                status: "Unknown",
                reason: "Pending".to_owned(),
                message: format!(
                    "the controller has not processed this revision yet (it is at revision {})",
                    self.world.revision
                ),
            }],
        };
        let mut status = json!({
            "conditions": conditions.iter().map(|c| c.to_json(generation)).collect::<Vec<_>>()
        });
        if let Some(parents) = parents {
            status["parents"] = Value::Array(parents);
        }
        Some(status)
    }

    /// Gateway API's `status.parents[]` of a route: per parentRef, `Accepted` (its own
    /// attachment), `ResolvedRefs` (the route's) and `Programmed` (its Gateway's nodes).
    /// The route-level `status.conditions` is the summary over all parents.
    fn route_parents(
        &self,
        route: RouteRef<'_>,
        resolved: &Condition,
        mod_revision: u64,
        generation: i64,
    ) -> Vec<Value> {
        let route_ns = route.metadata().namespace();
        route
            .parent_refs()
            .iter()
            .map(|parent| {
                let (accepted, programmed) = match self.world.set.attach_parent_ref(route, parent) {
                    Ok(pa) => {
                        let gk = GatewayKey::new(
                            pa.gateway.metadata.namespace(),
                            pa.gateway.metadata.name.clone(),
                        );
                        (
                            Condition::new(
                                "Accepted",
                                true,
                                "Accepted",
                                format!("attached to Gateway {gk}"),
                            ),
                            self.programmed(std::slice::from_ref(&gk), mod_revision),
                        )
                    }
                    Err((reason, message)) => (
                        Condition::new("Accepted", false, reason.condition().1, message),
                        Condition::new(
                            "Programmed",
                            false,
                            "Pending",
                            "not attached to this parent".to_owned(),
                        ),
                    ),
                };
                let mut parent_ref = json!({
                    "group": parent.group(),
                    "kind": parent.kind(),
                    "namespace": parent.namespace(route_ns),
                    "name": parent.name,
                });
                if let Some(section) = &parent.section_name {
                    parent_ref["sectionName"] = json!(section);
                }
                if let Some(port) = parent.port {
                    parent_ref["port"] = json!(port);
                }
                json!({
                    "parentRef": parent_ref,
                    "controllerName": CONTROLLER_NAME,
                    "conditions": [
                        accepted.to_json(generation),
                        resolved.to_json(generation),
                        programmed.to_json(generation),
                    ],
                })
            })
            .collect()
    }

    fn problems_of<'p>(&'p self, key: &'p ResourceKey) -> impl Iterator<Item = &'p RefProblem> {
        self.problems.iter().filter(move |p| &p.resource == key)
    }

    fn route_conditions(
        &self,
        key: &ResourceKey,
        route: RouteRef<'_>,
        mod_revision: u64,
    ) -> Vec<Condition> {
        let mut gateways: Vec<GatewayKey> = Vec::new();
        for parent in route.parent_refs() {
            if let Ok(pa) = self.world.set.attach_parent_ref(route, parent) {
                let gk = GatewayKey::new(
                    pa.gateway.metadata.namespace(),
                    pa.gateway.metadata.name.clone(),
                );
                if !gateways.contains(&gk) {
                    gateways.push(gk);
                }
            }
        }
        let parent_problems: Vec<&RefProblem> = self
            .problems_of(key)
            .filter(|p| p.parent_ref.is_some())
            .collect();
        let accepted = if gateways.is_empty() {
            match parent_problems.first() {
                Some(first) => Condition::new(
                    "Accepted",
                    false,
                    first.reason.condition().1,
                    join(&parent_problems),
                ),
                None => Condition::new(
                    "Accepted",
                    false,
                    "NoMatchingParent",
                    "the route has no parentRefs".to_owned(),
                ),
            }
        } else {
            let mut message = format!("attached to Gateway {}", list(&gateways));
            if !parent_problems.is_empty() {
                message.push_str(&format!("; not attached: {}", join(&parent_problems)));
            }
            Condition::new("Accepted", true, "Accepted", message)
        };
        let backend_problems: Vec<&RefProblem> = self
            .problems_of(key)
            .filter(|p| p.backend_ref.is_some())
            .collect();
        let resolved = match backend_problems.first() {
            Some(first) => Condition::new(
                "ResolvedRefs",
                false,
                first.reason.condition().1,
                join(&backend_problems),
            ),
            None => Condition::new(
                "ResolvedRefs",
                true,
                "ResolvedRefs",
                "all references resolve".to_owned(),
            ),
        };
        let programmed = if gateways.is_empty() {
            Condition::new(
                "Programmed",
                false,
                "Pending",
                "the route is not attached to any Gateway listener".to_owned(),
            )
        } else {
            self.programmed(&gateways, mod_revision)
        };
        vec![accepted, resolved, programmed]
    }

    fn gateway_conditions(&self, key: &ResourceKey, mod_revision: u64) -> Vec<Condition> {
        let accepted = Condition::new(
            "Accepted",
            true,
            "Accepted",
            "the Gateway is valid".to_owned(),
        );
        let cert_problems: Vec<&RefProblem> = self.problems_of(key).collect();
        let resolved = match cert_problems.first() {
            Some(first) => Condition::new(
                "ResolvedRefs",
                false,
                first.reason.condition().1,
                join(&cert_problems),
            ),
            None => Condition::new(
                "ResolvedRefs",
                true,
                "ResolvedRefs",
                "all certificateRefs resolve".to_owned(),
            ),
        };
        let gk = GatewayKey::new(key.namespace.clone(), key.name.clone());
        vec![accepted, resolved, self.programmed(&[gk], mod_revision)]
    }

    /// `Programmed`: every connected node of these Gateways has ACKed a compilation of a
    /// store revision `>= mod_revision`. When not, reason `Rejected` (with the message) if
    /// a node that has not answered with an ACK last NACKed, else `Pending`.
    fn programmed(&self, gateways: &[GatewayKey], mod_revision: u64) -> Condition {
        for gk in gateways {
            if let Some(err) = self.shared.gateway(gk).and_then(|s| s.error) {
                return Condition::new(
                    "Programmed",
                    false,
                    "Invalid",
                    format!("Gateway {gk} cannot be compiled: {err}"),
                );
            }
        }
        let nodes: Vec<&NodeStatus> = self
            .nodes
            .iter()
            .filter(|n| gateways.contains(&n.gateway))
            .collect();
        if nodes.is_empty() {
            return Condition::new(
                "Programmed",
                false,
                "NoNodes",
                format!(
                    "no data-plane node of Gateway {} is connected",
                    list(gateways)
                ),
            );
        }
        let pending: Vec<&&NodeStatus> = nodes
            .iter()
            .filter(|n| !self.shared.node_has_revision(n, mod_revision))
            .collect();
        // A pending node whose latest answer to some type is a NACK refused the config
        // that carries this change: say so, with the node's own message.
        if let Some((node, kind, nack)) = pending.iter().find_map(|n| current_nack(n)) {
            return Condition::new(
                "Programmed",
                false,
                "Rejected",
                format!(
                    "{} of {} connected node(s) have not ACKed revision {mod_revision}; node {} rejected {kind} version {}: {}",
                    pending.len(),
                    nodes.len(),
                    node.node_id,
                    nack.version,
                    nack.message
                ),
            );
        }
        let pending = pending.len();
        if pending == 0 {
            Condition::new(
                "Programmed",
                true,
                "Programmed",
                format!(
                    "all {} connected node(s) have ACKed revision {mod_revision} or later",
                    nodes.len()
                ),
            )
        } else {
            Condition::new(
                "Programmed",
                false,
                "Pending",
                format!(
                    "{pending} of {} connected node(s) have not ACKed revision {mod_revision} yet",
                    nodes.len()
                ),
            )
        }
    }
}

/// The type and NACK of `node` whose last answer was a NACK (no ACK of that type since).
fn current_nack(
    node: &NodeStatus,
) -> Option<(&NodeStatus, biplane_xds::ResourceKind, &NackStatus)> {
    node.types.iter().find_map(|t| {
        let nack = t.last_nack.as_ref()?;
        let newer = t.acked_at.is_none_or(|acked| nack.at >= acked);
        newer.then_some((node, t.kind, nack))
    })
}

fn join(problems: &[&RefProblem]) -> String {
    problems
        .iter()
        .map(|p| format!("{}: {}", p.path, p.message))
        .collect::<Vec<_>>()
        .join("; ")
}

fn list(gateways: &[GatewayKey]) -> String {
    gateways
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The body of `GET /api/v1/status`.
pub fn fleet_status(revision: u64, fleet: &FleetStatus, shared: &ControllerShared) -> Value {
    let nodes: Vec<Value> = fleet
        .nodes()
        .into_iter()
        .map(|n| {
            let lags = shared.node_lag(n.stream_id);
            let types: Vec<Value> = PUSH_ORDER
                .iter()
                .enumerate()
                .map(|(i, kind)| {
                    let t = n.type_status(*kind);
                    json!({
                        "type": kind.to_string(),
                        "subscribed": t.is_some_and(|t| t.subscribed),
                        "sentVersion": t.and_then(|t| t.sent_version.clone()),
                        "ackedVersion": t.and_then(|t| t.acked_version.clone()),
                        "ackedAt": t.and_then(|t| t.acked_at).map(rfc3339_millis),
                        "lagMs": lags[i],
                        "lastNack": t.and_then(|t| t.last_nack.as_ref()).map(|nack| json!({
                            "version": nack.version,
                            "message": nack.message,
                            "at": rfc3339_millis(nack.at),
                        })),
                    })
                })
                .collect();
            json!({
                "nodeId": n.node_id,
                "gateway": n.gateway.to_string(),
                "protocol": n.protocol.to_string(),
                "connectedSince": rfc3339_millis(n.connected_since),
                "userAgent": n.user_agent,
                "types": types,
            })
        })
        .collect();
    json!({ "revision": revision, "nodes": nodes })
}
