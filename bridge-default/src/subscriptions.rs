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
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;
use parking_lot::{Mutex, RwLock};
use purista_core::{
    BridgeError, Delivery, DeliveryHandler, Envelope, SettleOnce, Settlement, Settler,
    SubscriptionSpec, WorkKind,
};
use tokio::sync::{Semaphore, watch};

use crate::broker::Hub;
use crate::consumer_queue::{ConsumerQueue, Pushed, Queued};
use crate::tasks::TaskSet;

/// One bridge instance's consumer of one subscription.
pub(crate) struct Consumer {
    pub(crate) spec: SubscriptionSpec,
    /// Group id: the registration key for shared subscriptions, key + instance for broadcast.
    pub(crate) group: Arc<str>,
    /// The registration key, as a cheap label for tasks and logs.
    pub(crate) label: Arc<str>,
    pub(crate) queue: ConsumerQueue,
    prefetch: Arc<Semaphore>,
    closing: watch::Receiver<bool>,
}

impl Consumer {
    pub(crate) fn new(
        spec: SubscriptionSpec,
        instance_id: &str,
        buffer: usize,
        dropped: Arc<AtomicU64>,
        closing: watch::Receiver<bool>,
    ) -> Arc<Self> {
        let group: Arc<str> = if spec.shared {
            spec.key.as_str().into()
        } else {
            format!("{}#{}", spec.key, instance_id).into()
        };
        let prefetch = usize::from(spec.prefetch.max(1));
        Arc::new(Consumer {
            label: spec.key.as_str().into(),
            group,
            queue: ConsumerQueue::new(buffer, dropped),
            prefetch: Arc::new(Semaphore::new(prefetch)),
            closing,
            spec,
        })
    }

    /// Stops the consumer task; buffered messages are dropped (nothing here is durable).
    pub(crate) fn close(&self) {
        self.prefetch.close();
        let dropped = self.queue.close();
        if dropped > 0 {
            tracing::warn!(
                registration = %self.label,
                dropped,
                "subscription consumer closed: buffered messages dropped"
            );
        }
    }
}

/// The consumer task: takes deliveries while a prefetch permit is free and runs the handler
/// for each. Ends when the consumer is closed.
///
/// With a prefetch of 1 (the default) the handler runs inline in this task, which saves a task
/// per delivery; with more, each delivery gets its own task in the bridge's [`TaskSet`].
pub(crate) async fn run_consumer(
    consumer: Arc<Consumer>,
    handler: Arc<dyn DeliveryHandler>,
    hub: Arc<Hub>,
    tasks: Arc<TaskSet>,
) {
    if consumer.spec.prefetch <= 1 {
        while let Some(item) = consumer.queue.next().await {
            let delivery = delivery_for(&consumer, &hub, item);
            let outcome = AssertUnwindSafe(handler.deliver(delivery))
                .catch_unwind()
                .await;
            if outcome.is_err() {
                tracing::error!(registration = %consumer.label, "subscription handler panicked");
            }
        }
    } else {
        loop {
            // Permit first, then the message: a handler that pauses the consumer has settled
            // before its permit returns, so no further message is taken in between.
            let Ok(permit) = consumer.prefetch.clone().acquire_owned().await else {
                break;
            };
            let Some(item) = consumer.queue.next().await else {
                break;
            };
            let delivery = delivery_for(&consumer, &hub, item);
            let handler = handler.clone();
            let spawned = tasks.spawn(WorkKind::Subscription, consumer.label.clone(), async move {
                handler.deliver(delivery).await;
                drop(permit);
            });
            if !spawned {
                break;
            }
        }
    }
    tracing::debug!(registration = %consumer.label, "subscription consumer stopped");
}

fn delivery_for(consumer: &Arc<Consumer>, hub: &Arc<Hub>, item: Queued) -> Delivery {
    let settler = QueueSettler {
        consumer: consumer.clone(),
        hub: hub.clone(),
        envelope: item.envelope.clone(),
        attempt: item.attempt,
    };
    Delivery {
        settle: SettleOnce::new(item.envelope.id.clone(), Box::new(settler)),
        envelope: item.envelope,
        attempt: item.attempt,
    }
}

/// Carries out one delivery's settlement in memory.
struct QueueSettler {
    consumer: Arc<Consumer>,
    hub: Arc<Hub>,
    envelope: Arc<Envelope>,
    attempt: u32,
}

#[async_trait]
impl Settler for QueueSettler {
    async fn settle(self: Box<Self>, settlement: Settlement) -> Result<(), BridgeError> {
        let QueueSettler {
            consumer,
            hub,
            envelope,
            attempt,
        } = *self;
        match settlement {
            Settlement::Ack | Settlement::Drop { .. } => {}
            Settlement::Redeliver {
                delay,
                next_attempt,
            } => schedule_redelivery(hub, &consumer, envelope, next_attempt, delay),
            Settlement::DeadLetter(note) => hub.dead_letters.push(note, &envelope),
            Settlement::Pause { reason } => {
                tracing::warn!(registration = %consumer.label, %reason, "subscription consumer paused");
                consumer
                    .queue
                    .pause(Queued { envelope, attempt }, &consumer.spec.key, reason);
            }
        }
        Ok(())
    }
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
struct RouteTable {
    groups: Vec<Group>,
    by_id: HashMap<Arc<str>, usize>,
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

    /// Offers a message to every group whose filter it matches, one member per group. Waits for
    /// buffer space (backpressure) unless the chosen member is paused.
    pub(crate) async fn offer(&self, envelope: &Arc<Envelope>) {
        let table = self.table.read().clone();
        for group in &table.groups {
            if let Some(member) = group.pick(envelope, true) {
                let item = Queued {
                    envelope: envelope.clone(),
                    attempt: 1,
                };
                member.queue.push(item, &member.spec.key).await;
            }
        }
    }

    /// Puts a redelivery back into group `group`, to any member.
    pub(crate) async fn requeue(&self, group: &str, item: Queued) {
        let table = self.table.read().clone();
        let member = table
            .by_id
            .get(group)
            .and_then(|&i| table.groups[i].pick(&item.envelope, false));
        match member {
            Some(member) => {
                if member.queue.push(item, &member.spec.key).await == Pushed::Closed {
                    tracing::warn!(registration = %group, "redelivery dropped: consumer closed");
                }
            }
            None => tracing::warn!(
                registration = %group,
                message_id = %item.envelope.id,
                "redelivery dropped: subscription no longer registered"
            ),
        }
    }
}
