//! What every part of one bridge instance uses: settings, channel names, the connection, the
//! task set, in-flight counters and counters for the operator. The parts (commands,
//! subscriptions, dead letters) depend on this file and never on each other's state.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use purista_core::kit::{PendingInvocations, TaskSet};
use purista_core::{BridgeCounters, Envelope, InFlightTracker};

use crate::channels::Channels;
use crate::config::KubemqConfig;
use crate::connection::Connection;

/// Tag that marks a readiness probe (value: the probe's id). Consumers never hand a probe to
/// a handler.
pub const PROBE_TAG: &str = "purista-probe";

/// Tag of a command query: the Unix epoch millisecond at which its caller gives up. The
/// responder judges a late answer by it as well as by its own clock (a query that reached it
/// late, on a busy broker, is late sooner than its ttl counted from its arrival says).
pub const EXPIRES_TAG: &str = "purista-expires-at";

/// Shared state of one bridge instance.
pub struct Shared {
    /// Settings.
    pub config: KubemqConfig,
    /// Channel names.
    pub channels: Channels,
    /// This instance's id (PURISTA `instanceId`).
    pub instance_id: String,
    /// Both KubeMQ clients.
    pub connection: Connection,
    /// Every task the bridge spawns.
    pub tasks: Arc<TaskSet>,
    /// In-flight work by kind and registration.
    pub tracker: InFlightTracker,
    /// Invocations waiting for their query response (failed with 503 at shutdown).
    pub pending: PendingInvocations<Envelope>,
    /// Set once shutdown began: no new work is taken.
    pub closing: AtomicBool,
    /// The durable subscriptions under the prefix (where published events also go).
    pub durable: crate::durable::Registry,
    /// The stream that carries the command path's best-effort publications.
    pub pipe: crate::pipe::EventPipe,
    reconnects: AtomicU64,
    poison: AtomicU64,
    late: AtomicU64,
}

impl Shared {
    /// State for a new instance.
    pub fn new(
        config: KubemqConfig,
        channels: Channels,
        instance_id: String,
        connection: Connection,
    ) -> Arc<Self> {
        Arc::new(Shared {
            config,
            channels,
            instance_id,
            connection,
            tasks: TaskSet::new(),
            tracker: InFlightTracker::new(),
            pending: PendingInvocations::default(),
            closing: AtomicBool::new(false),
            durable: crate::durable::Registry::default(),
            pipe: crate::pipe::EventPipe::default(),
            reconnects: AtomicU64::new(0),
            poison: AtomicU64::new(0),
            late: AtomicU64::new(0),
        })
    }

    /// Whether shutdown began.
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// A consumer stream came back after it was lost.
    pub fn count_reconnect(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }

    /// A message could not be decoded or was refused as poison.
    pub fn count_poison(&self) {
        self.poison.fetch_add(1, Ordering::Relaxed);
    }

    /// A response came after its caller's ttl (KubeMQ drops it).
    pub fn count_late_response(&self) {
        self.late.fetch_add(1, Ordering::Relaxed);
    }

    /// The operator's counters.
    pub fn counters(&self) -> BridgeCounters {
        BridgeCounters {
            reconnects: self.reconnects.load(Ordering::Relaxed),
            poison_messages: self.poison.load(Ordering::Relaxed),
            unmatched_responses: self.pending.unmatched() + self.late.load(Ordering::Relaxed),
        }
    }
}
