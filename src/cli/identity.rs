//! `meshkeep identity show` and `meshkeep identity issue`.

use std::path::Path;
use std::time::SystemTime;

use anyhow::{Context as _, bail};

use super::Output;
use super::client::{self, ClientError};
use crate::config::Config;
use crate::identity::clock::SystemClock;
use crate::identity::manager::{IdentityStatus, Manager};
use crate::identity::{self, IdentityName, fmt_time};
use crate::status::Status;
use crate::store::Snapshot;

fn open_manager(config: &Config) -> anyhow::Result<Manager<SystemClock>> {
    let dir = config.store.state_dir().join("identity");
    let mut manager = Manager::open(identity::settings(config), &dir, SystemClock)
        .with_context(|| format!("cannot open {}", dir.display()))?;
    // Issuer files, when configured, take effect without the daemon.
    manager.select_issuer(&Snapshot::default());
    Ok(manager)
}

/// The identity state from the daemon, or from the state directory when it is stopped.
fn status(config: &Config) -> anyhow::Result<(IdentityStatus, &'static str)> {
    match client::get(config.admin.listen, "/status") {
        Ok((200, body)) => {
            let status: Status = serde_json::from_str(&body).context("daemon sent an unreadable /status")?;
            Ok((status.identity.unwrap_or_default(), "daemon"))
        }
        Ok((code, body)) => bail!("daemon answered /status with {code}: {}", body.trim()),
        Err(ClientError::Unreachable { .. }) => {
            Ok((open_manager(config)?.status(), "state directory (daemon not running)"))
        }
        Err(e) => Err(e.into()),
    }
}

pub fn show(config: &Config, output: Output) -> anyhow::Result<()> {
    let (status, from) = status(config)?;
    if let Output::Json = output {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    let at = |t: u64| fmt_time(std::time::UNIX_EPOCH + std::time::Duration::from_secs(t));
    println!("from          {from}");
    match (&status.issuer_origin, &status.issuer_subject, status.issuer_not_after) {
        (Some(origin), Some(subject), Some(not_after)) => {
            println!("issuer        {subject}");
            println!("  origin      {origin:?}");
            println!("  expires     {}{}", at(not_after), if status.issuer_expiring_soon { "  (soon)" } else { "" });
        }
        _ => println!("issuer        none yet"),
    }
    println!(
        "clock         {}",
        if status.clock_ok { "ok".to_owned() } else { format!("BEHIND {}: nothing is issued", at(status.time_floor)) }
    );
    for cert in &status.certificates {
        println!("certificate   {}{}", cert.identity, if cert.proxy { "  (proxy)" } else { "" });
        println!("  spiffe id   {}", cert.spiffe_id);
        println!("  valid       {} to {}", at(cert.not_before), at(cert.not_after));
        println!("  renews at   {}", at(cert.renew_at));
    }
    if let Some(error) = &status.last_error {
        println!("last error    {error}");
    }
    Ok(())
}

/// Issues a certificate from the cached (or configured) issuer into `out`: tls.crt (leaf and
/// chain), tls.key (0600) and ca.crt.
pub fn issue(config: &Config, namespace: &str, service_account: &str, out: &Path) -> anyhow::Result<()> {
    let manager = open_manager(config)?;
    let Some(issuer) = manager.issuer() else {
        bail!(
            "no issuer is cached in {}: start the daemon once, or configure identity.issuer_certificate",
            config.store.state_dir().display()
        );
    };
    let settings = manager.settings();
    let name = IdentityName::new(namespace, service_account, &settings.trust_domain, &settings.control_plane_namespace);
    let leaf = issuer.issue(&name, SystemTime::now(), settings.lifetime, settings.skew)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    identity::files::write_atomic(&out.join("tls.key"), leaf.key_pem.as_bytes(), 0o600)?;
    identity::files::write_atomic(&out.join("tls.crt"), leaf.chain_pem().as_bytes(), 0o644)?;
    identity::files::write_atomic(&out.join("ca.crt"), leaf.trust_anchors_pem().as_bytes(), 0o644)?;
    println!("issued {} ({})", name.dns_name(), name.spiffe_id());
    println!("valid until {}", fmt_time(leaf.info.not_after));
    println!("wrote {}/tls.crt, tls.key, ca.crt", out.display());
    Ok(())
}
