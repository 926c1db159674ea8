//! The identity manager: picks the issuer (configured files, then synced sources, then a
//! standalone CA), keeps it cached on disk, and issues and renews the certificates of the
//! box's proxy and its configured workloads. Synchronous and clock-injected, so rotation can be
//! tested over simulated months; `app` drives it from a task.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::ca::{self, CertInfo, Issuer, IssuerPem, Leaf};
use super::clock::{Clock, TimeFloor};
use super::files;
use super::{Error, IdentityName, fmt_time};
use crate::model::{Kind, Object, SourceId};
use crate::store::Snapshot;

/// Where the issuer came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum IssuerOrigin {
    /// Certificate and key files named in the configuration.
    Files,
    /// An issuer Secret (and trust roots) synced from a source.
    Source { source: String },
    /// Created on this box: it is its own trust domain.
    Standalone,
}

/// A workload that gets certificates: by Unix uid over the socket, and optionally as files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub uid: u32,
    pub name: IdentityName,
    /// Kept up to date with `tls.crt`, `tls.key` and `ca.crt` (for apps doing their own TLS).
    pub directory: Option<PathBuf>,
}

/// What the manager needs from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub trust_domain: String,
    pub control_plane_namespace: String,
    pub lifetime: Duration,
    /// Renew at this fraction of a certificate's lifetime.
    pub renew_fraction: f64,
    /// NotBefore is backdated by this much, for peers whose clocks run slightly behind.
    pub skew: Duration,
    /// Issuer from files: (certificate chain, key, trust anchors).
    pub issuer_files: Option<(PathBuf, PathBuf, PathBuf)>,
    /// Create a local root and issuer when no issuer is configured or synced.
    pub standalone: bool,
    /// The sources that may sync an issuer Secret: no standalone root is created while one of
    /// them has not listed it yet (a box that links to a cluster joins that cluster's trust).
    pub issuer_sources: Vec<SourceId>,
    pub standalone_lifetime: Duration,
    pub proxy: Option<IdentityName>,
    pub workloads: Vec<Workload>,
    /// Warn when the issuer expires within this window.
    pub issuer_expiry_warning: Duration,
}

#[derive(Serialize, Deserialize)]
struct CachedIssuer {
    origin: IssuerOrigin,
    material: IssuerPem,
}

#[derive(Serialize, Deserialize)]
struct CachedLeaf {
    name: IdentityName,
    key_pem: String,
    chain_pem: String,
    trust_anchors_pem: String,
}

/// What the manager reports (for /status, metrics and the CLI).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IdentityStatus {
    pub issuer_origin: Option<IssuerOrigin>,
    pub issuer_subject: Option<String>,
    pub issuer_not_after: Option<u64>,
    pub issuer_expiring_soon: bool,
    pub clock_ok: bool,
    pub time_floor: u64,
    pub certificates: Vec<CertificateStatus>,
    pub issued_total: u64,
    pub renewal_failures_total: u64,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertificateStatus {
    pub identity: String,
    pub spiffe_id: String,
    pub not_before: u64,
    pub not_after: u64,
    pub renew_at: u64,
    pub proxy: bool,
}

/// The identity manager.
pub struct Manager<C: Clock> {
    settings: Settings,
    dir: PathBuf,
    clock: C,
    floor: TimeFloor,
    issuer: Option<(IssuerOrigin, IssuerPem, Issuer)>,
    leaves: BTreeMap<IdentityName, Leaf>,
    /// A source in `issuer_sources` has not listed its issuer Secret yet.
    issuer_pending: bool,
    issued_total: u64,
    renewal_failures_total: u64,
    last_error: Option<String>,
}

fn unix(time: SystemTime) -> u64 {
    crate::store::unix_seconds(time)
}

impl<C: Clock> Manager<C> {
    /// Opens the identity directory: the time floor, the cached issuer and cached certificates.
    pub fn open(settings: Settings, dir: &Path, clock: C) -> Result<Self, Error> {
        std::fs::create_dir_all(dir.join("leaves")).map_err(|source| Error::Io { path: dir.to_owned(), source })?;
        let floor = TimeFloor::load(&dir.join("time-floor"));
        let issuer_pending = !settings.issuer_sources.is_empty();
        let mut manager = Self {
            settings,
            dir: dir.to_owned(),
            clock,
            floor,
            issuer: None,
            issuer_pending,
            leaves: BTreeMap::new(),
            issued_total: 0,
            renewal_failures_total: 0,
            last_error: None,
        };
        match files::read_checksummed::<CachedIssuer>(&manager.issuer_path()) {
            Ok(Some(cached)) => match Issuer::from_pem(&cached.material) {
                Ok(issuer) => {
                    manager.floor.raise(issuer.info.not_before);
                    manager.issuer = Some((cached.origin, cached.material, issuer));
                }
                Err(e) => tracing::warn!(error = %e, "cached issuer is unusable"),
            },
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "cached issuer cannot be read"),
        }
        for name in manager.managed() {
            match files::read_checksummed::<CachedLeaf>(&manager.leaf_path(&name)) {
                Ok(Some(cached)) if cached.name == name => match leaf_from_cache(&cached) {
                    Ok(leaf) => {
                        manager.leaves.insert(name, leaf);
                    }
                    Err(e) => tracing::warn!(identity = %name, error = %e, "cached certificate is unusable"),
                },
                Ok(_) => {}
                Err(e) => tracing::warn!(identity = %name, error = %e, "cached certificate cannot be read"),
            }
        }
        Ok(manager)
    }

    fn issuer_path(&self) -> PathBuf {
        self.dir.join("issuer.json")
    }

    fn leaf_path(&self, name: &IdentityName) -> PathBuf {
        self.dir.join("leaves").join(format!("{}.json", name.dns_name()))
    }

    /// Every identity the manager keeps a certificate for.
    fn managed(&self) -> Vec<IdentityName> {
        let mut names: Vec<IdentityName> = self.settings.proxy.iter().cloned().collect();
        names.extend(self.settings.workloads.iter().map(|w| w.name.clone()));
        names.sort();
        names.dedup();
        names
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The workload a Unix uid maps to.
    pub fn workload_for_uid(&self, uid: u32) -> Option<&Workload> {
        self.settings.workloads.iter().find(|w| w.uid == uid)
    }

    /// Chooses the issuer: configured files, else the first source (local, then links by name)
    /// that synced an issuer Secret, else (once every source has listed its Secrets, or with no
    /// source) a standalone CA. A new issuer replaces the old one at once, and certificates it
    /// did not sign are renewed at the next tick.
    pub fn select_issuer(&mut self, snapshot: &Snapshot) {
        let candidate = match &self.settings.issuer_files {
            Some((cert, key, anchors)) => match read_issuer_files(cert, key, anchors) {
                Ok(material) => Some((IssuerOrigin::Files, material)),
                Err(e) => {
                    self.note_error(format!("issuer files: {e}"));
                    None
                }
            },
            None => issuer_from_snapshot(snapshot),
        };
        self.issuer_pending =
            self.settings.issuer_sources.iter().any(|source| snapshot.objects(source, Kind::IdentityIssuer).is_none());
        if let Some((origin, material)) = candidate {
            self.adopt(origin, material);
        }
    }

    fn adopt(&mut self, origin: IssuerOrigin, material: IssuerPem) {
        if self.issuer.as_ref().is_some_and(|(o, m, _)| *o == origin && *m == material) {
            return;
        }
        match Issuer::from_pem(&material) {
            Ok(issuer) => {
                tracing::info!(?origin, subject = %issuer.info.subject, expires = %fmt_time(issuer.info.not_after), "identity issuer in use");
                let cached = CachedIssuer { origin: origin.clone(), material: material.clone() };
                if let Err(e) = files::write_checksummed(&self.issuer_path(), &cached, 0o600) {
                    self.note_error(format!("cannot cache the issuer: {e}"));
                }
                self.floor.raise(issuer.info.not_before);
                self.issuer = Some((origin, material, issuer));
            }
            Err(e) => self.note_error(format!("issuer from {origin:?} is unusable, keeping the current one: {e}")),
        }
    }

    fn note_error(&mut self, message: String) {
        if self.last_error.as_deref() != Some(message.as_str()) {
            tracing::warn!("{message}");
        }
        self.last_error = Some(message);
    }

    /// Renews whatever is due. Returns when to call again.
    pub fn tick(&mut self) -> SystemTime {
        let now = self.clock.now();
        let retry = now + Duration::from_secs(10);
        if let Err(e) = self.floor.check(now) {
            self.note_error(e.to_string());
            return retry;
        }
        if self.issuer.is_none() && self.settings.issuer_files.is_none() && self.issuer_pending {
            let sources: Vec<String> = self.settings.issuer_sources.iter().map(ToString::to_string).collect();
            self.note_error(format!("waiting for the identity issuer from {}", sources.join(", ")));
            return retry;
        } else if self.issuer.is_none() && self.settings.standalone && self.settings.issuer_files.is_none() {
            match ca::standalone(&self.settings.trust_domain, now, self.settings.standalone_lifetime) {
                Ok(material) => {
                    tracing::warn!(trust_domain = %self.settings.trust_domain, "no identity issuer configured or synced: created a standalone root; this box is its own trust domain");
                    self.adopt(IssuerOrigin::Standalone, material);
                }
                Err(e) => self.note_error(format!("cannot create a standalone issuer: {e}")),
            }
        }
        let mut next = now + Duration::from_secs(3600);
        for name in self.managed() {
            let due = self
                .leaves
                .get(&name)
                .filter(|leaf| self.signed_by_current_issuer(leaf))
                .map(|leaf| leaf.renew_at(self.settings.renew_fraction));
            if due.is_none_or(|due| due <= now) {
                match self.issue(&name, now) {
                    Ok(leaf) => {
                        next = next.min(leaf.renew_at(self.settings.renew_fraction));
                        self.leaves.insert(name.clone(), leaf);
                        self.write_workload_files(&name);
                    }
                    Err(e) => {
                        self.renewal_failures_total += 1;
                        let still_valid = self.leaves.get(&name).is_some_and(|l| l.info.is_valid_at(now));
                        self.note_error(format!(
                            "cannot renew {name}: {e}{}",
                            if still_valid { "; the current certificate stays in use" } else { "" }
                        ));
                        next = next.min(retry);
                    }
                }
            } else if let Some(due) = due {
                next = next.min(due);
            }
        }
        next.max(now + Duration::from_millis(100))
    }

    /// Whether `leaf` was signed by the issuer in use. One from a replaced issuer is renewed at
    /// once: peers that follow the new trust may not accept it.
    fn signed_by_current_issuer(&self, leaf: &Leaf) -> bool {
        self.issuer.as_ref().is_none_or(|(_, _, issuer)| leaf.chain.get(1) == issuer.chain.first())
    }

    /// Issues and caches a certificate for `name`.
    fn issue(&mut self, name: &IdentityName, now: SystemTime) -> Result<Leaf, Error> {
        let (_, _, issuer) = self.issuer.as_ref().ok_or(Error::NoIssuer)?;
        let leaf = issuer.issue(name, now, self.settings.lifetime, self.settings.skew)?;
        let cached = CachedLeaf {
            name: name.clone(),
            key_pem: leaf.key_pem.clone(),
            chain_pem: leaf.chain_pem(),
            trust_anchors_pem: leaf.trust_anchors_pem(),
        };
        files::write_checksummed(&self.leaf_path(name), &cached, 0o600)?;
        self.issued_total += 1;
        tracing::info!(identity = %name, expires = %fmt_time(leaf.info.not_after), "certificate issued");
        Ok(leaf)
    }

    /// The current certificate for `name`, issuing one if there is none or it is due.
    pub fn certificate(&mut self, name: &IdentityName) -> Result<Leaf, Error> {
        let now = self.clock.now();
        if let Some(leaf) = self.leaves.get(name)
            && leaf.renew_at(self.settings.renew_fraction) > now
            && leaf.info.is_valid_at(now)
            && self.signed_by_current_issuer(leaf)
        {
            return Ok(leaf.clone());
        }
        let sane = self.floor.check(now);
        let issued = sane.and_then(|()| self.issue(name, now));
        match issued {
            Ok(leaf) => {
                self.leaves.insert(name.clone(), leaf.clone());
                Ok(leaf)
            }
            // A failed renewal keeps serving a certificate that is still valid.
            Err(e) => match self.leaves.get(name) {
                Some(leaf) if leaf.info.is_valid_at(now) => Ok(leaf.clone()),
                _ => Err(e),
            },
        }
    }

    /// The proxy's current certificate, if any.
    pub fn proxy_certificate(&self) -> Option<&Leaf> {
        self.leaves.get(self.settings.proxy.as_ref()?)
    }

    /// Writes a workload's files (`tls.crt`, `tls.key`, `ca.crt`) as one atomic generation.
    fn write_workload_files(&mut self, name: &IdentityName) {
        let Some(directory) =
            self.settings.workloads.iter().find(|w| &w.name == name).and_then(|w| w.directory.clone())
        else {
            return;
        };
        let Some(leaf) = self.leaves.get(name) else { return };
        if let Err(e) = write_generation(&directory, leaf) {
            self.note_error(format!("cannot write {}: {e}", directory.display()));
        }
    }

    /// Persists the time floor (at shutdown).
    pub fn persist_floor(&mut self) {
        self.floor.persist();
    }

    pub fn status(&self) -> IdentityStatus {
        let now = self.clock.now();
        let issuer = self.issuer.as_ref();
        IdentityStatus {
            issuer_origin: issuer.map(|(o, _, _)| o.clone()),
            issuer_subject: issuer.map(|(_, _, i)| i.info.subject.clone()),
            issuer_not_after: issuer.map(|(_, _, i)| unix(i.info.not_after)),
            issuer_expiring_soon: issuer
                .is_some_and(|(_, _, i)| i.info.not_after <= now + self.settings.issuer_expiry_warning),
            clock_ok: now >= self.floor.floor(),
            time_floor: unix(self.floor.floor()),
            certificates: self
                .leaves
                .iter()
                .map(|(name, leaf)| CertificateStatus {
                    identity: name.dns_name(),
                    spiffe_id: name.spiffe_id(),
                    not_before: unix(leaf.info.not_before),
                    not_after: unix(leaf.info.not_after),
                    renew_at: unix(leaf.renew_at(self.settings.renew_fraction)),
                    proxy: self.settings.proxy.as_ref() == Some(name),
                })
                .collect(),
            issued_total: self.issued_total,
            renewal_failures_total: self.renewal_failures_total,
            last_error: self.last_error.clone(),
        }
    }

    /// The issuer's PEM material (for `meshkeep identity issue`).
    pub fn issuer(&self) -> Option<&Issuer> {
        self.issuer.as_ref().map(|(_, _, i)| i)
    }
}

fn leaf_from_cache(cached: &CachedLeaf) -> Result<Leaf, Error> {
    let chain = ca::certificates_from_pem(&cached.chain_pem)?;
    let trust_anchors = ca::certificates_from_pem(&cached.trust_anchors_pem)?;
    let info = CertInfo::parse(&chain[0])?;
    Ok(Leaf { name: cached.name.clone(), key_pem: cached.key_pem.clone(), chain, trust_anchors, info })
}

fn read_issuer_files(cert: &Path, key: &Path, anchors: &Path) -> Result<IssuerPem, Error> {
    let read =
        |path: &Path| std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_owned(), source });
    Ok(IssuerPem { certificate: read(cert)?, private_key: read(key)?, trust_anchors: read(anchors)? })
}

/// The issuer synced by the first source that has one: the local source, then links by name.
/// Trust anchors come from the trust-roots ConfigMap, else the Secret's `ca.crt`.
fn issuer_from_snapshot(snapshot: &Snapshot) -> Option<(IssuerOrigin, IssuerPem)> {
    let mut sources: Vec<&SourceId> = snapshot.sources().map(|(id, _)| id).collect();
    sources.sort_by_key(|id| (id.link().is_some(), id.to_string()));
    for source in sources {
        let Some(issuers) = snapshot.objects(source, Kind::IdentityIssuer) else { continue };
        let Some(Object::IdentityIssuer(secret)) = issuers.values().next() else { continue };
        let roots =
            snapshot.objects(source, Kind::TrustRoots).and_then(|roots| roots.values().next()).and_then(|o| match o {
                Object::TrustRoots(roots) => Some(roots.pem.clone()),
                _ => None,
            });
        let Some(trust_anchors) = roots.or_else(|| secret.ca_pem.clone()) else { continue };
        return Some((
            IssuerOrigin::Source { source: source.to_string() },
            IssuerPem {
                certificate: secret.certificate_pem.clone(),
                private_key: secret.private_key_pem.clone(),
                trust_anchors,
            },
        ));
    }
    None
}

/// Writes `tls.crt`, `tls.key` and `ca.crt` into a new generation directory and switches the
/// `..data` link to it in one rename, so a reader never sees a key from one certificate with
/// another certificate. The files in `directory` are links through `..data`.
pub fn write_generation(directory: &Path, leaf: &Leaf) -> Result<(), Error> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| Error::Io { path, source }
    };
    std::fs::create_dir_all(directory).map_err(io(directory))?;
    static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let count = GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let stamp = format!("..{nanos}.{}.{count}", std::process::id());
    let generation = directory.join(&stamp);
    let _ = std::fs::remove_dir_all(&generation);
    std::fs::create_dir(&generation).map_err(io(&generation))?;
    files::write_atomic(&generation.join("tls.crt"), leaf.chain_pem().as_bytes(), 0o644)?;
    files::write_atomic(&generation.join("tls.key"), leaf.key_pem.as_bytes(), 0o600)?;
    files::write_atomic(&generation.join("ca.crt"), leaf.trust_anchors_pem().as_bytes(), 0o644)?;
    let data = directory.join("..data");
    let previous = std::fs::read_link(&data).ok();
    let tmp_link = directory.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp_link);
    std::os::unix::fs::symlink(&stamp, &tmp_link).map_err(io(&tmp_link))?;
    std::fs::rename(&tmp_link, &data).map_err(io(&data))?;
    for file in ["tls.crt", "tls.key", "ca.crt"] {
        let link = directory.join(file);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(file), &link).map_err(io(&link))?;
        }
    }
    std::fs::File::open(directory).and_then(|d| d.sync_all()).map_err(io(directory))?;
    // Keep the generation just replaced (a reader may still hold it open); drop older ones.
    if let Ok(entries) = std::fs::read_dir(directory) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let keep = name == stamp.as_str() || previous.as_deref().is_some_and(|p| p == Path::new(name.as_ref()));
            if name.starts_with("..") && name != "..data" && !keep && entry.path().is_dir() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
