//! Certificate issuance rate: leaves (fresh P-256 key, signed by the issuer) per second on one
//! core. Run with `cargo bench --bench identity`; the number goes into BENCHMARKS.md.

use std::time::{Duration, Instant, SystemTime};

use meshkeep::identity::IdentityName;
use meshkeep::identity::ca::{Issuer, standalone};

fn main() {
    let count: usize = std::env::var("MESHKEEP_BENCH_CERTS").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    let now = SystemTime::now();
    let issuer =
        Issuer::from_pem(&standalone("cluster.local", now, Duration::from_secs(365 * 86400)).expect("standalone"))
            .expect("issuer");
    let mut runs = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        for i in 0..count {
            let name = IdentityName::new("bench", &format!("sa-{i}"), "cluster.local", "linkerd");
            issuer.issue(&name, now, Duration::from_secs(86400), Duration::from_secs(60)).expect("issue");
        }
        runs.push(count as f64 / started.elapsed().as_secs_f64());
    }
    runs.sort_by(f64::total_cmp);
    println!(
        "certificates issued per second on one core: {:.0} (runs: {:?})",
        runs[1],
        runs.iter().map(|r| r.round()).collect::<Vec<_>>()
    );
}
