//! Log output: the journal under systemd (levels mapped to syslog priorities), stderr elsewhere.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogConfig, LogOutput};

/// Installs the global subscriber. `stderr_is_journal` says whether systemd connected stderr to
/// the journal, which `auto` follows.
pub fn init(config: &LogConfig, stderr_is_journal: bool) {
    // The filter was validated when the configuration was loaded.
    let filter = EnvFilter::builder().parse_lossy(config.filter.as_str());
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
    tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(true)
}
