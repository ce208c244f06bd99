//! One way from a subscription handler's outcome to the bridge's settlement.
//!
//! A handler settles a delivery either early, through
//! [`SubscriptionContext::settle`](super::SubscriptionContext::settle), or by returning its
//! outcome. Both go through [`DeliverySettler::settle`], so both get the same rules: a
//! `stop_consumer` from a subscription not declared pausable becomes a retry (with an error
//! log), the failure policy maps the outcome to a settlement, drops / dead letters / pauses are
//! warned about, and the idempotency claim is released when the message will come again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::bridge::SettleOnce;
use crate::envelope::Envelope;
use crate::error::SettleError;
use crate::idempotency::IdempotencyGuard;
use crate::observe::metrics::{RegistrationMeters, Settled};
use crate::outcome::{FailurePolicy, Outcome, Settlement};

/// A subscription's settlement rules, shared by all its deliveries.
pub(crate) struct SettleRules {
    pub policy: FailurePolicy,
    /// Registration key, the dead-letter origin.
    pub key: Arc<str>,
    pub pausable: bool,
    pub guard: Option<IdempotencyGuard>,
    /// The subscription's meters: each settlement is counted by its kind.
    pub meters: RegistrationMeters,
}

/// Settles one delivery, once.
pub(crate) struct DeliverySettler {
    rules: Arc<SettleRules>,
    envelope: Arc<Envelope>,
    attempt: u32,
    /// The idempotency key this delivery claimed, if any.
    claim: Option<String>,
    settle: SettleOnce,
    taken: AtomicBool,
    /// The delivery attempt's span, which learns the outcome.
    span: tracing::Span,
}

impl DeliverySettler {
    pub fn new(
        rules: Arc<SettleRules>,
        envelope: Arc<Envelope>,
        attempt: u32,
        claim: Option<String>,
        settle: SettleOnce,
        span: tracing::Span,
    ) -> Self {
        DeliverySettler {
            rules,
            envelope,
            attempt,
            claim,
            settle,
            taken: AtomicBool::new(false),
            span,
        }
    }

    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    pub fn key(&self) -> &str {
        &self.rules.key
    }

    /// True once an outcome was settled (or is being settled).
    pub fn is_settled(&self) -> bool {
        self.taken.load(Ordering::Acquire)
    }

    /// Settles with `outcome` under the subscription's rules. The second call is
    /// [`SettleError::AlreadySettled`] and changes nothing (no log, no claim release).
    pub async fn settle(&self, outcome: Outcome) -> Result<(), SettleError> {
        if self.taken.swap(true, Ordering::AcqRel) {
            return Err(SettleError::AlreadySettled {
                message_id: self.envelope.id.clone(),
            });
        }
        let rules = &self.rules;
        let outcome = match outcome {
            Outcome::StopConsumer { reason } if !rules.pausable => {
                tracing::error!(%reason, "stop_consumer from a subscription not declared pausable; retrying instead");
                Outcome::retry()
            }
            other => other,
        };
        let settlement = rules.policy.settle(self.attempt, &outcome, &rules.key);
        self.span
            .record("purista.outcome", settlement_name(&settlement));
        rules.meters.settled(match &settlement {
            Settlement::Ack => Settled::Ok,
            Settlement::Redeliver { .. } => Settled::Retry,
            Settlement::DeadLetter(_) => Settled::DeadLetter,
            Settlement::Drop { .. } => Settled::Drop,
            Settlement::Pause { .. } => Settled::Pause,
        });
        match &settlement {
            Settlement::Drop { reason } => tracing::warn!(%reason, "message dropped"),
            Settlement::DeadLetter(note) => {
                tracing::warn!(target_queue = %note.target, reason = %note.reason, attempts = note.attempts, "message dead-lettered")
            }
            Settlement::Pause { reason } => tracing::warn!(%reason, "consumer paused by handler"),
            Settlement::Redeliver {
                delay,
                next_attempt,
            } => tracing::debug!(?delay, next_attempt, "message will be redelivered"),
            Settlement::Ack => {}
        }
        // The claim stays while the message is done with (acked, dropped, dead-lettered); a
        // message that comes again must find it free, or its redelivery would be skipped.
        let done_with = matches!(
            outcome,
            Outcome::Ack | Outcome::Drop { .. } | Outcome::DeadLetter { .. }
        );
        if let (Some(guard), Some(key)) = (&rules.guard, &self.claim)
            && !done_with
        {
            guard.release(key).await;
        }
        self.settle.settle(settlement).await
    }
}

/// The `purista.outcome` of a settlement.
pub(crate) fn settlement_name(s: &Settlement) -> &'static str {
    match s {
        Settlement::Ack => "ack",
        Settlement::Redeliver { .. } => "retry",
        Settlement::DeadLetter(_) => "dead_letter",
        Settlement::Drop { .. } => "drop",
        Settlement::Pause { .. } => "pause",
    }
}
