//! Bad input into every queue kind: malformed JSON, wrong types, an unknown messageType, an
//! oversize body, sent raw with `SendMessage` into a command queue, a reply queue and a
//! subscription queue (also as a retry copy, with the attempt attribute). Each is dropped with
//! a warning and counted as poison; the consumers keep consuming (a good message sent after
//! them is handled).

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use purista_bridge_aws::aws_sdk_sqs::types::MessageAttributeValue;
use purista_bridge_aws::{ATTR_ATTEMPT, AwsBridge};
use purista_core::{
    Address, CommandHandler, Delivery, DeliveryHandler, Envelope, EventBridge, FailurePolicy,
    RegistrationKey, SenderAddress, Settlement, SubscriptionFilter, SubscriptionSpec,
};
use serde_json::json;
use tokio::sync::mpsc;

common::runner::test_main! {
    common::ENDPOINT: [
        poison_in_every_queue_kind_is_dropped_and_the_consumers_go_on,
    ],
}

struct Collect(mpsc::UnboundedSender<Envelope>);

#[async_trait]
impl DeliveryHandler for Collect {
    async fn deliver(&self, delivery: Delivery) {
        let _ = self.0.send((*delivery.envelope).clone());
        let _ = delivery.settle.settle(Settlement::Ack).await;
    }
}

struct Echo;

#[async_trait]
impl CommandHandler for Echo {
    async fn handle(&self, command: Arc<Envelope>) -> Envelope {
        command.success_response(json!("ok"), None)
    }
}

fn poison(max: usize) -> Vec<String> {
    vec![
        "{not json".to_string(),
        r#"{"messageType": 5, "id": []}"#.to_string(),
        r#"{"messageType":"noSuchType","id":"x","timestamp":1,"sender":{"serviceName":"a","serviceVersion":"1","serviceTarget":"t","instanceId":"i"}}"#.to_string(),
        r#"{"detail-type":"customMessage","detail":{"messageType":"customMessage"}}"#.to_string(),
        format!("{{\"pad\":\"{}\"}}", "x".repeat(max)),
    ]
}

async fn poison_in_every_queue_kind_is_dropped_and_the_consumers_go_on() {
    let endpoint = common::endpoint();
    let prefix = common::prefix();
    // Moto's own SQS limit is 256 KiB; the oversize poison is just under it but over the
    // bridge's configured 64 KiB.
    let mut config = common::config(&endpoint, &prefix);
    config.max_message_bytes = 64 * 1024;
    let bridge = AwsBridge::new(config).await.unwrap();
    bridge.start().await.unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let key = RegistrationKey::from("sink@1/all");
    bridge
        .register_subscription(
            SubscriptionSpec {
                key: key.clone(),
                subscriber: Address::new("sink", "1", "all"),
                filter: SubscriptionFilter::new().event_name("good"),
                shared: true,
                durable: true,
                policy: FailurePolicy::default(),
                prefetch: 8,
            },
            Arc::new(Collect(tx)),
        )
        .await
        .unwrap();
    let endpoint_address = Address::new("echo", "1", "ping");
    bridge
        .register_command(endpoint_address.clone(), Arc::new(Echo))
        .await
        .unwrap();
    let sqs = bridge.sqs().clone();
    let sub_url = bridge.subscription_queue_url(&key).unwrap();
    let reply_url = bridge.reply_queue_url().unwrap().to_string();
    let cmd_url = sqs
        .get_queue_url()
        .queue_name(bridge.names().command_queue(&endpoint_address).unwrap())
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let bodies = poison(200 * 1024);
    let mut sent = 0u64;
    for url in [&sub_url, &reply_url, &cmd_url] {
        for body in &bodies {
            sqs.send_message()
                .queue_url(url)
                .message_body(body)
                .send()
                .await
                .unwrap();
            sent += 1;
        }
    }
    // Retry copies carry the attempt attribute; poison there too.
    for body in &bodies[..2] {
        sqs.send_message()
            .queue_url(&sub_url)
            .message_body(body)
            .message_attributes(
                ATTR_ATTEMPT,
                MessageAttributeValue::builder()
                    .data_type("String")
                    .string_value("2")
                    .build()
                    .unwrap(),
            )
            .send()
            .await
            .unwrap();
        sent += 1;
    }

    // The consumers go on: a good event reaches the subscription, a command is answered.
    let good = Envelope::custom(SenderAddress::default(), "good", json!({"n": 1}));
    bridge.emit(good).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("the subscription still consumes after poison")
        .unwrap();
    assert_eq!(got.event_name.as_deref(), Some("good"));
    let command = Envelope::command(
        SenderAddress {
            service_name: "caller".into(),
            service_version: "1".into(),
            service_target: "x".into(),
            instance_id: String::new(),
        },
        endpoint_address,
        json!({}),
        json!({}),
    );
    let answer = bridge
        .invoke(command, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(answer.payload, json!("ok"));

    // Every poison message was counted and removed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while bridge.counters().poison_messages < sent && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        bridge.counters().poison_messages,
        sent,
        "every poison message is counted once"
    );
    assert!(rx.try_recv().is_err(), "no poison reached the handler");
    bridge
        .shutdown(tokio::time::Instant::now() + Duration::from_secs(5))
        .await;
    common::remove_all(&bridge).await;
}
