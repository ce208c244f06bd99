//! Stream producers: typed definitions and the runtime that owns a session's terminal frame.
//!
//! The handler writes chunks through a [`StreamWriter`] and returns its final value. The runtime
//! sends `start` before the handler runs and guarantees exactly one terminal frame after it:
//! `complete` with the returned value, `error` for a returned error (handled errors keep their
//! text, others become a generic 500), or `cancel` when the consumer cancelled.
//!
//! The session deadline binds the producer as it binds the reader: the open frame carries the
//! consumer's session timeout (`ttl`; a PURISTA consumer sends none, then the producer bridge's
//! command timeout applies), and the runtime races the handler against that deadline and
//! against the consumer's cancel. Whichever comes first is told to the handler (its
//! `on_cancel` resolves, its writes fail), which then has [`PRODUCER_GRACE`] to return before
//! its future is dropped; the session ends in `cancel` and its in-flight count is released, so
//! a producer that ignores its writer can neither run on nor hold up a drain.

use std::sync::Arc;

use async_trait::async_trait;
use futures::FutureExt;
use futures::future::BoxFuture;
use serde::Serialize;
use serde_json::Value;
use tracing::Instrument;

use super::context::{Context, Shared};
use super::flow::Flow;
use super::handler::{HandlerArgs, run_guarded, split_body};
use crate::bridge::{StreamHandler, StreamProducerEnd};
use crate::envelope::Envelope;
use crate::error::{ErrorPayload, StatusCode, error_payload_for};
use crate::inflight::InFlightCounter;
use crate::observe::metrics::{RegistrationMeters, Settled};
use crate::observe::spans;
use crate::observe::write_otp;
use crate::stream::{StreamWriter, open_ttl};
use tokio::time::Instant;

pub(crate) type ErasedStreamFn = dyn Fn(Context, &Value, &Value, StreamWriter) -> BoxFuture<'static, anyhow::Result<Value>>
    + Send
    + Sync;

/// A stream producer: an `async` closure or fn `Fn(Context, I, StreamWriter)` or
/// `Fn(Context, I, P, StreamWriter)` returning `anyhow::Result<O>`. Implemented for every such
/// function; `Args` is `(I,)` or `(I, P)` and tells the two shapes apart.
pub trait StreamFn<Args, O>: Send + Sync + 'static {
    /// The handler's future.
    type Future: Future<Output = anyhow::Result<O>> + Send + 'static;

    /// Runs the handler.
    fn call(&self, ctx: Context, args: Args, out: StreamWriter) -> Self::Future;
}

impl<F, Fut, I, O> StreamFn<(I,), O> for F
where
    F: Fn(Context, I, StreamWriter) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<O>> + Send + 'static,
{
    type Future = Fut;

    fn call(&self, ctx: Context, (input,): (I,), out: StreamWriter) -> Fut {
        self(ctx, input, out)
    }
}

impl<F, Fut, I, P, O> StreamFn<(I, P), O> for F
where
    F: Fn(Context, I, P, StreamWriter) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<O>> + Send + 'static,
{
    type Future = Fut;

    fn call(&self, ctx: Context, (input, parameter): (I, P), out: StreamWriter) -> Fut {
        self(ctx, input, parameter, out)
    }
}

/// A stream producer definition.
///
/// ```
/// use purista_core::service::{Context, StreamDef};
/// use purista_core::stream::StreamWriter;
/// let def = StreamDef::new("count", |_ctx: Context, to: u32, out: StreamWriter| async move {
///     for i in 0..to {
///         out.write(i).await?;
///     }
///     Ok(to)
/// });
/// assert_eq!(def.name(), "count");
/// ```
pub struct StreamDef {
    pub(crate) name: String,
    pub(crate) expose: super::expose::Expose,
    pub(crate) handler: Arc<ErasedStreamFn>,
}

impl StreamDef {
    /// A stream endpoint named `name`, produced by `handler`, a `Fn(Context, I, StreamWriter)`
    /// or `Fn(Context, I, P, StreamWriter)`. The handler's `Ok` value is the session's final
    /// value (`()` / `null` = none).
    pub fn new<Args, O, F>(name: impl Into<String>, handler: F) -> Self
    where
        Args: HandlerArgs,
        O: Serialize + Send + 'static,
        F: StreamFn<Args, O>,
    {
        let handler = Arc::new(handler);
        let erased = move |ctx: Context, payload: &Value, parameter: &Value, w: StreamWriter| {
            let fut = Args::decode(payload, parameter)
                .map_err(anyhow::Error::new)
                .map(|args| handler.call(ctx, args, w));
            async move {
                let out = fut?.await?;
                serde_json::to_value(out)
                    .map_err(|e| anyhow::anyhow!("final value could not be serialized: {e}"))
            }
            .boxed()
        };
        StreamDef {
            name: name.into(),
            expose: super::expose::Expose::default(),
            handler: Arc::new(erased),
        }
    }

    /// The stream name (`serviceTarget`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The JSON Schemas sent in `infoServiceFunctionAdded` (`output` is the chunks' schema,
    /// `final_value` the final value's).
    pub fn expose(mut self, expose: super::expose::Expose) -> Self {
        self.expose = expose;
        self
    }

    /// Derives the exposed schemas of input `I`, parameter `P`, chunk `C` and final value `F`.
    #[cfg(feature = "schemars")]
    pub fn schemas<I, P, C, F>(mut self) -> Self
    where
        I: schemars::JsonSchema,
        P: schemars::JsonSchema,
        C: schemars::JsonSchema,
        F: schemars::JsonSchema,
    {
        use super::expose::schema_of;
        self.expose.input = Some(schema_of::<I>());
        self.expose.parameter = Some(schema_of::<P>());
        self.expose.output = Some(schema_of::<C>());
        self.expose.final_value = Some(schema_of::<F>());
        self
    }
}

/// How long a producer told to stop (deadline or consumer cancel) may take to return before
/// its future is dropped.
pub const PRODUCER_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// The cancel reason at the session deadline.
const SESSION_TIMEOUT: &str = "session timeout";

pub(crate) struct StreamRuntime {
    pub shared: Arc<Shared>,
    pub registration: Arc<str>,
    pub in_flight: InFlightCounter,
    pub target: Arc<str>,
    pub handler: Arc<ErasedStreamFn>,
    pub meters: RegistrationMeters,
}

impl StreamRuntime {
    /// Gives a handler that was told to stop [`PRODUCER_GRACE`] to return, then drops it, and
    /// ends the session with `cancel` unless the handler ended it.
    async fn wind_down<F: Future>(
        &self,
        handler: std::pin::Pin<&mut F>,
        writer: &StreamWriter,
        reason: &str,
    ) {
        if tokio::time::timeout(PRODUCER_GRACE, handler).await.is_err() {
            tracing::warn!(%reason, "stream producer did not return after it was told to stop; ended");
        } else {
            tracing::debug!(%reason, "stream producer stopped");
        }
        writer.abandon(reason);
    }
}

#[async_trait]
impl StreamHandler for StreamRuntime {
    async fn open(&self, open: Arc<Envelope>, producer: StreamProducerEnd) {
        let _guard = self.in_flight.start();
        let _running = self.meters.running();
        let started = std::time::Instant::now();
        let traced =
            spans::stream_session(&self.shared.site, &self.registration, &self.target, &open);
        let ttl = open_ttl(&open).unwrap_or_else(|| self.shared.bridge.default_command_timeout());
        let deadline = Instant::now() + ttl;
        // Every frame the session writes continues the trace from the session's span.
        let writer = StreamWriter::continuing(
            producer,
            &open,
            self.shared.sender(&self.target),
            Some(write_otp(&traced.cx)),
        )
        .with_deadline(deadline);
        let span = traced.span.clone();
        let settled = async {
            if self.shared.is_closing() {
                let status = StatusCode::SERVICE_UNAVAILABLE;
                traced.fail(status);
                let _ = writer
                    .fail(
                        ErrorPayload {
                            status,
                            message: status.generic_text().into(),
                            data: None,
                            trace_id: open.trace_id.clone(),
                        },
                        false,
                    )
                    .await;
                return Settled::Error;
            }
            if writer.start().await.is_err() {
                return Settled::Error;
            }
            let (payload, parameter) = split_body(&open);
            let ctx = Context {
                shared: self.shared.clone(),
                flow: Flow::Message(open.clone()),
                target: self.target.clone(),
                trace: Some(traced.cx.clone()),
            };
            // The handler does not outlive its session. At the deadline or on the consumer's
            // cancel it is told (`on_cancel`, failing writes) and gets a short grace to return;
            // then it is ended (its future dropped) and the session ends in `cancel`.
            let handler = run_guarded(|| (self.handler)(ctx, payload, parameter, writer.clone()));
            tokio::pin!(handler);
            let result = tokio::select! {
                biased;
                r = &mut handler => r,
                () = tokio::time::sleep_until(deadline) => {
                    traced.outcome("cancel");
                    traced.fail(StatusCode::GATEWAY_TIMEOUT);
                    writer.end_session(SESSION_TIMEOUT);
                    self.wind_down(handler, &writer, SESSION_TIMEOUT).await;
                    return Settled::Error;
                }
                reason = writer.on_cancel() => {
                    traced.outcome("cancel");
                    self.wind_down(handler, &writer, &reason).await;
                    return Settled::Ok;
                }
            };
            if writer.is_closed().await {
                traced.outcome("closed");
                return Settled::Ok;
            }
            if let Some(reason) = writer.cancelled() {
                traced.outcome("cancel");
                let _ = writer.cancel(reason).await;
                return Settled::Ok;
            }
            let settled = if matches!(result, Ok(Ok(_))) {
                Settled::Ok
            } else {
                Settled::Error
            };
            let _ = match result {
                Ok(Ok(final_value)) => {
                    traced.outcome("complete");
                    writer
                        .complete(Some(final_value).filter(|v| !v.is_null()))
                        .await
                }
                Ok(Err(err)) => {
                    let (payload, handled) = error_payload_for(&err, open.trace_id.clone());
                    traced.outcome("error");
                    traced.fail(payload.status);
                    if !handled {
                        tracing::error!(error = %format!("{err:#}"), "stream producer failed");
                    }
                    writer.fail(payload, handled).await
                }
                Err(_) => {
                    tracing::error!("stream producer panicked");
                    let status = StatusCode::INTERNAL_SERVER_ERROR;
                    traced.outcome("error");
                    traced.fail(status);
                    writer
                        .fail(
                            ErrorPayload {
                                status,
                                message: status.generic_text().into(),
                                data: None,
                                trace_id: open.trace_id.clone(),
                            },
                            false,
                        )
                        .await
                }
            };
            settled
        }
        .instrument(span)
        .await;
        self.meters.took(started.elapsed());
        self.meters.settled(settled);
    }
}
