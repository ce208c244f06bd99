//! Bad input on every queue kind of the RabbitMQ bridge.
//!
//! Malformed JSON, wrong field types, an unknown `messageType` and an oversized body (plus, on
//! the command and reply queues, valid envelopes that do not belong there) are published raw,
//! through the default exchange, straight into each kind of queue. Wherever the bridge consumes,
//! each one is dead-lettered with its reason and raw bytes (a subscription with a dead-letter
//! target) or dropped, counted, and logged at WARN naming the queue, and the consumer goes on
//! with the next valid message. A dead-letter queue is not consumed: garbage there is listed
//! raw by `inspect_dead_letters` and never hides or loses the other entries.

mod common;

use purista_core::SubscriptionOperator;
use std::sync::Arc;
use std::time::Duration;

use purista_bridge_amqp::AmqpBridge;
use purista_core::{
    Address, Envelope, EventBridge, Outcome, SenderAddress, SubscriptionFilter, SubscriptionSpec,
};
use serde_json::json;

use common::{Echo, Recorder, TestBroker, dead_letters, eventually, logs, spec};

common::runner::test_main! {
    common::BROKER: [
        bad_input_on_a_command_queue_is_dropped_with_a_warning_and_commands_still_run,
        bad_input_on_the_reply_queue_is_dropped_with_a_warning_and_invocations_still_complete,
        bad_input_on_a_shared_subscription_queue_is_dead_lettered_with_reason_and_raw_bytes,
        bad_input_on_a_shared_subscription_queue_without_dead_letter_target_is_dropped,
        bad_input_on_a_broadcast_subscription_queue_is_dropped,
        bad_input_on_a_durable_subscription_queue_is_dead_lettered,
        bad_input_in_a_retry_queue_returns_to_its_source_queue_and_is_dead_lettered_there,
        bad_input_in_a_dead_letter_queue_is_listed_raw_and_hides_no_entry,
    ],
}

/// The payload limit of every bridge in this file; the oversized body exceeds it.
const LIMIT: usize = 4 * 1024;

/// How long anything here may take to happen.
const WITHIN: Duration = Duration::from_secs(5);

/// One bad body and the text its warning (and dead-letter reason) must contain.
struct Bad {
    body: Vec<u8>,
    problem: String,
}

fn bad(body: impl Into<Vec<u8>>, problem: impl Into<String>) -> Bad {
    Bad {
        body: body.into(),
        problem: problem.into(),
    }
}

fn sender() -> SenderAddress {
    SenderAddress {
        service_name: "shop".into(),
        service_version: "1".into(),
        service_target: "sell".into(),
        instance_id: "rogue".into(),
    }
}

/// The four bodies no consumer can decode.
fn undecodable() -> Vec<Bad> {
    // Not JSON either: refused by its size alone proves the size is checked before parsing.
    let mut oversized = br#"{"padding":""#.to_vec();
    oversized.resize(5 * 1024, b'x');
    vec![
        bad(&b"{not an envelope"[..], "not JSON"),
        bad(
            json!({"id": "w-1", "timestamp": "yesterday", "messageType": "customMessage", "sender": 42})
                .to_string(),
            "field `timestamp` has the wrong type",
        ),
        bad(
            json!({"id": "u-1", "timestamp": 1, "messageType": "bogusType", "sender": sender()})
                .to_string(),
            "unknown messageType `bogusType`",
        ),
        bad(
            oversized,
            format!("message of 5120 bytes exceeds the limit of {LIMIT} bytes"),
        ),
    ]
}

fn event(n: u64) -> Envelope {
    Envelope::custom(sender(), "sold", json!({ "n": n }))
}

/// A valid envelope that is neither a command nor a response.
fn stray_event() -> Bad {
    bad(event(0).encode(), "customMessage")
}

async fn small_bridge(broker: &TestBroker) -> Arc<AmqpBridge> {
    broker.bridge_with(|c| c.max_payload_bytes = LIMIT).await
}

async fn feed(broker: &TestBroker, queue: &str, bad: &[Bad]) {
    let bodies: Vec<&[u8]> = bad.iter().map(|b| b.body.as_slice()).collect();
    broker.publish_into(queue, &bodies).await;
}

/// Every bad body was logged once, at WARN, with the queue and its problem; `verdict` is what
/// the warning says happened (`dropped`, `dead-lettered`).
async fn assert_warned(queue: &str, bad: &[Bad], verdict: &str) {
    for b in bad {
        let pick = |w: &logs::Line| {
            w.field("queue") == Some(queue) && w.mentions(&b.problem) && w.message.contains(verdict)
        };
        assert!(
            eventually(WITHIN, || !logs::warnings(pick).is_empty()).await,
            "no WARN `{verdict}` naming {queue} and `{}`; captured: {:#?}",
            b.problem,
            logs::warnings(|w| w.field("queue") == Some(queue))
        );
        assert_eq!(logs::warnings(pick).len(), 1, "warned once: {}", b.problem);
    }
}

async fn bad_input_on_a_command_queue_is_dropped_with_a_warning_and_commands_still_run() {
    logs::install();
    let broker = common::TestBroker::new("bad_command_queue");
    let bridge = small_bridge(&broker).await;
    let echo = Echo::new();
    let address = Address::new("orders", "1", "place");
    bridge
        .register_command(address.clone(), echo.clone())
        .await
        .unwrap();
    let queue = bridge.topology().command_queue(&address).unwrap();
    let mut bad = undecodable();
    bad.push(stray_event());

    feed(&broker, &queue, &bad).await;
    let n = bad.len() as u64;
    assert!(
        eventually(WITHIN, || bridge.poison_messages() == n).await,
        "poison counted: {} of {n}",
        bridge.poison_messages()
    );

    let command = Envelope::command(sender(), address, json!("after"), json!({}));
    let response = bridge.invoke(command, WITHIN).await.unwrap();
    assert_eq!(response.payload, "after");
    assert_eq!(echo.calls(), 1, "no garbage reached the handler");
    assert_eq!(
        bridge.poison_messages(),
        n,
        "each counted once: none requeued"
    );
    assert_eq!(broker.ready_messages(&queue).await, Some(0));
    assert_warned(&queue, &bad, "dropped").await;
    broker.finish().await;
}

async fn bad_input_on_the_reply_queue_is_dropped_with_a_warning_and_invocations_still_complete() {
    logs::install();
    let broker = common::TestBroker::new("bad_reply_queue");
    let bridge = small_bridge(&broker).await;
    let address = Address::new("orders", "1", "place");
    bridge
        .register_command(address.clone(), Echo::new())
        .await
        .unwrap();
    let queue = bridge.topology().reply_queue();
    let mut bad = undecodable();
    bad.push(stray_event());
    let mut answered = Envelope::command(sender(), address.clone(), json!(0), json!({}));
    let nobody_waits = format!("{}.nobody-waits", broker.prefix);
    answered.correlation_id = Some(nobody_waits.clone());
    let stray_response = answered.success_response(json!("late"), None).encode();

    feed(&broker, queue, &bad).await;
    broker.publish_into(queue, &[&stray_response]).await;
    let n = bad.len() as u64;
    assert!(
        eventually(WITHIN, || bridge.poison_messages() == n).await,
        "poison counted: {} of {n}",
        bridge.poison_messages()
    );
    assert!(eventually(WITHIN, || bridge.unmatched_responses() == 1).await);

    let command = Envelope::command(sender(), address, json!("after"), json!({}));
    let response = bridge.invoke(command, WITHIN).await.unwrap();
    assert_eq!(response.payload, "after");
    assert_eq!(bridge.poison_messages(), n);
    assert_eq!(bridge.unmatched_responses(), 1);
    let counters = EventBridge::counters(&*bridge);
    assert_eq!(
        (counters.poison_messages, counters.unmatched_responses),
        (n, 1)
    );
    // The reply queue is exclusive to the bridge's connection (no passive declare from here)
    // and consumed with auto-ack: what was counted is gone.
    assert_warned(queue, &bad, "dropped").await;
    let unmatched = logs::warnings(|w| w.field("correlation_id") == Some(&nobody_waits));
    assert_eq!(unmatched.len(), 1, "{unmatched:#?}");
    assert!(
        unmatched[0]
            .message
            .contains("unknown or expired invocation")
    );
    broker.finish().await;
}

/// Feeds the undecodable bodies into the queue of the subscription `shape` makes and checks
/// they are dead-lettered (with a target) or dropped, and that the consumer goes on.
async fn subscription_queue_case(broker: TestBroker, shape: impl FnOnce(&mut SubscriptionSpec)) {
    let bridge = small_bridge(&broker).await;
    let mut spec = spec("onSold", SubscriptionFilter::new().event_name("sold"));
    shape(&mut spec);
    let recorder = Recorder::acking(&spec);
    bridge
        .register_subscription(spec.clone(), recorder.clone())
        .await
        .unwrap();
    let queue = bridge.topology().subscription_queue(&spec).unwrap();
    let bad = undecodable();
    feed(&broker, &queue, &bad).await;
    assert_settled(&broker, &bridge, &spec, &recorder, &bad).await;
    broker.finish().await;
}

/// The bad bodies that reached `spec`'s queue are poison: counted, dead-lettered with reason
/// and raw bytes or dropped, warned about, never handed to the handler, never requeued; a valid
/// message published afterwards is delivered.
async fn assert_settled(
    broker: &TestBroker,
    bridge: &AmqpBridge,
    spec: &SubscriptionSpec,
    recorder: &Recorder,
    bad: &[Bad],
) {
    let queue = bridge.topology().subscription_queue(spec).unwrap();
    let n = bad.len() as u64;
    assert!(
        eventually(WITHIN, || bridge.poison_messages() == n).await,
        "poison counted: {} of {n}",
        bridge.poison_messages()
    );
    let before = recorder.count();
    bridge.emit(event(42)).await.unwrap();
    assert!(eventually(WITHIN, || recorder.count() == before + 1).await);
    assert_eq!(recorder.seen()[before].envelope.payload, json!({"n": 42}));
    assert_eq!(
        bridge.poison_messages(),
        n,
        "each counted once: none requeued"
    );

    let verdict = match &spec.policy.dead_letter_target {
        Some(target) => {
            let entries = dead_letters(bridge, target, bad.len()).await;
            assert_eq!(entries.len(), bad.len());
            for b in bad {
                let entry = entries
                    .iter()
                    .find(|e| e.raw.as_deref() == Some(b.body.as_slice()))
                    .unwrap_or_else(|| panic!("dead letter with the raw bytes of `{}`", b.problem));
                assert!(entry.envelope.is_none());
                assert!(
                    entry.note.reason.starts_with("undecodable message: ")
                        && entry.note.reason.contains(&b.problem),
                    "{}",
                    entry.note.reason
                );
                assert_eq!(entry.note.origin, spec.key);
            }
            "dead-lettered"
        }
        None => {
            let declared = bridge.declared_queues();
            assert!(
                declared.iter().all(|q| !q.ends_with(".dead-letter")),
                "{declared:?}"
            );
            "dropped"
        }
    };
    assert_warned(&queue, bad, verdict).await;
    assert_eq!(broker.ready_messages(&queue).await, Some(0));
    // Closing the channel returns whatever is still unacked: a queue that outlives the
    // instance proves that every bad message was settled.
    bridge.shutdown(tokio::time::Instant::now() + WITHIN).await;
    if spec.shared {
        assert_eq!(broker.ready_messages(&queue).await, Some(0), "all acked");
    }
}

async fn bad_input_on_a_shared_subscription_queue_is_dead_lettered_with_reason_and_raw_bytes() {
    logs::install();
    let broker = common::TestBroker::new("bad_shared_dead_letter");
    subscription_queue_case(broker, |s| {
        s.policy.dead_letter_target = Some("sold-poison".into());
    })
    .await;
}

async fn bad_input_on_a_shared_subscription_queue_without_dead_letter_target_is_dropped() {
    logs::install();
    let broker = common::TestBroker::new("bad_shared_drop");
    subscription_queue_case(broker, |_| {}).await;
}

async fn bad_input_on_a_broadcast_subscription_queue_is_dropped() {
    logs::install();
    let broker = common::TestBroker::new("bad_broadcast");
    subscription_queue_case(broker, |s| s.shared = false).await;
}

async fn bad_input_on_a_durable_subscription_queue_is_dead_lettered() {
    logs::install();
    let broker = common::TestBroker::new("bad_durable");
    subscription_queue_case(broker, |s| {
        s.durable = true;
        s.policy.dead_letter_target = Some("sold-poison".into());
    })
    .await;
}

async fn bad_input_in_a_retry_queue_returns_to_its_source_queue_and_is_dead_lettered_there() {
    logs::install();
    let broker = common::TestBroker::new("bad_retry_queue");
    let bridge = small_bridge(&broker).await;
    let mut spec = spec("onSold", SubscriptionFilter::new().event_name("sold"));
    spec.policy.max_attempts = 2;
    spec.policy.retry_delay_ms = 200;
    spec.policy.dead_letter_target = Some("sold-poison".into());
    // The first message is retried once, which declares the retry queue.
    let recorder = Recorder::deciding(&spec, |e, attempt| {
        if e.payload["n"] == 0 && attempt == 1 {
            Outcome::retry()
        } else {
            Outcome::Ack
        }
    });
    bridge
        .register_subscription(spec.clone(), recorder.clone())
        .await
        .unwrap();
    bridge.emit(event(0)).await.unwrap();
    assert!(eventually(WITHIN, || recorder.count() == 2).await);
    let source = bridge.topology().subscription_queue(&spec).unwrap();
    let retry = bridge
        .topology()
        .retry_queue(&source, Duration::from_millis(200));
    assert!(bridge.declared_queues().contains(&retry));

    let bad = undecodable();
    feed(&broker, &retry, &bad).await;
    assert_settled(&broker, &bridge, &spec, &recorder, &bad).await;
    assert_eq!(broker.ready_messages(&retry).await, Some(0));
    broker.finish().await;
}

async fn bad_input_in_a_dead_letter_queue_is_listed_raw_and_hides_no_entry() {
    logs::install();
    let broker = common::TestBroker::new("bad_dead_letter_queue");
    let bridge = small_bridge(&broker).await;
    let mut spec = spec("onSold", SubscriptionFilter::new().event_name("sold"));
    spec.policy.dead_letter_target = Some("sold-failed".into());
    let recorder = Recorder::deciding(&spec, |_, _| Outcome::dead_letter("refused"));
    bridge
        .register_subscription(spec.clone(), recorder.clone())
        .await
        .unwrap();
    let dead_letter_queue = bridge.topology().dead_letter_queue("sold-failed").unwrap();
    bridge.emit(event(1)).await.unwrap();
    assert_eq!(dead_letters(&bridge, "sold-failed", 1).await.len(), 1);

    let bad = undecodable();
    feed(&broker, &dead_letter_queue, &bad).await;
    bridge.emit(event(2)).await.unwrap();
    let total = bad.len() + 2;
    let entries = dead_letters(&bridge, "sold-failed", total).await;
    assert_eq!(entries.len(), total);
    let first = entries.first().unwrap();
    let last = entries.last().unwrap();
    for (entry, n) in [(first, 1), (last, 2)] {
        assert_eq!(entry.envelope.as_ref().unwrap().payload, json!({ "n": n }));
        assert_eq!(entry.note.reason, "refused");
        assert_eq!(entry.note.origin, spec.key);
    }
    for (entry, b) in entries[1..=bad.len()].iter().zip(&bad) {
        assert!(entry.envelope.is_none(), "{}", b.problem);
        assert_eq!(
            entry.raw.as_deref(),
            Some(b.body.as_slice()),
            "{}",
            b.problem
        );
        assert_eq!(entry.note.reason, "", "it carries no dead-letter headers");
    }

    // Peeking part of the queue, then all of it, returns everything in the same order.
    assert_eq!(
        bridge
            .inspect_dead_letters("sold-failed", 2)
            .await
            .unwrap()
            .len(),
        2
    );
    let again = bridge
        .inspect_dead_letters("sold-failed", total + 10)
        .await
        .unwrap();
    assert_eq!(again, entries);
    assert_eq!(
        broker.ready_messages(&dead_letter_queue).await,
        Some(total as u32)
    );
    assert_eq!(
        bridge.poison_messages(),
        0,
        "dead-letter queues are not consumed"
    );
    broker.finish().await;
}
