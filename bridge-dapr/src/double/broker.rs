//! The pub/sub broker behind the double's sidecars.
//!
//! A daprd hands what it accepted to its pub/sub component (Redis Streams, Kafka, …), and the
//! broker outlives the sidecar's process: a consumer group keeps what is published for it while
//! none of its sidecars is subscribed, and what a sidecar took but had not acknowledged when it
//! went away is delivered again once one of the group subscribes (Redis Streams' pending
//! entries, Kafka's uncommitted offsets). This is that broker, kept by the double beside its
//! sidecars, so that stopping a sidecar and starting it again behaves as a daprd restart does:
//! nothing accepted is lost, duplicates are possible.
//!
//! A consumer group is known on a topic from the first time one of its sidecars subscribes to
//! it and is never forgotten (a group outlives its consumers); what was published on the topic
//! before is not for it (a group created at the end of the stream).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use axum::body::Bytes;
use parking_lot::Mutex;
use serde_json::Value;
use tokio::sync::mpsc::UnboundedSender;

use super::Subscription;

/// A published CloudEvent, written to bytes once for all its deliveries. Only its bytes are
/// kept while it waits (a JSON tree is several times their size); routing rules read it again.
pub(super) struct Event {
    /// The CloudEvent as it is posted to an app.
    pub body: Bytes,
}

impl Event {
    /// The CloudEvent as JSON (`null` if its bytes were no JSON, which the double never writes).
    pub fn value(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// A sidecar subscribed to the broker (one per sidecar; it keeps its id across restarts).
pub(super) type ConsumerId = u64;

/// A message handed to a sidecar for its app; the sidecar acknowledges it by `tag` once the
/// delivery is done (delivered, dropped, dead-lettered or not routed).
pub(super) struct Handout {
    /// The delivery tag, unique per handout: an acknowledgement of an earlier handout of the
    /// same message (by a sidecar process since gone) does not settle this one.
    pub tag: u64,
    /// The subscription of the sidecar the message is delivered for (shared by its
    /// handouts: a waiting handout costs a pointer, not a copy of the routing rules).
    pub subscription: Arc<Subscription>,
    /// The CloudEvent.
    pub event: Arc<Event>,
}

/// A published message on its way to one consumer group.
#[derive(Clone)]
struct Message {
    /// Publish order.
    seq: u64,
    pubsub: Arc<str>,
    topic: Arc<str>,
    event: Arc<Event>,
}

impl Message {
    fn is_on(&self, subscription: &Subscription) -> bool {
        *subscription.pubsub == *self.pubsub && *subscription.topic == *self.topic
    }
}

/// A subscribed sidecar.
struct Consumer {
    group: Arc<str>,
    subscriptions: Vec<Arc<Subscription>>,
    deliveries: UnboundedSender<Handout>,
}

/// A message handed to a sidecar and not acknowledged yet.
struct Held {
    consumer: ConsumerId,
    group: Arc<str>,
    message: Message,
}

/// The broker: consumer groups, what waits for each, what sidecars hold unacknowledged.
#[derive(Default)]
pub(super) struct Broker {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The consumer groups each `(pubsub, topic)` keeps messages for.
    groups: HashMap<(String, String), BTreeSet<String>>,
    consumers: BTreeMap<ConsumerId, Consumer>,
    /// Per group, what no sidecar holds, in publish order: published while none of the
    /// group's sidecars was subscribed to its topic, or given back by a sidecar that went away.
    backlog: HashMap<String, BTreeMap<u64, Message>>,
    /// Handed out and not acknowledged, by delivery tag.
    held: HashMap<u64, Held>,
    /// Messages accepted per `(pubsub, topic)`.
    accepted: HashMap<(String, String), u64>,
    next_seq: u64,
    next_tag: u64,
    round_robin: usize,
}

impl State {
    /// Hands `message` to one sidecar of `group` subscribed to its topic (round robin), or
    /// keeps it for the group when none is.
    fn route(&mut self, group: &str, message: Message) {
        let candidates: Vec<(ConsumerId, Arc<str>, Arc<Subscription>)> = self
            .consumers
            .iter()
            .filter(|(_, c)| *c.group == *group)
            .filter_map(|(id, c)| {
                let subscription = c.subscriptions.iter().find(|s| message.is_on(s))?;
                Some((*id, c.group.clone(), subscription.clone()))
            })
            .collect();
        if candidates.is_empty() {
            self.keep(group, message);
            return;
        }
        self.round_robin = self.round_robin.wrapping_add(1);
        let (id, group_name, subscription) =
            candidates[self.round_robin % candidates.len()].clone();
        let tag = self.next_tag;
        self.next_tag += 1;
        let handout = Handout {
            tag,
            subscription,
            event: message.event.clone(),
        };
        let sent = self
            .consumers
            .get(&id)
            .is_some_and(|c| c.deliveries.send(handout).is_ok());
        if sent {
            self.held.insert(
                tag,
                Held {
                    consumer: id,
                    group: group_name,
                    message,
                },
            );
        } else {
            self.keep(group, message);
        }
    }

    fn keep(&mut self, group: &str, message: Message) {
        self.backlog
            .entry(group.to_string())
            .or_default()
            .insert(message.seq, message);
    }
}

impl Broker {
    /// Accepts `event` on `pubsub`/`topic`: one delivery per consumer group known on it.
    pub(super) fn publish(&self, pubsub: &str, topic: &str, event: Value) {
        let mut state = self.state.lock();
        let key = (pubsub.to_string(), topic.to_string());
        *state.accepted.entry(key.clone()).or_default() += 1;
        state.next_seq += 1;
        let message = Message {
            seq: state.next_seq,
            pubsub: Arc::from(pubsub),
            topic: Arc::from(topic),
            event: Arc::new(Event {
                body: serde_json::to_vec(&event).unwrap_or_default().into(),
            }),
        };
        let groups: Vec<String> = state
            .groups
            .get(&key)
            .map(|groups| groups.iter().cloned().collect())
            .unwrap_or_default();
        for group in groups {
            state.route(&group, message.clone());
        }
    }

    /// Subscribes sidecar `id` of `group` (again, with what it read from its app now): its
    /// group is known on each topic from now on, and what waited for the group on them is
    /// handed to it, oldest first, before anything published later.
    pub(super) fn subscribe(
        &self,
        id: ConsumerId,
        group: &str,
        subscriptions: Vec<Subscription>,
        deliveries: UnboundedSender<Handout>,
    ) {
        let mut state = self.state.lock();
        for s in &subscriptions {
            state
                .groups
                .entry((s.pubsub.clone(), s.topic.clone()))
                .or_default()
                .insert(group.to_string());
        }
        let waiting: Vec<Message> = match state.backlog.get_mut(group) {
            None => Vec::new(),
            Some(backlog) => {
                let seqs: Vec<u64> = backlog
                    .values()
                    .filter(|m| subscriptions.iter().any(|s| m.is_on(s)))
                    .map(|m| m.seq)
                    .collect();
                seqs.iter().filter_map(|seq| backlog.remove(seq)).collect()
            }
        };
        state.consumers.insert(
            id,
            Consumer {
                group: Arc::from(group),
                subscriptions: subscriptions.into_iter().map(Arc::new).collect(),
                deliveries,
            },
        );
        for message in waiting {
            state.route(group, message);
        }
    }

    /// Sidecar `id` went away: what it held unacknowledged goes to another sidecar of its
    /// group, or waits for the group, in publish order.
    pub(super) fn unsubscribe(&self, id: ConsumerId) {
        let mut state = self.state.lock();
        if state.consumers.remove(&id).is_none() {
            return;
        }
        let tags: Vec<u64> = state
            .held
            .iter()
            .filter(|(_, h)| h.consumer == id)
            .map(|(tag, _)| *tag)
            .collect();
        let mut returned: Vec<Held> = tags.iter().filter_map(|t| state.held.remove(t)).collect();
        returned.sort_by_key(|h| h.message.seq);
        for held in returned {
            state.route(&held.group, held.message);
        }
    }

    /// Deletes consumer group `group`, with what waits for it, unless one of its sidecars is
    /// subscribed: its last sidecar was removed for good (the app is no longer deployed), as
    /// an operator deletes a consumer group. Without this, a process that keeps publishing on a
    /// topic (a test run, a benchmark) would keep every message for apps long gone.
    pub(super) fn forget_if_unused(&self, group: &str) {
        let mut state = self.state.lock();
        if state.consumers.values().any(|c| *c.group == *group) {
            return;
        }
        for groups in state.groups.values_mut() {
            groups.remove(group);
        }
        state.backlog.remove(group);
        state.held.retain(|_, h| *h.group != *group);
    }

    /// The delivery `tag` is done; an unknown tag (a handout given back since) is ignored.
    pub(super) fn ack(&self, tag: u64) {
        self.state.lock().held.remove(&tag);
    }

    /// Messages accepted on `pubsub`/`topic` so far.
    pub(super) fn accepted(&self, pubsub: &str, topic: &str) -> u64 {
        self.state
            .lock()
            .accepted
            .get(&(pubsub.to_string(), topic.to_string()))
            .copied()
            .unwrap_or(0)
    }

    /// Deliveries to consumer group `group` not acknowledged yet: held by one of its
    /// sidecars, or waiting while none of them is subscribed.
    pub(super) fn unacknowledged(&self, group: &str) -> usize {
        let state = self.state.lock();
        let held = state.held.values().filter(|h| *h.group == *group).count();
        held + state.backlog.get(group).map_or(0, BTreeMap::len)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use tokio::sync::mpsc;

    use super::*;

    fn subscription(topic: &str) -> Subscription {
        Subscription {
            pubsub: "pubsub".into(),
            topic: topic.into(),
            rules: Vec::new(),
            dead_letter_topic: None,
        }
    }

    fn numbers(handouts: &mut mpsc::UnboundedReceiver<Handout>) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        while let Ok(h) = handouts.try_recv() {
            out.push((h.tag, h.event.value()["n"].as_u64().unwrap_or(u64::MAX)));
        }
        out
    }

    #[test]
    fn a_group_keeps_what_is_published_while_none_of_its_sidecars_is_subscribed() {
        let broker = Broker::default();
        broker.publish("pubsub", "t", json!({ "n": 0 }));
        let (tx, mut rx) = mpsc::unbounded_channel();
        broker.subscribe(1, "g", vec![subscription("t")], tx);
        assert!(numbers(&mut rx).is_empty(), "published before the group");
        broker.unsubscribe(1);
        broker.publish("pubsub", "t", json!({ "n": 1 }));
        broker.publish("pubsub", "other", json!({ "n": 2 }));
        assert_eq!(broker.unacknowledged("g"), 1);
        let (tx, mut rx) = mpsc::unbounded_channel();
        broker.subscribe(1, "g", vec![subscription("t")], tx);
        broker.publish("pubsub", "t", json!({ "n": 3 }));
        let got: Vec<u64> = numbers(&mut rx).into_iter().map(|(_, n)| n).collect();
        assert_eq!(got, [1, 3], "the kept message first");
        assert_eq!(broker.accepted("pubsub", "t"), 3);
    }

    #[test]
    fn a_group_whose_last_sidecar_is_removed_for_good_keeps_nothing() {
        let broker = Broker::default();
        let (tx, mut rx) = mpsc::unbounded_channel();
        broker.subscribe(1, "gone", vec![subscription("t")], tx);
        let (tx2, _rx2) = mpsc::unbounded_channel();
        broker.subscribe(2, "stays", vec![subscription("t")], tx2);
        broker.publish("pubsub", "t", json!({ "n": 0 }));
        assert_eq!(
            numbers(&mut rx).len(),
            1,
            "held by the sidecar, not acknowledged"
        );
        // Another group's sidecar still subscribed does not keep this group alive.
        broker.forget_if_unused("stays");
        assert_eq!(broker.unacknowledged("stays"), 1);
        broker.unsubscribe(1);
        broker.forget_if_unused("gone");
        broker.publish("pubsub", "t", json!({ "n": 1 }));
        assert_eq!(
            broker.unacknowledged("gone"),
            0,
            "nothing kept for a deleted group"
        );
        assert_eq!(broker.unacknowledged("stays"), 2);
    }

    #[test]
    fn what_a_sidecar_held_unacknowledged_is_handed_out_again_in_order() {
        let broker = Broker::default();
        let (tx, mut rx) = mpsc::unbounded_channel();
        broker.subscribe(1, "g", vec![subscription("t")], tx);
        for n in 0..4 {
            broker.publish("pubsub", "t", json!({ "n": n }));
        }
        let first = numbers(&mut rx);
        broker.ack(first[0].0);
        broker.ack(first[2].0);
        broker.unsubscribe(1);
        // A late acknowledgement from the process that went away settles nothing.
        broker.ack(first[1].0);
        assert_eq!(broker.unacknowledged("g"), 2);
        let (tx, mut rx) = mpsc::unbounded_channel();
        broker.subscribe(1, "g", vec![subscription("t")], tx);
        let again = numbers(&mut rx);
        assert_eq!(
            again.iter().map(|(_, n)| *n).collect::<Vec<_>>(),
            [1, 3],
            "the unacknowledged ones, oldest first"
        );
        for (tag, _) in again {
            broker.ack(tag);
        }
        assert_eq!(broker.unacknowledged("g"), 0);
    }

    #[test]
    fn another_sidecar_of_the_group_takes_over_what_one_held() {
        let broker = Broker::default();
        let (tx1, mut rx1) = mpsc::unbounded_channel();
        let (tx2, mut rx2) = mpsc::unbounded_channel();
        broker.subscribe(1, "g", vec![subscription("t")], tx1);
        broker.subscribe(2, "g", vec![subscription("t")], tx2);
        for n in 0..4 {
            broker.publish("pubsub", "t", json!({ "n": n }));
        }
        let one = numbers(&mut rx1);
        let two = numbers(&mut rx2);
        assert_eq!(one.len() + two.len(), 4, "once per group");
        broker.unsubscribe(1);
        let taken: Vec<u64> = numbers(&mut rx2).into_iter().map(|(_, n)| n).collect();
        assert_eq!(taken, one.iter().map(|(_, n)| *n).collect::<Vec<_>>());
    }
}
