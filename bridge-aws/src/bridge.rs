//! [`AwsBridge`]: the [`EventBridge`] on EventBridge + SQS. It keeps the registrations of
//! this instance and delegates each concern: commands ([`crate::commands`]), subscriptions
//! ([`crate::subscriptions`]), dead letters ([`crate::dead_letters`]), stale queues
//! ([`crate::janitor`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::types::QueueAttributeName;
use futures::StreamExt;
use parking_lot::Mutex;
use purista_core::kit::{self, broker_call, endpoint_label};
use purista_core::{
    Address, BridgeCounters, BridgeError, BridgeHealth, Capabilities, CommandHandler,
    DeadLetterEntry, DeliveryGuarantee, DeliveryHandler, DrainReport, Envelope, EventBridge,
    FilterSupport, InFlight, PausedConsumer, RegistrationKey, ReplayReport, StreamConsumerEnd,
    StreamHandler, SubscriptionOperator, SubscriptionSpec,
};
use tokio::sync::{OnceCell, watch};
use tokio::time::Instant;

use crate::client::{Clients, sdk_error};
use crate::commands::{self, QueueUrls, Responder};
use crate::config::AwsConfig;
use crate::dead_letters;
use crate::janitor;
use crate::names::MAX_QUEUE_NAME;
use crate::publish::{encode_checked, put_event};
use crate::shared::Shared;
use crate::subscriptions::Consumer;
use crate::topology::{self, Queue};

/// How long a shutdown waits for the receive loops to finish their open long polls (they
/// finish by themselves afterwards).
const RECEIVER_GRACE: Duration = Duration::from_millis(1500);

/// Broadcast consumers a shutdown closes at once (each removes its rule and queue).
const CLOSE_AT_ONCE: usize = 8;

/// The bridge's name in capabilities and the matrix.
pub const BRIDGE_NAME: &str = "aws";

/// What the bridge provides on AWS (each line proven by the conformance suite on moto;
/// everything else is refused by the strict check).
pub fn capabilities(config: &AwsConfig) -> Capabilities {
    let mut caps = Capabilities::none(BRIDGE_NAME);
    caps.commands = true;
    caps.filters = FilterSupport::Complex;
    caps.shared_subscriptions = true;
    caps.broadcast_subscriptions = true;
    caps.durable_subscriptions = true;
    caps.manual_ack = true;
    caps.bounded_retry = true;
    caps.delayed_retry = true;
    caps.dead_letter = true;
    caps.pause_resume = true;
    caps.command_delivery = DeliveryGuarantee::AtMostOnce;
    caps.subscription_delivery = DeliveryGuarantee::AtLeastOnce;
    caps.limits.max_payload_bytes = Some(config.max_envelope_bytes());
    caps.limits.max_name_len = Some(MAX_QUEUE_NAME);
    caps
}

struct ReplyQueue {
    queue: Queue,
    stop: watch::Sender<bool>,
}

/// One bridge instance on EventBridge + SQS.
pub struct AwsBridge {
    shared: Arc<Shared>,
    capabilities: Capabilities,
    reply: OnceCell<ReplyQueue>,
    responders: Mutex<HashMap<String, Responder>>,
    consumers: Mutex<HashMap<RegistrationKey, Arc<Consumer>>>,
    urls: QueueUrls,
    janitor_stop: watch::Sender<bool>,
    drained: OnceCell<DrainReport>,
}

impl std::fmt::Debug for AwsBridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsBridge")
            .field("instance_id", &self.shared.instance_id)
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl AwsBridge {
    /// A bridge instance for `config`. Loads the SDK configuration (region, credentials) but
    /// calls nothing on AWS: [`EventBridge::start`] does.
    pub async fn new(config: AwsConfig) -> Result<Self, BridgeError> {
        config
            .validate()
            .map_err(|e| BridgeError::InvalidRequest(e.to_string()))?;
        let clients = Clients::load(&config).await;
        let capabilities = capabilities(&config);
        let instance_id = purista_core::ids::new_id();
        let (janitor_stop, _) = watch::channel(false);
        Ok(AwsBridge {
            shared: Shared::new(config, instance_id, clients),
            capabilities,
            reply: OnceCell::new(),
            responders: Mutex::new(HashMap::new()),
            consumers: Mutex::new(HashMap::new()),
            urls: QueueUrls::default(),
            janitor_stop,
            drained: OnceCell::new(),
        })
    }

    /// The SQS client of this instance (for tools and tests).
    pub fn sqs(&self) -> &aws_sdk_sqs::Client {
        &self.shared.clients.sqs
    }

    /// The EventBridge client of this instance (for tools and tests).
    pub fn eventbridge(&self) -> &aws_sdk_eventbridge::Client {
        &self.shared.clients.events
    }

    /// The settings.
    pub fn config(&self) -> &AwsConfig {
        &self.shared.config
    }

    /// Resource names of this deployment.
    pub fn names(&self) -> &crate::names::Names {
        &self.shared.names
    }

    /// A queue bridge on this instance's SQS client, under its prefix (jobs on
    /// `<prefix>-q-<queue>`). It has a lifecycle of its own: shut it down with
    /// [`QueueBridge::shutdown`](purista_core::QueueBridge::shutdown).
    pub fn queue_bridge(&self) -> crate::AwsQueues {
        crate::AwsQueues::new(
            self.shared.clients.sqs.clone(),
            self.shared.config.call_timeout,
            self.shared.names.clone(),
            self.shared.config.max_message_bytes,
        )
    }

    /// This instance's reply queue URL, once started.
    pub fn reply_queue_url(&self) -> Option<&str> {
        self.reply.get().map(|r| r.queue.url.as_str())
    }

    /// The queue URL of a subscription consumer of this instance.
    pub fn subscription_queue_url(&self, key: &RegistrationKey) -> Option<String> {
        self.consumers
            .lock()
            .get(key)
            .map(|c| c.queue().url.clone())
    }

    /// Operator call: deletes the per-instance queues (reply, broadcast) and rules of
    /// instances silent for longer than [`AwsConfig::stale_after`]; returns their URLs.
    pub async fn clean_stale_queues(&self) -> Result<Vec<String>, BridgeError> {
        janitor::clean_stale(&self.shared).await
    }

    async fn start_once(&self) -> Result<ReplyQueue, BridgeError> {
        let deadline = Instant::now() + self.shared.config.connect_timeout;
        loop {
            match topology::ensure_bus(&self.shared).await {
                Ok(()) => break,
                Err(e) if e.is_retryable() && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => {
                    return Err(BridgeError::Unavailable(format!(
                        "AWS does not serve the bridge: {e}"
                    )));
                }
            }
        }
        let (queue, stop) = commands::open_reply_queue(&self.shared).await?;
        self.spawn_janitor();
        Ok(ReplyQueue { queue, stop })
    }

    fn spawn_janitor(&self) {
        let shared = self.shared.clone();
        let mut stop = self.janitor_stop.subscribe();
        let interval = shared.config.heartbeat_interval;
        self.shared.tasks.spawn(
            purista_core::WorkKind::Generic,
            "janitor".into(),
            async move {
                loop {
                    let own: Vec<String> = shared.own_queues.lock().iter().cloned().collect();
                    janitor::heartbeat(&shared, &own).await;
                    if let Err(error) = janitor::clean_stale(&shared).await {
                        tracing::debug!(%error, "the stale-queue janitor could not finish a round");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(interval) => {}
                        _ = stop.wait_for(|s| *s) => return,
                    }
                }
            },
        );
    }

    async fn drain(&self, deadline: Instant) -> DrainReport {
        let started = Instant::now();
        self.shared
            .closing
            .store(true, std::sync::atomic::Ordering::Release);
        let _ = self.janitor_stop.send(true);
        for responder in self.responders.lock().values() {
            responder.stop();
        }
        let consumers: Vec<Arc<Consumer>> = self.consumers.lock().values().cloned().collect();
        for c in &consumers {
            c.stop();
        }
        let idle = self.shared.tracker.wait_idle(deadline).await;
        let mut still_running = self.shared.tracker.running();
        let rejected = self.shared.pending.close(&BridgeError::Unavailable(
            "the bridge shut down before the response arrived".into(),
        ));
        if let Some(reply) = self.reply.get() {
            let _ = reply.stop.send(true);
        }
        // Receive loops end with their open long poll and release what it brings. Aborting
        // one would not cancel it in SQS: its messages would hide for a visibility timeout.
        // So the drain waits a moment for them and then lets them end by themselves (within
        // `wait_seconds` plus one call timeout).
        self.shared.receivers.close();
        let grace = deadline.min(Instant::now() + RECEIVER_GRACE);
        let _ = self.shared.receivers.wait_empty(grace).await;
        self.shared.stop_batches();
        self.shared.tasks.close();
        let tasks_done = self.shared.tasks.wait_empty(deadline).await;
        let aborted = self.shared.tasks.abort_all();
        if !idle {
            still_running.extend(aborted);
        }
        // Per-instance resources go with the instance (what is left, the janitor of another
        // instance removes later).
        let _ = tokio::time::timeout_at(deadline, async {
            // Several at once: an instance with many broadcast subscriptions goes down in a few
            // round trips' time, not one per subscription.
            futures::stream::iter(consumers.iter().filter(|c| !c.is_shared()))
                .for_each_concurrent(CLOSE_AT_ONCE, |c| c.close())
                .await;
            if let Some(reply) = self.reply.get()
                && let Err(error) = topology::delete_queue(&self.shared, &reply.queue.url).await
            {
                tracing::warn!(%error, "the reply queue could not be deleted; the janitor removes it later");
            }
        })
        .await;
        DrainReport {
            completed: idle && tasks_done,
            still_running,
            rejected_invocations: rejected,
            waited_ms: kit::millis(started.elapsed()),
        }
    }
}

#[async_trait]
impl SubscriptionOperator for AwsBridge {
    fn paused_subscription_consumers(&self) -> Vec<PausedConsumer> {
        let mut out: Vec<PausedConsumer> = self
            .consumers
            .lock()
            .values()
            .filter_map(|c| c.paused())
            .collect();
        out.sort_by(|a, b| a.key.as_str().cmp(b.key.as_str()));
        out
    }

    async fn resume_subscription_consumer(
        &self,
        key: &RegistrationKey,
    ) -> Result<bool, BridgeError> {
        let consumer = self.consumers.lock().get(key).cloned();
        Ok(consumer.is_some_and(|c| c.resume()))
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
        dead_letters::replay(&self.shared, &consumers, target, limit).await
    }

    async fn purge_dead_letters(&self, target: &str) -> Result<usize, BridgeError> {
        dead_letters::purge(&self.shared, target).await
    }
}

#[async_trait]
impl EventBridge for AwsBridge {
    fn name(&self) -> &str {
        BRIDGE_NAME
    }

    fn instance_id(&self) -> &str {
        &self.shared.instance_id
    }

    fn messaging_system(&self) -> &str {
        "aws_sqs"
    }

    fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    fn default_command_timeout(&self) -> Duration {
        self.shared.config.default_command_timeout
    }

    /// Creates the bus (when missing) and this instance's reply queue; waits at most the
    /// connect timeout for AWS to answer. Idempotent.
    async fn start(&self) -> Result<(), BridgeError> {
        if self.shared.is_closing() {
            return Err(BridgeError::Unavailable("the bridge was shut down".into()));
        }
        self.reply
            .get_or_try_init(|| self.start_once())
            .await
            .map(|_| ())
    }

    async fn health(&self) -> BridgeHealth {
        if self.shared.is_closing() {
            return BridgeHealth::Unhealthy {
                reason: "the bridge is shut down".into(),
            };
        }
        let Some(reply) = self.reply.get() else {
            return BridgeHealth::Unhealthy {
                reason: "the bridge is not started".into(),
            };
        };
        let call = self
            .shared
            .clients
            .sqs
            .get_queue_attributes()
            .queue_url(&reply.queue.url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .send();
        let answered = broker_call(
            Duration::from_secs(2),
            "GetQueueAttributes (health)",
            async {
                call.await
                    .map(|_| ())
                    .map_err(|e| sdk_error("reading the reply queue", e))
            },
        )
        .await;
        if let Err(e) = answered {
            return BridgeHealth::Unhealthy {
                reason: format!("SQS does not answer: {e}"),
            };
        }
        let down = self
            .responders
            .lock()
            .values()
            .filter(|r| !r.is_up())
            .count()
            + self
                .consumers
                .lock()
                .values()
                .filter(|c| !c.is_up())
                .count();
        if down > 0 {
            return BridgeHealth::Unhealthy {
                reason: format!("{down} queue receiver(s) are failing"),
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
        let detail = encode_checked(&self.capabilities, &message)?;
        put_event(&self.shared, &message, detail).await
    }

    async fn invoke(&self, command: Envelope, ttl: Duration) -> Result<Envelope, BridgeError> {
        let Some(reply) = self.reply.get() else {
            return Err(BridgeError::Unavailable("the bridge is not started".into()));
        };
        commands::invoke(
            &self.shared,
            &self.capabilities,
            &self.urls,
            &reply.queue.url,
            command,
            ttl,
        )
        .await
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
        let responder =
            commands::serve(&self.shared, &self.capabilities, &address, handler).await?;
        let mut responders = self.responders.lock();
        if responders.contains_key(&label) {
            responder.stop();
            return Err(BridgeError::AlreadyRegistered(label));
        }
        responders.insert(label, responder);
        Ok(())
    }

    async fn unregister_command(&self, address: &Address) -> Result<(), BridgeError> {
        if let Some(r) = self.responders.lock().remove(&endpoint_label(address)) {
            r.stop();
        }
        Ok(())
    }

    async fn register_subscription(
        &self,
        spec: SubscriptionSpec,
        handler: Arc<dyn DeliveryHandler>,
    ) -> Result<(), BridgeError> {
        if self.shared.is_closing() {
            return Err(BridgeError::Unavailable("the bridge is shut down".into()));
        }
        let key = spec.key.clone();
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
            consumer.stop();
            return Err(BridgeError::AlreadyRegistered(key.to_string()));
        }
        Ok(())
    }

    async fn unregister_subscription(&self, key: &RegistrationKey) -> Result<(), BridgeError> {
        let consumer = self.consumers.lock().remove(key);
        if let Some(c) = consumer {
            c.close().await;
        }
        Ok(())
    }

    async fn register_stream(
        &self,
        _address: Address,
        _handler: Arc<dyn StreamHandler>,
    ) -> Result<(), BridgeError> {
        Err(BridgeError::Unsupported("streams on the aws bridge".into()))
    }

    async fn unregister_stream(&self, _address: &Address) -> Result<(), BridgeError> {
        Ok(())
    }

    async fn open_stream(&self, _open: Envelope) -> Result<StreamConsumerEnd, BridgeError> {
        Err(BridgeError::Unsupported("streams on the aws bridge".into()))
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

impl Drop for AwsBridge {
    fn drop(&mut self) {
        let _ = self.janitor_stop.send(true);
    }
}
