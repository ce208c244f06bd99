//! The queue bridge's clock: epoch milliseconds read from `tokio::time::Instant`.
//!
//! Jobs carry epoch-ms timestamps (`run_at_ms`, `lease_expires_at_ms`, …), but waiting is done
//! with tokio timers. Taking one `(Instant, epoch ms)` pair at construction and deriving every
//! later epoch time from the elapsed `tokio::time::Instant` keeps both views on one clock, so a
//! test that pauses or advances tokio's clock moves the queue's notion of "now" with it.

use std::time::Duration;

use purista_core::envelope::now_ms;
use tokio::time::Instant;

/// Epoch milliseconds that follow `tokio::time::Instant`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    base_instant: Instant,
    base_epoch_ms: u64,
}

impl Clock {
    /// A clock anchored at the current instant and wall-clock time.
    pub(crate) fn new() -> Self {
        Clock {
            base_instant: Instant::now(),
            base_epoch_ms: now_ms(),
        }
    }

    /// Now, in epoch milliseconds.
    pub(crate) fn now_ms(&self) -> u64 {
        let elapsed = Instant::now().saturating_duration_since(self.base_instant);
        self.base_epoch_ms.saturating_add(millis(elapsed))
    }

    /// The instant at which `now_ms()` reaches `epoch_ms`; `None` when it lies beyond what an
    /// `Instant` can represent (then there is nothing to wait for).
    pub(crate) fn instant_at(&self, epoch_ms: u64) -> Option<Instant> {
        let offset = Duration::from_millis(epoch_ms.saturating_sub(self.base_epoch_ms));
        self.base_instant.checked_add(offset)
    }
}

/// A duration in whole milliseconds, saturating at `u64::MAX`.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
