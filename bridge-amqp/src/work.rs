//! The work in flight on one bridge instance: what shutdown drains.
//!
//! Pending invocations (core's [`PendingInvocations`], completed by the reply consumer), open
//! stream sessions, every task the bridge spawned ([`TaskSet`]), the in-flight counters, and
//! the flag that stops intake once shutdown began.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use purista_core::kit::{PendingInvocations, TaskSet};
use purista_core::{BridgeError, Envelope, InFlightTracker};

use crate::stream_table::StreamSessions;

/// Pending invocations of one bridge instance, by `correlationId`.
pub(crate) type ReplyInbox = PendingInvocations<Envelope>;

/// The work in flight on one bridge instance.
pub(crate) struct Work {
    pub inbox: ReplyInbox,
    /// Stream sessions of this instance, both ends, by `correlationId`.
    pub streams: StreamSessions,
    pub tasks: Arc<TaskSet>,
    pub tracker: InFlightTracker,
    closing: AtomicBool,
}

impl Work {
    pub(crate) fn new() -> Self {
        Work {
            inbox: ReplyInbox::default(),
            streams: StreamSessions::default(),
            tasks: TaskSet::new(),
            tracker: InFlightTracker::new(),
            closing: AtomicBool::new(false),
        }
    }

    /// True once shutdown began (or the bridge was dropped): no new work is taken.
    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// Stops intake.
    pub(crate) fn close(&self) {
        self.closing.store(true, Ordering::Release);
    }

    /// 503 once shutdown began.
    pub(crate) fn ensure_open(&self) -> Result<(), BridgeError> {
        if self.is_closing() {
            return Err(BridgeError::Unavailable("bridge shut down".into()));
        }
        Ok(())
    }
}
