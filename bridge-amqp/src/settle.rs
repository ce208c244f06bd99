//! Settlements of subscription deliveries on the broker. Core's failure policy decides; this
//! file only translates:
//!
//! | settlement | on the broker |
//! |---|---|
//! | ack, drop | `basic.ack` |
//! | redeliver, no delay | republish to the queue with `x-purista-attempt` + 1, then ack |
//! | redeliver after a delay | republish to `<queue>.retry.<ms>` (message TTL = delay, dead-letters back to the queue), then ack |
//! | dead letter | publish to `P.<target>.dead-letter` with reason, attempts, origin and source-queue headers, then ack |
//! | pause | cancel the consumer, then `basic.nack` with requeue: the message waits in the queue |
//!
//! A republish is confirmed before the original is acked, so a crash in between duplicates
//! rather than loses. Nothing is ever requeued to a running consumer of the same queue, so there
//! is no hot redelivery loop.
//!
//! **Too large to republish.** A message can arrive with headers that leave no room for the
//! bridge's own (a foreign publisher's, just under the broker's frame limit). Publishing it
//! with them would make the broker close the connection, the message would come back, and so on
//! without end. So every republish is measured first (`budget.rs`): a retry that would not fit
//! goes to the dead-letter target instead, with the reason; a dead letter that would not fit
//! sheds the largest headers that are not the bridge's own (the body, which has every field,
//! stays whole) and says so in its reason; without a dead-letter target the message is dropped
//! with one warning. Each such message is counted as poison once.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use lapin::types::FieldTable;
use lapin::{Acker, BasicProperties};
use purista_core::envelope::now_ms;
use purista_core::{BridgeError, DeadLetterNote, Settlement, Settler};
use tokio::sync::OwnedSemaphorePermit;

use crate::budget;
use crate::delivery::{self, Taken};
use crate::headers;
use crate::publish::{self, Outgoing, Verdict};
use crate::registry::Registration;
use crate::session::Session;
use crate::shared::Shared;
use crate::suspects::{self, InHand};
use crate::topology::{self, millis};

/// Carries out one subscription delivery's settlement on the broker.
pub(crate) struct AmqpSettler {
    shared: Arc<Shared>,
    reg: Arc<Registration>,
    acker: Acker,
    /// The connection generation the delivery arrived on; its acker only works there.
    generation: u64,
    properties: BasicProperties,
    body: Vec<u8>,
    attempt: u32,
    /// In hand until settled (poison watch).
    held: Option<InHand>,
    /// A suspect's turn, given back once settled.
    _turn: Option<OwnedSemaphorePermit>,
}

/// A republish that would not fit one frame: its metadata size and what fits.
struct TooLarge {
    size: usize,
    limit: usize,
}

impl AmqpSettler {
    pub(crate) fn new(
        shared: &Arc<Shared>,
        reg: &Arc<Registration>,
        taken: Taken,
        turn: Option<OwnedSemaphorePermit>,
    ) -> Self {
        let Taken {
            delivery,
            held,
            generation,
            ..
        } = taken;
        let lapin::message::Delivery {
            data,
            properties,
            acker,
            ..
        } = delivery;
        AmqpSettler {
            shared: shared.clone(),
            reg: reg.clone(),
            acker,
            generation,
            attempt: headers::attempt(properties.headers().as_ref()),
            properties,
            body: data,
            held,
            _turn: turn,
        }
    }

    /// The session the delivery arrived on, if it is still the live one.
    fn session(&self) -> Result<Arc<Session>, BridgeError> {
        self.shared
            .link
            .current()
            .filter(|s| s.generation == self.generation && s.is_live())
            .ok_or_else(|| {
                BridgeError::Unavailable(
                    "the connection this message arrived on is gone; the broker redelivers it"
                        .into(),
                )
            })
    }

    /// Publishes `properties` and the body through the default exchange to `queue`.
    async fn republish(
        &self,
        session: &Session,
        queue: &str,
        properties: BasicProperties,
    ) -> Result<(), BridgeError> {
        let verdict = session
            .publish(Outgoing {
                exchange: "",
                routing_key: queue,
                mandatory: true,
                body: &self.body,
                properties,
            })
            .await?;
        match verdict {
            Verdict::Confirmed => Ok(()),
            Verdict::Returned { code, text } => Err(BridgeError::Broker(format!(
                "queue `{queue}` does not exist ({code} {text})"
            ))),
            Verdict::Nacked => Err(BridgeError::Broker(format!(
                "the broker refused the message for `{queue}`"
            ))),
        }
    }

    fn headers(&self) -> FieldTable {
        self.properties.headers().clone().unwrap_or_default()
    }

    /// The properties of a copy with `table`, or how much too large they are.
    fn copy(&self, session: &Session, table: FieldTable) -> Result<BasicProperties, TooLarge> {
        let properties = publish::republish_properties(&self.properties, table);
        let size = publish::metadata_len(&properties);
        let limit = session.budget.republish;
        if size > limit {
            return Err(TooLarge { size, limit });
        }
        Ok(properties)
    }

    async fn ack(self) -> Result<(), BridgeError> {
        delivery::ack(&self.acker).await?;
        suspects::settled(self.held);
        Ok(())
    }

    async fn redeliver(self, delay: Duration, next_attempt: u32) -> Result<(), BridgeError> {
        let session = self.session()?;
        let mut table = self.headers();
        headers::set_u64(&mut table, headers::ATTEMPT, u64::from(next_attempt));
        let properties = match self.copy(&session, table) {
            Ok(properties) => properties,
            Err(TooLarge { size, limit }) => {
                let reason = format!(
                    "too large to retry: {size} bytes of headers and properties, {limit} fit \
                     with the bridge's own"
                );
                return self.give_up(reason).await;
            }
        };
        let target = if delay.is_zero() {
            self.reg.queue.to_string()
        } else {
            let channel = session.admin_channel().await?;
            let retry = topology::declare_retry_queue(
                &channel,
                &self.shared.topology,
                &self.reg.queue,
                delay,
                session.timeout,
            )
            .await?;
            self.shared.ledger.record(&retry);
            retry
        };
        self.republish(&session, &target, properties).await?;
        tracing::debug!(registration = %self.reg.label, next_attempt, delay_ms = millis(delay), queue = %target, "redelivery scheduled");
        self.ack().await
    }

    /// A message that cannot be retried as it is: dead-lettered with `reason` where the
    /// subscription has a target, dropped with one warning otherwise; counted as poison.
    async fn give_up(self, reason: String) -> Result<(), BridgeError> {
        self.shared.ledger.count_poison();
        let target = self
            .reg
            .spec()
            .and_then(|s| s.policy.dead_letter_target.clone());
        match target {
            Some(target) => {
                let note = DeadLetterNote {
                    target,
                    reason,
                    attempts: self.attempt,
                    origin: self.reg.label.to_string(),
                };
                self.dead_letter(note).await
            }
            None => {
                tracing::warn!(registration = %self.reg.label, queue = %self.reg.queue, %reason, "message dropped (no dead-letter target)");
                self.session()?;
                self.ack().await
            }
        }
    }

    async fn dead_letter(self, note: DeadLetterNote) -> Result<(), BridgeError> {
        let session = self.session()?;
        let channel = session.admin_channel().await?;
        let queue = topology::declare_dead_letter_queue(
            &channel,
            &self.shared.topology,
            &note.target,
            session.timeout,
        )
        .await?;
        self.shared.ledger.record(&queue);
        let mut table = self.headers();
        headers::set_u64(
            &mut table,
            headers::DEAD_LETTER_ATTEMPTS,
            u64::from(note.attempts),
        );
        headers::set_str(&mut table, headers::DEAD_LETTER_ORIGIN, &note.origin);
        headers::set_u64(&mut table, headers::DEAD_LETTERED_AT, now_ms());
        // Where a replay sends it back to (`dead_letters.rs`).
        headers::set_str(&mut table, headers::DEAD_LETTER_QUEUE, &self.reg.queue);
        let mut reason = note.reason.clone();
        headers::set_str(
            &mut table,
            headers::DEAD_LETTER_REASON,
            headers::cut_reason(&reason),
        );
        let properties = match self.copy(&session, table.clone()) {
            Ok(properties) => properties,
            Err(TooLarge { size, limit }) => {
                let measure = |t: &FieldTable| {
                    publish::metadata_len(&publish::republish_properties(
                        &self.properties,
                        t.clone(),
                    ))
                };
                let shed = budget::shrink(&mut table, limit, measure);
                reason = format!(
                    "{reason}; its headers were too large to keep ({size} bytes, {limit} fit): \
                     shed {}",
                    shed.join(", ")
                );
                headers::set_str(
                    &mut table,
                    headers::DEAD_LETTER_REASON,
                    headers::cut_reason(&reason),
                );
                match self.copy(&session, table) {
                    Ok(properties) => properties,
                    Err(TooLarge { size, .. }) => {
                        self.shared.ledger.count_poison();
                        tracing::warn!(registration = %self.reg.label, queue = %self.reg.queue, size, limit, "message dropped: too large to dead-letter even without its own headers");
                        return self.ack().await;
                    }
                }
            }
        };
        self.republish(&session, &queue, properties).await?;
        tracing::debug!(registration = %self.reg.label, queue = %queue, %reason, "dead-lettered");
        self.ack().await
    }
}

#[async_trait]
impl Settler for AmqpSettler {
    async fn settle(self: Box<Self>, settlement: Settlement) -> Result<(), BridgeError> {
        let this = *self;
        match settlement {
            Settlement::Ack | Settlement::Drop { .. } => {
                this.session()?;
                this.ack().await
            }
            Settlement::Redeliver {
                delay,
                next_attempt,
            } => this.redeliver(delay, next_attempt).await,
            Settlement::DeadLetter(note) => this.dead_letter(note).await,
            Settlement::Pause { reason } => {
                // Cancel first, then hand the message back: requeued before the cancel, it
                // could come straight back to this very consumer.
                this.reg.request_pause(reason).await;
                this.session()?;
                delivery::requeue(&this.acker).await;
                tracing::debug!(registration = %this.reg.label, attempt = this.attempt, "paused delivery returned to its queue");
                suspects::settled(this.held);
                Ok(())
            }
        }
    }
}
