//! meshkeep: a service-mesh node for the edge that keeps serving while its upstream is gone.
//!
//! The modules follow the data flow: `upstream` sources report to the `store`, which persists
//! them and publishes immutable snapshots; `discovery` answers lookups over a snapshot; `admin`
//! and the `cli` show it. `config` is read once at the edge and `app` wires the components and
//! owns every long-lived task.

pub mod admin;
pub mod app;
pub mod bytes_cmp;
pub mod cli;
pub mod config;
pub mod discovery;
pub mod dns;
pub mod drain;
#[doc(hidden)]
pub mod fuzzing;
pub mod identity;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod policy;
pub mod proxy;
pub mod readiness;
pub mod redirect;
pub mod status;
pub mod store;
pub mod supervise;
pub mod systemd;
pub mod upstream;
