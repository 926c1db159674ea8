//! The cache file format of `meshkeep cache export` / `import`: a snapshot carried to a box that
//! has never been online.
//!
//! Layout: the magic line `MESHKEEP-CACHE\n`, the format version and store schema (u32 LE
//! each), the payload length (u64 LE), the payload (postcard), then the SHA-256 of everything
//! before it. A damaged or truncated file fails the checksum and is refused as a whole.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::SCHEMA_VERSION;
use super::snapshot::{Objects, Snapshot, SyncMeta};
use crate::model::{Kind, Object, SourceId};

const MAGIC: &[u8] = b"MESHKEEP-CACHE\n";
const FORMAT_VERSION: u32 = 1;
const DIGEST_LEN: usize = 32;
const HEADER_LEN: usize = MAGIC.len() + 4 + 4 + 8;

/// Why a cache file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    /// Not a meshkeep cache file at all.
    #[error("not a meshkeep cache file")]
    NotACacheFile,
    /// Truncated or altered: the checksum does not match.
    #[error("the cache file is damaged (checksum mismatch or truncated)")]
    Damaged,
    /// Written by a newer meshkeep.
    #[error(
        "cache format {format} / schema {schema} is newer than this meshkeep supports ({FORMAT_VERSION} / {SCHEMA_VERSION})"
    )]
    Newer { format: u32, schema: u32 },
    /// The checksum matched but the contents do not decode (a bug in the writer).
    #[error("cannot decode the cache contents: {0}")]
    Decode(String),
}

/// The payload; `O` is the object encoding of the file's schema.
#[derive(Serialize, Deserialize)]
struct Payload<O> {
    created_at: u64,
    sources: Vec<ExportedSource<O>>,
}

#[derive(Serialize, Deserialize)]
struct ExportedSource<O> {
    source: SourceId,
    /// JSON, like the store keeps it, so metadata fields can be added.
    meta_json: String,
    objects: Vec<O>,
}

impl<O: Into<Object>> Payload<O> {
    fn upgrade(self) -> Payload<Object> {
        let sources = self
            .sources
            .into_iter()
            .map(|s| ExportedSource {
                source: s.source,
                meta_json: s.meta_json,
                objects: s.objects.into_iter().map(Into::into).collect(),
            })
            .collect();
        Payload { created_at: self.created_at, sources }
    }
}

/// A decoded cache file.
#[derive(Debug)]
pub struct Imported {
    pub created_at: u64,
    pub sources: BTreeMap<SourceId, (SyncMeta, BTreeMap<Kind, Objects>)>,
}

/// Encodes a snapshot into the cache file format.
pub fn encode(snapshot: &Snapshot, created_at: u64) -> Result<Vec<u8>, String> {
    let sources = snapshot
        .sources()
        .map(|(id, view)| {
            let objects = Kind::ALL.iter().filter_map(|k| view.objects(*k)).flat_map(|o| o.values().cloned()).collect();
            let meta_json = serde_json::to_string(&view.meta).map_err(|e| e.to_string())?;
            Ok(ExportedSource { source: id.clone(), meta_json, objects })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let payload = postcard::to_allocvec(&Payload::<Object> { created_at, sources }).map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + DIGEST_LEN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&SCHEMA_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&payload);
    let digest = ring::digest::digest(&ring::digest::SHA256, &out);
    out.extend_from_slice(digest.as_ref());
    Ok(out)
}

/// Decodes and verifies a cache file.
pub fn decode(bytes: &[u8]) -> Result<Imported, ExportError> {
    if !bytes.starts_with(MAGIC) {
        return Err(ExportError::NotACacheFile);
    }
    if bytes.len() < HEADER_LEN + DIGEST_LEN {
        return Err(ExportError::Damaged);
    }
    let (body, digest) = bytes.split_at(bytes.len() - DIGEST_LEN);
    if ring::digest::digest(&ring::digest::SHA256, body).as_ref() != digest {
        return Err(ExportError::Damaged);
    }
    let word = |at: usize| u32::from_le_bytes([body[at], body[at + 1], body[at + 2], body[at + 3]]);
    let (format, schema) = (word(MAGIC.len()), word(MAGIC.len() + 4));
    if format > FORMAT_VERSION || schema > SCHEMA_VERSION {
        return Err(ExportError::Newer { format, schema });
    }
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&body[MAGIC.len() + 8..HEADER_LEN]);
    let payload = &body[HEADER_LEN..];
    if u64::from_le_bytes(len_bytes) != payload.len() as u64 {
        return Err(ExportError::Damaged);
    }
    let payload: Payload<Object> = match schema {
        1 => postcard::from_bytes::<Payload<super::legacy::ObjectV1>>(payload).map(Payload::upgrade),
        _ => postcard::from_bytes(payload),
    }
    .map_err(|e| ExportError::Decode(e.to_string()))?;
    let mut sources = BTreeMap::new();
    for exported in payload.sources {
        let meta: SyncMeta =
            serde_json::from_str(&exported.meta_json).map_err(|e| ExportError::Decode(e.to_string()))?;
        let mut kinds: BTreeMap<Kind, Objects> = BTreeMap::new();
        for object in exported.objects {
            kinds.entry(object.kind()).or_default().insert(object.object_ref().clone(), object);
        }
        sources.insert(exported.source, (meta, kinds));
    }
    Ok(Imported { created_at: payload.created_at, sources })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{self, ObjectRef};
    use crate::store::SourceView;

    fn snapshot() -> Snapshot {
        let mut view = SourceView::default();
        view.set_kind(
            Kind::TrustRoots,
            [Object::TrustRoots(model::TrustRoots { meta: ObjectRef::new("linkerd", "roots"), pem: "PEM".into() })],
        );
        Snapshot::from_sources([(SourceId::Link("east".into()), view)])
    }

    #[test]
    fn a_cache_file_round_trips() {
        let bytes = encode(&snapshot(), 1234).expect("encode");
        let imported = decode(&bytes).expect("decode");
        assert_eq!(imported.created_at, 1234);
        let (meta, kinds) = &imported.sources[&SourceId::Link("east".into())];
        assert!(meta.synced_kinds.contains(&Kind::TrustRoots));
        assert_eq!(kinds[&Kind::TrustRoots].len(), 1);
    }

    #[test]
    fn any_damage_is_detected() {
        let bytes = encode(&snapshot(), 1).expect("encode");
        for at in [MAGIC.len() + 1, HEADER_LEN + 3, bytes.len() - 1] {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x40;
            assert_eq!(decode(&damaged).unwrap_err(), ExportError::Damaged, "flipped byte {at}");
        }
        assert_eq!(decode(&bytes[..bytes.len() - 10]).unwrap_err(), ExportError::Damaged);
        assert_eq!(decode(b"hello").unwrap_err(), ExportError::NotACacheFile);
    }
}
