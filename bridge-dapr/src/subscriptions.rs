//! Subscription consumers: a delivery from the sidecar reaches every local subscription whose
//! filter matches (core's matcher), and the sidecar gets its answer once every one of them has
//! settled it (at least once):
//!
//! * `ack`, `drop`: done.
//! * `retry`: a *retry copy* for that one subscription is published on the topic (a new
//!   CloudEvent with the envelope unchanged and the subscription, attempt and earliest start
//!   as extension attributes, see [`crate::cloudevent`]); the delivery is done once the sidecar
//!   took the copy. The copy's delay is waited out where it is delivered, before its handler
//!   starts, so it holds no handler slot and no timer spins.
//! * `dead_letter` (and retries exhausted): the message goes to the dead-letter topic with its
//!   note ([`crate::dead_letters`]); done once the sidecar took it.
//! * A delivery for a shared subscription that was unregistered on this instance (the sidecar
//!   had it queued for this app, other instances' apps may have answered it before they held
//!   the subscription) is claimed as if the subscription were still here and, when no other
//!   instance had claimed it, put back as a copy for the subscription.
//! * A delivery whose handler's task was cut off unsettled (shutdown): put back as a copy for
//!   its subscription with the same attempt, so another instance, or this app once restarted,
//!   runs it.
//! * Anything the bridge could not carry out (the sidecar refused a copy, a claim failed):
//!   `RETRY`, and the sidecar delivers the whole
//!   event again per its resiliency policy, to every matching subscription (a duplicate for
//!   those that had settled it, never a loss).
//!
//! Every instance is its own consumer group, so every instance receives every message. A
//! shared subscription is handled by one instance only: each instance that holds it claims the
//! message in the state store (`<prefix>||claim||<registration>||<message id>`, first-write,
//! no ETag: exactly one write succeeds) and only the winner runs its handler. The claim is held
//! in the name of the instance's consumer group ([`crate::DaprConfig::consumer`]), so a
//! redelivery of the same event to the same group (the first try was not answered) wins it
//! again. Claims expire after [`CLAIM_TTL_SECS`].

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use purista_core::{
    BridgeError, Delivery, DeliveryHandler, Envelope, SettleOnce, Settlement, Settler,
    SubscriptionSpec, WorkKind,
};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::cloudevent::{self, RetryCopy};
use crate::shared::Shared;

/// What the app server answers the sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Settled by every matching subscription.
    Done,
    /// Not (fully) settled; the sidecar should deliver it again.
    Retry,
}

/// A delivery waiting in a consumer's line: its claim (running), its message and attempt,
/// and where its verdict goes.
struct Waiting {
    claim: Option<tokio::task::JoinHandle<Result<bool, BridgeError>>>,
    envelope: Arc<Envelope>,
    attempt: u32,
    running: purista_core::inflight::InFlightGuard,
    verdict: oneshot::Sender<Verdict>,
}

/// One subscription registered on this instance.
///
/// Deliveries wait in a line per subscription: their claims run concurrently, but handlers
/// start in the order the deliveries reached the app server, at most `prefetch` at once.
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
        let slots = Arc::new(Semaphore::new(usize::from(spec.prefetch.max(1))));
        let weak = Arc::downgrade(shared);
        let settle_spec = spec.clone();
        tokio::spawn(async move {
            while let Some(w) = waiting.recv().await {
                let run = match w.claim {
                    None => Ok(true),
                    Some(claim) => match claim.await {
                        Ok(Ok(won)) => Ok(won),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(e) => Err(e.to_string()),
                    },
                };
                match run {
                    Ok(true) => {}
                    // Another instance runs it.
                    Ok(false) => {
                        let _ = w.verdict.send(Verdict::Done);
                        continue;
                    }
                    Err(error) => {
                        tracing::warn!(%error, subscription = %task_label, message_id = %w.envelope.id, "could not claim a message of a shared subscription; the sidecar delivers it again");
                        let _ = w.verdict.send(Verdict::Retry);
                        continue;
                    }
                }
                let Some(shared) = weak.upgrade() else {
                    let _ = w.verdict.send(Verdict::Retry);
                    continue;
                };
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    let _ = w.verdict.send(Verdict::Retry);
                    continue;
                };
                let settler = CopySettler {
                    shared,
                    spec: settle_spec.clone(),
                    envelope: w.envelope.clone(),
                    verdict: w.verdict,
                };
                let delivery = Delivery {
                    envelope: w.envelope.clone(),
                    attempt: w.attempt,
                    settle: SettleOnce::new(w.envelope.id.clone(), Box::new(settler)),
                };
                let handler = handler.clone();
                let running = w.running;
                // The next delivery waits until this one's handler has begun (see
                // `TaskSet::spawn_started`): handlers start in line order.
                tasks
                    .spawn_started(WorkKind::Subscription, task_label.clone(), async move {
                        let _running = running;
                        let _slot = slot;
                        handler.deliver(delivery).await;
                    })
                    .await;
            }
        });
        Arc::new(Consumer { spec, label, line })
    }
}

/// Carries out a settlement with Dapr's primitives: a retry copy or a dead letter published
/// through the sidecar; the verdict reaches the delivery's answer once that is done.
/// Dropped unsettled (a handler task aborted at shutdown), it answers RETRY.
struct CopySettler {
    shared: Arc<Shared>,
    spec: SubscriptionSpec,
    envelope: Arc<Envelope>,
    verdict: oneshot::Sender<Verdict>,
}

#[async_trait]
impl Settler for CopySettler {
    async fn settle(self: Box<Self>, settlement: Settlement) -> Result<(), BridgeError> {
        let CopySettler {
            shared,
            spec,
            envelope,
            verdict,
        } = *self;
        let done = match settlement {
            Settlement::Ack | Settlement::Drop { .. } => Ok(()),
            Settlement::Redeliver {
                delay,
                next_attempt,
            } => {
                shared
                    .publish_retry(&spec, &envelope, next_attempt, delay)
                    .await
            }
            Settlement::DeadLetter(note) => {
                crate::dead_letters::publish(&shared, &envelope, &note).await
            }
            // Pause is not declared: the delivery is put back through the sidecar, whose
            // resiliency policy paces it.
            Settlement::Pause { reason } => {
                tracing::warn!(subscription = %spec.key, %reason, "stop_consumer is not supported on the dapr bridge; the delivery goes back to the sidecar");
                let _ = verdict.send(Verdict::Retry);
                return Ok(());
            }
        };
        let _ = verdict.send(if done.is_ok() {
            Verdict::Done
        } else {
            Verdict::Retry
        });
        done
    }
}

/// How long after the app server began serving a delivery that no subscription wants waits
/// for the subscriptions registered right after start.
pub const STARTUP_GRACE: Duration = Duration::from_secs(1);

/// How long after its publication a message for a shared subscription that left this
/// instance waits before this instance claims it to hand it on.
pub const HANDOVER_HEAD_START: Duration = Duration::from_millis(500);

/// Unregistering a shared subscription returns once no delivery for it reached this instance
/// for this long (what the sidecar still had queued for this app has been handed on), or
/// after [`HANDOVER_MAX_WAIT`].
pub const HANDOVER_QUIET: Duration = Duration::from_millis(200);

/// The longest an unregistration waits for the sidecar's queue for this app to go quiet.
pub const HANDOVER_MAX_WAIT: Duration = Duration::from_secs(5);

/// How long a claim of a shared subscription's message stays in the state store.
pub const CLAIM_TTL_SECS: u32 = 600;

/// The longest a retry copy's handler waits for its start time (a copy from a clock far ahead
/// does not hold a delivery for longer).
pub const MAX_RETRY_WAIT: Duration = Duration::from_secs(600);

impl Shared {
    /// Hands `envelope` to every matching local subscription (or, for a retry copy, to its one
    /// subscription) and waits for their settlements.
    pub async fn dispatch(
        self: &Arc<Self>,
        delivery_id: &str,
        envelope: Arc<Envelope>,
        retry: Option<RetryCopy>,
    ) -> Verdict {
        let mut put_back = Vec::new();
        let (matching, attempt): (Vec<Arc<Consumer>>, u32) = match &retry {
            None => {
                let mut found = self.wanting(&envelope);
                // The sidecar delivers as soon as the app port is open, and a service registers
                // its subscriptions right after the bridge started: a delivery of the first
                // moments that finds none (what the sidecar redelivers to a restarted app)
                // waits for them rather than being answered for nobody.
                if found.0.is_empty()
                    && found.1.is_empty()
                    && let Some(since) = self.serving_since.get()
                {
                    let until = *since + STARTUP_GRACE;
                    if tokio::time::Instant::now() < until {
                        tokio::time::sleep_until(until).await;
                        found = self.wanting(&envelope);
                    }
                }
                put_back = found.1;
                (found.0, 1)
            }
            Some(copy) => {
                if copy
                    .app
                    .as_deref()
                    .is_some_and(|app| app != self.config.app_id)
                {
                    return Verdict::Done;
                }
                let consumer = self
                    .consumers
                    .read()
                    .get(&purista_core::RegistrationKey::from(copy.target.as_str()))
                    .cloned();
                let Some(consumer) = consumer else {
                    return Verdict::Done;
                };
                // Waited out here, before the line: no handler slot is held meanwhile.
                let now = purista_core::envelope::now_ms();
                if copy.not_before > now {
                    let wait = Duration::from_millis(copy.not_before - now).min(MAX_RETRY_WAIT);
                    tokio::time::sleep(wait).await;
                }
                (vec![consumer], copy.attempt)
            }
        };
        let mut verdicts = Vec::with_capacity(matching.len());
        for consumer in matching {
            let running = self.tracker.start(WorkKind::Subscription, &consumer.label);
            let claim = consumer.spec.shared.then(|| {
                let shared = self.clone();
                let consumer = consumer.clone();
                let delivery_id = delivery_id.to_string();
                tokio::spawn(async move { shared.claim(&consumer.spec, &delivery_id).await })
            });
            let (verdict, heard) = oneshot::channel();
            let waiting = Waiting {
                claim,
                envelope: envelope.clone(),
                attempt,
                running,
                verdict,
            };
            if consumer.line.send(waiting).is_err() {
                return Verdict::Retry;
            }
            verdicts.push((consumer, heard));
        }
        let mut answer = Verdict::Done;
        // A shared subscription that left this instance: claimed as if it were still here;
        // when this instance wins, nobody else took the delivery and it goes to the instances
        // that still hold the subscription (none: the copy is dropped by every app). A young
        // message gets the instances holding it a head start, so that what they receive
        // themselves is not detoured through a copy.
        if !put_back.is_empty() {
            let age = purista_core::envelope::now_ms().saturating_sub(envelope.timestamp);
            if let Some(wait) = HANDOVER_HEAD_START.checked_sub(Duration::from_millis(age)) {
                tokio::time::sleep(wait).await;
            }
        }
        for spec in put_back {
            self.handed_on.notify_one();
            let handed_on = match self.claim(&spec, delivery_id).await {
                Ok(false) => Ok(()),
                Ok(true) => {
                    self.publish_retry(&spec, &envelope, 1, Duration::ZERO)
                        .await
                }
                Err(e) => Err(e),
            };
            if let Err(error) = handed_on {
                tracing::warn!(%error, subscription = %spec.key, message_id = %envelope.id, "a delivery for a subscription that left this instance could not be put back; the sidecar delivers the event again");
                answer = Verdict::Retry;
            }
        }
        for (consumer, heard) in verdicts {
            let verdict = match heard.await {
                Ok(verdict) => verdict,
                // Dropped unsettled: its handler's task was cut off (shutdown). Put back for
                // the subscription as the same attempt, so that another instance (or this
                // app after a restart) runs it; the whole event again only if that fails.
                Err(_) => match self
                    .publish_retry(&consumer.spec, &envelope, attempt, Duration::ZERO)
                    .await
                {
                    Ok(()) => Verdict::Done,
                    Err(error) => {
                        tracing::warn!(%error, subscription = %consumer.label, message_id = %envelope.id, "an unsettled delivery could not be put back; the sidecar delivers the event again");
                        Verdict::Retry
                    }
                },
            };
            if verdict == Verdict::Retry {
                answer = Verdict::Retry;
            }
        }
        answer
    }

    /// The local subscriptions whose filter matches `envelope`, and the shared ones that left
    /// this instance whose filter matches it.
    fn wanting(&self, envelope: &Envelope) -> (Vec<Arc<Consumer>>, Vec<SubscriptionSpec>) {
        let consumers = self
            .consumers
            .read()
            .values()
            .filter(|c| c.spec.filter.matches(envelope))
            .cloned()
            .collect();
        let leaving = self
            .leaving
            .read()
            .values()
            .filter(|spec| spec.filter.matches(envelope))
            .cloned()
            .collect();
        (consumers, leaving)
    }

    /// Publishes a retry copy of `envelope` for subscription `spec` as attempt `attempt`,
    /// to run no earlier than `delay` from now.
    pub async fn publish_retry(
        &self,
        spec: &SubscriptionSpec,
        envelope: &Envelope,
        attempt: u32,
        delay: Duration,
    ) -> Result<(), BridgeError> {
        let not_before = if delay.is_zero() {
            0
        } else {
            purista_core::envelope::now_ms() + u64::try_from(delay.as_millis()).unwrap_or(u64::MAX)
        };
        let attempt = attempt.to_string();
        let not_before = not_before.to_string();
        let mut extensions = vec![
            (cloudevent::EXT_TARGET, spec.key.as_str()),
            (cloudevent::EXT_ATTEMPT, attempt.as_str()),
            (cloudevent::EXT_NOT_BEFORE, not_before.as_str()),
        ];
        if !spec.shared {
            extensions.push((cloudevent::EXT_APP, self.config.app_id.as_str()));
        }
        let encoded = envelope.encode();
        let event = cloudevent::wrap_with(
            envelope,
            &encoded,
            &self.config.app_id,
            &purista_core::ids::new_id(),
            &extensions,
        )
        .map_err(BridgeError::InvalidRequest)?;
        self.sidecar
            .publish(
                &self.config.pubsub,
                &self.topic,
                event,
                self.config.call_timeout,
            )
            .await
    }

    /// The claim is per delivery (the CloudEvent id), not per message id: the same message
    /// published twice is two deliveries, and each retry copy is one more. A failed claim
    /// answers RETRY, and the redelivery claims again.
    ///
    /// The claim's mark is the consumer group ([`crate::DaprConfig::consumer`], else this
    /// instance's id): a redelivery of the same event to this app (its first delivery was not
    /// answered, e.g. the app restarted) wins again instead of being left to nobody, and a
    /// write whose answer was lost but landed counts as won.
    async fn claim(&self, spec: &SubscriptionSpec, delivery_id: &str) -> Result<bool, BridgeError> {
        let key = format!(
            "{}||claim||{}||{}",
            self.config.prefix,
            crate::bridge::key_part(spec.key.as_str()),
            crate::bridge::key_part(delivery_id)
        );
        let mine = serde_json::Value::String(
            self.config
                .consumer
                .clone()
                .unwrap_or_else(|| self.instance_id.clone()),
        );
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

/// Tries of one claim before the delivery is answered RETRY.
const CLAIM_ATTEMPTS: u32 = 3;

/// Pause before the second try of a claim, growing linearly.
const CLAIM_RETRY_PAUSE: Duration = Duration::from_millis(50);
