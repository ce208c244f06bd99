//! Commands: typed definitions and the runtime that serves them on a bridge.
//!
//! A user writes `async fn(Context, Input, Parameter) -> anyhow::Result<Output>` over their own
//! serde types. The runtime decodes input (a mismatch is a handled 400), runs the handler inside
//! a tracing span, catches panics, and answers with a success or error response. An unhandled
//! error reaches the caller only as a generic 500; its text goes to the log.

use std::sync::Arc;

use async_trait::async_trait;
use futures::FutureExt;
use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tracing::Instrument;

use super::context::{Context, Shared};
use super::flow::Flow;
use super::handler::{decode_input, run_guarded, split_body};
use crate::bridge::CommandHandler;
use crate::envelope::Envelope;
use crate::error::{ErrorPayload, StatusCode, error_payload_for};
use crate::inflight::InFlightCounter;

pub(crate) type ErasedCommandFn =
    dyn Fn(Context, &Value, &Value) -> BoxFuture<'static, anyhow::Result<Value>> + Send + Sync;

/// A command definition: name, handler and metadata.
///
/// ```
/// use purista_core::service::{CommandDef, Context, Empty};
/// #[derive(serde::Deserialize)] struct Add { a: i64, b: i64 }
/// let def = CommandDef::new("add", |_ctx: Context, input: Add, _p: Empty| async move {
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
    pub(crate) handler: Arc<ErasedCommandFn>,
}

impl CommandDef {
    /// A command named `name` served by `handler`.
    pub fn new<I, P, O, F, Fut>(name: impl Into<String>, handler: F) -> Self
    where
        I: DeserializeOwned + Send + 'static,
        P: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        F: Fn(Context, I, P) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<O>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let erased = move |ctx: Context, payload: &Value, parameter: &Value| {
            // Decode from references before the future exists: no copy of the payload.
            let decoded = decode_input::<I>(payload, "payload")
                .and_then(|i| Ok((i, decode_input::<P>(parameter, "parameter")?)));
            let fut = decoded.map(|(input, param)| handler(ctx, input, param));
            async move {
                let out = fut?.await?;
                serde_json::to_value(out).map_err(|e| {
                    anyhow::anyhow!("the command's output could not be serialized: {e}")
                })
            }
            .boxed()
        };
        CommandDef {
            name: name.into(),
            description: String::new(),
            success_event: None,
            metadata: Value::Null,
            handler: Arc::new(erased),
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

    /// Free-form metadata (schemas, flags), sent in `infoServiceFunctionAdded`.
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
}

#[async_trait]
impl CommandHandler for CommandRuntime {
    async fn handle(&self, command: Arc<Envelope>) -> Envelope {
        if self.shared.is_closing() {
            let status = StatusCode::SERVICE_UNAVAILABLE;
            let p = ErrorPayload {
                status,
                message: status.generic_text().into(),
                data: None,
                trace_id: command.trace_id.clone(),
            };
            return command.error_response(&p, false);
        }
        let _guard = self.in_flight.start();
        let span = tracing::info_span!(
            "purista.command",
            registration = %self.registration,
            trace_id = command.trace_id.as_deref().unwrap_or(""),
            correlation_id = command.correlation_id.as_deref().unwrap_or(""),
        );
        let (payload, parameter) = split_body(&command);
        let ctx = Context {
            shared: self.shared.clone(),
            flow: Flow::Message(command.clone()),
            target: self.target.clone(),
        };
        let result = run_guarded(|| (self.handler)(ctx, payload, parameter))
            .instrument(span.clone())
            .await;
        let _enter = span.enter();
        match result {
            Ok(Ok(value)) => command.success_response(value, self.success_event.clone()),
            Ok(Err(err)) => {
                let (payload, handled) = error_payload_for(&err, command.trace_id.clone());
                if handled {
                    tracing::info!(status = payload.status.0, message = %payload.message, "command returned a handled error");
                } else {
                    tracing::error!(error = %format!("{err:#}"), "command failed with an unhandled error");
                }
                command.error_response(&payload, handled)
            }
            Err(_) => {
                tracing::error!("command handler panicked");
                let status = StatusCode::INTERNAL_SERVER_ERROR;
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
