//! The last answer a connection worked out (where its requests go, whether they are allowed),
//! kept while the snapshot it was worked out against is the current one.

use std::sync::{Arc, Mutex, Weak};

use crate::store::Snapshot;

/// A connection's last answer for a key. It holds while the store's current snapshot is the one
/// it was worked out against: that snapshot is held weakly, so an idle connection does not keep
/// an old one alive, and compared by address. A weak reference never dangles, so no later
/// snapshot can take that address while the answer is kept.
#[derive(Debug)]
pub(super) struct Memo<K, V> {
    last: Mutex<Option<Kept<K, V>>>,
}

#[derive(Debug)]
struct Kept<K, V> {
    snapshot: Weak<Snapshot>,
    key: K,
    value: V,
}

impl<K, V> Default for Memo<K, V> {
    fn default() -> Self {
        Self { last: Mutex::new(None) }
    }
}

impl<K, V> Memo<K, V> {
    /// `read` of the answer kept for `snapshot` (the current one) and a key that `matches`.
    pub(super) fn get<R>(
        &self,
        snapshot: &Snapshot,
        matches: impl FnOnce(&K) -> bool,
        read: impl FnOnce(&V) -> R,
    ) -> Option<R> {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let kept = last.as_ref()?;
        (std::ptr::eq(kept.snapshot.as_ptr(), snapshot) && matches(&kept.key)).then(|| read(&kept.value))
    }

    /// Keeps `value` for `key` under `snapshot`, or with `None` forgets the last answer.
    pub(super) fn keep(&self, snapshot: &Arc<Snapshot>, answer: Option<(K, V)>) {
        let kept = answer.map(|(key, value)| Kept { snapshot: Arc::downgrade(snapshot), key, value });
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = kept;
    }
}
