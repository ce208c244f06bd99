//! A delivery taken from a queue: in hand until it is acked or handed back.
//!
//! Consumers (`consume.rs`) take deliveries; commands (`serve.rs`), stream open frames
//! (`streams.rs`) and subscription settlements (`settle.rs`) finish them. A [`Taken`] carries
//! the delivery with its place in the poison watch (`suspects.rs`): a suspect waits for its
//! registration's turn before it counts as in hand.

use lapin::Acker;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use purista_core::BridgeError;

use crate::registry::Registration;
use crate::shared::Shared;
use crate::suspects::{DeliveryId, InHand};

/// A delivery taken from a queue, with its place in the poison watch.
pub(crate) struct Taken {
    pub delivery: lapin::message::Delivery,
    pub id: DeliveryId,
    /// In hand until settled; `None` for a suspect until it has its turn.
    pub held: Option<InHand>,
    /// The connection generation it came on; its acker only works there.
    pub generation: u64,
}

impl Taken {
    /// For a suspect (in hand at an earlier connection loss): waits for the registration's
    /// turn and only then counts it as in hand, so that it is handled alone.
    pub(crate) async fn turn(
        &mut self,
        shared: &Shared,
        reg: &Registration,
    ) -> Option<tokio::sync::OwnedSemaphorePermit> {
        if self.held.is_some() {
            return None;
        }
        let permit = reg.turn.clone().acquire_owned().await.ok();
        self.held = Some(shared.suspects.hold(self.generation, self.id.clone()));
        permit
    }
}

/// Hands a delivery back to its queue.
pub(crate) async fn requeue(acker: &Acker) {
    let options = BasicNackOptions {
        requeue: true,
        ..BasicNackOptions::default()
    };
    if let Err(error) = acker.nack(options).await {
        tracing::debug!(%error, "handing a delivery back failed; the broker requeues it when the channel closes");
    }
}

/// Acks a delivery.
pub(crate) async fn ack(acker: &Acker) -> Result<(), BridgeError> {
    acker
        .ack(BasicAckOptions::default())
        .await
        .map(|_| ())
        .map_err(|e| BridgeError::client("ack failed", e, true))
}
