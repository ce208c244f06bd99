//! What every part of one bridge instance uses: settings, names, the AWS clients, the task
//! set, in-flight counters and the operator's counters. The parts (commands, subscriptions,
//! dead letters, janitor) depend on this file and never on each other's state.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use purista_core::kit::{PendingInvocations, TaskSet};
use purista_core::{BridgeCounters, Envelope, InFlightTracker};

use crate::client::Clients;
use crate::config::AwsConfig;
use crate::names::Names;

/// Message attribute: the delivery's attempt number (retry copies carry it).
pub const ATTR_ATTEMPT: &str = "purista-attempt";
/// Message attribute: epoch ms before which a retry copy is not handled (delays past SQS's
/// 15 min `DelaySeconds` are continued with visibility changes).
pub const ATTR_NOT_BEFORE: &str = "purista-not-before";
/// Message attribute of a command: the caller's reply queue URL.
pub const ATTR_REPLY_TO: &str = "purista-reply-to";
/// Message attribute of a command: epoch ms at which its caller gives up.
pub const ATTR_EXPIRES_AT: &str = "purista-expires-at";
/// Queue tag: the bridge instance that owns a per-instance queue.
pub const TAG_OWNER: &str = "purista-owner";
/// Queue tag: when the owner last said it is alive (epoch ms).
pub const TAG_SEEN: &str = "purista-seen";
/// Queue tag: the rule that feeds a broadcast queue (removed with it).
pub const TAG_RULE: &str = "purista-rule";

/// Shared state of one bridge instance.
pub struct Shared {
    /// Settings.
    pub config: AwsConfig,
    /// Resource names.
    pub names: Names,
    /// This instance's id (PURISTA `instanceId`).
    pub instance_id: String,
    /// The AWS clients.
    pub clients: Clients,
    /// Every task the bridge spawns.
    pub tasks: Arc<TaskSet>,
    /// In-flight work by kind and registration.
    pub tracker: InFlightTracker,
    /// Invocations waiting for their response (failed with 503 at shutdown).
    pub pending: PendingInvocations<Envelope>,
    /// Set once shutdown began: no new work is taken.
    pub closing: AtomicBool,
    /// URLs of this instance's own queues (reply, broadcast), whose last-seen tag the janitor
    /// renews.
    pub own_queues: parking_lot::Mutex<std::collections::HashSet<String>>,
    /// Dead-letter queue URLs by target.
    pub dead_letter_urls: crate::dead_letters::DeadLetterUrls,
    poison: AtomicU64,
    reconnects: AtomicU64,
}

impl Shared {
    /// State for a new instance.
    pub fn new(config: AwsConfig, instance_id: String, clients: Clients) -> Arc<Self> {
        Arc::new(Shared {
            names: Names::new(&config.prefix),
            config,
            instance_id,
            clients,
            tasks: TaskSet::new(),
            tracker: InFlightTracker::new(),
            pending: PendingInvocations::default(),
            closing: AtomicBool::new(false),
            dead_letter_urls: Default::default(),
            own_queues: Default::default(),
            poison: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
        })
    }

    /// Whether shutdown began.
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// A message could not be decoded or was refused as poison.
    pub fn count_poison(&self) {
        self.poison.fetch_add(1, Ordering::Relaxed);
    }

    /// A receive loop got answers again after failed calls.
    pub fn count_reconnect(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }

    /// The operator's counters.
    pub fn counters(&self) -> BridgeCounters {
        BridgeCounters {
            reconnects: self.reconnects.load(Ordering::Relaxed),
            poison_messages: self.poison.load(Ordering::Relaxed),
            unmatched_responses: self.pending.unmatched(),
        }
    }
}

/// Epoch milliseconds now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
