//! A small upstream cluster on the fake API server and the link configuration that points a
//! daemon at it: shared by the sync tests and the hostile-upstream drill.

use super::fake_kube::FakeKube;
use super::objects::{endpoint_slice, pod, service};
use super::{Daemon, endpoint_ips};

/// A link config for a fake API server, written next to the daemon's own config. Further keys
/// of the link can be appended to it.
pub fn link_config(name: &str, kube: &FakeKube, mode: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir").keep();
    let kubeconfig = kube.write_kubeconfig(&dir);
    format!("[upstream.links.{name}]\nkubeconfig = {:?}\nmode = \"{mode}\"\n", kubeconfig.display().to_string())
}

/// A cluster with one service `api.shop` backed by one pod.
pub fn shop_cluster() -> FakeKube {
    let kube = FakeKube::start();
    kube.apply(service("shop", "api", "10.96.0.11", 80));
    kube.apply(pod("shop", "api-1", "10.1.0.1", "api"));
    kube.apply(endpoint_slice("shop", "api", "a", &[("10.1.0.1", "api-1")]));
    kube
}

/// The endpoint addresses `name` resolves to, sorted; `None` when not found or unknown.
pub fn ips(daemon: &Daemon, name: &str) -> Option<Vec<String>> {
    endpoint_ips(&daemon.resolve(name))
}
