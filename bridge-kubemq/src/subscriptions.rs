//! Subscriptions on KubeMQ Events.
//!
//! A consumer subscribes to its filter's channel pattern
//! ([`Channels::pattern`](crate::channels::Channels::pattern)): shared subscriptions in a
//! group named after the registration key (KubeMQ gives each event to one member of a group),
//! broadcast ones without a group (every instance gets every event). KubeMQ does the
//! filtering; the consumer applies core's reference matcher once more (it costs nothing and
//! makes a hash collision of two long values harmless), then hands the delivery to the handler,
//! up to `prefetch` at a time.
//!
//! Events are at most once: what is published while no consumer is subscribed (a consumer
//! paused, an instance down, a connection lost) is not delivered to it. Outcomes:
//!
//! * **retry**: the delivery is handed to the handler again after its delay, by this
//!   consumer, as the next attempt — a timer, never a hot loop; it is lost with the instance;
//! * **dead letter**: the envelope goes, intact, into the KubeMQ queue of its target
//!   (`<prefix>.dl.<target>`, durable) with reason, attempts and origin as tags;
//! * **pause** (`stop_consumer`): the handler gets nothing more; the delivery is kept in hand
//!   and what arrives meanwhile waits in the consumer's buffer ([`consumer_buffer`] messages;
//!   past that KubeMQ drops events for this consumer); resume hands the kept delivery over
//!   first, then the rest in order.
//!
//! [`consumer_buffer`]: crate::KubemqConfig::consumer_buffer
//!
//! A message that is no envelope is dropped with one warning and counted as poison; the
//! consumer goes on.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use kubemq::QueueMessage;
use kubemq::proto::kubemq::{EventReceive, Subscribe, subscribe::SubscribeType};
use parking_lot::Mutex;
use purista_core::inflight::InFlightCounter;
use purista_core::{
    BridgeError, DeadLetterNote, Delivery, DeliveryHandler, Envelope, PausedConsumer, SettleOnce,
    Settlement, Settler, SubscriptionSpec, WorkKind,
};
use tokio::sync::{mpsc, watch};

use crate::probe::{self, ProbeSeen};
use crate::publish::{publish_probe, send_queue_message};
use crate::shared::{PROBE_TAG, Shared};
use crate::stream;

/// Tags of a dead letter.
pub const TAG_REASON: &str = "purista-dead-letter-reason";
/// Attempts made before dead-lettering.
pub const TAG_ATTEMPTS: &str = "purista-dead-letter-attempts";
/// Registration key of the subscription it came from.
pub const TAG_ORIGIN: &str = "purista-dead-letter-origin";
/// When (epoch ms).
pub const TAG_AT: &str = "purista-dead-lettered-at";

type Item = (Arc<Envelope>, u32);

/// Stops a stream task; the receiver turns true once it ended.
type StreamStop = (watch::Sender<bool>, watch::Receiver<bool>);

fn stop(slot: &Mutex<Option<StreamStop>>) -> Option<watch::Receiver<bool>> {
    let (stop, ended) = slot.lock().take()?;
    let _ = stop.send(true);
    Some(ended)
}

/// The attempt number of a delivery handed back to its group.
const TAG_ATTEMPT: &str = "purista-attempt";

/// How long a leaving consumer waits after closing its hand-off stream before it forwards
/// there: KubeMQ confirms no unsubscribe, and a forwarded event routed back to the closed
/// stream would be lost.
pub const LEAVE_GRACE: std::time::Duration = std::time::Duration::from_millis(100);

/// One subscription consumer of this instance.
pub struct Consumer {
    spec: SubscriptionSpec,
    label: Arc<str>,
    pattern: String,
    group: String,
    shared: Arc<Shared>,
    handler: Arc<dyn DeliveryHandler>,
    /// Counts deliveries in the handler (made once: lock-free per delivery).
    in_flight: InFlightCounter,
    /// Deliveries for the handler (from the stream, from retry timers).
    tx: mpsc::Sender<Item>,
    /// Deliveries a pause put back, handed over first after resume.
    held: Mutex<VecDeque<Item>>,
    paused: watch::Sender<Option<(String, u64)>>,
    closing: watch::Sender<bool>,
    /// Stops the stream task; the receiver turns true once it ended.
    stream_stop: Mutex<Option<StreamStop>>,
    /// The group's hand-off channel (shared subscriptions only).
    handoff: Option<String>,
    handoff_stop: Mutex<Option<StreamStop>>,
    handoff_closed: tokio::sync::OnceCell<()>,
    /// Set when a shared consumer left: its stream stays open and what still arrives is
    /// forwarded to the group's hand-off channel.
    leaving: std::sync::atomic::AtomicBool,
    up: Mutex<watch::Receiver<bool>>,
    seen: Arc<ProbeSeen>,
}

impl Consumer {
    /// Registers and starts a consumer; returns once KubeMQ routes events to it.
    pub async fn start(
        shared: &Arc<Shared>,
        spec: SubscriptionSpec,
        handler: Arc<dyn DeliveryHandler>,
    ) -> Result<Arc<Consumer>, BridgeError> {
        let pattern = shared.channels.pattern(&spec.filter);
        let group = if spec.shared {
            spec.key.as_str().to_string()
        } else {
            String::new()
        };
        let (tx, rx) = mpsc::channel(shared.config.consumer_buffer.max(1));
        let (spec_shared, spec_key) = (spec.shared, spec.key.clone());
        let label: Arc<str> = spec.key.as_str().into();
        let consumer = Arc::new(Consumer {
            in_flight: shared.tracker.counter(WorkKind::Subscription, &label),
            label,
            spec,
            pattern,
            group,
            shared: shared.clone(),
            handler,
            tx,
            held: Mutex::new(VecDeque::new()),
            paused: watch::channel(None).0,
            closing: watch::channel(false).0,
            stream_stop: Mutex::new(None),
            handoff: spec_shared.then(|| shared.channels.handoff(&spec_key)),
            handoff_stop: Mutex::new(None),
            handoff_closed: tokio::sync::OnceCell::new(),
            leaving: std::sync::atomic::AtomicBool::new(false),
            up: Mutex::new(watch::channel(false).1),
            seen: Arc::new(ProbeSeen::default()),
        });
        let worker = consumer.clone();
        if !shared
            .tasks
            .spawn(WorkKind::Subscription, consumer.label.clone(), async move {
                worker.run(rx).await
            })
        {
            return Err(BridgeError::Unavailable(
                "the bridge is shutting down".into(),
            ));
        }
        consumer.subscribe().await?;
        Ok(consumer)
    }

    /// Opens the stream and waits until KubeMQ routes to it.
    async fn subscribe(self: &Arc<Self>) -> Result<(), BridgeError> {
        let (main, up) = self.open_stream(&self.pattern)?;
        *self.stream_stop.lock() = Some(main);
        *self.up.lock() = up;
        if let Some(handoff) = &self.handoff {
            let (stream, _) = self.open_stream(handoff)?;
            *self.handoff_stop.lock() = Some(stream);
        }
        let probe_channel = crate::channels::Channels::probe_for(&self.pattern);
        let shared = self.shared.clone();
        let ready = probe::until_routed(
            &self.seen,
            self.shared.config.ready_timeout,
            &format!("subscription {}", self.label),
            |id| {
                let shared = shared.clone();
                let channel = probe_channel.clone();
                async move { publish_probe(&shared, &channel, &id).await }
            },
        )
        .await;
        if ready.is_err() {
            let _ = self.stop_stream();
            let _ = stop(&self.handoff_stop);
        }
        ready
    }

    /// Spawns the stream task of one subscription channel of this consumer.
    fn open_stream(
        self: &Arc<Self>,
        channel: &str,
    ) -> Result<(StreamStop, watch::Receiver<bool>), BridgeError> {
        let subscribe = Subscribe {
            subscribe_type_data: SubscribeType::Events as i32,
            client_id: self.shared.connection.client_id.clone(),
            channel: channel.to_string(),
            group: self.group.clone(),
            events_store_type_data: 0,
            events_store_type_value: 0,
        };
        let (stop_tx, stop_rx) = watch::channel(false);
        let (up_tx, up_rx) = watch::channel(false);
        let (ended_tx, ended_rx) = watch::channel(false);
        let open: stream::Open<EventReceive> = Box::new(move |mut raw| {
            let subscribe = subscribe.clone();
            async move {
                raw.subscribe_to_events(subscribe)
                    .await
                    .map(|r| r.into_inner())
            }
            .boxed()
        });
        let weak = Arc::downgrade(self);
        let on_message = move |event: EventReceive| {
            let weak = weak.clone();
            async move {
                if let Some(c) = weak.upgrade() {
                    c.take(event).await;
                }
            }
        };
        let reopened = {
            let shared = self.shared.clone();
            move || shared.count_reconnect()
        };
        let label = format!("subscription {} on {channel}", self.label);
        let raw = self.shared.connection.raw.clone();
        let spawned =
            self.shared
                .tasks
                .spawn(WorkKind::Generic, label.clone().into(), async move {
                    stream::run(raw, open, label, on_message, up_tx, stop_rx, reopened).await;
                    let _ = ended_tx.send(true);
                });
        if !spawned {
            return Err(BridgeError::Unavailable(
                "the bridge is shutting down".into(),
            ));
        }
        Ok(((stop_tx, ended_rx), up_rx))
    }

    /// Stops the stream task; returns what turns true once it ended.
    fn stop_stream(&self) -> Option<watch::Receiver<bool>> {
        stop(&self.stream_stop)
    }

    /// Hands a delivery back to the group (the service is shutting down and takes no more):
    /// published on the group's hand-off channel, which every other member of a shared
    /// subscription also listens on. This instance stops listening there first, so it is
    /// not handed the delivery again. A broadcast consumer has no one to hand to.
    async fn hand_back(&self, envelope: &Envelope, attempt: u32) -> Result<(), BridgeError> {
        let Some(channel) = &self.handoff else {
            tracing::debug!(registration = %self.label, message_id = %envelope.id, "a broadcast consumer's delivery handed back at shutdown is dropped");
            return Ok(());
        };
        self.handoff_closed
            .get_or_init(|| async {
                if let Some(mut ended) = stop(&self.handoff_stop) {
                    let _ = ended.wait_for(|e| *e).await;
                    tokio::time::sleep(LEAVE_GRACE).await;
                }
            })
            .await;
        let mut tags = HashMap::new();
        tags.insert(TAG_ATTEMPT.to_string(), attempt.to_string());
        let event = kubemq::Event::builder()
            .id(envelope.id.clone())
            .channel(channel.clone())
            .body(envelope.encode())
            .tags(tags)
            .build();
        crate::publish::send_event(&self.shared, event).await
    }

    /// One event from the stream: probes are noted, poison dropped, the rest queued.
    async fn take(&self, event: EventReceive) {
        if let Some(id) = event.tags.get(PROBE_TAG) {
            self.seen.saw(id);
            return;
        }
        let envelope = match Envelope::decode_with_limit(
            &event.body,
            self.shared.config.max_payload_bytes,
        ) {
            Ok(e) => e,
            Err(error) => {
                self.shared.count_poison();
                tracing::warn!(registration = %self.label, channel = %event.channel, event_id = %event.event_id, %error, "an event is not a PURISTA envelope: dropped");
                return;
            }
        };
        if !self.spec.filter.matches(&envelope) {
            tracing::debug!(registration = %self.label, message_id = %envelope.id, "event outside the filter (hash collision or foreign publisher): dropped");
            return;
        }
        let attempt = event
            .tags
            .get(TAG_ATTEMPT)
            .and_then(|a| a.parse().ok())
            .unwrap_or(1);
        if self.leaving.load(std::sync::atomic::Ordering::Acquire) {
            if let Err(error) = self.hand_back(&envelope, attempt).await {
                tracing::warn!(registration = %self.label, message_id = %envelope.id, %error, "an event that reached a consumer after it left could not be handed to its group: dropped");
            }
            return;
        }
        // Never wait here: what KubeMQ routed to this consumer is better in its buffer than in
        // flight on the stream, where a consumer leaving its group would lose it.
        match self.tx.try_send((Arc::new(envelope), attempt)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.shared.count_poison();
                tracing::warn!(registration = %self.label, buffer = self.shared.config.consumer_buffer, "subscription consumer buffer full: event dropped (Events are at most once)");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// The handler loop: up to `prefetch` deliveries at a time, none while paused.
    async fn run(self: Arc<Self>, mut rx: mpsc::Receiver<Item>) {
        let prefetch = usize::from(self.spec.prefetch.max(1));
        let mut in_hand = FuturesUnordered::new();
        let mut paused = self.paused.subscribe();
        let mut closing = self.closing.subscribe();
        loop {
            let can_take = in_hand.len() < prefetch && paused.borrow().is_none();
            let held = if can_take {
                self.held.lock().pop_front()
            } else {
                None
            };
            if let Some(item) = held {
                in_hand.push(self.clone().deliver(item));
                continue;
            }
            tokio::select! {
                biased;
                _ = closing.wait_for(|c| *c) => break,
                Some(()) = in_hand.next(), if !in_hand.is_empty() => {}
                _ = paused.changed() => {}
                item = rx.recv(), if can_take => match item {
                    Some(item) => in_hand.push(self.clone().deliver(item)),
                    None => break,
                },
            }
        }
        // Closed: no more intake, but what was received is handled (unless paused), so a
        // consumer leaving with a full buffer loses nothing it took.
        if paused.borrow().is_none() {
            loop {
                while in_hand.len() < prefetch {
                    match rx.try_recv() {
                        Ok(item) => in_hand.push(self.clone().deliver(item)),
                        Err(_) => break,
                    }
                }
                if in_hand.next().await.is_none() {
                    break;
                }
            }
        }
        while in_hand.next().await.is_some() {}
    }

    async fn deliver(self: Arc<Self>, (envelope, attempt): Item) {
        let _in_flight = self.in_flight.start();
        let settler = EventSettler {
            consumer: Arc::downgrade(&self),
            envelope: envelope.clone(),
            attempt,
        };
        let delivery = Delivery {
            settle: SettleOnce::new(envelope.id.as_str(), Box::new(settler)),
            envelope,
            attempt,
        };
        let ran = std::panic::AssertUnwindSafe(self.handler.deliver(delivery))
            .catch_unwind()
            .await;
        if ran.is_err() {
            tracing::error!(registration = %self.label, "subscription handler panicked");
        }
    }

    /// Pauses: the handler gets nothing more until resume; `item` is handed over first then.
    /// The subscription stays open and what arrives meanwhile waits in the consumer's buffer
    /// (beyond it, the stream stops being read and KubeMQ drops events for this consumer:
    /// Events are at most once).
    fn pause(&self, reason: String, item: Item) {
        self.held.lock().push_front(item);
        let newly = self.paused.send_if_modified(|p| {
            let was = p.is_none();
            if was {
                *p = Some((reason.clone(), purista_core::envelope::now_ms()));
            }
            was
        });
        if newly {
            tracing::warn!(registration = %self.label, %reason, "subscription consumer paused");
        }
    }

    /// Resumes a paused consumer: the handler gets the held delivery, then what waited.
    /// `Ok(false)` when it was not paused.
    pub async fn resume(self: &Arc<Self>) -> Result<bool, BridgeError> {
        Ok(self.paused.send_replace(None).is_some())
    }

    /// Leaves: the handler gets nothing more once what was received is handled (a paused
    /// consumer's is dropped).
    ///
    /// KubeMQ confirms no unsubscribe: a group member that closes its stream loses what the
    /// server routed to it until the server noticed (a few milliseconds). So a *shared*
    /// consumer stops listening on its group's hand-off channel, then keeps its stream open
    /// and forwards whatever still arrives to that channel, where the other members take it;
    /// its stream is closed with the bridge ([`Consumer::stop`]). A broadcast consumer
    /// closes its stream at once (nothing of another instance's is on it).
    pub async fn close(&self) {
        self.held.lock().clear();
        if self.handoff.is_some() {
            self.handoff_closed
                .get_or_init(|| async {
                    if let Some(mut ended) = stop(&self.handoff_stop) {
                        let _ = ended.wait_for(|e| *e).await;
                        tokio::time::sleep(LEAVE_GRACE).await;
                    }
                })
                .await;
            self.leaving
                .store(true, std::sync::atomic::Ordering::Release);
        } else if let Some(mut ended) = self.stop_stream() {
            let _ = ended.wait_for(|e| *e).await;
        }
        let _ = self.closing.send(true);
    }

    /// Closes every stream (the bridge shuts down).
    pub async fn stop(&self) {
        let _ = stop(&self.handoff_stop);
        if let Some(mut ended) = self.stop_stream() {
            let _ = ended.wait_for(|e| *e).await;
        }
        let _ = self.closing.send(true);
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

    /// Whether its stream is open (a paused consumer counts as fine).
    pub fn is_up(&self) -> bool {
        self.paused.borrow().is_some() || *self.up.lock().borrow()
    }

    /// Hands `envelope` to the handler as attempt 1 (a replayed dead letter). `false` when the
    /// consumer is closed.
    pub async fn hand_in(&self, envelope: Envelope) -> bool {
        self.tx.send((Arc::new(envelope), 1)).await.is_ok()
    }

    fn requeue_later(self: &Arc<Self>, delay: Duration, item: Item) {
        let weak = Arc::downgrade(self);
        let mut closing = self.closing.subscribe();
        self.shared
            .tasks
            .spawn(WorkKind::Generic, "retry timer".into(), async move {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    // Closed: the retry is lost with the consumer (Events are at most once).
                    _ = closing.wait_for(|c| *c) => return,
                }
                if let Some(c) = weak.upgrade() {
                    let _ = c.tx.send(item).await;
                }
            });
    }
}

/// Settles one Events delivery.
struct EventSettler {
    consumer: Weak<Consumer>,
    envelope: Arc<Envelope>,
    attempt: u32,
}

// By hand rather than with `async_trait`: an ack (nearly every settlement) is then a ready
// future that allocates nothing, where the generated one boxed (and copied) the state of
// every branch, hand-off and dead letter included, on each delivery.
impl Settler for EventSettler {
    fn settle<'a>(
        self: Box<Self>,
        settlement: Settlement,
    ) -> Pin<Box<dyn Future<Output = Result<(), BridgeError>> + Send + 'a>>
    where
        Self: 'a,
    {
        match settlement {
            Settlement::Ack | Settlement::Drop { .. } => Box::pin(std::future::ready(Ok(()))),
            other => Box::pin(self.settle_other(other)),
        }
    }
}

impl EventSettler {
    /// Every settlement but ack and drop.
    async fn settle_other(self: Box<Self>, settlement: Settlement) -> Result<(), BridgeError> {
        let Some(consumer) = self.consumer.upgrade() else {
            return Ok(());
        };
        match settlement {
            Settlement::Ack | Settlement::Drop { .. } => Ok(()),
            // The same attempt again, at once: the service hands the delivery back untouched
            // (it is shutting down).
            Settlement::Redeliver {
                delay,
                next_attempt,
            } if next_attempt == self.attempt && delay.is_zero() => {
                consumer.hand_back(&self.envelope, self.attempt).await
            }
            Settlement::Redeliver {
                delay,
                next_attempt,
            } => {
                consumer.requeue_later(delay, (self.envelope, next_attempt));
                Ok(())
            }
            Settlement::Pause { reason } => {
                consumer.pause(reason, (self.envelope, self.attempt));
                Ok(())
            }
            Settlement::DeadLetter(note) => {
                dead_letter(&consumer.shared, &self.envelope, &note).await
            }
        }
    }
}

/// Puts `envelope` into the dead-letter queue of `note.target`.
pub async fn dead_letter(
    shared: &Shared,
    envelope: &Envelope,
    note: &DeadLetterNote,
) -> Result<(), BridgeError> {
    let mut tags = HashMap::new();
    tags.insert(TAG_REASON.to_string(), note.reason.clone());
    tags.insert(TAG_ATTEMPTS.to_string(), note.attempts.to_string());
    tags.insert(TAG_ORIGIN.to_string(), note.origin.clone());
    tags.insert(
        TAG_AT.to_string(),
        purista_core::envelope::now_ms().to_string(),
    );
    let message = QueueMessage::builder()
        .id(envelope.id.clone())
        .channel(shared.channels.dead_letter(&note.target))
        .body(envelope.encode())
        .tags(tags)
        .build();
    send_queue_message(shared, message).await
}
