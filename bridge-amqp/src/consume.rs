//! Consumers: one channel and one consumer loop per registration, and the settlements of what
//! they deliver.
//!
//! Every registration consumes its queue on its own channel with manual acks and a prefetch
//! (the broker never hands one instance more unacknowledged messages than that, which also
//! bounds how many handlers run at once). The loop decodes each delivery and runs the handler
//! in a task. A delivery that does not decode (not JSON, wrong field types, an unknown
//! `messageType`, a body over `max_payload_bytes`, which is refused by its size before any
//! parsing), or a valid envelope that is not a command on a command queue, is poison: it is
//! counted (`poison_messages`), dead-lettered with the reason in a header where the
//! subscription has a dead-letter target, otherwise acked and dropped, each with a warning that
//! names the queue; the loop goes on. Commands have no dead-letter target: poison there is
//! always dropped. A stream queue's deliveries are open frames: each is acked at once and its
//! session runs in a task of its own (`streams.rs`), so the prefetch does not bound sessions.
//!
//! Settlements are translated, not decided (core's failure policy decides):
//!
//! | settlement | on the broker |
//! |---|---|
//! | ack, drop | `basic.ack` |
//! | redeliver, no delay | republish to the queue with `x-purista-attempt` + 1, then ack |
//! | redeliver after a delay | republish to `<queue>.retry.<ms>` (message TTL = delay, dead-letters back to the queue), then ack |
//! | dead letter | publish to `P.<target>.dead-letter` with reason, attempts, origin and source-queue headers, then ack |
//! | pause | cancel the consumer, then `basic.nack` with requeue: the message waits in the queue |
//!
//! A republish is confirmed before the original is acked, so a crash in between duplicates
//! rather than loses. Nothing is ever requeued to a running consumer of the same queue, so there
//! is no hot redelivery loop.
//!
//! Commands are served at most once: a command the broker redelivers (its first consumer went
//! away mid-handling) is answered with 503 instead of being run a second time, and a command
//! whose ttl passed while it waited in the client's prefetch buffer is dropped unserved. A
//! command that reaches an instance after it began to unregister is not requeued (that would
//! mark it redelivered) but handed back as a fresh copy with the rest of its ttl.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
    BasicQosOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Acker, BasicProperties, Channel};
use purista_core::envelope::now_ms;
use purista_core::{
    BridgeError, CommandHandler, DeadLetterEntry, DeadLetterNote, Delivery, DeliveryHandler,
    Envelope, ErrorPayload, MessageType, PausedConsumer, SettleOnce, Settlement, Settler,
    StatusCode, WorkKind, ids,
};

use crate::bridge::Shared;
use crate::headers;
use crate::publish::{self, Outgoing, Verdict};
use crate::reconnect::Session;
use crate::registry::{Kind, Registration};
use crate::streams;
use crate::topology::{self, millis, name};

/// Starts `reg`'s consumer on `session`, declaring its queue and bindings first. Does nothing
/// when it is paused, removed or already consuming on this session. Caller holds the topology
/// lock.
pub(crate) async fn start_locked(
    shared: &Arc<Shared>,
    reg: &Arc<Registration>,
    session: &Arc<Session>,
) -> Result<(), BridgeError> {
    let reusable = {
        let state = reg.state.lock();
        if state.removed || state.paused.is_some() {
            return Ok(());
        }
        match &state.channel {
            Some((generation, channel))
                if *generation == session.generation && channel.status().connected() =>
            {
                if state.tag.is_some() {
                    return Ok(());
                }
                Some(channel.clone())
            }
            _ => None,
        }
    };
    let channel = match reusable {
        Some(channel) => channel,
        None => {
            let channel =
                session.connection.create_channel().await.map_err(|e| {
                    BridgeError::Unavailable(format!("opening a channel failed: {e}"))
                })?;
            channel
                .basic_qos(
                    reg.prefetch(shared.config.command_prefetch),
                    BasicQosOptions::default(),
                )
                .await
                .map_err(|e| topology::broker_error("setting prefetch for", &reg.queue, &e))?;
            channel
        }
    };
    // Declared again on every start: a deleted or expired queue comes back, and the
    // declarations are idempotent.
    match &reg.kind {
        Kind::Command { address, .. } => {
            topology::declare_command_queue(&channel, &shared.topology, address).await?;
        }
        Kind::Stream { address, .. } => {
            topology::declare_stream_queue(&channel, &shared.topology, address).await?;
        }
        Kind::Subscription { spec, .. } => {
            topology::declare_subscription_queue(&channel, &shared.topology, spec).await?;
            if let Some(target) = &spec.policy.dead_letter_target {
                shared.record(&shared.topology.dead_letter_queue(target));
            }
        }
    }
    shared.record(&reg.queue);
    let consumer = channel
        .basic_consume(
            name(&reg.queue)?,
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| topology::broker_error("consuming", &reg.queue, &e))?;
    {
        let mut state = reg.state.lock();
        state.channel = Some((session.generation, channel.clone()));
        state.tag = Some(consumer.tag());
    }
    let run = run_consumer(shared.clone(), reg.clone(), consumer, session.generation);
    let kind = match reg.kind {
        Kind::Command { .. } => WorkKind::Command,
        Kind::Stream { .. } => WorkKind::Stream,
        Kind::Subscription { .. } => WorkKind::Subscription,
    };
    if !shared.tasks.spawn(kind, reg.label.clone(), run) {
        cancel_locked(reg).await;
        return Err(BridgeError::Unavailable("bridge shut down".into()));
    }
    tracing::debug!(registration = %reg.label, queue = %reg.queue, generation = session.generation, "consuming");
    Ok(())
}

/// Cancels `reg`'s consumer (if any); its channel stays open for in-flight settlements.
/// Caller holds the topology lock.
pub(crate) async fn cancel_locked(reg: &Registration) {
    let (channel, tag) = {
        let mut state = reg.state.lock();
        (
            state.channel.as_ref().map(|(_, c)| c.clone()),
            state.tag.take(),
        )
    };
    if let (Some(channel), Some(tag)) = (channel, tag)
        && channel.status().connected()
        && let Err(error) = channel
            .basic_cancel(tag, BasicCancelOptions::default())
            .await
    {
        tracing::debug!(registration = %reg.label, %error, "cancelling consumer failed");
    }
}

/// Pauses a subscription consumer (`stop_consumer`): nothing is delivered to it until resumed.
pub(crate) async fn pause(shared: &Arc<Shared>, reg: &Registration, reason: String) {
    let _topology = shared.topology_lock.lock().await;
    {
        let mut state = reg.state.lock();
        if state.paused.is_some() || state.removed {
            return;
        }
        state.paused = Some(PausedConsumer {
            key: reg.label.as_ref().into(),
            reason: reason.clone(),
            paused_at: now_ms(),
        });
    }
    cancel_locked(reg).await;
    tracing::warn!(registration = %reg.label, %reason, "subscription consumer paused");
}

/// Resumes a paused consumer. `Ok(false)` when it was not paused.
pub(crate) async fn resume(
    shared: &Arc<Shared>,
    reg: &Arc<Registration>,
) -> Result<bool, BridgeError> {
    let _topology = shared.topology_lock.lock().await;
    let Some(paused) = reg.state.lock().paused.take() else {
        return Ok(false);
    };
    // While disconnected the next restore starts it; otherwise start it now.
    if let Some(session) = shared.current()
        && let Err(error) = start_locked(shared, reg, &session).await
    {
        reg.state.lock().paused = Some(paused);
        return Err(error);
    }
    tracing::info!(registration = %reg.label, "subscription consumer resumed");
    Ok(true)
}

/// Stops a registration for good: cancels its consumer now, and once its running handlers have
/// settled (or `deadline` passed) closes its channel and deletes a per-instance queue.
pub(crate) async fn stop(
    shared: &Arc<Shared>,
    reg: Arc<Registration>,
    deadline: tokio::time::Instant,
) {
    {
        let _topology = shared.topology_lock.lock().await;
        reg.state.lock().removed = true;
        cancel_locked(&reg).await;
        if reg.is_endpoint()
            && let Some(session) = shared.current()
        {
            topology::retire_command_queue(&session.connection, &reg.queue).await;
        }
        reg.retired.send_replace(true);
    }
    let delete_queue = reg.spec().is_some_and(|s| !s.shared && !s.durable);
    let label = reg.label.clone();
    let cleanup = async move {
        if !reg.activity.wait_idle(deadline).await {
            tracing::warn!(registration = %reg.label, "handlers still running when their channel closes");
        }
        let channel = reg.state.lock().channel.take();
        if let Some((_, channel)) = channel
            && channel.status().connected()
        {
            if delete_queue
                && let Err(error) = channel
                    .queue_delete(name_or_skip(&reg.queue), QueueDeleteOptions::default())
                    .await
            {
                tracing::debug!(queue = %reg.queue, %error, "deleting the instance queue failed");
            }
            let _ = channel.close(200, "OK".into()).await;
        }
    };
    if !shared.tasks.spawn(WorkKind::Generic, label, cleanup) {
        tracing::debug!("bridge shut down: registration cleanup skipped");
    }
}

fn name_or_skip(queue: &str) -> lapin::types::ShortString {
    // The queue was declared under this name, so it fits.
    lapin::types::ShortString::try_new(queue).unwrap_or_default()
}

/// The consumer loop of one registration on one connection generation.
async fn run_consumer(
    shared: Arc<Shared>,
    reg: Arc<Registration>,
    mut consumer: lapin::Consumer,
    generation: u64,
) {
    // The loop counts as activity: the registration's channel must outlive what the loop
    // still hands back after a cancel.
    let _active = reg.activity.enter();
    while let Some(next) = consumer.next().await {
        let delivery = match next {
            Ok(delivery) => delivery,
            Err(error) => {
                tracing::debug!(registration = %reg.label, %error, "consumer ended with an error");
                break;
            }
        };
        if shared.closing.load(Ordering::Acquire) || reg.refuses_deliveries() {
            // Paused, unregistered or shutting down, and the cancel is still on its way: hand
            // the message back (another instance, or the resumed consumer, gets it).
            match reg.kind {
                Kind::Command { .. } => hand_back_command(&shared, &reg, delivery).await,
                // An open frame is served whether redelivered or not (it is acked before its
                // handler runs), so a plain requeue hands it to another instance.
                Kind::Stream { .. } | Kind::Subscription { .. } => {
                    requeue(&delivery.acker).await;
                }
            }
            continue;
        }
        match &reg.kind {
            Kind::Command { handler, .. } => {
                serve_command(&shared, &reg, handler.clone(), delivery);
            }
            Kind::Stream { handler, .. } => {
                streams::serve_open(&shared, &reg, handler.clone(), delivery);
            }
            Kind::Subscription { handler, .. } => {
                deliver(&shared, &reg, handler.clone(), delivery, generation);
            }
        }
    }
    tracing::debug!(registration = %reg.label, generation, "consumer stopped");
}

async fn requeue(acker: &Acker) {
    let options = BasicNackOptions {
        requeue: true,
        ..BasicNackOptions::default()
    };
    if let Err(error) = acker.nack(options).await {
        tracing::debug!(%error, "handing a delivery back failed; the broker requeues it when the channel closes");
    }
}

async fn ack(acker: &Acker) -> Result<(), BridgeError> {
    acker
        .ack(BasicAckOptions::default())
        .await
        .map(|_| ())
        .map_err(|e| BridgeError::Unavailable(format!("ack failed: {e}")))
}

/// Decodes a delivery of a command queue. Anything but a command is poison: counted and
/// warned about here; the caller acks (drops) it.
fn decode_command(shared: &Shared, reg: &Registration, data: &[u8]) -> Option<Envelope> {
    match Envelope::decode_with_limit(data, shared.config.max_payload_bytes) {
        Ok(command) if command.message_type == MessageType::Command => Some(command),
        Ok(other) => {
            shared.count_poison();
            tracing::warn!(registration = %reg.label, queue = %reg.queue, message_id = %other.id, message_type = %other.message_type, "non-command on a command queue dropped");
            None
        }
        Err(error) => {
            shared.count_poison();
            tracing::warn!(registration = %reg.label, queue = %reg.queue, %error, bytes = data.len(), "undecodable command dropped");
            None
        }
    }
}

/// True when the command's ttl (the AMQP expiration its caller set) has passed.
fn expired(command: &Envelope, properties: &BasicProperties) -> bool {
    let ttl = properties
        .expiration()
        .as_ref()
        .and_then(|e| e.as_str().parse::<u64>().ok());
    ttl.is_some_and(|ttl| command.timestamp.saturating_add(ttl) < now_ms())
}

/// Runs one command delivery in a task: handler, response, ack.
fn serve_command(
    shared: &Arc<Shared>,
    reg: &Arc<Registration>,
    handler: Arc<dyn CommandHandler>,
    delivery: lapin::message::Delivery,
) {
    let shared_task = shared.clone();
    let reg_task = reg.clone();
    // Counted from now, not from when the task first runs: an unregister must not close the
    // channel under a command that is about to be served.
    let active = reg.activity.enter();
    let run = async move {
        let (shared, reg) = (shared_task, reg_task);
        let _active = active;
        let lapin::message::Delivery {
            data,
            properties,
            acker,
            redelivered,
            ..
        } = delivery;
        let Some(command) = decode_command(&shared, &reg, &data) else {
            let _ = ack(&acker).await;
            return;
        };
        if expired(&command, &properties) {
            tracing::debug!(registration = %reg.label, correlation_id = command.correlation_id.as_deref().unwrap_or(""), "command expired before it was served; dropped");
            let _ = ack(&acker).await;
            return;
        }
        let command = Arc::new(command);
        let response = if redelivered {
            tracing::warn!(
                registration = %reg.label,
                correlation_id = command.correlation_id.as_deref().unwrap_or(""),
                "redelivered command answered with 503: the instance that took it went away, and commands are not retried"
            );
            unhandled(&command, StatusCode::SERVICE_UNAVAILABLE)
        } else {
            match AssertUnwindSafe(handler.handle(command.clone()))
                .catch_unwind()
                .await
            {
                Ok(response) => response,
                Err(_) => {
                    tracing::error!(registration = %reg.label, correlation_id = command.correlation_id.as_deref().unwrap_or(""), "command handler panicked; answering 500");
                    unhandled(&command, StatusCode::INTERNAL_SERVER_ERROR)
                }
            }
        };
        respond(&shared, &reg, &command, response, &properties).await;
        if let Err(error) = ack(&acker).await {
            tracing::debug!(registration = %reg.label, %error, "acking a served command failed");
        }
    };
    if !shared
        .tasks
        .spawn(WorkKind::Command, reg.label.clone(), run)
    {
        tracing::debug!(registration = %reg.label, "bridge shut down: command left to the broker");
    }
}

/// Stamps a command's response as this instance's and publishes it to the caller.
async fn respond(
    shared: &Shared,
    reg: &Registration,
    command: &Envelope,
    mut response: Envelope,
    properties: &BasicProperties,
) {
    response.id = ids::new_id();
    response.timestamp = now_ms();
    response.sender.instance_id.clone_from(&shared.instance_id);
    if response.correlation_id.is_none() {
        response.correlation_id = command.correlation_id.clone();
    }
    if response.receiver.is_none() {
        response.receiver = Some(command.sender.to_address());
    }
    let reply_to = properties.reply_to().as_ref().map(|r| r.to_string());
    if let Err(error) = shared
        .publish_response(&response, reply_to.as_deref())
        .await
    {
        tracing::warn!(registration = %reg.label, correlation_id = response.correlation_id.as_deref().unwrap_or(""), %error, "response could not be published");
    }
}

/// How long a hand-back waits for the unregister or shutdown to deal with the queue.
const RETIRE_WAIT: Duration = Duration::from_secs(5);

/// Returns a command this instance took but never started (it is unregistering or shutting
/// down) to its queue for another instance.
///
/// A plain requeue would mark it redelivered, and the next instance would refuse it as
/// possibly run before; a fresh copy with the rest of its ttl is served normally. When no
/// instance is left (the last one deletes the queue on its way out), the caller is answered
/// with 503 at once.
async fn hand_back_command(
    shared: &Arc<Shared>,
    reg: &Registration,
    delivery: lapin::message::Delivery,
) {
    let lapin::message::Delivery {
        data,
        properties,
        acker,
        ..
    } = delivery;
    let Some(command) = decode_command(shared, reg, &data) else {
        let _ = ack(&acker).await;
        return;
    };
    // Hand it back only once the queue's fate is settled: published before the last server
    // deleted the queue, it would go down with it and its caller would wait for the ttl.
    let mut retired = reg.retired.subscribe();
    if tokio::time::timeout(RETIRE_WAIT, retired.wait_for(|done| *done))
        .await
        .is_err()
    {
        tracing::debug!(registration = %reg.label, "queue retirement still running; handing the command back anyway");
    }
    let ttl = properties
        .expiration()
        .as_ref()
        .and_then(|e| e.as_str().parse::<u64>().ok());
    let remaining = ttl.map(|ttl| {
        command
            .timestamp
            .saturating_add(ttl)
            .saturating_sub(now_ms())
    });
    if remaining == Some(0) {
        let _ = ack(&acker).await;
        return;
    }
    let Some(session) = shared.current() else {
        requeue(&acker).await;
        return;
    };
    let mut copy = publish::republish_properties(
        &properties,
        properties.headers().clone().unwrap_or_default(),
    );
    if let Some(remaining) = remaining {
        copy = copy.with_expiration(remaining.to_string().into());
    }
    let verdict = session
        .publish(Outgoing {
            exchange: "",
            routing_key: &reg.queue,
            mandatory: true,
            body: &data,
            properties: copy,
        })
        .await;
    match verdict {
        Ok(Verdict::Confirmed) => {
            tracing::debug!(registration = %reg.label, correlation_id = command.correlation_id.as_deref().unwrap_or(""), "command handed back to its queue");
        }
        Ok(Verdict::Returned { .. }) => {
            tracing::debug!(registration = %reg.label, correlation_id = command.correlation_id.as_deref().unwrap_or(""), "no instance left for a handed-back command; answering 503");
            let response = unhandled(&command, StatusCode::SERVICE_UNAVAILABLE);
            respond(shared, reg, &command, response, &properties).await;
        }
        Ok(Verdict::Nacked) | Err(_) => {
            requeue(&acker).await;
            return;
        }
    }
    let _ = ack(&acker).await;
}

fn unhandled(command: &Envelope, status: StatusCode) -> Envelope {
    let payload = ErrorPayload {
        status,
        message: status.generic_text().to_string(),
        data: None,
        trace_id: command.trace_id.clone(),
    };
    command.error_response(&payload, false)
}

/// Hands one subscription delivery to its handler in a task.
fn deliver(
    shared: &Arc<Shared>,
    reg: &Arc<Registration>,
    handler: Arc<dyn DeliveryHandler>,
    delivery: lapin::message::Delivery,
    generation: u64,
) {
    let lapin::message::Delivery {
        data,
        properties,
        acker,
        ..
    } = delivery;
    let attempt = headers::attempt(properties.headers().as_ref());
    let envelope = match Envelope::decode_with_limit(&data, shared.config.max_payload_bytes) {
        Ok(envelope) => envelope,
        Err(error) => {
            shared.count_poison();
            let bytes = data.len();
            let settler = AmqpSettler {
                shared: shared.clone(),
                reg: reg.clone(),
                acker,
                generation,
                properties,
                body: data,
                attempt,
            };
            let target = reg.spec().and_then(|s| s.policy.dead_letter_target.clone());
            let settlement = match target {
                Some(target) => {
                    tracing::warn!(registration = %reg.label, queue = %reg.queue, %error, bytes, "undecodable message dead-lettered");
                    Settlement::DeadLetter(DeadLetterNote {
                        target,
                        reason: format!("undecodable message: {error}"),
                        attempts: attempt,
                        origin: reg.label.to_string(),
                    })
                }
                None => {
                    tracing::warn!(registration = %reg.label, queue = %reg.queue, %error, bytes, "undecodable message dropped (no dead-letter target)");
                    Settlement::Drop {
                        reason: format!("undecodable message: {error}"),
                    }
                }
            };
            let label = reg.label.clone();
            let run = async move {
                if let Err(error) = Box::new(settler).settle(settlement).await {
                    tracing::warn!(registration = %label, %error, "settling an undecodable message failed");
                }
            };
            shared
                .tasks
                .spawn(WorkKind::Subscription, reg.label.clone(), run);
            return;
        }
    };
    let message_id = envelope.id.clone();
    let settler = AmqpSettler {
        shared: shared.clone(),
        reg: reg.clone(),
        acker,
        generation,
        properties,
        body: data,
        attempt,
    };
    if envelope.message_type == MessageType::Stream {
        // Stream frames are point to point: no subscription filter matches them (core's
        // matcher), but a binding without a `messageType` cannot exclude them. Settle unseen.
        tracing::debug!(registration = %reg.label, %message_id, "stream frame on a subscription queue ignored");
        let label = reg.label.clone();
        let run = async move {
            if let Err(error) = Box::new(settler).settle(Settlement::Ack).await {
                tracing::debug!(registration = %label, %error, "settling an ignored stream frame failed");
            }
        };
        shared
            .tasks
            .spawn(WorkKind::Subscription, reg.label.clone(), run);
        return;
    }
    let delivery = Delivery {
        envelope: Arc::new(envelope),
        attempt,
        settle: SettleOnce::new(message_id, Box::new(settler)),
    };
    let active = reg.activity.enter();
    let run = async move {
        let _active = active;
        handler.deliver(delivery).await;
    };
    if !shared
        .tasks
        .spawn(WorkKind::Subscription, reg.label.clone(), run)
    {
        tracing::debug!(registration = %reg.label, "bridge shut down: delivery left to the broker");
    }
}

/// Carries out one subscription delivery's settlement on the broker.
struct AmqpSettler {
    shared: Arc<Shared>,
    reg: Arc<Registration>,
    acker: Acker,
    /// The connection generation the delivery arrived on; its acker only works there.
    generation: u64,
    properties: BasicProperties,
    body: Vec<u8>,
    attempt: u32,
}

impl AmqpSettler {
    /// The session the delivery arrived on, if it is still the live one.
    fn session(&self) -> Result<Arc<Session>, BridgeError> {
        self.shared
            .current()
            .filter(|s| s.generation == self.generation && s.is_live())
            .ok_or_else(|| {
                BridgeError::Unavailable(
                    "the connection this message arrived on is gone; the broker redelivers it"
                        .into(),
                )
            })
    }

    /// Republishes the delivery through the default exchange to `queue` with `table` as headers.
    async fn republish(
        &self,
        session: &Session,
        queue: &str,
        table: FieldTable,
    ) -> Result<(), BridgeError> {
        let verdict = session
            .publish(Outgoing {
                exchange: "",
                routing_key: queue,
                mandatory: true,
                body: &self.body,
                properties: publish::republish_properties(&self.properties, table),
            })
            .await?;
        match verdict {
            Verdict::Confirmed => Ok(()),
            Verdict::Returned { code, text } => Err(BridgeError::Broker(format!(
                "queue `{queue}` does not exist ({code} {text})"
            ))),
            Verdict::Nacked => Err(BridgeError::Broker(format!(
                "the broker refused the message for `{queue}`"
            ))),
        }
    }

    fn headers(&self) -> FieldTable {
        self.properties.headers().clone().unwrap_or_default()
    }

    async fn redeliver(&self, delay: Duration, next_attempt: u32) -> Result<(), BridgeError> {
        let session = self.session()?;
        let mut table = self.headers();
        headers::set_u64(&mut table, headers::ATTEMPT, u64::from(next_attempt));
        let target = if delay.is_zero() {
            self.reg.queue.to_string()
        } else {
            let channel = session.admin_channel().await?;
            let retry = topology::declare_retry_queue(
                &channel,
                &self.shared.topology,
                &self.reg.queue,
                delay,
            )
            .await?;
            self.shared.record(&retry);
            retry
        };
        self.republish(&session, &target, table).await?;
        tracing::debug!(registration = %self.reg.label, next_attempt, delay_ms = millis(delay), queue = %target, "redelivery scheduled");
        ack(&self.acker).await
    }

    async fn dead_letter(&self, note: DeadLetterNote) -> Result<(), BridgeError> {
        let session = self.session()?;
        let channel = session.admin_channel().await?;
        let queue =
            topology::declare_dead_letter_queue(&channel, &self.shared.topology, &note.target)
                .await?;
        self.shared.record(&queue);
        let mut table = self.headers();
        headers::set_str(&mut table, headers::DEAD_LETTER_REASON, &note.reason);
        headers::set_u64(
            &mut table,
            headers::DEAD_LETTER_ATTEMPTS,
            u64::from(note.attempts),
        );
        headers::set_str(&mut table, headers::DEAD_LETTER_ORIGIN, &note.origin);
        headers::set_u64(&mut table, headers::DEAD_LETTERED_AT, now_ms());
        // Where a replay sends it back to (`replay.rs`).
        headers::set_str(&mut table, headers::DEAD_LETTER_QUEUE, &self.reg.queue);
        self.republish(&session, &queue, table).await?;
        ack(&self.acker).await
    }
}

#[async_trait]
impl Settler for AmqpSettler {
    async fn settle(self: Box<Self>, settlement: Settlement) -> Result<(), BridgeError> {
        match settlement {
            Settlement::Ack | Settlement::Drop { .. } => {
                self.session()?;
                ack(&self.acker).await
            }
            Settlement::Redeliver {
                delay,
                next_attempt,
            } => self.redeliver(delay, next_attempt).await,
            Settlement::DeadLetter(note) => self.dead_letter(note).await,
            Settlement::Pause { reason } => {
                // Cancel first, then hand the message back: requeued before the cancel, it
                // could come straight back to this very consumer.
                pause(&self.shared, &self.reg, reason).await;
                self.session()?;
                requeue(&self.acker).await;
                tracing::debug!(registration = %self.reg.label, attempt = self.attempt, "paused delivery returned to its queue");
                Ok(())
            }
        }
    }
}

/// Reads up to `limit` messages of a dead-letter queue without removing them: they are fetched
/// unacknowledged and go back to the queue, in order, when the channel closes.
pub(crate) async fn peek_dead_letters(
    session: &Session,
    queue: &str,
    target: &str,
    limit: usize,
    max_bytes: usize,
) -> Result<Vec<DeadLetterEntry>, BridgeError> {
    let channel: Channel = session
        .connection
        .create_channel()
        .await
        .map_err(|e| BridgeError::Unavailable(format!("opening a channel failed: {e}")))?;
    let exists = channel
        .queue_declare(
            name(queue)?,
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .is_ok();
    let mut entries = Vec::new();
    if exists {
        while entries.len() < limit {
            let message = channel
                .basic_get(name(queue)?, BasicGetOptions::default())
                .await
                .map_err(|e| topology::broker_error("reading", queue, &e))?;
            let Some(message) = message else { break };
            let delivery = message.delivery;
            let table = delivery.properties.headers().as_ref();
            let note = DeadLetterNote {
                target: target.to_string(),
                reason: headers::get_str(table, headers::DEAD_LETTER_REASON)
                    .unwrap_or("")
                    .to_string(),
                attempts: headers::get_u64(table, headers::DEAD_LETTER_ATTEMPTS)
                    .and_then(|v| u32::try_from(v).ok())
                    .unwrap_or(0),
                origin: headers::get_str(table, headers::DEAD_LETTER_ORIGIN)
                    .unwrap_or("")
                    .to_string(),
            };
            let dead_lettered_at = headers::get_u64(table, headers::DEAD_LETTERED_AT).unwrap_or(0);
            let (envelope, raw) = match Envelope::decode_with_limit(&delivery.data, max_bytes) {
                Ok(envelope) => (Some(envelope), None),
                Err(_) => (None, Some(delivery.data.clone())),
            };
            entries.push(DeadLetterEntry {
                note,
                envelope,
                raw,
                dead_lettered_at,
            });
        }
    }
    // Closing the channel returns every fetched message to the queue.
    if channel.status().connected() {
        let _ = channel.close(200, "OK".into()).await;
    }
    Ok(entries)
}
