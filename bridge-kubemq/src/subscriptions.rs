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
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use kubemq::QueueMessage;
use kubemq::proto::kubemq::{EventReceive, Subscribe, subscribe::SubscribeType};
use parking_lot::Mutex;
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

/// One subscription consumer of this instance.
pub struct Consumer {
    spec: SubscriptionSpec,
    label: Arc<str>,
    pattern: String,
    group: String,
    shared: Arc<Shared>,
    handler: Arc<dyn DeliveryHandler>,
    /// Deliveries for the handler (from the stream, from retry timers).
    tx: mpsc::Sender<Item>,
    /// Deliveries a pause put back, handed over first after resume.
    held: Mutex<VecDeque<Item>>,
    paused: watch::Sender<Option<(String, u64)>>,
    closing: watch::Sender<bool>,
    stream_stop: Mutex<Option<watch::Sender<bool>>>,
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
        let consumer = Arc::new(Consumer {
            label: spec.key.as_str().into(),
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
        let subscribe = Subscribe {
            subscribe_type_data: SubscribeType::Events as i32,
            client_id: self.shared.connection.client_id.clone(),
            channel: self.pattern.clone(),
            group: self.group.clone(),
            events_store_type_data: 0,
            events_store_type_value: 0,
        };
        let (stop_tx, stop_rx) = watch::channel(false);
        let (up_tx, up_rx) = watch::channel(false);
        *self.stream_stop.lock() = Some(stop_tx);
        *self.up.lock() = up_rx;
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
        let label = format!("subscription {}", self.label);
        let spawned = self.shared.tasks.spawn(
            WorkKind::Generic,
            label.clone().into(),
            stream::run(
                self.shared.connection.raw.clone(),
                open,
                label,
                on_message,
                up_tx,
                stop_rx,
                reopened,
            ),
        );
        if !spawned {
            return Err(BridgeError::Unavailable(
                "the bridge is shutting down".into(),
            ));
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
            self.stop_stream();
        }
        ready
    }

    fn stop_stream(&self) {
        if let Some(stop) = self.stream_stop.lock().take() {
            let _ = stop.send(true);
        }
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
        let _ = self.tx.send((Arc::new(envelope), 1)).await;
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
        while in_hand.next().await.is_some() {}
    }

    async fn deliver(self: Arc<Self>, (envelope, attempt): Item) {
        let _in_flight = self
            .shared
            .tracker
            .start(WorkKind::Subscription, &self.label);
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

    /// Stops for good: the stream closes, deliveries in hand finish, the rest is dropped.
    pub fn close(&self) {
        self.held.lock().clear();
        self.stop_stream();
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

#[async_trait]
impl Settler for EventSettler {
    async fn settle(self: Box<Self>, settlement: Settlement) -> Result<(), BridgeError> {
        let Some(consumer) = self.consumer.upgrade() else {
            return Ok(());
        };
        match settlement {
            Settlement::Ack | Settlement::Drop { .. } => Ok(()),
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
