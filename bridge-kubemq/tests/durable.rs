//! Durable subscriptions on the KubeMQ bridge (a queue per subscription, `durable.rs`): the
//! outcomes hold on durable deliveries as on live ones — a delayed retry comes back as the next
//! attempt no earlier than its delay and survives the consumer going away, a dead letter keeps
//! the envelope with reason, attempts and origin, pause hands the delivery back and takes
//! nothing until resumed — and a durable broadcast subscription is refused with a typed error.
#![cfg(feature = "double")]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use purista_bridge_kubemq::double::{DoubleOptions, KubemqDouble};
use purista_bridge_kubemq::{KubemqBridge, KubemqConfig};
use purista_core::{
    Address, BridgeError, DeadLetterNote, Delivery, DeliveryHandler, Envelope, EventBridge,
    FailurePolicy, RegistrationKey, SenderAddress, Settlement, SubscriptionFilter,
    SubscriptionOperator, SubscriptionSpec,
};
use tokio::time::Instant;

const RETRY_DELAY: Duration = Duration::from_millis(1_300);

fn spec(name: &str, shared: bool) -> SubscriptionSpec {
    SubscriptionSpec {
        key: RegistrationKey::new("svc", "1", name),
        subscriber: Address::new("svc", "1", name),
        filter: SubscriptionFilter::new().event_name("tick"),
        shared,
        durable: true,
        policy: FailurePolicy::default(),
        prefetch: 2,
    }
}

fn tick(n: u64) -> Envelope {
    let mut tick = Envelope::custom(
        SenderAddress::default(),
        "tick",
        serde_json::json!({ "n": n }),
    );
    tick.sender.service_name = "p".into();
    tick
}

async fn bridge(double: &KubemqDouble, prefix: &str) -> KubemqBridge {
    let config = KubemqConfig::new("127.0.0.1", double.port()).with_prefix(prefix);
    let bridge = KubemqBridge::new(config).await.unwrap();
    bridge.start().await.unwrap();
    bridge
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within 15 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Attempt 1: retry after [`RETRY_DELAY`]; attempt 2: dead letter. Records (n, attempt, when).
struct RetryThenDeadLetter(Mutex<Vec<(u64, u32, Instant)>>);

#[async_trait]
impl DeliveryHandler for RetryThenDeadLetter {
    async fn deliver(&self, delivery: Delivery) {
        let n = delivery.envelope.payload["n"].as_u64().unwrap_or(u64::MAX);
        self.0.lock().push((n, delivery.attempt, Instant::now()));
        let settlement = if delivery.attempt == 1 {
            Settlement::Redeliver {
                delay: RETRY_DELAY,
                next_attempt: 2,
            }
        } else {
            Settlement::DeadLetter(DeadLetterNote {
                target: "svc.dead-letter".into(),
                reason: "failed twice".into(),
                attempts: delivery.attempt,
                origin: "svc@1/outcomes".into(),
            })
        };
        delivery.settle.settle(settlement).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_retry_waits_its_delay_and_a_dead_letter_keeps_the_envelope() {
    let double = KubemqDouble::start(DoubleOptions::default()).unwrap();
    let consumer = bridge(&double, "durable-outcomes").await;
    let seen = Arc::new(RetryThenDeadLetter(Mutex::new(Vec::new())));
    consumer
        .register_subscription(spec("outcomes", true), seen.clone())
        .await
        .unwrap();
    // Started after the registration: a publisher reads the registry of durable subscriptions
    // at start, so it knows this one for certain (one started before learns of it live, within
    // moments, and what it publishes before that is not kept for the subscription).
    let publisher = bridge(&double, "durable-outcomes").await;
    publisher.emit(tick(7)).await.unwrap();
    eventually("both attempts", || seen.0.lock().len() >= 2).await;
    let got = seen.0.lock().clone();
    assert_eq!((got[0].0, got[0].1), (7, 1));
    assert_eq!((got[1].0, got[1].1), (7, 2));
    let waited = got[1].2 - got[0].2;
    assert!(
        waited >= RETRY_DELAY,
        "the retry came after {waited:?}, before its delay of {RETRY_DELAY:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    let dead = loop {
        let dead = consumer
            .inspect_dead_letters("svc.dead-letter", 10)
            .await
            .unwrap();
        if !dead.is_empty() || Instant::now() > deadline {
            break dead;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(dead.len(), 1, "one dead letter: {dead:?}");
    assert_eq!(dead[0].note.reason, "failed twice");
    assert_eq!(dead[0].note.attempts, 2);
    assert_eq!(dead[0].note.origin, "svc@1/outcomes");
    let envelope = dead[0].envelope.as_ref().expect("the envelope is kept");
    assert_eq!(envelope.payload["n"], 7);
    for b in [&consumer, &publisher] {
        b.shutdown(Instant::now() + Duration::from_secs(2)).await;
    }
}

/// Records (n, attempt); retries attempt 1 after [`RETRY_DELAY`], acks the rest.
struct RetryOnce(Mutex<Vec<(u64, u32)>>);

#[async_trait]
impl DeliveryHandler for RetryOnce {
    async fn deliver(&self, delivery: Delivery) {
        let n = delivery.envelope.payload["n"].as_u64().unwrap_or(u64::MAX);
        self.0.lock().push((n, delivery.attempt));
        let settlement = if delivery.attempt == 1 {
            Settlement::Redeliver {
                delay: RETRY_DELAY,
                next_attempt: 2,
            }
        } else {
            Settlement::Ack
        };
        delivery.settle.settle(settlement).await.unwrap();
    }
}

/// A retry is kept by KubeMQ, not by the consumer: the instance that scheduled it goes away,
/// and another instance of the subscription gets the next attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_retry_survives_the_instance_that_scheduled_it() {
    let double = KubemqDouble::start(DoubleOptions::default()).unwrap();
    let first = bridge(&double, "durable-retry").await;
    let before = Arc::new(RetryOnce(Mutex::new(Vec::new())));
    first
        .register_subscription(spec("kept", true), before.clone())
        .await
        .unwrap();
    // Started after the registration: a publisher reads the registry of durable subscriptions
    // at start, so it knows this one for certain (one started before learns of it live, within
    // moments, and what it publishes before that is not kept for the subscription).
    let publisher = bridge(&double, "durable-retry").await;
    publisher.emit(tick(3)).await.unwrap();
    eventually("the first attempt", || !before.0.lock().is_empty()).await;
    first
        .shutdown(Instant::now() + Duration::from_secs(2))
        .await;
    let second = bridge(&double, "durable-retry").await;
    let after = Arc::new(RetryOnce(Mutex::new(Vec::new())));
    second
        .register_subscription(spec("kept", true), after.clone())
        .await
        .unwrap();
    eventually("the second attempt on the other instance", || {
        !after.0.lock().is_empty()
    })
    .await;
    assert_eq!(before.0.lock().clone(), vec![(3, 1)]);
    assert_eq!(after.0.lock().clone(), vec![(3, 2)]);
    for b in [&second, &publisher] {
        b.shutdown(Instant::now() + Duration::from_secs(2)).await;
    }
}

/// Pauses on the first delivery; records every (n, attempt).
struct PauseFirst(Mutex<Vec<(u64, u32)>>);

#[async_trait]
impl DeliveryHandler for PauseFirst {
    async fn deliver(&self, delivery: Delivery) {
        let n = delivery.envelope.payload["n"].as_u64().unwrap_or(u64::MAX);
        let first = {
            let mut seen = self.0.lock();
            seen.push((n, delivery.attempt));
            seen.len() == 1
        };
        let settlement = if first {
            Settlement::Pause {
                reason: "downstream away".into(),
            }
        } else {
            Settlement::Ack
        };
        delivery.settle.settle(settlement).await.unwrap();
    }
}

/// Pause hands the delivery back to the queue and takes nothing until resumed; resumed, the
/// consumer gets it again (same attempt) and what was published meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_durable_consumer_takes_nothing_until_resumed_and_loses_nothing() {
    let double = KubemqDouble::start(DoubleOptions::default()).unwrap();
    let consumer = bridge(&double, "durable-pause").await;
    let seen = Arc::new(PauseFirst(Mutex::new(Vec::new())));
    let mut paused_spec = spec("paused", true);
    paused_spec.prefetch = 1;
    consumer
        .register_subscription(paused_spec, seen.clone())
        .await
        .unwrap();
    // Started after the registration: a publisher reads the registry of durable subscriptions
    // at start, so it knows this one for certain (one started before learns of it live, within
    // moments, and what it publishes before that is not kept for the subscription).
    let publisher = bridge(&double, "durable-pause").await;
    publisher.emit(tick(1)).await.unwrap();
    eventually("the pause", || {
        !consumer.paused_subscription_consumers().is_empty()
    })
    .await;
    for n in 2..=4 {
        publisher.emit(tick(n)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        seen.0.lock().clone(),
        vec![(1, 1)],
        "a paused consumer took a delivery"
    );
    assert!(
        consumer
            .resume_subscription_consumer(&RegistrationKey::new("svc", "1", "paused"))
            .await
            .unwrap()
    );
    eventually("everything after resume", || seen.0.lock().len() >= 5).await;
    let mut after: Vec<u64> = seen.0.lock()[1..].iter().map(|(n, _)| *n).collect();
    after.sort_unstable();
    assert_eq!(after, vec![1, 2, 3, 4]);
    assert!(seen.0.lock()[1..].iter().all(|(_, attempt)| *attempt == 1));
    for b in [&consumer, &publisher] {
        b.shutdown(Instant::now() + Duration::from_secs(2)).await;
    }
}

/// A durable subscription is a queue its instances share: a durable broadcast one is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_broadcast_subscription_is_refused_with_a_typed_error() {
    let double = KubemqDouble::start(DoubleOptions::default()).unwrap();
    let consumer = bridge(&double, "durable-broadcast").await;
    let refused = consumer
        .register_subscription(
            spec("everyone", false),
            Arc::new(RetryOnce(Mutex::new(Vec::new()))),
        )
        .await
        .expect_err("a durable broadcast subscription is refused");
    assert!(matches!(refused, BridgeError::Unsupported(_)), "{refused}");
    consumer
        .shutdown(Instant::now() + Duration::from_secs(2))
        .await;
}
