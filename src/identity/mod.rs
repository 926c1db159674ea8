//! Identity: the local CA that keeps issuing and rotating workload certificates from the cached
//! issuer, with or without the upstream.
//!
//! Architecture Invariant: a valid certificate is never thrown away because renewal failed, and
//! nothing is issued while the clock is behind the persisted time floor.

pub mod ca;
pub mod clock;
pub mod files;
pub mod manager;
pub mod socket;
pub mod tls;

use std::fmt;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// A workload identity: a service account in a namespace, within a trust domain.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct IdentityName {
    pub namespace: String,
    pub service_account: String,
    pub trust_domain: String,
    pub control_plane_namespace: String,
}

impl IdentityName {
    pub fn new(namespace: &str, service_account: &str, trust_domain: &str, control_plane_namespace: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            trust_domain: trust_domain.to_owned(),
            control_plane_namespace: control_plane_namespace.to_owned(),
        }
    }

    /// Linkerd's identity name, the DNS SAN and the TLS server name peers ask for.
    pub fn dns_name(&self) -> String {
        format!(
            "{}.{}.serviceaccount.identity.{}.{}",
            self.service_account, self.namespace, self.control_plane_namespace, self.trust_domain
        )
    }

    /// The SPIFFE ID, the one URI SAN.
    pub fn spiffe_id(&self) -> String {
        format!("spiffe://{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

impl fmt::Display for IdentityName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.dns_name())
    }
}

/// An identity error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Certificates, keys or bundles that cannot be parsed or do not fit together.
    #[error("bad {what}: {reason}")]
    BadMaterial { what: &'static str, reason: String },
    /// The issuer's validity window does not include now.
    #[error("the issuer is not valid now (valid {} to {})", fmt_time(*not_before), fmt_time(*not_after))]
    IssuerNotValid { not_before: SystemTime, not_after: SystemTime },
    /// The clock is behind the time floor: issuing would produce certificates from the past.
    #[error("the clock ({}) is behind the last trusted time ({}); not issuing until it is set", fmt_time(*now), fmt_time(*floor))]
    ClockBehind { now: SystemTime, floor: SystemTime },
    /// No issuer is available (none configured, none synced, standalone disabled).
    #[error("no identity issuer is available")]
    NoIssuer,
    /// Key generation or signing failed.
    #[error("cryptography failed: {0}")]
    Crypto(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A cached file failed its checksum.
    #[error("{path}: checksum mismatch (damaged or partially written)")]
    Damaged { path: std::path::PathBuf },
}

/// RFC 3339 UTC for messages.
pub fn fmt_time(time: SystemTime) -> String {
    let secs = time.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| format!("@{secs}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_linkerd_and_spiffe_conventions() {
        let name = IdentityName::new("shop", "web", "cluster.local", "linkerd");
        assert_eq!(name.dns_name(), "web.shop.serviceaccount.identity.linkerd.cluster.local");
        assert_eq!(name.spiffe_id(), "spiffe://cluster.local/ns/shop/sa/web");
    }

    #[test]
    fn times_print_as_rfc3339() {
        assert_eq!(fmt_time(std::time::UNIX_EPOCH), "1970-01-01T00:00:00Z");
    }
}

/// Builds the manager's settings from the configuration.
pub fn settings(config: &crate::config::Config) -> manager::Settings {
    let identity = &config.identity;
    let name = |namespace: &str, service_account: &str| {
        IdentityName::new(namespace, service_account, &identity.trust_domain, &identity.control_plane_namespace)
    };
    let issuer_files = match (&identity.issuer_certificate, &identity.issuer_key, &identity.trust_anchors) {
        (Some(cert), Some(key), Some(anchors)) => Some((cert.clone(), key.clone(), anchors.clone())),
        _ => None,
    };
    manager::Settings {
        trust_domain: identity.trust_domain.clone(),
        control_plane_namespace: identity.control_plane_namespace.clone(),
        lifetime: identity.certificate_lifetime.get(),
        renew_fraction: identity.renew_fraction.get(),
        skew: identity.clock_skew.get(),
        issuer_files,
        standalone: identity.standalone,
        issuer_sources: config
            .upstream
            .links
            .keys()
            .map(|name| crate::model::SourceId::Link(name.to_string()))
            .collect(),
        standalone_lifetime: identity.standalone_lifetime.get(),
        proxy: Some(name(&identity.proxy.namespace, &identity.proxy.service_account)),
        workloads: identity
            .workloads
            .values()
            .map(|w| manager::Workload {
                uid: w.uid,
                name: name(&w.namespace, &w.service_account),
                directory: w.directory.clone(),
            })
            .collect(),
        issuer_expiry_warning: identity.issuer_expiry_warning.get(),
    }
}

/// Drives the manager: follows the issuer in the snapshot, renews what is due, and publishes
/// its status and the proxy's certificate. Key generation and signing run off the async workers.
pub async fn run<C: clock::Clock>(
    manager: std::sync::Arc<std::sync::Mutex<manager::Manager<C>>>,
    mut snapshots: crate::store::Snapshots,
    status: tokio::sync::watch::Sender<manager::IdentityStatus>,
    proxy_certificate: tokio::sync::watch::Sender<Option<ca::Leaf>>,
    drain: crate::drain::Watch,
) {
    let mut snapshots_open = true;
    loop {
        let snapshot = snapshots.borrow_and_update().clone();
        let shared = std::sync::Arc::clone(&manager);
        let step = tokio::task::spawn_blocking(move || {
            let mut manager = lock(&shared);
            manager.select_issuer(&snapshot);
            let next = manager.tick();
            (next, manager.status(), manager.proxy_certificate().cloned())
        })
        .await;
        let next = match step {
            Ok((next, report, leaf)) => {
                status.send_replace(report);
                proxy_certificate.send_if_modified(|current| {
                    let changed = current.as_ref().map(|c| &c.chain) != leaf.as_ref().map(|l| &l.chain);
                    if changed {
                        *current = leaf;
                    }
                    changed
                });
                next
            }
            Err(e) => {
                tracing::error!(error = %e, "identity step failed");
                SystemTime::now() + std::time::Duration::from_secs(10)
            }
        };
        let wait = next.duration_since(SystemTime::now()).unwrap_or_default().min(RECHECK);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            changed = snapshots.changed(), if snapshots_open => snapshots_open = changed.is_ok(),
            _ = drain.signaled() => break,
        }
    }
    let shared = std::sync::Arc::clone(&manager);
    let _ = tokio::task::spawn_blocking(move || lock(&shared).persist_floor()).await;
}

/// The longest the identity loop sleeps: a wall-clock step (NTP setting a clock that booted at
/// 1970, a jump forward or back) is noticed within this, since timers run on the monotonic clock.
const RECHECK: std::time::Duration = std::time::Duration::from_secs(10);

/// Identity metrics, read from the published status at scrape time.
#[derive(Debug)]
pub struct StatusCollector(pub tokio::sync::watch::Receiver<manager::IdentityStatus>);

impl prometheus_client::collector::Collector for StatusCollector {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::MetricType;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        let status = self.0.borrow().clone();
        if let Some(proxy) = status.certificates.iter().find(|c| c.proxy) {
            let gauge = ConstGauge::new(proxy.not_after as f64);
            gauge.encode(encoder.encode_descriptor(
                "identity_cert_expiration_timestamp_seconds",
                "Time when the proxy's current certificate expires (Unix time)",
                None,
                gauge.metric_type(),
            )?)?;
        }
        let mut family = encoder.encode_descriptor(
            "meshkeep_identity_certificate_expiration_timestamp_seconds",
            "Time when each managed certificate expires (Unix time)",
            None,
            MetricType::Gauge,
        )?;
        for cert in &status.certificates {
            ConstGauge::new(cert.not_after as f64)
                .encode(family.encode_family(&[("identity", cert.identity.clone())])?)?;
        }
        if let Some(not_after) = status.issuer_not_after {
            let gauge = ConstGauge::new(not_after as f64);
            gauge.encode(encoder.encode_descriptor(
                "meshkeep_identity_issuer_expiration_timestamp_seconds",
                "Time when the identity issuer expires (Unix time)",
                None,
                gauge.metric_type(),
            )?)?;
        }
        let gauge = ConstGauge::new(i64::from(status.issuer_expiring_soon));
        gauge.encode(encoder.encode_descriptor(
            "meshkeep_identity_issuer_expiring_soon",
            "1 when the issuer expires within identity.issuer_expiry_warning",
            None,
            gauge.metric_type(),
        )?)?;
        let gauge = ConstGauge::new(i64::from(status.clock_ok));
        gauge.encode(encoder.encode_descriptor(
            "meshkeep_identity_clock_ok",
            "0 while the clock is behind the time floor and nothing is issued",
            None,
            gauge.metric_type(),
        )?)?;
        let counter = ConstCounter::new(status.issued_total);
        counter.encode(encoder.encode_descriptor(
            "meshkeep_identity_certificates_issued",
            "Certificates issued by this process",
            None,
            counter.metric_type(),
        )?)?;
        let counter = ConstCounter::new(status.renewal_failures_total);
        counter.encode(encoder.encode_descriptor(
            "meshkeep_identity_renewal_failures",
            "Renewals that failed (the current certificate stays in use while valid)",
            None,
            counter.metric_type(),
        )?)?;
        Ok(())
    }
}

/// Locks the manager. Every mutation completes before the lock is released, so a lock poisoned
/// by a panic elsewhere still guards consistent state.
pub fn lock<C: clock::Clock>(
    manager: &std::sync::Mutex<manager::Manager<C>>,
) -> std::sync::MutexGuard<'_, manager::Manager<C>> {
    manager.lock().unwrap_or_else(|e| e.into_inner())
}
