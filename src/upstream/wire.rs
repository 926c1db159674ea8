//! Wire types for the objects meshkeep reads: lean Pods and the SMI and Gateway API custom
//! resources, deserialised from the API server's JSON or from manifest YAML.
//!
//! Only the fields meshkeep uses are declared; serde skips the rest, so a Pod's containers,
//! volumes and status details are never held in memory.

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

/// Declares a namespaced `kube::Resource` for a wire type with a `metadata` field.
macro_rules! namespaced_resource {
    ($ty:ty, group: $group:literal, version: $version:literal, kind: $kind:literal, plural: $plural:literal) => {
        impl kube::Resource for $ty {
            type DynamicType = ();
            type Scope = k8s_openapi::NamespaceResourceScope;

            fn kind(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($kind)
            }
            fn group(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($group)
            }
            fn version(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($version)
            }
            fn plural(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($plural)
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

/// A Pod with only what identity and topology need.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Pod {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PodSpec,
    #[serde(default)]
    pub status: PodStatus,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    pub service_account_name: Option<String>,
    /// Deprecated alias of serviceAccountName, still set by some tools.
    pub service_account: Option<String>,
    pub node_name: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(rename = "podIPs")]
    pub pod_ips: Option<Vec<PodIp>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PodIp {
    pub ip: String,
}

namespaced_resource!(Pod, group: "", version: "v1", kind: "Pod", plural: "pods");

/// SMI TrafficSplit, split.smi-spec.io/v1alpha4.
#[derive(Debug, Clone, Deserialize)]
pub struct TrafficSplit {
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: TrafficSplitSpec,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TrafficSplitSpec {
    pub service: String,
    #[serde(default)]
    pub backends: Vec<TrafficSplitBackend>,
    #[serde(default)]
    pub matches: Vec<TypedRef>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TrafficSplitBackend {
    pub service: String,
    pub weight: i64,
}

/// A reference by kind and name (SMI `matches` entries).
#[derive(Debug, Clone, Deserialize)]
pub struct TypedRef {
    pub kind: String,
    pub name: String,
}

namespaced_resource!(TrafficSplit, group: "split.smi-spec.io", version: "v1alpha4", kind: "TrafficSplit", plural: "trafficsplits");

/// SMI TrafficTarget, access.smi-spec.io/v1alpha3.
#[derive(Debug, Clone, Deserialize)]
pub struct TrafficTarget {
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: TrafficTargetSpec,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TrafficTargetSpec {
    pub destination: IdentityBinding,
    #[serde(default)]
    pub rules: Vec<TrafficTargetRule>,
    #[serde(default)]
    pub sources: Vec<IdentityBinding>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct IdentityBinding {
    pub kind: String,
    pub name: String,
    pub namespace: Option<String>,
    pub port: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TrafficTargetRule {
    pub kind: String,
    pub name: String,
    #[serde(default)]
    pub matches: Vec<String>,
}

namespaced_resource!(TrafficTarget, group: "access.smi-spec.io", version: "v1alpha3", kind: "TrafficTarget", plural: "traffictargets");

/// SMI HTTPRouteGroup, specs.smi-spec.io/v1alpha4.
#[derive(Debug, Clone, Deserialize)]
pub struct HttpRouteGroup {
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: HttpRouteGroupSpec,
}

#[derive(Debug, Clone, Deserialize)]
pub struct HttpRouteGroupSpec {
    #[serde(default)]
    pub matches: Vec<HttpRouteGroupMatch>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteGroupMatch {
    pub name: String,
    #[serde(default)]
    pub methods: Vec<String>,
    pub path_regex: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

namespaced_resource!(HttpRouteGroup, group: "specs.smi-spec.io", version: "v1alpha4", kind: "HTTPRouteGroup", plural: "httproutegroups");

/// SMI TCPRoute, specs.smi-spec.io/v1alpha4.
#[derive(Debug, Clone, Deserialize)]
pub struct TcpRoute {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: TcpRouteSpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct TcpRouteSpec {
    #[serde(default)]
    pub matches: TcpRouteMatches,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct TcpRouteMatches {
    #[serde(default)]
    pub ports: Vec<i64>,
}

namespaced_resource!(TcpRoute, group: "specs.smi-spec.io", version: "v1alpha4", kind: "TCPRoute", plural: "tcproutes");

/// Gateway API HTTPRoute, gateway.networking.k8s.io/v1.
#[derive(Debug, Clone, Deserialize)]
pub struct HttpRoute {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: HttpRouteSpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<GatewayParentRef>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<GatewayRule>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayParentRef {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub namespace: Option<String>,
    pub name: String,
    pub port: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayRule {
    #[serde(default)]
    pub matches: Vec<GatewayMatch>,
    #[serde(default)]
    pub backend_refs: Vec<GatewayBackendRef>,
    pub timeouts: Option<GatewayTimeouts>,
    pub retry: Option<GatewayRetry>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct GatewayRetry {
    #[serde(default)]
    pub codes: Vec<i64>,
    pub attempts: Option<i64>,
    pub backoff: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct GatewayMatch {
    pub path: Option<GatewayPathMatch>,
    #[serde(default)]
    pub headers: Vec<GatewayHeaderMatch>,
    pub method: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GatewayPathMatch {
    #[serde(rename = "type")]
    pub type_: Option<String>,
    pub value: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GatewayHeaderMatch {
    #[serde(rename = "type")]
    pub type_: Option<String>,
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GatewayBackendRef {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub name: String,
    pub namespace: Option<String>,
    pub port: Option<i64>,
    pub weight: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayTimeouts {
    pub request: Option<String>,
    pub backend_request: Option<String>,
}

namespaced_resource!(HttpRoute, group: "gateway.networking.k8s.io", version: "v1", kind: "HTTPRoute", plural: "httproutes");
