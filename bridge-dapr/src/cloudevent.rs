//! The CloudEvent (structured mode, JSON) the bridge publishes and the sidecar delivers: the
//! PURISTA envelope travels as the JSON `data`, the message id as the CloudEvent `id`.

use purista_core::Envelope;
use serde_json::{Map, Value, json};

/// Content type of a structured CloudEvent.
pub const CLOUDEVENT_CONTENT_TYPE: &str = "application/cloudevents+json";
/// The CloudEvent `type` of every PURISTA message.
pub const EVENT_TYPE: &str = "io.purista.message";

/// The CloudEvent of an already encoded envelope. `traceparent` is the W3C trace context of
/// the message, when it carries one (Dapr reads it from the event).
pub fn wrap(envelope: &Envelope, encoded: &[u8], source: &str) -> Result<Vec<u8>, String> {
    let data: Value = serde_json::from_slice(encoded).map_err(|e| e.to_string())?;
    let mut event = json!({
        "specversion": "1.0",
        "id": envelope.id,
        "source": source,
        "type": EVENT_TYPE,
        "datacontenttype": "application/json",
        "data": data,
    });
    if let Some(traceparent) = envelope
        .otp
        .as_deref()
        .filter(|t| t.len() < 256 && t.is_ascii())
        && let Some(obj) = event.as_object_mut()
    {
        obj.insert("traceparent".into(), Value::String(traceparent.to_string()));
    }
    serde_json::to_vec(&event).map_err(|e| e.to_string())
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
}

/// The envelope inside a delivered CloudEvent.
pub fn unwrap(body: &[u8]) -> Result<Delivered, UnwrapError> {
    let mut event: Map<String, Value> =
        serde_json::from_slice(body).map_err(|e| UnwrapError::NotCloudEvent(e.to_string()))?;
    if event.get("specversion").and_then(Value::as_str).is_none() {
        return Err(UnwrapError::NotCloudEvent("no specversion".into()));
    }
    let Some(id) = event.get("id").and_then(Value::as_str).map(str::to_string) else {
        return Err(UnwrapError::NotCloudEvent("no id".into()));
    };
    // The body's size is bounded by the app server before this runs.
    let envelope = match event.remove("data") {
        Some(Value::String(s)) => Envelope::decode_with_limit(s.as_bytes(), usize::MAX),
        Some(v @ Value::Object(_)) => Envelope::from_value(v),
        Some(_) => return Err(UnwrapError::NotEnvelope("data is not an object".into())),
        None => return Err(UnwrapError::NotEnvelope("no data".into())),
    }
    .map_err(|e| UnwrapError::NotEnvelope(e.to_string()))?;
    Ok(Delivered { id, envelope })
}

#[cfg(test)]
mod tests {
    use purista_core::SenderAddress;

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
}
