//! Subscription outcomes on RabbitMQ: delayed retries through TTL queues, dead-letter queues
//! with their headers, pause and resume without loss, and poison messages.

mod common;

use purista_core::SubscriptionOperator;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::{BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use purista_bridge_amqp::headers;
use purista_core::{Envelope, EventBridge, Outcome, SenderAddress, SubscriptionFilter};
use serde_json::json;

use common::{Recorder, dead_letters, eventually, spec};

common::runner::test_main! {
    common::BROKER: [
        a_delayed_retry_waits_at_least_the_delay_and_counts_attempts,
        a_dead_lettered_message_carries_reason_attempts_and_origin_headers,
        pause_and_resume_lose_nothing_on_a_durable_subscription,
        a_poison_message_is_dead_lettered_and_the_next_one_is_delivered,
        a_poison_message_without_dead_letter_target_is_dropped_and_the_next_one_is_delivered,
    ],
}

fn event(name: &str, n: usize) -> Envelope {
    let sender = SenderAddress {
        service_name: "shop".into(),
        service_version: "1".into(),
        service_target: "sell".into(),
        instance_id: String::new(),
    };
    Envelope::custom(sender, name, json!({ "n": n }))
}

async fn a_delayed_retry_waits_at_least_the_delay_and_counts_attempts() {
    let broker = common::TestBroker::new("delayed_retry");
    let (bridge, publisher) = (broker.bridge().await, broker.bridge().await);
    let mut spec = spec("onSold", SubscriptionFilter::new().event_name("sold"));
    spec.durable = true;
    spec.policy.max_attempts = 3;
    spec.policy.retry_delay_ms = 600;
    spec.policy.dead_letter_target = Some("sold-failed".into());
    let recorder = Recorder::deciding(&spec, |_, _| Outcome::retry());
    bridge
        .register_subscription(spec.clone(), recorder.clone())
        .await
        .unwrap();

    let sent = event("sold", 1);
    publisher.emit(sent).await.unwrap();
    assert!(eventually(Duration::from_secs(10), || recorder.count() == 3).await);
    let seen = recorder.seen();
    assert_eq!(
        seen.iter().map(|s| s.attempt).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    for pair in seen.windows(2) {
        let gap = pair[1].at.duration_since(pair[0].at);
        assert!(
            gap >= Duration::from_millis(600),
            "redelivered after {gap:?}"
        );
    }
    let id = seen[0].envelope.id.clone();
    assert!(
        seen.iter().all(|s| s.envelope.id == id),
        "the same message each time"
    );
    let retry_queue = bridge.topology().retry_queue(
        &bridge.topology().subscription_queue(&spec).unwrap(),
        Duration::from_millis(600),
    );
    assert!(bridge.declared_queues().contains(&retry_queue));

    // Exhausted: in the dead-letter queue, payload intact.
    let entries = dead_letters(&bridge, "sold-failed", 1).await;
    assert_eq!(entries.len(), 1);
    let entry = &entries[0];
    assert_eq!(entry.note.attempts, 3);
    assert_eq!(entry.note.origin, spec.key);
    assert_eq!(entry.note.reason, "retries exhausted after 3 attempt(s)");
    assert_eq!(entry.envelope.as_ref().unwrap().id, id);
    assert_eq!(entry.envelope.as_ref().unwrap().payload, json!({"n": 1}));
    assert!(entry.dead_lettered_at > 0);
    broker.finish().await;
}

async fn a_dead_lettered_message_carries_reason_attempts_and_origin_headers() {
    let broker = common::TestBroker::new("dead_letter_headers");
    let bridge = broker.bridge().await;
    let mut spec = spec("onSold", SubscriptionFilter::new().event_name("sold"));
    spec.policy.dead_letter_target = Some("sold-bad".into());
    let recorder = Recorder::deciding(&spec, |_, _| Outcome::dead_letter("price is negative"));
    bridge
        .register_subscription(spec.clone(), recorder.clone())
        .await
        .unwrap();
    bridge.emit(event("sold", 7)).await.unwrap();
    assert!(eventually(Duration::from_secs(5), || recorder.count() == 1).await);

    let queue = bridge.topology().dead_letter_queue("sold-bad").unwrap();
    assert_eq!(queue, format!("{}.sold-bad.dead-letter", broker.prefix));
    let entries = dead_letters(&bridge, "sold-bad", 1).await;
    assert_eq!(entries.len(), 1);
    // Inspecting does not remove.
    assert_eq!(
        bridge
            .inspect_dead_letters("sold-bad", 10)
            .await
            .unwrap()
            .len(),
        1
    );

    let conn = broker.raw_connection().await;
    let ch = conn.create_channel().await.unwrap();
    let message = ch
        .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("one dead letter");
    let table = message.delivery.properties.headers().as_ref();
    assert_eq!(
        headers::get_str(table, headers::DEAD_LETTER_REASON),
        Some("price is negative")
    );
    assert_eq!(
        headers::get_u64(table, headers::DEAD_LETTER_ATTEMPTS),
        Some(1)
    );
    assert_eq!(
        headers::get_str(table, headers::DEAD_LETTER_ORIGIN),
        Some(spec.key.as_str())
    );
    let body = Envelope::decode(&message.delivery.data).unwrap();
    assert_eq!(body.payload, json!({"n": 7}));
    let _ = conn.close(200, "OK".into()).await;
    broker.finish().await;
}

async fn pause_and_resume_lose_nothing_on_a_durable_subscription() {
    let broker = common::TestBroker::new("pause_resume");
    let (bridge, publisher) = (broker.bridge().await, broker.bridge().await);
    let mut spec = spec("onSold", SubscriptionFilter::new().event_name("sold"));
    spec.durable = true;
    spec.prefetch = 1;
    let paused_once = Arc::new(AtomicBool::new(false));
    let flag = paused_once.clone();
    let recorder = Recorder::deciding(&spec, move |_, _| {
        if flag.swap(true, Ordering::SeqCst) {
            Outcome::Ack
        } else {
            Outcome::stop_consumer("downstream is down")
        }
    });
    bridge
        .register_subscription(spec.clone(), recorder.clone())
        .await
        .unwrap();

    publisher.emit(event("sold", 0)).await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || !bridge
            .paused_subscription_consumers()
            .is_empty())
        .await
    );
    let paused = bridge.paused_subscription_consumers();
    assert_eq!(paused[0].key, spec.key);
    assert_eq!(paused[0].reason, "downstream is down");

    for n in 1..=5 {
        publisher.emit(event("sold", n)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(recorder.count(), 1, "nothing delivered while paused");

    assert!(
        bridge
            .resume_subscription_consumer(&spec.key)
            .await
            .unwrap()
    );
    assert!(
        !bridge
            .resume_subscription_consumer(&spec.key)
            .await
            .unwrap()
    );
    assert!(bridge.paused_subscription_consumers().is_empty());
    assert!(eventually(Duration::from_secs(5), || recorder.count() == 7).await);
    let seen = recorder.seen();
    let first = &seen[0].envelope.id;
    let again: Vec<_> = seen
        .iter()
        .skip(1)
        .filter(|s| &s.envelope.id == first)
        .collect();
    assert_eq!(again.len(), 1, "the paused message comes back");
    assert_eq!(again[0].attempt, 1, "with the same attempt number");
    let payloads: std::collections::BTreeSet<_> = seen
        .iter()
        .map(|s| s.envelope.payload["n"].as_u64().unwrap())
        .collect();
    assert_eq!(payloads, (0..=5).collect());
    broker.finish().await;
}

async fn publish_garbage_into(broker: &common::TestBroker, queue: &str) {
    let conn = broker.raw_connection().await;
    let ch = conn.create_channel().await.unwrap();
    ch.basic_publish(
        "".into(),
        queue.into(),
        BasicPublishOptions::default(),
        b"{not an envelope",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    let _ = conn.close(200, "OK".into()).await;
}

async fn a_poison_message_is_dead_lettered_and_the_next_one_is_delivered() {
    let broker = common::TestBroker::new("poison_dead_letter");
    let bridge = broker.bridge().await;
    let mut spec = spec("onSold", SubscriptionFilter::new().event_name("sold"));
    spec.policy.dead_letter_target = Some("sold-poison".into());
    let recorder = Recorder::acking(&spec);
    bridge
        .register_subscription(spec.clone(), recorder.clone())
        .await
        .unwrap();

    publish_garbage_into(
        &broker,
        &bridge.topology().subscription_queue(&spec).unwrap(),
    )
    .await;
    bridge.emit(event("sold", 1)).await.unwrap();
    assert!(eventually(Duration::from_secs(5), || recorder.count() == 1).await);
    assert!(eventually(Duration::from_secs(5), || bridge.poison_messages() == 1).await);

    let entries = dead_letters(&bridge, "sold-poison", 1).await;
    assert_eq!(entries.len(), 1);
    assert!(entries[0].envelope.is_none());
    assert_eq!(entries[0].raw.as_deref(), Some(&b"{not an envelope"[..]));
    assert!(
        entries[0].note.reason.starts_with("undecodable message"),
        "{}",
        entries[0].note.reason
    );
    assert_eq!(entries[0].note.origin, spec.key);
    broker.finish().await;
}

async fn a_poison_message_without_dead_letter_target_is_dropped_and_the_next_one_is_delivered() {
    let broker = common::TestBroker::new("poison_drop");
    let bridge = broker.bridge().await;
    let spec = spec("onSold", SubscriptionFilter::new().event_name("sold"));
    let recorder = Recorder::acking(&spec);
    bridge
        .register_subscription(spec.clone(), recorder.clone())
        .await
        .unwrap();
    let queue = bridge.topology().subscription_queue(&spec).unwrap();

    publish_garbage_into(&broker, &queue).await;
    bridge.emit(event("sold", 1)).await.unwrap();
    assert!(eventually(Duration::from_secs(5), || recorder.count() == 1).await);
    assert!(eventually(Duration::from_secs(5), || bridge.poison_messages() == 1).await);

    let conn = broker.raw_connection().await;
    let ch = conn.create_channel().await.unwrap();
    let declared = ch
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        declared.message_count(),
        0,
        "nothing left behind, nothing requeued"
    );
    let _ = conn.close(200, "OK".into()).await;
    broker.finish().await;
}
