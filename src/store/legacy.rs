//! Objects as earlier schemas wrote them, and their conversion to the current model, so an
//! upgraded box keeps its cache (it may be offline when it boots the new version).
//!
//! Schema 1 → 2: HTTPRoute rules gained `retry`. Every other kind is encoded as before, so
//! the schema-1 object enum reuses the current types for them; its variants must stay in the
//! order of [`Object`]'s, because postcard encodes a variant by its index.

use serde::{Deserialize, Serialize};

use crate::model::{
    self, BackendRef, EndpointSlice, HttpRouteGroup, HttpRouteMatch, IdentityIssuer, Object, ObjectRef, ParentRef, Pod,
    Service, TcpRoute, TrafficSplit, TrafficTarget, TrustRoots,
};

/// Decodes an object written under `schema` (postcard) into the current model.
pub fn decode(schema: u32, bytes: &[u8]) -> Result<Object, postcard::Error> {
    match schema {
        1 => postcard::from_bytes::<ObjectV1>(bytes).map(Object::from),
        _ => postcard::from_bytes(bytes),
    }
}

#[derive(Serialize, Deserialize)]
pub(super) enum ObjectV1 {
    Service(Service),
    EndpointSlice(EndpointSlice),
    Pod(Pod),
    TrafficSplit(TrafficSplit),
    TrafficTarget(TrafficTarget),
    HttpRouteGroup(HttpRouteGroup),
    TcpRoute(TcpRoute),
    HttpRoute(HttpRouteV1),
    IdentityIssuer(IdentityIssuer),
    TrustRoots(TrustRoots),
}

#[derive(Serialize, Deserialize)]
pub(super) struct HttpRouteV1 {
    pub meta: ObjectRef,
    pub parents: Vec<ParentRef>,
    pub hostnames: Vec<String>,
    pub rules: Vec<HttpRouteRuleV1>,
}

#[derive(Serialize, Deserialize)]
pub(super) struct HttpRouteRuleV1 {
    pub matches: Vec<HttpRouteMatch>,
    pub backends: Vec<BackendRef>,
    pub request_timeout_ms: Option<u64>,
    pub backend_request_timeout_ms: Option<u64>,
}

impl From<ObjectV1> for Object {
    fn from(old: ObjectV1) -> Self {
        match old {
            ObjectV1::Service(o) => Object::Service(o),
            ObjectV1::EndpointSlice(o) => Object::EndpointSlice(o),
            ObjectV1::Pod(o) => Object::Pod(o),
            ObjectV1::TrafficSplit(o) => Object::TrafficSplit(o),
            ObjectV1::TrafficTarget(o) => Object::TrafficTarget(o),
            ObjectV1::HttpRouteGroup(o) => Object::HttpRouteGroup(o),
            ObjectV1::TcpRoute(o) => Object::TcpRoute(o),
            ObjectV1::HttpRoute(route) => Object::HttpRoute(model::HttpRoute {
                meta: route.meta,
                parents: route.parents,
                hostnames: route.hostnames,
                rules: route
                    .rules
                    .into_iter()
                    .map(|rule| model::HttpRouteRule {
                        matches: rule.matches,
                        backends: rule.backends,
                        request_timeout_ms: rule.request_timeout_ms,
                        backend_request_timeout_ms: rule.backend_request_timeout_ms,
                        retry: None,
                    })
                    .collect(),
            }),
            ObjectV1::IdentityIssuer(o) => Object::IdentityIssuer(o),
            ObjectV1::TrustRoots(o) => Object::TrustRoots(o),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{HttpRoute, HttpRouteRule, PathMatch};

    fn v1_route() -> ObjectV1 {
        let rule = |timeout| HttpRouteRuleV1 {
            matches: vec![HttpRouteMatch { path: Some(PathMatch::Prefix("/a".into())), method: None, headers: vec![] }],
            backends: vec![BackendRef { namespace: "shop".into(), name: "api".into(), port: Some(80), weight: 1 }],
            request_timeout_ms: timeout,
            backend_request_timeout_ms: None,
        };
        ObjectV1::HttpRoute(HttpRouteV1 {
            meta: ObjectRef::new("shop", "r"),
            parents: vec![],
            hostnames: vec!["api.shop".into()],
            rules: vec![rule(Some(1500)), rule(None)],
        })
    }

    #[test]
    fn schema_1_routes_decode_with_no_retry_and_need_the_migration() {
        let bytes = postcard::to_allocvec(&v1_route()).unwrap();
        let Object::HttpRoute(HttpRoute { rules, hostnames, .. }) = decode(1, &bytes).unwrap() else {
            panic!("not a route")
        };
        assert_eq!(hostnames, vec!["api.shop".to_owned()]);
        let timeouts: Vec<_> = rules.iter().map(|r: &HttpRouteRule| (r.request_timeout_ms, r.retry.clone())).collect();
        assert_eq!(timeouts, vec![(Some(1500), None), (None, None)]);
        // Read as the current schema, the same bytes do not give the same route.
        let misread = decode(super::super::SCHEMA_VERSION, &bytes);
        assert!(misread.as_ref().map_or(true, |o| o != &decode(1, &bytes).unwrap()), "{misread:?}");
    }
}
