//! The composition root: config -> state directory -> listeners -> tasks -> systemd, and the
//! shutdown path that drains them.
//!
//! Architecture Invariant: this is the only module that builds the runtime and spawns
//! long-lived tasks; components expose `async fn`s and `app` decides where they run.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

use crate::admin::{self, Admin};
use crate::config::{Config, Loaded};
use crate::readiness::Readiness;
use crate::systemd::Notifier;
use crate::{drain, metrics};

/// Runs the daemon until SIGTERM or SIGINT, then drains.
pub fn run(loaded: Loaded) -> anyhow::Result<()> {
    let workers = loaded.config.runtime.workers.count();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("meshkeep-worker")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(loaded, workers))
}

async fn serve(loaded: Loaded, workers: usize) -> anyhow::Result<()> {
    let started = Instant::now();
    let Loaded { config, files, embedded, env_overrides, service_manager } = loaded;
    let notifier = Notifier::new(service_manager.notify_socket.as_deref()).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "NOTIFY_SOCKET is unusable; systemd will not be notified");
        Notifier::disabled()
    });
    log_startup(&config, &files, embedded, &env_overrides, workers);

    let state_dir = config.store.state_dir();
    prepare_state_dir(state_dir)?;

    let readiness = Readiness::new();
    let listeners_ready = readiness.gate("listeners");
    let registry = metrics::registry();

    let (drain_signal, drain_watch) = drain::channel();
    let admin_listener = TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| format!("admin: cannot listen on {}", config.admin.listen))?;
    let admin = Arc::new(Admin::new(Arc::clone(&readiness), registry));
    tokio::spawn(admin::serve(admin_listener, admin, drain_watch.clone()));
    tracing::info!(addr = %config.admin.listen, "admin: serving /live /ready /metrics");

    listeners_ready.open();
    readiness.wait().await;
    tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "ready");
    notifier.ready(&format!("serving; admin on {}", config.admin.listen));

    wait_for_shutdown().await?;

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

/// Waits for SIGTERM or SIGINT. SIGHUP is logged: reloading arrives with the reload work,
/// until then the signal must not kill the process (its default action).
async fn wait_for_shutdown() -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); return Ok(()) }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); return Ok(()) }
            _ = hup.recv() => tracing::warn!("SIGHUP: configuration reload is not implemented yet; restart to apply changes"),
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
