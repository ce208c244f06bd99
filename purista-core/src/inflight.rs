//! In-flight work counters by kind, with RAII guards and an awaitable "reached zero".
//!
//! Both bridges and services keep one [`InFlightTracker`]. Each running handler holds an
//! [`InFlightGuard`]; dropping it (including on panic or cancellation) decrements the counter,
//! so drain can simply wait for the total to reach zero.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// Kinds of work that are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum WorkKind {
    /// A command handler, or a pending invocation on the caller's side.
    Command,
    /// A subscription handler.
    Subscription,
    /// A stream producer.
    Stream,
    /// A queue job handler.
    Queue,
    /// Anything else.
    Generic,
}

/// Counts by kind: `{ total, byKind: {command, subscription, stream, queue, generic} }`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InFlight {
    /// Sum of all kinds.
    pub total: usize,
    /// Per kind.
    pub by_kind: InFlightByKind,
}

/// Per-kind in-flight counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlightByKind {
    /// Commands.
    pub command: usize,
    /// Subscriptions.
    pub subscription: usize,
    /// Streams.
    pub stream: usize,
    /// Queue jobs.
    pub queue: usize,
    /// Other.
    pub generic: usize,
}

#[derive(Default)]
struct Inner {
    counts: [AtomicUsize; 5],
    // Which registrations are running, for the drain report. Keyed by an increasing ticket.
    running: Mutex<BTreeMap<u64, (WorkKind, Arc<str>)>>,
    next_ticket: std::sync::atomic::AtomicU64,
    zero: Notify,
}

/// Thread-safe counters of running work. Cheap to clone.
#[derive(Clone, Default)]
pub struct InFlightTracker {
    inner: Arc<Inner>,
}

fn idx(kind: WorkKind) -> usize {
    match kind {
        WorkKind::Command => 0,
        WorkKind::Subscription => 1,
        WorkKind::Stream => 2,
        WorkKind::Queue => 3,
        WorkKind::Generic => 4,
    }
}

impl InFlightTracker {
    /// A tracker with all counts at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one unit of `kind` work for `registration` until the guard is dropped.
    pub fn start(&self, kind: WorkKind, registration: &Arc<str>) -> InFlightGuard {
        self.inner.counts[idx(kind)].fetch_add(1, Ordering::AcqRel);
        let ticket = self.inner.next_ticket.fetch_add(1, Ordering::Relaxed);
        self.inner
            .running
            .lock()
            .insert(ticket, (kind, registration.clone()));
        InFlightGuard {
            tracker: self.clone(),
            kind,
            ticket,
        }
    }

    /// Current counts.
    pub fn snapshot(&self) -> InFlight {
        let c = |k| self.inner.counts[idx(k)].load(Ordering::Acquire);
        let by_kind = InFlightByKind {
            command: c(WorkKind::Command),
            subscription: c(WorkKind::Subscription),
            stream: c(WorkKind::Stream),
            queue: c(WorkKind::Queue),
            generic: c(WorkKind::Generic),
        };
        InFlight {
            total: by_kind.command
                + by_kind.subscription
                + by_kind.stream
                + by_kind.queue
                + by_kind.generic,
            by_kind,
        }
    }

    /// What is running now: `(kind, registration)` per unit, oldest first.
    pub fn running(&self) -> Vec<(WorkKind, String)> {
        self.inner
            .running
            .lock()
            .values()
            .map(|(k, r)| (*k, r.to_string()))
            .collect()
    }

    /// Waits until nothing is in flight or `deadline` passes. True when it reached zero.
    pub async fn wait_idle(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            let notified = self.inner.zero.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.snapshot().total == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.snapshot().total == 0;
            }
        }
    }
}

/// Decrements its counter when dropped.
pub struct InFlightGuard {
    tracker: InFlightTracker,
    kind: WorkKind,
    ticket: u64,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let inner = &self.tracker.inner;
        inner.running.lock().remove(&self.ticket);
        inner.counts[idx(self.kind)].fetch_sub(1, Ordering::AcqRel);
        if self.tracker.snapshot().total == 0 {
            inner.zero.notify_waiters();
        }
    }
}
