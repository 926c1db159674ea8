//! The command line: `run` starts the daemon; the other commands are for operators.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{self, Source};

mod cache;
mod client;
mod health;
mod identity;

/// Exit status for a configuration that cannot be used (sysexits' EX_CONFIG). The systemd unit
/// lists it in RestartPreventExitStatus= so a bad config does not restart in a loop.
pub const EXIT_CONFIG: u8 = 78;

/// A service-mesh node for the edge: discovery, DNS, identity and an mTLS proxy that keep
/// working while the upstream cluster is unreachable.
#[derive(Debug, Parser)]
#[command(name = "meshkeep", version, propagate_version = true)]
pub struct Cli {
    /// Configuration file [default: $MESHKEEP_CONFIG, else /etc/meshkeep/config.toml if it
    /// exists, else the built-in default]. Drop-ins are read from config.d/ beside it.
    #[arg(short, long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground.
    Run,
    /// Validate or print the configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Look up a mesh name (svc.ns[.svc.cluster.local]) or an IP:PORT: the service, its
    /// endpoints and their identities. Works from the store file when the daemon is stopped.
    Resolve {
        /// A name such as api.shop or api-east.shop.svc.cluster.local, or 10.0.0.1:80.
        target: String,
        #[arg(short, long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Whether the box is healthy and why not: findings, sources, cache, identity, traffic.
    /// Exits 1 when unhealthy.
    Status {
        #[arg(short, long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Preflight and health checks, one line each with a hint; exits 1 if any fails.
    Check {
        #[arg(short, long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Golden metrics per service over the last minute: success rate, requests/s, latency.
    Stat {
        /// Only services whose name starts with this (e.g. web.shop).
        service: Option<String>,
        #[arg(short, long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// A service's endpoints as the balancer sees them: share of requests, latency estimate,
    /// ejected or not, zone.
    Endpoints {
        /// A mesh name such as api.shop.
        service: String,
        #[arg(short, long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// The busiest routes (method and path), refreshed every 2 s on a terminal.
    Top {
        /// Print once and exit.
        #[arg(long)]
        once: bool,
        #[arg(short, long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Inspect, export or import the local store.
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// The local CA: the issuer, managed certificates, and operator-issued certificates.
    Identity {
        #[command(subcommand)]
        command: IdentityCommand,
    },
    /// Transparent mode: the nftables rules that send traffic through the proxy (needs root).
    Redirect {
        #[command(subcommand)]
        command: RedirectCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum RedirectCommand {
    /// Install (or replace) the rules in the `inet meshkeep` table.
    Install,
    /// Remove the `inet meshkeep` table.
    Remove,
    /// Print the rules `install` would apply, without applying them.
    Show,
}

#[derive(Debug, Subcommand)]
pub enum IdentityCommand {
    /// The issuer, the clock state, and each managed certificate's names and validity.
    Show {
        #[arg(short, long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Issue a certificate for a service account from the cached issuer into a directory
    /// (tls.crt, tls.key, ca.crt).
    Issue {
        #[arg(long = "namespace", short = 'n')]
        namespace: String,
        #[arg(long = "service-account", alias = "sa")]
        service_account: String,
        /// Output directory.
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// What the store holds: sources, their state, object counts, unknown kinds.
    Show {
        #[arg(short, long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Write the store's contents to a checksummed file (mode 0600: it carries the issuer key).
    /// Reads the store file, so the daemon must be stopped.
    Export { file: PathBuf },
    /// Load a file written by `cache export` into the store (the daemon must be stopped).
    /// A damaged file is refused as a whole.
    Import { file: PathBuf },
}

/// Output of read commands.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the configuration; exit non-zero naming the file, line and key of any error.
    Check,
    /// Print the effective configuration (files, drop-ins, environment and defaults merged).
    Show {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Format::Toml)]
        output: Format,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    Toml,
    Json,
}

/// Runs a parsed command line and returns the process exit status.
pub fn main(cli: Cli) -> ExitCode {
    let loaded = match Source::from_process(cli.config).load() {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("meshkeep: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if matches!(cli.command, Command::Run)
        && let Some(missing) = loaded.missing_credentials.first()
    {
        eprintln!("meshkeep: invalid configuration: {missing}");
        return ExitCode::from(EXIT_CONFIG);
    }
    if !matches!(cli.command, Command::Run) {
        // Operator commands report problems (a quarantined store, a damaged file) as warnings.
        if let Ok(filter) = "warn".parse() {
            crate::logging::init(&config::LogConfig { filter, output: config::LogOutput::Stderr }, false);
        }
    }
    let result = match cli.command {
        Command::Run => {
            crate::logging::init(&loaded.config.log, loaded.service_manager.stderr_is_journal);
            crate::app::run(loaded)
        }
        Command::Config { command: ConfigCommand::Check } => {
            config_check(&loaded);
            Ok(())
        }
        Command::Config { command: ConfigCommand::Show { output } } => config_show(&loaded, output),
        Command::Resolve { target, output } => match cache::resolve(&loaded.config, &target, output) {
            Ok(0) => Ok(()),
            Ok(code) => return ExitCode::from(code),
            Err(e) => Err(e),
        },
        Command::Cache { command: CacheCommand::Show { output } } => cache::show(&loaded.config, output),
        Command::Cache { command: CacheCommand::Export { file } } => cache::export(&loaded.config, &file),
        Command::Cache { command: CacheCommand::Import { file } } => cache::import(&loaded.config, &file),
        Command::Identity { command: IdentityCommand::Show { output } } => identity::show(&loaded.config, output),
        Command::Identity { command: IdentityCommand::Issue { namespace, service_account, out } } => {
            identity::issue(&loaded.config, &namespace, &service_account, &out)
        }
        Command::Redirect { command } => redirect(&loaded.config, &command),
        Command::Status { output } => match health::status(&loaded.config, output) {
            Ok(0) => Ok(()),
            Ok(code) => return ExitCode::from(code),
            Err(e) => Err(e),
        },
        Command::Check { output } => match health::check(&loaded.config, output) {
            Ok(0) => Ok(()),
            Ok(code) => return ExitCode::from(code),
            Err(e) => Err(e),
        },
        Command::Stat { service, output } => health::stat(&loaded.config, service.as_deref(), output),
        Command::Top { once, output } => health::top(&loaded.config, once, output),
        Command::Endpoints { service, output } => health::endpoints(&loaded.config, &service, output),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("meshkeep: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn redirect(config: &config::Config, command: &RedirectCommand) -> anyhow::Result<()> {
    use crate::redirect as rules;
    match command {
        RedirectCommand::Install => {
            rules::install(&config.redirect, &config.proxy)?;
            println!("installed nftables table inet {}", rules::TABLE);
        }
        RedirectCommand::Remove => {
            rules::remove()?;
            println!("removed nftables table inet {}", rules::TABLE);
        }
        RedirectCommand::Show => {
            print!("{}", rules::ruleset(&config.redirect, &config.proxy, rules::proxy_uid(&config.redirect)?)?);
        }
    }
    Ok(())
}

fn config_check(loaded: &config::Loaded) {
    if loaded.embedded && loaded.files.is_empty() {
        println!("ok: no configuration file; the built-in default is valid");
    } else {
        for file in &loaded.files {
            println!("ok: {}", file.display());
        }
    }
    for var in &loaded.env_overrides {
        println!("ok: environment {var}");
    }
    for missing in &loaded.missing_credentials {
        println!("warning: {missing}; `meshkeep run` started by systemd gets it, started otherwise it refuses to");
    }
}

fn config_show(loaded: &config::Loaded, output: Format) -> anyhow::Result<()> {
    match output {
        Format::Toml => {
            let source = if loaded.files.is_empty() {
                "the built-in default".to_owned()
            } else {
                loaded.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
            };
            println!("# effective configuration from {source}");
            if !loaded.env_overrides.is_empty() {
                println!("# environment overrides: {}", loaded.env_overrides.join(", "));
            }
            print!("{}", loaded.config.to_toml());
        }
        Format::Json => println!("{}", serde_json::to_string_pretty(&loaded.config)?),
    }
    Ok(())
}
