//! The peer proxies meshkeep is measured against: two HAProxy instances and two nginx instances,
//! each pair set up like two meshkeep boxes. Instance A takes plaintext from the client, speaks
//! mutual TLS 1.3 (ECDSA P-256, the key type of mesh identities) to instance B, and B forwards
//! plaintext to the server. Every instance gets one thread, like each meshkeep box in the run.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::support::free_addr;

/// Where a path's client connects for each kind of load.
#[derive(Clone)]
pub struct Entry {
    /// HTTP/1.1 with keep-alive.
    pub h1: String,
    /// HTTP/2 with prior knowledge.
    pub h2: String,
    /// Opaque TCP (TLS between the proxies, no HTTP awareness) to the HTTP server.
    pub tcp_http: SocketAddr,
    /// Opaque TCP to the iperf3 server.
    pub tcp_iperf: SocketAddr,
}

/// A running pair of peer proxies; killed when dropped.
pub struct Pair {
    pub entry: Entry,
    children: Vec<Child>,
    _dir: tempfile::TempDir,
}

impl Pair {
    /// Each instance's processes, A first (an nginx master and its workers).
    pub fn instances(&self) -> Vec<Vec<u32>> {
        self.children.iter().rev().map(|c| super::process_tree(c.id())).collect()
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = child.wait();
        }
    }
}

/// The certificates both pairs use: a root and one leaf per instance, ECDSA P-256.
struct Certs {
    ca: PathBuf,
    a: (PathBuf, PathBuf),
    b: (PathBuf, PathBuf),
}

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl is installed");
    assert!(output.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

impl Certs {
    fn generate(dir: &Path) -> Self {
        openssl(dir, &["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key"]);
        openssl(
            dir,
            &["req", "-x509", "-new", "-key", "ca.key", "-subj", "/CN=bench-root", "-days", "2", "-out", "ca.crt"],
        );
        for name in ["a", "b"] {
            let (key, csr, crt, ext) =
                (format!("{name}.key"), format!("{name}.csr"), format!("{name}.crt"), format!("{name}.ext"));
            openssl(dir, &["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", &key]);
            openssl(dir, &["req", "-new", "-key", &key, "-subj", &format!("/CN={name}.bench"), "-out", &csr]);
            std::fs::write(
                dir.join(&ext),
                format!("subjectAltName=DNS:{name}.bench\nextendedKeyUsage=serverAuth,clientAuth\n"),
            )
            .unwrap();
            openssl(
                dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.crt",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-days",
                    "2",
                    "-extfile",
                    &ext,
                    "-out",
                    &crt,
                ],
            );
            // HAProxy wants the certificate and its key in one file.
            let pem = [std::fs::read(dir.join(&crt)).unwrap(), std::fs::read(dir.join(&key)).unwrap()].concat();
            std::fs::write(dir.join(format!("{name}.pem")), pem).unwrap();
        }
        Self {
            ca: dir.join("ca.crt"),
            a: (dir.join("a.crt"), dir.join("a.key")),
            b: (dir.join("b.crt"), dir.join("b.key")),
        }
    }

    /// HAProxy's combined certificate-and-key file for instance `name`.
    fn pem(&self, name: &str) -> PathBuf {
        self.ca.with_file_name(format!("{name}.pem"))
    }
}

/// The ports B listens on for A (TLS), one per kind of traffic.
struct Hops {
    http: SocketAddr,
    tcp_http: SocketAddr,
    tcp_iperf: SocketAddr,
}

fn entry() -> Entry {
    Entry {
        h1: format!("http://{}/", free_addr()),
        h2: format!("http://{}/", free_addr()),
        tcp_http: free_addr(),
        tcp_iperf: free_addr(),
    }
}

fn url_addr(url: &str) -> &str {
    url.trim_start_matches("http://").trim_end_matches('/')
}

/// Starts a process and waits until every address it should listen on accepts connections.
fn spawn(command: &mut Command, listening: &[SocketAddr], log: &Path) -> Child {
    let log_file = std::fs::File::create(log).unwrap();
    let child = command
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .unwrap_or_else(|e| panic!("{command:?}: {e} (scripts/bench-proxy.sh installs the peers)"));
    let deadline = Instant::now() + Duration::from_secs(10);
    for addr in listening {
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "{command:?} did not listen on {addr}: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    child
}

/// Writes both instances' configurations and starts B, then A, each once it listens.
fn start_pair(
    dir: tempfile::TempDir,
    entry: Entry,
    hops: &Hops,
    [a, b]: [String; 2],
    extension: &str,
    command: impl Fn(&Path) -> Command,
) -> Pair {
    let mut children = Vec::new();
    for (name, config, listening) in [
        ("b", b, vec![hops.http, hops.tcp_http, hops.tcp_iperf]),
        ("a", a, vec![url_addr(&entry.h1).parse().unwrap(), entry.tcp_http, entry.tcp_iperf]),
    ] {
        let path = dir.path().join(format!("{name}.{extension}"));
        std::fs::write(&path, config).unwrap();
        let log = dir.path().join(format!("{name}.log"));
        children.push(spawn(&mut command(&path), &listening, &log));
    }
    Pair { entry, children, _dir: dir }
}

/// Two HAProxy 2.x instances. A's HTTP frontend detects HTTP/2 prior knowledge by itself, and
/// A multiplexes requests over reused HTTP/2 connections to B, as meshkeep does.
pub fn haproxy(http_server: SocketAddr, iperf_server: SocketAddr) -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(dir.path());
    let entry = entry();
    let hops = Hops { http: free_addr(), tcp_http: free_addr(), tcp_iperf: free_addr() };
    let common = "global\n    nbthread 1\n    maxconn 8000\n\
                  defaults\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n    maxconn 8000\n";
    let ca = certs.ca.display();
    let client_tls = format!(
        "ssl crt {} ca-file {ca} verify required verifyhost b.bench sni str(b.bench) ssl-min-ver TLSv1.3",
        certs.pem("a").display()
    );
    let server_tls = format!("ssl crt {} ca-file {ca} verify required ssl-min-ver TLSv1.3", certs.pem("b").display());
    let a = format!(
        "{common}\
         frontend http\n    mode http\n    bind {h1}\n    bind {h2}\n    default_backend peer\n\
         backend peer\n    mode http\n    http-reuse always\n    server b {hop} {client_tls} alpn h2\n\
         listen tcp_http\n    mode tcp\n    bind {tcp_http}\n    server b {hop_tcp_http} {client_tls}\n\
         listen tcp_iperf\n    mode tcp\n    bind {tcp_iperf}\n    server b {hop_tcp_iperf} {client_tls}\n",
        h1 = url_addr(&entry.h1),
        h2 = url_addr(&entry.h2),
        hop = hops.http,
        tcp_http = entry.tcp_http,
        hop_tcp_http = hops.tcp_http,
        tcp_iperf = entry.tcp_iperf,
        hop_tcp_iperf = hops.tcp_iperf,
    );
    let b = format!(
        "{common}\
         frontend http\n    mode http\n    bind {hop} {server_tls} alpn h2,http/1.1\n    default_backend app\n\
         backend app\n    mode http\n    http-reuse always\n    server app {http_server}\n\
         listen tcp_http\n    mode tcp\n    bind {hop_tcp_http} {server_tls}\n    server app {http_server}\n\
         listen tcp_iperf\n    mode tcp\n    bind {hop_tcp_iperf} {server_tls}\n    server app {iperf_server}\n",
        hop = hops.http,
        hop_tcp_http = hops.tcp_http,
        hop_tcp_iperf = hops.tcp_iperf,
    );
    start_pair(dir, entry, &hops, [a, b], "cfg", |config| {
        let mut command = Command::new("haproxy");
        command.arg("-db").arg("-f").arg(config);
        command
    })
}

/// Two nginx instances. nginx proxies to its upstreams with HTTP/1.1 only, so A keeps a pool
/// of kept-alive TLS connections to B; HTTP/2 prior knowledge needs its own listener in 1.22.
/// Opaque TCP goes through the stream module.
pub fn nginx(http_server: SocketAddr, iperf_server: SocketAddr) -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(dir.path());
    let entry = entry();
    let hops = Hops { http: free_addr(), tcp_http: free_addr(), tcp_iperf: free_addr() };
    let stream_module = ["/usr/lib/nginx/modules/ngx_stream_module.so"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("nginx's stream module (libnginx-mod-stream)");
    let (a_crt, a_key) = (certs.a.0.display(), certs.a.1.display());
    let (b_crt, b_key) = (certs.b.0.display(), certs.b.1.display());
    let ca = certs.ca.display();
    let instance = |name: &str, http: String, stream: String| {
        let work = dir.path().join(name);
        std::fs::create_dir_all(&work).unwrap();
        let work = work.display();
        format!(
            "load_module {stream_module};\nworker_processes 1;\nworker_rlimit_nofile 16384;\npid {work}/nginx.pid;\n\
             error_log {work}/error.log warn;\nevents {{ worker_connections 8000; }}\n\
             http {{\n    access_log off;\n    client_body_temp_path {work}/body;\n    proxy_temp_path {work}/proxy;\n\
             \x20   keepalive_requests 1000000;\n{http}}}\nstream {{\n{stream}}}\n"
        )
    };
    let client_tls = format!(
        "proxy_ssl_certificate {a_crt}; proxy_ssl_certificate_key {a_key}; proxy_ssl_trusted_certificate {ca};\n\
         \x20       proxy_ssl_verify on; proxy_ssl_name b.bench; proxy_ssl_server_name on; proxy_ssl_protocols TLSv1.3;\n"
    );
    let server_tls = format!(
        "ssl_certificate {b_crt}; ssl_certificate_key {b_key}; ssl_client_certificate {ca};\n\
         \x20       ssl_verify_client on; ssl_protocols TLSv1.3;\n"
    );
    let a = instance(
        "a",
        format!(
            "    upstream peer {{ server {hop}; keepalive 128; keepalive_requests 1000000; }}\n\
             \x20   server {{\n        listen {h1};\n        listen {h2} http2;\n        location / {{\n\
             \x20           proxy_pass https://peer; proxy_http_version 1.1; proxy_set_header Connection \"\";\n\
             \x20           {client_tls}        }}\n    }}\n",
            hop = hops.http,
            h1 = url_addr(&entry.h1),
            h2 = url_addr(&entry.h2),
        ),
        format!(
            "    server {{ listen {tcp_http}; proxy_pass {hop_tcp_http}; proxy_ssl on;\n        {client_tls}    }}\n\
             \x20   server {{ listen {tcp_iperf}; proxy_pass {hop_tcp_iperf}; proxy_ssl on;\n        {client_tls}    }}\n",
            tcp_http = entry.tcp_http,
            hop_tcp_http = hops.tcp_http,
            tcp_iperf = entry.tcp_iperf,
            hop_tcp_iperf = hops.tcp_iperf,
        ),
    );
    let b = instance(
        "b",
        format!(
            "    upstream app {{ server {http_server}; keepalive 128; keepalive_requests 1000000; }}\n\
             \x20   server {{\n        listen {hop} ssl;\n        {server_tls}        location / {{\n\
             \x20           proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\";\n\
             \x20       }}\n    }}\n",
            hop = hops.http,
        ),
        format!(
            "    server {{ listen {hop_tcp_http} ssl; proxy_pass {http_server};\n        {server_tls}    }}\n\
             \x20   server {{ listen {hop_tcp_iperf} ssl; proxy_pass {iperf_server};\n        {server_tls}    }}\n",
            hop_tcp_http = hops.tcp_http,
            hop_tcp_iperf = hops.tcp_iperf,
        ),
    );
    start_pair(dir, entry, &hops, [a, b], "conf", |config| {
        let mut command = Command::new("nginx");
        command.arg("-c").arg(config).args(["-g", "daemon off;"]);
        command
    })
}
