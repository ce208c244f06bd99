//! Bad input into every queue kind: malformed JSON, wrong types, an unknown messageType, an
//! oversize body, sent raw with `SendMessage` into a command queue, a reply queue and a
//! subscription queue (also as a retry copy, with the attempt attribute). Each is dropped with
//! a warning and counted as poison; the consumers keep consuming (a good message sent after
//! them is handled).
//!
//! The same into a job queue of the queue bridge (plus a job of another queue): each goes to
//! the queue's dead-letter queue with the reason, and the lessee keeps leasing.

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use purista_bridge_aws::aws_sdk_sqs::types::MessageAttributeValue;
use purista_bridge_aws::{ATTR_ATTEMPT, AwsBridge};
use purista_core::{
    Address, CommandHandler, Delivery, DeliveryHandler, Envelope, EventBridge, FailurePolicy,
    NewJob, QueueBridge, QueueConfig, QueueDeclaration, QueueError, RegistrationKey, SenderAddress,
    Settlement, SubscriptionFilter, SubscriptionSpec,
};
use serde_json::json;
use tokio::sync::mpsc;

common::runner::test_main! {
    common::ENDPOINT: [
        poison_in_every_queue_kind_is_dropped_and_the_consumers_go_on,
        poison_in_a_job_queue_is_dead_lettered_with_its_reason_and_leasing_goes_on,
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

async fn poison_in_a_job_queue_is_dead_lettered_with_its_reason_and_leasing_goes_on() {
    let endpoint = common::endpoint();
    let prefix = common::prefix();
    // The bridge takes jobs of at most 64 KiB less the room of their dead letter; moto's own
    // SQS limit is 256 KiB, so the oversize body below gets into the queue.
    let mut config = common::config(&endpoint, &prefix);
    config.max_message_bytes = 64 * 1024;
    let bridge = AwsBridge::new(config).await.unwrap();
    let jobs = bridge.queue_bridge();
    jobs.declare_queue(
        "jobs",
        QueueDeclaration::new("bad-input@1", QueueConfig::default()),
    )
    .await
    .unwrap();
    let sqs = bridge.sqs().clone();
    let url = sqs
        .get_queue_url()
        .queue_name(bridge.names().job_queue("jobs").unwrap())
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let other_queues_job = json!({
        "id": "j-other", "queue": "elsewhere", "payload": {}, "parameter": null,
        "attempt": 1, "enqueuedAtMs": 1, "visibleAtMs": 1
    })
    .to_string();
    let mut bodies = poison(200 * 1024);
    bodies.push(other_queues_job);
    for body in &bodies {
        sqs.send_message()
            .queue_url(&url)
            .message_body(body)
            .send()
            .await
            .unwrap();
    }

    // An enqueue over the bridge's limit is refused before it reaches SQS.
    let oversize = NewJob {
        payload: json!("x".repeat(64 * 1024)),
        ..NewJob::default()
    };
    assert!(matches!(
        jobs.enqueue("jobs", oversize).await,
        Err(QueueError::InvalidRequest(_))
    ));

    // Leasing goes on: the good job enqueued after the poison is leased, as attempt 1.
    let id = jobs
        .enqueue(
            "jobs",
            NewJob {
                payload: json!({"n": 1}),
                ..NewJob::default()
            },
        )
        .await
        .unwrap();
    let leased = jobs
        .lease("jobs", Duration::from_secs(20))
        .await
        .unwrap()
        .expect("the lessee still leases after poison");
    assert_eq!((leased.id.as_str(), leased.attempt), (id.as_str(), 1));
    assert_eq!(leased.payload, json!({"n": 1}));
    jobs.settle(&leased, purista_core::JobSettlement::Complete)
        .await
        .unwrap();

    // Every poison message is in the dead-letter queue with its reason, the body as it came.
    let dead = jobs.inspect_dead_letters("jobs", 100).await.unwrap();
    assert_eq!(dead.len(), bodies.len(), "{dead:?}");
    for d in &dead {
        assert!(
            d.reason.starts_with("not a job: ")
                || d.reason == "a job of queue `elsewhere` arrived in queue `jobs`",
            "a dead letter without its reason: {}",
            d.reason
        );
    }
    let malformed = dead
        .iter()
        .find(|d| d.job.payload == json!("{not json"))
        .expect("the malformed body is kept as it came");
    assert!(malformed.reason.starts_with("not a job: "));
    let metrics = jobs.metrics("jobs").await.unwrap();
    assert_eq!(
        (metrics.depth, metrics.leased, metrics.dead_lettered),
        (0, 0, bodies.len()),
        "{metrics:?}"
    );
    // No job of this queue among them: nothing to replay, all to purge.
    assert_eq!(jobs.replay_dead_letters("jobs", None).await.unwrap(), 0);
    assert_eq!(jobs.purge_dead_letters("jobs").await.unwrap(), bodies.len());
    assert_eq!(jobs.metrics("jobs").await.unwrap().dead_lettered, 0);
    jobs.shutdown().await;
    common::remove_all(&bridge).await;
}
