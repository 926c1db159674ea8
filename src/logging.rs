//! Log output: the journal under systemd (levels mapped to syslog priorities), stderr elsewhere.

use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::config::{LogConfig, LogOutput};

/// Swaps the filter of the installed subscriber (configuration reload).
static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Replaces the log filter; `false` when logging was not initialised by [`init`].
pub fn set_filter(filter: &str) -> bool {
    FILTER.get().is_some_and(|handle| handle.reload(env_filter(filter)).is_ok())
}

/// The configured filter, with kube's line per failed request left out unless the filter names
/// `kube_client` itself (`kube=debug` alone does not bring it back): a link cut off from its
/// cluster would log one at ERROR per watch per attempt, while the store says once that a
/// source is unreachable (with the error) and once that it is back.
fn env_filter(configured: &str) -> EnvFilter {
    let filter = EnvFilter::builder().parse_lossy(configured);
    if configured.contains("kube_client") {
        return filter;
    }
    match "kube_client::client::builder=off".parse() {
        Ok(quiet) => filter.add_directive(quiet),
        Err(_) => filter,
    }
}

/// Installs the global subscriber. `stderr_is_journal` says whether systemd connected stderr to
/// the journal, which `auto` follows.
pub fn init(config: &LogConfig, stderr_is_journal: bool) {
    // The filter was validated when the configuration was loaded.
    let (filter, handle) = reload::Layer::new(env_filter(config.filter.as_str()));
    let _ = FILTER.set(handle);
    let want_journal = match config.output {
        LogOutput::Journald => true,
        LogOutput::Stderr => false,
        LogOutput::Auto => stderr_is_journal,
    };
    let journal = want_journal.then(tracing_journald::layer);
    let registry = tracing_subscriber::registry().with(filter);
    match journal {
        Some(Ok(journal)) => registry.with(journal.with_syslog_identifier("meshkeep".into())).init(),
        Some(Err(e)) => {
            registry.with(stderr_layer()).init();
            tracing::warn!(error = %e, "cannot reach the journal; logging to stderr");
        }
        None => registry.with(stderr_layer()).init(),
    }
}

fn stderr_layer<S>() -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use std::io::IsTerminal as _;
    // Colours only for a person at a terminal, never into files or pipes.
    tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(true)
        .with_ansi(std::io::stderr().is_terminal())
}
