//! Oversized metadata: what RabbitMQ carries outside the body (the AMQP properties and
//! headers) must fit one frame (`frame_max`, 131 072 bytes by default). A value that does not
//! fit is refused at the caller with 400 before anything is sent, and a message that arrives
//! too large to be re-published with the bridge's own headers (retry, dead letter, response)
//! is dead-lettered without them or dropped with one warning: never a broker protocol error,
//! never a reconnect, never a loop.

mod common;

use std::sync::Arc;
use std::time::Duration;

use purista_bridge_amqp::AmqpBridge;
use purista_bridge_amqp::lapin::BasicProperties;
use purista_bridge_amqp::lapin::types::{AMQPValue, FieldTable, LongString};
use purista_core::{
    Address, BridgeError, Envelope, EventBridge, FailurePolicy, MessagePart, Outcome,
    SenderAddress, StatusCode, SubscriptionFilter,
};
use serde_json::json;

use common::{Echo, Recorder, dead_letters, eventually, logs, spec};

common::runner::test_main! {
    common::BROKER: [
        oversized_metadata_is_refused_at_the_caller_with_400_and_the_connection_stays,
        a_foreign_command_with_an_oversized_principal_is_answered_400_without_a_reconnect,
        near_limit_headers_through_retry_and_dead_letter_paths_never_cost_a_reconnect,
        the_declared_metadata_limit_is_enforced_to_the_byte,
    ],
}

/// A value far over any frame: 200 KB.
const HUGE: usize = 200 * 1024;

/// Header bytes a foreign publisher can still get past the broker (just under `frame_max`),
/// but that leave no room for the bridge's own headers (or RabbitMQ's `x-death`).
const NEAR_FRAME_MAX: usize = 130_900;

/// How long anything here may take.
const WITHIN: Duration = Duration::from_secs(10);

fn huge(c: char) -> String {
    c.to_string().repeat(HUGE)
}

fn seller() -> SenderAddress {
    SenderAddress {
        service_name: "shop".into(),
        service_version: "1".into(),
        service_target: "sell".into(),
        instance_id: String::new(),
    }
}

fn assert_too_large(what: &str, result: Result<impl std::fmt::Debug, BridgeError>) {
    match result {
        Err(BridgeError::TooLarge {
            part: MessagePart::Metadata,
            size,
            limit,
        }) => assert!(size > limit, "{what}: {size} > {limit}"),
        other => panic!("{what}: expected 400 TooLarge(metadata) at the caller, got {other:?}"),
    }
}

/// Runs a caller's call with a bound, so that a call the broker never answers fails the test
/// instead of hanging it.
async fn bounded<T>(
    fut: impl std::future::Future<Output = Result<T, BridgeError>>,
) -> Result<T, BridgeError> {
    tokio::time::timeout(WITHIN, fut)
        .await
        .unwrap_or_else(|_| Err(BridgeError::Unavailable("test bound: no answer".into())))
}

async fn oversized_metadata_is_refused_at_the_caller_with_400_and_the_connection_stays() {
    let broker = common::TestBroker::new("oversized_caller");
    let server = broker.bridge().await;
    let client = broker.bridge().await;
    let echo = Address::new("echo", "1", "say");
    server
        .register_command(echo.clone(), Echo::new())
        .await
        .unwrap();
    let trace_context = json!({ "traceparent": huge('t') }).to_string();
    let command = || Envelope::command(seller(), echo.clone(), json!("hi"), json!({}));
    let event = || Envelope::custom(seller(), "sold", json!({}));

    let mut invokes = Vec::new();
    let mut c = command();
    c.principal_id = Some(huge('p'));
    invokes.push(("invoke with a 200 KB principalId", c));
    let mut c = command();
    c.tenant_id = Some(huge('t'));
    invokes.push(("invoke with a 200 KB tenantId", c));
    let mut c = command();
    c.otp = Some(trace_context.clone());
    invokes.push(("invoke with a 200 KB trace context", c));
    for (what, c) in invokes {
        assert_too_large(
            what,
            bounded(client.invoke(c, Duration::from_secs(5))).await,
        );
    }

    let mut emits = Vec::new();
    emits.push((
        "emit with a 200 KB eventName",
        Envelope::custom(seller(), huge('e'), json!({})),
    ));
    let mut e = event();
    e.principal_id = Some(huge('p'));
    emits.push(("emit with a 200 KB principalId", e));
    let mut e = event();
    e.tenant_id = Some(huge('t'));
    emits.push(("emit with a 200 KB tenantId", e));
    let mut e = event();
    e.otp = Some(trace_context.clone());
    emits.push(("emit with a 200 KB trace context", e));
    for (what, e) in emits {
        let result = bounded(client.emit(e)).await;
        if let Err(error) = &result {
            assert_eq!(error.status(), StatusCode::BAD_REQUEST, "{what}: {error:?}");
        }
        assert_too_large(what, result);
    }

    assert_eq!(
        client.reconnects(),
        0,
        "the caller's connection was never dropped"
    );
    assert!(client.health().await.is_healthy());
    let answer = bounded(client.invoke(command(), Duration::from_secs(5)))
        .await
        .expect("an ordinary invocation still works");
    assert_eq!(answer.payload, json!("hi"));
    assert_eq!(server.reconnects(), 0);
    broker.finish().await;
}

/// A command from a foreign publisher whose principal is too large to travel back in the
/// response's headers is answered with 400 (its body carries everything), and the serving
/// instance keeps its connection and serves the next command.
async fn a_foreign_command_with_an_oversized_principal_is_answered_400_without_a_reconnect() {
    let broker = common::TestBroker::new("oversized_foreign_command");
    let server = broker.bridge().await;
    let client = broker.bridge().await;
    let echo = Address::new("echo", "1", "say");
    let handler = Echo::new();
    server
        .register_command(echo.clone(), handler.clone())
        .await
        .unwrap();
    let replies = broker
        .own_reply_queue("replies", server.topology().exchange())
        .await;

    let mut command = Envelope::command(seller(), echo.clone(), json!("big"), json!({}));
    command.correlation_id = Some("foreign-1".into());
    command.principal_id = Some(huge('p'));
    let properties = BasicProperties::default()
        .with_reply_to(replies.as_str().into())
        .with_correlation_id("foreign-1".into())
        .with_expiration("10000".into());
    let queue = server.topology().command_queue(&echo).unwrap();
    broker
        .publish_with(&queue, &command.encode(), properties)
        .await;

    let reply = broker.take_one(&replies, WITHIN).await.unwrap_or_else(|| {
        panic!(
            "no answer to the foreign command (server reconnects: {})",
            server.reconnects()
        )
    });
    let reply = Envelope::decode(&reply).expect("the answer is an envelope");
    assert_eq!(reply.correlation_id.as_deref(), Some("foreign-1"));
    assert_eq!(reply.payload["status"], json!(400), "{:?}", reply.payload);
    assert_eq!(handler.calls(), 0, "the handler never ran for it");
    assert_eq!(server.reconnects(), 0, "the serving connection stayed up");

    let answer = bounded(client.invoke(
        Envelope::command(seller(), echo.clone(), json!("next"), json!({})),
        Duration::from_secs(5),
    ))
    .await
    .expect("the next command is served");
    assert_eq!(answer.payload, json!("next"));
    broker.finish().await;
}

/// Headers just under the broker's frame limit, from a foreign publisher.
fn near_frame_max_headers() -> BasicProperties {
    let mut table = FieldTable::default();
    table.insert(
        "x-filler".into(),
        AMQPValue::LongString(LongString::from("f".repeat(NEAR_FRAME_MAX))),
    );
    BasicProperties::default().with_headers(table)
}

struct Case {
    name: &'static str,
    policy: FailurePolicy,
    outcome: Outcome,
}

/// A message whose headers nearly fill a frame reaches subscriptions that retry it (at once
/// and after a delay), dead-letter it, and retry it without a dead-letter target. None of the
/// bridge's re-publishes fits with its own headers: each is dead-lettered without the foreign
/// headers (body intact, the reason given) or dropped with one warning. The instance keeps its
/// connection and goes on delivering.
async fn near_limit_headers_through_retry_and_dead_letter_paths_never_cost_a_reconnect() {
    logs::install();
    let broker = common::TestBroker::new("near_limit_headers");
    let subscriber = broker.bridge().await;
    let publisher = broker.bridge().await;
    let target = "big.failed";
    let retrying = |delay: u64, target: Option<&str>| FailurePolicy {
        max_attempts: 3,
        retry_delay_ms: delay,
        dead_letter_target: target.map(str::to_string),
        ..FailurePolicy::default()
    };
    let cases = [
        Case {
            name: "retryAtOnce",
            policy: retrying(0, Some(target)),
            outcome: Outcome::Retry { delay_ms: None },
        },
        Case {
            name: "retryLater",
            policy: retrying(300, Some(target)),
            outcome: Outcome::Retry { delay_ms: None },
        },
        Case {
            name: "deadLetterAtOnce",
            policy: retrying(0, Some(target)),
            outcome: Outcome::DeadLetter {
                reason: "refused".into(),
            },
        },
        Case {
            name: "retryWithoutTarget",
            policy: retrying(0, None),
            outcome: Outcome::Retry { delay_ms: None },
        },
    ];
    let mut recorders: Vec<(String, Arc<Recorder>)> = Vec::new();
    for case in &cases {
        let mut s = spec(case.name, SubscriptionFilter::new().event_name("sold"));
        s.durable = true;
        s.policy = case.policy.clone();
        let outcome = case.outcome.clone();
        // The foreign message carries `big: true`; good ones are acked.
        let recorder = Recorder::deciding(&s, move |e, _| {
            if e.payload["big"] == json!(true) {
                outcome.clone()
            } else {
                Outcome::Ack
            }
        });
        subscriber
            .register_subscription(s.clone(), recorder.clone())
            .await
            .unwrap();
        let queue = subscriber.topology().subscription_queue(&s).unwrap();
        recorders.push((queue, recorder));
    }

    let foreign = Envelope::custom(seller(), "sold", json!({ "big": true }));
    for (queue, _) in &recorders {
        broker
            .publish_with(queue, &foreign.encode(), near_frame_max_headers())
            .await;
    }
    publisher
        .emit(Envelope::custom(seller(), "sold", json!({ "good": 1 })))
        .await
        .expect("a good event goes out");

    let delivered = eventually(Duration::from_secs(20), || {
        recorders.iter().all(|(_, r)| {
            r.seen()
                .iter()
                .any(|s| s.envelope.payload["good"] == json!(1))
        })
    })
    .await;
    assert!(
        delivered,
        "the good event reached every subscription (reconnects: {}, poison: {})",
        subscriber.reconnects(),
        subscriber.poison_messages()
    );

    // Three subscriptions dead-letter it, without the foreign headers but with its body.
    let entries = dead_letters(&subscriber, target, 3).await;
    let foreign_entries: Vec<_> = entries
        .iter()
        .filter(|e| e.envelope.as_ref().is_some_and(|e| e.id == foreign.id))
        .collect();
    assert_eq!(
        foreign_entries.len(),
        3,
        "dead-lettered once per subscription with a target: {entries:#?}"
    );
    for entry in &foreign_entries {
        assert!(
            entry.note.reason.contains("too large"),
            "the reason says why: {}",
            entry.note.reason
        );
    }
    // The one without a target dropped it with one warning naming its queue.
    let (plain_queue, _) = &recorders[3];
    let dropped = logs::warnings(|l| l.field("queue") == Some(plain_queue.as_str()));
    assert_eq!(dropped.len(), 1, "one warning: {dropped:#?}");

    for (queue, recorder) in &recorders {
        let attempts = recorder
            .seen()
            .iter()
            .filter(|s| s.envelope.id == foreign.id)
            .count();
        assert_eq!(attempts, 1, "{queue}: handled once, never looped");
    }
    assert_eq!(subscriber.reconnects(), 0, "no reconnect at all");
    assert!(subscriber.health().await.is_healthy());
    broker.finish().await;
}

/// The bridge's configured limit is the one it declares and enforces.
async fn the_declared_metadata_limit_is_enforced_to_the_byte() {
    let broker = common::TestBroker::new("metadata_limit");
    let bridge: Arc<AmqpBridge> = broker.bridge().await;
    let limit = bridge
        .capabilities()
        .limits
        .max_metadata_bytes
        .expect("the amqp bridge declares a metadata limit");
    assert!(
        limit < 131_072,
        "below RabbitMQ's default frame_max, with room for the bridge's own headers"
    );
    // Grow the principal until the event is refused: the first refused size is one byte over.
    let mut event = Envelope::custom(seller(), "sized", json!({}));
    let (mut low, mut high) = (0usize, 200 * 1024);
    while high - low > 1 {
        let mid = (low + high) / 2;
        event.principal_id = Some("p".repeat(mid));
        match bridge.emit(event.clone()).await {
            Ok(()) => low = mid,
            Err(BridgeError::TooLarge { limit: l, .. }) => {
                assert_eq!(l, limit, "the limit it reports is the one it declares");
                high = mid;
            }
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    event.principal_id = Some("p".repeat(high));
    match bridge.emit(event).await {
        Err(BridgeError::TooLarge { size, .. }) => assert_eq!(size, limit + 1, "exact size"),
        other => panic!("one byte more is refused: {other:?}"),
    }
    assert_eq!(bridge.reconnects(), 0);
    broker.finish().await;
}
