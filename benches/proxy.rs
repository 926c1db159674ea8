//! The proxy's overhead on loopback: client -> box A outbound -> mTLS -> box B inbound -> server,
//! against client -> server directly. HTTP load comes from oha (open loop at a fixed rate with
//! latency correction, and closed loop for the maximum); opaque TCP throughput from a bounded
//! bulk transfer. Run with `bash scripts/bench-proxy.sh`, which installs oha and builds release.
//!
//! Settings: MESHKEEP_BENCH_SECONDS (per run, default 10), MESHKEEP_BENCH_RATES (default
//! "1000,10000"), MESHKEEP_BENCH_RUNS (default 3; medians are reported with the spread).

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Instant;

use support::Daemon;
use support::mesh::{Boxes, http_backend, two_boxes_setup};

fn setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(daemon: &Daemon) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", daemon.pid())).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the 12th, stime the 13th.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
    (ticks(11) + ticks(12)) / hz
}

fn status_kib(daemon: &Daemon, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.pid())).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// What one oha run reports.
#[derive(Debug, Clone, Copy, Default)]
struct Load {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    success: f64,
}

fn oha(url: &str, http2: bool, rate: Option<u32>, seconds: u64) -> Load {
    let mut command = Command::new("oha");
    command.args(["--no-tui", "--output-format", "json", "-z", &format!("{seconds}s")]);
    match rate {
        // Open loop: requests are sent on schedule, latency counted from when each was due.
        Some(rate) => {
            command.args(["-q", &rate.to_string(), "--latency-correction"]);
            command.args(["-c", if rate > 2000 { "64" } else { "16" }]);
        }
        None => {
            command.args(["-c", "32"]);
        }
    }
    if http2 {
        command.args(["--http2", "-p", "8"]);
    }
    command.arg(url);
    let output = command.output().expect("oha is installed (scripts/bench-proxy.sh installs it)");
    let json: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("oha output: {e}\n{}", String::from_utf8_lossy(&output.stderr)));
    let number = |pointer: &str| json.pointer(pointer).and_then(serde_json::Value::as_f64).unwrap_or(f64::NAN);
    Load {
        rps: number("/summary/requestsPerSec"),
        p50_ms: number("/latencyPercentiles/p50") * 1000.0,
        p99_ms: number("/latencyPercentiles/p99") * 1000.0,
        success: number("/summary/successRate"),
    }
}

fn median(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    (values[values.len() / 2], values[0], values[values.len() - 1])
}

fn spread((median, low, high): (f64, f64, f64), digits: usize) -> String {
    format!("{median:.digits$} ({low:.digits$}-{high:.digits$})")
}

/// A TCP server that discards what it reads; each connection's byte count goes to `counted`.
fn sink() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                let _ = stream.write_all(&total.to_be_bytes());
            });
        }
    });
    addr
}

/// Sends `bytes` to `addr` and waits for the sink's count; returns MiB/s.
fn bulk(addr: SocketAddr, bytes: u64) -> f64 {
    let mut stream = TcpStream::connect(addr).unwrap();
    let chunk = vec![0x5au8; 256 * 1024];
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        stream.write_all(&chunk).unwrap();
        sent += chunk.len() as u64;
    }
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut count = [0u8; 8];
    stream.read_exact(&mut count).unwrap();
    assert_eq!(u64::from_be_bytes(count), sent, "the sink got every byte");
    sent as f64 / (1024.0 * 1024.0) / started.elapsed().as_secs_f64()
}

fn main() {
    // Info, not debug: the harness waits for info lines; nothing is logged per request at info.
    let _ = support::LOG_FILTER.set("info");
    let seconds: u64 = setting("MESHKEEP_BENCH_SECONDS", 10);
    let runs: usize = setting("MESHKEEP_BENCH_RUNS", 3);
    let rates: Vec<u32> = std::env::var("MESHKEEP_BENCH_RATES")
        .unwrap_or_else(|_| "1000,10000".into())
        .split(',')
        .filter_map(|r| r.trim().parse().ok())
        .collect();

    let backend = http_backend();
    let boxes: Boxes = two_boxes_setup(backend, Some("echo"), "", "");
    let direct = format!("http://{backend}/");
    let meshed = format!("http://{}/", boxes.listener);
    let idle_rss = (status_kib(&boxes.a, "VmRSS:"), status_kib(&boxes.b, "VmRSS:"));
    // Warm up: connections, pools, allocator.
    oha(&meshed, false, Some(500), 2);
    oha(&meshed, true, Some(500), 2);

    println!("| protocol | rate (req/s) | direct p50 / p99 (ms) | meshed p50 / p99 (ms) | added p50 / p99 (ms) |");
    println!("|---|---|---|---|---|");
    for http2 in [false, true] {
        let protocol = if http2 { "HTTP/2" } else { "HTTP/1.1" };
        for &rate in &rates {
            let (mut d50, mut d99, mut m50, mut m99, mut a50, mut a99) =
                (vec![], vec![], vec![], vec![], vec![], vec![]);
            for _ in 0..runs {
                let d = oha(&direct, http2, Some(rate), seconds);
                let m = oha(&meshed, http2, Some(rate), seconds);
                assert!(m.success > 0.999, "{protocol} at {rate}/s: success rate {}", m.success);
                d50.push(d.p50_ms);
                d99.push(d.p99_ms);
                m50.push(m.p50_ms);
                m99.push(m.p99_ms);
                a50.push(m.p50_ms - d.p50_ms);
                a99.push(m.p99_ms - d.p99_ms);
            }
            println!(
                "| {protocol} | {rate} | {} / {} | {} / {} | {} / {} |",
                spread(median(d50), 3),
                spread(median(d99), 3),
                spread(median(m50), 3),
                spread(median(m99), 3),
                spread(median(a50), 3),
                spread(median(a99), 3),
            );
        }
    }

    println!();
    println!(
        "| protocol | direct max req/s | meshed max req/s | proxy CPU s per 1k req (A + B) | meshed req/s per proxy core |"
    );
    println!("|---|---|---|---|---|");
    for http2 in [false, true] {
        let protocol = if http2 { "HTTP/2" } else { "HTTP/1.1" };
        let (mut direct_max, mut meshed_max, mut cpu_per_k, mut per_core) = (vec![], vec![], vec![], vec![]);
        for _ in 0..runs {
            direct_max.push(oha(&direct, http2, None, seconds).rps);
            let cpu_before = cpu_seconds(&boxes.a) + cpu_seconds(&boxes.b);
            let m = oha(&meshed, http2, None, seconds);
            let cpu = cpu_seconds(&boxes.a) + cpu_seconds(&boxes.b) - cpu_before;
            let requests = m.rps * seconds as f64;
            meshed_max.push(m.rps);
            cpu_per_k.push(cpu / requests * 1000.0);
            // Two proxies handle each request: one proxy core serves this many per second.
            per_core.push(requests / cpu * 2.0);
        }
        println!(
            "| {protocol} | {} | {} | {} | {} |",
            spread(median(direct_max), 0),
            spread(median(meshed_max), 0),
            spread(median(cpu_per_k), 3),
            spread(median(per_core), 0),
        );
    }

    let sink = sink();
    let tcp_boxes = two_boxes_setup(sink, Some("echo"), "", "");
    let bytes: u64 = setting("MESHKEEP_BENCH_TCP_MIB", 2048u64) * 1024 * 1024;
    let (mut direct_tcp, mut meshed_tcp) = (vec![], vec![]);
    for _ in 0..runs {
        direct_tcp.push(bulk(sink, bytes));
        meshed_tcp.push(bulk(tcp_boxes.listener, bytes));
    }
    println!();
    println!("| opaque TCP, {} MiB one way | direct MiB/s | meshed MiB/s |", bytes / 1024 / 1024);
    println!("|---|---|---|");
    println!("| one connection | {} | {} |", spread(median(direct_tcp), 0), spread(median(meshed_tcp), 0));

    println!();
    println!(
        "RSS of box A / box B: idle {} / {} KiB; peak (VmHWM) {} / {} KiB",
        idle_rss.0,
        idle_rss.1,
        status_kib(&boxes.a, "VmHWM:"),
        status_kib(&boxes.b, "VmHWM:")
    );
}
