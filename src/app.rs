//! The composition root: config -> state directory -> listeners -> tasks -> systemd, and the
//! shutdown path that drains them.
//!
//! Architecture Invariant: this is the only module that builds the runtime and spawns
//! long-lived tasks; components expose `async fn`s and `app` decides where they run.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::admin::{self, Admin};
use crate::config::{Config, Loaded};
use crate::identity::clock::SystemClock;
use crate::model::SourceId;
use crate::readiness::Readiness;
use crate::status::ProcessInfo;
use crate::store::{self, Update};
use crate::systemd::Notifier;
use crate::upstream::{link, local};
use crate::{discovery, drain, identity, metrics, proxy};

/// Runs the daemon until SIGTERM or SIGINT, then drains.
pub fn run(loaded: Loaded) -> anyhow::Result<()> {
    let workers = loaded.config.runtime.workers.count();
    // One worker: everything on this thread, without the work-stealing scheduler's
    // cross-thread bookkeeping (BENCHMARKS.md, "Again, with the build that ships").
    let mut builder = match workers {
        1 => tokio::runtime::Builder::new_current_thread(),
        _ => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(workers);
            builder
        }
    };
    let runtime =
        builder.thread_name("meshkeep-worker").enable_all().build().context("cannot start the async runtime")?;
    runtime.block_on(serve(loaded, workers))
}

async fn serve(loaded: Loaded, workers: usize) -> anyhow::Result<()> {
    let started = Instant::now();
    let Loaded { config, files, embedded, env_overrides, service_manager, reload_from, missing_credentials: _ } =
        loaded;
    let notifier = Arc::new(Notifier::new(service_manager.notify_socket.as_deref()).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "NOTIFY_SOCKET is unusable; systemd will not be notified");
        Notifier::disabled()
    }));
    let rescan = Arc::new(tokio::sync::Notify::new());
    let mut signals = Signals::install()?;
    log_startup(&config, &files, embedded, &env_overrides, workers);

    let state_dir = config.store.state_dir();
    prepare_state_dir(state_dir)?;
    raise_open_files_limit();

    let readiness = Readiness::new();
    let listeners_ready = readiness.gate("listeners");
    let store_ready = readiness.gate("store");
    let mut registry = metrics::registry();
    registry.register_collector(Box::new(metrics::RuntimeCollector(tokio::runtime::Handle::current())));
    let (drain_signal, drain_watch) = drain::channel();

    // Loading the store builds and drops large temporaries: returned to the kernel at once.
    let start_up = crate::memory::Bulk::start();
    // The last complete snapshot is loaded before anything serves.
    let store::Opened { writer, updates, snapshots, quarantined } =
        store::open(state_dir, config.store.flush_interval.get()).context("cannot open the store")?;
    if let Some(q) = &quarantined {
        tracing::error!(moved_to = %q.moved_to.display(), reason = %q.reason, "the store was damaged: moved aside, every source is unknown until it syncs again");
    }
    let store_path = writer.path().to_owned();
    writer.metrics().register(&mut registry, snapshots.clone(), store_path.clone());
    {
        let snapshot = snapshots.borrow().clone();
        tracing::info!(objects = snapshot.object_count(), sources = snapshot.sources().count(), "store loaded");
        let configured = configured_sources(&config);
        for (source, _) in snapshot.sources() {
            if !configured.contains(source) {
                updates.send(Update::Forget { source: source.clone() }).await?;
            }
        }
    }
    tokio::spawn(writer.run(drain_watch.clone()));
    store_ready.open();

    if let Some(path) = &config.upstream.local.path {
        let source = local::LocalSource {
            path: path.clone(),
            poll_interval: config.upstream.local.poll_interval.get(),
            names: local::IdentityObjectNames {
                namespace: config.identity.control_plane_namespace.clone(),
                ..local::IdentityObjectNames::default()
            },
        };
        tracing::info!(path = %path.display(), "local manifests: watching");
        tokio::spawn(local::run(source, updates.clone(), Arc::clone(&rescan), drain_watch.clone()));
    }
    for (name, link_config) in &config.upstream.links {
        tokio::spawn(link::run(name.to_string(), link_config.clone(), updates.clone(), drain_watch.clone()));
    }
    drop(updates);

    // Identity: the cached issuer and certificates are loaded before serving; issuance and
    // rotation run on their own task and never block serving.
    let identity_dir = state_dir.join("identity");
    let manager = identity::manager::Manager::open(identity::settings(&config), &identity_dir, SystemClock)
        .context("cannot open the identity directory")?;
    let manager = Arc::new(std::sync::Mutex::new(manager));
    let (identity_status, identity_status_rx) = watch::channel(identity::manager::IdentityStatus::default());
    let (proxy_certificate, proxy_certificate_rx) = watch::channel(None);
    registry.register_collector(Box::new(identity::StatusCollector(identity_status_rx.clone())));
    tokio::spawn(identity::run(
        Arc::clone(&manager),
        snapshots.clone(),
        identity_status,
        proxy_certificate,
        drain_watch.clone(),
    ));
    let socket_path = config.identity_socket();
    let identity_socket = identity::socket::bind(&socket_path).context("identity: cannot bind the socket")?;
    tokio::spawn(identity::socket::serve(identity_socket, manager, drain_watch.clone()));
    tracing::info!(path = %socket_path.display(), "identity: serving workloads on the local socket");

    let proxy = if config.proxy.enabled {
        Some(start_proxy(&config, &mut registry, snapshots.clone(), proxy_certificate_rx, &drain_watch).await?)
    } else {
        None
    };

    if config.dns.enabled {
        let sockets = crate::dns::bind(config.dns.listen)
            .await
            .with_context(|| format!("dns: cannot listen on {} (UDP and TCP)", config.dns.listen))?;
        let server = crate::dns::Server::new(&config.dns, discovery::Settings::from_config(&config), snapshots.clone());
        server.register(&mut registry);
        tokio::spawn(crate::dns::serve(Arc::new(server), sockets, drain_watch.clone()));
        tracing::info!(addr = %config.dns.listen, upstreams = config.dns.upstreams.len(), "dns: serving mesh names");
    }

    let admin_listener = TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| format!("admin: cannot listen on {}", config.admin.listen))?;
    let admin_state = admin::State {
        snapshots: snapshots.clone(),
        settings: discovery::Settings::from_config(&config),
        process: ProcessInfo {
            node: config.node.name.as_ref().map(ToString::to_string).unwrap_or_default(),
            zone: config.node.zone.as_ref().map(ToString::to_string),
            store_path: store_path.display().to_string(),
            store_quarantined: quarantined.map(|q| format!("{} ({})", q.moved_to.display(), q.reason)),
            ..ProcessInfo::default()
        },
        identity: Some(identity_status_rx.clone()),
        config_json: serde_json::to_string_pretty(&config).unwrap_or_default(),
        golden: proxy.as_ref().map(|p| Arc::clone(&p.http.golden)),
        balancer: proxy.as_ref().map(|p| Arc::clone(&p.balancer)),
    };
    let admin = Arc::new(Admin::new(Arc::clone(&readiness), registry, Some(admin_state)));
    tokio::spawn(admin::serve(admin_listener, admin, drain_watch.clone()));
    tracing::info!(addr = %config.admin.listen, "admin: serving /live /ready /metrics /status /resolve");

    listeners_ready.open();
    readiness.wait().await;
    tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "ready");
    drop(start_up);
    let snapshot = snapshots.borrow().clone();
    notifier.ready(&format!(
        "serving {} objects from {} sources; admin on {}",
        snapshot.object_count(),
        snapshot.sources().count(),
        config.admin.listen
    ));

    let status = crate::supervise::StatusSources { snapshots: snapshots.clone(), identity: identity_status_rx };
    if notifier.is_enabled() {
        // Fed at half the watchdog period; without a watchdog, only STATUS= is refreshed.
        let interval = service_manager.watchdog.map_or(Duration::from_secs(30), |w| w / 2);
        tokio::spawn(crate::supervise::health_loop(
            Arc::clone(&notifier),
            config.admin.listen,
            interval,
            status.clone(),
        ));
    }
    let mut reloader = crate::supervise::Reloader {
        reload_from,
        current: config.clone(),
        rescan,
        notifier: Arc::clone(&notifier),
        status,
    };
    while signals.next().await == Signal::Reload {
        reloader.reload();
    }

    notifier.stopping("draining connections");
    drop(drain_watch);
    let deadline = config.runtime.drain_timeout.get();
    let open = drain_signal.watchers();
    match tokio::time::timeout(deadline, drain_signal.drain()).await {
        Ok(()) => tracing::info!("drained; exiting"),
        Err(_) => tracing::warn!(
            deadline = %config.runtime.drain_timeout,
            open_at_start = open,
            "drain deadline passed; closing the remaining connections"
        ),
    }
    Ok(())
}

/// Binds the proxy's listeners and starts serving; TLS configs follow the proxy certificate.
async fn start_proxy(
    config: &Config,
    registry: &mut prometheus_client::registry::Registry,
    snapshots: store::Snapshots,
    mut certificates: watch::Receiver<Option<identity::ca::Leaf>>,
    drain: &drain::Watch,
) -> anyhow::Result<Arc<proxy::Proxy>> {
    let (tls_tx, tls_rx) = watch::channel(None);
    let tls_drain = drain.clone();
    tokio::spawn(async move {
        loop {
            let leaf = certificates.borrow_and_update().clone();
            if let Some(leaf) = leaf {
                match proxy::TlsConfigs::from_leaf(&leaf) {
                    Ok(configs) => {
                        tracing::info!(identity = %configs.identity, "proxy: TLS identity in use");
                        tls_tx.send_replace(Some(Arc::new(configs)));
                    }
                    Err(e) => tracing::error!(error = %e, "proxy: cannot build TLS configs; keeping the previous ones"),
                }
            }
            tokio::select! {
                changed = certificates.changed() => if changed.is_err() { return },
                _ = tls_drain.signaled() => return,
            }
        }
    });
    let metrics = proxy::metrics::ProxyMetrics::default();
    metrics.register(registry);
    let shared =
        Arc::new(proxy::Proxy::new(config, snapshots, discovery::Settings::from_config(config), tls_rx, metrics));
    shared.http.register(registry);
    shared.authz.register(registry);
    let max_connections = config.proxy.max_connections;
    let bind = |addr: std::net::SocketAddr, what: &'static str| async move {
        proxy::listen(addr, max_connections).with_context(|| format!("proxy: cannot listen on {addr} ({what})"))
    };
    let outbound = bind(config.proxy.outbound_listen, "outbound").await?;
    tokio::spawn(proxy::serve_outbound(
        outbound,
        Arc::clone(&shared),
        proxy::OutboundTarget::Transparent,
        drain.clone(),
    ));
    let inbound = bind(config.proxy.inbound_listen, "inbound").await?;
    tokio::spawn(proxy::serve_inbound(inbound, Arc::clone(&shared), drain.clone()));
    for listener in &config.proxy.listeners {
        let socket = bind(listener.listen, "explicit listener").await?;
        let target = proxy::OutboundTarget::Service { name: listener.service.clone(), port: listener.port };
        tokio::spawn(proxy::serve_outbound(socket, Arc::clone(&shared), target, drain.clone()));
        tracing::info!(listen = %listener.listen, service = %listener.service, port = ?listener.port, "proxy: explicit listener");
    }
    tracing::info!(outbound = %config.proxy.outbound_listen, inbound = %config.proxy.inbound_listen, "proxy: serving");
    Ok(shared)
}

/// The sources the configuration names; stored data of any other source is dropped.
fn configured_sources(config: &Config) -> BTreeSet<SourceId> {
    let mut sources: BTreeSet<SourceId> =
        config.upstream.links.keys().map(|name| SourceId::Link(name.to_string())).collect();
    if config.upstream.local.path.is_some() {
        sources.insert(SourceId::Local);
    }
    sources
}

/// Waits for SIGTERM or SIGINT. SIGHUP is logged: reloading arrives with the reload work,
/// until then the signal must not kill the process (its default action).
#[derive(Debug, PartialEq, Eq)]
enum Signal {
    Stop,
    Reload,
}

/// The signals the daemon handles. Installed at startup, before READY, so a SIGTERM that
/// follows READY at once is never met by the default action (immediate death, no drain).
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
            hup: signal(SignalKind::hangup()).context("cannot handle SIGHUP")?,
        })
    }

    /// Waits for SIGTERM or SIGINT (stop) or SIGHUP (reload).
    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => { tracing::info!("SIGTERM: shutting down"); Signal::Stop }
            _ = self.int.recv() => { tracing::info!("SIGINT: shutting down"); Signal::Stop }
            _ = self.hup.recv() => { tracing::info!("SIGHUP: reloading"); Signal::Reload }
        }
    }
}

fn log_startup(
    config: &Config,
    files: &[std::path::PathBuf],
    embedded: bool,
    env_overrides: &[String],
    workers: usize,
) {
    let source = if embedded {
        "built-in default".to_owned()
    } else {
        files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
    };
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %source,
        env_overrides = %env_overrides.join(","),
        workers,
        node = %config.node.name.as_ref().map(ToString::to_string).unwrap_or_default(),
        state_dir = %config.store.state_dir().display(),
        "starting meshkeep"
    );
    if embedded {
        tracing::warn!("no configuration file found: running on the built-in default (see `meshkeep config show`)");
    }
}

/// Creates the state directory (0700) and checks that it is a writable directory.
fn prepare_state_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create state directory {}", dir.display()))?;
    let probe = dir.join(".write-probe");
    std::fs::write(&probe, b"")
        .and_then(|()| std::fs::remove_file(&probe))
        .with_context(|| format!("state directory {} is not writable", dir.display()))?;
    Ok(())
}

/// A proxy holds two descriptors per connection: the soft limit (often 1024) is raised to the
/// hard limit the service manager allows (systemd's default hard limit is 524288).
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::debug!(from = soft, to = hard, "raised the open files limit"),
            Err(e) => tracing::warn!(error = %e, soft, hard, "cannot raise the open files limit"),
        },
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open files limit"),
    }
}
