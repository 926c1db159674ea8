//! The store file: one redb database holding every source's objects and sync metadata.
//!
//! Layout: `meta` holds the schema version; `sources` maps a source id to its `SyncMeta`
//! (JSON, so fields can be added); `objects` maps `source \0 kind \0 namespace \0 name` to the
//! object (postcard). A relist replaces a (source, kind) key range inside one transaction.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::snapshot::{Objects, SourceView, SyncMeta};
use super::{Error, legacy};
use crate::model::{Kind, Object, ObjectRef, SourceId};

/// The schema this build writes; older ones are migrated when opened (see `legacy`).
pub const SCHEMA_VERSION: u32 = 2;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const SOURCES: TableDefinition<&str, &[u8]> = TableDefinition::new("sources");
const OBJECTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("objects");
const SCHEMA_KEY: &str = "schema_version";

/// An open store file.
#[derive(Clone)]
pub struct StoreFile {
    db: Arc<Database>,
    path: PathBuf,
}

impl std::fmt::Debug for StoreFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreFile").field("path", &self.path).finish()
    }
}

/// What opening found.
#[derive(Debug)]
pub struct Opened {
    pub file: StoreFile,
    pub sources: BTreeMap<SourceId, SourceView>,
    /// Where a corrupt file was moved, if it was.
    pub quarantined: Option<Quarantined>,
}

#[derive(Debug, Clone)]
pub struct Quarantined {
    pub moved_to: PathBuf,
    pub reason: String,
}

/// One change to the file, prepared by the writer and applied in one transaction.
#[derive(Debug)]
pub enum Op {
    /// Replace every object of a kind in a source.
    ReplaceKind {
        source: SourceId,
        kind: Kind,
        objects: Arc<Objects>,
    },
    Put {
        source: SourceId,
        object: Object,
    },
    Delete {
        source: SourceId,
        kind: Kind,
        key: ObjectRef,
    },
    Meta {
        source: SourceId,
        meta: SyncMeta,
    },
    ForgetSource {
        source: SourceId,
    },
}

impl StoreFile {
    /// Opens (or creates) the store. A file that cannot be read as a store is moved aside and
    /// a new one created; a file from a newer meshkeep is refused.
    pub fn open(path: &Path) -> Result<Opened, Error> {
        match Self::open_existing(path) {
            Ok((file, sources)) => Ok(Opened { file, sources, quarantined: None }),
            Err(Error::Corrupt { reason, .. }) => {
                let moved_to = quarantine(path)?;
                let (file, sources) = Self::open_existing(path)?;
                Ok(Opened { file, sources, quarantined: Some(Quarantined { moved_to, reason }) })
            }
            Err(e) => Err(e),
        }
    }

    fn open_existing(path: &Path) -> Result<(StoreFile, BTreeMap<SourceId, SourceView>), Error> {
        let corrupt = |reason: String| Error::Corrupt { path: path.to_owned(), reason };
        if !path.exists() {
            create(path)?;
        }
        let db = builder().open(path).map_err(|e| classify_open_error(path, e))?;
        let file = StoreFile { db: Arc::new(db), path: path.to_owned() };
        file.check_schema()?;
        let sources = file.load().map_err(|e| match e {
            Error::Corrupt { .. } => e,
            other => corrupt(other.to_string()),
        })?;
        Ok((file, sources))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn check_schema(&self) -> Result<(), Error> {
        let txn = self.db.begin_write().map_err(|e| self.corrupt(e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| self.corrupt(e))?;
            let found = match meta.get(SCHEMA_KEY).map_err(|e| self.corrupt(e))? {
                Some(value) => {
                    let bytes: [u8; 4] = value.value().try_into().map_err(|_| self.corrupt("bad schema_version"))?;
                    Some(u32::from_le_bytes(bytes))
                }
                None => None,
            };
            match found {
                None => {
                    meta.insert(SCHEMA_KEY, SCHEMA_VERSION.to_le_bytes().as_slice()).map_err(|e| self.corrupt(e))?;
                }
                Some(SCHEMA_VERSION) => {}
                Some(found) if found > SCHEMA_VERSION => {
                    return Err(Error::NewerSchema { path: self.path.clone(), found, supported: SCHEMA_VERSION });
                }
                Some(found @ 1) => {
                    // In the same transaction: a crash leaves the old schema whole.
                    self.migrate(&txn, found)?;
                    meta.insert(SCHEMA_KEY, SCHEMA_VERSION.to_le_bytes().as_slice()).map_err(|e| self.corrupt(e))?;
                    tracing::info!(path = %self.path.display(), from = found, to = SCHEMA_VERSION, "store migrated");
                }
                Some(found) => return Err(self.corrupt(format!("unknown old schema version {found}"))),
            }
            txn.open_table(SOURCES).map_err(|e| self.corrupt(e))?;
            txn.open_table(OBJECTS).map_err(|e| self.corrupt(e))?;
        }
        txn.commit().map_err(|e| self.corrupt(e))?;
        Ok(())
    }

    /// Rewrites every object written under schema `from` in the current encoding.
    fn migrate(&self, txn: &redb::WriteTransaction, from: u32) -> Result<(), Error> {
        let mut table = txn.open_table(OBJECTS).map_err(|e| self.corrupt(e))?;
        let mut rewritten = Vec::new();
        for entry in table.iter().map_err(|e| self.corrupt(e))? {
            let (key, value) = entry.map_err(|e| self.corrupt(e))?;
            let object = legacy::decode(from, value.value()).map_err(|e| {
                let what =
                    decode_key(key.value()).map_or_else(|| "an object".to_owned(), |(s, k, o)| format!("{s} {k} {o}"));
                self.corrupt(format!("{what} (schema {from}): {e}"))
            })?;
            rewritten.push((key.value().to_vec(), encode_object(&object)?));
        }
        for (key, value) in rewritten {
            table.insert(key.as_slice(), value.as_slice()).map_err(|e| self.corrupt(e))?;
        }
        Ok(())
    }

    fn corrupt(&self, reason: impl std::fmt::Display) -> Error {
        Error::Corrupt { path: self.path.clone(), reason: reason.to_string() }
    }

    /// Reads every source's metadata and objects.
    fn load(&self) -> Result<BTreeMap<SourceId, SourceView>, Error> {
        let txn = self.db.begin_read().map_err(|e| self.corrupt(e))?;
        let mut sources: BTreeMap<SourceId, SourceView> = BTreeMap::new();
        let table = txn.open_table(SOURCES).map_err(|e| self.corrupt(e))?;
        for entry in table.iter().map_err(|e| self.corrupt(e))? {
            let (key, value) = entry.map_err(|e| self.corrupt(e))?;
            let id: SourceId = key.value().parse().map_err(|e| self.corrupt(e))?;
            let meta: SyncMeta = serde_json::from_slice(value.value())
                .map_err(|e| self.corrupt(format!("sync metadata of {id}: {e}")))?;
            sources.insert(id, SourceView::with_meta(meta));
        }
        let table = txn.open_table(OBJECTS).map_err(|e| self.corrupt(e))?;
        // Gathered first and built in one go: a B-tree built from a sequence packs its nodes
        // full, one built by inserting keys in order leaves them about half empty.
        let mut kinds: BTreeMap<(SourceId, Kind), Vec<(ObjectRef, Object)>> = BTreeMap::new();
        for entry in table.iter().map_err(|e| self.corrupt(e))? {
            let (key, value) = entry.map_err(|e| self.corrupt(e))?;
            let (source, kind, object_ref) =
                decode_key(key.value()).ok_or_else(|| self.corrupt("malformed object key"))?;
            let object: Object = postcard::from_bytes(value.value())
                .map_err(|e| self.corrupt(format!("{source} {kind} {object_ref}: {e}")))?;
            if object.kind() != kind || object.object_ref() != &object_ref {
                return Err(self.corrupt(format!("{source} {kind} {object_ref}: key does not match the object")));
            }
            kinds.entry((source, kind)).or_default().push((object_ref, object));
        }
        for ((source, kind), objects) in kinds {
            let view = sources.entry(source).or_default();
            view.kind_mut(kind).insert(kind, Arc::new(objects.into_iter().collect::<Objects>()));
        }
        Ok(sources)
    }

    /// Applies operations in one durable transaction: all of them or none.
    pub fn commit(&self, ops: &[Op]) -> Result<(), Error> {
        let txn = self.db.begin_write().map_err(|e| self.write_error(e))?;
        {
            let mut objects = txn.open_table(OBJECTS).map_err(|e| self.write_error(e))?;
            let mut sources = txn.open_table(SOURCES).map_err(|e| self.write_error(e))?;
            for op in ops {
                match op {
                    Op::ReplaceKind { source, kind, objects: new } => {
                        let prefix = kind_prefix(source, *kind);
                        let end = prefix_end(&prefix);
                        let wanted: std::collections::BTreeSet<Vec<u8>> =
                            new.keys().map(|r| encode_key(source, *kind, r)).collect();
                        objects
                            .retain_in(prefix.as_slice()..end.as_slice(), |key, _| wanted.contains(key))
                            .map_err(|e| self.write_error(e))?;
                        for object in new.values() {
                            let key = encode_key(source, *kind, object.object_ref());
                            let value = encode_object(object)?;
                            let unchanged = objects
                                .get(key.as_slice())
                                .map_err(|e| self.write_error(e))?
                                .is_some_and(|v| v.value() == value.as_slice());
                            if !unchanged {
                                objects.insert(key.as_slice(), value.as_slice()).map_err(|e| self.write_error(e))?;
                            }
                        }
                    }
                    Op::Put { source, object } => {
                        let key = encode_key(source, object.kind(), object.object_ref());
                        objects
                            .insert(key.as_slice(), encode_object(object)?.as_slice())
                            .map_err(|e| self.write_error(e))?;
                    }
                    Op::Delete { source, kind, key } => {
                        objects.remove(encode_key(source, *kind, key).as_slice()).map_err(|e| self.write_error(e))?;
                    }
                    Op::Meta { source, meta } => {
                        let json = serde_json::to_vec(meta).map_err(|e| self.write_error(e))?;
                        sources
                            .insert(source.to_string().as_str(), json.as_slice())
                            .map_err(|e| self.write_error(e))?;
                    }
                    Op::ForgetSource { source } => {
                        let prefix = source_prefix(source);
                        let end = prefix_end(&prefix);
                        objects
                            .retain_in(prefix.as_slice()..end.as_slice(), |_, _| false)
                            .map_err(|e| self.write_error(e))?;
                        sources.remove(source.to_string().as_str()).map_err(|e| self.write_error(e))?;
                    }
                }
            }
        }
        txn.commit().map_err(|e| self.write_error(e))
    }

    fn write_error(&self, e: impl std::fmt::Display) -> Error {
        Error::Write { path: self.path.clone(), reason: e.to_string() }
    }

    /// Bytes the file takes on disk.
    pub fn size_on_disk(&self) -> u64 {
        std::fs::metadata(&self.path).map_or(0, |m| m.len())
    }
}

/// redb's page cache defaults to 1 GiB, which it fills while the store is loaded at boot. The
/// snapshot lives in memory anyway, so the cache only needs to serve commits; every page read
/// at boot stayed cached up to this size (2 MiB of idle memory with 1,000 services at 8 MiB).
/// Commits read what they change through the kernel's page cache: a 10,000-service relist
/// committed in about the same time with 128 KiB, 512 KiB and 8 MiB (BENCHMARKS.md).
const CACHE_BYTES: usize = 128 * 1024;

fn builder() -> redb::Builder {
    let mut builder = Database::builder();
    builder.set_cache_size(CACHE_BYTES);
    builder
}

/// Creates an empty store with its schema under a temporary name and renames it into place,
/// so a crash during creation never leaves a half-written store behind.
fn create(path: &Path) -> Result<(), Error> {
    let io = |source| Error::Io { path: path.to_owned(), source };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    // Created 0600: the store holds the identity issuer's private key.
    let file = OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(&tmp).map_err(io)?;
    let db = builder().create_file(file).map_err(|e| classify_open_error(&tmp, e))?;
    StoreFile { db: Arc::new(db), path: tmp.clone() }.check_schema()?;
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    }
    Ok(())
}

/// Opening errors: corruption is quarantined, anything else (permissions, another process
/// holding the file) is reported as it is.
fn classify_open_error(path: &Path, e: redb::DatabaseError) -> Error {
    match e {
        redb::DatabaseError::DatabaseAlreadyOpen => Error::Locked { path: path.to_owned() },
        redb::DatabaseError::Storage(redb::StorageError::Io(source))
            if source.kind() != std::io::ErrorKind::InvalidData =>
        {
            Error::Io { path: path.to_owned(), source }
        }
        other => Error::Corrupt { path: path.to_owned(), reason: other.to_string() },
    }
}

/// Moves a damaged store aside (`store.redb.corrupt-<unix seconds>`), keeping it for
/// inspection.
fn quarantine(path: &Path) -> Result<PathBuf, Error> {
    let stamp = super::snapshot::unix_seconds(std::time::SystemTime::now());
    let mut moved_to = path.as_os_str().to_owned();
    moved_to.push(format!(".corrupt-{stamp}"));
    let moved_to = PathBuf::from(moved_to);
    std::fs::rename(path, &moved_to).map_err(|source| Error::Io { path: path.to_owned(), source })?;
    Ok(moved_to)
}

fn encode_object(object: &Object) -> Result<Vec<u8>, Error> {
    postcard::to_allocvec(object).map_err(|e| Error::Encode { reason: e.to_string() })
}

fn source_prefix(source: &SourceId) -> Vec<u8> {
    let mut key = source.to_string().into_bytes();
    key.push(0);
    key
}

fn kind_prefix(source: &SourceId, kind: Kind) -> Vec<u8> {
    let mut key = source_prefix(source);
    key.extend_from_slice(kind.as_str().as_bytes());
    key.push(0);
    key
}

/// The smallest key greater than every key starting with `prefix` (prefixes end in 0).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

fn encode_key(source: &SourceId, kind: Kind, object: &ObjectRef) -> Vec<u8> {
    let mut key = kind_prefix(source, kind);
    key.extend_from_slice(object.namespace.as_bytes());
    key.push(0);
    key.extend_from_slice(object.name.as_bytes());
    key
}

fn decode_key(key: &[u8]) -> Option<(SourceId, Kind, ObjectRef)> {
    let text = std::str::from_utf8(key).ok()?;
    let mut parts = text.split('\0');
    let source = parts.next()?.parse().ok()?;
    let kind = Kind::parse(parts.next()?)?;
    let (namespace, name) = (parts.next()?, parts.next()?);
    parts.next().is_none().then_some((source, kind, ObjectRef::new(namespace, name)))
}

/// Rewrites the schema version of a closed store file (tests of the refusal path).
#[cfg(test)]
pub(super) fn set_schema_version(path: &Path, version: u32) {
    let db = Database::builder().open(path).expect("open store");
    let txn = db.begin_write().expect("write");
    txn.open_table(META).expect("meta").insert(SCHEMA_KEY, version.to_le_bytes().as_slice()).expect("insert");
    txn.commit().expect("commit");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_sort_by_source_then_kind() {
        let source = SourceId::Link("east".into());
        let key = encode_key(&source, Kind::Service, &ObjectRef::new("shop", "api"));
        assert_eq!(decode_key(&key), Some((source.clone(), Kind::Service, ObjectRef::new("shop", "api"))));
        let prefix = kind_prefix(&source, Kind::Service);
        assert!(key.starts_with(&prefix) && key.as_slice() < prefix_end(&prefix).as_slice());
        assert!(decode_key(b"local\0Nope\0a\0b").is_none());
    }
}
