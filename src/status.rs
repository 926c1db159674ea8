//! The status report: what `/status` serves and `meshkeep cache show` prints. No I/O.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::identity::fmt_time;
use crate::identity::manager::IdentityStatus;
use crate::model::Kind;
use crate::store::{Snapshot, unix_seconds};

/// Facts about the process that are not in the snapshot.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProcessInfo {
    pub node: String,
    pub zone: Option<String>,
    pub store_path: String,
    pub store_size_bytes: u64,
    /// Set when a damaged store was moved aside at startup.
    pub store_quarantined: Option<String>,
    pub ready: bool,
    pub pending: Vec<String>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub now: u64,
    #[serde(flatten)]
    pub process: ProcessInfo,
    pub snapshot: SnapshotStatus,
    pub sources: Vec<SourceStatus>,
    /// The identity manager's state, when the daemon runs one.
    pub identity: Option<IdentityStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotStatus {
    pub generation: u64,
    /// Seconds since the newest complete sync of any source.
    pub age_seconds: Option<u64>,
    pub objects: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceStatus {
    pub source: String,
    pub state: String,
    pub last_contact: Option<u64>,
    pub last_full_sync: Option<u64>,
    pub last_error: Option<String>,
    pub last_error_at: Option<u64>,
    pub imported_at: Option<u64>,
    /// Object counts of the kinds whose contents are known.
    pub objects: BTreeMap<String, usize>,
    /// Kinds never fully listed: their contents are unknown.
    pub unknown_kinds: Vec<String>,
    pub resource_versions: BTreeMap<String, String>,
}

/// Builds the report from a snapshot.
pub fn report(snapshot: &Snapshot, process: ProcessInfo, now: SystemTime) -> Status {
    let sources = snapshot
        .sources()
        .map(|(id, view)| SourceStatus {
            source: id.to_string(),
            state: view.meta.state.as_str().to_owned(),
            last_contact: view.meta.last_contact,
            last_full_sync: view.meta.last_full_sync,
            last_error: view.meta.last_error.clone(),
            last_error_at: view.meta.last_error_at,
            imported_at: view.meta.imported_at,
            objects: Kind::ALL
                .iter()
                .filter(|k| view.is_known(**k))
                .map(|k| (k.as_str().to_owned(), view.count(*k)))
                .collect(),
            unknown_kinds: Kind::ALL.iter().filter(|k| !view.is_known(**k)).map(|k| k.as_str().to_owned()).collect(),
            resource_versions: view
                .meta
                .resource_versions
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), v.clone()))
                .collect(),
        })
        .collect();
    Status {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        now: unix_seconds(now),
        process,
        snapshot: SnapshotStatus {
            generation: snapshot.generation(),
            age_seconds: snapshot.age_seconds(now),
            objects: snapshot.object_count(),
        },
        sources,
        identity: None,
    }
}

/// Renders a report for a terminal.
pub fn render(status: &Status) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let ago = |t: Option<u64>| match t {
        Some(t) => format!("{}s ago", status.now.saturating_sub(t)),
        None => "never".to_owned(),
    };
    let _ = writeln!(
        out,
        "node        {}{}",
        status.process.node,
        status.process.zone.as_ref().map(|z| format!(" (zone {z})")).unwrap_or_default()
    );
    let _ = writeln!(out, "store       {} ({} bytes)", status.process.store_path, status.process.store_size_bytes);
    if let Some(q) = &status.process.store_quarantined {
        let _ = writeln!(out, "WARNING     a damaged store was moved aside: {q}");
    }
    let _ = writeln!(
        out,
        "snapshot    {} objects, last complete sync {}",
        status.snapshot.objects,
        status.snapshot.age_seconds.map_or("never".to_owned(), |a| format!("{a}s ago"))
    );
    let _ = writeln!(out);
    let _ =
        writeln!(out, "{:<20} {:<13} {:<14} {:<14} {:>8}  ERROR", "SOURCE", "STATE", "CONTACT", "FULL SYNC", "OBJECTS");
    for source in &status.sources {
        let objects: usize = source.objects.values().sum();
        let _ = writeln!(
            out,
            "{:<20} {:<13} {:<14} {:<14} {:>8}  {}",
            source.source,
            source.state,
            ago(source.last_contact),
            ago(source.last_full_sync),
            objects,
            source.last_error.as_deref().unwrap_or("-")
        );
        if !source.unknown_kinds.is_empty() {
            let _ = writeln!(out, "{:<20} unknown (never listed): {}", "", source.unknown_kinds.join(", "));
        }
    }
    if status.sources.is_empty() {
        let _ = writeln!(out, "(no sources: configure [upstream.links] or a manifest folder)");
    }
    if let Some(identity) = &status.identity {
        let _ = writeln!(out);
        let at = |t: u64| fmt_time(std::time::UNIX_EPOCH + std::time::Duration::from_secs(t));
        match (&identity.issuer_origin, identity.issuer_not_after) {
            (Some(origin), Some(not_after)) => {
                let warning = if identity.issuer_expiring_soon { "  EXPIRES SOON" } else { "" };
                let _ = writeln!(out, "issuer      {:?}, expires {}{warning}", origin, at(not_after));
            }
            _ => {
                let _ = writeln!(out, "issuer      none");
            }
        }
        if !identity.clock_ok {
            let _ = writeln!(
                out,
                "WARNING     clock is behind {}: nothing is issued until it is set",
                at(identity.time_floor)
            );
        }
        for cert in &identity.certificates {
            let _ = writeln!(
                out,
                "certificate {}  expires {}  renews {}",
                cert.identity,
                at(cert.not_after),
                at(cert.renew_at)
            );
        }
        if let Some(error) = &identity.last_error {
            let _ = writeln!(out, "identity    last error: {error}");
        }
    }
    out
}
