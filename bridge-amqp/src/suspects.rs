//! Poison isolation: a delivery that takes the connection down whenever it is handled must not
//! take the instance down with it.
//!
//! Every delivery the bridge holds (taken from a queue, not yet settled) is *in hand*, with the
//! connection generation it came on. When a connection is lost, each delivery in hand on it
//! becomes a *suspect* (the broker hands it out again). A suspect is handled alone: it waits
//! for its registration's turn (one at a time), so that if the connection dies again, only the
//! one delivery in the middle of it is blamed, not the innocent ones handled beside it. A
//! delivery that was in hand at two losses is *quarantined* when it comes back: it does not
//! reach its handler again, it is dead-lettered with the reason where its subscription has a
//! dead-letter target and dropped with a warning otherwise, and counted as poison. One message
//! so costs at most two reconnects, and the instance goes on serving everything else.
//!
//! A delivery settled cleanly is forgiven. Deliveries are recognised by queue, message id and
//! a digest of the body, since a redelivery carries the same bytes.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use lapin::BasicProperties;
use parking_lot::Mutex;
use purista_core::kit::FastMap;

/// Most suspects remembered at once; beyond it the oldest knowledge is dropped (a flood of
/// connection losses must not grow memory without bound).
const MAX_SUSPECTS: usize = 10_000;

/// One delivery of one queue, as it comes back after a redelivery.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct DeliveryId {
    queue: Arc<str>,
    digest: u64,
}

impl DeliveryId {
    pub(crate) fn of(queue: &Arc<str>, properties: &BasicProperties, body: &[u8]) -> Self {
        let mut hasher = std::hash::DefaultHasher::new();
        properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str())
            .hash(&mut hasher);
        body.hash(&mut hasher);
        DeliveryId {
            queue: queue.clone(),
            digest: hasher.finish(),
        }
    }
}

/// How a delivery stands with the poison watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Standing {
    /// Never in hand at a connection loss.
    Clean,
    /// In hand at one loss: handled alone.
    Suspect,
    /// In hand at `losses` (two or more) losses: kept from its handler.
    Quarantined { losses: u32 },
}

/// The deliveries in hand and the suspects of one bridge instance.
#[derive(Default)]
pub(crate) struct Suspects {
    next: AtomicU64,
    in_hand: Mutex<FastMap<u64, (u64, DeliveryId)>>,
    losses: Mutex<FastMap<DeliveryId, u32>>,
}

impl Suspects {
    pub(crate) fn standing(&self, id: &DeliveryId) -> Standing {
        match self.losses.lock().get(id).copied().unwrap_or(0) {
            0 => Standing::Clean,
            1 => Standing::Suspect,
            losses => Standing::Quarantined { losses },
        }
    }

    /// Marks `id` as in hand on connection `generation` until the returned guard is settled
    /// or dropped.
    pub(crate) fn hold(self: &Arc<Self>, generation: u64, id: DeliveryId) -> InHand {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        self.in_hand.lock().insert(token, (generation, id));
        InHand {
            suspects: self.clone(),
            token,
            clean: false,
        }
    }

    /// Connection `generation` is gone: every delivery in hand on it becomes a suspect (or
    /// moves towards quarantine). Returns how many.
    pub(crate) fn connection_lost(&self, generation: u64) -> usize {
        let held: Vec<DeliveryId> = self
            .in_hand
            .lock()
            .values()
            .filter(|(g, _)| *g == generation)
            .map(|(_, id)| id.clone())
            .collect();
        let mut losses = self.losses.lock();
        if losses.len() + held.len() > MAX_SUSPECTS {
            tracing::debug!(
                forgotten = losses.len(),
                "too many suspects remembered; starting over"
            );
            losses.clear();
        }
        for id in &held {
            *losses.entry(id.clone()).or_insert(0) += 1;
        }
        held.len()
    }

    fn release(&self, token: u64, clean: bool) {
        let released = self.in_hand.lock().remove(&token);
        if clean && let Some((_, id)) = released {
            self.losses.lock().remove(&id);
        }
    }
}

/// A delivery in hand; dropping it without [`InHand::settled`] leaves its suspicion as it is.
pub(crate) struct InHand {
    suspects: Arc<Suspects>,
    token: u64,
    clean: bool,
}

impl InHand {
    /// The delivery was settled on the broker: it is no longer in hand, nor suspected.
    pub(crate) fn settled(mut self) {
        self.clean = true;
    }
}

/// Settles `held`, if the delivery was in hand.
pub(crate) fn settled(held: Option<InHand>) {
    if let Some(held) = held {
        held.settled();
    }
}

impl Drop for InHand {
    fn drop(&mut self) {
        self.suspects.release(self.token, self.clean);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(body: &str) -> DeliveryId {
        DeliveryId::of(
            &Arc::from("q"),
            &BasicProperties::default(),
            body.as_bytes(),
        )
    }

    #[test]
    fn a_delivery_in_hand_at_two_losses_is_quarantined() {
        let suspects = Arc::new(Suspects::default());
        let poison = id("poison");
        let first = suspects.hold(1, poison.clone());
        let bystander = suspects.hold(1, id("innocent"));
        assert_eq!(suspects.connection_lost(1), 2);
        drop(first);
        assert_eq!(suspects.standing(&poison), Standing::Suspect);
        // The bystander comes back and is settled: forgiven.
        bystander.settled();
        let again = suspects.hold(2, id("innocent"));
        again.settled();
        assert_eq!(suspects.standing(&id("innocent")), Standing::Clean);
        let second = suspects.hold(2, poison.clone());
        assert_eq!(suspects.connection_lost(2), 1);
        drop(second);
        assert_eq!(
            suspects.standing(&poison),
            Standing::Quarantined { losses: 2 }
        );
    }

    #[test]
    fn only_deliveries_of_the_lost_connection_are_suspected() {
        let suspects = Arc::new(Suspects::default());
        let _old = suspects.hold(1, id("old"));
        let _new = suspects.hold(2, id("new"));
        assert_eq!(suspects.connection_lost(2), 1);
        assert_eq!(suspects.standing(&id("old")), Standing::Clean);
        assert_eq!(suspects.standing(&id("new")), Standing::Suspect);
    }
}
