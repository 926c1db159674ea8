//! `meshkeep status`, `check`, `stat`, `top` and `endpoints`: whether the box is healthy and
//! why not, and what its traffic looks like. All of them read the running daemon's admin endpoint; `check`
//! also looks at the machine itself (state directory, clock) so it helps when the daemon will
//! not start.

use std::fmt::Write as _;
use std::io::IsTerminal as _;
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, bail};
use serde::Serialize;

use super::Output;
use super::client::{self, ClientError};
use crate::config::Config;
use crate::proxy::stats::Row;
use crate::status::{self, Status};
use crate::store::unix_seconds;

/// Below this much free space in the state directory, `check` fails.
const MIN_FREE_BYTES: u64 = 64 * 1024 * 1024;
/// A complete sync older than this is worth a warning in `status`.
const STALE_CACHE: Duration = Duration::from_secs(3600);

/// Terminal styling: colour only when stdout is a terminal (and NO_COLOR is not set).
#[derive(Debug, Clone, Copy)]
struct Style {
    color: bool,
}

impl Style {
    fn detect() -> Self {
        Self { color: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none() }
    }

    fn paint(self, text: &str, level: Level) -> String {
        if !self.color {
            return text.to_owned();
        }
        let code = match level {
            Level::Pass => "32",
            Level::Warn => "33",
            Level::Fail => "31",
        };
        format!("\x1b[{code}m{text}\x1b[0m")
    }
}

/// How a finding weighs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Pass,
    Warn,
    Fail,
}

impl Level {
    fn word(self) -> &'static str {
        match self {
            Level::Pass => "PASS",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        }
    }
}

/// One line of `check`, and a reason in `status`.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub check: String,
    pub level: Level,
    pub detail: String,
    /// What to do about it; empty when it passed.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub hint: String,
}

fn finding(check: &str, level: Level, detail: impl Into<String>, hint: &str) -> Finding {
    Finding { check: check.to_owned(), level, detail: detail.into(), hint: hint.to_owned() }
}

/// What the daemon's status report says about its health. Pure, so it is table-tested.
pub fn assess(status: &Status) -> Vec<Finding> {
    let mut findings = Vec::new();
    if status.process.ready {
        findings.push(finding("listeners", Level::Pass, "store loaded and every listener bound", ""));
    } else {
        findings.push(finding(
            "listeners",
            Level::Fail,
            format!("not ready, waiting for {}", status.process.pending.join(", ")),
            "see `journalctl -u meshkeep` for the listener or store that failed",
        ));
    }
    if let Some(moved) = &status.process.store_quarantined {
        findings.push(finding(
            "store",
            Level::Warn,
            format!("a damaged store was moved aside: {moved}"),
            "the data is refetched from the links; keep the moved file for a bug report",
        ));
    }
    if status.sources.is_empty() {
        findings.push(finding(
            "sources",
            Level::Warn,
            "no links and no manifest folder",
            "configure [upstream.links.<name>] or [upstream.local] path",
        ));
    }
    for source in &status.sources {
        let name = format!("source {}", source.source);
        let contact =
            source.last_contact.map_or("never".to_owned(), |t| format!("{}s ago", status.now.saturating_sub(t)));
        match (source.state.as_str(), &source.last_error) {
            ("connected", None) => {
                findings.push(finding(&name, Level::Pass, format!("connected, last contact {contact}"), ""))
            }
            ("connected", Some(error)) => {
                findings.push(finding(&name, Level::Warn, format!("connected, last error: {error}"), ""))
            }
            (state, error) => {
                let error = error.as_deref().unwrap_or("no error recorded");
                let hint = if error.contains("401") || error.contains("403") || error.contains("Forbidden") {
                    "the API server refused the credentials: check the token or kubeconfig and its RBAC"
                } else if source.last_full_sync.is_some() {
                    "serving from the cache; check the network path to the API server"
                } else {
                    "never synced: check the API server address, the network and the credentials"
                };
                findings.push(finding(&name, Level::Fail, format!("{state} (last contact {contact}): {error}"), hint));
            }
        }
        if !source.unknown_kinds.is_empty() && source.last_full_sync.is_some() {
            findings.push(finding(
                &name,
                Level::Warn,
                format!("never listed: {}", source.unknown_kinds.join(", ")),
                "answers that need these kinds are unknown until they sync",
            ));
        }
    }
    match status.snapshot.age_seconds {
        Some(age) if age > STALE_CACHE.as_secs() => findings.push(finding(
            "cache",
            Level::Warn,
            format!("last complete sync {age}s ago"),
            "the box serves from an old cache: see the sources above",
        )),
        Some(age) => findings.push(finding("cache", Level::Pass, format!("last complete sync {age}s ago"), "")),
        None if !status.sources.is_empty() => findings.push(finding(
            "cache",
            Level::Fail,
            "nothing has ever synced",
            "nothing can be answered until a source syncs once",
        )),
        None => {}
    }
    if let Some(identity) = &status.identity {
        if identity.clock_ok {
            findings.push(finding("clock", Level::Pass, "not behind the time floor", ""));
        } else {
            findings.push(finding(
                "clock",
                Level::Fail,
                format!("behind the time floor {}", fmt_unix(identity.time_floor)),
                "set the clock (NTP or RTC): no certificate is issued until then",
            ));
        }
        match identity.issuer_not_after {
            Some(not_after) if not_after <= status.now => findings.push(finding(
                "issuer",
                Level::Fail,
                format!("expired {}", fmt_unix(not_after)),
                "install a new issuer (upstream Secret or [identity] issuer files)",
            )),
            Some(not_after) if identity.issuer_expiring_soon => findings.push(finding(
                "issuer",
                Level::Warn,
                format!("expires soon, {}", fmt_unix(not_after)),
                "rotate the issuer before it expires",
            )),
            Some(not_after) => {
                findings.push(finding("issuer", Level::Pass, format!("valid until {}", fmt_unix(not_after)), ""))
            }
            None => findings.push(finding(
                "issuer",
                Level::Fail,
                "no issuer",
                "configure [identity] issuer files or sync an issuer Secret from a link",
            )),
        }
        for cert in &identity.certificates {
            let (level, detail, hint) = if cert.not_after <= status.now {
                (Level::Fail, format!("expired {}", fmt_unix(cert.not_after)), "see the issuer and clock findings")
            } else {
                (Level::Pass, format!("valid until {}", fmt_unix(cert.not_after)), "")
            };
            findings.push(finding(&format!("certificate {}", cert.identity), level, detail, hint));
        }
        if let Some(error) = &identity.last_error {
            findings.push(finding("identity", Level::Warn, format!("last error: {error}"), ""));
        }
    }
    findings
}

fn fmt_unix(t: u64) -> String {
    crate::identity::fmt_time(std::time::UNIX_EPOCH + Duration::from_secs(t))
}

/// The daemon's status report; an unreachable daemon is an error that says what to do.
fn daemon_status(config: &Config) -> anyhow::Result<Status> {
    match client::get(config.admin.listen, "/status") {
        Ok((200, body)) => serde_json::from_str(&body).context("the daemon sent an unreadable /status"),
        Ok((code, body)) => bail!("the daemon answered /status with {code}: {}", body.trim()),
        Err(ClientError::Unreachable { addr, .. }) => bail!(
            "meshkeep is not running (nothing answers on {addr}); start it with `systemctl start meshkeep`, \
             or run `meshkeep cache show` to read the store file"
        ),
        Err(e) => Err(e.into()),
    }
}

fn overall(findings: &[Finding]) -> Level {
    findings.iter().map(|f| f.level).max_by_key(|l| *l as u8).unwrap_or(Level::Pass)
}

/// `meshkeep status`: one screen.
pub fn status(config: &Config, output: Output) -> anyhow::Result<u8> {
    let status = daemon_status(config)?;
    let findings = assess(&status);
    let level = overall(&findings);
    let services = get_rows(config, "/api/stat").unwrap_or_default();
    if let Output::Json = output {
        #[derive(Serialize)]
        struct Report<'a> {
            healthy: bool,
            level: Level,
            findings: &'a [Finding],
            status: &'a Status,
            services: &'a [Row],
        }
        let report =
            Report { healthy: level != Level::Fail, level, findings: &findings, status: &status, services: &services };
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(u8::from(level == Level::Fail));
    }
    let style = Style::detect();
    let headline = match level {
        Level::Pass => "HEALTHY",
        Level::Warn => "HEALTHY, with warnings",
        Level::Fail => "UNHEALTHY",
    };
    println!("{}", style.paint(headline, level));
    for f in findings.iter().filter(|f| f.level != Level::Pass) {
        println!("  {} {}: {}", style.paint(f.level.word(), f.level), f.check, f.detail);
        if !f.hint.is_empty() {
            println!("       -> {}", f.hint);
        }
    }
    println!();
    print!("{}", status::render(&status));
    if !services.is_empty() {
        println!();
        print!("{}", stat_table(&services[..services.len().min(10)]));
    }
    Ok(u8::from(level == Level::Fail))
}

/// `meshkeep check`: preflight and health checks, one line each; non-zero on any failure.
pub fn check(config: &Config, output: Output) -> anyhow::Result<u8> {
    let mut findings = vec![finding("config", Level::Pass, "valid", "")];
    findings.push(state_dir_finding(config.store.state_dir()));
    findings.push(clock_finding(SystemTime::now()));
    match daemon_status(config) {
        Ok(status) => findings.extend(assess(&status)),
        Err(e) => findings.push(finding("daemon", Level::Fail, e.to_string(), "")),
    }
    let failed = findings.iter().any(|f| f.level == Level::Fail);
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&findings)?),
        Output::Text => {
            let style = Style::detect();
            let width = findings.iter().map(|f| f.check.len()).max().unwrap_or(0);
            for f in &findings {
                println!("{} {:<width$}  {}", style.paint(f.level.word(), f.level), f.check, f.detail);
                if !f.hint.is_empty() {
                    println!("     {:<width$}  -> {}", "", f.hint);
                }
            }
        }
    }
    Ok(u8::from(failed))
}

/// The state directory exists (or can be created), is writable, and has room.
fn state_dir_finding(dir: &Path) -> Finding {
    let probe = dir.join(format!(".meshkeep-check-{}", std::process::id()));
    let writable = std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&probe, b"check"));
    let _ = std::fs::remove_file(&probe);
    if let Err(e) = writable {
        return finding(
            "state directory",
            Level::Fail,
            format!("{} is not writable: {e}", dir.display()),
            "it must be a directory the daemon's user owns (systemd: StateDirectory=meshkeep)",
        );
    }
    match nix::sys::statvfs::statvfs(dir) {
        Ok(stats) => {
            // The field types differ by target (c_ulong is 32 bits on armv7).
            #[allow(clippy::useless_conversion)]
            let free = u64::from(stats.blocks_available()).saturating_mul(u64::from(stats.fragment_size()));
            if free < MIN_FREE_BYTES {
                finding(
                    "state directory",
                    Level::Fail,
                    format!("{}: only {} MiB free", dir.display(), free / (1024 * 1024)),
                    "free space there: the store and identity files need room to commit",
                )
            } else {
                finding(
                    "state directory",
                    Level::Pass,
                    format!("{}: writable, {} MiB free", dir.display(), free / (1024 * 1024)),
                    "",
                )
            }
        }
        Err(e) => finding("state directory", Level::Warn, format!("cannot read free space: {e}"), ""),
    }
}

/// The system clock is not before this binary was built.
fn clock_finding(now: SystemTime) -> Finding {
    let built = crate::identity::clock::build_time();
    if now < built {
        return finding(
            "system clock",
            Level::Fail,
            format!(
                "{} is before this binary was built ({})",
                fmt_unix(unix_seconds(now)),
                fmt_unix(unix_seconds(built))
            ),
            "set the clock (NTP or RTC)",
        );
    }
    finding("system clock", Level::Pass, fmt_unix(unix_seconds(now)), "")
}

fn get_rows(config: &Config, path: &str) -> anyhow::Result<Vec<Row>> {
    match client::get(config.admin.listen, path) {
        Ok((200, body)) => serde_json::from_str(&body).with_context(|| format!("the daemon sent an unreadable {path}")),
        Ok((code, body)) => bail!("the daemon answered {path} with {code}: {}", body.trim()),
        Err(ClientError::Unreachable { addr, .. }) => {
            bail!("meshkeep is not running (nothing answers on {addr}); start it with `systemctl start meshkeep`")
        }
        Err(e) => Err(e.into()),
    }
}

/// Aligned columns; the first `left` columns are left-aligned, the rest right-aligned.
fn table(headers: &[&str], rows: &[Vec<String>], left: usize) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let rendered: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| if i < left { format!("{c:<w$}", w = widths[i]) } else { format!("{c:>w$}", w = widths[i]) })
            .collect();
        let _ = writeln!(out, "{}", rendered.join("  ").trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

fn ms(value: Option<f64>) -> String {
    value.map_or("-".to_owned(), |v| if v < 10.0 { format!("{v:.1}ms") } else { format!("{v:.0}ms") })
}

fn percent(value: Option<f64>) -> String {
    value.map_or("-".to_owned(), |v| format!("{:.2}%", v * 100.0))
}

fn stat_table(rows: &[Row]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.direction.clone(),
                r.authority.clone(),
                percent(r.success_rate),
                format!("{:.1}", r.requests_per_second),
                ms(r.p50_ms),
                ms(r.p95_ms),
                ms(r.p99_ms),
            ]
        })
        .collect();
    table(&["DIRECTION", "SERVICE", "SUCCESS", "RPS", "P50", "P95", "P99"], &cells, 2)
}

/// `meshkeep stat [SERVICE]`: golden metrics per service over the last minute.
pub fn stat(config: &Config, service: Option<&str>, output: Output) -> anyhow::Result<()> {
    let mut rows = get_rows(config, "/api/stat")?;
    if let Some(service) = service {
        rows.retain(|r| r.authority.starts_with(service) || r.authority.contains(&format!("{service}.")));
    }
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        Output::Text if rows.is_empty() => {
            println!("no HTTP traffic in the last minute{}", service.map(|s| format!(" for {s}")).unwrap_or_default())
        }
        Output::Text => print!("{}", stat_table(&rows)),
    }
    Ok(())
}

/// `meshkeep top`: the busiest routes, refreshed every two seconds on a terminal; printed once
/// otherwise (or with `--once`).
pub fn top(config: &Config, once: bool, output: Output) -> anyhow::Result<()> {
    let live = !once && matches!(output, Output::Text) && std::io::stdout().is_terminal();
    loop {
        let mut rows = get_rows(config, "/api/top")?;
        rows.truncate(25);
        match output {
            Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
            Output::Text => {
                let cells: Vec<Vec<String>> = rows
                    .iter()
                    .map(|r| {
                        vec![
                            r.direction.clone(),
                            r.authority.clone(),
                            r.route.clone().unwrap_or_default(),
                            format!("{}", r.requests),
                            percent(r.success_rate),
                            ms(r.p50_ms),
                            ms(r.p99_ms),
                        ]
                    })
                    .collect();
                if live {
                    // Clear the screen and go home, then draw.
                    print!("\x1b[2J\x1b[H");
                    println!("meshkeep top: busiest routes, last minute (Ctrl-C quits)\n");
                }
                if cells.is_empty() {
                    println!("no HTTP traffic in the last minute");
                } else {
                    print!(
                        "{}",
                        table(&["DIRECTION", "SERVICE", "ROUTE", "REQUESTS", "SUCCESS", "P50", "P99"], &cells, 3)
                    );
                }
            }
        }
        if !live {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// `meshkeep endpoints SERVICE`: each endpoint's share of requests, latency estimate, state
/// and place, from the running daemon's balancer.
pub fn endpoints(config: &Config, service: &str, output: Output) -> anyhow::Result<()> {
    let path = format!("/api/endpoints?service={}", client::encode_query(service));
    let body = match client::get(config.admin.listen, &path) {
        Ok((200, body)) => body,
        Ok((code, body)) => bail!("the daemon answered {path} with {code}: {}", body.trim()),
        Err(ClientError::Unreachable { addr, .. }) => {
            bail!("meshkeep is not running (nothing answers on {addr}); start it with `systemctl start meshkeep`")
        }
        Err(e) => return Err(e.into()),
    };
    let rows: Vec<crate::admin::EndpointRow> = match serde_json::from_str(&body) {
        Ok(rows) => rows,
        // Not a service: the daemon sent its lookup result (not found, or unknown).
        Err(_) => bail!("{service}: {}", body.trim()),
    };
    if let Output::Json = output {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.authority.clone(),
                r.addr.clone(),
                if r.ready { "ready".into() } else { "not ready".into() },
                r.zone.clone().unwrap_or_else(|| "-".into()),
                r.state.clone(),
                format!("{:.0}%", r.weight * 100.0),
                ms(r.ewma_ms),
                r.pending.to_string(),
                format!("{}/{}", r.failures, r.requests),
            ]
        })
        .collect();
    print!(
        "{}",
        table(&["SERVICE", "ENDPOINT", "READY", "ZONE", "STATE", "WEIGHT", "EWMA", "PENDING", "FAILED"], &cells, 5)
    );
    Ok(())
}

#[cfg(test)]
mod tests;
