//! The crash-safe local store: the single writer that applies source updates, publishes
//! immutable snapshots to readers, and commits batches to the store file.
//!
//! Architecture Invariant: readers never wait for disk or upstream. Updates are applied in
//! memory and published at once; the file is written in batches, at most once per
//! `store.flush_interval`, each batch one transaction, so a crash leaves the last committed
//! batch: every relist in it complete, none half-applied.

pub mod export;
mod file;
mod index;
mod legacy;
pub mod metrics;
mod snapshot;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};

pub use file::{Quarantined, SCHEMA_VERSION};
pub use index::SourceIndex;
pub use snapshot::{LinkState, Objects, Snapshot, SourceView, SyncMeta, unix_seconds};

use crate::drain;
use crate::model::{Kind, Object, ObjectRef, SourceId};
use file::{Op, StoreFile};

/// The store file's name inside the state directory.
pub const FILE_NAME: &str = "store.redb";

/// A store error. Corruption is handled (quarantined) by [`open`]; callers see the rest.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file is not a readable store. `open` moves it aside and starts empty.
    #[error("{path}: store is damaged: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    /// The file was written by a newer meshkeep; refusing rather than guessing.
    #[error(
        "{path}: store schema version {found} is newer than this meshkeep supports ({supported}); upgrade meshkeep or move the file away"
    )]
    NewerSchema { path: PathBuf, found: u32, supported: u32 },
    /// There is no store file yet.
    #[error("{path}: no store yet (the daemon has not run with this state directory)")]
    Missing { path: PathBuf },
    /// Another process (usually the running daemon) holds the store.
    #[error("{path}: store is in use by another process (is the meshkeep daemon running?)")]
    Locked { path: PathBuf },
    /// The file or its directory cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A transaction could not be committed (disk full, I/O error). Retryable.
    #[error("{path}: cannot write store: {reason}")]
    Write { path: PathBuf, reason: String },
    /// An object could not be encoded (a bug, not bad input).
    #[error("cannot encode object: {reason}")]
    Encode { reason: String },
}

/// A change reported by a source.
#[derive(Debug)]
pub enum Update {
    /// A complete list of one kind (a relist), replacing everything the source had of it, or
    /// only what it had in `namespace` when the source watches namespaces separately.
    /// `complete` says whether every namespace of the kind has now been listed.
    Replace {
        source: SourceId,
        kind: Kind,
        namespace: Option<String>,
        objects: Vec<Object>,
        resource_version: Option<String>,
        complete: bool,
    },
    /// An object was added or changed.
    Apply { source: SourceId, object: Object, resource_version: Option<String> },
    /// An object was deleted.
    Delete { source: SourceId, kind: Kind, key: ObjectRef, resource_version: Option<String> },
    /// The upstream does not serve this kind (its CRD is not installed): known to be empty.
    Absent { source: SourceId, kind: Kind },
    /// The upstream answered.
    Contact { source: SourceId },
    /// The upstream failed; the source keeps its data.
    Failed { source: SourceId, message: String },
    /// Something was wrong but the source still works (a malformed manifest, an invalid
    /// object skipped): recorded as the last error without marking the source down.
    Warning { source: SourceId, message: String },
    /// The source is no longer configured: drop its data.
    Forget { source: SourceId },
}

impl Update {
    fn source(&self) -> &SourceId {
        match self {
            Update::Replace { source, .. }
            | Update::Apply { source, .. }
            | Update::Delete { source, .. }
            | Update::Absent { source, .. }
            | Update::Contact { source }
            | Update::Failed { source, .. }
            | Update::Warning { source, .. }
            | Update::Forget { source } => source,
        }
    }
}

/// Where sources send updates.
#[derive(Debug, Clone)]
pub struct Updates(mpsc::Sender<Update>);

impl Updates {
    /// Sends an update, waiting if the writer is behind. Fails only once the writer stopped.
    pub async fn send(&self, update: Update) -> Result<(), Stopped> {
        self.0.send(update).await.map_err(|_| Stopped)
    }
}

/// The writer has stopped (the process is shutting down).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the store writer has stopped")]
pub struct Stopped;

/// The latest snapshot, for readers.
pub type Snapshots = watch::Receiver<Arc<Snapshot>>;

/// An opened store, ready to run.
#[derive(Debug)]
pub struct Opened {
    pub writer: Writer,
    pub updates: Updates,
    pub snapshots: Snapshots,
    pub quarantined: Option<Quarantined>,
}

/// Opens the store in `state_dir` and loads the last committed snapshot.
pub fn open(state_dir: &Path, flush_interval: Duration) -> Result<Opened, Error> {
    let opened = StoreFile::open(&state_dir.join(FILE_NAME))?;
    let sources: BTreeMap<SourceId, Arc<SourceView>> = opened
        .sources
        .into_iter()
        .map(|(id, mut view)| {
            // What the previous process saw of the links is history: this one has not
            // contacted them yet.
            view.meta.state = LinkState::Unknown;
            (id, Arc::new(view))
        })
        .collect();
    let snapshot = Arc::new(Snapshot { sources: sources.clone(), generation: 1 });
    let (publish, snapshots) = watch::channel(snapshot);
    let (tx, rx) = mpsc::channel(1024);
    let writer = Writer {
        file: opened.file,
        sources,
        rx,
        publish,
        flush_interval,
        generation: 1,
        dirty: Dirty::default(),
        commit_errors: 0,
        contact_written: BTreeMap::new(),
        metrics: metrics::StoreMetrics::default(),
    };
    Ok(Opened { writer, updates: Updates(tx), snapshots, quarantined: opened.quarantined })
}

/// Reads a store file without running a writer (CLI use while the daemon is stopped).
pub fn read(state_dir: &Path) -> Result<(Snapshot, PathBuf, u64), Error> {
    let path = state_dir.join(FILE_NAME);
    if !path.exists() {
        return Err(Error::Missing { path });
    }
    let opened = StoreFile::open(&path)?;
    if let Some(q) = &opened.quarantined {
        tracing::warn!(moved_to = %q.moved_to.display(), reason = %q.reason, "store was damaged and has been moved aside");
    }
    let size = opened.file.size_on_disk();
    let sources = opened.sources.into_iter().map(|(id, view)| (id, Arc::new(view))).collect();
    Ok((Snapshot { sources, generation: 0 }, path, size))
}

/// Replaces the given sources in a store file (CLI `cache import`; the daemon must be stopped).
pub fn import(state_dir: &Path, sources: BTreeMap<SourceId, (SyncMeta, BTreeMap<Kind, Objects>)>) -> Result<(), Error> {
    let opened = StoreFile::open(&state_dir.join(FILE_NAME))?;
    let mut ops = Vec::new();
    for (source, (meta, kinds)) in sources {
        ops.push(Op::ForgetSource { source: source.clone() });
        for (kind, objects) in kinds {
            ops.push(Op::ReplaceKind { source: source.clone(), kind, objects: Arc::new(objects) });
        }
        ops.push(Op::Meta { source, meta });
    }
    opened.file.commit(&ops)
}

/// How stale the stored time of a source's last contact may be.
const CONTACT_DURABLE: Duration = Duration::from_secs(60);

/// What changed since the last commit.
#[derive(Debug, Default)]
struct Dirty {
    replaced: BTreeSet<(SourceId, Kind)>,
    touched: BTreeMap<(SourceId, Kind), BTreeSet<ObjectRef>>,
    meta: BTreeSet<SourceId>,
    forgotten: BTreeSet<SourceId>,
}

impl Dirty {
    fn is_empty(&self) -> bool {
        self.replaced.is_empty() && self.touched.is_empty() && self.meta.is_empty() && self.forgotten.is_empty()
    }
}

/// The single writer. Owns the in-memory state and the file.
pub struct Writer {
    file: StoreFile,
    sources: BTreeMap<SourceId, Arc<SourceView>>,
    rx: mpsc::Receiver<Update>,
    publish: watch::Sender<Arc<Snapshot>>,
    flush_interval: Duration,
    generation: u64,
    dirty: Dirty,
    commit_errors: u64,
    /// When each source's contact time was last marked to be made durable.
    contact_written: BTreeMap<SourceId, std::time::Instant>,
    metrics: metrics::StoreMetrics,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").field("file", &self.file).field("generation", &self.generation).finish()
    }
}

impl Writer {
    /// The store file's path.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// The writer's counters, for registration.
    pub fn metrics(&self) -> &metrics::StoreMetrics {
        &self.metrics
    }

    /// Applies updates until the drain starts (or, with no drain, until every sender is gone),
    /// then commits what is pending.
    pub async fn run(mut self, drain: drain::Watch) {
        let mut flush = tokio::time::interval(self.flush_interval);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // With no sources left (or none configured) the writer still serves until the drain.
        let mut open = true;
        loop {
            tokio::select! {
                update = self.rx.recv(), if open => {
                    let Some(update) = update else {
                        open = false;
                        continue;
                    };
                    self.apply(update);
                    // Take everything already queued, then publish once.
                    while let Ok(update) = self.rx.try_recv() {
                        self.apply(update);
                    }
                    self.publish();
                }
                _ = flush.tick() => self.commit().await,
                _ = drain.signaled() => {
                    // Keep what the sources already reported.
                    while let Ok(update) = self.rx.try_recv() {
                        self.apply(update);
                    }
                    self.publish();
                    break;
                }
            }
        }
        self.commit().await;
        tracing::debug!("store writer stopped");
    }

    fn view_mut(&mut self, source: &SourceId) -> &mut SourceView {
        Arc::make_mut(self.sources.entry(source.clone()).or_default())
    }

    fn apply(&mut self, update: Update) {
        let now = unix_seconds(SystemTime::now());
        let source = update.source().clone();
        if !matches!(update, Update::Forget { .. } | Update::Contact { .. }) {
            self.dirty.meta.insert(source.clone());
        }
        match update {
            Update::Replace { kind, namespace, objects, resource_version, complete, .. } => {
                let listed = objects.len();
                let view = self.view_mut(&source);
                let fresh = objects.into_iter().map(|o| (o.object_ref().clone(), o));
                match &namespace {
                    // A new map, not the old one cleared: the published snapshot's copy is not
                    // cloned first, and a map built from a sequence packs its nodes full (one
                    // filled by inserts in order leaves them about half empty).
                    None => {
                        view.kind_mut(kind).insert(kind, Arc::new(fresh.collect()));
                    }
                    Some(ns) => {
                        let current = Arc::make_mut(view.kind_mut(kind).entry(kind).or_default());
                        current.retain(|key, _| key.namespace != ns);
                        current.extend(fresh);
                    }
                }
                tracing::debug!(%source, %kind, namespace = namespace.as_deref().unwrap_or("*"), objects = listed, "relist complete");
                if complete {
                    view.meta.synced_kinds.insert(kind);
                }
                view.meta.absent_kinds.remove(&kind);
                set_resource_version(&mut view.meta, kind, resource_version);
                view.meta.last_contact = Some(now);
                if Kind::ALL.iter().all(|k| view.is_known(*k)) {
                    view.meta.last_full_sync = Some(now);
                    view.meta.imported_at = None;
                }
                self.dirty.touched.remove(&(source.clone(), kind));
                self.dirty.replaced.insert((source, kind));
            }
            Update::Apply { object, resource_version, .. } => {
                let kind = object.kind();
                let key = object.object_ref().clone();
                let view = self.view_mut(&source);
                Arc::make_mut(view.kind_mut(kind).entry(kind).or_default()).insert(key.clone(), object);
                set_resource_version(&mut view.meta, kind, resource_version);
                view.meta.last_contact = Some(now);
                self.touch(source, kind, key);
            }
            Update::Delete { kind, key, resource_version, .. } => {
                let view = self.view_mut(&source);
                if let Some(objects) = view.kind_mut(kind).get_mut(&kind) {
                    Arc::make_mut(objects).remove(&key);
                }
                set_resource_version(&mut view.meta, kind, resource_version);
                view.meta.last_contact = Some(now);
                self.touch(source, kind, key);
            }
            Update::Absent { kind, .. } => {
                let view = self.view_mut(&source);
                view.kind_mut(kind).remove(&kind);
                view.meta.synced_kinds.remove(&kind);
                view.meta.absent_kinds.insert(kind);
                view.meta.resource_versions.remove(&kind);
                self.dirty.touched.remove(&(source.clone(), kind));
                self.dirty.replaced.insert((source, kind));
            }
            Update::Contact { .. } => {
                let view = self.view_mut(&source);
                view.meta.last_contact = Some(now);
                let newly_connected = view.meta.state != LinkState::Connected;
                if newly_connected {
                    tracing::info!(%source, "source connected");
                }
                view.meta.state = LinkState::Connected;
                // Sources report contact every few seconds (the manifest folder at each poll).
                // Writing each one would sync the disk that often on a box that is otherwise
                // idle (flash wear); the time is made durable once a minute (by the monotonic
                // clock: wall-clock steps are expected here), a change of state at once.
                let written = self.contact_written.get(&source);
                if newly_connected || written.is_none_or(|t| t.elapsed() >= CONTACT_DURABLE) {
                    self.contact_written.insert(source.clone(), std::time::Instant::now());
                    self.dirty.meta.insert(source);
                }
            }
            Update::Failed { message, .. } => {
                let view = self.view_mut(&source);
                if view.meta.state != LinkState::Disconnected {
                    tracing::warn!(%source, error = %message, "source unreachable; serving its last stored data");
                }
                view.meta.state = LinkState::Disconnected;
                view.meta.last_error = Some(message);
                view.meta.last_error_at = Some(now);
            }
            Update::Warning { message, .. } => {
                let view = self.view_mut(&source);
                view.meta.last_error = Some(message);
                view.meta.last_error_at = Some(now);
            }
            Update::Forget { .. } => {
                self.contact_written.remove(&source);
                if self.sources.remove(&source).is_some() {
                    tracing::info!(%source, "source no longer configured; its data is dropped");
                }
                self.dirty.replaced.retain(|(s, _)| s != &source);
                self.dirty.touched.retain(|(s, _), _| s != &source);
                self.dirty.meta.remove(&source);
                self.dirty.forgotten.insert(source);
            }
        }
    }

    fn touch(&mut self, source: SourceId, kind: Kind, key: ObjectRef) {
        if !self.dirty.replaced.contains(&(source.clone(), kind)) {
            self.dirty.touched.entry((source, kind)).or_default().insert(key);
        }
    }

    fn publish(&mut self) {
        self.generation += 1;
        let snapshot = Snapshot { sources: self.sources.clone(), generation: self.generation };
        self.publish.send_replace(Arc::new(snapshot));
    }

    /// Writes everything dirty in one transaction. On failure the changes stay dirty and are
    /// retried at the next tick; serving continues from memory.
    async fn commit(&mut self) {
        if self.dirty.is_empty() {
            return;
        }
        let dirty = std::mem::take(&mut self.dirty);
        let ops = self.ops(&dirty);
        let file = self.file.clone();
        let started = std::time::Instant::now();
        let relisted = !dirty.replaced.is_empty();
        let result = tokio::task::spawn_blocking(move || {
            let result = file.commit(&ops);
            drop(ops);
            if relisted {
                // The commit's buffers were allocated on this thread and are garbage now; the
                // collection also purges what the allocator set aside process-wide (such as
                // pages emptied by the relist's old objects). Here it never stalls the runtime.
                crate::memory::release_free();
            }
            result
        })
        .await;
        match result {
            Ok(Ok(())) => {
                tracing::debug!(elapsed_ms = started.elapsed().as_millis() as u64, "store committed");
                self.metrics.commits.inc();
            }
            Ok(Err(e)) => {
                self.commit_errors += 1;
                self.metrics.commit_errors.inc();
                tracing::error!(error = %e, failures = self.commit_errors, "store commit failed; will retry");
                self.restore_dirty(dirty);
            }
            Err(e) => {
                self.metrics.commit_errors.inc();
                tracing::error!(error = %e, "store commit task failed; will retry");
                self.restore_dirty(dirty);
            }
        }
    }

    fn restore_dirty(&mut self, dirty: Dirty) {
        let Dirty { replaced, touched, meta, forgotten } = dirty;
        self.dirty.forgotten.extend(forgotten);
        self.dirty.meta.extend(meta);
        for key in replaced {
            self.dirty.touched.remove(&key);
            self.dirty.replaced.insert(key);
        }
        for ((source, kind), keys) in touched {
            for key in keys {
                self.touch(source.clone(), kind, key);
            }
        }
    }

    /// The operations that bring the file to the current in-memory state for what is dirty.
    fn ops(&self, dirty: &Dirty) -> Vec<Op> {
        let mut ops = Vec::new();
        for source in &dirty.forgotten {
            ops.push(Op::ForgetSource { source: source.clone() });
        }
        for (source, kind) in &dirty.replaced {
            let objects = self.sources.get(source).and_then(|view| view.kinds().get(kind).cloned()).unwrap_or_default();
            ops.push(Op::ReplaceKind { source: source.clone(), kind: *kind, objects });
        }
        for ((source, kind), keys) in &dirty.touched {
            let current = self.sources.get(source).and_then(|view| view.kinds().get(kind));
            for key in keys {
                match current.and_then(|objects| objects.get(key)) {
                    Some(object) => ops.push(Op::Put { source: source.clone(), object: object.clone() }),
                    None => ops.push(Op::Delete { source: source.clone(), kind: *kind, key: key.clone() }),
                }
            }
        }
        for source in &dirty.meta {
            if let Some(view) = self.sources.get(source) {
                ops.push(Op::Meta { source: source.clone(), meta: view.meta.clone() });
            }
        }
        ops
    }
}

fn set_resource_version(meta: &mut SyncMeta, kind: Kind, resource_version: Option<String>) {
    if let Some(rv) = resource_version.filter(|rv| !rv.is_empty()) {
        meta.resource_versions.insert(kind, rv);
    }
}

#[cfg(test)]
mod tests;
