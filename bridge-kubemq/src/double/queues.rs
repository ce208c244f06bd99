//! Queues, as KubeMQ documents them: messages wait in a channel until a receiver takes them,
//! in sequence order. A message's policy may delay it (`DelaySeconds`), expire it
//! (`ExpirationSeconds`) and bound how often it is received (`MaxReceiveCount`): a message
//! received that often and then rejected again goes to `MaxReceiveQueue`, marked re-routed.
//!
//! Receivers: the simple pull (`ReceiveQueueMessages`, taking or peeking), the transactional
//! downstream (`QueuesDownstream`: a poll holds messages until they are acked, rejected or
//! re-queued, and the end of the stream returns what it still holds) and the one-message
//! stream with a visibility timeout (`StreamQueueMessage`: held for `VisibilitySeconds`,
//! extendable with `ModifyVisibility`, back in the queue when it expires).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use kubemq::proto::kubemq::{QueueMessage, QueueMessageAttributes, SendQueueMessageResult};
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::pubsub::now_ns;
use super::wildcard;

/// Who holds a message that is not ready.
#[derive(Debug, Clone, PartialEq)]
pub enum Hold {
    /// A downstream transaction, until settled or its stream ends.
    Transaction(String),
    /// A visibility lease, until `until` (or settled).
    Lease { holder: String, until: Instant },
}

struct Entry {
    message: QueueMessage,
    hold: Option<Hold>,
}

#[derive(Default)]
struct Channel {
    next_sequence: u64,
    entries: BTreeMap<u64, Entry>,
}

/// Counts of one queue channel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueDepth {
    /// Ready now.
    pub ready: usize,
    /// Waiting for their delay.
    pub delayed: usize,
    /// Held by a receiver.
    pub held: usize,
}

/// Every queue channel. Survives a server restart; holds of the dropped streams return.
#[derive(Default)]
pub struct Queues {
    channels: Mutex<HashMap<String, Channel>>,
    arrived: Notify,
}

/// KubeMQ's receive limit of a message whose policy names none (its `MaxReceiveCount`).
const DEFAULT_MAX_RECEIVE_COUNT: i32 = 1024;

/// How long a waiting receiver sleeps at most between looks (delays and leases end on time).
const LOOK_AGAIN: Duration = Duration::from_millis(25);

impl Queues {
    /// Validates and stores one message.
    pub fn send(&self, message: QueueMessage) -> SendQueueMessageResult {
        let mut result = SendQueueMessageResult {
            message_id: if message.message_id.is_empty() {
                super::new_id()
            } else {
                message.message_id.clone()
            },
            ..Default::default()
        };
        if let Err(error) = validate(&message) {
            result.is_error = true;
            result.error = error;
            return result;
        }
        let mut message = message;
        message.message_id = result.message_id.clone();
        let now = now_ns();
        let policy = message.policy.clone().unwrap_or_default();
        let mut attributes = QueueMessageAttributes {
            timestamp: now,
            ..Default::default()
        };
        if policy.expiration_seconds > 0 {
            attributes.expiration_at = now + policy.expiration_seconds as i64 * 1_000_000_000;
        }
        if policy.delay_seconds > 0 {
            attributes.delayed_to = now + policy.delay_seconds as i64 * 1_000_000_000;
        }
        result.sent_at = now;
        result.expiration_at = attributes.expiration_at;
        result.delayed_to = attributes.delayed_to;
        message.attributes = Some(attributes);
        self.store(message);
        result
    }

    fn store(&self, mut message: QueueMessage) {
        let mut channels = self.channels.lock();
        let channel = channels.entry(message.channel.clone()).or_default();
        channel.next_sequence += 1;
        let sequence = channel.next_sequence;
        if let Some(a) = message.attributes.as_mut() {
            a.sequence = sequence;
        }
        channel.entries.insert(
            sequence,
            Entry {
                message,
                hold: None,
            },
        );
        drop(channels);
        self.arrived.notify_waiters();
    }

    /// Up to `max` ready messages of `channel`, held by `hold` (or removed when `hold` is
    /// `None`: auto-ack), waiting up to `wait` for the first.
    pub async fn take(
        &self,
        channel: &str,
        max: usize,
        wait: Duration,
        hold: Option<Hold>,
    ) -> Vec<QueueMessage> {
        let deadline = Instant::now() + wait;
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            let taken = self.take_now(channel, max, hold.clone());
            if !taken.is_empty() || Instant::now() >= deadline {
                return taken;
            }
            let next = (Instant::now() + LOOK_AGAIN).min(deadline);
            tokio::select! {
                _ = arrived => {}
                _ = tokio::time::sleep_until(next) => {}
            }
        }
    }

    fn take_now(&self, name: &str, max: usize, hold: Option<Hold>) -> Vec<QueueMessage> {
        let mut channels = self.channels.lock();
        let mut rerouted = Vec::new();
        let mut out = Vec::new();
        if let Some(channel) = channels.get_mut(name) {
            reap(channel, name, &mut rerouted);
            let now = now_ns();
            let mut done = Vec::new();
            for (sequence, entry) in channel.entries.iter_mut() {
                if out.len() >= max {
                    break;
                }
                let a = entry
                    .message
                    .attributes
                    .get_or_insert_with(Default::default);
                if entry.hold.is_some() || a.delayed_to > now {
                    continue;
                }
                a.receive_count += 1;
                out.push(entry.message.clone());
                match &hold {
                    Some(h) => entry.hold = Some(h.clone()),
                    None => done.push(*sequence),
                }
            }
            for sequence in done {
                channel.entries.remove(&sequence);
            }
        }
        drop(channels);
        for m in rerouted {
            self.store(m);
        }
        out
    }

    /// Copies of up to `max` ready messages, nothing taken.
    pub fn peek(&self, name: &str, max: usize) -> Vec<QueueMessage> {
        let now = now_ns();
        let channels = self.channels.lock();
        channels.get(name).map_or_else(Vec::new, |c| {
            c.entries
                .values()
                .filter(|e| {
                    e.hold.is_none()
                        && e.message.attributes.as_ref().is_none_or(|a| {
                            a.delayed_to <= now && (a.expiration_at == 0 || a.expiration_at > now)
                        })
                })
                .take(max)
                .map(|e| e.message.clone())
                .collect()
        })
    }

    /// Removes every ready message of `name`; returns how many.
    pub fn ack_all(&self, name: &str) -> u64 {
        let now = now_ns();
        let mut channels = self.channels.lock();
        let Some(c) = channels.get_mut(name) else {
            return 0;
        };
        let before = c.entries.len();
        c.entries.retain(|_, e| {
            e.hold.is_some()
                || e.message
                    .attributes
                    .as_ref()
                    .is_some_and(|a| a.delayed_to > now)
        });
        (before - c.entries.len()) as u64
    }

    /// Settles held messages of `name` (every channel when empty) held by `hold` with
    /// sequences in `sequences` (all when `None`): `Ack` removes, `Reject` returns (or
    /// dead-letters), `Move(channel)` sends to another channel. Returns how many it settled.
    pub fn settle(&self, hold: &Hold, sequences: Option<&[u64]>, how: &Settle) -> usize {
        let mut channels = self.channels.lock();
        let mut moved = Vec::new();
        let mut count = 0;
        for (name, channel) in channels.iter_mut() {
            let hit: Vec<u64> = channel
                .entries
                .iter()
                .filter(|(s, e)| {
                    e.hold.as_ref().is_some_and(|h| same_holder(h, hold))
                        && sequences.is_none_or(|list| list.contains(s))
                })
                .map(|(s, _)| *s)
                .collect();
            for sequence in hit {
                count += 1;
                match how {
                    Settle::Ack => {
                        channel.entries.remove(&sequence);
                    }
                    Settle::Reject => {
                        if let Some(m) = release(channel, name, sequence) {
                            moved.push(m);
                        }
                    }
                    Settle::Move(to) => {
                        if let Some(e) = channel.entries.remove(&sequence) {
                            let mut m = e.message;
                            m.channel = to.clone();
                            if let Some(a) = m.attributes.as_mut() {
                                a.receive_count = 0;
                                a.delayed_to = 0;
                            }
                            moved.push(m);
                        }
                    }
                }
            }
        }
        drop(channels);
        for m in moved {
            self.store(m);
        }
        if count > 0 {
            self.arrived.notify_waiters();
        }
        count
    }

    /// Extends (or shortens) the lease of `holder`; `false` when it holds nothing any more.
    pub fn modify_visibility(&self, holder: &str, seconds: i32) -> bool {
        let until = Instant::now() + Duration::from_secs(seconds.max(0) as u64);
        let mut channels = self.channels.lock();
        let mut rerouted = Vec::new();
        let mut found = false;
        for (name, channel) in channels.iter_mut() {
            reap(channel, name, &mut rerouted);
            for entry in channel.entries.values_mut() {
                if let Some(Hold::Lease {
                    holder: h,
                    until: u,
                }) = entry.hold.as_mut()
                    && h == holder
                {
                    *u = until;
                    found = true;
                }
            }
        }
        drop(channels);
        for m in rerouted {
            self.store(m);
        }
        found
    }

    /// Whether `holder` still holds a message (its lease has not run out).
    pub fn holds(&self, holder: &str) -> bool {
        let mut channels = self.channels.lock();
        let mut rerouted = Vec::new();
        let mut found = false;
        for (name, channel) in channels.iter_mut() {
            reap(channel, name, &mut rerouted);
            found |= channel
                .entries
                .values()
                .any(|e| matches!(&e.hold, Some(Hold::Lease { holder: h, .. }) if h == holder));
        }
        drop(channels);
        for m in rerouted {
            self.store(m);
        }
        found
    }

    /// Counts of `name`.
    pub fn depth(&self, name: &str) -> QueueDepth {
        let now = now_ns();
        let channels = self.channels.lock();
        let mut d = QueueDepth::default();
        if let Some(c) = channels.get(name) {
            for e in c.entries.values() {
                if e.hold.is_some() {
                    d.held += 1;
                } else if e
                    .message
                    .attributes
                    .as_ref()
                    .is_some_and(|a| a.delayed_to > now)
                {
                    d.delayed += 1;
                } else {
                    d.ready += 1;
                }
            }
        }
        d
    }

    /// Returns what every transaction and lease still holds (a server stop ends every stream:
    /// a lease ends as if its client went away, so the message counts one more receive).
    pub fn release_holds(&self) {
        let mut channels = self.channels.lock();
        let mut rerouted = Vec::new();
        for (name, c) in channels.iter_mut() {
            let held: Vec<u64> = c
                .entries
                .iter()
                .filter(|(_, e)| e.hold.is_some())
                .map(|(s, _)| *s)
                .collect();
            for sequence in held {
                if let Some(m) = release(c, name, sequence) {
                    rerouted.push(m);
                }
            }
        }
        drop(channels);
        for m in rerouted {
            self.store(m);
        }
        self.arrived.notify_waiters();
    }
}

/// How held messages are settled.
pub enum Settle {
    /// Done: remove.
    Ack,
    /// Back to the queue (or its dead-letter queue when received too often).
    Reject,
    /// Into another channel.
    Move(String),
}

fn same_holder(a: &Hold, b: &Hold) -> bool {
    match (a, b) {
        (Hold::Transaction(x), Hold::Transaction(y)) => x == y,
        (Hold::Lease { holder: x, .. }, Hold::Lease { holder: y, .. }) => x == y,
        _ => false,
    }
}

/// Drops expired messages and returns expired leases (dead-lettering what was received too
/// often) of one channel.
fn reap(channel: &mut Channel, name: &str, rerouted: &mut Vec<QueueMessage>) {
    let now_instant = Instant::now();
    let now = now_ns();
    channel.entries.retain(|_, e| {
        e.hold.is_some()
            || e.message
                .attributes
                .as_ref()
                .is_none_or(|a| a.expiration_at == 0 || a.expiration_at > now)
    });
    let expired: Vec<u64> = channel
        .entries
        .iter()
        .filter(|(_, e)| matches!(e.hold, Some(Hold::Lease { until, .. }) if until <= now_instant))
        .map(|(s, _)| *s)
        .collect();
    for sequence in expired {
        if let Some(m) = release(channel, name, sequence) {
            rerouted.push(m);
        }
    }
}

/// Returns a held message to its queue, or takes it out for its dead-letter queue when it
/// was received `MaxReceiveCount` times. A message dead-lettered with no queue named is gone.
fn release(channel: &mut Channel, name: &str, sequence: u64) -> Option<QueueMessage> {
    let entry = channel.entries.get_mut(&sequence)?;
    let policy = entry.message.policy.clone().unwrap_or_default();
    let received = entry
        .message
        .attributes
        .as_ref()
        .map_or(0, |a| a.receive_count);
    // KubeMQ's default limit applies to a message that names none.
    let max_receive_count = if policy.max_receive_count > 0 {
        policy.max_receive_count
    } else {
        DEFAULT_MAX_RECEIVE_COUNT
    };
    if received >= max_receive_count {
        let mut m = channel.entries.remove(&sequence)?.message;
        if policy.max_receive_queue.is_empty() {
            tracing::debug!(
                queue = name,
                "message received too often and no dead-letter queue: dropped"
            );
            return None;
        }
        m.channel = policy.max_receive_queue.clone();
        m.policy = None;
        if let Some(a) = m.attributes.as_mut() {
            a.re_routed = true;
            a.re_routed_from_queue = name.to_string();
            a.delayed_to = 0;
            a.expiration_at = 0;
        }
        return Some(m);
    }
    entry.hold = None;
    None
}

/// KubeMQ's checks on a queue message.
fn validate(m: &QueueMessage) -> Result<(), String> {
    if m.channel.is_empty() {
        return Err("queue message channel cannot be empty".into());
    }
    if wildcard::has_wildcards(&m.channel) || m.channel.contains(' ') {
        return Err("queue channel cannot contain wildcards or whitespace".into());
    }
    if m.metadata.is_empty() && m.body.is_empty() && m.tags.is_empty() {
        return Err("queue message must have metadata, body or tags".into());
    }
    if let Some(p) = &m.policy
        && (p.delay_seconds < 0 || p.expiration_seconds < 0 || p.max_receive_count < 0)
    {
        return Err("queue message policy values cannot be negative".into());
    }
    Ok(())
}
