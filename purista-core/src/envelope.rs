//! The message envelope: PURISTA's wire format.
//!
//! One struct carries every message family (commands, responses, info messages, custom events,
//! stream frames). Keeping a single shape means routing, filtering and tracing code never has to
//! branch on the family, and unknown extra fields survive a round trip through `extra`.
//! Per-family rules (a command has a receiver and a correlation id, a custom message has an event
//! name, …) are enforced by [`Envelope::decode`] and by the constructors, not by the type system.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::DecodeError;
use crate::ids;

mod fast;
mod scan;
mod write;

/// Default content type of an envelope payload.
pub const DEFAULT_CONTENT_TYPE: &str = "application/json";
/// Default content encoding of an envelope payload.
pub const DEFAULT_CONTENT_ENCODING: &str = "utf-8";
/// Default upper bound for an encoded envelope accepted by [`Envelope::decode`] (1 MiB).
pub const DEFAULT_MAX_ENVELOPE_BYTES: usize = 1024 * 1024;

/// The `messageType` of an envelope, with PURISTA's wire strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum MessageType {
    /// A request that expects exactly one response.
    Command,
    /// The successful answer to a command.
    CommandSuccessResponse,
    /// The failed answer to a command.
    CommandErrorResponse,
    /// A business event.
    CustomMessage,
    /// A service is starting.
    InfoServiceInit,
    /// A service has registered everything and is ready.
    InfoServiceReady,
    /// A service is not ready.
    InfoServiceNotReady,
    /// A service registered a command; the payload is the command's metadata.
    InfoServiceFunctionAdded,
    /// A service is draining.
    InfoServiceDrain,
    /// A service shut down.
    InfoServiceShutdown,
    /// An invocation timed out.
    InfoInvokeTimeout,
    /// A subscription failed.
    InfoSubscriptionError,
    /// A stream frame.
    Stream,
}

impl MessageType {
    /// Every message type, in declaration order.
    pub const ALL: [MessageType; 13] = [
        MessageType::Command,
        MessageType::CommandSuccessResponse,
        MessageType::CommandErrorResponse,
        MessageType::CustomMessage,
        MessageType::InfoServiceInit,
        MessageType::InfoServiceReady,
        MessageType::InfoServiceNotReady,
        MessageType::InfoServiceFunctionAdded,
        MessageType::InfoServiceDrain,
        MessageType::InfoServiceShutdown,
        MessageType::InfoInvokeTimeout,
        MessageType::InfoSubscriptionError,
        MessageType::Stream,
    ];

    /// The wire string, e.g. `commandSuccessResponse`.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageType::Command => "command",
            MessageType::CommandSuccessResponse => "commandSuccessResponse",
            MessageType::CommandErrorResponse => "commandErrorResponse",
            MessageType::CustomMessage => "customMessage",
            MessageType::InfoServiceInit => "infoServiceInit",
            MessageType::InfoServiceReady => "infoServiceReady",
            MessageType::InfoServiceNotReady => "infoServiceNotReady",
            MessageType::InfoServiceFunctionAdded => "infoServiceFunctionAdded",
            MessageType::InfoServiceDrain => "infoServiceDrain",
            MessageType::InfoServiceShutdown => "infoServiceShutdown",
            MessageType::InfoInvokeTimeout => "infoInvokeTimeout",
            MessageType::InfoSubscriptionError => "infoSubscriptionError",
            MessageType::Stream => "stream",
        }
    }

    /// Parses a wire string; `None` for anything PURISTA does not define.
    pub fn parse(s: &str) -> Option<MessageType> {
        MessageType::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// Info messages are broadcast, fire-and-forget notices about a service's lifecycle.
    pub fn is_info(self) -> bool {
        matches!(
            self,
            MessageType::InfoServiceInit
                | MessageType::InfoServiceReady
                | MessageType::InfoServiceNotReady
                | MessageType::InfoServiceFunctionAdded
                | MessageType::InfoServiceDrain
                | MessageType::InfoServiceShutdown
                | MessageType::InfoInvokeTimeout
                | MessageType::InfoSubscriptionError
        )
    }

    /// `commandSuccessResponse` or `commandErrorResponse`.
    pub fn is_response(self) -> bool {
        matches!(
            self,
            MessageType::CommandSuccessResponse | MessageType::CommandErrorResponse
        )
    }
}

impl std::fmt::Display for MessageType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A service endpoint: service name, version and target (command, subscription or stream name).
///
/// `instance_id` is the bridge instance; it is optional on receivers and always set on senders.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Address {
    /// Service name, e.g. `orders`.
    pub service_name: String,
    /// Service version, e.g. `1`.
    pub service_version: String,
    /// The command, subscription or stream name; empty for service-level info messages.
    pub service_target: String,
    /// The bridge instance the address belongs to, where known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
}

impl Address {
    /// An address without instance id.
    ///
    /// ```
    /// let a = purista_core::Address::new("orders", "1", "placeOrder");
    /// assert_eq!(a.to_string(), "orders@1/placeOrder");
    /// ```
    pub fn new(
        service_name: impl Into<String>,
        service_version: impl Into<String>,
        service_target: impl Into<String>,
    ) -> Self {
        Address {
            service_name: service_name.into(),
            service_version: service_version.into(),
            service_target: service_target.into(),
            instance_id: None,
        }
    }

    /// The same address with `instance_id` set.
    pub fn with_instance(mut self, instance_id: impl Into<String>) -> Self {
        self.instance_id = Some(instance_id.into());
        self
    }

    /// True when name, version and target are equal (instance ignored): the command routing key.
    pub fn same_endpoint(&self, other: &Address) -> bool {
        self.service_name == other.service_name
            && self.service_version == other.service_version
            && self.service_target == other.service_target
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}@{}/{}",
            self.service_name, self.service_version, self.service_target
        )
    }
}

/// The sender of a message. Same fields as [`Address`], `instanceId` always present on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct SenderAddress {
    /// Service name.
    pub service_name: String,
    /// Service version.
    pub service_version: String,
    /// Command, subscription or stream name; empty for service-level info messages.
    pub service_target: String,
    /// The emitting bridge instance (stamped by the bridge on emit).
    pub instance_id: String,
}

impl SenderAddress {
    /// The sender as an [`Address`].
    pub fn to_address(&self) -> Address {
        Address {
            service_name: self.service_name.clone(),
            service_version: self.service_version.clone(),
            service_target: self.service_target.clone(),
            instance_id: Some(self.instance_id.clone()),
        }
    }
}

impl From<&Address> for SenderAddress {
    fn from(a: &Address) -> Self {
        SenderAddress {
            service_name: a.service_name.clone(),
            service_version: a.service_version.clone(),
            service_target: a.service_target.clone(),
            instance_id: a.instance_id.clone().unwrap_or_default(),
        }
    }
}

/// A PURISTA message.
///
/// Field names serialize in camelCase exactly as PURISTA writes them; unknown fields are kept in
/// [`Envelope::extra`] and written back unchanged. A `payload` that is `null` is written only when
/// it was `null` on the wire (see [`Envelope::payload_is_explicit_null`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// Unique message id (32 lowercase hex chars when generated here).
    pub id: String,
    /// Creation time, Unix epoch milliseconds.
    pub timestamp: u64,
    /// The message family.
    pub message_type: MessageType,
    /// Payload content type, `application/json` by default (also when `null` on the wire).
    pub content_type: String,
    /// Payload content encoding, `utf-8` by default (also when `null` on the wire).
    pub content_encoding: String,
    /// One id for a whole distributed flow.
    pub trace_id: Option<String>,
    /// Links a command to its response and the frames of a stream session.
    pub correlation_id: Option<String>,
    /// Caller identity.
    pub principal_id: Option<String>,
    /// Tenant.
    pub tenant_id: Option<String>,
    /// Business event name, used for subscription routing.
    pub event_name: Option<String>,
    /// W3C trace-context carrier, a JSON string.
    pub otp: Option<String>,
    /// Who sent it.
    pub sender: SenderAddress,
    /// Who it is for (commands, responses, directed events).
    pub receiver: Option<Address>,
    /// The payload. Commands: `{payload, parameter}`; success responses: the result; error
    /// responses: `{status, message, data?, traceId?}`. `Null` when absent on the wire.
    pub payload: Value,
    /// Only on `commandErrorResponse`: whether the error was a handled (business) error.
    pub is_handled_error: Option<bool>,
    /// Unknown fields, passed through untouched.
    pub extra: Map<String, Value>,
    /// `payload: null` was on the wire (or must be written): PURISTA tells "returned `null`"
    /// from "returned nothing" by it, and a TypeScript caller sees `null` or `undefined`.
    explicit_null_payload: bool,
}

/// The wire shape an [`Envelope`] is written as (borrowing, so encoding copies nothing).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WireOut<'a> {
    id: &'a str,
    timestamp: u64,
    message_type: MessageType,
    content_type: &'a str,
    content_encoding: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    trace_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    correlation_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    principal_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tenant_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    event_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    otp: Option<&'a str>,
    sender: &'a SenderAddress,
    #[serde(skip_serializing_if = "Option::is_none")]
    receiver: Option<&'a Address>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    is_handled_error: Option<bool>,
    #[serde(flatten)]
    extra: &'a Map<String, Value>,
}

/// The wire shape an [`Envelope`] is read from: `payload` keeps "absent" apart from `null`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireIn {
    id: String,
    timestamp: u64,
    message_type: MessageType,
    #[serde(
        default = "default_content_type",
        deserialize_with = "content_type_or_default"
    )]
    content_type: String,
    #[serde(
        default = "default_content_encoding",
        deserialize_with = "content_encoding_or_default"
    )]
    content_encoding: String,
    #[serde(default)]
    trace_id: Option<String>,
    #[serde(default)]
    correlation_id: Option<String>,
    #[serde(default)]
    principal_id: Option<String>,
    #[serde(default)]
    tenant_id: Option<String>,
    #[serde(default)]
    event_name: Option<String>,
    #[serde(default)]
    otp: Option<String>,
    sender: SenderAddress,
    #[serde(default)]
    receiver: Option<Address>,
    #[serde(default, deserialize_with = "present_value")]
    payload: Option<Value>,
    #[serde(default)]
    is_handled_error: Option<bool>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

/// `Some(value)` for a field that is present, `Some(Null)` included (plain `Option` reads a
/// `null` as `None`).
fn present_value<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

impl Serialize for Envelope {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let payload =
            (!self.payload.is_null() || self.explicit_null_payload).then_some(&self.payload);
        WireOut {
            id: &self.id,
            timestamp: self.timestamp,
            message_type: self.message_type,
            content_type: &self.content_type,
            content_encoding: &self.content_encoding,
            trace_id: self.trace_id.as_deref(),
            correlation_id: self.correlation_id.as_deref(),
            principal_id: self.principal_id.as_deref(),
            tenant_id: self.tenant_id.as_deref(),
            event_name: self.event_name.as_deref(),
            otp: self.otp.as_deref(),
            sender: &self.sender,
            receiver: self.receiver.as_ref(),
            payload,
            is_handled_error: self.is_handled_error,
            extra: &self.extra,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Envelope {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let wire = WireIn::deserialize(deserializer)?;
        Ok(Envelope {
            id: wire.id,
            timestamp: wire.timestamp,
            message_type: wire.message_type,
            content_type: wire.content_type,
            content_encoding: wire.content_encoding,
            trace_id: wire.trace_id,
            correlation_id: wire.correlation_id,
            principal_id: wire.principal_id,
            tenant_id: wire.tenant_id,
            event_name: wire.event_name,
            otp: wire.otp,
            sender: wire.sender,
            receiver: wire.receiver,
            explicit_null_payload: matches!(wire.payload, Some(Value::Null)),
            payload: wire.payload.unwrap_or(Value::Null),
            is_handled_error: wire.is_handled_error,
            extra: wire.extra,
        })
    }
}

fn default_content_type() -> String {
    DEFAULT_CONTENT_TYPE.to_string()
}

fn default_content_encoding() -> String {
    DEFAULT_CONTENT_ENCODING.to_string()
}

fn content_type_or_default<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_else(default_content_type))
}

fn content_encoding_or_default<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_else(default_content_encoding))
}

/// Current time as Unix epoch milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Envelope {
    /// A new envelope of the given type with a fresh id and the current timestamp.
    pub fn new(message_type: MessageType, sender: SenderAddress) -> Self {
        Envelope {
            id: ids::new_id(),
            timestamp: now_ms(),
            message_type,
            content_type: default_content_type(),
            content_encoding: default_content_encoding(),
            trace_id: None,
            correlation_id: None,
            principal_id: None,
            tenant_id: None,
            event_name: None,
            otp: None,
            sender,
            receiver: None,
            payload: Value::Null,
            is_handled_error: None,
            extra: Map::new(),
            explicit_null_payload: false,
        }
    }

    /// True when a `null` payload is written as `payload: null` rather than left out: it was
    /// `null` on the wire, or [`Envelope::set_explicit_null_payload`] asked for it.
    ///
    /// ```
    /// let e = purista_core::Envelope::decode(br#"{"id":"m","timestamp":1,"messageType":"commandSuccessResponse","correlationId":"c","sender":{"serviceName":"s","serviceVersion":"1","serviceTarget":"t","instanceId":"i"},"payload":null}"#).unwrap();
    /// assert!(e.payload_is_explicit_null());
    /// assert!(String::from_utf8(e.encode()).unwrap().contains(r#""payload":null"#));
    /// ```
    pub fn payload_is_explicit_null(&self) -> bool {
        self.payload.is_null() && self.explicit_null_payload
    }

    /// Sets the payload to `null` and writes it as `payload: null` (PURISTA's "returned `null`").
    pub fn set_explicit_null_payload(&mut self) {
        self.payload = Value::Null;
        self.explicit_null_payload = true;
    }

    /// A command to `receiver` with PURISTA's two-part body `{payload, parameter}`.
    ///
    /// The correlation id is fresh; the trace id is fresh unless the caller sets one.
    ///
    /// ```
    /// use purista_core::{Address, Envelope, MessageType, SenderAddress};
    /// let cmd = Envelope::command(
    ///     SenderAddress::default(),
    ///     Address::new("orders", "1", "placeOrder"),
    ///     serde_json::json!({"sku": "A-1"}),
    ///     serde_json::json!({}),
    /// );
    /// assert_eq!(cmd.message_type, MessageType::Command);
    /// assert_eq!(cmd.payload["payload"]["sku"], "A-1");
    /// assert!(cmd.correlation_id.is_some());
    /// ```
    pub fn command(
        sender: SenderAddress,
        receiver: Address,
        payload: Value,
        parameter: Value,
    ) -> Self {
        let mut e = Envelope::untraced_command(sender, receiver, payload, parameter);
        e.trace_id = Some(ids::new_id());
        e
    }

    /// [`Envelope::command`] without a trace id, for a caller that sets the flow's own (no
    /// random one made up only to be replaced).
    pub(crate) fn untraced_command(
        sender: SenderAddress,
        receiver: Address,
        payload: Value,
        parameter: Value,
    ) -> Self {
        let mut e = Envelope::new(MessageType::Command, sender);
        e.correlation_id = Some(ids::new_id());
        e.receiver = Some(receiver);
        let mut body = Map::with_capacity(2);
        body.insert("payload".into(), payload);
        body.insert("parameter".into(), parameter);
        e.payload = Value::Object(body);
        e
    }

    /// A custom message (business event) named `event_name`.
    pub fn custom(sender: SenderAddress, event_name: impl Into<String>, payload: Value) -> Self {
        let mut e = Envelope::new(MessageType::CustomMessage, sender);
        e.event_name = Some(event_name.into());
        e.payload = payload;
        e
    }

    /// An info message from a service (`serviceTarget` is empty for service-level notices).
    pub fn info(message_type: MessageType, sender: SenderAddress, payload: Value) -> Self {
        let mut e = Envelope::new(message_type, sender);
        e.payload = payload;
        e
    }

    /// The success response to this command: correlation, trace, principal and tenant copied;
    /// sender and receiver swapped. `event_name` is the command's declared success event.
    pub fn success_response(&self, result: Value, event_name: Option<String>) -> Envelope {
        let mut r = self.response_skeleton(MessageType::CommandSuccessResponse);
        // PURISTA always writes a response's payload; `null` is the answer, not a gap.
        r.explicit_null_payload = result.is_null();
        r.payload = result;
        r.event_name = event_name;
        r
    }

    /// The error response to this command. `handled` decides `isHandledError`.
    pub fn error_response(&self, error: &crate::error::ErrorPayload, handled: bool) -> Envelope {
        let mut r = self.response_skeleton(MessageType::CommandErrorResponse);
        r.payload = serde_json::to_value(error).unwrap_or(Value::Null);
        r.is_handled_error = Some(handled);
        r
    }

    fn response_skeleton(&self, message_type: MessageType) -> Envelope {
        let sender = self
            .receiver
            .as_ref()
            .map(SenderAddress::from)
            .unwrap_or_default();
        let mut r = Envelope::new(message_type, sender);
        r.correlation_id = self.correlation_id.clone();
        r.trace_id = self.trace_id.clone();
        r.principal_id = self.principal_id.clone();
        r.tenant_id = self.tenant_id.clone();
        r.otp = self.otp.clone();
        r.receiver = Some(self.sender.to_address());
        r
    }

    /// Copies trace, principal and tenant ids from `origin` (used when a handler emits or invokes).
    pub fn propagate_from(&mut self, origin: &Envelope) {
        if origin.trace_id.is_some() {
            self.trace_id = origin.trace_id.clone();
        }
        if origin.principal_id.is_some() {
            self.principal_id = origin.principal_id.clone();
        }
        if origin.tenant_id.is_some() {
            self.tenant_id = origin.tenant_id.clone();
        }
        if origin.otp.is_some() {
            self.otp = origin.otp.clone();
        }
    }

    /// Serializes to JSON bytes: the same bytes as `serde_json::to_vec(&envelope)`, written
    /// by a faster path.
    pub fn encode(&self) -> Vec<u8> {
        write::encode(self)
    }

    /// Decodes JSON bytes with the default size limit. Total: every failure is a [`DecodeError`].
    ///
    /// ```
    /// use purista_core::{Envelope, DecodeError};
    /// assert!(matches!(Envelope::decode(b"nope"), Err(DecodeError::NotJson(_))));
    /// ```
    pub fn decode(bytes: &[u8]) -> Result<Envelope, DecodeError> {
        Envelope::decode_with_limit(bytes, DEFAULT_MAX_ENVELOPE_BYTES)
    }

    /// Decodes JSON bytes, rejecting inputs larger than `max_bytes`.
    pub fn decode_with_limit(bytes: &[u8], max_bytes: usize) -> Result<Envelope, DecodeError> {
        if bytes.len() > max_bytes {
            return Err(DecodeError::Oversize {
                size: bytes.len(),
                limit: max_bytes,
            });
        }
        // One pass straight into the struct; whatever that does not accept is decided (and
        // its error worded) by the careful path: parse, check field by field, convert.
        if let Some(envelope) = fast::decode(bytes) {
            return Ok(envelope);
        }
        Envelope::decode_carefully(bytes)
    }

    /// The careful path of [`Envelope::decode_with_limit`] (without the size check): the bytes
    /// parsed into a JSON tree, checked field by field so that an error names its field, then
    /// converted. Kept public inside the crate for the property test that holds the fast path to
    /// it.
    pub(crate) fn decode_carefully(bytes: &[u8]) -> Result<Envelope, DecodeError> {
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| DecodeError::NotJson(e.to_string()))?;
        Envelope::from_value(value)
    }

    /// Validates and converts an already parsed JSON value.
    pub fn from_value(value: Value) -> Result<Envelope, DecodeError> {
        let Value::Object(obj) = value else {
            return Err(DecodeError::WrongType {
                field: "$".into(),
                expected: "object",
            });
        };
        validate_object(&obj)?;
        serde_json::from_value(Value::Object(obj)).map_err(|e| DecodeError::Invalid(e.to_string()))
    }
}

fn require_str<'a>(
    obj: &'a Map<String, Value>,
    field: &str,
    path: &str,
) -> Result<&'a str, DecodeError> {
    match obj.get(field) {
        None | Some(Value::Null) => Err(DecodeError::MissingField(format!("{path}{field}"))),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(DecodeError::WrongType {
            field: format!("{path}{field}"),
            expected: "string",
        }),
    }
}

fn optional_str(
    obj: &Map<String, Value>,
    field: &str,
    path: &str,
) -> Result<Option<String>, DecodeError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(DecodeError::WrongType {
            field: format!("{path}{field}"),
            expected: "string",
        }),
    }
}

fn validate_address(
    obj: &Map<String, Value>,
    field: &str,
    instance_required: bool,
) -> Result<bool, DecodeError> {
    let addr = match obj.get(field) {
        None | Some(Value::Null) => return Ok(false),
        Some(Value::Object(a)) => a,
        Some(_) => {
            return Err(DecodeError::WrongType {
                field: field.to_string(),
                expected: "object",
            });
        }
    };
    let path = format!("{field}.");
    require_str(addr, "serviceName", &path)?;
    require_str(addr, "serviceVersion", &path)?;
    require_str(addr, "serviceTarget", &path)?;
    if instance_required {
        require_str(addr, "instanceId", &path)?;
    } else {
        optional_str(addr, "instanceId", &path)?;
    }
    Ok(true)
}

/// Field-by-field checks so that every failure names its field and kind.
fn validate_object(obj: &Map<String, Value>) -> Result<(), DecodeError> {
    let type_str = require_str(obj, "messageType", "")?;
    let message_type = MessageType::parse(type_str)
        .ok_or_else(|| DecodeError::UnknownMessageType(type_str.to_string()))?;
    require_str(obj, "id", "")?;
    match obj.get("timestamp") {
        None | Some(Value::Null) => return Err(DecodeError::MissingField("timestamp".into())),
        Some(Value::Number(n)) if n.as_u64().is_some() => {}
        Some(_) => {
            return Err(DecodeError::WrongType {
                field: "timestamp".into(),
                expected: "non-negative integer (epoch ms)",
            });
        }
    }
    for field in [
        "contentType",
        "contentEncoding",
        "traceId",
        "correlationId",
        "principalId",
        "tenantId",
        "eventName",
        "otp",
    ] {
        optional_str(obj, field, "")?;
    }
    if !validate_address(obj, "sender", true)? {
        return Err(DecodeError::MissingField("sender".into()));
    }
    let has_receiver = validate_address(obj, "receiver", false)?;
    match obj.get("isHandledError") {
        None | Some(Value::Null) | Some(Value::Bool(_)) => {}
        Some(_) => {
            return Err(DecodeError::WrongType {
                field: "isHandledError".into(),
                expected: "boolean",
            });
        }
    }
    match message_type {
        MessageType::Command => {
            require_str(obj, "correlationId", "")?;
            if !has_receiver {
                return Err(DecodeError::MissingField("receiver".into()));
            }
            match obj.get("payload") {
                Some(Value::Object(_)) => {}
                None | Some(Value::Null) => {
                    return Err(DecodeError::MissingField("payload".into()));
                }
                Some(_) => {
                    return Err(DecodeError::WrongType {
                        field: "payload".into(),
                        expected: "object {payload, parameter}",
                    });
                }
            }
        }
        MessageType::CommandSuccessResponse | MessageType::CommandErrorResponse => {
            require_str(obj, "correlationId", "")?;
        }
        MessageType::CustomMessage => {
            require_str(obj, "eventName", "")?;
        }
        MessageType::Stream => {
            require_str(obj, "correlationId", "")?;
        }
        _ => {}
    }
    Ok(())
}
