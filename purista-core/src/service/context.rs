//! What a handler can do: read the message it runs for, invoke commands, emit events, open
//! streams and enqueue jobs — with trace, principal and tenant ids carried along.

use std::borrow::Borrow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::{Notify, watch};
use tracing::Instrument;

use super::contract::CommandContract;
use super::flow::Flow;
use super::settle::DeliverySettler;
use crate::bridge::EventBridge;
use crate::envelope::{Address, Envelope, SenderAddress};
use crate::error::{BridgeError, CommandError, ErrorPayload, SettleError, StatusCode};
use crate::ids;
use crate::inflight::InFlightTracker;
use crate::observe::TraceContext;
use crate::observe::metrics::{ClientMeters, SendKind};
use crate::observe::spans::{self, Site};
use crate::outcome::Outcome;
use crate::queue::{LeasedJob, NewJob, QueueBridge, QueueError};
use crate::stream::{StreamReader, open_frame};

/// State shared by a running service and every context it hands out.
pub(crate) struct Shared {
    pub name: String,
    pub version: String,
    pub bridge: Arc<dyn EventBridge>,
    pub queues: Option<Arc<dyn QueueBridge>>,
    pub inflight: InFlightTracker,
    pub closing: AtomicBool,
    /// Flips to true when pending invocations must fail with 503.
    pub reject_pending: watch::Sender<bool>,
    pub pending_invocations: AtomicUsize,
    /// Paused queue workers: queue → reason.
    pub paused_workers: Mutex<std::collections::BTreeMap<String, String>>,
    pub workers_resumed: Notify,
    /// What this service's spans say about where they run.
    pub site: Site,
    /// What this service sends, counted.
    pub meters: ClientMeters,
}

impl Shared {
    pub fn sender(&self, target: &str) -> SenderAddress {
        SenderAddress {
            service_name: self.name.clone(),
            service_version: self.version.clone(),
            service_target: target.to_string(),
            instance_id: self.bridge.instance_id().to_string(),
        }
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }
}

/// Per-call options of an invocation.
#[derive(Debug, Clone, Default)]
pub struct InvokeOptions {
    /// Time to wait for the response; default: the bridge's `default_command_timeout`.
    pub ttl: Option<Duration>,
    /// Overrides the propagated trace id.
    pub trace_id: Option<String>,
    /// Overrides the propagated principal.
    pub principal_id: Option<String>,
    /// Overrides the propagated tenant.
    pub tenant_id: Option<String>,
}

impl InvokeOptions {
    /// Options with a ttl.
    pub fn ttl(ttl: Duration) -> Self {
        InvokeOptions {
            ttl: Some(ttl),
            ..Default::default()
        }
    }
}

struct PendingGuard<'a>(&'a AtomicUsize);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A handler's view of the service: the message it runs for and the operations it may call.
#[derive(Clone)]
pub struct Context {
    pub(crate) shared: Arc<Shared>,
    pub(crate) flow: Flow,
    pub(crate) target: Arc<str>,
    /// The handler's span identity: what it starts continues this (`None` outside handlers).
    pub(crate) trace: Option<TraceContext>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("service", &self.shared.name)
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// The message this handler runs for (absent outside handlers and in job handlers).
    pub fn envelope(&self) -> Option<&Envelope> {
        self.flow.envelope()
    }

    /// Trace id of the current flow (the message's or the job's; absent outside handlers).
    pub fn trace_id(&self) -> Option<&str> {
        self.flow.trace_id()
    }

    /// The W3C trace-context carrier (`otp`, a JSON string) of the message or job this handler
    /// runs for, as it arrived.
    pub fn otp(&self) -> Option<&str> {
        self.flow.otp()
    }

    /// The W3C trace context of this handler's span: what the handler sends continues it
    /// (absent outside handlers, where each operation starts a trace of its own).
    pub fn trace_context(&self) -> Option<&TraceContext> {
        self.trace.as_ref()
    }

    /// Principal of the current flow.
    pub fn principal_id(&self) -> Option<&str> {
        self.flow.principal_id()
    }

    /// Tenant of the current flow.
    pub fn tenant_id(&self) -> Option<&str> {
        self.flow.tenant_id()
    }

    /// The service's bridge.
    pub fn bridge(&self) -> &Arc<dyn EventBridge> {
        &self.shared.bridge
    }

    /// Invokes a command and deserializes its result.
    pub async fn invoke<O: DeserializeOwned>(
        &self,
        receiver: Address,
        payload: impl Serialize,
        parameter: impl Serialize,
    ) -> Result<O, CommandError> {
        self.invoke_with(receiver, payload, parameter, InvokeOptions::default())
            .await
    }

    /// Invokes a command with options.
    pub async fn invoke_with<O: DeserializeOwned>(
        &self,
        receiver: Address,
        payload: impl Serialize,
        parameter: impl Serialize,
        opts: InvokeOptions,
    ) -> Result<O, CommandError> {
        let trace = opts
            .trace_id
            .clone()
            .or_else(|| self.trace_id().map(str::to_string));
        let payload = to_value(payload, &trace)?;
        let parameter = to_value(parameter, &trace)?;
        let result = self
            .invoke_value(receiver, payload, parameter, opts)
            .await?;
        serde_json::from_value(result).map_err(|e| {
            CommandError::local(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the response does not match the expected type: {e}"),
                trace,
            )
        })
    }

    /// Calls the command of `contract` with `input` (and the contract's parameter type's
    /// default): the address and every type come from the contract, so the call cannot drift
    /// from the handler. Default ttl.
    ///
    /// ```no_run
    /// # async fn demo(ctx: purista_core::service::Context) -> Result<(), purista_core::CommandError> {
    /// use purista_core::service::CommandContract;
    /// const ADD: CommandContract<(i64, i64), i64> = CommandContract::new("calculator", "1", "add");
    /// let sum = ctx.call(&ADD, (2, 3)).await?;
    /// assert_eq!(sum, 5);
    /// # Ok(()) }
    /// ```
    pub async fn call<I, O, P, E>(
        &self,
        contract: &CommandContract<I, O, P, E>,
        input: impl Borrow<I>,
    ) -> Result<O, CommandError>
    where
        I: Serialize,
        O: DeserializeOwned,
        P: Serialize + Default,
    {
        self.call_with(contract, input, P::default(), InvokeOptions::default())
            .await
    }

    /// Calls the command of `contract` with `input`, `parameter` and options.
    pub async fn call_with<I, O, P, E>(
        &self,
        contract: &CommandContract<I, O, P, E>,
        input: impl Borrow<I>,
        parameter: impl Borrow<P>,
        opts: InvokeOptions,
    ) -> Result<O, CommandError>
    where
        I: Serialize,
        O: DeserializeOwned,
        P: Serialize,
    {
        self.invoke_with(contract.address(), input.borrow(), parameter.borrow(), opts)
            .await
    }

    /// Invokes a command with JSON values and returns the raw result.
    pub async fn invoke_value(
        &self,
        receiver: Address,
        payload: Value,
        parameter: Value,
        opts: InvokeOptions,
    ) -> Result<Value, CommandError> {
        let shared = &self.shared;
        // No trace id yet: the flow's, or else the W3C one, is stamped below.
        let mut cmd =
            Envelope::untraced_command(shared.sender(&self.target), receiver, payload, parameter);
        let traced = spans::invoke(&shared.site, &self.target, &cmd, self.trace.as_ref());
        self.flow.stamp(&mut cmd, &traced.cx);
        if opts.trace_id.is_some() {
            cmd.trace_id = opts.trace_id;
        }
        if opts.principal_id.is_some() {
            cmd.principal_id = opts.principal_id;
        }
        if opts.tenant_id.is_some() {
            cmd.tenant_id = opts.tenant_id;
        }
        spans::record_sent(&shared.site, &traced, &cmd);
        let ttl = opts
            .ttl
            .unwrap_or_else(|| shared.bridge.default_command_timeout());
        let trace = cmd.trace_id.clone();
        let started = std::time::Instant::now();
        shared.meters.sent(SendKind::Invoke);
        let result = async {
            let mut reject = shared.reject_pending.subscribe();
            if *reject.borrow() {
                return Err(shutting_down(trace));
            }
            shared.pending_invocations.fetch_add(1, Ordering::AcqRel);
            let _pending = PendingGuard(&shared.pending_invocations);
            // The bridge enforces the ttl (the conformance suite proves it for every bridge),
            // so no second timer here; shutdown can still cut a pending call short with 503.
            let response = tokio::select! {
                r = shared.bridge.invoke(cmd, ttl) => r,
                _ = reject.wait_for(|v| *v) => return Err(shutting_down(trace)),
            };
            let response = response.map_err(|e| CommandError::from_bridge(&e, trace.clone()))?;
            response_result(response, trace)
        }
        .instrument(traced.span.clone())
        .await;
        shared.meters.invoked(started.elapsed(), result.is_err());
        if let Err(e) = &result {
            traced.fail(e.status);
        }
        result
    }

    /// Emits a custom event named `event_name`, with this flow's trace, principal and tenant.
    pub async fn emit(&self, event_name: &str, payload: impl Serialize) -> Result<(), BridgeError> {
        self.emit_event(None, event_name, payload).await
    }

    /// Emits a custom event addressed to `receiver` (PURISTA's directed custom message): it
    /// still reaches every subscription whose filter matches, and one filtering on the
    /// receiver sees it.
    pub async fn emit_to(
        &self,
        receiver: Address,
        event_name: &str,
        payload: impl Serialize,
    ) -> Result<(), BridgeError> {
        self.emit_event(Some(receiver), event_name, payload).await
    }

    async fn emit_event(
        &self,
        receiver: Option<Address>,
        event_name: &str,
        payload: impl Serialize,
    ) -> Result<(), BridgeError> {
        let payload = serde_json::to_value(payload)
            .map_err(|e| BridgeError::InvalidRequest(e.to_string()))?;
        let mut e = Envelope::custom(self.shared.sender(&self.target), event_name, payload);
        e.receiver = receiver;
        self.emit_envelope(e).await
    }

    /// Emits `e` in this flow, from a producer span: the flow's ids and the span's context.
    pub(crate) async fn emit_envelope(&self, mut e: Envelope) -> Result<(), BridgeError> {
        let site = &self.shared.site;
        let traced = spans::emit(site, &self.target, &e, self.trace.as_ref());
        self.flow.stamp(&mut e, &traced.cx);
        spans::record_sent(site, &traced, &e);
        let sent = self
            .shared
            .bridge
            .emit(e)
            .instrument(traced.span.clone())
            .await;
        match &sent {
            Ok(()) => self.shared.meters.sent(SendKind::Emit),
            Err(err) => traced.fail(err.status()),
        }
        sent
    }

    /// Opens a stream session with a producer; `timeout` (the session deadline for both ends)
    /// defaults to the bridge's command timeout.
    pub async fn open_stream(
        &self,
        receiver: Address,
        payload: impl Serialize,
        parameter: impl Serialize,
        timeout: Option<Duration>,
    ) -> Result<StreamReader, CommandError> {
        let opts = InvokeOptions {
            ttl: timeout,
            ..InvokeOptions::default()
        };
        self.open_stream_with(receiver, payload, parameter, opts)
            .await
    }

    /// Opens a stream session with options: `ttl` is the session timeout, and trace, principal
    /// and tenant override the flow's (a stream opened outside a handler has none of its own).
    pub async fn open_stream_with(
        &self,
        receiver: Address,
        payload: impl Serialize,
        parameter: impl Serialize,
        opts: InvokeOptions,
    ) -> Result<StreamReader, CommandError> {
        let trace = opts
            .trace_id
            .clone()
            .or_else(|| self.trace_id().map(str::to_string));
        let timeout = opts
            .ttl
            .unwrap_or_else(|| self.shared.bridge.default_command_timeout());
        let correlation_id = ids::new_id();
        // `timeout` travels as the open frame's `ttl`: the producer's runtime ends its handler
        // at the same deadline.
        let mut open = open_frame(
            self.shared.sender(&self.target),
            &correlation_id,
            to_value(payload, &trace)?,
            to_value(parameter, &trace)?,
            timeout,
        );
        open.receiver = Some(receiver);
        let site = &self.shared.site;
        let traced = spans::stream_open(site, &self.target, &open, self.trace.as_ref());
        self.flow.stamp(&mut open, &traced.cx);
        if opts.trace_id.is_some() {
            open.trace_id = opts.trace_id;
        }
        if opts.principal_id.is_some() {
            open.principal_id = opts.principal_id;
        }
        if opts.tenant_id.is_some() {
            open.tenant_id = opts.tenant_id;
        }
        spans::record_sent(site, &traced, &open);
        let trace = open.trace_id.clone();
        let deadline = tokio::time::Instant::now() + timeout;
        let end = self
            .shared
            .bridge
            .open_stream(open)
            .instrument(traced.span.clone())
            .await
            .map_err(|e| {
                traced.fail(e.status());
                CommandError::from_bridge(&e, trace)
            })?;
        Ok(StreamReader::new(end, correlation_id, deadline))
    }

    /// Enqueues a job on `queue`.
    pub async fn enqueue(
        &self,
        queue: &str,
        payload: impl Serialize,
        parameter: impl Serialize,
    ) -> Result<String, QueueError> {
        let job = NewJob {
            payload: serde_json::to_value(payload)
                .map_err(|e| QueueError::InvalidRequest(e.to_string()))?,
            parameter: serde_json::to_value(parameter)
                .map_err(|e| QueueError::InvalidRequest(e.to_string()))?,
            ..Default::default()
        };
        self.enqueue_job(queue, job).await
    }

    /// Enqueues a fully specified job (idempotency key, run-at, attempts). The job carries this
    /// flow's trace id, `otp`, principal and tenant where it does not set its own, and its
    /// handler runs in that flow.
    pub async fn enqueue_job(&self, queue: &str, mut job: NewJob) -> Result<String, QueueError> {
        let q =
            self.shared.queues.as_ref().ok_or_else(|| {
                QueueError::Unavailable("this service has no queue bridge".into())
            })?;
        let site = &self.shared.site;
        let traced = spans::enqueue(site, q.name(), &self.target, queue, self.trace.as_ref());
        self.flow.stamp_job(&mut job, &traced.cx);
        spans::record_sent_job(site, &traced, &job);
        let enqueued = q.enqueue(queue, job).instrument(traced.span.clone()).await;
        match &enqueued {
            Ok(id) => {
                traced.span.record("messaging.message.id", id.as_str());
                self.shared.meters.sent(SendKind::Enqueue);
            }
            Err(e) => traced.fail_with(e.error_type()),
        }
        enqueued
    }
}

fn to_value(v: impl Serialize, trace: &Option<String>) -> Result<Value, CommandError> {
    serde_json::to_value(v).map_err(|e| {
        CommandError::local(
            StatusCode::BAD_REQUEST,
            format!("input could not be serialized: {e}"),
            trace.clone(),
        )
    })
}

fn shutting_down(trace: Option<String>) -> CommandError {
    CommandError::local(
        StatusCode::SERVICE_UNAVAILABLE,
        "service is shutting down",
        trace,
    )
}

/// Turns a response envelope into the caller's result.
pub(crate) fn response_result(
    response: Envelope,
    trace: Option<String>,
) -> Result<Value, CommandError> {
    use crate::envelope::MessageType;
    match response.message_type {
        MessageType::CommandSuccessResponse => Ok(response.payload),
        MessageType::CommandErrorResponse => {
            let handled = response.is_handled_error.unwrap_or(false);
            let payload =
                serde_json::from_value::<ErrorPayload>(response.payload).unwrap_or_else(|_| {
                    ErrorPayload {
                        status: StatusCode::INTERNAL_SERVER_ERROR,
                        message: StatusCode::INTERNAL_SERVER_ERROR.generic_text().into(),
                        data: None,
                        trace_id: trace,
                    }
                });
            Err(CommandError::from_payload(payload, handled))
        }
        other => Err(CommandError::local(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("expected a command response, got {other}"),
            trace,
        )),
    }
}

/// The context of a subscription handler: a [`Context`] plus the delivery's attempt number and
/// the ability to settle early.
pub struct SubscriptionContext {
    pub(crate) ctx: Context,
    pub(crate) settler: Arc<DeliverySettler>,
}

impl std::ops::Deref for SubscriptionContext {
    type Target = Context;
    fn deref(&self) -> &Context {
        &self.ctx
    }
}

impl SubscriptionContext {
    /// 1 for the first delivery, incremented per redelivery.
    pub fn attempt(&self) -> u32 {
        self.settler.attempt()
    }

    /// The subscription's registration key (`service@version/name`).
    pub fn registration_key(&self) -> &str {
        self.settler.key()
    }

    /// Settles the delivery now, before the handler returns (the returned outcome is then
    /// ignored, with a warning unless it is `ack`). The same rules apply as to a returned
    /// outcome: `stop_consumer` on a subscription not declared pausable is a retry, drops and
    /// dead letters are warned about, and a message that will come again releases its
    /// idempotency claim. Settling a second time is [`SettleError::AlreadySettled`].
    pub async fn settle(&self, outcome: Outcome) -> Result<(), SettleError> {
        self.settler.settle(outcome).await
    }
}

/// The context of a queue job handler: a [`Context`] plus the job and its lease.
pub struct JobContext {
    pub(crate) ctx: Context,
    pub(crate) job: Arc<LeasedJob>,
    pub(crate) queues: Arc<dyn QueueBridge>,
}

impl std::ops::Deref for JobContext {
    type Target = Context;
    fn deref(&self) -> &Context {
        &self.ctx
    }
}

impl JobContext {
    /// The leased job.
    pub fn job(&self) -> &LeasedJob {
        &self.job
    }

    /// 1 for the first lease, incremented per retry.
    pub fn attempt(&self) -> u32 {
        self.job.attempt
    }

    /// Extends the lease (up to the queue's `max_lease_extensions`). Returns the new expiry
    /// (epoch ms). The bridge keeps the lease state; [`JobContext::job`] shows it as leased.
    pub async fn extend_lease(&self, by: Option<Duration>) -> Result<u64, QueueError> {
        self.queues.extend_lease(&self.job, by).await
    }
}
