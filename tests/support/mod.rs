//! Test harness: runs the real meshkeep binary as a child process on loopback ports.

#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod cluster;
pub mod fake_kube;
pub mod mesh;
pub mod netns;
pub mod objects;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The daemons' log filter when set (benchmarks log less than tests).
pub static LOG_FILTER: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// Generous, because the suite also runs under qemu-user emulation.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// The meshkeep binary under test.
pub fn binary() -> &'static str {
    // MESHKEEP_BINARY runs another build, e.g. the static musl release the packages carry.
    static BINARY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BINARY
        .get_or_init(|| std::env::var("MESHKEEP_BINARY").unwrap_or_else(|_| env!("CARGO_BIN_EXE_meshkeep").to_owned()))
}

/// Ports this test process has handed out: never twice, so daemons started side by side (or
/// in one network namespace) cannot be given the same port.
static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());

fn first_time(addr: SocketAddr) -> bool {
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    if handed_out.contains(&addr.port()) {
        return false;
    }
    handed_out.push(addr.port());
    true
}

/// Ports handed to daemons come from below the kernel's ephemeral range (32768-60999 by
/// default): a port picked here and bound by the daemon a moment later cannot meanwhile be given
/// to another test's `bind(0)` or outgoing connection.
const PORTS: std::ops::Range<u16> = 20_000..32_768;

/// An address on `ip` whose port is free for TCP (and for UDP too when `udp`), never handed out
/// before in this process.
pub fn free_port_on(ip: [u8; 4], udp: bool) -> SocketAddr {
    use std::hash::{BuildHasher, Hasher};
    loop {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(std::process::id().into());
        let port = PORTS.start + (hasher.finish() % u64::from(PORTS.end - PORTS.start)) as u16;
        let addr = SocketAddr::from((ip, port));
        if TcpListener::bind(addr).is_err() || (udp && std::net::UdpSocket::bind(addr).is_err()) {
            continue;
        }
        if first_time(addr) {
            return addr;
        }
    }
}

/// A loopback address with a port that was free a moment ago.
pub fn free_addr() -> SocketAddr {
    free_port_on([127, 0, 0, 1], false)
}

/// A loopback address whose port was free a moment ago for both TCP and UDP (for DNS).
pub fn free_udp_and_tcp_addr() -> SocketAddr {
    free_port_on([127, 0, 0, 1], true)
}

/// A running meshkeep daemon in its own temporary directory.
pub struct Daemon {
    child: Child,
    pub admin: SocketAddr,
    /// The DNS server's address (UDP and TCP).
    pub dns: SocketAddr,
    pub dir: tempfile::TempDir,
    config_path: Option<PathBuf>,
    env: Vec<(String, String)>,
    netns: Option<String>,
}

/// How to start a daemon.
pub struct DaemonBuilder {
    config: Option<String>,
    env: Vec<(String, String)>,
    netns: Option<String>,
}

impl DaemonBuilder {
    /// Extra configuration appended to the generated file; `None` runs the embedded default.
    pub fn config(mut self, toml: &str) -> Self {
        self.config = Some(toml.to_owned());
        self
    }

    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.push((key.to_owned(), value.into()));
        self
    }

    /// Runs the daemon inside a named network namespace (see `netns::Lab`); talk to its admin
    /// endpoint from a thread in that namespace (`Lab::within`).
    pub fn netns(mut self, name: &str) -> Self {
        self.netns = Some(name.to_owned());
        self
    }

    pub fn spawn(self) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let admin = free_addr();
        let config_path = self.config.as_ref().map(|extra| {
            let state = dir.path().join("state");
            let path = dir.path().join("config.toml");
            std::fs::write(
                &path,
                format!("[store]\nstate_dir = {:?}\nflush_interval = \"100ms\"\n{extra}", state.display().to_string()),
            )
            .expect("write config");
            path
        });
        // A DNS port of its own (kept across respawns), unless the test chose one.
        let mut env = vec![("MESHKEEP_DNS_LISTEN".to_owned(), free_udp_and_tcp_addr().to_string())];
        env.extend(self.env);
        let dns = env.iter().rev().find(|(k, _)| k == "MESHKEEP_DNS_LISTEN").and_then(|(_, v)| v.parse().ok()).unwrap();
        let child = launch(dir.path(), admin, config_path.as_deref(), &env, self.netns.as_deref());
        Daemon { child, admin, dns, dir, config_path, env, netns: self.netns }
    }
}

/// Starts `meshkeep run` in `dir` with a clean environment and logs in `dir/stderr.log`.
fn launch(
    dir: &Path,
    admin: SocketAddr,
    config: Option<&Path>,
    env: &[(String, String)],
    netns: Option<&str>,
) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("stderr.log")).expect("stderr log");
    let mut command = match netns {
        // `ip netns exec` execs the program in place, so the child's pid is the daemon's.
        Some(netns) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", netns]).arg(binary());
            command
        }
        None => Command::new(binary()),
    };
    command
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("MESHKEEP_LOG", LOG_FILTER.get().copied().unwrap_or("debug,kube=info,hyper=info"))
        .env("MESHKEEP_ADMIN_LISTEN", admin.to_string())
        // As systemd's RuntimeDirectory= would: each daemon gets its own identity socket.
        .env("RUNTIME_DIRECTORY", dir)
        // Proxy ports of their own, so daemons run side by side; tests that care set them.
        .env("MESHKEEP_PROXY_OUTBOUND_LISTEN", free_addr().to_string())
        .env("MESHKEEP_PROXY_INBOUND_LISTEN", free_addr().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log));
    if let Some(path) = config {
        command.arg("--config").arg(path);
    }
    command.envs(env.iter().map(|(k, v)| (k, v)));
    command.arg("run");
    command.spawn().expect("spawn meshkeep")
}

impl Daemon {
    pub fn builder() -> DaemonBuilder {
        DaemonBuilder { config: None, env: Vec::new(), netns: None }
    }

    /// Starts a daemon with the given extra configuration and waits until /ready is 200.
    pub fn start(config: &str) -> Daemon {
        let mut daemon = Self::builder().config(config).spawn();
        daemon.wait_ready();
        daemon
    }

    /// Starts the daemon again in the same directory with the same configuration (the
    /// previous process must have exited or been killed).
    pub fn respawn(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = launch(self.dir.path(), self.admin, self.config_path.as_deref(), &self.env, self.netns.as_deref());
    }

    /// Kills the daemon with SIGKILL and reaps it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Runs a meshkeep command against this daemon (its configuration and admin address).
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        let mut full = Vec::new();
        let config = self.config_path.as_ref().map(|p| p.display().to_string());
        if let Some(config) = &config {
            full.extend(["--config", config.as_str()]);
        }
        full.extend_from_slice(args);
        meshkeep(self.dir.path(), &full, &[("MESHKEEP_ADMIN_LISTEN", &self.admin.to_string())])
    }

    /// The configuration file, if the daemon has one.
    pub fn config_path(&self) -> Option<&Path> {
        self.config_path.as_deref()
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Polls /ready until it answers 200; panics with the daemon's log otherwise.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("meshkeep exited early with {status}\n{}", self.log());
            }
            if let Ok((200, _)) = http_get(self.admin, "/ready") {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("meshkeep was not ready within {STARTUP_TIMEOUT:?}\n{}", self.log());
    }

    /// GET on the admin endpoint.
    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path).unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", self.log()))
    }

    pub fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).expect("signal meshkeep");
    }

    /// Waits for the process to exit, panicking after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                panic!("meshkeep did not exit within {timeout:?}\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.1 GET with `Connection: close`, returning status and body.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    parse_response(&response)
}

/// Splits a complete HTTP/1.1 response into status and body (Content-Length or close-delimited).
pub fn parse_response(response: &str) -> std::io::Result<(u16, String)> {
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, format!("bad response: {response:?}"));
    let (head, body) = response.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    Ok((status, body.to_owned()))
}

/// Runs the meshkeep binary with arguments in a directory, with a clean environment.
pub fn meshkeep(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(binary())
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .args(args)
        .output()
        .expect("run meshkeep")
}

/// Whether a host tool exists; tests that need it fail loudly when it does not, because the
/// test command installs it.
pub fn require_tool(tool: &str) -> PathBuf {
    let paths = std::env::var("PATH").unwrap_or_default();
    std::env::split_paths(&paths)
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| panic!("{tool} is not installed; run the README's test command, which installs it"))
}

impl Daemon {
    /// `/resolve?name=` as JSON.
    pub fn resolve(&self, name: &str) -> serde_json::Value {
        let (status, body) = self.get(&format!("/resolve?name={name}"));
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("resolve JSON")
    }

    /// `/status` as JSON.
    pub fn status(&self) -> serde_json::Value {
        let (status, body) = self.get("/status");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("status JSON")
    }

    /// Polls `condition` until it holds, panicking with `what` and the log after `timeout`.
    pub fn wait_for(&self, what: &str, timeout: Duration, mut condition: impl FnMut(&Daemon) -> bool) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if condition(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("timed out after {timeout:?} waiting for: {what}\n{}", self.log());
    }

    /// The state directory the harness configured.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }
}

/// Endpoint addresses of a `/resolve` answer, sorted; `None` when not found or unknown.
pub fn endpoint_ips(lookup: &serde_json::Value) -> Option<Vec<String>> {
    if lookup["result"] != "found" {
        return None;
    }
    let mut ips: Vec<String> = lookup["endpoints"]
        .as_array()?
        .iter()
        .flat_map(|e| e["addresses"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect();
    ips.sort();
    Some(ips)
}

/// Reports a test that cannot run here. Written straight to stderr, past the test harness's
/// output capture, so a skip is always visible in the log and never passes silently.
pub fn skip(reason: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "SKIPPED: {reason}");
}
