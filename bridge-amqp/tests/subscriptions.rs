//! Subscriptions on RabbitMQ: shared vs broadcast, durability, and broker-side filter routing
//! that equals core's reference matcher.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use purista_core::filter::filter_table;
use purista_core::{Envelope, EventBridge, SenderAddress, SubscriptionFilter};
use serde_json::json;

use common::{Recorder, eventually, spec};

common::runner::test_main! {
    common::BROKER: [
        a_shared_subscription_gives_each_message_to_one_instance,
        a_broadcast_subscription_reaches_every_instance,
        a_durable_subscription_keeps_messages_while_no_consumer_is_connected,
        registering_the_same_subscription_twice_on_one_instance_is_refused,
        header_bindings_route_exactly_like_the_reference_matcher,
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

async fn a_shared_subscription_gives_each_message_to_one_instance() {
    let broker = common::TestBroker::new("shared_once");
    let (a, b, publisher) = (
        broker.bridge().await,
        broker.bridge().await,
        broker.bridge().await,
    );
    let spec = spec("onSold", SubscriptionFilter::new().event_name("sold"));
    let (ra, rb) = (Recorder::acking(&spec), Recorder::acking(&spec));
    a.register_subscription(spec.clone(), ra.clone())
        .await
        .unwrap();
    b.register_subscription(spec.clone(), rb.clone())
        .await
        .unwrap();

    for n in 0..40 {
        publisher.emit(event("sold", n)).await.unwrap();
    }
    assert!(eventually(Duration::from_secs(5), || ra.count() + rb.count() == 40).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut ids: Vec<String> = ra.ids();
    ids.extend(rb.ids());
    let unique: BTreeSet<_> = ids.iter().cloned().collect();
    assert_eq!(ids.len(), 40, "each message delivered once");
    assert_eq!(unique.len(), 40);
    assert!(ra.count() > 0 && rb.count() > 0, "both instances compete");
    broker.finish().await;
}

async fn a_broadcast_subscription_reaches_every_instance() {
    let broker = common::TestBroker::new("broadcast_all");
    let (a, b, publisher) = (
        broker.bridge().await,
        broker.bridge().await,
        broker.bridge().await,
    );
    let mut spec = spec("onSold", SubscriptionFilter::new().event_name("sold"));
    spec.shared = false;
    let (ra, rb) = (Recorder::acking(&spec), Recorder::acking(&spec));
    a.register_subscription(spec.clone(), ra.clone())
        .await
        .unwrap();
    b.register_subscription(spec.clone(), rb.clone())
        .await
        .unwrap();
    assert_ne!(
        a.topology().subscription_queue(&spec).unwrap(),
        b.topology().subscription_queue(&spec).unwrap(),
        "one queue per instance"
    );

    for n in 0..20 {
        publisher.emit(event("sold", n)).await.unwrap();
    }
    assert!(
        eventually(Duration::from_secs(5), || ra.count() == 20
            && rb.count() == 20)
        .await
    );
    let (ia, ib): (BTreeSet<_>, BTreeSet<_>) = (
        ra.ids().into_iter().collect(),
        rb.ids().into_iter().collect(),
    );
    assert_eq!(ia, ib);
    broker.finish().await;
}

async fn a_durable_subscription_keeps_messages_while_no_consumer_is_connected() {
    let broker = common::TestBroker::new("durable_waits");
    let (first, publisher) = (broker.bridge().await, broker.bridge().await);
    let mut spec = spec("onSold", SubscriptionFilter::new().event_name("sold"));
    spec.durable = true;
    first
        .register_subscription(spec.clone(), Recorder::acking(&spec))
        .await
        .unwrap();
    first.unregister_subscription(&spec.key).await.unwrap();

    for n in 0..5 {
        publisher.emit(event("sold", n)).await.unwrap();
    }
    let later = broker.bridge().await;
    let recorder = Recorder::acking(&spec);
    later
        .register_subscription(spec.clone(), recorder.clone())
        .await
        .unwrap();
    assert!(eventually(Duration::from_secs(5), || recorder.count() == 5).await);
    broker.finish().await;
}

async fn registering_the_same_subscription_twice_on_one_instance_is_refused() {
    let broker = common::TestBroker::new("duplicate_key");
    let bridge = broker.bridge().await;
    let spec = spec("onSold", SubscriptionFilter::new().event_name("sold"));
    bridge
        .register_subscription(spec.clone(), Recorder::acking(&spec))
        .await
        .unwrap();
    let again = bridge
        .register_subscription(spec.clone(), Recorder::acking(&spec))
        .await;
    assert!(matches!(
        again,
        Err(purista_core::BridgeError::AlreadyRegistered(_))
    ));
    broker.finish().await;
}

/// Every filter of core's table against every message of the table: the broker's header
/// bindings deliver exactly the pairs the reference matcher accepts.
async fn header_bindings_route_exactly_like_the_reference_matcher() {
    let broker = common::TestBroker::new("filter_matrix");
    let bridge = broker.bridge().await;
    let rows = filter_table();
    let mut recorders = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let spec = spec(&format!("row{i}"), row.filter.clone());
        let recorder = Recorder::acking(&spec);
        bridge
            .register_subscription(spec, recorder.clone())
            .await
            .unwrap();
        recorders.push(recorder);
    }
    let messages: Vec<Envelope> = rows
        .iter()
        .enumerate()
        .map(|(j, row)| {
            let mut m = row.message.clone();
            m.id = format!("row-{j}");
            m
        })
        .collect();
    for m in &messages {
        // Unstamped: the table's sender instance ids must reach the broker as written.
        bridge.publish_raw(&m.encode()).await.unwrap();
    }

    let expected: Vec<BTreeSet<String>> = rows
        .iter()
        .map(|row| {
            messages
                .iter()
                .filter(|m| row.filter.matches(m))
                .map(|m| m.id.clone())
                .collect()
        })
        .collect();
    let total: usize = expected.iter().map(BTreeSet::len).sum();
    assert!(
        eventually(Duration::from_secs(10), || {
            recorders.iter().map(|r| r.count()).sum::<usize>() >= total
        })
        .await,
        "expected {total} deliveries"
    );
    // Anything unexpected would have arrived by now too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (i, row) in rows.iter().enumerate() {
        let got: BTreeSet<String> = recorders[i].ids().into_iter().collect();
        assert_eq!(got, expected[i], "row `{}`", row.name);
        let own = format!("row-{i}");
        assert_eq!(
            got.contains(&own),
            row.expected,
            "row `{}` on its own message",
            row.name
        );
    }
    broker.finish().await;
}
