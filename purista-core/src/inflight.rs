//! In-flight work counters by kind, with RAII guards and an awaitable "reached zero".
//!
//! Both bridges and services keep one [`InFlightTracker`]. Each running handler holds an
//! [`InFlightGuard`]; dropping it (including on panic or cancellation) decrements the counter,
//! so drain can simply wait for the total to reach zero.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::RwLock;
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

/// The running count of one registration.
struct Slot {
    kind: WorkKind,
    name: Arc<str>,
    running: AtomicUsize,
}

type SlotMap = HashMap<(WorkKind, Arc<str>), Arc<Slot>>;

#[derive(Default)]
struct Inner {
    counts: [AtomicUsize; 5],
    // One slot per (kind, registration), created on first use and kept: a registration's
    // counter is then a lock-free atomic on the hot path.
    slots: RwLock<SlotMap>,
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

/// A registration's counter: [`InFlightCounter::start`] is lock-free.
#[derive(Clone)]
pub struct InFlightCounter {
    tracker: InFlightTracker,
    slot: Arc<Slot>,
}

impl InFlightCounter {
    /// Counts one unit of work until the guard is dropped.
    pub fn start(&self) -> InFlightGuard {
        self.slot.running.fetch_add(1, Ordering::AcqRel);
        self.tracker.inner.counts[idx(self.slot.kind)].fetch_add(1, Ordering::AcqRel);
        InFlightGuard {
            tracker: self.tracker.clone(),
            slot: self.slot.clone(),
        }
    }
}

impl InFlightTracker {
    /// A tracker with all counts at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// The counter of `registration`'s `kind` work (create it once, at registration).
    pub fn counter(&self, kind: WorkKind, registration: &Arc<str>) -> InFlightCounter {
        let key = (kind, registration.clone());
        if let Some(slot) = self.inner.slots.read().get(&key) {
            return InFlightCounter {
                tracker: self.clone(),
                slot: slot.clone(),
            };
        }
        let slot = self
            .inner
            .slots
            .write()
            .entry(key)
            .or_insert_with(|| {
                Arc::new(Slot {
                    kind,
                    name: registration.clone(),
                    running: AtomicUsize::new(0),
                })
            })
            .clone();
        InFlightCounter {
            tracker: self.clone(),
            slot,
        }
    }

    /// Counts one unit of `kind` work for `registration` until the guard is dropped.
    /// Where the same registration runs often, keep an [`InFlightCounter`] instead.
    pub fn start(&self, kind: WorkKind, registration: &Arc<str>) -> InFlightGuard {
        self.counter(kind, registration).start()
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

    /// What is running now: `(kind, registration)` once per running unit, sorted.
    pub fn running(&self) -> Vec<(WorkKind, String)> {
        let mut out = Vec::new();
        for slot in self.inner.slots.read().values() {
            let n = slot.running.load(Ordering::Acquire);
            for _ in 0..n {
                out.push((slot.kind, slot.name.to_string()));
            }
        }
        out.sort();
        out
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
    slot: Arc<Slot>,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let inner = &self.tracker.inner;
        self.slot.running.fetch_sub(1, Ordering::AcqRel);
        let before = inner.counts[idx(self.slot.kind)].fetch_sub(1, Ordering::AcqRel);
        if before == 1 && self.tracker.snapshot().total == 0 {
            inner.zero.notify_waiters();
        }
    }
}
