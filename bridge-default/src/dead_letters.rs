//! Dead-letter targets held in the hub's memory, and the operator calls on them.
//!
//! A real broker keeps dead-lettered messages in a queue an operator can read; here each target
//! is a bounded list in the hub. It is bounded because process memory is the only store: the
//! newest [`DEAD_LETTER_CAPACITY`] entries per target are kept and dropping an older one is
//! logged, so a poison flood cannot exhaust memory.
//!
//! Each entry remembers the subscription group it came from (a shared subscription's key, or
//! one broadcast instance's consumer), so a replay hands it back to exactly that group and no
//! other subscription sees it again.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;
use purista_core::envelope::now_ms;
use purista_core::{
    DeadLetterEntry, DeadLetterNote, Envelope, LeftDeadLetter, NotReplayed, ReplayReport,
};

use crate::consumer_queue::Queued;
use crate::subscriptions::SubscriptionRoutes;

/// Entries kept per dead-letter target; older ones are dropped with a warning.
pub const DEAD_LETTER_CAPACITY: usize = 10_000;

/// One dead letter and the group it came from.
struct Stored {
    entry: DeadLetterEntry,
    envelope: Arc<Envelope>,
    group: Arc<str>,
}

/// Every dead-letter target of one hub.
#[derive(Default)]
pub(crate) struct DeadLetters {
    targets: Mutex<HashMap<String, VecDeque<Stored>>>,
}

impl DeadLetters {
    /// Stores `envelope`, dead-lettered by subscription group `group`, under `note.target`.
    pub(crate) fn push(&self, note: DeadLetterNote, envelope: Arc<Envelope>, group: Arc<str>) {
        let target = note.target.clone();
        let stored = Stored {
            entry: DeadLetterEntry {
                note,
                envelope: Some((*envelope).clone()),
                raw: None,
                dead_lettered_at: now_ms(),
            },
            envelope,
            group,
        };
        let dropped = {
            let mut targets = self.targets.lock();
            let entries = targets.entry(target.clone()).or_default();
            let dropped = if entries.len() >= DEAD_LETTER_CAPACITY {
                entries.pop_front()
            } else {
                None
            };
            entries.push_back(stored);
            dropped
        };
        if let Some(old) = dropped {
            tracing::warn!(
                dead_letter_target = %target,
                dropped_message_id = %old.envelope.id,
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
            .map(|entries| {
                entries
                    .iter()
                    .take(limit)
                    .map(|s| s.entry.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Hands up to `limit` entries of `target`, oldest first, back to the groups they came
    /// from as attempt 1; entries whose group is gone stay, in their order, at the front.
    pub(crate) async fn replay(
        &self,
        target: &str,
        limit: usize,
        routes: &SubscriptionRoutes,
    ) -> ReplayReport {
        let taken: Vec<Stored> = {
            let mut targets = self.targets.lock();
            match targets.get_mut(target) {
                Some(entries) => {
                    let n = limit.min(entries.len());
                    entries.drain(..n).collect()
                }
                None => Vec::new(),
            }
        };
        let mut report = ReplayReport::default();
        let mut kept = Vec::new();
        for stored in taken {
            let item = Queued {
                envelope: stored.envelope.clone(),
                attempt: 1,
            };
            if routes.requeue(&stored.group, item).await {
                report.replayed += 1;
            } else {
                report.left.push(LeftDeadLetter {
                    message_id: Some(stored.envelope.id.clone()),
                    reason: NotReplayed::SourceGone {
                        source: stored.entry.note.origin.clone(),
                    },
                });
                kept.push(stored);
            }
        }
        if !kept.is_empty() {
            let mut targets = self.targets.lock();
            let entries = targets.entry(target.to_string()).or_default();
            for stored in kept.into_iter().rev() {
                entries.push_front(stored);
            }
        }
        tracing::info!(
            dead_letter_target = target,
            replayed = report.replayed,
            left = report.left.len(),
            "dead letters replayed"
        );
        report
    }

    /// Deletes every entry of `target`; returns how many.
    pub(crate) fn purge(&self, target: &str) -> usize {
        let purged = self
            .targets
            .lock()
            .remove(target)
            .map_or(0, |entries| entries.len());
        tracing::info!(dead_letter_target = target, purged, "dead letters purged");
        purged
    }
}
