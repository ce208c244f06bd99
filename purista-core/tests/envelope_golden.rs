//! Golden envelopes: JSON documents written by hand in PURISTA's wire format (DESIGN §3.1), one
//! per message family. Each must decode to the expected values, re-encode to the same JSON and
//! survive encode → decode unchanged. These pin the format a TypeScript PURISTA service reads.

use purista_core::stream::{FrameType, frame_sequence, frame_type};
use purista_core::{Address, DecodeError, Envelope, ErrorPayload, MessageType, SenderAddress};
use serde_json::{Value, json};

const COMMAND: &str = include_str!("golden/command.json");
const SUCCESS: &str = include_str!("golden/command_success_response.json");
const ERROR: &str = include_str!("golden/command_error_response.json");
const CUSTOM: &str = include_str!("golden/custom_message.json");
const FUNCTION_ADDED: &str = include_str!("golden/info_service_function_added.json");
const STREAM_FRAME: &str = include_str!("golden/stream_frame.json");

const ALL_FIXTURES: [(&str, &str); 6] = [
    ("command", COMMAND),
    ("commandSuccessResponse", SUCCESS),
    ("commandErrorResponse", ERROR),
    ("customMessage", CUSTOM),
    ("infoServiceFunctionAdded", FUNCTION_ADDED),
    ("stream", STREAM_FRAME),
];

const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CORRELATION: &str = "b7ad6b7169203331b7ad6b7169203331";
const ORDERS_INSTANCE: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90";
const BILLING_INSTANCE: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f0";

fn decode(doc: &str) -> Envelope {
    Envelope::decode(doc.as_bytes()).unwrap_or_else(|e| panic!("fixture must decode: {e}"))
}

fn sender(name: &str, version: &str, target: &str, instance: &str) -> SenderAddress {
    SenderAddress {
        service_name: name.into(),
        service_version: version.into(),
        service_target: target.into(),
        instance_id: instance.into(),
    }
}

fn orders_sender() -> SenderAddress {
    sender("orders", "1", "placeOrder", ORDERS_INSTANCE)
}

fn billing_sender() -> SenderAddress {
    sender("billing", "2", "charge", BILLING_INSTANCE)
}

/// An envelope with every optional field unset; tests fill in what their fixture has.
fn base(id: &str, timestamp: u64, message_type: MessageType, from: SenderAddress) -> Envelope {
    let mut e = Envelope::new(message_type, from);
    e.id = id.into();
    e.timestamp = timestamp;
    e
}

fn as_json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).expect("encode writes JSON")
}

fn fixture_json(doc: &str) -> Value {
    serde_json::from_str(doc).expect("fixture is JSON")
}

#[test]
fn command_fixture_decodes_to_expected_values() {
    let mut expected = base(
        "4f7c2a9e1b8d4e6fa3c5d7e9f1a2b3c4",
        1_716_192_000_000,
        MessageType::Command,
        orders_sender(),
    );
    expected.trace_id = Some(TRACE.into());
    expected.correlation_id = Some(CORRELATION.into());
    expected.principal_id = Some("user-1".into());
    expected.tenant_id = Some("acme".into());
    expected.otp = Some(format!(
        r#"{{"traceparent":"00-{TRACE}-b7ad6b7169203331-01"}}"#
    ));
    expected.receiver = Some(Address::new("billing", "2", "charge"));
    expected.payload = json!({
        "payload": { "orderId": "o-1", "amount": 42.5, "items": ["A-1", "B-2"] },
        "parameter": { "currency": "EUR", "dryRun": false }
    });

    assert_eq!(decode(COMMAND), expected);
}

#[test]
fn command_body_has_payload_and_parameter_parts() {
    let cmd = decode(COMMAND);
    assert_eq!(cmd.payload["payload"]["orderId"], "o-1");
    assert_eq!(cmd.payload["parameter"]["currency"], "EUR");
}

#[test]
fn command_receiver_without_instance_id_decodes_as_none() {
    let cmd = decode(COMMAND);
    assert_eq!(cmd.receiver.expect("receiver").instance_id, None);
}

#[test]
fn success_response_fixture_decodes_to_expected_values() {
    let mut expected = base(
        "9e8d7c6b5a4f4e3d2c1b0a9f8e7d6c5b",
        1_716_192_000_042,
        MessageType::CommandSuccessResponse,
        billing_sender(),
    );
    expected.trace_id = Some(TRACE.into());
    expected.correlation_id = Some(CORRELATION.into());
    expected.principal_id = Some("user-1".into());
    expected.tenant_id = Some("acme".into());
    expected.event_name = Some("paymentCaptured".into());
    expected.receiver =
        Some(Address::new("orders", "1", "placeOrder").with_instance(ORDERS_INSTANCE));
    expected.payload = json!({ "chargeId": "c-9", "captured": true, "amount": 42.5 });

    assert_eq!(decode(SUCCESS), expected);
}

#[test]
fn error_response_fixture_decodes_to_expected_values() {
    let mut expected = base(
        "5a4b3c2d1e0f4a9b8c7d6e5f4a3b2c1d",
        1_716_192_000_043,
        MessageType::CommandErrorResponse,
        billing_sender(),
    );
    expected.trace_id = Some(TRACE.into());
    expected.correlation_id = Some(CORRELATION.into());
    expected.principal_id = Some("user-1".into());
    expected.tenant_id = Some("acme".into());
    expected.receiver =
        Some(Address::new("orders", "1", "placeOrder").with_instance(ORDERS_INSTANCE));
    expected.payload = json!({
        "status": 409,
        "message": "order already paid",
        "data": { "orderId": "o-1" },
        "traceId": TRACE
    });
    expected.is_handled_error = Some(true);

    assert_eq!(decode(ERROR), expected);
}

#[test]
fn error_response_payload_reads_as_error_payload() {
    let err: ErrorPayload = serde_json::from_value(decode(ERROR).payload).expect("error payload");
    assert_eq!(
        err,
        ErrorPayload {
            status: purista_core::StatusCode::CONFLICT,
            message: "order already paid".into(),
            data: Some(json!({ "orderId": "o-1" })),
            trace_id: Some(TRACE.into()),
        }
    );
}

#[test]
fn custom_message_fixture_decodes_to_expected_values() {
    let mut expected = base(
        "c3d4e5f60718293a4b5c6d7e8f90a1b2",
        1_716_192_000_100,
        MessageType::CustomMessage,
        orders_sender(),
    );
    expected.trace_id = Some(TRACE.into());
    expected.principal_id = Some("user-1".into());
    expected.tenant_id = Some("acme".into());
    expected.event_name = Some("orderPlaced".into());
    expected.payload = json!({ "orderId": "o-1", "total": 42.5, "lines": 2 });

    assert_eq!(decode(CUSTOM), expected);
}

#[test]
fn function_added_fixture_decodes_to_expected_values() {
    let mut expected = base(
        "e5f60718293a4b5c6d7e8f90a1b2c3d4",
        1_716_191_999_000,
        MessageType::InfoServiceFunctionAdded,
        orders_sender(),
    );
    expected.trace_id = Some("1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f".into());
    expected.payload = json!({
        "expose": {
            "contentTypeRequest": "application/json",
            "contentEncodingRequest": "utf-8",
            "contentTypeResponse": "application/json",
            "contentEncodingResponse": "utf-8",
            "inputPayload": {
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "type": "object",
                "properties": { "orderId": { "type": "string" } },
                "required": ["orderId"]
            },
            "deprecated": false
        }
    });

    let decoded = decode(FUNCTION_ADDED);
    assert_eq!(decoded, expected);
    assert!(decoded.message_type.is_info());
}

#[test]
fn stream_frame_fixture_decodes_to_expected_values() {
    let mut expected = base(
        "f60718293a4b5c6d7e8f90a1b2c3d4e5",
        1_716_192_000_200,
        MessageType::Stream,
        sender("reports", "1", "exportOrders", BILLING_INSTANCE),
    );
    expected.trace_id = Some(TRACE.into());
    expected.correlation_id = Some("d4e5f60718293a4b5c6d7e8f90a1b2c3".into());
    expected.receiver = Some(Address::new("orders", "1", "").with_instance(ORDERS_INSTANCE));
    expected.payload =
        json!({ "frameType": "chunk", "sequence": 1, "chunk": { "line": 1, "orderId": "o-1" } });

    let decoded = decode(STREAM_FRAME);
    assert_eq!(decoded, expected);
    assert_eq!(frame_type(&decoded), Some(FrameType::Chunk));
    assert_eq!(frame_sequence(&decoded), Some(1));
}

#[test]
fn every_fixture_reencodes_to_the_same_json() {
    for (family, doc) in ALL_FIXTURES {
        let encoded = decode(doc).encode();
        assert_eq!(
            as_json(&encoded),
            fixture_json(doc),
            "{family}: re-encoded JSON differs from the golden document"
        );
    }
}

#[test]
fn every_fixture_is_stable_under_encode_then_decode() {
    for (family, doc) in ALL_FIXTURES {
        let first = decode(doc);
        let bytes = first.encode();
        let second = Envelope::decode(&bytes).expect("re-decode");
        assert_eq!(
            second, first,
            "{family}: encode → decode changed the envelope"
        );
        assert_eq!(second.encode(), bytes, "{family}: second encode differs");
    }
}

#[test]
fn every_fixture_has_its_message_type() {
    for (family, doc) in ALL_FIXTURES {
        assert_eq!(decode(doc).message_type.as_str(), family);
    }
}

#[test]
fn encode_writes_camel_case_field_names() {
    let v = as_json(&decode(ERROR).encode());
    let obj = v.as_object().expect("object");
    for key in [
        "id",
        "timestamp",
        "messageType",
        "contentType",
        "contentEncoding",
        "traceId",
        "correlationId",
        "principalId",
        "tenantId",
        "sender",
        "receiver",
        "payload",
        "isHandledError",
    ] {
        assert!(obj.contains_key(key), "missing `{key}` in {v}");
    }
    for key in [
        "serviceName",
        "serviceVersion",
        "serviceTarget",
        "instanceId",
    ] {
        assert!(v["sender"].get(key).is_some(), "missing sender.{key}");
    }
}

#[test]
fn encode_omits_unset_optional_fields() {
    let v = as_json(&decode(FUNCTION_ADDED).encode());
    let obj = v.as_object().expect("object");
    for key in [
        "correlationId",
        "principalId",
        "tenantId",
        "eventName",
        "otp",
        "receiver",
        "isHandledError",
    ] {
        assert!(!obj.contains_key(key), "unset `{key}` was written: {v}");
    }
}

#[test]
fn unknown_top_level_fields_survive_a_round_trip() {
    let mut doc = fixture_json(CUSTOM);
    doc["x-purista-future"] = json!({ "nested": [1, 2, { "deep": true }] });
    doc["schemaVersion"] = json!(3);
    doc["note"] = Value::Null;
    let bytes = serde_json::to_vec(&doc).expect("json");

    let decoded = Envelope::decode(&bytes).expect("decode");
    assert_eq!(
        decoded.extra.get("x-purista-future"),
        Some(&json!({ "nested": [1, 2, { "deep": true }] }))
    );
    assert_eq!(decoded.extra.get("schemaVersion"), Some(&json!(3)));
    assert_eq!(decoded.extra.get("note"), Some(&Value::Null));
    assert_eq!(as_json(&decoded.encode()), doc);
}

#[test]
fn missing_content_type_and_encoding_default_to_json_and_utf8() {
    let mut doc = fixture_json(CUSTOM);
    let obj = doc.as_object_mut().expect("object");
    obj.remove("contentType");
    obj.remove("contentEncoding");
    let decoded = Envelope::decode(&serde_json::to_vec(&doc).expect("json")).expect("decode");
    assert_eq!(decoded.content_type, "application/json");
    assert_eq!(decoded.content_encoding, "utf-8");
}

#[test]
fn explicit_content_type_and_encoding_are_kept() {
    let mut doc = fixture_json(CUSTOM);
    doc["contentType"] = json!("text/plain");
    doc["contentEncoding"] = json!("base64");
    let decoded = Envelope::decode(&serde_json::to_vec(&doc).expect("json")).expect("decode");
    assert_eq!(decoded.content_type, "text/plain");
    assert_eq!(decoded.content_encoding, "base64");
    assert_eq!(as_json(&decoded.encode()), doc);
}

// Regression: null meant "absent" for every optional field except these two, which failed with
// `DecodeError::Invalid` (fixed in 7127a1b).
#[test]
fn null_content_type_and_encoding_decode_as_defaults() {
    let mut doc = fixture_json(CUSTOM);
    doc["contentType"] = Value::Null;
    doc["contentEncoding"] = Value::Null;
    let decoded = Envelope::decode(&serde_json::to_vec(&doc).expect("json"))
        .expect("null contentType/contentEncoding must decode as the defaults");
    assert_eq!(decoded.content_type, "application/json");
    assert_eq!(decoded.content_encoding, "utf-8");
}

// Regression: without serde_json's `float_roundtrip` feature its fast float parser is off by one
// ULP for some inputs. These are shortest representations of doubles, exactly as JavaScript's
// JSON.stringify writes them; they used to decode as a neighbouring double, so a TypeScript
// service's numbers changed in transit (fixed in 7127a1b by enabling the feature workspace-wide).
#[test]
fn payload_numbers_decode_to_exactly_the_double_that_was_written() {
    for (text, exact) in [
        ("1.4314079466631915", 1.431_407_946_663_191_5_f64),
        ("8.507884153453773e-8", 8.507_884_153_453_773e-8),
        ("5.4201864552738075e20", 5.420_186_455_273_807_5e20),
        ("5.263372547936668e-9", 5.263_372_547_936_668e-9),
    ] {
        let doc = format!(
            r#"{{"id":"m","timestamp":1,"messageType":"customMessage","eventName":"e","sender":{{"serviceName":"s","serviceVersion":"1","serviceTarget":"t","instanceId":"i"}},"payload":{{"amount":{text}}}}}"#
        );
        let decoded = Envelope::decode(doc.as_bytes()).expect("decode");
        let got = decoded.payload["amount"].as_f64().expect("number");
        assert_eq!(got.to_bits(), exact.to_bits(), "{text} decoded as {got}");
        assert_eq!(Envelope::decode(&decoded.encode()), Ok(decoded), "{text}");
    }
}

// Regression: the `envelope_decode` fuzzer's crash, minimized. The unknown field `o` holds an
// integer beyond u64, which serde_json reads as a float; without `float_roundtrip` it read as a
// neighbouring double and changed again on encode → decode, so an unknown field did not pass
// through untouched (fixed in 7127a1b).
#[test]
fn fuzz_regression_large_integer_in_an_unknown_field_round_trips() {
    let input = br#"{"id":"","timestamp":3,
"eventName": "n","o": 377777777773284002000, "messageType":"customMessage","sender":{"serviceName": "s","serviceVersion": "1","serviceTarget": "r", "instanceId":""}}"#;
    let first = Envelope::decode(input).expect("decode");
    assert_eq!(
        first.extra["o"].as_f64().map(f64::to_bits),
        Some(377_777_777_773_284_002_000_f64.to_bits())
    );
    let second = Envelope::decode(&first.encode()).expect("re-decode");
    assert_eq!(second, first, "encode → decode changed the envelope");
}

#[test]
fn null_optional_fields_decode_as_absent() {
    let mut doc = fixture_json(CUSTOM);
    for key in ["traceId", "principalId", "tenantId", "otp", "receiver"] {
        doc[key] = Value::Null;
    }
    let decoded = Envelope::decode(&serde_json::to_vec(&doc).expect("json")).expect("decode");
    assert_eq!(decoded.trace_id, None);
    assert_eq!(decoded.principal_id, None);
    assert_eq!(decoded.tenant_id, None);
    assert_eq!(decoded.otp, None);
    assert_eq!(decoded.receiver, None);
}

const WIRE_TYPES: [(&str, MessageType); 13] = [
    ("command", MessageType::Command),
    (
        "commandSuccessResponse",
        MessageType::CommandSuccessResponse,
    ),
    ("commandErrorResponse", MessageType::CommandErrorResponse),
    ("customMessage", MessageType::CustomMessage),
    ("infoServiceInit", MessageType::InfoServiceInit),
    ("infoServiceReady", MessageType::InfoServiceReady),
    ("infoServiceNotReady", MessageType::InfoServiceNotReady),
    (
        "infoServiceFunctionAdded",
        MessageType::InfoServiceFunctionAdded,
    ),
    ("infoServiceDrain", MessageType::InfoServiceDrain),
    ("infoServiceShutdown", MessageType::InfoServiceShutdown),
    ("infoInvokeTimeout", MessageType::InfoInvokeTimeout),
    ("infoSubscriptionError", MessageType::InfoSubscriptionError),
    ("stream", MessageType::Stream),
];

#[test]
fn every_message_type_wire_string_parses() {
    for (wire, t) in WIRE_TYPES {
        assert_eq!(MessageType::parse(wire), Some(t), "{wire}");
        assert_eq!(t.as_str(), wire);
        assert_eq!(serde_json::to_value(t).expect("json"), json!(wire));
    }
    assert_eq!(MessageType::ALL.len(), WIRE_TYPES.len());
}

/// The smallest valid document of a type: the fields every family needs plus the per-family ones.
fn minimal(wire: &str) -> Value {
    json!({
        "id": "m-1",
        "timestamp": 1,
        "messageType": wire,
        "correlationId": "c-1",
        "eventName": "e",
        "sender": { "serviceName": "s", "serviceVersion": "1", "serviceTarget": "t", "instanceId": "i" },
        "receiver": { "serviceName": "r", "serviceVersion": "1", "serviceTarget": "t" },
        "payload": { "payload": null, "parameter": null }
    })
}

#[test]
fn every_message_type_decodes_from_its_wire_string() {
    for (wire, t) in WIRE_TYPES {
        let bytes = serde_json::to_vec(&minimal(wire)).expect("json");
        let decoded = Envelope::decode(&bytes).unwrap_or_else(|e| panic!("{wire}: {e}"));
        assert_eq!(decoded.message_type, t);
    }
}

#[test]
fn unknown_message_type_is_a_typed_error() {
    for wire in ["commandResponse", "Command", "CUSTOMMESSAGE", "", "info"] {
        let bytes = serde_json::to_vec(&minimal(wire)).expect("json");
        assert_eq!(
            Envelope::decode(&bytes),
            Err(DecodeError::UnknownMessageType(wire.to_string())),
            "{wire}"
        );
    }
}

#[test]
fn constructed_command_round_trips_through_the_wire() {
    let mut cmd = Envelope::command(
        orders_sender(),
        Address::new("billing", "2", "charge"),
        json!({ "amount": 3 }),
        json!({ "currency": "EUR" }),
    );
    cmd.principal_id = Some("user-1".into());
    assert_eq!(Envelope::decode(&cmd.encode()), Ok(cmd));
}

#[test]
fn constructed_responses_round_trip_through_the_wire() {
    let cmd = decode(COMMAND);
    let ok = cmd.success_response(json!({ "ok": true }), Some("charged".into()));
    let err = cmd.error_response(
        &ErrorPayload {
            status: purista_core::StatusCode::CONFLICT,
            message: "no".into(),
            data: None,
            trace_id: cmd.trace_id.clone(),
        },
        true,
    );
    assert_eq!(Envelope::decode(&ok.encode()), Ok(ok));
    assert_eq!(Envelope::decode(&err.encode()), Ok(err));
}

// Regression (issue 14, item 2): a PURISTA command that returns `null` answers with
// `payload: null`; re-encoding skipped the null field, so a TypeScript caller resolved
// `undefined` instead of `null`.
#[test]
fn explicit_null_payload_survives_decode_and_re_encode() {
    let mut doc = fixture_json(SUCCESS);
    doc["payload"] = Value::Null;
    let decoded = Envelope::decode(&serde_json::to_vec(&doc).expect("json")).expect("decode");
    assert_eq!(decoded.payload, Value::Null);
    assert!(decoded.payload_is_explicit_null());
    assert_eq!(as_json(&decoded.encode()), doc);
    assert_eq!(Envelope::decode(&decoded.encode()), Ok(decoded));
}

#[test]
fn absent_payload_stays_absent_after_re_encode() {
    let mut doc = fixture_json(FUNCTION_ADDED);
    doc.as_object_mut().expect("object").remove("payload");
    let decoded = Envelope::decode(&serde_json::to_vec(&doc).expect("json")).expect("decode");
    assert!(!decoded.payload_is_explicit_null());
    let encoded = as_json(&decoded.encode());
    assert!(encoded.get("payload").is_none(), "{encoded}");
    assert_eq!(encoded, doc);
}

#[test]
fn success_response_to_a_null_result_writes_payload_null() {
    let command = decode(COMMAND);
    let response = command.success_response(Value::Null, None);
    let encoded = as_json(&response.encode());
    assert_eq!(encoded.get("payload"), Some(&Value::Null), "{encoded}");
}

#[test]
fn explicit_null_is_forgotten_once_a_value_replaces_it() {
    let command = decode(COMMAND);
    let mut response = command.success_response(Value::Null, None);
    response.payload = json!({ "ok": true });
    assert_eq!(
        as_json(&response.encode())["payload"],
        json!({ "ok": true })
    );
}

#[test]
fn explicit_null_payload_survives_beside_unknown_fields() {
    let mut doc = fixture_json(SUCCESS);
    doc["payload"] = Value::Null;
    doc["instanceId"] = json!("i-1");
    let decoded = Envelope::decode(&serde_json::to_vec(&doc).expect("json")).expect("decode");
    assert!(decoded.payload_is_explicit_null());
    assert_eq!(as_json(&decoded.encode()), doc);
}
