//! Subscription consumers: a delivery from the sidecar reaches every local subscription whose
//! filter matches (core's matcher). Deliveries are acknowledged on arrival: the sidecar gets
//! `SUCCESS` once the handlers are started (the bridge declares no manual ack), `RETRY` when
//! the message could not be handed over (a claim failed, the bridge is closing).
//!
//! Every instance is its own consumer group, so every instance receives every message. A
//! shared subscription is handled by one instance only: each instance that holds it claims the
//! message in the state store (`<prefix>||claim||<registration>||<message id>`, first-write,
//! no ETag: exactly one write succeeds) and only the winner runs its handler. Claims expire
//! after [`CLAIM_TTL_SECS`].

use std::sync::Arc;

use async_trait::async_trait;
use purista_core::{
    BridgeError, Delivery, DeliveryHandler, Envelope, SettleOnce, Settlement, Settler,
    SubscriptionSpec, WorkKind,
};

use crate::shared::Shared;

/// What the app server answers the sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Handed to every matching subscription.
    Done,
    /// Not handed over; the sidecar should deliver it again.
    Retry,
}

/// One subscription registered on this instance.
pub struct Consumer {
    /// The registration.
    pub spec: SubscriptionSpec,
    handler: Arc<dyn DeliveryHandler>,
    label: Arc<str>,
}

impl Consumer {
    /// A consumer of `spec`.
    pub fn new(spec: SubscriptionSpec, handler: Arc<dyn DeliveryHandler>) -> Arc<Self> {
        let label: Arc<str> = spec.key.as_str().into();
        Arc::new(Consumer {
            spec,
            handler,
            label,
        })
    }
}

/// Deliveries are acknowledged to the sidecar on arrival; a settlement changes nothing more.
struct AckedOnArrival;

#[async_trait]
impl Settler for AckedOnArrival {
    async fn settle(self: Box<Self>, _settlement: Settlement) -> Result<(), BridgeError> {
        Ok(())
    }
}

/// How long a claim of a shared subscription's message stays in the state store.
pub const CLAIM_TTL_SECS: u32 = 600;

impl Shared {
    /// Hands `envelope` to every matching local subscription and waits for their settlements.
    pub async fn dispatch(self: &Arc<Self>, delivery_id: &str, envelope: Arc<Envelope>) -> Verdict {
        let matching: Vec<Arc<Consumer>> = self
            .consumers
            .read()
            .values()
            .filter(|c| c.spec.filter.matches(&envelope))
            .cloned()
            .collect();
        let claims = matching.iter().map(|c| self.claim(c, delivery_id));
        let mut consumers = Vec::with_capacity(matching.len());
        for (consumer, claimed) in matching.iter().zip(futures::future::join_all(claims).await) {
            match claimed {
                Ok(true) => consumers.push(consumer.clone()),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, subscription = %consumer.label, message_id = %envelope.id, "could not claim a message of a shared subscription; the sidecar redelivers it");
                    return Verdict::Retry;
                }
            }
        }
        for consumer in consumers {
            let delivery = Delivery {
                envelope: envelope.clone(),
                attempt: 1,
                settle: SettleOnce::new(envelope.id.clone(), Box::new(AckedOnArrival)),
            };
            let tracker_guard = self.tracker.start(WorkKind::Subscription, &consumer.label);
            let spawned =
                self.tasks
                    .spawn(WorkKind::Subscription, consumer.label.clone(), async move {
                        let _guard = tracker_guard;
                        consumer.handler.deliver(delivery).await;
                    });
            if !spawned {
                return Verdict::Retry;
            }
        }
        Verdict::Done
    }

    /// Whether this instance runs `consumer`'s handler for `envelope`: always for a broadcast
    /// subscription; for a shared one, when its claim in the state store was the first.
    /// The claim is per delivery (the CloudEvent id), not per message id: the same message
    /// published twice is two deliveries. A redelivery to the instance that claimed it runs
    /// again there.
    async fn claim(&self, consumer: &Consumer, delivery_id: &str) -> Result<bool, BridgeError> {
        if !consumer.spec.shared {
            return Ok(true);
        }
        let key = format!(
            "{}||claim||{}||{}",
            self.config.prefix,
            crate::bridge::key_part(consumer.spec.key.as_str()),
            crate::bridge::key_part(delivery_id)
        );
        let mine = serde_json::Value::String(self.instance_id.clone());
        let store = &self.config.statestore;
        let within = self.config.call_timeout;
        if self
            .sidecar
            .save_state(store, &key, &mine, None, Some(CLAIM_TTL_SECS), within)
            .await?
        {
            return Ok(true);
        }
        let holder = self.sidecar.get_state(store, &key, within).await?;
        Ok(holder.is_some_and(|(value, _)| value == mine))
    }
}
