//! Bad input published raw with KubeMQ's Rust SDK onto every channel the bridge consumes —
//! a subscription's event channel, a shared subscription's hand-off channel and a command's
//! query channel: malformed JSON, wrong types, an unknown `messageType`, an oversize body.
//! Each is dropped with a warning (events) or answered with an error (queries) and counted as
//! poison; the consumer goes on with the next good message.
#![cfg(feature = "double")]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use purista_bridge_kubemq::double::{DoubleOptions, KubemqDouble};
use purista_bridge_kubemq::kubemq::{Event, Query};
use purista_bridge_kubemq::{KubemqBridge, KubemqConfig};
use purista_core::{
    Address, CommandHandler, Delivery, DeliveryHandler, Envelope, EventBridge, FailurePolicy,
    RegistrationKey, SenderAddress, Settlement, SubscriptionFilter, SubscriptionSpec,
};
use tokio::time::Instant;

const MAX_PAYLOAD: usize = 64 * 1024;

fn bad_bodies() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("malformed JSON", b"{\"id\": \"x\", \"messageType\": ".to_vec()),
        ("not JSON at all", vec![0xff, 0xfe, 0x00, 0x01]),
        (
            "wrong types",
            br#"{"id": 7, "timestamp": "yesterday", "messageType": "customMessage", "sender": []}"#
                .to_vec(),
        ),
        (
            "unknown messageType",
            br#"{"id":"u1","timestamp":1,"messageType":"somethingElse","sender":{"serviceName":"s","serviceVersion":"1","serviceTarget":"t","instanceId":"i"}}"#
                .to_vec(),
        ),
        ("oversize", {
            let mut v = br#"{"id":"big","timestamp":1,"messageType":"customMessage","eventName":"e","sender":{"serviceName":"s","serviceVersion":"1","serviceTarget":"t","instanceId":"i"},"payload":""#.to_vec();
            v.extend(std::iter::repeat_n(b'x', MAX_PAYLOAD * 2));
            v.extend(b"\"}");
            v
        }),
    ]
}

struct Collect(Mutex<Vec<Arc<Envelope>>>);

#[async_trait]
impl DeliveryHandler for Collect {
    async fn deliver(&self, delivery: Delivery) {
        self.0.lock().push(delivery.envelope.clone());
        let _ = delivery.settle.settle(Settlement::Ack).await;
    }
}

struct Echo;

#[async_trait]
impl CommandHandler for Echo {
    async fn handle(&self, command: Arc<Envelope>) -> Envelope {
        command.success_response(command.payload["payload"].clone(), None)
    }
}

async fn bridge(double: &KubemqDouble) -> KubemqBridge {
    let mut config = KubemqConfig::new("127.0.0.1", double.port()).with_prefix("bad");
    config.max_payload_bytes = MAX_PAYLOAD;
    let bridge = KubemqBridge::new(config).await.expect("bridge");
    bridge.start().await.expect("starts on the double");
    bridge
}

fn custom(event: &str, n: u64) -> Envelope {
    Envelope::custom(
        SenderAddress {
            service_name: "pub".into(),
            service_version: "1".into(),
            service_target: "t".into(),
            instance_id: "i".into(),
        },
        event,
        serde_json::json!({ "n": n }),
    )
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within 10 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn poison_on_event_and_hand_off_channels_is_dropped_and_the_consumer_goes_on() {
    let double = KubemqDouble::start(DoubleOptions::default()).unwrap();
    let consumer = bridge(&double).await;
    let publisher = bridge(&double).await;
    let got = Arc::new(Collect(Mutex::new(Vec::new())));
    let key = RegistrationKey::new("svc", "1", "sub");
    consumer
        .register_subscription(
            SubscriptionSpec {
                key: key.clone(),
                subscriber: Address::new("svc", "1", "sub"),
                filter: SubscriptionFilter::new().event_name("poisoned"),
                shared: true,
                durable: false,
                policy: FailurePolicy::default(),
                prefetch: 1,
            },
            got.clone(),
        )
        .await
        .expect("subscribes");
    let sdk = publisher.client();
    let event_channel = publisher.channels().event(&custom("poisoned", 0));
    let handoff = publisher.channels().handoff(&key);
    let mut sent = 0;
    for channel in [&event_channel, &handoff] {
        for (what, body) in bad_bodies() {
            sdk.send_event(Event::builder().channel(channel.clone()).body(body).build())
                .await
                .unwrap_or_else(|e| panic!("the SDK publishes {what}: {e}"));
            sent += 1;
        }
    }
    // A good message after all that still arrives.
    publisher.emit(custom("poisoned", 1)).await.expect("emit");
    wait_for("the good message after the poison", || {
        !got.0.lock().is_empty()
    })
    .await;
    assert_eq!(got.0.lock()[0].payload["n"], 1);
    assert_eq!(got.0.lock().len(), 1, "poison reached the handler");
    wait_for("every poison counted", || {
        consumer.counters().poison_messages == sent
    })
    .await;
    consumer
        .shutdown(Instant::now() + Duration::from_secs(2))
        .await;
    publisher
        .shutdown(Instant::now() + Duration::from_secs(2))
        .await;
}

#[tokio::test]
async fn poison_on_a_command_channel_is_answered_with_an_error_and_commands_go_on() {
    let double = KubemqDouble::start(DoubleOptions::default()).unwrap();
    let server = bridge(&double).await;
    let caller = bridge(&double).await;
    let address = Address::new("svc", "1", "echo");
    server
        .register_command(address.clone(), Arc::new(Echo))
        .await
        .expect("serves");
    let channel = caller.channels().command(&address);
    for (what, body) in bad_bodies() {
        let reply = caller
            .client()
            .send_query(
                Query::builder()
                    .channel(channel.clone())
                    .body(body)
                    .timeout(Duration::from_secs(5))
                    .build(),
            )
            .await
            .unwrap_or_else(|e| panic!("{what}: the query is answered, not timed out: {e}"));
        assert!(!reply.executed, "{what}: poison was executed");
        assert!(
            reply.error.contains("not a PURISTA command envelope"),
            "{what}: {}",
            reply.error
        );
    }
    assert_eq!(server.counters().poison_messages, bad_bodies().len() as u64);
    let command = Envelope::command(
        SenderAddress::default(),
        address,
        serde_json::json!("hi"),
        serde_json::json!({}),
    );
    let response = caller
        .invoke(command, Duration::from_secs(5))
        .await
        .expect("a good command after the poison is answered");
    assert_eq!(response.payload, "hi");
    server
        .shutdown(Instant::now() + Duration::from_secs(2))
        .await;
    caller
        .shutdown(Instant::now() + Duration::from_secs(2))
        .await;
}
