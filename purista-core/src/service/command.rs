//! Commands: typed definitions and the runtime that serves them on a bridge.
//!
//! A user writes an `async` closure or fn over their own serde types, taking the [`Context`]
//! and the input, and the parameter if it wants one: `Fn(Context, I)` or `Fn(Context, I, P)`
//! ([`CommandFn`] picks the shape, the way axum picks a handler's extractors). The runtime
//! decodes input (a mismatch is a handled 400), runs the handler inside a tracing span, catches
//! panics, and answers with a success or error response. A handled error (a [`HandledError`](crate::HandledError)
//! in an `anyhow::Error`, or a [`BusinessError`](crate::BusinessError) of a contract) reaches
//! the caller with status, message and data; anything else only as a generic 500, its text
//! going to the log.

use std::sync::Arc;

use async_trait::async_trait;
use futures::FutureExt;
use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tracing::Instrument;

use super::context::{Context, Shared};
use super::contract::CommandContract;
use super::flow::Flow;
use super::handler::{HandlerArgs, run_guarded, split_body};
use crate::bridge::CommandHandler;
use crate::envelope::{Envelope, MessageType};
use crate::error::{ErrorPayload, Failure, IntoFailure, StatusCode};
use crate::inflight::InFlightCounter;
use crate::observe::metrics::{RegistrationMeters, Settled};
use crate::observe::spans::{self, Traced};
use crate::observe::write_otp;

pub(crate) type ErasedCommandFn =
    dyn Fn(Context, &Value, &Value) -> BoxFuture<'static, Result<Value, Failure>> + Send + Sync;

/// A command handler: an `async` closure or fn `Fn(Context, I)` or `Fn(Context, I, P)`
/// returning `Result<O, E>`. Implemented for every such function; `Args` is `(I,)` or
/// `(I, P)` and tells the two shapes apart.
///
/// ```
/// use purista_core::service::{CommandDef, Context, Empty};
/// // Without a parameter …
/// let hello = CommandDef::new("hello", |_ctx: Context, name: String| async move {
///     Ok(format!("hello {name}"))
/// });
/// // … and with one.
/// let greet = CommandDef::new("greet", |_ctx: Context, name: String, greeting: String| async move {
///     Ok(format!("{greeting} {name}"))
/// });
/// # let _ = (hello, greet);
/// ```
pub trait CommandFn<Args, O, E>: Send + Sync + 'static {
    /// The handler's future.
    type Future: Future<Output = Result<O, E>> + Send + 'static;

    /// Runs the handler.
    fn call(&self, ctx: Context, args: Args) -> Self::Future;
}

impl<F, Fut, I, O, E> CommandFn<(I,), O, E> for F
where
    F: Fn(Context, I) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, E>> + Send + 'static,
{
    type Future = Fut;

    fn call(&self, ctx: Context, (input,): (I,)) -> Fut {
        self(ctx, input)
    }
}

impl<F, Fut, I, P, O, E> CommandFn<(I, P), O, E> for F
where
    F: Fn(Context, I, P) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, E>> + Send + 'static,
{
    type Future = Fut;

    fn call(&self, ctx: Context, (input, parameter): (I, P)) -> Fut {
        self(ctx, input, parameter)
    }
}

/// Erases a handler's types: decode, run, encode, and turn its error into a [`Failure`].
fn erase<Args, O, E, F>(handler: F) -> Arc<ErasedCommandFn>
where
    Args: HandlerArgs,
    O: Serialize + Send + 'static,
    E: IntoFailure,
    F: CommandFn<Args, O, E>,
{
    let handler = Arc::new(handler);
    Arc::new(move |ctx: Context, payload: &Value, parameter: &Value| {
        // Decode from references before the future exists: no copy of the payload.
        let fut = Args::decode(payload, parameter).map(|args| handler.call(ctx, args));
        async move {
            let out = fut
                .map_err(Failure::Handled)?
                .await
                .map_err(IntoFailure::into_failure)?;
            serde_json::to_value(out).map_err(|e| {
                Failure::Unhandled(anyhow::anyhow!(
                    "the command's output could not be serialized: {e}"
                ))
            })
        }
        .boxed()
    })
}

/// A command definition: name, handler and metadata.
///
/// ```
/// use purista_core::service::{CommandDef, Context};
/// #[derive(serde::Deserialize)] struct Add { a: i64, b: i64 }
/// let def = CommandDef::new("add", |_ctx: Context, input: Add| async move {
///     Ok(input.a + input.b)
/// })
/// .description("adds two numbers")
/// .success_event("numbersAdded");
/// assert_eq!(def.name(), "add");
/// ```
pub struct CommandDef {
    pub(crate) name: String,
    pub(crate) description: String,
    pub(crate) success_event: Option<String>,
    pub(crate) metadata: Value,
    pub(crate) expose: super::expose::Expose,
    pub(crate) handler: Arc<ErasedCommandFn>,
    /// The `(service, version)` of the contract it was made from, checked at start.
    pub(crate) contract: Option<(&'static str, &'static str)>,
}

impl CommandDef {
    /// A command named `name` served by `handler`, a `Fn(Context, I)` or `Fn(Context, I, P)`
    /// returning `anyhow::Result<O>` (a [`HandledError`](crate::HandledError) inside the error reaches the caller
    /// with its status, message and data). For a command with a shared contract, see
    /// [`CommandContract::handler`].
    pub fn new<Args, O, F>(name: impl Into<String>, handler: F) -> Self
    where
        Args: HandlerArgs,
        O: Serialize + Send + 'static,
        F: CommandFn<Args, O, anyhow::Error>,
    {
        CommandDef {
            name: name.into(),
            description: String::new(),
            success_event: None,
            metadata: Value::Null,
            expose: super::expose::Expose::default(),
            handler: erase(handler),
            contract: None,
        }
    }

    /// The command name (`serviceTarget`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A human description (sent in `infoServiceFunctionAdded`).
    pub fn description(mut self, d: impl Into<String>) -> Self {
        self.description = d.into();
        self
    }

    /// The success response also carries this `eventName`, so subscriptions see it.
    pub fn success_event(mut self, event_name: impl Into<String>) -> Self {
        self.success_event = Some(event_name.into());
        self
    }

    /// The JSON Schemas (and `deprecated` flag) sent in `infoServiceFunctionAdded`, PURISTA's
    /// `expose` block.
    pub fn expose(mut self, expose: super::expose::Expose) -> Self {
        self.expose = expose;
        self
    }

    /// Derives the exposed schemas of input `I`, parameter `P` and output `O` from the types.
    ///
    /// ```
    /// use purista_core::service::{CommandDef, Context, Empty};
    /// #[derive(serde::Deserialize, schemars::JsonSchema)] struct Add { a: i64, b: i64 }
    /// let def = CommandDef::new("add", |_ctx: Context, i: Add| async move { Ok(i.a + i.b) })
    ///     .schemas::<Add, Empty, i64>();
    /// # let _ = def;
    /// ```
    #[cfg(feature = "schemars")]
    pub fn schemas<I: schemars::JsonSchema, P: schemars::JsonSchema, O: schemars::JsonSchema>(
        mut self,
    ) -> Self {
        use super::expose::schema_of;
        self.expose.input = Some(schema_of::<I>());
        self.expose.parameter = Some(schema_of::<P>());
        self.expose.output = Some(schema_of::<O>());
        self
    }

    /// Free-form metadata, merged beside `expose` in `infoServiceFunctionAdded`.
    pub fn metadata(mut self, metadata: Value) -> Self {
        self.metadata = metadata;
        self
    }
}

pub(crate) struct CommandRuntime {
    pub shared: Arc<Shared>,
    pub registration: Arc<str>,
    pub in_flight: InFlightCounter,
    pub target: Arc<str>,
    pub success_event: Option<String>,
    pub handler: Arc<ErasedCommandFn>,
    pub meters: RegistrationMeters,
}

#[async_trait]
impl CommandHandler for CommandRuntime {
    async fn handle(&self, command: Arc<Envelope>) -> Envelope {
        let traced = spans::command(
            &self.shared.site,
            &self.registration,
            &self.target,
            &command,
        );
        let _running = self.meters.running();
        let started = std::time::Instant::now();
        let mut response = self.respond(&command, &traced).await;
        self.meters.took(started.elapsed());
        self.meters.settled(
            if response.message_type == MessageType::CommandErrorResponse {
                Settled::Error
            } else {
                Settled::Ok
            },
        );
        // The response continues the trace from the handler's span.
        response.otp = Some(write_otp(&traced.cx));
        response
    }
}

impl CommandRuntime {
    /// Runs the handler for `command` inside its span and builds the response.
    async fn respond(&self, command: &Arc<Envelope>, traced: &Traced) -> Envelope {
        let span = &traced.span;
        if self.shared.is_closing() {
            let status = StatusCode::SERVICE_UNAVAILABLE;
            traced.fail(status);
            let p = ErrorPayload {
                status,
                message: status.generic_text().into(),
                data: None,
                trace_id: command.trace_id.clone(),
            };
            return command.error_response(&p, false);
        }
        let _guard = self.in_flight.start();
        let (payload, parameter) = split_body(command);
        let ctx = Context {
            shared: self.shared.clone(),
            flow: Flow::Message(command.clone()),
            target: self.target.clone(),
            trace: Some(traced.cx.clone()),
        };
        let result = run_guarded(|| (self.handler)(ctx, payload, parameter))
            .instrument(span.clone())
            .await;
        let _enter = span.enter();
        match result {
            Ok(Ok(value)) => command.success_response(value, self.success_event.clone()),
            Ok(Err(failure)) => {
                let (payload, handled) = failure.payload(command.trace_id.clone());
                traced.fail(payload.status);
                match &failure {
                    Failure::Handled(_) => {
                        tracing::info!(status = payload.status.0, message = %payload.message, "command returned a handled error");
                    }
                    Failure::Unhandled(err) => {
                        tracing::error!(error = %format!("{err:#}"), "command failed with an unhandled error");
                    }
                }
                command.error_response(&payload, handled)
            }
            Err(_) => {
                tracing::error!("command handler panicked");
                let status = StatusCode::INTERNAL_SERVER_ERROR;
                traced.fail(status);
                let p = ErrorPayload {
                    status,
                    message: status.generic_text().into(),
                    data: None,
                    trace_id: command.trace_id.clone(),
                };
                command.error_response(&p, false)
            }
        }
    }
}

impl<I, O, P, E> CommandContract<I, O, P, E>
where
    I: DeserializeOwned + Send + 'static,
    O: Serialize + Send + 'static,
    P: DeserializeOwned + Send + 'static,
    E: IntoFailure,
{
    /// The definition that serves this contract with `handler`: a `Fn(Context, I)` (the
    /// parameter ignored) or `Fn(Context, I, P)` returning `Result<O, E>`, the types the
    /// contract names, so the handler cannot drift from what clients send and expect. Add it
    /// to the service the contract names; a start under another name or version fails with
    /// [`StartError::ContractMismatch`](super::StartError::ContractMismatch).
    ///
    /// ```
    /// use purista_core::service::{CommandContract, Context, Service};
    /// use purista_core::{BusinessError, StatusCode};
    ///
    /// #[derive(Debug, thiserror::Error)]
    /// #[error("division by zero")]
    /// struct DivByZero;
    /// impl BusinessError for DivByZero {
    ///     fn status(&self) -> StatusCode { StatusCode::BAD_REQUEST }
    /// }
    ///
    /// const DIVIDE: CommandContract<(i64, i64), i64, purista_core::service::Empty, DivByZero> =
    ///     CommandContract::new("calculator", "1", "divide");
    ///
    /// let def = DIVIDE.handler(|_ctx: Context, (a, b): (i64, i64)| async move {
    ///     if b == 0 { return Err(DivByZero); }
    ///     Ok(a / b)
    /// });
    /// let service = Service::builder("calculator", "1").command(def).build();
    /// # let _ = service;
    /// ```
    pub fn handler<Args, F>(&self, handler: F) -> CommandDef
    where
        Args: HandlerArgs + ContractArgs<I, P>,
        F: CommandFn<Args, O, E>,
    {
        CommandDef {
            name: self.command().to_string(),
            description: String::new(),
            success_event: None,
            metadata: Value::Null,
            expose: super::expose::Expose::default(),
            handler: erase(handler),
            contract: Some((self.service(), self.version())),
        }
    }
}

/// Ties a handler's arguments to a contract's input `I` and parameter `P`: `(I,)` or `(I, P)`.
pub trait ContractArgs<I, P> {}

impl<I, P> ContractArgs<I, P> for (I,) {}

impl<I, P> ContractArgs<I, P> for (I, P) {}
