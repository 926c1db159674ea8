//! meshkeep: a service-mesh node for the edge that keeps serving while its upstream is gone.
//!
//! The modules follow the data flow: `config` is read once at the edge, `app` wires the
//! components and owns every long-lived task, and the serving components (`admin` today;
//! discovery, identity, proxy and DNS as they land) read only their own config section.

pub mod admin;
pub mod app;
pub mod cli;
pub mod config;
pub mod drain;
pub mod logging;
pub mod metrics;
pub mod readiness;
pub mod systemd;
