//! Subscription outcomes, the failure policy, and the settlement a bridge carries out.
//!
//! A handler ends with one [`Outcome`]. Core turns it, together with the delivery's attempt
//! number and the subscription's [`FailurePolicy`], into one [`Settlement`] with
//! [`FailurePolicy::settle`]. The bridge only executes settlements; it never decides whether a
//! message is retried, when, or where it is dead-lettered.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::envelope::Envelope;

/// How a subscription handler's work on one delivery ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "status")]
pub enum Outcome {
    /// Processed: remove it.
    Ack,
    /// Deliver again later (counts towards `max_attempts`). `delay_ms` overrides the policy's.
    Retry {
        /// Delay before the next attempt; `None` = the policy's `retry_delay_ms`.
        delay_ms: Option<u64>,
    },
    /// Send to the dead-letter target at once.
    DeadLetter {
        /// Why.
        reason: String,
    },
    /// Settle and discard, with a warning.
    Drop {
        /// Why.
        reason: String,
    },
    /// Pause this consumer until an operator resumes it. The delivery is put back, not lost.
    StopConsumer {
        /// Why.
        reason: String,
    },
}

impl Outcome {
    /// `Retry` with the policy's delay.
    pub fn retry() -> Self {
        Outcome::Retry { delay_ms: None }
    }

    /// `DeadLetter` with a reason.
    pub fn dead_letter(reason: impl Into<String>) -> Self {
        Outcome::DeadLetter {
            reason: reason.into(),
        }
    }

    /// `Drop` with a reason.
    pub fn drop_message(reason: impl Into<String>) -> Self {
        Outcome::Drop {
            reason: reason.into(),
        }
    }

    /// `StopConsumer` with a reason.
    pub fn stop_consumer(reason: impl Into<String>) -> Self {
        Outcome::StopConsumer {
            reason: reason.into(),
        }
    }
}

/// Failure handling of one subscription. Defaults: strict, one attempt, no delay, no target.
///
/// ```
/// use purista_core::FailurePolicy;
/// let p = FailurePolicy::default();
/// assert_eq!((p.max_attempts, p.retry_delay_ms, p.dead_letter_target), (1, 0, None));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailurePolicy {
    /// `strict` is the only mode: unsupported policies fail the start (see the strict check).
    pub mode: PolicyMode,
    /// Total deliveries including the first. 1 = no retry.
    pub max_attempts: u32,
    /// Delay before a retry.
    pub retry_delay_ms: u64,
    /// Where exhausted or dead-lettered messages go.
    pub dead_letter_target: Option<String>,
}

/// Failure-policy mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub enum PolicyMode {
    /// Unsupported settings fail the startup check.
    #[default]
    Strict,
}

impl Default for FailurePolicy {
    fn default() -> Self {
        FailurePolicy {
            mode: PolicyMode::Strict,
            max_attempts: 1,
            retry_delay_ms: 0,
            dead_letter_target: None,
        }
    }
}

/// What the bridge must do with a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// Remove the message.
    Ack,
    /// Deliver again after `delay` as attempt `next_attempt`.
    Redeliver {
        /// Wait before redelivery.
        delay: Duration,
        /// Attempt number of the redelivery (1-based).
        next_attempt: u32,
    },
    /// Move to a dead-letter target.
    DeadLetter(DeadLetterNote),
    /// Discard (the warning is logged by core).
    Drop {
        /// Why.
        reason: String,
    },
    /// Pause the consumer and put the delivery back with the same attempt number.
    Pause {
        /// Why.
        reason: String,
    },
}

/// What a dead-lettered message carries besides its payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterNote {
    /// Target name.
    pub target: String,
    /// Why it was dead-lettered.
    pub reason: String,
    /// Deliveries made.
    pub attempts: u32,
    /// Registration key of the subscription it came from.
    pub origin: String,
}

/// A dead-lettered message as an operator sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterEntry {
    /// Reason, attempts, origin.
    pub note: DeadLetterNote,
    /// The message, intact; `None` when the bytes were not an envelope.
    pub envelope: Option<Envelope>,
    /// The raw bytes, when the message could not be decoded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<Vec<u8>>,
    /// When it was dead-lettered (epoch ms).
    pub dead_lettered_at: u64,
}

impl FailurePolicy {
    /// Maps a handler's outcome on delivery `attempt` (1-based) to what the bridge does.
    ///
    /// Retries stop after `max_attempts` deliveries; the message then goes to the dead-letter
    /// target, or is dropped (with an error log by the caller) when there is none.
    ///
    /// ```
    /// use purista_core::{FailurePolicy, Outcome, Settlement};
    /// let p = FailurePolicy { max_attempts: 2, dead_letter_target: Some("dlq".into()), ..Default::default() };
    /// assert!(matches!(p.settle(1, &Outcome::retry(), "sub"), Settlement::Redeliver { next_attempt: 2, .. }));
    /// assert!(matches!(p.settle(2, &Outcome::retry(), "sub"), Settlement::DeadLetter(_)));
    /// ```
    pub fn settle(&self, attempt: u32, outcome: &Outcome, origin: &str) -> Settlement {
        match outcome {
            Outcome::Ack => Settlement::Ack,
            Outcome::Drop { reason } => Settlement::Drop {
                reason: reason.clone(),
            },
            Outcome::StopConsumer { reason } => Settlement::Pause {
                reason: reason.clone(),
            },
            Outcome::DeadLetter { reason } => self.dead_letter(reason.clone(), attempt, origin),
            Outcome::Retry { delay_ms } => {
                if attempt < self.max_attempts {
                    Settlement::Redeliver {
                        delay: Duration::from_millis(delay_ms.unwrap_or(self.retry_delay_ms)),
                        next_attempt: attempt + 1,
                    }
                } else {
                    self.dead_letter(
                        format!("retries exhausted after {attempt} attempt(s)"),
                        attempt,
                        origin,
                    )
                }
            }
        }
    }

    fn dead_letter(&self, reason: String, attempts: u32, origin: &str) -> Settlement {
        match &self.dead_letter_target {
            Some(target) => Settlement::DeadLetter(DeadLetterNote {
                target: target.clone(),
                reason,
                attempts,
                origin: origin.to_string(),
            }),
            None => Settlement::Drop {
                reason: format!("{reason}; no dead-letter target configured"),
            },
        }
    }
}
