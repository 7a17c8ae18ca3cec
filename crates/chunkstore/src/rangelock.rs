//! I/O PATH. Per-chunk block-range locks: writers of overlapping blocks are
//! serialized (otherwise a third write could overwrite the slot that the first
//! write's data still needs); readers share, so a read never verifies data against
//! slots that changed under it.
//!
//! The set of held ranges is tiny (at most the queue depth), so a vector under a
//! std mutex held for a few instructions beats anything cleverer.

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

#[derive(Default)]
pub struct RangeLocks {
    held: Mutex<State>,
    released: Notify,
}

#[derive(Default)]
struct State {
    held: Vec<Held>,
    next_token: u64,
}

#[derive(Clone, Copy)]
struct Held {
    token: u64,
    start: u32,
    end: u32,
    shared: bool,
}

/// Holds blocks [start, end) until dropped (possibly on the ring thread, when the
/// I/O it protects completes).
pub struct RangeGuard {
    locks: Arc<RangeLocks>,
    token: u64,
}

impl RangeLocks {
    /// Locks blocks [start, end); `shared` for readers.
    pub async fn lock(self: &Arc<Self>, start: u32, end: u32, shared: bool) -> RangeGuard {
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            // Register before looking, so a release between the look and the await
            // still wakes us.
            notified.as_mut().enable();
            if let Some(token) = self.try_lock(start, end, shared) {
                return RangeGuard { locks: self.clone(), token };
            }
            notified.await;
        }
    }

    fn try_lock(&self, start: u32, end: u32, shared: bool) -> Option<u64> {
        let mut st = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let conflict = st.held.iter().any(|h| h.start < end && start < h.end && !(h.shared && shared));
        if conflict {
            return None;
        }
        st.next_token = st.next_token.wrapping_add(1);
        let token = st.next_token;
        st.held.push(Held { token, start, end, shared });
        Some(token)
    }
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        {
            let mut st = self.locks.held.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(i) = st.held.iter().position(|h| h.token == self.token) {
                st.held.swap_remove(i);
            }
        }
        self.locks.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn overlapping_writers_wait_readers_share() {
        let l = Arc::new(RangeLocks::default());
        let a = l.lock(0, 4, false).await;
        assert!(l.try_lock(3, 5, false).is_none());
        assert!(l.try_lock(3, 5, true).is_none());
        let b = l.lock(4, 8, false).await; // adjacent: no overlap
        let waiter = {
            let l = l.clone();
            tokio::spawn(async move { l.lock(2, 3, false).await })
        };
        drop(a);
        let c = waiter.await.expect("join");
        drop(c);
        drop(b);
        let r1 = l.lock(0, 8, true).await;
        let r2 = l.lock(0, 8, true).await;
        assert!(l.try_lock(0, 1, false).is_none());
        drop((r1, r2));
        assert!(l.try_lock(0, 1, false).is_some());
    }
}
