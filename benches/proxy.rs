//! meshkeep's overhead on loopback, side by side with the proxies an edge box would otherwise
//! run. Each contender is two instances with mutual TLS 1.3 (ECDSA P-256) between them:
//!
//! - direct: client -> server;
//! - meshkeep: client -> box A outbound -> mTLS -> box B inbound -> server;
//! - haproxy and nginx: client -> A -> TLS -> B -> server (see `peers`).
//!
//! Every proxy instance gets one thread. HTTP load comes from oha: open loop at fixed rates with
//! latency correction, and a closed loop for the maximum; a new-connection case sends each
//! request on its own connection through the opaque TCP path (a TLS handshake between the proxies
//! per request); iperf3 measures opaque TCP throughput. Run with `bash scripts/bench-proxy.sh`,
//! which installs the tools, builds release, runs this and draws the plot.
//!
//! Settings: MESHKEEP_BENCH_SECONDS (per run, default 10), MESHKEEP_BENCH_RATES (default
//! "1000,5000,20000"), MESHKEEP_BENCH_RUNS (default 3; medians are reported with the spread),
//! MESHKEEP_BENCH_CONTENDERS (default "meshkeep,haproxy,nginx"), MESHKEEP_BENCH_HOLD (seconds to
//! keep the warmed contenders up for profiling by hand, then stop), MESHKEEP_BENCH_OUT (the JSON
//! results, default target/bench/proxy.json).

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "proxy/peers.rs"]
mod peers;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use support::mesh::{Boxes, Setup, http_backend, two_boxes_custom};

fn setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A process and its descendants (an nginx master and its workers).
fn process_tree(root: u32) -> Vec<u32> {
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        let children = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")).unwrap_or_default();
        tree.extend(children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
        i += 1;
    }
    tree
}

/// CPU seconds (user + system) the processes have used so far.
fn cpu_seconds(pids: &[u32]) -> f64 {
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
    pids.iter()
        .map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Fields after the command name (which may hold spaces): utime is the 12th, stime the 13th.
            let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
            let fields: Vec<&str> = after.split_whitespace().collect();
            let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            (ticks(11) + ticks(12)) / hz
        })
        .sum()
}

/// A /proc/PID/status memory field in KiB, summed over the processes.
fn status_kib(pids: &[u32], field: &str) -> u64 {
    pids.iter()
        .map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum()
}

const PERCENTILES: [(&str, &str); 5] = [
    ("p50", "/latencyPercentiles/p50"),
    ("p90", "/latencyPercentiles/p90"),
    ("p99", "/latencyPercentiles/p99"),
    ("p99.9", "/latencyPercentiles/p99.9"),
    ("max", "/summary/slowest"),
];

/// What one oha run reports; latencies in milliseconds, in the order of [`PERCENTILES`].
#[derive(Debug, Clone, Default)]
struct Load {
    rps: f64,
    latency_ms: Vec<f64>,
    /// Share of the requests answered with a 2xx: an error answered fast would otherwise count
    /// as fast service.
    success: f64,
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Http1,
    Http2,
    /// HTTP/1.1 with a new connection per request, through the opaque TCP path.
    NewConnection,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Http1 => "HTTP/1.1",
            Mode::Http2 => "HTTP/2",
            Mode::NewConnection => "new connection per request",
        }
    }
}

fn oha(url: &str, mode: Mode, rate: Option<u32>, seconds: u64) -> Load {
    let mut command = Command::new("oha");
    command.args(["--no-tui", "--output-format", "json", "-z", &format!("{seconds}s")]);
    let connections = match (mode, rate) {
        (Mode::NewConnection, _) => 16,
        (_, Some(rate)) if rate <= 2000 => 16,
        _ => 64,
    };
    command.args(["-c", &connections.to_string()]);
    if let Some(rate) = rate {
        // Open loop: requests are sent on schedule, latency counted from when each was due.
        command.args(["-q", &rate.to_string(), "--latency-correction"]);
    }
    match mode {
        Mode::Http1 => {}
        Mode::Http2 => {
            command.args(["--http2", "-p", "8"]);
        }
        Mode::NewConnection => {
            command.arg("--disable-keepalive");
        }
    }
    command.arg(url);
    let output = command.output().expect("oha is installed (scripts/bench-proxy.sh installs it)");
    let json: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("oha output: {e}\n{}", String::from_utf8_lossy(&output.stderr)));
    let number = |pointer: &str| json.pointer(pointer).and_then(serde_json::Value::as_f64).unwrap_or(f64::NAN);
    // oha's success rate counts every answer, whatever its status.
    let statuses = json.pointer("/statusCodeDistribution").and_then(serde_json::Value::as_object);
    let count = |wanted: fn(&str) -> bool| -> f64 {
        statuses.into_iter().flatten().filter(|(code, _)| wanted(code)).filter_map(|(_, n)| n.as_f64()).sum()
    };
    let (answered, ok) = (count(|_| true), count(|code| code.starts_with('2')));
    Load {
        rps: number("/summary/requestsPerSec"),
        latency_ms: PERCENTILES.iter().map(|(_, pointer)| number(pointer) * 1000.0).collect(),
        success: if answered > 0.0 { number("/summary/successRate") * ok / answered } else { 0.0 },
    }
}

/// iperf3 through `addr` for `seconds`, one stream; MiB/s received.
fn iperf(addr: SocketAddr, seconds: u64) -> f64 {
    let output = Command::new("iperf3")
        .args(["-c", &addr.ip().to_string(), "-p", &addr.port().to_string(), "-t", &seconds.to_string(), "-J"])
        .output()
        .expect("iperf3 is installed (scripts/bench-proxy.sh installs it)");
    let json: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("iperf3 output: {e}\n{}", String::from_utf8_lossy(&output.stdout)));
    let bits = json.pointer("/end/sum_received/bits_per_second").and_then(serde_json::Value::as_f64);
    bits.unwrap_or_else(|| panic!("iperf3 through {addr}: {json}")) / 8.0 / 1048576.0
}

/// (median, min, max)
fn median(values: &[f64]) -> (f64, f64, f64) {
    let mut values = values.to_vec();
    values.sort_by(f64::total_cmp);
    (values[values.len() / 2], values[0], values[values.len() - 1])
}

fn spread(values: &[f64], digits: usize) -> String {
    let (median, low, high) = median(values);
    format!("{median:.digits$} ({low:.digits$}–{high:.digits$})")
}

/// One way through: the entry points, and the proxy instances (each a list of processes).
struct Contender {
    name: &'static str,
    entry: peers::Entry,
    /// Where CPU time is counted: each instance's processes.
    instances: Vec<Vec<u32>>,
    /// Where memory is read: the processes of each instance that carry the HTTP load.
    memory: Vec<Vec<u32>>,
    /// Whatever keeps the contender running (daemons, peer processes); dropped to stop it.
    _running: Box<dyn std::any::Any>,
}

impl Contender {
    fn pids(&self) -> Vec<u32> {
        self.instances.concat()
    }

    /// Peak RSS of each instance, in MiB.
    fn peak_rss(&self) -> Vec<f64> {
        self.memory.iter().map(|pids| status_kib(pids, "VmHWM:") as f64 / 1024.0).collect()
    }
}

/// meshkeep's pair for HTTP (detected), and one pair per opaque destination: the boxes'
/// configuration routes one service to one server, and opaque ports are a box-wide setting.
fn meshkeep(http_server: SocketAddr, iperf_server: SocketAddr) -> Contender {
    const ONE_WORKER: &str = "[runtime]\nworkers = 1\n";
    let pair = |server: SocketAddr, proxy_extra: &str| {
        // The manifest folder is read as often as a box reads it by default (the tests' boxes
        // read it every 200 ms). The service port says `appProtocol: http`: box B speaks
        // HTTP/1.1 to the backend for HTTP/2 clients too, as HAProxy's and nginx's B do.
        two_boxes_custom(
            server,
            &Setup {
                tables: ONE_WORKER,
                proxy_extra,
                poll_interval: "2s",
                app_protocol: Some("http"),
                ..Setup::default()
            },
        )
    };
    let http = pair(http_server, "");
    let opaque = |server: SocketAddr| pair(server, &format!("opaque_ports = [{}]\n", server.port()));
    let tcp_http = opaque(http_server);
    let tcp_iperf = opaque(iperf_server);
    let pid = |daemon: &support::Daemon| daemon.pid().as_raw() as u32;
    let memory = vec![vec![pid(&http.a)], vec![pid(&http.b)]];
    // CPU spent on the opaque paths is counted to the same two instances.
    let instances = vec![
        vec![pid(&http.a), pid(&tcp_http.a), pid(&tcp_iperf.a)],
        vec![pid(&http.b), pid(&tcp_http.b), pid(&tcp_iperf.b)],
    ];
    let entry = peers::Entry {
        h1: format!("http://{}/", http.listener),
        h2: format!("http://{}/", http.listener),
        tcp_http: tcp_http.listener,
        tcp_iperf: tcp_iperf.listener,
    };
    let running: Vec<Boxes> = vec![http, tcp_http, tcp_iperf];
    Contender { name: "meshkeep", entry, instances, memory, _running: Box::new(running) }
}

fn peer(name: &'static str, pair: peers::Pair) -> Contender {
    let instances = pair.instances();
    let entry = pair.entry.clone();
    Contender { name, entry, memory: instances.clone(), instances, _running: Box::new(pair) }
}

struct IperfServer(Child);

impl Drop for IperfServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn iperf_server() -> (SocketAddr, IperfServer) {
    let addr = support::free_addr();
    let child = Command::new("iperf3")
        .args(["-s", "-B", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 is installed (scripts/bench-proxy.sh installs it)");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(std::time::Instant::now() < deadline, "iperf3 -s did not listen on {addr}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    (addr, IperfServer(child))
}

fn url(entry: &peers::Entry, mode: Mode) -> String {
    match mode {
        Mode::Http1 => entry.h1.clone(),
        Mode::Http2 => entry.h2.clone(),
        Mode::NewConnection => format!("http://{}/", entry.tcp_http),
    }
}

/// Added latency per contender, protocol and rate: one list of runs per percentile.
type Added = BTreeMap<(&'static str, &'static str, u32), Vec<Vec<f64>>>;

fn main() {
    // Info, not debug: the harness waits for info lines; nothing is logged per request at info.
    let _ = support::LOG_FILTER.set("info");
    let seconds: u64 = setting("MESHKEEP_BENCH_SECONDS", 10);
    let runs: usize = setting("MESHKEEP_BENCH_RUNS", 3);
    let list = |name: &str, default: &str| -> Vec<String> {
        std::env::var(name).unwrap_or_else(|_| default.into()).split(',').map(|s| s.trim().to_owned()).collect()
    };
    let rates: Vec<u32> =
        list("MESHKEEP_BENCH_RATES", "1000,5000,20000").iter().filter_map(|r| r.parse().ok()).collect();
    let out = std::env::var("MESHKEEP_BENCH_OUT").unwrap_or_else(|_| "target/bench/proxy.json".into());

    let http_server = http_backend();
    let (iperf_addr, _iperf) = iperf_server();
    let direct = Contender {
        name: "direct",
        entry: peers::Entry {
            h1: format!("http://{http_server}/"),
            h2: format!("http://{http_server}/"),
            tcp_http: http_server,
            tcp_iperf: iperf_addr,
        },
        instances: Vec::new(),
        memory: Vec::new(),
        _running: Box::new(()),
    };
    let mut proxies = Vec::new();
    for name in list("MESHKEEP_BENCH_CONTENDERS", "meshkeep,haproxy,nginx") {
        proxies.push(match name.as_str() {
            "meshkeep" => meshkeep(http_server, iperf_addr),
            "haproxy" => peer("haproxy", peers::haproxy(http_server, iperf_addr)),
            "nginx" => peer("nginx", peers::nginx(http_server, iperf_addr)),
            other => panic!("unknown contender {other:?} in MESHKEEP_BENCH_CONTENDERS"),
        });
    }
    let idle_rss: Vec<Vec<f64>> =
        proxies.iter().map(|p| p.memory.iter().map(|i| status_kib(i, "VmRSS:") as f64 / 1024.0).collect()).collect();
    // Warm up: connections, pools, allocators, session caches.
    for contender in &proxies {
        for mode in [Mode::Http1, Mode::Http2, Mode::NewConnection] {
            let load = oha(&url(&contender.entry, mode), mode, Some(500), 2);
            assert!(load.success > 0.999, "{} {} warm-up: success rate {}", contender.name, mode.label(), load.success);
        }
    }

    // MESHKEEP_BENCH_HOLD=SECONDS: keep everything up, warmed, for that long and stop, to
    // profile or trace a contender by hand (its entry URL and process ids are printed).
    if let Some(hold) = std::env::var("MESHKEEP_BENCH_HOLD").ok().and_then(|s| s.parse().ok()) {
        for contender in &proxies {
            println!("{}: {} (pids {:?})", contender.name, contender.entry.h1, contender.pids());
        }
        println!("direct: {}", direct.entry.h1);
        std::thread::sleep(std::time::Duration::from_secs(hold));
        return;
    }

    // Fixed rates. Each run measures direct and then every proxy, so drift hits all alike.
    let mut added: Added = BTreeMap::new();
    let mut peak_at_first_rate: Vec<Vec<f64>> = Vec::new();
    for (i, &rate) in rates.iter().enumerate() {
        for mode in [Mode::Http1, Mode::Http2] {
            for _ in 0..runs {
                let base = oha(&url(&direct.entry, mode), mode, Some(rate), seconds);
                for contender in &proxies {
                    let load = oha(&url(&contender.entry, mode), mode, Some(rate), seconds);
                    assert!(
                        load.success > 0.999,
                        "{} {} at {rate}/s: success rate {}",
                        contender.name,
                        mode.label(),
                        load.success
                    );
                    let slot = added
                        .entry((contender.name, mode.label(), rate))
                        .or_insert_with(|| vec![Vec::new(); PERCENTILES.len()]);
                    for (p, values) in slot.iter_mut().enumerate() {
                        values.push(load.latency_ms[p] - base.latency_ms[p]);
                    }
                }
            }
        }
        if i == 0 {
            peak_at_first_rate = proxies.iter().map(Contender::peak_rss).collect();
        }
    }

    println!("## Added latency over direct, open loop (ms; median of {runs} runs, min–max)\n");
    let names: Vec<&str> = PERCENTILES.iter().map(|(name, _)| *name).collect();
    println!("| proxy | protocol | rate (req/s) | {} |", names.join(" | "));
    println!("|---|---|---|{}", "---|".repeat(names.len()));
    for &rate in &rates {
        for mode in [Mode::Http1, Mode::Http2] {
            for contender in &proxies {
                let Some(slot) = added.get(&(contender.name, mode.label(), rate)) else { continue };
                let cells: Vec<String> = slot.iter().map(|values| spread(values, 3)).collect();
                println!("| {} | {} | {rate} | {} |", contender.name, mode.label(), cells.join(" | "));
            }
        }
    }

    // Saturation: a closed loop, and the proxies' CPU time for the requests it got through.
    println!("\n## Closed loop (median of {runs} runs, min–max)\n");
    println!("| proxy | protocol | req/s | direct req/s | proxy CPU s per 1k req (A + B) | req/s per proxy core |");
    println!("|---|---|---|---|---|---|");
    let mut saturation = Vec::new();
    for mode in [Mode::Http1, Mode::Http2, Mode::NewConnection] {
        let mut direct_rps = Vec::new();
        let mut rows: Vec<(Vec<f64>, Vec<f64>, Vec<f64>)> = vec![Default::default(); proxies.len()];
        for _ in 0..runs {
            direct_rps.push(oha(&url(&direct.entry, mode), mode, None, seconds).rps);
            for (contender, row) in proxies.iter().zip(&mut rows) {
                let pids = contender.pids();
                let cpu_before = cpu_seconds(&pids);
                let load = oha(&url(&contender.entry, mode), mode, None, seconds);
                let cpu = cpu_seconds(&pids) - cpu_before;
                assert!(
                    load.success > 0.999,
                    "{} {} closed loop: success rate {}",
                    contender.name,
                    mode.label(),
                    load.success
                );
                let requests = load.rps * seconds as f64;
                row.0.push(load.rps);
                row.1.push(cpu / requests * 1000.0);
                // Two proxies handle each request: one proxy core serves this many per second.
                row.2.push(requests / cpu * 2.0);
            }
        }
        for (contender, (rps, cpu, per_core)) in proxies.iter().zip(&rows) {
            println!(
                "| {} | {} | {} | {} | {} | {} |",
                contender.name,
                mode.label(),
                spread(rps, 0),
                spread(&direct_rps, 0),
                spread(cpu, 3),
                spread(per_core, 0)
            );
            saturation.push(serde_json::json!({
                "proxy": contender.name, "mode": mode.label(),
                "rps": median(rps).0, "cpu_s_per_1k": median(cpu).0, "rps_per_core": median(per_core).0,
            }));
        }
    }

    println!("\n## Opaque TCP, one iperf3 stream of {seconds} s (MiB/s; median of {runs} runs, min–max)\n");
    println!("| path | MiB/s | proxy CPU s per GiB (A + B) |");
    println!("|---|---|---|");
    let mut throughput = Vec::new();
    for contender in std::iter::once(&direct).chain(&proxies) {
        let (mut mib, mut cpu_per_gib) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let pids = contender.pids();
            let before = cpu_seconds(&pids);
            let rate = iperf(contender.entry.tcp_iperf, seconds);
            mib.push(rate);
            cpu_per_gib.push((cpu_seconds(&pids) - before) / (rate * seconds as f64 / 1024.0));
        }
        let cpu = if contender.instances.is_empty() { "–".to_owned() } else { spread(&cpu_per_gib, 2) };
        println!("| {} | {} | {cpu} |", contender.name, spread(&mib, 0));
        throughput.push(serde_json::json!({"path": contender.name, "mib_per_s": median(&mib).0}));
    }

    println!("\n## Memory of each instance, A / B (MiB)\n");
    let first_rate = rates.first().copied().unwrap_or(0);
    println!("meshkeep: the pair that carried the HTTP load (its opaque TCP cases ran through two more pairs).\n");
    println!("| proxy | idle RSS | peak RSS after the {first_rate} req/s runs | peak RSS after everything |");
    println!("|---|---|---|---|");
    let mut memory = Vec::new();
    for (i, contender) in proxies.iter().enumerate() {
        let pair = |values: &[f64]| values.iter().map(|v| format!("{v:.1}")).collect::<Vec<_>>().join(" / ");
        let peak = contender.peak_rss();
        let at_first = peak_at_first_rate.get(i).cloned().unwrap_or_default();
        println!("| {} | {} | {} | {} |", contender.name, pair(&idle_rss[i]), pair(&at_first), pair(&peak));
        memory.push(serde_json::json!({
            "proxy": contender.name, "idle_mib": idle_rss[i], "peak_first_rate_mib": at_first, "peak_mib": peak,
        }));
    }

    let latency: Vec<serde_json::Value> = added
        .iter()
        .map(|((proxy, mode, rate), slot)| {
            let medians: BTreeMap<&str, f64> =
                PERCENTILES.iter().zip(slot).map(|((name, _), values)| (*name, median(values).0)).collect();
            serde_json::json!({"proxy": proxy, "mode": mode, "rate": rate, "added_ms": medians})
        })
        .collect();
    let results = serde_json::json!({
        "machine": machine(),
        "seconds": seconds, "runs": runs,
        "latency": latency, "saturation": saturation, "throughput": throughput, "memory": memory,
    });
    if let Some(dir) = std::path::Path::new(&out).parent() {
        std::fs::create_dir_all(dir).expect("results directory");
    }
    std::fs::write(&out, serde_json::to_vec_pretty(&results).expect("json")).expect("write the results");
    println!("\nresults: {out}");
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned()))
        .unwrap_or_else(|| std::env::consts::ARCH.to_owned());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{cores} × {cpu}")
}
