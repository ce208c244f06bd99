//! [`AmqpBridge`]: the [`EventBridge`] surface over RabbitMQ.
//!
//! This file checks, stamps and measures what goes out, publishes it (commands mandatory,
//! everything with confirms), keeps registrations, and starts and stops the bridge. The
//! mechanics live next door, each in a file of its own that never imports this one: the
//! shared state by concern in `shared.rs` (the link to the broker in `link.rs`, work in flight
//! in `work.rs`, counts in `ledger.rs`, poison isolation in `suspects.rs`), names and
//! declarations in `topology.rs`, the header projection in `headers.rs`, sizes in `budget.rs`,
//! confirms in `publish.rs`, one connection in `session.rs`, connecting in `connect.rs`,
//! consumers in `consume.rs`, commands in `serve.rs`, settlements in `settle.rs`, responses in
//! `reply.rs`, stream sessions in `streams.rs` and `stream_table.rs`, dead-letter queues in
//! `dead_letters.rs`, the connection supervisor in `reconnect.rs` and shutdown in
//! `shutdown.rs`.
//!
//! Everything a caller sends is measured before it is published: a body over
//! `max_payload_bytes` or metadata (properties and headers) over `max_metadata_bytes` is a 400
//! at the caller, never a broker protocol error (see `budget.rs`).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use lapin::BasicProperties;
use parking_lot::Mutex;
use purista_core::kit::{self, deadline_after, endpoint_label};
use purista_core::{
    Address, BridgeCounters, BridgeError, BridgeHealth, Capabilities, CommandHandler,
    DeadLetterEntry, DeliveryGuarantee, DeliveryHandler, DrainReport, Envelope, EventBridge,
    FilterSupport, InFlight, PausedConsumer, RegistrationKey, ReplayReport, StreamConsumerEnd,
    StreamHandler, SubscriptionOperator, SubscriptionSpec, WorkKind, ids,
};
use tokio::sync::{OnceCell, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::AmqpConfig;
use crate::consume;
use crate::dead_letters;
use crate::headers;
use crate::link::FirstConnect;
use crate::publish::{self, Outgoing, Verdict};
use crate::reconnect;
use crate::registry::{ConsumerOp, Kind, Registration};
use crate::session::Session;
use crate::shared::Shared;
use crate::shutdown;
use crate::streams;
use crate::topology::{MAX_NAME_LEN, Topology, millis};

/// The bridge name reported by [`EventBridge::name`] and in the capabilities.
pub const BRIDGE_NAME: &str = "amqp";

/// Broker calls one registration's start may take: `register` waits that many
/// `broker_timeout`s for it.
const START_CALLS: u32 = 8;

/// One bridge instance on a RabbitMQ broker. Make it with [`AmqpBridge::new`], then
/// [`start`](EventBridge::start) it (a service's start does that).
///
/// Routing is the broker's: a headers exchange, one queue per command endpoint, per shared
/// subscription and per broadcast subscription instance, bound with the subscription's filter
/// (see the crate docs for the full mapping). Durable subscriptions are at-least-once:
/// messages are persistent, publishes confirmed, and deliveries acked only once their
/// settlement is done. Commands are at-most-once and fail fast with 502 when no instance serves
/// them. Streams are at-most-once sessions between the opener and one serving instance that
/// end with either's connection; a stream nobody serves fails with 502 at once.
///
/// In-flight counters ([`EventBridge::in_flight`]) hold this instance's pending invocations
/// (`command`) and the stream sessions it opened that have not seen their terminal frame
/// (`stream`); handlers are counted by the service that runs them.
pub struct AmqpBridge {
    shared: Arc<Shared>,
    capabilities: Capabilities,
    supervisor: Mutex<Option<JoinHandle<()>>>,
    stop: watch::Sender<bool>,
    drained: OnceCell<DrainReport>,
}

/// The capabilities of the RabbitMQ bridge with this config.
pub(crate) fn capabilities(config: &AmqpConfig) -> Capabilities {
    let mut caps = Capabilities::none(BRIDGE_NAME);
    caps.commands = true;
    caps.filters = FilterSupport::Complex;
    caps.streams = true;
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
    caps.limits.max_payload_bytes = Some(config.max_payload_bytes);
    caps.limits.max_metadata_bytes = Some(config.max_metadata_bytes);
    caps.limits.max_name_len = Some(MAX_NAME_LEN);
    caps
}

impl AmqpBridge {
    /// A bridge with `config`; nothing connects until [`EventBridge::start`].
    pub fn new(config: AmqpConfig) -> Result<Self, crate::ConfigError> {
        config.validate()?;
        let instance_id = config.instance_id.clone().unwrap_or_else(ids::new_id);
        let (stop, _) = watch::channel(false);
        Ok(AmqpBridge {
            capabilities: capabilities(&config),
            shared: Arc::new(Shared::new(config, instance_id)),
            supervisor: Mutex::new(None),
            stop,
            drained: OnceCell::new(),
        })
    }

    /// A bridge configured from the environment ([`AmqpConfig::from_env`]).
    pub fn from_env() -> Result<Self, crate::ConfigError> {
        AmqpBridge::new(AmqpConfig::from_env()?)
    }

    /// This bridge's settings.
    pub fn config(&self) -> &AmqpConfig {
        &self.shared.config
    }

    /// The names of this instance's broker resources.
    pub fn topology(&self) -> &Topology {
        &self.shared.topology
    }

    /// Every queue this instance has declared so far (its own and shared ones, retry and
    /// dead-letter queues included), sorted. Command and reply queues delete themselves; the
    /// others outlive the instance by design, so a test that wants a clean broker deletes
    /// these and [`Topology::exchange`].
    pub fn declared_queues(&self) -> Vec<String> {
        self.shared.ledger.declared()
    }

    /// True while connected to the broker.
    pub fn is_connected(&self) -> bool {
        self.shared.link.current().is_some()
    }

    /// How often the connection was re-established after a loss.
    pub fn reconnects(&self) -> u64 {
        self.shared.link.reconnects()
    }

    /// Poison deliveries: bytes that do not decode as an envelope (including bodies over
    /// `max_payload_bytes`) on any consumed queue, valid envelopes on a queue they do not
    /// belong on (a non-command on a command queue, a non-response on the reply queue),
    /// messages too large to be retried, dead-lettered or answered with the bridge's own
    /// headers, and deliveries quarantined after the connection closed twice while they were
    /// in hand. Each was dead-lettered or dropped with a warning.
    pub fn poison_messages(&self) -> u64 {
        self.shared.ledger.poison()
    }

    /// Responses that reached this instance after their invocation ended, or with a
    /// `correlationId` nobody waits for, and stream frames for a session this instance does not
    /// have (any more); each was ignored with a warning.
    pub fn unmatched_responses(&self) -> u64 {
        self.shared.work.inbox.unmatched() + self.shared.work.streams.unmatched()
    }

    /// Publishes raw bytes as if another PURISTA process had sent them: a valid envelope is
    /// routed by its header projection *without* re-stamping (so a test can send a fixed
    /// sender, or one message id twice); bytes that are not an envelope are refused.
    pub async fn publish_raw(&self, bytes: &[u8]) -> Result<(), BridgeError> {
        self.ensure_open()?;
        let envelope = Envelope::decode_with_limit(bytes, self.shared.config.max_payload_bytes)?;
        let properties = publish::properties(&envelope, headers::project(&envelope));
        let session = self.checked_session(&properties)?;
        let verdict = session
            .publish(Outgoing {
                exchange: self.shared.topology.exchange(),
                routing_key: "",
                mandatory: false,
                body: bytes,
                properties,
            })
            .await?;
        match verdict {
            Verdict::Nacked => Err(BridgeError::Broker(format!(
                "the broker refused message {}",
                envelope.id
            ))),
            _ => Ok(()),
        }
    }

    /// The queue behind dead-letter target `target` and the live session, for the operator
    /// calls.
    fn dead_letter_queue(&self, target: &str) -> Result<(String, Arc<Session>), BridgeError> {
        self.ensure_open()?;
        let queue = self.shared.topology.dead_letter_queue(target)?;
        Ok((queue, self.shared.link.connected()?))
    }

    fn ensure_open(&self) -> Result<(), BridgeError> {
        self.shared.work.ensure_open()
    }

    fn stamp(&self, envelope: &mut Envelope) {
        kit::stamp(envelope, &self.shared.instance_id);
    }

    fn encode_checked(&self, envelope: &Envelope) -> Result<Vec<u8>, BridgeError> {
        let body = envelope.encode();
        kit::check_body(body.len(), &self.capabilities.limits)?;
        Ok(body)
    }

    /// The live session, once `properties` (what a caller is about to send besides the body)
    /// are measured against the declared metadata limit and the session's own: over either is
    /// [`BridgeError::TooLarge`] (400), checked before the connection so that a caller learns
    /// it whatever the broker's state.
    fn checked_session(&self, properties: &BasicProperties) -> Result<Arc<Session>, BridgeError> {
        let size = publish::metadata_len(properties);
        kit::check_metadata(size, &self.capabilities.limits)?;
        let session = self.shared.link.connected()?;
        session.budget.check_caller(size)?;
        Ok(session)
    }

    /// Adds a registration and, when connected, starts its consumer at once so that broker
    /// errors (a conflicting queue) reach the caller.
    async fn register(
        &self,
        reg: Arc<Registration>,
        ops: mpsc::UnboundedReceiver<ConsumerOp>,
    ) -> Result<(), BridgeError> {
        self.ensure_open()?;
        let registry = &self.shared.registry;
        let added = match reg.kind {
            Kind::Command { .. } => registry.add_command(reg.clone()),
            Kind::Stream { .. } => registry.add_stream(reg.clone()),
            Kind::Subscription { .. } => registry.add_subscription(reg.clone()),
        };
        if !added {
            return Err(BridgeError::AlreadyRegistered(reg.label.to_string()));
        }
        let forget = || match reg.kind {
            Kind::Command { .. } => registry.remove_command(&reg.label),
            Kind::Stream { .. } => registry.remove_stream(&reg.label),
            Kind::Subscription { .. } => registry.remove_subscription(&reg.label),
        };
        if !consume::start_keeper(&self.shared, &reg, ops) {
            forget();
            return Err(BridgeError::Unavailable("bridge shut down".into()));
        }
        if let Some(session) = self.shared.link.current() {
            let timeout = session.timeout * START_CALLS;
            if let Err(error) = reg.request_start(session, timeout).await {
                forget();
                let deadline = deadline_after(self.shared.config.broker_timeout);
                reg.request_stop(deadline).await;
                return Err(error);
            }
        }
        Ok(())
    }

    async fn unregister(&self, reg: Option<Arc<Registration>>) -> Result<(), BridgeError> {
        if let Some(reg) = reg {
            let deadline = deadline_after(self.shared.config.default_command_timeout);
            reg.request_stop(deadline).await;
        }
        Ok(())
    }
}

impl Drop for AmqpBridge {
    fn drop(&mut self) {
        // Dropped without (or after) shutdown: stop the supervisor and every task; the
        // connection closes when its last handle goes.
        self.shared.work.close();
        let _ = self.stop.send(true);
        if let Some(supervisor) = self.supervisor.lock().take() {
            supervisor.abort();
        }
        self.shared.work.tasks.close();
        self.shared.work.tasks.abort_all();
        self.shared
            .work
            .inbox
            .close(&BridgeError::Unavailable("bridge dropped".into()));
        self.shared.work.streams.end_all("bridge dropped", true);
        self.shared.link.replace(None);
    }
}

impl std::fmt::Debug for AmqpBridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpBridge")
            .field("instance_id", &self.shared.instance_id)
            .field("config", &self.shared.config)
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl SubscriptionOperator for AmqpBridge {
    fn paused_subscription_consumers(&self) -> Vec<PausedConsumer> {
        self.shared.registry.paused()
    }

    async fn resume_subscription_consumer(
        &self,
        key: &RegistrationKey,
    ) -> Result<bool, BridgeError> {
        match self.shared.registry.subscription(key.as_str()) {
            Some(reg) => reg.request_resume().await,
            None => Ok(false),
        }
    }

    async fn inspect_dead_letters(
        &self,
        target: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetterEntry>, BridgeError> {
        let (queue, session) = self.dead_letter_queue(target)?;
        let max_bytes = self.shared.config.max_payload_bytes;
        dead_letters::peek(&session, &queue, target, limit, max_bytes).await
    }

    /// Replays up to `limit` messages of dead-letter target `target`
    /// (`P.<target>.dead-letter`), oldest first, each to the subscription queue it was
    /// dead-lettered from, with a fresh retry budget.
    ///
    /// Each copy goes straight to that queue through the default exchange (no other
    /// subscription sees it again), `mandatory` and confirmed; it keeps its body, message id,
    /// properties and header projection, but not `x-purista-attempt` nor the
    /// `x-purista-dead-letter-*` headers, so the subscription gets it as attempt 1 with all
    /// its retries. The dead letter is removed only after the broker confirmed the copy: a
    /// crash in between leaves a duplicate, never a loss.
    ///
    /// Stay in the dead-letter queue, listed in [`ReplayReport::left`] with a
    /// [`NotReplayed`](purista_core::NotReplayed) reason: undecodable bytes, messages dead-lettered
    /// before the bridge recorded their source queue, messages whose source queue no longer
    /// exists, and copies the broker refused. The call takes each message at most once, so
    /// `limit` bounds what it reads, replayed or not; a missing dead-letter queue is an empty
    /// report.
    ///
    /// # Errors
    ///
    /// [`BridgeError::Unavailable`] while not connected (or when the connection drops
    /// mid-way: what was replayed until then stays replayed, the rest stays in the queue);
    /// [`BridgeError::InvalidRequest`] for an empty target or one whose queue name is too
    /// long.
    ///
    /// ```no_run
    /// # use purista_bridge_amqp::AmqpBridge;
    /// # use purista_core::SubscriptionOperator;
    /// # async fn demo(bridge: &AmqpBridge) -> Result<(), purista_core::BridgeError> {
    /// let report = bridge.replay_dead_letters("billing.receipts.failed", 100).await?;
    /// println!("{} replayed", report.replayed);
    /// for left in &report.left {
    ///     println!("left {:?}: {}", left.message_id, left.reason);
    /// }
    /// # Ok(()) }
    /// ```
    async fn replay_dead_letters(
        &self,
        target: &str,
        limit: usize,
    ) -> Result<ReplayReport, BridgeError> {
        let (queue, session) = self.dead_letter_queue(target)?;
        let max_bytes = self.shared.config.max_payload_bytes;
        dead_letters::replay(&session, &self.shared.topology, &queue, limit, max_bytes).await
    }

    /// Deletes every message of dead-letter target `target` (`P.<target>.dead-letter`);
    /// a missing queue purges nothing.
    async fn purge_dead_letters(&self, target: &str) -> Result<usize, BridgeError> {
        let (queue, session) = self.dead_letter_queue(target)?;
        let purged = dead_letters::purge(&session, &queue).await?;
        tracing::info!(%queue, purged, "dead letters purged");
        Ok(purged)
    }
}

#[async_trait]
impl EventBridge for AmqpBridge {
    fn name(&self) -> &str {
        BRIDGE_NAME
    }

    fn messaging_system(&self) -> &str {
        // OpenTelemetry's well-known name for the broker.
        "rabbitmq"
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

    /// Starts the connection supervisor and waits for the first connection (at most the
    /// connect timeout). Idempotent. A broker that refuses this client (wrong credentials, an
    /// unknown virtual host) fails it at its first answer with a non-retryable
    /// [`BridgeError::Client`]; after any other failure the supervisor keeps trying.
    async fn start(&self) -> Result<(), BridgeError> {
        self.ensure_open()?;
        {
            let mut supervisor = self.supervisor.lock();
            if supervisor.as_ref().is_none_or(JoinHandle::is_finished) {
                self.shared.link.retry_first();
                let shared = self.shared.clone();
                *supervisor = Some(tokio::spawn(reconnect::supervise(
                    shared,
                    self.stop.subscribe(),
                )));
            }
        }
        let mut first = self.shared.link.first_connect();
        let wait = self.shared.config.connect_timeout + Duration::from_secs(1);
        let settled = tokio::time::timeout(
            wait,
            first.wait_for(|f| !matches!(f, FirstConnect::Pending)),
        )
        .await;
        match settled {
            Ok(Ok(outcome)) => match &*outcome {
                FirstConnect::Refused(error) => Err(error.clone()),
                _ => Ok(()),
            },
            _ => {
                Err(self.shared.link.connected().err().unwrap_or_else(|| {
                    BridgeError::Unavailable("not connected to the broker".into())
                }))
            }
        }
    }

    /// `Healthy` while connected and the broker takes messages; unhealthy, with the reason,
    /// while disconnected, while the broker blocks publishing (a memory or disk alarm) or does
    /// not answer, before start and after shutdown.
    async fn health(&self) -> BridgeHealth {
        if self.shared.work.is_closing() {
            return BridgeHealth::Unhealthy {
                reason: "shut down".into(),
            };
        }
        if self.supervisor.lock().is_none() {
            return BridgeHealth::Unhealthy {
                reason: "not started".into(),
            };
        }
        match self.shared.link.problem().await {
            None => BridgeHealth::Healthy,
            Some(reason) => BridgeHealth::Unhealthy { reason },
        }
    }

    /// Publishes an event with confirms; returns within `broker_timeout` whatever the broker's
    /// state (503 when it does not confirm in time).
    async fn emit(&self, mut message: Envelope) -> Result<(), BridgeError> {
        self.ensure_open()?;
        kit::check_emittable(&message)?;
        self.stamp(&mut message);
        let body = self.encode_checked(&message)?;
        let properties = publish::in_mode(
            publish::properties(&message, headers::project(&message)),
            &message,
            self.shared.config.topology,
        );
        let session = self.checked_session(&properties)?;
        let verdict = session
            .publish(Outgoing {
                exchange: self.shared.topology.exchange(),
                routing_key: "",
                mandatory: false,
                body: &body,
                properties,
            })
            .await?;
        match verdict {
            Verdict::Nacked => Err(BridgeError::Broker(format!(
                "the broker refused message {}",
                message.id
            ))),
            _ => Ok(()),
        }
    }

    async fn invoke(&self, mut command: Envelope, ttl: Duration) -> Result<Envelope, BridgeError> {
        self.ensure_open()?;
        let receiver = kit::check_command(&command)?.clone();
        let deadline = deadline_after(ttl);
        let ttl_ms = millis(ttl);
        self.stamp(&mut command);
        let correlation_id = kit::correlation_id(&mut command).to_string();
        let body = self.encode_checked(&command)?;
        let reply_queue = self.shared.topology.reply_queue();
        let properties = publish::in_mode(
            publish::command_properties(&command, reply_queue, ttl_ms),
            &command,
            self.shared.config.topology,
        );
        let session = self.checked_session(&properties)?;
        let (_pending, reply) = self.shared.work.inbox.wait_for(&correlation_id)?;
        let label: Arc<str> = receiver.to_string().into();
        let _in_flight = self.shared.work.tracker.start(WorkKind::Command, &label);
        let waited = tokio::time::timeout_at(deadline, async {
            let out = Outgoing {
                exchange: self.shared.topology.exchange(),
                routing_key: "",
                mandatory: true,
                body: &body,
                properties,
            };
            self.shared
                .link
                .publish_routed(session, out, &receiver)
                .await?;
            reply
                .await
                .unwrap_or_else(|_| Err(BridgeError::Unavailable("bridge shutting down".into())))
        })
        .await;
        match waited {
            Ok(result) => result,
            Err(_) => {
                tracing::debug!(%correlation_id, %receiver, ttl_ms, "invocation timed out");
                Err(BridgeError::Timeout(ttl_ms))
            }
        }
    }

    async fn register_command(
        &self,
        address: Address,
        handler: Arc<dyn CommandHandler>,
    ) -> Result<(), BridgeError> {
        let queue = self.shared.topology.command_queue(&address)?;
        let label = endpoint_label(&address);
        let (reg, ops) = Registration::new(&label, &queue, Kind::Command { address, handler });
        self.register(reg, ops).await
    }

    async fn unregister_command(&self, address: &Address) -> Result<(), BridgeError> {
        let label = endpoint_label(address);
        self.unregister(self.shared.registry.remove_command(&label))
            .await
    }

    async fn register_subscription(
        &self,
        spec: SubscriptionSpec,
        handler: Arc<dyn DeliveryHandler>,
    ) -> Result<(), BridgeError> {
        let queue = self.shared.topology.subscription_queue(&spec)?;
        if let Some(target) = &spec.policy.dead_letter_target {
            self.shared.topology.dead_letter_queue(target)?;
        }
        let key = spec.key.to_string();
        let kind = Kind::Subscription {
            spec: Box::new(spec),
            handler,
        };
        let (reg, ops) = Registration::new(&key, &queue, kind);
        self.register(reg, ops).await
    }

    async fn unregister_subscription(&self, key: &RegistrationKey) -> Result<(), BridgeError> {
        self.unregister(self.shared.registry.remove_subscription(key.as_str()))
            .await
    }

    /// Serves stream sessions for `address` from its stream queue (competing consumers: each
    /// session runs on one instance).
    async fn register_stream(
        &self,
        address: Address,
        handler: Arc<dyn StreamHandler>,
    ) -> Result<(), BridgeError> {
        let queue = self.shared.topology.stream_queue(&address)?;
        let label = endpoint_label(&address);
        let (reg, ops) = Registration::new(&label, &queue, Kind::Stream { address, handler });
        self.register(reg, ops).await
    }

    async fn unregister_stream(&self, address: &Address) -> Result<(), BridgeError> {
        let label = endpoint_label(address);
        self.unregister(self.shared.registry.remove_stream(&label))
            .await
    }

    /// Stamps `sender.instanceId` on the open frame (id and timestamp stay as core built them),
    /// registers the session and publishes the open frame `mandatory` with confirms to the
    /// endpoint's stream queue: nobody serving the address is [`BridgeError::NoHandler`] at
    /// once.
    async fn open_stream(&self, mut open: Envelope) -> Result<StreamConsumerEnd, BridgeError> {
        self.ensure_open()?;
        let (correlation_id, receiver) = kit::check_stream_open(&open)?;
        let (correlation_id, receiver) = (correlation_id.to_string(), receiver.clone());
        open.sender.instance_id.clone_from(&self.shared.instance_id);
        let body = self.encode_checked(&open)?;
        // Straight to the endpoint's stream queue through the default exchange: no
        // subscription queue ever gets a stream frame, and no queue means nobody serves it.
        let stream_queue = self.shared.topology.stream_queue(&receiver)?;
        let reply_queue = self.shared.topology.reply_queue();
        // An open frame that waited in its queue longer than a default session (its servers
        // vanished without leaving) is not served after its reader most likely gave up.
        let ttl_ms = millis(self.shared.config.default_command_timeout).max(1);
        let properties = publish::properties(&open, headers::project(&open))
            .with_reply_to(reply_queue.into())
            .with_expiration(ttl_ms.to_string().into());
        let session = self.checked_session(&properties)?;
        let label: Arc<str> = endpoint_label(&receiver).into();
        let in_flight = self.shared.work.tracker.start(WorkKind::Stream, &label);
        let origin = streams::origin(&receiver, &self.shared.instance_id);
        let (end, watch) = self.shared.work.streams.open_consumer(
            &correlation_id,
            open.sender.clone(),
            origin,
            in_flight,
        )?;
        let deadline = deadline_after(self.shared.config.default_command_timeout);
        let published = tokio::time::timeout_at(deadline, async {
            let out = Outgoing {
                exchange: "",
                routing_key: &stream_queue,
                mandatory: true,
                body: &body,
                properties,
            };
            self.shared
                .link
                .publish_routed(session, out, &receiver)
                .await
        })
        .await
        .unwrap_or_else(|_| {
            Err(BridgeError::Timeout(millis(
                self.shared.config.default_command_timeout,
            )))
        });
        if let Err(error) = published {
            self.shared.work.streams.remove_consumer(&correlation_id);
            return Err(error);
        }
        let watcher = tokio::spawn(streams::watch_consumer(self.shared.clone(), watch));
        self.shared
            .work
            .streams
            .attach_watcher(&correlation_id, watcher.abort_handle());
        Ok(end)
    }

    fn in_flight(&self) -> InFlight {
        self.shared.work.tracker.snapshot()
    }

    fn counters(&self) -> BridgeCounters {
        BridgeCounters {
            reconnects: self.reconnects(),
            poison_messages: self.poison_messages(),
            unmatched_responses: self.unmatched_responses(),
        }
    }

    /// Drains and closes the bridge (see `shutdown.rs`); returns by `deadline` whatever the
    /// broker's state.
    async fn shutdown(&self, deadline: Instant) -> DrainReport {
        self.drained
            .get_or_init(|| async {
                let supervisor = self.supervisor.lock().take();
                shutdown::drain(&self.shared, &self.stop, supervisor, deadline).await
            })
            .await
            .clone()
    }
}
