//! Errors and status codes, mapped to the envelope's HTTP-aligned codes in one place.
//!
//! Three audiences: a *handler* returns a [`HandledError`] for a business failure the caller may
//! see, or any other error (which the caller only ever sees as a generic 500); a *caller* gets a
//! [`CommandError`]; a *bridge* reports transport trouble as a [`BridgeError`]. Every conversion
//! to a status code goes through [`BridgeError::status`] or [`CommandError`]'s constructors.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// An HTTP-aligned status code as carried in error responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(transparent)]
pub struct StatusCode(pub u16);

impl StatusCode {
    /// 200
    pub const OK: StatusCode = StatusCode(200);
    /// 400: bad input (schema or deserialisation).
    pub const BAD_REQUEST: StatusCode = StatusCode(400);
    /// 401
    pub const UNAUTHORIZED: StatusCode = StatusCode(401);
    /// 403
    pub const FORBIDDEN: StatusCode = StatusCode(403);
    /// 404
    pub const NOT_FOUND: StatusCode = StatusCode(404);
    /// 409
    pub const CONFLICT: StatusCode = StatusCode(409);
    /// 422
    pub const UNPROCESSABLE_ENTITY: StatusCode = StatusCode(422);
    /// 500: unhandled error.
    pub const INTERNAL_SERVER_ERROR: StatusCode = StatusCode(500);
    /// 501: the service has no such command.
    pub const NOT_IMPLEMENTED: StatusCode = StatusCode(501);
    /// 502: nobody serves that command.
    pub const BAD_GATEWAY: StatusCode = StatusCode(502);
    /// 503: bridge or service unavailable or shutting down.
    pub const SERVICE_UNAVAILABLE: StatusCode = StatusCode(503);
    /// 504: invocation timed out.
    pub const GATEWAY_TIMEOUT: StatusCode = StatusCode(504);

    /// The generic text for this code, the only text an unhandled error ever shows a caller.
    pub fn generic_text(self) -> &'static str {
        match self.0 {
            200 => "OK",
            400 => "Bad Request",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "Not Found",
            405 => "Method Not Allowed",
            408 => "Request Timeout",
            409 => "Conflict",
            410 => "Gone",
            413 => "Payload Too Large",
            415 => "Unsupported Media Type",
            422 => "Unprocessable Entity",
            429 => "Too Many Requests",
            500 => "Internal Server Error",
            501 => "Not Implemented",
            502 => "Bad Gateway",
            503 => "Service Unavailable",
            504 => "Gateway Timeout",
            _ => "Unknown Error",
        }
    }
}

impl std::fmt::Display for StatusCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.0, self.generic_text())
    }
}

/// The payload of a `commandErrorResponse`: `{status, message, data?, traceId?}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorPayload {
    /// Status code.
    pub status: StatusCode,
    /// For handled errors the handler's message; for unhandled ones the generic status text.
    pub message: String,
    /// Handled errors only: data for the caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    /// The flow's trace id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

/// A business error a handler returns on purpose: its status, message and data reach the caller.
///
/// ```
/// use purista_core::{HandledError, StatusCode};
/// let e = HandledError::new(StatusCode::CONFLICT, "order already paid")
///     .with_data(serde_json::json!({"orderId": "o-1"}));
/// assert_eq!(e.status, StatusCode::CONFLICT);
/// ```
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct HandledError {
    /// Status code.
    pub status: StatusCode,
    /// Message shown to the caller.
    pub message: String,
    /// Optional data shown to the caller.
    pub data: Option<Value>,
}

impl HandledError {
    /// A handled error with a status and message.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        HandledError {
            status,
            message: message.into(),
            data: None,
        }
    }

    /// 400 with a message.
    pub fn bad_request(message: impl Into<String>) -> Self {
        HandledError::new(StatusCode::BAD_REQUEST, message)
    }

    /// Attaches data for the caller.
    pub fn with_data(mut self, data: Value) -> Self {
        self.data = Some(data);
        self
    }
}

/// A user's own error type as a business error: what the caller sees when a handler fails
/// with it.
///
/// Implement it for the error type of a [`CommandContract`](crate::service::CommandContract)
/// and return that type from the handler: a handled error reaches the caller with its status,
/// message and data (and is logged at info level); one that says it is not handled
/// ([`BusinessError::is_handled`] is `false`, e.g. a wrapped database error) reaches the caller
/// only as a generic 500 while its text goes to the log. [`HandledError`] implements it too.
///
/// ```
/// use purista_core::{BusinessError, StatusCode};
///
/// #[derive(Debug, thiserror::Error)]
/// enum OrderError {
///     #[error("order {0} is already paid")]
///     AlreadyPaid(String),
///     #[error("the order store failed: {0}")]
///     Store(String),
/// }
///
/// impl BusinessError for OrderError {
///     fn status(&self) -> StatusCode {
///         match self {
///             OrderError::AlreadyPaid(_) => StatusCode::CONFLICT,
///             OrderError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
///         }
///     }
///     fn data(&self) -> Option<serde_json::Value> {
///         match self {
///             OrderError::AlreadyPaid(id) => Some(serde_json::json!({ "orderId": id })),
///             OrderError::Store(_) => None,
///         }
///     }
///     fn is_handled(&self) -> bool {
///         !matches!(self, OrderError::Store(_))
///     }
/// }
///
/// let e = OrderError::AlreadyPaid("o-1".into());
/// assert_eq!((e.status(), e.message()), (StatusCode::CONFLICT, "order o-1 is already paid".to_string()));
/// ```
pub trait BusinessError: std::fmt::Debug + std::fmt::Display + Send + Sync + 'static {
    /// The status the caller sees (4xx for the caller's mistakes, 5xx for the service's).
    fn status(&self) -> StatusCode;

    /// The message the caller sees. Default: the `Display` text.
    fn message(&self) -> String {
        self.to_string()
    }

    /// Data for the caller. Default: none.
    fn data(&self) -> Option<Value> {
        None
    }

    /// `false` for a failure that is not the caller's business: the caller then gets only the
    /// generic text of a 500, and the error's own text is logged. Default: `true`.
    fn is_handled(&self) -> bool {
        true
    }
}

impl BusinessError for HandledError {
    fn status(&self) -> StatusCode {
        self.status
    }

    fn message(&self) -> String {
        self.message.clone()
    }

    fn data(&self) -> Option<Value> {
        self.data.clone()
    }
}

/// How a handler's failure reaches the caller: handled (status, message and data go back) or
/// unhandled (a generic 500 goes back, the error itself only to the log).
#[derive(Debug)]
pub enum Failure {
    /// A business error the caller sees.
    Handled(HandledError),
    /// Anything else; the caller sees only `500 Internal Server Error`.
    Unhandled(anyhow::Error),
}

impl Failure {
    /// The error payload a caller sees, and whether it is handled.
    pub fn payload(&self, trace_id: Option<String>) -> (ErrorPayload, bool) {
        match self {
            Failure::Handled(h) => (
                ErrorPayload {
                    status: h.status,
                    message: h.message.clone(),
                    data: h.data.clone(),
                    trace_id,
                },
                true,
            ),
            Failure::Unhandled(_) => {
                let status = StatusCode::INTERNAL_SERVER_ERROR;
                (
                    ErrorPayload {
                        status,
                        message: status.generic_text().to_string(),
                        data: None,
                        trace_id,
                    },
                    false,
                )
            }
        }
    }
}

/// An error type a command handler may return: `anyhow::Error` (a [`HandledError`] inside it
/// is found by downcast) or any [`BusinessError`].
pub trait IntoFailure: Send + 'static {
    /// What the caller gets.
    fn into_failure(self) -> Failure;
}

impl IntoFailure for anyhow::Error {
    fn into_failure(self) -> Failure {
        match self.downcast::<HandledError>() {
            Ok(h) => Failure::Handled(h),
            Err(other) => Failure::Unhandled(other),
        }
    }
}

impl<T: BusinessError> IntoFailure for T {
    fn into_failure(self) -> Failure {
        if self.is_handled() {
            let mut h = HandledError::new(self.status(), self.message());
            h.data = self.data();
            Failure::Handled(h)
        } else {
            Failure::Unhandled(anyhow::anyhow!("{self}"))
        }
    }
}

/// What went wrong with an invocation, for `match`: see [`CommandError::kind`].
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum CommandErrorKind<'a> {
    /// The input was refused (400): it did not serialize on the caller's side, did not match
    /// the command's types on the server's side, was too large for the bridge, or the handler
    /// itself refused it with a 400.
    BadInput {
        /// What was wrong.
        message: &'a str,
    },
    /// The handler returned a business error (other than 400) with this status, message and
    /// data.
    Handled {
        /// Status code.
        status: StatusCode,
        /// The handler's message.
        message: &'a str,
        /// The handler's data.
        data: Option<&'a Value>,
    },
    /// The service has no such command (501).
    NoSuchCommand,
    /// Nobody serves the command (502).
    NobodyServes,
    /// The bridge or the service is unavailable or shutting down (503).
    Unavailable,
    /// No response within the ttl (504).
    Timeout,
    /// The handler failed unexpectedly or panicked (500), or the response could not be read;
    /// its details are in the server's log, not here.
    Internal,
}

/// What an invocation's caller gets when the command did not succeed. Match on
/// [`CommandError::kind`]; the fields carry the wire values.
///
/// ```
/// use purista_core::{CommandError, CommandErrorKind, StatusCode};
/// let e = CommandError::unhandled(StatusCode::GATEWAY_TIMEOUT, None);
/// match e.kind() {
///     CommandErrorKind::Timeout => println!("try again later"),
///     CommandErrorKind::Handled { status, message, .. } => println!("{status}: {message}"),
///     other => println!("failed: {other:?}"),
/// }
/// assert_eq!(e.kind(), CommandErrorKind::Timeout);
/// ```
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("command failed with {status}: {message}")]
pub struct CommandError {
    /// Status code.
    pub status: StatusCode,
    /// Message (generic text for unhandled errors).
    pub message: String,
    /// Data of a handled error.
    pub data: Option<Value>,
    /// Trace id of the flow.
    pub trace_id: Option<String>,
    /// True when the remote handler returned a [`HandledError`].
    pub handled: bool,
}

impl CommandError {
    /// What went wrong, for `match`. Any 400 is [`CommandErrorKind::BadInput`], handled or
    /// not; another handled error is [`CommandErrorKind::Handled`]; the rest follows the
    /// status (501, 502, 503, 504; anything else is [`CommandErrorKind::Internal`]).
    pub fn kind(&self) -> CommandErrorKind<'_> {
        match self.status.0 {
            400 => CommandErrorKind::BadInput {
                message: &self.message,
            },
            _ if self.handled => CommandErrorKind::Handled {
                status: self.status,
                message: &self.message,
                data: self.data.as_ref(),
            },
            501 => CommandErrorKind::NoSuchCommand,
            502 => CommandErrorKind::NobodyServes,
            503 => CommandErrorKind::Unavailable,
            504 => CommandErrorKind::Timeout,
            _ => CommandErrorKind::Internal,
        }
    }

    /// The handled error this is, to pass a downstream business refusal on unchanged from a
    /// handler (`Err(e.into_handled()?)`); an unhandled error comes back as it was.
    ///
    /// ```
    /// use purista_core::{CommandError, ErrorPayload, HandledError, StatusCode};
    /// let refused = CommandError::from_payload(
    ///     ErrorPayload { status: StatusCode(402), message: "card declined".into(), data: None, trace_id: None },
    ///     true,
    /// );
    /// assert_eq!(refused.into_handled(), Ok(HandledError::new(StatusCode(402), "card declined")));
    /// ```
    pub fn into_handled(self) -> Result<HandledError, CommandError> {
        if self.handled {
            Ok(HandledError {
                status: self.status,
                message: self.message,
                data: self.data,
            })
        } else {
            Err(self)
        }
    }

    /// An unhandled error with the status's generic text.
    pub fn unhandled(status: StatusCode, trace_id: Option<String>) -> Self {
        CommandError {
            status,
            message: status.generic_text().to_string(),
            data: None,
            trace_id,
            handled: false,
        }
    }

    /// A caller-side failure with a specific message (timeouts, unavailable bridge, …).
    pub fn local(status: StatusCode, message: impl Into<String>, trace_id: Option<String>) -> Self {
        CommandError {
            status,
            message: message.into(),
            data: None,
            trace_id,
            handled: false,
        }
    }

    /// Builds the caller's error from an error response payload.
    pub fn from_payload(payload: ErrorPayload, handled: bool) -> Self {
        CommandError {
            status: payload.status,
            message: payload.message,
            data: payload.data,
            trace_id: payload.trace_id,
            handled,
        }
    }

    /// From a bridge failure during invoke.
    pub fn from_bridge(err: &BridgeError, trace_id: Option<String>) -> Self {
        CommandError::local(err.status(), err.to_string(), trace_id)
    }
}

/// Turns any handler error into the error payload a caller sees, and whether it was handled.
///
/// A [`HandledError`] anywhere in the chain keeps its status, message and data; anything else
/// becomes a 500 with the generic text, its own text only logged.
pub fn error_payload_for(err: &anyhow::Error, trace_id: Option<String>) -> (ErrorPayload, bool) {
    match err.downcast_ref::<HandledError>() {
        Some(h) => Failure::Handled(h.clone()).payload(trace_id),
        None => Failure::Unhandled(anyhow::anyhow!("unhandled")).payload(trace_id),
    }
}

/// Why bytes could not become an [`Envelope`](crate::Envelope).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes are not JSON.
    #[error("not JSON: {0}")]
    NotJson(String),
    /// A required field is absent.
    #[error("missing field `{0}`")]
    MissingField(String),
    /// A field has the wrong JSON type.
    #[error("field `{field}` has the wrong type, expected {expected}")]
    WrongType {
        /// Dotted path of the field.
        field: String,
        /// What was expected.
        expected: &'static str,
    },
    /// `messageType` is not one PURISTA defines.
    #[error("unknown messageType `{0}`")]
    UnknownMessageType(String),
    /// The encoded message exceeds the size limit.
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    Oversize {
        /// Size of the input.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Anything else the structural checks did not catch.
    #[error("invalid envelope: {0}")]
    Invalid(String),
}

/// Which part of a message a size limit applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum MessagePart {
    /// The encoded envelope.
    Body,
    /// What travels beside the body: headers, attributes, extensions.
    Metadata,
}

impl std::fmt::Display for MessagePart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MessagePart::Body => "body",
            MessagePart::Metadata => "metadata",
        })
    }
}

/// A broker client's own error, kept whole as the [`source`](std::error::Error::source) of a
/// [`BridgeError::Client`]. Cheap to clone; two are equal when they print the same.
#[derive(Clone)]
pub struct ClientError(std::sync::Arc<dyn std::error::Error + Send + Sync + 'static>);

impl ClientError {
    /// Wraps a client error.
    pub fn new(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        ClientError(std::sync::Arc::new(error))
    }

    /// The wrapped error, e.g. to downcast it to the client's own type.
    pub fn inner(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.0
    }
}

impl std::fmt::Debug for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.0, f)
    }
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl PartialEq for ClientError {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0) || self.0.to_string() == other.0.to_string()
    }
}

/// Transport failures reported by a bridge. [`BridgeError::status`] maps each to the status a
/// caller sees; [`BridgeError::is_retryable`] says whether trying again can help.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum BridgeError {
    /// Nobody serves the command (502).
    #[error("no handler is registered for {0}")]
    NoHandler(String),
    /// The broker refused the message (a negative publisher confirm) (502).
    #[error("the broker refused the message for {0}")]
    Refused(String),
    /// The invocation timed out (504).
    #[error("invocation timed out after {0} ms")]
    Timeout(u64),
    /// The bridge is not connected, not started or shutting down, or the broker did not answer
    /// in time (503).
    #[error("bridge unavailable: {0}")]
    Unavailable(String),
    /// The bridge cannot do what was asked (a capability it does not declare) (501).
    #[error("not supported by this bridge: {0}")]
    Unsupported(String),
    /// Invalid input to the bridge (bad names, a bad message family, …) (400).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A message part is over the bridge's declared limit; nothing was sent (400).
    #[error("message {part} of {size} bytes exceeds the bridge's limit of {limit} bytes")]
    TooLarge {
        /// Which part.
        part: MessagePart,
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// A registration with this key already exists (500).
    #[error("already registered: {0}")]
    AlreadyRegistered(String),
    /// The broker refused or failed an operation (500).
    #[error("broker error: {0}")]
    Broker(String),
    /// The broker client failed; its own error is the [`source`](std::error::Error::source)
    /// (and, for logs that print one line, part of the message).
    #[error("{context}: {source}")]
    Client {
        /// What the bridge was doing, in plain words.
        context: String,
        /// The client's error.
        #[source]
        source: ClientError,
        /// Whether trying again can help (a lost connection: yes; bad credentials: no).
        retryable: bool,
    },
    /// A message could not be decoded (400).
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

impl BridgeError {
    /// The status code a caller sees for this failure. The single mapping for bridge errors.
    pub fn status(&self) -> StatusCode {
        match self {
            BridgeError::NoHandler(_) | BridgeError::Refused(_) => StatusCode::BAD_GATEWAY,
            BridgeError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            BridgeError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            BridgeError::InvalidRequest(_)
            | BridgeError::TooLarge { .. }
            | BridgeError::Decode(_) => StatusCode::BAD_REQUEST,
            BridgeError::Unsupported(_) => StatusCode::NOT_IMPLEMENTED,
            BridgeError::Client { retryable, .. } => {
                if *retryable {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
            }
            BridgeError::AlreadyRegistered(_) | BridgeError::Broker(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// Whether the same call may succeed later without changing it: true for an unavailable
    /// bridge, a timeout, a refused publish and a retryable client failure; false for bad
    /// input, an oversized message, an unsupported call, a duplicate registration, a decode
    /// failure, nobody serving the command and a broker refusal of the operation itself.
    ///
    /// ```
    /// use purista_core::BridgeError;
    /// assert!(BridgeError::Unavailable("reconnecting".into()).is_retryable());
    /// assert!(!BridgeError::InvalidRequest("empty name".into()).is_retryable());
    /// ```
    pub fn is_retryable(&self) -> bool {
        match self {
            BridgeError::Timeout(_) | BridgeError::Unavailable(_) | BridgeError::Refused(_) => true,
            BridgeError::Client { retryable, .. } => *retryable,
            BridgeError::NoHandler(_)
            | BridgeError::Unsupported(_)
            | BridgeError::InvalidRequest(_)
            | BridgeError::TooLarge { .. }
            | BridgeError::AlreadyRegistered(_)
            | BridgeError::Broker(_)
            | BridgeError::Decode(_) => false,
        }
    }

    /// A [`BridgeError::Client`]: `context` says what the bridge was doing, `source` is the
    /// client's error, `retryable` whether trying again can help.
    ///
    /// ```
    /// use std::error::Error;
    /// use purista_core::BridgeError;
    /// let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
    /// let e = BridgeError::client("publishing to the exchange", io, true);
    /// assert_eq!(e.to_string(), "publishing to the exchange: reset by peer");
    /// assert_eq!(e.source().unwrap().to_string(), "reset by peer");
    /// assert_eq!(e.status().0, 503);
    /// ```
    pub fn client(
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
        retryable: bool,
    ) -> Self {
        BridgeError::Client {
            context: context.into(),
            source: ClientError::new(source),
            retryable,
        }
    }
}

/// Settling a delivery failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SettleError {
    /// The delivery was already settled; the second settlement was not applied.
    #[error("delivery {message_id} was already settled")]
    AlreadySettled {
        /// Id of the message.
        message_id: String,
    },
    /// The bridge could not carry out the settlement.
    #[error("settling failed: {0}")]
    Bridge(#[from] BridgeError),
}
