//! Subscriptions: one EventBridge rule per subscription whose pattern is the filter
//! ([`crate::pattern`]), one SQS queue as its target (shared: one per registration, every
//! instance competing on it; broadcast: one per registration and instance), receivers that
//! hand each message to the handler and carry out its outcome (DESIGN §3.4).
//!
//! * **ack / drop**: the message is deleted.
//! * **retry**: a copy goes back to the same queue carrying the next attempt number
//!   (`purista-attempt`) with `DelaySeconds` up to SQS's 15 min; a longer delay is carried as
//!   `purista-not-before` and continued by visibility changes (up to SQS's 12 h per change),
//!   then the original is deleted. A delay over 12 h is refused as a typed error.
//! * **dead letter**: the envelope goes to `<prefix>-d-<target>-dead-letter` with reason,
//!   attempts, origin and time as message attributes, then the original is deleted.
//! * **pause**: the message goes back with the same attempt and the consumer stops receiving
//!   until resumed: what arrives meanwhile waits in the queue.
//!
//! A message that is no envelope is dropped with one warning and counted as poison. SQS is
//! at-least-once: a handler that outlives the visibility timeout, or a delete that fails,
//! means another delivery.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::types::{Message, SendMessageBatchRequestEntry};
use parking_lot::Mutex;
use purista_core::kit::{self, broker_call};
use purista_core::{
    BridgeError, DeadLetterNote, Delivery, DeliveryHandler, Envelope, PausedConsumer, SettleOnce,
    Settlement, Settler, SubscriptionSpec, WorkKind,
};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::{Semaphore, watch};

use crate::client::sdk_error;
use crate::receive::{self, attempt_of, attr, string_attribute};
use crate::shared::{ATTR_ATTEMPT, ATTR_NOT_BEFORE, Shared, TAG_OWNER, TAG_RULE, TAG_SEEN, now_ms};
use crate::topology::{self, Queue};

/// Dead-letter message attribute: why.
pub const ATTR_REASON: &str = "purista-reason";
/// Dead-letter message attribute: deliveries made.
pub const ATTR_ATTEMPTS: &str = "purista-attempts";
/// Dead-letter message attribute: the registration key it came from.
pub const ATTR_ORIGIN: &str = "purista-origin";
/// Dead-letter message attribute: when (epoch ms).
pub const ATTR_AT: &str = "purista-dead-lettered-at";
/// A retry due within this many ms waits in the consumer instead of in SQS.
const SHORT_WAIT_MS: u64 = 5_000;
/// SQS's longest `DelaySeconds`.
pub const MAX_NATIVE_DELAY: Duration = Duration::from_secs(15 * 60);
/// SQS's longest visibility timeout, the longest retry delay the bridge takes.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(12 * 3600);

/// An EventBridge event as SQS delivers it through a rule of an earlier version (no input
/// transformer): the envelope is its `detail`.
#[derive(Deserialize)]
struct Wrapped<'a> {
    #[serde(borrow)]
    detail: &'a RawValue,
    #[serde(rename = "detail-type")]
    _detail_type: Option<&'a str>,
}

/// What a rule's target delivers ([`crate::topology::TARGET_TEMPLATE`]): `{"detail": …}` and
/// nothing else (an envelope always has more fields).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Detail<'a> {
    #[serde(borrow)]
    detail: &'a RawValue,
}

/// The envelope in a subscription queue's message body: the `detail` a rule delivers (alone,
/// or in the whole EventBridge event a rule of an earlier version delivered), or the envelope
/// itself (retry copies and replays).
pub fn decode_body(body: &str, max: usize) -> Result<Envelope, purista_core::DecodeError> {
    if let Ok(d) = serde_json::from_str::<Detail<'_>>(body) {
        return Envelope::decode_with_limit(d.detail.get().as_bytes(), max);
    }
    if let Ok(w) = serde_json::from_str::<Wrapped<'_>>(body)
        && w._detail_type.is_some()
    {
        return Envelope::decode_with_limit(w.detail.get().as_bytes(), max);
    }
    Envelope::decode_with_limit(body.as_bytes(), max)
}

/// One subscription's consumer on this instance.
pub struct Consumer {
    shared: Arc<Shared>,
    spec: SubscriptionSpec,
    queue: Queue,
    /// The broadcast rule of this instance (removed with the consumer); `None` when shared.
    own_rule: Option<String>,
    stop: watch::Sender<bool>,
    paused: watch::Sender<bool>,
    pause_note: Mutex<Option<PausedConsumer>>,
    up: watch::Receiver<bool>,
}

impl Consumer {
    /// Creates the queue and rule (idempotent) and starts receiving.
    pub async fn start(
        shared: &Arc<Shared>,
        spec: SubscriptionSpec,
        handler: Arc<dyn DeliveryHandler>,
    ) -> Result<Arc<Self>, BridgeError> {
        let instance = (!spec.shared).then_some(shared.instance_id.as_str());
        let queue_name = shared.names.subscription_queue(&spec.key, instance)?;
        let rule = shared.names.rule(&spec.key, instance)?;
        let tags: Vec<(&str, String)> = if spec.shared {
            vec![]
        } else {
            vec![
                (TAG_OWNER, shared.instance_id.clone()),
                (TAG_SEEN, now_ms().to_string()),
                (TAG_RULE, rule.clone()),
            ]
        };
        let queue = topology::ensure_route(
            shared,
            &rule,
            &crate::pattern::event_pattern(&spec.filter),
            &crate::copies::description(&spec.filter),
            &queue_name,
            &tags,
        )
        .await?;
        if spec.filter.may_match_commands() {
            // Every instance that read the rules before this one existed stops trusting that
            // read before the registration returns (see `crate::copies`).
            crate::copies::settle_after_adding().await;
        }
        if !spec.shared {
            shared.own_queues.lock().insert(queue.url.clone());
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let (paused_tx, paused_rx) = watch::channel(false);
        let (up_tx, up_rx) = watch::channel(true);
        let consumer = Arc::new(Consumer {
            shared: shared.clone(),
            own_rule: (!spec.shared).then_some(rule),
            spec,
            queue,
            stop: stop_tx,
            paused: paused_tx,
            pause_note: Mutex::new(None),
            up: up_rx,
        });
        let label: Arc<str> = consumer.spec.key.as_str().into();
        let slots = Arc::new(Semaphore::new(usize::from(consumer.spec.prefetch.max(1))));
        let on_message: receive::OnMessage = {
            let consumer = Arc::downgrade(&consumer);
            let label = label.clone();
            Arc::new(move |message, slot| {
                let Some(consumer) = consumer.upgrade() else {
                    return;
                };
                let handler = handler.clone();
                let in_flight = consumer
                    .shared
                    .tracker
                    .start(WorkKind::Subscription, &label);
                let tasks = consumer.shared.tasks.clone();
                tasks.spawn(WorkKind::Subscription, label.clone(), async move {
                    let _in_flight = in_flight;
                    consumer.handle(&*handler, message).await;
                    drop(slot);
                });
            })
        };
        for i in 0..shared.config.receivers_per_queue {
            let spawned = shared.receivers.spawn(
                WorkKind::Generic,
                format!("subscription {label} #{i}").into(),
                receive::run(
                    shared.clone(),
                    consumer.queue.url.clone(),
                    format!("subscription queue {}", consumer.queue.name),
                    slots.clone(),
                    on_message.clone(),
                    paused_rx.clone(),
                    stop_rx.clone(),
                    up_tx.clone(),
                    receive::Pace::AfterSettle,
                ),
            );
            if !spawned {
                consumer.stop();
                return Err(BridgeError::Unavailable(
                    "the bridge is shutting down".into(),
                ));
            }
        }
        Ok(consumer)
    }

    /// The queue it receives from.
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// Whether every instance competes on its queue (`false`: the queue is this instance's).
    pub fn is_shared(&self) -> bool {
        self.spec.shared
    }

    /// Stops receiving.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Stops receiving and, for a broadcast consumer, removes its rule and queue (what waits
    /// there was for this instance only). A shared queue stays: it is durable, and the other
    /// instances (or the next start) go on with it.
    pub async fn close(&self) {
        self.stop();
        if let Some(rule) = &self.own_rule {
            self.shared.own_queues.lock().remove(&self.queue.url);
            // The target first (a rule pointing at a deleted queue fails deliveries); then the
            // rule and the queue at once: two round trips, not three.
            if let Err(error) = topology::remove_target(&self.shared, rule).await {
                tracing::warn!(%error, rule, "a broadcast rule could not be removed; the janitor removes it later");
                return;
            }
            let (rule_removed, queue_deleted) = tokio::join!(
                topology::delete_rule(&self.shared, rule),
                topology::delete_queue(&self.shared, &self.queue.url)
            );
            if let Err(error) = rule_removed {
                tracing::warn!(%error, rule, "a broadcast rule could not be deleted; the janitor removes it later");
            }
            if let Err(error) = queue_deleted {
                tracing::warn!(%error, queue = %self.queue.name, "a broadcast queue could not be deleted; the janitor removes it later");
            }
        }
    }

    /// Whether the receivers work.
    pub fn is_up(&self) -> bool {
        *self.up.borrow()
    }

    /// Its pause, when paused.
    pub fn paused(&self) -> Option<PausedConsumer> {
        self.pause_note.lock().clone()
    }

    fn pause(&self, reason: String) {
        *self.pause_note.lock() = Some(PausedConsumer {
            key: self.spec.key.clone(),
            reason,
            paused_at: now_ms(),
        });
        let _ = self.paused.send(true);
    }

    /// Resumes receiving; `false` when it was not paused.
    pub fn resume(&self) -> bool {
        let was = self.pause_note.lock().take().is_some();
        let _ = self.paused.send(false);
        was
    }

    async fn handle(self: &Arc<Self>, handler: &dyn DeliveryHandler, message: Message) {
        let shared = &self.shared;
        if self.pause_note.lock().is_some() {
            // Received in the moment the consumer paused: it waits in the queue.
            receive::release(shared, &self.queue.url, std::slice::from_ref(&message)).await;
            return;
        }
        let body = message.body().unwrap_or_default();
        let envelope = match decode_body(body, shared.config.max_message_bytes) {
            Ok(e) => e,
            Err(error) => {
                shared.count_poison();
                tracing::warn!(%error, registration = %self.spec.key, "an undecodable message on a subscription queue was dropped");
                if let Err(error) = receive::delete(shared, &self.queue.url, &message).await {
                    tracing::debug!(%error, "a dropped message could not be deleted");
                }
                return;
            }
        };
        if let Some(not_before) =
            string_attribute(&message, ATTR_NOT_BEFORE).and_then(|v| v.parse::<u64>().ok())
        {
            let left = not_before.saturating_sub(now_ms());
            let short = SHORT_WAIT_MS.min(kit::millis(shared.config.visibility_timeout) / 2);
            if left > 0 && left <= short {
                // The last fraction of a delay (SQS counts whole seconds) waits here, the
                // message still leased.
                tokio::time::sleep(Duration::from_millis(left)).await;
            } else if left > 0 {
                let secs = (left.div_ceil(1000)).min(MAX_RETRY_DELAY.as_secs());
                if let Err(error) = self.change_visibility(&message, secs).await {
                    tracing::debug!(%error, "a delayed retry could not be put back to sleep; it is handled early");
                } else {
                    return;
                }
            }
        }
        let attempt = attempt_of(&message);
        let receipt = message.receipt_handle().map(str::to_string);
        let settler = SqsSettler {
            consumer: self.clone(),
            message: Some(message),
            envelope: Arc::new(envelope),
            attempt,
        };
        let envelope = settler.envelope.clone();
        let delivery = Delivery {
            envelope: envelope.clone(),
            attempt,
            settle: SettleOnce::new(envelope.id.clone(), Box::new(settler)),
        };
        // The lease: renewed every third of the visibility timeout while the handler runs
        // and its settlement is sent (a renewal may wait behind a busy SQS endpoint), so a
        // slow handler keeps its message and a short timeout still returns what a dead
        // consumer (or an abandoned long poll) took.
        let visibility = shared.config.visibility_timeout;
        let renew = async {
            loop {
                tokio::time::sleep(visibility / 3).await;
                let _ = self
                    .change_visibility_of(receipt.clone(), visibility.as_secs())
                    .await;
            }
        };
        tokio::select! {
            () = handler.deliver(delivery) => {}
            () = renew => {}
        }
    }

    async fn change_visibility(&self, message: &Message, secs: u64) -> Result<(), BridgeError> {
        self.change_visibility_of(message.receipt_handle().map(str::to_string), secs)
            .await
    }

    async fn change_visibility_of(
        &self,
        receipt: Option<String>,
        secs: u64,
    ) -> Result<(), BridgeError> {
        let call = self
            .shared
            .clients
            .sqs
            .change_message_visibility()
            .queue_url(&self.queue.url)
            .set_receipt_handle(receipt)
            .visibility_timeout(i32::try_from(secs).unwrap_or(i32::MAX))
            .send();
        broker_call(
            self.shared.config.call_timeout,
            "ChangeMessageVisibility",
            async {
                call.await
                    .map(|_| ())
                    .map_err(|e| sdk_error("changing a message's visibility", e))
            },
        )
        .await
    }

    /// Puts `envelope` back on this consumer's queue as attempt 1 (a dead-letter replay).
    pub async fn requeue(&self, envelope: &Envelope) -> Result<(), BridgeError> {
        self.send_copy(envelope, 1, Duration::ZERO).await
    }

    /// Sends `envelope` to this consumer's queue as attempt `attempt`, after `delay`.
    async fn send_copy(
        &self,
        envelope: &Envelope,
        attempt: u32,
        delay: Duration,
    ) -> Result<(), BridgeError> {
        if delay > MAX_RETRY_DELAY {
            return Err(BridgeError::InvalidRequest(format!(
                "a retry delay of {} s exceeds SQS's longest visibility timeout (12 h)",
                delay.as_secs()
            )));
        }
        // DelaySeconds counts whole seconds (rounded down here); `purista-not-before` carries
        // the exact time, and the consumer waits out the rest (or sleeps the message again by
        // a visibility change when it is long).
        let native_secs = delay.min(MAX_NATIVE_DELAY).as_secs();
        let body = String::from_utf8(envelope.encode()).unwrap_or_default();
        let size = body.len() + 128;
        let mut entry = SendMessageBatchRequestEntry::builder()
            .message_body(body)
            .delay_seconds(i32::try_from(native_secs).unwrap_or(900))
            .message_attributes(ATTR_ATTEMPT, attr(attempt.to_string())?);
        if !delay.is_zero() {
            let at = now_ms().saturating_add(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX));
            entry = entry.message_attributes(ATTR_NOT_BEFORE, attr(at.to_string())?);
        }
        self.shared.send(&self.queue.url, entry, size).await
    }
}

/// Settles one SQS message.
struct SqsSettler {
    consumer: Arc<Consumer>,
    /// Taken when settled; still here when dropped unsettled.
    message: Option<Message>,
    envelope: Arc<Envelope>,
    attempt: u32,
}

#[async_trait]
impl Settler for SqsSettler {
    async fn settle(mut self: Box<Self>, settlement: Settlement) -> Result<(), BridgeError> {
        let Some(message) = self.message.take() else {
            return Ok(());
        };
        let c = &self.consumer;
        match settlement {
            Settlement::Ack | Settlement::Drop { .. } => {}
            Settlement::Redeliver {
                delay,
                next_attempt,
            } => {
                c.send_copy(&self.envelope, next_attempt, delay).await?;
            }
            Settlement::DeadLetter(note) => {
                crate::dead_letters::send(&c.shared, &note, &self.envelope).await?;
            }
            Settlement::Pause { reason } => {
                c.pause(reason);
                c.send_copy(&self.envelope, self.attempt, Duration::ZERO)
                    .await?;
            }
        }
        receive::delete(&c.shared, &c.queue.url, &message).await
    }
}

/// A delivery dropped unsettled (its handler aborted at a shutdown deadline) goes back to the
/// queue at once rather than after its visibility timeout: another consumer takes it.
impl Drop for SqsSettler {
    fn drop(&mut self) {
        let Some(message) = self.message.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let shared = self.consumer.shared.clone();
        let url = self.consumer.queue.url.clone();
        // Bounded by the call timeout inside `release`; ends by itself.
        runtime.spawn(async move { receive::release(&shared, &url, &[message]).await });
    }
}

/// The dead-letter note of a message (for replays and inspection).
pub fn note_of(message: &Message, target: &str) -> DeadLetterNote {
    DeadLetterNote {
        target: target.to_string(),
        reason: string_attribute(message, ATTR_REASON)
            .unwrap_or_default()
            .to_string(),
        attempts: string_attribute(message, ATTR_ATTEMPTS)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        origin: string_attribute(message, ATTR_ORIGIN)
            .unwrap_or_default()
            .to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::decode_body;
    use purista_core::{Envelope, SenderAddress};
    use serde_json::json;

    #[test]
    fn every_body_shape_a_subscription_queue_carries_decodes_to_the_envelope() {
        let envelope = Envelope::custom(SenderAddress::default(), "paid", json!({"n": 1}));
        let bare = String::from_utf8(envelope.encode()).expect("an envelope is UTF-8");
        let transformed = format!(r#"{{"detail":{bare}}}"#);
        let whole_event = format!(
            r#"{{"version":"0","id":"x","detail-type":"customMessage","source":"purista.s","detail":{bare}}}"#
        );
        for body in [&bare, &transformed, &whole_event] {
            let got = decode_body(body, 1 << 20).expect("the body decodes");
            assert_eq!(got.id, envelope.id, "{body}");
            assert_eq!(got.payload, envelope.payload, "{body}");
        }
        // An envelope whose unknown fields include `detail` is still the envelope itself.
        let mut with_detail: serde_json::Value = serde_json::from_str(&bare).expect("JSON");
        with_detail["detail"] = json!({"not": "an envelope"});
        let got = decode_body(&with_detail.to_string(), 1 << 20).expect("the body decodes");
        assert_eq!(got.id, envelope.id);
    }
}
