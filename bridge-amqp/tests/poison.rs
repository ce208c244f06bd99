//! Poison isolation: a delivery that takes the connection down whenever it is handled costs at
//! most two reconnects. A connection that closed twice while the same delivery was in hand
//! quarantines that delivery: it is dead-lettered with the reason (or dropped with a warning)
//! without reaching the handler again, and counted as poison; everything else is delivered.
//! Deliveries that were merely in hand beside it are not blamed: after a loss they are handed
//! out one at a time until each has been settled.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;
use purista_core::{
    Delivery, DeliveryHandler, Envelope, EventBridge, FailurePolicy, SenderAddress, Settlement,
    SubscriptionFilter,
};
use serde_json::json;

use common::{close_connection_named, connection_name, dead_letters, eventually, spec};

common::runner::test_main! {
    common::BROKER_AND_RABBITMQCTL: [
        a_delivery_that_closes_the_connection_twice_is_quarantined,
    ],
}

/// Closes its bridge's connection (as a fatal broker error would) whenever it sees the poison
/// message; acks everything else.
struct Killer {
    connection: String,
    poison_seen: AtomicUsize,
    good: Mutex<Vec<u64>>,
}

#[async_trait]
impl DeliveryHandler for Killer {
    async fn deliver(&self, delivery: Delivery) {
        if delivery.envelope.payload["poison"] == json!(true) {
            self.poison_seen.fetch_add(1, Ordering::SeqCst);
            let name = self.connection.clone();
            let closed = tokio::task::spawn_blocking(move || close_connection_named(&name))
                .await
                .expect("rabbitmqctl ran");
            closed.expect("the connection was closed");
            // The settlement has nowhere to go any more; the broker redelivers the message.
            let _ = delivery.settle.settle(Settlement::Ack).await;
            return;
        }
        if let Some(n) = delivery.envelope.payload["n"].as_u64() {
            self.good.lock().push(n);
        }
        let _ = delivery.settle.settle(Settlement::Ack).await;
    }
}

async fn a_delivery_that_closes_the_connection_twice_is_quarantined() {
    let broker = common::TestBroker::new("poison_quarantine");
    let subscriber = broker.bridge().await;
    let publisher = broker.bridge().await;
    let mut s = spec("fragile", SubscriptionFilter::new().event_name("sold"));
    s.durable = true;
    s.policy = FailurePolicy {
        dead_letter_target: Some("fragile.failed".into()),
        ..FailurePolicy::default()
    };
    let handler = Arc::new(Killer {
        connection: connection_name(&subscriber),
        poison_seen: AtomicUsize::new(0),
        good: Mutex::new(Vec::new()),
    });
    subscriber
        .register_subscription(s, handler.clone())
        .await
        .unwrap();
    let sender = SenderAddress::default();
    publisher
        .emit(Envelope::custom(sender.clone(), "sold", json!({ "n": 0 })))
        .await
        .unwrap();
    let poison = Envelope::custom(sender.clone(), "sold", json!({ "poison": true }));
    publisher.emit(poison).await.unwrap();
    for n in 1..4 {
        publisher
            .emit(Envelope::custom(sender.clone(), "sold", json!({ "n": n })))
            .await
            .unwrap();
    }

    // Each close takes `rabbitmqctl` a few seconds: two of them, two reconnects.
    let mut quarantined = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while quarantined.is_empty() && Instant::now() < deadline {
        quarantined = dead_letters(&subscriber, "fragile.failed", 1).await;
    }
    let all_good = eventually(Duration::from_secs(20), || {
        let mut good = handler.good.lock().clone();
        good.sort_unstable();
        good.dedup();
        good == [0, 1, 2, 3]
    })
    .await;
    let reconnects = subscriber.reconnects();
    assert!(
        all_good,
        "every good event was delivered (reconnects: {reconnects}, poison handled {} times)",
        handler.poison_seen.load(Ordering::SeqCst)
    );
    assert_eq!(
        quarantined.len(),
        1,
        "reconnects {reconnects}: {quarantined:#?}"
    );
    assert_eq!(
        quarantined[0]
            .envelope
            .as_ref()
            .map(|e| e.payload["poison"].clone()),
        Some(json!(true)),
        "the poison message, nothing else, is quarantined"
    );
    assert!(
        quarantined[0].note.reason.contains("quarantined"),
        "{}",
        quarantined[0].note.reason
    );
    assert_eq!(handler.poison_seen.load(Ordering::SeqCst), 2);
    assert_eq!(reconnects, 2, "two losses, then quarantined");
    assert_eq!(subscriber.poison_messages(), 1);
    assert!(subscriber.health().await.is_healthy());
    broker.finish().await;
}
