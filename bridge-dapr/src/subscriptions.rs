//! Subscription consumers: a delivery from the sidecar reaches every local subscription whose
//! filter matches (core's matcher). Deliveries are acknowledged on arrival: the sidecar gets
//! `SUCCESS` once the message is in line at every matching subscription (the bridge declares
//! no manual ack), `RETRY` when it could not be handed over.
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
use tokio::sync::mpsc;

use crate::shared::Shared;

/// What the app server answers the sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Handed to every matching subscription.
    Done,
    /// Not handed over; the sidecar should deliver it again.
    Retry,
}

/// A delivery waiting in a consumer's line: its claim (running) and its message.
struct Waiting {
    claim: Option<tokio::task::JoinHandle<Result<bool, BridgeError>>>,
    envelope: Arc<Envelope>,
    running: purista_core::inflight::InFlightGuard,
}

/// One subscription registered on this instance.
///
/// Deliveries wait in a line per subscription: their claims run concurrently, but handlers
/// start in the order the sidecar delivered, so a message delivered before another never
/// starts after it.
pub struct Consumer {
    /// The registration.
    pub spec: SubscriptionSpec,
    label: Arc<str>,
    line: mpsc::UnboundedSender<Waiting>,
}

impl Consumer {
    /// A consumer of `spec`; its line is served until the consumer is dropped.
    pub fn new(
        shared: &Arc<Shared>,
        spec: SubscriptionSpec,
        handler: Arc<dyn DeliveryHandler>,
    ) -> Arc<Self> {
        let label: Arc<str> = spec.key.as_str().into();
        let (line, mut waiting) = mpsc::unbounded_channel::<Waiting>();
        let tasks = shared.tasks.clone();
        let task_label = label.clone();
        tokio::spawn(async move {
            while let Some(w) = waiting.recv().await {
                let run = match w.claim {
                    None => true,
                    Some(claim) => match claim.await {
                        Ok(Ok(won)) => won,
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, subscription = %task_label, message_id = %w.envelope.id, "could not claim a message of a shared subscription; this instance leaves it (at most once)");
                            false
                        }
                        Err(_) => false,
                    },
                };
                if !run {
                    continue;
                }
                let delivery = Delivery {
                    envelope: w.envelope.clone(),
                    attempt: 1,
                    settle: SettleOnce::new(w.envelope.id.clone(), Box::new(AckedOnArrival)),
                };
                let handler = handler.clone();
                let running = w.running;
                // The next delivery waits until this one's handler has begun (see
                // `TaskSet::spawn_started`): handlers start in delivery order.
                tasks
                    .spawn_started(WorkKind::Subscription, task_label.clone(), async move {
                        let _running = running;
                        handler.deliver(delivery).await;
                    })
                    .await;
            }
        });
        Arc::new(Consumer { spec, label, line })
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
        for consumer in matching {
            let running = self.tracker.start(WorkKind::Subscription, &consumer.label);
            let claim = consumer.spec.shared.then(|| {
                let shared = self.clone();
                let consumer = consumer.clone();
                let delivery_id = delivery_id.to_string();
                tokio::spawn(async move { shared.claim(&consumer, &delivery_id).await })
            });
            let waiting = Waiting {
                claim,
                envelope: envelope.clone(),
                running,
            };
            if consumer.line.send(waiting).is_err() {
                return Verdict::Retry;
            }
        }
        Verdict::Done
    }

    /// The claim is per delivery (the CloudEvent id), not per message id: the same message
    /// published twice is two deliveries. A failed claim write answers RETRY, and the
    /// redelivery claims again.
    ///
    /// A write whose answer is lost may still have landed: a write that fails is tried again,
    /// and a conflict is resolved by reading who holds the claim, so this claim's own earlier
    /// write counts as won instead of leaving the message to nobody.
    async fn claim(&self, consumer: &Consumer, delivery_id: &str) -> Result<bool, BridgeError> {
        let key = format!(
            "{}||claim||{}||{}",
            self.config.prefix,
            crate::bridge::key_part(consumer.spec.key.as_str()),
            crate::bridge::key_part(delivery_id)
        );
        // This claim's own mark: another delivery of the same message to this instance (a
        // redelivery) claims with another, and loses.
        let mine = serde_json::Value::String(format!(
            "{}/{}",
            self.instance_id,
            purista_core::ids::new_id()
        ));
        let _permit = self
            .claims
            .acquire()
            .await
            .map_err(|_| BridgeError::Unavailable("the bridge is shutting down".into()))?;
        let store = &self.config.statestore;
        let within = self.config.call_timeout;
        let mut failure = None;
        for attempt in 0..CLAIM_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(CLAIM_RETRY_PAUSE * attempt).await;
            }
            match self
                .sidecar
                .save_state(store, &key, &mine, None, Some(CLAIM_TTL_SECS), within)
                .await
            {
                Ok(true) => return Ok(true),
                Ok(false) => match self.sidecar.get_state(store, &key, within).await {
                    Ok(Some((holder, _))) => return Ok(holder == mine),
                    // Expired between the two calls: claim again.
                    Ok(None) => {}
                    Err(e) => failure = Some(e),
                },
                Err(e) => failure = Some(e),
            }
        }
        Err(failure.unwrap_or_else(|| {
            BridgeError::Broker(format!("the claim {key} kept expiring while it was read"))
        }))
    }
}

/// Tries of one claim before the instance leaves the message.
const CLAIM_ATTEMPTS: u32 = 3;

/// Pause before the second try of a claim, growing linearly.
const CLAIM_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);
