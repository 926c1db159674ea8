//! The local manifest source: a folder of YAML files (multi-document), polled for changes.
//!
//! A file that fails to parse is reported with its path and position and keeps its last good
//! contents in force; the other files load as usual.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use serde::de::DeserializeOwned;

use super::{convert, wire};
use crate::drain;
use crate::model::{Kind, Object, ObjectRef, SourceId};
use crate::store::{Update, Updates};

/// Files larger than this are refused (a manifest folder, not a data dump).
const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// What the local source needs to know.
#[derive(Debug, Clone)]
pub struct LocalSource {
    pub path: PathBuf,
    pub poll_interval: Duration,
    pub names: IdentityObjectNames,
}

/// Which Secret and ConfigMap hold the identity issuer and trust roots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityObjectNames {
    pub namespace: String,
    pub issuer_secret: String,
    pub trust_roots_configmap: String,
}

impl Default for IdentityObjectNames {
    fn default() -> Self {
        Self {
            namespace: "linkerd".into(),
            issuer_secret: "linkerd-identity-issuer".into(),
            trust_roots_configmap: "linkerd-identity-trust-roots".into(),
        }
    }
}

/// A manifest that cannot be used, with where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// The file is not valid YAML.
    #[error("{path}:{line}:{column}: {message}")]
    Syntax { path: PathBuf, line: u64, column: u64, message: String },
    /// A document is valid YAML but not a usable object.
    #[error("{path}: document {document}: {message}")]
    Document { path: PathBuf, document: usize, message: String },
    /// The file cannot be read.
    #[error("{path}: {message}")]
    Read { path: PathBuf, message: String },
}

/// Parses one manifest file into objects. Kinds meshkeep does not use (Deployments, other
/// Secrets, ...) are skipped.
pub fn parse_file(path: &Path, text: &str, names: &IdentityObjectNames) -> Result<Vec<Object>, ManifestError> {
    let documents: Vec<serde_json::Value> = serde_saphyr::from_multiple(text).map_err(|e| {
        let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
        ManifestError::Syntax { path: path.to_owned(), line, column, message: first_line(&e.to_string()) }
    })?;
    let mut objects = Vec::new();
    for (index, document) in documents.into_iter().enumerate() {
        let document_error =
            |message: String| ManifestError::Document { path: path.to_owned(), document: index + 1, message };
        if document.is_null() {
            continue;
        }
        let items = match document.get("kind").and_then(|k| k.as_str()) {
            Some("List") => document.get("items").and_then(|i| i.as_array()).cloned().unwrap_or_default(),
            _ => vec![document],
        };
        for item in items {
            if let Some(object) = parse_object(item, names).map_err(&document_error)? {
                objects.push(object);
            }
        }
    }
    Ok(objects)
}

fn first_line(message: &str) -> String {
    message.lines().next().unwrap_or(message).to_owned()
}

fn parse_object(value: serde_json::Value, names: &IdentityObjectNames) -> Result<Option<Object>, String> {
    let api_version = value.get("apiVersion").and_then(|v| v.as_str()).unwrap_or_default().to_owned();
    let kind = value.get("kind").and_then(|v| v.as_str()).unwrap_or_default().to_owned();
    let name = value.pointer("/metadata/name").and_then(|v| v.as_str()).unwrap_or("<unnamed>").to_owned();
    let namespace = value.pointer("/metadata/namespace").and_then(|v| v.as_str()).unwrap_or("default").to_owned();
    let describe = |e: String| format!("{kind} {namespace}/{name}: {e}");
    fn typed<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, String> {
        serde_json::from_value(value).map_err(|e| e.to_string())
    }
    let object = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Service") => Object::Service(
            convert::service(&typed::<core::Service>(value).map_err(describe)?).map_err(|e| e.to_string())?,
        ),
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            match convert::endpoint_slice(&typed::<discovery::EndpointSlice>(value).map_err(describe)?)
                .map_err(|e| e.to_string())?
            {
                Some(slice) => Object::EndpointSlice(slice),
                None => return Ok(None),
            }
        }
        ("v1", "Pod") => {
            Object::Pod(convert::pod(&typed::<wire::Pod>(value).map_err(describe)?).map_err(|e| e.to_string())?)
        }
        ("split.smi-spec.io/v1alpha4", "TrafficSplit") => Object::TrafficSplit(
            convert::traffic_split(&typed::<wire::TrafficSplit>(value).map_err(describe)?)
                .map_err(|e| e.to_string())?,
        ),
        ("access.smi-spec.io/v1alpha3", "TrafficTarget") => Object::TrafficTarget(
            convert::traffic_target(&typed::<wire::TrafficTarget>(value).map_err(describe)?)
                .map_err(|e| e.to_string())?,
        ),
        ("specs.smi-spec.io/v1alpha4", "HTTPRouteGroup") => Object::HttpRouteGroup(
            convert::http_route_group(&typed::<wire::HttpRouteGroup>(value).map_err(describe)?)
                .map_err(|e| e.to_string())?,
        ),
        ("specs.smi-spec.io/v1alpha4", "TCPRoute") => Object::TcpRoute(
            convert::tcp_route(&typed::<wire::TcpRoute>(value).map_err(describe)?).map_err(|e| e.to_string())?,
        ),
        ("gateway.networking.k8s.io/v1", "HTTPRoute") => Object::HttpRoute(
            convert::http_route(&typed::<wire::HttpRoute>(value).map_err(describe)?).map_err(|e| e.to_string())?,
        ),
        ("v1", "Secret") if namespace == names.namespace && name == names.issuer_secret => Object::IdentityIssuer(
            convert::identity_issuer(&typed::<core::Secret>(value).map_err(describe)?).map_err(|e| e.to_string())?,
        ),
        ("v1", "ConfigMap") if namespace == names.namespace && name == names.trust_roots_configmap => {
            Object::TrustRoots(
                convert::trust_roots(&typed::<core::ConfigMap>(value).map_err(describe)?).map_err(|e| e.to_string())?,
            )
        }
        (_, "TrafficSplit" | "TrafficTarget" | "HTTPRouteGroup" | "TCPRoute" | "HTTPRoute" | "EndpointSlice") => {
            return Err(format!("{kind} {namespace}/{name}: unsupported apiVersion {api_version:?}"));
        }
        ("", _) | (_, "") => return Err(format!("{namespace}/{name}: apiVersion and kind are required")),
        _ => {
            tracing::debug!(%api_version, %kind, %namespace, %name, "manifest kind not used by meshkeep; skipped");
            return Ok(None);
        }
    };
    Ok(Some(object))
}

/// One file's last good contents and what it looked like when read.
#[derive(Debug)]
struct FileState {
    fingerprint: Fingerprint,
    objects: Vec<Object>,
}

/// The folder as last read.
#[derive(Debug, Default)]
struct Folder {
    files: BTreeMap<PathBuf, FileState>,
    /// What was last sent, per kind, to send only kinds that changed.
    sent: BTreeMap<Kind, BTreeMap<ObjectRef, Object>>,
    /// Errors already reported, so a broken file is not reported on every poll.
    reported: BTreeSet<String>,
}

/// Polls the folder and sends its objects until the drain starts.
/// Scans the folder every poll interval, and at once when `rescan` is notified (reload).
pub async fn run(
    source: LocalSource,
    updates: Updates,
    rescan: std::sync::Arc<tokio::sync::Notify>,
    drain: drain::Watch,
) {
    let mut folder = Folder::default();
    let mut first = true;
    loop {
        let scan = {
            let path = source.path.clone();
            let names = source.names.clone();
            let known: BTreeMap<PathBuf, Fingerprint> =
                folder.files.iter().map(|(p, f)| (p.clone(), f.fingerprint)).collect();
            tokio::task::spawn_blocking(move || scan(&path, &names, &known)).await
        };
        match scan {
            Ok(Ok(scan)) => {
                if folder.apply(scan, &updates, first).await.is_err() {
                    return;
                }
                first = false;
            }
            Ok(Err(e)) => {
                let message = format!("manifest folder {}: {e}", source.path.display());
                if folder.reported.insert(message.clone()) {
                    tracing::warn!("{message}");
                }
                if updates.send(Update::Failed { source: SourceId::Local, message }).await.is_err() {
                    return;
                }
            }
            Err(e) => tracing::error!(error = %e, "manifest scan task failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(source.poll_interval) => {}
            _ = rescan.notified() => tracing::info!(path = %source.path.display(), "local manifests: rescanning"),
            _ = drain.signaled() => return,
        }
    }
}

/// A file as last seen: modification time and length.
type Fingerprint = (SystemTime, u64);

/// A changed file and what parsing it gave.
#[derive(Debug)]
struct ChangedFile {
    path: PathBuf,
    fingerprint: Fingerprint,
    parsed: Result<Vec<Object>, ManifestError>,
}

/// The result of reading the folder: files changed since last time, and the files present.
#[derive(Debug)]
struct Scan {
    present: BTreeSet<PathBuf>,
    changed: Vec<ChangedFile>,
}

fn scan(dir: &Path, names: &IdentityObjectNames, known: &BTreeMap<PathBuf, Fingerprint>) -> std::io::Result<Scan> {
    let mut present = BTreeSet::new();
    let mut changed = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        for entry in std::fs::read_dir(&current)? {
            let path = entry?.path();
            let Ok(metadata) = std::fs::metadata(&path) else { continue };
            if metadata.is_dir() {
                pending.push(path);
                continue;
            }
            let is_manifest = path.extension().is_some_and(|e| e == "yaml" || e == "yml" || e == "json");
            let hidden = path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'));
            if !is_manifest || hidden {
                continue;
            }
            present.insert(path.clone());
            let fingerprint = (metadata.modified().unwrap_or(SystemTime::UNIX_EPOCH), metadata.len());
            if known.get(&path) == Some(&fingerprint) {
                continue;
            }
            let parsed = if metadata.len() > MAX_FILE_BYTES {
                Err(ManifestError::Read { path: path.clone(), message: format!("larger than {MAX_FILE_BYTES} bytes") })
            } else {
                match std::fs::read_to_string(&path) {
                    Ok(text) => parse_file(&path, &text, names),
                    Err(e) => Err(ManifestError::Read { path: path.clone(), message: e.to_string() }),
                }
            };
            changed.push(ChangedFile { path, fingerprint, parsed });
        }
    }
    Ok(Scan { present, changed })
}

impl Folder {
    async fn apply(&mut self, scan: Scan, updates: &Updates, first: bool) -> Result<(), crate::store::Stopped> {
        let removed: Vec<PathBuf> = self.files.keys().filter(|p| !scan.present.contains(*p)).cloned().collect();
        for path in removed {
            tracing::info!(path = %path.display(), "manifest file removed");
            self.files.remove(&path);
        }
        for ChangedFile { path, fingerprint, parsed } in scan.changed {
            match parsed {
                Ok(objects) => {
                    tracing::info!(path = %path.display(), objects = objects.len(), "manifest file loaded");
                    self.reported.retain(|r| !r.starts_with(&path.display().to_string()));
                    self.files.insert(path, FileState { fingerprint, objects });
                }
                Err(e) => {
                    let message = e.to_string();
                    let kept = self.files.get(&path).map_or(0, |f| f.objects.len());
                    if self.reported.insert(message.clone()) {
                        tracing::warn!(error = %message, kept_objects = kept, "manifest file is invalid; its last good version stays in force");
                    }
                    // Remember the fingerprint so the same broken content is not re-parsed,
                    // but keep the last good objects.
                    match self.files.get_mut(&path) {
                        Some(file) => file.fingerprint = fingerprint,
                        None => {
                            self.files.insert(path, FileState { fingerprint, objects: Vec::new() });
                        }
                    }
                    updates.send(Update::Warning { source: SourceId::Local, message }).await?;
                }
            }
        }

        let mut by_kind: BTreeMap<Kind, BTreeMap<ObjectRef, Object>> =
            Kind::ALL.iter().map(|k| (*k, BTreeMap::new())).collect();
        for (path, file) in &self.files {
            for object in &file.objects {
                let kind_objects = by_kind.entry(object.kind()).or_default();
                if kind_objects.insert(object.object_ref().clone(), object.clone()).is_some() {
                    tracing::warn!(path = %path.display(), kind = %object.kind(), object = %object.object_ref(), "object defined in more than one manifest file; the later file wins");
                }
            }
        }
        for (kind, objects) in by_kind {
            if !first && self.sent.get(&kind) == Some(&objects) {
                continue;
            }
            updates
                .send(Update::Replace {
                    source: SourceId::Local,
                    kind,
                    namespace: None,
                    objects: objects.values().cloned().collect(),
                    resource_version: None,
                    complete: true,
                })
                .await?;
            self.sent.insert(kind, objects);
        }
        updates.send(Update::Contact { source: SourceId::Local }).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<Object>, ManifestError> {
        parse_file(Path::new("site/shop.yaml"), text, &IdentityObjectNames::default())
    }

    #[test]
    fn multi_document_files_yield_every_supported_object() {
        let objects = parse(
            "apiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: shop}\nspec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}\n\
             ---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: api}\n\
             ---\n\
             ---\napiVersion: v1\nkind: Secret\nmetadata: {name: linkerd-identity-issuer, namespace: linkerd}\nstringData: {tls.crt: C, tls.key: K}\n\
             ---\napiVersion: v1\nkind: Secret\nmetadata: {name: other, namespace: linkerd}\n",
        )
        .expect("parses");
        let kinds: Vec<_> = objects.iter().map(Object::kind).collect();
        assert_eq!(kinds, [Kind::Service, Kind::IdentityIssuer]);
    }

    #[test]
    fn syntax_errors_carry_line_and_column() {
        let err = parse("apiVersion: v1\nkind: Service\nmetadata: {name: [unclosed\n").expect_err("bad yaml");
        let ManifestError::Syntax { line, .. } = &err else { panic!("expected a syntax error: {err}") };
        assert!(*line >= 3, "{err}");
        assert!(err.to_string().starts_with("site/shop.yaml:"), "{err}");
    }

    #[test]
    fn invalid_objects_name_the_document_and_object() {
        let err = parse("apiVersion: v1\nkind: Service\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: b, namespace: x}\nspec: {clusterIP: not-an-ip}\n")
            .expect_err("bad ip");
        let text = err.to_string();
        assert!(text.contains("document 2") && text.contains("x/b") && text.contains("not-an-ip"), "{text}");
    }

    #[test]
    fn unsupported_versions_of_known_kinds_are_errors() {
        let err = parse(
            "apiVersion: split.smi-spec.io/v1alpha1\nkind: TrafficSplit\nmetadata: {name: s}\nspec: {service: a}\n",
        )
        .expect_err("old version");
        assert!(err.to_string().contains("unsupported apiVersion"), "{err}");
    }
}
