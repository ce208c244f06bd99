//! The CloudEvent (structured mode, JSON) the bridge publishes and the sidecar delivers: the
//! PURISTA envelope travels as the JSON `data`, the message id as the CloudEvent `id`.
//!
//! A retry of one subscription travels as a new CloudEvent (its own `id`) with the envelope
//! unchanged and extension attributes naming the subscription ([`EXT_TARGET`]), the instance's
//! app for a broadcast subscription ([`EXT_APP`]), the attempt it is ([`EXT_ATTEMPT`]) and
//! when it may run ([`EXT_NOT_BEFORE`]). A dead letter carries its note in [`EXT_DL_TARGET`],
//! [`EXT_DL_REASON`], [`EXT_DL_ATTEMPTS`], [`EXT_DL_ORIGIN`] and [`EXT_DL_AT`].

use purista_core::Envelope;
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

/// Content type of a structured CloudEvent.
pub const CLOUDEVENT_CONTENT_TYPE: &str = "application/cloudevents+json";
/// The CloudEvent `type` of every PURISTA message.
pub const EVENT_TYPE: &str = "io.purista.message";

/// Extension: registration key of the one subscription a retry copy is for.
pub const EXT_TARGET: &str = "puristatarget";
/// Extension: app id of the one instance a retry copy of a broadcast subscription is for.
pub const EXT_APP: &str = "puristaapp";
/// Extension: the delivery attempt a retry copy is (decimal, 2 or more).
pub const EXT_ATTEMPT: &str = "puristaattempt";
/// Extension: epoch ms before which a retry copy's handler does not run.
pub const EXT_NOT_BEFORE: &str = "puristanotbefore";
/// Extension: the dead-letter target of a dead letter.
pub const EXT_DL_TARGET: &str = "puristadltarget";
/// Extension: why the message was dead-lettered.
pub const EXT_DL_REASON: &str = "puristadlreason";
/// Extension: deliveries made before it was dead-lettered (decimal).
pub const EXT_DL_ATTEMPTS: &str = "puristadlattempts";
/// Extension: registration key of the subscription it was dead-lettered from.
pub const EXT_DL_ORIGIN: &str = "puristadlorigin";
/// Extension: when it was dead-lettered (epoch ms, decimal).
pub const EXT_DL_AT: &str = "puristadlat";

/// The CloudEvent of an already encoded envelope. `traceparent` is the W3C trace context of
/// the message, when it carries one (Dapr reads it from the event).
///
/// `encoded` is the envelope's own JSON object ([`Envelope::encode`]) and becomes `data` byte
/// for byte: parsing it back into a tree only to write it out again cost a parse and a
/// serialization of every message published.
pub fn wrap(envelope: &Envelope, encoded: &[u8], source: &str) -> Result<Vec<u8>, String> {
    wrap_with(envelope, encoded, source, "", &[])
}

/// [`wrap`] with extension attributes `(name, value)` (names as the `EXT_*` constants). `id`
/// is the CloudEvent id; empty = the envelope's id.
pub fn wrap_with(
    envelope: &Envelope,
    encoded: &[u8],
    source: &str,
    id: &str,
    extensions: &[(&str, &str)],
) -> Result<Vec<u8>, String> {
    if encoded.first() != Some(&b'{') || encoded.last() != Some(&b'}') {
        return Err("the encoded envelope is not a JSON object".into());
    }
    let mut event = Vec::with_capacity(encoded.len() + 192);
    let mut field = |name: &str, value: &str| -> Result<(), String> {
        event.extend_from_slice(if event.is_empty() { b"{\"" } else { b",\"" });
        event.extend_from_slice(name.as_bytes());
        event.extend_from_slice(b"\":");
        serde_json::to_writer(&mut event, value).map_err(|e| e.to_string())
    };
    field("specversion", "1.0")?;
    field("id", if id.is_empty() { &envelope.id } else { id })?;
    field("source", source)?;
    field("type", EVENT_TYPE)?;
    field("datacontenttype", "application/json")?;
    if let Some(traceparent) = envelope
        .otp
        .as_deref()
        .filter(|t| t.len() < 256 && t.is_ascii())
    {
        field("traceparent", traceparent)?;
    }
    for (name, value) in extensions {
        field(name, value)?;
    }
    event.extend_from_slice(b",\"data\":");
    event.extend_from_slice(encoded);
    event.push(b'}');
    Ok(event)
}

/// Why a delivered body is not a PURISTA CloudEvent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnwrapError {
    /// Not a JSON object.
    #[error("the body is not a JSON CloudEvent: {0}")]
    NotCloudEvent(String),
    /// No `data`, or `data` is not an envelope.
    #[error("the CloudEvent's data is not a PURISTA envelope: {0}")]
    NotEnvelope(String),
}

/// A delivered CloudEvent: its `id` (one per publish; a redelivery keeps it) and the envelope.
#[derive(Debug, Clone)]
pub struct Delivered {
    /// The CloudEvent `id`.
    pub id: String,
    /// The PURISTA message.
    pub envelope: Envelope,
    /// Set on a retry copy for one subscription.
    pub retry: Option<RetryCopy>,
}

/// What a retry copy says about itself (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryCopy {
    /// Registration key of its subscription.
    pub target: String,
    /// For a broadcast subscription, the app id of the instance it is for.
    pub app: Option<String>,
    /// The attempt it is.
    pub attempt: u32,
    /// Epoch ms before which its handler does not run.
    pub not_before: u64,
}

/// The fields of a delivered CloudEvent the bridge reads; `data` stays the bytes it came as.
#[derive(Deserialize)]
struct Incoming<'a> {
    #[serde(default)]
    specversion: Option<Value>,
    #[serde(default)]
    id: Option<Value>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
    #[serde(default, rename = "puristatarget")]
    target: Option<String>,
    #[serde(default, rename = "puristaapp")]
    app: Option<String>,
    #[serde(default, rename = "puristaattempt")]
    attempt: Option<String>,
    #[serde(default, rename = "puristanotbefore")]
    not_before: Option<String>,
}

/// The envelope inside a delivered CloudEvent. `data` is decoded from its own bytes by
/// [`Envelope::decode_with_limit`] (core's one-pass decoder), not through a JSON tree of the
/// whole event.
pub fn unwrap(body: &[u8]) -> Result<Delivered, UnwrapError> {
    let not_object = || UnwrapError::NotCloudEvent("not a JSON object".into());
    // A derived struct would also take a JSON array, field by field.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(not_object());
    }
    // One UTF-8 check of the whole body, not one per string of it (what reading bytes does).
    let text = std::str::from_utf8(body)
        .map_err(|e| UnwrapError::NotCloudEvent(format!("not UTF-8: {e}")))?;
    let event: Incoming<'_> =
        serde_json::from_str(text).map_err(|e| UnwrapError::NotCloudEvent(e.to_string()))?;
    if !event.specversion.as_ref().is_some_and(Value::is_string) {
        return Err(UnwrapError::NotCloudEvent("no specversion".into()));
    }
    let Some(Value::String(id)) = event.id else {
        return Err(UnwrapError::NotCloudEvent("no id".into()));
    };
    let Some(data) = event.data else {
        return Err(UnwrapError::NotEnvelope("no data".into()));
    };
    let data = data.get();
    // The body's size is bounded by the app server before this runs.
    let envelope = match data.as_bytes().first() {
        Some(b'"') => {
            let text: String =
                serde_json::from_str(data).map_err(|e| UnwrapError::NotEnvelope(e.to_string()))?;
            Envelope::decode_with_limit(text.as_bytes(), usize::MAX)
        }
        Some(b'{') => Envelope::decode_with_limit(data.as_bytes(), usize::MAX),
        _ => return Err(UnwrapError::NotEnvelope("data is not an object".into())),
    }
    .map_err(|e| UnwrapError::NotEnvelope(e.to_string()))?;
    let retry = match event.target {
        Some(target) if !target.is_empty() => Some(RetryCopy {
            target,
            app: event.app.filter(|a| !a.is_empty()),
            attempt: event
                .attempt
                .as_deref()
                .and_then(|a| a.parse().ok())
                .unwrap_or(1)
                .max(1),
            not_before: event
                .not_before
                .as_deref()
                .and_then(|t| t.parse().ok())
                .unwrap_or(0),
        }),
        _ => None,
    };
    Ok(Delivered {
        id,
        envelope,
        retry,
    })
}

#[cfg(test)]
mod tests {
    use purista_core::SenderAddress;
    use serde_json::json;

    use super::*;

    #[test]
    fn an_envelope_survives_wrapping_and_non_envelopes_are_refused() {
        let e = Envelope::custom(SenderAddress::default(), "paid", json!({"n": 1}));
        let ce = wrap(&e, &e.encode(), "app").unwrap();
        let back = unwrap(&ce).unwrap().envelope;
        assert_eq!(back.id, e.id);
        assert_eq!(back.payload, json!({"n": 1}));
        assert!(matches!(
            unwrap(b"not json"),
            Err(UnwrapError::NotCloudEvent(_))
        ));
        assert!(matches!(
            unwrap(br#"{"specversion":"1.0","id":"1","data":{"x":1}}"#),
            Err(UnwrapError::NotEnvelope(_))
        ));
    }

    #[test]
    fn the_wrapped_event_carries_the_cloudevent_fields_and_the_envelope_as_data() {
        let mut e = Envelope::custom(SenderAddress::default(), "paid", json!({"n": 1.5}));
        e.otp = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
        let ce: Value = serde_json::from_slice(&wrap(&e, &e.encode(), "a\"pp").unwrap()).unwrap();
        assert_eq!(ce["specversion"], "1.0");
        assert_eq!(ce["id"], e.id.as_str());
        assert_eq!(ce["source"], "a\"pp");
        assert_eq!(ce["type"], EVENT_TYPE);
        assert_eq!(ce["datacontenttype"], "application/json");
        assert_eq!(ce["traceparent"], e.otp.as_deref().unwrap());
        assert_eq!(ce["data"], serde_json::to_value(&e).unwrap());
        assert!(wrap(&e, b"[1]", "app").is_err());
    }

    #[test]
    fn an_envelope_sent_as_a_json_string_is_read_too() {
        let e = Envelope::custom(SenderAddress::default(), "paid", json!({"n": 1}));
        let text = String::from_utf8(e.encode()).unwrap();
        let ce = json!({"specversion": "1.0", "id": "d-1", "data": text});
        let delivered = unwrap(&serde_json::to_vec(&ce).unwrap()).unwrap();
        assert_eq!(delivered.id, "d-1");
        assert_eq!(delivered.envelope.id, e.id);
    }

    #[test]
    fn events_without_a_string_id_or_specversion_or_not_objects_are_refused() {
        for body in [
            &br#"["1.0","1",{}]"#[..],
            br#"{"specversion":"1.0","id":7,"data":{}}"#,
            br#"{"id":"1","data":{}}"#,
        ] {
            assert!(
                matches!(unwrap(body), Err(UnwrapError::NotCloudEvent(_))),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        assert!(matches!(
            unwrap(br#"{"specversion":"1.0","id":"1","data":7}"#),
            Err(UnwrapError::NotEnvelope(_))
        ));
        assert!(
            matches!(
                unwrap(b"{\"specversion\":\"1.0\",\"id\":\"\xff\"}"),
                Err(UnwrapError::NotCloudEvent(_))
            ),
            "bytes that are not UTF-8"
        );
    }
}
