//! What an operator does with a running bridge: dead letters of subscriptions (inspect, replay
//! with a fresh retry budget, purge) and consumers paused by `stop_consumer` (list, resume).
//!
//! [`SubscriptionOperator`] is a supertrait of [`EventBridge`](crate::EventBridge), so every
//! bridge answers these calls through `Arc<dyn EventBridge>`, with no downcast to a concrete
//! bridge type. A bridge that declares no dead-letter support
//! ([`Capabilities::dead_letter`](crate::Capabilities)) answers the dead-letter calls with
//! [`BridgeError::Unsupported`]; one that declares it implements all three.
//!
//! Paused consumers are named by their [`RegistrationKey`] (`service@version/subscription`).

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::BridgeError;
use crate::outcome::DeadLetterEntry;

/// The key of a subscription registration: `service@version/subscription`. Instances of one
/// service share it, which is what makes a subscription shared; operators resume paused
/// consumers by it.
///
/// ```
/// use purista_core::RegistrationKey;
/// let key = RegistrationKey::new("billing", "1", "sendReceipt");
/// assert_eq!(key.as_str(), "billing@1/sendReceipt");
/// assert_eq!(key, "billing@1/sendReceipt");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RegistrationKey(String);

impl RegistrationKey {
    /// The key of subscription `name` of service `service` at `version`.
    pub fn new(service: &str, version: &str, name: &str) -> Self {
        RegistrationKey(format!("{service}@{version}/{name}"))
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for RegistrationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for RegistrationKey {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for RegistrationKey {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl PartialEq<RegistrationKey> for String {
    fn eq(&self, other: &RegistrationKey) -> bool {
        *self == other.0
    }
}

impl From<&str> for RegistrationKey {
    fn from(key: &str) -> Self {
        RegistrationKey(key.to_string())
    }
}

impl From<String> for RegistrationKey {
    fn from(key: String) -> Self {
        RegistrationKey(key)
    }
}

impl AsRef<str> for RegistrationKey {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A paused consumer, as listed by [`SubscriptionOperator::paused_subscription_consumers`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PausedConsumer {
    /// Registration key.
    pub key: RegistrationKey,
    /// Why it was paused.
    pub reason: String,
    /// When (epoch ms).
    pub paused_at: u64,
}

/// What [`SubscriptionOperator::replay_dead_letters`] did.
///
/// Every message the call took from the dead-letter target is either counted in `replayed`
/// (back with its subscription, with a fresh retry budget, and gone from the target) or listed
/// in `left` (still in the target, with the reason).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplayReport {
    /// Messages handed back to their subscription and removed from the dead-letter target.
    pub replayed: usize,
    /// Messages that stay in the dead-letter target, in the order they were read.
    pub left: Vec<LeftDeadLetter>,
}

/// A dead letter a replay left where it was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeftDeadLetter {
    /// The envelope's id; for undecodable bytes the broker's message id, if any.
    pub message_id: Option<String>,
    /// Why it was not replayed.
    pub reason: NotReplayed,
}

/// Why a dead letter was not replayed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
#[non_exhaustive]
pub enum NotReplayed {
    /// The bytes are not a PURISTA envelope (poison): replaying would only dead-letter them
    /// again.
    Undecodable,
    /// The dead letter does not say which subscription it came from (written by an older
    /// version of the bridge); move it with broker tools.
    UnknownSource,
    /// It names a source that is not a subscription of this bridge's deployment (another
    /// prefix, a hand-written message).
    ForeignSource {
        /// The source it names (queue, topic or registration).
        source: String,
    },
    /// Its subscription no longer exists (removed, or a broadcast instance that is gone).
    SourceGone {
        /// The source it came from.
        source: String,
    },
    /// The broker refused the copy (e.g. the subscription's queue is full).
    Refused {
        /// The source it came from.
        source: String,
    },
}

impl std::fmt::Display for NotReplayed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotReplayed::Undecodable => f.write_str("undecodable message"),
            NotReplayed::UnknownSource => {
                f.write_str("the subscription it came from is not recorded")
            }
            NotReplayed::ForeignSource { source } => {
                write!(f, "`{source}` is not a subscription of this deployment")
            }
            NotReplayed::SourceGone { source } => write!(f, "`{source}` no longer exists"),
            NotReplayed::Refused { source } => {
                write!(f, "the broker refused the message for `{source}`")
            }
        }
    }
}

/// Operator calls every event bridge answers. See the module docs.
#[async_trait]
pub trait SubscriptionOperator: Send + Sync {
    /// Consumers paused by `stop_consumer`, by registration key.
    fn paused_subscription_consumers(&self) -> Vec<PausedConsumer>;

    /// Resumes a paused consumer. `Ok(false)` when it was not paused.
    async fn resume_subscription_consumer(
        &self,
        key: &RegistrationKey,
    ) -> Result<bool, BridgeError>;

    /// Reads (without removing) up to `limit` entries of dead-letter target `target`, oldest
    /// first.
    async fn inspect_dead_letters(
        &self,
        target: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetterEntry>, BridgeError> {
        let _ = (target, limit);
        Err(BridgeError::Unsupported("dead letters".into()))
    }

    /// Hands up to `limit` entries of `target`, oldest first, back to the subscriptions they
    /// were dead-lettered from, each as attempt 1 with the subscription's whole retry budget.
    /// A dead letter is removed only once its copy is safely back (a crash in between leaves a
    /// duplicate, never a loss).
    async fn replay_dead_letters(
        &self,
        target: &str,
        limit: usize,
    ) -> Result<ReplayReport, BridgeError> {
        let _ = (target, limit);
        Err(BridgeError::Unsupported("dead letters".into()))
    }

    /// Deletes every entry of `target`. Returns how many.
    async fn purge_dead_letters(&self, target: &str) -> Result<usize, BridgeError> {
        let _ = target;
        Err(BridgeError::Unsupported("dead letters".into()))
    }
}
