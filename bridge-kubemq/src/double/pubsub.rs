//! Events and Events Store, as KubeMQ documents them.
//!
//! * **Events**: fire-and-forget fan-out to the subscribers connected *now*; a subscription may
//!   use wildcards; subscribers sharing a group name get each event once per group (one
//!   member, in turn), subscribers without a group each get it. Nothing is kept.
//! * **Events Store**: every event is kept per channel with a sequence number (1, 2, … per
//!   channel) and its timestamp; a subscription names where it starts (new only, first, last,
//!   a sequence, a time, a time delta), receives what is stored from there and then what is
//!   sent live, in order. Groups share live events like Events do. No wildcards.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use kubemq::proto::kubemq::{EventReceive, Subscribe, subscribe::EventsStoreType};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tonic012::Status;

use super::wildcard;

/// One live subscriber of Events or Events Store.
struct Subscriber {
    id: u64,
    pattern: String,
    group: String,
    tx: mpsc::Sender<Result<EventReceive, Status>>,
}

/// One stored event of a channel.
#[derive(Clone)]
struct Stored {
    event: EventReceive,
    at_ns: i64,
}

/// Events and Events Store state. Survives a server restart (only the subscribers go).
#[derive(Default)]
pub struct PubSub {
    next_id: AtomicU64,
    events: Mutex<Vec<Subscriber>>,
    store: Mutex<Store>,
    turns: Mutex<HashMap<(bool, String, String), usize>>,
}

#[derive(Default)]
struct Store {
    channels: HashMap<String, Vec<Stored>>,
    subscribers: Vec<Subscriber>,
}

/// Buffer of one subscriber's stream. A subscriber this far behind loses events (Events are
/// at most once); an Events Store subscriber is cut off instead, and resumes by sequence.
const SUBSCRIBER_BUFFER: usize = 4096;

pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

impl PubSub {
    /// Delivers an Events event to the current subscribers. Returns how many got it.
    pub fn publish_event(&self, event: EventReceive) -> usize {
        let mut subs = self.events.lock();
        subs.retain(|s| !s.tx.is_closed());
        let chosen = self.choose(false, &subs, &event.channel);
        let mut delivered = 0;
        for i in chosen {
            if subs[i].tx.try_send(Ok(event.clone())).is_ok() {
                delivered += 1;
            }
        }
        delivered
    }

    /// Indices of the subscribers that get an event on `channel`: every one without a group,
    /// one per group in turn.
    fn choose(&self, store: bool, subs: &[Subscriber], channel: &str) -> Vec<usize> {
        let mut out = Vec::new();
        let mut groups: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, s) in subs.iter().enumerate() {
            let hit = if store {
                s.pattern == channel
            } else {
                wildcard::matches(&s.pattern, channel)
            };
            if !hit {
                continue;
            }
            if s.group.is_empty() {
                out.push(i);
            } else {
                groups.entry(&s.group).or_default().push(i);
            }
        }
        let mut turns = self.turns.lock();
        for (group, members) in groups {
            let turn = turns
                .entry((store, channel.to_string(), group.to_string()))
                .or_insert(0);
            out.push(members[*turn % members.len()]);
            *turn = turn.wrapping_add(1);
        }
        out
    }

    /// A new Events subscriber.
    pub fn subscribe_events(
        &self,
        request: &Subscribe,
    ) -> mpsc::Receiver<Result<EventReceive, Status>> {
        let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
        self.events.lock().push(Subscriber {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            pattern: request.channel.clone(),
            group: request.group.clone(),
            tx,
        });
        rx
    }

    /// Stores an Events Store event and hands it to the live subscribers. Returns its sequence.
    pub fn publish_stored(&self, mut event: EventReceive) -> u64 {
        let mut store = self.store.lock();
        let log = store.channels.entry(event.channel.clone()).or_default();
        let sequence = log.len() as u64 + 1;
        let at_ns = now_ns();
        event.sequence = sequence;
        event.timestamp = at_ns;
        log.push(Stored {
            event: event.clone(),
            at_ns,
        });
        store.subscribers.retain(|s| !s.tx.is_closed());
        let chosen = self.choose(true, &store.subscribers, &event.channel);
        let mut cut = Vec::new();
        for i in chosen {
            if store.subscribers[i].tx.try_send(Ok(event.clone())).is_err() {
                cut.push(store.subscribers[i].id);
            }
        }
        // A subscriber that cannot keep up is cut off rather than silently skipped: it
        // resubscribes at the sequence it last saw.
        store.subscribers.retain(|s| !cut.contains(&s.id));
        sequence
    }

    /// A new Events Store subscriber: what is stored from its start position, then live events.
    pub fn subscribe_store(
        &self,
        request: &Subscribe,
    ) -> Result<mpsc::Receiver<Result<EventReceive, Status>>, Status> {
        let kind = EventsStoreType::try_from(request.events_store_type_data)
            .unwrap_or(EventsStoreType::Undefined);
        let value = request.events_store_type_value;
        let mut store = self.store.lock();
        let log = store
            .channels
            .get(&request.channel)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let backlog: Vec<EventReceive> = match kind {
            EventsStoreType::Undefined => {
                return Err(Status::invalid_argument(
                    "events store subscription requires a start position type",
                ));
            }
            EventsStoreType::StartNewOnly => Vec::new(),
            EventsStoreType::StartFromFirst => log.iter().map(|s| s.event.clone()).collect(),
            EventsStoreType::StartFromLast => {
                log.last().map(|s| s.event.clone()).into_iter().collect()
            }
            EventsStoreType::StartAtSequence => {
                if value <= 0 {
                    return Err(Status::invalid_argument(
                        "events store start at sequence requires a sequence > 0",
                    ));
                }
                log.iter()
                    .filter(|s| s.event.sequence >= value as u64)
                    .map(|s| s.event.clone())
                    .collect()
            }
            EventsStoreType::StartAtTime => {
                if value <= 0 {
                    return Err(Status::invalid_argument(
                        "events store start at time requires a time > 0",
                    ));
                }
                let from = time_value_ns(value);
                log.iter()
                    .filter(|s| s.at_ns >= from)
                    .map(|s| s.event.clone())
                    .collect()
            }
            EventsStoreType::StartAtTimeDelta => {
                if value <= 0 {
                    return Err(Status::invalid_argument(
                        "events store start at time delta requires seconds > 0",
                    ));
                }
                let from = now_ns() - value.saturating_mul(1_000_000_000);
                log.iter()
                    .filter(|s| s.at_ns >= from)
                    .map(|s| s.event.clone())
                    .collect()
            }
        };
        let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER + backlog.len());
        for event in backlog {
            // Capacity covers the backlog.
            let _ = tx.try_send(Ok(event));
        }
        store.subscribers.push(Subscriber {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            pattern: request.channel.clone(),
            group: request.group.clone(),
            tx,
        });
        Ok(rx)
    }

    /// Drops every subscriber (a server stop): their streams end.
    pub fn disconnect_all(&self) {
        self.events.lock().clear();
        self.store.lock().subscribers.clear();
    }

    /// Number of events stored on `channel`.
    pub fn stored(&self, channel: &str) -> usize {
        self.store.lock().channels.get(channel).map_or(0, Vec::len)
    }
}

/// A start time given in seconds or nanoseconds since the epoch (SDKs differ; KubeMQ accepts
/// both), in nanoseconds.
fn time_value_ns(value: i64) -> i64 {
    if value < 100_000_000_000 {
        value.saturating_mul(1_000_000_000)
    } else {
        value
    }
}
