//! The live provider links of this gateway, by session, so that an operator
//! (or a suspension) can close a device's link: its task is cancelled, the
//! HTTP/2 connection drops, and the node sees a disconnect.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio_util::sync::CancellationToken;

#[derive(Default)]
pub struct Links {
    open: Mutex<HashMap<u64, (String, CancellationToken)>>,
}

impl Links {
    /// Registers a link; the returned token is cancelled to close it.
    pub fn open(&self, session: u64, device_id: &str) -> CancellationToken {
        let token = CancellationToken::new();
        self.lock().insert(session, (device_id.to_string(), token.clone()));
        token
    }

    pub fn closed(&self, session: u64) {
        self.lock().remove(&session);
    }

    /// Closes every link of a device; returns how many there were.
    pub fn close_device(&self, device_id: &str) -> usize {
        let open = self.lock();
        let mut n = 0;
        for (device, token) in open.values() {
            if device == device_id {
                token.cancel();
                n += 1;
            }
        }
        n
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (String, CancellationToken)>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closing_a_device_cancels_only_its_links() {
        let links = Links::default();
        let a1 = links.open(1, "a");
        let a2 = links.open(2, "a");
        let b = links.open(3, "b");
        assert_eq!(links.close_device("a"), 2);
        assert!(a1.is_cancelled() && a2.is_cancelled() && !b.is_cancelled());
        links.closed(3);
        assert_eq!(links.close_device("b"), 0);
    }
}
