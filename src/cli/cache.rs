//! `meshkeep cache show|export|import` and `meshkeep resolve`: read from the running daemon,
//! or from the store file when it is stopped.

use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::SystemTime;

use anyhow::{Context as _, bail};

use super::Output;
use super::client::{self, ClientError};
use crate::config::Config;
use crate::discovery::{self, Lookup};
use crate::status::{self, ProcessInfo, Status};
use crate::store::{self, export};

/// Exit status of `resolve` when the name is not known to exist.
pub const EXIT_NOT_FOUND: u8 = 1;
/// Exit status of `resolve` when a source that could define the name never synced.
pub const EXIT_UNKNOWN: u8 = 2;

/// The status report from the daemon, or from the store file when the daemon is stopped.
fn status(config: &Config) -> anyhow::Result<(Status, &'static str)> {
    match client::get(config.admin.listen, "/status") {
        Ok((200, body)) => Ok((serde_json::from_str(&body).context("daemon sent an unreadable /status")?, "daemon")),
        Ok((code, body)) => bail!("daemon answered /status with {code}: {}", body.trim()),
        Err(ClientError::Unreachable { .. }) => {
            let (snapshot, path, size) = store::read(config.store.state_dir())?;
            let process = ProcessInfo {
                node: config.node.name.as_ref().map(ToString::to_string).unwrap_or_default(),
                zone: config.node.zone.as_ref().map(ToString::to_string),
                store_path: path.display().to_string(),
                store_size_bytes: size,
                ..ProcessInfo::default()
            };
            Ok((status::report(&snapshot, process, SystemTime::now()), "store file (daemon not running)"))
        }
        Err(e) => Err(e.into()),
    }
}

pub fn show(config: &Config, format: Output) -> anyhow::Result<()> {
    let (status, from) = status(config)?;
    match format {
        Output::Json => println!("{}", serde_json::to_string_pretty(&status)?),
        Output::Text => {
            println!("from        {from}");
            print!("{}", status::render(&status));
        }
    }
    Ok(())
}

/// Resolves a name or IP:PORT; returns the exit status.
pub fn resolve(config: &Config, target: &str, format: Output) -> anyhow::Result<u8> {
    let addr: Option<SocketAddr> = target.parse().ok();
    let query = match addr {
        Some(addr) => format!("/resolve?addr={}", client::encode_query(&addr.to_string())),
        None => format!("/resolve?name={}", client::encode_query(target)),
    };
    let lookup: Lookup = match client::get(config.admin.listen, &query) {
        Ok((200, body)) => serde_json::from_str(&body).context("daemon sent an unreadable /resolve")?,
        Ok((code, body)) => bail!("daemon answered /resolve with {code}: {}", body.trim()),
        Err(ClientError::Unreachable { .. }) => {
            let (snapshot, ..) = store::read(config.store.state_dir())?;
            let settings = discovery::Settings::from_config(config);
            match addr {
                Some(addr) => discovery::resolve_addr(&snapshot, &settings, addr),
                None => discovery::resolve_name(&snapshot, &settings, target),
            }
        }
        Err(e) => return Err(e.into()),
    };
    match format {
        Output::Json => println!("{}", serde_json::to_string_pretty(&lookup)?),
        Output::Text => print!("{}", render_lookup(target, &lookup)),
    }
    Ok(match lookup {
        Lookup::Found(_) => 0,
        Lookup::NotFound => EXIT_NOT_FOUND,
        Lookup::Unknown { .. } => EXIT_UNKNOWN,
    })
}

fn render_lookup(target: &str, lookup: &Lookup) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let resolved = match lookup {
        Lookup::NotFound => return format!("{target}: not found\n"),
        Lookup::Unknown { reason } => return format!("{target}: unknown ({reason})\n"),
        Lookup::Found(resolved) => resolved,
    };
    let sources: Vec<_> = resolved.backings.iter().map(|b| format!("{} {}", b.source, b.service)).collect();
    let _ = writeln!(out, "{}", resolved.fqdn);
    let _ = writeln!(out, "  from        {}", sources.join(", "));
    if resolved.headless {
        let _ = writeln!(out, "  cluster IP  None (headless)");
    } else {
        let ips: Vec<_> = resolved.cluster_ips.iter().map(ToString::to_string).collect();
        let _ = writeln!(out, "  cluster IP  {}", if ips.is_empty() { "-".to_owned() } else { ips.join(", ") });
    }
    for port in &resolved.ports {
        let target_port = match &port.target_port {
            crate::model::TargetPort::Number(n) => n.to_string(),
            crate::model::TargetPort::Name(name) => name.to_string(),
        };
        let _ = writeln!(
            out,
            "  port        {} {}/{} -> {}",
            port.name.as_deref().unwrap_or("-"),
            port.port,
            port.protocol,
            target_port
        );
    }
    match &resolved.endpoints {
        None => {
            let _ = writeln!(out, "  endpoints   unknown (not listed yet)");
        }
        Some(endpoints) if endpoints.is_empty() => {
            let _ = writeln!(out, "  endpoints   none");
        }
        Some(endpoints) => {
            let _ = writeln!(out, "  endpoints   {}", endpoints.len());
            for e in endpoints {
                let addresses: Vec<_> = e.addresses.iter().map(ToString::to_string).collect();
                let state = if e.ready {
                    "ready"
                } else if e.terminating {
                    "terminating"
                } else {
                    "not-ready"
                };
                let _ = writeln!(
                    out,
                    "    {:<16} {:<11} node={} zone={} identity={}",
                    addresses.join(","),
                    state,
                    e.node.as_deref().unwrap_or("-"),
                    e.zone.as_deref().unwrap_or("-"),
                    e.identity.as_deref().unwrap_or("none (plain TCP)")
                );
            }
        }
    }
    out
}

pub fn export(config: &Config, file: &Path) -> anyhow::Result<()> {
    let (snapshot, path, _) = store::read(config.store.state_dir())
        .context("export reads the store file; stop the daemon first if it holds it")?;
    let bytes = export::encode(&snapshot, store::unix_seconds(SystemTime::now())).map_err(anyhow::Error::msg)?;
    write_private_atomically(file, &bytes)?;
    println!(
        "exported {} objects from {} to {} ({} bytes)",
        snapshot.object_count(),
        path.display(),
        file.display(),
        bytes.len()
    );
    Ok(())
}

pub fn import(config: &Config, file: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let mut imported = export::decode(&bytes).with_context(|| format!("{} was refused", file.display()))?;
    let now = store::unix_seconds(SystemTime::now());
    let mut objects = 0;
    for (meta, kinds) in imported.sources.values_mut() {
        meta.imported_at = Some(now);
        meta.state = store::LinkState::Unknown;
        objects += kinds.values().map(|k| k.len()).sum::<usize>();
    }
    let sources = imported.sources.len();
    std::fs::create_dir_all(config.store.state_dir())?;
    store::import(config.store.state_dir(), imported.sources)
        .context("import writes the store file; stop the daemon first if it holds it")?;
    println!(
        "imported {objects} objects of {sources} sources (exported at {}) into {}",
        imported.created_at,
        config.store.state_dir().display()
    );
    Ok(())
}

/// Writes a file readable only by its owner: temp file, fsync, rename, directory fsync.
fn write_private_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp =
        dir.join(format!(".{}.tmp", path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename to {}", path.display()))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}
