//! Subscription routing, consumers and settlement.
//!
//! The hub keeps every subscription consumer of every bridge instance in *groups*: a shared
//! subscription (`spec.shared`) is one group per registration key across all instances, so each
//! message goes to exactly one member (round robin, running members first); a broadcast
//! subscription is a group of one per instance, so every instance gets every message.
//!
//! Publishing reads an immutable snapshot of the groups ([`RouteTable`]) that is rebuilt on every
//! (un)registration, so the hot path takes one short read lock, matches each group's filter with
//! core's reference matcher and pushes the shared `Arc<Envelope>` into one member's
//! [`ConsumerQueue`]: no envelope is cloned or encoded per delivery.
//!
//! Each consumer runs one task that takes deliveries from its buffer and runs the handler for
//! up to `prefetch` of them at a time. The handler's settlement comes back through
//! [`QueueSettler`], which carries it out in memory: redeliveries go back to the group after a
//! timer, dead letters to the hub's store, a pause puts the delivery back at the front.

use std::collections::{BTreeMap, HashMap};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use parking_lot::{Mutex, RwLock};
use purista_core::{
    BridgeError, Delivery, DeliveryHandler, Envelope, SettleOnce, Settlement, Settler,
    SubscriptionSpec,
};
use tokio::sync::watch;

use crate::broker::Hub;
use crate::consumer_queue::{ConsumerQueue, Drops, NotPushed, Queued};

/// One bridge instance's consumer of one subscription.
pub(crate) struct Consumer {
    pub(crate) spec: SubscriptionSpec,
    /// Group id: the registration key for shared subscriptions, key + instance for broadcast.
    pub(crate) group: Arc<str>,
    /// The registration key, as a cheap label for tasks and logs.
    pub(crate) label: Arc<str>,
    pub(crate) queue: ConsumerQueue,
    /// The counters of this consumer's bridge instance.
    drops: Arc<Drops>,
    /// Where settlements go. Weak: the hub holds its consumers.
    hub: Weak<Hub>,
    closing: watch::Receiver<bool>,
}

impl Consumer {
    pub(crate) fn new(
        spec: SubscriptionSpec,
        hub: &Arc<Hub>,
        instance_id: &str,
        buffer: usize,
        drops: Arc<Drops>,
        closing: watch::Receiver<bool>,
    ) -> Arc<Self> {
        let group: Arc<str> = if spec.shared {
            spec.key.as_str().into()
        } else {
            format!("{}#{}", spec.key, instance_id).into()
        };
        Arc::new(Consumer {
            label: spec.key.as_str().into(),
            group,
            queue: ConsumerQueue::new(buffer, drops.clone()),
            drops,
            hub: Arc::downgrade(hub),
            closing,
            spec,
        })
    }

    /// Stops the consumer task. Returns what it had buffered but not started, for
    /// [`SubscriptionRoutes::hand_back`] (or [`Consumer::drop_buffered`]).
    pub(crate) fn close(&self) -> Vec<Queued> {
        self.queue.close()
    }

    /// Drops what a closed consumer had buffered, with a warning (nothing here is durable).
    pub(crate) fn drop_buffered(&self, left: Vec<Queued>) {
        if !left.is_empty() {
            self.count_lost(left.len());
            tracing::warn!(
                registration = %self.label,
                dropped = left.len(),
                "subscription consumer closed: buffered messages dropped"
            );
        }
    }

    /// Counts `n` messages meant for this consumer that nobody will handle: it closed first
    /// and no other instance of its subscription was left.
    fn count_lost(&self, n: usize) {
        self.drops
            .after_close
            .fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

/// Offers `item` to `member`, waiting for buffer space; should the member close first (it has
/// left its group by then), to another member of the group.
async fn push_to_member(member: &Consumer, item: Queued) {
    let Err(item) = member.queue.push(item, member.spec.key.as_str()).await else {
        return;
    };
    let Some(hub) = member.hub.upgrade() else {
        return;
    };
    if hub
        .subscriptions
        .push_to_group(&member.group, item)
        .await
        .is_err()
    {
        member.count_lost(1);
        tracing::warn!(
            registration = %member.label,
            "subscription consumer closed while a message waited for room in its buffer, and no other instance of the subscription is left: message dropped"
        );
    }
}

/// The consumer task: takes deliveries while fewer than `prefetch` are in hand and runs the
/// handler for each. Ends when the consumer is closed and the deliveries in hand are done.
///
/// Deliveries run concurrently inside this one task (a task per delivery would cost a spawn
/// and the bookkeeping of the bridge's task set on every message). With a prefetch of 1 (the
/// default) the handler simply runs inline.
pub(crate) async fn run_consumer(consumer: Arc<Consumer>, handler: Arc<dyn DeliveryHandler>) {
    let prefetch = usize::from(consumer.spec.prefetch.max(1));
    if prefetch == 1 {
        while let Some(item) = consumer.queue.next().await {
            deliver(&consumer, &*handler, item).await;
        }
    } else {
        let mut in_hand = FuturesUnordered::new();
        let next = consumer.queue.next();
        tokio::pin!(next);
        loop {
            // A slot first, then the message: a handler that pauses the consumer has settled
            // before its slot frees, so no further message is taken in between.
            tokio::select! {
                biased;
                Some(()) = in_hand.next(), if !in_hand.is_empty() => {}
                item = &mut next, if in_hand.len() < prefetch => {
                    let Some(item) = item else { break };
                    in_hand.push(deliver(&consumer, &*handler, item));
                    next.set(consumer.queue.next());
                }
            }
        }
        while in_hand.next().await.is_some() {}
    }
    tracing::debug!(registration = %consumer.label, "subscription consumer stopped");
}

/// Runs the handler for one delivery; a panic is logged and ends only this delivery.
async fn deliver(consumer: &Arc<Consumer>, handler: &dyn DeliveryHandler, item: Queued) {
    let delivery = Delivery {
        settle: SettleOnce::new(
            item.envelope.id.as_str(),
            Box::new(QueueSettler {
                consumer: consumer.clone(),
                envelope: item.envelope.clone(),
                attempt: item.attempt,
            }),
        ),
        envelope: item.envelope,
        attempt: item.attempt,
    };
    let outcome = AssertUnwindSafe(handler.deliver(delivery))
        .catch_unwind()
        .await;
    if outcome.is_err() {
        tracing::error!(registration = %consumer.label, "subscription handler panicked");
    }
}

/// Carries out one delivery's settlement in memory.
struct QueueSettler {
    consumer: Arc<Consumer>,
    envelope: Arc<Envelope>,
    attempt: u32,
}

#[async_trait]
impl Settler for QueueSettler {
    async fn settle(self: Box<Self>, settlement: Settlement) -> Result<(), BridgeError> {
        let QueueSettler {
            consumer,
            envelope,
            attempt,
        } = *self;
        match settlement {
            Settlement::Ack | Settlement::Drop { .. } => {}
            Settlement::Redeliver {
                delay,
                next_attempt,
            } => match consumer.hub.upgrade() {
                Some(hub) => schedule_redelivery(hub, &consumer, envelope, next_attempt, delay),
                None => hub_gone(&consumer, &envelope),
            },
            Settlement::DeadLetter(note) => match consumer.hub.upgrade() {
                Some(hub) => hub
                    .dead_letters
                    .push(note, envelope, consumer.group.clone()),
                None => hub_gone(&consumer, &envelope),
            },
            Settlement::Pause { reason } => {
                tracing::warn!(registration = %consumer.label, %reason, "subscription consumer paused");
                consumer.queue.pause(
                    Queued { envelope, attempt },
                    consumer.spec.key.as_str(),
                    reason,
                );
            }
        }
        Ok(())
    }
}

/// Every bridge on the hub is gone: there is nobody left to redeliver or dead-letter to.
fn hub_gone(consumer: &Consumer, envelope: &Envelope) {
    tracing::debug!(
        registration = %consumer.label,
        message_id = %envelope.id,
        "settlement dropped: the hub is gone"
    );
}

/// Puts a message back into its subscription group after `delay`, without blocking anything.
///
/// Always a separate task, even without delay: pushing from inside the handler could wait for
/// buffer space that only this very consumer would free.
fn schedule_redelivery(
    hub: Arc<Hub>,
    consumer: &Consumer,
    envelope: Arc<Envelope>,
    attempt: u32,
    delay: Duration,
) {
    let group = consumer.group.clone();
    let mut closing = consumer.closing.clone();
    // Stoppable: the timer ends when its bridge shuts down or is dropped.
    tokio::spawn(async move {
        let due = tokio::select! {
            () = tokio::time::sleep(delay) => true,
            _ = closing.wait_for(|closing| *closing) => false,
        };
        if due {
            hub.subscriptions
                .requeue(&group, Queued { envelope, attempt })
                .await;
        } else {
            tracing::debug!(
                registration = %group,
                message_id = %envelope.id,
                "redelivery dropped: bridge shut down"
            );
        }
    });
}

/// One routing group: a shared subscription across instances, or one broadcast member.
struct Group {
    members: Vec<Arc<Consumer>>,
    next: AtomicUsize,
}

impl Group {
    /// Round robin over members whose filter matches (all when `check_filter` is false);
    /// running members first, a paused one only when all are paused (the message then waits).
    fn pick(&self, envelope: &Envelope, check_filter: bool) -> Option<&Arc<Consumer>> {
        let n = self.members.len();
        if n == 1 {
            let only = &self.members[0];
            return (!check_filter || only.spec.filter.matches(envelope)).then_some(only);
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut paused = None;
        for i in 0..n {
            let member = &self.members[(start + i) % n];
            if check_filter && !member.spec.filter.matches(envelope) {
                continue;
            }
            if !member.queue.is_paused() {
                return Some(member);
            }
            paused.get_or_insert(member);
        }
        paused
    }
}

/// An immutable snapshot of all groups, swapped whole on every change.
#[derive(Default)]
pub(crate) struct RouteTable {
    groups: Vec<Group>,
    by_id: HashMap<Arc<str>, usize>,
}

impl RouteTable {
    /// True when some group's filter matches, i.e. [`RouteTable::offer`] would deliver it.
    pub(crate) fn wants(&self, envelope: &Envelope) -> bool {
        self.groups.iter().any(|group| {
            group
                .members
                .iter()
                .any(|member| member.spec.filter.matches(envelope))
        })
    }

    /// See [`SubscriptionRoutes::offer`].
    pub(crate) async fn offer(self: Arc<Self>, envelope: &Arc<Envelope>) {
        if let Some(rest) = self.offer_now(envelope) {
            rest.await;
        }
    }

    /// Offers to every matching group in order without waiting, until a buffer is full (or the
    /// picked member closed after this snapshot was taken). Then returns the rest of the offer,
    /// which waits for space or finds another member: boxed, so that publishing, whose future
    /// is allocated per message, stays small in the usual case of no waiting at all.
    fn offer_now(self: Arc<Self>, envelope: &Arc<Envelope>) -> Option<BoxFuture<'static, ()>> {
        for (i, group) in self.groups.iter().enumerate() {
            let Some(member) = group.pick(envelope, true) else {
                continue;
            };
            let item = Queued {
                envelope: envelope.clone(),
                attempt: 1,
            };
            if let Err(NotPushed::Full(item) | NotPushed::Closed(item)) =
                member.queue.try_push(item, member.spec.key.as_str())
            {
                let member = member.clone();
                let envelope = envelope.clone();
                return Some(Box::pin(async move {
                    push_to_member(&member, item).await;
                    for group in &self.groups[i + 1..] {
                        if let Some(member) = group.pick(&envelope, true) {
                            let item = Queued {
                                envelope: envelope.clone(),
                                attempt: 1,
                            };
                            push_to_member(member, item).await;
                        }
                    }
                }));
            }
        }
        None
    }
}

/// All subscription consumers of one hub.
#[derive(Default)]
pub(crate) struct SubscriptionRoutes {
    members: Mutex<BTreeMap<Arc<str>, Vec<Arc<Consumer>>>>,
    table: RwLock<Arc<RouteTable>>,
}

impl SubscriptionRoutes {
    /// Adds a consumer to its group.
    pub(crate) fn join(&self, consumer: Arc<Consumer>) {
        let mut members = self.members.lock();
        members
            .entry(consumer.group.clone())
            .or_default()
            .push(consumer);
        self.rebuild(&members);
    }

    /// Removes a consumer from its group.
    pub(crate) fn leave(&self, consumer: &Arc<Consumer>) {
        let mut members = self.members.lock();
        if let Some(group) = members.get_mut(&consumer.group) {
            group.retain(|m| !Arc::ptr_eq(m, consumer));
            if group.is_empty() {
                members.remove(&consumer.group);
            }
        }
        self.rebuild(&members);
    }

    fn rebuild(&self, members: &BTreeMap<Arc<str>, Vec<Arc<Consumer>>>) {
        let mut table = RouteTable::default();
        for (id, group) in members {
            table.by_id.insert(id.clone(), table.groups.len());
            table.groups.push(Group {
                members: group.clone(),
                next: AtomicUsize::new(0),
            });
        }
        *self.table.write() = Arc::new(table);
    }

    /// The current routes, for a caller that looks at them before offering.
    pub(crate) fn snapshot(&self) -> Arc<RouteTable> {
        self.table.read().clone()
    }

    /// Offers a message to every group whose filter it matches, one member per group. Waits for
    /// buffer space (backpressure) unless the chosen member is paused.
    pub(crate) async fn offer(&self, envelope: &Arc<Envelope>) {
        self.snapshot().offer(envelope).await;
    }

    /// Pushes `item` into the buffer of a member of group `group` (any member: they share the
    /// filter), waiting for space; a member that closes meanwhile has left the group, so the
    /// next try picks another. `Err` gives the item back when no member is left.
    pub(crate) async fn push_to_group(&self, group: &str, mut item: Queued) -> Result<(), Queued> {
        loop {
            let table = self.snapshot();
            let member = table
                .by_id
                .get(group)
                .and_then(|&i| table.groups[i].pick(&item.envelope, false))
                .cloned();
            let Some(member) = member else {
                return Err(item);
            };
            match member.queue.push(item, member.spec.key.as_str()).await {
                Ok(_) => return Ok(()),
                Err(back) => item = back,
            }
        }
    }

    /// Hands what a leaving member of a shared group had buffered but not started back to the
    /// group, so that another instance handles it (the consumer must have left the group
    /// first). A broadcast member's buffer holds its own copies: dropped, with a warning, as is
    /// what finds no member left (nothing in-process is durable); both are counted.
    pub(crate) async fn hand_back(&self, consumer: &Consumer, left: Vec<Queued>) {
        if left.is_empty() {
            return;
        }
        if !consumer.spec.shared {
            consumer.drop_buffered(left);
            return;
        }
        let mut dropped = 0usize;
        let handed_back = left.len();
        for item in left {
            if self.push_to_group(&consumer.group, item).await.is_err() {
                dropped += 1;
            }
        }
        if dropped > 0 {
            consumer.count_lost(dropped);
            tracing::warn!(
                registration = %consumer.label,
                dropped,
                "subscription consumer closed: buffered messages dropped, no other instance of the subscription is left"
            );
        } else {
            tracing::debug!(
                registration = %consumer.label,
                handed_back,
                "subscription consumer closed: buffered messages handed to the other instances"
            );
        }
    }

    /// Puts a redelivery back into group `group`, to any member. False (and a warning) when the
    /// group has no member left.
    pub(crate) async fn requeue(&self, group: &str, item: Queued) -> bool {
        match self.push_to_group(group, item).await {
            Ok(()) => true,
            Err(item) => {
                tracing::warn!(
                    registration = %group,
                    message_id = %item.envelope.id,
                    "redelivery dropped: subscription no longer registered"
                );
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use async_trait::async_trait;
    use purista_core::{
        Address, Delivery, DeliveryHandler, Envelope, EventBridge, FailurePolicy, SenderAddress,
        Settlement, SubscriptionFilter, SubscriptionSpec,
    };
    use tokio::sync::Semaphore;
    use tokio::time::Instant;

    use crate::MemoryBroker;

    /// Holds every delivery until the test adds a permit; counts how many run at once.
    struct Held {
        gate: Semaphore,
        running: AtomicUsize,
        most_at_once: AtomicUsize,
        done: AtomicUsize,
    }

    impl Held {
        fn new() -> Arc<Self> {
            Arc::new(Held {
                gate: Semaphore::new(0),
                running: AtomicUsize::new(0),
                most_at_once: AtomicUsize::new(0),
                done: AtomicUsize::new(0),
            })
        }
    }

    struct Holding(Arc<Held>);

    #[async_trait]
    impl DeliveryHandler for Holding {
        async fn deliver(&self, delivery: Delivery) {
            let held = &self.0;
            let now = held.running.fetch_add(1, Ordering::SeqCst) + 1;
            held.most_at_once.fetch_max(now, Ordering::SeqCst);
            if let Ok(permit) = held.gate.acquire().await {
                permit.forget();
            }
            held.running.fetch_sub(1, Ordering::SeqCst);
            delivery.settle.settle(Settlement::Ack).await.unwrap();
            held.done.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn spec(prefetch: u16) -> SubscriptionSpec {
        SubscriptionSpec {
            key: "listener@1/onTick".into(),
            subscriber: Address::new("listener", "1", "onTick"),
            filter: SubscriptionFilter::new().event_name("tick"),
            shared: false,
            durable: false,
            policy: FailurePolicy::default(),
            prefetch,
        }
    }

    async fn eventually(what: &str, condition: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    fn tick() -> Envelope {
        Envelope::custom(SenderAddress::default(), "tick", serde_json::json!(1))
    }

    #[tokio::test]
    async fn a_consumer_runs_up_to_prefetch_deliveries_at_once() {
        let bridge = MemoryBroker::new().bridge();
        let held = Held::new();
        bridge
            .register_subscription(spec(3), Arc::new(Holding(held.clone())))
            .await
            .unwrap();
        for _ in 0..7 {
            bridge.emit(tick()).await.unwrap();
        }

        eventually("three deliveries in hand", || {
            held.running.load(Ordering::SeqCst) == 3
        })
        .await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(held.most_at_once.load(Ordering::SeqCst), 3);

        held.gate.add_permits(7);
        eventually("every delivery handled", || {
            held.done.load(Ordering::SeqCst) == 7
        })
        .await;
        assert_eq!(held.most_at_once.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn shutdown_waits_for_the_deliveries_a_consumer_has_in_hand() {
        let bridge = MemoryBroker::new().bridge();
        let held = Held::new();
        bridge
            .register_subscription(spec(4), Arc::new(Holding(held.clone())))
            .await
            .unwrap();
        for _ in 0..2 {
            bridge.emit(tick()).await.unwrap();
        }
        eventually("both deliveries in hand", || {
            held.running.load(Ordering::SeqCst) == 2
        })
        .await;

        let release = {
            let held = held.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                held.gate.add_permits(2);
            }
        };
        let (report, ()) = tokio::join!(
            bridge.shutdown(Instant::now() + Duration::from_secs(5)),
            release
        );

        assert!(report.completed, "{report:?}");
        assert_eq!(held.done.load(Ordering::SeqCst), 2);
    }

    /// Records the `n` of every delivery and acks it.
    #[derive(Default)]
    struct Recording(parking_lot::Mutex<Vec<u64>>);

    #[async_trait]
    impl DeliveryHandler for Recording {
        async fn deliver(&self, delivery: Delivery) {
            let n = delivery.envelope.payload["n"].as_u64().unwrap_or(u64::MAX);
            self.0.lock().push(n);
            delivery.settle.settle(Settlement::Ack).await.unwrap();
        }
    }

    fn shared() -> SubscriptionSpec {
        SubscriptionSpec {
            shared: true,
            ..spec(1)
        }
    }

    fn numbered(n: u64) -> Envelope {
        Envelope::custom(
            SenderAddress::default(),
            "tick",
            serde_json::json!({ "n": n }),
        )
    }

    /// A consumer with a buffer of one, holding message 0 in hand and message 1 in its buffer,
    /// and a publisher (another instance) waiting for room for message 2.
    async fn full_consumer_and_waiting_publisher(
        broker: &MemoryBroker,
    ) -> (
        crate::MemoryBridge,
        Arc<Held>,
        tokio::task::JoinHandle<Result<(), purista_core::BridgeError>>,
    ) {
        let small = crate::MemoryBridgeConfig {
            consumer_buffer: 1,
            ..crate::MemoryBridgeConfig::default()
        };
        let leaving = broker.bridge_with(small);
        let held = Held::new();
        leaving
            .register_subscription(shared(), Arc::new(Holding(held.clone())))
            .await
            .unwrap();
        let publisher = Arc::new(broker.bridge());
        publisher.emit(numbered(0)).await.unwrap();
        eventually("message 0 in hand", || {
            held.running.load(Ordering::SeqCst) == 1
        })
        .await;
        publisher.emit(numbered(1)).await.unwrap();
        let (waiting, about_to) = tokio::sync::oneshot::channel();
        let publishing = tokio::spawn(async move {
            let _ = waiting.send(());
            publisher.emit(numbered(2)).await
        });
        // On this single-threaded runtime the publisher runs until it waits for room before
        // this test runs again.
        about_to.await.unwrap();
        tokio::task::yield_now().await;
        assert!(
            !publishing.is_finished(),
            "the publisher did not wait for room"
        );
        (leaving, held, publishing)
    }

    #[tokio::test]
    async fn a_message_waiting_for_room_goes_to_another_instance_when_its_consumer_leaves() {
        let broker = MemoryBroker::new();
        let (leaving, held, publishing) = full_consumer_and_waiting_publisher(&broker).await;
        let staying = broker.bridge();
        let got = Arc::new(Recording::default());
        staying
            .register_subscription(shared(), got.clone())
            .await
            .unwrap();

        leaving
            .unregister_subscription(&shared().key)
            .await
            .unwrap();
        publishing
            .await
            .unwrap()
            .expect("the waiting emit returns Ok");
        eventually("messages 1 and 2 at the staying instance", || {
            got.0.lock().len() == 2
        })
        .await;
        let mut seen = got.0.lock().clone();
        seen.sort_unstable();
        assert_eq!(
            seen,
            vec![1, 2],
            "the buffered and the waiting message both reach the other instance"
        );
        assert_eq!(leaving.dropped_after_close(), 0);
        held.gate.add_permits(1);
    }

    #[tokio::test]
    async fn a_message_waiting_for_room_is_counted_when_no_instance_is_left_to_take_it() {
        let broker = MemoryBroker::new();
        let (leaving, held, publishing) = full_consumer_and_waiting_publisher(&broker).await;

        leaving
            .unregister_subscription(&shared().key)
            .await
            .unwrap();
        publishing
            .await
            .unwrap()
            .expect("the waiting emit returns Ok: delivery is at most once");
        assert_eq!(
            leaving.dropped_after_close(),
            2,
            "the buffered message and the one waiting for room are both counted as dropped"
        );
        held.gate.add_permits(1);
    }
}
