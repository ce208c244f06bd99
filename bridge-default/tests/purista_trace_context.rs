//! Trace context between PURISTA TypeScript and purista-rs (issue 13), against a capture from
//! real `@purista/core` 3.2.4 (`interop/trace-context/`, its README says how it was made): the
//! `otp` we write is byte for byte what PURISTA continued, what PURISTA writes we read, and a
//! command PURISTA sent is handled in a span that is a child of PURISTA's.

mod common;

use std::sync::Arc;
use std::time::Duration;

use purista_bridge_default::MemoryBroker;
use purista_core::observe::{read_otp, write_otp};
use purista_core::{CommandDef, Context, Envelope, EventBridge, Service};
use serde_json::{Value, json};
use tokio::time::Instant;

use common::{eventually, recorded_spans};

const CAPTURE: &str = include_str!("../../interop/trace-context/purista-3.2.4.json");

fn capture() -> Value {
    serde_json::from_str(CAPTURE).expect("the capture is JSON")
}

fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what} is a string in the capture"))
}

/// `(trace id, span id)` of the `traceparent` in an `otp` string.
fn ids_of(otp: &str) -> (String, String) {
    let cx = read_otp(otp)
        .expect("a carrier we can read")
        .expect("with a context");
    (cx.trace_id_hex(), cx.span_id_hex())
}

#[test]
fn the_otp_we_write_is_byte_for_byte_what_purista_continued() {
    let capture = capture();
    for section in ["puristaContinuesOurs", "puristaKeepsTracestate"] {
        let s = &capture[section];
        let ours = str_of(&s["ourOtp"], "ourOtp");
        let cx = read_otp(ours).unwrap().unwrap();
        assert_eq!(
            write_otp(&cx),
            ours,
            "{section}: we write exactly the carrier PURISTA was given"
        );
        // The capture shows PURISTA continued it: its invoke span is a child of ours.
        let (trace, span) = ids_of(ours);
        let invoke = s["spans"]
            .as_array()
            .unwrap()
            .iter()
            .find(|sp| sp["name"] == "purista.command.invoke")
            .expect("PURISTA's invoke span");
        assert_eq!(invoke["traceId"], json!(trace), "{section}");
        assert_eq!(invoke["parentSpanId"], json!(span), "{section}");
        // And what PURISTA sent on carries our trace (and our tracestate, unchanged).
        for m in s["messages"].as_array().unwrap() {
            let otp = str_of(&m["otp"], "otp");
            assert_eq!(ids_of(otp).0, trace, "{section}: {}", m["messageType"]);
            assert_eq!(
                read_otp(otp).unwrap().unwrap().trace_state(),
                cx.trace_state(),
                "{section}"
            );
        }
    }
}

#[test]
fn what_purista_writes_we_read_and_write_back_identically() {
    let capture = capture();
    for section in [
        "puristaStarts",
        "puristaContinuesOurs",
        "puristaKeepsTracestate",
    ] {
        let s = &capture[section];
        let span_ids: Vec<&str> = s["spans"]
            .as_array()
            .unwrap()
            .iter()
            .map(|sp| str_of(&sp["spanId"], "spanId"))
            .collect();
        for m in s["messages"].as_array().unwrap() {
            let otp = str_of(&m["otp"], "otp");
            let cx = read_otp(otp)
                .unwrap()
                .expect("PURISTA's otp carries a context");
            assert_eq!(write_otp(&cx), otp, "{section}: {}", m["messageType"]);
            assert!(
                span_ids.contains(&cx.span_id_hex().as_str()),
                "{section}: the otp of {} names a span PURISTA finished",
                m["messageType"]
            );
        }
    }
}

#[tokio::test]
async fn a_command_purista_sent_is_handled_in_a_child_of_puristas_span() {
    let recorder = recorded_spans();
    let capture = capture();
    let sent = capture["puristaStarts"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["messageType"] == "command")
        .expect("the command PURISTA wrote")
        .clone();
    let command = Envelope::from_value(sent).expect("PURISTA's command is an envelope");
    let (purista_trace, purista_span) = ids_of(command.otp.as_deref().unwrap());
    let purista_trace_id = command.trace_id.clone();

    // The service PURISTA invoked, in Rust.
    let broker = MemoryBroker::new();
    let ping = Service::builder("Ping", "1")
        .command(CommandDef::new(
            "ping",
            |_ctx: Context, p: Value| async move { Ok(json!({ "pong": p["ping"] })) },
        ))
        .build()
        .start(Arc::new(broker.bridge()))
        .await
        .expect("Ping starts");
    let caller = broker.bridge();
    caller.start().await.unwrap();
    let response = caller
        .invoke(command, Duration::from_secs(5))
        .await
        .expect("ping answers");
    assert_eq!(response.payload, json!({ "pong": "a" }));

    eventually("our command span in PURISTA's trace", || {
        !recorder.trace(&purista_trace).is_empty()
    })
    .await;
    let spans = recorder.trace(&purista_trace);
    let ours = spans
        .iter()
        .find(|s| s.name == "purista.command")
        .expect("our command span");
    assert_eq!(
        ours.parent_span_id(),
        Some(purista_span.as_str()),
        "our handler's span is a child of the PURISTA span that sent the command"
    );
    // The response is in the carrier format PURISTA reads, naming our span, and keeps
    // PURISTA's own traceId.
    let otp = response.otp.as_deref().expect("the response carries otp");
    assert_eq!(
        otp,
        format!(
            r#"{{"traceparent":"00-{purista_trace}-{}-01"}}"#,
            ours.span_id().unwrap()
        )
    );
    assert_eq!(response.trace_id, purista_trace_id);

    let deadline = Instant::now() + Duration::from_secs(5);
    ping.shutdown(deadline).await;
    caller.shutdown(deadline).await;
}
