//! The sd_notify protocol: READY, STATUS, STOPPING and WATCHDOG messages to systemd.
//!
//! Messages are best effort: a failed send is logged, never fatal, because the service must keep
//! serving even if the manager's socket misbehaves.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends notifications to the socket systemd named in `NOTIFY_SOCKET`, or does nothing when the
/// process was not started by systemd with `Type=notify`.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    /// A notifier for the socket path systemd gave (`@name` for the abstract namespace).
    pub fn new(notify_socket: Option<&str>) -> io::Result<Self> {
        let Some(path) = notify_socket.filter(|p| !p.is_empty()) else {
            return Ok(Self::disabled());
        };
        let addr = match path.strip_prefix('@') {
            Some(name) => SocketAddr::from_abstract_name(name)?,
            None => SocketAddr::from_pathname(path)?,
        };
        Ok(Self { target: Some((UnixDatagram::unbound()?, addr)) })
    }

    /// A notifier that sends nothing.
    pub fn disabled() -> Self {
        Self { target: None }
    }

    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// The service is serving: READY=1 with a status line.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    /// A status line shown by `systemctl status`.
    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={}", one_line(status)));
    }

    /// A reload started (READY=1 follows when it is done).
    pub fn reloading(&self) {
        self.send("RELOADING=1\nSTATUS=reloading the configuration");
    }

    /// The service is shutting down.
    pub fn stopping(&self, status: &str) {
        self.send(&format!("STOPPING=1\nSTATUS={}", one_line(status)));
    }

    /// The service is alive (only when its health loop has proved it).
    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }

    fn send(&self, message: &str) {
        let Some((socket, addr)) = &self.target else { return };
        if let Err(e) = socket.send_to_addr(message.as_bytes(), addr) {
            tracing::warn!(error = %e, "cannot notify systemd");
        }
    }
}

/// STATUS= ends at a newline, so a multi-line status would inject other assignments.
fn one_line(status: &str) -> String {
    status.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_the_socket_in_sd_notify_format() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let server = UnixDatagram::bind(&path).expect("bind");
        let notifier = Notifier::new(path.to_str()).expect("notifier");
        notifier.ready("serving\nSTOPPING=1");
        notifier.watchdog();
        let mut buf = [0u8; 256];
        let n = server.recv(&mut buf).expect("recv");
        assert_eq!(std::str::from_utf8(&buf[..n]).unwrap(), "READY=1\nSTATUS=serving STOPPING=1");
        let n = server.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"WATCHDOG=1");
    }

    #[test]
    fn abstract_socket_names_are_supported() {
        let name = format!("meshkeep-test-{}", std::process::id());
        let server = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).expect("bind");
        Notifier::new(Some(&format!("@{name}"))).expect("notifier").status("hello");
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"STATUS=hello");
    }

    #[test]
    fn without_a_socket_nothing_is_sent() {
        assert!(!Notifier::new(None).expect("notifier").is_enabled());
    }
}
