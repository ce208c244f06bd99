//! Subscriptions: typed definitions, handler replies, and the runtime that turns a handler's
//! result into exactly one settlement.
//!
//! Result mapping (DESIGN §3.4): a returned [`Reply`] carries its [`Outcome`]; a returned
//! [`HandledError`](crate::HandledError) acks; any other error retries under the failure policy;
//! a panic counts as an unhandled error; a payload that does not deserialize is dead-lettered
//! (or dropped with a warning when there is no target). With `emit_event` set, a reply's value is
//! emitted as one `customMessage` before the delivery is acked.
//!
//! An outcome settled early through [`SubscriptionContext::settle`] and a returned one take the
//! same path (`settle.rs`): same strict check, same warnings, same release of the idempotency
//! claim. In non-strict mode on a bridge without manual ack, the delivery is acked on arrival
//! through that path too, before the handler runs.

use std::sync::Arc;

use async_trait::async_trait;
use futures::FutureExt;
use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tracing::Instrument;

use super::context::{Context, Shared, SubscriptionContext};
use super::flow::Flow;
use super::handler::run_guarded;
use super::settle::{DeliverySettler, SettleRules};
use crate::bridge::{Delivery, DeliveryHandler, SubscriptionSpec};
use crate::capabilities::Need;
use crate::envelope::{Address, Envelope};
use crate::error::HandledError;
use crate::filter::SubscriptionFilter;
use crate::idempotency::{Claim, IdempotencyGuard};
use crate::inflight::InFlightCounter;
use crate::observe::spans::{self, Traced};
use crate::operator::RegistrationKey;
use crate::outcome::{FailurePolicy, Outcome, Settlement};

/// What a subscription handler returns: an outcome and, optionally, a value to emit.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// How the delivery is settled.
    pub outcome: Outcome,
    /// Emitted as a `customMessage` named after the subscription's `emit_event` (on ack only).
    pub emit: Option<Value>,
}

impl Reply {
    /// Ack, nothing emitted.
    pub fn ack() -> Self {
        Reply {
            outcome: Outcome::Ack,
            emit: None,
        }
    }

    /// Ack and emit `value` as the subscription's `emit_event`.
    ///
    /// A value that cannot be serialized turns the reply into a retry (logged).
    pub fn emit(value: impl Serialize) -> Self {
        match serde_json::to_value(value) {
            Ok(v) => Reply {
                outcome: Outcome::Ack,
                emit: Some(v),
            },
            Err(e) => {
                tracing::error!(error = %e, "subscription reply could not be serialized; retrying");
                Reply {
                    outcome: Outcome::retry(),
                    emit: None,
                }
            }
        }
    }
}

impl From<Outcome> for Reply {
    fn from(outcome: Outcome) -> Self {
        Reply {
            outcome,
            emit: None,
        }
    }
}

/// Anything a subscription handler may return inside `Ok`.
pub trait IntoReply {
    /// Converts to a [`Reply`].
    fn into_reply(self) -> Reply;
}

impl IntoReply for () {
    fn into_reply(self) -> Reply {
        Reply::ack()
    }
}

impl IntoReply for Outcome {
    fn into_reply(self) -> Reply {
        Reply {
            outcome: self,
            emit: None,
        }
    }
}

impl IntoReply for Reply {
    fn into_reply(self) -> Reply {
        self
    }
}

/// Marks a payload that did not deserialize: such a delivery is poison, not a transient error.
#[derive(Debug, thiserror::Error)]
#[error("payload does not match the subscription's type: {0}")]
pub(crate) struct PayloadMismatch(String);

pub(crate) type ErasedSubscriptionFn =
    dyn Fn(SubscriptionContext, &Value) -> BoxFuture<'static, anyhow::Result<Reply>> + Send + Sync;

/// A subscription definition.
///
/// ```
/// use purista_core::service::{SubscriptionDef, SubscriptionContext, Reply};
/// #[derive(serde::Deserialize)] struct Paid { order_id: String }
/// let def = SubscriptionDef::new("onPaid", |_ctx: SubscriptionContext, e: Paid| async move {
///     Ok(Reply::emit(serde_json::json!({ "orderId": e.order_id })))
/// })
/// .event_name("orderPaid")
/// .emit_event("shipmentRequested")
/// .max_attempts(3)
/// .dead_letter_target("orders.failed");
/// assert_eq!(def.name(), "onPaid");
/// ```
pub struct SubscriptionDef {
    pub(crate) name: String,
    pub(crate) filter: SubscriptionFilter,
    pub(crate) shared: bool,
    pub(crate) durable: bool,
    pub(crate) policy: FailurePolicy,
    pub(crate) emit_event: Option<String>,
    pub(crate) pausable: bool,
    /// Set by non-strict mode when the bridge has no manual ack.
    pub(crate) ack_on_arrival: bool,
    pub(crate) prefetch: u16,
    pub(crate) guard: Option<IdempotencyGuard>,
    pub(crate) extra_needs: Vec<Need>,
    pub(crate) handler: Arc<ErasedSubscriptionFn>,
}

impl SubscriptionDef {
    /// A subscription named `name`; `handler` receives the payload deserialized as `T`
    /// (use `serde_json::Value` to take anything).
    pub fn new<T, R, F, Fut>(name: impl Into<String>, handler: F) -> Self
    where
        T: DeserializeOwned + Send + 'static,
        R: IntoReply + Send + 'static,
        F: Fn(SubscriptionContext, T) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<R>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let erased = move |ctx: SubscriptionContext, payload: &Value| {
            // Decode from the shared envelope before the future exists: no payload copy.
            let fut = T::deserialize(payload)
                .map_err(|e| anyhow::Error::new(PayloadMismatch(e.to_string())))
                .map(|input| handler(ctx, input));
            async move { Ok(fut?.await?.into_reply()) }.boxed()
        };
        SubscriptionDef {
            name: name.into(),
            filter: SubscriptionFilter::default(),
            shared: true,
            durable: false,
            policy: FailurePolicy::default(),
            emit_event: None,
            pausable: false,
            ack_on_arrival: false,
            prefetch: 8,
            guard: None,
            extra_needs: Vec::new(),
            handler: Arc::new(erased),
        }
    }

    /// The subscription name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Replaces the whole filter.
    pub fn filter(mut self, filter: SubscriptionFilter) -> Self {
        self.filter = filter;
        self
    }

    /// Filters on `eventName` (keeps other filter parts).
    pub fn event_name(mut self, name: impl Into<String>) -> Self {
        self.filter.event_name = Some(name.into());
        self
    }

    /// Every instance receives every message (`shared: false`).
    pub fn broadcast(mut self) -> Self {
        self.shared = false;
        self
    }

    /// Messages wait while no consumer is connected (needs a durable bridge).
    pub fn durable(mut self, durable: bool) -> Self {
        self.durable = durable;
        self
    }

    /// Replaces the failure policy.
    pub fn failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Total deliveries including the first (needs bounded retry when > 1).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.policy.max_attempts = n.max(1);
        self
    }

    /// Delay before each retry (needs delayed retry when > 0).
    pub fn retry_delay_ms(mut self, ms: u64) -> Self {
        self.policy.retry_delay_ms = ms;
        self
    }

    /// Where exhausted and dead-lettered messages go (needs dead-letter support).
    pub fn dead_letter_target(mut self, target: impl Into<String>) -> Self {
        self.policy.dead_letter_target = Some(target.into());
        self
    }

    /// A reply's value is emitted as a `customMessage` with this event name.
    pub fn emit_event(mut self, event_name: impl Into<String>) -> Self {
        self.emit_event = Some(event_name.into());
        self
    }

    /// The handler may return [`Outcome::StopConsumer`] (needs pause/resume).
    pub fn pausable(mut self) -> Self {
        self.pausable = true;
        self
    }

    /// Deliveries handled concurrently by one consumer (default 8).
    pub fn prefetch(mut self, n: u16) -> Self {
        self.prefetch = n.max(1);
        self
    }

    /// Runs the handler once per key (message id or business key) within the guard's TTL.
    pub fn idempotent(mut self, guard: IdempotencyGuard) -> Self {
        self.guard = Some(guard);
        self
    }

    /// Declares an extra need, e.g. [`Need::AtLeastOnce`] or [`Need::ManualAck`].
    pub fn require(mut self, need: Need) -> Self {
        self.extra_needs.push(need);
        self
    }

    /// The needs this definition puts on a bridge.
    pub(crate) fn needs(&self) -> Vec<Need> {
        let mut needs = Vec::new();
        if self.filter.event_name.is_none() {
            needs.push(Need::EventName);
        }
        if !self.filter.is_event_only() {
            needs.push(Need::ComplexFilter);
        }
        needs.push(if self.shared {
            Need::SharedSubscription
        } else {
            Need::BroadcastSubscription
        });
        if self.durable {
            needs.push(Need::DurableSubscription);
        }
        if self.policy.max_attempts > 1 {
            needs.push(Need::BoundedRetry {
                max_attempts: self.policy.max_attempts,
            });
            if self.policy.retry_delay_ms > 0 {
                needs.push(Need::DelayedRetry {
                    delay_ms: self.policy.retry_delay_ms,
                });
            }
        }
        if self.policy.dead_letter_target.is_some() {
            needs.push(Need::DeadLetter);
        }
        if self.pausable {
            needs.push(Need::PauseResume);
        }
        needs.extend(self.extra_needs.iter().cloned());
        needs
    }
}

/// The registration key of a subscription: `service@version/name`.
pub fn registration_key(service: &str, version: &str, name: &str) -> RegistrationKey {
    RegistrationKey::new(service, version, name)
}

pub(crate) struct SubscriptionRuntime {
    pub shared: Arc<Shared>,
    pub key: Arc<str>,
    pub in_flight: InFlightCounter,
    pub target: Arc<str>,
    pub emit_event: Option<String>,
    /// Policy, pausable flag and idempotency guard: how an outcome becomes a settlement.
    pub rules: Arc<SettleRules>,
    /// Non-strict mode on a bridge without manual ack: settle before the handler runs.
    pub ack_on_arrival: bool,
    /// Filter applied in-process when the bridge could not apply all of it (non-strict mode).
    pub local_filter: Option<SubscriptionFilter>,
    pub handler: Arc<ErasedSubscriptionFn>,
}

impl SubscriptionRuntime {
    async fn run_handler(
        &self,
        ctx: SubscriptionContext,
        envelope: &Envelope,
        traced: &Traced,
    ) -> Reply {
        let result = run_guarded(|| (self.handler)(ctx, &envelope.payload)).await;
        match result {
            Ok(Ok(reply)) => reply,
            Ok(Err(err)) => {
                if let Some(m) = err.downcast_ref::<PayloadMismatch>() {
                    traced.fail_with("payload_mismatch");
                    tracing::warn!(error = %m, "poison message: payload does not deserialize");
                    Outcome::dead_letter(m.to_string()).into_reply()
                } else if let Some(h) = err.downcast_ref::<HandledError>() {
                    tracing::info!(status = h.status.0, message = %h.message, "subscription returned a handled error; acked");
                    Reply::ack()
                } else {
                    traced.fail_with("unhandled_error");
                    tracing::warn!(error = %format!("{err:#}"), "subscription failed; retry per policy");
                    Outcome::retry().into_reply()
                }
            }
            Err(()) => {
                traced.fail_with("panic");
                tracing::error!("subscription handler panicked; retry per policy");
                Outcome::retry().into_reply()
            }
        }
    }

    /// Emits the reply's value as the subscription's `emit_event`, from the handler's flow.
    async fn emit_reply(&self, ctx: &Context, value: Value) -> Result<(), ()> {
        let Some(event_name) = &self.emit_event else {
            tracing::warn!(
                "subscription returned a value to emit but has no emit_event; nothing emitted"
            );
            return Ok(());
        };
        let e = Envelope::custom(self.shared.sender(&self.target), event_name.clone(), value);
        ctx.emit_envelope(e).await.map_err(|err| {
            tracing::warn!(error = %err, "emitting the subscription's event failed; retry per policy");
        })
    }
}

#[async_trait]
impl DeliveryHandler for SubscriptionRuntime {
    async fn deliver(&self, delivery: Delivery) {
        let Delivery {
            envelope,
            attempt,
            settle,
        } = delivery;
        let traced = spans::delivery(
            &self.shared.site,
            &self.key,
            &self.target,
            &envelope,
            attempt,
        );
        let span = traced.span.clone();
        async {
            if let Some(f) = &self.local_filter
                && !f.matches(&envelope)
            {
                traced.outcome("filtered");
                let _ = settle.settle(Settlement::Ack).await;
                return;
            }
            if self.shared.is_closing() {
                // Intake has stopped: hand the delivery back untouched.
                traced.outcome("handed_back");
                let _ = settle
                    .settle(Settlement::Redeliver {
                        delay: std::time::Duration::ZERO,
                        next_attempt: attempt,
                    })
                    .await;
                return;
            }
            let _guard = self.in_flight.start();
            let claimed_key = match &self.rules.guard {
                Some(g) => match g.key_of(&envelope) {
                    Some(k) if g.claim(&k).await == Claim::Duplicate => {
                        tracing::debug!(key = %k, "duplicate delivery skipped by idempotency guard");
                        traced.outcome("duplicate");
                        let _ = settle.settle(Settlement::Ack).await;
                        return;
                    }
                    k => k,
                },
                None => None,
            };
            let settler = Arc::new(DeliverySettler::new(
                self.rules.clone(),
                envelope.clone(),
                attempt,
                claimed_key,
                settle,
                traced.span.clone(),
            ));
            if self.ack_on_arrival {
                // Non-strict mode on a bridge without manual ack: settled before the handler.
                let _ = settler.settle(Outcome::Ack).await;
            }
            let ctx = Context {
                shared: self.shared.clone(),
                flow: Flow::Message(envelope.clone()),
                target: self.target.clone(),
                trace: Some(traced.cx.clone()),
            };
            let sub_ctx = SubscriptionContext {
                ctx: ctx.clone(),
                settler: settler.clone(),
            };
            let _running = self.rules.meters.running();
            let started = std::time::Instant::now();
            let mut reply = self.run_handler(sub_ctx, &envelope, &traced).await;
            self.rules.meters.took(started.elapsed());
            if reply.outcome == Outcome::Ack
                && let Some(value) = reply.emit.take()
                && self.emit_reply(&ctx, value).await.is_err()
            {
                reply.outcome = Outcome::retry();
            }
            if settler.is_settled() {
                if reply.outcome != Outcome::Ack {
                    if self.ack_on_arrival {
                        tracing::warn!(outcome = ?reply.outcome, "delivery was acked on arrival (the bridge has no manual ack); returned outcome not applied");
                    } else {
                        tracing::warn!(outcome = ?reply.outcome, "delivery was settled early by the handler; returned outcome ignored");
                    }
                }
                return;
            }
            if let Err(e) = settler.settle(reply.outcome).await {
                tracing::error!(error = %e, "settling the delivery failed");
            }
        }
        .instrument(span)
        .await
    }
}

/// Builds the bridge-side spec of a definition.
pub(crate) fn spec_for(def: &SubscriptionDef, service: &str, version: &str) -> SubscriptionSpec {
    SubscriptionSpec {
        key: registration_key(service, version, &def.name),
        subscriber: Address::new(service, version, def.name.clone()),
        filter: def.filter.clone(),
        shared: def.shared,
        durable: def.durable,
        policy: def.policy.clone(),
        prefetch: def.prefetch,
    }
}
