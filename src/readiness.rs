//! Readiness: `/ready` and systemd's READY=1 wait until every startup gate has opened.

use std::collections::BTreeSet;
use std::sync::Arc;

use tokio::sync::watch;

/// The set of startup conditions that have not been met yet.
#[derive(Debug)]
pub struct Readiness {
    pending: watch::Sender<BTreeSet<&'static str>>,
}

/// One startup condition; ready is reported once every gate is opened.
#[derive(Debug)]
#[must_use = "a gate that is never opened keeps the process unready"]
pub struct Gate {
    readiness: Arc<Readiness>,
    name: &'static str,
}

impl Readiness {
    pub fn new() -> Arc<Self> {
        Arc::new(Self { pending: watch::Sender::new(BTreeSet::new()) })
    }

    /// Registers a condition that must be met before the process is ready.
    pub fn gate(self: &Arc<Self>, name: &'static str) -> Gate {
        self.pending.send_modify(|pending| {
            pending.insert(name);
        });
        Gate { readiness: Arc::clone(self), name }
    }

    /// The conditions still unmet, in name order.
    pub fn pending(&self) -> Vec<&'static str> {
        self.pending.borrow().iter().copied().collect()
    }

    pub fn is_ready(&self) -> bool {
        self.pending.borrow().is_empty()
    }

    /// Resolves once every gate has opened.
    pub async fn wait(&self) {
        let mut rx = self.pending.subscribe();
        // The sender lives in self, so the channel cannot close while we wait.
        let _ = rx.wait_for(BTreeSet::is_empty).await;
    }
}

impl Gate {
    /// Marks this condition as met.
    pub fn open(self) {
        self.readiness.pending.send_modify(|pending| {
            pending.remove(self.name);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ready_only_after_every_gate_opens() {
        let readiness = Readiness::new();
        assert!(readiness.is_ready(), "no gates means ready");
        let store = readiness.gate("store");
        let listeners = readiness.gate("listeners");
        assert_eq!(readiness.pending(), ["listeners", "store"]);
        store.open();
        assert!(!readiness.is_ready());
        listeners.open();
        assert!(readiness.is_ready());
        tokio::time::timeout(std::time::Duration::from_secs(1), readiness.wait()).await.expect("wait resolves");
    }
}
