//! A small network of hosts in network namespaces the test creates itself. The test's own thread
//! moves into a fresh namespace, the "upstream" host, where the fake API server runs; every other
//! host is a named namespace with an uplink (a veth pair to upstream, 10.77.N.2 here and
//! 10.77.N.1 on the upstream side) and a port on a LAN bridge shared by all hosts (10.78.0.N).
//! Cutting a host's uplink leaves its LAN alone, as when a backhoe cuts a site's fiber.
//!
//! Needs root and real kernel networking: under qemu-user or without root the drills say so
//! loudly and do not run.

use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::process::Command;

fn run(program: &str, args: &[&str]) {
    let output = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(output.status.success(), "{program} {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
}

/// One host of the lab.
pub struct Host {
    /// The namespace's name under /run/netns.
    pub netns: String,
    /// The host's address on its uplink; the upstream side is [`Host::upstream_ip`].
    pub uplink_ip: Ipv4Addr,
    /// The host's address on the LAN between hosts.
    pub lan_ip: Ipv4Addr,
    index: u8,
}

impl Host {
    /// The upstream host's address on this host's uplink (where the API server is reached).
    pub fn upstream_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.index, 1)
    }

    fn uplink_device(&self) -> String {
        format!("up{}", self.index)
    }
}

/// The hosts, removed again when dropped.
pub struct Lab {
    pub hosts: Vec<Host>,
}

/// How a cut looks to the hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// The uplink goes down (carrier lost on both ends).
    LinkDown,
    /// nftables on the host silently drops everything to and from upstream, both ways: no reset,
    /// no ICMP, the packets just vanish.
    SilentDrop,
}

impl Lab {
    /// Whether drills that need namespaces can run here; says why not, loudly, when they cannot.
    pub fn available(drill: &str) -> bool {
        if !nix::unistd::getuid().is_root() {
            super::skip(&format!("{drill} needs root (network namespaces, nftables)"));
            return false;
        }
        if std::env::var_os("MESHKEEP_UNDER_QEMU_USER").is_some() {
            super::skip(&format!(
                "{drill} does not run under qemu-user (the emulated daemon would only re-run the native drill); the native run covers it"
            ));
            return false;
        }
        for tool in ["ip", "nft"] {
            super::require_tool(tool);
        }
        true
    }

    /// Moves the calling thread into a new namespace (the upstream host) and creates `count`
    /// hosts. Call on the test's own thread before starting anything that should live upstream.
    pub fn create(count: u8) -> Lab {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare the network namespace");
        run("ip", &["link", "set", "lo", "up"]);
        // Unique across the labs of this process (tests run in parallel) and across processes.
        static LABS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let tag = format!("{}-{}", std::process::id(), LABS.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        run("ip", &["link", "add", "lan", "type", "bridge"]);
        run("ip", &["link", "set", "lan", "up"]);
        let mut lab = Lab { hosts: Vec::new() };
        for index in 1..=count {
            let host = Host {
                netns: format!("mk{tag}-{index}"),
                uplink_ip: Ipv4Addr::new(10, 77, index, 2),
                lan_ip: Ipv4Addr::new(10, 78, 0, index),
                index,
            };
            run("ip", &["netns", "add", &host.netns]);
            // Pushed before configuring, so a failure below still removes the namespace.
            lab.hosts.push(host);
            let host = lab.hosts.last().expect("just pushed");
            let ns = host.netns.as_str();
            let up = host.uplink_device();
            run("ip", &["link", "add", &up, "type", "veth", "peer", "name", "uplink", "netns", ns]);
            run("ip", &["addr", "add", &format!("{}/24", host.upstream_ip()), "dev", &up]);
            run("ip", &["link", "set", &up, "up"]);
            let lan = format!("lan{index}");
            run("ip", &["link", "add", &lan, "type", "veth", "peer", "name", "lan", "netns", ns]);
            run("ip", &["link", "set", &lan, "master", "lan"]);
            run("ip", &["link", "set", &lan, "up"]);
            for args in [
                vec!["link", "set", "lo", "up"],
                vec!["addr", "add", &format!("{}/24", host.uplink_ip), "dev", "uplink"],
                vec!["link", "set", "uplink", "up"],
                vec!["addr", "add", &format!("{}/24", host.lan_ip), "dev", "lan"],
                vec!["link", "set", "lan", "up"],
            ] {
                let mut full = vec!["-n", ns];
                full.extend(args);
                run("ip", &full);
            }
        }
        lab
    }

    /// Runs `f` on a thread inside `host`'s namespace (its loopback, its ports) and returns
    /// what it returns. Threads `f` starts stay in that namespace.
    pub fn within<T: Send>(&self, host: &Host, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let file = std::fs::File::open(format!("/run/netns/{}", host.netns)).expect("open the netns");
                    nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                    f()
                })
                .join()
                .expect("the closure run inside the namespace panicked")
        })
    }

    /// A command that runs inside `host`'s namespace.
    pub fn command(&self, host: &Host, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &host.netns, program]);
        command
    }

    /// Cuts `host` off from upstream.
    pub fn cut(&self, host: &Host, how: Cut) {
        match how {
            Cut::LinkDown => run("ip", &["link", "set", &host.uplink_device(), "down"]),
            Cut::SilentDrop => {
                let upstream = host.upstream_ip().to_string();
                let rules = format!(
                    "table inet backhoe {{\n\
                     \x20 chain input {{ type filter hook input priority -10; ip saddr {upstream} drop; }}\n\
                     \x20 chain output {{ type filter hook output priority -10; ip daddr {upstream} drop; }}\n\
                     }}\n"
                );
                let path = std::env::temp_dir().join(format!("{}-backhoe.nft", host.netns));
                std::fs::write(&path, rules).expect("write the nftables rules");
                run("ip", &["netns", "exec", &host.netns, "nft", "-f", &path.display().to_string()]);
                let _ = std::fs::remove_file(path);
            }
        }
    }

    /// Undoes [`Lab::cut`].
    pub fn mend(&self, host: &Host, how: Cut) {
        match how {
            Cut::LinkDown => run("ip", &["link", "set", &host.uplink_device(), "up"]),
            Cut::SilentDrop => run("ip", &["netns", "exec", &host.netns, "nft", "delete", "table", "inet", "backhoe"]),
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for host in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", &host.netns]).output();
        }
    }
}
