//! Kubernetes objects as the API server would return them, for the fake API server and
//! manifest folders.

use serde_json::{Value, json};

pub fn service(ns: &str, name: &str, cluster_ip: &str, port: u16) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                 "ports": [{"name": "http", "port": port, "protocol": "TCP", "targetPort": 8080}]}
    })
}

/// An EndpointSlice for `service` whose endpoints are `(ip, pod name)`.
pub fn endpoint_slice(ns: &str, service: &str, suffix: &str, endpoints: &[(&str, &str)]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(ip, pod)| {
            json!({"addresses": [ip], "conditions": {"ready": true, "serving": true, "terminating": false},
                   "nodeName": "node-1", "zone": "zone-a",
                   "targetRef": {"kind": "Pod", "name": pod, "namespace": ns}})
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-{suffix}"), "namespace": ns,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints
    })
}

pub fn pod(ns: &str, name: &str, ip: &str, service_account: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": name, "linkerd.io/control-plane-ns": "linkerd"}},
        "spec": {"serviceAccountName": service_account, "nodeName": "node-1",
                 "containers": [{"name": "app", "image": "example/app:1"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    })
}

/// The identity issuer Secret as `linkerd install` leaves it: type kubernetes.io/tls, with
/// base64 `data` (an API server never returns `stringData`).
pub fn issuer_secret(certificate: &str, key: &str, ca: &str) -> Value {
    let b64 = |text: &str| serde_json::to_value(k8s_openapi::ByteString(text.as_bytes().to_vec())).expect("base64");
    json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": "linkerd-identity-issuer", "namespace": "linkerd"},
        "data": {"tls.crt": b64(certificate), "tls.key": b64(key), "ca.crt": b64(ca)}
    })
}

/// The trust-roots ConfigMap, key `ca-bundle.crt`.
pub fn trust_roots(pem: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "linkerd-identity-trust-roots", "namespace": "linkerd"},
        "data": {"ca-bundle.crt": pem}
    })
}
