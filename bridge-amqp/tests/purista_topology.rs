//! The PURISTA topology mode on RabbitMQ: queues declared the way PURISTA's TypeScript AMQP
//! bridge declares them (read from its source: `assertQueue(name, { durable, autoDelete: true })`
//! for a command, `assertQueue(name, { durable })` for a shared subscription, both without
//! arguments, bound on the headers exchange with `x-match: all`) are shared by a Rust instance
//! in that mode, and refused by one in the native mode, which is what a mixed deployment ran
//! into before the mode existed.

mod common;

use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};
use purista_bridge_amqp::TopologyMode;
use purista_core::{
    Address, BridgeError, Envelope, EventBridge, MessageType, SenderAddress, SubscriptionFilter,
};
use serde_json::json;

use common::{Echo, Recorder, TestBroker, eventually, spec};

common::runner::test_main! {
    common::BROKER: [
        a_rust_instance_in_the_purista_mode_shares_the_queues_a_typescript_instance_declared,
        responses_in_the_purista_mode_carry_purista_s_header_and_timestamp_unit,
    ],
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

fn table(pairs: &[(&str, &str)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), text(v));
    }
    t
}

/// What a PURISTA TypeScript instance of `billing@1` declares at start and registration: the
/// headers exchange, the command queue of `pay` with a consumer on it, and the shared queue of
/// the subscription `listener@1/onPaid`. Returns the consumer, which must be kept: lapin
/// cancels a consumer that is dropped, and the broker then deletes the auto-delete queue.
async fn declare_as_purista(broker: &TestBroker, ch: &Channel) -> lapin::Consumer {
    let prefix = &broker.prefix;
    ch.exchange_declare(
        prefix.as_str().into(),
        ExchangeKind::Headers,
        ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("exchange");

    let command_queue = format!("{prefix}.cmd.billing.1.pay");
    ch.queue_declare(
        command_queue.as_str().into(),
        QueueDeclareOptions {
            durable: false,
            auto_delete: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("command queue as PURISTA declares it");
    ch.queue_bind(
        command_queue.as_str().into(),
        prefix.as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        table(&[
            ("x-match", "all"),
            ("messageType", "command"),
            ("receiverServiceName", "billing"),
            ("receiverServiceVersion", "1"),
            ("receiverServiceTarget", "pay"),
        ]),
    )
    .await
    .expect("command binding");
    let consumer = ch
        .basic_consume(
            command_queue.as_str().into(),
            "purista-ts-instance".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("the TypeScript instance consumes its command queue");
    broker.track_queue(command_queue);

    let subscription_queue = format!("{prefix}.sub.listener.1.onPaid");
    ch.queue_declare(
        subscription_queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("shared subscription queue as PURISTA declares it");
    ch.queue_bind(
        subscription_queue.as_str().into(),
        prefix.as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        table(&[
            ("x-match", "all"),
            ("messageType", "custom"),
            ("eventName", "paid"),
        ]),
    )
    .await
    .expect("subscription binding");
    broker.track_queue(subscription_queue);
    consumer
}

fn durable_shared(name: &str) -> purista_core::SubscriptionSpec {
    let mut s = spec(name, SubscriptionFilter::new().event_name("paid"));
    s.durable = true;
    s
}

async fn a_rust_instance_in_the_purista_mode_shares_the_queues_a_typescript_instance_declared() {
    let broker = common::TestBroker::new("purista_shares");
    let raw = broker.raw_connection().await;
    let ch = raw.create_channel().await.expect("channel");
    let ts_consumer = declare_as_purista(&broker, &ch).await;
    let pay = Address::new("billing", "1", "pay");

    // The native mode declares the same names with other arguments: the broker refuses it,
    // and the registration fails with a typed error that names the queue.
    let native = broker.bridge().await;
    let refused = native.register_command(pay.clone(), Echo::new()).await;
    match &refused {
        Err(BridgeError::Broker(reason)) => assert!(
            reason.contains("cmd.billing.1.pay") && reason.contains("inequivalent arg"),
            "{reason}"
        ),
        other => panic!("the native mode must be refused by PURISTA's queue: {other:?}"),
    }

    // The PURISTA mode declares them exactly alike: accepted, and served side by side.
    let server = broker
        .bridge_with(|c| c.topology = TopologyMode::Purista)
        .await;
    let echo = Echo::new();
    server
        .register_command(pay.clone(), echo.clone())
        .await
        .expect("the PURISTA mode shares PURISTA's command queue");
    let subscription = durable_shared("onPaid");
    let recorder = Recorder::acking(&subscription);
    server
        .register_subscription(subscription.clone(), recorder.clone())
        .await
        .expect("the PURISTA mode shares PURISTA's subscription queue");

    // The TypeScript instance leaves; the queue stays, because the Rust instance consumes it.
    ch.basic_cancel(ts_consumer.tag(), BasicCancelOptions::default())
        .await
        .expect("cancel");
    // A short reconnect grace: see the end of the case.
    let client = broker
        .bridge_with(|c| {
            c.topology = TopologyMode::Purista;
            c.reconnect_grace = Duration::from_secs(1);
        })
        .await;
    let caller = SenderAddress {
        service_name: "shop".into(),
        service_version: "1".into(),
        service_target: "checkout".into(),
        instance_id: String::new(),
    };
    let response = client
        .invoke(
            Envelope::command(caller.clone(), pay.clone(), json!("hello"), json!({})),
            Duration::from_secs(5),
        )
        .await
        .expect("served by the Rust instance on PURISTA's queue");
    assert_eq!(response.message_type, MessageType::CommandSuccessResponse);
    assert_eq!(response.payload, "hello");
    assert_eq!(echo.calls(), 1);

    // An event published as PURISTA publishes it reaches the shared subscription.
    client
        .emit(Envelope::custom(caller, "paid", json!({ "order": 1 })))
        .await
        .expect("emit");
    assert!(eventually(Duration::from_secs(5), || recorder.count() == 1).await);

    // The last server leaves: the broker deletes the auto-delete queue, so the next command
    // is unroutable. The client reached it a moment ago, and a queue that goes with its
    // server's connection may be back soon, so it publishes again for the reconnect grace (one
    // second here) and then fails with 502, well before its ttl.
    server.unregister_command(&pay).await.expect("unregister");
    let mut gone = false;
    for _ in 0..50 {
        if queue_exists(&broker, "cmd.billing.1.pay").await == Some(false) {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        gone,
        "the auto-delete command queue went with its last consumer"
    );
    let started = std::time::Instant::now();
    let error = client
        .invoke(
            Envelope::command(
                SenderAddress::default(),
                pay.clone(),
                json!("late"),
                json!({}),
            ),
            Duration::from_secs(5),
        )
        .await
        .expect_err("nobody serves it");
    assert_eq!(error.status().0, 502, "{error:?}");
    assert!(started.elapsed() < Duration::from_secs(4));
    broker.finish().await;
}

/// Whether `<prefix>.<suffix>` exists, asked on a channel of its own (a passive declare of a
/// missing queue closes its channel). `None` when the broker could not be asked.
async fn queue_exists(broker: &TestBroker, suffix: &str) -> Option<bool> {
    let raw = broker.raw_connection().await;
    let ch = raw.create_channel().await.ok()?;
    let name = format!("{}.{suffix}", broker.prefix);
    let exists = ch
        .queue_declare(
            name.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .is_ok();
    let _ = raw.close(200, "OK".into()).await;
    Some(exists)
}

/// A response as the PURISTA mode writes it: the receiver's instance under PURISTA's header
/// name beside ours, and the AMQP timestamp in milliseconds (PURISTA's unit).
async fn responses_in_the_purista_mode_carry_purista_s_header_and_timestamp_unit() {
    let broker = common::TestBroker::new("purista_response_shape");
    let server = broker
        .bridge_with(|c| c.topology = TopologyMode::Purista)
        .await;
    let client = broker
        .bridge_with(|c| c.topology = TopologyMode::Purista)
        .await;
    let pay = Address::new("billing", "1", "pay");
    server
        .register_command(pay.clone(), Echo::new())
        .await
        .expect("register");

    // A tap on every response, bound the way a PURISTA subscription on responses binds.
    let raw = broker.raw_connection().await;
    let ch = raw.create_channel().await.expect("channel");
    let tap = format!("{}.tap", broker.prefix);
    ch.queue_declare(
        tap.as_str().into(),
        QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("tap queue");
    ch.queue_bind(
        tap.as_str().into(),
        broker.prefix.as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        table(&[
            ("x-match", "all"),
            ("messageType", "commandSuccessResponse"),
        ]),
    )
    .await
    .expect("tap binding");
    let mut taps = ch
        .basic_consume(
            tap.as_str().into(),
            "tap".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume tap");

    let before_ms = now_ms();
    client
        .invoke(
            Envelope::command(SenderAddress::default(), pay, json!(1), json!({})),
            Duration::from_secs(5),
        )
        .await
        .expect("invoke");
    let delivery = tokio::time::timeout(Duration::from_secs(5), taps.next())
        .await
        .expect("a response copy within 5 s")
        .expect("stream open")
        .expect("delivery");
    delivery.ack(BasicAckOptions::default()).await.expect("ack");
    let headers = delivery.properties.headers().clone().unwrap_or_default();
    let instance = headers.inner().get("receiverServiceInstanceId");
    assert_eq!(
        instance,
        Some(&text(client.instance_id())),
        "PURISTA's header names the caller's instance: {headers:?}"
    );
    assert_eq!(
        headers.inner().get("receiverInstanceId"),
        Some(&text(client.instance_id()))
    );
    let stamped = delivery.properties.timestamp().expect("a timestamp");
    assert!(
        stamped >= before_ms.saturating_sub(1000) && stamped <= now_ms() + 1000,
        "milliseconds since the epoch, as PURISTA writes them: {stamped}"
    );
    broker.finish().await;
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
