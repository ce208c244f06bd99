//! What one bridge instance keeps count of for operators and tests: poison deliveries and the
//! queues it declared.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

/// Counters and records of one bridge instance.
#[derive(Default)]
pub(crate) struct Ledger {
    poison: AtomicU64,
    /// Every queue this instance declared, for operators and test cleanup.
    declared: Mutex<BTreeSet<String>>,
}

impl Ledger {
    /// Counts one poison delivery (dead-lettered, dropped or quarantined with a warning).
    pub(crate) fn count_poison(&self) {
        self.poison.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn poison(&self) -> u64 {
        self.poison.load(Ordering::Relaxed)
    }

    /// Remembers a queue this instance declared.
    pub(crate) fn record(&self, queue: &str) {
        let mut declared = self.declared.lock();
        if !declared.contains(queue) {
            declared.insert(queue.to_string());
        }
    }

    /// Every queue this instance declared, sorted.
    pub(crate) fn declared(&self) -> Vec<String> {
        self.declared.lock().iter().cloned().collect()
    }
}
