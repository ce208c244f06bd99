//! What every part of one bridge instance uses: settings, the sidecar client, the local
//! registrations the app server dispatches to, in-flight counters and operator counters.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::RwLock;
use purista_core::kit::TaskSet;
use purista_core::{
    BridgeCounters, BridgeError, CommandHandler, Envelope, InFlightTracker, RegistrationKey,
};
use tokio::sync::Notify;

use crate::config::DaprConfig;
use crate::sidecar::Sidecar;
use crate::subscriptions::Consumer;

/// Claims of shared subscriptions' deliveries in flight at once, per instance.
pub const MAX_CLAIMS_IN_FLIGHT: usize = 32;

/// Shared state of one bridge instance.
pub struct Shared {
    /// Settings.
    pub config: DaprConfig,
    /// This instance's id (PURISTA `instanceId`).
    pub instance_id: String,
    /// The one topic every PURISTA message travels on: `<prefix>.messages`.
    pub topic: String,
    /// The sidecar's HTTP API.
    pub sidecar: Sidecar,
    /// Command handlers by endpoint label (`service@version/target`).
    pub commands: RwLock<HashMap<String, Arc<dyn CommandHandler>>>,
    /// Subscription consumers by registration key.
    pub consumers: RwLock<HashMap<RegistrationKey, Arc<Consumer>>>,
    /// Shared subscriptions unregistered here while the bridge runs: a delivery for one of
    /// them that the sidecar still had queued for this app is put back for the instances that
    /// hold it (see [`crate::subscriptions`]).
    pub leaving: RwLock<HashMap<RegistrationKey, purista_core::SubscriptionSpec>>,
    /// Woken each time a delivery for a subscription that left is handled (see
    /// [`crate::subscriptions::HANDOVER_QUIET`]).
    pub handed_on: Notify,
    /// Every task the bridge spawns.
    pub tasks: Arc<TaskSet>,
    /// In-flight work by kind and registration.
    pub tracker: InFlightTracker,
    /// Woken when the sidecar read `/dapr/subscribe`.
    pub subscribe_read: Notify,
    /// Set once the sidecar read `/dapr/subscribe`.
    pub subscribe_read_once: AtomicBool,
    /// When the app server began serving.
    pub serving_since: std::sync::OnceLock<tokio::time::Instant>,
    /// Set once shutdown began: no new work is taken.
    pub closing: AtomicBool,
    /// Bounds the claims in flight (a burst of deliveries would otherwise open a connection
    /// to the sidecar per claim).
    pub claims: tokio::sync::Semaphore,
    /// Reads of the command copy registry, shared by commands arriving together.
    pub copy_reads: crate::copies::Reads,
    poison: AtomicU64,
    late: AtomicU64,
}

impl Shared {
    /// State for a new instance.
    pub fn new(config: DaprConfig, instance_id: String, sidecar: Sidecar) -> Arc<Self> {
        let topic = format!("{}.messages", config.prefix);
        Arc::new(Shared {
            config,
            instance_id,
            topic,
            sidecar,
            commands: RwLock::new(HashMap::new()),
            consumers: RwLock::new(HashMap::new()),
            leaving: RwLock::new(HashMap::new()),
            handed_on: Notify::new(),
            tasks: TaskSet::new(),
            tracker: InFlightTracker::new(),
            subscribe_read: Notify::new(),
            subscribe_read_once: AtomicBool::new(false),
            serving_since: std::sync::OnceLock::new(),
            closing: AtomicBool::new(false),
            claims: tokio::sync::Semaphore::new(MAX_CLAIMS_IN_FLIGHT),
            copy_reads: crate::copies::Reads::default(),
            poison: AtomicU64::new(0),
            late: AtomicU64::new(0),
        })
    }

    /// Whether shutdown began.
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// A delivery could not be read as a PURISTA message.
    pub fn count_poison(&self) {
        self.poison.fetch_add(1, Ordering::Relaxed);
    }

    /// A command's response came after its caller's ttl and was ignored.
    pub fn count_late_response(&self) {
        self.late.fetch_add(1, Ordering::Relaxed);
    }

    /// The command handler of an endpoint served here.
    pub fn command_handler(&self, label: &str) -> Option<Arc<dyn CommandHandler>> {
        self.commands.read().get(label).cloned()
    }

    /// Publishes `envelope` as it is (already stamped) on the topic.
    pub async fn publish_copy(&self, envelope: &Envelope) -> Result<(), BridgeError> {
        let encoded = envelope.encode();
        let event = crate::cloudevent::wrap(envelope, &encoded, &self.config.app_id)
            .map_err(BridgeError::InvalidRequest)?;
        self.sidecar
            .publish(
                &self.config.pubsub,
                &self.topic,
                event,
                self.config.call_timeout,
            )
            .await
    }

    /// Read-modify-write of a JSON list in the state store with first-write concurrency:
    /// `change` edits the list and says whether it changed; retried while others write.
    pub async fn update_list(
        &self,
        key: &str,
        mut change: impl FnMut(&mut Vec<serde_json::Value>) -> bool,
    ) -> Result<(), BridgeError> {
        use serde_json::Value;
        let store = &self.config.statestore;
        let within = self.config.call_timeout;
        for _ in 0..50 {
            let (mut items, etag) = match self.sidecar.get_state(store, key, within).await? {
                Some((Value::Array(items), etag)) => (items, etag),
                Some((_, etag)) => (Vec::new(), etag),
                None => (Vec::new(), None),
            };
            if !change(&mut items) {
                return Ok(());
            }
            if self
                .sidecar
                .save_state(
                    store,
                    key,
                    &Value::Array(items),
                    etag.as_deref(),
                    None,
                    within,
                )
                .await?
            {
                return Ok(());
            }
            let pause = rand::Rng::random_range(&mut rand::rng(), 1..20);
            tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
        }
        Err(BridgeError::Broker(format!(
            "the state entry {key} kept changing under concurrent writers"
        )))
    }

    /// The operator's counters.
    pub fn counters(&self) -> BridgeCounters {
        BridgeCounters {
            reconnects: 0,
            poison_messages: self.poison.load(Ordering::Relaxed),
            unmatched_responses: self.late.load(Ordering::Relaxed),
        }
    }
}
