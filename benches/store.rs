//! Store benchmark: a relist of 10,000 Services and 100,000 endpoints (with their pods)
//! committed to the store, the file's size, and the real daemon's time from process start to
//! serving from that store, with its memory. Run with `cargo bench --bench store`; the numbers
//! go into BENCHMARKS.md. Sizes can be changed with MESHKEEP_BENCH_SERVICES and
//! MESHKEEP_BENCH_ENDPOINTS.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use meshkeep::model::{
    self, Endpoint, EndpointPort, Kind, Object, ObjectRef, Protocol, ServicePort, SourceId, TargetPort,
};
use meshkeep::store::{self, Update};
use meshkeep::{discovery, drain, policy};

/// Mean time of a lookup, over `rounds` of it.
fn per_lookup(rounds: usize, mut lookup: impl FnMut(usize)) -> Duration {
    let started = Instant::now();
    for i in 0..rounds {
        lookup(i);
    }
    started.elapsed() / rounds as u32
}

/// Times the lookups by address (a transparent connection), by name (an explicit connection, a
/// DNS query), and the routing of a request; the very first lookup builds the index they all use.
fn lookups(generated: &BTreeMap<Kind, Vec<Object>>, services: usize, endpoints: usize) {
    if services == 0 || endpoints == 0 {
        return;
    }
    let mut view = store::SourceView::default();
    for (kind, objects) in generated {
        view.set_kind(*kind, objects.iter().cloned());
    }
    let snapshot = store::Snapshot::from_sources([(SourceId::Local, view)]);
    let settings = discovery::Settings {
        cluster_domain: "cluster.local".into(),
        link_modes: BTreeMap::new(),
        trust_domain: "cluster.local".into(),
        control_plane_namespace: "linkerd".into(),
    };
    let found = |lookup: discovery::Lookup| assert!(matches!(lookup, discovery::Lookup::Found(_)), "{lookup:?}");
    let first = Instant::now();
    found(discovery::resolve_addr(&snapshot, &settings, SocketAddr::new(ip(0), 80)));
    let first = first.elapsed();
    // A source's contact changes only its metadata, in a copy of its view that a new snapshot
    // publishes: the first lookup there finds the index already built.
    let (_, view) = snapshot.sources().next().expect("one source");
    let mut contacted = view.clone();
    contacted.meta.last_contact = Some(1);
    let contacted = store::Snapshot::from_sources([(SourceId::Local, contacted)]);
    let after_contact = Instant::now();
    found(discovery::resolve_addr(&contacted, &settings, SocketAddr::new(ip(0), 80)));
    let after_contact = after_contact.elapsed();
    // Spread over the services: a scan in key order would find early ones sooner.
    let service = |i: usize| (i * 7919) % services;
    let by_cluster_ip = per_lookup(1000, |i| {
        found(discovery::resolve_addr(&snapshot, &settings, SocketAddr::new(ip(service(i)), 80)));
    });
    let by_endpoint_ip = per_lookup(1000, |i| {
        let endpoint = (i * 7919) % endpoints;
        found(discovery::resolve_addr(&snapshot, &settings, SocketAddr::new(ip(1_000_000 + endpoint), 8080)));
    });
    let by_name = per_lookup(1000, |i| {
        let s = service(i);
        found(discovery::resolve_name(&snapshot, &settings, &format!("svc-{s}.ns-{}", s % 100)));
    });
    let headers = http::HeaderMap::new();
    let request = policy::RequestInfo { method: "GET", path: "/", headers: &headers, host: None };
    let routed = per_lookup(1000, |i| {
        let s = service(i);
        let choice =
            policy::routes::choose(&snapshot, &format!("ns-{}", s % 100), &format!("svc-{s}"), 80, &request, |_, _| {
                true
            });
        assert_eq!(choice.backends.len(), 1);
    });
    println!(
        "lookups: first (builds the index) {:.1} ms; first after a source's contact {:.3} ms; then by cluster IP {:.1} us, by endpoint IP {:.1} us, by name {:.1} us, routing a request {:.1} us",
        first.as_secs_f64() * 1e3,
        after_contact.as_secs_f64() * 1e3,
        by_cluster_ip.as_secs_f64() * 1e6,
        by_endpoint_ip.as_secs_f64() * 1e6,
        by_name.as_secs_f64() * 1e6,
        routed.as_secs_f64() * 1e6,
    );
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn ip(n: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000u32 + n as u32))
}

/// Services spread over 100 namespaces; each service's endpoints in slices of up to 100.
fn objects(services: usize, endpoints: usize) -> BTreeMap<Kind, Vec<Object>> {
    let per_service = endpoints.div_ceil(services).max(1);
    let mut out: BTreeMap<Kind, Vec<Object>> = BTreeMap::new();
    let mut endpoint_no = 0;
    for s in 0..services {
        let ns = format!("ns-{}", s % 100);
        let name = format!("svc-{s}");
        out.entry(Kind::Service).or_default().push(Object::Service(model::Service {
            meta: ObjectRef::new(&ns, &name),
            cluster_ips: vec![ip(s)],
            headless: false,
            ports: vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                target_port: TargetPort::Number(8080),
                protocol: Protocol::Tcp,
                app_protocol: None,
            }],
            external_name: None,
            topology_aware: s % 10 == 0,
            opaque_ports: vec![],
        }));
        let mut slice_endpoints = Vec::new();
        for e in 0..per_service {
            if endpoint_no >= endpoints {
                break;
            }
            let pod_name = format!("{name}-{e}");
            let address = ip(1_000_000 + endpoint_no);
            endpoint_no += 1;
            slice_endpoints.push(Endpoint {
                addresses: vec![address],
                ready: true,
                serving: true,
                terminating: false,
                hostname: None,
                node_name: Some(format!("node-{}", endpoint_no % 50).into()),
                zone: Some(format!("zone-{}", endpoint_no % 3).into()),
                hints_for_zones: vec![],
                pod: Some(ObjectRef::new(&ns, &pod_name)),
            });
            out.entry(Kind::Pod).or_default().push(Object::Pod(model::Pod {
                meta: ObjectRef::new(&ns, &pod_name),
                ips: vec![address],
                service_account: name.as_str().into(),
                node_name: Some(format!("node-{}", endpoint_no % 50).into()),
                labels: [
                    ("app".to_owned(), name.clone()),
                    ("linkerd.io/control-plane-ns".to_owned(), "linkerd".to_owned()),
                ]
                .into_iter()
                .collect(),
            }));
        }
        for (chunk_no, chunk) in slice_endpoints.chunks(100).enumerate() {
            out.entry(Kind::EndpointSlice).or_default().push(Object::EndpointSlice(model::EndpointSlice {
                meta: ObjectRef::new(&ns, format!("{name}-{chunk_no}")),
                service: name.as_str().into(),
                ports: vec![EndpointPort {
                    name: Some("http".into()),
                    port: 8080,
                    protocol: Protocol::Tcp,
                    app_protocol: None,
                }],
                endpoints: chunk.to_vec(),
            }));
        }
    }
    for kind in Kind::ALL {
        out.entry(kind).or_default();
    }
    out
}

fn rss_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn ready(addr: std::net::SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = TcpStream::connect(addr) else { return false };
    let _ = write!(stream, "GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.1 200")
}

fn main() {
    let services = env_usize("MESHKEEP_BENCH_SERVICES", 10_000);
    let endpoints = env_usize("MESHKEEP_BENCH_ENDPOINTS", 100_000);
    // MESHKEEP_BENCH_KEEP names a folder to build the store in and keep afterwards (to profile
    // a daemon on it by hand); by default everything goes in a temporary folder.
    let temp = tempfile::tempdir().expect("tempdir");
    let kept = std::env::var_os("MESHKEEP_BENCH_KEEP").map(std::path::PathBuf::from);
    let root = kept.as_deref().unwrap_or(temp.path());
    let state = root.join("state");
    std::fs::create_dir_all(&state).expect("state dir");

    let generated = objects(services, endpoints);
    let counts: Vec<String> =
        generated.iter().filter(|(_, v)| !v.is_empty()).map(|(k, v)| format!("{} {k}", v.len())).collect();
    println!("objects: {}", counts.join(", "));

    // 0. Lookups a connection, a request and a DNS query make, timed on a snapshot of it all.
    lookups(&generated, services, endpoints);

    // 1. A full relist of every kind, committed in one transaction.
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let commit = runtime.block_on(async {
        let opened = store::open(&state, Duration::from_secs(3600)).expect("open store");
        let (signal, watch) = drain::channel();
        let writer = tokio::spawn(opened.writer.run(watch));
        let started = Instant::now();
        for (kind, objects) in generated {
            let update = Update::Replace {
                source: SourceId::Link("bench".into()),
                kind,
                namespace: None,
                objects,
                resource_version: None,
                complete: true,
            };
            opened.updates.send(update).await.expect("send");
        }
        signal.drain().await;
        writer.await.expect("writer");
        started.elapsed()
    });
    let size = std::fs::metadata(state.join(store::FILE_NAME)).expect("store file").len();
    println!("relist applied and committed: {:.0} ms", commit.as_secs_f64() * 1000.0);
    println!("store file: {:.1} MiB", size as f64 / 1048576.0);

    // 2. The real daemon starting from that store with its link unreachable.
    let port = TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr");
    let config = root.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[admin]\nlisten = \"{port}\"\n[store]\nstate_dir = {:?}\n[log]\nfilter = \"warn\"\n[upstream.links.bench]\nserver = \"http://127.0.0.1:9\"\nmode = \"federated\"\n",
            state.display().to_string()
        ),
    )
    .expect("config");
    let mut runs = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        // MESHKEEP_BINARY measures another build, e.g. the static musl release the packages carry.
        let binary = std::env::var("MESHKEEP_BINARY").unwrap_or_else(|_| env!("CARGO_BIN_EXE_meshkeep").to_owned());
        let mut child = Command::new(binary)
            .args(["--config", config.to_str().expect("utf-8 path"), "run"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn daemon");
        while !ready(port) {
            assert!(started.elapsed() < Duration::from_secs(60), "daemon not ready within 60 s");
            std::thread::sleep(Duration::from_millis(2));
        }
        let to_ready = started.elapsed();
        std::thread::sleep(Duration::from_millis(500));
        let rss = rss_kib(child.id(), "VmRSS:").unwrap_or(0);
        let peak = rss_kib(child.id(), "VmHWM:").unwrap_or(0);
        let _ = child.kill();
        let _ = child.wait();
        runs.push((to_ready, rss, peak));
    }
    runs.sort();
    for (to_ready, rss, peak) in &runs {
        println!(
            "start to ready: {:.0} ms, RSS {:.1} MiB, peak RSS {:.1} MiB",
            to_ready.as_secs_f64() * 1000.0,
            *rss as f64 / 1024.0,
            *peak as f64 / 1024.0
        );
    }
    let (median, rss, peak) = runs[runs.len() / 2];
    println!(
        "median start to ready: {:.0} ms; RSS {:.1} MiB (peak {:.1} MiB)",
        median.as_secs_f64() * 1000.0,
        rss as f64 / 1024.0,
        peak as f64 / 1024.0
    );
}
