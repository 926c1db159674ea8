//! Sources of objects: the local manifest folder and upstream Kubernetes links. Each source
//! reports to the store through [`crate::store::Updates`].
//!
//! Architecture Invariant: this is the only module that names `kube` or `k8s_openapi` types;
//! everything leaves it as [`crate::model`] data.

pub mod convert;
mod limit;
pub mod link;
pub mod local;
mod wire;
