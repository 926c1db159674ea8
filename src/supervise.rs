//! Living under a service manager: the watchdog health loop, the STATUS= line kept current,
//! and configuration reload on SIGHUP.
//!
//! The watchdog is fed only when the process proves itself: a task spawned on the runtime
//! completes, and the admin endpoint answers `/live` over loopback (its accept loop, the
//! runtime's I/O driver and timers all work). A stuck runtime stops the pings, and systemd
//! restarts the service after `WatchdogSec=`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, watch};

use crate::config::{Config, Source};
use crate::identity::manager::IdentityStatus;
use crate::store::Snapshots;
use crate::systemd::Notifier;

/// What the STATUS= line is made from.
#[derive(Debug, Clone)]
pub struct StatusSources {
    pub snapshots: Snapshots,
    pub identity: watch::Receiver<IdentityStatus>,
}

/// One line an operator understands: sources connected, cache age, certificate validity.
pub fn status_line(sources: &StatusSources, now: SystemTime) -> String {
    let snapshot = sources.snapshots.borrow().clone();
    let total = snapshot.sources().count();
    let connected = snapshot.sources().filter(|(_, view)| view.meta.state.as_str() == "connected").count();
    let cache = match snapshot.age_seconds(now) {
        Some(age) => format!("cache {}", human(age)),
        None => "nothing synced yet".to_owned(),
    };
    let identity = sources.identity.borrow().clone();
    let now_secs = crate::store::unix_seconds(now);
    let certificate = match identity.certificates.iter().map(|c| c.not_after).min() {
        Some(not_after) if not_after > now_secs => format!("certificates valid {}", human(not_after - now_secs)),
        Some(_) => "a certificate has EXPIRED".to_owned(),
        None if !identity.clock_ok => "clock behind: not issuing".to_owned(),
        None => "no certificate yet".to_owned(),
    };
    format!("{connected}/{total} sources connected, {cache} old, {certificate}; {} objects", snapshot.object_count())
}

/// `90s`, `12m`, `5h`, `3d`.
fn human(seconds: u64) -> String {
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// Feeds the watchdog every `interval` after a successful health check, and refreshes STATUS=.
pub async fn health_loop(notifier: Arc<Notifier>, admin: SocketAddr, interval: Duration, status: StatusSources) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        match tokio::time::timeout(interval, healthy(admin)).await {
            Ok(Ok(())) => notifier.watchdog(),
            Ok(Err(e)) => tracing::warn!(error = %e, "health check failed; not feeding the watchdog"),
            Err(_) => tracing::warn!("health check timed out; not feeding the watchdog"),
        }
        notifier.status(&status_line(&status, SystemTime::now()));
    }
}

async fn healthy(admin: SocketAddr) -> std::io::Result<()> {
    tokio::spawn(async {}).await.map_err(std::io::Error::other)?;
    let mut stream = tokio::net::TcpStream::connect(admin).await?;
    stream.write_all(b"GET /live HTTP/1.1\r\nHost: meshkeep\r\nConnection: close\r\n\r\n").await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    if answer.starts_with(b"HTTP/1.1 200") { Ok(()) } else { Err(std::io::Error::other("/live did not answer 200")) }
}

/// Re-reads the configuration on SIGHUP. Live: the log filter and an immediate rescan of the
/// manifest folder. Other changed sections are named as needing a restart. A configuration
/// that no longer loads is reported and the running one kept.
#[derive(Debug)]
pub struct Reloader {
    pub reload_from: Option<PathBuf>,
    pub current: Config,
    pub rescan: Arc<Notify>,
    pub notifier: Arc<Notifier>,
    pub status: StatusSources,
}

impl Reloader {
    pub fn reload(&mut self) {
        self.notifier.reloading();
        match Source::from_process(self.reload_from.clone()).load() {
            Err(e) => {
                tracing::error!(error = %e, "reload: the configuration is invalid; keeping the running one");
                self.notifier.ready(&format!("reload failed, running the previous configuration: {e}"));
            }
            Ok(loaded) => {
                let new = loaded.config;
                if new.log.filter != self.current.log.filter {
                    crate::logging::set_filter(new.log.filter.as_str());
                    tracing::info!(filter = new.log.filter.as_str(), "reload: log filter applied");
                }
                self.rescan.notify_one();
                let restart = changed_sections(&self.current, &new);
                if restart.is_empty() {
                    tracing::info!("reload: configuration re-read, manifests rescanned");
                } else {
                    tracing::warn!(sections = %restart.join(", "), "reload: these changes apply at the next restart");
                }
                self.current.log = new.log.clone();
                let line = status_line(&self.status, SystemTime::now());
                let pending = if restart.is_empty() {
                    String::new()
                } else {
                    format!("; restart to apply [{}]", restart.join(", "))
                };
                self.notifier.ready(&format!("reloaded: {line}{pending}"));
            }
        }
    }
}

/// Sections that differ, other than those a reload applies (log).
fn changed_sections(old: &Config, new: &Config) -> Vec<&'static str> {
    let value = |c: &Config| serde_json::to_value(c).unwrap_or_default();
    let (old, new) = (value(old), value(new));
    let sections = [
        "runtime",
        "node",
        "admin",
        "store",
        "upstream",
        "discovery",
        "identity",
        "proxy",
        "redirect",
        "dns",
        "traffic",
        "policy",
    ];
    sections.into_iter().filter(|s| old.get(s) != new.get(s)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_sections_are_named() {
        let old = Config::default();
        let mut new = Config::default();
        new.dns.short_names = false;
        new.log.filter = "debug".parse().unwrap();
        assert_eq!(changed_sections(&old, &new), vec!["dns"]);
        assert!(changed_sections(&old, &old).is_empty());
    }

    #[test]
    fn durations_read_like_an_operator_would_say_them() {
        assert_eq!(human(42), "42s");
        assert_eq!(human(600), "10m");
        assert_eq!(human(86_400), "24h");
        assert_eq!(human(5 * 86_400), "5d");
    }
}
