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

/// What an invocation's caller gets when the command did not succeed.
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
    if let Some(h) = err.downcast_ref::<HandledError>() {
        return (
            ErrorPayload {
                status: h.status,
                message: h.message.clone(),
                data: h.data.clone(),
                trace_id,
            },
            true,
        );
    }
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

/// Transport failures reported by a bridge.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
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
    /// The bridge is not connected, not started or shutting down (503).
    #[error("bridge unavailable: {0}")]
    Unavailable(String),
    /// The bridge cannot do what was asked (a capability it does not declare).
    #[error("not supported by this bridge: {0}")]
    Unsupported(String),
    /// Invalid input to the bridge (bad names, oversize payload, …) (400).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A registration with this key already exists.
    #[error("already registered: {0}")]
    AlreadyRegistered(String),
    /// The broker refused or failed an operation.
    #[error("broker error: {0}")]
    Broker(String),
    /// A message could not be decoded.
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
            BridgeError::InvalidRequest(_) | BridgeError::Decode(_) => StatusCode::BAD_REQUEST,
            BridgeError::Unsupported(_) => StatusCode::NOT_IMPLEMENTED,
            BridgeError::AlreadyRegistered(_) | BridgeError::Broker(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
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
