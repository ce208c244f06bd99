//! Durable subscriptions: one KubeMQ queue per subscription, filled by the publishers.
//!
//! KubeMQ Events keep nothing, and Events Store keeps a log but no acknowledgement: a
//! consumer that resumes from "the last acknowledged sequence" has to keep that position
//! itself, and the members of a shared subscription (an Events Store group) would each have
//! to agree on one position for a log they read different parts of. KubeMQ queues keep the
//! acknowledgement per message instead — a leased message is invisible to the other
//! consumers, an acknowledged one is gone, one whose consumer went away comes back — which is
//! exactly a shared durable subscription. So:
//!
//! * **Registry** ([`Registry`]): a durable subscription records itself (registration key,
//!   filter, queue) on the Events Store channel `<prefix>.durable`. Every bridge instance reads
//!   that channel from its first event when it starts (and follows it live), so it knows every
//!   durable subscription under the prefix, including those whose consumers are all gone.
//! * **Publishing**: an event is published on Events (for the live subscriptions) and sent
//!   into the queue `<prefix>.dq.<key>` of every durable subscription whose filter matches it
//!   (the filter is applied by the publisher, with core's reference matcher). `emit` returns
//!   once KubeMQ took all of them; an error means some may be missing, and a publisher that
//!   retries may deliver a message twice.
//! * **Consuming**: the instances of the subscription lease from its queue (`prefetch`
//!   leases per instance), with a visibility that is extended while the handler runs. The
//!   position is KubeMQ's: what is acknowledged is gone, what is not comes back.
//!
//! Delivery is **at least once** for a durable subscription: a consumer that dies (or loses its
//! connection) between handling and acknowledging leaves the message in the queue, and another
//! member — or the same one after a restart — gets it again. Duplicates are possible; the
//! handler's idempotency (core's deduplication by message id) absorbs them.
//!
//! Outcomes: **retry** sends the next attempt into the queue in place of the leased message
//! (one request), delayed by KubeMQ in whole seconds and by the consumer for the rest, so a
//! retry is never a hot loop and survives the instance; **dead letter** puts the envelope
//! into the target's dead-letter queue with reason, attempts and origin, then acknowledges;
//! **pause** hands the leased message back to the queue and this instance leases nothing more
//! until resumed (another instance of the subscription may take it); **drop** acknowledges.
//!
//! Limits, declared: a durable subscription is shared (a broadcast one is refused: a queue
//! has competing consumers); it receives what is published after every publishing instance
//! has read its registration (an instance reads it at start, or live within milliseconds);
//! its queue outlives its consumers (that is the point) and is not deleted when it is
//! unregistered.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;
use kubemq::proto::kubemq::{
    Event, EventReceive, QueueMessage, QueueMessagePolicy, Subscribe,
    subscribe::{EventsStoreType, SubscribeType},
};
use parking_lot::Mutex;
use purista_core::kit;
use purista_core::{
    BridgeError, Delivery, DeliveryHandler, Envelope, PausedConsumer, RegistrationKey, SettleOnce,
    Settlement, Settler, SubscriptionFilter, SubscriptionSpec, WorkKind,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::probe::{self, ProbeSeen};
use crate::queues::lease::MAX_RECEIVES;
use crate::queues::stream::{LeaseStream, delay_seconds};
use crate::shared::{PROBE_TAG, Shared};
use crate::stream;

/// The attempt number of a durable delivery.
const TAG_ATTEMPT: &str = "purista-attempt";
/// When a retried delivery is due (epoch ms); KubeMQ delays whole seconds, the consumer the
/// rest.
const TAG_DUE: &str = "purista-due-ms";
/// Broker visibility of a durable lease, in seconds; extended every [`EXTEND_EVERY`] while
/// the handler runs.
const VISIBILITY_SECONDS: i32 = 30;
/// How often a running delivery's visibility is extended.
const EXTEND_EVERY: Duration = Duration::from_secs(10);
/// How long KubeMQ waits for a message on one receive (its shortest wait).
const RECEIVE_WAIT_SECONDS: i32 = 1;
/// A failed receive waits this long before the next (no hot loop while KubeMQ is away).
const FAILED_RECEIVE_PAUSE: Duration = Duration::from_millis(200);

/// One durable subscription as the registry records it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    key: String,
    filter: SubscriptionFilter,
    queue: String,
}

/// Every durable subscription under the prefix, read from the registry channel.
#[derive(Default)]
pub struct Registry {
    entries: Mutex<HashMap<String, Record>>,
    changed: Notify,
    seen: Arc<ProbeSeen>,
    started: tokio::sync::OnceCell<()>,
    stop: Mutex<Option<watch::Sender<bool>>>,
}

impl Registry {
    /// Starts following the registry channel and returns once everything stored there was
    /// read. Idempotent.
    pub async fn start(shared: &Arc<Shared>) -> Result<(), BridgeError> {
        let registry = &shared.durable;
        registry
            .started
            .get_or_try_init(|| async {
                registry.follow(shared)?;
                // Events Store keeps order: once this instance's marker is back, it has read
                // everything stored before it.
                let channel = shared.channels.durable_registry();
                let sender = shared.clone();
                probe::until_routed(
                    &registry.seen,
                    shared.config.ready_timeout,
                    "the durable subscription registry",
                    |id| {
                        let (shared, channel) = (sender.clone(), channel.clone());
                        async move {
                            let mut tags = HashMap::new();
                            tags.insert(PROBE_TAG.to_string(), id);
                            if let Err(error) =
                                store(&shared, &channel, "probe", Vec::new(), tags).await
                            {
                                tracing::debug!(%error, "registry marker not stored");
                            }
                        }
                    },
                )
                .await
                .inspect_err(|_| registry.stop())
            })
            .await
            .map(|_| ())
    }

    fn follow(&self, shared: &Arc<Shared>) -> Result<(), BridgeError> {
        let subscribe = Subscribe {
            subscribe_type_data: SubscribeType::EventsStore as i32,
            client_id: format!(
                "{}-durable-{}",
                shared.connection.client_id,
                purista_core::ids::new_id()
            ),
            channel: shared.channels.durable_registry(),
            group: String::new(),
            events_store_type_data: EventsStoreType::StartFromFirst as i32,
            events_store_type_value: 0,
        };
        let open: stream::Open<EventReceive> = Box::new(move |mut raw| {
            let subscribe = subscribe.clone();
            async move {
                raw.subscribe_to_events(subscribe)
                    .await
                    .map(|r| r.into_inner())
            }
            .boxed()
        });
        let weak: Weak<Shared> = Arc::downgrade(shared);
        let on_message = move |event: EventReceive| {
            let weak = weak.clone();
            async move {
                if let Some(shared) = weak.upgrade() {
                    shared.durable.take(event);
                }
            }
        };
        let (stop_tx, stop_rx) = watch::channel(false);
        let (up_tx, _up_rx) = watch::channel(false);
        *self.stop.lock() = Some(stop_tx);
        let raw = shared.connection.raw.clone();
        let label = "durable subscription registry".to_string();
        let spawned = shared.tasks.spawn(
            WorkKind::Generic,
            label.clone().into(),
            stream::run(raw, open, label, on_message, up_tx, stop_rx, || {}),
        );
        if spawned {
            Ok(())
        } else {
            Err(BridgeError::Unavailable(
                "the bridge is shutting down".into(),
            ))
        }
    }

    fn take(&self, event: EventReceive) {
        if let Some(id) = event.tags.get(PROBE_TAG) {
            self.seen.saw(id);
            return;
        }
        match serde_json::from_slice::<Record>(&event.body) {
            Ok(record) => {
                self.entries.lock().insert(record.key.clone(), record);
                self.changed.notify_waiters();
            }
            Err(error) => {
                tracing::warn!(channel = %event.channel, event_id = %event.event_id, %error, "a record on the durable subscription registry is not one: ignored");
            }
        }
    }

    /// Records a durable subscription and waits until this instance read it back.
    async fn register(
        shared: &Arc<Shared>,
        key: &RegistrationKey,
        filter: &SubscriptionFilter,
        queue: &str,
    ) -> Result<(), BridgeError> {
        Registry::start(shared).await?;
        let registry = &shared.durable;
        let record = Record {
            key: key.as_str().to_string(),
            filter: filter.clone(),
            queue: queue.to_string(),
        };
        let known = |r: &Registry| {
            r.entries
                .lock()
                .get(&record.key)
                .is_some_and(|e| e.queue == record.queue && e.filter == record.filter)
        };
        if known(registry) {
            return Ok(());
        }
        let body = serde_json::to_vec(&record)
            .map_err(|e| BridgeError::Broker(format!("a registry record does not encode: {e}")))?;
        let channel = shared.channels.durable_registry();
        store(shared, &channel, "purista-durable", body, HashMap::new()).await?;
        let wait = async {
            loop {
                let changed = registry.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if known(registry) {
                    return;
                }
                changed.await;
            }
        };
        tokio::time::timeout(shared.config.ready_timeout, wait)
            .await
            .map_err(|_| {
                BridgeError::Unavailable(format!(
                    "the durable subscription {key} was stored but not read back within {:?}",
                    shared.config.ready_timeout
                ))
            })
    }

    /// The queues of the durable subscriptions `message` belongs to.
    pub fn queues_for(&self, message: &Envelope) -> Vec<String> {
        self.entries
            .lock()
            .values()
            .filter(|r| r.filter.matches(message))
            .map(|r| r.queue.clone())
            .collect()
    }

    /// Whether `message` belongs to any durable subscription (no allocation: the publish path
    /// asks for every message).
    pub fn any_for(&self, message: &Envelope) -> bool {
        self.entries
            .lock()
            .values()
            .any(|r| r.filter.matches(message))
    }

    /// Stops following the registry (the bridge shuts down).
    pub fn stop(&self) {
        if let Some(stop) = self.stop.lock().take() {
            let _ = stop.send(true);
        }
    }
}

/// Stores one event on an Events Store channel, with a deadline.
async fn store(
    shared: &Shared,
    channel: &str,
    metadata: &str,
    body: Vec<u8>,
    tags: HashMap<String, String>,
) -> Result<(), BridgeError> {
    let event = Event {
        event_id: purista_core::ids::new_id(),
        client_id: shared.connection.client_id.clone(),
        channel: channel.to_string(),
        metadata: metadata.to_string(),
        body,
        store: true,
        tags,
    };
    let mut raw = shared.connection.raw.clone();
    let result = kit::broker_call(
        shared.config.publish_timeout,
        "storing an Events Store event",
        async {
            raw.send_event(event)
                .await
                .map(|r| r.into_inner())
                .map_err(|s| BridgeError::client("storing an event in KubeMQ", s, true))
        },
    )
    .await?;
    if result.sent {
        Ok(())
    } else {
        Err(BridgeError::Broker(format!(
            "KubeMQ did not store the event: {}",
            result.error
        )))
    }
}

/// The queue message of a durable delivery.
fn queue_message(
    shared: &Shared,
    queue: &str,
    id: &str,
    body: Vec<u8>,
    attempt: u32,
    delay: Duration,
) -> QueueMessage {
    let mut tags = HashMap::new();
    if attempt > 1 {
        tags.insert(TAG_ATTEMPT.to_string(), attempt.to_string());
    }
    if !delay.is_zero() {
        let due = purista_core::envelope::now_ms().saturating_add(kit::millis(delay));
        tags.insert(TAG_DUE.to_string(), due.to_string());
    }
    QueueMessage {
        message_id: id.to_string(),
        client_id: shared.connection.client_id.clone(),
        channel: queue.to_string(),
        metadata: "purista-durable".into(),
        body,
        tags,
        policy: Some(QueueMessagePolicy {
            delay_seconds: delay_seconds(delay),
            max_receive_count: MAX_RECEIVES,
            max_receive_queue: format!("{queue}.dead-letter"),
            expiration_seconds: 0,
        }),
        ..Default::default()
    }
}

/// The queue messages that carry `bytes` of `message` to every durable subscription it
/// belongs to.
pub fn deliveries(shared: &Shared, message: &Envelope, bytes: &[u8]) -> Vec<QueueMessage> {
    shared
        .durable
        .queues_for(message)
        .into_iter()
        .map(|queue| {
            queue_message(
                shared,
                &queue,
                message.id.as_str(),
                bytes.to_vec(),
                1,
                Duration::ZERO,
            )
        })
        .collect()
}

/// Sends the [`deliveries`] of a message; `Ok` once KubeMQ took every one.
pub async fn fan_out(shared: &Shared, deliveries: Vec<QueueMessage>) -> Result<(), BridgeError> {
    if deliveries.is_empty() {
        return Ok(());
    }
    let sends = deliveries.into_iter().map(|m| send(shared, m));
    futures::future::try_join_all(sends).await.map(|_| ())
}

/// Sends one queue message through the generated client, with a deadline.
async fn send(shared: &Shared, message: QueueMessage) -> Result<(), BridgeError> {
    let mut raw = shared.connection.raw.clone();
    let result = kit::broker_call(
        shared.config.publish_timeout,
        "sending a durable delivery",
        async {
            raw.send_queue_message(message)
                .await
                .map(|r| r.into_inner())
                .map_err(|s| BridgeError::client("sending a queue message to KubeMQ", s, true))
        },
    )
    .await?;
    if result.is_error {
        return Err(BridgeError::Broker(format!(
            "KubeMQ refused a durable delivery: {}",
            result.error
        )));
    }
    Ok(())
}

/// A settlement on its way to the task that holds the lease.
type Command = (Settlement, oneshot::Sender<Result<(), BridgeError>>);

/// One durable subscription consumer of this instance.
pub struct DurableConsumer {
    spec: SubscriptionSpec,
    label: Arc<str>,
    queue: String,
    shared: Arc<Shared>,
    handler: Arc<dyn DeliveryHandler>,
    paused: watch::Sender<Option<(String, u64)>>,
    closing: watch::Sender<bool>,
    /// Turns true once every worker ended.
    ended: watch::Sender<usize>,
    up: AtomicBool,
}

impl DurableConsumer {
    /// Records the subscription and starts `prefetch` lease workers on its queue.
    pub async fn start(
        shared: &Arc<Shared>,
        spec: SubscriptionSpec,
        handler: Arc<dyn DeliveryHandler>,
    ) -> Result<Arc<DurableConsumer>, BridgeError> {
        if !spec.shared {
            return Err(BridgeError::Unsupported(
                "durable broadcast subscriptions on the kubemq bridge (a durable subscription is a queue its instances share)".into(),
            ));
        }
        let queue = shared.channels.durable_queue(&spec.key);
        Registry::register(shared, &spec.key, &spec.filter, &queue).await?;
        let workers = usize::from(spec.prefetch.max(1));
        let consumer = Arc::new(DurableConsumer {
            label: spec.key.as_str().into(),
            spec,
            queue,
            shared: shared.clone(),
            handler,
            paused: watch::channel(None).0,
            closing: watch::channel(false).0,
            ended: watch::channel(0).0,
            up: AtomicBool::new(true),
        });
        for _ in 0..workers {
            let worker = consumer.clone();
            let spawned =
                shared
                    .tasks
                    .spawn(WorkKind::Subscription, consumer.label.clone(), async move {
                        worker.work().await;
                        worker.ended.send_modify(|n| *n += 1);
                    });
            if !spawned {
                let _ = consumer.closing.send(true);
                return Err(BridgeError::Unavailable(
                    "the bridge is shutting down".into(),
                ));
            }
        }
        Ok(consumer)
    }

    /// One lease worker: receive, hand to the handler, settle; none while paused.
    async fn work(self: &Arc<Self>) {
        let mut closing = self.closing.subscribe();
        let mut paused = self.paused.subscribe();
        loop {
            if *closing.borrow() {
                return;
            }
            if paused.borrow().is_some() {
                tokio::select! {
                    _ = closing.wait_for(|c| *c) => return,
                    _ = paused.wait_for(|p| p.is_none()) => continue,
                }
            }
            let receive = LeaseStream::receive(
                self.shared.connection.raw.clone(),
                &self.shared.connection.client_id,
                &self.queue,
                VISIBILITY_SECONDS,
                RECEIVE_WAIT_SECONDS,
            );
            let bound = self.shared.config.publish_timeout + Duration::from_secs(1);
            let received = tokio::select! {
                biased;
                // A message that arrives as the consumer closes goes back to the queue with
                // the dropped stream.
                _ = closing.wait_for(|c| *c) => return,
                r = tokio::time::timeout(bound, receive) => r,
            };
            match received {
                Ok(Ok(Some((stream, message)))) => {
                    self.mark_up(true);
                    self.handle(stream, message).await;
                }
                Ok(Ok(None)) => self.mark_up(true),
                Ok(Err(error)) => {
                    self.mark_up(false);
                    tracing::debug!(registration = %self.label, %error, "durable receive failed");
                    self.pause_after_failure(&mut closing).await;
                }
                Err(_) => {
                    self.mark_up(false);
                    self.pause_after_failure(&mut closing).await;
                }
            }
        }
    }

    fn mark_up(&self, up: bool) {
        let was = self.up.swap(up, Ordering::AcqRel);
        if up && !was {
            self.shared.count_reconnect();
        }
    }

    async fn pause_after_failure(&self, closing: &mut watch::Receiver<bool>) {
        tokio::select! {
            _ = closing.wait_for(|c| *c) => {}
            () = tokio::time::sleep(FAILED_RECEIVE_PAUSE) => {}
        }
    }

    /// One leased message, from decoding to its settlement.
    async fn handle(self: &Arc<Self>, mut stream: LeaseStream, message: QueueMessage) {
        let sequence = message.attributes.as_ref().map_or(0, |a| a.sequence);
        let envelope = match Envelope::decode_with_limit(
            &message.body,
            self.shared.config.max_payload_bytes,
        ) {
            Ok(e) => e,
            Err(error) => {
                self.shared.count_poison();
                tracing::warn!(registration = %self.label, queue = %self.queue, message_id = %message.message_id, %error, "a durable delivery is not a PURISTA envelope: dropped");
                let _ = self.on_stream(stream.ack(sequence)).await;
                return;
            }
        };
        if !self.spec.filter.matches(&envelope) {
            tracing::debug!(registration = %self.label, message_id = %envelope.id, "durable delivery outside the filter: dropped");
            let _ = self.on_stream(stream.ack(sequence)).await;
            return;
        }
        let attempt = message
            .tags
            .get(TAG_ATTEMPT)
            .and_then(|a| a.parse().ok())
            .unwrap_or(1);
        if let Some(due) = message
            .tags
            .get(TAG_DUE)
            .and_then(|d| d.parse::<u64>().ok())
        {
            let wait = due.saturating_sub(purista_core::envelope::now_ms());
            let mut closing = self.closing.subscribe();
            tokio::select! {
                // Closing: the dropped stream puts the message back.
                _ = closing.wait_for(|c| *c) => return,
                () = tokio::time::sleep(Duration::from_millis(wait)) => {}
            }
        }
        let envelope = Arc::new(envelope);
        let (tx, mut rx) = mpsc::channel::<Command>(1);
        let delivery = Delivery {
            settle: SettleOnce::new(
                envelope.id.as_str(),
                Box::new(DurableSettler { tx: Some(tx) }),
            ),
            envelope: envelope.clone(),
            attempt,
        };
        let _in_flight = self
            .shared
            .tracker
            .start(WorkKind::Subscription, &self.label);
        let handler = self.handler.clone();
        let run = std::panic::AssertUnwindSafe(handler.deliver(delivery)).catch_unwind();
        tokio::pin!(run);
        let mut lease = Some(stream);
        let mut extend = tokio::time::interval(EXTEND_EVERY);
        extend.tick().await;
        let (mut ran, mut settler_gone) = (false, false);
        while !(ran && settler_gone) {
            tokio::select! {
                r = &mut run, if !ran => {
                    ran = true;
                    if r.is_err() {
                        tracing::error!(registration = %self.label, "subscription handler panicked");
                    }
                }
                command = rx.recv(), if !settler_gone => match command {
                    Some((settlement, reply)) => {
                        let result = match lease.take() {
                            Some(stream) => {
                                self.settle(stream, sequence, &message, &envelope, attempt, settlement).await
                            }
                            None => Err(BridgeError::Broker("the durable lease is settled already".into())),
                        };
                        let _ = reply.send(result);
                    }
                    None => settler_gone = true,
                },
                _ = extend.tick(), if lease.is_some() => {
                    if let Some(stream) = lease.as_mut()
                        && let Err(error) = self.on_stream(stream.modify_visibility(VISIBILITY_SECONDS)).await
                    {
                        tracing::debug!(registration = %self.label, %error, "durable lease not extended");
                    }
                }
            }
        }
        // Unsettled (the handler gave it up): dropping the stream puts it back in the queue.
        drop(lease);
    }

    /// A stream call with the broker deadline.
    async fn on_stream(
        &self,
        call: impl std::future::Future<Output = Result<(), BridgeError>>,
    ) -> Result<(), BridgeError> {
        kit::broker_call(
            self.shared.config.publish_timeout,
            "settling a durable delivery",
            call,
        )
        .await
    }

    async fn settle(
        &self,
        mut stream: LeaseStream,
        sequence: u64,
        message: &QueueMessage,
        envelope: &Envelope,
        attempt: u32,
        settlement: Settlement,
    ) -> Result<(), BridgeError> {
        match settlement {
            Settlement::Ack | Settlement::Drop { .. } => self.on_stream(stream.ack(sequence)).await,
            // The same attempt again, at once: handed back untouched (the service is shutting
            // down); any instance of the subscription takes it.
            Settlement::Redeliver {
                delay,
                next_attempt,
            } if next_attempt == attempt && delay.is_zero() => {
                self.on_stream(stream.resend(sequence, &self.queue)).await
            }
            Settlement::Redeliver {
                delay,
                next_attempt,
            } => {
                let next = queue_message(
                    &self.shared,
                    &self.queue,
                    &message.message_id,
                    message.body.clone(),
                    next_attempt,
                    delay,
                );
                self.on_stream(stream.send_modified(sequence, next)).await
            }
            Settlement::Pause { reason } => {
                self.pause(reason);
                self.on_stream(stream.resend(sequence, &self.queue)).await
            }
            Settlement::DeadLetter(note) => {
                crate::subscriptions::dead_letter(&self.shared, envelope, &note).await?;
                self.on_stream(stream.ack(sequence)).await
            }
        }
    }

    fn pause(&self, reason: String) {
        let newly = self.paused.send_if_modified(|p| {
            let was = p.is_none();
            if was {
                *p = Some((reason.clone(), purista_core::envelope::now_ms()));
            }
            was
        });
        if newly {
            tracing::warn!(registration = %self.label, %reason, "durable subscription consumer paused");
        }
    }

    /// Resumes a paused consumer. `Ok(false)` when it was not paused.
    pub async fn resume(&self) -> Result<bool, BridgeError> {
        Ok(self.paused.send_replace(None).is_some())
    }

    /// `Some` when paused.
    pub fn paused(&self) -> Option<PausedConsumer> {
        self.paused
            .borrow()
            .as_ref()
            .map(|(reason, paused_at)| PausedConsumer {
                key: self.spec.key.clone(),
                reason: reason.clone(),
                paused_at: *paused_at,
            })
    }

    /// Whether its last receive reached KubeMQ (a paused consumer counts as fine).
    pub fn is_up(&self) -> bool {
        self.paused.borrow().is_some() || self.up.load(Ordering::Acquire)
    }

    /// Hands `envelope` to the subscription as attempt 1 (a replayed dead letter): into its
    /// queue, where any instance takes it.
    pub async fn hand_in(&self, envelope: &Envelope) -> Result<(), BridgeError> {
        let message = queue_message(
            &self.shared,
            &self.queue,
            envelope.id.as_str(),
            envelope.encode(),
            1,
            Duration::ZERO,
        );
        send(&self.shared, message).await
    }

    /// Leases nothing more; returns once the deliveries in hand are settled (or given back).
    pub async fn close(&self) {
        let _ = self.closing.send(true);
        let workers = usize::from(self.spec.prefetch.max(1));
        let mut ended = self.ended.subscribe();
        let _ = ended.wait_for(|n| *n >= workers).await;
    }
}

/// Settles one durable delivery through the task that holds its lease.
struct DurableSettler {
    tx: Option<mpsc::Sender<Command>>,
}

#[async_trait]
impl Settler for DurableSettler {
    async fn settle(mut self: Box<Self>, settlement: Settlement) -> Result<(), BridgeError> {
        let Some(tx) = self.tx.take() else {
            return Ok(());
        };
        let (reply, answer) = oneshot::channel();
        tx.send((settlement, reply))
            .await
            .map_err(|_| BridgeError::Unavailable("the durable lease is gone".into()))?;
        drop(tx);
        answer
            .await
            .unwrap_or_else(|_| Err(BridgeError::Unavailable("the durable lease is gone".into())))
    }
}
