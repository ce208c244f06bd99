//! [`AmqpBridge`]: the [`EventBridge`] surface over RabbitMQ.
//!
//! This file validates and stamps what goes out, publishes it (commands mandatory, everything
//! with confirms), keeps registrations, and runs start and shutdown. The per-concern mechanics
//! live next door: names and declarations in `topology.rs`, the header projection in
//! `headers.rs`, confirms in `publish.rs`, consumers and settlements in `consume.rs`, responses
//! in `reply.rs`, stream sessions in `streams.rs`, dead-letter replay in `replay.rs`, and the
//! connection supervisor in `reconnect.rs`.
//!
//! Shutdown is one explicit sequence: stop intake (cancel every consumer but the reply
//! consumer, so pending invocations and open stream sessions can still complete; command and
//! stream queues this instance was the last to serve are deleted), wait until in-flight work
//! and this instance's tasks (stream producers among them) are done or the deadline passes,
//! fail what is still pending with 503 (stream sessions too), delete this instance's queues and
//! close the connection.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use lapin::options::QueueDeleteOptions;
use parking_lot::Mutex;
use purista_core::kit::{self, TaskSet, deadline_after, endpoint_label};
use purista_core::{
    Address, BridgeCounters, BridgeError, BridgeHealth, Capabilities, CommandHandler,
    DeadLetterEntry, DeliveryGuarantee, DeliveryHandler, DrainReport, Envelope, EventBridge,
    FilterSupport, InFlight, InFlightTracker, PausedConsumer, RegistrationKey, ReplayReport,
    StreamConsumerEnd, StreamHandler, SubscriptionOperator, SubscriptionSpec, WorkKind, ids,
};
use tokio::sync::{OnceCell, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::AmqpConfig;
use crate::consume;
use crate::headers;
use crate::publish::{self, Outgoing, Verdict};
use crate::reconnect::{self, Session};
use crate::registry::{Kind, Registration, Registry};
use crate::replay;
use crate::reply::ReplyInbox;
use crate::streams::{self, StreamSessions};
use crate::topology::{self, MAX_NAME_LEN, Topology, millis};

/// The bridge name reported by [`EventBridge::name`] and in the capabilities.
pub const BRIDGE_NAME: &str = "amqp";

/// State shared by the bridge, its supervisor, consumers and settlers.
pub(crate) struct Shared {
    pub config: AmqpConfig,
    pub topology: Topology,
    pub instance_id: String,
    /// The live session; `None` while disconnected.
    pub session: watch::Sender<Option<Arc<Session>>>,
    pub inbox: ReplyInbox,
    /// Stream sessions of this instance, both ends, by `correlationId`.
    pub streams: StreamSessions,
    pub registry: Registry,
    /// Serializes consumer changes that talk to the broker (start, restore, pause, resume,
    /// stop). An async mutex on purpose: those changes are sequences of broker round trips that
    /// must not interleave; nothing waits for handlers while holding it.
    pub topology_lock: tokio::sync::Mutex<()>,
    pub tasks: Arc<TaskSet>,
    pub tracker: InFlightTracker,
    pub closing: AtomicBool,
    last_error: Mutex<Option<String>>,
    /// Every queue this instance declared, for operators and test cleanup.
    declared: Mutex<BTreeSet<String>>,
    poison: AtomicU64,
    reconnects: AtomicU64,
    /// The generation of the last reconnect and when the supervisor finished restoring it.
    reconnected: Mutex<Option<(u64, Instant)>>,
}

impl Shared {
    /// The live session, if connected.
    pub(crate) fn current(&self) -> Option<Arc<Session>> {
        self.session.borrow().clone().filter(|s| s.is_live())
    }

    /// Remembers a queue this instance declared.
    pub(crate) fn record(&self, queue: &str) {
        let mut declared = self.declared.lock();
        if !declared.contains(queue) {
            declared.insert(queue.to_string());
        }
    }

    pub(crate) fn count_poison(&self) {
        self.poison.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a reconnect of the current session and remembers when it happened.
    pub(crate) fn count_reconnect(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
        if let Some(generation) = self.session.borrow().as_ref().map(|s| s.generation) {
            *self.reconnected.lock() = Some((generation, Instant::now()));
        }
    }

    /// True while `session` is a reconnect younger than the reconnect grace: serving instances
    /// may not have re-created their command queues yet, so a command without a route is not
    /// yet proof that nobody serves it. A session the supervisor has not finished restoring
    /// counts as just reconnected.
    fn in_reconnect_grace(&self, session: &Session) -> bool {
        if session.generation <= 1 {
            return false;
        }
        match *self.reconnected.lock() {
            Some((generation, at)) if generation == session.generation => {
                at.elapsed() < self.config.reconnect_grace
            }
            _ => true,
        }
    }

    pub(crate) fn set_last_error(&self, error: String) {
        *self.last_error.lock() = Some(self.config.scrub(&error));
    }

    fn connected(&self) -> Result<Arc<Session>, BridgeError> {
        self.current().ok_or_else(|| {
            BridgeError::Unavailable(match self.last_error.lock().as_deref() {
                Some(e) => format!("not connected to the broker ({e})"),
                None => "not connected to the broker".into(),
            })
        })
    }

    /// Publishes a `mandatory` message that must reach a queue (a command, a stream's open
    /// frame) for `receiver`: unroutable is [`BridgeError::NoHandler`] (502) at once, except in
    /// the reconnect grace, where it is published again after short pauses (a returned message
    /// reached no queue, so this cannot duplicate it); nacked is [`BridgeError::Refused`]. The
    /// caller bounds the whole by its ttl.
    pub(crate) async fn publish_routed(
        &self,
        mut session: Arc<Session>,
        out: Outgoing<'_>,
        receiver: &Address,
    ) -> Result<(), BridgeError> {
        let mut pause = UNROUTED_RETRY_FIRST;
        loop {
            let attempt = Outgoing {
                properties: out.properties.clone(),
                ..out
            };
            match session.publish(attempt).await? {
                Verdict::Confirmed => return Ok(()),
                Verdict::Returned { .. } if self.in_reconnect_grace(&session) => {
                    tracing::debug!(%receiver, retry_in = ?pause, "no route right after a reconnect; trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(UNROUTED_RETRY_MAX);
                    session = self.connected()?;
                }
                Verdict::Returned { .. } => {
                    return Err(BridgeError::NoHandler(receiver.to_string()));
                }
                Verdict::Nacked => return Err(BridgeError::Refused(receiver.to_string())),
            }
        }
    }

    /// Publishes a command's response to the exchange: subscriptions see it through the header
    /// projection, the caller's reply queue through the `replyTo` header.
    pub(crate) async fn publish_response(
        &self,
        response: &Envelope,
        reply_to: Option<&str>,
    ) -> Result<(), BridgeError> {
        let session = self.connected()?;
        let body = response.encode();
        let verdict = session
            .publish(Outgoing {
                exchange: self.topology.exchange(),
                routing_key: "",
                mandatory: false,
                body: &body,
                properties: publish::response_properties(response, reply_to),
            })
            .await?;
        match verdict {
            Verdict::Nacked => Err(BridgeError::Broker(
                "the broker refused the response".into(),
            )),
            _ => Ok(()),
        }
    }
}

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
    caps.limits.max_name_len = Some(MAX_NAME_LEN);
    caps
}

/// First wait before publishing an unroutable command again during the reconnect grace.
const UNROUTED_RETRY_FIRST: Duration = Duration::from_millis(20);
/// Longest wait between those publishes.
const UNROUTED_RETRY_MAX: Duration = Duration::from_millis(320);

impl AmqpBridge {
    /// A bridge with `config`; nothing connects until [`EventBridge::start`].
    pub fn new(config: AmqpConfig) -> Result<Self, crate::ConfigError> {
        config.validate()?;
        let instance_id = config.instance_id.clone().unwrap_or_else(ids::new_id);
        let topology = Topology::new(&config, &instance_id);
        let (stop, _) = watch::channel(false);
        Ok(AmqpBridge {
            capabilities: capabilities(&config),
            shared: Arc::new(Shared {
                topology,
                instance_id,
                session: watch::Sender::new(None),
                inbox: ReplyInbox::default(),
                streams: StreamSessions::default(),
                registry: Registry::default(),
                topology_lock: tokio::sync::Mutex::new(()),
                tasks: TaskSet::new(),
                tracker: InFlightTracker::new(),
                closing: AtomicBool::new(false),
                last_error: Mutex::new(None),
                declared: Mutex::new(BTreeSet::new()),
                poison: AtomicU64::new(0),
                reconnects: AtomicU64::new(0),
                reconnected: Mutex::new(None),
                config,
            }),
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
        self.shared.declared.lock().iter().cloned().collect()
    }

    /// True while connected to the broker.
    pub fn is_connected(&self) -> bool {
        self.shared.current().is_some()
    }

    /// How often the connection was re-established after a loss.
    pub fn reconnects(&self) -> u64 {
        self.shared.reconnects.load(Ordering::Relaxed)
    }

    /// Poison deliveries: bytes that do not decode as an envelope (including bodies over
    /// `max_payload_bytes`) on any consumed queue, and valid envelopes on a queue they do not
    /// belong on (a non-command on a command queue, a non-response on the reply queue). Each
    /// was dead-lettered or dropped with a warning.
    pub fn poison_messages(&self) -> u64 {
        self.shared.poison.load(Ordering::Relaxed)
    }

    /// Responses that reached this instance after their invocation ended, or with a
    /// `correlationId` nobody waits for, and stream frames for a session this instance does not
    /// have (any more); each was ignored with a warning.
    pub fn unmatched_responses(&self) -> u64 {
        self.shared.inbox.unmatched() + self.shared.streams.unmatched()
    }

    /// Publishes raw bytes as if another PURISTA process had sent them: a valid envelope is
    /// routed by its header projection *without* re-stamping (so a test can send a fixed
    /// sender, or one message id twice); bytes that are not an envelope are refused.
    pub async fn publish_raw(&self, bytes: &[u8]) -> Result<(), BridgeError> {
        self.ensure_open()?;
        let envelope = Envelope::decode_with_limit(bytes, self.shared.config.max_payload_bytes)?;
        let session = self.shared.connected()?;
        let properties = publish::properties(&envelope, headers::project(&envelope));
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

    /// The queue of dead-letter target `target` and the live session, for the operator calls.
    fn dead_letter_queue(&self, target: &str) -> Result<(String, Arc<Session>), BridgeError> {
        self.ensure_open()?;
        if target.is_empty() {
            return Err(BridgeError::InvalidRequest(
                "a dead-letter target needs a name".into(),
            ));
        }
        let queue = self.shared.topology.dead_letter_queue(target);
        topology::name(&queue)?;
        Ok((queue, self.shared.connected()?))
    }

    fn ensure_open(&self) -> Result<(), BridgeError> {
        if self.shared.closing.load(Ordering::Acquire) {
            return Err(BridgeError::Unavailable("bridge shut down".into()));
        }
        Ok(())
    }

    fn stamp(&self, envelope: &mut Envelope) {
        kit::stamp(envelope, &self.shared.instance_id);
    }

    fn encode_checked(&self, envelope: &Envelope) -> Result<Vec<u8>, BridgeError> {
        let body = envelope.encode();
        kit::check_body(body.len(), &self.capabilities.limits)?;
        Ok(body)
    }

    /// Adds a registration and, when connected, starts its consumer at once so that broker
    /// errors (a conflicting queue, a name too long) reach the caller.
    async fn register(&self, reg: Arc<Registration>) -> Result<(), BridgeError> {
        let _topology = self.shared.topology_lock.lock().await;
        self.ensure_open()?;
        let added = match reg.kind {
            Kind::Command { .. } => self.shared.registry.add_command(reg.clone()),
            Kind::Stream { .. } => self.shared.registry.add_stream(reg.clone()),
            Kind::Subscription { .. } => self.shared.registry.add_subscription(reg.clone()),
        };
        if !added {
            return Err(BridgeError::AlreadyRegistered(reg.label.to_string()));
        }
        if let Some(session) = self.shared.current()
            && let Err(error) = consume::start_locked(&self.shared, &reg, &session).await
        {
            match reg.kind {
                Kind::Command { .. } => self.shared.registry.remove_command(&reg.label),
                Kind::Stream { .. } => self.shared.registry.remove_stream(&reg.label),
                Kind::Subscription { .. } => self.shared.registry.remove_subscription(&reg.label),
            };
            reg.state.lock().removed = true;
            consume::cancel_locked(&reg).await;
            reg.retired.send_replace(true);
            return Err(error);
        }
        Ok(())
    }

    async fn drain(&self, deadline: Instant) -> DrainReport {
        let began = Instant::now();
        self.shared.closing.store(true, Ordering::Release);
        let registrations = self.shared.registry.drain();
        {
            let _topology = self.shared.topology_lock.lock().await;
            for reg in &registrations {
                reg.state.lock().removed = true;
                consume::cancel_locked(reg).await;
            }
            // Commands and streams this instance was the last to serve fail with 502 from now
            // on.
            if let Some(session) = self.shared.current() {
                for reg in registrations.iter().filter(|r| r.is_endpoint()) {
                    topology::retire_command_queue(&session.connection, &reg.queue).await;
                }
            }
            for reg in &registrations {
                reg.retired.send_replace(true);
            }
        }
        let idle = self.shared.tracker.wait_idle(deadline).await;
        self.shared.tasks.close();
        let tasks_done = self.shared.tasks.wait_empty(deadline).await;
        let mut still_running = self.shared.tracker.running();
        let rejected = self
            .shared
            .inbox
            .close(&BridgeError::Unavailable("bridge shutting down".into()));
        let abandoned = self.shared.streams.running_producers();
        self.shared.streams.end_all("bridge shutting down", true);
        let aborted = self.shared.tasks.abort_all();
        // Sessions this instance still served are gone with their tasks: tell their openers.
        if !abandoned.is_empty() {
            let reason = "the producing bridge instance shut down";
            streams::abandon_producers(&self.shared, &abandoned, reason).await;
        }
        if !aborted.is_empty() {
            tracing::warn!(
                instance_id = %self.shared.instance_id,
                aborted = aborted.len(),
                "shutdown deadline passed: remaining bridge tasks aborted"
            );
        }
        still_running.extend(aborted);
        let _ = self.stop.send(true);
        let supervisor = self.supervisor.lock().take();
        if let Some(supervisor) = supervisor {
            let _ = tokio::time::timeout(Duration::from_secs(1), supervisor).await;
        }
        if let Some(session) = self.shared.session.send_replace(None) {
            self.delete_instance_queues(&session, &registrations).await;
            session.close().await;
        }
        DrainReport {
            completed: idle && tasks_done,
            still_running,
            rejected_invocations: rejected,
            waited_ms: millis(began.elapsed()),
        }
    }

    /// Deletes what belongs to this instance alone: its reply queue and its non-durable
    /// broadcast queues.
    async fn delete_instance_queues(&self, session: &Session, registrations: &[Arc<Registration>]) {
        if !session.is_live() {
            return;
        }
        let Ok(channel) = session.admin_channel().await else {
            return;
        };
        let mut queues = vec![self.shared.topology.reply_queue()];
        queues.extend(
            registrations
                .iter()
                .filter(|r| r.spec().is_some_and(|s| !s.shared && !s.durable))
                .map(|r| r.queue.to_string()),
        );
        for queue in queues {
            let Ok(queue_name) = topology::name(&queue) else {
                continue;
            };
            if let Err(error) = channel
                .queue_delete(queue_name, QueueDeleteOptions::default())
                .await
            {
                tracing::debug!(%queue, %error, "deleting an instance queue failed");
                return;
            }
        }
    }
}

impl Drop for AmqpBridge {
    fn drop(&mut self) {
        // Dropped without (or after) shutdown: stop the supervisor and every task; the
        // connection closes when its last handle goes.
        self.shared.closing.store(true, Ordering::Release);
        let _ = self.stop.send(true);
        if let Some(supervisor) = self.supervisor.lock().take() {
            supervisor.abort();
        }
        self.shared.tasks.close();
        self.shared.tasks.abort_all();
        self.shared
            .inbox
            .close(&BridgeError::Unavailable("bridge dropped".into()));
        self.shared.streams.end_all("bridge dropped", true);
        self.shared.session.send_replace(None);
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
            Some(reg) => consume::resume(&self.shared, &reg).await,
            None => Ok(false),
        }
    }

    async fn inspect_dead_letters(
        &self,
        target: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetterEntry>, BridgeError> {
        let session = self.shared.connected()?;
        let queue = self.shared.topology.dead_letter_queue(target);
        consume::peek_dead_letters(
            &session,
            &queue,
            target,
            limit,
            self.shared.config.max_payload_bytes,
        )
        .await
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
        replay::replay_dead_letters(
            &session,
            &self.shared.topology,
            &queue,
            limit,
            self.shared.config.max_payload_bytes,
        )
        .await
    }

    /// Deletes every message of dead-letter target `target` (`P.<target>.dead-letter`);
    /// a missing queue purges nothing.
    async fn purge_dead_letters(&self, target: &str) -> Result<usize, BridgeError> {
        let (queue, session) = self.dead_letter_queue(target)?;
        let purged = topology::purge_queue(&session, &queue).await?;
        tracing::info!(%queue, purged, "dead letters purged");
        Ok(purged)
    }
}

#[async_trait]
impl EventBridge for AmqpBridge {
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

    /// Starts the connection supervisor and waits for the first connection (at most the
    /// connect timeout). Idempotent; after a failed start the supervisor keeps trying.
    async fn start(&self) -> Result<(), BridgeError> {
        self.ensure_open()?;
        {
            let mut supervisor = self.supervisor.lock();
            if supervisor.is_none() {
                let shared = self.shared.clone();
                *supervisor = Some(tokio::spawn(reconnect::supervise(
                    shared,
                    self.stop.subscribe(),
                )));
            }
        }
        let mut session = self.shared.session.subscribe();
        let wait = self.shared.config.connect_timeout + Duration::from_secs(1);
        match tokio::time::timeout(wait, session.wait_for(|s| s.is_some())).await {
            Ok(Ok(_)) => Ok(()),
            _ => {
                Err(self.shared.connected().err().unwrap_or_else(|| {
                    BridgeError::Unavailable("not connected to the broker".into())
                }))
            }
        }
    }

    async fn health(&self) -> BridgeHealth {
        if self.shared.closing.load(Ordering::Acquire) {
            return BridgeHealth::Unhealthy {
                reason: "shut down".into(),
            };
        }
        if self.supervisor.lock().is_none() {
            return BridgeHealth::Unhealthy {
                reason: "not started".into(),
            };
        }
        match self.shared.connected() {
            Ok(_) => BridgeHealth::Healthy,
            Err(error) => BridgeHealth::Unhealthy {
                reason: error.to_string(),
            },
        }
    }

    async fn emit(&self, mut message: Envelope) -> Result<(), BridgeError> {
        self.ensure_open()?;
        kit::check_emittable(&message)?;
        self.stamp(&mut message);
        let body = self.encode_checked(&message)?;
        let session = self.shared.connected()?;
        let verdict = session
            .publish(Outgoing {
                exchange: self.shared.topology.exchange(),
                routing_key: "",
                mandatory: false,
                body: &body,
                properties: publish::properties(&message, headers::project(&message)),
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
        let session = self.shared.connected()?;
        let (_pending, reply) = self.shared.inbox.wait_for(&correlation_id)?;
        let label: Arc<str> = receiver.to_string().into();
        let _in_flight = self.shared.tracker.start(WorkKind::Command, &label);
        let reply_queue = self.shared.topology.reply_queue();
        let waited = tokio::time::timeout_at(deadline, async {
            let out = Outgoing {
                exchange: self.shared.topology.exchange(),
                routing_key: "",
                mandatory: true,
                body: &body,
                properties: publish::command_properties(&command, &reply_queue, ttl_ms),
            };
            self.shared.publish_routed(session, out, &receiver).await?;
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
        let queue = self.shared.topology.command_queue(&address);
        topology::name(&queue)?;
        let label = endpoint_label(&address);
        self.register(Registration::new(
            &label,
            &queue,
            Kind::Command { address, handler },
        ))
        .await
    }

    async fn unregister_command(&self, address: &Address) -> Result<(), BridgeError> {
        if let Some(reg) = self
            .shared
            .registry
            .remove_command(&endpoint_label(address))
        {
            let deadline = deadline_after(self.shared.config.default_command_timeout);
            consume::stop(&self.shared, reg, deadline).await;
        }
        Ok(())
    }

    async fn register_subscription(
        &self,
        spec: SubscriptionSpec,
        handler: Arc<dyn DeliveryHandler>,
    ) -> Result<(), BridgeError> {
        let queue = self.shared.topology.subscription_queue(&spec);
        topology::name(&queue)?;
        if let Some(target) = &spec.policy.dead_letter_target {
            topology::name(&self.shared.topology.dead_letter_queue(target))?;
        }
        let key = spec.key.to_string();
        self.register(Registration::new(
            &key,
            &queue,
            Kind::Subscription {
                spec: Box::new(spec),
                handler,
            },
        ))
        .await
    }

    async fn unregister_subscription(&self, key: &RegistrationKey) -> Result<(), BridgeError> {
        if let Some(reg) = self.shared.registry.remove_subscription(key.as_str()) {
            let deadline = deadline_after(self.shared.config.default_command_timeout);
            consume::stop(&self.shared, reg, deadline).await;
        }
        Ok(())
    }

    /// Serves stream sessions for `address` from its stream queue (competing consumers: each
    /// session runs on one instance).
    async fn register_stream(
        &self,
        address: Address,
        handler: Arc<dyn StreamHandler>,
    ) -> Result<(), BridgeError> {
        let queue = self.shared.topology.stream_queue(&address);
        topology::name(&queue)?;
        let label = endpoint_label(&address);
        self.register(Registration::new(
            &label,
            &queue,
            Kind::Stream { address, handler },
        ))
        .await
    }

    async fn unregister_stream(&self, address: &Address) -> Result<(), BridgeError> {
        if let Some(reg) = self.shared.registry.remove_stream(&endpoint_label(address)) {
            let deadline = deadline_after(self.shared.config.default_command_timeout);
            consume::stop(&self.shared, reg, deadline).await;
        }
        Ok(())
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
        let stream_queue = self.shared.topology.stream_queue(&receiver);
        topology::name(&stream_queue)?;
        let session = self.shared.connected()?;
        let label: Arc<str> = endpoint_label(&receiver).into();
        let in_flight = self.shared.tracker.start(WorkKind::Stream, &label);
        let origin = streams::origin(&receiver, &self.shared.instance_id);
        let (end, watch) = self.shared.streams.open_consumer(
            &correlation_id,
            open.sender.clone(),
            origin,
            in_flight,
        )?;
        let reply_queue = self.shared.topology.reply_queue();
        // An open frame that waited in its queue longer than a default session (its servers
        // vanished without leaving) is not served after its reader most likely gave up.
        let ttl_ms = millis(self.shared.config.default_command_timeout).max(1);
        let properties = publish::properties(&open, headers::project(&open))
            .with_reply_to(reply_queue.as_str().into())
            .with_expiration(ttl_ms.to_string().into());
        let deadline = deadline_after(self.shared.config.default_command_timeout);
        let published = tokio::time::timeout_at(deadline, async {
            let out = Outgoing {
                exchange: "",
                routing_key: &stream_queue,
                mandatory: true,
                body: &body,
                properties,
            };
            self.shared.publish_routed(session, out, &receiver).await
        })
        .await
        .unwrap_or_else(|_| {
            Err(BridgeError::Timeout(millis(
                self.shared.config.default_command_timeout,
            )))
        });
        if let Err(error) = published {
            self.shared.streams.remove_consumer(&correlation_id);
            return Err(error);
        }
        let watcher = tokio::spawn(streams::watch_consumer(self.shared.clone(), watch));
        self.shared
            .streams
            .attach_watcher(&correlation_id, watcher.abort_handle());
        Ok(end)
    }

    fn in_flight(&self) -> InFlight {
        self.shared.tracker.snapshot()
    }

    fn counters(&self) -> BridgeCounters {
        BridgeCounters {
            reconnects: self.reconnects(),
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
