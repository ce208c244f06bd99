//! Idempotency keys of one queue: key → first job id, remembered for the queue's retry window.
//!
//! A second index ordered by expiry lets expired keys be dropped from the front, so the map
//! never holds more than the keys enqueued within one retry window.

use std::collections::{BTreeSet, HashMap};

/// Remembered idempotency keys with their expiry.
#[derive(Debug, Default)]
pub(crate) struct IdempotencyKeys {
    by_key: HashMap<String, (String, u64)>,
    by_expiry: BTreeSet<(u64, String)>,
}

impl IdempotencyKeys {
    /// The first job id enqueued with `key`, if the key is still remembered.
    pub(crate) fn job_id(&self, key: &str) -> Option<&str> {
        self.by_key.get(key).map(|(id, _)| id.as_str())
    }

    /// Remembers `key` → `job_id` until `expires_at_ms`.
    pub(crate) fn remember(&mut self, key: String, job_id: String, expires_at_ms: u64) {
        if let Some((_, old_expiry)) = self.by_key.get(&key) {
            self.by_expiry.remove(&(*old_expiry, key.clone()));
        }
        self.by_expiry.insert((expires_at_ms, key.clone()));
        self.by_key.insert(key, (job_id, expires_at_ms));
    }

    /// When the first remembered key expires.
    pub(crate) fn first_expiry(&self) -> Option<u64> {
        self.by_expiry.first().map(|&(expiry, _)| expiry)
    }

    /// Forgets every key whose window ended at or before `now_ms`.
    pub(crate) fn forget_expired(&mut self, now_ms: u64) {
        while let Some((expiry, _)) = self.by_expiry.first() {
            if *expiry > now_ms {
                break;
            }
            if let Some((_, key)) = self.by_expiry.pop_first() {
                self.by_key.remove(&key);
            }
        }
    }
}
