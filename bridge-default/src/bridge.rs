//! [`MemoryBridge`]: one bridge instance (one "process") on an in-process hub.
//!
//! This file is the [`EventBridge`] surface: it validates and stamps what goes out, keeps this
//! instance's registrations, counts its in-flight work and runs its shutdown. Routing lives in
//! the hub (`broker.rs`), the per-concern mechanics in `commands.rs`, `subscriptions.rs` and
//! `streams.rs`.
//!
//! Shutdown is one explicit sequence: stop intake and leave the hub (so no new work arrives),
//! wait until the in-flight counters and this instance's tasks are idle or the deadline passes,
//! then fail every still-pending invocation with 503 and abort what is left.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use purista_core::envelope::DEFAULT_MAX_ENVELOPE_BYTES;
use purista_core::kit::{self, TaskSet};
use purista_core::{
    Address, BridgeCounters, BridgeError, BridgeHealth, Capabilities, CommandHandler,
    DeadLetterEntry, DecodeError, DeliveryGuarantee, DeliveryHandler, DrainReport, Envelope,
    EventBridge, FilterSupport, InFlight, InFlightTracker, PausedConsumer, RegistrationKey,
    ReplayReport, StreamConsumerEnd, StreamHandler, SubscriptionOperator, SubscriptionSpec,
    WorkKind, ids,
};
use tokio::sync::{OnceCell, watch};
use tokio::time::Instant;

use crate::broker::{Hub, MemoryBroker};
use crate::commands::{self, CommandMember, Inbox, ReplyTo};
use crate::config::MemoryBridgeConfig;
use crate::consumer_queue::{Drops, Queued};
use crate::streams::{self, StreamMember};
use crate::subscriptions::{self, Consumer};

/// The bridge name reported by [`EventBridge::name`] and in the capabilities.
pub const BRIDGE_NAME: &str = "default";

/// One in-process bridge instance. Make it with [`MemoryBroker::bridge`].
///
/// Several instances on one [`MemoryBroker`] behave like several service instances on one
/// broker: commands and shared subscriptions compete, broadcast subscriptions fan out.
///
/// Delivery is at most once: nothing survives the process, and redeliveries still waiting for
/// their delay are dropped when the bridge that delivered them shuts down. When a consumer
/// leaves (unregisters or shuts down), the messages in its buffer and those a publisher was
/// waiting to put there go to another instance of its shared subscription; with none left
/// (or for a broadcast subscription) they are dropped with a warning and counted in
/// [`MemoryBridge::dropped_after_close`]. Publishing applies backpressure: `emit` (and `invoke`, which
/// offers the command to subscriptions) waits while a matching consumer's buffer
/// ([`MemoryBridgeConfig::consumer_buffer`]) is full, except when that consumer is paused: then
/// the newest message is dropped with a warning and counted in
/// [`MemoryBridge::dropped_while_paused`], so publishing never blocks forever. A subscription
/// handler that emits into its own full buffer can therefore wait on itself; keep buffers larger
/// than any such burst.
///
/// In-flight counters ([`EventBridge::in_flight`]) hold this instance's pending invocations
/// (`command`) and the stream sessions its registered producers are serving (`stream`);
/// subscription and command handlers are counted by the service that runs them.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use async_trait::async_trait;
/// use purista_bridge_default::MemoryBroker;
/// use purista_core::{Address, CommandHandler, Envelope, EventBridge, SenderAddress};
///
/// struct Echo;
///
/// #[async_trait]
/// impl CommandHandler for Echo {
///     async fn handle(&self, command: Arc<Envelope>) -> Envelope {
///         command.success_response(command.payload["payload"].clone(), None)
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), purista_core::BridgeError> {
/// let broker = MemoryBroker::new();
/// let (server, client) = (broker.bridge(), broker.bridge());
/// let echo = Address::new("echo", "1", "say");
/// server.register_command(echo.clone(), Arc::new(Echo)).await?;
///
/// let command = Envelope::command(
///     SenderAddress::default(),
///     echo,
///     serde_json::json!("hi"),
///     serde_json::json!({}),
/// );
/// let response = client.invoke(command, Duration::from_secs(1)).await?;
/// assert_eq!(response.payload, "hi");
/// assert_eq!(response.sender.instance_id, server.instance_id());
/// # Ok(())
/// # }
/// ```
pub struct MemoryBridge {
    hub: Arc<Hub>,
    instance_id: String,
    instance: Arc<str>,
    config: MemoryBridgeConfig,
    capabilities: Capabilities,
    inbox: Arc<Inbox>,
    tracker: InFlightTracker,
    tasks: Arc<TaskSet>,
    started: AtomicBool,
    closed: AtomicBool,
    closing: watch::Sender<bool>,
    registrations: Mutex<Registrations>,
    poison: AtomicU64,
    drops: Arc<Drops>,
    drained: OnceCell<DrainReport>,
}

/// What this instance has registered on the hub.
#[derive(Default)]
struct Registrations {
    commands: Vec<Address>,
    streams: Vec<Address>,
    subscriptions: HashMap<RegistrationKey, Arc<Consumer>>,
}

/// The capabilities of the in-process bridge with this config.
pub(crate) fn capabilities(config: &MemoryBridgeConfig) -> Capabilities {
    let mut caps = Capabilities::none(BRIDGE_NAME);
    caps.commands = true;
    caps.filters = FilterSupport::Complex;
    caps.streams = true;
    caps.shared_subscriptions = true;
    caps.broadcast_subscriptions = true;
    // Process memory: nothing waits for a consumer that is not there.
    caps.durable_subscriptions = false;
    caps.manual_ack = true;
    caps.bounded_retry = true;
    caps.delayed_retry = true;
    caps.dead_letter = true;
    caps.pause_resume = true;
    caps.command_delivery = DeliveryGuarantee::AtMostOnce;
    caps.subscription_delivery = DeliveryGuarantee::AtMostOnce;
    caps.limits.max_payload_bytes = config.max_payload_bytes;
    caps
}

impl MemoryBridge {
    pub(crate) fn new(hub: Arc<Hub>, config: MemoryBridgeConfig) -> Self {
        let instance_id = config.instance_id.clone().unwrap_or_else(ids::new_id);
        let instance: Arc<str> = instance_id.as_str().into();
        let inbox = Arc::new(Inbox::default());
        hub.add_inbox(instance.clone(), &inbox);
        MemoryBridge {
            capabilities: capabilities(&config),
            hub,
            instance_id,
            instance,
            config,
            inbox,
            tracker: InFlightTracker::new(),
            tasks: TaskSet::new(),
            started: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            closing: watch::Sender::new(false),
            registrations: Mutex::new(Registrations::default()),
            poison: AtomicU64::new(0),
            drops: Arc::default(),
            drained: OnceCell::new(),
        }
    }

    /// A handle to the hub this bridge is on, e.g. to add sibling instances.
    pub fn broker(&self) -> MemoryBroker {
        MemoryBroker::from_hub(self.hub.clone())
    }

    /// This bridge's settings.
    pub fn config(&self) -> &MemoryBridgeConfig {
        &self.config
    }

    /// Publishes raw bytes as if they had arrived from a broker.
    ///
    /// Bytes that are not an envelope (see [`Envelope::decode`]) are logged, counted in
    /// [`MemoryBridge::poison_messages`] and returned as the error; nothing else is affected.
    /// A valid envelope is routed like [`EventBridge::emit`] but *not* re-stamped, so a test can
    /// publish one message id twice. A raw command goes to one handler and its response to the
    /// inbox named by the command's `sender.instanceId`.
    pub async fn publish_raw(&self, bytes: &[u8]) -> Result<(), DecodeError> {
        let limit = self
            .config
            .max_payload_bytes
            .unwrap_or(DEFAULT_MAX_ENVELOPE_BYTES);
        let envelope = match Envelope::decode_with_limit(bytes, limit) {
            Ok(envelope) => envelope,
            Err(error) => {
                self.poison.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    instance_id = %self.instance_id,
                    bytes = bytes.len(),
                    %error,
                    "undecodable message dropped"
                );
                return Err(error);
            }
        };
        if self.closed.load(Ordering::Acquire) {
            tracing::warn!(message_id = %envelope.id, "bridge shut down: raw message dropped");
            return Ok(());
        }
        self.hub.publish(Arc::new(envelope)).await;
        Ok(())
    }

    /// Raw messages that could not be decoded (see [`MemoryBridge::publish_raw`]).
    pub fn poison_messages(&self) -> u64 {
        self.poison.load(Ordering::Relaxed)
    }

    /// Responses that reached this instance after their invocation timed out, or with a
    /// `correlationId` nobody waits for; each was ignored with a warning.
    pub fn unmatched_responses(&self) -> u64 {
        self.inbox.unmatched()
    }

    /// Messages dropped because one of this instance's consumers was paused with a full buffer.
    pub fn dropped_while_paused(&self) -> u64 {
        self.drops.while_paused.load(Ordering::Relaxed)
    }

    /// Messages meant for one of this instance's consumers that nobody handled: the consumer
    /// closed (its subscription was unregistered or the instance shut down) with them in its
    /// buffer, or while a publisher waited for room in it, and no other instance of the
    /// subscription was left to take them (a broadcast subscription's copies never go to
    /// another instance). Each drop is also logged as a warning. Delivery is at most once:
    /// nothing waits for a consumer that is gone.
    pub fn dropped_after_close(&self) -> u64 {
        self.drops.after_close.load(Ordering::Relaxed)
    }

    fn ensure_open(&self) -> Result<(), BridgeError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(BridgeError::Unavailable("bridge shut down".into()));
        }
        Ok(())
    }

    fn check_size(&self, envelope: &Envelope) -> Result<(), BridgeError> {
        if self.capabilities.limits.max_payload_bytes.is_none() {
            return Ok(());
        }
        kit::check_body(kit::encoded_len(envelope)?, &self.capabilities.limits)
    }

    /// Stops intake and takes this instance off the hub. Idempotent. Returns each closed
    /// subscription consumer with what it had buffered but not started.
    fn close_intake(&self) -> Vec<(Arc<Consumer>, Vec<Queued>)> {
        let registrations = {
            let mut registrations = self.registrations.lock();
            self.closed.store(true, Ordering::Release);
            std::mem::take(&mut *registrations)
        };
        self.closing.send_replace(true);
        for address in &registrations.commands {
            self.hub.commands.leave(address, &self.instance_id);
        }
        for address in &registrations.streams {
            self.hub.streams.leave(address, &self.instance_id);
        }
        let mut left = Vec::new();
        for consumer in registrations.subscriptions.into_values() {
            self.hub.subscriptions.leave(&consumer);
            let buffered = consumer.close();
            left.push((consumer, buffered));
        }
        self.tasks.close();
        left
    }

    async fn drain(&self, deadline: Instant) -> DrainReport {
        let began = Instant::now();
        let left = self.close_intake();
        // What this instance had buffered goes to the other instances of its shared
        // subscriptions, while the deadline allows.
        let handing_back = async {
            for (consumer, buffered) in left {
                self.hub.subscriptions.hand_back(&consumer, buffered).await;
            }
        };
        if tokio::time::timeout_at(deadline, handing_back)
            .await
            .is_err()
        {
            tracing::warn!("shutdown deadline passed while handing buffered messages back");
        }
        let idle = self.tracker.wait_idle(deadline).await;
        let tasks_done = self.tasks.wait_empty(deadline).await;
        let mut still_running = self.tracker.running();
        let rejected = self
            .inbox
            .close(&BridgeError::Unavailable("bridge shutting down".into()));
        let aborted = self.tasks.abort_all();
        if !aborted.is_empty() {
            tracing::warn!(
                instance_id = %self.instance_id,
                aborted = aborted.len(),
                "shutdown deadline passed: remaining bridge tasks aborted"
            );
        }
        still_running.extend(aborted);
        self.hub.remove_inbox(&self.instance_id, &self.inbox);
        DrainReport {
            completed: idle && tasks_done,
            still_running,
            rejected_invocations: rejected,
            waited_ms: kit::millis(began.elapsed()),
        }
    }
}

impl Drop for MemoryBridge {
    fn drop(&mut self) {
        // Dropped without (or after) shutdown: leave the hub and stop every task.
        for (consumer, buffered) in self.close_intake() {
            consumer.drop_buffered(buffered);
        }
        self.inbox
            .close(&BridgeError::Unavailable("bridge dropped".into()));
        self.tasks.abort_all();
        self.hub.remove_inbox(&self.instance_id, &self.inbox);
    }
}

impl std::fmt::Debug for MemoryBridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBridge")
            .field("instance_id", &self.instance_id)
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl SubscriptionOperator for MemoryBridge {
    fn paused_subscription_consumers(&self) -> Vec<PausedConsumer> {
        let mut paused: Vec<PausedConsumer> = self
            .registrations
            .lock()
            .subscriptions
            .values()
            .filter_map(|c| c.queue.paused())
            .collect();
        paused.sort_by(|a, b| a.key.cmp(&b.key));
        paused
    }

    async fn resume_subscription_consumer(
        &self,
        key: &RegistrationKey,
    ) -> Result<bool, BridgeError> {
        let consumer = self.registrations.lock().subscriptions.get(key).cloned();
        let resumed = consumer.is_some_and(|c| c.queue.resume());
        if resumed {
            tracing::info!(registration = %key, "subscription consumer resumed");
        }
        Ok(resumed)
    }

    async fn inspect_dead_letters(
        &self,
        target: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetterEntry>, BridgeError> {
        Ok(self.hub.dead_letters.read(target, limit))
    }

    /// Hands dead letters back to the subscription group they came from (a shared
    /// subscription, or the one broadcast instance that dead-lettered them) as attempt 1.
    /// Entries whose subscription is gone stay, listed as [`NotReplayed::SourceGone`](purista_core::NotReplayed).
    async fn replay_dead_letters(
        &self,
        target: &str,
        limit: usize,
    ) -> Result<ReplayReport, BridgeError> {
        self.ensure_open()?;
        Ok(self
            .hub
            .dead_letters
            .replay(target, limit, &self.hub.subscriptions)
            .await)
    }

    async fn purge_dead_letters(&self, target: &str) -> Result<usize, BridgeError> {
        Ok(self.hub.dead_letters.purge(target))
    }
}

#[async_trait]
impl EventBridge for MemoryBridge {
    fn name(&self) -> &str {
        BRIDGE_NAME
    }

    fn instance_id(&self) -> &str {
        &self.instance_id
    }

    fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    fn default_command_timeout(&self) -> Duration {
        self.config.default_command_timeout
    }

    /// Nothing to connect; operations work before `start` too. Fails only after shutdown.
    async fn start(&self) -> Result<(), BridgeError> {
        self.ensure_open()?;
        self.started.store(true, Ordering::Release);
        Ok(())
    }

    async fn health(&self) -> BridgeHealth {
        if self.closed.load(Ordering::Acquire) {
            BridgeHealth::Unhealthy {
                reason: "shut down".into(),
            }
        } else if !self.started.load(Ordering::Acquire) {
            BridgeHealth::Unhealthy {
                reason: "not started".into(),
            }
        } else {
            BridgeHealth::Healthy
        }
    }

    // `emit` and `invoke` are written out instead of as `async fn`: `#[async_trait]` rebinds
    // every argument inside the future it boxes, so the envelope argument would take its space
    // twice in a future that is allocated for every message.
    fn emit<'life0, 'async_trait>(
        &'life0 self,
        mut message: Envelope,
    ) -> BoxFuture<'async_trait, Result<(), BridgeError>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            self.ensure_open()?;
            kit::check_emittable(&message)?;
            kit::stamp(&mut message, &self.instance_id);
            self.check_size(&message)?;
            self.hub.publish(Arc::new(message)).await;
            Ok(())
        })
    }

    fn invoke<'life0, 'async_trait>(
        &'life0 self,
        mut command: Envelope,
        ttl: Duration,
    ) -> BoxFuture<'async_trait, Result<Envelope, BridgeError>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            self.ensure_open()?;
            kit::check_command(&command)?;
            // Stamped and measured before anything else: a command over the limit is the
            // caller's 400 whether or not anybody serves it.
            kit::stamp(&mut command, &self.instance_id);
            kit::correlation_id(&mut command);
            self.check_size(&command)?;
            let receiver = kit::check_command(&command)?;
            let member = self
                .hub
                .commands
                .pick(receiver)
                .ok_or_else(|| BridgeError::NoHandler(receiver.to_string()))?;

            let deadline = kit::deadline_after(ttl);
            let (pending, reply) = self
                .inbox
                .wait_for(command.correlation_id.as_deref().unwrap_or_default())?;
            let _in_flight = self.tracker.start(WorkKind::Command, &member.label);
            let command = Arc::new(command);
            let waited = tokio::time::timeout_at(deadline, async {
                // Subscriptions see the command before its response.
                self.hub.subscriptions.offer(&command).await;
                commands::dispatch(
                    &self.hub,
                    member,
                    command.clone(),
                    ReplyTo::Caller(self.inbox.clone()),
                );
                reply.await
            })
            .await;
            match waited {
                Ok(Ok(Ok(response))) => {
                    Ok(Arc::try_unwrap(response).unwrap_or_else(|shared| (*shared).clone()))
                }
                Ok(Ok(Err(error))) => Err(error),
                Ok(Err(_)) => Err(BridgeError::Unavailable("bridge shutting down".into())),
                Err(_) => {
                    tracing::debug!(
                        correlation_id = pending.correlation_id(),
                        receiver = %command.receiver.as_ref().map(ToString::to_string).unwrap_or_default(),
                        "invocation timed out"
                    );
                    Err(BridgeError::Timeout(kit::millis(ttl)))
                }
            }
        })
    }

    async fn register_command(
        &self,
        address: Address,
        handler: Arc<dyn CommandHandler>,
    ) -> Result<(), BridgeError> {
        let mut registrations = self.registrations.lock();
        self.ensure_open()?;
        let member = Arc::new(CommandMember {
            instance_id: self.instance.clone(),
            label: address.to_string().into(),
            handler,
            tasks: self.tasks.clone(),
        });
        self.hub.commands.join(&address, member)?;
        registrations.commands.push(address);
        Ok(())
    }

    async fn unregister_command(&self, address: &Address) -> Result<(), BridgeError> {
        self.registrations
            .lock()
            .commands
            .retain(|a| !a.same_endpoint(address));
        self.hub.commands.leave(address, &self.instance_id);
        Ok(())
    }

    async fn register_subscription(
        &self,
        spec: SubscriptionSpec,
        handler: Arc<dyn DeliveryHandler>,
    ) -> Result<(), BridgeError> {
        let mut registrations = self.registrations.lock();
        self.ensure_open()?;
        if registrations.subscriptions.contains_key(&spec.key) {
            return Err(BridgeError::AlreadyRegistered(spec.key.to_string()));
        }
        if spec.durable {
            tracing::debug!(
                registration = %spec.key,
                "durable subscription on the in-process bridge: messages do not wait for absent consumers"
            );
        }
        let key = spec.key.clone();
        let consumer = Consumer::new(
            spec,
            &self.hub,
            &self.instance_id,
            self.config.consumer_buffer,
            self.drops.clone(),
            self.closing.subscribe(),
        );
        let run = subscriptions::run_consumer(consumer.clone(), handler);
        if !self
            .tasks
            .spawn(WorkKind::Subscription, consumer.label.clone(), run)
        {
            return Err(BridgeError::Unavailable("bridge shut down".into()));
        }
        self.hub.subscriptions.join(consumer.clone());
        registrations.subscriptions.insert(key, consumer);
        Ok(())
    }

    async fn unregister_subscription(&self, key: &RegistrationKey) -> Result<(), BridgeError> {
        let consumer = self.registrations.lock().subscriptions.remove(key);
        if let Some(consumer) = consumer {
            self.hub.subscriptions.leave(&consumer);
            let buffered = consumer.close();
            self.hub.subscriptions.hand_back(&consumer, buffered).await;
        }
        Ok(())
    }

    async fn unregister_stream(&self, address: &Address) -> Result<(), BridgeError> {
        self.registrations
            .lock()
            .streams
            .retain(|a| !a.same_endpoint(address));
        self.hub.streams.leave(address, &self.instance_id);
        Ok(())
    }

    async fn register_stream(
        &self,
        address: Address,
        handler: Arc<dyn StreamHandler>,
    ) -> Result<(), BridgeError> {
        let mut registrations = self.registrations.lock();
        self.ensure_open()?;
        let member = Arc::new(StreamMember {
            instance_id: self.instance.clone(),
            label: address.to_string().into(),
            handler,
            tasks: self.tasks.clone(),
            tracker: self.tracker.clone(),
        });
        self.hub.streams.join(&address, member)?;
        registrations.streams.push(address);
        Ok(())
    }

    /// Stamps `sender.instanceId` on the open frame (id and timestamp stay as core built them)
    /// and runs the session on one producer instance.
    async fn open_stream(&self, mut open: Envelope) -> Result<StreamConsumerEnd, BridgeError> {
        self.ensure_open()?;
        kit::check_stream_open(&open)?;
        open.sender.instance_id.clone_from(&self.instance_id);
        // Like a command: over the limit is the caller's 400 before anything else.
        self.check_size(&open)?;
        let (_, receiver) = kit::check_stream_open(&open)?;
        let member = self
            .hub
            .streams
            .pick(receiver)
            .ok_or_else(|| BridgeError::NoHandler(receiver.to_string()))?;
        streams::open(member, open)
    }

    fn in_flight(&self) -> InFlight {
        self.tracker.snapshot()
    }

    fn counters(&self) -> BridgeCounters {
        BridgeCounters {
            reconnects: 0,
            poison_messages: self.poison_messages(),
            unmatched_responses: self.unmatched_responses(),
        }
    }

    async fn shutdown(&self, deadline: Instant) -> DrainReport {
        self.drained
            .get_or_init(|| self.drain(deadline))
            .await
            .clone()
    }
}
