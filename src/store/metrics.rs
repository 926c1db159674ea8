//! Store and source metrics: commit counters, and per-source state read from the current
//! snapshot at scrape time.

use std::path::PathBuf;
use std::time::SystemTime;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use super::{LinkState, Snapshots};
use crate::model::Kind;

/// Counters the writer updates.
#[derive(Debug, Clone, Default)]
pub struct StoreMetrics {
    pub commits: Counter,
    pub commit_errors: Counter,
}

impl StoreMetrics {
    /// Registers the counters and a collector that reports on the latest snapshot.
    pub fn register(&self, registry: &mut Registry, snapshots: Snapshots, store_path: PathBuf) {
        registry.register("meshkeep_store_commits", "Transactions committed to the store file", self.commits.clone());
        registry.register(
            "meshkeep_store_commit_errors",
            "Store commits that failed (retried at the next flush)",
            self.commit_errors.clone(),
        );
        registry.register_collector(Box::new(SnapshotCollector { snapshots, store_path }));
    }
}

#[derive(Debug)]
struct SnapshotCollector {
    snapshots: Snapshots,
    store_path: PathBuf,
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = self.snapshots.borrow().clone();
        let now = SystemTime::now();
        let gauge = |encoder: &mut DescriptorEncoder, name: &str, help: &str, value: f64| {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)
        };
        gauge(
            &mut encoder,
            "meshkeep_snapshot_generation",
            "Snapshots published by this process",
            snapshot.generation() as f64,
        )?;
        if let Some(age) = snapshot.age_seconds(now) {
            gauge(
                &mut encoder,
                "meshkeep_snapshot_age_seconds",
                "Seconds since the newest complete sync of any source",
                age as f64,
            )?;
        }
        let size = std::fs::metadata(&self.store_path).map_or(0, |m| m.len());
        gauge(&mut encoder, "meshkeep_store_size_bytes", "Size of the store file on disk", size as f64)?;

        let mut family = encoder.encode_descriptor(
            "meshkeep_source_connected",
            "1 when the source answered its last request, 0 when it failed or was not contacted yet",
            None,
            MetricType::Gauge,
        )?;
        for (source, view) in snapshot.sources() {
            let labels = [("source", source.to_string())];
            let connected = f64::from(u8::from(view.meta.state == LinkState::Connected));
            ConstGauge::new(connected).encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "meshkeep_source_last_contact_timestamp_seconds",
            "When the source last answered (Unix time)",
            None,
            MetricType::Gauge,
        )?;
        for (source, view) in snapshot.sources() {
            if let Some(at) = view.meta.last_contact {
                ConstGauge::new(at as f64).encode(family.encode_family(&[("source", source.to_string())])?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "meshkeep_source_objects",
            "Objects held per source and kind",
            None,
            MetricType::Gauge,
        )?;
        for (source, view) in snapshot.sources() {
            for kind in Kind::ALL {
                let labels = [("source", source.to_string()), ("kind", kind.as_str().to_owned())];
                ConstGauge::new(view.count(kind) as f64).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "meshkeep_source_kind_known",
            "1 when a kind has been fully listed (or is not served), 0 while it is unknown",
            None,
            MetricType::Gauge,
        )?;
        for (source, view) in snapshot.sources() {
            for kind in Kind::ALL {
                let labels = [("source", source.to_string()), ("kind", kind.as_str().to_owned())];
                ConstGauge::new(f64::from(u8::from(view.is_known(kind)))).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
