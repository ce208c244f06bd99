//! The [`EventBridge`] trait: the small surface every broker adapter implements.
//!
//! A bridge moves envelopes. It stamps `id`, `timestamp` and `sender.instanceId` on what it
//! emits, routes commands to exactly one handler and responses back by `correlationId`, routes
//! other messages to matching subscriptions, and executes the [`Settlement`]s that core computes.
//! What a timeout, retry or filter *means* is decided in core, never in an adapter.
//!
//! The trait is object safe; the facade picks an implementation at run time and hands out
//! `Arc<dyn EventBridge>`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::capabilities::Capabilities;
use crate::envelope::{Address, Envelope};
use crate::error::{BridgeError, SettleError};
use crate::filter::SubscriptionFilter;
use crate::inflight::InFlight;
use crate::operator::{RegistrationKey, SubscriptionOperator};
use crate::outcome::{FailurePolicy, Settlement};

/// Serves commands for one address. Implemented by core's service runtime.
#[async_trait]
pub trait CommandHandler: Send + Sync + 'static {
    /// Handles a command and returns the response envelope (success or error). Never panics.
    async fn handle(&self, command: Arc<Envelope>) -> Envelope;
}

/// Receives subscription deliveries. Implemented by core's service runtime.
#[async_trait]
pub trait DeliveryHandler: Send + Sync + 'static {
    /// Handles one delivery. Core always settles it exactly once before returning.
    async fn deliver(&self, delivery: Delivery);
}

/// Carries out one settlement on the broker. Implemented by each bridge per delivery.
#[async_trait]
pub trait Settler: Send + 'static {
    /// Executes the settlement. Called at most once per delivery (core guarantees it).
    async fn settle(self: Box<Self>, settlement: Settlement) -> Result<(), BridgeError>;
}

/// One delivery of a message to a subscription consumer.
pub struct Delivery {
    /// The message.
    pub envelope: Arc<Envelope>,
    /// 1 for the first delivery, incremented per redelivery.
    pub attempt: u32,
    /// Settles the delivery; take it with [`SettleOnce`].
    pub settle: SettleOnce,
}

/// A once-only settlement handle: the second settle is a typed error, never a broker fault.
pub struct SettleOnce {
    message_id: String,
    settler: Mutex<Option<Box<dyn Settler>>>,
}

impl SettleOnce {
    /// Wraps a bridge's settler.
    pub fn new(message_id: impl Into<String>, settler: Box<dyn Settler>) -> Self {
        SettleOnce {
            message_id: message_id.into(),
            settler: Mutex::new(Some(settler)),
        }
    }

    /// Settles; returns [`SettleError::AlreadySettled`] when it was settled before.
    pub async fn settle(&self, settlement: Settlement) -> Result<(), SettleError> {
        let settler = self.settler.lock().take();
        match settler {
            Some(s) => s.settle(settlement).await.map_err(SettleError::from),
            None => Err(SettleError::AlreadySettled {
                message_id: self.message_id.clone(),
            }),
        }
    }

    /// True once a settlement was taken.
    pub fn is_settled(&self) -> bool {
        self.settler.lock().is_none()
    }
}

/// A delivery nobody settled (its handler task was aborted at a shutdown deadline, or a bridge
/// or handler forgot it) is not silent: what happens to it depends on the bridge (a broker
/// redelivers it, an at-most-once bridge loses it), so say so where an operator looks.
impl Drop for SettleOnce {
    fn drop(&mut self) {
        if self.settler.get_mut().is_some() {
            tracing::warn!(
                message_id = %self.message_id,
                "delivery dropped without a settlement: a broker with acknowledgements redelivers it, an at-most-once bridge loses it"
            );
        }
    }
}

/// A subscription as the bridge sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SubscriptionSpec {
    /// Registration key, unique per subscription within a deployment: `service@version/name`.
    /// Instances of one service share it (that is what makes a subscription shared).
    pub key: RegistrationKey,
    /// The subscribing service and subscription name.
    pub subscriber: Address,
    /// What it receives.
    pub filter: SubscriptionFilter,
    /// `true`: one instance gets each message; `false`: every instance does.
    pub shared: bool,
    /// Messages wait while no consumer is connected.
    pub durable: bool,
    /// Failure handling (the bridge needs the dead-letter target and delays to set up topology).
    pub policy: FailurePolicy,
    /// Deliveries handled concurrently by this consumer (prefetch).
    pub prefetch: u16,
}

/// Bridge health.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "state")]
pub enum BridgeHealth {
    /// Connected and serving.
    Healthy,
    /// Not connected, not started, or shut down.
    Unhealthy {
        /// Why.
        reason: String,
    },
}

impl BridgeHealth {
    /// True when healthy.
    pub fn is_healthy(&self) -> bool {
        matches!(self, BridgeHealth::Healthy)
    }
}

/// Running totals a bridge keeps about trouble it absorbed, for operators and metrics. Zero
/// where a bridge has no such event (the in-process bridge never reconnects).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BridgeCounters {
    /// Times the connection to the broker was re-established after a loss.
    pub reconnects: u64,
    /// Deliveries that could not be processed as what their queue carries (undecodable bytes,
    /// oversized bodies, an envelope on the wrong kind of queue); each was dead-lettered or
    /// dropped with a warning.
    pub poison_messages: u64,
    /// Responses (and stream frames) that found nobody waiting: late, or for an unknown
    /// correlation id; each was ignored with a warning.
    pub unmatched_responses: u64,
}

/// What was still running when a shutdown deadline passed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DrainReport {
    /// True when everything finished before the deadline.
    pub completed: bool,
    /// Work still running at the deadline: `(kind, registration)`.
    pub still_running: Vec<(crate::inflight::WorkKind, String)>,
    /// Pending invocations rejected with 503.
    pub rejected_invocations: usize,
    /// How long the drain took, in ms.
    pub waited_ms: u64,
}

/// The consumer's end of a stream session, as a bridge hands it out.
pub struct StreamConsumerEnd {
    /// Frames from the producer (`messageType: stream`).
    pub frames: mpsc::Receiver<Envelope>,
    /// Set to `Some(reason)` to cancel the session.
    pub cancel: watch::Sender<Option<String>>,
}

/// The producer's end of a stream session.
pub struct StreamProducerEnd {
    /// Frames to the consumer. The bridge stamps nothing; core builds complete frames.
    pub frames: mpsc::Sender<Envelope>,
    /// Becomes `Some(reason)` when the consumer cancels.
    pub cancelled: watch::Receiver<Option<String>>,
}

/// Serves stream sessions for one address. Implemented by core's service runtime.
#[async_trait]
pub trait StreamHandler: Send + Sync + 'static {
    /// Runs one session; `open` is the open frame.
    async fn open(&self, open: Arc<Envelope>, producer: StreamProducerEnd);
}

/// A message transport with PURISTA semantics. See the module docs.
///
/// Operator calls (dead letters, paused consumers) come with the supertrait
/// [`SubscriptionOperator`], so they are reachable through `Arc<dyn EventBridge>` too.
#[async_trait]
pub trait EventBridge: SubscriptionOperator + Send + Sync {
    /// Short name, e.g. `default`, `amqp`.
    fn name(&self) -> &str;

    /// This bridge instance's id (stamped as `sender.instanceId`).
    fn instance_id(&self) -> &str;

    /// The `messaging.system` of spans and metrics: OpenTelemetry's well-known name of the
    /// broker where it has one (`rabbitmq`), else the bridge's [`name`](EventBridge::name).
    fn messaging_system(&self) -> &str {
        self.name()
    }

    /// What this bridge can do. Truthful: the conformance suite proves each declared capability.
    fn capabilities(&self) -> &Capabilities;

    /// Default ttl of invocations and stream sessions (30 s unless configured).
    fn default_command_timeout(&self) -> Duration;

    /// Connects and prepares shared topology. Idempotent.
    async fn start(&self) -> Result<(), BridgeError>;

    /// Current health.
    async fn health(&self) -> BridgeHealth;

    /// Publishes a non-command message (events, info, responses). Stamps id, timestamp and
    /// `sender.instanceId`. Commands and stream frames are refused (`InvalidRequest`): they
    /// travel through [`invoke`](EventBridge::invoke) and [`open_stream`](EventBridge::open_stream).
    async fn emit(&self, message: Envelope) -> Result<(), BridgeError>;

    /// Sends a command and waits for its response, at most `ttl`. Stamps like `emit`.
    /// Returns the response envelope; a timeout is [`BridgeError::Timeout`] and leaves no
    /// pending entry behind.
    async fn invoke(&self, command: Envelope, ttl: Duration) -> Result<Envelope, BridgeError>;

    /// Serves commands addressed to `address` (name, version, target).
    async fn register_command(
        &self,
        address: Address,
        handler: Arc<dyn CommandHandler>,
    ) -> Result<(), BridgeError>;

    /// Stops serving `address` on this instance.
    async fn unregister_command(&self, address: &Address) -> Result<(), BridgeError>;

    /// Starts a consumer for a subscription.
    async fn register_subscription(
        &self,
        spec: SubscriptionSpec,
        handler: Arc<dyn DeliveryHandler>,
    ) -> Result<(), BridgeError>;

    /// Stops this instance's consumer of the subscription (durable queues stay).
    async fn unregister_subscription(&self, key: &RegistrationKey) -> Result<(), BridgeError>;

    /// Serves stream sessions for `address`. Bridges without streams return `Unsupported`.
    async fn register_stream(
        &self,
        address: Address,
        handler: Arc<dyn StreamHandler>,
    ) -> Result<(), BridgeError>;

    /// Stops serving stream sessions for `address` on this instance (running sessions go on).
    async fn unregister_stream(&self, address: &Address) -> Result<(), BridgeError>;

    /// Opens a stream session with an open frame (a `stream` envelope with a receiver).
    async fn open_stream(&self, open: Envelope) -> Result<StreamConsumerEnd, BridgeError>;

    /// The bridge's own in-flight work (pending invocations count as `command`).
    fn in_flight(&self) -> InFlight;

    /// Reconnects, poison messages and unmatched responses so far.
    fn counters(&self) -> BridgeCounters {
        BridgeCounters::default()
    }

    /// Stops intake, waits for in-flight work until `deadline`, rejects what is left with 503
    /// and closes. Idempotent.
    async fn shutdown(&self, deadline: tokio::time::Instant) -> DrainReport;
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Arc;

    use parking_lot::Mutex;

    use super::*;

    struct Noop;

    #[async_trait]
    impl Settler for Noop {
        async fn settle(self: Box<Self>, _settlement: Settlement) -> Result<(), BridgeError> {
            Ok(())
        }
    }

    /// Log lines written while `f` runs on this thread.
    fn logs_of(f: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl Write for Buffer {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        String::from_utf8_lossy(&buffer.0.lock()).into_owned()
    }

    #[tokio::test]
    async fn dropping_an_unsettled_delivery_warns_and_a_settled_one_does_not() {
        let unsettled = logs_of(|| drop(SettleOnce::new("m-1", Box::new(Noop))));
        assert!(unsettled.contains("WARN"), "{unsettled}");
        assert!(
            unsettled.contains("m-1") && unsettled.contains("without a settlement"),
            "{unsettled}"
        );

        let settled = SettleOnce::new("m-2", Box::new(Noop));
        settled.settle(Settlement::Ack).await.unwrap();
        assert_eq!(logs_of(|| drop(settled)), "");
    }
}
