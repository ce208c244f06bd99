//! Dead-letter targets held in the hub's memory.
//!
//! A real broker keeps dead-lettered messages in a queue an operator can read; here each target
//! is a bounded list in the hub. It is bounded because process memory is the only store: the
//! newest [`DEAD_LETTER_CAPACITY`] entries per target are kept and dropping an older one is
//! logged, so a poison flood cannot exhaust memory.

use std::collections::{HashMap, VecDeque};

use parking_lot::Mutex;
use purista_core::envelope::now_ms;
use purista_core::{DeadLetterEntry, DeadLetterNote, Envelope};

/// Entries kept per dead-letter target; older ones are dropped with a warning.
pub const DEAD_LETTER_CAPACITY: usize = 10_000;

/// Every dead-letter target of one hub.
#[derive(Default)]
pub(crate) struct DeadLetters {
    targets: Mutex<HashMap<String, VecDeque<DeadLetterEntry>>>,
}

impl DeadLetters {
    /// Stores `envelope` under `note.target`.
    pub(crate) fn push(&self, note: DeadLetterNote, envelope: &Envelope) {
        let target = note.target.clone();
        let entry = DeadLetterEntry {
            note,
            envelope: Some(envelope.clone()),
            raw: None,
            dead_lettered_at: now_ms(),
        };
        let dropped = {
            let mut targets = self.targets.lock();
            let entries = targets.entry(target.clone()).or_default();
            let dropped = if entries.len() >= DEAD_LETTER_CAPACITY {
                entries.pop_front()
            } else {
                None
            };
            entries.push_back(entry);
            dropped
        };
        if let Some(old) = dropped {
            tracing::warn!(
                dead_letter_target = %target,
                dropped_message_id = old.envelope.as_ref().map(|e| e.id.as_str()).unwrap_or(""),
                capacity = DEAD_LETTER_CAPACITY,
                "dead-letter target is full: oldest entry dropped"
            );
        }
    }

    /// Up to `limit` entries of `target`, oldest first, without removing them.
    pub(crate) fn read(&self, target: &str, limit: usize) -> Vec<DeadLetterEntry> {
        self.targets
            .lock()
            .get(target)
            .map(|entries| entries.iter().take(limit).cloned().collect())
            .unwrap_or_default()
    }
}
