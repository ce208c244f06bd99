//! Resource names are injective: two different addresses never share a queue. Joined plainly
//! with dots, `orders.v2@1/get` and `orders@v2.1/get` would both be `P.cmd.orders.v2.1.get`,
//! and each service would serve half of the other's calls.

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use purista_core::{
    Address, CommandHandler, Envelope, EventBridge, SenderAddress, SubscriptionFilter,
};
use serde_json::json;

use common::{Recorder, eventually, spec};

common::runner::test_main! {
    common::BROKER: [
        addresses_that_join_to_the_same_dotted_name_get_queues_of_their_own,
        subscriptions_whose_names_join_alike_keep_queues_of_their_own,
    ],
}

/// Answers every command with its own name.
struct Named(&'static str);

#[async_trait]
impl CommandHandler for Named {
    async fn handle(&self, command: Arc<Envelope>) -> Envelope {
        command.success_response(json!(self.0), None)
    }
}

async fn addresses_that_join_to_the_same_dotted_name_get_queues_of_their_own() {
    let broker = common::TestBroker::new("names_commands");
    let one = broker.bridge().await;
    let other = broker.bridge().await;
    let client = broker.bridge().await;
    let dotted_service = Address::new("orders.v2", "1", "get");
    let dotted_version = Address::new("orders", "v2.1", "get");
    assert_ne!(
        one.topology().command_queue(&dotted_service).unwrap(),
        one.topology().command_queue(&dotted_version).unwrap()
    );
    one.register_command(dotted_service.clone(), Arc::new(Named("orders.v2@1")))
        .await
        .unwrap();
    other
        .register_command(dotted_version.clone(), Arc::new(Named("orders@v2.1")))
        .await
        .unwrap();
    for _ in 0..10 {
        for (address, expected) in [
            (&dotted_service, "orders.v2@1"),
            (&dotted_version, "orders@v2.1"),
        ] {
            let cmd = Envelope::command(
                SenderAddress::default(),
                address.clone(),
                json!(null),
                json!({}),
            );
            let answer = client
                .invoke(cmd, Duration::from_secs(5))
                .await
                .expect("served");
            assert_eq!(
                answer.payload,
                json!(expected),
                "{address} served by its own handler"
            );
        }
    }
    broker.finish().await;
}

async fn subscriptions_whose_names_join_alike_keep_queues_of_their_own() {
    let broker = common::TestBroker::new("names_subscriptions");
    let bridge = broker.bridge().await;
    let filter = SubscriptionFilter::new().event_name("sold");
    let mut a = spec("x", filter.clone());
    a.key = "a.b@1/x".into();
    a.subscriber = Address::new("a.b", "1", "x");
    let mut b = spec("x", filter);
    b.key = "a@b.1/x".into();
    b.subscriber = Address::new("a", "b.1", "x");
    assert_ne!(
        bridge.topology().subscription_queue(&a).unwrap(),
        bridge.topology().subscription_queue(&b).unwrap()
    );
    let (ra, rb) = (Recorder::acking(&a), Recorder::acking(&b));
    bridge.register_subscription(a, ra.clone()).await.unwrap();
    bridge.register_subscription(b, rb.clone()).await.unwrap();
    for n in 0..4 {
        bridge
            .emit(Envelope::custom(
                SenderAddress::default(),
                "sold",
                json!({ "n": n }),
            ))
            .await
            .unwrap();
    }
    assert!(
        eventually(Duration::from_secs(5), || ra.count() == 4
            && rb.count() == 4)
        .await,
        "each subscription got every event: {} and {}",
        ra.count(),
        rb.count()
    );
    broker.finish().await;
}
