//! The immutable view every reader gets: each source's objects by kind, and its sync state.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::index::{LazyIndex, SourceIndex};
use crate::model::{Kind, Object, ObjectRef, SourceId};

/// One kind's objects in one source.
pub type Objects = BTreeMap<ObjectRef, Object>;

/// Everything known, at one moment. Cheap to clone (an `Arc` per source and per kind).
///
/// Architecture Invariant: a kind that has never completed a full list in a source is absent
/// from that source's view: "unknown", which readers must not treat as "empty".
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub(super) sources: BTreeMap<SourceId, Arc<SourceView>>,
    /// Increases by one with each published snapshot of this process.
    pub(super) generation: u64,
}

/// One source's objects and sync state.
#[derive(Debug, Clone, Default)]
pub struct SourceView {
    kinds: BTreeMap<Kind, Arc<Objects>>,
    pub meta: SyncMeta,
    /// Built from `kinds` when first asked for; a change to a kind it covers (through
    /// `kind_mut`) drops it.
    index: LazyIndex,
}

/// What is known about a source's synchronisation. Persisted with its objects.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SyncMeta {
    /// Kinds with a complete list stored. The others are unknown.
    pub synced_kinds: BTreeSet<Kind>,
    /// Kinds the upstream does not serve (CRD not installed): known to be empty.
    pub absent_kinds: BTreeSet<Kind>,
    /// The newest resourceVersion seen per kind.
    pub resource_versions: BTreeMap<Kind, String>,
    /// When every kind last completed a full list (Unix seconds).
    pub last_full_sync: Option<u64>,
    /// When the upstream last answered (Unix seconds).
    pub last_contact: Option<u64>,
    pub state: LinkState,
    pub last_error: Option<String>,
    /// When the last error happened (Unix seconds).
    pub last_error_at: Option<u64>,
    /// Set when this source's data came from `meshkeep cache import` and has not been
    /// refreshed from the source since.
    pub imported_at: Option<u64>,
}

/// Whether a source is reachable right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkState {
    /// Never contacted by this process (at boot: serving from the store).
    #[default]
    Unknown,
    Connected,
    Disconnected,
}

impl LinkState {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Unknown => "unknown",
            LinkState::Connected => "connected",
            LinkState::Disconnected => "disconnected",
        }
    }
}

impl Snapshot {
    /// A snapshot assembled from views (tests, benchmarks and `cache import`).
    pub fn from_sources(sources: impl IntoIterator<Item = (SourceId, SourceView)>) -> Self {
        Self { sources: sources.into_iter().map(|(id, view)| (id, Arc::new(view))).collect(), generation: 0 }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn sources(&self) -> impl Iterator<Item = (&SourceId, &SourceView)> {
        self.sources.iter().map(|(id, view)| (id, view.as_ref()))
    }

    pub fn source(&self, id: &SourceId) -> Option<&SourceView> {
        self.sources.get(id).map(Arc::as_ref)
    }

    /// Objects of one kind from one source; `None` when unknown.
    pub fn objects(&self, source: &SourceId, kind: Kind) -> Option<&Objects> {
        self.source(source)?.objects(kind)
    }

    /// The total number of stored objects.
    pub fn object_count(&self) -> usize {
        self.sources.values().map(|s| s.object_count()).sum()
    }

    /// Seconds since the newest complete sync of any source, if one ever happened.
    pub fn age_seconds(&self, now: SystemTime) -> Option<u64> {
        let newest = self.sources.values().filter_map(|s| s.meta.last_full_sync).max()?;
        Some(unix_seconds(now).saturating_sub(newest))
    }
}

impl SourceView {
    /// A view with no objects yet.
    pub(super) fn with_meta(meta: SyncMeta) -> Self {
        Self { meta, ..Self::default() }
    }

    /// Sets a kind's complete contents and marks it listed.
    pub fn set_kind(&mut self, kind: Kind, objects: impl IntoIterator<Item = Object>) {
        let objects: Objects = objects.into_iter().map(|o| (o.object_ref().clone(), o)).collect();
        self.kind_mut(kind).insert(kind, Arc::new(objects));
        self.meta.synced_kinds.insert(kind);
    }

    /// The objects by kind, stored or not yet synced alike (`objects` answers only known kinds).
    pub(super) fn kinds(&self) -> &BTreeMap<Kind, Arc<Objects>> {
        &self.kinds
    }

    /// The objects by kind, to change those of `kind` (and only those): when the index covers
    /// `kind` it is dropped, and built again when next asked for.
    pub(super) fn kind_mut(&mut self, kind: Kind) -> &mut BTreeMap<Kind, Arc<Objects>> {
        if SourceIndex::covers(kind) {
            self.index = LazyIndex::default();
        }
        &mut self.kinds
    }

    #[cfg(test)]
    pub(super) fn index_is_built(&self) -> bool {
        self.index.is_built()
    }

    /// Lookups over the stored objects (built on first use, then kept until they change).
    pub fn index(&self) -> &SourceIndex {
        self.index.get_or_build(self)
    }

    /// Objects of one kind; `None` when the kind has never been fully listed.
    pub fn objects(&self, kind: Kind) -> Option<&Objects> {
        if !self.is_known(kind) {
            return None;
        }
        static EMPTY: Objects = BTreeMap::new();
        Some(self.kinds.get(&kind).map_or(&EMPTY, |objects| objects.as_ref()))
    }

    /// Whether a kind's contents are known (listed, or not served upstream).
    pub fn is_known(&self, kind: Kind) -> bool {
        self.meta.synced_kinds.contains(&kind) || self.meta.absent_kinds.contains(&kind)
    }

    pub fn object_count(&self) -> usize {
        self.kinds.values().map(|k| k.len()).sum()
    }

    pub fn count(&self, kind: Kind) -> usize {
        self.kinds.get(&kind).map_or(0, |k| k.len())
    }
}

/// Seconds since the Unix epoch (0 for a clock before 1970).
pub fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
