//! Dead-letter lists, one per dead-letter queue name.
//!
//! Jobs land in the list named by `QueueConfig::dead_letter_queue_for(queue)`. Several queues
//! may share a custom dead-letter queue, so every operation is scoped to the origin queue
//! (`job.queue`): inspecting, replaying or purging through queue `a` never touches `b`'s jobs.
//! Each list is kept sorted by dead-letter time, oldest first.

use std::collections::{HashMap, HashSet};

use purista_core::queue::DeadLetteredJob;

/// All dead-lettered jobs of the bridge.
#[derive(Debug, Default)]
pub(crate) struct DeadLetters {
    lists: HashMap<String, Vec<DeadLetteredJob>>,
}

impl DeadLetters {
    /// Adds `entry` to the dead-letter queue `dlq`.
    pub(crate) fn push(&mut self, dlq: &str, entry: DeadLetteredJob) {
        tracing::warn!(
            queue = %entry.job.queue,
            dead_letter_queue = dlq,
            job_id = %entry.job.id,
            attempt = entry.job.attempt,
            reason = %entry.reason,
            "job dead-lettered"
        );
        let list = self.lists.entry(dlq.to_owned()).or_default();
        let at = entry.dead_lettered_at_ms;
        let index = list.partition_point(|e| e.dead_lettered_at_ms <= at);
        list.insert(index, entry);
    }

    /// How many jobs from `origin` are in `dlq`.
    pub(crate) fn count(&self, dlq: &str, origin: &str) -> usize {
        self.lists.get(dlq).map_or(0, |list| {
            list.iter().filter(|e| e.job.queue == origin).count()
        })
    }

    /// Up to `limit` jobs from `origin` in `dlq`, oldest first.
    pub(crate) fn list(&self, dlq: &str, origin: &str, limit: usize) -> Vec<DeadLetteredJob> {
        self.lists.get(dlq).map_or_else(Vec::new, |list| {
            list.iter()
                .filter(|e| e.job.queue == origin)
                .take(limit)
                .cloned()
                .collect()
        })
    }

    /// Removes and returns the jobs from `origin` in `dlq` (only those in `ids`, when given),
    /// oldest first.
    pub(crate) fn take(
        &mut self,
        dlq: &str,
        origin: &str,
        ids: Option<&HashSet<String>>,
    ) -> Vec<DeadLetteredJob> {
        let Some(list) = self.lists.get_mut(dlq) else {
            return Vec::new();
        };
        let selected = |e: &DeadLetteredJob| {
            e.job.queue == origin && ids.is_none_or(|ids| ids.contains(&e.job.id))
        };
        let (taken, kept): (Vec<_>, Vec<_>) = std::mem::take(list).into_iter().partition(selected);
        if kept.is_empty() {
            self.lists.remove(dlq);
        } else {
            *list = kept;
        }
        taken
    }
}
