//! Consumers: one channel, one consumer loop and one *keeper* per registration.
//!
//! Every registration consumes its queue on its own channel with manual acks and a prefetch
//! (the broker never hands one instance more unacknowledged messages than that, which also
//! bounds how many handlers run at once). The loop hands each delivery on at once — commands
//! to `serve.rs`, stream open frames to `streams.rs`, subscription deliveries to their handler
//! here, settled through `settle.rs` — so it never waits for a handler.
//!
//! The keeper is the one task that changes the registration's consumer on the broker: it
//! takes [`ConsumerOp`]s (start, pause, resume, stop) in order and carries each out, every
//! broker call bounded by the bridge's `broker_timeout`. So a restore after a reconnect never
//! races a resume or a pause into two consumers, and nothing holds a lock while the broker is
//! asked: the supervisor and shutdown hand the keeper an op and wait for its answer at most
//! until their own deadline.
//!
//! Each delivery is checked against the poison watch (`suspects.rs`) first: a suspect (in hand
//! when a connection died) waits for its registration's turn and is handled alone; a delivery
//! in hand at two losses is quarantined without reaching its handler.
//!
//! A delivery that does not decode (not JSON, wrong field types, an unknown `messageType`, a
//! body over `max_payload_bytes`, which is refused by its size before any parsing) is poison:
//! counted (`poison_messages`), dead-lettered with the reason in a header where the
//! subscription has a dead-letter target, otherwise acked and dropped, each with a warning that
//! names the queue; the loop goes on.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use purista_core::envelope::now_ms;
use purista_core::kit::broker_call;
use purista_core::{
    BridgeError, DeadLetterNote, Delivery, DeliveryHandler, Envelope, MessageType, PausedConsumer,
    SettleOnce, Settlement, Settler, WorkKind,
};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::delivery::{Taken, requeue};
use crate::headers;
use crate::registry::{ConsumerOp, Kind, Registration};
use crate::serve;
use crate::session::Session;
use crate::settle::AmqpSettler;
use crate::shared::Shared;
use crate::streams;
use crate::suspects::{DeliveryId, Standing};
use crate::topology::{self, name};

/// Why a quarantined delivery never reaches its handler again.
pub(crate) const QUARANTINED: &str = "quarantined: the connection to the broker closed twice \
    while this message was being handled";

/// The broker-call deadline left before `deadline`.
pub(crate) fn within(timeout: Duration, deadline: Instant) -> Duration {
    timeout.min(deadline.saturating_duration_since(Instant::now()))
}

/// Runs the keeper of `reg` until it is stopped: carries out its consumer changes in order.
pub(crate) async fn keep(
    shared: Arc<Shared>,
    reg: Arc<Registration>,
    mut ops: mpsc::UnboundedReceiver<ConsumerOp>,
) {
    while let Some(op) = ops.recv().await {
        match op {
            ConsumerOp::Start { session, done } => {
                let started = start(&shared, &reg, &session).await;
                match done {
                    Some(done) => {
                        let _ = done.send(started);
                    }
                    None => {
                        if let Err(error) = started {
                            tracing::warn!(registration = %reg.label, %error, "starting a consumer failed");
                        }
                    }
                }
            }
            ConsumerOp::Pause { reason, done } => {
                pause(&shared, &reg, reason).await;
                let _ = done.send(());
            }
            ConsumerOp::Resume { done } => {
                let _ = done.send(resume(&shared, &reg).await);
            }
            ConsumerOp::Stop { deadline, done } => {
                retire(&shared, &reg, deadline).await;
                if let Some(done) = done {
                    let _ = done.send(());
                }
                // Whoever still waits on this keeper (a handler pausing its consumer) gets its
                // answer now, not after the cleanup that waits for that very handler.
                ops.close();
                while let Ok(op) = ops.try_recv() {
                    refuse(op);
                }
                clean_up(&shared, &reg, deadline).await;
                return;
            }
        }
    }
}

/// Answers an op that came after the registration stopped.
fn refuse(op: ConsumerOp) {
    match op {
        ConsumerOp::Start { done, .. } => {
            if let Some(done) = done {
                let _ = done.send(Ok(()));
            }
        }
        ConsumerOp::Pause { done, .. } => {
            let _ = done.send(());
        }
        ConsumerOp::Resume { done } => {
            let _ = done.send(Ok(false));
        }
        ConsumerOp::Stop { done, .. } => {
            if let Some(done) = done {
                let _ = done.send(());
            }
        }
    }
}

/// Starts `reg`'s consumer on `session`, declaring its queue and bindings first. Does nothing
/// when it is paused, removed, already consuming on this session, or `session` is no longer
/// the current one.
async fn start(
    shared: &Arc<Shared>,
    reg: &Arc<Registration>,
    session: &Arc<Session>,
) -> Result<(), BridgeError> {
    let current = shared.link.current().map(|s| s.generation);
    if current != Some(session.generation) {
        return Ok(());
    }
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
    let timeout = session.timeout;
    let channel = match reusable {
        Some(channel) => channel,
        None => {
            let channel = session.new_channel().await?;
            let prefetch = reg.prefetch(shared.config.command_prefetch);
            session
                .call("setting a prefetch", async {
                    channel
                        .basic_qos(prefetch, BasicQosOptions::default())
                        .await
                        .map_err(|e| topology::broker_error("setting prefetch for", &reg.queue, &e))
                })
                .await?;
            channel
        }
    };
    // Declared again on every start: a deleted or expired queue comes back, and the
    // declarations are idempotent.
    match &reg.kind {
        Kind::Command { address, .. } => {
            topology::declare_command_queue(&channel, &shared.topology, address, timeout).await?;
        }
        Kind::Stream { address, .. } => {
            topology::declare_stream_queue(&channel, &shared.topology, address, timeout).await?;
        }
        Kind::Subscription { spec, .. } => {
            topology::declare_subscription_queue(&channel, &shared.topology, spec, timeout).await?;
            if let Some(target) = &spec.policy.dead_letter_target {
                shared
                    .ledger
                    .record(&shared.topology.dead_letter_queue(target)?);
            }
        }
    }
    shared.ledger.record(&reg.queue);
    let consumer = session
        .call("starting a consumer", async {
            channel
                .basic_consume(
                    name(&reg.queue)?,
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| topology::broker_error("consuming", &reg.queue, &e))
        })
        .await?;
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
    if !shared.work.tasks.spawn(kind, reg.label.clone(), run) {
        cancel(reg, timeout).await;
        return Err(BridgeError::Unavailable("bridge shut down".into()));
    }
    tracing::debug!(registration = %reg.label, queue = %reg.queue, generation = session.generation, "consuming");
    Ok(())
}

/// Cancels `reg`'s consumer (if any) within `timeout`; its channel stays open for in-flight
/// settlements.
async fn cancel(reg: &Registration, timeout: Duration) {
    let (channel, tag) = {
        let mut state = reg.state.lock();
        (
            state.channel.as_ref().map(|(_, c)| c.clone()),
            state.tag.take(),
        )
    };
    let (Some(channel), Some(tag)) = (channel, tag) else {
        return;
    };
    if !channel.status().connected() {
        return;
    }
    let cancelled = broker_call(timeout, "cancelling a consumer", async {
        channel
            .basic_cancel(tag, BasicCancelOptions::default())
            .await
            .map_err(|e| topology::broker_error("cancelling the consumer of", &reg.queue, &e))
    })
    .await;
    if let Err(error) = cancelled {
        tracing::debug!(registration = %reg.label, %error, "cancelling consumer failed");
    }
}

/// Pauses a subscription consumer (`stop_consumer`): nothing is delivered to it until resumed.
async fn pause(shared: &Shared, reg: &Registration, reason: String) {
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
    cancel(reg, shared.config.broker_timeout).await;
    tracing::warn!(registration = %reg.label, %reason, "subscription consumer paused");
}

/// Resumes a paused consumer. `Ok(false)` when it was not paused.
async fn resume(shared: &Arc<Shared>, reg: &Arc<Registration>) -> Result<bool, BridgeError> {
    let Some(paused) = reg.state.lock().paused.take() else {
        return Ok(false);
    };
    // While disconnected the next restore starts it; otherwise start it now.
    if let Some(session) = shared.link.current()
        && let Err(error) = start(shared, reg, &session).await
    {
        reg.state.lock().paused = Some(paused);
        return Err(error);
    }
    tracing::info!(registration = %reg.label, "subscription consumer resumed");
    Ok(true)
}

/// Stops a registration for good: cancels its consumer and retires its queue when this
/// instance was the last to serve it (each bounded by `deadline`).
async fn retire(shared: &Shared, reg: &Registration, deadline: Instant) {
    let timeout = shared.config.broker_timeout;
    reg.state.lock().removed = true;
    cancel(reg, within(timeout, deadline)).await;
    if reg.is_endpoint()
        && let Some(session) = shared.link.current()
    {
        topology::retire_command_queue(&session.connection, &reg.queue, within(timeout, deadline))
            .await;
    }
    reg.retired.send_replace(true);
}

/// Once a stopped registration's running handlers have settled (or `deadline` passed), closes
/// its channel and deletes a per-instance queue.
async fn clean_up(shared: &Shared, reg: &Registration, deadline: Instant) {
    let timeout = shared.config.broker_timeout;
    if !reg.activity.wait_idle(deadline).await {
        tracing::warn!(registration = %reg.label, "handlers still running when their channel closes");
    }
    let delete_queue = reg.spec().is_some_and(|s| !s.shared && !s.durable);
    let channel = reg.state.lock().channel.take();
    let Some((_, channel)) = channel else { return };
    if !channel.status().connected() {
        return;
    }
    let closed = broker_call(within(timeout, deadline), "closing a channel", async {
        if delete_queue
            && let Err(error) = channel
                .queue_delete(name(&reg.queue)?, QueueDeleteOptions::default())
                .await
        {
            tracing::debug!(queue = %reg.queue, %error, "deleting the instance queue failed");
        }
        let _ = channel.close(200, "OK".into()).await;
        Ok(())
    })
    .await;
    if let Err(error) = closed {
        tracing::debug!(registration = %reg.label, %error, "closing a registration's channel");
    }
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
        let id = DeliveryId::of(&reg.queue, &delivery.properties, &delivery.data);
        let standing = shared.suspects.standing(&id);
        // A suspect counts as in hand only once it has its turn (`Taken::turn`): waiting for
        // it, it cannot be what brings the connection down.
        let held =
            (standing != Standing::Suspect).then(|| shared.suspects.hold(generation, id.clone()));
        if shared.work.is_closing() || reg.refuses_deliveries() {
            // Paused, unregistered or shutting down, and the cancel is still on its way: hand
            // the message back (another instance, or the resumed consumer, gets it).
            match reg.kind {
                Kind::Command { .. } => serve::hand_back_command(&shared, &reg, delivery).await,
                // An open frame is served whether redelivered or not (it is acked before its
                // handler runs), so a plain requeue hands it to another instance.
                Kind::Stream { .. } | Kind::Subscription { .. } => {
                    requeue(&delivery.acker).await;
                }
            }
            continue;
        }
        let taken = Taken {
            delivery,
            id,
            held,
            generation,
        };
        if let Standing::Quarantined { losses } = standing {
            quarantine(&shared, &reg, taken, losses);
            continue;
        }
        match &reg.kind {
            Kind::Command { handler, .. } => {
                serve::serve_command(&shared, &reg, handler.clone(), taken);
            }
            Kind::Stream { handler, .. } => {
                streams::serve_open(&shared, &reg, handler.clone(), taken);
            }
            Kind::Subscription { handler, .. } => {
                deliver(&shared, &reg, handler.clone(), taken);
            }
        }
    }
    tracing::debug!(registration = %reg.label, generation, "consumer stopped");
}

/// Keeps a delivery that was in hand at `losses` connection losses from its handler: a
/// subscription's goes to its dead-letter target with the reason (or is dropped), a command or
/// open frame is dropped; each with a warning, counted as poison. After a third loss (the
/// quarantine itself closed the connection) it is only acked away.
fn quarantine(shared: &Arc<Shared>, reg: &Arc<Registration>, taken: Taken, losses: u32) {
    shared.ledger.count_poison();
    let target = reg.spec().and_then(|s| s.policy.dead_letter_target.clone());
    let message_id = taken
        .delivery
        .properties
        .message_id()
        .as_ref()
        .map(|id| id.to_string())
        .unwrap_or_default();
    let settlement = match target {
        Some(target) if losses < 3 => {
            tracing::warn!(registration = %reg.label, queue = %reg.queue, %message_id, losses, "delivery quarantined and dead-lettered: the connection closed twice while it was in hand");
            Settlement::DeadLetter(DeadLetterNote {
                target,
                reason: QUARANTINED.into(),
                attempts: headers::attempt(taken.delivery.properties.headers().as_ref()),
                origin: reg.label.to_string(),
            })
        }
        _ => {
            tracing::warn!(registration = %reg.label, queue = %reg.queue, %message_id, losses, "delivery quarantined and dropped: the connection closed while it was in hand, again and again");
            Settlement::Drop {
                reason: QUARANTINED.into(),
            }
        }
    };
    let settler = AmqpSettler::new(shared, reg, taken, None);
    let label = reg.label.clone();
    let run = async move {
        if let Err(error) = Box::new(settler).settle(settlement).await {
            tracing::debug!(registration = %label, %error, "settling a quarantined delivery failed");
        }
    };
    shared
        .work
        .tasks
        .spawn(WorkKind::Generic, reg.label.clone(), run);
}

/// Hands one subscription delivery to its handler in a task.
fn deliver(
    shared: &Arc<Shared>,
    reg: &Arc<Registration>,
    handler: Arc<dyn DeliveryHandler>,
    taken: Taken,
) {
    let decoded =
        Envelope::decode_with_limit(&taken.delivery.data, shared.config.max_payload_bytes);
    let envelope = match decoded {
        Ok(envelope) => envelope,
        Err(error) => {
            shared.ledger.count_poison();
            let bytes = taken.delivery.data.len();
            let attempt = headers::attempt(taken.delivery.properties.headers().as_ref());
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
            let settler = AmqpSettler::new(shared, reg, taken, None);
            let label = reg.label.clone();
            let run = async move {
                if let Err(error) = Box::new(settler).settle(settlement).await {
                    tracing::warn!(registration = %label, %error, "settling an undecodable message failed");
                }
            };
            shared
                .work
                .tasks
                .spawn(WorkKind::Subscription, reg.label.clone(), run);
            return;
        }
    };
    if envelope.message_type == MessageType::Stream {
        // Stream frames are point to point: no subscription filter matches them (core's
        // matcher), but a binding without a `messageType` cannot exclude them. Settle unseen.
        tracing::debug!(registration = %reg.label, message_id = %envelope.id, "stream frame on a subscription queue ignored");
        let settler = AmqpSettler::new(shared, reg, taken, None);
        let label = reg.label.clone();
        let run = async move {
            if let Err(error) = Box::new(settler).settle(Settlement::Ack).await {
                tracing::debug!(registration = %label, %error, "settling an ignored stream frame failed");
            }
        };
        shared
            .work
            .tasks
            .spawn(WorkKind::Subscription, reg.label.clone(), run);
        return;
    }
    let active = reg.activity.enter();
    let (task_shared, task_reg) = (shared.clone(), reg.clone());
    let run = async move {
        let _active = active;
        let mut taken = taken;
        let turn = taken.turn(&task_shared, &task_reg).await;
        let attempt = headers::attempt(taken.delivery.properties.headers().as_ref());
        let message_id = envelope.id.clone();
        let settler = AmqpSettler::new(&task_shared, &task_reg, taken, turn);
        let delivery = Delivery {
            envelope: Arc::new(envelope),
            attempt,
            settle: SettleOnce::new(message_id, Box::new(settler)),
        };
        handler.deliver(delivery).await;
    };
    if !shared
        .work
        .tasks
        .spawn(WorkKind::Subscription, reg.label.clone(), run)
    {
        tracing::debug!(registration = %reg.label, "bridge shut down: delivery left to the broker");
    }
}

/// Starts the keeper of a new registration. `false` when the bridge is shutting down.
pub(crate) fn start_keeper(
    shared: &Arc<Shared>,
    reg: &Arc<Registration>,
    ops: mpsc::UnboundedReceiver<ConsumerOp>,
) -> bool {
    let keeper = keep(shared.clone(), reg.clone(), ops);
    shared
        .work
        .tasks
        .spawn(WorkKind::Generic, reg.label.clone(), keeper)
}
