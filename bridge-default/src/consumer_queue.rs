//! The bounded buffer in front of one subscription consumer.
//!
//! A plain `mpsc` channel cannot do two things the semantics need: put a delivery back at the
//! *front* when its handler pauses the consumer, and stop handing out deliveries while paused
//! without losing what waits. So the buffer is a `VecDeque` behind a short lock plus two
//! [`Notify`]s (one for the consumer waiting for work, one for publishers waiting for space).
//!
//! Backpressure: [`ConsumerQueue::push`] waits while the buffer is full and the consumer is
//! running. While the consumer is paused, nobody would ever make room, so a full buffer drops
//! the newest message instead (logged and counted): publishing never blocks forever. A push
//! into a closed buffer hands the message back, so that the caller can offer it to another
//! instance of the subscription (the consumer leaves its group before it closes).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;
use purista_core::envelope::now_ms;
use purista_core::{Envelope, PausedConsumer, RegistrationKey};
use tokio::sync::Notify;

/// A message waiting for its consumer, with the attempt number it will be delivered as.
pub(crate) struct Queued {
    pub(crate) envelope: Arc<Envelope>,
    pub(crate) attempt: u32,
}

/// What became of a pushed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pushed {
    /// It waits in the buffer.
    Queued,
    /// The consumer is paused and its buffer full: the message was dropped.
    DroppedWhilePaused,
}

/// Why [`ConsumerQueue::try_push`] gave a message back.
pub(crate) enum NotPushed {
    /// The buffer is full and the consumer runs: [`ConsumerQueue::push`] would wait.
    Full(Queued),
    /// The consumer is gone.
    Closed(Queued),
}

/// Messages one bridge instance's consumers dropped, by reason.
#[derive(Debug, Default)]
pub(crate) struct Drops {
    /// A paused consumer's buffer was full.
    pub(crate) while_paused: AtomicU64,
    /// The consumer closed before handling them and no other instance of its subscription was
    /// left to take them.
    pub(crate) after_close: AtomicU64,
}

struct State {
    items: VecDeque<Queued>,
    paused: Option<PausedConsumer>,
    closed: bool,
}

/// Bounded, pausable buffer with a single consumer.
pub(crate) struct ConsumerQueue {
    state: Mutex<State>,
    capacity: usize,
    readable: Notify,
    writable: Notify,
    paused: AtomicBool,
    drops: Arc<Drops>,
}

impl ConsumerQueue {
    /// A buffer of `capacity` (at least 1); drops while paused are counted in `drops`.
    pub(crate) fn new(capacity: usize, drops: Arc<Drops>) -> Self {
        ConsumerQueue {
            state: Mutex::new(State {
                items: VecDeque::new(),
                paused: None,
                closed: false,
            }),
            capacity: capacity.max(1),
            readable: Notify::new(),
            writable: Notify::new(),
            paused: AtomicBool::new(false),
            drops,
        }
    }

    /// Appends `item`, waiting for space while the consumer runs (see the module docs). `Err`
    /// gives the item back: the consumer closed, before or while this waited.
    pub(crate) async fn push(&self, item: Queued, key: &str) -> Result<Pushed, Queued> {
        // Without waiting first: registering for a wake-up costs a lock of its own.
        let mut item = match self.try_push(item, key) {
            Ok(pushed) => return Ok(pushed),
            Err(NotPushed::Closed(item)) => return Err(item),
            Err(NotPushed::Full(item)) => item,
        };
        loop {
            // Registered before looking again, so space made in between is not missed.
            let notified = self.writable.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            item = match self.try_push(item, key) {
                Ok(pushed) => return Ok(pushed),
                Err(NotPushed::Closed(item)) => return Err(item),
                Err(NotPushed::Full(item)) => item,
            };
            notified.await;
        }
    }

    /// Appends `item` unless the buffer is full while the consumer runs or the consumer is
    /// gone; then gives it back, saying which.
    pub(crate) fn try_push(&self, item: Queued, key: &str) -> Result<Pushed, NotPushed> {
        let mut state = self.state.lock();
        if state.closed {
            return Err(NotPushed::Closed(item));
        }
        if state.items.len() < self.capacity {
            state.items.push_back(item);
            drop(state);
            self.readable.notify_one();
            return Ok(Pushed::Queued);
        }
        if state.paused.is_none() {
            return Err(NotPushed::Full(item));
        }
        drop(state);
        self.drops.while_paused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            registration = %key,
            message_id = %item.envelope.id,
            capacity = self.capacity,
            "subscription consumer is paused and its buffer is full: message dropped"
        );
        Ok(Pushed::DroppedWhilePaused)
    }

    /// The next delivery; waits while empty or paused. `None` once closed.
    pub(crate) async fn next(&self) -> Option<Queued> {
        if let Some(next) = self.try_next() {
            return next;
        }
        loop {
            let notified = self.readable.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(next) = self.try_next() {
                return next;
            }
            notified.await;
        }
    }

    /// `Some(None)` once closed, `Some(item)` when one is ready, `None` to wait.
    fn try_next(&self) -> Option<Option<Queued>> {
        let mut state = self.state.lock();
        if state.closed {
            return Some(None);
        }
        if state.paused.is_some() {
            return None;
        }
        let item = state.items.pop_front()?;
        drop(state);
        self.writable.notify_one();
        Some(Some(item))
    }

    /// Pauses the consumer and puts `item` back at the front, attempt unchanged.
    pub(crate) fn pause(&self, item: Queued, key: &str, reason: String) {
        {
            let mut state = self.state.lock();
            if state.closed {
                return;
            }
            state.items.push_front(item);
            if state.paused.is_none() {
                state.paused = Some(PausedConsumer {
                    key: RegistrationKey::from(key),
                    reason,
                    paused_at: now_ms(),
                });
            }
            self.paused.store(true, Ordering::Release);
        }
        // Publishers waiting for space must re-check: they now drop instead of waiting.
        self.writable.notify_waiters();
    }

    /// Resumes a paused consumer. False when it was not paused.
    pub(crate) fn resume(&self) -> bool {
        let was_paused = {
            let mut state = self.state.lock();
            self.paused.store(false, Ordering::Release);
            state.paused.take().is_some()
        };
        if was_paused {
            self.readable.notify_one();
        }
        was_paused
    }

    /// The pause record, when paused.
    pub(crate) fn paused(&self) -> Option<PausedConsumer> {
        self.state.lock().paused.clone()
    }

    /// Cheap check for routing: prefer running members of a shared group.
    pub(crate) fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    /// Closes the buffer: the consumer stops, publishers stop waiting. Returns what was buffered
    /// and not yet taken, for the caller to hand back or drop.
    pub(crate) fn close(&self) -> Vec<Queued> {
        let left = {
            let mut state = self.state.lock();
            state.closed = true;
            std::mem::take(&mut state.items)
        };
        self.readable.notify_one();
        self.writable.notify_waiters();
        left.into()
    }
}
