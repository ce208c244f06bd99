//! The fast path of [`Envelope::encode`]: the envelope written field by field into one buffer
//! sized up front.
//!
//! Encoding goes through serde's derived `Serialize` for `WireOut` otherwise, which is correct
//! but slow for what an envelope is: a dozen short strings (ids, names) that almost never need
//! escaping. serde_json checks every byte of every string against its escape table and grows
//! the output a few times on the way. Here a string that needs no escape (no control
//! character, quote or backslash: one vectorizable scan) is copied as it is, and one that does
//! is handed to serde_json, so the output is byte for byte what the derived encoding writes;
//! a property test holds the two to that. The payload and unknown fields are written by
//! serde_json, as before.

use serde_json::Value;

use super::{Address, Envelope, SenderAddress};

/// Bytes reserved beyond the strings' own lengths: the keys and quotes (about 250 bytes when
/// every field is set), the timestamp and a small payload, so that an ordinary envelope is
/// written without growing the buffer.
const FIXED_ROOM: usize = 512;

/// The envelope as JSON, in the field order and shape of the derived encoding.
pub(super) fn encode(e: &Envelope) -> Vec<u8> {
    let mut out = Vec::with_capacity(FIXED_ROOM + strings_len(e));
    out.extend_from_slice(b"{\"id\":");
    string(&mut out, &e.id);
    out.extend_from_slice(b",\"timestamp\":");
    number(&mut out, e.timestamp);
    out.extend_from_slice(b",\"messageType\":\"");
    // The wire names are plain ASCII identifiers: nothing to escape.
    out.extend_from_slice(e.message_type.as_str().as_bytes());
    out.extend_from_slice(b"\",\"contentType\":");
    string(&mut out, &e.content_type);
    out.extend_from_slice(b",\"contentEncoding\":");
    string(&mut out, &e.content_encoding);
    optional(&mut out, b",\"traceId\":", e.trace_id.as_deref());
    optional(
        &mut out,
        b",\"correlationId\":",
        e.correlation_id.as_deref(),
    );
    optional(&mut out, b",\"principalId\":", e.principal_id.as_deref());
    optional(&mut out, b",\"tenantId\":", e.tenant_id.as_deref());
    optional(&mut out, b",\"eventName\":", e.event_name.as_deref());
    optional(&mut out, b",\"otp\":", e.otp.as_deref());
    out.extend_from_slice(b",\"sender\":");
    sender(&mut out, &e.sender);
    if let Some(receiver) = &e.receiver {
        out.extend_from_slice(b",\"receiver\":");
        address(&mut out, receiver);
    }
    if !e.payload.is_null() || e.explicit_null_payload {
        out.extend_from_slice(b",\"payload\":");
        value(&mut out, &e.payload);
    }
    if let Some(handled) = e.is_handled_error {
        out.extend_from_slice(b",\"isHandledError\":");
        out.extend_from_slice(if handled { b"true" } else { b"false" });
    }
    for (key, v) in &e.extra {
        out.push(b',');
        string(&mut out, key);
        out.push(b':');
        value(&mut out, v);
    }
    out.push(b'}');
    out
}

/// The summed length of the envelope's strings (a lower bound of what they take written).
fn strings_len(e: &Envelope) -> usize {
    let optional = |s: &Option<String>| s.as_ref().map_or(0, String::len);
    let address = |a: &Address| {
        a.service_name.len()
            + a.service_version.len()
            + a.service_target.len()
            + a.instance_id.as_ref().map_or(0, String::len)
    };
    e.id.len()
        + e.content_type.len()
        + e.content_encoding.len()
        + optional(&e.trace_id)
        + optional(&e.correlation_id)
        + optional(&e.principal_id)
        + optional(&e.tenant_id)
        + optional(&e.event_name)
        + optional(&e.otp)
        + e.sender.service_name.len()
        + e.sender.service_version.len()
        + e.sender.service_target.len()
        + e.sender.instance_id.len()
        + e.receiver.as_ref().map_or(0, address)
}

fn sender(out: &mut Vec<u8>, s: &SenderAddress) {
    names(out, &s.service_name, &s.service_version, &s.service_target);
    optional(out, b",\"instanceId\":", Some(&s.instance_id));
    out.push(b'}');
}

fn address(out: &mut Vec<u8>, a: &Address) {
    names(out, &a.service_name, &a.service_version, &a.service_target);
    optional(out, b",\"instanceId\":", a.instance_id.as_deref());
    out.push(b'}');
}

/// An address object's opening and its three names (the instance and the closing brace are
/// the caller's).
fn names(out: &mut Vec<u8>, name: &str, version: &str, target: &str) {
    out.extend_from_slice(b"{\"serviceName\":");
    string(out, name);
    out.extend_from_slice(b",\"serviceVersion\":");
    string(out, version);
    out.extend_from_slice(b",\"serviceTarget\":");
    string(out, target);
}

/// `key` and the string, when there is one (the derived encoding skips `None`).
fn optional(out: &mut Vec<u8>, key: &[u8], s: Option<&str>) {
    if let Some(s) = s {
        out.extend_from_slice(key);
        string(out, s);
    }
}

/// A JSON string: copied between quotes when nothing in it needs an escape, else written by
/// serde_json (which escapes exactly the control characters, `"` and `\`).
fn string(out: &mut Vec<u8>, s: &str) {
    // A fold without early exit, so the check runs over whole vectors of bytes.
    let plain = s.bytes().fold(true, |plain, b| {
        plain & (b >= 0x20) & (b != b'"') & (b != b'\\')
    });
    if plain {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // Writing a `str` into a `Vec` cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

fn number(out: &mut Vec<u8>, n: u64) {
    // Writing an integer into a `Vec` cannot fail.
    let _ = serde_json::to_writer(&mut *out, &n);
}

fn value(out: &mut Vec<u8>, v: &Value) {
    // Serializing a `Value` (string keys, finite numbers) into a `Vec` cannot fail.
    let _ = serde_json::to_writer(&mut *out, v);
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::{Map, json};

    use super::*;
    use crate::MessageType;

    /// Strings as envelopes carry them, and the ones that need escapes or are not ASCII.
    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => "[a-z0-9@/._-]{0,12}",
            1 => Just(String::new()),
            1 => Just("say \"hi\"\\ \u{7f}".to_string()),
            1 => Just("tab\there\nnew\u{1}\u{1f}".to_string()),
            1 => Just("é ü 中 🚀".to_string()),
            1 => Just(r#"{"traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}"#.to_string()),
            1 => any::<String>(),
        ]
    }

    fn address() -> impl Strategy<Value = Address> {
        (text(), text(), text(), prop::option::of(text())).prop_map(
            |(service_name, service_version, service_target, instance_id)| Address {
                service_name,
                service_version,
                service_target,
                instance_id,
            },
        )
    }

    fn payload() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            Just(json!({"payload": {"seq": 1, "kind": "b\"x", "ok": true}, "parameter": {}})),
            Just(json!([1, 2.5, null, "é"])),
            text().prop_map(Value::String),
            any::<i64>().prop_map(Value::from),
        ]
    }

    prop_compose! {
        fn envelope()(
            id in text(),
            timestamp in any::<u64>(),
            type_index in 0..MessageType::ALL.len(),
            content in (text(), text()),
            ids in prop::collection::vec(prop::option::of(text()), 6),
            sender in address(),
            instance in text(),
            receiver in prop::option::of(address()),
            payload in payload(),
            explicit_null in any::<bool>(),
            handled in prop::option::of(any::<bool>()),
            extra in prop::collection::vec((text(), payload()), 0..3),
        ) -> Envelope {
            let mut e = Envelope::new(MessageType::ALL[type_index], SenderAddress {
                service_name: sender.service_name,
                service_version: sender.service_version,
                service_target: sender.service_target,
                instance_id: instance,
            });
            e.id = id;
            e.timestamp = timestamp;
            (e.content_type, e.content_encoding) = content;
            e.trace_id = ids[0].clone();
            e.correlation_id = ids[1].clone();
            e.principal_id = ids[2].clone();
            e.tenant_id = ids[3].clone();
            e.event_name = ids[4].clone();
            e.otp = ids[5].clone();
            e.receiver = receiver;
            e.payload = payload;
            e.explicit_null_payload = explicit_null;
            e.is_handled_error = handled;
            e.extra = extra.into_iter().collect::<Map<_, _>>();
            e
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// The fast writer writes exactly the derived encoding's bytes.
        #[test]
        fn the_fast_writer_writes_what_the_derived_encoding_writes(e in envelope()) {
            let derived = serde_json::to_vec(&e).expect("the derived encoding");
            let fast = encode(&e);
            prop_assert_eq!(
                String::from_utf8_lossy(&fast),
                String::from_utf8_lossy(&derived)
            );
        }
    }

    /// An extra field named like a known one is written twice, as the derived encoding does
    /// (nothing reads such an envelope back differently: the decoder refuses duplicates).
    #[test]
    fn an_extra_field_with_a_known_name_is_written_as_the_derived_encoding_writes_it() {
        let mut e = Envelope::new(MessageType::InfoServiceReady, SenderAddress::default());
        e.extra.insert("id".into(), json!("again"));
        assert_eq!(encode(&e), serde_json::to_vec(&e).expect("derived"));
    }
}
