//! Stale per-instance queues: an instance that dies leaves its reply queue and broadcast
//! queues (and the rules feeding them) behind, since SQS has no auto-delete. Another instance's
//! janitor removes them once their last-seen tag is older than `stale_after`, and never
//! touches the queues of an instance that is alive (its heartbeat renews the tag).

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use purista_bridge_aws::AwsBridge;
use purista_core::{
    Address, Delivery, DeliveryHandler, EventBridge, FailurePolicy, RegistrationKey, Settlement,
    SubscriptionFilter, SubscriptionSpec,
};

common::runner::test_main! {
    common::ENDPOINT: [
        a_crashed_instances_queues_and_rules_are_removed_and_a_live_ones_are_kept,
    ],
}

struct Ack;

#[async_trait]
impl DeliveryHandler for Ack {
    async fn deliver(&self, delivery: Delivery) {
        let _ = delivery.settle.settle(Settlement::Ack).await;
    }
}

fn broadcast(key: &str) -> SubscriptionSpec {
    SubscriptionSpec {
        key: RegistrationKey::from(key),
        subscriber: Address::new("watcher", "1", "all"),
        filter: SubscriptionFilter::new().event_name("anything"),
        shared: false,
        durable: false,
        policy: FailurePolicy::default(),
        prefetch: 4,
    }
}

async fn exists(bridge: &AwsBridge, url: &str) -> bool {
    bridge
        .sqs()
        .get_queue_attributes()
        .queue_url(url)
        .send()
        .await
        .is_ok()
}

async fn rules(bridge: &AwsBridge) -> Vec<String> {
    bridge
        .eventbridge()
        .list_rules()
        .event_bus_name(bridge.config().bus_name())
        .send()
        .await
        .unwrap()
        .rules
        .unwrap_or_default()
        .into_iter()
        .filter_map(|r| r.name)
        .collect()
}

async fn a_crashed_instances_queues_and_rules_are_removed_and_a_live_ones_are_kept() {
    let endpoint = common::endpoint();
    let prefix = common::prefix();

    // The instance that will crash: a reply queue and a broadcast subscription.
    let crashed = AwsBridge::new(common::config(&endpoint, &prefix))
        .await
        .unwrap();
    crashed.start().await.unwrap();
    let key = RegistrationKey::from("watcher@1/all");
    crashed
        .register_subscription(broadcast(key.as_str()), Arc::new(Ack))
        .await
        .unwrap();
    let crashed_reply = crashed.reply_queue_url().unwrap().to_string();
    let crashed_broadcast = crashed.subscription_queue_url(&key).unwrap();

    // A live instance whose heartbeat renews its tags every 200 ms.
    let mut live_config = common::config(&endpoint, &prefix);
    live_config.heartbeat_interval = Duration::from_millis(200);
    let live = AwsBridge::new(live_config).await.unwrap();
    live.start().await.unwrap();
    live.register_subscription(broadcast(key.as_str()), Arc::new(Ack))
        .await
        .unwrap();
    let live_reply = live.reply_queue_url().unwrap().to_string();
    let live_broadcast = live.subscription_queue_url(&key).unwrap();
    assert_eq!(
        rules(&live).await.len(),
        2,
        "one broadcast rule per instance"
    );

    // The crash: no shutdown, nothing removed.
    drop(crashed);

    // The operator's bridge, not started: a started one runs a janitor round of its own at
    // start, which on a slow machine can come after the crashed instance went stale and take
    // its queues before the operator call below could report them.
    let mut janitor_config = common::config(&endpoint, &prefix);
    // Ten heartbeats of the live instance: one renewal late under load does not make it stale.
    janitor_config.stale_after = Duration::from_secs(2);
    let janitor = AwsBridge::new(janitor_config).await.unwrap();
    // The crashed instance's last-seen tag must grow older than `stale_after`: time itself is
    // the condition here.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let mut removed = janitor.clean_stale_queues().await.unwrap();
    removed.sort();
    let mut expected = vec![crashed_reply.clone(), crashed_broadcast.clone()];
    expected.sort();
    assert_eq!(
        removed, expected,
        "exactly the crashed instance's queues are removed"
    );
    assert!(!exists(&janitor, &crashed_reply).await);
    assert!(!exists(&janitor, &crashed_broadcast).await);
    assert!(
        exists(&janitor, &live_reply).await,
        "a live instance keeps its reply queue"
    );
    assert!(
        exists(&janitor, &live_broadcast).await,
        "a live instance keeps its broadcast queue"
    );
    assert_eq!(
        rules(&janitor).await.len(),
        1,
        "the crashed instance's rule is gone, the live one's stays"
    );
    // Events still flow: the bus has no rule pointing at a deleted queue.
    let event = purista_core::Envelope::custom(
        purista_core::SenderAddress::default(),
        "anything",
        serde_json::json!({}),
    );
    live.emit(event)
        .await
        .expect("PutEvents works after the cleanup");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    live.shutdown(deadline).await;
    assert!(
        !exists(&janitor, &live_reply).await,
        "shutdown deletes the reply queue"
    );
    assert!(
        !exists(&janitor, &live_broadcast).await,
        "shutdown deletes the broadcast queue"
    );
    janitor
        .shutdown(tokio::time::Instant::now() + Duration::from_secs(5))
        .await;
    common::remove_all(&janitor).await;
}
