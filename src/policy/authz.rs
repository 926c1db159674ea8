//! Who may reach a local workload: SMI TrafficTargets whose destination is the workload's
//! service account allow the identities they list as sources, for the HTTPRouteGroup matches
//! and TCPRoute ports they name. A workload no TrafficTarget selects falls under the default
//! policy.

use serde::{Deserialize, Serialize};

use super::{RequestInfo, indexed, named, smi_match};
use crate::discovery::Settings;
use crate::model::{Kind, Object, ObjectRef, RouteRef, TrafficTarget};
use crate::store::Snapshot;

/// The policy for workloads that no TrafficTarget selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DefaultPolicy {
    /// Any client with a mesh identity (mTLS); plaintext is denied.
    AllAuthenticated,
    /// Anyone, with or without identity.
    AllUnauthenticated,
    /// No one.
    Deny,
    /// Everyone is let through, and what a deny-by-default policy would refuse is counted and
    /// logged as such.
    Audit,
}

/// The local workload a connection or request is for.
#[derive(Debug, Clone, Copy)]
pub struct Destination<'a> {
    pub namespace: &'a str,
    pub service_account: &'a str,
    pub port: u16,
}

/// The decision, with what made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// `TrafficTarget ns/name`, or `default:<policy>`.
    pub by: String,
    /// Why a denial (or, under audit, a would-be denial) happened.
    pub reason: Option<String>,
    /// A TrafficTarget's rules decided, and they may look at the request (HTTPRouteGroup
    /// matches): under the same snapshot, another request from the same client to the same
    /// port may get another verdict. When false, every such request gets this one.
    pub per_request: bool,
}

/// Decides whether `client` (a mesh identity name, or `None` for plaintext) may reach
/// `destination`; `request` is `None` for opaque TCP.
pub fn authorize(
    snapshot: &Snapshot,
    settings: &Settings,
    destination: Destination<'_>,
    client: Option<&str>,
    request: Option<&RequestInfo<'_>>,
    default: DefaultPolicy,
) -> Verdict {
    // Unknown is not empty: while a source has never listed its TrafficTargets, one of them may
    // deny this client, so nothing is let through on the default policy's word.
    if let Some((source, _)) = snapshot.sources().find(|(_, view)| !view.is_known(Kind::TrafficTarget)) {
        return deny("unknown", format!("{source} has not listed TrafficTargets yet; authorization is unknown"));
    }
    let account = ObjectRef::new(destination.namespace, destination.service_account);
    let targets: Vec<&TrafficTarget> = indexed(snapshot, Kind::TrafficTarget, |index| index.targets_for(&account))
        .filter_map(|o| match o {
            Object::TrafficTarget(t) if selects(t, &destination) => Some(t),
            _ => None,
        })
        .collect();
    if targets.is_empty() {
        return by_default(default, client);
    }
    let Some(client) = client else {
        return deny("TrafficTarget", "a TrafficTarget selects this workload and the client has no identity".into());
    };
    for target in &targets {
        let listed = target.sources.iter().any(|s| settings.identity_name(&s.namespace, &s.name) == client);
        if listed && target.rules.iter().any(|rule| rule_allows(snapshot, target, rule, destination.port, request)) {
            return Verdict {
                allowed: true,
                by: format!("TrafficTarget {}/{}", target.meta.namespace, target.meta.name),
                reason: None,
                per_request: true,
            };
        }
    }
    let names: Vec<String> = targets.iter().map(|t| format!("{}/{}", t.meta.namespace, t.meta.name)).collect();
    Verdict { per_request: true, ..deny("TrafficTarget", format!("{client} is not allowed by {}", names.join(", "))) }
}

fn deny(by: &str, reason: String) -> Verdict {
    Verdict { allowed: false, by: by.to_owned(), reason: Some(reason), per_request: false }
}

fn by_default(default: DefaultPolicy, client: Option<&str>) -> Verdict {
    let by = format!(
        "default:{}",
        match default {
            DefaultPolicy::AllAuthenticated => "all-authenticated",
            DefaultPolicy::AllUnauthenticated => "all-unauthenticated",
            DefaultPolicy::Deny => "deny",
            DefaultPolicy::Audit => "audit",
        }
    );
    let (allowed, reason) = match (default, client) {
        (DefaultPolicy::AllUnauthenticated, _) | (DefaultPolicy::AllAuthenticated, Some(_)) => (true, None),
        (DefaultPolicy::AllAuthenticated, None) => (false, Some("the client has no mesh identity".to_owned())),
        (DefaultPolicy::Deny, _) => (false, Some("no TrafficTarget allows it and the default is deny".to_owned())),
        (DefaultPolicy::Audit, _) => (true, Some("no TrafficTarget allows it (audit: let through)".to_owned())),
    };
    Verdict { allowed, by, reason, per_request: false }
}

/// A TrafficTarget selects the destination's service account, on its port if it names one.
fn selects(target: &TrafficTarget, destination: &Destination<'_>) -> bool {
    target.destination.namespace == destination.namespace
        && target.destination.name == destination.service_account
        && target.destination.port.is_none_or(|p| p == destination.port)
}

/// A rule allows a request when it is an HTTPRouteGroup with an accepting match, or a TCPRoute
/// covering the port (which allows every request on it); opaque TCP needs a TCPRoute.
fn rule_allows(
    snapshot: &Snapshot,
    target: &TrafficTarget,
    rule: &RouteRef,
    port: u16,
    request: Option<&RequestInfo<'_>>,
) -> bool {
    let key = ObjectRef::new(&target.meta.namespace, &rule.name);
    named(snapshot, rule.kind, &key).any(|object| match (object, request) {
        (Object::TcpRoute(route), _) => route.ports.is_empty() || route.ports.contains(&port),
        (Object::HttpRouteGroup(group), Some(request)) => group
            .matches
            .iter()
            .filter(|m| rule.matches.is_empty() || rule.matches.contains(&m.name))
            .any(|m| smi_match(m, request)),
        _ => false,
    })
}
