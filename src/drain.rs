//! Graceful shutdown: one signal tells every listener to stop accepting and every connection to
//! finish, and the signaller waits until all of them have let go.

use tokio::sync::watch;

/// Creates a drain: the [`Signal`] starts it, each [`Watch`] clone is held by something that
/// must finish first.
pub fn channel() -> (Signal, Watch) {
    let (tx, rx) = watch::channel(false);
    (Signal(tx), Watch(rx))
}

/// Starts a drain and waits for it to complete.
#[derive(Debug)]
pub struct Signal(watch::Sender<bool>);

/// Held by a listener or connection for as long as it must be waited for.
#[derive(Debug, Clone)]
pub struct Watch(watch::Receiver<bool>);

impl Signal {
    /// Tells every watcher to finish, then waits until all of them have been dropped.
    pub async fn drain(self) {
        self.0.send_replace(true);
        self.0.closed().await;
    }

    /// How many watchers are still alive (listeners and connections not yet finished).
    pub fn watchers(&self) -> usize {
        self.0.receiver_count()
    }
}

impl Watch {
    /// Resolves once draining has started.
    pub async fn signaled(&self) {
        let mut rx = self.0.clone();
        // An error means the Signal was dropped without draining: treat that as a drain too.
        let _ = rx.wait_for(|draining| *draining).await;
    }

    /// Whether draining has started.
    pub fn is_draining(&self) -> bool {
        *self.0.borrow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn drain_waits_for_every_watch_to_be_dropped() {
        let (signal, watch) = channel();
        let held = watch.clone();
        drop(watch);
        let finished = tokio::spawn(async move {
            held.signaled().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(held);
        });
        tokio::time::timeout(Duration::from_secs(5), signal.drain()).await.expect("drain completes");
        finished.await.expect("watcher task");
    }

    #[tokio::test]
    async fn drain_does_not_complete_while_a_watch_is_held() {
        let (signal, watch) = channel();
        let pending = tokio::time::timeout(Duration::from_millis(100), signal.drain()).await;
        assert!(pending.is_err(), "drain finished although a watch was still held");
        assert!(watch.is_draining());
    }
}
