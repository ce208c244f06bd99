//! The fast path of [`Envelope::decode`]: the bytes read straight into an [`Envelope`], in one
//! pass, with no intermediate JSON tree of the whole envelope.
//!
//! The careful path parses the bytes into a [`Value`], checks it field by field (so that an
//! error names its field) and converts it into the struct: three walks over the message, and
//! the conversion buffers every field once more for the flattened `extra`. That was most of a
//! bridge's receive cost. Here a map visitor takes each known field into its typed slot and
//! everything else into `extra`; the per-family rules are then checked on the struct.
//!
//! The fast path only ever answers "this is the envelope" or "not sure": any input it does not
//! accept (a type error, a missing field, a duplicate key, a broken family rule) goes through
//! the careful path, which decides and words the error. So both paths accept exactly the same
//! inputs with the same result; a property test holds them to that.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value};

use super::{
    Address, Envelope, MessageType, SenderAddress, default_content_encoding, default_content_type,
};

/// `Some(envelope)` when `bytes` are a valid envelope read in one pass; `None` when the careful
/// path must decide (and word the error).
pub(super) fn decode(bytes: &[u8]) -> Option<Envelope> {
    // One UTF-8 check of the whole text, so that each string is not checked again on its own
    // (what reading from bytes does); text that is not UTF-8 is the careful path's to word.
    let text = std::str::from_utf8(bytes).ok()?;
    // The scanner first (the envelope's usual shape), serde's one pass for what it leaves.
    let envelope = match super::scan::decode(text) {
        Some(envelope) => envelope,
        None => serde_json::from_str::<Fast>(text).ok()?.0,
    };
    family_rules_hold(&envelope).then_some(envelope)
}

/// The rules of each message family that the types alone do not carry (mirrors the careful
/// path's `validate_object`; anything it would reject must fail here too).
fn family_rules_hold(e: &Envelope) -> bool {
    match e.message_type {
        MessageType::Command => {
            e.correlation_id.is_some() && e.receiver.is_some() && e.payload.is_object()
        }
        MessageType::CommandSuccessResponse
        | MessageType::CommandErrorResponse
        | MessageType::Stream => e.correlation_id.is_some(),
        MessageType::CustomMessage => e.event_name.is_some(),
        _ => true,
    }
}

/// An envelope read by [`FastVisitor`].
struct Fast(Envelope);

impl<'de> Deserialize<'de> for Fast {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(FastVisitor)
    }
}

/// A top-level key: one of the envelope's fields, or another (kept in `extra`).
enum Key {
    Id,
    Timestamp,
    MessageType,
    ContentType,
    ContentEncoding,
    TraceId,
    CorrelationId,
    PrincipalId,
    TenantId,
    EventName,
    Otp,
    Sender,
    Receiver,
    Payload,
    IsHandledError,
    Other(String),
}

impl Key {
    fn known(name: &str) -> Option<Key> {
        Some(match name {
            "id" => Key::Id,
            "timestamp" => Key::Timestamp,
            "messageType" => Key::MessageType,
            "contentType" => Key::ContentType,
            "contentEncoding" => Key::ContentEncoding,
            "traceId" => Key::TraceId,
            "correlationId" => Key::CorrelationId,
            "principalId" => Key::PrincipalId,
            "tenantId" => Key::TenantId,
            "eventName" => Key::EventName,
            "otp" => Key::Otp,
            "sender" => Key::Sender,
            "receiver" => Key::Receiver,
            "payload" => Key::Payload,
            "isHandledError" => Key::IsHandledError,
            _ => return None,
        })
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: de::Error>(self, name: &str) -> Result<Key, E> {
                Ok(Key::known(name).unwrap_or_else(|| Key::Other(name.to_string())))
            }
            fn visit_string<E: de::Error>(self, name: String) -> Result<Key, E> {
                Ok(Key::known(&name).unwrap_or(Key::Other(name)))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// Sets a field once; a second value for it is a duplicate key (the careful path decides
/// what that means).
fn once<E: de::Error, T>(slot: &mut Option<T>, value: T) -> Result<(), E> {
    if slot.replace(value).is_some() {
        return Err(E::custom("duplicate field"));
    }
    Ok(())
}

struct FastVisitor;

impl<'de> Visitor<'de> for FastVisitor {
    type Value = Fast;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an envelope object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fast, A::Error> {
        let mut id = None;
        let mut timestamp = None;
        let mut message_type = None;
        // The optional fields: `Some(None)` once a `null` was read.
        let mut content_type: Option<Option<String>> = None;
        let mut content_encoding: Option<Option<String>> = None;
        let mut trace_id = None;
        let mut correlation_id = None;
        let mut principal_id = None;
        let mut tenant_id = None;
        let mut event_name = None;
        let mut otp = None;
        let mut sender = None;
        let mut receiver: Option<Option<Address>> = None;
        let mut payload: Option<Value> = None;
        let mut is_handled_error = None;
        let mut extra = Map::new();
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Id => once(&mut id, map.next_value::<String>()?)?,
                Key::Timestamp => once(&mut timestamp, map.next_value::<u64>()?)?,
                Key::MessageType => once(&mut message_type, map.next_value::<MessageType>()?)?,
                Key::ContentType => once(&mut content_type, map.next_value()?)?,
                Key::ContentEncoding => once(&mut content_encoding, map.next_value()?)?,
                Key::TraceId => once(&mut trace_id, map.next_value::<Option<String>>()?)?,
                Key::CorrelationId => {
                    once(&mut correlation_id, map.next_value::<Option<String>>()?)?
                }
                Key::PrincipalId => once(&mut principal_id, map.next_value::<Option<String>>()?)?,
                Key::TenantId => once(&mut tenant_id, map.next_value::<Option<String>>()?)?,
                Key::EventName => once(&mut event_name, map.next_value::<Option<String>>()?)?,
                Key::Otp => once(&mut otp, map.next_value::<Option<String>>()?)?,
                Key::Sender => once(&mut sender, map.next_value::<SenderAddress>()?)?,
                Key::Receiver => once(&mut receiver, map.next_value()?)?,
                Key::Payload => once(&mut payload, map.next_value::<Value>()?)?,
                Key::IsHandledError => {
                    once(&mut is_handled_error, map.next_value::<Option<bool>>()?)?
                }
                Key::Other(name) => {
                    let value = map.next_value::<Value>()?;
                    if extra.insert(name, value).is_some() {
                        return Err(de::Error::custom("duplicate field"));
                    }
                }
            }
        }
        let missing = |field| de::Error::missing_field(field);
        Ok(Fast(Envelope {
            id: id.ok_or_else(|| missing("id"))?,
            timestamp: timestamp.ok_or_else(|| missing("timestamp"))?,
            message_type: message_type.ok_or_else(|| missing("messageType"))?,
            content_type: content_type.flatten().unwrap_or_else(default_content_type),
            content_encoding: content_encoding
                .flatten()
                .unwrap_or_else(default_content_encoding),
            trace_id: trace_id.flatten(),
            correlation_id: correlation_id.flatten(),
            principal_id: principal_id.flatten(),
            tenant_id: tenant_id.flatten(),
            event_name: event_name.flatten(),
            otp: otp.flatten(),
            sender: sender.ok_or_else(|| missing("sender"))?,
            receiver: receiver.flatten(),
            explicit_null_payload: matches!(payload, Some(Value::Null)),
            payload: payload.unwrap_or(Value::Null),
            is_handled_error: is_handled_error.flatten(),
            extra,
        }))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::DecodeError;

    /// JSON text for a field value: right and wrong types, nulls, edge numbers.
    fn any_value() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("null".to_string()),
            Just("true".to_string()),
            Just("0".to_string()),
            Just("-1".to_string()),
            Just("1.5".to_string()),
            Just("1700000000000".to_string()),
            Just("18446744073709551616".to_string()),
            Just("[]".to_string()),
            Just("[1,null]".to_string()),
            Just("{}".to_string()),
            Just("\"\"".to_string()),
            Just("\"x\\u00e9\\n\"".to_string()),
            Just("\"command\"".to_string()),
            Just("\"customMessage\"".to_string()),
            Just("\"commandSuccessResponse\"".to_string()),
            Just("\"stream\"".to_string()),
            Just("\"infoServiceReady\"".to_string()),
            Just("\"Command\"".to_string()),
            Just(r#"{"serviceName":"s","serviceVersion":"1","serviceTarget":"t","instanceId":"i"}"#.to_string()),
            Just(r#"{"serviceName":"s","serviceVersion":"1","serviceTarget":"t"}"#.to_string()),
            Just(r#"{"serviceName":"s","serviceVersion":"1","serviceTarget":"t","instanceId":null}"#.to_string()),
            Just(r#"{"serviceName":"s","serviceVersion":1,"serviceTarget":"t","instanceId":"i"}"#.to_string()),
            Just(r#"{"serviceName":"s","serviceVersion":"1","serviceTarget":"t","instanceId":"i","x":[1]}"#.to_string()),
            Just(r#"{"payload":{"a":1},"parameter":{}}"#.to_string()),
            "[a-z]{0,6}".prop_map(|s| format!("\"{s}\"")),
        ]
    }

    const FIELDS: [&str; 17] = [
        "id",
        "timestamp",
        "messageType",
        "contentType",
        "contentEncoding",
        "traceId",
        "correlationId",
        "principalId",
        "tenantId",
        "eventName",
        "otp",
        "sender",
        "receiver",
        "payload",
        "isHandledError",
        "extraField",
        "other",
    ];

    /// A field that fits its slot, so that whole valid envelopes come up often.
    fn fitting(field: &str) -> BoxedStrategy<String> {
        match field {
            "timestamp" => Just("1700000000000".to_string()).boxed(),
            "messageType" => prop_oneof![
                Just("\"command\"".to_string()),
                Just("\"customMessage\"".to_string()),
                Just("\"commandErrorResponse\"".to_string()),
                Just("\"stream\"".to_string()),
                Just("\"infoServiceInit\"".to_string()),
            ]
            .boxed(),
            "sender" | "receiver" => Just(
                r#"{"serviceName":"s","serviceVersion":"1","serviceTarget":"t","instanceId":"i"}"#
                    .to_string(),
            )
            .boxed(),
            "payload" => prop_oneof![
                Just(r#"{"payload":{"a":[1,2.5,null]},"parameter":{}}"#.to_string()),
                Just("null".to_string()),
                Just("[1]".to_string()),
                // Numbers of every shape, escaped keys, a repeated key, nesting, whitespace.
                Just(r#"{"payload":{"n":[-0,1e3,1E+2,0.1,-12,18446744073709551615,18446744073709551616,123456789012345678901234,-9223372036854775809]},"parameter":{}}"#.to_string()),
                Just(r#"{"payload":{"k\"ey":"\u0041\ud83d\ude80","dup":1,"dup":[2]},"parameter":{ }}"#.to_string()),
                Just(r#"{ "payload" : [ [ [ ] ] , { "a" : { "b" : { } } } ] , "parameter" : { } }"#.to_string()),
                Just(r#"{"payload":{"bad":01},"parameter":{}}"#.to_string()),
                Just(r#"{"payload":{"bad":[1,]},"parameter":{}}"#.to_string()),
                Just(r#"{"payload":{"bad":tru},"parameter":{}}"#.to_string()),
            ]
            .boxed(),
            "isHandledError" => Just("false".to_string()).boxed(),
            _ => "[a-z0-9]{1,5}".prop_map(|s| format!("\"{s}\"")).boxed(),
        }
    }

    /// An envelope-like object as text: most fields fitting, some of any type, some missing,
    /// sometimes a key twice.
    fn envelope_text() -> impl Strategy<Value = String> {
        let fields = FIELDS.iter().map(|f| {
            (
                prop_oneof![
                    6 => fitting(f).prop_map(Some),
                    1 => any_value().prop_map(Some),
                    1 => Just(None),
                ],
                prop::option::weighted(0.03, any_value()),
            )
        });
        (fields.collect::<Vec<_>>(), any::<u64>()).prop_map(|(values, shuffle)| {
            let mut parts = Vec::new();
            for (field, (value, again)) in FIELDS.iter().zip(values) {
                if let Some(v) = value {
                    parts.push(format!("\"{field}\":{v}"));
                }
                if let Some(v) = again {
                    parts.push(format!("\"{field}\":{v}"));
                }
            }
            let n = parts.len().max(1);
            parts.rotate_left(usize::try_from(shuffle % n as u64).unwrap_or(0));
            format!("{{{}}}", parts.join(","))
        })
    }

    fn same_outcome(a: &Result<Envelope, DecodeError>, b: &Result<Envelope, DecodeError>) -> bool {
        match (a, b) {
            (Ok(a), Ok(b)) => a == b,
            (Err(a), Err(b)) => a.to_string() == b.to_string(),
            _ => false,
        }
    }

    /// The same text with whitespace after some structural characters (both parsers must
    /// skip it alike; inside strings it changes the string for both).
    fn spaced(text: &str, every: usize) -> String {
        let mut out = String::with_capacity(text.len() * 2);
        for (i, c) in text.chars().enumerate() {
            out.push(c);
            if matches!(c, '{' | ',' | ':' | '[') && i % every == 0 {
                out.push_str(if i % 2 == 0 { " " } else { "\n\t " });
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        /// Whatever the scanner accepts (and the family rules pass), the careful path accepts
        /// as the same envelope.
        #[test]
        fn the_scanner_agrees_with_the_careful_path(text in envelope_text(), every in 1usize..4) {
            for text in [text.clone(), spaced(&text, every)] {
                let careful = Envelope::decode_carefully(text.as_bytes());
                let scanned = crate::envelope::scan::decode(&text).filter(family_rules_hold);
                if let Some(scanned) = scanned {
                    prop_assert!(
                        matches!(&careful, Ok(c) if *c == scanned),
                        "the scanner read {text} as {scanned:?}; careful path: {careful:?}"
                    );
                }
                let decoded = Envelope::decode(text.as_bytes());
                prop_assert!(
                    same_outcome(&decoded, &careful),
                    "decode({text}) = {decoded:?}, careful path = {careful:?}"
                );
            }
        }

        /// Whatever the fast path accepts, the careful path accepts as the same envelope; and
        /// `decode` answers exactly what the careful path answers, errors included.
        #[test]
        fn the_fast_path_agrees_with_the_careful_path(text in envelope_text()) {
            let bytes = text.as_bytes();
            let careful = Envelope::decode_carefully(bytes);
            if let Some(fast) = decode(bytes) {
                prop_assert!(
                    matches!(&careful, Ok(c) if *c == fast),
                    "fast path accepted {text} as {fast:?}; careful path: {careful:?}"
                );
            }
            let decoded = Envelope::decode(bytes);
            prop_assert!(
                same_outcome(&decoded, &careful),
                "decode({text}) = {decoded:?}, careful path = {careful:?}"
            );
        }
    }

    fn sender() -> SenderAddress {
        SenderAddress {
            service_name: "s".into(),
            service_version: "1".into(),
            service_target: "t".into(),
            instance_id: "i".into(),
        }
    }

    /// The scanner takes what bridges carry every day, escapes in `otp` included (else it
    /// would be dead weight), and hands on what it does not expect.
    #[test]
    fn the_scanner_takes_ordinary_envelopes() {
        let mut command = Envelope::command(
            sender(),
            Address::new("r", "1", "go"),
            serde_json::json!({"n": 1, "s": "é\"q\""}),
            serde_json::json!({}),
        );
        command.otp = Some(
            r#"{"traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}"#.into(),
        );
        let text = String::from_utf8(command.encode()).expect("UTF-8");
        assert_eq!(crate::envelope::scan::decode(&text), Some(command.clone()));
        let response = command.success_response(serde_json::Value::Null, Some("done".into()));
        let text = String::from_utf8(response.encode()).expect("UTF-8");
        let scanned = crate::envelope::scan::decode(&text).expect("the scanner takes a response");
        assert!(scanned.payload_is_explicit_null());
        assert_eq!(scanned, response);
        // Handed on: an unknown field in an address, an escaped key, a timestamp with a
        // fraction or a leading zero, a raw control character in a string (not JSON), a
        // payload nested deeper than the scanner reads.
        let sender =
            r#"{"serviceName":"s","serviceVersion":"1","serviceTarget":"t","instanceId":"i"}"#;
        let nested = format!("{}1{}", "[".repeat(70), "]".repeat(70));
        for text in [
            r#"{"id":"1","timestamp":1,"messageType":"infoServiceReady","sender":{"serviceName":"s","serviceVersion":"1","serviceTarget":"t","instanceId":"i","x":1}}"#
                .to_string(),
            format!(
                r#"{{"\u0069d":"1","timestamp":1,"messageType":"infoServiceReady","sender":{sender}}}"#
            ),
            format!(
                r#"{{"id":"1","timestamp":1.0,"messageType":"infoServiceReady","sender":{sender}}}"#
            ),
            format!(
                r#"{{"id":"1","timestamp":01,"messageType":"infoServiceReady","sender":{sender}}}"#
            ),
            format!(
                "{{\"id\":\"a\u{1}b\",\"timestamp\":1,\"messageType\":\"infoServiceReady\",\"sender\":{sender}}}"
            ),
            format!(
                r#"{{"id":"1","timestamp":1,"messageType":"infoServiceReady","sender":{sender},"payload":{nested}}}"#
            ),
        ] {
            assert_eq!(crate::envelope::scan::decode(&text), None, "{text}");
        }
    }

    /// The fast path takes what bridges carry every day (else it would be dead weight).
    #[test]
    fn the_fast_path_takes_ordinary_envelopes() {
        let command = Envelope::command(
            sender(),
            Address::new("r", "1", "go"),
            serde_json::json!({"n": 1}),
            serde_json::json!({}),
        );
        let bytes = command.encode();
        let fast = decode(&bytes).expect("the fast path takes a command");
        assert_eq!(fast, command);
        let text = r#"{"id":"1","timestamp":1,"messageType":"customMessage","eventName":"e","sender":{"serviceName":"s","serviceVersion":"1","serviceTarget":"t","instanceId":"i"},"payload":null,"x-extra":{"k":[1]}}"#;
        let fast = decode(text.as_bytes()).expect("the fast path takes an event");
        assert!(fast.explicit_null_payload);
        assert_eq!(
            fast.extra.get("x-extra"),
            Some(&serde_json::json!({"k":[1]}))
        );
        assert_eq!(Envelope::decode_carefully(text.as_bytes()).ok(), Some(fast));
    }
}
