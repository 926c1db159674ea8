//! The Prometheus registry every component registers into, with build and process metrics.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// The content type of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A registry holding `meshkeep_build_info` and the `process_*` metrics.
pub fn registry() -> Registry {
    let mut registry = Registry::default();
    registry.register("meshkeep_build", "meshkeep version", Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]));
    registry.register_collector(Box::new(ProcessCollector::new()));
    registry
}

/// The async runtime's own view of itself: worker threads and live tasks.
#[derive(Debug)]
pub struct RuntimeCollector(pub tokio::runtime::Handle);

impl Collector for RuntimeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let metrics = self.0.metrics();
        let gauge = ConstGauge::new(metrics.num_workers() as i64);
        gauge.encode(encoder.encode_descriptor(
            "meshkeep_runtime_workers",
            "Worker threads of the async runtime",
            None,
            gauge.metric_type(),
        )?)?;
        let gauge = ConstGauge::new(metrics.num_alive_tasks() as i64);
        gauge.encode(encoder.encode_descriptor(
            "meshkeep_runtime_alive_tasks",
            "Tasks alive in the async runtime",
            None,
            gauge.metric_type(),
        )?)
    }
}

/// Renders a registry in the OpenMetrics text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        // Encoding into a String fails only if a metric's own encoder fails.
        let _ = writeln!(out, "# encoding failed: {e}");
    }
    out
}

/// Process metrics read from /proc at scrape time (the names Prometheus' client libraries use).
#[derive(Debug)]
struct ProcessCollector {
    start_time: f64,
    clock_ticks_per_second: f64,
    page_size: f64,
}

impl ProcessCollector {
    fn new() -> Self {
        use nix::unistd::{SysconfVar, sysconf};
        let start_time = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        // c_long is 32 bits on armv7: widen through f64 rather than assume i64.
        let sys = |var, default: f64| sysconf(var).ok().flatten().map_or(default, |v| v as f64);
        Self {
            start_time,
            clock_ticks_per_second: sys(SysconfVar::CLK_TCK, 100.0),
            page_size: sys(SysconfVar::PAGE_SIZE, 4096.0),
        }
    }
}

/// The fields of /proc/self/stat that the collector reports.
#[derive(Debug, PartialEq)]
struct ProcStat {
    utime_ticks: u64,
    stime_ticks: u64,
    threads: u64,
    vsize_bytes: u64,
    rss_pages: u64,
}

impl ProcStat {
    fn read() -> Option<Self> {
        Self::parse(&std::fs::read_to_string("/proc/self/stat").ok()?)
    }

    /// Parses /proc/<pid>/stat. The command name may contain spaces and parentheses, so
    /// fields are counted from the last `)`.
    fn parse(stat: &str) -> Option<Self> {
        let rest = &stat[stat.rfind(')')? + 1..];
        // After the name: field 3 (state) is index 0, so field N is index N - 3.
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        Some(Self {
            utime_ticks: field(14)?,
            stime_ticks: field(15)?,
            threads: field(20)?,
            vsize_bytes: field(23)?,
            rss_pages: field(24)?,
        })
    }
}

fn open_fds() -> Option<u64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as u64)
}

fn max_fds() -> Option<u64> {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).ok().map(|(soft, _)| soft)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut gauge = |name: &str, help: &str, value: f64| -> Result<(), std::fmt::Error> {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)
        };
        gauge(
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch in seconds",
            self.start_time,
        )?;
        if let Some(stat) = ProcStat::read() {
            gauge(
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                stat.rss_pages as f64 * self.page_size,
            )?;
            gauge("process_virtual_memory_bytes", "Virtual memory size in bytes", stat.vsize_bytes as f64)?;
            gauge("process_threads", "Number of OS threads in the process", stat.threads as f64)?;
        }
        if let Some(fds) = open_fds() {
            gauge("process_open_fds", "Number of open file descriptors", fds as f64)?;
        }
        if let Some(max) = max_fds() {
            gauge("process_max_fds", "Maximum number of open file descriptors", max as f64)?;
        }
        if let Some(stat) = ProcStat::read() {
            let cpu = (stat.utime_ticks + stat.stime_ticks) as f64 / self.clock_ticks_per_second;
            let counter = ConstCounter::new(cpu);
            counter.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                counter.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_parses_names_with_spaces_and_parentheses() {
        let line = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 500 0 0 0 \
                    17 5 0 0 20 0 9 0 12345 1000000 250 18446744073709551615";
        let stat = ProcStat::parse(line).expect("parses");
        assert_eq!(
            stat,
            ProcStat { utime_ticks: 17, stime_ticks: 5, threads: 9, vsize_bytes: 1_000_000, rss_pages: 250 }
        );
        assert_eq!(ProcStat::parse("garbage"), None);
    }

    #[test]
    fn registry_exposes_build_and_process_metrics() {
        let text = encode(&registry());
        assert!(
            text.contains(&format!("meshkeep_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"))),
            "{text}"
        );
        assert!(text.contains("process_resident_memory_bytes "), "{text}");
        assert!(text.contains("process_cpu_seconds_total "), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
