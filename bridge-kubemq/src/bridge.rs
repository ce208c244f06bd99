//! [`KubemqBridge`]: the [`EventBridge`] on KubeMQ. It keeps the registrations of this
//! instance and delegates each concern: commands ([`crate::commands`]), subscriptions
//! ([`crate::subscriptions`]), dead letters ([`crate::dead_letters`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use purista_core::kit::{self, endpoint_label};
use purista_core::{
    Address, BridgeCounters, BridgeError, BridgeHealth, Capabilities, CommandHandler,
    DeadLetterEntry, DeliveryGuarantee, DeliveryHandler, DrainReport, Envelope, EventBridge,
    FilterSupport, InFlight, PausedConsumer, RegistrationKey, ReplayReport, StreamConsumerEnd,
    StreamHandler, SubscriptionOperator, SubscriptionSpec,
};
use tokio::sync::OnceCell;
use tokio::time::Instant;

use crate::channels::{Channels, MAX_CHANNEL_LEN};
use crate::commands::{self, Responder};
use crate::config::KubemqConfig;
use crate::connection::{Connection, sdk_error};
use crate::dead_letters;
use crate::durable::{DurableConsumer, Registry};
use crate::publish::{encode_checked, publish_event};
use crate::shared::Shared;
use crate::subscriptions::Consumer;

/// The bridge's name in capabilities and the matrix.
pub const BRIDGE_NAME: &str = "kubemq";

/// What the bridge provides on KubeMQ (each line proven by the conformance suite; everything
/// else is refused by the strict check).
pub fn capabilities(config: &KubemqConfig) -> Capabilities {
    let mut caps = Capabilities::none(BRIDGE_NAME);
    caps.commands = true;
    caps.filters = FilterSupport::Complex;
    caps.shared_subscriptions = true;
    caps.broadcast_subscriptions = true;
    caps.manual_ack = true;
    caps.bounded_retry = true;
    caps.delayed_retry = true;
    caps.dead_letter = true;
    caps.pause_resume = true;
    // A queue per durable subscription, filled by the publishers (crate::durable).
    caps.durable_subscriptions = true;
    caps.command_delivery = DeliveryGuarantee::AtMostOnce;
    // Durable subscriptions are at least once; the others ride Events, at most once, and the
    // capability speaks for every subscription.
    caps.subscription_delivery = DeliveryGuarantee::AtMostOnce;
    caps.limits.max_payload_bytes = Some(config.max_payload_bytes);
    caps.limits.max_name_len = Some(MAX_CHANNEL_LEN);
    caps
}

/// One bridge instance on KubeMQ.
pub struct KubemqBridge {
    shared: Arc<Shared>,
    capabilities: Capabilities,
    responders: Mutex<HashMap<String, Arc<Responder>>>,
    /// Responders that left but forward what still reaches them until shutdown.
    retired_responders: Mutex<Vec<Arc<Responder>>>,
    consumers: Mutex<HashMap<RegistrationKey, Arc<Consumer>>>,
    /// Consumers that left but keep forwarding to their group until shutdown.
    retired: Mutex<Vec<Arc<Consumer>>>,
    /// Durable subscription consumers by registration key.
    durables: Mutex<HashMap<RegistrationKey, Arc<DurableConsumer>>>,
    started: OnceCell<()>,
    drained: OnceCell<DrainReport>,
}

impl std::fmt::Debug for KubemqBridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubemqBridge")
            .field("instance_id", &self.shared.instance_id)
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl KubemqBridge {
    /// A bridge instance for `config`. Connects lazily: [`EventBridge::start`] waits for
    /// KubeMQ to answer.
    pub async fn new(config: KubemqConfig) -> Result<Self, BridgeError> {
        config
            .validate()
            .map_err(|e| BridgeError::InvalidRequest(e.to_string()))?;
        let channels = Channels::new(&config.prefix)?;
        let instance_id = purista_core::ids::new_id();
        let client_id = if config.client_id.is_empty() {
            format!("purista-{instance_id}")
        } else {
            config.client_id.clone()
        };
        let connection = Connection::open(&config, &client_id).await?;
        let capabilities = capabilities(&config);
        Ok(KubemqBridge {
            shared: Shared::new(config, channels, instance_id, connection),
            capabilities,
            responders: Mutex::new(HashMap::new()),
            retired_responders: Mutex::new(Vec::new()),
            consumers: Mutex::new(HashMap::new()),
            retired: Mutex::new(Vec::new()),
            durables: Mutex::new(HashMap::new()),
            started: OnceCell::new(),
            drained: OnceCell::new(),
        })
    }

    /// The channel names this instance uses.
    pub fn channels(&self) -> &Channels {
        &self.shared.channels
    }

    /// A queue bridge on this instance's connection, under its prefix (jobs on
    /// `<prefix>.q.<queue>`). It has a lifecycle of its own: shut it down with
    /// [`QueueBridge::shutdown`](purista_core::QueueBridge::shutdown).
    pub fn queue_bridge(&self) -> crate::KubemqQueues {
        crate::KubemqQueues::new(
            &self.shared.config,
            self.shared.channels.clone(),
            &self.shared.connection,
        )
    }

    /// The high-level KubeMQ client of this instance (for tools and tests).
    pub fn client(&self) -> &kubemq::KubemqClient {
        &self.shared.connection.sdk
    }

    async fn ping(&self, within: Duration) -> Result<(), BridgeError> {
        let sdk = &self.shared.connection.sdk;
        kit::broker_call(within, "ping", async {
            sdk.ping()
                .await
                .map(|_| ())
                .map_err(|e| sdk_error("pinging KubeMQ", e))
        })
        .await
    }

    /// KubeMQ answers pings without the token: one event on the instance's own check channel
    /// tells whether KubeMQ takes the token (a wrong one fails the start at once).
    async fn check_token(&self) -> Result<(), BridgeError> {
        let event = kubemq::Event::builder()
            .channel(self.shared.channels.token_check())
            .metadata("token check")
            .build();
        crate::publish::send_event(&self.shared, event)
            .await
            .map_err(|e| {
                BridgeError::Unavailable(format!(
                    "KubeMQ at {} refused the bridge: {e}",
                    self.shared.config.address()
                ))
            })
    }

    async fn drain(&self, deadline: Instant) -> DrainReport {
        let started = Instant::now();
        self.shared
            .closing
            .store(true, std::sync::atomic::Ordering::Release);
        for responder in self.responders.lock().values() {
            responder.stop();
        }
        for responder in self.retired_responders.lock().drain(..) {
            responder.stop();
        }
        let mut consumers: Vec<Arc<Consumer>> = self.consumers.lock().values().cloned().collect();
        consumers.extend(self.retired.lock().drain(..));
        let durables: Vec<Arc<DurableConsumer>> =
            self.durables.lock().drain().map(|(_, d)| d).collect();
        let _ = tokio::time::timeout_at(
            deadline,
            futures::future::join(
                futures::future::join_all(consumers.iter().map(|c| c.stop())),
                futures::future::join_all(durables.iter().map(|d| d.close())),
            ),
        )
        .await;
        self.shared.durable.stop();
        let idle = self.shared.tracker.wait_idle(deadline).await;
        self.shared.pipe.close();
        let mut still_running = self.shared.tracker.running();
        let rejected = self.shared.pending.close(&BridgeError::Unavailable(
            "the bridge shut down before the response arrived".into(),
        ));
        self.shared.tasks.close();
        let tasks_done = self.shared.tasks.wait_empty(deadline).await;
        let aborted = self.shared.tasks.abort_all();
        if !idle {
            still_running.extend(aborted);
        }
        let sdk = self.shared.connection.sdk.clone();
        let _ = tokio::time::timeout_at(deadline, sdk.close()).await;
        DrainReport {
            completed: idle && tasks_done,
            still_running,
            rejected_invocations: rejected,
            waited_ms: kit::millis(started.elapsed()),
        }
    }
}

#[async_trait]
impl SubscriptionOperator for KubemqBridge {
    fn paused_subscription_consumers(&self) -> Vec<PausedConsumer> {
        let mut out: Vec<PausedConsumer> = self
            .consumers
            .lock()
            .values()
            .filter_map(|c| c.paused())
            .collect();
        out.extend(self.durables.lock().values().filter_map(|d| d.paused()));
        out.sort_by(|a, b| a.key.as_str().cmp(b.key.as_str()));
        out
    }

    async fn resume_subscription_consumer(
        &self,
        key: &RegistrationKey,
    ) -> Result<bool, BridgeError> {
        let consumer = self.consumers.lock().get(key).cloned();
        let durable = self.durables.lock().get(key).cloned();
        match (consumer, durable) {
            (Some(c), _) => c.resume().await,
            (None, Some(d)) => d.resume().await,
            (None, None) => Ok(false),
        }
    }

    async fn inspect_dead_letters(
        &self,
        target: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetterEntry>, BridgeError> {
        dead_letters::inspect(&self.shared, target, limit).await
    }

    async fn replay_dead_letters(
        &self,
        target: &str,
        limit: usize,
    ) -> Result<ReplayReport, BridgeError> {
        let consumers = self.consumers.lock().clone();
        let durables = self.durables.lock().clone();
        dead_letters::replay(&self.shared, &consumers, &durables, target, limit).await
    }

    async fn purge_dead_letters(&self, target: &str) -> Result<usize, BridgeError> {
        dead_letters::purge(&self.shared, target).await
    }
}

#[async_trait]
impl EventBridge for KubemqBridge {
    fn name(&self) -> &str {
        BRIDGE_NAME
    }

    fn instance_id(&self) -> &str {
        &self.shared.instance_id
    }

    fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    fn default_command_timeout(&self) -> Duration {
        self.shared.config.default_command_timeout
    }

    /// Waits until KubeMQ answers a ping (at most the connect timeout). Idempotent.
    async fn start(&self) -> Result<(), BridgeError> {
        if self.shared.is_closing() {
            return Err(BridgeError::Unavailable("the bridge was shut down".into()));
        }
        self.started
            .get_or_try_init(|| async {
                let deadline = Instant::now() + self.shared.config.connect_timeout;
                loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match self.ping(left.max(Duration::from_millis(1))).await {
                        Ok(()) => {
                            self.check_token().await?;
                            // Every durable subscription under the prefix, before the first
                            // publish: where published events also go.
                            return Registry::start(&self.shared).await;
                        }
                        Err(e) if Instant::now() >= deadline || !e.is_retryable() => {
                            return Err(BridgeError::Unavailable(format!(
                                "KubeMQ at {} does not answer: {e}",
                                self.shared.config.address()
                            )));
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            })
            .await
            .map(|_| ())
    }

    async fn health(&self) -> BridgeHealth {
        if self.shared.is_closing() {
            return BridgeHealth::Unhealthy {
                reason: "the bridge is shut down".into(),
            };
        }
        if let Err(e) = self.ping(Duration::from_secs(2)).await {
            return BridgeHealth::Unhealthy {
                reason: format!("KubeMQ does not answer: {e}"),
            };
        }
        let down_responders = self
            .responders
            .lock()
            .values()
            .filter(|r| !r.is_up())
            .count();
        let down_consumers = self
            .consumers
            .lock()
            .values()
            .filter(|c| !c.is_up())
            .count()
            + self.durables.lock().values().filter(|d| !d.is_up()).count();
        if down_responders + down_consumers > 0 {
            return BridgeHealth::Unhealthy {
                reason: format!(
                    "{down_responders} command responder(s) and {down_consumers} subscription consumer(s) are resubscribing"
                ),
            };
        }
        BridgeHealth::Healthy
    }

    async fn emit(&self, mut message: Envelope) -> Result<(), BridgeError> {
        if self.shared.is_closing() {
            return Err(BridgeError::Unavailable("the bridge is shut down".into()));
        }
        kit::check_emittable(&message)?;
        kit::stamp(&mut message, &self.shared.instance_id);
        let bytes = encode_checked(&self.shared, &message)?;
        publish_event(&self.shared, &message, bytes).await
    }

    async fn invoke(&self, command: Envelope, ttl: Duration) -> Result<Envelope, BridgeError> {
        commands::invoke(&self.shared, command, ttl).await
    }

    async fn register_command(
        &self,
        address: Address,
        handler: Arc<dyn CommandHandler>,
    ) -> Result<(), BridgeError> {
        let label = endpoint_label(&address);
        if self.responders.lock().contains_key(&label) {
            return Err(BridgeError::AlreadyRegistered(label));
        }
        let responder = commands::serve(&self.shared, &address, handler).await?;
        let mut responders = self.responders.lock();
        if responders.contains_key(&label) {
            responder.stop();
            return Err(BridgeError::AlreadyRegistered(label));
        }
        responders.insert(label, Arc::new(responder));
        Ok(())
    }

    async fn unregister_command(&self, address: &Address) -> Result<(), BridgeError> {
        let responder = self.responders.lock().remove(&endpoint_label(address));
        if let Some(r) = responder {
            r.leave().await;
            if self.shared.is_closing() {
                r.stop();
            } else {
                self.retired_responders.lock().push(r);
            }
        }
        Ok(())
    }

    async fn register_subscription(
        &self,
        spec: SubscriptionSpec,
        handler: Arc<dyn DeliveryHandler>,
    ) -> Result<(), BridgeError> {
        let key = spec.key.clone();
        if spec.durable {
            if self.durables.lock().contains_key(&key) {
                return Err(BridgeError::AlreadyRegistered(key.to_string()));
            }
            let durable = DurableConsumer::start(&self.shared, spec, handler).await?;
            let raced = self.durables.lock().insert(key.clone(), durable.clone());
            if let Some(earlier) = raced {
                self.durables.lock().insert(key.clone(), earlier);
                durable.close().await;
                return Err(BridgeError::AlreadyRegistered(key.to_string()));
            }
            return Ok(());
        }
        if self.consumers.lock().contains_key(&key) {
            return Err(BridgeError::AlreadyRegistered(key.to_string()));
        }
        let consumer = Consumer::start(&self.shared, spec, handler).await?;
        let raced = {
            let mut consumers = self.consumers.lock();
            if consumers.contains_key(&key) {
                true
            } else {
                consumers.insert(key.clone(), consumer.clone());
                false
            }
        };
        if raced {
            consumer.stop().await;
            return Err(BridgeError::AlreadyRegistered(key.to_string()));
        }
        Ok(())
    }

    async fn unregister_subscription(&self, key: &RegistrationKey) -> Result<(), BridgeError> {
        let durable = self.durables.lock().remove(key);
        if let Some(d) = durable {
            d.close().await;
        }
        let consumer = self.consumers.lock().remove(key);
        if let Some(c) = consumer {
            c.close().await;
            self.retired.lock().push(c);
        }
        Ok(())
    }

    async fn register_stream(
        &self,
        _address: Address,
        _handler: Arc<dyn StreamHandler>,
    ) -> Result<(), BridgeError> {
        Err(BridgeError::Unsupported(
            "streams on the kubemq bridge".into(),
        ))
    }

    async fn unregister_stream(&self, _address: &Address) -> Result<(), BridgeError> {
        Ok(())
    }

    async fn open_stream(&self, _open: Envelope) -> Result<StreamConsumerEnd, BridgeError> {
        Err(BridgeError::Unsupported(
            "streams on the kubemq bridge".into(),
        ))
    }

    fn in_flight(&self) -> InFlight {
        self.shared.tracker.snapshot()
    }

    fn counters(&self) -> BridgeCounters {
        self.shared.counters()
    }

    async fn shutdown(&self, deadline: Instant) -> DrainReport {
        self.drained
            .get_or_init(|| self.drain(deadline))
            .await
            .clone()
    }
}
