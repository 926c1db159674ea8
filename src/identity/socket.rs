//! The local identity API: a Unix socket where a workload, recognised by the uid the kernel
//! reports for the connection (SO_PEERCRED), gets its key, certificate chain and trust bundle.
//!
//! Protocol: connect and read one JSON object, then EOF. Unknown callers get
//! `{"error": "..."}` and nothing else.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};

use super::clock::Clock;
use super::manager::Manager;
use super::{Error, fmt_time};
use crate::drain;

/// What a workload receives.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Answer {
    pub identity: String,
    pub spiffe_id: String,
    pub not_after: String,
    pub private_key_pem: String,
    /// The leaf first, then the issuer chain.
    pub certificate_chain_pem: String,
    pub trust_bundle_pem: String,
}

/// Binds the socket (replacing a stale one), world-connectable: who may get what is decided by
/// the caller's uid, not by file permissions.
pub fn bind(path: &Path) -> Result<UnixListener, Error> {
    let io = |source| Error::Io { path: path.to_owned(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(io)?;
    Ok(listener)
}

/// Serves the socket until the drain starts.
pub async fn serve<C: Clock>(listener: UnixListener, manager: Arc<Mutex<Manager<C>>>, drain: drain::Watch) {
    loop {
        let stream = tokio::select! {
            _ = drain.signaled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "identity socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let manager = Arc::clone(&manager);
        tokio::spawn(async move {
            if let Err(e) = tokio::time::timeout(Duration::from_secs(10), answer(stream, manager)).await {
                tracing::debug!(error = %e, "identity socket: client too slow");
            }
        });
    }
}

async fn answer<C: Clock>(mut stream: UnixStream, manager: Arc<Mutex<Manager<C>>>) {
    let uid = match stream.peer_cred() {
        Ok(cred) => cred.uid(),
        Err(e) => {
            tracing::warn!(error = %e, "identity socket: no peer credentials");
            return;
        }
    };
    let reply = tokio::task::spawn_blocking(move || {
        // A poisoned lock means a panic elsewhere; the manager's state is still consistent
        // because every mutation completes before it returns.
        let mut manager = manager.lock().unwrap_or_else(|e| e.into_inner());
        let Some(workload) = manager.workload_for_uid(uid).cloned() else {
            tracing::warn!(uid, "identity socket: refused a caller whose uid maps to no identity");
            return serde_json::json!({ "error": format!("uid {uid} is not mapped to an identity") });
        };
        match manager.certificate(&workload.name) {
            Ok(leaf) => serde_json::to_value(Answer {
                identity: workload.name.dns_name(),
                spiffe_id: workload.name.spiffe_id(),
                not_after: fmt_time(leaf.info.not_after),
                private_key_pem: leaf.key_pem.clone(),
                certificate_chain_pem: leaf.chain_pem(),
                trust_bundle_pem: leaf.trust_anchors_pem(),
            })
            .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() })),
            Err(e) => serde_json::json!({ "error": e.to_string() }),
        }
    })
    .await
    .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }));
    let mut bytes = serde_json::to_vec(&reply).unwrap_or_default();
    bytes.push(b'\n');
    let _ = stream.write_all(&bytes).await;
    let _ = stream.shutdown().await;
}
