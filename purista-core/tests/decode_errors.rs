//! Decoding is total (DESIGN §3.1): every malformed input becomes one typed [`DecodeError`] that
//! names the field and the kind of failure, and nothing panics.

use purista_core::envelope::DEFAULT_MAX_ENVELOPE_BYTES;
use purista_core::{DecodeError, Envelope};
use serde_json::{Value, json};

const GOLDEN: [&str; 6] = [
    include_str!("golden/command.json"),
    include_str!("golden/command_success_response.json"),
    include_str!("golden/command_error_response.json"),
    include_str!("golden/custom_message.json"),
    include_str!("golden/info_service_function_added.json"),
    include_str!("golden/stream_frame.json"),
];

/// A valid custom message to break one field at a time.
fn event() -> Value {
    json!({
        "id": "m-1",
        "timestamp": 1_716_192_000_000u64,
        "messageType": "customMessage",
        "eventName": "orderPlaced",
        "sender": {
            "serviceName": "orders",
            "serviceVersion": "1",
            "serviceTarget": "placeOrder",
            "instanceId": "inst-a"
        },
        "payload": { "orderId": "o-1" }
    })
}

/// A valid command to break one field at a time.
fn command() -> Value {
    json!({
        "id": "m-2",
        "timestamp": 1_716_192_000_000u64,
        "messageType": "command",
        "correlationId": "c-1",
        "sender": {
            "serviceName": "orders",
            "serviceVersion": "1",
            "serviceTarget": "placeOrder",
            "instanceId": "inst-a"
        },
        "receiver": { "serviceName": "billing", "serviceVersion": "2", "serviceTarget": "charge" },
        "payload": { "payload": {}, "parameter": {} }
    })
}

fn decode(v: &Value) -> Result<Envelope, DecodeError> {
    Envelope::decode(&serde_json::to_vec(v).expect("json"))
}

fn without(mut v: Value, path: &[&str]) -> Value {
    let (last, parents) = path.split_last().expect("path");
    let mut cur = &mut v;
    for p in parents {
        cur = &mut cur[*p];
    }
    cur.as_object_mut().expect("object").remove(*last);
    v
}

fn with(mut v: Value, key: &str, value: Value) -> Value {
    v[key] = value;
    v
}

fn missing(field: &str) -> Result<Envelope, DecodeError> {
    Err(DecodeError::MissingField(field.into()))
}

fn wrong_type(field: &str) -> Option<String> {
    Some(field.to_string())
}

fn wrong_type_field(r: Result<Envelope, DecodeError>) -> Option<String> {
    match r {
        Err(DecodeError::WrongType { field, .. }) => Some(field),
        other => panic!("expected WrongType, got {other:?}"),
    }
}

#[test]
fn the_unbroken_documents_decode() {
    assert!(decode(&event()).is_ok());
    assert!(decode(&command()).is_ok());
}

#[test]
fn bytes_that_are_not_json_are_not_json() {
    for bytes in [
        &b"nope"[..],
        b"",
        b"{",
        b"{\"id\":",
        b"\xff\xfe\x00",
        b"{} trailing",
        b"[1,2",
    ] {
        assert!(
            matches!(Envelope::decode(bytes), Err(DecodeError::NotJson(_))),
            "{bytes:?}"
        );
    }
}

#[test]
fn a_top_level_array_is_the_wrong_type_at_the_root() {
    assert_eq!(
        Envelope::decode(b"[1, 2, 3]"),
        Err(DecodeError::WrongType {
            field: "$".into(),
            expected: "object"
        })
    );
}

#[test]
fn a_top_level_number_string_or_null_is_the_wrong_type_at_the_root() {
    for doc in [&b"42"[..], b"\"command\"", b"null", b"true"] {
        assert_eq!(
            wrong_type_field(Envelope::decode(doc)),
            wrong_type("$"),
            "{doc:?}"
        );
    }
}

#[test]
fn missing_id_is_a_missing_field() {
    assert_eq!(decode(&without(event(), &["id"])), missing("id"));
}

#[test]
fn missing_timestamp_is_a_missing_field() {
    assert_eq!(
        decode(&without(event(), &["timestamp"])),
        missing("timestamp")
    );
}

#[test]
fn missing_message_type_is_a_missing_field() {
    assert_eq!(
        decode(&without(event(), &["messageType"])),
        missing("messageType")
    );
}

#[test]
fn missing_sender_is_a_missing_field() {
    assert_eq!(decode(&without(event(), &["sender"])), missing("sender"));
}

#[test]
fn missing_sender_instance_id_names_the_nested_path() {
    assert_eq!(
        decode(&without(event(), &["sender", "instanceId"])),
        missing("sender.instanceId")
    );
}

#[test]
fn missing_sender_parts_name_the_nested_path() {
    for part in ["serviceName", "serviceVersion", "serviceTarget"] {
        assert_eq!(
            decode(&without(event(), &["sender", part])),
            missing(&format!("sender.{part}"))
        );
    }
}

#[test]
fn missing_receiver_parts_name_the_nested_path() {
    for part in ["serviceName", "serviceVersion", "serviceTarget"] {
        assert_eq!(
            decode(&without(command(), &["receiver", part])),
            missing(&format!("receiver.{part}"))
        );
    }
}

#[test]
fn null_required_field_counts_as_missing() {
    assert_eq!(decode(&with(event(), "id", Value::Null)), missing("id"));
    assert_eq!(
        decode(&with(event(), "sender", Value::Null)),
        missing("sender")
    );
}

#[test]
fn string_timestamp_is_the_wrong_type() {
    let r = decode(&with(event(), "timestamp", json!("1716192000000")));
    assert_eq!(wrong_type_field(r), wrong_type("timestamp"));
}

#[test]
fn negative_timestamp_is_the_wrong_type() {
    let r = decode(&with(event(), "timestamp", json!(-1)));
    assert_eq!(wrong_type_field(r), wrong_type("timestamp"));
}

#[test]
fn fractional_timestamp_is_the_wrong_type() {
    let r = decode(&with(event(), "timestamp", json!(1.5)));
    assert_eq!(wrong_type_field(r), wrong_type("timestamp"));
}

#[test]
fn numeric_id_is_the_wrong_type() {
    let r = decode(&with(event(), "id", json!(42)));
    assert_eq!(wrong_type_field(r), wrong_type("id"));
}

#[test]
fn string_sender_is_the_wrong_type() {
    let r = decode(&with(event(), "sender", json!("orders@1")));
    assert_eq!(wrong_type_field(r), wrong_type("sender"));
}

#[test]
fn string_receiver_is_the_wrong_type() {
    let r = decode(&with(command(), "receiver", json!("billing@2/charge")));
    assert_eq!(wrong_type_field(r), wrong_type("receiver"));
}

#[test]
fn numeric_sender_instance_id_names_the_nested_path() {
    let mut doc = event();
    doc["sender"]["instanceId"] = json!(7);
    assert_eq!(
        wrong_type_field(decode(&doc)),
        wrong_type("sender.instanceId")
    );
}

#[test]
fn string_is_handled_error_is_the_wrong_type() {
    let r = decode(&with(event(), "isHandledError", json!("true")));
    assert_eq!(wrong_type_field(r), wrong_type("isHandledError"));
}

#[test]
fn non_string_optional_fields_are_the_wrong_type() {
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
        let r = decode(&with(event(), field, json!({ "not": "a string" })));
        assert_eq!(wrong_type_field(r), wrong_type(field), "{field}");
    }
}

#[test]
fn numeric_message_type_is_the_wrong_type() {
    let r = decode(&with(event(), "messageType", json!(1)));
    assert_eq!(wrong_type_field(r), wrong_type("messageType"));
}

#[test]
fn command_without_correlation_id_is_a_missing_field() {
    assert_eq!(
        decode(&without(command(), &["correlationId"])),
        missing("correlationId")
    );
}

#[test]
fn command_without_receiver_is_a_missing_field() {
    assert_eq!(
        decode(&without(command(), &["receiver"])),
        missing("receiver")
    );
}

#[test]
fn command_without_payload_is_a_missing_field() {
    assert_eq!(
        decode(&without(command(), &["payload"])),
        missing("payload")
    );
}

#[test]
fn command_with_a_non_object_payload_is_the_wrong_type() {
    let r = decode(&with(command(), "payload", json!([1, 2])));
    assert_eq!(wrong_type_field(r), wrong_type("payload"));
}

#[test]
fn responses_without_correlation_id_are_a_missing_field() {
    for t in ["commandSuccessResponse", "commandErrorResponse"] {
        let doc = without(with(command(), "messageType", json!(t)), &["correlationId"]);
        assert_eq!(decode(&doc), missing("correlationId"), "{t}");
    }
}

#[test]
fn stream_frame_without_correlation_id_is_a_missing_field() {
    let doc = without(
        with(command(), "messageType", json!("stream")),
        &["correlationId"],
    );
    assert_eq!(decode(&doc), missing("correlationId"));
}

#[test]
fn custom_message_without_event_name_is_a_missing_field() {
    assert_eq!(
        decode(&without(event(), &["eventName"])),
        missing("eventName")
    );
}

#[test]
fn input_over_the_limit_is_oversize_with_size_and_limit() {
    let bytes = serde_json::to_vec(&event()).expect("json");
    let limit = bytes.len() - 1;
    assert_eq!(
        Envelope::decode_with_limit(&bytes, limit),
        Err(DecodeError::Oversize {
            size: bytes.len(),
            limit
        })
    );
}

#[test]
fn input_exactly_at_the_limit_decodes() {
    let bytes = serde_json::to_vec(&event()).expect("json");
    assert!(Envelope::decode_with_limit(&bytes, bytes.len()).is_ok());
}

#[test]
fn decode_rejects_input_over_one_mebibyte_by_default() {
    let mut doc = event();
    doc["payload"] = json!("x".repeat(DEFAULT_MAX_ENVELOPE_BYTES));
    let bytes = serde_json::to_vec(&doc).expect("json");
    assert_eq!(
        Envelope::decode(&bytes),
        Err(DecodeError::Oversize {
            size: bytes.len(),
            limit: DEFAULT_MAX_ENVELOPE_BYTES
        })
    );
}

#[test]
fn oversize_is_checked_before_parsing() {
    // Not even JSON, but too big: the size is what is reported.
    let junk = vec![b'{'; 65];
    assert_eq!(
        Envelope::decode_with_limit(&junk, 64),
        Err(DecodeError::Oversize {
            size: 65,
            limit: 64
        })
    );
}

#[test]
fn every_truncation_of_a_golden_document_is_a_typed_error() {
    for doc in GOLDEN {
        let bytes = doc.trim_end().as_bytes();
        for end in 0..bytes.len() {
            let r = Envelope::decode(&bytes[..end]);
            assert!(r.is_err(), "prefix of {end} bytes decoded: {r:?}");
        }
    }
}

#[test]
fn deeply_nested_payload_is_a_typed_error_not_a_stack_overflow() {
    let depth = 100_000;
    let mut doc = String::from(
        r#"{"id":"m","timestamp":1,"messageType":"infoServiceReady","sender":{"serviceName":"s","serviceVersion":"1","serviceTarget":"","instanceId":"i"},"payload":"#,
    );
    doc.push_str(&"[".repeat(depth));
    doc.push_str(&"]".repeat(depth));
    doc.push('}');
    assert!(matches!(
        Envelope::decode(doc.as_bytes()),
        Err(DecodeError::NotJson(_))
    ));
}

#[test]
fn every_single_field_deletion_from_a_command_is_ok_or_a_typed_error() {
    // Pins "never a panic" over a systematic set of broken documents.
    let doc = command();
    for key in doc.as_object().expect("object").keys() {
        let _ = decode(&without(doc.clone(), &[key]));
    }
    for key in [
        "serviceName",
        "serviceVersion",
        "serviceTarget",
        "instanceId",
    ] {
        let _ = decode(&without(doc.clone(), &["sender", key]));
        let _ = decode(&without(doc.clone(), &["receiver", key]));
    }
}

#[test]
fn decode_error_messages_name_the_field() {
    let err = decode(&without(event(), &["sender", "instanceId"])).expect_err("error");
    assert!(err.to_string().contains("sender.instanceId"), "{err}");
    let err = decode(&with(event(), "timestamp", json!("x"))).expect_err("error");
    assert!(err.to_string().contains("timestamp"), "{err}");
}
