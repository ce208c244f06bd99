//! Copies of commands for subscriptions: a responder trusts its last read of "who wants
//! copies" for a short while, and a registration that adds itself to that list returns only
//! once no responder trusts a read made before it. So a subscription on commands gets the
//! copy of every command served after its registration returned, even at a responder that
//! served a command (and read the list) a moment before.

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use purista_core::{
    Address, CommandHandler, Delivery, DeliveryHandler, Envelope, EventBridge, FailurePolicy,
    MessageType, RegistrationKey, SenderAddress, Settlement, SubscriptionFilter, SubscriptionSpec,
};
use serde_json::json;
use tokio::sync::Notify;

struct Echo;

#[async_trait]
impl CommandHandler for Echo {
    async fn handle(&self, command: Arc<Envelope>) -> Envelope {
        command.success_response(command.payload["payload"].clone(), None)
    }
}

/// Records the `payload` of each command copy it gets, and wakes whoever waits for one.
#[derive(Default)]
struct Copies {
    seen: Mutex<Vec<u64>>,
    arrived: Notify,
}

#[async_trait]
impl DeliveryHandler for Copies {
    async fn deliver(&self, delivery: Delivery) {
        if let Some(n) = delivery.envelope.payload["payload"].as_u64() {
            self.seen.lock().push(n);
            self.arrived.notify_waiters();
        }
        let _ = delivery.settle.settle(Settlement::Ack).await;
    }
}

fn command(n: u64) -> Envelope {
    Envelope::command(
        SenderAddress::default(),
        Address::new("svc", "1", "echo"),
        json!(n),
        json!({}),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_on_commands_gets_the_next_command_after_a_responder_read_the_list() {
    let double = common::double();
    let (server, _s) = common::bridge(&double, "copies-server", "copies").await;
    server
        .register_command(Address::new("svc", "1", "echo"), Arc::new(Echo))
        .await
        .expect("the command registers");
    let (caller, _c) = common::bridge(&double, "copies-caller", "copies").await;
    let (watcher, _w) = common::bridge(&double, "copies-watcher", "copies").await;

    // The responder reads the list (nobody wants copies yet) and may trust that read now.
    caller
        .invoke(command(0), Duration::from_secs(5))
        .await
        .expect("the first command");

    let copies = Arc::new(Copies::default());
    let mut filter = SubscriptionFilter::new();
    filter.message_type = Some(MessageType::Command);
    watcher
        .register_subscription(
            SubscriptionSpec {
                key: RegistrationKey::new("watch", "1", "commands"),
                subscriber: Address::new("watch", "1", "commands"),
                filter,
                shared: true,
                durable: false,
                policy: FailurePolicy::default(),
                prefetch: 16,
            },
            copies.clone(),
        )
        .await
        .expect("the subscription registers");

    // At once: no time for a cached read to run out by itself.
    for n in 1..=5 {
        caller
            .invoke(command(n), Duration::from_secs(5))
            .await
            .expect("a command after the registration");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let arrived = copies.arrived.notified();
        tokio::pin!(arrived);
        arrived.as_mut().enable();
        let mut seen = copies.seen.lock().clone();
        seen.sort_unstable();
        seen.dedup();
        if (1..=5).all(|n| seen.contains(&n)) {
            break;
        }
        assert!(
            tokio::time::timeout_at(deadline, arrived).await.is_ok(),
            "copies of the commands served after the registration returned: {seen:?}, wanted 1..=5"
        );
    }
}
